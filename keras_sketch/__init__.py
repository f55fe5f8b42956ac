"""keras_sketch: memory-efficient Keras optimizers with count-sketch state.

Implements "Compressing Gradient Optimizers via Count-Sketches" (Spring,
Kyrillidis, Mohan, Shrivastava, ICML 2019) for Keras 3 on TensorFlow.
"""

from keras_sketch import layers
from keras_sketch.layers import Embedding
from keras_sketch.memory import MemoryReport
from keras_sketch.optimizers import (
    SM3,
    CSAdagrad,
    CSAdam,
    CSLion,
    CSMomentum,
    CSRMSprop,
    SketchedSGD,
    SketchOptimizer,
)

__version__ = "0.1.0"
__all__ = [
    "CSAdagrad", "CSAdam", "CSLion", "CSMomentum", "CSRMSprop", "Embedding", "MemoryReport", "SM3",
    "SketchedSGD", "SketchOptimizer", "layers",
]
