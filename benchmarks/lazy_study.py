"""Lazy versus dense sparse updates: does skipping untouched rows cost quality?

Sparse (``tf.IndexedSlices``) steps of keras_sketch optimizers are lazy: rows
a batch does not touch keep their moments and weights.  Keras's Adam moves
every row every step.  This study trains the same model from the same seed on
a shared learning-rate grid with

* ``adam``: Keras Adam (dense semantics, the baseline);
* ``dense``: Keras Adam given the gradient made dense in ``update_step``
  (after Keras's clipping, as our optimizers receive it).  Keras's Adam on a
  ``tf.IndexedSlices`` gradient squares each slice, so a row repeated in a
  batch gets the sum of the squares in ``v`` rather than the square of the
  sum; ``dense`` is the dense Adam that ``lazy`` and ``catchup`` differ from
  only by laziness (duplicates are merged first in both);
* ``lazy``: exact lazy Adam, ``CSAdam(depth=1, compression=1.0, min_rows=1)``
  (nothing sketched: only the laziness differs from Keras Adam);
* ``catchup``: the same with ``catch_up=True`` (rows replay their missed
  decay and steps when next touched: dense Adam's result on every touched
  row), and ``optimizer.catch_up_all()`` before each evaluation (every row
  brought up to date: dense Adam's weights);
* ``catchup_noflush``: ``catch_up=True`` evaluated without ``catch_up_all()``
  (rows not touched since their last step lack their pending moves);
* ``csadam``: ``CSAdam()`` with its defaults (sketched 2nd moment of large
  embeddings, lazy).

and reports each one's best held-out score (best of ``--evals`` evaluations
during training) at its own best learning rate and at Keras Adam's.
Tasks are budget_study.py's: ``lstm`` (WikiText-2 word LSTM LM, trains on the
validation split, perplexity on the test split) and ``recsys`` (matrix
factorization on Zipf ids with a planted target, RMSE on fresh pairs), here
with longer runs.  Gradient clipping (clipnorm 1.0) as in budget_study.py.

    python benchmarks/lazy_study.py --task recsys             # resumable
    python benchmarks/lazy_study.py --task lstm --configs adam,lazy
    python benchmarks/lazy_study.py --report-only             # table, RESULTS.md

Results: benchmarks/results/lazy_study.json (one entry per task, config, lr, seed).
"""

import argparse
import sys

import budget_study
import common

OUT = common.RESULTS_DIR / "lazy_study.json"
CONFIGS = ["adam", "dense", "lazy", "catchup", "catchup_noflush", "csadam"]
DEFAULT_CONFIGS = ["adam", "dense", "lazy", "catchup", "csadam"]
DESCRIPTIONS = {
    "adam": "Keras Adam (dense; squares each slice of a sparse gradient, duplicates unmerged)",
    "dense": "Keras Adam on the densified gradient (dense Adam, duplicate ids summed first)",
    "lazy": "exact lazy Adam: CSAdam(depth=1, compression=1.0, min_rows=1)",
    "catchup": "exact lazy Adam + catch_up=True, catch_up_all() before each evaluation",
    "catchup_noflush": "exact lazy Adam + catch_up=True, evaluated without catch_up_all()",
    "csadam": "CSAdam() defaults (lazy, sketched 2nd moment of large embeddings)",
}
TASKS = {
    # name: (learning-rate grid, settings overriding budget_study.TASKS)
    "lstm": ((5e-3, 1e-2, 2e-2, 4e-2), dict(steps=300)),
    "recsys": ((3e-3, 1e-2, 3e-2), dict(steps=1200)),
}
QUICK_STEPS = 6


def make_optimizer(name, lr, clipnorm):
    import keras

    import keras_sketch

    kw = dict(clipnorm=clipnorm) if clipnorm else {}
    lossless = dict(depth=1, compression=1.0, min_rows=1)
    if name == "adam":
        return keras.optimizers.Adam(lr, **kw)
    if name == "dense":
        return _DenseAdam(lr, **kw)
    if name == "lazy":
        return keras_sketch.CSAdam(lr, **lossless, **kw)
    if name in ("catchup", "catchup_noflush"):
        return keras_sketch.CSAdam(lr, catch_up=True, **lossless, **kw)
    if name == "csadam":
        return keras_sketch.CSAdam(lr, **kw)
    raise ValueError(f"`--configs` entries must be in {CONFIGS}, got {name!r}.")


def _dense_adam_class():
    import keras
    import tensorflow as tf

    class DenseAdam(keras.optimizers.Adam):
        """Keras Adam on the dense form of every gradient (sums duplicate ids)."""

        def update_step(self, gradient, variable, learning_rate):
            if isinstance(gradient, tf.IndexedSlices):
                gradient = tf.convert_to_tensor(gradient)
            return super().update_step(gradient, variable, learning_rate)

    return DenseAdam


def _DenseAdam(lr, **kw):
    return _dense_adam_class()(lr, **kw)


def train(task, setup, s, name, lr, seed, evals, clipnorm):
    """budget_study's run with this study's optimizers; catch-up rows are
    brought up to date (``catch_up_all``) before each evaluation; the data
    order is a NumPy permutation from the seed (the same for every config,
    whatever ran before in the process)."""
    flush = (lambda optimizer: optimizer.catch_up_all()) if name == "catchup" else None
    return budget_study.train(task, setup, s, name, lr, seed, evals, clipnorm, make=make_optimizer, after_chunk=flush,
                              order_seed=seed)


def summary(t):
    """Per config: best lr and score (mean over seeds), score at Adam's best lr."""
    runs = t.get("runs", {})

    def mean_by_lr(name):
        out = {}
        for lr, by_seed in runs.get(name, {}).items():
            scores = [r["score"] for r in by_seed.values()]
            out[lr] = (sum(scores) / len(scores), len(scores))
        return out

    adam = mean_by_lr("adam")
    if not adam:
        return None, []
    adam_lr = min(adam, key=lambda lr: adam[lr][0])
    rows = []
    for name in CONFIGS:
        per = mean_by_lr(name)
        if not per:
            continue
        lr = min(per, key=lambda k: per[k][0])
        at = per.get(adam_lr)
        rows.append(dict(name=name, best_lr=float(lr), score=per[lr][0], seeds=per[lr][1],
                         ratio=per[lr][0] / adam[adam_lr][0], at_adam=at[0] if at else None,
                         at_adam_ratio=at[0] / adam[adam_lr][0] if at else None,
                         per_lr={k: v[0] for k, v in sorted(per.items(), key=lambda kv: float(kv[0]))}))
    return float(adam_lr), rows


def report(results):
    lines = [
        "## Lazy versus dense sparse updates (benchmarks/lazy_study.py)",
        "",
        "Same model, data order and seed per row; shared learning-rate grid; score = best held-out score over "
        "the evaluations during training (lower is better), averaged over the seeds listed. \"vs Adam\" "
        "divides by Keras Adam's best score in the same study. The machine was shared (2 cores, other jobs): "
        "no timings are reported.",
        "",
    ]
    for task, t in results.get("tasks", {}).items():
        adam_lr, rows = summary(t)
        if not rows:
            continue
        lines += budget_study.task_header(f"{task}: {budget_study.TASKS[task][0]}", t, adam_lr) + [
            "| optimizer | score at each lr | best lr | best | vs Adam | seeds | at Adam's lr | vs Adam at Adam's lr |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            per = ", ".join(f"{float(k):g}: {v:.4g}" for k, v in r["per_lr"].items())
            at = "-" if r["at_adam"] is None else f"{r['at_adam']:.4g}"
            atr = "-" if r["at_adam_ratio"] is None else f"{r['at_adam_ratio']:.3f}"
            lines.append(f"| `{r['name']}`: {DESCRIPTIONS[r['name']]} | {per} | {r['best_lr']:g} | "
                         f"{r['score']:.4g} | {r['ratio']:.3f} | {r['seeds']} | {at} | {atr} |")
        lines.append("")
    if results.get("machine"):
        lines.append(f"Machine: {common.machine_line(results['machine'])}.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="recsys")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    p.add_argument("--lrs", default="", help="comma-separated subset of the task's grid")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=0, help="override the task's steps")
    p.add_argument("--evals", type=int, default=3)
    p.add_argument("--clipnorm", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="tiny settings (tests)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    from pathlib import Path

    out = Path(a.out)
    if not a.report_only:
        common.quiet_tf()
        grid, extra = TASKS[a.task]
        settings = dict(budget_study.TASKS[a.task][3], **extra)
        if a.quick:
            settings.update(budget_study.QUICK[a.task], steps=QUICK_STEPS)
        if a.steps:
            settings["steps"] = a.steps
        settings.update(evals=a.evals, clipnorm=a.clipnorm)
        results = common.load_json(out, {})
        t = results.setdefault("tasks", {}).setdefault(a.task, {})
        if t.get("settings") != settings:
            t.clear()
            t["settings"] = settings
        lrs = [float(v) for v in a.lrs.split(",")] if a.lrs else list(grid)
        command = "python benchmarks/lazy_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
        t.setdefault("commands", [])
        if command not in t["commands"]:
            t["commands"].append(command)
        setup = None
        for seed in [int(v) for v in a.seeds.split(",")]:
            for name in a.configs.split(","):
                make_optimizer(name, 1e-3, None)  # validates the name
                for lr in lrs:
                    node = t.setdefault("runs", {}).setdefault(name, {}).setdefault(f"{lr:g}", {})
                    if str(seed) in node:
                        continue
                    if setup is None:
                        setup = budget_study.load_task(a.task, settings, seed)
                        t["data"] = setup[-1]
                    r = train(a.task, setup, settings, name, lr, seed, a.evals, a.clipnorm)
                    node[str(seed)] = r
                    results.setdefault("machine", common.machine_info())
                    common.save_json(out, results)
                    print(f"{a.task:<7} {name:<8} lr {lr:<7g} seed {seed} score {r['score']:.4g} "
                          f"(evals {', '.join(f'{v:.4g}' for v in r['scores'])}) {r['seconds']:.0f} s", flush=True)
    results = common.load_json(out, {})
    text = report(results)
    print(text)
    if not a.quick and out == OUT:
        common.replace_section(common.ROOT / "benchmarks" / "RESULTS.md", "Lazy versus dense sparse updates", text)
    return results


if __name__ == "__main__":
    main()
