"""SketchedSGD: count sketches of the gradient ride the all-reduce.

Distributed data-parallel SGD with momentum where the replicas exchange a
count sketch of their gradient (or of their error accumulator) instead of the
gradient, as in

* "Communication-efficient distributed SGD with Sketching" (Ivkin, Rothchild,
  Ullah, Braverman, Stoica, Arora; NeurIPS 2019), mode ``"two_round"``, and
* FetchSGD (Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez,
  Arora; ICML 2020), mode ``"fetchsgd"``.

The whole set of trainable variables is one flattened parameter vector of
``d`` coordinates (variables in the optimizer's build order, each in row-major
order), as in the papers, which sketch the whole gradient vector.  Coordinate
``i`` hashes to bucket ``h_j(i)`` with sign ``s_j(i)`` in row ``j`` of a
``rows x columns`` count sketch, with keras_sketch's Carter-Wegman hashes
(``keras_sketch.sketch``: the gradient is the ``[d, 1]`` matrix whose rows are
hashed; the hash coefficients are an int64 optimizer variable, saved with the
state).  A count sketch is linear, so the SUM all-reduce of the replicas'
sketches is the sketch of the summed gradient.

``mode="fetchsgd"`` (one all-reduce of ``rows*columns`` floats)::

    S = all_reduce_sum(sketch(g_replica))
    U <- rho U + S                    (momentum, in sketch space)
    E <- E + lr U                     (error feedback, in sketch space;
                                       nesterov: E <- E + lr (S + rho U))
    est = unsketch(E)                 (median over rows of s_j(i) E[j, h_j(i)])
    Delta = top-k of est by magnitude
    U[j, h_j(i)] = E[j, h_j(i)] = 0   for every chosen i and row j
    w <- w - Delta

``mode="two_round"`` (Sketched SGD; all-reduces of ``rows*columns`` and then
``P*k`` floats), with per-replica full-size ``u``, ``e``::

    u <- rho u + g_replica ;  e <- e + lr u   (nesterov: e + lr (g + rho u))
    S = all_reduce_sum(sketch(e))
    candidates = the P*k coordinates of largest |unsketch(S)|
    exact = all_reduce_sum(e[candidates])     (second round)
    Delta = top-k of exact by magnitude (on the candidates)
    u[i] = e[i] = 0 for every chosen i (momentum-factor masking), w <- w - Delta

``P = 2`` here (the authors' response uses P = 8 for CIFAR-10; at equal
bytes P = 2 did better in this project's benchmark, see the sizing rule);
``P*k`` is capped at ``d``.

``mode="local_topk"`` is the baseline the papers beat (local top-k with error
feedback, like deep gradient compression without clipping): per-replica
``u``, ``e`` as in two_round; each replica sends the ``k`` largest ``|e|``
(float32 values and int32 indices) through an **all-gather** (top-k sets do not
add up in a SUM all-reduce), zeroes what it sent, and every replica applies the
sum of the gathered sparse vectors.

Every replica computes the same top-k from the same all-reduced values, so
the replicas' weights stay bit-identical with no parameter server.  Without a
``tf.distribute`` strategy the same algorithm runs on one replica.

Sizes (``compression=r``; explicit ``rows``/``columns``/``k`` override): the
dense all-reduce hands ``4*d`` bytes per replica to the collective; the rule
aims at ``4*d/r``:

* ``rows = 1`` unless given, at most ``d // r`` so ``columns >= 1``;
* fetchsgd: ``columns = floor(d / (r * rows))``;
* two_round: the ``P*k`` second-round floats are in the budget:
  ``columns = floor(d / (r * (rows + P/2)))`` (with the defaults, half the
  budget is the sketch and half the ``P*k = columns`` candidates);
* local_topk: ``k`` (values + int32 indices, 8 bytes each) ``= floor(d / (2 r))``;
* ``k = max(1, columns // 2)`` unless given (a count sketch of ``c`` columns
  recovers the heaviest ``O(c)`` coordinates; the authors' response says the
  exact constants are found experimentally).

The constants (1 row, ``k = columns // 2``, ``P = 2``) replaced 5 rows,
``k = columns // 4`` and ``P = 8``, which updated too few coordinates per
step: at 40x they were 1.3x to 10x worse on both benchmark tasks
(docs/sketched_sgd.md, "Sizing rule").

Under a strategy the per-replica ``u``/``e`` of two_round and local_topk are
``ON_READ`` variables (``replica_state.ReplicaVariable``): checkpoints,
``.keras`` and ``.weights.h5`` files store every replica's own value (one
``[replicas, d]`` array; ``[d]`` with one replica, as any variable) and a
restore gives every replica its own value back, so a resumed run is
bit-identical.  State saved by another number of replicas loads with a
warning: every replica gets the saved sum divided by the replica count
(``state_spec.replica_values``).  fetchsgd's sketch state is mirrored.

The hook is the TensorFlow optimizer's ``_backend_update_step`` (a private
method of Keras 3's ``keras/src/backend/tensorflow/optimizer.py``; Keras is
pinned to 3.15.1), which in Keras sums the gradients over replicas with
``ReplicaContext.all_reduce`` and then runs ``update_step`` per device; here it
sums sketches instead and writes the identical results per device with
``strategy.extended.update``.  ``compression=None`` keeps Keras's path: it is
exactly ``keras.optimizers.SGD(momentum=...)``.
"""

import threading

import keras
import numpy as np
import tensorflow as tf

from keras_sketch.optimizers.base import check_bool, check_int, check_number
from keras_sketch.optimizers.replica_state import ReplicaVariable
from keras_sketch.sketch import COUNT_SKETCH, Sketch, hash_params

MODES = ("fetchsgd", "two_round", "local_topk")
P_CANDIDATES = 2  # two_round: candidates per update coordinate (P)
DEFAULT_ROWS = 1
K_PER_COLUMNS = 2  # k = columns // 2
BYTES_PER_FLOAT = 4
MAX_SEED = 2**32 - 1


def sketch_sizes(d, compression, mode, rows=None, columns=None, k=None):
    """``(rows, columns, k)`` for ``d`` parameters: the documented rule.

    Explicit ``rows``/``columns``/``k`` are kept; the others follow from
    ``compression`` (see the module docstring).  ``rows``/``columns`` are
    ``None`` for ``local_topk``, which has no sketch.
    """
    if mode == "local_topk":
        if k is None:
            if compression is None:
                raise ValueError("`k` or `compression` is required for mode='local_topk'.")
            k = max(1, int(d // (2 * compression)))
        return None, None, k
    if rows is None:
        rows = DEFAULT_ROWS
        if compression is not None:
            rows = max(1, min(rows, int(d // compression)))
    if columns is None:
        if compression is None:
            raise ValueError("`columns` or `compression` is required when compressing.")
        per_row = rows + (P_CANDIDATES / K_PER_COLUMNS if mode == "two_round" else 0)
        columns = max(1, int(d // (compression * per_row)))
    if columns >= d:  # no compression left: the exact (identity) map
        rows, columns = 1, d
    if k is None:
        k = max(1, columns // K_PER_COLUMNS)
    return rows, columns, k


@keras.saving.register_keras_serializable(package="keras_sketch")
class SketchedSGD(keras.optimizers.SGD):
    """SGD with momentum whose replicas all-reduce count sketches of gradients.

    Args:
        learning_rate, momentum, nesterov: as ``keras.optimizers.SGD``.
        compression: ``None`` (exactly ``keras.optimizers.SGD``, gradients
            all-reduced by Keras) or a number > 1: about that many times fewer
            bytes handed to the collective per step than the dense all-reduce.
        k: coordinates updated per step (default: the rule).
        rows, columns: the count sketch's shape (default: the rule).
        mode: ``"fetchsgd"``, ``"two_round"`` or ``"local_topk"``.
        seed: seed of the hash functions (a 32-bit non-negative integer).
        **base_kwargs: ``keras.optimizers.Optimizer`` arguments (``name``,
            ``clipnorm``, ``weight_decay``, ``loss_scale_factor``, ...).

    Giving ``rows``, ``columns`` or ``k`` without ``compression`` compresses
    with those sizes (``columns`` is then required for the sketch modes).
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.9,
        nesterov=False,
        compression=None,
        k=None,
        rows=None,
        columns=None,
        mode="fetchsgd",
        seed=0,
        name="sketched_sgd",
        **base_kwargs,
    ):
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if compression is not None:
            check_number("compression", compression, low=1, low_open=True)
        for arg, value in (("k", k), ("rows", rows), ("columns", columns)):
            if value is not None:
                check_int(arg, value, 1)
        check_int("seed", seed, 0, MAX_SEED)
        check_bool("nesterov", nesterov)
        check_number("momentum", momentum, 0, 1)
        if mode != "local_topk" and compression is None and (rows is not None or k is not None) and columns is None:
            raise ValueError("`columns` or `compression` is required when `rows` or `k` is given.")
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, name=name, **base_kwargs)
        self.compression = compression
        self.k = k
        self.rows = rows
        self.columns = columns
        self.mode = mode
        self.seed = int(seed)
        self.compressed = compression is not None or any(v is not None for v in (k, rows, columns))
        self._collective_logs = {}
        self._sketch = None
        self.sketch_rows = self.sketch_columns = self.update_k = self.param_count = None

    # -- state -------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        if not self.compressed:
            return super().build(var_list)
        # Checked before any state exists: an error leaves the optimizer unbuilt.
        for v in var_list:
            if "float" not in str(v.dtype):
                raise TypeError(f"SketchedSGD trains float variables; {v.path} is {v.dtype}.")
        sizes = [int(np.prod(v.shape)) for v in var_list]
        d = int(sum(sizes))
        if self.k is not None and self.k > d:
            raise ValueError(f"`k` must be at most the parameter count {d}, got {self.k}.")
        rows, columns, k = sketch_sizes(d, self.compression, self.mode, self.rows, self.columns, self.k)
        keras.optimizers.Optimizer.build(self, var_list)
        self.param_count = d
        self._offsets = [int(o) for o in np.cumsum([0] + sizes[:-1])]
        self._sizes = sizes
        self.sketch_rows, self.sketch_columns, self.update_k = rows, columns, min(k, d)
        self.momentums = []
        if self.mode == "fetchsgd":
            self.sketch_momentum = self.add_variable((rows, columns, 1), name="sketch_momentum")
            self.sketch_error = self.add_variable((rows, columns, 1), name="sketch_error")
        else:
            self.replica_momentum = self._replica_variable(d, "replica_momentum")
            self.replica_error = self._replica_variable(d, "replica_error")
        if rows is not None:
            # An initializer, not an assign: Keras may build the optimizer in a
            # scope that discards assignments (model.fit's symbolic build).
            values = hash_params(self.seed, 0, rows)
            self.hash_params = self.add_variable(
                (rows, 4), initializer=lambda shape, dtype=None: tf.constant(values, tf.int64), dtype="int64",
                name="sketch_hash_params",
            )
            table = self.sketch_momentum if self.mode == "fetchsgd" else _Shape((rows, columns, 1))
            self._sketch = Sketch(table, self.hash_params, d, COUNT_SKETCH)

    def _replica_variable(self, d, name):
        """Full-size per-replica state: ON_READ (one value per replica),
        saved and restored per replica (``replica_state.ReplicaVariable``)."""
        with keras.name_scope(self.name, caller=self):
            variable = ReplicaVariable(
                initializer="zeros",
                shape=(d,),
                dtype="float32",
                trainable=False,
                aggregation="mean",
                synchronization="on_read",
                name=name,
            )
        self._track_variable(variable)
        return variable

    def save_own_variables(self, store):
        """Keras's ``.keras`` / ``.weights.h5`` entries; per-replica state is
        stored as every replica's own value (``[replicas, d]`` under a
        strategy with several replicas, ``[d]`` with one)."""
        for i, variable in enumerate(self.variables):
            store[str(i)] = variable.saved_value() if isinstance(variable, ReplicaVariable) else variable.numpy()

    def load_own_variables(self, store):
        """Restores what ``save_own_variables`` stored; every entry is checked
        before any variable is assigned (a bad entry leaves the state as it
        was).  A differing replica count: ``state_spec.replica_values``."""
        if len(store.keys()) != len(self.variables):
            return super().load_own_variables(store)  # Keras's warning and skip
        values = []
        for i, variable in enumerate(self.variables):
            saved = np.asarray(store[str(i)])
            if isinstance(variable, ReplicaVariable):
                values.append(variable.replica_values(saved))
            elif tuple(saved.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Cannot load the state of optimizer {self.name!r}: variable {variable.path!r} is "
                    f"{tuple(variable.shape)} but the saved one is {tuple(saved.shape)}. The saved optimizer "
                    "was built with other settings (rows, columns, mode) or for other model variables."
                )
            else:
                values.append(saved)
        for variable, value in zip(self.variables, values):
            if isinstance(variable, ReplicaVariable):
                variable.assign_replicas(value)
            else:
                variable.assign(value)

    # -- communication -------------------------------------------------------
    @property
    def _collective_log(self):
        """This thread's log (MirroredStrategy traces its replicas in parallel
        threads: each replica's step records its own collective calls)."""
        return self._collective_logs.setdefault(threading.get_ident(), [])

    def _reset_log(self):
        self._collective_logs[threading.get_ident()] = []

    def _log(self, kind, tensor, round_name):
        self._collective_log.append(
            {
                "collective": kind,
                "round": round_name,
                "shape": [int(s) for s in tensor.shape],
                "dtype": tensor.dtype.name,
                "bytes": int(np.prod(tensor.shape)) * tensor.dtype.size,
            }
        )

    def _all_reduce(self, ctx, tensor, round_name):
        self._log("all_reduce", tensor, round_name)
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tensor)

    def _all_gather(self, ctx, tensor, round_name):
        self._log("all_gather", tensor, round_name)
        return ctx.all_gather(tensor, axis=0)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # compression=None: Keras's path; record what it hands over.  A
        # tf.IndexedSlices is summed by gathering every replica's rows.
        grads_and_vars = list(grads_and_vars)
        self._reset_log()
        for g, _ in grads_and_vars:
            if isinstance(g, tf.IndexedSlices):
                self._log("all_gather", g.values, "gradient_values")
                self._log("all_gather", g.indices, "gradient_indices")
            elif g is not None:
                self._log("all_reduce", g, "gradient")
        return super()._all_reduce_sum_gradients(grads_and_vars)

    def communication_report(self):
        """Bytes handed to the collective per replica in one step.

        Counted from the tensors the last traced (or eager) step handed to
        ``ReplicaContext.all_reduce``/``all_gather``; ``dense_bytes_per_step``
        is what the uncompressed all-reduce hands over (4 bytes x parameters).
        """
        d = sum(int(np.prod(v.shape)) for v in self._trainable_variables) if self.built else None
        logs = [log for log in self._collective_logs.values() if log]
        if any(log != logs[0] for log in logs):  # every replica hands over the same shapes
            raise RuntimeError(f"Replicas handed different tensors to the collectives: {logs}")
        log = logs[0] if logs else []
        sent = sum(c["bytes"] for c in log) if log else None
        dense = None if d is None else BYTES_PER_FLOAT * d
        return {
            "mode": self.mode if self.compressed else "uncompressed",
            "parameters": d,
            "dense_bytes_per_step": dense,
            "sent_bytes_per_step": sent,
            "ratio": (dense / sent) if sent else None,
            "sketch_shape": [self.sketch_rows, self.sketch_columns] if self.compressed and self.sketch_rows else None,
            "k": self.update_k if self.compressed else None,
            "candidates": self._candidates() if self.update_k and self.mode == "two_round" else None,
            "collectives": list(log),
        }

    def _candidates(self):
        return min(P_CANDIDATES * self.update_k, self.param_count)

    # -- sketching -------------------------------------------------------------
    def _flat_locations(self, ids):
        """Flat bucket ids ``j*columns + h_j(i)`` ``[rows, n]`` and signs."""
        loc = self._sketch.locate(ids)
        rows = self.sketch_rows
        flat = loc.buckets + tf.range(rows, dtype=tf.int64)[:, None] * self.sketch_columns
        signs = loc.signs if loc.signs is not None else tf.ones_like(flat, tf.float32)
        return flat, signs

    def _sketch_parts(self, parts, all_flat, all_signs):
        """The ``[rows, columns]`` count sketch of the replica's gradient,
        given as parts ``(ids or None, offset, size, values)``; dense parts use
        the step's locations of all coordinates, sparse parts hash their own
        ids; repeated ids add up (the sketch is linear)."""
        flats, contributions = [], []
        for ids, offset, size, values in parts:
            if ids is None:
                flat, signs = all_flat[:, offset : offset + size], all_signs[:, offset : offset + size]
            else:
                flat, signs = self._flat_locations(ids)
            flats.append(flat)
            contributions.append(signs * values[None, :])
        return self._sketch_located(tf.concat(flats, 1), tf.concat(contributions, 1))

    def _sketch_located(self, flat, signed_values):
        total = self.sketch_rows * self.sketch_columns
        table = tf.math.unsorted_segment_sum(tf.reshape(signed_values, [-1]), tf.reshape(flat, [-1]), total)
        return tf.reshape(table, [self.sketch_rows, self.sketch_columns])

    def _unsketch(self, table, flat, signs):
        """Median over rows of ``s_j(i) T[j, h_j(i)]`` for every coordinate."""
        estimates = tf.gather(tf.reshape(table, [-1]), flat) * signs  # [rows, d]
        rows = self.sketch_rows
        if rows == 1:
            return estimates[0]
        ordered = _sorted_rows(estimates, rows)
        mid = rows // 2
        if rows % 2:
            return ordered[mid]
        return 0.5 * (ordered[mid - 1] + ordered[mid])

    def _zero_buckets(self, table, ids):
        flat, _ = self._flat_locations(ids)
        flat = tf.reshape(flat, [-1, 1])
        zeros = tf.zeros([tf.shape(flat)[0]], table.dtype)
        shape = tf.shape(table)
        return tf.reshape(tf.tensor_scatter_nd_update(tf.reshape(table, [-1]), flat, zeros), shape)

    def _parts(self, grads, variables):
        """The replica's gradient as parts ``(ids, offset, size, values)``
        (float32 values; ``ids`` None for a dense variable, whose coordinates
        are ``offset .. offset+size``).  Sparse gradients contribute their rows
        only: they are never made dense."""
        parts = []
        for g, v in zip(grads, variables):
            if g is None:
                continue
            index = self._get_variable_index(v)
            offset = self._offsets[index]
            if isinstance(g, tf.IndexedSlices):
                width = int(np.prod(v.shape[1:]))
                rows = tf.cast(g.indices, tf.int64)
                cols = tf.range(width, dtype=tf.int64)
                ids = tf.reshape(offset + rows[:, None] * width + cols[None, :], [-1])
                parts.append((ids, offset, None, tf.reshape(tf.cast(g.values, tf.float32), [-1])))
            else:
                parts.append((None, offset, self._sizes[index], tf.reshape(tf.cast(g, tf.float32), [-1])))
        return parts

    @staticmethod
    def _flatten(parts):
        """(coordinate ids, values) of all parts."""
        ids = [p[0] if p[0] is not None else tf.range(p[1], p[1] + p[2], dtype=tf.int64) for p in parts]
        return tf.concat(ids, 0), tf.concat([p[3] for p in parts], 0)

    # -- the step ----------------------------------------------------------------
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self.compressed:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        ctx = tf.distribute.get_replica_context()
        if ctx is None:
            raise RuntimeError("SketchedSGD.apply must run in a replica context (inside strategy.run or model.fit).")
        self._reset_log()
        lr = tf.cast(learning_rate, tf.float32)
        rho = tf.constant(self.momentum, tf.float32)
        parts = self._parts(grads, trainable_variables)
        if self.mode == "fetchsgd":
            chosen, delta, writes = self._fetchsgd(ctx, parts, lr, rho)
            replica_writes = []
        else:
            ids, values = self._flatten(parts)
            chosen, delta, replica_writes = self._per_replica(ctx, ids, values, lr, rho)
            writes = []
        for variable, value in replica_writes:  # ON_READ: this replica's own value
            variable.assign(value)
        updates = self._split(chosen, delta, trainable_variables)
        # Mirrored variables: every device writes its own copy (no communication).
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._write_mirrored, tf.distribute.get_strategy(), writes, updates
        )

    def _fetchsgd(self, ctx, parts, lr, rho):
        d = self.param_count
        flat, signs = self._flat_locations(tf.range(d, dtype=tf.int64))  # once per step
        S = self._all_reduce(ctx, self._sketch_parts(parts, flat, signs), "sketch")[:, :, None]
        U = rho * tf.convert_to_tensor(self.sketch_momentum) + S
        step = S + rho * U if self.nesterov else U
        E = tf.convert_to_tensor(self.sketch_error) + lr * step
        estimate = self._unsketch(E, flat, signs)
        _, chosen = tf.math.top_k(tf.abs(estimate), self.update_k)
        chosen = tf.cast(chosen, tf.int64)
        delta = tf.gather(estimate, chosen)
        U = self._zero_buckets(U, chosen)
        E = self._zero_buckets(E, chosen)
        return chosen, delta, [(self.sketch_momentum, U), (self.sketch_error, E)]

    def _per_replica(self, ctx, ids, values, lr, rho):
        d = self.param_count
        u_var, e_var = self.replica_momentum, self.replica_error
        u = tf.tensor_scatter_nd_add(rho * u_var.value, ids[:, None], values)
        if self.nesterov:
            e = tf.tensor_scatter_nd_add(e_var.value + lr * rho * u, ids[:, None], lr * values)
        else:
            e = e_var.value + lr * u
        if self.mode == "two_round":
            all_ids = tf.range(d, dtype=tf.int64)
            flat, signs = self._flat_locations(all_ids)
            S = self._all_reduce(ctx, self._sketch_located(flat, signs * e[None, :]), "sketch")
            estimate = self._unsketch(S, flat, signs)
            _, candidates = tf.math.top_k(tf.abs(estimate), self._candidates())
            exact = self._all_reduce(ctx, tf.gather(e, candidates), "candidates")
            _, best = tf.math.top_k(tf.abs(exact), self.update_k)
            chosen = tf.cast(tf.gather(candidates, best), tf.int64)
            delta = tf.gather(exact, best)
            sent = chosen
        else:  # local_topk
            _, mine = tf.math.top_k(tf.abs(e), self.update_k)
            vals = self._all_gather(ctx, tf.gather(e, mine), "topk_values")
            idx = self._all_gather(ctx, tf.cast(mine, tf.int32), "topk_indices")
            # The sum of the gathered sparse vectors, as unique coordinates.
            chosen, slot = tf.unique(tf.cast(idx, tf.int64))
            delta = tf.math.unsorted_segment_sum(vals, slot, tf.shape(chosen)[0])
            sent = tf.cast(mine, tf.int64)
        zeros = tf.zeros_like(tf.cast(sent, tf.float32))
        u = tf.tensor_scatter_nd_update(u, sent[:, None], zeros)
        e = tf.tensor_scatter_nd_update(e, sent[:, None], zeros)
        return chosen, delta, [(u_var, u), (e_var, e)]

    def _split(self, chosen, delta, variables):
        """``[(variable, local multi-indices, values)]`` of the update."""
        parts = []
        for v in variables:
            index = self._get_variable_index(v)
            lo, n = self._offsets[index], self._sizes[index]
            mask = (chosen >= lo) & (chosen < lo + n)
            local = tf.boolean_mask(chosen, mask) - lo
            vals = tf.boolean_mask(delta, mask)
            if len(v.shape) == 0:
                parts.append((v, None, tf.reduce_sum(vals)))
            else:
                shape = [int(s) for s in v.shape]
                strides = np.cumprod([1] + shape[::-1])[:-1][::-1]  # row-major
                multi = tf.stack([(local // int(st)) % n_a for st, n_a in zip(strides, shape)], axis=1)
                parts.append((v, multi, vals))
        return parts

    @staticmethod
    def _write_mirrored(distribution, writes, parts):
        def assign(var, value):
            return var.assign(value)

        def scatter_sub(var, indices, values):
            values = tf.cast(values, var.dtype)
            if indices is None:
                return var.assign_sub(values)
            return var.scatter_nd_sub(indices, values)

        for variable, value in writes:
            distribution.extended.update(variable.value, assign, args=(value,), group=False)
        for variable, indices, values in parts:
            target = variable.value if isinstance(variable, keras.Variable) else variable
            distribution.extended.update(target, scatter_sub, args=(indices, values), group=False)

    # -- config --------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "compression": self.compression,
                "k": self.k,
                "rows": self.rows,
                "columns": self.columns,
                "mode": self.mode,
                "seed": self.seed,
            }
        )
        return config


def _sorted_rows(x, rows):
    """``x`` ``[rows, n]`` sorted along rows: an odd-even transposition
    network of elementwise min/max (``rows`` is small; far cheaper than
    ``tf.sort`` along axis 0 on CPU)."""
    r = [x[j] for j in range(rows)]
    for p in range(rows):
        for j in range(p % 2, rows - 1, 2):
            r[j], r[j + 1] = tf.minimum(r[j], r[j + 1]), tf.maximum(r[j], r[j + 1])
    return r


class _Shape:
    """Stands in for a sketch table when only the hashing of ``Sketch`` is used
    (two_round keeps no sketch variable: its sketch is a per-step tensor)."""

    def __init__(self, shape):
        self.shape = shape
        self.dtype = tf.float32
