"""SM3: memory-efficient adaptive optimization with cover sets.

Anil, Gupta, Koren, Singer, "Memory-Efficient Adaptive Optimization",
NeurIPS 2019 (SM3-I: Algorithm 1, SM3-II: Algorithm 2), and the moving-average
form of their rebuttal.  The covers of a tensor of rank ``p >= 2`` are its
co-dimension-1 slices: one accumulator ``mu_i`` of shape ``[n_i]`` per axis;
entry ``x`` reads ``nu(x) = min_i mu_i(x_i)``.  Scalars and vectors keep a
full accumulator (diagonal AdaGrad).

Sparse gradients (``tf.IndexedSlices``, rows of axis 0) give exactly the dense
step with zero rows, for every option: SM3 is not linear, so the accumulators
of the other axes must see that the untouched rows' ``nu`` is
``decay * min_i mu_i`` (it can be their maximum), and with ``beta_2`` every
accumulator decays.  Both are O(sum n_i) vector operations: for an untouched
slice the maximum over the product of the other axes of a minimum of
per-axis values is the minimum of the per-axis maxima.  Padding rows of the
static-shape duplicate merge compute an untouched row's values, so taking
maxima with them is harmless.  With ``momentum`` the momentum of untouched
rows still moves them, so a sparse step then updates the whole variable.
"""

import keras
import tensorflow as tf

from keras_sketch import guard, memory
from keras_sketch.layers import warn_if_read_whole
from keras_sketch.optimizers.base import CompressedStateMixin, check_beta, check_number
from keras_sketch.sketch import EXACT
from keras_sketch.state import merge_duplicates
from keras_sketch.tf_internals import in_xla_context, tf_variable

VARIANTS = ("I", "II")
COVER = "sm3_cover"  # the memory report's kind of a per-axis accumulator


@keras.saving.register_keras_serializable(package="keras_sketch")
class SM3(CompressedStateMixin, keras.optimizers.Optimizer):
    """SM3-I / SM3-II: AdaGrad whose accumulator is a min over cover accumulators.

    Update: ``u = g / sqrt(nu + epsilon)`` (0 where that is 0/0), with
    ``momentum``: ``m <- momentum * m + (1 - momentum) * u``, then
    ``x <- x - lr * m`` (or ``lr * u``).  ``nu >= g^2`` always, and it upper
    bounds AdaGrad's accumulator ``sum g^2`` (paper, Claims 2 and 4), so no
    learning-rate decay is needed; warm-up is the user's choice.

    Args:
        learning_rate: step size (AdaGrad-like scale).
        variant: ``"II"`` (default; tighter, ``nu_II <= nu_I``):
            ``nu = decay * min_i mu_i + scale * g^2``, ``mu_i <- max over the
            slice of nu``.  ``"I"``: ``mu_i <- decay * mu_i + scale * max over
            the slice of g^2``, ``nu = min_i mu_i``.
        momentum: in [0, 1); 0 keeps no momentum slot.
        beta_2: ``None`` (default) for sums (``decay = scale = 1``), or in
            [0, 1) for the moving-average form (``decay = beta_2``,
            ``scale = 1 - beta_2``, the rebuttal's SM3-II; the same
            substitution for SM3-I), with Adam's bias correction
            ``nu / (1 - beta_2^t)``.
        epsilon: added to ``nu`` under the square root (>= 0).
        Every ``keras.optimizers.Optimizer`` argument is accepted.
    """

    def __init__(self, learning_rate=0.1, variant="II", momentum=0.0, beta_2=None, epsilon=0.0, name=None, **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
        self.variant = variant
        self.momentum = check_beta("momentum", momentum)
        self.beta_2 = None if beta_2 is None else check_beta("beta_2", beta_2)
        self.epsilon = float(check_number("epsilon", epsilon, 0.0))

    def build(self, var_list):
        """Creates one accumulator per axis of every matrix or higher-rank
        variable (a full accumulator for scalars and vectors), and the
        momentum buffers when ``momentum > 0``."""
        if self.built:
            return
        self._check_variables(var_list)
        super().build(var_list)
        self._covers, self._momenta, self._memory_rows = [], [], []
        for var in var_list:
            shape = tuple(int(s) for s in var.shape)
            shapes = [(n,) for n in shape] if len(shape) >= 2 else [shape]
            covers = [self._add_state_variable(var, f"sm3_{i}", s) for i, s in enumerate(shapes)]
            m = self._add_state_variable(var, "m", shape) if self.momentum else None
            self._covers.append(covers)
            self._momenta.append(m)
            self._memory_rows.append(self._memory_row(var, covers, m))
        self._track_state_spec()

    def _memory_row(self, var, covers, momentum):
        """The exact optimizer is AdaGrad (one full-size slot), plus a
        full-size momentum when SM3 keeps one."""
        kind = COVER if len(covers) > 1 else EXACT
        states = {f"sm3_{i}": (kind, c) for i, c in enumerate(covers)}
        if momentum is not None:
            states["m"] = (EXACT, momentum)
        return memory.state_row(
            var, states, "covered" if len(covers) > 1 else "exact", 1 + (momentum is not None),
            path="TF (SM3 has no fused kernel)",
            sparse_path="sparse rows" if momentum is None else "sparse covers; the momentum moves every row",
        )

    def _decay_scale(self):
        return (1.0, 1.0) if self.beta_2 is None else (self.beta_2, 1.0 - self.beta_2)

    def update_step(self, gradient, variable, learning_rate):
        """One SM3 step: update the covers, estimate each entry as the minimum
        over its covers, and step by the gradient over its square root (the
        update of the class doc; sparse gradients give exactly the dense step)."""
        index = self._get_variable_index(variable)
        covers = [tf_variable(c) for c in self._covers[index]]
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        # Containment (keras_sketch.guard): a slice along axis 0 holding a
        # NaN/Inf counts as a zero gradient, which for SM3 is the same as an
        # absent row (its sparse step is the dense step with zero rows).
        if isinstance(gradient, tf.IndexedSlices):
            warn_if_read_whole(self, variable)
            g = _zero_nonfinite_slices(variable, tf.cast(gradient.values, dtype))
            ids = tf.cast(gradient.indices, tf.int64)
            if in_xla_context():  # no run-time assertions: out-of-range ids become zero rows
                fits = guard.in_range(ids, int(variable.shape[0]))
                ids = tf.where(fits, ids, tf.zeros_like(ids))
                g = g * tf.reshape(tf.cast(fits, dtype), [-1] + [1] * (len(g.shape) - 1))
            ids, g, valid = merge_duplicates(ids, g)
            nu = sparse_accumulate(covers, ids, g * g, *self._decay_scale(), self.variant)
            rows = ids
        else:
            g = _zero_nonfinite_slices(variable, tf.cast(gradient, dtype))
            nu = dense_accumulate(covers, g * g, *self._decay_scale(), self.variant)
            rows = None
        if self.beta_2 is not None:
            t = tf.cast(self.iterations + 1, dtype)
            nu = nu / (1.0 - tf.pow(tf.cast(self.beta_2, dtype), t))
        denom = nu + self.epsilon
        u = tf.where(denom > 0, g * tf.math.rsqrt(tf.where(denom > 0, denom, 1.0)), tf.zeros_like(g))
        var = tf_variable(variable)
        if self._momenta[index] is not None:
            m = tf_variable(self._momenta[index])
            m.assign(self.momentum * m)
            if rows is None:
                m.assign_add((1.0 - self.momentum) * u)
            else:
                m.scatter_nd_add(rows[:, None], (1.0 - self.momentum) * u)
            var.assign_sub(lr * m)
        elif rows is None:
            var.assign_sub(lr * u)
        else:
            var.scatter_nd_sub(rows[:, None], lr * u)  # padding rows have u == 0

    def get_config(self):
        config = super().get_config()
        config.update(
            {"variant": self.variant, "momentum": self.momentum, "beta_2": self.beta_2, "epsilon": self.epsilon}
        )
        return config


# -- the accumulators (also the estimator of keras_sketch.diagnostics) -------------
def dense_accumulate(covers, g2, decay, scale, variant):
    """One step of SM3's accumulators on a dense squared gradient ``g2``:
    assigns the ``covers`` (one ``[n_i]`` variable per axis, or one full-size
    variable for rank <= 1) and returns ``nu``, the estimate of the step."""
    rank = len(g2.shape)
    if len(covers) == 1:  # rank <= 1: full accumulator, both variants agree
        new = decay * tf.convert_to_tensor(covers[0]) + scale * g2
        covers[0].assign(new)
        return new
    others = lambda i: [a for a in range(rank) if a != i]  # noqa: E731
    if variant == "I":
        new = [decay * mu + scale * tf.reduce_max(g2, axis=others(i)) for i, mu in enumerate(covers)]
        for mu, value in zip(covers, new):
            mu.assign(value)
        return min_over_covers(new, rank)
    nu = decay * min_over_covers(covers, rank) + scale * g2
    for i, mu in enumerate(covers):
        mu.assign(tf.reduce_max(nu, axis=others(i)))
    return nu


def sparse_accumulate(covers, ids, g2, decay, scale, variant):
    """``dense_accumulate`` for a gradient that is zero off the unique rows
    ``ids`` (``g2`` holds those rows); returns ``nu`` of those rows."""
    rank = len(g2.shape)
    if len(covers) == 1:
        mu = covers[0]
        if decay != 1.0:
            mu.assign(decay * mu)
        mu.scatter_nd_add(ids[:, None], scale * g2)
        return tf.gather(mu, ids)
    others = lambda i: [a for a in range(rank) if a != i]  # noqa: E731
    old = [tf.convert_to_tensor(mu) for mu in covers]
    if variant == "I":
        rows_new = decay * tf.gather(old[0], ids) + scale * tf.reduce_max(g2, axis=others(0))
        new = [tf.tensor_scatter_nd_max(decay * old[0], ids[:, None], rows_new)]
        new += [decay * old[i] + scale * tf.reduce_max(g2, axis=others(i)) for i in range(1, rank)]
        for mu, value in zip(covers, new):  # untouched rows add max(0) = 0 to the other axes
            mu.assign(value)
        return min_over_covers([rows_new] + new[1:], rank)
    nu = decay * min_over_covers([tf.gather(old[0], ids)] + old[1:], rank) + scale * g2
    maxima = [tf.reduce_max(a) for a in old]
    # nu of an untouched slice along axis 0 at index r is decay * min(mu_0(r), min_k>0 max mu_k)
    untouched_rows = decay * tf.minimum(old[0], tf.reduce_min(tf.stack(maxima[1:])))
    covers[0].assign(tf.tensor_scatter_nd_max(untouched_rows, ids[:, None], tf.reduce_max(nu, axis=others(0))))
    touched = tf.scatter_nd(ids[:, None], tf.ones_like(ids, tf.int32), tf.shape(old[0], tf.int64)) > 0
    max_untouched_0 = tf.reduce_max(tf.where(touched, tf.zeros_like(old[0]), old[0]))
    for i in range(1, rank):
        cap = tf.reduce_min(tf.stack([max_untouched_0] + [maxima[k] for k in range(1, rank) if k != i]))
        from_untouched = decay * tf.minimum(old[i], cap)
        covers[i].assign(tf.maximum(from_untouched, tf.reduce_max(nu, axis=others(i))))
    return nu


def _zero_nonfinite_slices(variable, g):
    """``g`` with every axis-0 slice that holds a NaN/Inf set to zero."""
    flat = tf.reshape(g, [tf.shape(g)[0], -1]) if len(g.shape) >= 1 else tf.reshape(g, [1, 1])
    flat, finite = guard.finite_rows(flat)
    guard.report_dropped(variable, finite)
    return tf.reshape(flat, tf.shape(g))


def min_over_covers(covers, rank):
    """``nu[x] = min_i mu_i[x_i]``; ``covers[0]`` may hold gathered rows ``[k]``."""
    out = None
    for i, mu in enumerate(covers):
        shape = [1] * rank
        shape[i] = -1
        b = tf.reshape(tf.convert_to_tensor(mu), shape)
        out = b if out is None else tf.minimum(out, b)
    return out
