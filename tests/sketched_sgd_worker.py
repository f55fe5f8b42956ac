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
    np.savez(out_path, **results)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    {"mirrored": mirrored, "mwms": mwms}[mode](out)
