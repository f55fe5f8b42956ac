"""An independent NumPy reference of the paper's Algorithms 1-4 (and Lion).

Written from the paper (count-sketch tensor, UPDATE/QUERY, Algorithms 2-4),
not from the TensorFlow code: plain loops over depth, ``np.add.at`` for bucket
updates, ``np.median``/``np.min`` for queries, Python integers for hashing.
Only the hash *formula* and the update conventions are shared with the
package, because they are its documented contract:

* ``h_j(i) = ((a_j i + b_j) mod P) mod w``, ``s_j(i) = 1 - 2 (((c_j i + d_j)
  mod P) mod 2)``, ``P = 2^31 - 1``; identity when ``w >= rows``.
* a dense step decays the whole auxiliary variable (``X <- decay X + scale x``);
  a sparse step updates only the touched rows with the per-row delta
  ``(decay - 1) X_prev + scale x`` (all rows of a batch query first, then
  update, then query again).
* Keras's epsilon convention (``m_hat / (sqrt(v_hat) + eps)`` for Adam,
  ``g / sqrt(v + eps)`` for Adagrad and RMSprop).
* Lion's direction reads its momentum before the step updates it.
"""

import numpy as np

P = 2**31 - 1


class NpSketch:
    def __init__(self, params, rows, width, dim, kind, init=0.0, exact=False):
        self.rows, self.dim, self.kind = rows, dim, kind
        self.exact = exact or width >= rows
        if self.exact:
            self.table = np.full((1, rows, dim), init, np.float64)
        else:
            self.params = [tuple(int(x) for x in row) for row in np.asarray(params)]
            self.table = np.full((len(self.params), width, dim), init, np.float64)
        self.width = self.table.shape[1]

    def bucket(self, j, i):
        if self.exact:
            return i
        a, b, _, _ = self.params[j]
        return ((a * (i % P) + b) % P) % self.width

    def sign(self, j, i):
        if self.exact or self.kind == "count_min":
            return 1.0
        _, _, c, d = self.params[j]
        return 1.0 - 2.0 * (((c * (i % P) + d) % P) % 2)

    def query(self, ids):
        out = np.empty((len(ids), self.dim))
        for n, i in enumerate(ids):
            est = [self.sign(j, i) * self.table[j, self.bucket(j, i)] for j in range(len(self.table))]
            if self.kind == "count_min":
                out[n] = np.maximum(np.min(est, axis=0), 0.0)
            else:
                out[n] = np.median(est, axis=0)
        return out

    def update(self, ids, delta):
        for j in range(len(self.table)):
            b = [self.bucket(j, i) for i in ids]
            s = np.array([self.sign(j, i) for i in ids])[:, None]
            np.add.at(self.table[j], b, s * delta)

    def accumulate(self, x, decay, scale, ids=None):
        """X <- decay X + scale x; returns the queried new values."""
        if ids is None:
            ids = list(range(self.rows))
            self.table *= decay
            self.update(ids, scale * x)
            return self.query(ids)
        prev = self.query(ids)
        self.update(ids, (decay - 1.0) * prev + scale * x)
        return self.query(ids)

    def running_max(self, source, ids=None):
        """H <- max(H, S) bucket by bucket (``source`` has the same hashing),
        at the buckets of ``ids`` (every row's when None); returns the query."""
        ids = list(range(self.rows)) if ids is None else list(ids)
        for j in range(len(self.table)):
            b = [self.bucket(j, i) for i in ids]
            self.table[j, b] = np.maximum(self.table[j, b], source.table[j, b])
        return self.query(ids)


def merge(indices, values):
    """Sum the values of repeated indices (ascending unique ids)."""
    ids = sorted(set(int(i) for i in indices))
    pos = {i: n for n, i in enumerate(ids)}
    out = np.zeros((len(ids),) + values.shape[1:])
    for i, v in zip(indices, values):
        out[pos[int(i)]] += v
    return ids, out


class RefOptimizer:
    """Applies one algorithm to a 2-D float64 parameter ``x`` ``[rows, dim]``."""

    def __init__(self, algorithm, x, params, width, hp, sketch_m=True):
        self.alg, self.x, self.hp, self.t = algorithm, np.array(x, np.float64), hp, 0
        rows, dim = self.x.shape
        kind_m = "count_sketch" if sketch_m else "exact"
        exact_m = not sketch_m
        if algorithm == "adam":
            self.m = NpSketch(params, rows, width, dim, kind_m, exact=exact_m) if hp["beta_1"] > 0 else None
            self.v = NpSketch(params, rows, width, dim, "count_min")
            self.vhat = NpSketch(params, rows, width, dim, "count_min") if hp.get("amsgrad") else None
        elif algorithm == "adagrad":
            self.v = NpSketch(params, rows, width, dim, "count_min", init=hp["initial_accumulator_value"])
        elif algorithm == "momentum":
            self.m = NpSketch(params, rows, width, dim, "count_sketch")
        elif algorithm == "rmsprop":
            self.v = NpSketch(params, rows, width, dim, "count_min")
            self.m = NpSketch(params, rows, width, dim, kind_m, exact=exact_m) if hp.get("momentum", 0) > 0 else None
            self.mg = NpSketch(params, rows, width, dim, kind_m, exact=exact_m) if hp.get("centered") else None
        elif algorithm == "lion":
            self.m = NpSketch(params, rows, width, dim, "count_sketch")

    def step(self, g, indices=None):
        """Dense ``g [rows, dim]``; or sparse rows ``indices`` with values ``g``."""
        self.t += 1
        hp, t = self.hp, self.t
        ids = None
        if indices is not None:
            ids, g = merge(indices, np.asarray(g, np.float64))
        g = np.asarray(g, np.float64)
        lr = hp["learning_rate"]
        if self.alg == "adam":
            b1, b2 = hp["beta_1"], hp["beta_2"]
            m = self.m.accumulate(g, b1, 1 - b1, ids) if self.m is not None else g
            v = self.v.accumulate(g * g, b2, 1 - b2, ids)
            if self.vhat is not None:  # AMSGrad: the running maximum of v
                v = self.vhat.running_max(self.v, ids)
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            # Keras puts epsilon outside the bias correction of v:
            # lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps) == lr * m_hat/(sqrt(v_hat) + eps/sqrt(1-b2^t)).
            update = lr * m_hat / (np.sqrt(v_hat) + hp["epsilon"] / np.sqrt(1 - b2**t))
        elif self.alg == "adagrad":
            v = self.v.accumulate(g * g, 1.0, 1.0, ids)
            update = lr * g / np.sqrt(v + hp["epsilon"])
        elif self.alg == "momentum":
            mu = hp["momentum"]
            m = self.m.accumulate(g, mu, 1.0, ids)
            update = lr * (g + mu * m if hp.get("nesterov") else m)
        elif self.alg == "rmsprop":
            rho = hp["rho"]
            v = self.v.accumulate(g * g, rho, 1 - rho, ids)
            if self.mg is not None:  # centered: the variance around the mean gradient
                v = np.maximum(v - self.mg.accumulate(g, rho, 1 - rho, ids) ** 2, 0.0)
            update = lr * g / np.sqrt(v + hp["epsilon"])
            if self.m is not None:
                update = self.m.accumulate(update, hp["momentum"], 1.0, ids)
        elif self.alg == "lion":
            # Lion (Chen et al. 2023, Program 1): the direction interpolates the
            # momentum *before* this step's update; then the momentum is updated.
            b1, b2 = hp["beta_1"], hp["beta_2"]
            previous = self.m.query(list(range(len(self.x))) if ids is None else ids)
            update = lr * np.sign(b1 * previous + (1 - b1) * g)
            self.m.accumulate(g, b2, 1 - b2, ids)
        if ids is None:
            self.x -= update
        else:
            self.x[ids] -= update
        return self.x


def all_rows_in_parts(rng, g):
    """A sparse form ``(ids, values)`` of the dense gradient ``g [rows, dim]``
    that touches every row: rows in shuffled order, every 7th row split in two
    parts (0.75 and 0.25 of it), so the merged sparse gradient equals ``g``."""
    rows = g.shape[0]
    perm, split = rng.permutation(rows), np.arange(0, rows, 7)
    ids = np.concatenate([perm, split])
    parts = g[ids].copy()
    parts[rows:] *= 0.25
    parts[np.argsort(perm)[split]] *= 0.75
    return ids, parts
