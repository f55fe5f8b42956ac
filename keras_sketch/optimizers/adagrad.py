"""CSAdagrad: Adagrad with a count-min sketch accumulator (Algorithm 3)."""

import keras
import tensorflow as tf

from keras_sketch.optimizers.base import COUNT_MIN, SketchOptimizer, check_number


@keras.saving.register_keras_serializable(package="keras_sketch")
class CSAdagrad(SketchOptimizer):
    """Adagrad whose squared-gradient accumulator is a count-min sketch.

    Args:
        learning_rate, initial_accumulator_value, epsilon: as
            ``keras.optimizers.Adagrad`` (``lr * g / sqrt(acc + epsilon)``).
            Sketch buckets start at ``initial_accumulator_value``, so every
            row's estimate starts there too.
    """

    def __init__(
        self,
        learning_rate=0.001,
        initial_accumulator_value=0.1,
        epsilon=1e-7,
        name=None,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.initial_accumulator_value = float(
            check_number("initial_accumulator_value", initial_accumulator_value, 0.0)
        )
        self.epsilon = float(check_number("epsilon", epsilon, 0.0))

    _no_catch_up = ("a zero gradient leaves Adagrad's accumulator and weights unchanged, so its lazy "
                    "sparse updates already equal dense Adagrad's")

    def _slot_kinds(self):
        return {"v": (COUNT_MIN, self.initial_accumulator_value)}

    def _step(self, g, state, lr, t):
        v = state.accumulate("v", g * g, decay=1.0)
        return lr * g / tf.sqrt(v + self.epsilon)

    _fused_kind = "adagrad"

    def _fused_coefficients(self, lr, t):
        return [lr, self.epsilon], {"v": (1.0, 1.0)}, False

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon,
            }
        )
        return config
