"""keras_sketch optimizers."""

from keras_sketch.optimizers.adagrad import CSAdagrad
from keras_sketch.optimizers.adam import CSAdam
from keras_sketch.optimizers.base import SketchOptimizer
from keras_sketch.optimizers.lion import CSLion
from keras_sketch.optimizers.momentum import CSMomentum
from keras_sketch.optimizers.rmsprop import CSRMSprop
from keras_sketch.optimizers.sketched_sgd import SketchedSGD
from keras_sketch.optimizers.sm3 import SM3

__all__ = ["CSAdagrad", "CSAdam", "CSLion", "CSMomentum", "CSRMSprop", "SM3", "SketchedSGD", "SketchOptimizer"]
