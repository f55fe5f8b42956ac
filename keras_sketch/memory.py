"""Optimizer-state memory report: what each variable's state costs."""

import numpy as np


def _nbytes(shape, dtype):
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(str(dtype)).itemsize


def variable_row(var, layout, slots, params, exact_slot_count):
    """One report row: the state of ``var`` against the exact optimizer's."""
    states = {name: (slot.kind, tuple(int(s) for s in slot.table.shape)) for name, slot in slots.items()}
    state_bytes = sum(_nbytes(slot.table.shape, slot.table.dtype) for slot in slots.values())
    if params is not None:
        state_bytes += _nbytes(params.shape, "int64")
    sketched = any(slot.kind != "exact" and not slot.identity for slot in slots.values())
    return {
        "variable": var.path,
        "shape": tuple(int(s) for s in var.shape),
        "mode": "sketched" if sketched else "exact",
        "hashed_axis": ("last" if layout.transpose else "first") if sketched else None,
        "states": states,
        "state_bytes": state_bytes,
        "exact_optimizer_bytes": exact_slot_count * _nbytes(var.shape, var.dtype),
    }


class MemoryReport:
    """Rows (dicts) per variable plus totals; ``str()`` prints a table."""

    def __init__(self, rows):
        self.rows = list(rows)

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
        }

    def __str__(self):
        header = f"{'variable':<40} {'shape':>16} {'mode':>8} {'state':>28} {'bytes':>12} {'exact opt.':>12}"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            states = ", ".join(
                f"{name}:{'x'.join(map(str, shape))}" + ("" if kind == "exact" else f"({kind.replace('count_', 'c')})")
                for name, (kind, shape) in r["states"].items()
            )
            lines.append(
                f"{r['variable'][-40:]:<40} {'x'.join(map(str, r['shape'])) or 'scalar':>16} "
                f"{r['mode']:>8} {states:>28} {r['state_bytes']:>12,} {r['exact_optimizer_bytes']:>12,}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<40} {'':>16} {'':>8} {'':>28} {self.state_bytes:>12,} "
            f"{self.exact_optimizer_bytes:>12,}  ({self.ratio:.1%} of the exact optimizer)"
        )
        return "\n".join(lines)

    __repr__ = __str__


def keras_state_bytes(optimizer):
    """State bytes of any built Keras optimizer (its variables but the counters)."""
    total = 0
    for v in optimizer.variables:
        if v.path.endswith("iteration") or v.path.endswith("learning_rate"):
            continue
        total += _nbytes(v.shape, v.dtype)
    return total
