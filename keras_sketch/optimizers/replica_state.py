"""Per-replica optimizer state, saved replica by replica.

SketchedSGD's ``two_round`` and ``local_topk`` modes keep a full-size
momentum ``u`` and error ``e`` on every replica: ``ON_READ`` variables under
``tf.distribute``, whose replicas hold different values.  TensorFlow saves an
``ON_READ`` variable as its cross-replica reduction (here the mean) and
restores that one value into every replica, so a resumed multi-replica run
would round differently from an uninterrupted one.  ``ReplicaVariable``
saves every replica's own value instead:

* one replica (no strategy, or a strategy with one replica): the value, with
  the variable's shape, exactly as for any variable (files are unchanged);
* ``n > 1`` replicas: one array of shape ``[n, *shape]`` whose row ``r`` is
  the value of replica ``r`` (``replica_id_in_sync_group``); with replicas
  on several workers (MultiWorkerMirroredStrategy) it is gathered from every
  worker with ``strategy.gather``, so every worker must save, as TensorFlow
  already requires for any ``ON_READ`` variable (reading one is a collective).

The same array is a ``tf.train.Checkpoint``'s value of the variable (its
usual ``VARIABLE_VALUE`` key, through the ``Trackable`` serialization hooks
``_serialize_to_tensors`` / ``_restore_from_tensors`` that ``keras.Variable``
itself implements) and the variable's entry in ``.keras`` / ``.weights.h5``
files (``saved_value``, and ``replica_values`` then ``assign_replicas``,
called by ``SketchedSGD.save_own_variables`` / ``load_own_variables``, which
check every entry before assigning any).  What a restore
does with a saved array, including a replica count other than the current
one, is ``state_spec.replica_values``.
"""

import keras
import tensorflow as tf

from keras_sketch.optimizers import state_spec
from keras_sketch.tf_internals import variable_path


class ReplicaVariable(keras.Variable):
    """A ``keras.Variable`` with one value per replica (``ON_READ``), saved
    and restored per replica (see the module docstring)."""

    def _replicas(self):
        """``(strategy, local components, their global replica ids)``."""
        value = self.value
        strategy = value.distribute_strategy if isinstance(value, tf.distribute.DistributedValues) else None
        if strategy is None:
            return None, [value], [0]
        ids = strategy.experimental_distribute_values_from_function(lambda ctx: ctx.replica_id_in_sync_group)
        local_ids = [int(i) for i in strategy.experimental_local_results(ids)]
        return strategy, list(strategy.experimental_local_results(value)), local_ids

    def _saved_tensor(self):
        """The value to save: ``shape`` for one replica, else ``[n, *shape]``."""
        strategy, components, local_ids = self._replicas()
        n = 1 if strategy is None else strategy.num_replicas_in_sync
        if n == 1:
            return tf.convert_to_tensor(components[0])
        if len(components) == n:  # every replica is local (MirroredStrategy): no collective
            by_id = dict(zip(local_ids, components))
            return tf.stack([tf.convert_to_tensor(by_id[r]) for r in range(n)])
        # Replicas on several workers: every worker calls this (a checkpoint is
        # written by all workers), and the collective gathers in replica order.
        gathered = strategy.gather(self.value, axis=0)
        return tf.reshape(gathered, [n] + [int(s) for s in self.shape])

    def saved_value(self):
        """The NumPy array written to ``.keras`` / ``.weights.h5`` files."""
        return self._saved_tensor().numpy()

    def replica_values(self, saved):
        """Checks ``saved`` and returns the values of the local replicas
        (``state_spec.replica_values``); assigns nothing."""
        strategy, _, local_ids = self._replicas()
        n = 1 if strategy is None else strategy.num_replicas_in_sync
        return state_spec.replica_values(variable_path(self), saved, [int(s) for s in self.shape], n, local_ids)

    def assign_replicas(self, values):
        """Assigns ``values`` (from ``replica_values``) to the local replicas."""
        _, components, _ = self._replicas()
        ops = []
        for component, value in zip(components, values):
            with tf.device(component.device):
                ops.append(component.assign(tf.cast(value, component.dtype)))
        return tf.group(ops)

    def restore(self, saved):
        """Restores a saved array (checked first: an error assigns nothing)."""
        return self.assign_replicas(self.replica_values(saved))

    # -- tf.train.Checkpoint -------------------------------------------------
    def _serialize_to_tensors(self):
        strategy, _, _ = self._replicas()
        if strategy is None or strategy.num_replicas_in_sync == 1:
            return super()._serialize_to_tensors()  # one replica: as any variable
        return {"VARIABLE_VALUE": self._saved_tensor()}

    def _restore_from_tensors(self, restored_tensors):
        return self.restore(restored_tensors["VARIABLE_VALUE"])
