"""Defaults study: which sketch settings should ``CSAdam()`` use by default?

Every configuration trains the same WikiText-2 LSTM language model (train on
the WikiText-2 *validation* split, test perplexity on the *test* split: the
training split is not on disk) from the same seed, with the same learning-rate
grid.  A fixed learning rate flatters or punishes the sketches (a sketched 2nd
moment over-estimates v, which damps the step like a smaller learning rate),
so each configuration reports its best test perplexity over the grid.

The grid is walked adaptively: every configuration runs the two middle rates
first, then extends toward the better side until the best is bracketed or the
grid ends (a unimodal curve gives the same best as the full grid for fewer
runs); ``--full-grid`` runs every rate.

A second part checks a *dense* layer: linear regression with a 4000 x 16
weight (the core issue's NumPy experiment, where a sketched 1st moment of a
dense gradient diverged at 5x), with every row sketched (``min_rows=0``).

    python benchmarks/defaults_study.py                  # ~30 min on 2 shared cores
    python benchmarks/defaults_study.py --quick          # seconds, for the tests
    python benchmarks/defaults_study.py --report-only    # table from the stored JSON

Writes benchmarks/results/defaults_study.json (resumable: finished runs are
reused when the settings match) and a section of benchmarks/RESULTS.md.
"""

import argparse
import math
import sys

import common

# name -> (description, kwargs for CSAdam, or "adam"/"adam_b0" for Keras Adam)
CONFIGS = {
    "adam": ("keras Adam (baseline)", "adam"),
    "exact_lazy": ("CSAdam, nothing sketched (min_rows=1e9): exact lazy Adam", dict(min_rows=10**9)),
    # "default" is CSAdam()'s default when the study ran (hash_axis="auto"); since then the default is
    # hash_axis="first", the "emb_only" row.  Every row names its hash_axis so reruns measure the same thing.
    "default": ("CSAdam, hash_axis='auto' (the default when this ran): exact m, count-min v, depth 1, c=0.2, "
                "embedding rows + softmax class axis", dict(hash_axis="auto")),
    "depth3": ("as `default`, depth 3 (equal memory)", dict(depth=3, hash_axis="auto")),
    "emb_only": ("hash_axis='first' (the default now): only the embedding sketched (softmax kernel: 128 rows, exact)",
                 dict(hash_axis="first")),
    "c05": ("as `default`, compression 0.5 (embedding and class axis)", dict(compression=0.5, hash_axis="auto")),
    "cleaning": ("as `default` + cleaning x0.5 every 50 steps",
                 dict(cleaning_factor=0.5, cleaning_interval=50, hash_axis="auto")),
    "cs_mv": ("count-sketch m + count-min v (paper's CS-MV), c=0.2, depth 1, hash_axis='auto'",
              dict(first_moment="sketch", hash_axis="auto")),
    "adam_b0": ("keras Adam, beta_1=0 (baseline of the no-1st-moment rows)", "adam_b0"),
    "b0": ("CSAdam beta_1=0 (no m), count-min v c=0.2 depth 1, hash_axis='auto'", dict(beta_1=0.0, hash_axis="auto")),
    "b0_c06": ("CSAdam beta_1=0, count-min v c=0.6 (3x the width of b0), hash_axis='auto'",
               dict(beta_1=0.0, compression=0.6, hash_axis="auto")),
    "b0_emb_only": ("CSAdam beta_1=0, only the embedding sketched", dict(beta_1=0.0, hash_axis="first")),
}
GRID = common.LR_GRID
START = common.LR_START  # the walk starts here (Adam's best rates in a first pass at 2 epochs)
adaptive_rates = common.adaptive_rates  # runs the two start rates, then walks toward the better side


def make_factory(spec, lr, clipnorm):
    if spec == "adam":
        return lambda: common.make_optimizer("adam", lr, clipnorm=clipnorm)
    if spec == "adam_b0":
        return lambda: common.make_optimizer("adam", lr, clipnorm=clipnorm, beta_1=0.0)
    return lambda: common.make_optimizer("csadam", lr, clipnorm=clipnorm, **spec)


def _regression_step(w, opt):
    import tensorflow as tf

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            tape.watch(w.value)
            loss = tf.reduce_mean(tf.square(tf.matmul(xb, w.value) - yb))
        opt.apply([tape.gradient(loss, w.value)], [w])

    return step


def dense_check(steps=200, rows=4000, cols=16, compression=0.2, seed=0, grid=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2)):
    """Linear regression y = x W*, W [rows, cols], every row sketched."""
    import keras
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    n = 16384
    x = rng.standard_normal((n, rows)).astype("float32")
    w_true = (rng.standard_normal((rows, cols)) / math.sqrt(rows)).astype("float32")
    y = x @ w_true
    xv, yv = tf.constant(x[-2048:]), tf.constant(y[-2048:])
    configs = {
        "adam": ("keras Adam", lambda lr: common.make_optimizer("adam", lr)),
        "v": ("CSAdam exact m + count-min v",
              lambda lr: common.make_optimizer("csadam", lr, min_rows=0, compression=compression)),
        "v_d3": ("CSAdam exact m + count-min v, depth 3",
                 lambda lr: common.make_optimizer("csadam", lr, min_rows=0, compression=compression, depth=3)),
        "mv": ("CSAdam count-sketch m + count-min v",
               lambda lr: common.make_optimizer("csadam-mv", lr, min_rows=0, compression=compression)),
        "mv_d3": ("CSAdam count-sketch m + count-min v, depth 3",
                  lambda lr: common.make_optimizer("csadam-mv", lr, min_rows=0, compression=compression, depth=3)),
        "b0": ("CSAdam beta_1=0 + count-min v",
               lambda lr: common.make_optimizer("csadam", lr, min_rows=0, compression=compression, beta_1=0.0)),
    }
    initial = float(tf.reduce_mean(tf.square(yv)))
    out = {"initial_mse": initial, "rows": rows, "cols": cols, "compression": compression, "steps": steps,
           "configs": {}}
    for name, (desc, make) in configs.items():
        per_lr = {}
        for lr in grid:
            w = keras.Variable(np.zeros((rows, cols), "float32"), name="w")
            opt = make(lr)
            opt.build([w])

            step = _regression_step(w, opt)

            batch_rng = np.random.default_rng(seed + 1)
            for _ in range(steps):
                idx = batch_rng.integers(0, n - 2048, 256)
                step(tf.constant(x[idx]), tf.constant(y[idx]))
            mse = float(tf.reduce_mean(tf.square(tf.matmul(xv, w.value) - yv)))
            per_lr[str(lr)] = mse if math.isfinite(mse) else float("inf")
        best_lr = min(per_lr, key=per_lr.get)
        out["configs"][name] = {"description": desc, "mse_by_lr": per_lr, "best_lr": float(best_lr),
                                "best_mse": per_lr[best_lr]}
        print(f"dense {name:<6} {desc:<45} " + " ".join(f"lr {k}: {v:.3g}" for k, v in per_lr.items()), flush=True)
    return out


def report(results):
    runs = results.get("runs", {})
    s = results["settings"]
    lines = [
        "## Defaults study (benchmarks/defaults_study.py)",
        "",
        f"Machine: {common.machine_line(results['machine'])}.",
        "Commands (in order; finished runs are reused): " + "; ".join(f"`{c}`" for c in results.get("commands", [])),
        "",
        f"Data: {results.get('data', '')}. Model: Embedding {s['embed']} -> LSTM {s['hidden']} -> Dense(vocab); "
        f"batch {s['batch']}, BPTT {s['bptt']}, clipnorm {s['clipnorm']}, {s['epochs']} epoch(s), seed {s['seed']}. "
        f"Learning-rate grid {s['grid']} (walked adaptively from {s.get('start', '')}, see the script); best test perplexity per row. "
        "Ratios are against keras Adam's best in the same run (no-1st-moment rows also against Adam beta_1=0).",
        "",
        "| configuration | state bytes | state / Adam | best lr | test ppl at each lr | best test ppl | vs Adam | "
        "vs Adam b1=0 | at Adam's best lr, vs Adam |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]

    def best(name):
        r = runs.get(name, {})
        if not r:
            return None
        lr = min(r, key=lambda k: r[k]["test_ppl"])
        return float(lr), r[lr]

    base = best("adam")
    base0 = best("adam_b0")
    for name, (desc, _) in CONFIGS.items():
        b = best(name)
        if b is None:
            continue
        lr, r = b
        per = ", ".join(f"{float(k):g}: {v['test_ppl']:.1f}" for k, v in sorted(runs[name].items(), key=lambda t: float(t[0])))
        vs = f"{r['test_ppl'] / base[1]['test_ppl']:.3f}" if base else "-"
        vs0 = f"{r['test_ppl'] / base0[1]['test_ppl']:.3f}" if base0 and name.startswith(("b0", "adam_b0")) else ""
        ratio = f"{r['state_bytes'] / base[1]['state_bytes']:.3f}" if base else "-"
        at_base = runs[name].get(repr(base[0])) if base else None
        fixed = f"{at_base['test_ppl'] / base[1]['test_ppl']:.3f}" if at_base else "-"
        lines.append(
            f"| `{name}`: {desc} | {r['state_bytes']:,} | {ratio} | {lr:g} | {per} | {r['test_ppl']:.1f} | {vs} | {vs0} "
            f"| {fixed} |"
        )
    dense = results.get("dense")
    if dense:
        lines += [
            "",
            f"Dense-layer check: linear regression, weight {dense['rows']} x {dense['cols']}, every row sketched "
            f"(min_rows=0) at compression {dense['compression']}, {dense['steps']} steps of batch 256; held-out MSE "
            f"(start {dense['initial_mse']:.3g}); best over the lr grid.",
            "",
            "| configuration | MSE at each lr | best MSE | vs Adam |",
            "|---|---|---:|---:|",
        ]
        a = dense["configs"]["adam"]["best_mse"]
        for name, c in dense["configs"].items():
            per = ", ".join(f"{float(k):g}: {v:.3g}" for k, v in c["mse_by_lr"].items())
            lines.append(f"| `{name}`: {c['description']} | {per} | {c['best_mse']:.3g} | {c['best_mse'] / a:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train-tokens", type=int, default=120_000)
    p.add_argument("--max-test-tokens", type=int, default=60_000)
    p.add_argument("--vocab", type=int, default=10_000)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--clipnorm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-grid", action="store_true")
    p.add_argument("--grid", default=",".join(str(g) for g in GRID))
    p.add_argument("--start", default=",".join(str(g) for g in START))
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--redo-dense", action="store_true", help="run the dense-layer check again")
    p.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "defaults_study.json"))
    p.add_argument("--no-markdown", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.max_train_tokens, a.max_test_tokens, a.vocab, a.embed, a.hidden, a.epochs = 6000, 3000, 500, 16, 16, 1
        a.configs, a.grid, a.start = "adam,default", "2e-3,4e-3", "2e-3,4e-3"
    grid = [float(g) for g in a.grid.split(",")]
    start = tuple(float(g) for g in a.start.split(","))
    settings = dict(epochs=a.epochs, max_train_tokens=a.max_train_tokens, max_test_tokens=a.max_test_tokens,
                    vocab=a.vocab, embed=a.embed, hidden=a.hidden, batch=a.batch, bptt=a.bptt, clipnorm=a.clipnorm,
                    seed=a.seed)
    results = common.load_json(a.out, {})
    stored = {k: v for k, v in results.get("settings", {}).items() if k not in ("grid", "start")}
    if stored != settings:  # runs are keyed by learning rate: a new grid or start reuses them
        results = {"settings": settings, "runs": {}}
    results["settings"]["grid"] = grid
    results["settings"]["start"] = list(start)
    command = "python benchmarks/defaults_study.py " + " ".join(
        repr(x) if x == "" else x for x in (argv if argv is not None else sys.argv[1:]))
    if not a.report_only:  # every invocation that added runs (they are resumable), in order
        results.setdefault("commands", [])
        if command not in results["commands"]:
            results["commands"].append(command)
    if not a.report_only:
        common.quiet_tf()
        results["machine"] = common.machine_info()
        print(common.machine_line(results["machine"]), flush=True)
        data = common.lm_data(a.max_train_tokens, a.max_test_tokens, a.vocab, a.batch, a.bptt)
        results["data"] = data["desc"]
        print(data["desc"], flush=True)
        if not a.no_dense and ("dense" not in results or a.redo_dense):
            results["dense"] = dense_check(steps=50 if a.quick else 200, rows=400 if a.quick else 4000)
            common.save_json(a.out, results)
        for name in filter(None, a.configs.split(",")):
            desc, spec = CONFIGS[name]
            runs = results["runs"].setdefault(name, {})

            def ppl_of(lr, name=name, spec=spec, runs=runs):
                key = repr(lr)
                if key not in runs:
                    r = common.train_lm(make_factory(spec, lr, a.clipnorm), data, a.embed, a.hidden, batch=a.batch,
                                        bptt=a.bptt, epochs=a.epochs, seed=a.seed)
                    runs[key] = r
                    common.save_json(a.out, results)
                    print(f"{name:<12} lr {lr:<7g} test ppl {r['test_ppl']:8.1f}  train loss {r['train_loss'][-1]:.3f}"
                          f"  state {r['state_bytes']:>11,} B  {r['seconds']:.0f}s", flush=True)
                return runs[key]["test_ppl"]

            if a.full_grid:
                for lr in grid:
                    ppl_of(lr)
            else:
                adaptive_rates(ppl_of, grid, start)
    text = report(results)
    print(text)
    if not a.no_markdown:
        common.replace_section(common.RESULTS_MD, "defaults_study", text)
    return results


if __name__ == "__main__":
    main()
