"""CSLion: Lion with count-sketch momentum.

Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023)
keeps one momentum per parameter and steps by the sign of an interpolation
of the momentum and the gradient.  It is the worked example of
docs/extending.md: one slot, and update math that reads the slot before
updating it.
"""

import keras
import tensorflow as tf

from keras_sketch.optimizers.base import COUNT_SKETCH, SketchOptimizer, check_beta, check_number


@keras.saving.register_keras_serializable(package="keras_sketch")
class CSLion(SketchOptimizer):
    """Lion whose momentum is a count-sketch (median query).

    The update is ``keras.optimizers.Lion``'s::

        x <- x - lr * sign(beta_1 * m + (1 - beta_1) * g)
        m <- beta_2 * m + (1 - beta_2) * g

    where the direction uses the momentum *before* this step's update.  The
    lossless configuration (``depth=1, compression=1.0, min_rows=1``) equals
    Keras's Lion.  Sparse gradients update only their rows (lazy, like the
    other keras_sketch optimizers): untouched rows neither move nor decay.
    A sketched momentum is a noisy estimate; Lion uses only its sign.

    Args:
        learning_rate, beta_1, beta_2: as ``keras.optimizers.Lion``
            (``beta_1`` in (0, 1], ``beta_2`` in [0, 1)).  Lion's steps have
            norm ``lr`` per entry, so its learning rate is usually 3-10x
            smaller than Adam's (Keras's documentation).
        Sketch and Keras base arguments: see ``SketchOptimizer``
        (``state_budget`` included: the exact optimizer keeps one slot).
    """

    _exact_slot_count = 1  # keras.optimizers.Lion keeps one momentum

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.99, name="cslion", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = float(check_number("beta_1", beta_1, 0.0, 1.0, low_open=True))
        self.beta_2 = check_beta("beta_2", beta_2)

    _no_catch_up = "not implemented (a missed Lion step would move the row by lr * sign(m), every step)"

    def _slot_kinds(self):
        return {"m": (COUNT_SKETCH, 0.0)}

    def _step(self, g, state, lr, t):
        m = state.read("m")  # before this step's update
        direction = tf.sign(self.beta_1 * m + (1.0 - self.beta_1) * g)
        state.ema("m", g, self.beta_2)
        return lr * direction

    def get_config(self):
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2})
        return config
