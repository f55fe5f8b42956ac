"""CSMomentum: SGD with count-sketch momentum (Algorithm 2)."""

import keras

from keras_sketch.optimizers.base import COUNT_SKETCH, SketchOptimizer, check_bool, check_number


@keras.saving.register_keras_serializable(package="keras_sketch")
class CSMomentum(SketchOptimizer):
    """SGD with momentum whose momentum buffer is a count-sketch (median query).

    The update is the paper's ``m <- momentum * m + g``, ``x <- x - lr * m``
    (Nesterov: ``x <- x - lr * (g + momentum * m)``).  With a constant
    learning rate it equals ``keras.optimizers.SGD(momentum=...)``; Keras folds
    the learning rate into its buffer, so under a schedule the two differ the
    way PyTorch's and Keras's SGD differ.

    Args:
        learning_rate, momentum, nesterov: as ``keras.optimizers.SGD``
            (``momentum`` in [0, 1], as Keras accepts; note the default 0.9,
            Keras's is 0).  ``momentum=0`` is plain SGD and keeps no state.
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, nesterov=False, name=None, **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        try:
            self.momentum = float(check_number("momentum", momentum, 0.0, 1.0))
        except ValueError:  # in Keras's SGD's words
            raise ValueError(f"`momentum` must be a float between [0, 1], got {momentum!r}.") from None
        self.nesterov = check_bool("nesterov", nesterov)

    @property
    def _exact_slot_count(self):
        return 1 if self.momentum > 0 else 0  # Keras's SGD keeps no slot without momentum

    def _slot_kinds(self):
        return {"m": (COUNT_SKETCH, 0.0)} if self.momentum > 0 else {}

    def _fused_unsupported(self):
        return None if self.momentum > 0 else "plain SGD, momentum=0"

    def _step(self, g, state, lr, t):
        if not state.has("m"):
            return lr * g
        m = state.accumulate("m", g, decay=self.momentum)
        return lr * (g + self.momentum * m if self.nesterov else m)

    _fused_kind = "momentum"

    def _fused_coefficients(self, lr, t):
        return [lr, self.momentum], {"m": (self.momentum, 1.0)}, self.nesterov

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config
