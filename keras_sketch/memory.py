"""Optimizer-state memory report: what each variable's state costs."""

import numpy as np
import tensorflow as tf

from keras_sketch.factored import FACTORED, FACTORED_SKETCH
from keras_sketch.sketch import COUNT_MIN, COUNT_SKETCH, EXACT
from keras_sketch.tf_internals import variable_path

# How the report's state column names a compressed slot's kind.
_SHORT = {COUNT_SKETCH: "csketch", COUNT_MIN: "cmin", FACTORED: "fact", FACTORED_SKETCH: "fact, hashed rows"}


def _nbytes(shape, dtype):
    return int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)


def itemsize(dtype):
    """Bytes per element of a Keras dtype string or a ``tf.DType``."""
    return tf.as_dtype(dtype).size


def variable_row(var, var_plan, slots, params, exact_slot_count, counter=None):
    """One report row: the state of ``var`` (built from ``var_plan``, a
    ``keras_sketch.plan.VariablePlan``) against the exact optimizer's;
    ``counter``: ``catch_up``'s per-row step counter, counted as extra."""
    return state_row(
        var,
        {name: (slot.kind, slot.variables if hasattr(slot, "variables") else slot.table) for name, slot in slots.items()},
        "sketched" if var_plan.sketched else "exact",
        exact_slot_count,
        extra_bytes=(0 if params is None else _nbytes(params.shape, "int64"))
        + (0 if counter is None else _nbytes(counter.shape, counter.dtype)),
        hashed_axis=var_plan.hashed_axis,
        dropped=var_plan.dropped,
        path=var_plan.path,
        sparse_path=var_plan.sparse_path,
    )


def state_row(var, states, mode, exact_slot_count, extra_bytes=0, hashed_axis=None, dropped=(), path="",
              sparse_path=""):
    """One report row of any keras_sketch optimizer: ``states`` maps a slot
    name to ``(kind, state variable)`` or ``(kind, (variables...))`` (a
    factored slot's row and column vectors; the row shows their lengths
    joined by ``+``, a sketched row factor as ``depth x width``);
    ``extra_bytes`` counts state that is no slot (hash
    parameters); the exact optimizer keeps ``exact_slot_count`` variables of
    ``var``'s size."""
    states = {name: (kind, t if isinstance(t, tuple) else (t,)) for name, (kind, t) in states.items()}
    return {
        "variable": variable_path(var),
        "shape": tuple(int(s) for s in var.shape),
        "mode": mode,
        "hashed_axis": hashed_axis,
        "states": {
            name: (kind, tuple(int(s) for t in tables for s in t.shape)) for name, (kind, tables) in states.items()
        },
        "dropped": list(dropped),
        "path": path,
        "sparse_path": sparse_path,
        "state_bytes": sum(_nbytes(t.shape, t.dtype) for _, tables in states.values() for t in tables) + extra_bytes,
        "exact_optimizer_bytes": exact_slot_count * _nbytes(var.shape, var.dtype),
    }


class MemoryReport:
    """Rows (dicts) per variable plus totals; ``str()`` prints a table.

    ``state_budget`` is the optimizer's budget (a fraction of the exact
    optimizer's state bytes), or None.
    """

    def __init__(self, rows, state_budget=None):
        self.rows = list(rows)
        self.state_budget = state_budget

    @property
    def state_bytes(self):
        return sum(r["state_bytes"] for r in self.rows)

    @property
    def exact_optimizer_bytes(self):
        return sum(r["exact_optimizer_bytes"] for r in self.rows)

    @property
    def ratio(self):
        exact = self.exact_optimizer_bytes
        return self.state_bytes / exact if exact else 1.0

    def as_dict(self):
        return {
            "variables": self.rows,
            "state_bytes": self.state_bytes,
            "exact_optimizer_bytes": self.exact_optimizer_bytes,
            "ratio": self.ratio,
            "state_budget": self.state_budget,
        }

    def __str__(self):
        header = (
            f"{'variable':<36} {'shape':>14} {'mode':>8} {'state':>30} {'bytes':>12} "
            f"{'exact opt.':>12}  path"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            states = ", ".join(
                f"{name}:{_shape_text(kind, shape)}" + ("" if kind == EXACT else f"({_SHORT.get(kind, kind)})")
                for name, (kind, shape) in r["states"].items()
            )
            if r.get("dropped"):
                states += " (no " + ",".join(r["dropped"]) + ")"
            lines.append(
                f"{r['variable'][-36:]:<36} {'x'.join(map(str, r['shape'])) or 'scalar':>14} "
                f"{r['mode']:>8} {states:>30} {r['state_bytes']:>12,} {r['exact_optimizer_bytes']:>12,}  "
                f"{r.get('path', '')}"
            )
        lines.append("-" * len(header))
        budget = "" if self.state_budget is None else f"; budget {self.state_budget:g}"
        lines.append(
            f"{'total':<36} {'':>14} {'':>8} {'':>30} {self.state_bytes:>12,} "
            f"{self.exact_optimizer_bytes:>12,}  ({self.ratio:.2%} of the exact optimizer{budget})"
        )
        return "\n".join(lines)

    __repr__ = __str__


def _shape_text(kind, shape):
    if kind == FACTORED:  # R [rows] + C [dim]
        return "+".join(map(str, shape))
    if kind == FACTORED_SKETCH:  # R's table [depth, width, 1] + C [dim]
        return f"{shape[0]}x{shape[1]}+{shape[3]}"
    return "x".join(map(str, shape))


def keras_state_bytes(optimizer):
    """State bytes of any built Keras optimizer (its variables but the counters)."""
    total = 0
    for v in optimizer.variables:
        if variable_path(v).endswith(("iteration", "learning_rate")):
            continue
        total += _nbytes(v.shape, v.dtype)
    return total
