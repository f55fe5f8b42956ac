"""A custom training loop for ``tf.distribute`` strategies, MultiWorker included.

Keras 3's ``model.fit`` works under ``tf.distribute.MirroredStrategy`` (with
keras_sketch optimizers too) but fails under
``tf.distribute.MultiWorkerMirroredStrategy`` with *any* optimizer ("Attempt to
convert a value (PerReplica...)", keras-team/keras#20585).  ``Trainer`` is the
loop that works under both: ``strategy.run`` of a replica step that computes
the loss, its gradients and calls ``optimizer.apply``.  Keras's TensorFlow
optimizer then all-reduces (sums) the gradients over replicas (sparse
``tf.IndexedSlices`` are gathered: rows touched by several replicas arrive as
repeated indices, which keras_sketch merges before the sketch update) and
runs ``update_step`` once per device in ``strategy.extended.update``.

Example (run the same script on every worker, with its ``TF_CONFIG``)::

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = make_model()
        optimizer = keras_sketch.CSAdam(learning_rate=1e-3)
    trainer = keras_sketch.distributed.Trainer(
        model, optimizer, keras.losses.sparse_categorical_crossentropy, strategy
    )
    for x, y in global_batches:          # every worker passes the same global batch
        loss = trainer.train_step(x, y)  # replica r trains on rows r::num_replicas

``train_step`` takes the *global* batch on every worker and gives replica
``r`` the rows ``r::num_replicas_in_sync``; to feed a ``tf.data`` pipeline
instead use ``train_distributed_step`` with values from
``strategy.experimental_distribute_dataset``.
"""

import tensorflow as tf


class Trainer:
    """One distributed training step: ``strategy.run`` + ``optimizer.apply``.

    Args:
        model: a Keras model built under ``strategy.scope()``.
        optimizer: any Keras optimizer (created under ``strategy.scope()``).
            It is built on ``model.trainable_variables`` here, in the scope.
        loss_fn: ``loss_fn(y_true, y_pred)`` returning *per-example* losses
            (e.g. ``keras.losses.sparse_categorical_crossentropy``).  The
            replica loss is ``sum(per_example) / global_batch_size`` (plus the
            model's regularization losses divided by the number of replicas),
            so the all-reduced gradient is the gradient of the global mean.
        strategy: a ``tf.distribute.Strategy``; default: the current one.
    """

    def __init__(self, model, optimizer, loss_fn, strategy=None):
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
        self._step = tf.function(self._distributed_fn)

    @property
    def num_replicas(self):
        return self.strategy.num_replicas_in_sync

    def _replica_fn(self, x, y, global_batch_size):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            prediction = self.model(x, training=True)
            per_example = tf.cast(self.loss_fn(y, prediction), tf.float32)
            loss = tf.reduce_sum(per_example) / tf.cast(global_batch_size, tf.float32)
            if self.model.losses:
                loss += tf.add_n([tf.cast(term, tf.float32) for term in self.model.losses]) / self.num_replicas
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        return loss

    def _distributed_fn(self, x, y, global_batch_size):
        per_replica = self.strategy.run(self._replica_fn, args=(x, y, global_batch_size))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def shard(self, x, y):
        """Distributed values: replica ``r`` gets rows ``r::num_replicas`` of
        the global batch ``(x, y)`` (the same arrays on every worker)."""
        n = self.num_replicas

        def value_fn(ctx):
            r = ctx.replica_id_in_sync_group
            return tf.constant(x[r::n]), tf.constant(y[r::n])

        return self.strategy.experimental_distribute_values_from_function(value_fn)

    def train_step(self, x, y):
        """Trains one step on the global batch ``(x, y)``; returns the mean loss."""
        dist_x, dist_y = self.shard(x, y)
        return float(self.train_distributed_step(dist_x, dist_y, len(x)))

    def train_distributed_step(self, dist_x, dist_y, global_batch_size):
        """One step on already distributed inputs (e.g. from
        ``strategy.experimental_distribute_dataset``); returns the mean loss."""
        return self._step(dist_x, dist_y, tf.constant(global_batch_size, tf.int64))


def free_port():
    """A free TCP port on 127.0.0.1 (for ``TF_CONFIG`` on one machine)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_tf_config(ports, index):
    """``TF_CONFIG`` JSON for worker ``index`` of a cluster on 127.0.0.1."""
    import json

    workers = [f"127.0.0.1:{p}" for p in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


__all__ = ["Trainer", "free_port", "local_tf_config"]
