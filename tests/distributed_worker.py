"""Subprocess entry of the tf.distribute conformance tests.

``python -m tests.distributed_worker mirrored OUT.json``: three logical CPU
devices (set before TensorFlow initialises them, hence a fresh process);
trains the same model with the same global batches under MirroredStrategy and
on one device, with ``model.fit`` and with ``keras_sketch.distributed.Trainer``,
and writes the largest differences (weights and optimizer state).

``python -m tests.distributed_worker mwms OUT.npz`` (with ``TF_CONFIG``): one
worker of a MultiWorkerMirroredStrategy cluster; trains with the Trainer and
writes the final weights and optimizer state.

``python -m tests.distributed_worker single OUT.npz``: the same training on
one device, the reference of the multi-worker run.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

VOCAB, SEQ, CLASSES, GLOBAL_BATCH, STEPS = 64, 4, 40, 12, 3

OPTIMIZERS = {
    "csadam": ("CSAdam", dict(learning_rate=0.01, min_rows=8, compression=0.3)),
    "csadam_sketched_m": ("CSAdam", dict(learning_rate=0.01, min_rows=8, compression=0.3, depth=3, first_moment="sketch")),
    "csadagrad": ("CSAdagrad", dict(learning_rate=0.05, min_rows=8, compression=0.3)),
    "csmomentum": ("CSMomentum", dict(learning_rate=0.05, min_rows=8, compression=0.3, depth=3)),
    "csrmsprop": ("CSRMSprop", dict(learning_rate=0.01, min_rows=8, compression=0.3, momentum=0.5)),
}


def data():
    rng = np.random.default_rng(0)
    # Few distinct ids: every batch repeats ids within and across replicas.
    x = rng.integers(0, 16, size=(GLOBAL_BATCH * STEPS, SEQ)).astype(np.int32)
    y = rng.integers(0, CLASSES, size=(GLOBAL_BATCH * STEPS,)).astype(np.int32)
    return x, y


def make_model():
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 6, name="emb")(inp)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="head")(h))


def make_optimizer(key):
    import keras_sketch as ks

    cls, kwargs = OPTIMIZERS[key]
    return getattr(ks, cls)(**kwargs)


def loss_fn(y, logits):
    import keras

    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def spy_gradient_types(optimizer):
    """Records the gradient type update_step receives, per variable name."""
    seen = {}
    original = optimizer.update_step

    def update_step(gradient, variable, learning_rate):
        seen.setdefault(variable.name, set()).add(type(gradient).__name__)
        return original(gradient, variable, learning_rate)

    optimizer.update_step = update_step
    return seen


def state(model, optimizer):
    out = {f"w/{v.path}": np.asarray(v.numpy()) for v in model.weights}
    out.update({f"o/{i}/{v.path}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    return out


def replica_spread(model, optimizer):
    """Largest difference between the per-device copies of any variable."""
    spread = 0.0
    for v in list(model.weights) + list(optimizer.variables):
        copies = [np.asarray(c.numpy(), np.float64) for c in getattr(v.value, "values", [v.value])]
        spread = max([spread] + [float(np.max(np.abs(c - copies[0]))) if c.size else 0.0 for c in copies])
    return spread


def max_diff(a, b):
    assert len(a) == len(b), (sorted(a), sorted(b))
    diffs = {}
    for (ka, va), (kb, vb) in zip(sorted(a.items()), sorted(b.items())):
        diffs[ka] = float(np.max(np.abs(va.astype(np.float64) - vb.astype(np.float64)))) if va.size else 0.0
    return diffs


def train_fit(key, strategy):
    import keras

    x, y = data()
    with strategy.scope():
        model = make_model()
        optimizer = make_optimizer(key)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = spy_gradient_types(optimizer)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    seen["replica_spread"] = replica_spread(model, optimizer)
    return state(model, optimizer), seen


def train_loop(key, strategy):
    from keras_sketch.distributed import Trainer

    x, y = data()
    with strategy.scope():
        model = make_model()
        optimizer = make_optimizer(key)
    trainer = Trainer(model, optimizer, loss_fn, strategy)
    seen = spy_gradient_types(optimizer)
    losses = [trainer.train_step(x[s : s + GLOBAL_BATCH], y[s : s + GLOBAL_BATCH]) for s in range(0, len(x), GLOBAL_BATCH)]
    return state(model, optimizer), seen, losses


def mirrored(out_path):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    single = tf.distribute.OneDeviceStrategy(devices[0])
    report = {"replicas": strategy.num_replicas_in_sync, "runs": {}}
    for key in OPTIMIZERS:
        mirrored_fit, seen = train_fit(key, strategy)
        single_fit, _ = train_fit(key, single)
        mirrored_loop, seen_loop, _ = train_loop(key, strategy)
        single_loop, _, _ = train_loop(key, single)
        report["runs"][key] = {
            "fit": max_diff(mirrored_fit, single_fit),
            "loop": max_diff(mirrored_loop, single_loop),
            "fit_vs_loop": max_diff(single_fit, single_loop),
            "moved": max_diff(single_fit, _initial_state(key)),
            "replica_spread": seen.pop("replica_spread"),
            "gradient_types_fit": {k: sorted(v) for k, v in seen.items()},
            "gradient_types_loop": {k: sorted(v) for k, v in seen_loop.items()},
        }
        with strategy.scope():
            opt = make_optimizer(key)
            opt.build(make_model().trainable_variables)
        report["runs"][key]["variable_classes"] = sorted(
            {type(v.value).__name__ + ":" + str(v.dtype) for v in opt.variables}
        )
    with open(out_path, "w") as f:
        json.dump(report, f)


def _initial_state(key):
    model = make_model()
    optimizer = make_optimizer(key)
    optimizer.build(model.trainable_variables)
    return state(model, optimizer)


def mwms(out_path):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    results = {}
    for key in ("csadam", "csmomentum"):
        values, seen, losses = train_loop(key, strategy)
        results.update({f"{key}/{k}": v for k, v in values.items()})
        results[f"{key}/losses"] = np.array(losses)
        results[f"{key}/sparse_seen"] = np.array(["IndexedSlices" in v for k, v in seen.items() if "emb" in k])
    results["replicas"] = np.array(strategy.num_replicas_in_sync)
    np.savez(out_path, **results)


def single(out_path):
    results = {}
    for key in ("csadam", "csmomentum"):
        values, _, losses = train_loop(key, tf.distribute.get_strategy())
        results.update({f"{key}/{k}": v for k, v in values.items()})
        results[f"{key}/losses"] = np.array(losses)
    np.savez(out_path, **results)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    {"mirrored": mirrored, "mwms": mwms, "single": single}[mode](out)
