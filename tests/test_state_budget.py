"""``state_budget=``: the planner meets the budget it reports, refuses what it
cannot meet, keeps exactly Keras's math where the budget allows, and its
setting survives configs and saving (keras_sketch/plan.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch
from keras_sketch import fused
from keras_sketch.memory import keras_state_bytes

BUDGETS = [1.0, 0.5, 0.1, 0.02, 0.005]
OPTIMIZERS = {
    "adam": keras_sketch.CSAdam,
    "adagrad": keras_sketch.CSAdagrad,
    "rmsprop": lambda **kw: keras_sketch.CSRMSprop(momentum=0.9, **kw),
    "momentum": keras_sketch.CSMomentum,
}


def models():
    lm = keras.Sequential([keras.Input((12,), dtype="int32"), keras.layers.Embedding(5000, 32),
                           keras.layers.LSTM(64), keras.layers.Dense(5000)])
    cnn = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(32, 3), keras.layers.Conv2D(64, 3),
                            keras.layers.Flatten(), keras.layers.Dense(10)])
    mlp = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512), keras.layers.Dense(10)])
    return {"lm": lm, "cnn": cnn, "mlp": mlp}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_budgets_are_met_as_reported(opt_name):
    for model_name, model in models().items():
        for budget in BUDGETS:
            try:
                opt = OPTIMIZERS[opt_name](state_budget=budget)
                opt.build(model.trainable_variables)
            except ValueError as error:  # some budgets are below a model's vectors
                assert "smallest feasible budget" in str(error)
                assert budget <= 0.02, (model_name, budget)
                continue
            report = opt.memory_report()
            assert report.state_budget == budget
            assert report.ratio <= budget + 1e-12, (model_name, budget, report.ratio)
            # the report counts exactly the state variables the optimizer holds
            assert report.state_bytes == keras_state_bytes(opt), (model_name, budget)
            if budget < 0.5:  # every matrix is compressed; vectors exact unless rule 4 sketches long ones
                for r in report.rows:
                    vector_sketched = r["states"] and all(k in ("count_min", "factored_sketch")
                                                          for k, _ in r["states"].values())
                    assert r["mode"] == ("sketched" if len(r["shape"]) >= 2 or vector_sketched else "exact"), r
                kinds = {kind for r in report.rows for kind, _ in r["states"].values()}
                if kinds & {"count_min", "count_sketch", "factored_sketch"}:  # the common width spends the budget
                    assert report.ratio > 0.5 * budget, (model_name, budget, report.ratio)
                else:  # every matrix factored: the most the planner keeps; its size is fixed
                    for r in report.rows:
                        if len(r["shape"]) >= 2:
                            assert {k for k, _ in r["states"].values()} == {"factored"}, r


def test_infeasible_budget_names_the_smallest_feasible_one():
    model = models()["lm"]
    with pytest.raises(ValueError, match="smallest feasible budget is") as info:
        keras_sketch.CSAdam(state_budget=1e-6).build(model.trainable_variables)
    smallest = float(str(info.value).rstrip(".").split()[-1])
    opt = keras_sketch.CSAdam(state_budget=smallest)
    opt.build(model.trainable_variables)
    assert opt.memory_report().ratio <= smallest


@pytest.mark.parametrize("sparse", [False, True])
def test_factored_second_moment_is_exact_for_rank_one_squares(sparse):
    """The factored state (rule 3) estimates a rank-1 ``g^2`` exactly, so with
    a gradient ``g = a b^T`` the budgeted Adam equals Keras's Adam(beta_1=0)."""
    rng = np.random.default_rng(3)
    init = rng.normal(size=(300, 8)).astype("float32")
    g = np.outer(rng.uniform(0.5, 2.0, 300), rng.uniform(0.5, 2.0, 8)).astype("float32")
    a, b = tf.Variable(init), tf.Variable(init)
    ours = keras_sketch.CSAdam(learning_rate=0.01, state_budget=0.1)
    theirs = keras.optimizers.Adam(learning_rate=0.01, beta_1=0.0)
    for _ in range(10):
        grad = tf.IndexedSlices(tf.constant(g), tf.range(300)) if sparse else tf.constant(g)
        ours.apply([grad], [a])
        theirs.apply([tf.constant(g)], [b])
    assert ours.memory_report().rows[0]["states"]["v"][0] == "factored"
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_factored_sparse_step_is_the_dense_step_with_zero_rows():
    """Sparse rows (with duplicates) update the factored state exactly as the
    dense gradient with zero rows elsewhere does (keras_sketch/factored.py)."""
    rng = np.random.default_rng(4)
    init = rng.normal(size=(300, 8)).astype("float32")
    a, b = tf.Variable(init), tf.Variable(init)
    sparse_opt = keras_sketch.CSAdam(learning_rate=0.01, state_budget=0.1)
    dense_opt = keras_sketch.CSAdam(learning_rate=0.01, state_budget=0.1)
    for _ in range(8):
        ids = rng.integers(0, 300, 64)  # repeats: merged before the update
        grad = tf.IndexedSlices(tf.constant(rng.normal(size=(64, 8)).astype("float32")), tf.constant(ids),
                                 tf.constant([300, 8]))
        sparse_opt.apply([grad], [a])
        dense_opt.apply([tf.convert_to_tensor(grad)], [b])
    assert sparse_opt.memory_report().rows[0]["states"]["v"][0] == "factored"
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    for x, y in zip(sparse_opt.variables, dense_opt.variables):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_plan_drops_first_moment_then_sketches_every_matrix():
    model = models()["lm"]
    half = keras_sketch.CSAdam(state_budget=0.5)
    half.build(model.trainable_variables)
    rows = half.memory_report().rows
    assert all(r["dropped"] == ["m"] and r["mode"] == "exact" for r in rows)
    assert half.dropped_slots == ("m",)
    tight = keras_sketch.CSAdam(state_budget=0.02)
    tight.build(model.trainable_variables)
    for r in tight.memory_report().rows:
        assert r["mode"] == ("sketched" if len(r["shape"]) >= 2 else "exact"), r
        assert "path" in r and r["path"]


def test_factored_where_all_fit_else_sketched_long_vectors():
    """Rules 3 and 4 (the study's decisions, docs/state_budget.md): factored
    matrices where all fit; else still factored, with every vector longer
    than the common width (the 5,000-long row factors of the embedding and
    the softmax kernel, the softmax bias) hashed into that many buckets and
    the short ones exact; the budget is spent to within one bucket."""
    model = models()["lm"]
    for budget, kind in ((0.1, "factored"), (0.02, "factored"), (0.008, "factored_sketch"),
                         (0.005, "factored_sketch")):
        opt = keras_sketch.CSAdam(state_budget=budget)
        opt.build(model.trainable_variables)
        report = opt.memory_report()
        assert report.ratio <= budget
        for r in report.rows:
            long = max(r["shape"]) >= 5000
            if len(r["shape"]) >= 2 and r["shape"][-1] > 1:
                expected = "factored_sketch" if kind == "factored_sketch" and long else "factored"
                assert "factored state" in r["path"]  # no fused kernel: pure TF, and the report says why
            else:  # vectors: exact, the 5,000-long softmax bias hashed under rule 4
                expected = "factored_sketch" if kind == "factored_sketch" and long else "exact"
            assert r["states"]["v"][0] == expected, (budget, r)
        if kind == "factored_sketch":
            widths = {r["states"]["v"][1][1] for r in report.rows if r["states"]["v"][0] != "exact"
                      and r["states"]["v"][0] != "factored"}
            assert len(widths) == 1, widths  # one common width
            # one bucket more per sketched vector would exceed the budget
            extra = 4 * len([r for r in report.rows if r["states"]["v"][0] == "factored_sketch"])
            assert report.state_bytes + extra > budget * report.exact_optimizer_bytes
    # Optimizers with signed slots keep rule 5 (count-min everywhere) where factored does not fit.
    rms = keras_sketch.CSRMSprop(momentum=0.9, state_budget=0.013)
    rms.build(model.trainable_variables)
    kinds = {k for r in rms.memory_report().rows for k, _ in r["states"].values()}
    assert "factored_sketch" not in kinds and "count_min" in kinds, kinds
    # The factored plan's size is fixed: 0.1 and 0.02 give the same plan.
    a, b = keras_sketch.CSAdam(state_budget=0.1), keras_sketch.CSAdam(state_budget=0.02)
    a.build(model.trainable_variables)
    b.build(model.trainable_variables)
    assert a.memory_report().state_bytes == b.memory_report().state_bytes


@pytest.mark.parametrize("use_fused", [False] + ([True] if fused.available() else []))
def test_half_budget_is_exactly_adam_without_first_moment(use_fused):
    rng = np.random.default_rng(0)
    init = rng.normal(size=(300, 8)).astype("float32")
    a, b = tf.Variable(init), tf.Variable(init)
    ours = keras_sketch.CSAdam(learning_rate=0.01, state_budget=0.5, fused=use_fused)
    keras_adam = keras.optimizers.Adam(learning_rate=0.01, beta_1=0.0)
    for step in range(20):
        g = rng.normal(size=(300, 8)).astype("float32")
        if step % 2:
            grad = tf.IndexedSlices(tf.constant(g), tf.range(300))
        else:
            grad = tf.constant(g)
        ours.apply([grad], [a])
        keras_adam.apply([tf.constant(g)], [b])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_full_budget_is_keras_adam():
    rng = np.random.default_rng(1)
    init = rng.normal(size=(64, 16)).astype("float32")
    a, b = tf.Variable(init), tf.Variable(init)
    ours, theirs = keras_sketch.CSAdam(state_budget=1.0), keras.optimizers.Adam()
    for _ in range(20):
        g = tf.constant(rng.normal(size=(64, 16)).astype("float32"))
        ours.apply([g], [a])
        theirs.apply([g], [b])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_budget_excludes_the_planners_own_settings():
    for arg in ({"width": 10}, {"compression": 0.1}, {"min_rows": 1}, {"hash_axis": "auto"}):
        with pytest.raises(ValueError, match=f"`{next(iter(arg))}` cannot be combined with `state_budget`"):
            keras_sketch.CSAdam(state_budget=0.1, **arg)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="`state_budget`"):
            keras_sketch.CSAdam(state_budget=bad)


def _compiled(budget):
    model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(2000, 16),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(optimizer=keras_sketch.CSAdam(state_budget=budget), loss="mse")
    x = np.random.default_rng(0).integers(0, 2000, (128, 4))
    model.fit(x, np.ones((128, 1)), epochs=1, verbose=0)
    return model


def test_budget_round_trips_and_refuses_another_budget(tmp_path):
    model = _compiled(0.05)
    config = model.optimizer.get_config()
    assert config["state_budget"] == 0.05
    assert keras_sketch.CSAdam.from_config(config).state_budget == 0.05
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.state_budget == 0.05
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    weights = str(tmp_path / "m.weights.h5")
    model.save_weights(weights)
    for budget in (0.5, 0.01):  # exact 2nd moment; count-min (factored does not fit): other layouts
        other = _compiled(budget)
        with pytest.raises(ValueError, match="state_budget"):
            other.load_weights(weights)
    same = _compiled(0.2)  # factored too: the same layout, so the state loads
    same.load_weights(weights)
    for a, b in zip(model.optimizer.variables, same.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("budget, kind", [(0.02, "factored"), (0.005, "factored_sketch")])
def test_small_budgets_train_close_to_adam(budget, kind):
    """Quality guard for the planner: a tiny embedding classifier trained a few
    hundred steps with ``state_budget=0.02`` (50x less state than Adam; rule
    3) or ``0.005`` (200x; rule 4, the embedding's row factor hashed) ends
    within a loose bound of Keras Adam's held-out loss at the same lr."""
    rng = np.random.default_rng(7)
    vocab, classes = 2000, 8
    token_class = rng.integers(0, classes, vocab)
    ids = rng.zipf(1.3, (6000, 6)) % vocab
    labels = np.array([np.bincount(token_class[row], minlength=classes).argmax() for row in ids])

    def held_out_loss(optimizer):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(vocab, 64),
                                  keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(32, activation="relu"),
                                  keras.layers.Dense(classes)])
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(ids[:5000], labels[:5000], batch_size=25, epochs=1, shuffle=False, verbose=0)  # 200 steps
        return model.evaluate(ids[5000:], labels[5000:], verbose=0), model.optimizer

    adam, _ = held_out_loss(keras.optimizers.Adam(3e-3))
    ours, opt = held_out_loss(keras_sketch.CSAdam(3e-3, state_budget=budget))
    report = opt.memory_report()
    assert report.ratio <= budget
    assert report.rows[0]["states"]["v"][0] == kind, report.rows[0]
    assert np.isfinite(ours) and ours < 1.1 * adam, (ours, adam)


def test_budget_study_quick_is_resumable(tmp_path, monkeypatch):
    """benchmarks/budget_study.py runs a task at tiny size, caches every run,
    and a second invocation reuses them instead of training again."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import budget_study

    out = str(tmp_path / "study.json")
    args = ["--task", "cnn", "--quick", "--configs", "adam,cm_0.02,fac_0.02", "--lrs", "0.003", "--out", out]
    first = budget_study.main(args)
    runs = first["tasks"]["cnn"]["runs"]
    assert set(runs) == {"adam", "cm_0.02", "fac_0.02"}
    assert runs["cm_0.02"]["0.003"]["state_bytes"] <= 0.02 * runs["adam"]["0.003"]["state_bytes"]
    second = budget_study.main(args)
    assert second["tasks"]["cnn"]["runs"] == runs  # nothing trained again


def test_amsgrad_under_a_budget_keeps_count_min_and_trains():
    """The factored form has no bucket-wise running maximum, so AMSGrad's v
    and vhat stay count-min sketches under a budget (and the step runs)."""
    model = models()["mlp"]
    opt = keras_sketch.CSAdam(learning_rate=0.01, amsgrad=True, state_budget=0.1)
    opt.build(model.trainable_variables)
    report = opt.memory_report()
    assert report.ratio <= 0.1
    kernel = report.rows[0]["states"]
    assert kernel["v"][0] == kernel["vhat"][0] == "count_min", kernel
    before = [v.numpy().copy() for v in model.trainable_variables]
    grads = [tf.ones_like(v) for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)
    assert not np.allclose(before[0], model.trainable_variables[0].numpy())


def _sketched_factored_opt(**kw):
    """On one ``[300, 8]`` variable, 0.03 of Adam's state is below its factored
    form (0.064): rule 4 keeps its row factor in a count-min sketch."""
    return keras_sketch.CSAdam(learning_rate=0.01, state_budget=0.03, **kw)


def test_sketched_factored_sparse_step_is_the_dense_step_with_zero_rows():
    """Sparse rows (with duplicates) update the sketched row factor exactly as
    the dense gradient with zero rows elsewhere does (the sketch is linear:
    decay the table, add the row means at their buckets)."""
    rng = np.random.default_rng(5)
    init = rng.normal(size=(300, 8)).astype("float32")
    a, b = tf.Variable(init), tf.Variable(init)
    sparse_opt, dense_opt = _sketched_factored_opt(), _sketched_factored_opt()
    for _ in range(8):
        ids = rng.integers(0, 300, 64)
        grad = tf.IndexedSlices(tf.constant(rng.normal(size=(64, 8)).astype("float32")), tf.constant(ids),
                                 tf.constant([300, 8]))
        sparse_opt.apply([grad], [a])
        dense_opt.apply([tf.convert_to_tensor(grad)], [b])
    kind, shape = sparse_opt.memory_report().rows[0]["states"]["v"]
    assert kind == "factored_sketch" and shape[1] < 300, shape  # fewer buckets than rows
    assert sparse_opt.memory_report().ratio <= 0.03
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    for x, y in zip(sparse_opt.variables, dense_opt.variables):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_sketched_row_factor_shares_each_bucket_among_its_rows():
    """The hashed row factor is read as its bucket's value shared equally by
    the rows hashed there (keras_sketch/factored.py): exact for a row alone in
    its bucket, and the rows of a bucket sum to the exact rows' sum; the column
    factor is exact."""
    rng = np.random.default_rng(6)
    init = rng.normal(size=(300, 8)).astype("float32")
    a, b = tf.Variable(init), tf.Variable(init)
    sketched, exact = _sketched_factored_opt(), keras_sketch.CSAdam(learning_rate=0.01, state_budget=0.1)
    for _ in range(3):
        g = tf.constant(rng.normal(size=(300, 8)).astype("float32"))
        sketched.apply([g], [a])
        exact.apply([g], [b])
    sk, ex = sketched._slots[0]["v"], exact._slots[0]["v"]
    assert sk.kind == "factored_sketch" and ex.kind == "factored"
    r_sk = sk.row.query_shared().numpy()[:, 0]
    r_ex = ex.row.numpy()
    buckets = sk.row.locate(tf.range(300, dtype=tf.int64)).buckets.numpy()[0]
    alone = np.bincount(buckets, minlength=sk.row.width)[buckets] == 1
    assert alone.any() and (~alone).any()
    np.testing.assert_allclose(r_sk[alone], r_ex[alone], rtol=1e-5)
    np.testing.assert_allclose(np.bincount(buckets, r_sk), np.bincount(buckets, r_ex), rtol=1e-5)
    np.testing.assert_allclose(sk.col.numpy(), ex.col.numpy(), rtol=1e-6)
    # the step reads exactly this estimate: R_i * C_j / mean(C)
    c = sk.col.numpy()
    np.testing.assert_allclose(sk.read().numpy(), r_sk[:, None] * (c / c.mean())[None, :], rtol=1e-5)


def test_shared_read_counts_rows_once_and_recounts_for_other_hash_parameters():
    """The rows per bucket are counted once for the built hash parameters (a
    sparse step hashes only its rows: no [rows] tensor in the traced step)
    and recounted when the parameters differ, as after restoring state saved
    with another seed."""
    rows = 50_000
    var = tf.Variable(np.ones((rows, 8), np.float32))
    opt = keras_sketch.CSAdam(learning_rate=0.01, state_budget=0.005)

    @tf.function
    def step(g):
        opt.apply([g], [var])

    g = tf.IndexedSlices(tf.ones((3, 8)), tf.constant([5, 17, 5], tf.int64), tf.constant([rows, 8], tf.int64))
    step(g)
    sketch = opt._slots[0]["v"].row
    assert opt.memory_report().rows[0]["states"]["v"][0] == "factored_sketch"
    graph = step.get_concrete_function(g).graph
    big = [op.name for op in graph.get_operations() for out in op.outputs
           if out.shape.rank and out.shape.num_elements() and out.shape.num_elements() >= rows]
    assert not big, f"full-size tensors in the sparse step: {big}"

    table = np.asarray(sketch.table)[0, :, 0]

    def counted(params):
        buckets = sketch.locate(tf.range(rows, dtype=tf.int64), params).buckets.numpy()[0]
        return buckets, np.maximum(np.bincount(buckets, minlength=sketch.width), 1)

    ids = [0, 17, 49_999]
    buckets, counts = counted(sketch.params)
    np.testing.assert_allclose(sketch.query_shared(tf.constant(ids, tf.int64)).numpy()[:, 0],
                               (table / counts)[buckets[ids]], rtol=1e-6)
    sketch.params.assign(keras_sketch.sketch.hash_params(seed=123, stream=0, depth=1))  # as a restore might
    new_buckets, new_counts = counted(sketch.params)
    assert not np.array_equal(new_counts, counts)  # the built counts would be wrong now
    np.testing.assert_allclose(sketch.query_shared().numpy()[:, 0], (table / new_counts)[new_buckets], rtol=1e-6)
    np.testing.assert_allclose(sketch.query_shared(tf.constant(ids, tf.int64)).numpy()[:, 0],
                               (table / new_counts)[new_buckets[ids]], rtol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_sketched_factored_contains_a_nan_row(sparse):
    """A gradient row with NaN (keras_sketch/guard.py) reaches no bucket of the
    sketched row factor: the step equals the step without that row (dense:
    the row's gradient taken as zero; sparse: the row absent), every state
    and weight stays finite, and the other rows move."""
    rng = np.random.default_rng(8)
    init = rng.normal(size=(300, 8)).astype("float32")
    a, b = tf.Variable(init), tf.Variable(init)
    bad_opt, clean_opt = _sketched_factored_opt(), _sketched_factored_opt()
    for step in range(4):
        g = rng.normal(size=(300, 8)).astype("float32")
        ids = np.arange(300)
        bad, clean = g.copy(), g.copy()
        bad[7, 3] = np.nan
        clean[7] = 0.0
        if sparse:
            keep = ids != 7
            bad_grad = tf.IndexedSlices(tf.constant(bad), tf.constant(ids), tf.constant([300, 8]))
            clean_grad = tf.IndexedSlices(tf.constant(g[keep]), tf.constant(ids[keep]), tf.constant([300, 8]))
        else:
            bad_grad, clean_grad = tf.constant(bad), tf.constant(clean)
        bad_opt.apply([bad_grad], [a])
        clean_opt.apply([clean_grad], [b])
    assert bad_opt.memory_report().rows[0]["states"]["v"][0] == "factored_sketch"
    assert np.all(np.isfinite(a.numpy()))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in bad_opt.variables)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    for x, y in zip(bad_opt.variables, clean_opt.variables):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert not np.allclose(a.numpy()[8:], init[8:])


def test_sketched_factored_round_trips_and_refuses_another_width(tmp_path):
    """Rule 4's state (hash parameters, the row sketch, the column vector)
    saves and loads; a budget giving another width is refused."""
    model = _compiled(0.01)
    kinds = {k for r in model.optimizer.memory_report().rows for k, _ in r["states"].values()}
    assert "factored_sketch" in kinds, kinds
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.state_budget == 0.01
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    weights = str(tmp_path / "m.weights.h5")
    model.save_weights(weights)
    with pytest.raises(ValueError, match="state_budget"):
        _compiled(0.012).load_weights(weights)
    same = _compiled(0.01)
    same.load_weights(weights)
    for a, b in zip(model.optimizer.variables, same.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_smallest_feasible_budget_is_rule_4_at_one_bucket():
    """Below rule 3, the smallest feasible budget is rule 4 with one bucket
    per long vector; a hair below it raises naming it."""
    model = models()["lm"]
    with pytest.raises(ValueError, match="smallest feasible budget is") as info:
        keras_sketch.CSAdam(state_budget=1e-6).build(model.trainable_variables)
    smallest = float(str(info.value).rstrip(".").split()[-1])
    opt = keras_sketch.CSAdam(state_budget=smallest)
    opt.build(model.trainable_variables)
    widths = {r["states"]["v"][1][1] for r in opt.memory_report().rows
              if r["states"]["v"][0] == "factored_sketch"}
    assert widths and max(widths) <= 2, widths
    with pytest.raises(ValueError, match=f"smallest feasible budget is {smallest}"):
        keras_sketch.CSAdam(state_budget=smallest * 0.9).build(model.trainable_variables)
