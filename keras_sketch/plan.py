"""The plan of one variable's optimizer state, made once at ``build``.

A ``VariablePlan`` says how the state of one model variable is kept (its 2-D
layout, which slots are exact or sketched and their table shapes, which
slots were dropped) and which path its steps take (fused C++ op or pure
TensorFlow; sparse rows or densified).  ``SketchOptimizer.build`` asks this
module for every variable's plan and builds exactly what it says; the step
reads the plan; ``memory_report()`` prints it.  Nothing else decides.

Two planners:

* ``rule_plan``: the explicit settings (``depth``, ``compression`` or
  ``width``, ``min_rows``, ``hash_axis``), variable by variable.
* ``budget_plans``: ``state_budget=b``.  The state of the whole optimizer
  may use at most ``b`` times the state bytes of its exact counterpart
  (Keras's optimizer).  The rules, from the measurements in
  docs/state_budget.md:

  1. ``b == 1``: everything exact (lossless).
  2. ``b < 1``: first drop the optimizer's droppable slots (Adam's 1st
     moment: keeping the 2nd moment exact and dropping the 1st cost 0.6%
     perplexity on a Transformer LM and nothing on an LSTM LM and a
     recommender, while sketching the 1st moment cost up to 3.7x).  If the
     remaining slots fit in exact form, keep them exact.
  3. Otherwise scalars and vectors stay exact, and every matrix's
     non-negative slots (2nd moments, accumulators) are kept in rank-1
     factored form (``keras_sketch.factored``: ``rows + dim`` numbers,
     Adafactor's estimate).  At ``state_budget=0.02`` on a WikiText-2 LSTM
     LM it gave 0.72x Adam's test perplexity at Adam's learning rate where
     count-min sketches of the same budget gave 0.98x, on a Transformer LM
     0.97x against count-min's 1.10x (the step damping of its overestimate),
     on a Zipf recommender 1.00x RMSE against 1.11x (docs/state_budget.md;
     docs/approximation.md found it far more accurate at equal memory).  Its
     size does not grow with the budget: a plan that fits factored uses
     less than the budget, and a larger budget buys nothing more (the study
     found nothing that would spend it better).  Signed slots (momenta of
     CSRMSprop/CSMomentum) are count-sketches along the matrix's longer axis
     (``hash_axis="auto"``: the vocabulary of an embedding, the class axis
     of a softmax kernel) at one common compression, the largest that fits.
  4. If the factored forms do not all fit, matrices stay factored and
     every *long vector* -- a vector variable (a bias), a ``[rows, 1]``
     matrix, or a matrix's long factor (the vocabulary-long row factor of an
     embedding or of a softmax kernel, whose layout is then transposed) --
     longer than a common width ``W`` is hashed into ``W`` buckets of one
     number (``FACTORED_SKETCH``, keras_sketch/factored.py; a vector is its
     ``dim = 1`` case), read as the bucket's value shared by the rows hashed
     there; shorter vectors and the short factors stay exact.  ``W`` is the
     largest that fits, so the budget is spent to within one bucket per
     hashed vector.  At ``state_budget=0.005`` (where the factored forms need
     0.0075-0.008 of Adam's state on the LMs, 0.015 on the recommender) it
     gave 0.69x Adam's test perplexity on the WikiText-2 LSTM LM, 0.88x on
     the Transformer LM and 0.98x RMSE on the Zipf recommender, at Adam's
     learning rate, where count-min sketches of every matrix (this rule
     before) gave 1.31x, 1.23x and 1.13x; reading the buckets as count-min
     upper bounds instead of shares gave 0.74x, 0.93x and 1.06x (the upper
     bound damps the steps of rare rows sharing a bucket with frequent
     ones).  Optimizers with signed slots (momenta of CSRMSprop/CSMomentum)
     skip this rule.  ``depth`` does not apply: the hashed vectors have
     depth 1.
  5. Else every matrix's non-negative slots are count-min sketches along its
     longer axis, at the largest common compression that fits (signed slots
     count-sketches).  (The alternative, count-min only for the matrices
     with the largest factored forms and factored for the rest, measured
     worse at ``state_budget=0.005`` on both LMs: 1.42x and 1.26x Adam's
     perplexity against 1.31x and 1.23x; ``estimator="mixed"`` keeps it for
     studies.)  ``[rows, 1]`` matrices are never factored under rule 3
     (that is not smaller than exact): count-min or exact.
  6. A budget below what the smallest of these plans needs (rule 4 or 5 at
     one bucket) raises ``ValueError`` naming the smallest feasible budget.

The factored state has no fused-op kernel: its variables step in pure
TensorFlow (``memory_report()`` says so per variable).
"""

import dataclasses
import math

import numpy as np

from keras_sketch.factored import FACTORED, FACTORED_SKETCH
from keras_sketch.sketch import COUNT_MIN, COUNT_SKETCH, EXACT, sketch_width
from keras_sketch.state import Layout

HASH_PARAM_BYTES = 4 * 8  # one int64 (a, b, c, d) row per depth
MIXED = "mixed"  # factored, count-min only for the largest factored forms when needed (rule 5's alternative)
ESTIMATORS = ("auto", COUNT_MIN, FACTORED, FACTORED_SKETCH, MIXED)


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    name: str
    kind: str  # EXACT, COUNT_SKETCH, COUNT_MIN, FACTORED or FACTORED_SKETCH
    initial: float
    # [rows, dim] exact and factored, [depth, width, dim] sketched; FACTORED_SKETCH:
    # [depth, width, dim] (a [depth, width, 1] count-min table of R and a [dim] C)
    shape: tuple

    @property
    def sketched(self):
        """Whether the slot holds a hashed table (with hash parameters)."""
        return self.kind in (COUNT_SKETCH, COUNT_MIN, FACTORED_SKETCH)

    def nbytes(self, itemsize):
        if self.kind == FACTORED:  # a [rows] and a [dim] vector
            return (self.shape[0] + self.shape[1]) * itemsize
        if self.kind == FACTORED_SKETCH:  # a [depth, width] table and a [dim] vector
            return (self.shape[0] * self.shape[1] + self.shape[2]) * itemsize
        return int(np.prod(self.shape)) * itemsize


@dataclasses.dataclass(frozen=True)
class VariablePlan:
    """How one variable's state is kept and updated (see the module doc)."""

    layout: Layout
    slots: tuple  # of SlotPlan, in the order the update math declares them
    depth: int = 1
    width: int = 0  # sketch width; 0 when nothing is sketched
    dropped: tuple = ()  # names of slots the plan does not keep
    fused: bool = False
    fused_reason: str = ""

    @property
    def hashed(self):
        """Whether some slot is a sketch table (with hash parameters)."""
        return any(s.sketched for s in self.slots)

    @property
    def sketched(self):
        """Whether some state is compressed (a sketch narrower than the rows,
        or a factored slot)."""
        factored = any(s.kind in (FACTORED, FACTORED_SKETCH) for s in self.slots)
        return factored or (self.hashed and self.width < self.layout.rows)

    @property
    def hashed_axis(self):
        if not self.sketched:
            return None
        return "last" if self.layout.transpose else "first"

    @property
    def sparse_path(self):
        """What a ``tf.IndexedSlices`` gradient does on this variable."""
        if self.layout.sparse_rows:
            return "sparse rows"
        return "densified (the sketch hashes the last axis)"

    @property
    def compressed_kinds(self):
        return sorted({s.kind for s in self.slots if s.kind != EXACT})

    @property
    def path(self):
        """One line for reports: the step's path and, when TF, why."""
        if self.fused:
            return "fused op"
        return f"TF ({self.fused_reason})" if self.fused_reason else "TF"

    def state_bytes(self, itemsize):
        total = sum(s.nbytes(itemsize) for s in self.slots)
        return total + (self.depth * HASH_PARAM_BYTES if self.hashed else 0)


def _slot_plans(layout, kinds, sketched, depth, width, force_sketch=False, factor=False):
    """Slots of one variable: exact ``[rows, dim]``, or ``[depth, width, dim]``
    sketches for the slots the optimizer declares sketched (with
    ``force_sketch``, every slot: signed ones in a count-sketch; with
    ``factor``, non-negative slots in factored form instead of count-min)."""
    plans = []
    for name, (kind, initial) in kinds.items():
        if force_sketch and kind == EXACT:
            kind = COUNT_SKETCH
        if factor and kind == COUNT_MIN:
            plans.append(SlotPlan(name, FACTORED, float(initial), (layout.rows, layout.dim)))
            continue
        if sketched and kind != EXACT:
            plans.append(SlotPlan(name, kind, float(initial), (depth, width, layout.dim)))
        else:
            plans.append(SlotPlan(name, EXACT, float(initial), (layout.rows, layout.dim)))
    return tuple(plans)


def _exact_plan(shape, kinds, dropped=()):
    layout = Layout(shape)
    return VariablePlan(layout, _slot_plans(layout, kinds, False, 1, 0), dropped=tuple(dropped))


def rule_plan(shape, kinds, depth, compression, width, min_rows, hash_axis):
    """The plan the explicit sketch settings give one variable."""
    layout = Layout(shape)
    if len(layout.shape) < 2 or all(kind == EXACT for kind, _ in kinds.values()):
        return _exact_plan(shape, kinds)
    transpose = hash_axis == "last" or (hash_axis == "auto" and layout.dim > layout.rows)
    hashed = Layout(shape, transpose=True) if transpose else layout
    if hashed.rows < max(min_rows, 1):
        return _exact_plan(shape, kinds)  # the untransposed view: sparse rows stay sparse
    w = width or sketch_width(hashed.rows, depth, compression)
    if w >= hashed.rows:
        depth, w = 1, hashed.rows  # the identity map: lossless, kept in sketch form
    return VariablePlan(hashed, _slot_plans(hashed, kinds, True, depth, w), depth=depth, width=w)


def budget_plans(shapes, itemsizes, kinds, droppable, exact_slot_count, budget, depth, estimator="auto"):
    """Plans for all variables under ``state_budget=budget`` (module doc).

    ``shapes``/``itemsizes`` list the model variables; ``kinds`` is the
    optimizer's ``{slot: (kind, initial)}``; ``droppable`` the slot names the
    optimizer can run without; ``estimator`` the 2nd-moment form of
    compressed matrices: ``"auto"`` (rules 3-5), or, for studies
    (benchmarks/budget_study.py), ``"count_min"`` or ``"factored"``
    everywhere, ``"factored_sketch"`` (rule 4 whatever the budget), or
    ``"mixed"`` (count-min only for the matrices with the largest factored
    forms, as few as needed).  Returns the
    plans; raises ``ValueError`` when the budget cannot be met.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    exact_bytes = sum(exact_slot_count * _numel(s) * i for s, i in zip(shapes, itemsizes))
    allowed = budget * exact_bytes
    if budget >= 1.0 or not kinds:  # lossless, or no state at all (SGD without momentum)
        return [_exact_plan(s, kinds) for s in shapes]
    dropped = tuple(n for n in kinds if n in droppable)
    kept = {n: k for n, k in kinds.items() if n not in dropped}
    if not kept:
        raise ValueError("The optimizer would keep no state at all under `state_budget`.")
    plans = [_exact_plan(s, kept, dropped) for s in shapes]
    if sum(p.state_bytes(i) for p, i in zip(plans, itemsizes)) <= allowed:
        return plans

    matrices = [i for i, s in enumerate(shapes) if len(s) >= 2]

    def factored_plan(i):
        """Non-negative slots factored (signed ones still sketched), or None
        where that is not smaller than exact (a ``[rows, 1]`` matrix)."""
        if _numel(shapes[i]) == Layout(shapes[i]).rows:
            return None
        if all(kind == COUNT_MIN for kind, _ in kept.values()):  # nothing hashed
            flat = Layout(shapes[i])
            return VariablePlan(flat, _slot_plans(flat, kept, False, 1, 0, factor=True), dropped=dropped)
        return "with sketches"

    def plans_at(compression, factored):
        """Plans at one common compression; matrices in ``factored`` factored."""
        out = list(plans)
        for i in matrices:
            exact = plans[i].state_bytes(itemsizes[i])
            layout = Layout(shapes[i], transpose=_longer_is_last(shapes[i]))
            w = min(max(1, int(compression * layout.rows / depth)), layout.rows)
            candidate = factored_plan(i) if i in factored else None
            if candidate == "with sketches":
                slots = _slot_plans(layout, kept, True, depth, w, force_sketch=True, factor=True)
                candidate = VariablePlan(layout, slots, depth=depth, width=w, dropped=dropped)
            if candidate is None or candidate.state_bytes(itemsizes[i]) >= exact:
                slots = _slot_plans(layout, kept, True, depth, w, force_sketch=True)
                candidate = VariablePlan(layout, slots, depth=depth, width=w, dropped=dropped)
            if candidate.state_bytes(itemsizes[i]) < exact:
                out[i] = candidate  # else it costs more than the exact slot
        return out

    def cost(candidate):
        return sum(p.state_bytes(i) for p, i in zip(candidate, itemsizes))

    signed = any(kind != COUNT_MIN for kind, _ in kept.values())

    def sketched_factored(width):
        """Rule 4's plans: matrices factored, and every vector (a vector
        variable, a ``[rows, 1]`` matrix or a matrix's long factor) longer
        than ``width`` hashed into ``width`` buckets (``FACTORED_SKETCH``,
        depth 1; a vector is its ``dim = 1`` case); the short factor exact."""
        out = list(plans)
        for i, shape in enumerate(shapes):
            layout = Layout(shape, transpose=len(shape) >= 2 and _longer_is_last(shape))
            if layout.rows <= width or _numel(shape) == 1:
                if len(shape) >= 2 and _numel(shape) > layout.rows:
                    out[i] = factored_plan(i)  # rule 3's form: R and C exact
                continue
            slots = tuple(SlotPlan(n, FACTORED_SKETCH, float(init), (1, width, layout.dim))
                          for n, (_, init) in kept.items())
            out[i] = VariablePlan(layout, slots, depth=1, width=width, dropped=dropped)
        return out

    def infeasible(smallest):
        fraction = cost(smallest) / exact_bytes
        scale = 10.0 ** (3 - math.floor(math.log10(fraction)))  # rounded up to 4 significant digits
        feasible = float(f"{math.ceil(fraction * scale) / scale:.4g}")
        return ValueError(
            f"`state_budget={budget}` cannot be met: even one-bucket sketches and exact state for the rest "
            f"take {cost(smallest):,} bytes, {cost(smallest) / exact_bytes:.4g} of the exact "
            f"optimizer's {exact_bytes:,}. The smallest feasible budget is {feasible}."
        )

    def fitted_sketched_factored():
        """Rule 4 at the largest common width that fits."""
        low, high = 1, max(Layout(s, transpose=len(s) >= 2 and _longer_is_last(s)).rows for s in shapes)
        while low < high:  # the largest width whose plans fit (cost grows with the width)
            mid = (low + high + 1) // 2
            if cost(sketched_factored(mid)) <= allowed:
                low = mid
            else:
                high = mid - 1
        return sketched_factored(low)

    # Which plan: rules 3-6.
    if estimator == FACTORED_SKETCH:
        if signed:
            raise ValueError(f"`estimator={FACTORED_SKETCH!r}` needs non-negative slots only.")
        if cost(sketched_factored(1)) > allowed:
            raise infeasible(sketched_factored(1))
        return fitted_sketched_factored()
    if estimator == COUNT_MIN:
        factor = frozenset()
    elif estimator == FACTORED:
        factor = frozenset(matrices)
    elif estimator == "auto":  # rules 3-6
        if cost(plans_at(0.0, frozenset(matrices))) <= allowed:
            factor = frozenset(matrices)  # rule 3
        elif not signed and cost(sketched_factored(1)) <= allowed:
            return fitted_sketched_factored()  # rule 4
        else:
            factor = frozenset()  # rule 5 (rule 6 below if even that does not fit)
    else:  # mixed: count-min for as few of the matrices with the largest factored forms as needed
        by_size = sorted(matrices, key=lambda i: -(Layout(shapes[i]).rows + Layout(shapes[i]).dim))
        for k in range(len(by_size) + 1):
            factor = frozenset(by_size[k:])
            if cost(plans_at(0.0, factor)) <= allowed:
                break
    smallest = plans_at(0.0, factor)
    if cost(smallest) > allowed:
        if estimator == "auto" and not signed and cost(sketched_factored(1)) < cost(smallest):
            smallest = sketched_factored(1)
        raise infeasible(smallest)
    if not any(p.hashed for p in smallest):
        return smallest  # nothing is hashed: no width to choose
    low, high = 0.0, 1.0
    for _ in range(60):  # the largest common compression that fits
        mid = 0.5 * (low + high)
        if cost(plans_at(mid, factor)) <= allowed:
            low = mid
        else:
            high = mid
    return plans_at(low, factor)


def _numel(shape):
    return int(np.prod(shape, dtype=np.int64))


def _longer_is_last(shape):
    layout = Layout(shape)
    return layout.dim > layout.rows


__all__ = ["COUNT_MIN", "COUNT_SKETCH", "EXACT", "SlotPlan", "VariablePlan", "budget_plans", "rule_plan"]
