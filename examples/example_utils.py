"""Small helpers shared by the examples: optimizers by name, state bytes,
a per-batch loss recorder and the loss-curve plot (examples/output/)."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

OUTPUT_DIR = Path(__file__).resolve().parent / "output"


def make_optimizer(name, lr, clipnorm=None, **sketch):
    """``adam``, ``rmsprop``, ``adafactor`` (Keras) or ``csadam``, ``csadam-mv``
    (both moments sketched), ``csadam-v0`` (no 1st moment), ``csrmsprop``,
    ``csadagrad`` (keras_sketch).  ``sketch`` are keras_sketch's sketch
    arguments; Keras's optimizers have none and ignore them."""
    import keras

    import keras_sketch

    clip = {} if clipnorm is None else {"clipnorm": clipnorm}
    if name == "adam":
        return keras.optimizers.Adam(lr, **clip)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr, **clip)
    if name == "adafactor":
        return keras.optimizers.Adafactor(lr, **clip)
    if name == "csadam":
        return keras_sketch.CSAdam(lr, **clip, **sketch)
    if name == "csadam-mv":
        return keras_sketch.CSAdam(lr, first_moment="sketch", **clip, **sketch)
    if name == "csadam-v0":
        return keras_sketch.CSAdam(lr, beta_1=0.0, **clip, **sketch)
    if name == "csrmsprop":
        return keras_sketch.CSRMSprop(lr, **clip, **sketch)
    if name == "csadagrad":
        return keras_sketch.CSAdagrad(lr, **clip, **sketch)
    raise ValueError(f"unknown optimizer {name!r}")


def state_bytes(optimizer, verbose=True):
    """Optimizer-state bytes; prints keras_sketch's per-variable report."""
    from keras_sketch.memory import keras_state_bytes

    if hasattr(optimizer, "memory_report"):
        report = optimizer.memory_report()
        if verbose:
            print(report)
        return int(report.state_bytes)
    n = int(keras_state_bytes(optimizer))
    if verbose:
        print(f"{optimizer.__class__.__name__}: optimizer state {n:,} bytes (Keras, exact)")
    return n


def loss_recorder():
    """A callback that keeps the (running-mean) training loss after every batch."""
    import keras

    class LossRecorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses = []
            self.val_losses = []

        def on_train_batch_end(self, batch, logs=None):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_epoch_end(self, epoch, logs=None):
            if logs and "val_loss" in logs:
                self.val_losses.append((len(self.losses), float(logs["val_loss"])))

    return LossRecorder()


def plot_curves(curves, path, title, ylabel="training loss (running mean per epoch)"):
    """``curves``: ``{label: [loss per batch]}``; saves a PNG, returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"loss curves saved to {path}")
    return path


def print_table(rows, columns):
    """Prints a list of dicts as an aligned table."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(f"{c:>{widths[c]}}" for c in columns))
    for r in rows:
        print("  ".join(f"{str(r.get(c, '')):>{widths[c]}}" for c in columns))
