"""``keras_sketch.layers.Embedding``: an Embedding whose steps stay sparse.

``keras.layers.Embedding`` looks rows up with ``ops.take(self.embeddings,
ids)``, which first converts the whole variable to a tensor (one
``ReadVariableOp`` of the table) and then gathers from that tensor.  Once a
TensorFlow resource variable has received a sparse (scatter) update -- which
every keras_sketch optimizer applies to ``tf.IndexedSlices`` gradients -- it
is in copy-on-read mode: every dense read copies the entire buffer.  A model
with a large table then pays a full-table copy per step (one extra table of
resident memory and its size in memory traffic), and the sparse optimizer
step's gain is lost.

This layer is ``keras.layers.Embedding`` (same arguments, weights, config,
saving, masking, LoRA and quantization) except that the float forward pass
gathers the rows from the variable itself (``ResourceGather``, via
``tf.gather`` on the resource variable), so it never reads the table whole.
The gradient is the same ``tf.IndexedSlices`` Keras's layer produces.

With an optimizer built with ``catch_up=True`` a training forward pass reads
each row caught up (minus the moves it still owes for the steps it missed,
``SketchOptimizer.pending_move``), so the model trains as with the dense
optimizer; inference reads the table as it is.
"""

import logging
import weakref

import keras
import tensorflow as tf

# The one Keras internal used here: with a mixed-precision policy, Keras
# variables read inside a layer's call are cast to the compute dtype whole
# (``keras.Variable.value`` under an autocast scope); clearing the scope for
# the lookup gives the variable itself, and the gathered rows are cast.
from keras.src.backend.common.variables import AutocastScope

from keras_sketch.tf_internals import tf_variable


def _table(variable):
    """What to gather from: the ``tf.Variable`` behind a Keras variable (a
    gather on it is a ``ResourceGather`` of the rows only; under
    ``tf.distribute``, the current replica's component, since a gather on
    the distributed variable itself reads it whole), or the tensor a
    stateless scope or a symbolic trace substitutes for it.  Never the
    autocast (whole-table) copy of a mixed-precision policy."""
    with AutocastScope(None):
        return tf_variable(variable)


def _gather(variable, ids):
    """``variable[ids]`` along axis 0 without reading the variable whole."""
    return tf.gather(_table(variable), ids)


@keras.saving.register_keras_serializable(package="keras_sketch")
class Embedding(keras.layers.Embedding):
    """``keras.layers.Embedding`` whose lookups gather rows from the variable.

    A drop-in replacement: every argument, weight, ``get_config`` entry and
    saving format of ``keras.layers.Embedding`` is unchanged (see its
    documentation), and outputs, masks and gradients are equal.  Only the
    forward pass differs: rows are read with a gather on the resource
    variable instead of a gather on a dense read of the whole table, so a
    training step with a sparse optimizer costs what the touched rows cost
    (``tf.IndexedSlices`` gradients are scatter-added into the table; after
    that TensorFlow copies the entire table on every dense read).

    With LoRA enabled the rows are ``E[ids] + (alpha / rank) *
    (A[ids] @ B)``, which equals Keras's ``(E + alpha / rank * A @ B)[ids]``
    without forming the full-size product.  Quantized layers (``int8``,
    ``int4``) run Keras's quantized forward pass unchanged (their table is
    not trained).  ``quantize`` is allowed on this subclass (Keras refuses
    subclasses by default) because the quantized layer is Keras's.

    Example::

        from keras_sketch.layers import Embedding
        x = Embedding(4_000_000, 64)(ids)   # instead of keras.layers.Embedding
    """

    def call(self, inputs, training=None):
        if inputs.dtype != "int32" and inputs.dtype != "int64":
            inputs = keras.ops.cast(inputs, "int32")
        outputs = self._lookup(inputs, bool(training) and not self.lora_enabled)
        return keras.ops.cast(outputs, dtype=self.compute_dtype)

    def _lookup(self, inputs, training=False):
        rows = self.input_dim
        fix = lambda i: tf.where(i < 0, i + tf.cast(rows, i.dtype), i)  # noqa: E731 - as ops.take
        if isinstance(inputs, tf.SparseTensor):
            if self.lora_enabled:  # no sparse-id LoRA path: Keras's (dense) lookup
                return super().call(inputs)
            ids = tf.SparseTensor(inputs.indices, fix(inputs.values), inputs.dense_shape)
            # As Keras: each entry is its own id (expand_dims), absent entries read row 0.
            outputs = tf.nn.safe_embedding_lookup_sparse(
                embedding_weights=[_table(self._embeddings)],
                sparse_ids=tf.sparse.expand_dims(ids, axis=-1),
                default_id=0,
            )
            outputs.set_shape(ids.shape + outputs.shape[len(ids.shape):])
            if training:
                outputs = _caught_up(self._embeddings, outputs, tf.sparse.to_dense(ids))
            return outputs
        if isinstance(inputs, tf.RaggedTensor):
            return inputs.with_values(self._lookup(inputs.values, training))
        ids = fix(tf.convert_to_tensor(inputs))
        outputs = _gather(self._embeddings, ids)
        if training:
            outputs = _caught_up(self._embeddings, outputs, ids)
        if self.lora_enabled:
            delta = keras.ops.matmul(_gather(self.lora_embeddings_a, ids), self.lora_embeddings_b)
            outputs = keras.ops.cast(
                outputs + (self.lora_alpha / self.lora_rank) * delta, dtype=self.compute_dtype
            )
        return outputs

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses to quantize subclasses (they may change the math);
        # this one changes only the float path, and quantized layers run
        # Keras's own quantized forward pass.
        return super().quantize(mode, type_check=False, config=config)


def link_catch_up(variable, optimizer):
    """Called by an optimizer with ``catch_up=True`` when it builds the state
    of ``variable``: an ``Embedding`` owning that table then reads its rows
    caught up while training (``_caught_up``).  A weak reference: the
    table does not keep the optimizer alive."""
    variable._keras_sketch_catch_up = weakref.ref(optimizer)


def _caught_up(variable, rows, ids):
    """``rows`` (``variable[ids]``) minus the moves they still owe under the
    optimizer with ``catch_up=True`` that trains ``variable``: the rows the
    dense optimizer would hold (``SketchOptimizer.pending_move``).  Without
    it, the forward pass would read a row as it was when last touched, and
    its gradient would be taken at that stale value.  The optimizer must be
    built before the training step is traced (``model.fit`` builds it
    first; in a custom loop call ``optimizer.build(model.trainable_variables)``)."""
    link = getattr(variable, "_keras_sketch_catch_up", None)
    optimizer = link() if link is not None else None
    if optimizer is None:
        return rows
    with AutocastScope(None):  # the optimizer's state and rate in their own dtype
        move = optimizer.pending_move(variable, ids)
    if move is None:
        return rows
    return rows - tf.stop_gradient(tf.cast(move, rows.dtype))


def reads_whole(variable):
    """Whether the function being traced reads ``variable`` whole.

    True when the graph under construction (a ``tf.function`` trace, e.g.
    Keras's train step) holds a ``ReadVariableOp`` of the variable's
    resource handle, such as the dense read ``keras.layers.Embedding`` makes
    before gathering.  False when executing eagerly (nothing to inspect).
    Cheap: it looks at the consumers of one captured handle.
    """
    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    handle = tf_variable(variable).handle
    for outer, inner in getattr(graph, "captures", ()):
        if outer is handle:
            return any(op.type == "ReadVariableOp" for op in inner.consumers())
    return False


def warn_if_read_whole(optimizer, variable):
    """Warns once per variable when a sparse update is traced into a step
    that also reads the variable whole: TensorFlow then copies the entire
    variable on every such read (a scatter-updated resource variable is
    copied on read), which costs a full table of memory traffic per step."""
    warned = optimizer.__dict__.setdefault("_keras_sketch_warned_read_whole", set())
    name = getattr(variable, "path", None) or variable.name
    if name in warned or not reads_whole(variable):
        return
    warned.add(name)
    logging.getLogger("keras_sketch").warning(
        "keras_sketch: %s gets sparse (row) updates, but the training step also reads it whole "
        "(e.g. keras.layers.Embedding converts its table to a tensor before gathering). After a "
        "sparse update TensorFlow copies the entire variable on every whole read, each step. Use "
        "keras_sketch.layers.Embedding (a drop-in replacement), or gather with "
        "tf.gather(variable.value, ids) instead of reading the variable (README, 'Sparse training').",
        name,
    )
