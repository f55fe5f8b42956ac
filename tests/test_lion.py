"""CSLion: Keras's Lion when lossless, the NumPy reference when sketched, its
plan and memory report, ``state_budget``, the state spec, and the
``StepState.read`` helper its math is written with (docs/extending.md)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks
from keras_sketch import fused
from keras_sketch.memory import keras_state_bytes
from keras_sketch.sketch import COUNT_SKETCH, EXACT, Sketch, hash_params
from keras_sketch.state import ExactState, Rows, StepState
from tests.reference import RefOptimizer, all_rows_in_parts
from tests.test_keras_conformance import OPTIONS, _gradients, _run

ROWS, DIM = 300, 5
HP = dict(learning_rate=0.01, beta_1=0.9, beta_2=0.99)
LOSSLESS = dict(depth=1, compression=1.0, min_rows=1)
PATHS = [pytest.param(False, id="tf"), pytest.param(None, id="default")]


def sparse(ids, values, rows=ROWS):
    return tf.IndexedSlices(
        tf.constant(values, tf.float32), tf.constant(ids, tf.int64), tf.constant([rows, values.shape[1]], tf.int64)
    )


# --- lossless: keras.optimizers.Lion ---------------------------------------------------


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("use_fused", PATHS)
def test_lossless_configuration_equals_keras_lion_for_20_steps(path, use_fused):
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    ours_var, keras_var = keras.Variable(x0), keras.Variable(x0)
    ours = ks.CSLion(**HP, **LOSSLESS, fused=use_fused)
    reference = keras.optimizers.Lion(**HP)
    for _ in range(20):
        g = rng.normal(size=(ROWS, DIM)).astype(np.float32)
        if path == "sparse":
            ids, parts = all_rows_in_parts(rng, g)  # the merged sparse gradient equals g
            ours.apply([sparse(ids, parts)], [ours_var])
        else:
            ours.apply([tf.constant(g)], [ours_var])
        reference.apply([tf.constant(g)], [keras_var])
    assert ours._plans[0].layout.rows == ROWS and not ours._plans[0].sketched  # identity: lossless
    np.testing.assert_allclose(ours_var.numpy(), keras_var.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours_var.numpy(), x0)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_base_option_matches_keras_lion(option, kind):
    """Weight decay, clipping, EMA, accumulation, loss scaling, schedules:
    lossless CSLion with the option equals keras.optimizers.Lion with it."""
    kwargs = dict(OPTIONS[option])
    kwargs.setdefault("learning_rate", 0.05)
    grads = _gradients(kind)
    scale = kwargs.get("loss_scale_factor", 1.0)
    ours, ours_bias, _ = _run(ks.CSLion(depth=1, width=30, min_rows=1, **kwargs), grads, 0, scale)
    theirs, theirs_bias, _ = _run(keras.optimizers.Lion(**kwargs), grads, 1, scale)
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ours_bias, theirs_bias, rtol=2e-5, atol=2e-6)


# --- sketched: the NumPy reference -------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("use_fused", PATHS)
def test_sketched_lion_matches_numpy_reference(depth, use_fused):
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    var = keras.Variable(x0)
    opt = ks.CSLion(**HP, depth=depth, compression=0.2, min_rows=10, fused=use_fused)
    opt.build([var])
    m = opt._slots[0]["m"]
    assert m.kind == COUNT_SKETCH and not m.identity and m.depth == depth
    ref = RefOptimizer("lion", x0, m.params.numpy(), m.width, HP)
    for step in range(10):
        if step % 2 == 0:
            g = rng.normal(size=(ROWS, DIM))
            opt.apply([tf.constant(g, tf.float32)], [var])
            ids = None
        else:
            ids = rng.zipf(1.5, size=40) % ROWS  # skewed, repeated ids
            g = rng.normal(size=(40, DIM))
            opt.apply([sparse(ids, g)], [var])
        np.testing.assert_allclose(var.numpy(), ref.step(g, ids), rtol=2e-4, atol=2e-5)


def test_sparse_step_is_lazy_and_duplicates_merge():
    rng = np.random.default_rng(5)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    a, b = keras.Variable(x0), keras.Variable(x0)
    opt_a, opt_b = ks.CSLion(min_rows=10, depth=3), ks.CSLion(min_rows=10, depth=3)
    for _ in range(4):
        vals = rng.normal(size=(6, DIM)).astype(np.float32)
        merged = np.stack([vals[[0, 2, 3]].sum(0), vals[[1, 5]].sum(0), vals[4]])
        opt_a.apply([sparse(np.array([3, 7, 3, 3, 250, 7]), vals)], [a])
        opt_b.apply([sparse(np.array([3, 7, 250]), merged)], [b])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    untouched = np.setdiff1d(np.arange(ROWS), [3, 7, 250])
    np.testing.assert_array_equal(a.numpy()[untouched], x0[untouched])
    assert not np.allclose(a.numpy()[[3, 7, 250]], x0[[3, 7, 250]])


# --- defaults, plan, memory report -----------------------------------------------------------


def lm(vocab=5000):
    return keras.Sequential([keras.Input((12,), dtype="int32"), keras.layers.Embedding(vocab, 32),
                             keras.layers.LSTM(16), keras.layers.Dense(50)])


def test_default_sketches_the_embedding_momentum_and_reports_the_tf_path():
    model = lm()
    opt = ks.CSLion()
    opt.build(model.trainable_variables)
    report = opt.memory_report()
    rows = {r["variable"].split("/")[-1]: r for r in report.rows}
    emb = next(r for r in report.rows if r["shape"] == (5000, 32))
    assert emb["mode"] == "sketched" and emb["hashed_axis"] == "first"
    kind, shape = emb["states"]["m"]
    assert kind == COUNT_SKETCH and shape == (1, 1000, 32)  # compression 0.2, depth 1
    assert emb["sparse_path"] == "sparse rows"
    for r in report.rows:
        if r is not emb:  # LSTM and the 16-row softmax kernel: below min_rows, exact
            assert r["mode"] == "exact" and r["states"]["m"][0] == EXACT, r["variable"]
        assert r["exact_optimizer_bytes"] == 4 * int(np.prod(r["shape"]))  # Lion: one slot
    assert report.state_bytes == keras_state_bytes(opt)
    keras_lion = keras.optimizers.Lion()
    keras_lion.build(model.trainable_variables)
    assert report.exact_optimizer_bytes == keras_state_bytes(keras_lion)
    assert 0.2 < report.ratio < 0.4
    assert "m:1x1000x32(csketch)" in str(report)
    assert rows  # every variable has a row


def test_plan_reports_the_pure_tf_path_with_its_reason():
    """The fused op has no Lion kernel: every variable takes the pure-TF path
    and the plan (and the memory report) says why."""
    if not fused.available():
        pytest.skip(f"the fused op library is not loaded here: {fused.unavailable_reason()}")
    var = keras.Variable(np.zeros((ROWS, DIM), np.float32))
    for setting in (None, True):
        opt = ks.CSLion(min_rows=10, fused=setting)
        opt.build([var])
        plan = opt._plans[0]
        assert not plan.fused and plan.fused_reason == "CSLion has no fused kernel"
        assert opt.memory_report().rows[0]["path"] == "TF (CSLion has no fused kernel)"
    # ... while CSMomentum, the same slot layout, runs fused
    momentum = ks.CSMomentum(min_rows=10)
    momentum.build([keras.Variable(np.zeros((ROWS, DIM), np.float32))])
    assert momentum._plans[0].fused
    off = ks.CSLion(min_rows=10, fused=False)
    off.build([var])
    assert off.memory_report().rows[0]["path"] == "TF (disabled by fused=False)"


# --- state_budget ----------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.1, 0.02])
def test_state_budget_is_met_as_reported(budget):
    model = lm()
    opt = ks.CSLion(state_budget=budget)
    opt.build(model.trainable_variables)
    report = opt.memory_report()
    assert report.state_budget == budget
    assert report.ratio <= budget + 1e-12
    assert report.state_bytes == keras_state_bytes(opt)
    if budget < 1.0:
        assert report.ratio > 0.5 * budget
        assert opt.dropped_slots == ()  # Lion cannot run without its momentum
        assert any(r["mode"] == "sketched" for r in report.rows)


def test_full_budget_is_keras_lion():
    rng = np.random.default_rng(8)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    a, b = keras.Variable(x0), keras.Variable(x0)
    ours, theirs = ks.CSLion(**HP, state_budget=1.0), keras.optimizers.Lion(**HP)
    for _ in range(5):
        g = tf.constant(rng.normal(size=(ROWS, DIM)).astype(np.float32))
        ours.apply([g], [a])
        theirs.apply([g], [b])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


# --- configuration, state spec, bad input -------------------------------------------------------


def test_config_and_state_spec():
    opt = ks.CSLion(learning_rate=3e-4, beta_1=0.95, beta_2=0.98, depth=2, min_rows=10)
    config = opt.get_config()
    assert (config["beta_1"], config["beta_2"], config["depth"]) == (0.95, 0.98, 2)
    again = ks.CSLion.from_config(config)
    assert again.get_config() == config
    var = keras.Variable(np.zeros((ROWS, DIM), np.float32))
    opt.build([var])
    from keras_sketch.optimizers import state_spec

    spec = state_spec.state_spec(opt)
    assert spec["class"] == "CSLion"
    assert spec["settings"]["beta_1"] == 0.95 and spec["settings"]["beta_2"] == 0.98
    assert [tuple(s[1]) for s in spec["state"] if s[0].endswith("m_sketch")] == [(2, 30, DIM)]  # ceil(0.2 * 300 / 2)


def test_state_saved_with_other_sketch_settings_is_refused(tmp_path):
    model = lm(vocab=200)
    model.compile(ks.CSLion(min_rows=10), "mse")
    model.optimizer.build(model.trainable_variables)
    model.save_weights(str(tmp_path / "lion.weights.h5"))
    other = lm(vocab=200)
    other.compile(ks.CSLion(min_rows=10, depth=3), "mse")
    other.optimizer.build(other.trainable_variables)
    before = [v.numpy().copy() for v in other.optimizer.variables]
    with pytest.raises(ValueError, match="depth: saved 1, this optimizer 3"):
        other.load_weights(str(tmp_path / "lion.weights.h5"))
    for v, b in zip(other.optimizer.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_state_of_another_optimizer_with_the_same_shapes_is_refused(tmp_path):
    # CSLion's m and CSMomentum's momentum have one shape and different meanings.
    model = lm(vocab=200)
    model.compile(ks.CSLion(min_rows=10), "mse")
    model.optimizer.build(model.trainable_variables)
    model.save_weights(str(tmp_path / "lion.weights.h5"))
    ckpt = tf.train.Checkpoint(optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    other = lm(vocab=200)
    other.compile(ks.CSMomentum(min_rows=10), "mse")
    other.optimizer.build(other.trainable_variables)
    ours = [(tuple(v.shape), v.dtype) for v in other.optimizer.variables]
    assert ours == [(tuple(v.shape), v.dtype) for v in model.optimizer.variables]  # only the kind differs
    before = [v.numpy().copy() for v in other.optimizer.variables]
    message = "saved the state of CSLion, this optimizer is CSMomentum"
    with pytest.raises(ValueError, match=message):
        other.load_weights(str(tmp_path / "lion.weights.h5"))
    with pytest.raises(ValueError, match=message):
        tf.train.Checkpoint(optimizer=other.optimizer).restore(ckpt)
    for v, b in zip(other.optimizer.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_a_subclass_loads_the_state_of_its_keras_sketch_class(tmp_path):
    class MyLion(ks.CSLion):
        pass

    model = lm(vocab=200)
    model.compile(ks.CSLion(min_rows=10), "mse")
    model.optimizer.build(model.trainable_variables)
    model.save_weights(str(tmp_path / "lion.weights.h5"))
    other = lm(vocab=200)
    other.compile(MyLion(min_rows=10), "mse")
    other.optimizer.build(other.trainable_variables)
    other.load_weights(str(tmp_path / "lion.weights.h5"))
    for v, b in zip(other.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(v.numpy(), b.numpy())


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(beta_1=0.0), ValueError, "`beta_1` must be in \\(0.0, 1.0\\]"),
        (dict(beta_1=1.5), ValueError, "`beta_1`"),
        (dict(beta_2=1.0), ValueError, "`beta_2` must be in \\[0.0, 1.0\\)"),
        (dict(beta_2="0.9"), TypeError, "`beta_2` must be a number"),
        (dict(beta_1=float("nan")), ValueError, "`beta_1` must be a finite number"),
        (dict(learning_rate=-1.0), ValueError, "`learning_rate`"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        ks.CSLion(**kwargs)


def test_fit_lowers_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 300, size=(256, 12)).astype(np.int32)
    y = (x[:, :1] % 7).astype(np.float32)
    model = keras.Sequential([keras.Input((12,), dtype="int32"), keras.layers.Embedding(300, 8),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])
    model.compile(ks.CSLion(learning_rate=0.02, min_rows=100), "mse")
    assert model.optimizer.built is False
    loss = model.fit(x, y, batch_size=32, epochs=6, verbose=0).history["loss"]
    assert model.optimizer.memory_report().rows[0]["mode"] == "sketched"  # the embedding
    assert loss[-1] < 0.5 * loss[0]


# --- StepState.read: the estimate before the update --------------------------------------------


@pytest.mark.parametrize("sketched", [False, True], ids=["exact", "sketch"])
def test_step_state_read_returns_the_estimate_before_the_update(sketched):
    rng = np.random.default_rng(9)
    start = rng.normal(size=(20, 3)).astype(np.float32)
    if sketched:
        table = tf.Variable(tf.zeros([3, 7, 3]))
        slot = Sketch(table, tf.Variable(hash_params(0, 0, 3)), 20, COUNT_SKETCH)
        slot.decay_add_all(0.0, tf.constant(start))
    else:
        slot = ExactState(tf.Variable(start))
    before_all = slot.query_all().numpy()
    x = rng.normal(size=(20, 3)).astype(np.float32)

    @tf.function
    def dense_step(x):  # inside tf.function too, the read comes before the write
        state = StepState({"m": slot})
        return state.read("m"), state.ema("m", x, 0.5), state.read("m")

    before, after, read_after = (t.numpy() for t in dense_step(tf.constant(x)))
    np.testing.assert_allclose(before, before_all, rtol=1e-6)
    np.testing.assert_allclose(read_after, after, rtol=1e-6)
    if not sketched:
        np.testing.assert_allclose(after, 0.5 * start + 0.5 * x, rtol=1e-6)
    ids = tf.constant([4, 11, 2], tf.int64)
    rows = Rows(ids, tf.ones([3, 1]))
    state = StepState({"m": slot}, rows)
    prev = state.read("m").numpy()
    np.testing.assert_allclose(prev, after[[4, 11, 2]], rtol=1e-6)
    new = state.ema("m", tf.constant(x[:3]), 0.5).numpy()
    np.testing.assert_allclose(state.read("m").numpy(), new, rtol=1e-6)
    if not sketched:
        np.testing.assert_allclose(new, 0.5 * prev + 0.5 * x[:3], rtol=1e-6)
