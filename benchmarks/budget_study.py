"""Budget study: quality versus optimizer-state bytes for ``state_budget=``.

Every configuration trains the same model from the same seed on a shared
learning-rate grid (3 values per task), and reports its best held-out score
at its own best learning rate and at Keras Adam's best learning rate, with the
bytes of the optimizer's variables (``keras_sketch.memory.keras_state_bytes``:
every optimizer variable but the step counter and learning rate).

Tasks (train split -> evaluation split):

* ``lstm``: the WikiText-2 word LSTM LM of keras_sketch_harness/lm.py; trains on the
  WikiText-2 *validation* split, evaluates perplexity on the *test* split
  (the training split is not on disk).
* ``transformer``: a 2-layer pre-LN Transformer LM (keras.layers.
  MultiHeadAttention, causal mask, learned positions), same data and splits.
* ``cnn``: a small CNN on scikit-learn's bundled 8x8 digits (1,797 real scans),
  80/20 split with a fixed seed; trains on the 80%, evaluates accuracy on the 20%.
* ``recsys``: matrix factorization (user and item embeddings + biases) on
  synthetic Zipf-distributed (user, item) pairs whose ratings come from a
  planted low-rank model plus noise; trains on one sample, evaluates RMSE on
  an independent held-out sample of the same distribution.

"Best validation score": the model is evaluated on the evaluation split
``--evals`` times during training (evenly spaced, the last at the end) and
the best is kept.

Configurations: Keras ``Adam`` (the baseline), ``Adafactor``, ``Lion``,
keras_sketch ``SM3`` (momentum 0.9, moving-average 2nd moment beta_2=0.999 so
that it shares Adam's learning-rate scale), and ``CSAdam(state_budget=b)`` at
b = 1, 0.1, 0.02, 0.005 with the 2nd moment of every matrix either in a
count-min sketch (``cm``) or rank-1 factored (``fac``, keras_sketch/factored.py)
-- the planner decision this study was written for (docs/state_budget.md).

    python benchmarks/budget_study.py --task lstm           # resumable
    python benchmarks/budget_study.py --task lstm --configs adam,cm_0.02
    python benchmarks/budget_study.py --report-only         # table, plot, RESULTS.md
    python benchmarks/budget_study.py --task cnn --quick    # seconds (tests)

Results are cached per run in benchmarks/results/budget_study.json (a run is
reused when the task's settings match); several processes may run different
tasks at once (the file is locked and merged on every save).
"""

import argparse
import contextlib
import fcntl
import math
import sys
import time
from pathlib import Path

import common

OUT = common.RESULTS_DIR / "budget_study.json"
PLOT = common.RESULTS_DIR / "plots" / "budget_study.png"
BUDGETS = (1.0, 0.1, 0.02, 0.005)
ESTIMATORS = {"cm": "count_min", "fac": "factored", "fs": "factored_sketch", "mix": "mixed"}

# Priority order: the factored-vs-count-min decision first, then the rest.
CONFIGS = ["adam", "cm_0.02", "fac_0.02", "cm_0.005", "fac_0.005", "fs_0.005", "fsub_0.005", "mix_0.005", "cs_1.0",
           "cm_0.1", "fac_0.1", "lion", "adafactor", "sm3", "mix_0.02", "mix_0.1"]
# Configurations kept in the results but no longer in the code: the commit that ran them.
RECORD_ONLY = {"fsub_0.005": "bbfe100"}
DESCRIPTIONS = {
    "adam": "Keras Adam",
    "adafactor": "Keras Adafactor",
    "lion": "Keras Lion",
    "sm3": "keras_sketch SM3 (momentum 0.9, beta_2 0.999)",
    "cs_1.0": "CSAdam(state_budget=1.0)",
}
for _b in BUDGETS[1:]:
    DESCRIPTIONS[f"cm_{_b}"] = f"CSAdam(state_budget={_b}), count-min 2nd moment"
    DESCRIPTIONS[f"fac_{_b}"] = f"CSAdam(state_budget={_b}), factored 2nd moment"
    DESCRIPTIONS[f"fs_{_b}"] = (f"CSAdam(state_budget={_b}), factored 2nd moment, long vectors (row factors, "
                                "biases) hashed, read as the bucket's share")
    DESCRIPTIONS[f"mix_{_b}"] = (f"CSAdam(state_budget={_b}), per matrix the cheaper of factored and count-min "
                                 "at the common width")
DESCRIPTIONS["fsub_0.005"] = ("CSAdam(state_budget=0.005), as `fs` but hashed row factors read as count-min upper "
                              "bounds and vectors in count-min sketches (commit bbfe100)")

TASKS = {
    # name: (metric, higher is better, learning-rate grid, default settings)
    "lstm": ("test perplexity", False, (2e-3, 5e-3, 1e-2),
             dict(vocab=5_000, embed=64, hidden=128, batch=32, bptt=35, steps=200, max_test_tokens=20_000)),
    "transformer": ("test perplexity", False, (1e-3, 2e-3, 4e-3),
                    dict(vocab=5_000, d=128, heads=4, ffn=256, layers=2, batch=16, seq=64, steps=200,
                         max_test_tokens=20_000)),
    "cnn": ("test accuracy", True, (1e-3, 3e-3, 1e-2), dict(batch=32, steps=300)),
    "recsys": ("test RMSE", False, (3e-3, 1e-2, 3e-2),
               dict(users=5_000, items=2_000, dim=32, rank=8, zipf=1.1, n_train=300_000, n_test=50_000,
                    batch=512, steps=600, noise=0.3, init=0.1)),
}
QUICK = {
    "lstm": dict(vocab=500, embed=16, hidden=16, steps=6, max_test_tokens=3000),
    "transformer": dict(vocab=500, d=16, heads=2, ffn=32, steps=6, max_test_tokens=3000),
    "cnn": dict(steps=6),
    "recsys": dict(users=500, items=300, n_train=5000, n_test=1000, steps=6),  # noqa: E501
}


# -- optimizers -----------------------------------------------------------------
def make_optimizer(name, lr, clipnorm):
    import keras

    import keras_sketch
    from keras_sketch import plan

    kw = dict(clipnorm=clipnorm) if clipnorm else {}
    if name == "adam":
        return keras.optimizers.Adam(lr, **kw)
    if name == "adafactor":
        return keras.optimizers.Adafactor(lr, **kw)
    if name == "lion":
        return keras.optimizers.Lion(lr, **kw)
    if name == "sm3":
        return keras_sketch.SM3(lr, momentum=0.9, beta_2=0.999, epsilon=1e-8, **kw)
    if name == "cs_1.0":
        return keras_sketch.CSAdam(lr, state_budget=1.0, **kw)
    if name in RECORD_ONLY:
        raise SystemExit(f"{name} was measured at commit {RECORD_ONLY[name]}; its code is not in this version.")
    est, budget = name.split("_")
    estimator = ESTIMATORS[est]

    class _Forced(keras_sketch.CSAdam):
        """CSAdam whose budget planner is told which 2nd-moment estimator to use."""

        def _make_plans(self, var_list):
            from keras_sketch import memory

            return plan.budget_plans(
                [tuple(v.shape) for v in var_list], [memory.itemsize(v.dtype) for v in var_list],
                self._slot_kinds(), self._droppable_slots, self._exact_slot_count, self.state_budget,
                self.depth, estimator=estimator,
            )

    return _Forced(lr, state_budget=float(budget), **kw)


# -- tasks ----------------------------------------------------------------------
def _lm_data(s, seq):
    return common.lm_data(None, s["max_test_tokens"], s["vocab"], s["batch"], seq)


def _repeat(arrays, n):
    import numpy as np

    reps = -(-n // len(arrays[0]))
    return [np.concatenate([a] * reps)[:n] for a in arrays]


def build_transformer(vocab, seq, d, heads, ffn, layers):
    import keras

    inputs = keras.Input((seq,), dtype="int32")
    import keras_sketch

    h = keras_sketch.layers.Embedding(vocab, d, name="embedding")(inputs)
    positions = keras_sketch.layers.Embedding(seq, d, name="positions")(keras.ops.arange(seq)[None, :])
    h = h + positions
    for i in range(layers):
        a = keras.layers.LayerNormalization(name=f"ln_a{i}")(h)
        a = keras.layers.MultiHeadAttention(heads, d // heads, name=f"attention_{i}")(a, a, use_causal_mask=True)
        h = h + a
        f = keras.layers.LayerNormalization(name=f"ln_f{i}")(h)
        f = keras.layers.Dense(ffn, activation="gelu", name=f"ffn_in{i}")(f)
        h = h + keras.layers.Dense(d, name=f"ffn_out{i}")(f)
    h = keras.layers.LayerNormalization(name="ln_out")(h)
    return keras.Model(inputs, keras.layers.Dense(vocab, name="softmax")(h))


def load_task(task, s, seed):
    """``(build_model, loss, (x, y), (tx, ty), evaluate, description)``."""
    import keras
    import numpy as np

    import keras_sketch

    if task in ("lstm", "transformer"):
        from common import build_lm, lm_loss

        seq = s["bptt"] if task == "lstm" else s["seq"]
        data = _lm_data(s, seq)
        if task == "lstm":
            def build():
                return build_lm(data["vocab"], s["embed"], s["hidden"], steps=seq)
        else:
            def build():
                return build_transformer(data["vocab"], seq, s["d"], s["heads"], s["ffn"], s["layers"])

        def evaluate(model):
            loss = model.evaluate(data["tx"], data["ty"], batch_size=s["batch"], verbose=0)
            return math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf")

        return build, lm_loss(), (data["x"], data["y"]), evaluate, data["desc"]
    if task == "cnn":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype("float32")[..., None]
        labels = digits.target.astype("int32")
        order = np.random.default_rng(seed).permutation(len(images))
        cut = int(0.8 * len(images))
        x, y = images[order[:cut]], labels[order[:cut]]
        tx, ty = images[order[cut:]], labels[order[cut:]]

        def build():
            return keras.Sequential([
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10),
            ])

        def evaluate(model):
            logits = model.predict(tx, batch_size=256, verbose=0)
            return float(np.mean(np.argmax(logits, -1) == ty))

        desc = (f"scikit-learn load_digits (1,797 real 8x8 scans), train {len(x)} / evaluate {len(tx)} "
                f"(80/20, seed {seed})")
        return build, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y), evaluate, desc
    if task == "recsys":
        rng = np.random.default_rng(seed + 1)
        users, items, rank = s["users"], s["items"], s["rank"]
        pu = rng.normal(size=(users, rank)).astype("float32") / rank ** 0.25
        qi = rng.normal(size=(items, rank)).astype("float32") / rank ** 0.25
        ub, ib = rng.normal(0, 0.3, users).astype("float32"), rng.normal(0, 0.3, items).astype("float32")

        def zipf_ids(n, size):  # Zipf ranks shuffled onto ids
            p = 1.0 / np.arange(1, size + 1) ** s["zipf"]
            return rng.permutation(size)[rng.choice(size, n, p=p / p.sum())]

        def sample(n):
            u, i = zipf_ids(n, users), zipf_ids(n, items)
            r = np.sum(pu[u] * qi[i], 1) + ub[u] + ib[i] + rng.normal(0, s["noise"], n)
            return np.stack([u, i], 1).astype("int32"), r.astype("float32")[:, None]

        x, y = sample(s["n_train"])
        tx, ty = sample(s["n_test"])

        def build():
            ids = keras.Input((2,), dtype="int32")
            u, i = ids[:, 0], ids[:, 1]
            init = keras.initializers.RandomNormal(stddev=s["init"])  # off the saddle at 0
            Embedding = keras_sketch.layers.Embedding  # gathers rows; catch_up reads them caught up
            eu = Embedding(users, s["dim"], embeddings_initializer=init, name="user_embedding")(u)
            ei = Embedding(items, s["dim"], embeddings_initializer=init, name="item_embedding")(i)
            bu = Embedding(users, 1, name="user_bias")(u)
            bi = Embedding(items, 1, name="item_bias")(i)
            out = keras.ops.sum(eu * ei, axis=1, keepdims=True) + bu + bi
            return keras.Model(ids, out)

        def evaluate(model):
            pred = model.predict(tx, batch_size=4096, verbose=0)
            return float(np.sqrt(np.mean((pred - ty) ** 2)))

        desc = (f"synthetic: {users:,} users x {items:,} items, Zipf({s['zipf']}) ids, planted rank-{rank} "
                f"ratings + N(0, {s['noise']}) noise; train {len(x):,} pairs / evaluate {len(tx):,} fresh pairs "
                f"(noise floor RMSE {s['noise']})")
        return build, keras.losses.MeanSquaredError(), (x, y), evaluate, desc
    raise ValueError(f"`--task` must be one of {sorted(TASKS)}, got {task!r}.")


def plan_signature(setup, name, lr, clipnorm):
    """What a budgeted optimizer would build (bytes and per-slot kinds), or None."""
    import keras

    if not name.startswith(tuple(f"{e}_" for e in ESTIMATORS)):
        return None
    model = setup[0]()
    optimizer = make_optimizer(name, lr, clipnorm)
    optimizer.build(model.trainable_variables)
    rows = optimizer.memory_report().rows
    keras.backend.clear_session()
    import json

    return json.loads(json.dumps([[r["variable"], sorted([k, v[0], list(v[1])] for k, v in r["states"].items())]
                                  for r in rows]))


def train(task, setup, s, name, lr, seed, evals, clipnorm, make=None, after_chunk=None, order_seed=None):
    """One run: ``evals`` chunks of ``model.fit``, the held-out score after
    each.  ``make(name, lr, clipnorm)`` builds the optimizer (default: this
    study's ``make_optimizer``); ``after_chunk(optimizer)`` runs before each
    evaluation (lazy_study flushes catch-up rows there).  With
    ``order_seed`` the shuffled tasks' examples are permuted by NumPy from
    that seed instead of by ``fit(shuffle=True)``, whose order was seen to
    depend on what ran before in the same process."""
    import keras
    import numpy as np

    build, loss, (x, y), evaluate, _ = setup
    keras.utils.set_random_seed(seed)
    model = build()
    optimizer = (make or make_optimizer)(name, lr, clipnorm)
    model.compile(optimizer=optimizer, loss=loss)
    batch, steps = s["batch"], s["steps"]
    x, y = _repeat([x, y], steps * batch)
    scores, losses = [], []
    chunk = -(-steps // evals)
    start = time.perf_counter()
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        xs, ys = x[done * batch:(done + n) * batch], y[done * batch:(done + n) * batch]
        shuffle = task in ("cnn", "recsys")
        if shuffle and order_seed is not None:
            order = np.random.default_rng([order_seed, done]).permutation(len(xs))
            xs, ys, shuffle = xs[order], ys[order], False
        h = model.fit(xs, ys, batch_size=batch, epochs=1, shuffle=shuffle, verbose=0)
        losses.append(float(h.history["loss"][-1]))
        if after_chunk is not None:
            after_chunk(optimizer)
        scores.append(evaluate(model))
        done += n
    seconds = time.perf_counter() - start
    higher = TASKS[base(task)][1]
    finite = [v for v in scores if math.isfinite(v)]
    best = (max(finite) if higher else min(finite)) if finite else float("nan" if higher else "inf")
    from keras_sketch.memory import keras_state_bytes

    out = dict(score=best, scores=scores, train_loss=losses, state_bytes=int(keras_state_bytes(optimizer)),
               seconds=seconds, steps=int(optimizer.iterations.numpy()))
    if hasattr(optimizer, "memory_report") and getattr(optimizer, "state_budget", None):
        report = optimizer.memory_report()
        out["plan"] = {r["variable"]: {k: v[0] for k, v in r["states"].items()} for r in report.rows}
        out["budget_ratio"] = report.ratio
    return out


# -- storage --------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def store(path, task, key, value):
    """Merges one field of one task into the shared JSON under a lock."""
    with _locked(path):
        results = common.load_json(path, {})
        node = results.setdefault("tasks", {}).setdefault(task, {})
        *parents, leaf = key
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
        common.save_json(path, results)
        return results


# -- report ---------------------------------------------------------------------
def base(task):
    """The task of a results key: ``lstm`` for ``lstm`` and ``lstm seed 1``
    (seeds other than 0 are stored under their own key)."""
    return task.split(" seed ")[0]


def _best(runs, higher):
    ok = {lr: r for lr, r in runs.items() if math.isfinite(r["score"])}
    if not ok:
        return None
    return (max if higher else min)(ok, key=lambda lr: ok[lr]["score"])


def summary(task, t):
    """Rows ``(name, state bytes, state/Adam, best lr, score, ratio, score at Adam's lr, ratio)``."""
    higher = TASKS[base(task)][1]
    runs = t.get("runs", {})
    if "adam" not in runs or _best(runs["adam"], higher) is None:
        return None, []
    adam_lr = _best(runs["adam"], higher)
    adam = runs["adam"][adam_lr]
    rows = []
    for name in CONFIGS:
        r = runs.get(name)
        if not r:
            continue
        lr = _best(r, higher)
        if lr is None:
            lr = next(iter(r))
        own = r[lr]
        at = r.get(adam_lr)
        rows.append(dict(
            name=name, state_bytes=own["state_bytes"], state_ratio=own["state_bytes"] / adam["state_bytes"],
            best_lr=float(lr), score=own["score"], ratio=own["score"] / adam["score"],
            at_adam=at["score"] if at else None, at_adam_ratio=at["score"] / adam["score"] if at else None,
            lrs=sorted(r, key=float), per_lr={k: v["score"] for k, v in r.items()},
        ))
    return float(adam_lr), rows


def task_header(title, t, adam_lr):
    """A task's heading, data, settings and commands lines (this study's
    tables and lazy_study's)."""
    settings = ", ".join(f"{k}={v}" for k, v in t["settings"].items())
    return [
        f"### {title}",
        "",
        f"Data: {t.get('data', '')}. Settings: {settings}. Keras Adam's best lr: {adam_lr:g}.",
        "Commands: " + "; ".join(f"`{c}`" for c in t.get("commands", [])),
        "",
    ]


def report(results):
    lines = [
        "## Budget study: quality versus optimizer state (benchmarks/budget_study.py)",
        "",
        "Each row: one optimizer on one task, same model, data order and seed, shared learning-rate grid; "
        "the score is the best held-out score over the evaluations during training. \"vs Adam\" divides by "
        "Keras Adam's best score in the same run (perplexity and RMSE: lower is better, so < 1 beats Adam; "
        "accuracy: higher is better). \"at Adam's lr\" is the configuration at Adam's best learning rate. "
        "State bytes: every optimizer variable but the step counter and learning rate. The machine was "
        "shared (2 cores, several other jobs), so no timings are reported.",
        "",
    ]
    for task, t in results.get("tasks", {}).items():
        metric, higher, _, _ = TASKS[base(task)]
        adam_lr, rows = summary(task, t)
        if not rows:
            continue
        lines += task_header(f"{task}: {metric} ({'higher' if higher else 'lower'} is better)", t, adam_lr) + [
            "| optimizer | state bytes | state / Adam | best lr | score at each lr | best | vs Adam | "
            "at Adam's lr | vs Adam at Adam's lr |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            per = ", ".join(f"{float(k):g}: {r['per_lr'][k]:.4g}" for k in r["lrs"])
            at = "-" if r["at_adam"] is None else f"{r['at_adam']:.4g}"
            atr = "-" if r["at_adam_ratio"] is None else f"{r['at_adam_ratio']:.3f}"
            lines.append(f"| `{r['name']}`: {DESCRIPTIONS[r['name']]} | {r['state_bytes']:,} | "
                         f"{r['state_ratio']:.4f} | {r['best_lr']:g} | {per} | {r['score']:.4g} | "
                         f"{r['ratio']:.3f} | {at} | {atr} |")
        lines.append("")
    lines += shipped_table(results)
    if results.get("machine"):
        lines.append(f"Machine: {common.machine_line(results['machine'])}.")
    lines.append(f"Plot: `{PLOT.relative_to(common.ROOT)}` (quality at each optimizer's best lr vs state bytes).")
    return "\n".join(lines)


def shipped(task, t, budget):
    """The study row that is the shipped planner's plan at ``budget`` (rules 3-4:
    factored if it fits, else factored with the long vectors hashed; a
    factored plan does not depend on the budget, so a feasible ``fac_0.02``
    is also the plan at 0.1)."""
    if budget == 1.0:
        return "cs_1.0"
    infeasible, runs = t.get("infeasible", {}), t.get("runs", {})
    fac = f"fac_{budget}"
    if fac in infeasible:
        return f"fs_{budget}"
    if fac not in runs and "fac_0.02" in runs and budget > 0.02:
        return "fac_0.02"
    return fac


def shipped_table(results):
    lines = ["### The shipped planner (`CSAdam(state_budget=b)`), ratio against Keras Adam at Adam's lr", "",
             "Rows of the tables above that are the planner's plan at each budget "
             "(rule 3: factored if every matrix's factored form fits, else rule 4: factored with every long "
             "vector hashed into one common number of buckets). Keys `<task> seed N` are the same task "
             "with another seed (data draw, split and initialization).",
             "", "| task | " + " | ".join(f"b = {b}" for b in BUDGETS) + " |",
             "|---|" + "---:|" * len(BUDGETS)]
    for task, t in results.get("tasks", {}).items():
        _, rows = summary(task, t)
        by_name = {r["name"]: r for r in rows}
        cells = []
        for b in BUDGETS:
            r = by_name.get(shipped(task, t, b))
            if r is None or r["at_adam_ratio"] is None:
                cells.append("not run")
            else:
                cells.append(f"{r['at_adam_ratio']:.3f} (`{r['name']}`, state {r['state_ratio']:.4f})")
        if rows:
            lines.append(f"| {task} ({TASKS[base(task)][0]}) | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(results, path=PLOT):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in results.get("tasks", {}) if summary(t, results["tasks"][t])[1]]
    if not tasks:
        return None
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        _, rows = summary(task, results["tasks"][task])
        higher = TASKS[base(task)][1]
        low, high = (0.9, 1.05) if higher else (0.6, 1.6)  # off-scale points are drawn at the edge

        def clip(v):
            return min(max(v, low), high)

        for r in rows:
            kind = r["name"].split("_")[0]
            marker = {"cm": "o", "fac": "s", "fs": "*", "fsub": "X", "mix": "P", "cs": "D"}.get(kind, "^")
            off = clip(r["ratio"]) != r["ratio"]
            label = r["name"] + (f" ({r['ratio']:.3g}, off scale)" if off else "")
            ax.scatter(r["state_ratio"], clip(r["ratio"]), marker=marker, label=label)
            if r["at_adam_ratio"] is not None and kind in ("cm", "fac", "fs", "fsub", "mix"):
                ax.scatter(r["state_ratio"], clip(r["at_adam_ratio"]), marker=marker, facecolors="none",
                           edgecolors="gray")
        ax.set_ylim(low - 0.02 * (high - low), high + 0.02 * (high - low))
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("optimizer state / Adam's")
        ax.set_ylabel(f"{TASKS[base(task)][0]} / Adam's")
        ax.set_title(task)
        ax.legend(fontsize=6)
    fig.suptitle("Quality vs optimizer state (filled: own best lr; hollow: Adam's lr)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS))
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {CONFIGS}")
    p.add_argument("--lrs", default="", help="comma-separated subset of the task's grid (default: all)")
    p.add_argument("--steps", type=int, default=0, help="override the task's steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evals", type=int, default=2)
    p.add_argument("--clipnorm", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="TensorFlow intra/inter-op threads")
    p.add_argument("--quick", action="store_true", help="tiny sizes (tests); results go to --out")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--no-markdown", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    if not a.report_only:
        if not a.task:
            p.error("--task is required unless --report-only")
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(a.threads)
            tf.config.threading.set_inter_op_parallelism_threads(a.threads)
        except RuntimeError:  # TensorFlow already initialized (e.g. under pytest): keep its threads
            pass
        common.quiet_tf()
        metric, higher, grid, settings = TASKS[a.task]
        key = a.task if a.seed == 0 else f"{a.task} seed {a.seed}"  # where the runs are stored
        settings = dict(settings, **(QUICK[a.task] if a.quick else {}), seed=a.seed, evals=a.evals,
                        clipnorm=a.clipnorm)
        if a.steps:
            settings["steps"] = a.steps
        lrs = [float(x) for x in a.lrs.split(",")] if a.lrs else list(grid)
        results = common.load_json(out, {})
        t = results.get("tasks", {}).get(key, {})
        if t.get("settings") != settings:
            with _locked(out):
                results = common.load_json(out, {})
                results.setdefault("tasks", {})[key] = {"settings": settings, "runs": {}, "commands": []}
                common.save_json(out, results)
            t = results["tasks"][key]
        command = "python benchmarks/budget_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
        if command not in t.get("commands", []):
            store(out, key, ("commands",), t.get("commands", []) + [command])
        with _locked(out):
            results = common.load_json(out, {})
            results["machine"] = common.machine_info()
            common.save_json(out, results)
        print(common.machine_line(results["machine"]), flush=True)
        setup = load_task(a.task, settings, a.seed)
        store(out, key, ("data",), setup[-1])
        print(setup[-1], flush=True)
        names = list(filter(None, a.configs.split(",")))
        for name in names:
            if name not in CONFIGS:
                p.error(f"unknown config {name!r}; choose from {CONFIGS}")
        # Adam first on the whole grid; then every other configuration at Adam's best lr (the
        # targets are defined there), then at the other rates.
        queue = [("adam", lr) for lr in lrs] if "adam" in names else []
        queue += [None]  # placeholder: ordered once Adam's best lr is known
        for item in queue:
            if item is None:
                done = common.load_json(out, {}).get("tasks", {}).get(key, {}).get("runs", {})
                best = _best(done.get("adam", {}), higher)
                order = sorted(lrs, key=lambda lr: (repr(lr) != best, lrs.index(lr)))
                queue += [(n, lr) for lr in order for n in names if n != "adam"]
                continue
            name, lr = item
            node = common.load_json(out, {}).get("tasks", {}).get(key, {})
            done = node.get("runs", {})
            if repr(lr) in done.get(name, {}) or name in node.get("infeasible", {}):
                continue
            try:
                signature = plan_signature(setup, name, lr, a.clipnorm)
                twin = [n for n, rs in done.items() if signature is not None
                        and rs.get(repr(lr), {}).get("signature") == signature]
                if twin:  # the same plan already ran (e.g. factored at 0.02 and at 0.005)
                    r = dict(done[twin[0]][repr(lr)], same_as=twin[0])
                else:
                    r = train(a.task, setup, settings, name, lr, a.seed, a.evals, a.clipnorm)
                    r["signature"] = signature
            except ValueError as err:  # an infeasible budget for this model
                print(f"{key} {name}: {err}", flush=True)
                store(out, key, ("infeasible", name), str(err))
                continue
            store(out, key, ("runs", name, repr(lr)), r)
            print(f"{key:<11} {name:<10} lr {lr:<7g} {metric} {r['score']:.4g} (evals "
                  f"{', '.join(f'{v:.4g}' for v in r['scores'])})  state {r['state_bytes']:>11,} B  "
                  f"{r['seconds']:.0f}s", flush=True)
    results = common.load_json(out, {})
    text = report(results)
    print(text)
    if not a.no_markdown and not a.quick:
        common.replace_section(common.RESULTS_MD, "budget_study", text)
        plot(results)
    return results


if __name__ == "__main__":
    main()
