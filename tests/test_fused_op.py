"""The fused C++ sketch-update op (custom_ops/, keras_sketch/fused.py).

The op must compute what the pure-TF path computes, for every optimizer and
option, dense and sparse; reject bad inputs with InvalidArgument; and the
optimizers must pick the right path (library present or not, forced,
jit_compile).
"""

import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sketch import fused
from keras_sketch.optimizers.adagrad import CSAdagrad
from keras_sketch.optimizers.adam import CSAdam
from keras_sketch.optimizers.momentum import CSMomentum
from keras_sketch.optimizers.rmsprop import CSRMSprop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPTIMIZERS = {
    "adam": lambda **k: CSAdam(0.01, **k),
    "adam_beta1_0": lambda **k: CSAdam(0.01, beta_1=0.0, **k),
    "adam_sketch_m": lambda **k: CSAdam(0.01, first_moment="sketch", **k),
    "adagrad": lambda **k: CSAdagrad(0.1, **k),
    "momentum": lambda **k: CSMomentum(0.05, **k),
    "nesterov": lambda **k: CSMomentum(0.05, nesterov=True, **k),
    "rmsprop": lambda **k: CSRMSprop(0.01, **k),
    "rmsprop_m_exact": lambda **k: CSRMSprop(0.01, momentum=0.5, **k),
    "rmsprop_m_sketch": lambda **k: CSRMSprop(0.01, momentum=0.5, first_moment="sketch", **k),
}

# (rows, dim, depth, width): the dims, depths 1/3/8, several widths
# (None: compression 0.3; 1: one bucket; rows: identity map).
SHAPES = [
    (64, 1, 1, None),
    (48, 7, 3, None),
    (40, 31, 8, 3),
    (40, 32, 3, 1),
    (37, 33, 1, 37),
    (30, 1000, 3, 7),
    (12, 4097, 8, None),
]


def _gradients(rng, rows, dim, sparse, steps, duplicates):
    out = []
    for _ in range(steps):
        if sparse:
            k = max(2, rows // 3)
            ids = (rng.integers(0, rows, size=k) if duplicates
                   else rng.choice(rows, size=k, replace=False))
            values = rng.normal(size=(k, dim)).astype("float32")
            out.append(tf.IndexedSlices(tf.constant(values), tf.constant(ids, tf.int64),
                                        tf.constant([rows, dim], tf.int64)))
        else:
            out.append(tf.constant(rng.normal(size=(rows, dim)).astype("float32")))
    return out


def _train(name, use_fused, shape, grads, init, **kwargs):
    w = keras.Variable(init)
    opt = OPTIMIZERS[name](fused=use_fused, **kwargs)
    for g in grads:
        opt.apply_gradients([(g, w)])
    return w.numpy(), {v.path: v.numpy() for v in opt.variables}


def _assert_paths_agree(name, shape, sparse, duplicates=True, steps=3, seed=0, **kwargs):
    rows, dim = shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rng = np.random.default_rng(seed)
    init = rng.normal(size=shape).astype("float32")
    grads = _gradients(rng, shape[0], dim, sparse, steps, duplicates)
    if len(shape) == 1 and not sparse:
        grads = [tf.reshape(g, shape) for g in grads]  # a gradient has its variable's shape
    if len(shape) > 2:
        grads = [tf.IndexedSlices(g.values, g.indices) if sparse else tf.reshape(g, shape)
                 for g in grads]
        if sparse:
            grads = [tf.IndexedSlices(tf.reshape(g.values, (-1,) + shape[1:]), g.indices)
                     for g in grads]
    w_tf, s_tf = _train(name, False, shape, grads, init, **kwargs)
    w_op, s_op = _train(name, True, shape, grads, init, **kwargs)
    assert not np.allclose(w_op, init), "the fused step changed nothing"
    np.testing.assert_allclose(w_op, w_tf, rtol=2e-5, atol=2e-6)
    assert len(s_op) == len(s_tf)
    for (path, a), b in zip(s_tf.items(), s_op.values()):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6, err_msg=path)


def test_op_library_built_and_loaded():
    # The package build compiles the op on this machine: no skip here.
    assert fused.available(), fused.unavailable_reason()
    assert os.path.dirname(fused.library_path()) == os.path.join(ROOT, "keras_sketch") or \
        os.environ.get(fused.ENV_LIBRARY)
    assert hasattr(fused.load(), "keras_sketch_dense_apply")
    assert hasattr(fused.load(), "keras_sketch_sparse_apply")


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_equals_tf_path_over_dims_depths_widths(name, sparse):
    for i, (rows, dim, depth, width) in enumerate(SHAPES):
        _assert_paths_agree(name, (rows, dim), sparse, duplicates=bool(i % 2), steps=2, seed=i,
                            depth=depth, width=width, compression=0.3, min_rows=1)


@pytest.mark.parametrize("name", ["adam", "adam_sketch_m", "rmsprop_m_sketch", "nesterov"])
def test_fused_equals_tf_path_larger_multithreaded(name):
    # Enough rows that both kernels split work over threads and buckets collide.
    for depth in (1, 3):
        _assert_paths_agree(name, (3000, 16), False, steps=2, depth=depth, compression=0.1,
                            min_rows=1)
        _assert_paths_agree(name, (3000, 16), True, steps=2, depth=depth, compression=0.1,
                            min_rows=1)


def test_fused_rank3_exact_and_vector_variables():
    _assert_paths_agree("adam", (40, 3, 5), False, depth=3, min_rows=1)
    _assert_paths_agree("rmsprop_m_sketch", (40, 3, 5), True, depth=3, min_rows=1)
    # Not sketched (min_rows): all slots exact, the op updates them in place.
    _assert_paths_agree("adam", (40, 6), False)
    _assert_paths_agree("adagrad", (40, 6), True)
    _assert_paths_agree("momentum", (25,), False)


def test_sparse_without_duplicates_and_with_merged_duplicates():
    for duplicates in (False, True):
        _assert_paths_agree("adam_sketch_m", (200, 9), True, duplicates=duplicates, depth=3,
                            compression=0.1, min_rows=1, steps=4)


def test_transposed_layout_falls_back_to_tf_path(caplog):
    # A wide Dense kernel hashes its last axis: the op is not used there.
    with caplog.at_level(logging.INFO, logger="keras_sketch"):
        _assert_paths_agree("adam", (6, 300), False, min_rows=1, depth=3, hash_axis="auto")
    assert "transposed layout" in caplog.text


def _op_args(rows=20, dim=4, depth=2, width=5, k=6):
    var = tf.Variable(tf.ones([rows, dim]))
    m = tf.Variable(tf.zeros([rows, dim]))
    v = tf.Variable(tf.zeros([depth, width, dim]))
    hashes = tf.constant([[3, 5, 7, 11]] * depth, tf.int64)
    coefs = tf.constant([0.1, 1e-7, 0.9, 0.1, -0.1, 0.99, 0.01, -0.01])
    return dict(var=var, m=m, v=v, hashes=hashes, coefs=coefs, rows=rows, dim=dim, k=k)


def _dense(a, grad=None, slots=None, **over):
    op = fused.load()
    grad = tf.ones([a["rows"], a["dim"]]) if grad is None else grad
    slots = [a["m"].handle, a["v"].handle] if slots is None else slots
    kw = dict(optimizer="adam", slot_kinds=["exact", "count_min"], rows=a["rows"])
    kw.update(over)
    return op.keras_sketch_dense_apply(a["var"].handle, slots, a["hashes"], grad, a["coefs"], **kw)


def _sparse(a, ids, grad=None, valid=None, **over):
    op = fused.load()
    k = len(ids)
    grad = tf.ones([k, a["dim"]]) if grad is None else grad
    valid = tf.ones([k], tf.bool) if valid is None else valid
    kw = dict(optimizer="adam", slot_kinds=["exact", "count_min"], rows=a["rows"])
    kw.update(over)
    return op.keras_sketch_sparse_apply(a["var"].handle, [a["m"].handle, a["v"].handle],
                                        a["hashes"], grad, a["coefs"],
                                        tf.constant(ids, tf.int64), valid, **kw)


BAD_CALLS = {
    "grad rows": lambda a: _dense(a, grad=tf.ones([a["rows"] + 1, a["dim"]])),
    "grad rank": lambda a: _dense(a, grad=tf.ones([a["rows"] * a["dim"]])),
    "rows attr": lambda a: _dense(a, rows=a["rows"] + 1, grad=tf.ones([a["rows"] + 1, a["dim"]])),
    "exact slot shape": lambda a: _dense(a, slots=[tf.Variable(tf.zeros([3, a["dim"]])).handle,
                                                   a["v"].handle]),
    "sketch depth": lambda a: _dense(a, slots=[a["m"].handle,
                                               tf.Variable(tf.zeros([3, 5, a["dim"]])).handle]),
    "sketch dim": lambda a: _dense(a, slots=[a["m"].handle,
                                             tf.Variable(tf.zeros([2, 5, a["dim"] + 1])).handle]),
    "widths differ": lambda a: _dense(a, slot_kinds=["count_sketch", "count_min"],
                                      slots=[tf.Variable(tf.zeros([2, 4, a["dim"]])).handle,
                                             a["v"].handle]),
    "identity shape": lambda a: _dense(a, slots=[a["m"].handle,
                                                 tf.Variable(tf.zeros([2, 40, a["dim"]])).handle]),
    "slot dtype": lambda a: _dense(a, slots=[tf.Variable(tf.zeros([a["rows"], a["dim"]],
                                                                  tf.float64)).handle,
                                             a["v"].handle]),
    "too many slots": lambda a: _dense(a, optimizer="adagrad"),
    "kinds count": lambda a: _dense(a, slot_kinds=["exact"]),
    "coefs size": lambda a: fused.load().keras_sketch_dense_apply(
        a["var"].handle, [a["m"].handle, a["v"].handle], a["hashes"],
        tf.ones([a["rows"], a["dim"]]), tf.ones([3]), optimizer="adam",
        slot_kinds=["exact", "count_min"], rows=a["rows"]),
    "negative hash": lambda a: fused.load().keras_sketch_dense_apply(
        a["var"].handle, [a["m"].handle, a["v"].handle], -a["hashes"],
        tf.ones([a["rows"], a["dim"]]), a["coefs"], optimizer="adam",
        slot_kinds=["exact", "count_min"], rows=a["rows"]),
    "id too large": lambda a: _sparse(a, [0, 3, a["rows"]]),
    "negative id": lambda a: _sparse(a, [0, -1, 3]),
    "duplicate ids": lambda a: _sparse(a, [4, 2, 4]),
    "ids length": lambda a: _sparse(a, [1, 2, 3], grad=tf.ones([4, a["dim"]])),
    "valid length": lambda a: _sparse(a, [1, 2, 3], valid=tf.ones([2], tf.bool)),
    "sparse dim": lambda a: _sparse(a, [1, 2, 3], grad=tf.ones([3, a["dim"] + 1])),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_invalid_inputs_raise_invalid_argument_and_write_nothing(case):
    a = _op_args()
    before = [a[n].numpy().copy() for n in ("var", "m", "v")]
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError)):
        BAD_CALLS[case](a)
    for name, old in zip(("var", "m", "v"), before):
        np.testing.assert_array_equal(a[name].numpy(), old, err_msg=name)


def test_padding_rows_are_ignored_even_out_of_range():
    a = _op_args()
    _sparse(a, [2, 999, 2], valid=tf.constant([True, False, False]))
    changed = np.nonzero(np.abs(a["var"].numpy() - 1.0).max(axis=1))[0]
    assert changed.tolist() == [2]


def test_fuzz_random_shapes_dims_and_indices():
    rng = np.random.default_rng(1234)
    kinds = ["exact", "count_sketch", "count_min"]
    for trial in range(60):
        rows, dim = int(rng.integers(1, 60)), int(rng.integers(1, 40))
        depth = int(rng.integers(1, 9))
        width = int(rng.integers(1, rows + 1))
        if width >= rows:
            depth, width = 1, rows
        opt = rng.choice(["adam", "adagrad", "momentum", "rmsprop"])
        n = 2 if opt in ("adam", "rmsprop") and rng.random() < 0.5 else 1
        slot_kinds = [str(rng.choice(kinds[1:] if (opt == "rmsprop" and i == 1) else kinds))
                      for i in range(n)]
        if opt == "rmsprop" and n == 2 and slot_kinds[0] == "exact":
            slot_kinds[1] = "exact"
        tables = [tf.Variable(tf.zeros([rows, dim] if s == "exact" else [depth, width, dim]))
                  for s in slot_kinds]
        var = tf.Variable(rng.normal(size=(rows, dim)).astype("float32"))
        hashes = tf.constant(rng.integers(0, 2**31 - 1, size=(depth, 4)), tf.int64)
        coefs = tf.constant(rng.uniform(0.01, 0.99, size=2 + 3 * n).astype("float32"))
        k = int(rng.integers(1, 2 * rows + 2))
        ids = rng.integers(-2, rows + 2, size=k)
        valid = rng.random(k) < 0.8
        expect_ok = (np.all((ids[valid] >= 0) & (ids[valid] < rows))
                     and len(set(ids[valid].tolist())) == int(valid.sum()))
        before = var.numpy().copy()
        kw = dict(optimizer=str(opt), slot_kinds=slot_kinds, rows=rows)
        try:
            fused.load().keras_sketch_sparse_apply(
                var.handle, [t.handle for t in tables], hashes,
                tf.constant(rng.normal(size=(k, dim)).astype("float32")), coefs,
                tf.constant(ids, tf.int64), tf.constant(valid), **kw)
            ok = True
        except tf.errors.InvalidArgumentError:
            ok = False
        assert ok == expect_ok, (trial, rows, dim, ids, valid)
        untouched = np.setdiff1d(np.arange(rows), ids[valid]) if ok else np.arange(rows)
        np.testing.assert_array_equal(var.numpy()[untouched], before[untouched])
        fused.load().keras_sketch_dense_apply(
            var.handle, [t.handle for t in tables], hashes,
            tf.constant(rng.normal(size=(rows, dim)).astype("float32")), coefs, **kw)
        # Random coefficients make no sense as an optimizer (NaNs may appear);
        # the dense call with valid shapes must run and touch every row.
        assert not np.array_equal(var.numpy(), before) or not np.all(coefs.numpy())


def test_get_config_keeps_fused_and_round_trips():
    opt = CSAdam(fused=False)
    config = opt.get_config()
    assert config["fused"] is False
    assert CSAdam.from_config(config).fused is False
    assert CSAdam().get_config()["fused"] is None


def test_invalid_fused_argument_raises():
    with pytest.raises(TypeError, match="`fused`"):
        CSAdam(fused="yes")


@pytest.fixture
def library_absent(monkeypatch):
    monkeypatch.setattr(fused, "_library", {"tried": True, "module": None, "path": None,
                                            "error": "the op library was not built (test)"})


def test_fallback_when_library_absent(library_absent, caplog):
    assert not fused.available()
    with caplog.at_level(logging.INFO, logger="keras_sketch"):
        w = keras.Variable(np.ones((40, 3), "float32"))
        opt = CSAdam(0.1, min_rows=1)
        opt.apply_gradients([(tf.ones((40, 3)), w)])
    assert np.all(w.numpy() < 1.0)
    assert "pure-TF path" in caplog.text and "not built" in caplog.text


def test_forcing_the_op_without_library_raises(library_absent, monkeypatch):
    with pytest.raises(RuntimeError, match="fused=True"):
        CSAdam(fused=True)
    monkeypatch.setenv(fused.ENV_FUSED, "1")
    with pytest.raises(RuntimeError, match="KERAS_SKETCH_FUSED=1"):
        CSAdam()
    monkeypatch.setenv(fused.ENV_FUSED, "0")
    CSAdam()  # the pure-TF path is chosen explicitly: no error


def _path_log(caplog, **kwargs):
    with caplog.at_level(logging.INFO, logger="keras_sketch"):
        w = keras.Variable(np.ones((40, 3), "float32"))
        CSMomentum(0.1, min_rows=1, **kwargs).apply_gradients([(tf.ones((40, 3)), w)])
    return caplog.text


def test_forced_paths_by_argument_and_environment(monkeypatch, caplog):
    assert "fused C++ op" in _path_log(caplog, fused=True)
    caplog.clear()
    assert "disabled by fused=False" in _path_log(caplog, fused=False)
    caplog.clear()
    monkeypatch.setenv(fused.ENV_FUSED, "0")
    assert "disabled by KERAS_SKETCH_FUSED=0" in _path_log(caplog)
    caplog.clear()
    assert "fused C++ op" in _path_log(caplog, fused=True)  # the argument wins
    caplog.clear()
    monkeypatch.setenv(fused.ENV_FUSED, "1")
    assert "fused C++ op" in _path_log(caplog)
    monkeypatch.setenv(fused.ENV_FUSED, "maybe")
    with pytest.raises(ValueError, match="KERAS_SKETCH_FUSED"):
        CSAdam()


def test_missing_library_file_in_new_process_falls_back():
    code = (
        "import numpy as np, keras, tensorflow as tf\n"
        "from keras_sketch import fused\n"
        "from keras_sketch.optimizers.adam import CSAdam\n"
        "w = keras.Variable(np.ones((40, 3), 'float32'))\n"
        "CSAdam(0.1, min_rows=1).apply_gradients([(tf.ones((40, 3)), w)])\n"
        "assert not fused.available() and float(w.numpy().max()) < 1.0\n"
        "print('OK')\n"
    )
    env = dict(os.environ, KERAS_SKETCH_OPS_LIBRARY="/nonexistent/_sketch_ops.so",
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop(fused.ENV_FUSED, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK" in out.stdout
    assert "uses the pure-TF path" in out.stderr and "/nonexistent/_sketch_ops.so" in out.stderr


def _model(optimizer, jit):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(300, 8),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(4),
    ])
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), jit_compile=jit)
    return model


def _data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 300, size=(256, 5)).astype("int32")
    return x, (x[:, 0] % 4).astype("int32")


def test_fit_with_fused_op_equals_tf_path():
    x, y = _data()
    weights = []
    for use in (True, False):
        model = _model(CSAdam(0.01, min_rows=100, depth=3, fused=use), jit=False)
        model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_jit_compile_training_falls_back_to_tf_path(caplog):
    assert fused.available()
    x, y = _data()
    with caplog.at_level(logging.INFO, logger="keras_sketch"):
        model = _model(CSAdam(0.05, min_rows=100, depth=3), jit=True)
        history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert "jit_compile=True" in caplog.text
    assert "uses the fused C++ op" not in caplog.text


def test_baseline_library_without_avx2_agrees_too():
    # setup.py builds a baseline (-O3 only) and an AVX2 library; the loader
    # picks one per CPU.  The baseline must compute the same steps.
    import glob
    baseline = glob.glob(os.path.join(ROOT, "keras_sketch", "_sketch_ops.*so"))
    assert baseline, "the baseline op library was not built"
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from tests.test_fused_op import _assert_paths_agree\n"
        "from keras_sketch import fused\n"
        "assert fused.library_path() == %r\n"
        "_assert_paths_agree('adam', (300, 33), False, depth=1, min_rows=1)\n"
        "_assert_paths_agree('rmsprop_m_sketch', (300, 33), True, depth=3, min_rows=1)\n"
        "print('OK')\n" % (ROOT, baseline[0])
    )
    env = dict(os.environ, KERAS_SKETCH_OPS_LIBRARY=baseline[0], TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
