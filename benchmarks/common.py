"""Shared helpers of the benchmark scripts: machine info, LM data, one training run.

Everything here is measured, never assumed: ``train_lm`` trains the WikiText-2
LSTM language model of ``examples/lm_data.py`` with one optimizer and returns
the test perplexity, training loss curve, state bytes and wall time.
"""

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"


def quiet_tf():
    """Silences TensorFlow's retracing warnings (each run builds a new model)."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")


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


def lm_data(max_train_tokens, max_test_tokens, vocab_size, batch, bptt):
    """Train on the WikiText-2 *validation* split, test on the *test* split
    (the training split is not on disk); returns arrays and a description."""
    from lm_data import Vocabulary, bptt_batches, load_wikitext2

    train_tokens, source = load_wikitext2("validation")
    test_tokens, test_source = load_wikitext2("test")
    if max_train_tokens:
        train_tokens = train_tokens[:max_train_tokens]
    if max_test_tokens:
        test_tokens = test_tokens[:max_test_tokens]
    vocab = Vocabulary(train_tokens, vocab_size)
    x, y = bptt_batches(vocab.encode(train_tokens), batch, bptt)
    tx, ty = bptt_batches(vocab.encode(test_tokens), batch, bptt)
    desc = (
        f"train: {source} ({len(train_tokens):,} tokens); test: {test_source} ({len(test_tokens):,} tokens); "
        f"vocabulary {len(vocab):,}"
    )
    return dict(x=x, y=y, tx=tx, ty=ty, vocab=len(vocab), desc=desc)


def state_bytes(optimizer):
    import keras_sketch
    from keras_sketch.memory import keras_state_bytes

    if isinstance(optimizer, keras_sketch.SketchOptimizer) or hasattr(optimizer, "memory_report"):
        return int(optimizer.memory_report().state_bytes)
    return int(keras_state_bytes(optimizer))


def train_lm(make_optimizer, data, embed=128, hidden=128, layers=1, dropout=0.0, batch=32, bptt=35, epochs=2,
             seed=0, verbose=0, max_steps=None):
    """Trains a fresh LM with ``make_optimizer()``; returns a result dict."""
    import keras

    from lm_data import build_lm, lm_loss

    keras.utils.set_random_seed(seed)
    model = build_lm(data["vocab"], embed, hidden, layers=layers, dropout=dropout, steps=bptt)
    optimizer = make_optimizer()
    model.compile(optimizer=optimizer, loss=lm_loss())
    x, y = data["x"], data["y"]
    if max_steps:
        x, y = x[: max_steps * batch], y[: max_steps * batch]
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=verbose)
    seconds = time.perf_counter() - start
    test_loss = model.evaluate(data["tx"], data["ty"], batch_size=batch, verbose=0)
    losses = [float(v) for v in history.history["loss"]]
    ppl = math.exp(test_loss) if math.isfinite(test_loss) and test_loss < 50 else float("inf")
    return dict(
        test_ppl=ppl,
        test_loss=float(test_loss),
        train_loss=losses,
        state_bytes=state_bytes(optimizer),
        seconds=seconds,
        steps=int(optimizer.iterations.numpy()),
    )


def load_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def save_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


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
