"""How close does each compressed state stay to the exact one?

An exact *shadow* of AdaGrad's accumulator (``sum g^2``, or with ``beta`` the
moving average ``v <- beta v + (1 - beta) g^2`` of Adam/RMSprop) runs on the
same gradient stream as the optimizer being trained, next to estimators of it
that use a small fraction of its memory:

* ``count_sketch``: count-sketch, median query (Spring et al. 2019, Alg. 1);
* ``count_min`` / ``count_min_clean``: count-min sketch (min query), without
  and with the paper's cleaning (multiply by ``alpha`` every ``C`` steps);
* ``sm3``: SM3-II's ``nu = min over covers + g^2`` (Anil et al. 2019; the
  estimate the optimizer uses at that step); ``sm3_I`` for SM3-I;
* ``rank1``: Adafactor's factored second moment (Shazeer & Stern 2018):
  row and column sums ``R, C`` of the accumulator, estimate ``R C^T / sum(R)``
  (variables of rank > 2 are seen as ``[prod(leading axes), last]``).

By default every sketch gets the memory SM3 and rank-1 use for that variable
(``sum of its dimensions`` floats): the comparison at equal memory of the SM3
rebuttal's Figure 1 and of Section 6.1 of the count-sketch paper.  A method
spec may ask for another budget (``memory=0.2``: 20% of the exact state, the
package's default compression).

Only variables of rank >= 2 are compressed by these methods (SM3 and the
sketched optimizers keep vectors exact), so only they are shadowed.

Use with ``model.fit``: ``callbacks=[ShadowCallback(record_steps=[1, 100])]``
(the callback registers the shadow as a gradient observer of the optimizer,
``add_gradient_observer``, so it sees the gradients the update step sees,
after Keras's unscaling and clipping, inside the compiled train step; see
``attach`` for Keras's own optimizers), or in a custom loop:
``shadow.observe(grads, variables)`` then ``shadow.record(step)``.  Results: ``shadow.results()`` (JSON-able),
``write_json`` and ``plot``.
"""

import json
import math

import numpy as np
import tensorflow as tf

from keras_sketch.optimizers import sm3
from keras_sketch.optimizers.base import CompressedStateMixin
from keras_sketch.sketch import COUNT_MIN, COUNT_SKETCH, EXACT, Sketch, hash_params, sketch_width
from keras_sketch.state import Layout

DEFAULT_METHODS = {
    COUNT_SKETCH: dict(kind=COUNT_SKETCH, depth=3),
    COUNT_MIN: dict(kind=COUNT_MIN, depth=3),
    "count_min_clean": dict(kind=COUNT_MIN, depth=3, cleaning=(0.5, 125)),
    "sm3": dict(kind="sm3"),
    "rank1": dict(kind="rank1"),
}
KINDS = (EXACT, COUNT_SKETCH, COUNT_MIN, "sm3", "sm3_I", "rank1")


# --- estimators ------------------------------------------------------------------
class _Estimator:
    """One method's compressed state of one variable's accumulator."""

    def __init__(self, shape, dtype):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    def update(self, g2, decay, scale, step):
        raise NotImplementedError

    def estimate(self):
        raise NotImplementedError

    def reset(self):
        for v in self.state_variables():
            v.assign(tf.zeros_like(v))


class _Exact(_Estimator):
    def __init__(self, shape, dtype):
        super().__init__(shape, dtype)
        self.acc = tf.Variable(tf.zeros(self.shape, dtype), trainable=False)
        self.floats, self.dims = int(np.prod(self.shape)), "x".join(map(str, self.shape))

    def update(self, g2, decay, scale, step):
        self.acc.assign(decay * self.acc + scale * g2)

    def estimate(self):
        return tf.convert_to_tensor(self.acc)

    def state_variables(self):
        return [self.acc]


class _SketchEstimator(_Estimator):
    """A ``keras_sketch.sketch.Sketch`` of the accumulator's 2-D view (the
    longer axis hashed, as the optimizers' ``hash_axis="auto"``)."""

    def __init__(self, shape, dtype, kind, depth, budget, seed, stream, cleaning=None):
        super().__init__(shape, dtype)
        layout = Layout(self.shape)
        if layout.dim > layout.rows:
            layout = Layout(self.shape, transpose=True)
        self.layout = layout
        width = budget(layout)
        if width >= layout.rows:
            depth, width = 1, layout.rows  # identity: lossless
        self.table = tf.Variable(tf.zeros([depth, width, layout.dim], dtype), trainable=False)
        self.params = tf.Variable(hash_params(seed, stream, depth), trainable=False)
        self.sketch = Sketch(self.table, self.params, layout.rows, kind)
        self.cleaning = cleaning if kind == COUNT_MIN and not self.sketch.identity else None
        self.floats = depth * width * layout.dim
        self.dims = f"{depth}x{width}x{layout.dim}" + (" (identity)" if self.sketch.identity else "")

    def update(self, g2, decay, scale, step):
        self.sketch.decay_add_all(decay, scale * self.layout.view(g2))
        if self.cleaning:
            alpha, every = self.cleaning
            due = tf.equal(tf.math.floormod(step, every), 0)
            tf.cond(due, lambda: self._clean(alpha), lambda: tf.constant(False))

    def _clean(self, alpha):
        self.sketch.scale(alpha)
        return tf.constant(True)

    def estimate(self):
        return self.layout.unview(self.sketch.query_all())

    def state_variables(self):
        return [self.table]


class _SM3Estimator(_Estimator):
    """SM3-II (``variant="II"``: ``nu = decay min_r mu(r) + scale g^2``,
    ``mu(r) = max over the slice of nu``) or SM3-I on per-axis covers.  The
    full-size ``nu`` of the last step is kept for reading only (diagnostics)."""

    def __init__(self, shape, dtype, variant):
        super().__init__(shape, dtype)
        self.variant = variant
        self.covers = [tf.Variable(tf.zeros([n], dtype), trainable=False) for n in self.shape]
        self.nu = tf.Variable(tf.zeros(self.shape, dtype), trainable=False)
        self.floats = sum(self.shape)
        self.dims = " + ".join(f"[{n}]" for n in self.shape)

    def update(self, g2, decay, scale, step):
        nu = sm3.dense_accumulate(self.covers, g2, decay, scale, self.variant)  # the optimizer's own step
        self.nu.assign(tf.broadcast_to(nu, self.shape))

    def estimate(self):
        return tf.convert_to_tensor(self.nu)

    def state_variables(self):
        return self.covers + [self.nu]


class _Rank1Estimator(_Estimator):
    """Adafactor's factored second moment on ``[prod(shape[:-1]), shape[-1]]``."""

    def __init__(self, shape, dtype):
        super().__init__(shape, dtype)
        self.n, self.m = int(np.prod(self.shape[:-1])), self.shape[-1]
        self.r = tf.Variable(tf.zeros([self.n], dtype), trainable=False)
        self.c = tf.Variable(tf.zeros([self.m], dtype), trainable=False)
        self.floats, self.dims = self.n + self.m, f"[{self.n}] + [{self.m}]"

    def update(self, g2, decay, scale, step):
        g2 = tf.reshape(g2, [self.n, self.m])
        self.r.assign(decay * self.r + scale * tf.reduce_sum(g2, axis=1))
        self.c.assign(decay * self.c + scale * tf.reduce_sum(g2, axis=0))

    def estimate(self):
        total = tf.reduce_sum(self.r)
        est = self.r[:, None] * self.c[None, :] / tf.where(total > 0, total, tf.ones_like(total))
        return tf.reshape(est, self.shape)

    def state_variables(self):
        return [self.r, self.c]


# --- the shadow ------------------------------------------------------------------
class Shadow:
    """Exact accumulator and its estimators for every variable of rank >= 2.

    Args:
        methods: ``{name: spec}``; spec ``kind`` in ``count_sketch``,
            ``count_min``, ``sm3``, ``sm3_I``, ``rank1``; sketches take
            ``depth`` (default 3), ``memory`` (``"equal"``: SM3's float count
            for the variable, or a fraction of the exact state) and
            ``cleaning`` (``(alpha, every)``, count-min only).
        beta: ``None`` for AdaGrad's sum, or the moving-average rate.
        top_k: the "largest entries" of the top-k error (per variable and
            over all shadowed variables together).
        seed: hash seed of the sketches.
    """

    def __init__(self, methods=None, beta=None, top_k=100, seed=0):
        self.methods = dict(DEFAULT_METHODS if methods is None else methods)
        for name, spec in self.methods.items():
            if spec.get("kind") not in KINDS[1:]:
                raise ValueError(f"method {name!r}: `kind` must be one of {KINDS[1:]}, got {spec.get('kind')!r}.")
        if beta is not None and not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be None or in [0, 1), got {beta!r}.")
        self.beta, self.top_k, self.seed = beta, int(top_k), int(seed)
        self.variables, self.exact, self.estimators = [], {}, {}
        self.records = []
        self.step = None
        self.built = False

    # -- construction -------------------------------------------------------------
    def build(self, variables):
        """Creates the state for the variables of rank >= 2 among ``variables``."""
        if self.built:
            return
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        for index, var in enumerate(variables):
            shape = tuple(int(s) for s in var.shape)
            if len(shape) < 2:
                continue
            path = _path(var)
            self.variables.append(path)
            self.exact[path] = _Exact(shape, tf.float32)
            self.estimators[path] = {
                name: self._make(spec, shape, index) for name, spec in self.methods.items()
            }
        self.built = True

    def _make(self, spec, shape, index):
        kind = spec["kind"]
        if kind in (COUNT_SKETCH, COUNT_MIN):
            depth = int(spec.get("depth", 3))
            memory = spec.get("memory", "equal")

            def budget(layout):
                if memory == "equal":
                    return max(1, sum(shape) // (depth * layout.dim))
                return sketch_width(layout.rows, depth, float(memory))

            return _SketchEstimator(shape, tf.float32, kind, depth, budget, self.seed, index, spec.get("cleaning"))
        if kind in ("sm3", "sm3_I"):
            return _SM3Estimator(shape, tf.float32, "I" if kind == "sm3_I" else "II")
        return _Rank1Estimator(shape, tf.float32)

    # -- the stream -----------------------------------------------------------------
    def observe(self, grads, variables):
        """Feeds one step's gradients (dense or ``IndexedSlices``, any order
        of ``variables``); graph-safe (runs inside ``tf.function``)."""
        if not self.built:
            self.build(variables)
        decay, scale = (1.0, 1.0) if self.beta is None else (self.beta, 1.0 - self.beta)
        self.step.assign_add(1)
        step = tf.convert_to_tensor(self.step)
        wanted = set(self.variables)
        for g, var in zip(grads, variables):
            path = _path(var)
            if g is None or path not in wanted:
                continue
            g = tf.cast(tf.convert_to_tensor(g), tf.float32)
            g2 = g * g
            self.exact[path].update(g2, decay, scale, step)
            for est in self.estimators[path].values():
                est.update(g2, decay, scale, step)

    def memory(self):
        """Floats (and bytes, float32) per method and per variable, with dimensions."""
        out = {}
        names = ["exact"] + list(self.methods)
        for name in names:
            per = {}
            for path in self.variables:
                est = self.exact[path] if name == "exact" else self.estimators[path][name]
                per[path] = {"floats": int(est.floats), "dims": est.dims}
            total = sum(p["floats"] for p in per.values())
            out[name] = {"floats": total, "bytes": 4 * total, "variables": per}
        return out

    def record(self, step=None):
        """Error of every estimator against the exact shadow now; appended to
        ``self.records`` and returned."""
        step = int(self.step.numpy()) if step is None else int(step)
        record = {"step": step, "methods": {}}
        exact = {p: self.exact[p].estimate().numpy().ravel().astype(np.float64) for p in self.variables}
        all_exact = np.concatenate([exact[p] for p in self.variables]) if self.variables else np.zeros(0)
        for name in self.methods:
            per, ests = {}, []
            for p in self.variables:
                est = self.estimators[p][name].estimate().numpy().ravel().astype(np.float64)
                ests.append(est)
                per[p] = error_metrics(est, exact[p], self.top_k)
            all_est = np.concatenate(ests) if ests else np.zeros(0)
            record["methods"][name] = {"all": error_metrics(all_est, all_exact, self.top_k), "variables": per}
        self.records.append(record)
        return record

    def results(self):
        return {
            "target": "adagrad_sum" if self.beta is None else f"ema(beta={self.beta})",
            "top_k": self.top_k,
            "methods": self.methods,
            "memory": self.memory(),
            "records": self.records,
        }

    def write_json(self, path, extra=None):
        data = self.results()
        if extra:
            data.update(extra)
        with open(path, "w") as fh:
            json.dump(_jsonable(data), fh, indent=1)
        return path


def error_metrics(est, exact, top_k=100, rtol=1e-5, epsilon=1e-7):
    """Relative l2 error (all entries and the ``top_k`` largest exact ones),
    over-/under-estimation rates (beyond ``rtol * max|exact|``), and the
    effective step-size ratio ``sqrt((exact + eps) / (max(est, 0) + eps))``
    (AdaGrad's ``g / sqrt(v + eps)`` with the estimate in place of ``v``,
    negative estimates clamped as an optimizer must; 10/50/90th percentiles
    over entries with ``exact > 0``: < 1 means the compressed optimizer steps
    shorter than AdaGrad would)."""
    est, exact = np.asarray(est, np.float64), np.asarray(exact, np.float64)
    norm = np.linalg.norm(exact)
    tol = rtol * (np.max(np.abs(exact)) if exact.size else 0.0)
    k = min(top_k, exact.size)
    top = np.argpartition(-exact, k - 1)[:k] if k else np.zeros(0, int)
    top_norm = np.linalg.norm(exact[top])
    pos = exact > 0
    ratio = np.sqrt((exact[pos] + epsilon) / (np.maximum(est[pos], 0.0) + epsilon))
    q = np.percentile(ratio, [10, 50, 90]) if ratio.size else [math.nan] * 3
    return {
        "rel_l2": float(np.linalg.norm(est - exact) / norm) if norm > 0 else float(np.linalg.norm(est)),
        "topk_rel_l2": float(np.linalg.norm(est[top] - exact[top]) / top_norm) if top_norm > 0 else 0.0,
        "over_rate": float(np.mean(est > exact + tol)) if exact.size else 0.0,
        "under_rate": float(np.mean(est < exact - tol)) if exact.size else 0.0,
        "negative_rate": float(np.mean(est < 0)) if exact.size else 0.0,
        "step_ratio_p10": float(q[0]),
        "step_ratio_p50": float(q[1]),
        "step_ratio_p90": float(q[2]),
        "size": int(exact.size),
    }


# --- model.fit -----------------------------------------------------------------------
def attach(optimizer, shadow):
    """Makes ``shadow`` observe every update's gradients as the optimizer's
    update step receives them (loss-unscaled, accumulated and clipped by
    Keras); returns a function that removes the hook.

    keras_sketch optimizers (also inside a ``LossScaleOptimizer``) have a
    public hook for this, ``add_gradient_observer``.  Keras's own optimizers
    have none: their ``_backend_update_step`` (the one method Keras calls per
    update with those gradients) is wrapped on the instance until the
    returned function is called.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(inner, CompressedStateMixin):
        return inner.add_gradient_observer(shadow.observe)
    original = optimizer._backend_update_step

    def update_step(grads, trainable_variables, learning_rate):
        shadow.observe(list(grads), list(trainable_variables))
        return original(grads, trainable_variables, learning_rate)

    optimizer._backend_update_step = update_step

    def detach():
        if optimizer.__dict__.get("_backend_update_step") is update_step:
            del optimizer._backend_update_step

    return detach


try:
    import keras

    class ShadowCallback(keras.callbacks.Callback):
        """Runs a ``Shadow`` next to ``model.fit``'s optimizer.

        Records at ``record_steps`` (optimizer iterations, 1-based; with
        ``steps_per_execution > 1`` only steps ending an execution are seen)
        and at the end of training; writes ``json_path`` if given.
        """

        def __init__(self, shadow=None, record_steps=(1, 10, 100, 1000), json_path=None, record_end=True):
            super().__init__()
            self.shadow = shadow if shadow is not None else Shadow()
            self.record_steps = set(int(s) for s in record_steps)
            self.json_path, self.record_end = json_path, record_end
            self._detach = None

        def on_train_begin(self, logs=None):
            self.shadow.build(self.model.trainable_variables)
            self._detach = attach(self.model.optimizer, self.shadow)
            self.model.make_train_function(force=True)  # trace again, with the hook

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step in self.record_steps:
                self.shadow.record(step)

        def on_train_end(self, logs=None):
            if self._detach:
                self._detach()
                self._detach = None
            self.model.make_train_function(force=True)
            step = int(self.model.optimizer.iterations.numpy())
            if self.record_end and (not self.shadow.records or self.shadow.records[-1]["step"] != step):
                self.shadow.record(step)
            if self.json_path:
                self.shadow.write_json(self.json_path)

except ImportError:  # pragma: no cover
    pass


# --- figures -------------------------------------------------------------------------
def plot(results, out_dir, prefix="approximation", metrics=("rel_l2", "topk_rel_l2")):
    """Error vs step per method (one panel per metric, all shadowed variables
    together) and memory per method; returns the PNG paths."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    records = results["records"]
    steps = [r["step"] for r in records]
    names = list(results["memory"].keys())[1:]
    paths = []
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics):
        for name in names:
            ax.plot(steps, [max(r["methods"][name]["all"][metric], 1e-8) for r in records], marker=".", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title({"rel_l2": "relative l2 error, all entries", "topk_rel_l2": f"relative l2 error, top {results['top_k']}"}.get(metric, metric))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}_error.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    mem = results["memory"]
    labels = ["exact"] + names
    values = [mem[n]["floats"] for n in labels]
    ax.barh(labels, values, color=["gray"] + ["C%d" % i for i in range(len(names))])
    ax.set_xscale("log")
    ax.set_xlabel("state floats (all shadowed variables)")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,}", va="center", fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}_memory.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def _path(var):
    return getattr(var, "path", None) or var.name


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
