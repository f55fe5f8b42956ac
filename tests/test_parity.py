"""Keras parity (issue 12) and self-explaining optimizers (issue 13): amsgrad,
centered, SGD without momentum, argument ranges, unique names, plain
``tf.Variable``s, signatures, docstrings and repr."""

import inspect
import pydoc
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks
from keras_sketch import fused as fused_op
from tests.reference import RefOptimizer

ROWS, DIM = 48, 5
LOSSLESS = dict(depth=1, compression=1.0, min_rows=1)
PATHS = [None, False] if fused_op.available() else [False]
PUBLIC = [ks.CSAdam, ks.CSAdagrad, ks.CSMomentum, ks.CSRMSprop, ks.SM3]

# name -> (ours, Keras's), with the same hyper-parameters.
PAIRS = {
    "adam_amsgrad": (lambda **k: ks.CSAdam(learning_rate=0.02, amsgrad=True, **k),
                     lambda: keras.optimizers.Adam(learning_rate=0.02, amsgrad=True)),
    "adam_amsgrad_sketched_m": (lambda **k: ks.CSAdam(learning_rate=0.02, amsgrad=True, first_moment="sketch", **k),
                                lambda: keras.optimizers.Adam(learning_rate=0.02, amsgrad=True)),
    "rmsprop_centered": (lambda **k: ks.CSRMSprop(learning_rate=0.01, centered=True, **k),
                         lambda: keras.optimizers.RMSprop(learning_rate=0.01, centered=True)),
    "rmsprop_centered_momentum": (
        lambda **k: ks.CSRMSprop(learning_rate=0.01, centered=True, momentum=0.5, first_moment="sketch", **k),
        lambda: keras.optimizers.RMSprop(learning_rate=0.01, centered=True, momentum=0.5)),
    "rmsprop_rho_1": (lambda **k: ks.CSRMSprop(learning_rate=0.01, rho=1.0, momentum=1.0, **k),
                      lambda: keras.optimizers.RMSprop(learning_rate=0.01, rho=1.0, momentum=1.0)),
    "sgd": (lambda **k: ks.CSMomentum(learning_rate=0.1, momentum=0.0, **k),
            lambda: keras.optimizers.SGD(learning_rate=0.1)),
    "sgd_momentum_1": (lambda **k: ks.CSMomentum(learning_rate=0.01, momentum=1.0, **k),
                       lambda: keras.optimizers.SGD(learning_rate=0.01, momentum=1.0)),
}


def sparse(ids, values, rows=ROWS):
    return tf.IndexedSlices(tf.constant(values), tf.constant(ids, tf.int64), tf.constant([rows, DIM], tf.int64))


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("gradient", ["dense", "sparse"])
@pytest.mark.parametrize("fused", PATHS)
def test_lossless_new_options_equal_keras(name, gradient, fused):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    ours_var, keras_var = keras.Variable(x0), keras.Variable(x0)
    make_ours, make_keras = PAIRS[name]
    ours, reference = make_ours(fused=fused, **LOSSLESS), make_keras()
    for _ in range(20):
        g = rng.normal(size=(ROWS, DIM)).astype(np.float32)
        if gradient == "sparse":  # every row, shuffled, one row split in two
            ids = np.concatenate([rng.permutation(ROWS), [3]])
            values = g[ids].copy()
            values[-1] *= 0.5
            values[np.nonzero(ids[:-1] == 3)[0][0]] *= 0.5
            ours.apply([sparse(ids, values)], [ours_var])
        else:
            ours.apply([tf.constant(g)], [ours_var])
        reference.apply([tf.constant(g)], [keras_var])
    np.testing.assert_allclose(ours_var.numpy(), keras_var.numpy(), rtol=1e-5, atol=2e-6)
    # Same state, slot for slot (Keras's optimizer counts them too).
    hashes = [v for v in ours.variables if v.path.endswith("_hash")]
    assert len(ours.variables) - len(hashes) == len(reference.variables)


def test_sketched_amsgrad_never_underestimates():
    """A bucket-wise maximum of count-min buckets bounds exact AMSGrad's
    running maximum, on dense and on sparse steps."""
    rng = np.random.default_rng(1)
    exact = ks.CSAdam(amsgrad=True, fused=False, **LOSSLESS)
    sketched = ks.CSAdam(amsgrad=True, fused=False, depth=3, compression=0.3, min_rows=1)
    a = keras.Variable(np.zeros((ROWS, DIM), np.float32))
    b = keras.Variable(np.zeros((ROWS, DIM), np.float32))
    for step in range(12):
        scale = 3.0 if step == 2 else 1.0  # one large step: the maximum matters afterwards
        if step % 2:
            ids = rng.choice(ROWS, 10, replace=False)
            values = (scale * rng.normal(size=(10, DIM))).astype(np.float32)
            exact.apply([sparse(ids, values)], [a])
            sketched.apply([sparse(ids, values)], [b])
        else:
            g = tf.constant((scale * rng.normal(size=(ROWS, DIM))).astype(np.float32))
            exact.apply([g], [a])
            sketched.apply([g], [b])
    vhat_exact = exact._slots[0]["vhat"].query_all().numpy()
    vhat = sketched._slots[0]["vhat"].query_all().numpy()
    v = sketched._slots[0]["v"].query_all().numpy()
    assert sketched._slots[0]["vhat"].kind == "count_min" and sketched.memory_report().rows[0]["mode"] == "sketched"
    assert np.all(vhat >= vhat_exact - 1e-6)
    assert np.all(vhat >= v - 1e-7)
    assert np.any(vhat > v + 1e-4)  # the running maximum is not just v


REFERENCE_CASES = {
    "adam_amsgrad": ("adam", dict(learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=True)),
    "adam_amsgrad_no_m": ("adam", dict(learning_rate=0.01, beta_1=0.0, beta_2=0.99, epsilon=1e-7, amsgrad=True)),
    "rmsprop_centered": ("rmsprop", dict(learning_rate=0.01, rho=0.9, epsilon=1e-7, centered=True)),
    "rmsprop_centered_momentum": ("rmsprop", dict(learning_rate=0.01, rho=0.9, epsilon=1e-7, centered=True,
                                                  momentum=0.5)),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("first_moment", ["exact", "sketch"])
def test_sketched_new_options_match_numpy_reference(case, depth, first_moment):
    """amsgrad and centered with sketched state, dense and sparse steps
    (duplicate ids included), against tests/reference.py."""
    algorithm, hp = REFERENCE_CASES[case]
    rows = 200
    rng = np.random.default_rng(7)
    x0 = rng.normal(size=(rows, DIM)).astype(np.float32)
    var = keras.Variable(x0)
    cls = ks.CSAdam if algorithm == "adam" else ks.CSRMSprop
    opt = cls(depth=depth, compression=0.2, min_rows=10, fused=False, first_moment=first_moment, **hp)
    opt.build([var])
    sketch = next(s for s in opt._slots[0].values() if s.kind == "count_min")
    ref = RefOptimizer(algorithm, x0, sketch.params.numpy(), sketch.width, hp, sketch_m=first_moment == "sketch")
    for step in range(8):
        if step % 2:
            ids = rng.integers(0, rows, 30)
            g = rng.normal(size=(30, DIM)).astype(np.float32)
            opt.apply([sparse(ids, g, rows)], [var])
        else:
            ids, g = None, rng.normal(size=(rows, DIM)).astype(np.float32)
            opt.apply([tf.constant(g)], [var])
        want = ref.step(g, ids)
    np.testing.assert_allclose(var.numpy(), want, rtol=2e-4, atol=2e-5)


def test_sketched_centered_rmsprop_stays_finite():
    rng = np.random.default_rng(2)
    opt = ks.CSRMSprop(centered=True, first_moment="sketch", depth=3, compression=0.2, min_rows=1, fused=False)
    var = keras.Variable(np.zeros((ROWS, DIM), np.float32))
    for step in range(10):
        g = rng.normal(size=(ROWS, DIM)).astype(np.float32)
        opt.apply([tf.constant(g) if step % 2 else sparse(np.arange(8), g[:8])], [var])
    assert np.all(np.isfinite(var.numpy()))
    assert opt.memory_report().rows[0]["states"]["mg"][0] == "count_sketch"


def test_memory_report_counts_and_paths_of_new_slots():
    var = keras.Variable(np.zeros((ROWS, DIM), np.float32))
    adam = ks.CSAdam(amsgrad=True, min_rows=8, compression=0.5)
    adam.build([var])
    row = adam.memory_report().rows[0]
    assert set(row["states"]) == {"m", "v", "vhat"}
    assert row["states"]["vhat"] == row["states"]["v"]  # same kind and table shape
    assert row["exact_optimizer_bytes"] == 3 * ROWS * DIM * 4  # Keras's Adam(amsgrad=True): 3 slots
    if fused_op.available():
        assert row["path"] == "TF (amsgrad: the fused op has no kernel for it)"
        assert "amsgrad: the fused op has no kernel for it" in str(adam.memory_report())
    rms = ks.CSRMSprop(centered=True, momentum=0.5)
    rms.build([var])
    row = rms.memory_report().rows[0]
    assert set(row["states"]) == {"v", "m", "mg"} and row["exact_optimizer_bytes"] == 3 * ROWS * DIM * 4
    if fused_op.available():
        assert row["path"] == "TF (centered: the fused op has no kernel for it)"
        plain = ks.CSRMSprop(momentum=0.5)
        plain.build([var])
        assert plain.memory_report().rows[0]["path"] == "fused op"
    sgd = ks.CSMomentum(momentum=0.0)
    sgd.build([var])
    assert len(sgd.variables) == 2  # iterations and learning rate, as Keras's SGD
    assert sgd.memory_report().state_bytes == 0 and sgd.memory_report().exact_optimizer_bytes == 0
    if fused_op.available():
        assert sgd.memory_report().rows[0]["path"] == "TF (plain SGD, momentum=0: the fused op has no kernel for it)"


def test_state_budget_counts_new_slots():
    variables = [keras.Variable(np.zeros((400, 16), np.float32)), keras.Variable(np.zeros((16,), np.float32))]
    exact = 400 * 16 * 4 + 16 * 4
    opt = ks.CSAdam(amsgrad=True, state_budget=1.0)
    opt.build(variables)
    assert opt.memory_report().exact_optimizer_bytes == 3 * exact
    assert opt.memory_report().ratio == pytest.approx(1.0)
    half = ks.CSAdam(amsgrad=True, state_budget=0.5)
    half.build(variables)
    report = half.memory_report()
    assert half.dropped_slots == ("m",) and report.ratio <= 0.5
    assert set(report.rows[0]["states"]) == {"v", "vhat"}
    rms = ks.CSRMSprop(centered=True, momentum=0.5, state_budget=1.0)
    rms.build(variables)
    assert rms.memory_report().exact_optimizer_bytes == 3 * exact
    small = ks.CSRMSprop(centered=True, state_budget=0.3)
    small.build(variables)
    assert small.memory_report().ratio <= 0.3 and "mg" in small.memory_report().rows[0]["states"]
    sgd = ks.CSMomentum(momentum=0.0, state_budget=0.1)  # no state: any budget holds
    sgd.build(variables)
    assert sgd.memory_report().state_bytes == 0


def _saved(opt):
    store = {}
    opt.save_own_variables(store)
    return store


@pytest.mark.parametrize("make, option", [
    (lambda flag: ks.CSAdam(amsgrad=flag, min_rows=8), "amsgrad"),
    (lambda flag: ks.CSRMSprop(centered=flag, min_rows=8), "centered"),
])
def test_state_spec_refuses_state_of_the_other_option(make, option):
    var = keras.Variable(np.ones((ROWS, DIM), np.float32))
    with_option = make(True)
    with_option.apply([tf.ones((ROWS, DIM))], [var])
    store = _saved(with_option)
    without = make(False)
    without.build([var])
    before = [v.numpy().copy() for v in without.variables]
    with pytest.raises(ValueError, match=rf"{option}: saved True, this optimizer False"):
        without.load_own_variables(store)
    for v, b in zip(without.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    again = make(True)
    again.build([var])
    again.load_own_variables(store)
    for v, w in zip(again.variables, with_option.variables):
        np.testing.assert_array_equal(v.numpy(), w.numpy())


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("sketch", [LOSSLESS, dict(min_rows=8, compression=0.5)])
def test_plain_tf_variables(fused, sketch):
    """Mixed Keras and plain ``tf.Variable``s, as Keras's optimizers accept."""
    x0 = np.random.default_rng(3).normal(size=(ROWS, DIM)).astype(np.float32)
    kv, tv = keras.Variable(x0, name="kernel"), tf.Variable(x0, name="plain")
    opt = ks.CSAdam(learning_rate=0.01, fused=fused, **sketch)
    ref_k, ref_t = keras.Variable(x0), tf.Variable(x0)
    reference = keras.optimizers.Adam(learning_rate=0.01)
    g = tf.constant(np.full((ROWS, DIM), 0.3, np.float32))
    for _ in range(3):
        opt.apply_gradients([(g, kv), (g, tv)])
        opt.apply_gradients([(sparse(np.arange(ROWS), g.numpy()), tv)])
        reference.apply_gradients([(g, ref_k), (g, ref_t)])
        reference.apply_gradients([(g, ref_t)])
    if sketch is LOSSLESS:
        np.testing.assert_allclose(kv.numpy(), ref_k.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tv.numpy(), ref_t.numpy(), rtol=1e-5, atol=1e-6)
    report = opt.memory_report()
    assert [r["variable"] for r in report.rows] == ["kernel", "plain"]
    assert "plain" in str(report)
    store = _saved(opt)  # state spec and checksum
    again = ks.CSAdam(learning_rate=0.01, fused=fused, **sketch)
    again.build([kv, tv])
    again.load_own_variables(store)
    for v, w in zip(again.variables, opt.variables):
        np.testing.assert_array_equal(v.numpy(), w.numpy())


def test_default_names_are_unique_like_keras():
    keras.backend.clear_session()  # Keras's own optimizers restart their counts here too
    first, second, adam = ks.CSAdam(), ks.CSAdam(), keras.optimizers.Adam()
    assert (first.name, second.name) == ("csadam", "csadam_1")
    assert ks.CSMomentum().name == "csmomentum" and ks.SM3().name == "sm3"
    assert ks.CSAdam(name="mine").name == "mine"
    reloaded = keras.optimizers.deserialize(keras.optimizers.serialize(second))
    assert reloaded.name == "csadam_1"
    assert adam.name.startswith("adam")


def test_private_subclass_gets_a_valid_default_name():
    """A subclass whose name starts with ``_`` still gets a name Keras accepts
    as a scope (a leading underscore is not one), and it trains."""

    class _Private(ks.CSAdam):
        pass

    keras.backend.clear_session()
    opt = _Private(learning_rate=0.1)
    assert opt.name == "private"
    var = keras.Variable(np.ones((3, 2), "float32"))
    opt.apply([tf.ones((3, 2))], [var])
    assert np.all(var.numpy() < 1.0)


def test_get_and_deserialize_by_keras_name():
    opt = keras.optimizers.get({"class_name": "keras_sketch>CSAdam", "config": {"amsgrad": True}})
    assert isinstance(opt, ks.CSAdam) and opt.amsgrad
    with pytest.raises(ValueError):
        keras.optimizers.get("cs_typo")


def test_argument_ranges_follow_keras():
    ks.CSMomentum(momentum=1.0)  # Keras's SGD accepts [0, 1]
    ks.CSRMSprop(rho=1.0, momentum=1.0)  # Keras's RMSprop accepts both
    for bad in (-1.0, 2.0):
        with pytest.raises(ValueError, match=r"`momentum` must be a float between \[0, 1\]"):
            ks.CSMomentum(momentum=bad)
    with pytest.raises(ValueError, match=r"`rho` must be in \[0.0, 1.0\]"):
        ks.CSRMSprop(rho=1.5)
    with pytest.raises(ValueError, match=r"`beta_1` must be in \[0.0, 1.0\)"):
        ks.CSAdam(beta_1=1.0)  # Keras divides by 1 - beta_1^t = 0
    for make in (lambda: ks.CSAdam(amsgrad="yes"), lambda: ks.CSRMSprop(centered=1),
                 lambda: ks.CSMomentum(nesterov="no")):
        with pytest.raises(TypeError, match="must be True or False"):
            make()


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_signature_and_docstring_list_every_argument(cls):
    params = inspect.signature(cls).parameters
    assert not any(p.kind == p.VAR_KEYWORD for p in params.values())
    keras_base = next(c for c in keras.optimizers.Optimizer.__mro__ if c.__name__ == "BaseOptimizer")
    expected = {
        name for init in (keras_base.__init__, cls.__init__)
        for name, p in inspect.signature(init).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    if issubclass(cls, ks.SketchOptimizer):
        expected |= {"depth", "compression", "width", "min_rows", "hash_axis", "seed",
                     "cleaning_factor", "cleaning_interval", "fused", "state_budget"}
    assert expected <= set(params)
    for name in params:
        assert re.search(rf"\b{name}\b", cls.__doc__), f"{cls.__name__}'s docstring does not mention {name}"
    # Every argument of the signature is accepted, with the default it shows.
    opt = cls(**{name: p.default for name, p in params.items() if p.default is not p.empty})
    assert set(params) <= set(opt.get_config())  # and get_config returns every one
    assert f"{cls.__name__}(learning_rate=" in pydoc.render_doc(cls)


def test_user_subclasses_are_described_too():
    class Plain(ks.CSAdam):
        """My Adam."""

    class Extra(ks.CSMomentum):
        def __init__(self, boost=2.0, **kwargs):
            super().__init__(**kwargs)
            self.boost = boost

    assert str(inspect.signature(Plain)).startswith("(learning_rate=0.001, beta_1=0.9,")
    assert Plain.__doc__.startswith("My Adam.") and "min_rows" in Plain.__doc__
    params = inspect.signature(Extra).parameters
    assert list(params)[0] == "boost" and params["momentum"].kind == inspect.Parameter.KEYWORD_ONLY
    assert Extra(momentum=0.5).name == "extra"


def test_repr_shows_class_and_non_default_arguments():
    assert repr(ks.CSAdam()) == "CSAdam()"
    assert repr(ks.CSAdam(learning_rate=0.01, amsgrad=True, depth=3)) == \
        "CSAdam(learning_rate=0.01, amsgrad=True, depth=3)"
    assert repr(ks.CSMomentum(momentum=0.0, name="plain")) == "CSMomentum(momentum=0.0, name='plain')"
    assert repr(ks.CSRMSprop(centered=True, clipnorm=1.0)) == "CSRMSprop(centered=True, clipnorm=1.0)"
    assert repr(ks.SM3(variant="I")) == "SM3(variant='I')"
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert repr(ks.CSAdagrad(learning_rate=schedule)) == "CSAdagrad(learning_rate=<ExponentialDecay>)"
    assert str(ks.CSAdam(state_budget=0.02)) == "CSAdam(state_budget=0.02)"


@pytest.mark.parametrize("make", [
    lambda: ks.CSAdam(learning_rate=0.01, amsgrad=True, min_rows=8, compression=0.3, depth=3),
    lambda: ks.CSRMSprop(learning_rate=0.01, centered=True, momentum=0.5, first_moment="sketch", min_rows=8,
                         compression=0.3),
], ids=["amsgrad", "centered"])
def test_new_options_under_jit_compile(make):
    """Sparse (Embedding) and dense gradients under XLA equal the eager steps."""
    rng = np.random.default_rng(8)
    x = rng.integers(0, 16, size=(32, 4)).astype(np.int32)
    y = rng.normal(size=(32, 3)).astype(np.float32)
    weights = []
    for jit in (False, True):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(64, 6),
                                  keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])
        model.compile(optimizer=make(), loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        weights.append([w.numpy() for w in model.weights])
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
