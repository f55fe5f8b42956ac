"""Subprocess entry of the SketchedSGD tf.distribute tests.

``python -m tests.sketched_sgd_worker mirrored OUT.npz``: two logical CPU
devices (set before TensorFlow initialises them, hence a fresh process) under
MirroredStrategy:

* ``compression=None`` against ``keras.optimizers.SGD(momentum=0.9)`` with
  ``model.fit`` for 20 steps, mirrored and on one device;
* every sketched mode fed known per-replica gradients (dense and
  ``tf.IndexedSlices``) through ``strategy.run``; the test replays them in
  the NumPy reference;
* ``model.fit`` with a sketched mode: the per-device copies stay identical.

``python -m tests.sketched_sgd_worker resume OUT.npz``: two logical CPU
devices under MirroredStrategy; every mode trains, is saved (checkpoint,
``.keras``, ``.weights.h5``), trains on, and is resumed from each file into a
fresh model and optimizer; also loads across replica counts (2 -> 1, 1 -> 2).
Records every replica's component of every weight and optimizer variable.

``python -m tests.sketched_sgd_worker mwms OUT.npz`` (with ``TF_CONFIG``): one
worker of a 2-worker MultiWorkerMirroredStrategy cluster; trains with
``keras_sketch.distributed.Trainer`` and records every tensor handed to
``ReplicaContext.all_reduce``/``all_gather``.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

VOCAB, DIM, SEQ, CLASSES, BATCH, FIT_STEPS = 30, 4, 3, 5, 16, 20
REF_STEPS = 6
MODES = {
    "fetchsgd": dict(rows=3, columns=40, k=12),
    "two_round": dict(rows=3, columns=30, k=8),
    "local_topk": dict(k=10),
}
# Training runs of the tiny model (205 parameters): sketches of ~1/3 of d.
TRAIN_SIZES = {
    "fetchsgd": dict(learning_rate=0.5, rows=3, columns=24, k=20),
    "two_round": dict(learning_rate=0.1, rows=3, columns=16, k=24),  # 48 + P*k = 96 floats, as with P = 8, k = 6
}


def make_model():
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, DIM, name="emb")(inp)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(h)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="head")(h))


def data(n):
    rng = np.random.default_rng(5)
    x = rng.integers(0, VOCAB, size=(n, SEQ)).astype(np.int32)
    y = (x[:, 0] % CLASSES).astype(np.int32)  # learnable: the first token decides
    return x, y


def weights(model):
    return [np.asarray(v.numpy()) for v in model.weights]


def replica_spread(variables):
    """Largest difference between per-device copies (mirrored variables;
    the ON_READ per-replica state differs by design and is skipped)."""
    spread = 0.0
    for v in variables:
        if "OnRead" in type(v.value).__name__:
            continue
        copies = [np.asarray(c.numpy(), np.float64) for c in getattr(v.value, "values", [v.value])]
        spread = max([spread] + [float(np.max(np.abs(c - copies[0]))) for c in copies])
    return spread


def fit_weights(optimizer_fn, strategy):
    import keras

    x, y = data(BATCH * FIT_STEPS)
    with strategy.scope():
        model = make_model()
        optimizer = optimizer_fn()
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model, optimizer, history.history["loss"][0]


def synthetic_gradients(steps, replicas, shapes, seed=11):
    """Per step and replica: dense gradients, and for the first variable (the
    embedding) rows with duplicates as IndexedSlices (indices, values)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(replicas):
            grads = {"emb_idx": rng.integers(0, shapes[0][0], size=7).astype(np.int64)}
            grads["emb_val"] = rng.normal(size=(7,) + tuple(shapes[0][1:])).astype(np.float32)
            for i, shape in enumerate(shapes[1:], start=1):
                grads[f"dense{i}"] = rng.normal(size=shape).astype(np.float32)
            step.append(grads)
        out.append(step)
    return out


def run_synthetic(mode, strategy, results, prefix):
    """Feeds known per-replica gradients; records weights and state per step."""
    import keras_sketch as ks

    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model = make_model()
        variables = model.trainable_variables
        optimizer = ks.SketchedSGD(learning_rate=0.1, momentum=0.9, mode=mode, seed=4, **MODES[mode])
        optimizer.build(variables)
    shapes = [tuple(v.shape) for v in variables]
    steps = synthetic_gradients(REF_STEPS, replicas, shapes)
    results[f"{prefix}/w0"] = np.concatenate([w.numpy().ravel() for w in variables])
    if optimizer.sketch_rows:
        results[f"{prefix}/hash_params"] = optimizer.hash_params.numpy()
    results[f"{prefix}/shapes"] = np.array([int(np.prod(s)) for s in shapes])

    def replica_fn(stacked):
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        grads = [tf.IndexedSlices(tf.gather(stacked["emb_val"], r), tf.gather(stacked["emb_idx"], r), shapes[0])]
        grads += [tf.gather(stacked[f"dense{i}"], r) for i in range(1, len(shapes))]
        optimizer.apply(grads, variables)

    step_fn = tf.function(lambda stacked: strategy.run(replica_fn, args=(stacked,)))
    for t, step in enumerate(steps):
        stacked = {key: tf.constant(np.stack([g[key] for g in step])) for key in step[0]}
        step_fn(stacked)
        for r, g in enumerate(step):
            for key, value in g.items():
                results[f"{prefix}/g/{t}/{r}/{key}"] = value
        results[f"{prefix}/w/{t}"] = np.concatenate([w.numpy().ravel() for w in variables])
    results[f"{prefix}/spread"] = np.array(replica_spread(list(variables) + list(optimizer.variables)))
    report = optimizer.communication_report()
    results[f"{prefix}/sent"] = np.array(report["sent_bytes_per_step"])
    results[f"{prefix}/k"] = np.array(report["k"])


def mirrored(out_path):
    import keras

    import keras_sketch as ks

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    single = tf.distribute.OneDeviceStrategy(devices[0])
    results = {"replicas": np.array(strategy.num_replicas_in_sync)}
    runs = {
        "keras_mirrored": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), strategy),
        "ours_mirrored": (lambda: ks.SketchedSGD(0.05, momentum=0.9), strategy),
        "keras_single": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), single),
    }
    for key, (fn, strat) in runs.items():
        model, _, _ = fit_weights(fn, strat)
        for i, w in enumerate(weights(model)):
            results[f"{key}/{i}"] = w
    for mode in MODES:
        run_synthetic(mode, strategy, results, f"syn/{mode}")
    model, optimizer, first_loss = fit_weights(lambda: ks.SketchedSGD(0.5, compression=3, mode="fetchsgd"), strategy)
    results["fit_fetchsgd/spread"] = np.array(replica_spread(list(model.weights) + list(optimizer.variables)))
    np.savez(out_path, **results)


RESUME_MODES = ("two_round", "local_topk", "fetchsgd")
RESUME_FORMATS = ("ckpt", "keras", "h5")


def components(variable):
    """``[replicas, *shape]``: every local replica's own value of a variable
    (mirrored, ON_READ, or a plain variable as one replica)."""
    value = getattr(variable, "value", variable)
    return np.stack([np.asarray(c.numpy()) for c in getattr(value, "values", [value])])


def snapshot(model, results, prefix):
    for i, v in enumerate(model.weights):
        results[f"{prefix}/w/{i}"] = components(v)
    for v in model.optimizer.variables:
        results[f"{prefix}/opt/{v.name}"] = components(v)


def resume_model(mode, strategy):
    import keras

    import keras_sketch as ks

    with strategy.scope():
        model = make_model()
        model.compile(
            ks.SketchedSGD(0.3, compression=3, mode=mode), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.optimizer.build(model.trainable_variables)
    return model


def save_all(model, directory):
    import tensorflow as tf

    paths = {"keras": os.path.join(directory, "m.keras"), "h5": os.path.join(directory, "m.weights.h5")}
    model.save(paths["keras"])
    model.save_weights(paths["h5"])
    paths["ckpt"] = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(os.path.join(directory, "ckpt"))
    return paths


def load(kind, path, mode, strategy):
    """A fresh model and optimizer under ``strategy`` with the saved state;
    returns it and the replica-count warnings the load gave."""
    import warnings

    import keras

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "keras":
            with strategy.scope():
                model = keras.models.load_model(path)
        else:
            model = resume_model(mode, strategy)
            if kind == "h5":
                model.load_weights(path)
            else:
                ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
                ckpt.read(path).assert_consumed()
    return model, [str(w.message) for w in caught if "Per-replica state" in str(w.message)]


def resume(out_path):
    import tempfile

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    default = tf.distribute.get_strategy()
    results = {"replicas": np.array(strategy.num_replicas_in_sync)}
    x, y = data(96)
    first, then = (x[:48], y[:48]), (x[48:], y[48:])  # 3 steps each, batch 16

    def fit(model, part):
        model.fit(*part, batch_size=16, epochs=1, shuffle=False, verbose=0)

    for mode in RESUME_MODES:
        tmp = tempfile.mkdtemp()
        model = resume_model(mode, strategy)
        fit(model, first)
        snapshot(model, results, f"{mode}/saved")
        paths = save_all(model, tmp)
        fit(model, then)
        snapshot(model, results, f"{mode}/uninterrupted")
        for kind in RESUME_FORMATS:
            resumed, caught = load(kind, paths[kind], mode, strategy)
            results[f"{mode}/{kind}/warnings"] = np.array(len(caught))
            fit(resumed, then)
            snapshot(resumed, results, f"{mode}/{kind}/resumed")
        if mode == "fetchsgd":
            continue
        # Replica counts that differ: 2 -> 1 (no strategy) and 1 -> 2.
        for kind in RESUME_FORMATS:
            single, caught = load(kind, paths[kind], mode, default)
            results[f"{mode}/{kind}/to1/warnings"] = np.array(caught)
            snapshot(single, results, f"{mode}/{kind}/to1")
        single = resume_model(mode, default)
        fit(single, first)
        snapshot(single, results, f"{mode}/single_saved")
        single_paths = save_all(single, tempfile.mkdtemp())
        for kind in RESUME_FORMATS:
            two, caught = load(kind, single_paths[kind], mode, strategy)
            results[f"{mode}/{kind}/to2/warnings"] = np.array(caught)
            snapshot(two, results, f"{mode}/{kind}/to2")
    np.savez(out_path, **results)


def record_collectives():
    """Wraps ``ReplicaContext.all_reduce``/``all_gather``: every tensor handed
    to them (at trace time) is logged with its byte size."""
    seen = []
    ctx_class = tf.distribute.ReplicaContext

    def wrap(name):
        original = getattr(ctx_class, name)

        def wrapper(self, *args, **kwargs):
            value = args[1] if name == "all_reduce" else args[0]
            for t in tf.nest.flatten(value):
                t = t.values if isinstance(t, tf.IndexedSlices) else t
                seen.append(int(np.prod(t.shape)) * t.dtype.size)
            return original(self, *args, **kwargs)

        setattr(ctx_class, name, wrapper)

    wrap("all_reduce")
    wrap("all_gather")
    return seen


def mwms(out_path):
    import keras

    import keras_sketch as ks
    from keras_sketch.distributed import Trainer

    seen = record_collectives()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    results = {"replicas": np.array(strategy.num_replicas_in_sync)}
    x, y = data(BATCH * 16)

    def loss_fn(labels, logits):
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

    for mode in ("fetchsgd", "two_round"):
        with strategy.scope():
            model = make_model()
            optimizer = ks.SketchedSGD(momentum=0.9, mode=mode, **TRAIN_SIZES[mode])
        trainer = Trainer(model, optimizer, loss_fn, strategy)
        del seen[:]
        losses = []
        for epoch in range(6):
            for s in range(0, len(x), BATCH):
                losses.append(trainer.train_step(x[s : s + BATCH], y[s : s + BATCH]))
        report = optimizer.communication_report()
        results[f"{mode}/losses"] = np.array(losses)
        results[f"{mode}/weights"] = np.concatenate([w.numpy().ravel() for w in model.weights])
        results[f"{mode}/collective_bytes"] = np.array(seen)
        results[f"{mode}/sent"] = np.array(report["sent_bytes_per_step"])
        results[f"{mode}/dense"] = np.array(report["dense_bytes_per_step"])
        if mode == "two_round":  # per-replica state across workers: every worker saves, then restores
            results.update(mwms_checkpoint(strategy, model, optimizer, os.path.dirname(out_path)))
    np.savez(out_path, **results)


def mwms_checkpoint(strategy, model, optimizer, directory):
    """Every worker writes a checkpoint (its own file), restores it into a
    fresh model and optimizer, and records its replica's state before and
    after, and the saved ``[replicas, d]`` array."""
    import json

    import keras_sketch as ks

    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    key = "optimizer/replica_error/.ATTRIBUTES/VARIABLE_VALUE"
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(directory, f"ckpt{task}"))
    with strategy.scope():
        fresh = make_model()
        fresh_opt = ks.SketchedSGD(momentum=0.9, mode="two_round", **TRAIN_SIZES["two_round"])
        fresh_opt.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).read(path).assert_consumed()
    return {
        "ckpt/task": np.array(task),
        "ckpt/saved": tf.train.load_variable(path, key),
        "ckpt/before": components(optimizer.replica_error),
        "ckpt/after": components(fresh_opt.replica_error),
        "ckpt/momentum_before": components(optimizer.replica_momentum),
        "ckpt/momentum_after": components(fresh_opt.replica_momentum),
    }


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    {"mirrored": mirrored, "mwms": mwms, "resume": resume}[mode](out)
