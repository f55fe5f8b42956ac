"""Count-sketch tensors (Spring et al., ICML 2019, Algorithm 1).

A sketch of an auxiliary variable ``X`` of shape ``[rows, dim]`` is a tensor
``S`` of shape ``[depth, width, dim]``.  Rows are hashed, the last dimension is
kept whole, so every bucket is a contiguous vector (the paper's Figure 1).

* count-sketch: ``S[j, h_j(i)] += s_j(i) * delta``; query = median over ``j``
  of ``s_j(i) * S[j, h_j(i)]``.  Unbiased, for signed state (momentum).
* count-min sketch: no signs; query = min over ``j``.  Never underestimates a
  non-negative stream, for squared-gradient state (Adagrad, Adam's 2nd moment).

Hashing.  ``h_j(i) = ((a_j * i + b_j) mod P) mod width`` and
``s_j(i) = 1 - 2 * (((c_j * i + d_j) mod P) mod 2)`` with the Mersenne prime
``P = 2**31 - 1`` (Carter-Wegman universal hashing).  Row ids are reduced mod
``P`` first, so every product is below ``2**62``: int64 never overflows, for
row counts up to ``2**31`` (ids up to ``P`` hash like ``id mod P``).  The four
integers per depth are stored in an int64 variable ``[depth, 4]`` next to the
table, so the mapping is deterministic across processes and restored with the
optimizer state.  When ``width >= rows`` the sketch is the identity map
(depth 1, no signs): exact, lossless state.
"""

import math
import zlib

import numpy as np
import tensorflow as tf

from keras_sketch.tf_internals import in_xla_context, tf_variable

PRIME = 2**31 - 1
EXACT = "exact"  # full-size state (keras_sketch.state.ExactState)
COUNT_SKETCH = "count_sketch"
COUNT_MIN = "count_min"
KINDS = (COUNT_SKETCH, COUNT_MIN)

# Dense queries of a count-sketch with depth > 1 need every depth's estimate of
# a row to take a median; they are computed in row chunks of at most this many
# elements (depth * chunk_rows * dim) so no `depth x rows x dim` tensor exists.
_QUERY_CHUNK_ELEMENTS = 1 << 20


def hash_params(seed, stream, depth):
    """The ``[depth, 4]`` int64 array ``(a, b, c, d)`` for one sketch.

    ``seed`` is the user's seed, ``stream`` tells variables apart (the
    optimizer passes the variable's index).  NumPy's PCG64 seeded with both is
    stable across processes, platforms and NumPy versions.
    """
    key = [int(seed) & 0xFFFFFFFF, int(stream) & 0xFFFFFFFF, zlib.crc32(b"keras_sketch")]
    rng = np.random.Generator(np.random.PCG64(key))
    a = rng.integers(1, PRIME, size=depth, dtype=np.int64)
    b = rng.integers(0, PRIME, size=depth, dtype=np.int64)
    c = rng.integers(1, PRIME, size=depth, dtype=np.int64)
    d = rng.integers(0, PRIME, size=depth, dtype=np.int64)
    return np.stack([a, b, c, d], axis=1)


def sketch_width(rows, depth, compression):
    """Width that gives ``depth * width ~= compression * rows`` buckets."""
    return max(1, int(math.ceil(compression * rows / depth)))


class Locations:
    """Where a set of rows lives in a sketch: buckets ``[depth, k]`` and signs."""

    def __init__(self, buckets, signs):
        self.buckets = buckets  # int64 [depth, k]
        self.signs = signs  # float [depth, k], or None for unsigned sketches


class Sketch:
    """A count-sketch or count-min sketch tensor held in a variable.

    ``table`` is a variable ``[depth, width, dim]``; ``params`` an int64
    variable ``[depth, 4]`` with the hash coefficients.  ``rows`` is the
    number of rows of the sketched ``[rows, dim]`` state.
    """

    def __init__(self, table, params, rows, kind, known_params=None):
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
        self.table = table
        self.params = params
        self.rows = int(rows)
        self.kind = kind
        self.depth, self.width, self.dim = (int(s) for s in table.shape)
        self.identity = self.width >= self.rows
        # ``query_shared``'s rows per bucket for the parameters the sketch was
        # built with (``known_params``, a NumPy array), counted once.
        self._known_params, self._known_counts = known_params, None
        if self.identity and (self.depth != 1 or self.width != self.rows):
            raise ValueError("An identity (lossless) sketch has depth 1 and width == rows.")

    @property
    def signed(self):
        return self.kind == COUNT_SKETCH and not self.identity

    # -- hashing ---------------------------------------------------------
    def locate(self, rows, params=None):
        """Buckets and signs of ``rows`` (int tensor ``[k]``), under the
        sketch's hash parameters (or ``params``, ``[depth, 4]``)."""
        rows = tf.cast(rows, tf.int64)
        if self.identity:
            return Locations(rows[None, :], None)
        x = tf.math.floormod(rows, PRIME)[None, :]
        p = tf.convert_to_tensor(self.params if params is None else params)
        a, b, c, d = (p[:, i : i + 1] for i in range(4))
        buckets = tf.math.floormod(tf.math.floormod(a * x + b, PRIME), self.width)
        signs = None
        if self.signed:
            bit = tf.math.floormod(tf.math.floormod(c * x + d, PRIME), 2)
            signs = tf.cast(1 - 2 * bit, self.table.dtype)
        return Locations(buckets, signs)

    # -- query -------------------------------------------------------------
    def query(self, loc):
        """Estimates ``[k, dim]`` of the rows at ``loc``."""
        values = self._gather(self._indices(loc))
        if loc.signs is not None:
            values = values * loc.signs[:, :, None]
        return self._combine(values)

    def query_all(self):
        """Estimates ``[rows, dim]`` of every row, with bounded temporaries."""
        if self.identity:
            return self._tensor()[0, : self.rows]
        if self.kind == COUNT_MIN or self.depth == 1:
            # A running min (or the single depth) needs one [rows, dim] tensor.
            loc = self.locate(tf.range(self.rows, dtype=tf.int64))
            table = self._tensor()
            estimate = None
            for j in range(self.depth):
                value = tf.gather(table[j], loc.buckets[j])
                if loc.signs is not None:
                    value = value * loc.signs[j][:, None]
                estimate = value if estimate is None else tf.minimum(estimate, value)
            return self._clamp(estimate)
        return self._query_all_chunked()

    def query_shared(self, rows=None):
        """Depth-1 estimates ``[k, dim]`` of ``rows`` (all rows when None):
        each bucket's value shared equally among the rows hashed to it.

        Not an upper bound like ``query`` (a bucket's rows sum to its value:
        the mass of the rows is kept, not added to each of them); exact for a
        row alone in its bucket.  The number of rows per bucket follows from
        the hash parameters (``_shared_counts``).  ``FACTORED_SKETCH`` reads
        its row factor this way (keras_sketch/factored.py)."""
        if self.depth != 1:
            raise ValueError(f"query_shared needs a depth-1 sketch, this one has depth {self.depth}.")
        shared = self._clamp(self._tensor()[0]) / tf.maximum(self._shared_counts(), 1.0)[:, None]
        ids = tf.range(self.rows, dtype=tf.int64) if rows is None else rows
        return tf.gather(shared, self.locate(ids).buckets[0])

    def _shared_counts(self):
        """The number of rows hashed to each bucket (``[width]``).  Counted
        once (eagerly, ``rows`` hashes) for the parameters the sketch was
        built with; a step compares the current parameters with those (a
        restore may bring others) and recounts only when they differ, so a
        sparse step does not hash every row."""
        params = tf.convert_to_tensor(self.params)
        if self._known_params is None:
            return self._count(params)
        if self._known_counts is None:
            with tf.init_scope():
                self._known_counts = self._count(tf.constant(self._known_params, tf.int64))
        same = tf.reduce_all(tf.equal(params, self._known_params))
        return tf.cond(same, lambda: self._known_counts, lambda: self._count(params))

    def _count(self, params):
        every = self.locate(tf.range(self.rows, dtype=tf.int64), params).buckets[0]
        return tf.math.unsorted_segment_sum(tf.ones([self.rows], self.table.dtype), every, self.width)

    def _query_all_chunked(self):
        chunk = max(1, _QUERY_CHUNK_ELEMENTS // (self.depth * self.dim))
        chunk = min(chunk, self.rows)
        n_chunks = -(-self.rows // chunk)
        ids = tf.minimum(tf.range(n_chunks * chunk, dtype=tf.int64), self.rows - 1)
        ids = tf.reshape(ids, [n_chunks, chunk])
        out = tf.map_fn(
            lambda r: self.query(self.locate(r)),
            ids,
            fn_output_signature=tf.TensorSpec([chunk, self.dim], self.table.dtype),
            parallel_iterations=1,
        )
        return tf.reshape(out, [n_chunks * chunk, self.dim])[: self.rows]

    def _gather(self, indices):
        """The raw buckets at ``indices`` (``[depth, k, 2]``)."""
        if in_xla_context():  # XLA has no ResourceGatherNd kernel, nor copy-on-write
            return tf.gather_nd(self._tensor(), indices)
        # Gathered from the variable itself: a full read followed by the
        # step's scatter would copy the whole table (copy-on-write).
        return tf.raw_ops.ResourceGatherNd(
            resource=self._variable().handle, indices=indices, dtype=self.table.dtype
        )

    def _combine(self, values):
        if self.depth == 1:
            return self._clamp(values[0])
        if self.kind == COUNT_MIN:
            return self._clamp(tf.reduce_min(values, axis=0))
        ordered = tf.sort(values, axis=0)
        mid = self.depth // 2
        if self.depth % 2:
            return ordered[mid]
        return 0.5 * (ordered[mid - 1] + ordered[mid])

    def _clamp(self, estimate):
        # Count-min state is non-negative by definition; the per-row sparse
        # update can push a bucket shared by many rows of one batch below zero
        # in float arithmetic, so the estimate is clamped there.
        if self.kind == COUNT_MIN:
            return tf.maximum(estimate, 0.0)
        return estimate

    # -- update ------------------------------------------------------------
    def add(self, loc, delta):
        """UPDATE: ``S[j, h_j(i)] += s_j(i) * delta_i`` for every row ``i``."""
        updates = tf.broadcast_to(delta[None], tf.concat([[self.depth], tf.shape(delta)], 0))
        if loc.signs is not None:
            updates = updates * loc.signs[:, :, None]
        self._variable().scatter_nd_add(self._indices(loc), updates)

    def _indices(self, loc):
        """``[depth, k, 2]`` (depth, bucket) pairs of ``loc``."""
        k = tf.shape(loc.buckets)[1]
        depth_ids = tf.broadcast_to(
            tf.range(self.depth, dtype=tf.int64)[:, None], tf.stack([self.depth, k])
        )
        return tf.stack([depth_ids, loc.buckets], axis=-1)

    def decay_add_all(self, decay, x):
        """``S <- decay * S + sketch(x)`` for a full ``[rows, dim]`` update ``x``.

        The sketch is linear, so decaying it whole and adding the sketch of
        ``x`` is exactly the sketch of ``decay * X + x``; temporaries are one
        ``[rows, dim]`` tensor at a time.
        """
        if self.identity:
            added = x[None]
        else:
            loc = self.locate(tf.range(self.rows, dtype=tf.int64))
            parts = []
            for j in range(self.depth):
                xj = x if loc.signs is None else x * loc.signs[j][:, None]
                parts.append(tf.math.unsorted_segment_sum(xj, loc.buckets[j], self.width))
            added = tf.stack(parts)
        table = self._tensor()
        self._variable().assign(table * tf.cast(decay, table.dtype) + added)

    def max_at(self, loc, source):
        """``S <- max(S, source)`` at the buckets of ``loc``; ``source`` is a
        sketch with the same shape and hashing.  Rows of one batch sharing a
        bucket write the same value."""
        indices = self._indices(loc)
        self._variable().scatter_nd_update(indices, tf.maximum(self._gather(indices), source._gather(indices)))

    def scale_at(self, loc, factor):
        """``S[loc] <- factor * S[loc]`` (``factor`` ``[k, 1]``), for the
        identity map only: a hashed bucket holds several rows, which a row's
        factor must not scale (``catch_up`` needs exact state)."""
        if not self.identity:
            raise ValueError("Rows of a hashed sketch cannot be scaled one by one (their buckets are shared).")
        indices = self._indices(loc)
        self._variable().scatter_nd_update(indices, self._gather(indices) * factor[None])

    def max_all(self, source):
        """``S <- max(S, source)`` bucket by bucket, the whole table."""
        self._variable().assign(tf.maximum(self._tensor(), source._tensor()))

    def scale(self, factor):
        """Cleaning: multiply the whole sketch by ``factor``."""
        self._variable().assign(self._tensor() * tf.cast(factor, self.table.dtype))

    # -- helpers -------------------------------------------------------------
    def _variable(self):
        return tf_variable(self.table)  # the per-device component under tf.distribute

    def _tensor(self):
        return tf.convert_to_tensor(self._variable())
