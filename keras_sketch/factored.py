"""Rank-1 factored state of a non-negative ``[rows, dim]`` slot.

Adafactor's estimate of a 2nd moment (Shazeer & Stern, ICML 2018, Alg. 4):
keep a moving average ``R`` of each row's mean of ``x`` and ``C`` of each
column's mean, and estimate ``X[i, j] = R[i] * C[j] / mean(C)``: exact when
``X`` has rank one, ``rows + dim`` numbers instead of ``rows * dim``.  At
equal memory it had by far the lowest error of the estimators measured in
docs/approximation.md (relative l2 0.35 against 7.0 for count-min on the
WikiText-2 LM's accumulator), and unlike count-min it does not inflate the
estimate of a row by the mass of the rows it collides with, so it does not
damp the steps of dense layers.  ``state_budget``'s planner uses it for the
non-negative slots of matrices (keras_sketch/plan.py).

Sparse rows (``tf.IndexedSlices``) give exactly the dense step of the same
gradient with zero rows elsewhere (every ``R`` decays, ``C`` averages over
all rows), like SM3 (the exact and count-min states update lazily).  The
step itself still only moves the touched rows; the estimate of a rarely
touched row keeps the decay that Adam's bias correction assumes.

**Sketched row factor** (``FACTORED_SKETCH``).  When even ``rows + dim``
numbers per matrix do not fit (``state_budget=0.005`` on a vocabulary-5,000
LM: the vocabulary-long factors of the embedding and the softmax kernel are
most of the state), ``R`` itself is hashed into ``w`` buckets of one number
each (a depth-1 ``keras_sketch.sketch.Sketch`` of the ``[rows, 1]`` vector),
where a count-min sketch of the whole matrix spends ``dim`` numbers per
bucket: ``dim`` times more buckets at equal memory.  ``C`` stays exact.  The
sketch is linear, so the update rule above is carried out exactly on the
buckets (decay the table, add the row means at their buckets).  A row's
``R`` is read as its bucket's value shared equally by the rows hashed there
(``Sketch.query_shared``), not as the bucket's whole value (count-min's
upper bound): at ``state_budget=0.005`` the shared read gave 0.69x / 0.88x /
0.98x Adam's score on the LSTM LM / Transformer LM / recommender where the
upper bound gave 0.74x / 0.93x / 1.06x (docs/state_budget.md) -- the upper
bound damps the steps of every rare row that shares a bucket with a
frequent one.  A vector (``[rows]``, ``[rows, 1]``) is the case ``dim = 1``
(``C`` is one number, the estimate is ``R``).
"""

import tensorflow as tf

from keras_sketch.sketch import Sketch
from keras_sketch.tf_internals import tf_variable

FACTORED = "factored"
FACTORED_SKETCH = "factored_sketch"  # the row factor in a count-min sketch
FACTORED_KINDS = (FACTORED, FACTORED_SKETCH)
_TINY = 1e-30


class FactoredState:
    """``R`` and ``C [dim]`` with the ``accumulate`` rule; ``R`` is a
    ``[rows]`` variable, or a count-min ``keras_sketch.sketch.Sketch`` of the
    ``[rows, 1]`` vector (``FACTORED_SKETCH``)."""

    identity = False

    def __init__(self, row, col_variable):
        self.row, self.col = row, col_variable
        self.sketch = isinstance(row, Sketch)
        self.kind = FACTORED_SKETCH if self.sketch else FACTORED
        self.rows = row.rows if self.sketch else int(row.shape[0])
        self.dim = int(col_variable.shape[0])
        self.variables = (row.table, col_variable) if self.sketch else (row, col_variable)

    def accumulate(self, x, decay, scale, rows=None):
        """``X <- decay * X + scale * x`` in factored form; returns the new
        estimate of the rows ``x`` covers (all rows, or ``rows.ids``)."""
        c = tf_variable(self.col)
        if rows is None:
            row_mean = scale * tf.reduce_mean(x, axis=1)
            if self.sketch:  # linear: the sketch of decay * R + row_mean
                self.row.decay_add_all(decay, row_mean[:, None])
            else:
                r = tf_variable(self.row)
                r.assign(decay * tf.convert_to_tensor(r) + row_mean)
            c.assign(decay * tf.convert_to_tensor(c) + scale * tf.reduce_mean(x, axis=0))
            return self.read()
        # Sparse rows give exactly the dense step with zero rows (as SM3 does,
        # keras_sketch/optimizers/sm3.py): every R decays (the whole sketch
        # table when R is sketched), the touched rows add their mean, and C
        # averages over all rows (untouched ones add 0).  Both are
        # O(rows + dim) vector operations.
        mask = rows.mask  # [k, 1]: 0 for padding and left-out rows
        row_mean = mask[:, 0] * scale * tf.reduce_mean(x, axis=1)
        if self.sketch:
            self.row.scale(decay)
            self.row.add(self.row.locate(rows.ids), row_mean[:, None])
        else:
            r = tf_variable(self.row)
            r.assign(decay * tf.convert_to_tensor(r))
            r.scatter_nd_add(rows.ids[:, None], row_mean)
        col_mean = tf.reduce_sum(mask * x, axis=0) / float(self.rows)
        c.assign(decay * tf.convert_to_tensor(c) + scale * col_mean)
        return self.read(rows)

    def read(self, rows=None):
        """The current estimate (all rows, or ``rows.ids``), without updating."""
        if self.sketch:
            return self._estimate(self.row.query_shared(None if rows is None else rows.ids)[:, 0])
        r = tf_variable(self.row)
        return self._estimate(tf.convert_to_tensor(r) if rows is None else r.sparse_read(rows.ids))

    def _estimate(self, row_values):
        c = tf.convert_to_tensor(tf_variable(self.col))
        shape = c / tf.maximum(tf.reduce_mean(c), _TINY)
        return tf.maximum(row_values, 0.0)[:, None] * shape[None, :]
