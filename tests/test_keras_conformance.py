"""Keras citizenship (issue 3): every keras.optimizers.Optimizer feature with the
keras_sketch optimizers, modeled on Keras's own optimizer tests
(keras/src/optimizers/*_test.py: config, serialization, golden values against
Keras, weight decay, clipping, EMA, accumulation, iterations, callable learning
rate, loss scaling, sparse, distribution, saving) plus our additions
(duplicate indices across replicas, mismatched-state errors, bit-identical
resume, jit_compile, MultiWorker on localhost).

Optimizers are listed once in ``FACTORIES``; a new optimizer is one more line.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks
from keras_sketch.distributed import free_port, local_tf_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every factory builds a *sketched* optimizer (small min_rows) for the test model.
FACTORIES = {
    "csadam": lambda **kw: ks.CSAdam(**{"learning_rate": 0.01, "min_rows": 8, "compression": 0.3, **kw}),
    "csadam_cs_m": lambda **kw: ks.CSAdam(
        **{"learning_rate": 0.01, "min_rows": 8, "compression": 0.3, "depth": 3, "first_moment": "sketch", **kw}
    ),
    "csadagrad": lambda **kw: ks.CSAdagrad(**{"learning_rate": 0.05, "min_rows": 8, "compression": 0.3, **kw}),
    "csmomentum": lambda **kw: ks.CSMomentum(**{"learning_rate": 0.05, "min_rows": 8, "compression": 0.3, "depth": 3, **kw}),
    "cslion": lambda **kw: ks.CSLion(**{"learning_rate": 0.01, "min_rows": 8, "compression": 0.3, "depth": 3, **kw}),
    "csrmsprop": lambda **kw: ks.CSRMSprop(
        **{"learning_rate": 0.01, "min_rows": 8, "compression": 0.3, "momentum": 0.5, **kw}
    ),
}
if hasattr(ks, "SM3"):
    # SM3 has no sketch settings: min_rows (used by tests to sketch small variables) is dropped.
    FACTORIES["sm3"] = lambda **kw: ks.SM3(**{"learning_rate": 0.05, **{k: v for k, v in kw.items() if k != "min_rows"}})
NAMES = sorted(FACTORIES)

VOCAB, SEQ, CLASSES, BATCH = 64, 4, 40, 12


def make_model(seed=1):
    """Embedding (sparse gradients, sketched rows) + Dense head (dense
    gradients; its kernel's class axis of 40 is sketched)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 6, name="emb")(inp)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="head")(h))


def data(n=BATCH * 4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 16, size=(n, SEQ)).astype(np.int32)  # repeated ids
    y = rng.integers(0, CLASSES, size=(n,)).astype(np.int32)
    return x, y


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compiled(name, seed=1, **kw):
    model = make_model(seed)
    model.compile(FACTORIES[name](**kw.pop("opt", {})), LOSS, **kw)
    return model


def opt_state(optimizer):
    return [np.array(v.numpy()) for v in optimizer.variables]


def weights(model):
    return [np.array(v.numpy()) for v in model.weights]


def assert_bit_identical(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert np.array_equal(x, y), f"entry {i} differs by {np.max(np.abs(x.astype(float) - y.astype(float)))}"


def sketched(optimizer):
    """Sanity: the factory really sketches something (hash variables exist)."""
    return any(v.dtype == "int64" and v.path.endswith("_hash") for v in optimizer.variables)


def spy(optimizer):
    seen = {}
    original = optimizer.update_step

    def update_step(gradient, variable, learning_rate):
        seen.setdefault(variable.name.split(":")[0].split("/")[-1], []).append(type(gradient).__name__)
        return original(gradient, variable, learning_rate)

    optimizer.update_step = update_step
    return seen


# --- configuration ---------------------------------------------------------------------

BASE_OPTIONS = dict(
    weight_decay=0.01,
    clipnorm=1.0,
    use_ema=True,
    ema_momentum=0.9,
    ema_overwrite_frequency=3,
    loss_scale_factor=8.0,
    gradient_accumulation_steps=2,
)


def _as_json(config):
    return json.dumps(config, sort_keys=True, default=keras.saving.serialize_keras_object)


@pytest.mark.parametrize("name", NAMES)
def test_config_and_serialize_round_trips(name):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=10, decay_rate=0.5)
    for kwargs in (BASE_OPTIONS, {"learning_rate": schedule, "global_clipnorm": 2.0}, {"clipvalue": 0.5}):
        opt = FACTORIES[name](**kwargs)
        config = opt.get_config()
        serialized = keras.optimizers.serialize(opt)
        again = type(opt).from_config(config)
        assert _as_json(again.get_config()) == _as_json(config)
        restored = keras.optimizers.deserialize(serialized)
        assert type(restored) is type(opt)
        assert _as_json(keras.optimizers.serialize(restored)) == _as_json(serialized)
        # A JSON round trip (what a .keras file stores) gives the same optimizer.
        from_json = keras.optimizers.deserialize(json.loads(_as_json(serialized)))
        assert _as_json(keras.optimizers.serialize(from_json)) == _as_json(serialized)
        by_name = keras.optimizers.get(keras.optimizers.serialize(opt))
        assert type(by_name) is type(opt)
    assert keras.saving.get_registered_name(type(opt)).startswith("keras_sketch>")


# --- saving: .keras, checkpoints, SavedModel --------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_keras_file_restores_state_exactly_and_resumes_bit_identical(name, tmp_path):
    x, y = data()
    model = compiled(name)
    model.fit(x[:36], y[:36], batch_size=BATCH, shuffle=False, verbose=0)
    assert sketched(model.optimizer) or name == "sm3"
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert [v.path for v in loaded.optimizer.variables] == [v.path for v in model.optimizer.variables]
    assert_bit_identical(opt_state(loaded.optimizer), opt_state(model.optimizer))
    assert int(loaded.optimizer.iterations) == 3
    for m in (model, loaded):
        m.train_on_batch(x[36:], y[36:])
    assert_bit_identical(weights(loaded), weights(model))
    assert_bit_identical(opt_state(loaded.optimizer), opt_state(model.optimizer))


def _loop_step(model, optimizer):
    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return step


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("build_first", [True, False], ids=["built", "deferred"])
def test_checkpoint_manager_resume_is_bit_identical(name, build_first, tmp_path):
    x, y = data()
    model, opt = make_model(), FACTORIES[name]()
    step = _loop_step(model, opt)
    for s in range(0, 36, BATCH):
        step(x[s : s + BATCH], y[s : s + BATCH])
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=opt), str(tmp_path), max_to_keep=2)
    manager.save()
    model2, opt2 = make_model(seed=7), FACTORIES[name]()
    if build_first:
        opt2.build(model2.trainable_variables)
    status = tf.train.Checkpoint(model=model2, optimizer=opt2).restore(manager.latest_checkpoint)
    if not build_first:
        opt2.build(model2.trainable_variables)  # deferred restoration fills the new variables
    status.assert_consumed()
    assert_bit_identical(opt_state(opt2), opt_state(opt))
    step2 = _loop_step(model2, opt2)
    step(x[36:], y[36:])
    step2(x[36:], y[36:])
    assert_bit_identical(weights(model2), weights(model))
    assert_bit_identical(opt_state(opt2), opt_state(opt))


@pytest.mark.parametrize("name", ["csadam", "csmomentum"])
def test_saved_model_with_optimizer(name, tmp_path):
    """``tf.saved_model.save`` of a module holding the model and its optimizer.

    What restoring means there: ``tf.saved_model.load`` gives the serving
    function and the raw variables (no Keras optimizer object); training is
    resumed by restoring the SavedModel's ``variables/variables`` checkpoint
    into a fresh model and optimizer, which resumes bit-identically.
    """
    x, y = data()
    model, opt = make_model(), FACTORIES[name]()
    step = _loop_step(model, opt)
    for s in range(0, 36, BATCH):
        step(x[s : s + BATCH], y[s : s + BATCH])
    module = tf.Module()
    module.model, module.optimizer = model, opt
    module.serve = tf.function(lambda t: model(t), input_signature=[tf.TensorSpec([None, SEQ], tf.int32)])
    tf.saved_model.save(module, str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))
    np.testing.assert_array_equal(loaded.serve(tf.constant(x[:5])).numpy(), model(x[:5]).numpy())
    loaded_state = sorted((v.name, v.numpy().tobytes()) for v in loaded.optimizer._variables)
    assert loaded_state == sorted((v.value.name, v.numpy().tobytes()) for v in opt.variables)

    model2, opt2 = make_model(seed=7), FACTORIES[name]()
    opt2.build(model2.trainable_variables)
    ckpt = tf.train.Checkpoint(model=model2, optimizer=opt2)
    ckpt.restore(str(tmp_path / "variables" / "variables")).expect_partial()  # `serve` is not restored
    assert_bit_identical(opt_state(opt2), opt_state(opt))
    step2 = _loop_step(model2, opt2)
    step(x[36:], y[36:])
    step2(x[36:], y[36:])
    assert_bit_identical(weights(model2), weights(model))


MISMATCHES = [
    ({"depth": 3}, "depth: saved 1, this optimizer 3"),
    ({"width": 10}, "width: saved None, this optimizer 10"),
    ({"compression": 0.6}, "compression: saved 0.3, this optimizer 0.6"),
    ({"min_rows": 1000}, "min_rows: saved 8, this optimizer 1000"),  # set of sketched variables
    ({"hash_axis": "last"}, "hash_axis: saved 'first', this optimizer 'last'"),
    ({"first_moment": "sketch"}, "first_moment: saved 'exact', this optimizer 'sketch'"),
]


@pytest.mark.parametrize("change,message", MISMATCHES, ids=[next(iter(c)) for c, _ in MISMATCHES])
def test_state_saved_with_other_sketch_settings_fails_naming_the_difference(change, message, tmp_path):
    x, y = data()
    model = compiled("csadam")
    model.fit(x[:24], y[:24], batch_size=BATCH, verbose=0)
    model.save(str(tmp_path / "m.keras"))
    model.save_weights(str(tmp_path / "m.weights.h5"))
    ckpt_path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))

    other = compiled("csadam", opt=change)
    other.optimizer.build(other.trainable_variables)
    before = opt_state(other.optimizer)
    for path in ("m.keras", "m.weights.h5"):
        with pytest.raises(ValueError, match="Cannot load the state of optimizer") as err:
            other.load_weights(str(tmp_path / path))
        assert message in str(err.value)
    with pytest.raises(ValueError, match="Cannot load the state of optimizer") as err:
        tf.train.Checkpoint(model=other, optimizer=other.optimizer).restore(ckpt_path)
    assert message in str(err.value)
    # The check runs before any optimizer variable is restored.
    assert_bit_identical(opt_state(other.optimizer), before)


@pytest.mark.parametrize("name", NAMES)
def test_state_saved_for_other_model_variables_fails(name, tmp_path):
    model, opt = make_model(), FACTORIES[name]()
    opt.build(model.trainable_variables)
    path = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "ckpt"))
    small = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt2 = FACTORIES[name]()
    opt2.build(small.trainable_variables)
    with pytest.raises(ValueError, match="model variables: saved 3 with shapes"):
        tf.train.Checkpoint(optimizer=opt2).restore(path)


def test_seed_may_differ_because_hash_parameters_are_restored(tmp_path):
    model = compiled("csadam")
    model.optimizer.build(model.trainable_variables)
    model.save_weights(str(tmp_path / "m.weights.h5"))
    other = compiled("csadam", opt={"seed": 5})
    other.optimizer.build(other.trainable_variables)
    other.load_weights(str(tmp_path / "m.weights.h5"))
    assert_bit_identical(opt_state(other.optimizer), opt_state(model.optimizer))


# --- base options against Keras's Adam ---------------------------------------------------

ROWS, DIM = 30, 4
LOSSLESS = dict(depth=1, width=ROWS, min_rows=1)
OPTIONS = {
    "plain": {},
    "weight_decay": dict(weight_decay=0.1),
    "clipnorm": dict(clipnorm=0.5),
    "clipvalue": dict(clipvalue=0.3),
    "global_clipnorm": dict(global_clipnorm=0.7),
    "ema": dict(use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=2),
    "accumulation": dict(gradient_accumulation_steps=2),
    "loss_scale_factor": dict(loss_scale_factor=16.0),
    "schedule": dict(learning_rate=keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.05, 0.01])),
    "callable_lr": dict(learning_rate=lambda: 0.02),
}


def _gradients(kind, steps=5, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        dense = rng.normal(size=(ROWS, DIM)).astype(np.float32)
        if kind == "dense":
            out.append((tf.constant(dense), tf.constant(dense)))
        else:
            # every row once, shuffled: lazy == dense, unmerged == merged
            ids = rng.permutation(ROWS)
            values = rng.normal(size=(len(ids), DIM)).astype(np.float32)
            merged = np.zeros((ROWS, DIM), np.float32)
            np.add.at(merged, ids, values)
            out.append((tf.IndexedSlices(tf.constant(values), tf.constant(ids), tf.constant([ROWS, DIM])), tf.constant(merged)))
    return out


def _run(opt, grads, which, scale=1.0):
    var = keras.Variable(np.linspace(-1, 1, ROWS * DIM).reshape(ROWS, DIM).astype(np.float32), name="w")
    bias = keras.Variable(np.ones(DIM, np.float32), name="bias")
    seen = spy(opt)
    for pair in grads:
        g = pair[which]
        if scale != 1.0:
            g = tf.IndexedSlices(g.values * scale, g.indices, g.dense_shape) if isinstance(g, tf.IndexedSlices) else g * scale
        opt.apply([g, tf.ones(DIM) * scale], [var, bias])
    return var.numpy(), bias.numpy(), seen


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_base_option_matches_keras_adam(option, kind):
    """Lossless CSAdam with a base option equals keras.optimizers.Adam with it.

    Sparse gradients touch every row once, so lazy sparse updates equal dense
    ones; Keras's Adam gets the equal dense gradient (with IndexedSlices it
    raises TypeError under ``loss_scale_factor``, see the next test).
    Duplicate indices: tests/test_core.py and the distributed tests.
    """
    kwargs = dict(OPTIONS[option])
    kwargs.setdefault("learning_rate", 0.05)
    grads = _gradients(kind)
    scale = kwargs.get("loss_scale_factor", 1.0)
    ours, ours_bias, seen = _run(ks.CSAdam(**LOSSLESS, **kwargs), grads, 0, scale)
    theirs, theirs_bias, _ = _run(keras.optimizers.Adam(**kwargs), grads, 1, scale)
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ours_bias, theirs_bias, rtol=2e-5, atol=2e-6)
    if kind == "sparse":
        # Keras's base class densifies under global_clipnorm and accumulation.
        densified = option in ("global_clipnorm", "accumulation")
        types = set(seen["w"])
        assert types == ({"EagerTensor"} if densified else {"IndexedSlices"}), types


def test_loss_scale_factor_keeps_sparse_gradients_sparse_where_keras_raises():
    grads = _gradients("sparse", steps=2)
    with pytest.raises(TypeError):  # Keras's own optimizers (documents the difference)
        _run(keras.optimizers.Adam(loss_scale_factor=4.0), grads, 0, 4.0)
    for name in NAMES:
        opt = FACTORIES[name](loss_scale_factor=4.0, min_rows=1)
        _, _, seen = _run(opt, grads, 0, 4.0)
        assert set(seen["w"]) == {"IndexedSlices"}
        plain = FACTORIES[name](min_rows=1)
        a, _, _ = _run(plain, grads, 0)
        b, _, _ = _run(FACTORIES[name](loss_scale_factor=4.0, min_rows=1), grads, 0, 4.0)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_exclude_from_weight_decay():
    grads = _gradients("dense", steps=3)
    results = {}
    for excluded in (False, True):
        for cls in (lambda **k: ks.CSAdam(**LOSSLESS, **k), keras.optimizers.Adam):
            opt = cls(learning_rate=0.05, weight_decay=0.2)
            if excluded:
                opt.exclude_from_weight_decay(var_names=["bias"])
            results[excluded, cls is keras.optimizers.Adam] = _run(opt, grads, 0)[:2]
    for excluded in (False, True):
        np.testing.assert_allclose(results[excluded, False][1], results[excluded, True][1], rtol=1e-5)
        np.testing.assert_allclose(results[excluded, False][0], results[excluded, True][0], rtol=1e-5)
    assert not np.allclose(results[False, False][1], results[True, False][1])
    np.testing.assert_array_equal(results[False, False][0], results[True, False][0])  # kernel still decayed


@pytest.mark.parametrize("name", NAMES)
def test_iterations_counter_and_accumulation_counts_updates(name):
    opt = FACTORIES[name](gradient_accumulation_steps=3, min_rows=1)
    var = keras.Variable(np.ones((20, 3), np.float32))
    g = tf.IndexedSlices(tf.ones((2, 3)), tf.constant([1, 1]), tf.constant([20, 3]))
    values = []
    for _ in range(7):
        opt.apply([g], [var])
        values.append(var.numpy().copy())
    assert int(opt._iterations) == 7 and int(opt.iterations) == 2
    assert np.array_equal(values[0], np.ones((20, 3))) and np.array_equal(values[1], values[0])
    assert not np.array_equal(values[2], values[1])  # updated on the 3rd step
    assert np.array_equal(values[4], values[3])
    plain, var = FACTORIES[name](min_rows=1), keras.Variable(np.ones((20, 3), np.float32))
    for _ in range(4):
        plain.apply([g], [var])
    assert int(plain.iterations) == 4


@pytest.mark.parametrize("name", NAMES)
def test_ema_and_finalize(name):
    x, y = data()
    model = compiled(name, opt=dict(use_ema=True, ema_momentum=0.5))
    model.fit(x, y, batch_size=BATCH, verbose=0)  # fit finalizes: weights <- their EMA
    averages = [np.array(v.numpy()) for v in model.optimizer._model_variables_moving_average]
    assert_bit_identical([np.array(v.numpy()) for v in model.trainable_variables], averages)


@pytest.mark.parametrize("name", NAMES)
def test_variable_constraint_applied_after_sparse_update(name):
    x, y = data()
    keras.utils.set_random_seed(1)
    inp = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 6, embeddings_constraint=keras.constraints.NonNeg(), name="emb")(inp)
    model = keras.Model(inp, keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling1D()(h)))
    model.compile(FACTORIES[name](learning_rate=0.5), LOSS)
    seen = spy(model.optimizer)
    model.fit(x, y, batch_size=BATCH, verbose=0)
    emb = model.get_layer("emb").embeddings.numpy()
    assert emb.min() >= 0.0 and emb.max() > 0.0
    assert "IndexedSlices" in seen["embeddings"]


@pytest.mark.parametrize("name", NAMES)
def test_callable_learning_rate_and_schedule_in_fit(name):
    x, y = data()
    calls = []

    def lr():
        calls.append(1)
        return 0.01

    model = compiled(name, opt=dict(learning_rate=lr))
    model.fit(x, y, batch_size=BATCH, verbose=0)
    assert calls  # traced into the step
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.5)
    model = compiled(name, opt=dict(learning_rate=schedule))
    model.fit(x, y, batch_size=BATCH, verbose=0)
    np.testing.assert_allclose(float(model.optimizer.learning_rate), 0.05 * 0.5**4, rtol=1e-6)


# --- mixed precision ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_mixed_precision_trains_with_float32_state(name, policy):
    x, y = data(n=BATCH * 8)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = make_model()
        opt = FACTORIES[name]()
        if policy == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=2.0**8)
        model.compile(opt, LOSS)
        inner = model.optimizer.inner_optimizer if policy == "mixed_float16" else model.optimizer
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
        seen = spy(inner)
        history = model.fit(x, y, batch_size=BATCH, epochs=4, verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(np.isfinite(history)) and history[-1] < history[0]
    assert {str(v.dtype) for v in inner.variables} <= {"float32", "int64"}
    assert "IndexedSlices" in seen["embeddings"]


# --- XLA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_jit_compile_trains_dense_and_sparse_like_the_eager_graph(name):
    x, y = data()
    results = []
    for jit in (False, True):
        model = compiled(name, jit_compile=jit)
        seen = spy(model.optimizer)
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
        assert model.jit_compile is jit
        assert "IndexedSlices" in seen["embeddings"]
        results.append((weights(model), opt_state(model.optimizer)))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(results[1][0][0], make_model().weights[0].numpy())


# --- tf.distribute -------------------------------------------------------------------------


def _python(args, timeout, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tests.distributed_worker", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_mirrored_strategy_matches_single_device(tmp_path):
    out = tmp_path / "mirrored.json"
    proc = _python(["mirrored", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["replicas"] == 3
    for key, run in report["runs"].items():
        for mode in ("fit", "loop"):
            worst = max(run[mode].values())
            assert worst < 1e-5, (key, mode, worst)
        assert run["replica_spread"] == 0.0, key  # per-device state copies stay identical
        moved = [v for k, v in run["moved"].items() if k.startswith("w/")]
        assert min(moved) > 1e-4, key  # training changed every weight
        for types in (run["gradient_types_fit"], run["gradient_types_loop"]):
            emb = [t for k, t in types.items() if k.startswith("emb/")]
            assert len(emb) == 3 and all(t == ["IndexedSlices"] for t in emb), types
        assert set(run["variable_classes"]) == {"MirroredVariable:float32", "MirroredVariable:int64"}


def test_multi_worker_mirrored_two_localhost_workers(tmp_path):
    ports = [free_port(), free_port()]
    procs = []
    try:
        for index in range(2):
            env = {"TF_CONFIG": local_tf_config(ports, index)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.distributed_worker", "mwms", str(tmp_path / f"w{index}.npz")],
                    cwd=REPO,
                    env={**os.environ, **env},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    single = _python(["single", str(tmp_path / "single.npz")], timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    ref = np.load(tmp_path / "single.npz")
    for index in range(2):
        got = np.load(tmp_path / f"w{index}.npz")
        assert int(got["replicas"]) == 2
        for key in ("csadam", "csmomentum"):
            assert got[f"{key}/sparse_seen"].all()
            names = sorted(k for k in ref.files if k.startswith(key + "/"))
            assert names == sorted(k for k in got.files if k.startswith(key + "/") and k != f"{key}/sparse_seen")
            for k in names:
                np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
