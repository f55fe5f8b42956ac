"""Benchmark of the fused sketch-update op against Keras optimizers (CPU).

    .venv/bin/python benchmarks/bench_fused.py [--repeats N] [--quick]

Dense: one step on a 4096 x 4096 kernel: fused CSAdam (default, and
beta_1=0) vs keras Adam (plain tf.function and jit_compile=True) vs keras
SGD with jit_compile=True (the memory-traffic floor: read gradient and
weight, write weight) vs our pure-TF path (fused=False).

Sparse: a 1M x 64 embedding, 4096 Zipf-distributed ids per step: fused
CSAdam vs keras Adam vs an exact lazy Adam (full-size state, scatter updates
of the touched rows only, written here in TF) vs our pure-TF sparse path,
and compact mode (``state_budget=0.02``: factored; ``0.005``: its row
factor hashed, planner rule 4).

Every step runs inside a tf.function (the way Keras's fit runs it); times are
medians over repeats, ratios are against baselines measured in the same run.
Results go to benchmarks/results/bench_fused.json and a section of
benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import platform
import sys

import common

tf = common.quiet_tf()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_sketch import fused  # noqa: E402
from keras_sketch.optimizers.adam import CSAdam  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(step, repeats):
    return common.median_time(step, repeats, warmup=3)


def keras_step(optimizer, var, grad, jit=False):
    optimizer.build([var])

    @tf.function(jit_compile=jit)
    def step():
        optimizer.apply_gradients([(grad, var)])
        return tf.constant(0)  # a tensor result makes the call wait for the step

    return lambda: step().numpy()


class LazyAdam:
    """Exact Adam with full-size state that updates only the touched rows."""

    def __init__(self, var, lr=0.001, b1=0.9, b2=0.999, eps=1e-7):
        self.var, self.lr, self.b1, self.b2, self.eps = var, lr, b1, b2, eps
        self.m = tf.Variable(tf.zeros_like(var))
        self.v = tf.Variable(tf.zeros_like(var))
        self.t = tf.Variable(0.0)

    def apply(self, grad):
        ids, pos = tf.unique(grad.indices)
        g = tf.math.unsorted_segment_sum(grad.values, pos, tf.shape(ids)[0])
        self.t.assign_add(1.0)
        m = self.b1 * tf.gather(self.m, ids) + (1 - self.b1) * g
        v = self.b2 * tf.gather(self.v, ids) + (1 - self.b2) * g * g
        self.m.scatter_update(tf.IndexedSlices(m, ids))
        self.v.scatter_update(tf.IndexedSlices(v, ids))
        alpha = self.lr * tf.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        self.var.scatter_sub(tf.IndexedSlices(alpha * m / (tf.sqrt(v) + self.eps), ids))


def dense_bench(repeats, n):
    rng = np.random.default_rng(0)
    init = rng.normal(size=(n, n)).astype("float32") * 0.01
    grad = tf.constant(rng.normal(size=(n, n)).astype("float32"))
    cases = {
        "fused CSAdam (default)": (lambda: CSAdam(fused=True), False),
        "fused CSAdam (beta_1=0)": (lambda: CSAdam(beta_1=0.0, fused=True), False),
        "pure-TF CSAdam (default)": (lambda: CSAdam(fused=False), False),
        "pure-TF CSAdam (beta_1=0)": (lambda: CSAdam(beta_1=0.0, fused=False), False),
        "keras Adam": (lambda: keras.optimizers.Adam(), False),
        "keras Adam (jit)": (lambda: keras.optimizers.Adam(), True),
        "keras SGD (jit)": (lambda: keras.optimizers.SGD(0.01), True),
    }
    out = {}
    for name, (make, jit) in cases.items():
        var = keras.Variable(init)
        out[name] = timed(keras_step(make(), var, grad, jit), repeats)
        print(f"  dense {name:28s} {out[name] * 1e3:9.2f} ms", flush=True)
        del var
    return out


def sparse_bench(repeats, rows, dim, k):
    rng = np.random.default_rng(0)
    init = (rng.normal(size=(rows, dim)) * 0.01).astype("float32")
    ids = ((rng.zipf(1.2, size=k) - 1) % rows).astype("int64")
    values = tf.constant(rng.normal(size=(k, dim)).astype("float32"))
    grad = tf.IndexedSlices(values, tf.constant(ids), tf.constant([rows, dim], tf.int64))
    out = {"unique ids per step": int(len(np.unique(ids)))}
    cases = {
        "fused CSAdam (default)": lambda: CSAdam(fused=True),
        "pure-TF CSAdam (default)": lambda: CSAdam(fused=False),
        # compact mode: rank-1 factored 2nd moment (0.02); its row factor hashed (0.005, rule 4)
        "CSAdam(state_budget=0.02)": lambda: CSAdam(state_budget=0.02),
        "CSAdam(state_budget=0.005)": lambda: CSAdam(state_budget=0.005),
        "keras Adam": lambda: keras.optimizers.Adam(),
    }
    for name, make in cases.items():
        var = keras.Variable(init)
        out[name] = timed(keras_step(make(), var, grad), repeats)
        print(f"  sparse {name:30s} {out[name] * 1e3:9.2f} ms", flush=True)
        del var
    var = tf.Variable(init)
    lazy = LazyAdam(var)
    step = tf.function(lambda: (lazy.apply(grad), tf.constant(0))[1])
    out["exact lazy Adam (TF scatter)"] = timed(lambda: step().numpy(), repeats)
    print(f"  sparse {'exact lazy Adam (TF scatter)':27s} "
          f"{out['exact lazy Adam (TF scatter)'] * 1e3:9.2f} ms", flush=True)
    return out


def table(dense, sparse, n, rows, dim, k):
    lines = [f"Dense {n} x {n} step (ms, median; ratio = baseline time / this time):", ""]
    lines += ["| optimizer | ms | vs keras Adam (jit) | vs keras SGD (jit) |", "|---|---:|---:|---:|"]
    for name, t in dense.items():
        lines.append(f"| {name} | {t * 1e3:.2f} | {dense['keras Adam (jit)'] / t:.2f}x "
                     f"| {dense['keras SGD (jit)'] / t:.2f}x |")
    lines += ["", f"Sparse {rows} x {dim} embedding, {k} Zipf ids/step "
              f"({sparse['unique ids per step']} unique):", ""]
    lines += ["| optimizer | ms | vs keras Adam | vs exact lazy Adam |", "|---|---:|---:|---:|"]
    for name, t in sparse.items():
        if name == "unique ids per step":
            continue
        lines.append(f"| {name} | {t * 1e3:.2f} | {sparse['keras Adam'] / t:.2f}x "
                     f"| {sparse['exact lazy Adam (TF scatter)'] / t:.2f}x |")
    return "\n".join(lines)


def targets(dense, sparse):
    """The issue's targets, met or missed, from this run's ratios."""
    rows = [
        ("default CSAdam >= 2x faster than keras Adam (jit)",
         dense["keras Adam (jit)"] / dense["fused CSAdam (default)"], 2.0),
        ("CSAdam(beta_1=0) within 1.5x of keras SGD (jit)",
         dense["keras SGD (jit)"] / dense["fused CSAdam (beta_1=0)"], 1 / 1.5),
        ("sparse CSAdam >= 30x faster than keras Adam",
         sparse["keras Adam"] / sparse["fused CSAdam (default)"], 30.0),
        ("sparse CSAdam within 1.5x of exact lazy Adam",
         sparse["exact lazy Adam (TF scatter)"] / sparse["fused CSAdam (default)"], 1 / 1.5),
    ]
    out = ["| target | measured speed ratio | needed | met |", "|---|---:|---:|---|"]
    for name, ratio, need in rows:
        out.append(f"| {name} | {ratio:.2f}x | {need:.2f}x | {'yes' if ratio >= need else 'NO'} |")
    return out


def write_results_md(text, meta):
    section = "\n".join([
        "## Fused sketch-update op (benchmarks/bench_fused.py)",
        "",
        f"Machine: {meta['machine']}; TensorFlow {meta['tensorflow']}, Keras {meta['keras']}, "
        f"Python {meta['python']}; op library: {meta['library']}.",
        f"Command: `{meta['command']}`",
        "",
        text,
        "",
        "Ratios > 1 mean the row is faster than the baseline.",
        "",
        *targets(meta["dense"], meta["sparse"]),
        "",
        "Why (bytes moved per dense step of 16.8M float32, 64 MiB each): keras SGD reads g and w "
        "and writes w (3 x 64 MiB); Adam adds m and v (7 x 64 MiB); fused CSAdam(beta_1=0) moves "
        "the same 3 x 64 MiB as SGD plus a 13 MiB sketch that stays in the L3 cache, and default CSAdam "
        "keeps an exact m (5 x 64 MiB). So the best possible default-CSAdam gain over XLA Adam is "
        "7/5 = 1.4x, below the 2x target by construction; the fused kernels are compute-bound on "
        "this 2-core Xeon VM, shared with other jobs while measured (per-element sqrt and division, query, bucket add, AVX2 at most since "
        "the shipped build may not assume AVX-512) while XLA's SGD is a pure stream. Both sparse "
        "paths merge duplicate ids with one tf.unique before the update, as the lazy baseline "
        "does (a static-shape sort-based merge is used only under XLA). See docs/fused_op.md.",
    ])
    common.replace_section(common.RESULTS_MD, "bench_fused", section)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--from-json", action="store_true",
                        help="rewrite the RESULTS.md section from results/bench_fused.json")
    args = parser.parse_args()
    if args.from_json:
        with open(os.path.join(HERE, "results", "bench_fused.json")) as f:
            saved = json.load(f)
        n = saved["sizes"]["dense"][0]
        rows, dim, k = saved["sizes"]["sparse"]
        meta = dict(saved["meta"], dense=saved["dense_seconds"], sparse=saved["sparse_seconds"])
        write_results_md(table(meta["dense"], meta["sparse"], n, rows, dim, k), meta)
        return
    if not fused.available():
        sys.exit(f"fused op unavailable: {fused.unavailable_reason()}")
    n, rows, dim, k = (512, 20000, 64, 512) if args.quick else (4096, 1_000_000, 64, 4096)
    dense = dense_bench(args.repeats, n)
    sparse = sparse_bench(args.repeats, rows, dim, k)
    text = table(dense, sparse, n, rows, dim, k)
    print(text)
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                   f"(tf intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or 'auto'})",
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "python": platform.python_version(), "library": os.path.basename(fused.library_path()),
        "command": "python " + " ".join(["benchmarks/bench_fused.py"] + sys.argv[1:]),
    }
    meta.update(dense=dense, sparse=sparse)
    print("\n".join(targets(dense, sparse)))
    if not args.no_write and not args.quick:
        common.save_json(common.RESULTS_DIR / "bench_fused.json",
                         {"meta": {k: v for k, v in meta.items() if k not in ("dense", "sparse")},
                          "dense_seconds": dense, "sparse_seconds": sparse,
                          "sizes": {"dense": [n, n], "sparse": [rows, dim, k]}})
        write_results_md(text, meta)


if __name__ == "__main__":
    main()
