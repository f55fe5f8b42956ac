"""Every use of TensorFlow internals in keras_sketch, in one bottom module.

Nothing else in the package imports private TensorFlow modules or reads
private attributes of TensorFlow objects; if a TensorFlow upgrade moves one of
these, this is the file to change (TensorFlow is pinned to 2.21.0).
"""

import keras
import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util


def in_xla_context():
    """Whether the op being traced will be compiled by XLA (``jit_compile``)."""
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def tf_variable(variable):
    """The ``tf.Variable`` behind a ``keras.Variable`` (or the variable itself).

    Under ``tf.distribute`` (Mirrored, MultiWorkerMirrored) the optimizer's
    state variables are distributed variables, which lack ``scatter_nd_*``;
    inside ``strategy.extended.update`` (where Keras runs ``update_step`` once
    per device) this returns the current device's component, which the
    same update keeps in sync with the others.
    """
    variable = variable.value if isinstance(variable, keras.Variable) else variable
    if hasattr(variable, "_get_on_device_or_primary"):
        variable = variable._get_on_device_or_primary()
    return variable


def device_type(variable):
    """``"CPU"``, ``"GPU"``, ... of the device a variable lives on (``"CPU"``
    when it has no device string, as in eager CPU-only runs)."""
    device = getattr(tf_variable(variable), "device", "") or ""
    return (tf.DeviceSpec.from_string(device).device_type or "CPU").upper()


def variable_path(variable):
    """A readable name of any variable: Keras's ``path``, or a plain
    ``tf.Variable``'s name without its ``:0`` suffix."""
    path = getattr(variable, "path", None)
    if path:
        return path
    return variable.name.split(":")[0]
