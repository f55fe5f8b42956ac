"""CSRMSprop: RMSprop with a count-min sketch of the mean square."""

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
class CSRMSprop(SketchOptimizer):
    """RMSprop whose mean-square accumulator is a count-min sketch.

    Args:
        learning_rate, rho, momentum, epsilon: as ``keras.optimizers.RMSprop``
            (``centered`` is not offered).  With ``momentum > 0`` the buffer
            ``m <- momentum * m + lr * g / sqrt(v + epsilon)`` is exact, or a
            count-sketch with ``first_moment="sketch"``.
        Sketch and Keras base arguments: see ``SketchOptimizer``.
    """

    def __init__(
        self,
        learning_rate=0.001,
        rho=0.9,
        momentum=0.0,
        epsilon=1e-7,
        first_moment="exact",
        name="csrmsprop",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.rho = check_beta("rho", rho)
        self.momentum = check_beta("momentum", momentum)
        self.epsilon = float(check_number("epsilon", epsilon, 0.0))
        self.first_moment = check_moment_option(first_moment)
        self._exact_slot_count = 2 if self.momentum > 0 else 1

    def _slot_kinds(self):
        slots = {"v": (COUNT_MIN, 0.0)}
        if self.momentum > 0:
            slots["m"] = (moment_kind(self.first_moment), 0.0)
        return slots

    def _step(self, g, state, lr, t):
        v = state.ema("v", g * g, self.rho)
        increment = lr * g / tf.sqrt(v + self.epsilon)
        if self.momentum > 0:
            return state.accumulate("m", increment, decay=self.momentum)
        return increment

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
                "first_moment": self.first_moment,
            }
        )
        return config
