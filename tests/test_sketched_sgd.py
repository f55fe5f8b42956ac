"""SketchedSGD: exactness without compression, a NumPy reference of the
papers' algorithms, arguments, save/resume, MirroredStrategy and
MultiWorkerMirroredStrategy with two localhost worker processes."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks
from keras_sketch.distributed import free_port, local_tf_config
from keras_sketch.optimizers.sketched_sgd import P_CANDIDATES
from tests import sketched_sgd_worker as worker

REPO = Path(__file__).resolve().parent.parent
P = 2**31 - 1


# --- NumPy reference, written from the papers ---------------------------------------------
# Shared with the package only by contract: the documented hash formula
# h_j(i) = ((a_j i + b_j) mod P) mod c, s_j(i) = 1 - 2 (((c_j i + d_j) mod P) mod 2),
# the coordinate order (variables in order, row-major), P_CANDIDATES (two_round: 2) candidates per update
# coordinate, and ties in top-k going to the lower coordinate.


class NpCountSketch:
    def __init__(self, params, d, columns):
        self.rows, self.columns = len(params), columns
        self.bucket = np.array([[((int(a) * i + int(b)) % P) % columns for i in range(d)] for a, b, _, _ in params])
        self.sign = np.array([[1.0 - 2.0 * (((int(c) * i + int(e)) % P) % 2) for i in range(d)] for _, _, c, e in params])

    def sketch(self, x):
        table = np.zeros((self.rows, self.columns))
        for j in range(self.rows):
            np.add.at(table[j], self.bucket[j], self.sign[j] * x)
        return table

    def unsketch(self, table):
        return np.median([self.sign[j] * table[j, self.bucket[j]] for j in range(self.rows)], axis=0)

    def zero(self, table, coords):
        for j in range(self.rows):
            table[j, self.bucket[j, coords]] = 0.0


def top(values, n):
    return np.argsort(-np.abs(values), kind="stable")[:n]


class NpSketchedSGD:
    def __init__(self, w, mode, lr, rho, k, replicas, params=None, columns=None, nesterov=False):
        self.w, self.mode, self.lr, self.rho, self.k, self.nesterov = w.astype(np.float64), mode, lr, rho, k, nesterov
        d = len(w)
        if mode == "fetchsgd":
            self.cs = NpCountSketch(params, d, columns)
            self.U = np.zeros((len(params), columns))
            self.E = np.zeros((len(params), columns))
        else:
            self.cs = NpCountSketch(params, d, columns) if mode == "two_round" else None
            self.u = np.zeros((replicas, d))
            self.e = np.zeros((replicas, d))

    def step(self, grads):  # grads: [replicas, d]
        lr, rho = self.lr, self.rho
        if self.mode == "fetchsgd":
            S = sum(self.cs.sketch(g) for g in grads)
            self.U = rho * self.U + S
            self.E += lr * (S + rho * self.U if self.nesterov else self.U)
            est = self.cs.unsketch(self.E)
            chosen = top(est, self.k)
            delta = est[chosen]
            self.cs.zero(self.U, chosen)
            self.cs.zero(self.E, chosen)
            self.w[chosen] -= delta
            return
        self.u = rho * self.u + grads
        self.e += lr * (grads + rho * self.u if self.nesterov else self.u)
        update = np.zeros_like(self.w)
        if self.mode == "two_round":
            S = sum(self.cs.sketch(e) for e in self.e)
            candidates = top(self.cs.unsketch(S), min(P_CANDIDATES * self.k, len(self.w)))
            exact = self.e[:, candidates].sum(axis=0)  # the second round
            best = top(exact, self.k)
            chosen = candidates[best]
            update[chosen] = exact[best]
            self.u[:, chosen] = 0.0
            self.e[:, chosen] = 0.0
        else:  # local top-k with error feedback, all-gathered
            for r in range(len(grads)):
                mine = top(self.e[r], self.k)
                update[mine] += self.e[r, mine]
                self.u[r, mine] = 0.0
                self.e[r, mine] = 0.0
        self.w -= update


def dense_gradient(g, shapes):
    emb = np.zeros(shapes[0])
    np.add.at(emb, g["emb_idx"], g["emb_val"])
    parts = [emb.ravel()] + [g[f"dense{i}"].ravel() for i in range(1, len(shapes))]
    return np.concatenate(parts).astype(np.float64)


def check_against_reference(results, prefix, mode, replicas):
    cfg = worker.MODES[mode]
    sizes = results[f"{prefix}/shapes"]
    model = worker.make_model()
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    assert [int(np.prod(s)) for s in shapes] == list(sizes)
    params = results[f"{prefix}/hash_params"] if mode != "local_topk" else None
    ref = NpSketchedSGD(results[f"{prefix}/w0"], mode, 0.1, 0.9, cfg["k"], replicas, params, cfg.get("columns"))
    for t in range(worker.REF_STEPS):
        grads = []
        for r in range(replicas):
            g = {key.split("/")[-1]: results[key] for key in results if key.startswith(f"{prefix}/g/{t}/{r}/")}
            grads.append(dense_gradient(g, shapes))
        ref.step(np.stack(grads))
        np.testing.assert_allclose(results[f"{prefix}/w/{t}"], ref.w, rtol=1e-5, atol=1e-6, err_msg=f"{mode} step {t}")
    assert np.abs(ref.w - results[f"{prefix}/w0"]).max() > 0.1  # the updates happened


@pytest.mark.parametrize("mode", list(worker.MODES))
def test_single_device_agrees_with_numpy_reference(mode):
    results = {}
    worker.run_synthetic(mode, tf.distribute.get_strategy(), results, "s")
    check_against_reference(results, "s", mode, replicas=1)


def test_nesterov_fetchsgd_agrees_with_numpy_reference():
    model = worker.make_model()
    variables = model.trainable_variables
    opt = ks.SketchedSGD(0.1, momentum=0.8, nesterov=True, rows=3, columns=50, k=9, seed=2)
    opt.build(variables)
    w0 = np.concatenate([v.numpy().ravel() for v in variables])
    ref = NpSketchedSGD(w0, "fetchsgd", 0.1, 0.8, 9, 1, opt.hash_params.numpy(), 50, nesterov=True)
    rng = np.random.default_rng(0)
    for _ in range(5):
        grads = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
        opt.apply(grads, variables)
        ref.step(np.concatenate([g.ravel() for g in grads])[None].astype(np.float64))
        np.testing.assert_allclose(np.concatenate([v.numpy().ravel() for v in variables]), ref.w, rtol=1e-5, atol=1e-6)


# --- compression=None is keras.optimizers.SGD -----------------------------------------------


def test_uncompressed_equals_keras_sgd_for_20_steps():
    got = []
    for make in (lambda: keras.optimizers.SGD(0.05, momentum=0.9), lambda: ks.SketchedSGD(0.05, momentum=0.9)):
        model, _, _ = worker.fit_weights(make, tf.distribute.get_strategy())
        got.append(worker.weights(model))
    assert len(got[0]) == 5
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)
    assert np.abs(got[0][0] - worker.weights(worker.make_model())[0]).max() > 1e-3


# --- arguments, config, report -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(compression=1), "compression"),
        (dict(compression=0.5), "compression"),
        (dict(compression=10, rows=0), "rows"),
        (dict(compression=10, k=0), "k"),
        (dict(compression=10, columns=0), "columns"),
        (dict(compression=10, mode="sketchy"), "mode"),
        (dict(rows=3), "columns"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ks.SketchedSGD(**kwargs)


def test_k_larger_than_the_parameter_count_raises_at_build():
    model = worker.make_model()
    d = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    opt = ks.SketchedSGD(columns=20, k=d + 1)
    with pytest.raises(ValueError, match="`k`"):
        opt.build(model.trainable_variables)
    assert not opt.built


@pytest.mark.parametrize("mode, ratio", [("fetchsgd", 4), ("two_round", 4), ("fetchsgd", 40), ("two_round", 40)])
def test_compression_rule_hits_the_ratio_counted_from_the_collective(mode, ratio):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((60,)), keras.layers.Dense(64), keras.layers.Dense(10)])
    variables = model.trainable_variables
    d = sum(int(np.prod(v.shape)) for v in variables)
    opt = ks.SketchedSGD(0.1, compression=ratio, mode=mode)
    assert opt.communication_report()["sent_bytes_per_step"] is None  # nothing sent yet
    opt.apply([tf.ones_like(v) for v in variables], variables)
    report = opt.communication_report()
    assert report["dense_bytes_per_step"] == 4 * d
    rows, columns = report["sketch_shape"]
    rounds = {c["round"]: c["bytes"] for c in report["collectives"]}
    assert rounds["sketch"] == 4 * rows * columns
    if mode == "two_round":
        assert rounds["candidates"] == 4 * report["candidates"] == 4 * P_CANDIDATES * report["k"]
    assert report["sent_bytes_per_step"] == sum(rounds.values())
    assert 0.9 * ratio < report["ratio"] < 1.1 * ratio, report
    assert max(int(np.prod(c["shape"])) for c in report["collectives"]) < d / 3


def test_get_config_round_trip():
    opt = ks.SketchedSGD(0.2, momentum=0.5, nesterov=True, compression=7, rows=3, mode="two_round", seed=9)
    config = opt.get_config()
    again = ks.SketchedSGD.from_config(config)
    for key in ("compression", "rows", "columns", "k", "mode", "seed", "momentum", "nesterov"):
        assert getattr(again, key) == getattr(opt, key), key
    assert config["compression"] == 7 and config["mode"] == "two_round"


# --- save / resume --------------------------------------------------------------------------------


def _compiled(mode):
    model = worker.make_model()
    kwargs = {} if mode is None else dict(compression=3, mode=mode)
    model.compile(ks.SketchedSGD(0.3, **kwargs), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("mode", ["fetchsgd", "two_round", "local_topk", None])
def test_keras_file_and_checkpoint_resume_bit_identical(mode, tmp_path):
    x, y = worker.data(96)
    model = _compiled(mode)
    model.fit(x[:48], y[:48], batch_size=16, verbose=0)
    model.save(tmp_path / "m.keras")
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    path = ckpt.write(str(tmp_path / "ckpt"))
    model.fit(x[48:], y[48:], batch_size=16, verbose=0, shuffle=False)
    expected = worker.weights(model) + [v.numpy() for v in model.optimizer.variables]

    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, ks.SketchedSGD) and loaded.optimizer.mode == model.optimizer.mode
    loaded.fit(x[48:], y[48:], batch_size=16, verbose=0, shuffle=False)

    restored = _compiled(mode)
    restored.optimizer.build(restored.trainable_variables)
    tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).read(path).assert_consumed()
    restored.fit(x[48:], y[48:], batch_size=16, verbose=0, shuffle=False)
    for run in (loaded, restored):
        got = worker.weights(run) + [v.numpy() for v in run.optimizer.variables]
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def test_loss_falls_and_fit_builds_the_documented_hashes():
    from keras_sketch.sketch import hash_params

    x, y = worker.data(256)
    for mode, sizes in worker.TRAIN_SIZES.items():
        model = worker.make_model()
        opt = ks.SketchedSGD(mode=mode, seed=5, **sizes)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        h = model.fit(x, y, batch_size=16, epochs=8, verbose=0)
        # model.fit builds the optimizer symbolically: the hashes must still be set
        np.testing.assert_array_equal(opt.hash_params.numpy(), hash_params(5, 0, opt.sketch_rows))
        assert h.history["loss"][-1] < 0.9 * h.history["loss"][0], (mode, h.history["loss"])


# --- tf.distribute (fresh processes: logical devices, worker clusters) ---------------------------


def _run(args, timeout, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tests.sketched_sgd_worker", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_mirrored_strategy_two_logical_cpus(tmp_path):
    out = tmp_path / "mirrored.npz"
    proc = _run(["mirrored", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = dict(np.load(out))
    assert int(r["replicas"]) == 2
    n = len([k for k in r if k.startswith("keras_mirrored/")])
    assert n == 5
    for i in range(n):
        np.testing.assert_array_equal(r[f"ours_mirrored/{i}"], r[f"keras_mirrored/{i}"])
        np.testing.assert_allclose(r[f"ours_mirrored/{i}"], r[f"keras_single/{i}"], rtol=1e-5, atol=1e-6)
    for mode in worker.MODES:
        check_against_reference(r, f"syn/{mode}", mode, replicas=2)
        assert float(r[f"syn/{mode}/spread"]) == 0.0, mode  # per-device weights bit-identical
    assert float(r["fit_fetchsgd/spread"]) == 0.0


def test_multi_worker_mirrored_two_localhost_workers(tmp_path):
    ports = [free_port(), free_port()]
    procs = []
    try:
        for index in range(2):
            env = {**os.environ, "TF_CONFIG": local_tf_config(ports, index)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.sketched_sgd_worker", "mwms", str(tmp_path / f"w{index}.npz")],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    w0, w1 = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    for mode in ("fetchsgd", "two_round"):
        assert int(w0["replicas"]) == 2
        np.testing.assert_array_equal(w0[f"{mode}/weights"], w1[f"{mode}/weights"])
        np.testing.assert_array_equal(w0[f"{mode}/losses"], w1[f"{mode}/losses"])
        losses = w0[f"{mode}/losses"]
        assert losses[-16:].mean() < 0.95 * losses[:16].mean(), (mode, losses)
        for w in (w0, w1):
            handed = w[f"{mode}/collective_bytes"]
            assert int(w[f"{mode}/sent"]) == int(handed.sum()) > 0
            assert int(handed.max()) * 2.5 < int(w[f"{mode}/dense"])  # nothing of gradient size
    # two_round's per-replica state across workers: gathered into one [replicas, d] array in
    # replica order, and every worker restores its own row bit for bit.
    for w, other in ((w0, w1), (w1, w0)):
        task = int(w["ckpt/task"])
        assert w["ckpt/before"].shape == (1, w["ckpt/saved"].shape[1]) and w["ckpt/saved"].shape[0] == 2
        np.testing.assert_array_equal(w["ckpt/saved"][task], w["ckpt/before"][0])
        np.testing.assert_array_equal(w["ckpt/saved"][1 - task], other["ckpt/before"][0])
        np.testing.assert_array_equal(w["ckpt/after"], w["ckpt/before"])
        np.testing.assert_array_equal(w["ckpt/momentum_after"], w["ckpt/momentum_before"])
    assert np.abs(w0["ckpt/before"] - w1["ckpt/before"]).max() > 1e-4  # the workers' states differ
