"""Core behaviour: sketch properties, agreement with the NumPy reference,
lossless equality with Keras's optimizers, duplicates, training, bad input."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks
from keras_sketch import sketch as sk
from tests.reference import NpSketch, RefOptimizer, all_rows_in_parts

ROWS, DIM = 300, 5

HP = {
    "adam": dict(learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-7),
    "adagrad": dict(learning_rate=0.05, initial_accumulator_value=0.1, epsilon=1e-7),
    "momentum": dict(learning_rate=0.01, momentum=0.9),
    "rmsprop": dict(learning_rate=0.01, rho=0.9, epsilon=1e-7),
}
CLASSES = {"adam": ks.CSAdam, "adagrad": ks.CSAdagrad, "momentum": ks.CSMomentum, "rmsprop": ks.CSRMSprop}


def make(algorithm, **kwargs):
    return CLASSES[algorithm](**{**HP[algorithm], **kwargs})


def sparse(ids, values, rows=ROWS):
    return tf.IndexedSlices(
        tf.constant(values, tf.float32), tf.constant(ids, tf.int64), tf.constant([rows, values.shape[1]], tf.int64)
    )


def gradient_stream(rng, steps, rows=ROWS, dim=DIM, k=40):
    """Alternating dense and sparse (with repeated ids) gradients."""
    for step in range(steps):
        if step % 2 == 0:
            yield None, rng.normal(size=(rows, dim))
        else:
            ids = rng.zipf(1.5, size=k) % rows  # skewed, many repeats
            yield ids, rng.normal(size=(k, dim))


# --- sketch properties -------------------------------------------------------------


def test_hash_params_reproducible_in_a_new_process():
    here = sk.hash_params(seed=7, stream=3, depth=4)
    code = "import json; from keras_sketch.sketch import hash_params; print(json.dumps(hash_params(7, 3, 4).tolist()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here.tolist()
    assert not np.array_equal(here, sk.hash_params(seed=7, stream=4, depth=4)), "variables must differ"
    assert len({tuple(r) for r in here}) == 4, "depths must differ"


def _sketch(rows, depth, width, dim, kind, seed=0):
    table = tf.Variable(tf.zeros([depth, width, dim]))
    params = tf.Variable(sk.hash_params(seed, 0, depth))
    return sk.Sketch(table, params, rows, kind)


def test_hashes_are_int64_safe_for_two_billion_rows():
    s = _sketch(rows=2**31, depth=3, width=1009, dim=1, kind=sk.COUNT_SKETCH)
    ids = np.array([0, 1, 2**31 - 2, 2**31 - 1, 123456789], np.int64)
    loc = s.locate(tf.constant(ids))
    p = s.params.numpy()
    for j in range(3):
        a, b, c, d = (int(x) for x in p[j])
        want_h = [((a * (int(i) % sk.PRIME) + b) % sk.PRIME) % 1009 for i in ids]
        want_s = [1 - 2 * (((c * (int(i) % sk.PRIME) + d) % sk.PRIME) % 2) for i in ids]
        assert loc.buckets.numpy()[j].tolist() == want_h
        assert loc.signs.numpy()[j].tolist() == want_s


def test_identity_when_width_covers_rows():
    opt = ks.CSAdam(width=ROWS, min_rows=1)
    var = keras.Variable(np.zeros((ROWS, DIM), np.float32))
    opt.build([var])
    v = opt._slots[0]["v"]
    assert v.identity and tuple(v.table.shape) == (1, ROWS, DIM)


def test_count_min_never_underestimates_nonnegative_stream():
    rng = np.random.default_rng(0)
    s = _sketch(rows=2000, depth=3, width=64, dim=4, kind=sk.COUNT_MIN)
    truth = np.zeros((2000, 4))
    for _ in range(20):
        ids = np.unique(rng.integers(0, 2000, size=300))
        delta = rng.exponential(size=(len(ids), 4))
        truth[ids] += delta
        s.add(s.locate(tf.constant(ids)), tf.constant(delta, tf.float32))
    est = s.query_all().numpy()
    assert np.all(est >= truth - 1e-4)
    assert np.mean(est > truth + 1e-3) > 0.5  # collisions do overestimate


def test_error_shrinks_as_width_grows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 8)) * (rng.random((3000, 1)) < 0.1)  # heavy rows
    errors = []
    for width in (50, 200, 800):
        s = _sketch(rows=3000, depth=3, width=width, dim=8, kind=sk.COUNT_SKETCH)
        s.decay_add_all(0.0, tf.constant(x, tf.float32))
        errors.append(np.linalg.norm(s.query_all().numpy() - x) / np.linalg.norm(x))
    assert errors[0] > errors[1] > errors[2]


def test_chunked_dense_query_equals_row_query(monkeypatch):
    s = _sketch(rows=1000, depth=4, width=37, dim=3, kind=sk.COUNT_SKETCH)
    s.decay_add_all(0.0, tf.random.normal([1000, 3]))
    direct = s.query(s.locate(tf.range(1000))).numpy()
    monkeypatch.setattr(sk, "_QUERY_CHUNK_ELEMENTS", 4 * 3 * 64)  # 64-row chunks, last one padded
    np.testing.assert_allclose(s.query_all().numpy(), direct, rtol=1e-6)


def test_sketch_agrees_with_numpy_reference_sketch():
    rng = np.random.default_rng(2)
    for kind in sk.KINDS:
        s = _sketch(rows=500, depth=3, width=40, dim=2, kind=kind)
        ref = NpSketch(s.params.numpy(), 500, 40, 2, kind)
        for _ in range(3):
            ids = np.unique(rng.integers(0, 500, size=60))
            delta = np.abs(rng.normal(size=(len(ids), 2)))
            s.add(s.locate(tf.constant(ids)), tf.constant(delta, tf.float32))
            ref.update(list(ids), delta)
        np.testing.assert_allclose(s.table.numpy(), ref.table, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.query_all().numpy(), ref.query(list(range(500))), rtol=1e-5, atol=1e-6)


# --- optimizers against the NumPy reference ----------------------------------------


CASES = [
    ("adam", dict(first_moment="sketch")),
    ("adam", dict(first_moment="exact")),
    ("adam", dict(beta_1=0.0)),
    ("adagrad", {}),
    ("momentum", {}),
    ("momentum", dict(nesterov=True)),
    ("rmsprop", {}),
    ("rmsprop", dict(momentum=0.5, first_moment="sketch")),
]


# Both step paths are checked against the reference: the pure-TF math and the
# fused C++ op (tests/test_fused_op.py checks the op is the one used).
PATHS = [pytest.param(False, id="tf"), pytest.param(None, id="default")]


@pytest.mark.parametrize("algorithm,extra", CASES)
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("fused", PATHS)
def test_optimizer_matches_numpy_reference(algorithm, extra, depth, fused):
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    var = keras.Variable(x0)
    opt = make(algorithm, depth=depth, compression=0.2, min_rows=10, fused=fused, **extra)
    opt.build([var])
    sketch = next(s for s in opt._slots[0].values() if s.kind != "exact")
    hp = {**HP[algorithm], **extra}
    ref = RefOptimizer(algorithm, x0, sketch.params.numpy(), sketch.width, hp,
                       sketch_m=extra.get("first_moment", "sketch" if algorithm == "momentum" else "exact") == "sketch")
    for ids, g in gradient_stream(rng, 10):
        if ids is None:
            opt.apply([tf.constant(g, tf.float32)], [var])
        else:
            opt.apply([sparse(ids, g)], [var])
        want = ref.step(g, ids)
        np.testing.assert_allclose(var.numpy(), want, rtol=2e-4, atol=2e-5)


# --- lossless configuration reproduces Keras --------------------------------------

KERAS = {
    "adam": lambda: keras.optimizers.Adam(**HP["adam"]),
    "adagrad": lambda: keras.optimizers.Adagrad(**HP["adagrad"]),
    "momentum": lambda: keras.optimizers.SGD(**HP["momentum"]),
    "nesterov": lambda: keras.optimizers.SGD(nesterov=True, **HP["momentum"]),
    "rmsprop": lambda: keras.optimizers.RMSprop(**HP["rmsprop"]),
    "rmsprop_momentum": lambda: keras.optimizers.RMSprop(momentum=0.5, **HP["rmsprop"]),
}
OURS = {
    "adam": lambda **k: make("adam", first_moment="sketch", **k),
    "adagrad": lambda **k: make("adagrad", **k),
    "momentum": lambda **k: make("momentum", **k),
    "nesterov": lambda **k: make("momentum", nesterov=True, **k),
    "rmsprop": lambda **k: make("rmsprop", **k),
    "rmsprop_momentum": lambda **k: make("rmsprop", momentum=0.5, first_moment="sketch", **k),
}


@pytest.mark.parametrize("name", sorted(KERAS))
@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("fused", PATHS)
def test_lossless_configuration_reproduces_keras(name, path, fused):
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    ours_var, keras_var = keras.Variable(x0), keras.Variable(x0)
    ours = OURS[name](depth=1, width=ROWS, min_rows=1, fused=fused)
    reference = KERAS[name]()
    for _ in range(20):
        g = rng.normal(size=(ROWS, DIM)).astype(np.float32)
        if path == "sparse":
            ids, parts = all_rows_in_parts(rng, g)  # the merged sparse gradient equals g
            ours.apply([sparse(ids, parts)], [ours_var])
        else:
            ours.apply([tf.constant(g)], [ours_var])
        reference.apply([tf.constant(g)], [keras_var])
    np.testing.assert_allclose(ours_var.numpy(), keras_var.numpy(), rtol=1e-5, atol=1e-6)


def test_sparse_duplicates_equal_merged_gradient():
    rng = np.random.default_rng(5)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    a, b = keras.Variable(x0), keras.Variable(x0)
    opt_a = ks.CSAdam(min_rows=10, depth=3, first_moment="sketch")
    opt_b = ks.CSAdam(min_rows=10, depth=3, first_moment="sketch")
    for _ in range(5):
        ids = np.array([3, 7, 3, 3, 250, 7])
        vals = rng.normal(size=(6, DIM)).astype(np.float32)
        merged_ids = np.array([3, 7, 250])
        merged = np.stack([vals[[0, 2, 3]].sum(0), vals[[1, 5]].sum(0), vals[4]])
        opt_a.apply([sparse(ids, vals)], [a])
        opt_b.apply([sparse(merged_ids, merged)], [b])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    untouched = np.setdiff1d(np.arange(ROWS), [3, 7, 250])
    np.testing.assert_array_equal(a.numpy()[untouched], x0[untouched])


def test_sparse_step_never_densifies_and_touches_only_batch_rows():
    var = keras.Variable(np.ones((50000, 8), np.float32))
    opt = ks.CSAdam(first_moment="sketch")

    @tf.function
    def step(g):
        opt.apply([g], [var])

    g = sparse(np.array([5, 17, 5]), np.ones((3, 8), np.float32), rows=50000)
    step(g)
    graph = step.get_concrete_function(g).graph
    big = [op for op in graph.get_operations() for out in op.outputs
           if out.shape.rank and out.shape.num_elements() and out.shape.num_elements() >= 50000 * 8]
    assert not big, f"full-size tensors in the sparse step: {[op.name for op in big]}"
    changed = np.nonzero(np.any(var.numpy() != 1.0, axis=1))[0]
    assert changed.tolist() == [5, 17]


def test_rank3_and_vector_variables():
    rng = np.random.default_rng(6)
    kernel = keras.Variable(rng.normal(size=(3, 3, 64, 40)).astype(np.float32))
    bias = keras.Variable(np.zeros(40, np.float32))
    opt = ks.CSRMSprop(min_rows=100)
    opt.build([kernel, bias])
    report = opt.memory_report()
    assert report.rows[0]["mode"] == "sketched" and report.rows[1]["mode"] == "exact"
    assert report.rows[0]["states"]["v"][1] == (1, 116, 40)  # 576 flattened rows, width ceil(0.2*576)
    before = kernel.numpy().copy()
    opt.apply([tf.ones_like(kernel), tf.ones_like(bias)], [kernel, bias])
    assert np.all(kernel.numpy() < before)
    g = tf.IndexedSlices(tf.ones([2, 3, 64, 40]), tf.constant([0, 2], tf.int64), tf.constant([3, 3, 64, 40], tf.int64))
    mid = kernel.numpy().copy()
    opt.apply([g, tf.zeros_like(bias)], [kernel, bias])
    moved = np.any(kernel.numpy() != mid, axis=(1, 2, 3))
    assert moved.tolist() == [True, False, True]


def test_hash_axis_auto_hashes_the_class_axis_of_a_dense_kernel():
    opt = ks.CSAdam(min_rows=100, hash_axis="auto")
    emb = keras.Variable(np.zeros((5000, 32), np.float32), name="emb")
    out = keras.Variable(np.zeros((32, 5000), np.float32), name="out")
    opt.build([emb, out])
    rows = opt.memory_report().rows
    assert rows[0]["hashed_axis"] == "first" and rows[1]["hashed_axis"] == "last"
    assert rows[1]["states"]["v"][1] == (1, 1000, 32)


def test_default_hash_axis_sketches_rows_and_keeps_narrow_output_kernels_exact():
    opt = ks.CSAdam(min_rows=100)
    emb = keras.Variable(np.zeros((5000, 32), np.float32), name="emb")
    out = keras.Variable(np.zeros((32, 5000), np.float32), name="out")
    wide_in = keras.Variable(np.zeros((400, 30), np.float32), name="wide_in")
    opt.build([emb, out, wide_in])
    rows = opt.memory_report().rows
    assert [r["mode"] for r in rows] == ["sketched", "exact", "sketched"]
    assert rows[1]["states"]["v"] == ("exact", (32, 5000))


def test_cleaning_scales_count_min_sketch_every_interval():
    var = keras.Variable(np.zeros((1000, 4), np.float32))
    opt = ks.CSAdagrad(min_rows=10, cleaning_factor=0.5, cleaning_interval=2, initial_accumulator_value=0.0)
    g = tf.ones([1000, 4])
    opt.apply([g], [var])
    first = opt._slots[0]["v"].table.numpy().copy()
    opt.apply([tf.zeros_like(g)], [var])  # step 2: cleaned, nothing added
    np.testing.assert_allclose(opt._slots[0]["v"].table.numpy(), 0.5 * first)


def test_memory_report_counts_state_bytes():
    opt = ks.CSAdam(first_moment="sketch", min_rows=1000)
    big = keras.Variable(np.zeros((10000, 16), np.float32))
    small = keras.Variable(np.zeros((10, 16), np.float32))
    opt.build([big, small])
    report = opt.memory_report()
    assert report.rows[0]["state_bytes"] == 2 * 2000 * 16 * 4 + 4 * 8
    assert report.rows[1]["state_bytes"] == 2 * 10 * 16 * 4
    assert report.exact_optimizer_bytes == 2 * (10000 + 10) * 16 * 4
    assert 0.19 < report.ratio < 0.22
    assert "total" in str(report)


# --- training and configuration ---------------------------------------------------


def _lm(vocab=500):
    return keras.Sequential([
        keras.Input((12,), dtype="int32"),
        keras.layers.Embedding(vocab, 16),
        keras.layers.LSTM(16, return_sequences=True),
        keras.layers.Dense(vocab),
    ])


@pytest.mark.parametrize("optimizer", [
    lambda: ks.CSAdam(learning_rate=0.01, min_rows=100),
    lambda: ks.CSAdam(learning_rate=0.01, min_rows=100, first_moment="sketch", depth=3),
    lambda: ks.CSAdagrad(learning_rate=0.5, min_rows=100),
    lambda: ks.CSMomentum(learning_rate=0.5, min_rows=100),
    lambda: ks.CSRMSprop(learning_rate=0.005, min_rows=100),
])
def test_fit_lowers_loss(optimizer):
    rng = np.random.default_rng(7)
    tokens = (rng.zipf(1.3, size=(64, 13)) % 500).astype("int32")
    keras.utils.set_random_seed(0)
    model = _lm()
    model.compile(optimizer=optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(tokens[:, :-1], tokens[:, 1:], epochs=8, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.9 * history.history["loss"][0]
    assert model.optimizer.memory_report().rows[0]["mode"] == "sketched"


def test_get_config_round_trip_keeps_every_argument():
    opt = ks.CSAdam(learning_rate=0.003, beta_1=0.8, depth=3, compression=0.1, width=None, min_rows=7,
                    hash_axis="first", seed=11, cleaning_factor=0.2, cleaning_interval=125,
                    first_moment="sketch", clipnorm=1.0, weight_decay=0.01, use_ema=True)
    config = opt.get_config()
    clone = ks.CSAdam.from_config(config)
    assert clone.get_config() == config
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is ks.CSAdam and again.get_config() == config


@pytest.mark.parametrize("kwargs,message", [
    (dict(depth=0), "`depth` must be in"),
    (dict(depth=9), "`depth` must be in"),
    (dict(compression=0.0), "`compression` must be in"),
    (dict(compression=1.5), "`compression` must be in"),
    (dict(beta_1=1.0), "`beta_1` must be in"),
    (dict(beta_2=-0.1), "`beta_2` must be in"),
    (dict(learning_rate=-1.0), "`learning_rate` must be in"),
    (dict(epsilon=-1e-8), "`epsilon` must be in"),
    (dict(hash_axis="rows"), "`hash_axis` must be one of"),
    (dict(first_moment="approx"), "`first_moment` must be"),
    (dict(cleaning_factor=2.0), "`cleaning_factor` must be in"),
    (dict(width=0), "`width` must be in"),
])
def test_invalid_arguments_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ks.CSAdam(**kwargs)


def test_non_numeric_and_non_float_variables_raise_type_errors():
    with pytest.raises(TypeError, match="`depth` must be an integer"):
        ks.CSAdagrad(depth=2.5)
    with pytest.raises(TypeError, match="floating-point"):
        ks.CSMomentum().build([keras.Variable(np.zeros((3, 3), np.int32), trainable=False)])


def test_merge_duplicates_same_result_eager_and_under_xla():
    from keras_sketch.state import merge_duplicates

    ids = tf.constant([9, 2, 9, 4, 2, 9], tf.int64)
    values = tf.constant(np.arange(12, dtype=np.float32).reshape(6, 2))
    u, s, valid = merge_duplicates(ids, values)
    assert valid.numpy().all() and sorted(u.numpy().tolist()) == [2, 4, 9]
    eager = dict(zip(u.numpy().tolist(), s.numpy().tolist()))

    xu, xs, xvalid = tf.function(merge_duplicates, jit_compile=True)(ids, values)
    assert xu.shape[0] == 6 and xvalid.numpy().tolist() == [True] * 3 + [False] * 3
    assert xu.numpy()[:3].tolist() == [2, 4, 9] and np.all(xs.numpy()[3:] == 0)
    assert dict(zip(xu.numpy()[:3].tolist(), xs.numpy()[:3].tolist())) == eager
    assert eager == {9: [0 + 4 + 10, 1 + 5 + 11], 2: [2 + 8, 3 + 9], 4: [6, 7]}
