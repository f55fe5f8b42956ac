"""Model-level benchmark: ``model.fit`` of an embedding-heavy recommender model.

    python benchmarks/bench_model.py                       # 1M and 4M rows, headroom at 4 GiB, build memory
    python benchmarks/bench_model.py --sizes 1000000 --no-headroom --no-build --quick   # a smoke run
    python benchmarks/bench_model.py --sizes 16000000 --merge --limit-gib 20   # add a size to the saved run

Model: three categorical features with tables of ``N``, ``N/4`` and ``N/16``
rows x 64 (``N`` is "the table size" below), each example holding a bag of 4
Zipf-distributed ids per feature (mean-pooled), concatenated into an MLP
(256 - 64 - 1) trained with binary cross-entropy on a planted target (a
hidden score per id; the label is the sign of the bag scores' sum plus
noise).  Batch 512.

Every configuration runs in a fresh subprocess (``--worker``) so that peak
resident memory is its own: ``VmHWM`` of ``/proc/self/status`` (the kernel's
high-water mark of the resident set), reset with ``/proc/self/clear_refs``
right before ``model.fit`` -- so "fit peak" counts optimizer ``build``,
the first (tracing) step and training, plus everything already resident
(interpreter, TensorFlow, the model's weights and data) -- and ``psutil``
for the resident set at each phase.  Workers run with
``TF_ENABLE_ONEDNN_OPTS=0``: with oneDNN on, TensorFlow's CPU allocator keeps
freed buffers, so a phase's peak would include the (Keras, not keras_sketch)
weight initialiser's temporaries.  Speed: median milliseconds per step of
``--steps`` timed steps after ``--warmup`` steps (time between consecutive
``on_train_batch_end`` callbacks).  The machine is shared with other jobs:
steps are few and timings are ratios within one run.

Headroom (``--cap-gib``): the largest ``N`` whose fit peak stays under the
cap, per configuration.  The two measured sizes give bytes per row (a line
through the two fit peaks), hence a predicted largest ``N``; with
``--verify-headroom`` it is then run in a subprocess and lowered by 10% until
its measured fit peak fits the cap.  ``--from-json`` re-renders a saved run
with the predicted headroom.

Memory guard (``--limit-gib``, default 85% of the machine's memory): before
a configuration runs at ``N``, its peaks (fit and model creation) are
predicted from its entries at the measured smaller sizes (the line through
the two largest); one predicted above the limit, or above the memory
available right now, is not run and is recorded as "does not fit" with the
prediction.  While a worker runs, its resident set and the machine's
available memory are polled; it is killed -- and recorded as failed with
the reason -- when it passes the limit or the machine's available memory
falls under 1 GiB (before the kernel's OOM killer picks a process, maybe
another job's).  A worker that dies of a signal is recorded with it.

``--merge``: runs only ``--sizes`` x ``--configs`` and merges them into the
saved benchmarks/results/bench_model.json (entries of other sizes and
configurations kept, re-run ones replaced; the saved build and headroom
kept); each run's command, machine line and ``--note`` are listed in the
report.  Where Keras Adam + keras.layers.Embedding cannot run at an ``N``,
ratios there are against the first of ``REFERENCES`` that ran, and its
predicted figures are shown, marked as predicted.

Build memory (``--build``): peak resident growth while ``optimizer.build``
creates the state of a 4M x 64 variable created beforehand without any
temporary, against the state's bytes.  ``--package-path`` runs it with
another checkout of keras_sketch (to measure a "before").

Writes benchmarks/results/bench_model.json, benchmarks/results/plots/
bench_model.png, the ``bench_model`` section of benchmarks/RESULTS.md and the
model-level table of README.md (between its ``bench_model_table`` markers).
"""

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DIM, BAG, BATCH = 64, 4, 512
BASELINE = "keras_adam+keras_emb"
CONFIGS = {
    # name: (optimizer, layer, description)
    "keras_adam+keras_emb": ("keras_adam", "keras", "Keras Adam + keras.layers.Embedding"),
    "keras_adam+ks_emb": ("keras_adam", "ks", "Keras Adam + keras_sketch Embedding"),
    "csadam+keras_emb": ("csadam", "keras", "CSAdam() + keras.layers.Embedding"),
    "csadam+ks_emb": ("csadam", "ks", "CSAdam() + keras_sketch Embedding"),
    "csadam_b0+ks_emb": ("csadam_b0", "ks", "CSAdam(beta_1=0) + keras_sketch Embedding"),
    "csadagrad+ks_emb": ("csadagrad", "ks", "CSAdagrad() + keras_sketch Embedding"),
    "lazy_adam+ks_emb": ("lazy_adam", "ks", "exact lazy Adam (CSAdam(compression=1, min_rows=1)) + keras_sketch Embedding"),
}
# In-run references where Keras Adam + keras.layers.Embedding cannot run at an N: the first of these measured there.
REFERENCES = [BASELINE, "keras_adam+ks_emb", "lazy_adam+ks_emb", "csadam+keras_emb", "csadam+ks_emb"]
SHORT = {  # README labels
    "keras_adam+keras_emb": "Keras Adam + Keras Embedding",
    "keras_adam+ks_emb": "Keras Adam + our Embedding",
    "csadam+keras_emb": "CSAdam() + Keras Embedding",
    "csadam+ks_emb": "CSAdam() + our Embedding",
    "csadam_b0+ks_emb": "CSAdam(beta_1=0) + our Embedding",
    "csadagrad+ks_emb": "CSAdagrad() + our Embedding",
    "lazy_adam+ks_emb": "exact lazy Adam + our Embedding",
}
MIB, GIB = 2**20, 2**30
FLOOR = 1 * GIB  # the guard kills a worker when the machine's available memory falls under this
README = Path(__file__).resolve().parent.parent / "README.md"


def make_optimizer(name):
    import keras

    import keras_sketch

    return {
        "keras_adam": lambda: keras.optimizers.Adam(learning_rate=1e-3),
        "csadam": lambda: keras_sketch.CSAdam(learning_rate=1e-3),
        "csadam_b0": lambda: keras_sketch.CSAdam(learning_rate=1e-3, beta_1=0.0),
        "csadagrad": lambda: keras_sketch.CSAdagrad(learning_rate=1e-2),
        "lazy_adam": lambda: keras_sketch.CSAdam(learning_rate=1e-3, compression=1.0, min_rows=1),
    }[name]()


# --------------------------------------------------------------------------- memory probes
def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss():
    import psutil

    return psutil.Process().memory_info().rss


# --------------------------------------------------------------------------- the model and data
def table_rows(n):
    return [n, max(n // 4, 1), max(n // 16, 1)]


def make_data(n, examples, seed=0):
    """Zipf ids (hot ids spread over the table by a multiplicative hash) and
    a planted binary target."""
    import numpy as np

    rng = np.random.default_rng(seed)
    xs, score = [], np.zeros(examples)
    for f, rows in enumerate(table_rows(n)):
        z = rng.zipf(1.2, size=(examples, BAG)).astype(np.int64) - 1
        ids = (z * 2654435761 + 97 * f) % rows
        # hidden per-id score, computed from the id (no table-sized array)
        hidden = np.sin(ids * 12.9898 + f * 78.233) * 43758.5453
        hidden = (hidden - np.floor(hidden)) * 2.0 - 1.0
        score += hidden.mean(axis=1)
        xs.append(ids.astype(np.int32))
    y = (score + 0.3 * rng.normal(size=examples) > 0).astype(np.float32)[:, None]
    return xs, y


def build_model(n, layer):
    import keras

    import keras_sketch

    cls = keras_sketch.layers.Embedding if layer == "ks" else keras.layers.Embedding
    inputs, pooled = [], []
    for f, rows in enumerate(table_rows(n)):
        x = keras.Input((BAG,), dtype="int32", name=f"feature{f}")
        inputs.append(x)
        pooled.append(keras.layers.GlobalAveragePooling1D()(cls(rows, DIM, name=f"table{f}")(x)))
    h = keras.layers.Concatenate()(pooled)
    h = keras.layers.Dense(256, activation="relu")(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def worker(config, n, warmup, steps, seed=0):
    """One configuration in this (fresh) process; returns a result dict."""
    import keras
    import numpy as np

    common.quiet_tf()
    opt_name, layer, _ = CONFIGS[config]
    keras.utils.set_random_seed(seed)
    xs, y = make_data(n, (warmup + steps) * BATCH, seed)
    rss_start = rss()
    model = build_model(n, layer)
    rss_model = rss()
    peak_init = _status("VmHWM")
    optimizer = make_optimizer(opt_name)
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))

    stamps = []

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    reset_peak()
    start = time.perf_counter()
    history = model.fit(xs, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[Stamp()])
    total = time.perf_counter() - start
    peak_fit = _status("VmHWM")
    step_ms = [1000 * (b - a) for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    weights = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    return dict(
        config=config, rows=n, table_rows=table_rows(n), warmup=warmup, steps=len(step_ms),
        ms_per_step=statistics.median(step_ms), ms_all=step_ms, fit_seconds=total,
        first_step_ms=1000 * (stamps[0] - start),
        rss_start=rss_start, rss_model=rss_model, peak_init=peak_init, peak_fit=peak_fit,
        rss_end=rss(), weight_bytes=weights, state_bytes=common.state_bytes(optimizer),
        loss=[float(v) for v in history.history["loss"]],
    )


def build_worker(opt_name, n):
    """Peak resident growth of ``optimizer.build`` for one n x 64 variable."""
    import keras
    import numpy as np

    common.quiet_tf()
    var = keras.Variable("zeros", shape=(n, DIM), name="table")  # one buffer, no temporary
    optimizer = make_optimizer(opt_name)
    before = rss()
    reset_peak()
    optimizer.build([var])
    peak = _status("VmHWM")
    state = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables)
    return dict(optimizer=opt_name, rows=n, state_bytes=state, build_peak_growth=peak - before)


# --------------------------------------------------------------------------- driver
def mem_available():
    """The machine's available memory (MemAvailable of /proc/meminfo), bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def mem_total():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemTotal not in /proc/meminfo")


def run_guarded(cmd, env=None, timeout=3600, limit=None, floor=FLOOR, poll=0.1):
    """Runs ``cmd`` and returns the dict of its last ``RESULT {json}`` line, or
    ``dict(error=reason, ...)``.  While it runs, its resident set and the
    machine's available memory are polled every ``poll`` seconds: it is killed
    when its resident set passes ``limit`` bytes or the available memory falls
    under ``floor`` bytes, and the reason is returned; a death by a signal
    (e.g. the kernel's OOM killer) or an error exit is returned as such."""
    import psutil

    reason, max_rss, start = None, 0, time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                now = ps.memory_info().rss
            except psutil.Error:  # exited between poll() and the read
                now = 0
            max_rss, avail = max(max_rss, now), mem_available()
            if limit and now > limit:
                reason = (f"killed by the memory guard: resident {now / GIB:.1f} GiB passed the limit "
                          f"{limit / GIB:g} GiB")
            elif avail < floor:
                reason = (f"killed by the memory guard: the machine's available memory fell to {avail / GIB:.1f} GiB "
                          f"(< {floor / GIB:g} GiB) with this run at {now / GIB:.1f} GiB resident")
            elif time.monotonic() - start > timeout:
                reason = f"killed: no result after {timeout:g} s"
            if reason:
                proc.kill()
                proc.wait()
                break
            time.sleep(poll)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = proc.returncode
    if reason is None and code < 0:
        name = signal.Signals(-code).name
        reason = f"died of {name}" + (" (most likely the kernel's OOM killer: memory ran out)" if name == "SIGKILL" else "")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if reason or code != 0 or not lines:
        tail = (stderr or stdout).strip()[-1500:]
        last = tail.splitlines()[-1] if tail else ""
        return dict(error=reason or f"exit code {code}: {last}", returncode=code, stderr_tail=tail,
                    max_rss_seen=max_rss)
    return json.loads(lines[-1][len("RESULT "):])


def run_sub(args, package_path=None, timeout=3600, limit=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
    env["PYTHONPATH"] = str(package_path or common.ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    return run_guarded(cmd, env=env, timeout=timeout, limit=limit)


def _line(pts):
    """(slope, intercept) of the line through the first and last of the (x, y) ``pts``."""
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    slope = (y1 - y0) / (x1 - x0)
    return slope, y0 - slope * x0


def predict(results, config, n):
    """Fit peak, model-creation peak and ms/step of ``config`` at ``n`` rows,
    from the line through its two largest measured sizes other than ``n``
    (None with fewer than two).  Memory grows linearly in N (tables, state,
    gradients); the time is an extrapolation, an order of magnitude only."""
    runs = sorted((r for r in results if r.get("config") == config and "peak_fit" in r and r["rows"] != n),
                  key=lambda r: r["rows"])[-2:]
    if len(runs) < 2 or runs[0]["rows"] == runs[1]["rows"]:
        return None
    at = {}
    for key in ("peak_fit", "peak_init", "ms_per_step"):
        slope, icpt = _line([(r["rows"], r[key]) for r in runs])
        at[key] = icpt + slope * n
    return dict(at, peak=max(at["peak_fit"], at["peak_init"]), from_rows=[r["rows"] for r in runs])


def run_fit(config, n, warmup, steps, known=(), limit=None):
    """One configuration at ``n`` in a guarded subprocess.  With ``limit``, a
    configuration whose predicted peak (from ``known`` results at other sizes)
    is above it, or above the memory available now, is recorded as skipped."""
    t = time.perf_counter()
    pred = predict(known, config, n)
    avail = mem_available()
    skip = None
    if pred and limit and pred["peak"] > limit:
        skip = f"does not fit: predicted {pred['peak'] / GIB:.1f} GiB > limit {limit / GIB:g} GiB"
    elif pred and pred["peak"] + FLOOR > avail:
        skip = (f"does not fit now: predicted {pred['peak'] / GIB:.1f} GiB + {FLOOR / GIB:g} GiB margin > "
                f"{avail / GIB:.1f} GiB available (other jobs' memory)")
    started = dict(load_at_start=list(os.getloadavg()), available_at_start=avail)
    if skip:
        print(f"  {config} @ {n:,}: not run, {skip}", flush=True)
        return dict(config=config, rows=n, skipped=skip, predicted=pred, limit_bytes=limit, **started)
    r = run_sub(["--worker", config, str(n), str(warmup), str(steps)], limit=limit)
    r.setdefault("config", config)
    r.setdefault("rows", n)
    r.update(started, limit_bytes=limit)
    if pred:
        r["predicted"] = pred
    if "error" in r:
        print(f"  {config} @ {n:,}: FAILED ({r['error']})", flush=True)
    else:
        print(f"  {config} @ {n:,}: {r['ms_per_step']:.1f} ms/step, fit peak {r['peak_fit'] / MIB:,.0f} MiB "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    return r


def headroom(results, sizes, cap, warmup, steps, configs, verify=True, limit=None):
    """Largest N per configuration whose fit peak stays under ``cap`` bytes:
    predicted from bytes per row (the line through the measured fit peaks),
    then, with ``verify``, run and lowered until the measured peak fits."""
    out = {}
    for config in configs:
        pts = sorted((r["rows"], r["peak_fit"]) for r in results if r["config"] == config and "peak_fit" in r)
        if len(pts) < 2:
            continue
        per_row, fixed = _line(pts)
        n = int((cap - fixed) / per_row) // 100_000 * 100_000
        tried = []
        if not verify:
            out[config] = dict(bytes_per_row=per_row, fixed_bytes=fixed, predicted_rows=max(n, 0),
                               largest_rows=n if n >= 100_000 else None, tried=[])
            continue
        while n >= 100_000 and len(tried) < 2:
            r = run_fit(config, n, warmup, steps, limit=limit)
            tried.append({k: r.get(k) for k in ("rows", "peak_fit", "ms_per_step", "error")})
            if "peak_fit" in r and r["peak_fit"] <= cap:
                break
            n = int(n * 0.9) // 100_000 * 100_000
        ok = [t for t in tried if t.get("peak_fit") is not None and t["peak_fit"] <= cap]
        out[config] = dict(bytes_per_row=per_row, fixed_bytes=fixed, predicted_rows=tried[0]["rows"] if tried else None,
                           largest_rows=ok[-1]["rows"] if ok else None, tried=tried)
    return out


def fmt_mib(b):
    return f"{b / MIB:,.0f}"


def _gib(b):
    return f"{b / GIB:.1f}"


def runs_of(res):
    """The runs that measured ``res`` (one unless sizes were added with --merge)."""
    return res.get("runs") or [dict(sizes=res["sizes"], machine=res["machine"], command=res["command"])]


def size_table(res, n):
    """What the tables at ``n`` rows need: entries in CONFIGS order, the
    reference measured there, and Keras Adam + Keras Embedding's entry (which
    may be skipped, with a prediction)."""
    rows = sorted((r for r in res["fit"] if r["rows"] == n), key=lambda r: list(CONFIGS).index(r["config"]))
    by = {r["config"]: r for r in rows if "ms_per_step" in r}
    ref = next((by[c] for c in REFERENCES + list(CONFIGS) if c in by), None)
    base = next((r for r in rows if r["config"] == BASELINE), None)
    return rows, ref, base


def init_factor(res):
    """The range, over the measured runs, of (model-creation peak - resident at start) / the largest table's bytes."""
    q = [(r["peak_init"] - r["rss_start"]) / (r["rows"] * DIM * 4) for r in res["fit"]
         if r.get("peak_init") and r.get("rss_start")]
    return f"{min(q):.2f}-{max(q):.2f}" if q else None


def not_run(r):
    return r.get("skipped") or ("failed: " + r["error"] if "error" in r else "failed")


def markdown(res):
    info, sizes = res["machine"], res["sizes"]
    runs = runs_of(res)
    if len(runs) == 1:
        machine = (f"Machine: {common.machine_line(info)}. **Shared with other agents' jobs while measured**: "
                   f"{res['warmup']} warm-up + {res['steps']} timed steps per configuration only; "
                   "times are medians, compare them as ratios within this run.")
        command = f"Command: `{res['command']}`"
    else:
        machine = (f"**Shared with other agents' jobs while measured**: {res['warmup']} warm-up + {res['steps']} "
                   "timed steps per configuration only; times are medians, compare them as ratios within one run "
                   "(one N); memory figures do not depend on the load. Measured in "
                   f"{len(runs)} runs:")
        command = "\n".join(
            f"- N = {', '.join(f'{n:,}' for n in run['sizes'])}: {common.machine_line(run['machine'])}. "
            f"Command: `{run['command']}`" + (f". {run['note'].rstrip('.')}." if run.get("note") else "") for run in runs)
    lines = [
        "## Model-level benchmark: model.fit of a recommender model (benchmarks/bench_model.py)",
        "",
        machine,
        command,
        "",
        "Model: tables of N, N/4 and N/16 rows x 64 (three categorical features, a bag of 4 Zipf(1.2) ids each, "
        "mean-pooled), MLP 256-64-1, binary cross-entropy on a planted target, batch 512; each configuration in a "
        "fresh subprocess with `TF_ENABLE_ONEDNN_OPTS=0` (see the script's docstring). *fit peak*: peak resident "
        "memory (VmHWM, reset right before `model.fit`) during `model.fit` -- optimizer build, tracing and "
        "training, plus the process, weights and data already resident. *process peak*: VmHWM of the whole "
        "process, which also counts the model's creation (Keras's `uniform` initializer holds three buffers the "
        "size of the table it fills at once, the same for every configuration"
        + (f"; measured: creation peak - resident at start = {init_factor(res)} x the largest table's bytes"
           if init_factor(res) else "") + "). Ratios: baseline / this for time (>1 = faster), "
        "this / baseline for memory (<1 = smaller); baseline = Keras Adam + keras.layers.Embedding at the same N "
        "where it runs. *predicted*: from the configuration's measured peaks (and ms/step) at the two largest "
        "smaller N, on a line (memory is linear in N; the time is an extrapolation across runs, an order of "
        "magnitude only); a configuration predicted above the memory limit is not run.",
        "",
    ]
    for n in sizes:
        rows, ref, base = size_table(res, n)
        pb = base.get("predicted") if base and "ms_per_step" not in base else None
        lines += [f"N = {n:,} rows x 64 (all tables: {sum(table_rows(n)):,} rows, "
                  f"{sum(table_rows(n)) * DIM * 4 / MIB:,.0f} MiB of weights):", ""]
        if ref is not None and ref["config"] != BASELINE:
            lines += [f"Keras Adam + keras.layers.Embedding is not measured at this N ({not_run(base) if base else 'not run'})"
                      f": ratios here are against **{CONFIGS[ref['config']][2]}**, the first that ran at this N "
                      f"in the order {' > '.join(SHORT[c] for c in REFERENCES[1:])} (then any)"
                      + (f"; *vs Keras Adam (predicted)* divides by Keras Adam + keras.layers.Embedding's predicted "
                         f"figures here ({pb['ms_per_step']:,.0f} ms/step, fit peak {_gib(pb['peak_fit'])} GiB, "
                         f"from N = {' and '.join(f'{k:,}' for k in pb['from_rows'])})" if pb else "") + ".", ""]
        pcols = bool(pb)
        lines += ["| configuration | ms/step | speed vs baseline | " + ("speed vs Keras Adam (predicted) | " if pcols else "")
                  + "fit peak MiB | vs baseline | " + ("vs Keras Adam (predicted) | " if pcols else "")
                  + "process peak MiB | optimizer state MiB |",
                  "|---|" + "---:|" * (8 if pcols else 6)]
        for r in rows:
            desc = CONFIGS[r["config"]][2]
            pred = r.get("predicted")
            if "ms_per_step" not in r:
                fit = f"{fmt_mib(pred['peak_fit'])} (predicted)" if pred else ""
                proc = f"{fmt_mib(pred['peak'])} (predicted)" if pred else ""
                ms = f"; predicted {pred['ms_per_step']:,.0f}" if pred and r["config"] == BASELINE else ""
                lines.append(f"| {desc} | not run ({not_run(r)}){ms} | | " + ("| " if pcols else "") + f"{fit} | | "
                             + ("| " if pcols else "") + f"{proc} | |")
                continue
            sp = f"{ref['ms_per_step'] / r['ms_per_step']:.2f}x" if ref else "-"
            mem = f"{r['peak_fit'] / ref['peak_fit']:.2f}x" if ref else "-"
            x = pb["ms_per_step"] / r["ms_per_step"] if pcols else 0
            psp = (f"{x:,.0f}x" if x >= 10 else f"{x:.2f}x") + " (predicted) | " if pcols else ""
            pmem = f"{r['peak_fit'] / pb['peak_fit']:.2f}x (predicted) | " if pcols else ""
            lines.append(f"| {desc} | {r['ms_per_step']:.1f} | {sp} | {psp}{fmt_mib(r['peak_fit'])} | {mem} | {pmem}"
                         f"{fmt_mib(max(r['peak_fit'], r['peak_init']))} | {fmt_mib(r['state_bytes'])} |")
        checks = [f"{CONFIGS[r['config']][2]}: {_gib(r['predicted']['peak_fit'])} predicted, {_gib(r['peak_fit'])} "
                  "measured" for r in rows if "ms_per_step" in r and r.get("predicted")]
        if checks:
            lines += ["", "Fit peak, predicted before the run vs measured (GiB): " + "; ".join(checks) + "."]
        lines.append("")
    if res.get("headroom"):
        cap = res["cap_bytes"]
        base = res["headroom"].get(BASELINE, {}).get("largest_rows")
        verified = res.get("headroom_verified", True)
        some = res.get("headroom_verified_configs")
        method = ("then the predicted N run in a subprocess (lowered by 10% until its measured fit peak fits)"
                  + (" for the rows marked *measured*; the others are predictions from the bytes per row" if some else "")
                  if verified else "extrapolated, **not** run at that size (no time on the shared machine): "
                  "a prediction from the measured bytes per row")
        lines += [f"Headroom: largest N (tables N, N/4, N/16 x 64) whose fit peak stays under {cap / 2**30:g} GiB. "
                  "Method: bytes per row from the line through the measured fit peaks at "
                  f"{' and '.join(f'{n:,}' for n in res.get('headroom_sizes', sizes))}; {method}; "
                  "N rounded down to 100k.", "",
                  f"| configuration | bytes/row (fit) | fixed MiB (fit) | predicted N | "
                  f"{'largest N measured under cap' if verified else 'largest N (predicted)'} | fit peak there MiB "
                  "| vs Keras Adam + Keras Embedding |", "|---|---:|---:|---:|---:|---:|---:|"]
        for config, h in res["headroom"].items():
            last = next((t for t in reversed(h["tried"]) if t.get("rows") == h["largest_rows"]), {})
            ratio = f"{h['largest_rows'] / base:.2f}x" if base and h["largest_rows"] else "-"
            largest = f"{h['largest_rows']:,}" if h["largest_rows"] else "none"
            if some:
                largest += " (*measured*)" if h["tried"] else " (predicted)"
            peak = fmt_mib(last["peak_fit"]) if last.get("peak_fit") else "-"
            if not h["tried"] and h["largest_rows"]:
                peak = f"{(h['fixed_bytes'] + h['bytes_per_row'] * h['largest_rows']) / MIB:,.0f} (predicted)"
            lines.append(f"| {CONFIGS[config][2]} | {h['bytes_per_row']:,.0f} | {fmt_mib(h['fixed_bytes'])} | "
                         f"{h['predicted_rows'] or 0:,} | "
                         f"{largest} | {peak} | {ratio} |")
        lines.append("")
    if res.get("build"):
        lines += ["Optimizer `build` memory: peak resident growth while `optimizer.build` creates the state of one "
                  f"{res['build_rows']:,} x 64 float32 variable (created beforehand without temporaries), against "
                  "the bytes of the state it creates. *before*: keras_sketch at "
                  f"{res.get('build_before_commit', '?')} (slots initialised with keras.initializers.Constant); "
                  "*after*: this commit (tf.fill).", "",
                  "| optimizer | state MiB | build peak growth MiB, before | after | growth / state, before | after |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, b in res["build"].items():
            after, before = b.get("after", {}), b.get("before", {})
            g = lambda d: fmt_mib(d["build_peak_growth"]) if "build_peak_growth" in d else "-"  # noqa: E731
            q = lambda d: f"{d['build_peak_growth'] / d['state_bytes']:.2f}" if "build_peak_growth" in d else "-"  # noqa: E731
            lines.append(f"| {name} | {fmt_mib(after.get('state_bytes', 0))} | {g(before)} | {g(after)} | "
                         f"{q(before)} | {q(after)} |")
        lines.append("")
    return "\n".join(lines)


def _m(n):
    return f"{n / 1e6:g}M"


def readme_table(res):
    """README.md's model-level table and the sentence introducing it."""
    runs = runs_of(res)
    loads = " and ".join(f"{run['machine']['load_average'][0]:.1f} for N = {', '.join(_m(n) for n in run['sizes'])}"
                         for run in runs if run["machine"].get("load_average"))
    refs, notes = {}, []
    for n in res["sizes"]:
        rows, ref, base = size_table(res, n)
        refs[n] = ref
        if ref is not None and ref["config"] != BASELINE:
            limit = next((r["limit_bytes"] for r in rows if r.get("limit_bytes")), None)
            notes.append(f"at N={_m(n)} Keras Adam + Keras Embedding and the other configurations marked *not run* "
                         "are predicted (*pred.*, GiB, from their peaks at the smaller N) above the "
                         + (f"{limit / GIB:g} GiB " if limit else "") + "memory limit of this "
                         f"{round(mem_total() / GIB)} GiB machine, so the ratios at N={_m(n)} are against "
                         f"{SHORT[ref['config']]} (1.0x there)")
    sentence = ("Measured (`benchmarks/bench_model.py`, RESULTS.md \"Model-level benchmark\"; `model.fit` of a "
                "recommender model with tables of N, N/4 and N/16 rows x 64 and an MLP; "
                f"{res['warmup']} warm-up + {res['steps']} timed steps per configuration on the 2-core machine shared "
                f"with other agents' jobs (load average at start {loads}), so times are rough medians; ratios against "
                "Keras Adam + `keras.layers.Embedding` in the same run" + "".join("; " + t for t in notes) + "):")
    lines = [
        textwrap.fill(sentence, width=76, break_on_hyphens=False, break_long_words=False),
        "",
        "| configuration | " + " | ".join(f"N={_m(n)}: ms/step (speed-up) | fit peak GiB (ratio)" for n in res["sizes"])
        + " |",
        "|---|" + "---:|---:|" * len(res["sizes"]),
    ]

    def speed(x):
        return f"{x:.1f}x" if x < 10 else f"{x:.0f}x"

    for config in CONFIGS:
        cells = []
        for n in res["sizes"]:
            r = next((r for r in res["fit"] if r["rows"] == n and r["config"] == config), None)
            ref = refs[n]
            if r is None:
                cells += ["-", "-"]
            elif "ms_per_step" in r:
                sp = f" ({speed(ref['ms_per_step'] / r['ms_per_step'])})" if ref else ""
                mem = f" ({r['peak_fit'] / ref['peak_fit']:.2f}x)" if ref else ""
                cells += [f"{r['ms_per_step']:,.0f}{sp}", f"{r['peak_fit'] / GIB:.2f}{mem}"]
            else:
                pred = r.get("predicted")
                word = "not run" if r.get("skipped") else "failed"
                ms = f" (pred. {pred['ms_per_step']:,.0f} ms)" if pred and config == BASELINE else ""
                cells += [word + ms, f"pred. {pred['peak_fit'] / GIB:.1f}" if pred else "-"]
        if any(c != "-" for c in cells):
            lines.append(f"| {SHORT[config]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(res, quick):
    """JSON, plot, RESULTS.md section and README table (the last two not with ``quick``)."""
    out_dir = common.RESULTS_DIR / "tmp" if quick else common.RESULTS_DIR
    text = markdown(res)
    common.save_json(out_dir / ("bench_model_quick.json" if quick else "bench_model.json"), res)
    plot(res, out_dir / "plots" / ("bench_model_quick.png" if quick else "bench_model.png"))
    if not quick:
        common.replace_section(common.RESULTS_MD, "bench_model", text)
        if README.exists() and "<!-- bench_model_table:start -->" in README.read_text():
            common.replace_section(README, "bench_model_table", readme_table(res))
    return text


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in CONFIGS if any(r["config"] == c for r in res["fit"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(res["sizes"]), 1)
    for k, n in enumerate(res["sizes"]):
        by = {r["config"]: r for r in res["fit"] if r["rows"] == n and "ms_per_step" in r}
        xs = [i + k * width for i in range(len(configs))]
        bars = axes[0].bar(xs, [by[c]["ms_per_step"] if c in by else 0 for c in configs], width, label=f"N={n:,}")
        color = bars.patches[0].get_facecolor() if bars.patches else None
        axes[1].bar(xs, [by[c]["peak_fit"] / 2**30 if c in by else 0 for c in configs], width, label=f"N={n:,}")
        pred = {r["config"]: r["predicted"] for r in res["fit"]
                if r["rows"] == n and "ms_per_step" not in r and r.get("predicted")}
        if pred:  # not run (predicted above the memory limit): outlined, hatched bars at the prediction
            axes[1].bar(xs, [pred[c]["peak_fit"] / 2**30 if c in pred else 0 for c in configs], width, fill=False,
                        hatch="//", edgecolor=color, label=f"N={n:,} predicted, not run")
    for ax, title in zip(axes, ("ms per step (median, log scale)", "peak RSS of model.fit (GiB)")):
        ax.set_xticks([i + width * (len(res["sizes"]) - 1) / 2 for i in range(len(configs))])
        ax.set_xticklabels(configs, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        if ax is axes[0]:
            ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * (8 if ax is axes[0] else 1.35))  # room for the legend
        ax.legend(fontsize=7, ncol=2, loc="upper center")
    if res.get("cap_bytes"):
        axes[1].axhline(res["cap_bytes"] / 2**30, color="k", ls="--", lw=0.8)
        axes[1].text(len(configs) - 0.5, res["cap_bytes"] / 2**30, f"headroom cap {res['cap_bytes'] / 2**30:g} GiB",
                     fontsize=7, ha="right", va="bottom")
    limits = {r["limit_bytes"] for r in res["fit"] if r.get("limit_bytes")}
    for limit in limits:
        axes[1].axhline(limit / 2**30, color="r", ls=":", lw=0.8)
        axes[1].text(len(configs) - 0.5, limit / 2**30, f"limit {limit / 2**30:g} GiB", color="r", fontsize=7,
                     ha="right", va="bottom")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command_line(argv):
    """The command that reproduces a run, shell-quoted, without ``--note`` (a remark, not a setting)."""
    argv, kept = list(argv), []
    while argv:
        arg = argv.pop(0)
        if arg == "--note":
            argv = argv[1:]
        elif not arg.startswith("--note="):
            kept.append(arg)
    return shlex.join(["python", os.path.relpath(__file__, common.ROOT)] + kept)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,4000000", help="comma-separated N (rows of the largest table)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cap-gib", type=float, default=4.0)
    p.add_argument("--no-headroom", action="store_true")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--build-rows", type=int, default=2_000_000)
    p.add_argument("--build-before", default=None,
                   help="path of a keras_sketch checkout to measure build memory 'before' (e.g. an older commit)")
    p.add_argument("--build-before-commit", default=None, help="its commit, for the report")
    p.add_argument("--verify-headroom", action="store_true",
                   help="run each configuration at its predicted largest N (else: predicted from bytes/row only)")
    p.add_argument("--from-json", default=None,
                   help="re-render a saved bench_model.json (adding the predicted headroom) without running")
    p.add_argument("--quick", action="store_true", help="write results under benchmarks/results/tmp/, no RESULTS.md")
    p.add_argument("--merge", action="store_true",
                   help="run only --sizes x --configs and merge them into the saved results (other entries kept, "
                        "re-run ones replaced; implies --no-build --no-headroom)")
    p.add_argument("--limit-gib", type=float, default=None,
                   help="memory limit: a configuration predicted above it is not run, a worker passing it is "
                        "killed (default: 85%% of the machine's memory)")
    p.add_argument("--render", action="store_true",
                   help="re-render the saved results (RESULTS.md section, plot, README table) without running")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--worker", nargs=4, metavar=("CONFIG", "N", "WARMUP", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--build-worker", nargs=2, metavar=("OPTIMIZER", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        c, n, w, s = a.worker
        print("RESULT " + json.dumps(worker(c, int(n), int(w), int(s))), flush=True)
        return
    if a.build_worker:
        print("RESULT " + json.dumps(build_worker(a.build_worker[0], int(a.build_worker[1]))), flush=True)
        return

    if a.render:
        res = common.load_json(common.RESULTS_DIR / "bench_model.json", None)
        if res is None:
            raise SystemExit(f"--render: no saved results at {common.RESULTS_DIR / 'bench_model.json'}")
        print(write_outputs(res, quick=False))
        return res

    if a.from_json:
        res = common.load_json(a.from_json, None)
        if res is None:
            raise SystemExit(f"--from-json: cannot read {a.from_json!r}")
        res["cap_bytes"] = int(a.cap_gib * 2**30)
        if "--from-json" not in res["command"]:
            res["command"] += (f"`, then `python {os.path.relpath(__file__, common.ROOT)} --from-json "
                               f"{os.path.relpath(a.from_json, common.ROOT)} --cap-gib {a.cap_gib:g}")
        res["headroom_verified"] = a.verify_headroom
        res["headroom_sizes"] = res["sizes"]
        # With --verify-headroom, the --configs are run at their predicted N (1 warm-up + 2 timed steps is
        # enough for the peak: it is reached in the first step); the others stay predicted.
        verify = [c for c in a.configs.split(",") if c] if a.verify_headroom else []
        res["headroom"] = headroom(res["fit"], res["sizes"], res["cap_bytes"], 0, 0,
                                   [c for c in CONFIGS if c not in verify], verify=False)
        if verify:
            res["headroom"].update(headroom(res["fit"], res["sizes"], res["cap_bytes"], 1, 2, verify, verify=True))
            res["headroom_verified_configs"] = verify
            res["command"] += " --verify-headroom --configs " + ",".join(verify)
        print(write_outputs(res, a.quick))
        return

    sizes = [int(s) for s in a.sizes.split(",") if s]
    configs = [c for c in a.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    if a.limit_gib is not None and a.limit_gib <= 0:
        raise SystemExit(f"--limit-gib: must be a positive number of GiB, got {a.limit_gib:g}")
    limit = int(a.limit_gib * GIB) if a.limit_gib is not None else int(0.85 * mem_total())
    out_dir = common.RESULTS_DIR / "tmp" if a.quick else common.RESULTS_DIR
    saved_path = out_dir / ("bench_model_quick.json" if a.quick else "bench_model.json")
    command = command_line(sys.argv[1:] if argv is None else argv)
    if a.merge:  # checked before TensorFlow starts
        res = common.load_json(saved_path, None)
        if res is None:
            raise SystemExit(f"--merge: no saved results to merge into at {saved_path}")
        if (res["warmup"], res["steps"]) != (a.warmup, a.steps):
            raise SystemExit(f"--merge: --warmup {a.warmup} --steps {a.steps} differ from the saved run's "
                             f"--warmup {res['warmup']} --steps {res['steps']}; use the same so every N is timed alike")
    info = common.machine_info()
    print(common.machine_line(info), flush=True)
    print(f"memory limit {limit / GIB:.1f} GiB; available now {mem_available() / GIB:.1f} GiB", flush=True)
    run = dict(sizes=sizes, configs=configs, machine=info, command=command, note=a.note, limit_bytes=limit)
    if a.merge:
        runs = runs_of(res)
        res["fit"] = [r for r in res["fit"] if not (r["rows"] in sizes and r["config"] in configs)]
        if res.get("headroom"):
            res.setdefault("headroom_sizes", res["sizes"])
        # a saved run all of whose entries are re-run now is dropped from the list
        res["runs"] = [r for r in runs if set(r["sizes"]) - set(sizes) or set(r.get("configs", CONFIGS)) - set(configs)]
        res["runs"].append(run)
        res["sizes"] = sorted(set(res["sizes"]) | set(sizes))
    else:
        res = dict(machine=info, sizes=sizes, warmup=a.warmup, steps=a.steps, command=command, fit=[], runs=[run])

    def finish():  # written after every phase, so an interrupted run keeps what it measured
        return write_outputs(res, a.quick)

    if not a.no_build and not a.merge:
        res["build_rows"], res["build"] = a.build_rows, {}
        res["build_before_commit"] = a.build_before_commit
        for opt in ("keras_adam", "csadam", "csadam_b0", "csadagrad", "lazy_adam"):
            entry = {"after": run_sub(["--build-worker", opt, str(a.build_rows)], limit=limit)}
            if a.build_before:
                entry["before"] = run_sub(["--build-worker", opt, str(a.build_rows)], package_path=a.build_before,
                                          limit=limit)
            res["build"][opt] = entry
            print(f"  build {opt}: {json.dumps({k: v.get('build_peak_growth') for k, v in entry.items()})}", flush=True)
    for n in sizes:
        print(f"N = {n:,}", flush=True)
        for c in configs:
            res["fit"].append(run_fit(c, n, a.warmup, a.steps, known=res["fit"], limit=limit))
            finish()
    if not a.no_headroom and not a.merge and len(sizes) >= 2:
        print(f"headroom at {a.cap_gib:g} GiB", flush=True)
        res["cap_bytes"] = int(a.cap_gib * 2**30)
        res["headroom_verified"] = a.verify_headroom
        res["headroom_sizes"] = sizes
        res["headroom"] = headroom(res["fit"], sizes, res["cap_bytes"], a.warmup, max(a.steps // 2, 3), configs,
                                   verify=a.verify_headroom, limit=limit)
    print("\n" + finish())
    return res


if __name__ == "__main__":
    main()
