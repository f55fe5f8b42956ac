"""What the saved state of a keras_sketch optimizer looks like, and the checks
that refuse to load state saved with other settings.

Sketch state is only meaningful with the sketch settings it was built with:
the bucket a row lands in depends on the width, the depth and the hash
parameters, and which variables are sketched depends on ``min_rows``,
``hash_axis`` and ``compression``.  Keras's own optimizers warn and skip the
whole optimizer state when the number of variables differs (``.keras``), and
TensorFlow checkpoints restore by list position, so a different layout gives
either an obscure dtype/shape error or, worse, a partial restore.  Every
keras_sketch optimizer therefore saves a *state spec* (its layout-relevant
settings and the shape of every state variable) next to its variables:

* in ``.keras`` / ``.weights.h5`` files as one extra entry of the optimizer's
  store (``SPEC_KEY``), checked by ``CompressedStateMixin.load_own_variables``;
* in ``tf.train.Checkpoint`` files (and the variables of a SavedModel) as a
  ``PythonState`` dependency of the optimizer, which TensorFlow restores before
  any variable, so the check runs first.

Loading succeeds whenever the state was saved by the same keras_sketch
optimizer (its ``kind``: the nearest keras_sketch class, so a user's subclass
of ``CSAdam`` loads ``CSAdam`` state) and every state variable has the saved
shape and dtype (settings that change nothing, e.g. the seed, whose hash
parameters are part of the restored state, are allowed to differ); otherwise
a ``ValueError`` names what differs.  The kind matters even when the shapes
agree: CSLion's ``m`` and CSMomentum's ``momentum`` have one shape and
different meanings.

Per-replica state (SketchedSGD's ``two_round``/``local_topk`` ``u`` and
``e``, ``ON_READ`` variables under ``tf.distribute``) is saved as every
replica's own value: the variable's shape with one replica, ``[n, *shape]``
with ``n`` (``replica_state.ReplicaVariable``).  ``replica_values`` checks a
saved value against the variable and gives every replica its own row; state
saved by another number of replicas loads with a warning, every replica
getting the saved sum divided by the replica count (the sum is kept).
"""

import json
import warnings

import numpy as np
import tensorflow as tf

from keras_sketch.tf_internals import variable_path

SPEC_KEY = "keras_sketch_state_spec"

# Settings that never change the layout of the state.
_LAYOUT_FREE = {
    "name",
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
}


def kind(optimizer):
    """The nearest keras_sketch class of ``optimizer`` (its own class unless it
    is a user's subclass): the maths its state belongs to."""
    for cls in type(optimizer).__mro__:
        if cls.__module__.split(".")[0] == "keras_sketch":
            return cls.__name__
    return type(optimizer).__name__


def state_spec(optimizer):
    """JSON-able description of ``optimizer``'s state layout."""
    settings = {}
    with tf.init_scope():  # get_config reads variables; SavedModel saves in a graph
        config = optimizer.get_config()
    for key, value in config.items():
        if key in _LAYOUT_FREE:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        settings[key] = value
    # A float learning rate is a state variable, a schedule or callable is not.
    settings["learning_rate is a variable"] = any(
        v is getattr(optimizer, "_learning_rate", None) for v in optimizer.variables
    )
    return {
        "class": type(optimizer).__name__,
        "kind": kind(optimizer),
        "settings": settings,
        "model_variables": [
            [variable_path(v), [int(s) for s in v.shape]] for v in getattr(optimizer, "_trainable_variables", [])
        ],
        "state": [[variable_path(v), [int(s) for s in v.shape], str(v.dtype)] for v in optimizer.variables],
    }


def mismatch(name, saved, ours):
    """``None`` if state ``saved`` loads into ``ours``, else the error text."""
    layout = lambda spec: [(tuple(s[1]), s[2]) for s in spec["state"]]  # noqa: E731
    # Files saved before the kind was recorded are checked by layout alone.
    same_kind = saved.get("kind", ours["kind"]) == ours["kind"]
    if same_kind and layout(saved) == layout(ours):
        return None
    reasons = []
    if not same_kind:
        reasons.append(f"optimizer: saved the state of {saved['kind']}, this optimizer is {ours['kind']}")
    elif saved.get("class") != ours["class"]:
        reasons.append(f"class: saved {saved.get('class')}, this optimizer {ours['class']}")
    s_set, o_set = saved.get("settings", {}), ours["settings"]
    for key in sorted(set(s_set) | set(o_set)):
        if s_set.get(key, "<absent>") != o_set.get(key, "<absent>"):
            reasons.append(f"{key}: saved {s_set.get(key, '<absent>')!r}, this optimizer {o_set.get(key, '<absent>')!r}")
    s_model = [tuple(v[1]) for v in saved.get("model_variables", [])]
    o_model = [tuple(v[1]) for v in ours["model_variables"]]
    if s_model != o_model:
        reasons.append(
            f"model variables: saved {len(s_model)} with shapes {s_model}, this optimizer "
            f"{len(o_model)} with shapes {o_model}"
        )
    detail = _first_difference(saved["state"], ours["state"]) if layout(saved) != layout(ours) else ""
    if not reasons:
        reasons.append("the sketched variables or their sketch shapes")
    return (
        f"Cannot load the state of optimizer {name!r}: it was saved with other settings "
        f"({'; '.join(reasons)}). {detail + ' ' if detail else ''}Sketch state cannot be resized or re-hashed: "
        "build the optimizer with the saved settings, or start its state afresh."
    )


def _first_difference(saved, ours):
    for i, (s, o) in enumerate(zip(saved, ours)):
        if (tuple(s[1]), s[2]) != (tuple(o[1]), o[2]):
            return (
                f"First differing state variable #{i}: saved {s[0]!r} {tuple(s[1])} {s[2]}, "
                f"this optimizer {o[0]!r} {tuple(o[1])} {o[2]}."
            )
    return f"The saved state has {len(saved)} variables, this optimizer {len(ours)}."


def encode(spec):
    return np.frombuffer(json.dumps(spec).encode("utf-8"), np.uint8)


def decode(array):
    return json.loads(np.asarray(array).astype(np.uint8).tobytes().decode("utf-8"))


class StateSpecCheck(tf.train.experimental.PythonState):
    """Checkpoint dependency that saves the spec and checks it on restore.

    TensorFlow restores ``PythonState`` objects eagerly, before the variables
    of the same restore, so a mismatch raises this clear error instead of a
    dtype/shape error of some ``_variables/N`` (or a silent partial restore).
    """

    def __init__(self, optimizer):
        # Computed once, after ``build()``: the layout is fixed from then on,
        # and a SavedModel serializes in a graph where variables cannot be read.
        self._name = optimizer.name
        self._spec = state_spec(optimizer)

    def serialize(self):
        return json.dumps(self._spec)

    def deserialize(self, string_value):
        if isinstance(string_value, bytes):
            string_value = string_value.decode("utf-8")
        error = mismatch(self._name, json.loads(string_value), self._spec)
        if error:
            raise ValueError(error)


def replica_values(name, saved, shape, replicas, local_ids):
    """The values the local replicas of per-replica state ``name`` restore
    from ``saved`` (``keras_sketch.optimizers.replica_state``).

    ``saved`` has the variable's ``shape`` (saved by one replica) or
    ``[n, *shape]`` (saved by ``n`` replicas, row ``r`` replica ``r``); any
    other shape raises a ``ValueError`` naming the variable.  The state is
    now held by ``replicas`` replicas, of which this process holds
    ``local_ids``:

    * ``n == replicas``: replica ``r`` gets row ``r``, bit for bit;
    * otherwise every replica gets the saved replicas' sum divided by
      ``replicas``, with a warning naming both counts.  The sum over replicas
      is kept: it is what a step of SketchedSGD's two_round mode depends on
      (its update is linear in the replicas' sum of ``u`` and ``e``, and a
      single device's ``u``/``e`` is that sum), so the resumed run continues
      the same mathematics, not bit for bit; local_topk picks a top-k per
      replica, so its per-replica split is not recovered (the total is).
    """
    saved = tf.convert_to_tensor(saved)
    shape = [int(s) for s in shape]
    if saved.shape.rank is None:  # restored inside a tf.function: the shape is known when it runs
        rows = tf.reshape(saved, [-1] + shape)
        even = tf.reduce_sum(rows, 0) / replicas
        same = tf.shape(rows)[0] == replicas
        return [tf.cond(same, lambda i=i: rows[i], lambda: even) for i in local_ids]
    saved_shape = [int(s) for s in saved.shape]
    if saved_shape == shape:
        rows, n = saved[None], 1
    elif saved_shape[1:] == shape and saved_shape[0] >= 1:
        rows, n = saved, saved_shape[0]
    else:
        raise ValueError(
            f"Cannot load the per-replica state {name!r}: the saved value has shape {tuple(saved_shape)}, "
            f"which is neither the variable's shape {tuple(shape)} (saved by one replica) nor "
            f"(replicas, {', '.join(map(str, shape))}). It was saved for other model variables or settings."
        )
    if n == replicas:
        return [rows[i] for i in local_ids]
    warnings.warn(
        f"Per-replica state {name!r} was saved by {n} replica(s) and is loaded into {replicas}: every "
        f"replica gets the sum of the {n} saved values divided by {replicas}. The sum over replicas is kept, but "
        "the per-replica values are not, so the resumed run is not bit-identical to an uninterrupted one.",
        stacklevel=2,
    )
    even = tf.reduce_sum(rows, 0) / replicas
    return [even for _ in local_ids]
