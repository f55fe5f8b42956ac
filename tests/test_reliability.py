"""Reliability: non-finite gradients never enter shared state, invalid steps
write nothing, bad arguments and corrupted or foreign state are refused
(keras_sketch/guard.py, the optimizers' argument checks, state checksums)."""

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch
from keras_sketch import fused

ROWS, DIM = 600, 4
FUSED = [False] + ([True] if fused.available() else [])


def factories(use_fused):
    """Sketched configurations of every optimizer (depth 3 shares buckets most)."""
    common = dict(min_rows=16, compression=0.1, fused=use_fused)
    return {
        "adam_d3": lambda: keras_sketch.CSAdam(depth=3, **common),
        "adam_nom": lambda: keras_sketch.CSAdam(beta_1=0.0, **common),
        "adam_sketch_m": lambda: keras_sketch.CSAdam(first_moment="sketch", depth=3, **common),
        "adagrad": lambda: keras_sketch.CSAdagrad(depth=3, **common),
        "rmsprop": lambda: keras_sketch.CSRMSprop(momentum=0.5, first_moment="sketch", **common),
        "momentum": lambda: keras_sketch.CSMomentum(depth=3, **common),
        "sm3": lambda: keras_sketch.SM3(learning_rate=0.01),
    }


def make_vars():
    rng = np.random.default_rng(0)
    return [
        tf.Variable(rng.normal(size=(ROWS, DIM)).astype("float32"), name="table"),
        tf.Variable(rng.normal(size=(DIM,)).astype("float32"), name="bias"),
    ]


def state_arrays(opt, variables):
    return [v.numpy().copy() for v in variables] + [np.asarray(v).copy() for v in opt.variables]


def sparse(ids, values):
    return tf.IndexedSlices(tf.constant(values, tf.float32), tf.constant(ids, tf.int64), tf.constant([ROWS, DIM], tf.int64))


def clean_batch(rng, k=64):
    ids = rng.integers(0, ROWS, size=k)
    return ids, rng.normal(size=(k, DIM)).astype("float32")


def applier(opt, variables, xla):
    if xla is None:
        return lambda grads: opt.apply(grads, variables)
    fn = tf.function(lambda grads: opt.apply(grads, variables), jit_compile=xla, reduce_retracing=True)
    return fn


@pytest.mark.parametrize("use_fused", FUSED)
@pytest.mark.parametrize("name", list(factories(False)))
def test_nan_row_is_contained_and_equals_leaving_it_out(name, use_fused):
    rng = np.random.default_rng(1)
    batches = [clean_batch(rng) for _ in range(6)]
    bad_ids, bad_values = clean_batch(rng)
    bad_values[5, 2] = np.nan
    bad_values[9, 0] = np.inf
    bad_ids[9] = bad_ids[10]  # a duplicate of a clean row: that row still gets its clean part
    runs = []
    for leave_out in (False, True):
        variables = make_vars()
        opt = factories(use_fused)[name]()
        step = applier(opt, variables, None)
        for ids, values in batches:
            step([sparse(ids, values), tf.zeros([DIM])])
        if leave_out:
            keep = np.ones(len(bad_ids), bool)
            keep[[5, 9]] = False
            step([sparse(bad_ids[keep], bad_values[keep]), tf.zeros([DIM])])
        else:
            step([sparse(bad_ids, bad_values), tf.zeros([DIM])])
        for ids, values in batches[:2]:
            step([sparse(ids, values), tf.zeros([DIM])])
        runs.append(state_arrays(opt, variables))
    for with_nan, without in zip(*runs):
        assert np.all(np.isfinite(with_nan))
        np.testing.assert_allclose(with_nan, without, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adam_d3", "momentum", "sm3"])
def test_dense_nan_row_counts_as_zero_gradient(name):
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(ROWS, DIM)).astype("float32")
    bad = grads.copy()
    bad[7, 1] = np.nan
    zeroed = grads.copy()
    zeroed[7] = 0.0
    out = []
    for g in (bad, zeroed):
        variables = make_vars()
        opt = factories(False)[name]()
        for _ in range(3):
            opt.apply([tf.constant(g), tf.ones([DIM])], variables)
        out.append(state_arrays(opt, variables))
    for a, b in zip(*out):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_xla_path_contains_nan_and_drops_out_of_range_ids():
    rng = np.random.default_rng(3)
    ids, values = clean_batch(rng)
    values[3, 0] = np.nan
    ids[4] = ROWS + 5
    keep = np.ones(len(ids), bool)
    keep[[3, 4]] = False
    out = []
    for batch_ids, batch_values in ((ids, values), (ids[keep], values[keep])):
        variables = make_vars()
        opt = keras_sketch.CSAdam(depth=3, min_rows=16, compression=0.1)
        step = applier(opt, variables, True)
        step([sparse(batch_ids, batch_values), tf.zeros([DIM])])
        out.append(state_arrays(opt, variables))
    for a, b in zip(*out):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


PATHS = ["tf", "tf_graph", "xla"] + (["fused"] if fused.available() else [])


def _nan_sequence(rng):
    """Clean sparse steps, a sparse step with NaN and Inf rows (one a
    duplicate id of a clean row), a dense step with a NaN row, clean steps."""
    steps = [("sparse",) + clean_batch(rng) for _ in range(3)]
    ids, values = clean_batch(rng)
    values[5, 2], values[9, 0] = np.nan, -np.inf
    ids[9] = ids[10]
    steps.append(("sparse", ids, values))
    dense = rng.normal(size=(ROWS, DIM)).astype("float32")
    dense[11, 3] = np.nan
    steps.append(("dense", None, dense))
    steps += [("sparse",) + clean_batch(rng) for _ in range(2)]
    return steps


@pytest.mark.parametrize("name", list(factories(False)))
def test_all_paths_agree_on_nan(name):
    """TF eager, TF graph, XLA and the fused op give the same finite state
    for a sequence with NaN/Inf gradient rows (sparse and dense)."""
    steps = _nan_sequence(np.random.default_rng(6))
    results = {}
    for path in PATHS:
        if path == "fused" and name == "sm3":
            continue  # SM3 has no fused kernel
        variables = make_vars()
        opt = factories(path == "fused")[name]()
        step = applier(opt, variables, {"tf": None, "tf_graph": False, "xla": True, "fused": False}[path])
        for kind, ids, values in steps:
            grad = sparse(ids, values) if kind == "sparse" else tf.constant(values)
            step([grad, tf.ones([DIM])])
        results[path] = state_arrays(opt, variables)
    for path, arrays in results.items():
        for i, (a, b) in enumerate(zip(arrays, results["tf"])):
            assert np.all(np.isfinite(a)), (path, i)
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"{path} vs tf, array {i}")


@pytest.mark.parametrize("use_fused", FUSED)
def test_issue_nan_in_large_embedding_stays_in_its_row(use_fused):
    """The issue's reproduction: one NaN element in one sparse row of a
    20000 x 8 embedding, depth 3, then 10 steps of 2048 random ids and one
    step touching every row.  Before containment 8674 rows (then all 20000)
    became NaN; now the state equals a run that left the NaN row out."""
    rows, dim = 20000, 8
    rng = np.random.default_rng(7)
    init = rng.normal(size=(rows, dim)).astype("float32")
    first_ids = rng.choice(rows, size=2048, replace=False)
    first = rng.normal(size=(2048, dim)).astype("float32")
    first[0, 3] = np.nan
    later = [(rng.integers(0, rows, 2048), rng.normal(size=(2048, dim)).astype("float32")) for _ in range(10)]
    later.append((np.arange(rows), rng.normal(size=(rows, dim)).astype("float32")))
    out = []
    for leave_out in (False, True):
        table = tf.Variable(init)
        opt = keras_sketch.CSAdam(depth=3, fused=use_fused)
        ids, values = (first_ids[1:], first[1:]) if leave_out else (first_ids, first)
        for ids, values in [(ids, values)] + later:
            grad = tf.IndexedSlices(tf.constant(values), tf.constant(ids, tf.int64), tf.constant([rows, dim], tf.int64))
            opt.apply([grad], [table])
        out.append([table.numpy()] + [np.asarray(v) for v in opt.variables])
    assert np.isfinite(out[0][0]).all(), f"{int((~np.isfinite(out[0][0])).any(axis=1).sum())} rows not finite"
    for a, b in zip(*out):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse_steps", [False, True])
def test_sm3_keeps_moving_every_column_after_a_nan(sparse_steps):
    """SM3 froze a column silently: a NaN made its cover accumulator NaN and
    `where(denom > 0, ...)` then gave a zero step for every row of it."""
    rng = np.random.default_rng(8)
    variables = make_vars()
    opt = keras_sketch.SM3(learning_rate=0.1)
    bad = rng.normal(size=(ROWS, DIM)).astype("float32")
    bad[7, 1] = np.nan
    opt.apply([tf.constant(bad), tf.ones([DIM])], variables)
    for _ in range(3):
        g = rng.uniform(0.5, 1.5, size=(ROWS, DIM)).astype("float32")
        grad = sparse(np.arange(ROWS), g) if sparse_steps else tf.constant(g)
        before = variables[0].numpy().copy()
        opt.apply([grad, tf.ones([DIM])], variables)
        after = variables[0].numpy()
        assert np.all(np.isfinite(after))
        frozen = np.argwhere(after == before)
        assert len(frozen) == 0, f"elements that did not move: {frozen[:5].tolist()}"
    assert all(np.all(np.isfinite(np.asarray(v))) for v in opt.variables)


@pytest.mark.parametrize("optimizer", ["adagrad", "adam_beta_1_0"])
@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("use_fused", FUSED)
@pytest.mark.parametrize("bad_id", [ROWS, -1, 2**40])
def test_out_of_range_ids_raise_before_any_write(bad_id, use_fused, traced, optimizer):
    rng = np.random.default_rng(4)
    variables = make_vars()
    make = keras_sketch.CSAdagrad if optimizer == "adagrad" else lambda **k: keras_sketch.CSAdam(beta_1=0.0, **k)
    opt = make(depth=3, min_rows=16, compression=0.1, fused=use_fused)
    step = applier(opt, variables, False if traced else None)
    step([sparse(*clean_batch(rng)), tf.ones([DIM])])
    before = state_arrays(opt, variables)
    ids, values = clean_batch(rng)
    ids[-1] = bad_id
    # The dense bias comes first in the list: it would be written first.
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
        opt.apply([sparse(ids, values), tf.ones([DIM])], variables) if not traced else step(
            [sparse(ids, values), tf.ones([DIM])]
        )
    for a, b in zip(before, state_arrays(opt, variables)):
        np.testing.assert_array_equal(a, b)


def test_wrong_gradient_shapes_and_dtypes_raise_before_any_write():
    variables = make_vars()
    opt = keras_sketch.CSAdam(min_rows=16)
    opt.build(variables)
    with pytest.raises(ValueError, match="table"):
        opt.apply([tf.zeros([ROWS, DIM + 1]), tf.zeros([DIM])], variables)
    with pytest.raises(ValueError, match="rows of shape"):
        opt.apply([tf.IndexedSlices(tf.zeros([2, DIM + 1]), tf.constant([0, 1])), tf.zeros([DIM])], variables)
    with pytest.raises(TypeError, match="floating"):
        opt.apply([tf.zeros([ROWS, DIM], tf.int32), tf.zeros([DIM])], variables)


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda v: keras_sketch.CSAdam(beta_1=v), "beta_1"),
        (lambda v: keras_sketch.CSAdam(beta_2=v), "beta_2"),
        (lambda v: keras_sketch.CSAdam(epsilon=v), "epsilon"),
        (lambda v: keras_sketch.CSAdam(learning_rate=v), "learning_rate"),
        (lambda v: keras_sketch.CSAdam(compression=v), "compression"),
        (lambda v: keras_sketch.CSAdam(cleaning_factor=v), "cleaning_factor"),
        (lambda v: keras_sketch.CSAdam(state_budget=v), "state_budget"),
        (lambda v: keras_sketch.CSMomentum(momentum=v), "momentum"),
        (lambda v: keras_sketch.CSRMSprop(rho=v), "rho"),
        (lambda v: keras_sketch.CSAdagrad(initial_accumulator_value=v), "initial_accumulator_value"),
        (lambda v: keras_sketch.SM3(epsilon=v), "epsilon"),
        (lambda v: keras_sketch.SM3(learning_rate=v), "learning_rate"),
        (lambda v: keras_sketch.CSRMSprop(momentum=v), "momentum"),
        (lambda v: keras_sketch.CSRMSprop(epsilon=v), "epsilon"),
        (lambda v: keras_sketch.CSMomentum(learning_rate=v), "learning_rate"),
        (lambda v: keras_sketch.CSAdagrad(epsilon=v), "epsilon"),
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hyper_parameters_are_refused(make, arg, value):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        make(value)


def test_fused_and_seed_must_be_exact():
    for value in (0, 1, "yes"):
        with pytest.raises(TypeError, match="`fused`"):
            keras_sketch.CSAdam(fused=value)
    for seed in (2**32, -1):
        with pytest.raises(ValueError, match="`seed`"):
            keras_sketch.CSAdam(seed=seed)
    keras_sketch.CSAdam(seed=2**32 - 1)


def test_booleans_must_be_booleans():
    for value in ("no", 0, 1, None):
        with pytest.raises(TypeError, match="`nesterov`"):
            keras_sketch.CSMomentum(nesterov=value)
    assert keras_sketch.CSMomentum(nesterov=np.bool_(True)).nesterov is True


def _trained_model(optimizer):
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(300, 8),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).integers(0, 300, (64, 3))
    model.fit(x, np.ones((64, 1)), epochs=1, verbose=0)
    return model, x


def test_corrupted_weights_file_is_refused(tmp_path):
    model, _ = _trained_model(keras_sketch.CSAdam(min_rows=16, compression=0.2))
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    with h5py.File(path, "r+") as f:
        group = f["optimizer"]["vars"]
        key = max(group.keys(), key=lambda k: group[k].size)  # the largest state tensor: a sketch
        data = group[key][...]
        data.reshape(-1)[:16] += 1.0
        group[key][...] = data
    fresh, _ = _trained_model(keras_sketch.CSAdam(min_rows=16, compression=0.2))
    before = [np.asarray(v).copy() for v in fresh.optimizer.variables]
    with pytest.raises(ValueError, match="corrupted"):
        fresh.load_weights(path)
    for a, v in zip(before, fresh.optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(v))


def test_state_of_another_optimizer_is_refused(tmp_path):
    model, _ = _trained_model(keras.optimizers.Adam())
    path = str(tmp_path / "adam.weights.h5")
    model.save_weights(path)
    ours, _ = _trained_model(keras_sketch.CSAdam(min_rows=16))
    with pytest.raises(ValueError, match="another optimizer"):
        ours.load_weights(path)


SOAK_STEPS = 300


@pytest.mark.parametrize("use_fused", FUSED)
def test_soak_random_bad_steps(use_fused):
    """Random sparse and dense steps with occasional NaN/Inf rows, out-of-range
    ids and empty batches, on every optimizer: every state stays finite and
    equals a run that left the bad rows and steps out."""
    rng = np.random.default_rng(5)
    plan = []
    for i in range(SOAK_STEPS):
        kind = rng.choice(["sparse", "dense", "empty", "nan", "range"], p=[0.5, 0.2, 0.1, 0.15, 0.05])
        plan.append((kind, clean_batch(rng, int(rng.integers(1, 40))), rng.normal(size=(ROWS, DIM)).astype("float32")))
    for name, make in factories(use_fused).items():
        results = []
        for clean in (False, True):
            variables = make_vars()
            opt = make()
            step = applier(opt, variables, False)
            for kind, (ids, values), dense in plan:
                ids, values = ids.copy(), values.copy()
                if kind == "dense":
                    step([tf.constant(dense), tf.ones([DIM])])
                    continue
                if kind == "empty":
                    ids, values = ids[:0], values[:0]
                if kind == "nan":
                    values[0, 0] = np.nan if clean is False else values[0, 0]
                    if clean:
                        ids, values = ids[1:], values[1:]
                if kind == "range":
                    if clean:
                        continue
                    ids[0] = ROWS + 1
                    with pytest.raises(tf.errors.InvalidArgumentError):
                        step([sparse(ids, values), tf.ones([DIM])])
                    continue
                step([sparse(ids, values), tf.ones([DIM])])
            results.append(state_arrays(opt, variables))
        for a, b in zip(*results):
            assert np.all(np.isfinite(a)), name
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


XLA_SOAK_STEPS = 60


@pytest.mark.parametrize("name", list(factories(False)))
def test_soak_random_bad_steps_under_xla(name):
    """The soak above inside ``jit_compile=True`` (XLA: no custom op, no
    run-time assertions), with fixed batch shapes to bound recompilation:
    NaN/Inf rows and out-of-range ids are left out of the step, so every state
    stays finite and equals a run whose batches never had those rows."""
    rng = np.random.default_rng(6)
    plan = []
    for _ in range(XLA_SOAK_STEPS):
        kind = str(rng.choice(["sparse", "dense", "nan", "inf", "range"], p=[0.5, 0.2, 0.1, 0.1, 0.1]))
        plan.append((kind, clean_batch(rng, 16), rng.normal(size=(ROWS, DIM)).astype("float32")))
    make = factories(False)[name]
    results = []
    for clean in (False, True):
        variables = make_vars()
        opt = make()
        step = applier(opt, variables, True)
        for kind, (ids, values), dense in plan:
            ids, values = ids.copy(), values.copy()
            if kind == "dense":
                step([tf.constant(dense), tf.ones([DIM])])
                continue
            if kind != "sparse":
                if clean:  # the row the bad run's step must leave out
                    ids, values = ids[1:], values[1:]
                elif kind == "range":
                    ids[0] = ROWS + int(rng.integers(0, 2**40))
                else:
                    values[0, int(rng.integers(0, DIM))] = np.nan if kind == "nan" else -np.inf
            step([sparse(ids, values), tf.ones([DIM])])
        results.append(state_arrays(opt, variables))
    for a, b in zip(*results):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
