"""CSLion at about 0.1x of Adam's optimizer state, next to Keras's Lion and Adam.

    .venv/bin/python benchmarks/bench_lion.py [--quick]

The WikiText-2 LSTM language model of the benchmark suite's quality section
(benchmarks/run_all.py: vocabulary 10,000, embedding 128, LSTM 128, full
softmax, batch 32, BPTT 35, clipnorm 1.0, 2 epochs = 214 steps on the first
120,000 tokens of the *validation* split, test perplexity on the first 60,000
tokens of the *test* split; the training split is not on disk).

Optimizers:

* ``Adam (keras)`` and ``Lion (keras)``: the baselines (Lion keeps one slot,
  half of Adam's state);
* ``CSLion state_budget=0.2``: at most 0.2x of Lion's state, i.e. about 0.1x of
  Adam's (the planner sketches the embedding and the softmax kernel along
  their longer axis);
* with ``--with-default``, ``CSLion() default``: count-sketch momentum for
  the embedding only (``min_rows=4096``, ``hash_axis="first"``, compression 0.2).

Every optimizer walks the same learning-rate grid (factor-4 steps): it starts
at two neighbouring rates and walks toward the better one until perplexity
rises (``common.adaptive_rates``); every optimizer is also run at
Adam's best rate and at both grid neighbours of its best rate.  Runs are
cached in benchmarks/results/bench_lion.json (rerunning resumes); the table
goes to the ``bench_lion`` section of benchmarks/RESULTS.md.  The machine is shared: wall times are reported only
as ratios to Keras's Lion within this run.
"""

import argparse
import statistics

import common

OUT = common.RESULTS_DIR / "bench_lion.json"
QUICK_OUT = common.RESULTS_DIR / "tmp" / "bench_lion_quick.json"
GRID = [6.25e-5, 2.5e-4, 1e-3, 4e-3, 1.6e-2, 6.4e-2]  # factor 4: the machine is shared, runs are few
SETTINGS = dict(epochs=2, max_train_tokens=120_000, max_test_tokens=60_000, vocab=10_000, embed=128, hidden=128,
                batch=32, bptt=35, clipnorm=1.0, seed=0)
QUICK = dict(epochs=1, max_train_tokens=6000, max_test_tokens=3000, vocab=500, embed=16, hidden=16, batch=32,
             bptt=35, clipnorm=1.0, seed=0)
BASELINE = "Adam (keras)"
LION = "Lion (keras)"


def factories(min_rows=None, with_default=False):
    """name -> (factory(lr, clipnorm), start rates)."""
    import keras

    import keras_sketch

    extra = {} if min_rows is None else {"min_rows": min_rows}
    specs = {
        BASELINE: (lambda lr, c: keras.optimizers.Adam(lr, clipnorm=c), (4e-3, 1.6e-2)),
        LION: (lambda lr, c: keras.optimizers.Lion(lr, clipnorm=c), (1e-3, 4e-3)),
        "CSLion state_budget=0.2": (lambda lr, c: keras_sketch.CSLion(lr, clipnorm=c, state_budget=0.2), (1e-3, 4e-3)),
    }
    if with_default:
        specs["CSLion() default"] = (lambda lr, c: keras_sketch.CSLion(lr, clipnorm=c, **extra), (1e-3, 4e-3))
    return specs


def run(quick, with_default=False):
    s = QUICK if quick else SETTINGS
    out = QUICK_OUT if quick else OUT
    grid = [2e-3, 4e-3] if quick else GRID
    results = common.load_json(out, {})
    if results.get("settings") != s:
        results = {"settings": s, "runs": {}}
    results["grid"] = grid
    results["machine"] = common.machine_info()
    data = common.lm_data(s["max_train_tokens"], s["max_test_tokens"], s["vocab"], s["batch"], s["bptt"])
    results["data"] = data["desc"]
    train = dict(embed=s["embed"], hidden=s["hidden"], batch=s["batch"], bptt=s["bptt"], epochs=s["epochs"],
                 seed=s["seed"])

    def ppl_for(name, make):
        runs = results["runs"].setdefault(name, {})

        def ppl_of(lr):
            key = repr(lr)
            if key not in runs:
                r = common.train_lm(lambda: make(lr, s["clipnorm"]), data, **train)
                runs[key] = r
                common.save_json(out, results)
                print(f"{name:<26} lr {lr:<8g} test ppl {r['test_ppl']:9.1f}  state {r['state_bytes']:>11,} B  "
                      f"{r['seconds']:6.1f} s", flush=True)
            return runs[key]["test_ppl"]

        return ppl_of

    specs = factories(min_rows=256 if quick else None, with_default=with_default)
    walkers = {}
    for name, (make, start) in specs.items():
        walkers[name] = ppl_for(name, make)
        starts = start if not quick else tuple(grid)
        common.adaptive_rates(walkers[name], grid, starts)
    adam_lr, _ = best(results["runs"][BASELINE])
    for name in specs:  # every optimizer at Adam's best rate too
        walkers[name](adam_lr)
    for name in specs:  # and at both grid neighbours of its best (runs at other rates can move the best)
        while True:
            i = grid.index(best(results["runs"][name])[0])
            missing = [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid) and repr(grid[j]) not in results["runs"][name]]
            if not missing:
                break
            walkers[name](missing[0])
    common.save_json(out, results)
    return results


def best(runs):
    key = min(runs, key=lambda k: runs[k]["test_ppl"])
    return float(key), runs[key]


def table(results):
    runs = results["runs"]
    adam_lr, adam = best(runs[BASELINE])
    lion_lr, lion = best(runs[LION])
    lion_time = statistics.median(r["seconds"] for r in runs[LION].values())
    grid = results["grid"]
    lines = [
        "| optimizer | state bytes | state / Adam | test ppl per lr | best lr | best ppl | vs Adam's best | "
        "vs Lion's best | ppl at Adam's best lr | time / Keras Lion |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per in runs.items():
        lr, r = best(per)
        at_adam = per.get(repr(adam_lr))
        cells = ", ".join(f"{g:g}: {per[repr(g)]['test_ppl']:.1f}" for g in grid if repr(g) in per)
        seconds = statistics.median(x["seconds"] for x in per.values())
        lines.append(
            f"| {name} | {r['state_bytes']:,} | {r['state_bytes'] / adam['state_bytes']:.3f} | {cells} | {lr:g} | "
            f"{r['test_ppl']:.1f} | {r['test_ppl'] / adam['test_ppl']:.3f} | {r['test_ppl'] / lion['test_ppl']:.3f} | "
            f"{at_adam['test_ppl']:.1f} | {seconds / lion_time:.2f} |"
        )
    return "\n".join(lines), adam_lr, lion_lr


def markdown(results, command):
    s = results["settings"]
    text, adam_lr, lion_lr = table(results)
    steps = next(iter(results["runs"][BASELINE].values()))["steps"]
    return (
        "## CSLion vs Keras Lion and Adam (benchmarks/bench_lion.py)\n\n"
        f"`{command}`. WikiText-2 LSTM LM: {results['data']}; embedding {s['embed']}, LSTM {s['hidden']}, "
        f"Dense(vocab), batch {s['batch']}, BPTT {s['bptt']}, clipnorm {s['clipnorm']}, {s['epochs']} epochs "
        f"({steps} steps), seed {s['seed']}, one run per point. Learning-rate grid {results['grid']} (the same "
        "for all; each optimizer walks it from two starting rates until perplexity rises, and also runs at Adam's "
        f"best rate, {adam_lr:g}, and at both neighbours of its own best). State: bytes of the optimizer's variables but its counters (the memory report "
        "for keras_sketch). Time: median wall time of an optimizer's runs over that of Keras Lion's runs, in this "
        f"run, on a shared machine. Machine: {common.machine_line(results['machine'])}.\n\n{text}\n"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and data (smoke run; no RESULTS.md)")
    p.add_argument("--with-default", action="store_true", help="also CSLion() with its default settings")
    args = p.parse_args(argv)
    common.quiet_tf()
    results = run(args.quick, args.with_default)
    command = "python benchmarks/bench_lion.py" + (" --quick" if args.quick else "") + (
        " --with-default" if args.with_default else "")
    md = markdown(results, command)
    print(md)
    if not args.quick:
        common.replace_section(common.RESULTS_MD, "bench_lion", md)


if __name__ == "__main__":
    main()
