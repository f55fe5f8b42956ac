"""Optimizer state of one variable, exact or sketched, dense or row-sparse.

Every auxiliary variable of every optimizer is updated with one rule,

    X <- decay * X + scale * x          (``accumulate``)

Adam's moments use ``decay=beta, scale=1-beta``, Adagrad ``decay=1``,
momentum ``decay=gamma, scale=1``.  How the rule is carried out depends on the
gradient, and is decided here once for all optimizers:

* dense gradient (all rows): the state decays whole and ``scale * x`` is added
  (for a sketch: ``S <- decay * S + sketch(scale * x)``, exact because the
  sketch is linear; it keeps count-min buckets non-negative);
* sparse rows (``tf.IndexedSlices``): only the touched rows change, by the
  paper's per-row delta ``(decay - 1) * X_prev + scale * x``, with ``X_prev``
  queried from the state.  Untouched rows do not decay (lazy updates, like
  LazyAdam and PyTorch's SparseAdam).

The update math sees a variable's state through ``StepState``: ``accumulate``
and ``ema`` update a slot and return its new estimate, ``read`` returns the
estimate without changing it (read before the update: the previous value,
which Lion's step needs).  docs/extending.md shows how an optimizer uses them.
"""

import math

import numpy as np
import tensorflow as tf

from keras_sketch.factored import FACTORED_KINDS
from keras_sketch.sketch import EXACT
from keras_sketch.tf_internals import in_xla_context, tf_variable


class ExactState:
    """Full-size state ``[rows, dim]``: the same interface as ``Sketch``."""

    kind = EXACT
    identity = True

    def __init__(self, variable):
        self.table = variable
        self.rows, self.dim = (int(s) for s in variable.shape)

    def locate(self, rows):
        return tf.cast(rows, tf.int64)

    def query(self, loc):
        # A gather on the variable itself: reading the whole variable first
        # would make the following scatter copy it (copy-on-write).
        return self._variable().sparse_read(loc)

    def query_all(self):
        return self._tensor()

    def add(self, loc, delta):
        self._variable().scatter_nd_add(loc[:, None], delta)

    def decay_add_all(self, decay, x):
        table = self._tensor()
        self._variable().assign(table * tf.cast(decay, table.dtype) + x)

    def scale(self, factor):
        self._variable().assign(self._tensor() * tf.cast(factor, self.table.dtype))

    def scale_at(self, loc, factor):
        """``X[loc] <- factor * X[loc]`` (``factor`` ``[k, 1]``)."""
        self._variable().scatter_nd_update(loc[:, None], self.query(loc) * factor)

    def max_at(self, loc, source):
        """``X[loc] <- max(X[loc], source[loc])`` (``source``: exact, same shape)."""
        self._variable().scatter_nd_update(loc[:, None], tf.maximum(self.query(loc), source.query(loc)))

    def max_all(self, source):
        self._variable().assign(tf.maximum(self._tensor(), source._tensor()))

    def _variable(self):
        return tf_variable(self.table)

    def _tensor(self):
        return tf.convert_to_tensor(self._variable())


class Rows:
    """A merged batch of unique rows of a variable's ``[rows, dim]`` view.

    Under XLA ``ids`` keeps the batch's static length and entries past the
    number of unique rows are padding (``mask`` 0, id 0); see
    ``merge_duplicates``.
    """

    def __init__(self, ids, mask):
        self.ids = ids  # int64 [k]
        self.mask = mask  # float [k, 1]


def merge_duplicates(ids, values, keep=None):
    """Sums the values of repeated ids.

    Returns ``(unique_ids, summed_values, valid)``.  Outside XLA this is
    ``tf.unique`` (length = number of unique ids).  Under XLA (``jit_compile``,
    TPUs) shapes stay static: each output has the input's length ``k``, the
    first ``n_unique`` entries are the unique ids in ascending order, the
    rest padding with id 0, zero values and ``valid`` False.  ``keep``
    (bool ``[k]``, optional) marks entries left out of the step
    (``keras_sketch.guard``): an id none of whose entries is kept is not
    valid; its values must already be zero.
    """
    ids = tf.cast(ids, tf.int64)
    keep = tf.ones(tf.shape(ids), tf.bool) if keep is None else keep
    if not in_xla_context():
        unique, position = tf.unique(ids)
        n = tf.shape(unique)[0]
        summed = tf.math.unsorted_segment_sum(values, position, n)
        valid = tf.math.unsorted_segment_max(tf.cast(keep, tf.int32), position, n) > 0
        return unique, summed, valid
    k = tf.shape(ids)[0]
    order = tf.argsort(ids, stable=True)
    ids = tf.gather(ids, order)
    values = tf.gather(values, order)
    keep = tf.gather(keep, order)
    first = tf.concat([tf.ones([1], tf.bool), ids[1:] != ids[:-1]], axis=0)[:k]
    segment = tf.cumsum(tf.cast(first, tf.int32)) - 1
    summed = tf.math.unsorted_segment_sum(values, segment, k)
    unique = tf.math.unsorted_segment_max(ids, segment, k)
    kept = tf.math.unsorted_segment_max(tf.cast(keep, tf.int32), segment, k) > 0
    valid = (tf.range(k) < tf.reduce_sum(tf.cast(first, tf.int32))) & kept
    unique = tf.where(valid, unique, tf.zeros_like(unique))
    return unique, summed, valid


def estimate(slot, rows=None):
    """The current estimate of ``slot``, without changing it: ``[rows, dim]``
    when ``rows`` is None (dense), else ``[k, dim]`` for ``rows.ids``.

    Read before ``accumulate`` it is the value the slot held before the step
    (Lion's update direction); read after it, what ``accumulate`` returned.
    """
    if slot.kind in FACTORED_KINDS:
        return slot.read(rows)
    if rows is None:
        return slot.query_all()
    return slot.query(slot.locate(rows.ids))


def accumulate(slot, x, decay, scale, rows=None):
    """``X <- decay * X + scale * x`` on ``slot``; returns the new estimate.

    ``x`` is ``[rows, dim]`` when ``rows`` is None (dense), else ``[k, dim]``
    for ``rows.ids``.  The estimate is queried after the update, as in the
    paper's algorithms.
    """
    if slot.kind in FACTORED_KINDS:  # not linear: the factored state updates itself
        return slot.accumulate(x, decay, scale, rows)
    if rows is None:
        slot.decay_add_all(decay, scale * x)
        return slot.query_all()
    loc = slot.locate(rows.ids)
    previous = slot.query(loc)
    slot.add(loc, rows.mask * ((decay - 1.0) * previous + scale * x))
    return slot.query(loc)


def running_max(slot, source, rows=None):
    """``H <- max(H, S)`` entry by entry, ``S`` a slot kept like ``H`` (the
    same kind, shape and hashing): for sketches bucket by bucket, at the
    buckets of ``rows`` (every bucket when dense).  Returns H's new estimate.
    AMSGrad's running maximum; see ``CSAdam``."""
    if rows is None:
        slot.max_all(source)
        return slot.query_all()
    loc = slot.locate(rows.ids)
    slot.max_at(loc, source)
    return slot.query(loc)


class StepState:
    """The state of one variable during one step: what the update math sees.

    A ``frozen`` state only reads: ``decay_rows`` leaves it unchanged (the
    forward pass's look at the moves rows still owe, ``pending_move``)."""

    def __init__(self, slots, rows=None, frozen=False):
        self.slots = slots
        self.rows = rows
        self.frozen = frozen

    def has(self, name):
        """Whether the variable keeps slot ``name`` (``state_budget`` may drop one)."""
        return name in self.slots

    def read(self, name):
        """The estimate of slot ``name`` as it is now, for the step's rows.

        Called before ``accumulate``/``ema`` of the same slot it gives the
        value before this step's update (what Lion's direction uses); the
        step's ops run in program order, also inside ``tf.function`` and XLA
        (TensorFlow orders the reads and writes of one variable).
        """
        return estimate(self.slots[name], self.rows)

    def accumulate(self, name, x, decay, scale=1.0):
        return accumulate(self.slots[name], x, decay, scale, self.rows)

    def running_max(self, name, source):
        """``name <- max(name, source)`` (AMSGrad); returns the estimate."""
        return running_max(self.slots[name], self.slots[source], self.rows)

    def ema(self, name, x, beta):
        """Exponential moving average: ``X <- beta * X + (1 - beta) * x``."""
        return self.accumulate(name, x, beta, 1.0 - beta)


class Layout:
    """How a variable is seen as a 2-D ``[rows, dim]`` state.

    Leading dimensions are flattened: ``[prod(shape[:-1]), shape[-1]]``
    (scalars ``[1, 1]``, vectors ``[n, 1]``).  With ``transpose`` the last
    axis is the row axis instead, e.g. the class axis of a Keras ``Dense``
    kernel ``[in, out]``.
    """

    def __init__(self, shape, transpose=False):
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) == 0:
            lead, last = 1, 1
        elif len(self.shape) == 1:
            lead, last = self.shape[0], 1
        else:
            lead, last = int(np.prod(self.shape[:-1])), self.shape[-1]
        self.transpose = bool(transpose)
        self.rows, self.dim = (last, lead) if transpose else (lead, last)
        self._lead_last = (lead, last)

    @property
    def sparse_rows(self):
        """Whether ``IndexedSlices`` rows (axis 0) map to rows of the view."""
        return not self.transpose and len(self.shape) >= 1

    def view(self, t):
        t = tf.reshape(t, self._lead_last)
        return tf.transpose(t) if self.transpose else t

    def unview(self, t):
        if self.transpose:
            t = tf.transpose(t)
        return tf.reshape(t, self.shape)

    def sparse_view(self, gradient):
        """``(ids, values)`` of an ``IndexedSlices`` gradient in view rows."""
        ids = tf.cast(gradient.indices, tf.int64)
        values = gradient.values
        if len(self.shape) <= 2:
            return ids, tf.reshape(values, [-1, self.dim])
        block = int(np.prod(self.shape[1:-1]))
        ids = tf.reshape(ids[:, None] * block + tf.range(block, dtype=tf.int64)[None, :], [-1])
        return ids, tf.reshape(values, [-1, self.dim])

    def scatter_sub(self, variable, ids, delta):
        """``variable[view rows ids] -= delta``, touching those rows only."""
        variable = tf_variable(variable)
        if len(self.shape) == 1:
            variable.scatter_nd_sub(ids[:, None], delta[:, 0])
        elif len(self.shape) == 2:
            variable.scatter_nd_sub(ids[:, None], delta)
        else:
            index = tf.transpose(tf.unravel_index(ids, self.shape[:-1]))
            variable.scatter_nd_sub(index, delta)


# -- catch-up of lazy rows (``catch_up=True``) ----------------------------------------
#
# A row a sparse step skips sees, in the dense optimizer, a zero gradient: its
# moments decay and, while its 1st moment is non-zero, its weight keeps moving.
# With ``catch_up`` these missed steps are applied when the row is next
# touched, before its own step, from the number of steps it skipped (a per-row
# counter of the last step that touched it).  The optimizers write what a
# missed step does (``_catch_up``); these helpers carry it out.

FLOAT32_ROUNDOFF = 2.0**-24


def decay_rows(state, name, factor):
    """``X[rows] <- factor * X[rows]`` on slot ``name`` (``factor`` per row,
    ``[k, 1]``): the missed decays of the step's rows.  Written as a product
    (``scale_at``), not as the additive delta ``(factor - 1) * X``, which
    would leave an error of X's rounding after a long decay.  Entries that
    are not real rows keep factor 1, except XLA's padding and left-out
    entries, which all carry id 0 and row 0's own factor: when row 0 is a
    real row of the step they must write the same value as it.  Nothing on
    a frozen state."""
    if state.frozen:
        return
    rows = state.rows
    real = rows.mask > 0
    row_zero = tf.equal(rows.ids, 0)[:, None]
    zero_touched = tf.reduce_any(real & row_zero)
    factor = tf.where(real | (row_zero & zero_touched), factor, tf.ones_like(factor))
    slot = state.slots[name]
    slot.scale_at(slot.locate(rows.ids), factor)


def missed_sum(term, skipped, cap, like):
    """``sum_{j=1}^{min(skipped, cap)} term(j)`` per row.

    ``term(j)`` is the weight move of each row's ``j``-th missed step;
    ``skipped`` ``[k, 1]`` int64 the number of steps each row missed; ``like``
    a ``[k, dim]`` tensor of the result's shape and dtype.  ``j`` is a float
    tensor ``[B, 1, 1]`` of ``B`` consecutive step numbers, so ``term`` (written
    with broadcasting ops) returns ``[B, k, dim]``: the steps are summed in
    blocks of ``B`` (``_missed_block``), a bounded loop (``tf.while_loop``, also
    under XLA) of ``ceil(min(max(skipped), cap) / B)`` iterations of
    ``B x k x dim`` work; few iterations, since each costs a fixed overhead.
    """
    n = tf.minimum(tf.reduce_max(tf.concat([[0], tf.reshape(skipped, [-1])], 0)), cap)
    block = _missed_block(like)
    offsets = tf.range(block, dtype=tf.int64)[:, None, None]

    def body(start, total):
        j = start + offsets
        move = term(tf.cast(j, like.dtype))
        move = tf.where(j <= skipped[None], move, tf.zeros_like(move))
        return start + block, total + tf.reduce_sum(move, 0)

    _, total = tf.while_loop(lambda start, _: start <= n, body, (tf.constant(1, tf.int64), tf.zeros_like(like)))
    return total


_MISSED_BLOCK_ELEMENTS = 2**22  # a block's [B, k, dim] terms: at most 16 MiB of float32


def _missed_block(like):
    """``B``: 32 missed steps per block, fewer when ``32 x k x dim`` would
    exceed ``_MISSED_BLOCK_ELEMENTS``; a Python int when ``like``'s shape is
    static (as under XLA), else an int64 tensor (``k``, the step's number of
    unique rows, is known only when the step runs)."""
    size = like.shape.num_elements()
    if size is None:
        size = tf.size(like, out_type=tf.int64)
        return tf.clip_by_value(_MISSED_BLOCK_ELEMENTS // tf.maximum(size, 1), 1, 32)
    return int(max(1, min(32, _MISSED_BLOCK_ELEMENTS // max(size, 1))))


def geometric_cap(ratio, spread=1.0, tolerance=FLOAT32_ROUNDOFF):
    """The number of missed steps ``J`` after which the remaining moves sum
    to at most ``tolerance`` times the first missed move, when the ``j``-th
    move is at most ``spread * ratio^(j-1)`` times the first:
    ``spread * ratio^J / (1 - ratio) <= tolerance``.  ``ratio`` in [0, 1)."""
    if ratio <= 0.0:
        return 1
    return max(1, int(math.ceil(math.log(tolerance * (1.0 - ratio) / spread) / math.log(ratio))))
