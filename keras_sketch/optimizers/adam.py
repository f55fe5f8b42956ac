"""CSAdam: Adam with count-sketch state (the paper's Algorithm 4)."""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_sketch.optimizers.base import (
    COUNT_MIN,
    SketchOptimizer,
    check_beta,
    check_bool,
    check_moment_option,
    check_number,
    moment_kind,
)
from keras_sketch.state import decay_rows, geometric_cap, missed_sum


@keras.saving.register_keras_serializable(package="keras_sketch")
class CSAdam(SketchOptimizer):
    """Adam whose 2nd moment is a count-min sketch (and optionally its 1st moment a count-sketch).

    Args:
        learning_rate, beta_1, beta_2, epsilon: as ``keras.optimizers.Adam``
            (same update: ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m /
            (sqrt(v) + epsilon)``); ``beta_1`` and ``beta_2`` in [0, 1).
        amsgrad: as Keras's: the step divides by the running maximum
            ``vhat <- max(vhat, v)`` instead of ``v`` (Keras's 3rd slot).
            ``vhat`` is kept like ``v``: exact where ``v`` is exact, else a
            count-min table with ``v``'s hashing, updated bucket by bucket
            (``max(vhat[b], v[b])`` for every bucket ``b`` the step wrote).
            A count-min bucket holds the sum of its rows' ``v``, an upper
            bound of each; the maximum over time of upper bounds bounds the
            maximum of each row's ``v``, so the queried ``vhat`` never
            underestimates exact AMSGrad's, and never falls below the
            queried ``v``.  The fused op has no kernel for it: the pure-TF
            path runs.
        first_moment: ``"exact"`` (default) keeps the 1st moment full-size;
            ``"sketch"`` stores it in a count-sketch too (the paper's CS-MV).
            A sketched 1st moment of a dense gradient is very noisy (README),
            so it is not the default.  ``beta_1=0`` keeps no 1st moment at all.
    """

    _fused_kind = "adam"

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        first_moment="exact",
        name=None,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = check_beta("beta_1", beta_1)
        self.beta_2 = check_beta("beta_2", beta_2)
        self.epsilon = float(check_number("epsilon", epsilon, 0.0))
        self.amsgrad = check_bool("amsgrad", amsgrad)
        self.first_moment = check_moment_option(first_moment)
        if self.catch_up:
            self._catch_up_cap = adam_catch_up_cap(self.beta_1, self.beta_2)

    @property
    def _exact_slot_count(self):
        return 3 if self.amsgrad else 2  # Keras's Adam: m, v (and vhat)

    def _slot_kinds(self):
        slots = {}
        if self.beta_1 > 0:
            slots["m"] = (moment_kind(self.first_moment), 0.0)
        slots["v"] = (COUNT_MIN, 0.0)
        if self.amsgrad:
            slots["vhat"] = (COUNT_MIN, 0.0)  # kept like v, with v's hashing
        return slots

    def _fused_unsupported(self):
        return "amsgrad" if self.amsgrad else None

    def _budget_estimator(self):
        # AMSGrad's bucket-wise maximum keeps count-min's upper bound; the
        # rank-1 factored form has no such maximum, so under a budget its
        # slots stay count-min sketches (or exact).
        return COUNT_MIN if self.amsgrad else "auto"

    # state_budget may run Adam without its 1st moment (then m = g, beta_1 = 0).
    _droppable_slots = ("m",)

    def _step(self, g, state, lr, t):
        m = state.ema("m", g, self.beta_1) if state.has("m") else g
        v = state.ema("v", g * g, self.beta_2)
        if self.amsgrad:
            v = state.running_max("vhat", "v")
        return self._step_size(lr, t, state.has("m")) * m / (tf.sqrt(v) + self.epsilon)

    def _catch_up(self, state, last, skipped, lr_at):
        """A missed step has a zero gradient: ``m`` and ``v`` decay by
        ``beta_1^s``, ``beta_2^s`` and the weight moves by
        ``sum_j step_size(last + j) * beta_1^j m / (sqrt(beta_2^j v) + eps)``
        (``vhat`` with amsgrad: it keeps its maximum while ``v`` decays);
        ``m`` and ``v`` as the row's last step left them.  The sum runs over
        at most ``_catch_up_cap`` missed steps (``adam_catch_up_cap``)."""
        s = tf.cast(skipped, last.dtype)
        if state.has("m"):
            m, v = state.read("m"), state.read("vhat" if self.amsgrad else "v")
            beta_1, beta_2 = (tf.cast(b, m.dtype) for b in (self.beta_1, self.beta_2))

            def term(j):
                second = v if self.amsgrad else tf.pow(beta_2, j) * v
                size = self._step_size(lr_at(last + j), last + j)
                return size * tf.math.divide_no_nan(tf.pow(beta_1, j) * m, tf.sqrt(second) + self.epsilon)

            move = missed_sum(term, skipped, self._catch_up_cap, m)
            decay_rows(state, "m", tf.pow(beta_1, s))
        else:  # no 1st moment: a zero gradient moves nothing
            move = 0.0
        decay_rows(state, "v", tf.pow(tf.cast(self.beta_2, last.dtype), s))
        return move

    def _step_size(self, lr, t, first_moment=True):
        """``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)``: Keras's bias correction."""
        beta_1_power = tf.pow(tf.cast(self.beta_1 if first_moment else 0.0, lr.dtype), t)
        beta_2_power = tf.pow(tf.cast(self.beta_2, lr.dtype), t)
        return lr * tf.sqrt(1.0 - beta_2_power) / (1.0 - beta_1_power)

    def _fused_coefficients(self, lr, t):
        slots = {"m": (self.beta_1, 1.0 - self.beta_1), "v": (self.beta_2, 1.0 - self.beta_2)}
        return [self._step_size(lr, t, "m" not in self.dropped_slots), self.epsilon], slots, False

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "first_moment": self.first_moment,
            }
        )
        return config


def adam_catch_up_cap(beta_1, beta_2):
    """How many missed steps ``catch_up`` replays: the moves of later ones sum
    to less than float32's unit roundoff (2^-24) of a row's missed move.

    The ``j``-th missed move is ``c(t0 + j) lr * beta_1^j m / (sqrt(beta_2^j
    v) + eps)`` with ``c(t) = sqrt(1 - beta_2^t) / (1 - beta_1^t)``.  All have
    the sign of ``m``; relative to the first one each is at most ``C *
    r^(j-1)`` with ``r = beta_1 / sqrt(beta_2)`` (epsilon only shrinks later
    moves relative to the first) and ``C`` the largest ratio ``c(t') / c(t)``,
    ``t' > t``, for a learning rate that does not grow over the gap.  The
    tail after ``J`` steps is then at most ``C r^J / (1 - r)`` of the first
    move; ``J`` makes it at most 2^-24 (beta_1=0.9, beta_2=0.999: 199 steps).
    Needs ``beta_1^2 < beta_2`` (else later moves need not shrink).
    """
    ratio = beta_1 / math.sqrt(beta_2)
    if ratio >= 1.0:
        raise ValueError(
            f"`catch_up=True` needs beta_1**2 < beta_2 (got beta_1={beta_1}, beta_2={beta_2}): "
            "otherwise a row's missed moves do not shrink and cannot be summed in bounded work."
        )
    if beta_1 == 0.0:
        return 1
    t = np.arange(1, 200_001, dtype=np.float64)
    c = np.sqrt(-np.expm1(t * math.log(beta_2))) / -np.expm1(t * math.log(beta_1))
    later_max = np.maximum.accumulate(c[::-1])[::-1]  # max over t' >= t
    spread = float(max(1.0, np.max(later_max / c)))
    cap = geometric_cap(ratio, spread)
    if cap > MAX_CATCH_UP_STEPS:
        raise ValueError(
            f"`catch_up=True` with beta_1={beta_1}, beta_2={beta_2} would replay {cap} missed steps "
            f"per row (more than {MAX_CATCH_UP_STEPS}): beta_1 / sqrt(beta_2) is too close to 1."
        )
    return cap


MAX_CATCH_UP_STEPS = 20_000
