"""Model-level benchmark: ``model.fit`` of an embedding-heavy recommender model.

    python benchmarks/bench_model.py                       # 1M and 4M rows, headroom at 4 GiB, build memory
    python benchmarks/bench_model.py --sizes 1000000 --no-headroom --no-build --quick   # a smoke run

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

Build memory (``--build``): peak resident growth while ``optimizer.build``
creates the state of a 4M x 64 variable created beforehand without any
temporary, against the state's bytes.  ``--package-path`` runs it with
another checkout of keras_sketch (to measure a "before").

Writes benchmarks/results/bench_model.json, benchmarks/results/plots/
bench_model.png and the ``bench_model`` section of benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
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
MIB = 2**20


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
def run_sub(args, package_path=None, timeout=3600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
    env["PYTHONPATH"] = str(package_path or common.ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return dict(error=(out.stderr or out.stdout)[-1500:], returncode=out.returncode)
    return json.loads(lines[-1][len("RESULT "):])


def run_fit(config, n, warmup, steps):
    t = time.perf_counter()
    r = run_sub(["--worker", config, str(n), str(warmup), str(steps)])
    r.setdefault("config", config)
    r.setdefault("rows", n)
    if "error" in r:
        print(f"  {config} @ {n:,}: FAILED ({r['error'].strip().splitlines()[-1:]})", flush=True)
    else:
        print(f"  {config} @ {n:,}: {r['ms_per_step']:.1f} ms/step, fit peak {r['peak_fit'] / MIB:,.0f} MiB "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    return r


def headroom(results, sizes, cap, warmup, steps, configs, verify=True):
    """Largest N per configuration whose fit peak stays under ``cap`` bytes:
    predicted from bytes per row (the line through the measured fit peaks),
    then, with ``verify``, run and lowered until the measured peak fits."""
    out = {}
    for config in configs:
        pts = sorted((r["rows"], r["peak_fit"]) for r in results if r["config"] == config and "peak_fit" in r)
        if len(pts) < 2:
            continue
        (n0, p0), (n1, p1) = pts[0], pts[-1]
        per_row = (p1 - p0) / (n1 - n0)
        fixed = p0 - per_row * n0
        n = int((cap - fixed) / per_row) // 100_000 * 100_000
        tried = []
        if not verify:
            out[config] = dict(bytes_per_row=per_row, fixed_bytes=fixed, predicted_rows=max(n, 0),
                               largest_rows=n if n >= 100_000 else None, tried=[])
            continue
        while n >= 100_000 and len(tried) < 2:
            r = run_fit(config, n, warmup, steps)
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


def markdown(res):
    info, sizes = res["machine"], res["sizes"]
    lines = [
        "## Model-level benchmark: model.fit of a recommender model (benchmarks/bench_model.py)",
        "",
        f"Machine: {common.machine_line(info)}. **Shared with other agents' jobs while measured**: "
        f"{res['warmup']} warm-up + {res['steps']} timed steps per configuration only; "
        "times are medians, compare them as ratios within this run.",
        f"Command: `{res['command']}`",
        "",
        "Model: tables of N, N/4 and N/16 rows x 64 (three categorical features, a bag of 4 Zipf(1.2) ids each, "
        "mean-pooled), MLP 256-64-1, binary cross-entropy on a planted target, batch 512; each configuration in a "
        "fresh subprocess with `TF_ENABLE_ONEDNN_OPTS=0` (see the script's docstring). *fit peak*: peak resident "
        "memory (VmHWM, reset right before `model.fit`) during `model.fit` -- optimizer build, tracing and "
        "training, plus the process, weights and data already resident. *process peak*: VmHWM of the whole "
        "process, which also counts the model's creation (Keras's `uniform` initializer holds three table-sized "
        "buffers at once, the same for every configuration). Ratios: baseline / this for time (>1 = faster), "
        "this / baseline for memory (<1 = smaller); baseline = Keras Adam + keras.layers.Embedding at the same N.",
        "",
    ]
    for n in sizes:
        rows = [r for r in res["fit"] if r["rows"] == n]
        base = next((r for r in rows if r["config"] == BASELINE and "ms_per_step" in r), None)
        lines += [f"N = {n:,} rows x 64 (all tables: {sum(table_rows(n)):,} rows, "
                  f"{sum(table_rows(n)) * DIM * 4 / MIB:,.0f} MiB of weights):", "",
                  "| configuration | ms/step | speed vs baseline | fit peak MiB | vs baseline | process peak MiB | "
                  "optimizer state MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            desc = CONFIGS[r["config"]][2]
            if "ms_per_step" not in r:
                lines.append(f"| {desc} | failed | | | | | |")
                continue
            sp = f"{base['ms_per_step'] / r['ms_per_step']:.2f}x" if base else "-"
            mem = f"{r['peak_fit'] / base['peak_fit']:.2f}x" if base else "-"
            lines.append(f"| {desc} | {r['ms_per_step']:.1f} | {sp} | {fmt_mib(r['peak_fit'])} | {mem} | "
                         f"{fmt_mib(max(r['peak_fit'], r['peak_init']))} | {fmt_mib(r['state_bytes'])} |")
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
                  f"{' and '.join(f'{n:,}' for n in sizes)}; {method}; N rounded down to 100k.", "",
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
        axes[0].bar(xs, [by[c]["ms_per_step"] if c in by else 0 for c in configs], width, label=f"N={n:,}")
        axes[1].bar(xs, [by[c]["peak_fit"] / 2**30 if c in by else 0 for c in configs], width, label=f"N={n:,}")
    for ax, title in zip(axes, ("ms per step (median, log scale)", "peak RSS of model.fit (GiB)")):
        ax.set_xticks([i + width * (len(res["sizes"]) - 1) / 2 for i in range(len(configs))])
        ax.set_xticklabels(configs, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    if res.get("cap_bytes"):
        axes[1].axhline(res["cap_bytes"] / 2**30, color="k", ls="--", lw=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
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
    p.add_argument("--worker", nargs=4, metavar=("CONFIG", "N", "WARMUP", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--build-worker", nargs=2, metavar=("OPTIMIZER", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        c, n, w, s = a.worker
        print("RESULT " + json.dumps(worker(c, int(n), int(w), int(s))), flush=True)
        return
    if a.build_worker:
        print("RESULT " + json.dumps(build_worker(a.build_worker[0], int(a.build_worker[1]))), flush=True)
        return

    if a.from_json:
        res = common.load_json(a.from_json, None)
        if res is None:
            raise SystemExit(f"--from-json: cannot read {a.from_json!r}")
        res["cap_bytes"] = int(a.cap_gib * 2**30)
        if "--from-json" not in res["command"]:
            res["command"] += (f"`, then `python {os.path.relpath(__file__, common.ROOT)} --from-json "
                               f"{os.path.relpath(a.from_json, common.ROOT)} --cap-gib {a.cap_gib:g}")
        res["headroom_verified"] = a.verify_headroom
        # With --verify-headroom, the --configs are run at their predicted N (1 warm-up + 2 timed steps is
        # enough for the peak: it is reached in the first step); the others stay predicted.
        verify = [c for c in a.configs.split(",") if c] if a.verify_headroom else []
        res["headroom"] = headroom(res["fit"], res["sizes"], res["cap_bytes"], 0, 0,
                                   [c for c in CONFIGS if c not in verify], verify=False)
        if verify:
            res["headroom"].update(headroom(res["fit"], res["sizes"], res["cap_bytes"], 1, 2, verify, verify=True))
            res["headroom_verified_configs"] = verify
            res["command"] += " --verify-headroom --configs " + ",".join(verify)
        text = markdown(res)
        out_dir = common.RESULTS_DIR / "tmp" if a.quick else common.RESULTS_DIR
        common.save_json(out_dir / ("bench_model_quick.json" if a.quick else "bench_model.json"), res)
        plot(res, out_dir / "plots" / ("bench_model_quick.png" if a.quick else "bench_model.png"))
        if not a.quick:
            common.replace_section(common.RESULTS_MD, "bench_model", text)
        print(text)
        return

    sizes = [int(s) for s in a.sizes.split(",") if s]
    configs = [c for c in a.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    info = common.machine_info()
    print(common.machine_line(info), flush=True)
    res = dict(machine=info, sizes=sizes, warmup=a.warmup, steps=a.steps, command="python " + " ".join(
        [os.path.relpath(__file__, common.ROOT)] + sys.argv[1:]), fit=[])
    out_dir = common.RESULTS_DIR / "tmp" if a.quick else common.RESULTS_DIR

    def finish():  # written after every phase, so an interrupted run keeps what it measured
        text = markdown(res)
        common.save_json(out_dir / ("bench_model_quick.json" if a.quick else "bench_model.json"), res)
        plot(res, out_dir / "plots" / ("bench_model_quick.png" if a.quick else "bench_model.png"))
        if not a.quick:
            common.replace_section(common.RESULTS_MD, "bench_model", text)
        return text

    if not a.no_build:
        res["build_rows"], res["build"] = a.build_rows, {}
        res["build_before_commit"] = a.build_before_commit
        for opt in ("keras_adam", "csadam", "csadam_b0", "csadagrad", "lazy_adam"):
            entry = {"after": run_sub(["--build-worker", opt, str(a.build_rows)])}
            if a.build_before:
                entry["before"] = run_sub(["--build-worker", opt, str(a.build_rows)], package_path=a.build_before)
            res["build"][opt] = entry
            print(f"  build {opt}: {json.dumps({k: v.get('build_peak_growth') for k, v in entry.items()})}", flush=True)
    for n in sizes:
        print(f"N = {n:,}", flush=True)
        for c in configs:
            res["fit"].append(run_fit(c, n, a.warmup, a.steps))
        finish()
    if not a.no_headroom and len(sizes) >= 2:
        print(f"headroom at {a.cap_gib:g} GiB", flush=True)
        res["cap_bytes"] = int(a.cap_gib * 2**30)
        res["headroom_verified"] = a.verify_headroom
        res["headroom"] = headroom(res["fit"], sizes, res["cap_bytes"], a.warmup, max(a.steps // 2, 3), configs,
                                   verify=a.verify_headroom)
    print("\n" + finish())


if __name__ == "__main__":
    main()
