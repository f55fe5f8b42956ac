"""SM3 (Anil et al., NeurIPS 2019): agreement with a NumPy reference written
from the paper's update rules, sparse == dense, the AdaGrad upper bound,
Keras citizenship and training."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks


# --- an independent reference: explicit cover sets and loops --------------------
class SM3Reference:
    """SM3-I (Algorithm 1) / SM3-II (Algorithm 2) over explicit cover sets.

    Covers of a rank >= 2 tensor are the co-dimension-1 slices ``(axis, index)``;
    of a scalar or vector, the singletons.  A sparse gradient is, by definition,
    the dense gradient with zero rows.
    """

    def __init__(self, x, lr, variant="II", momentum=0.0, beta_2=None, epsilon=0.0):
        self.x = np.array(x, np.float64)
        self.lr, self.variant, self.momentum, self.beta_2, self.epsilon = lr, variant, momentum, beta_2, epsilon
        self.entries = list(np.ndindex(*self.x.shape)) if self.x.ndim else [()]
        self.mu = {r: 0.0 for i in self.entries for r in self.covers(i)}
        self.m = np.zeros_like(self.x)
        self.t = 0
        self.nu = None

    def covers(self, i):
        if self.x.ndim >= 2:
            return [(axis, i[axis]) for axis in range(self.x.ndim)]
        return [("entry", i)]

    def step(self, g):
        self.t += 1
        g = np.asarray(g, np.float64).reshape(self.x.shape)
        decay, scale = (1.0, 1.0) if self.beta_2 is None else (self.beta_2, 1.0 - self.beta_2)
        nu = np.zeros_like(self.x)
        if self.variant == "I":
            slice_max = {r: 0.0 for r in self.mu}
            for i in self.entries:
                for r in self.covers(i):
                    slice_max[r] = max(slice_max[r], g[i] ** 2)
            for r in self.mu:
                self.mu[r] = decay * self.mu[r] + scale * slice_max[r]
            for i in self.entries:
                nu[i] = min(self.mu[r] for r in self.covers(i))
        else:
            new_mu = {r: 0.0 for r in self.mu}
            for i in self.entries:
                nu[i] = decay * min(self.mu[r] for r in self.covers(i)) + scale * g[i] ** 2
                for r in self.covers(i):
                    new_mu[r] = max(new_mu[r], nu[i])
            self.mu = new_mu
        if self.beta_2 is not None:
            nu = nu / (1.0 - self.beta_2**self.t)
        self.nu = nu
        denom = nu + self.epsilon
        u = np.where(denom > 0, g / np.sqrt(np.where(denom > 0, denom, 1.0)), 0.0)
        if self.momentum:
            self.m = self.momentum * self.m + (1.0 - self.momentum) * u
            u = self.m
        self.x = self.x - self.lr * u
        return self.x


def sparse_to_dense(ids, values, shape):
    dense = np.zeros(shape)
    np.add.at(dense, ids, values)
    return dense


def indexed_slices(ids, values, shape):
    return tf.IndexedSlices(
        tf.constant(values, tf.float32), tf.constant(ids, tf.int64), tf.constant(shape, tf.int64)
    )


def run_tf(opt, x0, grads):
    var = keras.Variable(np.array(x0, np.float32))
    opt.build([var])
    out = []
    for g in grads:
        if isinstance(g, tuple):
            g = indexed_slices(g[0], g[1], x0.shape)
        else:
            g = tf.constant(np.asarray(g, np.float32))
        opt.apply([g], [var])
        out.append(var.numpy().copy())
    return out


SHAPES = {"scalar": (), "vector": (7,), "matrix": (6, 4), "rank4": (3, 2, 4, 5)}
OPTIONS = [
    dict(variant="II"),
    dict(variant="I"),
    dict(variant="II", momentum=0.9, beta_2=0.9),
    dict(variant="I", beta_2=0.95, epsilon=1e-3),
]


@pytest.mark.parametrize("shape_name,options", list(itertools.product(SHAPES, OPTIONS)))
def test_matches_numpy_reference(shape_name, options):
    shape = SHAPES[shape_name]
    rng = np.random.default_rng(len(shape) + 7 * len(options))
    x0 = rng.normal(size=shape)
    # Heavy-tailed gradients, some exact zeros, so covers disagree.
    grads = [rng.standard_t(2, size=shape) * (rng.random(size=shape) > 0.2) for _ in range(6)]
    ref = SM3Reference(x0, lr=0.05, **options)
    got = run_tf(ks.SM3(0.05, **options), x0, grads)
    for step, (g, x) in enumerate(zip(grads, got)):
        np.testing.assert_allclose(x, ref.step(g), rtol=2e-5, atol=2e-6, err_msg=f"step {step}")


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("shape", [(20, 4), (9, 3, 5)])
def test_sparse_equals_dense_step_with_zero_rows(shape, options):
    """Duplicates merged; the other axes' accumulators see the untouched rows."""
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=shape)
    stream = []
    for step in range(8):
        if step in (0, 4):  # a dense step makes the accumulators non-trivial
            stream.append(rng.normal(size=shape))
        else:
            ids = rng.integers(0, 4 if step % 2 else shape[0], size=5)  # repeats, few rows
            stream.append((ids, rng.normal(size=(5,) + shape[1:])))
    dense = [g if not isinstance(g, tuple) else sparse_to_dense(g[0], g[1], shape) for g in stream]
    sparse_opt, dense_opt = ks.SM3(0.05, **options), ks.SM3(0.05, **options)
    got_sparse = run_tf(sparse_opt, x0, stream)
    got_dense = run_tf(dense_opt, x0, dense)
    ref = SM3Reference(x0, lr=0.05, **options)
    for step, (a, b, g) in enumerate(zip(got_sparse, got_dense, dense)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
        np.testing.assert_allclose(a, ref.step(g), rtol=2e-5, atol=2e-6, err_msg=f"step {step}")
    for a, b in zip(sparse_opt.variables, dense_opt.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)


def test_sparse_step_updates_column_accumulators():
    """What the public implementations skip: a sparse step must raise the
    column accumulators (else the next step's nu drops below AdaGrad's), and
    with beta_2 decay untouched rows' accumulators."""
    opt = ks.SM3(0.1, beta_2=0.5)
    var = keras.Variable(np.zeros((5, 3), np.float32))
    opt.build([var])
    opt.apply([tf.constant(np.ones((5, 3), np.float32))], [var])  # every mu = 0.5
    opt.apply([indexed_slices([2], 2 * np.ones((1, 3)), (5, 3))], [var])
    rows, cols = (c.numpy() for c in opt._covers[0])
    # touched row 2: 0.5 * 0.5 + 0.5 * 4 = 2.25; untouched rows decay to 0.25
    np.testing.assert_allclose(rows, [0.25, 0.25, 2.25, 0.25, 0.25], rtol=1e-6)
    np.testing.assert_allclose(cols, [2.25, 2.25, 2.25], rtol=1e-6)


@pytest.mark.parametrize("variant", ["I", "II"])
@pytest.mark.parametrize("shape", [(12, 5), (4, 3, 6)])
def test_never_underestimates_adagrad(variant, shape):
    """nu_t >= sum_s g_s^2 (Claims 2 and 4 of the paper), read back from the
    step actually taken (nu = (lr g / dx)^2), on dense and sparse streams; and
    SM3-II's estimate is at most SM3-I's."""
    rng = np.random.default_rng(11)
    lr = 1.0
    opts = {v: ks.SM3(lr, variant=v) for v in ("I", "II")}
    vars_ = {v: keras.Variable(np.zeros(shape, np.float32)) for v in opts}
    for v in opts:
        opts[v].build([vars_[v]])
    adagrad = np.zeros(shape)
    checked = 0
    for step in range(40):
        if step % 3 == 0:
            g = rng.standard_t(1.5, size=shape)
            tf_g = tf.constant(g.astype(np.float32))
        else:
            ids = rng.integers(0, shape[0], size=3)
            vals = rng.standard_t(1.5, size=(3,) + shape[1:])
            g = sparse_to_dense(ids, vals, shape)
            tf_g = indexed_slices(ids, vals, shape)
        g = g.astype(np.float32).astype(np.float64)
        adagrad += g * g
        nu = {}
        for v in opts:
            before = vars_[v].numpy().astype(np.float64)
            opts[v].apply([tf_g], [vars_[v]])
            dx = before - vars_[v].numpy()
            ok = (np.abs(g) > 1e-2) & (np.abs(dx) > 1e-6)
            nu[v] = np.where(ok, (lr * g / np.where(ok, dx, 1.0)) ** 2, np.nan)
        mask = ~np.isnan(nu[variant])
        checked += mask.sum()
        assert np.all(nu[variant][mask] >= adagrad[mask] * (1 - 1e-3)), f"step {step}"
        both = mask & ~np.isnan(nu["I"])
        assert np.all(nu["II"][both] <= nu["I"][both] * (1 + 1e-3)), f"step {step}"
        # The covers themselves: min over covers >= AdaGrad everywhere.
        covers = opts[variant]._covers[0]
        est = np.ones(shape) * np.inf
        for axis, c in enumerate(covers):
            b = [1] * len(shape)
            b[axis] = -1
            est = np.minimum(est, c.numpy().reshape(b))
        assert np.all(est >= adagrad * (1 - 1e-5))
    assert checked > 100
    # and it is a real compression: strictly above AdaGrad somewhere
    assert np.any(est > adagrad * 1.01)


def test_memory_report():
    opt = ks.SM3(0.1)
    emb, bias = keras.Variable(np.zeros((1000, 64), np.float32)), keras.Variable(np.zeros(64, np.float32))
    opt.build([emb, bias])
    report = opt.memory_report()
    rows = {r["shape"]: r for r in report.rows}
    assert rows[(1000, 64)]["state_bytes"] == (1000 + 64) * 4
    assert rows[(1000, 64)]["exact_optimizer_bytes"] == 1000 * 64 * 4
    assert rows[(1000, 64)]["mode"] == "covered"
    assert rows[(64,)]["state_bytes"] == rows[(64,)]["exact_optimizer_bytes"] == 256
    assert report.state_bytes == (1064 + 64) * 4
    with_m = ks.SM3(0.1, momentum=0.9)
    with_m.build([keras.Variable(np.zeros((10, 3), np.float32))])
    assert with_m.memory_report().rows[0]["state_bytes"] == (13 + 30) * 4
    assert with_m.memory_report().rows[0]["exact_optimizer_bytes"] == 2 * 30 * 4
    assert "SM3" not in str(ks.SM3(0.1).get_config())  # sanity of the config type
    with pytest.raises(ValueError, match="not built"):
        ks.SM3().memory_report()


def test_config_round_trip_and_validation():
    opt = ks.SM3(0.2, variant="I", momentum=0.5, beta_2=0.99, epsilon=1e-8, clipnorm=1.0)
    config = opt.get_config()
    for key, value in dict(variant="I", momentum=0.5, beta_2=0.99, epsilon=1e-8, clipnorm=1.0).items():
        assert config[key] == value
    again = ks.SM3.from_config(config)
    assert again.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is ks.SM3 and restored.get_config() == config
    for kwargs, name in [
        (dict(variant="III"), "variant"),
        (dict(momentum=1.0), "momentum"),
        (dict(beta_2=1.5), "beta_2"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(learning_rate=-0.1), "learning_rate"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            ks.SM3(**kwargs)
    with pytest.raises(TypeError, match="`momentum`"):
        ks.SM3(momentum="0.9")


def _model(vocab=50, classes=8, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(vocab, 8)(inp)  # sparse gradients
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inp, keras.layers.Dense(classes)(h))


def _data(vocab=50, classes=8, n=256):
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, size=(n, 5)).astype(np.int32)
    y = (x[:, 0] % classes).astype(np.int32)  # learnable from the first token
    return x, y


@pytest.mark.parametrize("options", [dict(), dict(variant="I", momentum=0.9)])
def test_fit_lowers_loss(options):
    x, y = _data()
    model = _model()
    model.compile(ks.SM3(0.5, **options), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=32, epochs=10, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.6 * first


def test_save_and_load_restores_state_and_refuses_other_settings(tmp_path):
    x, y = _data()
    model = _model()
    model.compile(ks.SM3(0.1, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, ks.SM3) and loaded.optimizer.momentum == 0.9
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    weights = str(tmp_path / "w.weights.h5")
    model.save_weights(weights)
    other = _model()
    other.compile(ks.SM3(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    other.optimizer.build(other.trainable_variables)
    with pytest.raises(ValueError, match="momentum"):
        other.load_weights(weights)
