"""What a gradient must be before it may touch shared state.

A sketch bucket is shared by many rows, so one bad value would spread to
rows an exact optimizer keeps apart.  Two rules, applied by every keras_sketch
optimizer before any variable is written:

* **Validate before writing** (``check_gradients``, called once per
  ``apply`` for all variables): a gradient's dtype, its shape and, for
  ``tf.IndexedSlices``, every id must fit its variable.  A violation raises
  ``tf.errors.InvalidArgumentError`` (or ``ValueError``/``TypeError`` when
  it is known while tracing) before the first variable of the step changes,
  so an error leaves weights and state exactly as they were.  Under XLA
  (``jit_compile=True``) run-time assertions do not exist: there
  out-of-range ids are dropped from the step instead (XLA's own gather and
  scatter clamp or drop them too).
* **Containment** (``finite_rows``): a gradient row (one row of the
  variable's 2-D view: one embedding row, one input row of a kernel) that
  holds a NaN or an infinity is left out of the step.  On a sparse step the
  row is treated as absent: its weights and its state do not change.  On a
  dense step its gradient is taken as zero: its weights move as Keras's
  optimizer moves a row whose gradient is zero (momentum only), and its
  state decays.  Either way no NaN or Inf reaches a shared bucket, so no
  other row's weights or estimates become non-finite.  Keras's optimizers
  instead write NaN into that row's weights and state; here the row keeps
  its last finite values.  Each step that drops rows prints one line to
  stderr (outside XLA) naming the variable and the number of rows.
"""

import sys

import tensorflow as tf

from keras_sketch.tf_internals import in_xla_context, variable_path


def check_gradients(grads, variables):
    """Static and run-time checks of every gradient against its variable.

    Returns the assertion ops (empty in eager mode, where they already ran);
    the caller makes every write depend on them.
    """
    checks = []
    for grad, var in zip(grads, variables):
        if grad is None:
            continue
        name = variable_path(var)
        values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
        dtype = tf.as_dtype(values.dtype)  # also a NumPy array's dtype
        if not (dtype.is_floating or dtype.is_complex):
            raise TypeError(f"The gradient of {name!r} has dtype {dtype.name}; a floating dtype is required.")
        var_shape = tuple(var.shape)
        if isinstance(grad, tf.IndexedSlices):
            expected = var_shape[1:]
            got = tuple(values.shape[1:])
            if len(got) != len(expected) or any(
                g is not None and g != e for g, e in zip(got, expected)
            ):
                raise ValueError(
                    f"The sparse gradient of {name!r} has rows of shape {got}; the variable "
                    f"{var_shape} needs rows of shape {expected}."
                )
            if not in_xla_context():
                ids = tf.cast(grad.indices, tf.int64)
                rows = tf.constant(var_shape[0], tf.int64)
                checks.append(
                    tf.debugging.Assert(
                        tf.reduce_all((ids >= 0) & (ids < rows)),
                        [f"keras_sketch: a sparse gradient id of {name!r} is outside [0, {var_shape[0]}):",
                         tf.boolean_mask(ids, (ids < 0) | (ids >= rows))[:10]],
                        name="ids_in_range",
                    )
                )
        else:
            got = tuple(values.shape)
            if values.shape.rank is not None and (
                len(got) != len(var_shape) or any(g is not None and g != e for g, e in zip(got, var_shape))
            ):
                raise ValueError(f"The gradient of {name!r} has shape {got}; the variable has shape {var_shape}.")
    return checks


def in_range(ids, rows):
    """Under XLA: a mask of the ids that fit (the others are dropped)."""
    return (ids >= 0) & (ids < rows)


def finite_rows(values):
    """``(values with non-finite rows zeroed, row_is_finite [k])`` of a
    ``[k, dim]`` gradient view."""
    finite = tf.reduce_all(tf.math.is_finite(values), axis=1)
    return tf.where(finite[:, None], values, tf.zeros_like(values)), finite


def report_dropped(variable, finite):
    """One stderr line for a step that dropped non-finite rows of ``variable``."""
    if in_xla_context():
        return
    dropped = tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.int32))
    name = variable_path(variable)

    def say():
        tf.print("keras_sketch: left", dropped, f"gradient row(s) of {name} with NaN/Inf out of this step",
                 output_stream=sys.stderr)
        return tf.constant(True)

    tf.cond(dropped > 0, say, lambda: tf.constant(False))
