"""``catch_up=True``: lazily skipped rows replay their missed steps when next
touched, reproducing the dense Keras optimizer on every touched row."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks
from tests.test_core import HP, sparse

ROWS, DIM = 60, 3
LOSSLESS = dict(depth=1, width=ROWS, min_rows=1)  # nothing sketched, as in test_core

CASES = {
    "adam": (lambda **k: ks.CSAdam(**HP["adam"], **k), lambda: keras.optimizers.Adam(**HP["adam"])),
    "adam_sketched_m": (lambda **k: ks.CSAdam(**HP["adam"], first_moment="sketch", **k),
                        lambda: keras.optimizers.Adam(**HP["adam"])),
    "adam_beta1_0": (lambda **k: ks.CSAdam(**{**HP["adam"], "beta_1": 0.0}, **k),
                     lambda: keras.optimizers.Adam(**{**HP["adam"], "beta_1": 0.0})),
    "amsgrad": (lambda **k: ks.CSAdam(**HP["adam"], amsgrad=True, **k),
                lambda: keras.optimizers.Adam(**HP["adam"], amsgrad=True)),
    "adam_schedule": (
        lambda **k: ks.CSAdam(**{**HP["adam"], "learning_rate": _schedule()}, **k),
        lambda: keras.optimizers.Adam(**{**HP["adam"], "learning_rate": _schedule()}),
    ),
    "momentum": (lambda **k: ks.CSMomentum(**HP["momentum"], **k), lambda: keras.optimizers.SGD(**HP["momentum"])),
    "nesterov": (lambda **k: ks.CSMomentum(**HP["momentum"], nesterov=True, **k),
                 lambda: keras.optimizers.SGD(**HP["momentum"], nesterov=True)),
    "rmsprop": (lambda **k: ks.CSRMSprop(**HP["rmsprop"], **k), lambda: keras.optimizers.RMSprop(**HP["rmsprop"])),
    "rmsprop_momentum_centered": (
        lambda **k: ks.CSRMSprop(**HP["rmsprop"], momentum=0.5, centered=True, **k),
        lambda: keras.optimizers.RMSprop(**HP["rmsprop"], momentum=0.5, centered=True),
    ),
}


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=50, decay_rate=0.5)


def skipping_stream(rng, steps):
    """Sparse batches that skip rows for long stretches: the upper half is
    touched at step 0 and then only at the end (a gap longer than Adam's
    catch-up cap), the lower half at random; a dense gradient at step 120
    (every row touched); a final batch touching every row."""
    for step in range(steps):
        if step == 0 or step == steps - 1:
            ids = np.arange(ROWS)
        elif step == 120:
            yield None, rng.normal(size=(ROWS, DIM)).astype(np.float32)
            continue
        else:
            ids = rng.choice(ROWS // 2, size=rng.integers(1, 6), replace=False)
        yield ids, rng.normal(size=(len(ids), DIM)).astype(np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_catch_up_equals_dense_keras_on_touched_rows(case):
    ours_make, keras_make = CASES[case]
    rng = np.random.default_rng(11)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    ours_var, keras_var = keras.Variable(x0), keras.Variable(x0)
    ours, reference = ours_make(catch_up=True, **LOSSLESS), keras_make()
    for ids, g in skipping_stream(rng, 400):
        before = ours_var.numpy()
        dense = g if ids is None else np.zeros((ROWS, DIM), np.float32)
        if ids is None:
            ours.apply([tf.constant(g)], [ours_var])
            ids = np.arange(ROWS)
        else:
            dense[ids] = g
            ours.apply([sparse(ids, g, rows=ROWS)], [ours_var])
        reference.apply([tf.constant(dense)], [keras_var])
        untouched = np.setdiff1d(np.arange(ROWS), ids)
        np.testing.assert_array_equal(ours_var.numpy()[untouched], before[untouched])  # the step stays sparse
        np.testing.assert_allclose(ours_var.numpy()[ids], keras_var.numpy()[ids], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_var.numpy(), keras_var.numpy(), rtol=1e-5, atol=1e-6)


def test_without_catch_up_the_same_stream_differs_from_keras():
    """The comparison above can fail: lazy updates do differ."""
    ours_make, keras_make = CASES["adam"]
    rng = np.random.default_rng(11)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    ours_var, keras_var = keras.Variable(x0), keras.Variable(x0)
    ours, reference = ours_make(**LOSSLESS), keras_make()
    for ids, g in skipping_stream(rng, 400):
        if ids is None:
            ours.apply([tf.constant(g)], [ours_var])
            reference.apply([tf.constant(g)], [keras_var])
            continue
        dense = np.zeros((ROWS, DIM), np.float32)
        dense[ids] = g
        ours.apply([sparse(ids, g, rows=ROWS)], [ours_var])
        reference.apply([tf.constant(dense)], [keras_var])
    assert np.abs(ours_var.numpy() - keras_var.numpy()).max() > 1e-3


def test_catch_up_under_xla_and_with_duplicates_and_row_zero():
    """jit_compile pads merged rows with id 0: padding must neither catch up
    nor stamp row 0."""
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    ours_var, keras_var = keras.Variable(x0), keras.Variable(x0)
    ours, reference = CASES["adam"][0](catch_up=True, **LOSSLESS), CASES["adam"][1]()

    @tf.function(jit_compile=True)
    def step(g):
        ours.apply([g], [ours_var])

    for t in range(61):
        ids = np.array([5, 5, 7, 9]) if t % 10 else np.array([0, 5, 0])
        g = rng.normal(size=(len(ids), DIM)).astype(np.float32)
        dense = np.zeros((ROWS, DIM), np.float32)
        np.add.at(dense, ids, g)
        before = ours_var.numpy()
        step(sparse(ids, g, rows=ROWS))
        reference.apply([tf.constant(dense)], [keras_var])
        untouched = np.setdiff1d(np.arange(ROWS), ids)
        np.testing.assert_array_equal(ours_var.numpy()[untouched], before[untouched])
        np.testing.assert_allclose(ours_var.numpy()[ids], keras_var.numpy()[ids], rtol=1e-5, atol=1e-6)


def test_catch_up_step_has_no_full_size_tensor():
    rows = 50_000
    var = keras.Variable(np.ones((rows, 8), np.float32))
    opt = ks.CSAdam(depth=1, compression=1.0, min_rows=1, catch_up=True)

    @tf.function
    def step(g):
        opt.apply([g], [var])

    g = sparse(np.array([5, 17, 5]), np.ones((3, 8), np.float32), rows=rows)
    step(g)
    graph = step.get_concrete_function(g).graph
    big = [op.name for op in graph.get_operations() for out in op.outputs
           if out.shape.rank and out.shape.num_elements() and out.shape.num_elements() >= rows]
    assert not big, f"full-size tensors in the sparse catch-up step: {big}"
    assert "catch_up" in opt.memory_report().rows[0]["path"]  # the fused op does not run it


def test_catch_up_needs_exact_state():
    var = keras.Variable(np.zeros((5000, 4), np.float32))
    opt = ks.CSAdam(catch_up=True)  # default: v sketched for 5,000 rows
    with pytest.raises(ValueError, match="catch_up=True.*exact per-row state"):
        opt.build([var])
    assert not opt.built and not [v for v in opt.variables if v.shape.rank]  # no state was created
    with pytest.raises(ValueError, match="exact per-row state"):
        ks.CSAdam(state_budget=0.1, catch_up=True).build([var])
    ks.CSAdam(state_budget=1.0, catch_up=True).build([var])  # exact: fine


@pytest.mark.parametrize("make, match", [
    (lambda: ks.CSAdam(catch_up="yes"), "catch_up"),
    (lambda: ks.CSAdagrad(catch_up=True), "already equal dense Adagrad"),
    (lambda: ks.CSLion(catch_up=True), "catch_up"),
    (lambda: ks.CSAdam(beta_1=0.99, beta_2=0.9, catch_up=True), "beta_1\\*\\*2 < beta_2"),
    (lambda: ks.CSMomentum(momentum=1.0, catch_up=True), "momentum < 1"),
])
def test_catch_up_bad_input(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def _trained(catch_up, steps=5):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), dtype="int32")
    out = keras.layers.Dense(1)(keras.ops.mean(ks.layers.Embedding(100, 8)(inputs), axis=1))
    model = keras.Model(inputs, out)
    model.compile(optimizer=ks.CSAdam(catch_up=catch_up, depth=1, compression=1.0, min_rows=1), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 50, size=(32 * steps, 4)), rng.normal(size=(32 * steps, 1)), batch_size=32, verbose=0)
    return model


def test_catch_up_saves_and_restores_its_counters(tmp_path):
    model = _trained(True)
    opt = model.optimizer
    assert opt.get_config()["catch_up"] is True
    assert type(opt).from_config(opt.get_config()).catch_up is True
    counters = [v for v in opt.variables if "last_step" in v.name]
    assert counters and counters[0].dtype == "int64"
    stamps = counters[0].numpy()
    assert stamps.max() == 5 and stamps[50:].max() == 0  # ids >= 50 never touched
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_counter = [v for v in loaded.optimizer.variables if "last_step" in v.name][0]
    np.testing.assert_array_equal(loaded_counter.numpy(), stamps)
    # tf.train.Checkpoint round trip
    ckpt = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "ckpt"))
    counters[0].assign(np.zeros_like(stamps))
    tf.train.Checkpoint(optimizer=opt).restore(ckpt)
    np.testing.assert_array_equal(counters[0].numpy(), stamps)


def test_catch_up_state_does_not_load_into_lazy_optimizer(tmp_path):
    path = tmp_path / "w.weights.h5"
    _trained(True).save_weights(path)
    lazy = _trained(False)
    before = [v.numpy() for v in lazy.optimizer.variables]
    with pytest.raises(ValueError, match="catch_up"):
        lazy.load_weights(path)
    for v, b in zip(lazy.optimizer.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_catch_up_all_brings_every_row_to_dense_adam():
    rng = np.random.default_rng(5)
    x0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    ours_var, keras_var = keras.Variable(x0), keras.Variable(x0)
    ours, reference = CASES["adam"][0](catch_up=True, **LOSSLESS), CASES["adam"][1]()
    ours.catch_up_all()  # before the first step: nothing to do
    for t in range(40):
        ids = np.arange(ROWS) if t == 0 else rng.choice(10, size=3, replace=False)
        g = rng.normal(size=(len(ids), DIM)).astype(np.float32)
        dense = np.zeros((ROWS, DIM), np.float32)
        dense[ids] = g
        ours.apply([sparse(ids, g, rows=ROWS)], [ours_var])
        reference.apply([tf.constant(dense)], [keras_var])
        if t == 20:
            ours.catch_up_all()  # mid-run: training continues correctly afterwards
    assert np.abs(ours_var.numpy() - keras_var.numpy())[10:].max() > 1e-4  # rows >= 10 are behind
    ours.catch_up_all()
    np.testing.assert_allclose(ours_var.numpy(), keras_var.numpy(), rtol=1e-5, atol=1e-6)
    ours.catch_up_all()  # idempotent
    np.testing.assert_allclose(ours_var.numpy(), keras_var.numpy(), rtol=1e-5, atol=1e-6)


# --- in a model: keras_sketch.layers.Embedding reads rows caught up ---------------------
#
# A training forward pass of our Embedding reads each row minus the moves it
# still owes (``pending_move``), so the gradient is taken where the dense
# optimizer takes it, and a whole model trains as with the dense optimizer.

MODEL_ROWS, SEQ = 40, 4
MODEL_CASES = ["adam", "adam_schedule", "amsgrad", "nesterov", "rmsprop_momentum_centered"]


def _model(layer_cls):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((SEQ,), dtype="int32")
    h = layer_cls(MODEL_ROWS, DIM, name="table")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(h)))


def _model_stream(steps=45):
    """Batches touching only the lower half of the table, but every 15th
    (which touches every row): the upper half skips 14 steps at a time."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.integers(0, MODEL_ROWS if s % 15 == 0 else MODEL_ROWS // 2, size=(8, SEQ))
                        for s in range(steps)]).astype(np.int32)
    x[::120, :] = np.arange(SEQ)[None]  # a few batches hold repeated ids
    return x, rng.normal(size=(len(x), 1)).astype(np.float32)


def _dense_reference(make, x, y):
    """The model trained by the dense Keras optimizer (sparse gradients
    densified), batch by batch, as ``fit(batch_size=8, shuffle=False)``."""
    model, opt = _model(keras.layers.Embedding), make()

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = keras.losses.mean_squared_error(yb, model(xb, training=True))
            loss = tf.reduce_mean(loss)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
        opt.apply(grads, model.trainable_variables)

    for start in range(0, len(x), 8):
        step(x[start:start + 8], y[start:start + 8])
    return model.get_weights()


def _fitted(layer_cls, make, x, y, jit_compile=False):
    model = _model(layer_cls)
    model.compile(optimizer=make(catch_up=True, depth=1, width=MODEL_ROWS, min_rows=1), loss="mse",
                  jit_compile=jit_compile)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    model.optimizer.catch_up_all()
    return model


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_with_our_embedding_trains_as_the_dense_optimizer(case):
    ours_make, keras_make = CASES[case]
    x, y = _model_stream()
    reference = _dense_reference(keras_make, x, y)
    model = _fitted(ks.layers.Embedding, ours_make, x, y)
    moved = np.abs(model.get_weights()[0] - _model(keras.layers.Embedding).get_weights()[0]).max(axis=1) > 0
    assert moved[MODEL_ROWS // 2:].mean() > 0.5  # the skipping rows trained
    for ours, theirs in zip(model.get_weights(), reference):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["adam", "nesterov"])
def test_model_with_keras_embedding_reads_rows_stale(case):
    # Keras's layer reads a row as it was when last touched: not the dense run
    x, y = _model_stream()
    reference = _dense_reference(CASES[case][1], x, y)
    stale = _fitted(keras.layers.Embedding, CASES[case][0], x, y)
    assert np.abs(stale.get_weights()[0] - reference[0]).max() > 5e-5  # 50x the tolerance above


def test_model_catch_up_under_xla_trains_as_the_dense_optimizer():
    x, y = _model_stream()
    reference = _dense_reference(CASES["adam"][1], x, y)
    model = _fitted(ks.layers.Embedding, CASES["adam"][0], x, y, jit_compile=True)
    for ours, theirs in zip(model.get_weights(), reference):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_training_forward_reads_caught_up_rows_and_changes_no_state():
    x, y = _model_stream(steps=16)
    model = _fitted(ks.layers.Embedding, CASES["adam"][0], x[:-8], y[:-8])
    lower = np.arange(16, dtype=np.int32).reshape(-1, SEQ)  # 2 batches touching rows 0-15 only
    model.fit(lower, y[:4], batch_size=2, verbose=0)  # the other rows now owe moves again
    opt, layer = model.optimizer, model.get_layer("table")
    state = [v.numpy() for v in opt.variables]
    table = layer.embeddings.numpy()
    ids = np.arange(MODEL_ROWS, dtype=np.int32).reshape(-1, SEQ)
    read = layer(ids, training=True).numpy()
    np.testing.assert_array_equal(layer(ids).numpy(), table[ids])  # inference reads the table as is
    for v, before in zip(opt.variables, state):
        np.testing.assert_array_equal(v.numpy(), before)  # the look-ahead wrote nothing
    owed = np.abs(read - table[ids]).max(axis=-1)
    assert (owed[ids >= 16] > 0).mean() > 0.5  # skipped rows that trained are read caught up ...
    np.testing.assert_array_equal(owed[(ids >= 8) & (ids < 16)], 0.0)  # ... the last step's rows owe nothing
    opt.catch_up_all()
    np.testing.assert_allclose(read, layer.embeddings.numpy()[ids], rtol=1e-6, atol=1e-7)


def test_pending_move_is_none_without_catch_up_and_after_a_touch():
    var = keras.Variable(np.ones((MODEL_ROWS, DIM), np.float32))
    lazy = ks.CSAdam(depth=1, width=MODEL_ROWS, min_rows=1)
    lazy.build([var])
    assert lazy.pending_move(var, tf.constant([1, 2])) is None
    opt = CASES["adam"][0](catch_up=True, **LOSSLESS)
    assert opt.pending_move(var, tf.constant([1])) is None  # not built yet
    opt.build([var])
    opt.apply([sparse(np.arange(MODEL_ROWS), np.ones((MODEL_ROWS, DIM), np.float32), rows=MODEL_ROWS)], [var])
    np.testing.assert_array_equal(opt.pending_move(var, tf.constant([[3, 4]])).numpy(), 0.0)  # just touched
    opt.apply([sparse(np.array([3]), np.ones((1, DIM), np.float32), rows=MODEL_ROWS)], [var])
    owed = opt.pending_move(var, tf.constant([[3, 4]])).numpy()
    assert owed.shape == (1, 2, DIM) and np.all(owed[0, 0] == 0) and np.all(owed[0, 1] != 0)


MIRRORED = r"""
import json
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import keras_sketch as ks
from tests.test_catch_up import CASES, MODEL_ROWS, _dense_reference, _model, _model_stream

x, y = _model_stream(steps=30)
reference = _dense_reference(CASES["adam"][1], x, y)
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
with strategy.scope():
    model = _model(ks.layers.Embedding)
    model.compile(optimizer=CASES["adam"][0](catch_up=True, depth=1, width=MODEL_ROWS, min_rows=1), loss="mse")
model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
model.optimizer.catch_up_all()
print("RESULT" + json.dumps({"ours": [w.tolist() for w in model.get_weights()],
                             "dense": [w.tolist() for w in reference]}))
"""


def test_model_catch_up_under_mirrored_strategy_trains_as_the_dense_optimizer():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "-c", MIRRORED], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads([ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
    for ours, dense in zip(out["ours"], out["dense"]):
        np.testing.assert_allclose(np.array(ours), np.array(dense), rtol=1e-5, atol=1e-6)


def test_ragged_and_sparse_ids_are_read_caught_up_as_dense_ids():
    x, y = _model_stream(steps=16)
    model = _fitted(ks.layers.Embedding, CASES["adam"][0], x, y)
    model.fit(np.arange(16, dtype=np.int32).reshape(-1, SEQ), y[:4], batch_size=2, verbose=0)  # rows >= 16 owe moves
    layer = model.get_layer("table")
    ids = np.arange(MODEL_ROWS, dtype=np.int32).reshape(-1, SEQ)
    dense = layer(ids, training=True).numpy()
    assert np.abs(dense - layer(ids).numpy()).max() > 0  # the caught-up read differs from the table
    ragged = layer(tf.RaggedTensor.from_tensor(ids), training=True)
    np.testing.assert_array_equal(ragged.to_tensor().numpy(), dense)
    every = np.argwhere(np.ones(ids.shape, bool)).astype(np.int64)  # every entry present
    sparse_ids = tf.SparseTensor(every, ids.reshape(-1), ids.shape)
    np.testing.assert_allclose(layer(sparse_ids, training=True).numpy(), dense, rtol=1e-6, atol=1e-7)


def test_pending_move_refuses_a_variable_that_is_not_a_table():
    var = keras.Variable(np.ones((4, 3, 2), np.float32), name="cube")
    opt = CASES["adam"][0](catch_up=True, depth=1, width=12, min_rows=1)
    opt.build([var])
    with pytest.raises(ValueError, match="pending_move.*cube.*\\(4, 3, 2\\)"):
        opt.pending_move(var, tf.constant([0]))
