"""The benchmark suite: memory, quality and speed of the sketched optimizers.

    python benchmarks/run_all.py            # full run (~25 min on 2 shared cores, quality reuses the defaults study)
    python benchmarks/run_all.py --quick    # everything tiny, 1-2 minutes (run by tests/test_benchmarks_quick.py)
    python benchmarks/run_all.py --sections memory,speed

Writes benchmarks/results/{memory,quality,speed}.json and plots under
benchmarks/results/plots/ (``--quick``: *_quick files under the git-ignored benchmarks/results/tmp/), and the ``run_all`` section of
benchmarks/RESULTS.md (not in ``--quick`` mode unless ``--markdown``).

* Memory: optimizer-state bytes of the paper's WikiText-2 model (Table 4:
  vocabulary 33,278, embedding 672, 2 x LSTM 672, full softmax) for every
  optimizer, as a ratio to Keras Adam, at compression 0.2 and 0.05 -- read from
  the optimizers' memory reports after ``build`` (no training needed) -- and the
  peak resident memory (ru_maxrss) of a process that trains that model for a
  few steps with each optimizer.
* Quality: test perplexity after the same number of steps (the defaults
  study's LM: WikiText-2 validation split for training, test split for the
  perplexity; see docs/benchmarks.md) for Adam, CSAdam-V, CSAdam-MV, SM3 and
  Adafactor at compression 0.2 and 0.05; every optimizer gets the same
  learning-rate grid and reports its best; ratio to Adam, against the issue's
  targets.
* Speed: step time of one optimizer update on a sparse 1M x 64 embedding
  (4096 Zipf ids per step) and on a dense 4096 x 4096 kernel, inside a
  tf.function, median over repeats, ratio to Keras Adam in the same run; the
  sketched optimizers with the fused op (when it loaded) and with the pure-TF
  path (``fused=False``).
"""

import argparse
import os
import resource
import subprocess
import sys
import time

import common

PLOTS = common.RESULTS_DIR / "plots"
PAPER_LM = dict(vocab=33278, embed=672, hidden=672, layers=2, batch=20, bptt=35)
QUICK_LM = dict(vocab=2000, embed=32, hidden=32, layers=1, batch=8, bptt=10)


# --------------------------------------------------------------------------- optimizers
MEMORY_CONFIGS = {  # row -> (harness optimizer name, arguments; "c": the table's compression, class axis sketched)
    "Adam (keras)": ("adam", {}),
    "CSAdam() default (hash_axis='first': no class axis)": ("csadam", {"hash_axis": "first", "compression": None}),
    "CSAdam-MV (sketched m and v)": ("csadam-mv", "c"),
    "CSAdam-V (exact m, sketched v)": ("csadam", "c"),
    "CSAdam no 1st moment (beta_1=0)": ("csadam-v0", "c"),
    "CSAdagrad": ("csadagrad", "c"),
    "CSRMSprop": ("csrmsprop", "c"),
    "SM3 (momentum 0.9)": ("sm3", {"momentum": 0.9, "beta_2": 0.999}),
    "SM3 (no momentum)": ("sm3", {}),
    "Adafactor (keras)": ("adafactor", {}),
}


def optimizer_specs(compression):
    """name -> factory(lr) for the memory table (lr irrelevant there)."""

    def factory(name, kwargs):
        if kwargs == "c":  # the paper's setting: class axis sketched too
            kwargs = dict(compression=compression, hash_axis="auto")
        kwargs = {k: (compression if v is None else v) for k, v in kwargs.items()}
        return lambda lr: common.make_optimizer(name, lr, **kwargs)

    return {row: factory(name, kwargs) for row, (name, kwargs) in MEMORY_CONFIGS.items()}


# --------------------------------------------------------------------------- memory
def memory_section(quick):
    import keras

    size = QUICK_LM if quick else PAPER_LM
    min_rows = 256 if quick else 4096
    out = {"model": size, "min_rows": min_rows, "state": {}, "peak_rss": {}}
    keras.utils.set_random_seed(0)
    model = common.build_lm(size["vocab"], size["embed"], size["hidden"], layers=size["layers"], steps=size["bptt"])
    params = sum(int(v.numpy().size) for v in model.trainable_variables)
    out["parameters"] = params
    for compression in (0.2, 0.05):
        rows = {}
        for name, make in optimizer_specs(compression).items():
            opt = make(1e-3)
            if hasattr(opt, "min_rows"):
                opt.min_rows = min_rows
            opt.build(model.trainable_variables)
            rows[name] = common.state_bytes(opt)
        out["state"][str(compression)] = rows
        base = rows["Adam (keras)"]
        for name, b in rows.items():
            print(f"memory c={compression:<5} {name:<42} {b:>14,} B  {b / base:6.3f} x Adam", flush=True)
    # Peak resident memory of a short training run, one fresh process per optimizer.
    steps = 2 if quick else 4
    names = list(optimizer_specs(0.2))
    for name in names[:2] if quick else names:  # --quick: Adam and CSAdam() only
        cmd = [sys.executable, __file__, "--peak-child", name, "--peak-steps", str(steps)] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_RSS_KB")]
        if proc.returncode or not line:
            print(f"peak-rss {name}: child failed:\n{proc.stderr[-2000:]}", flush=True)
            out["peak_rss"][name] = None
            continue
        kb, seconds = line[-1].split()[1:3]
        out["peak_rss"][name] = {"bytes": int(kb) * 1024, "seconds": float(seconds)}
        print(f"peak-rss {name:<42} {int(kb) / 1024:9.1f} MiB", flush=True)
    out["peak_rss_steps"] = steps
    return out


def peak_child(name, steps, quick):
    """Trains the memory model for ``steps`` steps; prints the peak RSS."""
    common.quiet_tf()
    import keras
    import numpy as np

    size = QUICK_LM if quick else PAPER_LM
    keras.utils.set_random_seed(0)
    model = common.build_lm(size["vocab"], size["embed"], size["hidden"], layers=size["layers"], dropout=0.5,
                            steps=size["bptt"])
    opt = optimizer_specs(0.2)[name](1e-3)
    if hasattr(opt, "min_rows") and quick:
        opt.min_rows = 256
    model.compile(optimizer=opt, loss=common.lm_loss())
    rng = np.random.default_rng(0)
    n = size["batch"] * steps
    x = rng.integers(0, size["vocab"], (n, size["bptt"])).astype("int32")
    y = rng.integers(0, size["vocab"], (n, size["bptt"])).astype("int32")
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=size["batch"], epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - t0
    print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {seconds:.2f}", flush=True)


# --------------------------------------------------------------------------- quality
QUALITY_CONFIGS = {
    # name: (compression or None, factory kind)
    "Adam (keras)": (None, "adam"),
    "CSAdam() default, hash_axis='first', c=0.2": (0.2, "v_first"),
    "CSAdam-V c=0.2": (0.2, "v"),
    "CSAdam-MV c=0.2": (0.2, "mv"),
    "CSAdam-V c=0.05": (0.05, "v"),
    "CSAdam-MV c=0.05": (0.05, "mv"),
    "SM3 (momentum 0.9, beta_2 0.999)": (None, "sm3"),
    "Adafactor (keras)": (None, "adafactor"),
}
TARGETS = {"CSAdam-V c=0.2": 1.01, "CSAdam-MV c=0.2": 1.02, "CSAdam-V c=0.05": 1.05, "CSAdam-MV c=0.05": 1.05}
# Runs of benchmarks/defaults_study.py at the same settings are the same runs.
FROM_STUDY = {"Adam (keras)": "adam", "CSAdam-V c=0.2": "default", "CSAdam-MV c=0.2": "cs_mv",
              "CSAdam() default, hash_axis='first', c=0.2": "emb_only"}


def quality_factory(kind, compression, lr, clipnorm):
    if kind in ("adam", "adafactor"):
        return lambda: common.make_optimizer(kind, lr, clipnorm=clipnorm)
    if kind == "sm3":
        return lambda: common.make_optimizer("sm3", lr, clipnorm=clipnorm, momentum=0.9, beta_2=0.999)
    # CSAdam-V / -MV rows sketch the class axis too (hash_axis="auto", the paper's setting); "v_first" is
    # CSAdam()'s default layout (rows only).
    name = "csadam-mv" if kind == "mv" else "csadam"
    axis = "first" if kind == "v_first" else "auto"
    return lambda: common.make_optimizer(name, lr, clipnorm=clipnorm, compression=compression, hash_axis=axis)


def quality_section(quick, out_path):
    if quick:
        s = dict(epochs=1, max_train_tokens=6000, max_test_tokens=3000, vocab=500, embed=16, hidden=16, batch=32,
                 bptt=35, clipnorm=1.0, seed=0)
        grid, start, configs = [2e-3, 4e-3], (2e-3, 4e-3), ["Adam (keras)", "CSAdam-MV c=0.05"]
    else:
        s = dict(epochs=2, max_train_tokens=120_000, max_test_tokens=60_000, vocab=10_000, embed=128, hidden=128,
                 batch=32, bptt=35, clipnorm=1.0, seed=0)
        # The study's grid, extended upward: Adafactor's step is relative to the parameters' RMS, so its best
        # learning rate is far larger; the walk stops once a best is bracketed, so others never go there.
        grid = common.LR_GRID + [0.128, 0.256, 0.512]
        start, configs = common.LR_START, list(QUALITY_CONFIGS)
    if quick:
        s["min_rows"] = 256
    results = common.load_json(out_path, {})
    if results.get("settings") != s:
        results = {"settings": s, "runs": {}}
    results["grid"], results["start"] = grid, list(start)
    study = common.load_json(common.RESULTS_DIR / "defaults_study.json", {})
    study_settings = {k: v for k, v in study.get("settings", {}).items() if k not in ("grid", "start")}
    data = common.lm_data(s["max_train_tokens"], s["max_test_tokens"], s["vocab"], s["batch"], s["bptt"])
    results["data"] = data["desc"]
    for name in configs:
        compression, kind = QUALITY_CONFIGS[name]
        runs = results["runs"].setdefault(name, {})
        if not quick and study_settings == s and name in FROM_STUDY:
            for lr, r in study.get("runs", {}).get(FROM_STUDY[name], {}).items():
                runs.setdefault(lr, dict(r, source="defaults_study"))

        def ppl_of(lr, name=name, kind=kind, compression=compression, runs=runs):
            key = repr(lr)
            if key not in runs:
                make = quality_factory(kind, compression, lr, s["clipnorm"])
                if quick and kind in ("v", "mv", "v_first"):
                    inner = make
                    make = lambda inner=inner: _with_min_rows(inner(), s["min_rows"])  # noqa: E731
                runs[key] = common.train_lm(make, data, s["embed"], s["hidden"], batch=s["batch"], bptt=s["bptt"],
                                            epochs=s["epochs"], seed=s["seed"])
                common.save_json(out_path, results)
            r = runs[key]
            print(f"quality {name:<34} lr {lr:<7g} test ppl {r['test_ppl']:8.1f}  state {r['state_bytes']:>11,} B",
                  flush=True)
            return r["test_ppl"]

        common.adaptive_rates(ppl_of, grid, start)
    common.save_json(out_path, results)
    return results


def _with_min_rows(opt, min_rows):
    opt.min_rows = min_rows
    return opt


def best_run(runs):
    lr = min(runs, key=lambda k: runs[k]["test_ppl"])
    return float(lr), runs[lr]


# --------------------------------------------------------------------------- speed
def speed_section(quick, repeats):
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_sketch import fused as fused_mod

    fused_ok = fused_mod.load() is not None
    rows, dim, k, n = (100_000, 16, 512, 512) if quick else (1_000_000, 64, 4096, 4096)
    min_rows = 256 if quick else 4096
    cs = {"CSAdam-V (default)": "csadam", "CSAdam-MV": "csadam-mv", "CSAdam beta_1=0": "csadam-v0",
          "CSAdagrad": "csadagrad", "CSRMSprop": "csrmsprop"}
    cases = {"Adam (keras)": lambda: common.make_optimizer("adam", 1e-3)}
    for label, name in cs.items():
        make = lambda f, name=name: common.make_optimizer(name, 1e-3, fused=f, min_rows=min_rows)  # noqa: E731
        if fused_ok:
            cases[f"{label}, fused op"] = lambda make=make: make(True)
        cases[f"{label}, pure TF"] = lambda make=make: make(False)
    cases["SM3"] = lambda: common.make_optimizer("sm3", 1e-3)
    cases["Adafactor (keras)"] = lambda: common.make_optimizer("adafactor", 1e-3)

    rng = np.random.default_rng(0)
    ids = ((rng.zipf(1.2, size=k) - 1) % rows).astype("int64")
    sparse_grad = tf.IndexedSlices(tf.constant(rng.normal(size=(k, dim)).astype("float32")), tf.constant(ids),
                                   tf.constant([rows, dim], tf.int64))
    sparse_init = (rng.normal(size=(rows, dim)) * 0.01).astype("float32")
    dense_grad = tf.constant(rng.normal(size=(n, n)).astype("float32"))
    dense_init = (rng.normal(size=(n, n)) * 0.01).astype("float32")
    out = {"sparse": {}, "dense": {}, "fused_op_loaded": fused_ok, "repeats": repeats,
           "sparse_case": f"{rows} x {dim} embedding, {k} Zipf(1.2) ids/step ({len(np.unique(ids))} unique)",
           "dense_case": f"{n} x {n} kernel"}
    for case, init, grad in (("sparse", sparse_init, sparse_grad), ("dense", dense_init, dense_grad)):
        for name, make in cases.items():
            var = keras.Variable(init)
            opt = make()
            step = _apply_step(opt, var, grad)
            out[case][name] = common.median_time(lambda: step().numpy(), repeats, warmup=2)
            print(f"speed {case:<6} {name:<32} {out[case][name] * 1e3:10.2f} ms", flush=True)
            del var, opt
    return out


def _apply_step(opt, var, grad):
    import tensorflow as tf

    opt.build([var])

    @tf.function
    def step():
        opt.apply([grad], [var])
        return tf.constant(0)  # a tensor result makes the call wait for the step

    return step


# --------------------------------------------------------------------------- report
def markdown(info, mem, qual, speed, command):
    lines = ["## Benchmark suite (benchmarks/run_all.py)", "", f"Machine: {common.machine_line(info)}.",
             f"Command: `{command}`. Seeds: 0 everywhere.", ""]
    if mem:
        m = mem["model"]
        lines += [
            "### Memory",
            "",
            f"Optimizer-state bytes of the paper's WikiText-2 model (vocabulary {m['vocab']:,}, embedding {m['embed']}, "
            f"{m['layers']} x LSTM {m['hidden']}, full softmax; {mem['parameters']:,} parameters), from the "
            f"optimizers' memory reports after `build`; min_rows {mem['min_rows']}. Peak RSS: a fresh process "
            f"training that model for {mem['peak_rss_steps']} steps (batch {m['batch']}, BPTT {m['bptt']}) with the "
            "optimizer at c=0.2 (includes TensorFlow itself, about the same for all).",
            "",
            "| optimizer | state bytes c=0.2 | vs Adam | state bytes c=0.05 | vs Adam | peak RSS (MiB) | vs Adam |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        a2, a5 = mem["state"]["0.2"]["Adam (keras)"], mem["state"]["0.05"]["Adam (keras)"]
        pa = (mem["peak_rss"].get("Adam (keras)") or {}).get("bytes")
        for name, b in mem["state"]["0.2"].items():
            b5 = mem["state"]["0.05"][name]
            p = (mem["peak_rss"].get(name) or {}).get("bytes")
            lines.append(f"| {name} | {b:,} | {b / a2:.3f} | {b5:,} | {b5 / a5:.3f} | "
                         f"{p / 2**20 if p else float('nan'):.0f} | {p / pa if p and pa else float('nan'):.3f} |")
        lines.append("")
    if qual:
        s = qual["settings"]
        base_lr, base = best_run(qual["runs"]["Adam (keras)"])
        lines += [
            "### Quality",
            "",
            f"Test perplexity after the same number of steps: {qual['data']}; Embedding {s['embed']} -> LSTM "
            f"{s['hidden']} -> Dense(vocab), batch {s['batch']}, BPTT {s['bptt']}, clipnorm {s['clipnorm']}, "
            f"{s['epochs']} epochs ({base['steps']} steps). Learning-rate grid {qual['grid']}, walked from "
            f"{qual['start']} toward the better side; best per optimizer. Ratio to Adam's best.",
            "",
            "| optimizer | state / Adam | best lr | test ppl at each lr | best ppl | vs Adam | target | met? | "
            "at Adam's best lr, vs Adam |",
            "|---|---:|---:|---|---:|---:|---:|---|---:|",
        ]
        for name, runs in qual["runs"].items():
            lr, r = best_run(runs)
            per = ", ".join(f"{float(k):g}: {v['test_ppl']:.1f}" for k, v in sorted(runs.items(), key=lambda t: float(t[0])))
            ratio = r["test_ppl"] / base["test_ppl"]
            tgt = TARGETS.get(name)
            met = "" if tgt is None else ("yes" if ratio <= tgt else f"no, missed by {100 * (ratio - tgt):.1f} points")
            at_base = runs.get(repr(base_lr))
            fixed = f"{at_base['test_ppl'] / base['test_ppl']:.3f}" if at_base else "-"
            lines.append(f"| {name} | {r['state_bytes'] / base['state_bytes']:.3f} | {lr:g} | {per} | "
                         f"{r['test_ppl']:.1f} | {ratio:.3f} | {'' if tgt is None else f'<= {tgt:.2f}'} | {met} | "
                         f"{fixed} |")
        lines.append("")
    if speed:
        lines += [
            "### Speed",
            "",
            f"One optimizer step inside a tf.function, median of {speed['repeats']} (after 2 warm-up steps); "
            f"sparse: {speed['sparse_case']}; dense: {speed['dense_case']}. Ratio = this time / Keras Adam's time "
            f"in the same run (< 1 is faster). Fused op loaded: {speed['fused_op_loaded']}.",
            "",
            "| optimizer | sparse ms | vs Adam | dense ms | vs Adam |",
            "|---|---:|---:|---:|---:|",
        ]
        sa, da = speed["sparse"]["Adam (keras)"], speed["dense"]["Adam (keras)"]
        for name in speed["sparse"]:
            sp, de = speed["sparse"][name], speed["dense"][name]
            lines.append(f"| {name} | {sp * 1e3:.2f} | {sp / sa:.3f} | {de * 1e3:.2f} | {de / da:.3f} |")
        lines.append("")
    lines.append("Plots: benchmarks/results/plots/ (memory.png, quality.png, speed.png).")
    return "\n".join(lines)


def _paired_bars(ax, groups):
    """Horizontal bars, one colour per group, each value / the group's Keras Adam."""
    names = list(next(iter(groups.values())))
    for i, (label, values) in enumerate(groups.items()):
        base = values["Adam (keras)"]
        ax.barh([j + 0.4 * i for j in range(len(names))], [values[n] / base for n in names], 0.4, label=label)
    ax.set_yticks([j + 0.2 for j in range(len(names))], names, fontsize=7)
    ax.legend()


def plots(mem, qual, speed, suffix="", folder=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = folder or PLOTS
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    if mem:
        fig, ax = plt.subplots(figsize=(8, 4))
        _paired_bars(ax, {f"compression {c}": mem["state"][c] for c in ("0.2", "0.05")})
        ax.set_xlabel("optimizer-state bytes / Keras Adam")
        fig.tight_layout()
        made.append(folder / f"memory{suffix}.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    if qual:
        base = best_run(qual["runs"]["Adam (keras)"])[1]["test_ppl"]
        names = list(qual["runs"])
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh(names, [best_run(qual["runs"][n])[1]["test_ppl"] / base for n in names])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("best test perplexity / Adam")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        made.append(folder / f"quality{suffix}.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    if speed:
        fig, ax = plt.subplots(figsize=(8, 5))
        _paired_bars(ax, {case: speed[case] for case in ("sparse", "dense")})
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("step time / Keras Adam (log scale)")
        fig.tight_layout()
        made.append(folder / f"speed{suffix}.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sections", default="memory,quality,speed",
                   help="sections to run; the others come from their stored JSON ('none': just the report)")
    p.add_argument("--repeats", type=int, default=0, help="speed repeats (0: 7, or 3 with --quick)")
    p.add_argument("--markdown", action="store_true", help="write RESULTS.md even with --quick")
    p.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peak-steps", type=int, default=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.peak_child:
        return peak_child(a.peak_child, a.peak_steps, a.quick)
    common.quiet_tf()
    info = common.machine_info()
    print(common.machine_line(info), flush=True)
    sections = a.sections.split(",")
    suffix = "_quick" if a.quick else ""
    command = " ".join(["python benchmarks/run_all.py"] + list(argv if argv is not None else sys.argv[1:]))
    out_dir = common.RESULTS_DIR / "tmp" if a.quick else common.RESULTS_DIR  # results/tmp/ is git-ignored
    path = {s: out_dir / f"{s}{suffix}.json" for s in ("memory", "quality", "speed")}
    mem = qual = speed = None
    if "memory" in sections:
        mem = memory_section(a.quick)
        common.save_json(path["memory"], dict(mem, machine=info, command=command))
    if "quality" in sections:
        qual = quality_section(a.quick, path["quality"])
        qual.update(machine=info, command=command)
        common.save_json(path["quality"], qual)
    if "speed" in sections:
        speed = speed_section(a.quick, a.repeats or (3 if a.quick else 7))
        common.save_json(path["speed"], dict(speed, machine=info, command=command))
    # Sections not run this time come from their stored JSON (full runs only).
    if not a.quick:
        mem = mem or common.load_json(path["memory"], None)
        qual = qual or common.load_json(path["quality"], None)
        speed = speed or common.load_json(path["speed"], None)
    ran = [x for x in sections if x in ("memory", "quality", "speed")]
    if not ran and not a.quick:  # report only: machine and command of the stored run
        stored = next((x for x in (mem, qual, speed) if x), {})
        info, command = stored.get("machine", info), stored.get("command", command)
    text = markdown(info, mem, qual, speed, command)
    print("\n" + text)
    made = plots(mem, qual, speed, suffix, out_dir / "plots" if a.quick else PLOTS)
    print("plots: " + ", ".join(str(m) for m in made))
    if not a.quick or a.markdown:
        common.replace_section(common.RESULTS_MD, "run_all", text)
    return dict(memory=mem, quality=qual, speed=speed, markdown=text, plots=made)


if __name__ == "__main__":
    main()
