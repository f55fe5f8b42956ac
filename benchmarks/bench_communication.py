"""Communication benchmark of ``keras_sketch.SketchedSGD`` on tf.distribute.

For each task, with ``--replicas`` replicas as logical CPU devices under
MirroredStrategy (``keras_sketch.distributed.Trainer``), trains with:
uncompressed SGD+momentum (``compression=None``: Keras's dense all-reduce);
fetchsgd and two_round at 10x, 40x, 100x; local top-k with error feedback at
the same wire bytes (an all-gather, see below).  It prints a table and stores
``benchmarks/results/bench_communication.json``, a quality-versus-bytes plot
and a section of ``benchmarks/RESULTS.md``.

Bytes.  ``handed`` is what one replica hands to the collectives per step,
read from ``optimizer.communication_report()`` (the tensors' sizes at the
collective call).  ``wire`` is the ring-algorithm traffic per replica that
those tensors cost: an all-reduce of ``n`` bytes moves ``2 (R-1)/R n``, an
all-gather of ``n`` bytes per replica moves ``(R-1) n``.  Local top-k is given
``k = rows*columns / R`` (fetchsgd's sketch floats over R) so its wire bytes
match fetchsgd's at the same ratio (values + int32 indices, 8 bytes each).

Time.  Steps are timed (median) on a shared 2-core machine: read ratios only.
The sketching cost (sketch + unsketch + top-k of a ``d``-vector, one device)
is timed separately; the projection to a 100M-parameter model scales it
linearly in ``d`` and solves ``8 d (1 - 1/r) / B = overhead`` for the
bandwidth ``B`` below which SketchedSGD's step is faster (ring all-reduce,
many workers, no overlap of compute and communication).

Run task by task: ``python benchmarks/bench_communication.py --task lm``,
``--task embedding``, then ``--report`` (table, plot, RESULTS.md).
"""

import argparse
import math
import re
import time

from common import (
    RESULTS_DIR,
    RESULTS_MD,
    lm_data,
    load_json,
    machine_info,
    machine_line,
    replace_section,
    save_json,
)

OUT = RESULTS_DIR / "bench_communication.json"
PLOT = RESULTS_DIR / "plots" / "communication.png"
RATIOS = (10, 40, 100)
BANDWIDTHS_GBIT = (1, 10, 100)
BIG_D = 100_000_000


def configs(d, replicas, rows=None, kdiv=None, p=None):
    """``(name, ratio, SketchedSGD kwargs)`` of every method.  ``kdiv``: k =
    columns / kdiv (a float: 0.5 gives k = 2 columns) instead of the rule's
    columns // 4, same bytes budget; ``p``: two_round's candidates per update
    coordinate instead of ``P_CANDIDATES`` (set by ``run_task``; names get
    ``_P<p>``)."""
    from keras_sketch.optimizers.sketched_sgd import DEFAULT_ROWS, P_CANDIDATES, sketch_sizes

    out = [("sgd_momentum", None, {})]
    extra, suffix = (dict(rows=rows), f"_rows{rows}") if rows else ({}, "")
    for r in RATIOS:
        for mode in ("fetchsgd", "two_round"):
            kw, sfx = dict(extra), suffix
            cand = p if (p and mode == "two_round") else P_CANDIDATES
            if kdiv:  # same bytes budget: rows*columns (+ P*k in two_round) = d / r
                per_row = (rows or DEFAULT_ROWS) + (cand / kdiv if mode == "two_round" else 0)
                columns = max(1, int(d // (r * per_row)))
                kw.update(columns=columns, k=max(1, int(columns // kdiv)))
                sfx += f"_kc{kdiv:g}"
            elif p and mode == "two_round":  # the rule's k = columns // 4 with P = p in the budget
                from keras_sketch.optimizers.sketched_sgd import K_PER_COLUMNS

                columns = max(1, int(d // (r * ((rows or DEFAULT_ROWS) + p / K_PER_COLUMNS))))
                kw.update(columns=columns, k=max(1, columns // K_PER_COLUMNS))
            if p and mode == "two_round":
                sfx += f"_P{p}"
            out.append((f"{mode}_{r}x{sfx}", r, dict(compression=r, mode=mode, **kw)))
        f_rows, f_columns, _ = sketch_sizes(d, r, "fetchsgd")  # not `rows`: the loop's argument
        out.append((f"local_topk_{r}x", r, dict(k=max(1, f_rows * f_columns // replicas), mode="local_topk")))
    return out


def wire_bytes(report, replicas):
    total = 0.0
    for c in report["collectives"]:
        if c["collective"] == "all_gather":
            total += (replicas - 1) * c["bytes"]
        else:
            total += 2 * (replicas - 1) / replicas * c["bytes"]
    return total


# --- tasks -----------------------------------------------------------------------------------


def lm_task(args):
    import keras

    from keras_sketch_harness.lm import build_lm

    data = lm_data(args.steps * args.batch * 20 + 1, 20 * 1024 + 1, 2000, args.batch, 20)

    def make_model():
        keras.utils.set_random_seed(0)
        return build_lm(data["vocab"], embed_dim=32, hidden=64, steps=20)

    def loss_fn(y, logits):
        return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    def quality(model):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        logits = model.predict(data["tx"], batch_size=256, verbose=0)
        return {"test_perplexity": float(math.exp(min(float(loss(data["ty"], logits)), 700.0)))}  # capped: no overflow

    return dict(make_model=make_model, loss_fn=loss_fn, quality=quality, x=data["x"], y=data["y"], desc=data["desc"],
                lr=args.lr or 0.5, higher_is_better=False, metric="test_perplexity")


def embedding_task(args):
    import keras
    import numpy as np

    vocab, dim, bag, classes = 5000, 16, 8, 10
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(vocab, classes)).astype(np.float32)

    def sample(n):
        x = rng.integers(0, vocab, size=(n, bag)).astype(np.int32)
        return x, teacher[x].sum(axis=1).argmax(axis=1).astype(np.int32)

    x, y = sample(args.steps * args.batch)
    tx, ty = sample(4096)

    def make_model():
        keras.utils.set_random_seed(0)
        inp = keras.Input((bag,), dtype="int32")
        h = keras.layers.Embedding(vocab, dim, name="embedding")(inp)
        h = keras.layers.GlobalAveragePooling1D()(h)
        return keras.Model(inp, keras.layers.Dense(classes, name="head")(h))

    def loss_fn(labels, logits):
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

    def quality(model):
        logits = model.predict(tx, batch_size=1024, verbose=0)
        return {"test_accuracy": float((logits.argmax(axis=1) == ty).mean())}

    desc = f"synthetic: vocabulary {vocab:,} x {dim} embedding bag of {bag} -> {classes} classes, teacher labels"
    return dict(make_model=make_model, loss_fn=loss_fn, quality=quality, x=x, y=y, desc=desc,
                lr=args.lr or 2.0, higher_is_better=True, metric="test_accuracy")


TASKS = {"lm": lm_task, "embedding": embedding_task}


# --- measurement ---------------------------------------------------------------------------------


def sketch_cost(d, compression, repeats=10):
    """Median seconds of sketch + unsketch + top-k of a d-vector (one device)."""
    import numpy as np
    import tensorflow as tf

    import keras_sketch as ks

    v = tf.Variable(tf.zeros([d]))
    opt = ks.SketchedSGD(compression=compression)
    opt.build([v])
    ids = tf.range(d, dtype=tf.int64)

    @tf.function
    def run(g):
        flat, signs = opt._flat_locations(ids)
        table = opt._sketch_located(flat, signs * g[None, :])
        est = opt._unsketch(table, flat, signs)
        return tf.math.top_k(tf.abs(est), opt.update_k).indices

    g = tf.random.normal([d])
    run(g)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(g).numpy()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def subtract_error_variant():
    """Diagnostic (``--subtract``): fetchsgd with ``E <- E - sketch(Delta)``
    instead of zeroing the chosen coordinates' buckets of ``E`` (momentum
    buckets are still zeroed).  Zeroing clears up to ``rows*k`` buckets a step
    (a quarter of every row at k = columns/4), also wiping the error of every
    coordinate that shares them; subtracting removes only what was applied."""
    import tensorflow as tf

    from keras_sketch.optimizers.sketched_sgd import SketchedSGD

    def _fetchsgd(self, ctx, parts, lr, rho):
        flat, signs = self._flat_locations(tf.range(self.param_count, dtype=tf.int64))
        S = self._all_reduce(ctx, self._sketch_parts(parts, flat, signs), "sketch")[:, :, None]
        U = rho * tf.convert_to_tensor(self.sketch_momentum) + S
        E = tf.convert_to_tensor(self.sketch_error) + lr * (S + rho * U if self.nesterov else U)
        estimate = self._unsketch(E, flat, signs)
        _, chosen = tf.math.top_k(tf.abs(estimate), self.update_k)
        chosen = tf.cast(chosen, tf.int64)
        delta = tf.gather(estimate, chosen)
        E = E - self._sketch_parts([(chosen, 0, None, delta)], flat, signs)[:, :, None]
        U = self._zero_buckets(U, chosen)
        return chosen, delta, [(self.sketch_momentum, U), (self.sketch_error, E)]

    SketchedSGD._fetchsgd = _fetchsgd


def warmup_schedule(lr, steps):
    """Linear warm-up from lr/steps to ``lr`` over ``steps`` steps, then constant
    (the Sketched SGD authors warm the learning rate up)."""
    import keras

    class Warmup(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            import tensorflow as tf

            return lr * tf.minimum(1.0, (tf.cast(step, tf.float32) + 1.0) / steps)

        def get_config(self):
            return {"lr": lr, "steps": steps}

    return Warmup()


def run_task(args):
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    tf.get_logger().setLevel("ERROR")
    import keras_sketch as ks
    from keras_sketch.distributed import Trainer

    task = TASKS[args.task](args)
    if args.subtract:
        subtract_error_variant()
    if args.p:  # two_round's P (a module constant) for this run's configs
        from keras_sketch.optimizers import sketched_sgd

        sketched_sgd.P_CANDIDATES = args.p
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    d = sum(int(np.prod(v.shape)) for v in task["make_model"]().trainable_variables)
    results = load_json(OUT, {})
    grid = [float(v) for v in args.grid.split(",")] if args.grid else None
    key = f"{args.task}/{args.replicas}" + (f"/grid{args.steps}" if grid else "")
    if args.warmup:
        key += f"_warmup{args.warmup}"
    entry = {"task": args.task, "replicas": args.replicas, "parameters": d, "desc": task["desc"], "steps": args.steps,
             "batch": args.batch, "learning_rate": grid or task["lr"], "metric": task["metric"], "warmup": args.warmup,
             "higher_is_better": task["higher_is_better"], "machine": machine_info(),
             "runs": results.get(key, {}).get("runs", {}) if args.only or grid else {}}  # adds to a previous run
    only = set(args.only.split(",")) if args.only else None
    todo = [(name, ratio, kwargs, lr) for name, ratio, kwargs in configs(d, args.replicas, args.rows, args.kdiv, args.p)
            for lr in (grid or [task["lr"]]) if not only or name in only]
    for name, ratio, kwargs, lr in todo:
        if args.seed and kwargs.get("mode") in ("fetchsgd", "two_round"):  # another draw of the hash functions
            kwargs, name = dict(kwargs, seed=args.seed), f"{name}_seed{args.seed}"
        if grid:
            name = f"{name}{'_subtract' if args.subtract else ''}@{lr:g}"
            if name in entry["runs"]:  # resumable: a grid point already measured is kept
                continue
        with strategy.scope():
            model = task["make_model"]()
            rate = warmup_schedule(lr, args.warmup) if args.warmup else lr
            optimizer = ks.SketchedSGD(learning_rate=rate, momentum=0.9, **kwargs)
        trainer = Trainer(model, optimizer, task["loss_fn"], strategy)
        x, y, b = task["x"], task["y"], args.batch
        batches = len(x) // b  # more steps than batches: the data is cycled (epochs)
        losses, times = [], []
        for step in range(args.steps):
            s = step % batches
            t = time.perf_counter()
            losses.append(trainer.train_step(x[s * b : (s + 1) * b], y[s * b : (s + 1) * b]))
            times.append(time.perf_counter() - t)
        report = optimizer.communication_report()
        run = {
            "target_ratio": ratio,
            "handed_bytes": report["sent_bytes_per_step"],
            "dense_bytes": report["dense_bytes_per_step"],
            "handed_ratio": report["ratio"],
            "wire_bytes": wire_bytes(report, args.replicas),
            "sketch_shape": report["sketch_shape"],
            "k": report["k"],
            "median_step_s": float(np.median(times[5:])),
            "final_train_loss": float(np.mean(losses[-10:])),
            "finite": bool(np.all(np.isfinite(losses))),
            **task["quality"](model),
        }
        if ratio and "local" not in name and not grid:
            run["sketch_cost_s"] = sketch_cost(d, ratio)
        run["learning_rate"] = lr
        entry["runs"][name] = run
        print(f"{name:16s} {run[task['metric']]:10.4f} handed {run['handed_bytes']:>9} B  ratio {run['handed_ratio']:6.1f}  "
              f"step {run['median_step_s'] * 1e3:7.1f} ms  loss {run['final_train_loss']:.3f}", flush=True)
        if grid:  # saved after every point: an interrupted grid resumes where it stopped
            results = load_json(OUT, {})
            results[key] = entry
            save_json(OUT, results)
    results = load_json(OUT, {})  # re-read: another task may have finished meanwhile
    results[key] = entry
    save_json(OUT, results)


# --- report -----------------------------------------------------------------------------------------


def projection(entry):
    """Bandwidth below which a sketched step beats the dense step, 100M params."""
    base = entry["runs"].get("sgd_momentum")
    out = {}
    for name, run in entry["runs"].items():
        if "sketch_cost_s" not in run:
            continue
        r = run["dense_bytes"] / run["handed_bytes"]
        overhead = run["sketch_cost_s"] * BIG_D / entry["parameters"]
        breakeven = 8 * BIG_D * (1 - 1 / r) / overhead * 8 / 1e9  # Gbit/s
        compute = base["median_step_s"] * BIG_D / entry["parameters"] if base else float("nan")
        rows = {}
        for gbit in BANDWIDTHS_GBIT:
            bps = gbit * 1e9 / 8
            dense = compute + 8 * BIG_D / bps
            sketched = compute + overhead + 8 * BIG_D / (r * bps)
            rows[gbit] = {"dense_s": dense, "sketched_s": sketched, "wins": sketched < dense}
        out[name] = {"overhead_s": overhead, "breakeven_gbit": breakeven, "compute_s": compute, "by_bandwidth": rows}
    return out


def grid_best(entry):
    """``{method: (best lr, run at it)}`` and the uncompressed baseline's best lr."""
    metric, sign = entry["metric"], (1 if entry["higher_is_better"] else -1)
    methods = {}
    for name, run in entry["runs"].items():
        method, lr = name.rsplit("@", 1)
        methods.setdefault(method, {})[float(lr)] = run

    def score(run):
        q = run[metric]
        return sign * q if run["finite"] and math.isfinite(q) else -math.inf

    best = {m: max(by_lr.items(), key=lambda item: score(item[1])) for m, by_lr in methods.items()}
    return best, methods


# The sizing rule's own configs (also when named with the rule's values: 1 row, k = columns // 2, P = 2).
RULE_NAME = re.compile(r"^(fetchsgd|two_round|local_topk)_(\d+)x(_rows1_kc2)?(_P2)?$")


def grid_table(entry):
    """Every method at its best learning rate of the grid and at the
    uncompressed baseline's best learning rate."""
    metric = entry["metric"]
    best_of, methods = grid_best(entry)
    if "sgd_momentum" not in best_of:
        return []
    base_lr, base_run = best_of["sgd_momentum"]
    bq = base_run[metric]
    lrs = sorted({lr for m in methods.values() for lr in m})
    warm = f", linear learning-rate warm-up over {entry['warmup']} steps" if entry.get("warmup") else ""
    lines = [f"### {entry['task']}, {entry['replicas']} replicas, learning-rate grid {lrs}, {entry['steps']} steps"
             f"{warm} ({entry['parameters']:,} parameters)", "",
             f"{entry['desc']}; global batch {entry['batch']}, momentum 0.9; every method at every learning rate of "
             f"the grid. Uncompressed best: lr {base_lr:g}, {metric} {bq:.4g}. " + machine_line(entry["machine"]), "",
             f"| method | ratio (handed) | best lr | {metric} at best | / uncompressed best | {metric} at lr {base_lr:g} "
             f"| / uncompressed best | all lrs |", "|---|---|---|---|---|---|---|---|"]
    for method, by_lr in methods.items():
        best = best_of[method][0]
        at = by_lr.get(base_lr)
        cells = ", ".join(f"{lr:g}: {by_lr[lr][metric]:.4g}" for lr in sorted(by_lr))
        at_s = f"{at[metric]:.4g} | {at[metric] / bq:.3g}" if at else "- | -"
        lines.append(f"| {method} | {by_lr[best]['handed_ratio']:.1f} | {best:g} | {by_lr[best][metric]:.4g} | "
                     f"{by_lr[best][metric] / bq:.3g} | {at_s} | {cells} |")
    return lines + [""]


def report():
    results = load_json(OUT, {})
    lines = [
        "Sizing rule: since this section's 600-step tables, `compression=r` picks 1 row, `k = columns // 2` and "
        "(two_round) `P = 2`; lines named `_rows5_kc4` (`_P8`) were measured with the earlier rule (5 rows, "
        "k = columns // 4, P = 8) and are reproduced with `--rows 5 --kdiv 4 --p 8`; a name spells out every "
        "setting that differs from the current rule. "
        "Commands: `python benchmarks/bench_communication.py --task lm --lr 0.1 --rows 5 --kdiv 4 --p 8` (and "
        "`--replicas 4`), `--task embedding --batch 64 --lr 5 --rows 5 --kdiv 4 --p 8`, the `_rows1_kc4` lines with "
        "`--rows 1 --kdiv 4 --p 8 --only <names>`, then `--report`. "
        "Replicas are logical CPU devices under MirroredStrategy. 'ratio (handed)' = 4 x parameters / bytes one "
        "replica hands to the collectives; 'wire ratio' = ring traffic of the uncompressed Keras path (which "
        "all-gathers sparse embedding gradients) / ring traffic of the method. Machine shared with other agents: "
        "times are medians, read only as ratios within one run. The learning-rate grid sections: "
        "`--task lm --steps 150 --grid 0.05,0.1,0.2,0.4 --only ...`, `--task lm --steps 600 --grid 0.05,0.1,0.2 "
        "--only ...` (also `--steps 1500`, `--warmup 100`), `--task embedding --batch 64 --steps 300 --grid 0.5,2,5 "
        "--only ...`, with `--rows/--kdiv/--p/--seed/--subtract` as a line's name says (docs/sketched_sgd.md lists "
        "every command). From 600 steps the LM trains on the whole 216k-token split, cycled (a different "
        "vocabulary than the 150-step runs, which use the first 96k tokens): compare within a table only.",
        "",
    ]
    plot_data = []
    order = {key: (e["task"], e["replicas"], "/grid" in key, e["steps"], e.get("warmup") or 0) for key, e in results.items()}
    for key, entry in sorted(results.items(), key=lambda item: order[item[0]]):
        if "/grid" in key:
            lines += grid_table(entry)
            best, _ = grid_best(entry)
            if "sgd_momentum" in best and sum(bool(RULE_NAME.match(m)) for m in best) > 3:  # a quality-vs-bytes sweep
                bq = best["sgd_momentum"][1][entry["metric"]]
                label = f"{entry['replicas']} replicas, {entry['steps']} steps, each at its best lr"
                for m, (_, run) in best.items():
                    if RULE_NAME.match(m) or m == "sgd_momentum":
                        plot_data.append((entry["task"], label, m, run["handed_ratio"], run[entry["metric"]] / bq))
            continue
        metric, runs = entry["metric"], entry["runs"]
        base = runs.get("sgd_momentum")
        lines += [f"### {entry['task']}, {entry['replicas']} replicas ({entry['parameters']:,} parameters)", "",
                  f"{entry['desc']}; {entry['steps']} steps, global batch {entry['batch']}, lr {entry['learning_rate']}, "
                  "momentum 0.9 (same for every method, not tuned). " + machine_line(entry["machine"]), "",
                  f"| method | {metric} | quality / uncompressed | bytes handed/step | ratio (handed) | wire ratio | "
                  "sketch | k | step ms | step / uncompressed | sketch+unsketch ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, run in runs.items():
            q = run[metric]
            qr = q / base[metric] if base else float("nan")
            wr = base["wire_bytes"] / run["wire_bytes"] if base and run["wire_bytes"] else float("nan")
            sr = run["median_step_s"] / base["median_step_s"] if base else float("nan")
            sc = f"{run['sketch_cost_s'] * 1e3:.1f}" if "sketch_cost_s" in run else "-"
            lines.append(f"| {name} | {q:.4g} | {qr:.3g} | {run['handed_bytes']:,} | {run['handed_ratio']:.1f} | {wr:.1f} | "
                         f"{run['sketch_shape'] or '-'} | {run['k'] or '-'} | {run['median_step_s'] * 1e3:.1f} | {sr:.2f} | {sc} |")
            if "_rows1" not in name:  # the plot's lines: one sizing per method (here the rule of the time)
                plot_data.append((entry["task"], f"{entry['replicas']} replicas, {entry['steps']} steps, "
                                  f"lr {entry['learning_rate']}", name, run["handed_ratio"], qr))
        proj = projection(entry)
        if proj:
            lines += ["", "Projection to a 100M-parameter model (sketch cost scaled linearly in parameters from the "
                      "measurement above; compute per step scaled from the uncompressed step; ring all-reduce moves "
                      "~2x the buffer per worker; no compute/communication overlap):", "",
                      "| method | sketch overhead s | SketchedSGD faster below | " +
                      " | ".join(f"{g} Gbit/s dense / sketched s" for g in BANDWIDTHS_GBIT) + " |",
                      "|---|---|---|" + "---|" * len(BANDWIDTHS_GBIT)]
            for name, p in proj.items():
                cells = " | ".join(f"{p['by_bandwidth'][g]['dense_s']:.2f} / {p['by_bandwidth'][g]['sketched_s']:.2f}"
                                   f"{' (wins)' if p['by_bandwidth'][g]['wins'] else ''}" for g in BANDWIDTHS_GBIT)
                lines.append(f"| {name} | {p['overhead_s']:.2f} | {p['breakeven_gbit']:.1f} Gbit/s | {cells} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = sorted({(t, r) for t, r, *_ in plot_data})
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        top = 3.0  # quality ratios above this (diverged runs) are drawn at the top as x
        for ax, (task, reps) in zip(axes[0], groups):
            for method, marker in (("fetchsgd", "o"), ("two_round", "s"), ("local_topk", "^"), ("sgd", "*")):
                pts = sorted((x, q) for t, r, n, x, q in plot_data if t == task and r == reps and n.startswith(method))
                if not pts:
                    continue
                xs, qs = zip(*pts)
                line = ax.plot(xs, [min(q, top) for q in qs], marker=marker, linestyle="-", label=method)[0]
                over = [(x, top) for x, q in pts if q > top]
                if over:
                    ax.plot(*zip(*over), "x", color=line.get_color(), markersize=12)
            ax.set_xscale("log")
            ax.set_ylim(0, top * 1.05)
            ax.axhline(1.0, color="gray", linewidth=0.8)
            better = "higher" if task == "embedding" else "lower"
            ax.set_title(f"{task}, {reps} ({better} is better)", fontsize=9)
            ax.set_xlabel("bytes ratio (4 x parameters / bytes handed to the collective)")
            ax.set_ylabel("quality / uncompressed SGD+momentum")
            ax.legend(fontsize=8)
        PLOT.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(PLOT, dpi=110)
        text += f"\n![quality versus bytes](results/plots/{PLOT.name})\n"
    except ImportError:
        text += "\n(matplotlib not installed: no plot)\n"
    replace_section(RESULTS_MD, "bench_communication", "## Sketched gradient communication (benchmarks/bench_communication.py)\n\n" + text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--only", default="", help="comma-separated method names (added to the stored run)")
    parser.add_argument("--rows", type=int, default=None, help="sketch rows instead of the rule's (names get _rowsN)")
    parser.add_argument("--grid", default="", help="comma-separated learning rates: every method at each (resumable)")
    parser.add_argument("--kdiv", type=float, default=None,
                        help="sketch modes: k = columns / KDIV, e.g. 2 or 0.5 (names get _kcN)")
    parser.add_argument("--seed", type=int, default=0, help="sketch modes: hash seed (names get _seedN)")
    parser.add_argument("--p", type=int, default=None, help="two_round: P candidates per update coordinate (names get _PN)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="linear learning-rate warm-up over this many steps (grid key gets _warmupN)")
    parser.add_argument("--subtract", action="store_true", help="diagnostic fetchsgd variant E -= sketch(Delta) (grid only)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.task:
        run_task(args)
    if args.report or not args.task:
        report()


if __name__ == "__main__":
    main()
