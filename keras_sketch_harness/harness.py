"""Optimizers by name, state bytes, step timing, tables, plots and results files.

The one copy of each, used by every example and benchmark script.
"""

import json
import os
import platform
import statistics
import time
from pathlib import Path

# keras_sketch arguments that Keras's own optimizers do not take (dropped for them).
SKETCH_ARGS = frozenset({"compression", "depth", "width", "min_rows", "hash_axis", "seed", "cleaning_factor",
                         "cleaning_interval", "fused", "state_budget", "first_moment"})
KERAS_NAMES = {"adam": "Adam", "rmsprop": "RMSprop", "adafactor": "Adafactor", "adagrad": "Adagrad", "sgd": "SGD",
               "lion": "Lion"}
# name -> (keras_sketch class, fixed arguments)
SKETCH_NAMES = {
    "csadam": ("CSAdam", {}),
    "csadam-mv": ("CSAdam", {"first_moment": "sketch"}),  # both moments sketched (the paper's CS-MV)
    "csadam-v0": ("CSAdam", {"beta_1": 0.0}),  # no 1st moment
    "csrmsprop": ("CSRMSprop", {}),
    "csadagrad": ("CSAdagrad", {}),
    "csmomentum": ("CSMomentum", {}),
    "sm3": ("SM3", {}),
}
OPTIMIZER_NAMES = tuple(KERAS_NAMES) + tuple(SKETCH_NAMES)


def make_optimizer(name, lr, clipnorm=None, **kwargs):
    """The optimizer called ``name`` (one of ``OPTIMIZER_NAMES``) at learning rate ``lr``.

    ``kwargs`` go to the constructor; Keras's own optimizers (``adam``,
    ``rmsprop``, ...) drop keras_sketch's sketch arguments (``SKETCH_ARGS``),
    so one set of flags serves every optimizer of a comparison.  ``sm3`` takes
    no sketch arguments either."""
    import keras

    import keras_sketch

    if clipnorm is not None:
        kwargs["clipnorm"] = clipnorm
    if name in KERAS_NAMES:
        cls = getattr(keras.optimizers, KERAS_NAMES[name])
        return cls(lr, **{k: v for k, v in kwargs.items() if k not in SKETCH_ARGS})
    if name in SKETCH_NAMES:
        cls_name, fixed = SKETCH_NAMES[name]
        if cls_name == "SM3":
            kwargs = {k: v for k, v in kwargs.items() if k not in SKETCH_ARGS}
        return getattr(keras_sketch, cls_name)(lr, **fixed, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZER_NAMES)}")


def state_bytes(optimizer, verbose=False):
    """Optimizer-state bytes (after ``build``); ``verbose`` prints keras_sketch's memory report."""
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


# --------------------------------------------------------------------------- timing
def median_time(step, repeats, warmup=2):
    """Median wall time of ``step()`` over ``repeats`` calls, after ``warmup`` calls.

    ``step`` must wait for its result (e.g. end in ``.numpy()``)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fit_callbacks():
    """A Keras callback recording each training batch's loss and wall time (``.losses``, ``.step_seconds``)."""
    import keras

    class StepRecorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses, self.step_seconds, self.val_losses = [], [], []
            self._prev, self._t0 = 0.0, None

        def on_epoch_begin(self, epoch, logs=None):
            self._prev = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.step_seconds.append(time.perf_counter() - self._t0)
            if logs and "loss" in logs:  # Keras reports the epoch's running mean: recover this batch's loss
                mean = float(logs["loss"])
                self.losses.append((batch + 1) * mean - batch * self._prev)
                self._prev = mean

        def on_epoch_end(self, epoch, logs=None):
            if logs and "val_loss" in logs:
                self.val_losses.append((len(self.losses), float(logs["val_loss"])))

        def median_step(self, skip=3):
            """Median seconds per step, without the first ``skip`` (tracing and compilation)."""
            times = self.step_seconds[skip:] or self.step_seconds
            return statistics.median(times) if times else float("nan")

    return StepRecorder()


# --------------------------------------------------------------------------- reporting
def print_table(rows, columns):
    """Prints a list of dicts as an aligned table (``columns``: keys, or ``(key, header)`` pairs)."""
    cols = [c if isinstance(c, tuple) else (c, c) for c in columns]
    cells = [[str(r.get(k, "")) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, (_, h) in enumerate(cols)]
    print("  ".join(f"{h:>{w}}" for (_, h), w in zip(cols, widths)))
    for row in cells:
        print("  ".join(f"{c:>{w}}" for c, w in zip(row, widths)))


def smooth(values, k):
    """Running mean over ``k`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= k:
            total -= values[i - k]
        out.append(total / min(i + 1, k))
    return out


def plot_curves(curves, path, title, ylabel="training loss", bars=None, bar_label="optimizer state (MB)"):
    """``curves``: ``{label: [loss per step]}``, drawn smoothed; ``bars``: ``{label: value}`` beside them.

    Saves a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bars:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    k = max(1, min(25, max((len(v) for v in curves.values()), default=1) // 20))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), smooth(values, k), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel + (f" ({k}-step mean)" if k > 1 else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if bars:
        names = list(bars)
        bx.barh(names, [bars[n] for n in names], color=[f"C{i}" for i in range(len(names))])
        bx.invert_yaxis()
        bx.set_xlabel(bar_label)
        bx.tick_params(axis="y", labelsize=8)
        for i, n in enumerate(names):
            bx.text(bars[n], i, f" {bars[n]:.3g}", va="center", fontsize=8)
        bx.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def save_json(path, obj):
    """Writes ``obj`` as JSON atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def replace_section(md_path, name, text):
    """Puts ``text`` between ``<!-- name:start -->`` and ``<!-- name:end -->``
    in ``md_path`` (appended when absent); other sections are left as they are.
    The file is re-read right before writing: other scripts own other sections."""
    md_path = Path(md_path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    current = md_path.read_text() if md_path.exists() else "# Benchmark results\n"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        _, tail = rest.split(end, 1)
        new = head + block + tail
    else:
        new = current.rstrip() + "\n\n" + block + "\n"
    md_path.write_text(new)


def machine_info():
    """Machine and versions, printed and stored with every result."""
    import keras
    import numpy as np
    import tensorflow as tf

    try:
        from keras_sketch import fused

        fused_loaded = fused.load() is not None
    except Exception:  # noqa: BLE001 - the op is optional
        fused_loaded = False
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "fused_op_loaded": fused_loaded,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def machine_line(info):
    return (
        f"{info['cpu']}, {info['cores']} cores (shared; load average at start "
        f"{', '.join(f'{x:.1f}' for x in info['load_average'] or [])}); Python {info['python']}, "
        f"TensorFlow {info['tensorflow']}, Keras {info['keras']}, NumPy {info['numpy']}; "
        f"fused op loaded: {info['fused_op_loaded']}"
    )


# --------------------------------------------------------------------------- learning rates
LR_GRID = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2]
LR_START = (8e-3, 1.6e-2)  # walks start here (Adam's best rates in a first pass at 2 epochs)


def adaptive_rates(ppl_of, grid, start):
    """Runs the two ``start`` rates (neighbours in ``grid``), then walks toward the better side
    until the best is bracketed or the grid ends; returns ``{lr: ppl_of(lr)}``."""
    i, j = grid.index(start[0]), grid.index(start[1])
    res = {grid[i]: ppl_of(grid[i]), grid[j]: ppl_of(grid[j])}
    step = 1 if res[grid[j]] < res[grid[i]] else -1
    k = j if step == 1 else i
    while 0 <= k + step < len(grid):
        nxt = grid[k + step]
        res[nxt] = ppl_of(nxt)
        if res[nxt] >= res[grid[k]]:
            break
        k += step
    return res
