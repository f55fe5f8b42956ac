"""CSRMSprop: RMSprop with a count-min sketch of the mean square."""

import keras
import tensorflow as tf

from keras_sketch.optimizers.base import (
    COUNT_MIN,
    SketchOptimizer,
    check_bool,
    check_moment_option,
    check_number,
    moment_kind,
)
from keras_sketch.state import decay_rows


@keras.saving.register_keras_serializable(package="keras_sketch")
class CSRMSprop(SketchOptimizer):
    """RMSprop whose mean-square accumulator is a count-min sketch.

    Args:
        learning_rate, rho, momentum, epsilon, centered: as
            ``keras.optimizers.RMSprop`` (``lr * g / sqrt(v + epsilon)``;
            ``rho`` and ``momentum`` in [0, 1]).  With ``momentum > 0`` the
            buffer ``m <- momentum * m + lr * g / sqrt(v + epsilon)`` is
            exact, or a count-sketch with ``first_moment="sketch"``.
        centered: divide by the variance estimate ``v - mg^2`` instead of
            ``v``, with the mean gradient ``mg <- rho * mg + (1 - rho) * g``
            (Keras's ``average_gradient`` slot).  ``mg`` is signed, so it is
            kept like the momentum buffer: exact, or a count-sketch with
            ``first_moment="sketch"``.  A sketched ``mg`` can overestimate
            ``mg^2`` beyond ``v``, so ``v - mg^2`` is clamped at 0.  The fused
            op has no kernel for it: the pure-TF path runs.
        first_moment: ``"exact"`` (default) or ``"sketch"``: how the signed
            slots (momentum buffer, mean gradient) are kept.
    """

    def __init__(
        self,
        learning_rate=0.001,
        rho=0.9,
        momentum=0.0,
        epsilon=1e-7,
        centered=False,
        first_moment="exact",
        name=None,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        # rho = 1 keeps v at 0 and momentum = 1 never decays: defined, as in Keras.
        self.rho = float(check_number("rho", rho, 0.0, 1.0))
        self.momentum = float(check_number("momentum", momentum, 0.0, 1.0))
        self.epsilon = float(check_number("epsilon", epsilon, 0.0))
        self.centered = check_bool("centered", centered)
        self.first_moment = check_moment_option(first_moment)

    @property
    def _exact_slot_count(self):
        return 1 + (self.momentum > 0) + self.centered  # Keras's RMSprop's slots

    def _slot_kinds(self):
        slots = {"v": (COUNT_MIN, 0.0)}
        if self.momentum > 0:
            slots["m"] = (moment_kind(self.first_moment), 0.0)
        if self.centered:
            slots["mg"] = (moment_kind(self.first_moment), 0.0)
        return slots

    def _fused_unsupported(self):
        return "centered" if self.centered else None

    def _step(self, g, state, lr, t):
        v = state.ema("v", g * g, self.rho)
        if self.centered:
            mg = state.ema("mg", g, self.rho)
            v = tf.maximum(v - tf.square(mg), 0.0)
        increment = lr * g / tf.sqrt(v + self.epsilon)
        if self.momentum > 0:
            return state.accumulate("m", increment, decay=self.momentum)
        return increment

    def _catch_up(self, state, last, skipped, lr_at):
        """A missed step has a zero gradient, hence a zero increment: ``v``
        (and ``mg``) decay by ``rho^s``; with momentum, ``m`` decays by
        ``momentum^s`` and the weight moves by ``sum_{j=1..s} momentum^j m``
        (closed form; the learning rate is already inside ``m``)."""
        s = tf.cast(skipped, last.dtype)
        rho = tf.cast(self.rho, last.dtype)
        decay_rows(state, "v", tf.pow(rho, s))
        if self.centered:
            decay_rows(state, "mg", tf.pow(rho, s))
        if self.momentum == 0:
            return 0.0
        m = state.read("m")
        mu = tf.cast(self.momentum, m.dtype)
        total = s if self.momentum == 1.0 else mu * (1.0 - tf.pow(mu, s)) / (1.0 - mu)
        decay_rows(state, "m", tf.pow(mu, s))
        return total * m

    _fused_kind = "rmsprop"

    def _fused_coefficients(self, lr, t):
        return [lr, self.epsilon], {"v": (self.rho, 1.0 - self.rho), "m": (self.momentum, 1.0)}, False

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "rho": self.rho,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "centered": self.centered,
                "first_moment": self.first_moment,
            }
        )
        return config
