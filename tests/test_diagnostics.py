"""Approximation diagnostics on small synthetic streams and a small model."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sketch import diagnostics as dg


def stream(rng, shape, steps, heavy=True):
    for _ in range(steps):
        g = rng.standard_t(2, size=shape) if heavy else rng.normal(size=shape)
        yield (g * (rng.random(shape) < 0.5)).astype(np.float32)  # zeros too


def run(shadow, shapes, steps, seed=0, record=(1,)):
    rng = np.random.default_rng(seed)
    variables = [tf.Variable(tf.zeros(s), name=f"v{i}") for i, s in enumerate(shapes)]
    shadow.build(variables)
    exact = [np.zeros(s) for s in shapes]
    streams = [stream(rng, s, steps) for s in shapes]
    for step in range(1, steps + 1):
        grads = [next(s) for s in streams]
        for e, g in zip(exact, grads):
            e += g.astype(np.float64) ** 2
        shadow.observe([tf.constant(g) for g in grads], variables)
        if step in record:
            shadow.record(step)
    return variables, exact


def test_exact_shadow_and_lossless_methods_have_zero_error():
    methods = {
        "cs_full": dict(kind="count_sketch", depth=1, memory=1.0),  # width >= rows: identity
        "cm_full": dict(kind="count_min", depth=1, memory=1.0),
    }
    shadow = dg.Shadow(methods)
    variables, exact = run(shadow, [(40, 6), (5, 30)], 12, record=(1, 12))
    for var, e in zip(variables, exact):
        np.testing.assert_allclose(shadow.exact[var.name].acc.numpy(), e, rtol=1e-5)
    for record in shadow.records:
        for name in methods:
            m = record["methods"][name]["all"]
            assert m["rel_l2"] == 0.0 and m["topk_rel_l2"] == 0.0
            assert m["over_rate"] == 0.0 and m["under_rate"] == 0.0
    mem = shadow.memory()
    assert mem["cs_full"]["floats"] == mem["exact"]["floats"] == 40 * 6 + 5 * 30
    assert all("identity" in v["dims"] for v in mem["cs_full"]["variables"].values())


def test_upper_bounds_and_equal_memory():
    """Count-min and SM3 never underestimate AdaGrad's sum; cleaning does;
    SM3 is exact at step 1; every method uses about SM3's memory."""
    methods = dict(dg.DEFAULT_METHODS)
    methods["count_min_clean"] = dict(kind="count_min", depth=3, cleaning=(0.5, 4))
    methods["sm3_I"] = dict(kind="sm3_I")
    shadow = dg.Shadow(methods, top_k=10)
    run(shadow, [(300, 8), (4, 5, 16)], 20, record=(1, 5, 20))
    first, *rest = shadow.records
    assert first["methods"]["sm3"]["all"]["rel_l2"] < 1e-7
    for record in shadow.records:
        got = record["methods"]
        for name in ("count_min", "sm3", "sm3_I"):
            assert got[name]["all"]["under_rate"] == 0.0, (record["step"], name)
        assert got["count_min"]["all"]["over_rate"] > 0.5  # tiny table: collisions everywhere
        assert got["count_sketch"]["all"]["negative_rate"] >= 0.0
    last = shadow.records[-1]["methods"]
    assert last["count_min_clean"]["all"]["under_rate"] > 0.0  # cleaning scales the sketch down
    assert last["sm3"]["all"]["rel_l2"] <= last["sm3_I"]["all"]["rel_l2"] + 1e-9  # nu_II <= nu_I
    mem = shadow.memory()
    sm3 = mem["sm3"]["floats"]
    assert sm3 == (300 + 8) + (4 + 5 + 16)
    assert mem["rank1"]["floats"] == (300 + 8) + (20 + 16)  # rank 1 sees [4 * 5, 16]
    for name in ("count_sketch", "count_min"):  # [300, 8]: 3 x 12 x 8 <= 308 floats
        assert 154 <= mem[name]["variables"]["v0:0"]["floats"] <= 308
        assert mem[name]["variables"]["v1:0"]["dims"] == "3x1x16"  # never below depth x dim


def test_rank1_exact_on_a_rank1_stream_and_sketch_error_falls_with_memory():
    methods = {
        "rank1": dict(kind="rank1"),
        "cs_small": dict(kind="count_sketch", depth=3),
        "cs_big": dict(kind="count_sketch", depth=3, memory=0.5),
    }
    shadow = dg.Shadow(methods)
    var = tf.Variable(tf.zeros([200, 6]), name="w")
    shadow.build([var])
    rng = np.random.default_rng(1)
    a, b = rng.random(200) + 0.1, rng.random(6) + 0.1
    for _ in range(5):  # g^2 = c * a b^T: the accumulator stays rank 1
        c = rng.random() + 0.5
        shadow.observe([tf.constant(np.sqrt(c * np.outer(a, b)).astype(np.float32))], [var])
    got = shadow.record()["methods"]
    assert got["rank1"]["all"]["rel_l2"] < 1e-5
    assert got["cs_big"]["all"]["rel_l2"] < got["cs_small"]["all"]["rel_l2"]


def test_sparse_gradients_equal_dense_and_ema_target():
    shadow_s, shadow_d = dg.Shadow(beta=0.9), dg.Shadow(beta=0.9)
    var = tf.Variable(tf.zeros([50, 4]), name="e")
    rng = np.random.default_rng(2)
    ema = np.zeros((50, 4))
    for _ in range(6):
        ids = rng.integers(0, 50, size=7)
        vals = rng.normal(size=(7, 4)).astype(np.float32)
        dense = np.zeros((50, 4), np.float32)
        np.add.at(dense, ids, vals)
        ema = 0.9 * ema + 0.1 * dense.astype(np.float64) ** 2
        shadow_s.observe([tf.IndexedSlices(tf.constant(vals), tf.constant(ids), tf.constant([50, 4]))], [var])
        shadow_d.observe([tf.constant(dense)], [var])
    np.testing.assert_allclose(shadow_s.exact["e:0"].acc.numpy(), ema, rtol=1e-5, atol=1e-8)
    rs, rd = shadow_s.record(), shadow_d.record()
    assert rs["step"] == 6
    for name in dg.DEFAULT_METHODS:
        assert rs["methods"][name]["all"] == pytest.approx(rd["methods"][name]["all"])


def test_error_metrics_values():
    exact = np.array([4.0, 1.0, 0.0, 9.0])
    m = dg.error_metrics(np.array([4.0, 2.0, 0.0, 9.0]), exact, top_k=2)
    assert m["rel_l2"] == pytest.approx(1 / np.sqrt(98))
    assert m["topk_rel_l2"] == 0.0  # the two largest (9, 4) are exact
    assert m["over_rate"] == 0.25 and m["under_rate"] == 0.0
    assert m["step_ratio_p50"] == pytest.approx(1.0)
    assert dg.error_metrics(np.array([1e-7]), np.array([3e-7]))["step_ratio_p50"] == pytest.approx(np.sqrt(2))
    m = dg.error_metrics(np.array([1.0, 1.0, 0.0, -9.0]), exact, top_k=1)
    assert m["topk_rel_l2"] == pytest.approx(2.0) and m["under_rate"] == 0.5 and m["negative_rate"] == 0.25
    with pytest.raises(ValueError, match="kind"):
        dg.Shadow({"x": dict(kind="bloom")})


def test_callback_shadows_what_the_optimizer_sees(tmp_path):
    """Under model.fit, with clipping, the exact shadow equals Keras Adagrad's
    own accumulators; JSON and figures are written."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    h = keras.layers.Dense(16, activation="tanh")(inp)
    model = keras.Model(inp, keras.layers.Dense(3)(h))
    opt = keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.0, clipnorm=0.05)
    model.compile(opt, "mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 12)).astype(np.float32), rng.normal(size=(96, 3)).astype(np.float32)
    path = tmp_path / "shadow.json"
    cb = dg.ShadowCallback(record_steps=[1, 4], json_path=str(path))
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb])
    shadow = cb.shadow
    assert shadow.variables == [v.path for v in model.trainable_variables if len(v.shape) == 2]
    assert len(shadow.variables) == 2  # the kernels; biases are not compressed
    for var, acc in zip(model.trainable_variables, opt._accumulators):
        if var.path in shadow.exact:
            np.testing.assert_allclose(shadow.exact[var.path].acc.numpy(), acc.numpy(), rtol=1e-5, atol=1e-9)
    data = json.loads(path.read_text())
    assert [r["step"] for r in data["records"]] == [1, 4, 12]
    assert set(data["memory"]) == {"exact"} | set(dg.DEFAULT_METHODS)
    assert "apply" not in opt.__dict__  # hook removed after fit
    pngs = dg.plot(data, str(tmp_path / "fig"))
    assert all((tmp_path / "fig" / p.split("/")[-1]).stat().st_size > 1000 for p in pngs)
