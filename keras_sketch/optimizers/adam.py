"""CSAdam: Adam with count-sketch state (the paper's Algorithm 4)."""

import keras
import tensorflow as tf

from keras_sketch.optimizers.base import (
    COUNT_MIN,
    SketchOptimizer,
    check_beta,
    check_moment_option,
    check_number,
    moment_kind,
)


@keras.saving.register_keras_serializable(package="keras_sketch")
class CSAdam(SketchOptimizer):
    """Adam whose 2nd moment is a count-min sketch (and optionally its 1st moment a count-sketch).

    Args:
        learning_rate, beta_1, beta_2, epsilon: as ``keras.optimizers.Adam``
            (same update: ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m /
            (sqrt(v) + epsilon)``).
        first_moment: ``"exact"`` (default) keeps the 1st moment full-size;
            ``"sketch"`` stores it in a count-sketch too (the paper's CS-MV).
            A sketched 1st moment of a dense gradient is very noisy (README),
            so it is not the default.  ``beta_1=0`` keeps no 1st moment at all.
        Sketch arguments (``depth``, ``compression``, ``width``, ``min_rows``,
        ``hash_axis``, ``seed``, ``cleaning_*``): see ``SketchOptimizer``.
        Every ``keras.optimizers.Optimizer`` argument is accepted.
    """

    _exact_slot_count = 2
    _fused_kind = "adam"

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        first_moment="exact",
        name="csadam",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = check_beta("beta_1", beta_1)
        self.beta_2 = check_beta("beta_2", beta_2)
        self.epsilon = float(check_number("epsilon", epsilon, 0.0))
        self.first_moment = check_moment_option(first_moment)

    def _slot_kinds(self):
        slots = {}
        if self.beta_1 > 0:
            slots["m"] = (moment_kind(self.first_moment), 0.0)
        slots["v"] = (COUNT_MIN, 0.0)
        return slots

    # state_budget may run Adam without its 1st moment (then m = g, beta_1 = 0).
    _droppable_slots = ("m",)

    def _step(self, g, state, lr, t):
        m = state.ema("m", g, self.beta_1) if state.has("m") else g
        v = state.ema("v", g * g, self.beta_2)
        return self._step_size(lr, t, state.has("m")) * m / (tf.sqrt(v) + self.epsilon)

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
                "first_moment": self.first_moment,
            }
        )
        return config
