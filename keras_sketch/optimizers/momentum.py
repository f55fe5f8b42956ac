"""CSMomentum: SGD with count-sketch momentum (Algorithm 2)."""

import keras
import tensorflow as tf

from keras_sketch.optimizers.base import COUNT_SKETCH, SketchOptimizer, check_bool, check_number
from keras_sketch.state import decay_rows, geometric_cap, missed_sum


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
        if self.catch_up:
            if self.momentum >= 1.0:
                raise ValueError("`catch_up=True` needs momentum < 1: with momentum=1 a row's missed moves "
                                 "never shrink and cannot be summed in bounded work.")
            # The j-th missed move is momentum^(j-1) times the first (constant or decaying lr).
            self._catch_up_cap = geometric_cap(self.momentum)

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

    def _catch_up(self, state, last, skipped, lr_at):
        """A missed step has a zero gradient: ``m`` decays by ``momentum^s``
        and the weight moves by ``sum_j lr(last + j) * momentum^j m``
        (Nesterov: ``momentum^(j+1) m``), over at most ``_catch_up_cap``
        steps (the rest sum to under 2^-24 of the move for a non-increasing
        learning rate)."""
        if not state.has("m"):
            return 0.0
        m = state.read("m")
        mu = tf.cast(self.momentum, m.dtype)
        extra = mu if self.nesterov else 1.0

        def term(j):
            return lr_at(last + j) * extra * tf.pow(mu, j) * m

        move = missed_sum(term, skipped, self._catch_up_cap, m)
        decay_rows(state, "m", tf.pow(mu, tf.cast(skipped, m.dtype)))
        return move

    _fused_kind = "momentum"

    def _fused_coefficients(self, lr, t):
        return [lr, self.momentum], {"m": (self.momentum, 1.0)}, self.nesterov

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config
