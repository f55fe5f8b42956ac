"""Fuzz test of the raw fused ops (KerasSketchDenseApply / KerasSketchSparseApply).

Thousands of random calls, most of them malformed (wrong variable or slot
dtypes, shapes, ids, attributes, hash seeds, sizes that overflow), run in a
subprocess so that a crash (abort, segfault) fails the test instead of
killing pytest.  Every call must either

* raise a clean error (``InvalidArgumentError`` and the other clean
  ``tf.errors`` below, or ``TypeError``/``ValueError`` from the op wrapper)
  and leave every variable exactly as it was, or
* succeed, on a valid call, with the result of ``reference_step`` below: a
  NumPy (float32) computation of the op's documented math
  (custom_ops/sketch_math.h; the pure-TF path's math, which
  tests/test_fused_op.py compares with the op through the optimizers).

Cases are generated from ``(SEED, index)``, so a failing case can be rebuilt
and printed by ``describe``.  The worker writes the index of the case it is
about to run to a progress file: a crash names its case.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = 2**31 - 1
INT64_MAX = 2**63 - 1
SEED = 20261201
CASES = int(os.environ.get("KERAS_SKETCH_FUZZ_CASES", "2000"))
OPTIMIZERS = ("adam", "adagrad", "momentum", "rmsprop")
BAD_DTYPES = ("float64", "int32", "float16", "bfloat16", "int64")
FIRST, SECOND = "first_moment", "second_moment"

# What each optimizer's slots may be, by role (processing order: the 2nd
# moment first, since RMSprop's momentum reads its new estimate).
SLOT_SETS = {
    "adam": [(FIRST, SECOND), (SECOND,)],
    "adagrad": [(SECOND,)],
    "momentum": [(FIRST,)],
    "rmsprop": [(SECOND,), (SECOND, FIRST)],
}

# Malformations; each one makes the call invalid by construction, except
# those in MAYBE_VALID whose validity the generator decides itself.
MUTATIONS = (
    "var_dtype", "slot_dtype", "var_elements", "exact_slot_shape", "sketch_depth",
    "sketch_dim", "sketch_rank", "sketch_width_zero", "widths_differ", "wide_sketch",
    "hash_shape", "hash_value", "hash_dtype", "grad_rank", "grad_dim", "grad_dtype",
    "dense_grad_rows", "coefs_size", "coefs_dtype", "rows_attr", "rows_overflow",
    "id_out_of_range", "duplicate_ids", "ids_length", "valid_length", "ids_dtype",
    "kinds_count", "too_many_slots", "optimizer_attr", "kind_attr", "rmsprop_exact_v",
    "same_variable", "missing_variable", "not_a_variable", "no_slots",
    "padding_out_of_range", "var_reshaped", "nan_grad", "role_attr",
)
MAYBE_VALID = {"padding_out_of_range", "var_reshaped", "nan_grad"}


# --- the reference -------------------------------------------------------------
def _locate(hashes, ids, width, rows):
    """Buckets and signs [depth, k] (identity map when width >= rows)."""
    ids = np.asarray(ids, np.int64)
    if width >= rows:
        return ids[None, :], np.ones((1, len(ids)), np.float32)
    x = ids % P
    a, b, c, d = (hashes[:, i : i + 1].astype(np.int64) for i in range(4))
    buckets = ((a * x + b) % P) % width
    signs = (1 - 2 * (((c * x + d) % P) % 2)).astype(np.float32)
    return buckets, signs


def _query(table, kind, buckets, signs, signed):
    depth = len(buckets)
    vals = np.stack([table[j, buckets[j]] * (signs[j][:, None] if signed else np.float32(1))
                     for j in range(depth)])
    if kind == "count_min":
        return np.maximum(vals.min(axis=0), np.float32(0))
    if depth == 1:
        return vals[0]
    vals = np.sort(vals, axis=0)
    mid = depth // 2
    return vals[mid] if depth % 2 else np.float32(0.5) * (vals[mid - 1] + vals[mid])


def reference_step(opt, roles, kinds, nesterov, param, slots, hashes, coefs, grad, ids, valid):
    """One op call in NumPy float32.  ``param`` is the [rows, dim] view,
    ``ids``/``valid`` None for a dense step.  Returns (param, slots)."""
    f32 = np.float32
    param = param.copy()
    slots = [s.copy() for s in slots]
    rows, dim = param.shape
    c = coefs.astype(f32)
    if ids is None:
        used = np.arange(rows)
        g = grad
    else:
        keep = np.asarray(valid, bool)
        used, g = np.asarray(ids)[keep], grad[keep]
    if rows == 0 or dim == 0 or len(used) == 0:
        return param, slots
    sketched = [s for s, k in zip(slots, kinds) if k != "exact"]
    width = sketched[0].shape[1] if sketched else rows
    buckets, signs = _locate(hashes, used, width, rows)
    identity = width >= rows
    est = {}
    order = sorted(range(len(roles)), key=lambda s: roles[s] != SECOND)  # 2nd moment first
    for s in order:
        role, kind, table = roles[s], kinds[s], slots[s]
        decay, scale, dm1 = c[2 + 3 * s], c[3 + 3 * s], c[4 + 3 * s]
        if role == SECOND:
            x = g * g
        elif opt == "rmsprop":
            x = (c[0] * g) / np.sqrt(est[SECOND] + c[1])
        else:
            x = g
        x = scale * x
        signed = kind == "count_sketch" and not identity
        if kind == "exact":
            if ids is None:
                table[:] = table * decay + x
            else:
                table[used] = table[used] + (dm1 * table[used] + x)
            est[role] = table[used]
            continue
        if ids is None:
            table *= decay
            add = x
        else:
            add = dm1 * _query(table, kind, buckets, signs, signed) + x
        for j in range(len(buckets)):
            np.add.at(table[j], buckets[j], add * (signs[j][:, None] if signed else f32(1)))
        est[role] = _query(table, kind, buckets, signs, signed)
    m, v = est.get(FIRST), est.get(SECOND)
    if opt == "adam":
        delta = (c[0] * (m if m is not None else g)) / (np.sqrt(v) + c[1])
    elif opt == "adagrad":
        delta = (c[0] * g) / np.sqrt(v + c[1])
    elif opt == "momentum":
        delta = c[0] * (g + c[1] * m) if nesterov else c[0] * m
    else:
        delta = m if m is not None else (c[0] * g) / np.sqrt(v + c[1])
    param[used] -= delta
    return param, slots


# --- the cases -------------------------------------------------------------------
def make_case(index, seed=SEED):
    """A random call: a valid one, then 0-2 malformations (module doc)."""
    rng = np.random.default_rng([seed, index])
    f32 = np.float32
    opt = str(rng.choice(OPTIMIZERS))
    roles = list(SLOT_SETS[opt][int(rng.integers(len(SLOT_SETS[opt])))])
    rng.shuffle(roles)  # the op is told the roles: any order must work
    if POSITIONAL:
        roles.sort(key=lambda r: (r == FIRST) == (opt == "rmsprop"))
    rows = int(rng.choice([0, 1, 2, 3, 5, 8, 13, 24, 40, 64]))
    dim = int(rng.choice([0, 1, 2, 3, 4, 7, 8, 16, 33]))
    depth = int(rng.integers(1, 9))
    width = int(rng.integers(1, max(rows, 1) + 1))
    if width >= rows:
        depth, width = 1, max(rows, 1)
    kinds = []
    for role in roles:
        options = ["exact", "count_min"] if role == SECOND else ["exact", "count_sketch", "count_min"]
        kinds.append(str(rng.choice(options)))
    if opt == "rmsprop" and len(roles) == 2:
        v = roles.index(SECOND)
        if kinds[v] == "exact":
            kinds[1 - v] = "exact"  # a sketched momentum needs a sketched 2nd moment
    if rows == 0:
        kinds = ["exact"] * len(roles)
    slots = []
    for role, kind in zip(roles, kinds):
        shape = (rows, dim) if kind == "exact" else (depth, width, dim)
        values = rng.normal(size=shape).astype(f32)
        slots.append(np.abs(values) if role == SECOND else values)
    coefs = [rng.uniform(0.001, 0.1), rng.uniform(1e-7, 0.5) if opt == "momentum" else rng.uniform(1e-7, 1e-2)]
    for _ in roles:
        decay = rng.choice([1.0, rng.uniform(0.0, 1.0)])
        coefs += [decay, rng.uniform(0.01, 1.0), f32(decay) - f32(1.0)]
    sparse = bool(rng.random() < 0.5)
    case = dict(
        index=index, opt=opt, roles=roles, kinds=kinds, rows=rows, dim=dim, sparse=sparse,
        nesterov=bool(rng.random() < 0.5), var_shape=(rows, dim), var_dtype="float32",
        param=rng.normal(size=(rows, dim)).astype(f32), slots=slots, slot_dtypes=["float32"] * len(roles),
        hashes=np.stack([rng.integers(1, P, depth), rng.integers(0, P, depth),
                         rng.integers(1, P, depth), rng.integers(0, P, depth)], axis=1).astype(np.int64),
        hash_dtype="int64", coefs=np.asarray(coefs, f32), coefs_dtype="float32", grad_dtype="float32",
        rows_attr=rows, kinds_attr=list(kinds), roles_attr=list(roles), opt_attr=opt,
        hold_reads=bool(rng.random() < 0.5), alias=None, missing=None, ids_dtype="int64",
        mutations=[], expect="ok",
    )
    if sparse:
        k = int(rng.integers(0, 2 * rows + 3))
        valid = rng.random(k) < 0.7
        n_valid = min(int(valid.sum()), rows)
        valid[np.nonzero(valid)[0][n_valid:]] = False
        ids = rng.integers(0, max(rows, 1), size=k)
        ids[valid] = rng.choice(rows, size=n_valid, replace=False) if n_valid else ids[valid]
        case.update(ids=ids.astype(np.int64), valid=valid,
                    grad=(rng.normal(size=(k, dim)) * 3).astype(f32))
    else:
        case.update(ids=None, valid=None, grad=(rng.normal(size=(rows, dim)) * 3).astype(f32))
    n_mut = int(rng.choice([0, 1, 1, 1, 2]))
    for _ in range(n_mut):
        _mutate(case, str(rng.choice(MUTATIONS)), rng)
    return case


def _bad(case, name):
    case["mutations"].append(name)
    case["expect"] = "error"


def _sketch_indices(case):
    return [s for s, k in enumerate(case["kinds"]) if k != "exact"]


def _mutate(case, name, rng):
    rows, dim, n = case["rows"], case["dim"], len(case["roles"])
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if name == "var_dtype":
        case["var_dtype"] = pick(BAD_DTYPES)
        return _bad(case, name)
    if name == "slot_dtype":
        if not case["slot_dtypes"]:
            return None
        case["slot_dtypes"][int(rng.integers(len(case["slot_dtypes"])))] = pick(BAD_DTYPES)
        return _bad(case, name)
    if name == "var_elements":
        case["param"] = np.zeros((rows + 1, dim + 1), np.float32)
        case["var_shape"] = case["param"].shape
        return _bad(case, name)
    if name == "var_reshaped":  # any shape with rows * dim elements is fine
        if rows * dim and case["expect"] == "ok":
            case["var_shape"] = pick([(rows * dim,), (rows, 1, dim), (1, rows, dim)])
            case["mutations"].append(name)
        return None
    if name == "exact_slot_shape":
        exact = [s for s, k in enumerate(case["kinds"]) if k == "exact"]
        if not exact:
            return None
        s = pick(exact)
        case["slots"][s] = np.zeros(pick([(rows + 1, dim), (rows, dim + 1), (1, rows, dim), (rows * dim,)]), np.float32)
        return _bad(case, name)
    sketches = _sketch_indices(case)
    if name in ("sketch_depth", "sketch_dim", "sketch_rank", "sketch_width_zero", "widths_differ", "wide_sketch"):
        if not sketches:
            return None
        s = pick(sketches)
        depth, width = case["slots"][s].shape[:2]
        shapes = {
            "sketch_depth": (depth % 8 + 1, width, dim),
            "sketch_dim": (depth, width, dim + 1),
            "sketch_rank": (depth * width, dim),
            "sketch_width_zero": (depth, 0, dim),
            "widths_differ": (depth, width + 1, dim),
            "wide_sketch": (depth, rows + 1, dim) if depth == 1 else (depth, rows, dim),
        }
        if name == "widths_differ" and len(sketches) < 2:
            return None
        case["slots"][s] = np.zeros(shapes[name], np.float32)
        return _bad(case, name)
    if name == "hash_shape":
        depth = len(case["hashes"])
        case["hashes"] = np.ones(pick([(depth, 3), (0, 4), (9, 4), (depth * 4,), (depth, 5)]), np.int64)
        return _bad(case, name)
    if name == "hash_value":
        h = case["hashes"].copy()
        h[int(rng.integers(len(h))), int(rng.integers(4))] = pick([-1, P, 2**40, INT64_MAX, -INT64_MAX - 1])
        case["hashes"] = h
        return _bad(case, name)
    if name == "hash_dtype":
        case["hash_dtype"] = pick(["int32", "float32"])
        return _bad(case, name)
    if name == "grad_rank":
        case["grad"] = case["grad"].reshape(-1)
        return _bad(case, name)
    if name == "grad_dim":
        k = len(case["grad"])
        case["grad"] = np.ones((k, dim + 1), np.float32)
        return _bad(case, name)
    if name == "grad_dtype":
        case["grad_dtype"] = pick(["float64", "float16", "int32"])
        return _bad(case, name)
    if name == "dense_grad_rows":
        if case["sparse"]:
            return None
        case["grad"] = np.ones((rows + 1, dim), np.float32)
        return _bad(case, name)
    if name == "coefs_size":
        case["coefs"] = np.ones(pick([len(case["coefs"]) + 1, len(case["coefs"]) - 1, 0]), np.float32)
        return _bad(case, name)
    if name == "coefs_dtype":
        case["coefs_dtype"] = "float64"
        return _bad(case, name)
    if name == "rows_attr":
        if dim == 0 and case["sparse"] and all(k != "exact" for k in case["kinds"]):
            return None  # rows * dim = 0 for every rows count: may be valid
        case["rows_attr"] = pick([rows + 1, rows - 1 if rows else 1, 2**40, INT64_MAX])
        return _bad(case, name)
    if name == "rows_overflow":
        # rows * dim wraps around to the variable's element count.
        case["dim"] = 4
        case["rows_attr"] = 2**62
        case["param"] = np.zeros((0, 4), np.float32)
        case["var_shape"] = (0, 4)
        case["kinds"] = case["kinds_attr"] = ["count_min" if r == SECOND else "count_sketch" for r in case["roles"]]
        case["slots"] = [np.zeros((1, 3, 4), np.float32) for _ in case["roles"]]
        case["hashes"] = case["hashes"][:1]
        if case["sparse"]:
            case["ids"] = np.array([1, 2**40, 2**61], np.int64)
            case["valid"] = np.ones(3, bool)
            case["grad"] = np.ones((3, 4), np.float32)
        else:
            case["grad"] = np.ones((0, 4), np.float32)
        return _bad(case, name)
    if name in ("id_out_of_range", "duplicate_ids", "ids_length", "valid_length", "ids_dtype",
                "padding_out_of_range"):
        if not case["sparse"]:
            return None
        ids, valid = case["ids"].copy(), case["valid"].copy()
        if len(ids) != len(valid) or len(ids) != len(case["grad"]):
            return None  # already malformed
        if name == "id_out_of_range" and len(ids):
            r = int(rng.integers(len(ids)))
            ids[r], valid[r] = pick([-1, rows, rows + 7, 2**40, INT64_MAX, -INT64_MAX - 1]), True
            case.update(ids=ids, valid=valid)
            return _bad(case, name)
        if name == "duplicate_ids" and valid.sum() >= 1 and len(ids) >= 2:
            first = int(np.nonzero(valid)[0][0])
            other = int(rng.choice([r for r in range(len(ids)) if r != first]))
            ids[other], valid[other] = ids[first], True
            case.update(ids=ids, valid=valid)
            return _bad(case, name)
        if name == "ids_length":
            case["ids"] = np.concatenate([ids, [0]]).astype(np.int64)
            case["valid"] = np.concatenate([valid, [False]])
            return _bad(case, name)
        if name == "valid_length":
            case["valid"] = valid[:-1] if len(valid) else np.ones(1, bool)
            return _bad(case, name)
        if name == "ids_dtype":
            case["ids_dtype"] = "int32"
            return _bad(case, name)
        if name == "padding_out_of_range" and (~valid).any():
            ids[~valid] = rng.choice([-1, rows, 2**40, INT64_MAX, -INT64_MAX - 1], size=int((~valid).sum()))
            case["ids"] = ids
            case["mutations"].append(name)
        return None
    if name == "kinds_count":
        case["kinds_attr"] = case["kinds_attr"] + ["exact"] if n == 1 else case["kinds_attr"][:1]
        return _bad(case, name)
    if name == "too_many_slots":
        if case["opt"] not in ("adagrad", "momentum") or len(case["slots"]) != 1:
            return None
        case["slots"].append(case["slots"][0].copy())
        case["slot_dtypes"].append("float32")
        case["kinds_attr"].append(case["kinds_attr"][0])
        case["roles_attr"].append(SECOND if case["roles_attr"][0] == FIRST else FIRST)
        return _bad(case, name)
    if name == "optimizer_attr":
        case["opt_attr"] = pick(["adamw", "", "ADAM"])
        return _bad(case, name)
    if name == "kind_attr":
        if not case["kinds_attr"]:
            return None
        case["kinds_attr"][int(rng.integers(len(case["kinds_attr"])))] = pick(["sketch", "exact ", "countmin"])
        return _bad(case, name)
    if name == "rmsprop_exact_v":  # an exact 2nd moment with a sketched momentum
        if rows < 2 or n == 0:
            return None
        width = int(rng.integers(1, rows))
        depth = len(case["hashes"])
        roles = [SECOND, FIRST] if rng.random() < 0.5 else [FIRST, SECOND]
        case.update(opt="rmsprop", opt_attr="rmsprop", roles=roles, roles_attr=list(roles),
                    kinds=["exact" if r == SECOND else "count_sketch" for r in roles],
                    slot_dtypes=["float32"] * 2,
                    slots=[np.zeros((rows, dim) if r == SECOND else (depth, width, dim), np.float32)
                           for r in roles],
                    coefs=np.ones(8, np.float32))
        case["kinds_attr"] = list(case["kinds"])
        return _bad(case, name)
    if name == "role_attr":
        roles = case["roles_attr"]
        if not roles:
            return None
        choice = int(rng.integers(3))
        if choice == 0 and len(roles) == 2:
            roles[1] = roles[0]  # one role twice
        elif choice == 1:
            roles[int(rng.integers(len(roles)))] = pick(["m", "v", "second", "First_moment"])
        elif len(roles) == 2:
            del roles[int(rng.integers(2))]  # one role per slot
        else:
            roles[0] = FIRST if roles[0] == SECOND else SECOND  # a role the optimizer does not take
        return _bad(case, name)
    if name == "same_variable":
        case["alias"] = pick(["var", "slot"]) if n >= 2 else "var"
        return _bad(case, name)
    if name in ("missing_variable", "not_a_variable"):
        case["missing"] = (name, int(rng.integers(-1, n)))  # -1: the parameter
        return _bad(case, name)
    if name == "no_slots":
        case["slots"], case["slot_dtypes"], case["kinds_attr"], case["roles_attr"] = [], [], [], []
        return _bad(case, name)
    if name == "nan_grad":
        if case["grad"].size and case["expect"] == "ok":
            g = case["grad"].copy()
            g.reshape(-1)[int(rng.integers(g.size))] = pick([np.nan, np.inf, -np.inf])
            case["grad"] = g
            case["expect"] = "no_crash"
            case["mutations"].append(name)
        return None
    raise AssertionError(name)


def describe(case):
    skip = ("param", "slots", "grad")
    out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in case.items() if k not in skip}
    out["shapes"] = {"param": case["param"].shape, "slots": [s.shape for s in case["slots"]],
                     "grad": case["grad"].shape}
    return json.dumps(out, default=str)


# --- running a case (in the worker) ----------------------------------------------
def run_case(case, op, tf):
    """Runs one case; returns None when it behaved, else what went wrong."""
    clean = (tf.errors.InvalidArgumentError, tf.errors.FailedPreconditionError,
             tf.errors.NotFoundError, TypeError, ValueError)
    var = tf.Variable(case["param"].reshape(case["var_shape"]).astype(case["var_dtype"])
                      if case["var_dtype"] != "bfloat16" else
                      tf.cast(case["param"].reshape(case["var_shape"]), tf.bfloat16))
    slots = [tf.Variable(tf.cast(s, dt)) for s, dt in zip(case["slots"], case["slot_dtypes"])]
    held = [var.read_value()] + [s.read_value() for s in slots] if case["hold_reads"] else []
    handles = [s.handle for s in slots]
    var_handle = var.handle
    if case["alias"] == "var" and handles:
        handles[0] = var.handle
    elif case["alias"] == "slot" and len(handles) >= 2:
        handles[1] = handles[0]
    if case["missing"]:
        kind, which = case["missing"]
        name = f"fuzz_missing_{case['index']}"
        if kind == "missing_variable":
            handle = tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[case["rows"], case["dim"]],
                                            shared_name=name)
        else:  # a resource that is not a variable
            handle = tf.raw_ops.MutableHashTableV2(key_dtype=tf.int64, value_dtype=tf.float32)
        if which < 0 or which >= len(handles):
            var_handle = handle
        else:
            handles[which] = handle
    before = [np.asarray(tf.cast(var, tf.float32))] + [np.asarray(tf.cast(s, tf.float32)) for s in slots]
    hashes = tf.constant(case["hashes"].astype(case["hash_dtype"]))
    grad = tf.constant(case["grad"].astype(case["grad_dtype"]))
    coefs = tf.constant(case["coefs"].astype(case["coefs_dtype"]))
    attrs = dict(optimizer=case["opt_attr"], slot_kinds=case["kinds_attr"], rows=case["rows_attr"],
                 nesterov=case["nesterov"])
    if ROLES_ATTR:
        attrs["slot_roles"] = case["roles_attr"]
    error = None
    try:
        if case["sparse"]:
            op.keras_sketch_sparse_apply(var_handle, handles, hashes, grad, coefs,
                                         tf.constant(case["ids"].astype(case["ids_dtype"])),
                                         tf.constant(case["valid"]), **attrs)
        else:
            op.keras_sketch_dense_apply(var_handle, handles, hashes, grad, coefs, **attrs)
    except clean as e:  # noqa: PERF203
        error = e
    except tf.errors.OpError as e:
        return f"unclean error {type(e).__name__}: {str(e)[:300]}"
    del held
    after = [np.asarray(tf.cast(var, tf.float32))] + [np.asarray(tf.cast(s, tf.float32)) for s in slots]
    if error is not None:
        if case["expect"] != "error":
            return f"a valid call raised {type(error).__name__}: {str(error)[:300]}"
        for a, b in zip(before, after):
            if not np.array_equal(a, b, equal_nan=True):
                return f"the call raised ({str(error)[:200]}) but wrote to a variable"
        return None
    if case["expect"] == "error":
        return "an invalid call succeeded"
    if case["expect"] == "no_crash":
        return None
    want_param, want_slots = reference_step(
        case["opt"], case["roles"], case["kinds"], case["nesterov"], case["param"], case["slots"],
        case["hashes"], case["coefs"], case["grad"], case["ids"], case["valid"])
    got = [after[0].reshape(case["rows"], case["dim"])] + after[1:]
    for name, g, w in zip(["param"] + [f"slot {r}" for r in case["roles"]], got, [want_param] + want_slots):
        if g.shape != w.shape or not np.allclose(g, w, rtol=1e-4, atol=1e-5, equal_nan=True):
            return f"{name} differs from the reference (max abs diff {np.nanmax(np.abs(g - w)) if g.shape == w.shape else 'shape'})"
    return None


ROLES_ATTR = False  # set by the worker: whether the op takes `slot_roles`
POSITIONAL = False  # an op without `slot_roles` infers roles from the order


def worker(seed, count, progress, first=0):
    """Runs cases [first, first+count); prints one JSON summary line."""
    global ROLES_ATTR, POSITIONAL
    import tensorflow as tf

    from keras_sketch import fused

    op = fused.load()
    assert op is not None, fused.unavailable_reason()
    ROLES_ATTR = _takes_roles(op)
    POSITIONAL = not ROLES_ATTR
    counts = {"ok": 0, "error": 0, "no_crash": 0}
    by_mutation = {}
    failures = []
    for i in range(first, first + count):
        with open(progress, "w") as f:
            f.write(str(i))
        case = make_case(i, seed)
        problem = run_case(case, op, tf)
        counts[case["expect"]] += 1
        for m in case["mutations"]:
            by_mutation[m] = by_mutation.get(m, 0) + 1
        if problem:
            failures.append({"index": i, "problem": problem})
    print(json.dumps({"counts": counts, "by_mutation": by_mutation, "failures": failures[:20],
                      "n_failures": len(failures)}))


def _takes_roles(op):
    import inspect

    return "slot_roles" in inspect.signature(op.keras_sketch_dense_apply).parameters


# --- the test --------------------------------------------------------------------
def _run_worker(first, count):
    progress = tempfile.NamedTemporaryFile(delete=False, suffix=".progress").name
    code = f"from tests.test_op_fuzz import worker; worker({SEED}, {count}, {progress!r}, {first})"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    elapsed = time.time() - start
    with open(progress) as f:
        last = f.read().strip()
    os.unlink(progress)
    if out.returncode != 0:
        index = int(last) if last else first
        what = "the op crashed the process" if out.returncode < 0 else "the worker failed"
        pytest.fail(
            f"{what} (exit code {out.returncode}) on case {index}:\n"
            f"{describe(make_case(index))}\nstderr tail:\n{out.stderr[-3000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1]), elapsed


def test_raw_ops_fuzz_never_crash_and_give_clean_errors_or_correct_results():
    summary, elapsed = _run_worker(0, CASES)
    details = "\n".join(f"case {f['index']}: {f['problem']}\n  {describe(make_case(f['index']))}"
                        for f in summary["failures"])
    assert summary["n_failures"] == 0, f"{summary['n_failures']} bad cases, e.g.:\n{details}"
    counts = summary["counts"]
    assert sum(counts.values()) == CASES
    # The generator must exercise both outcomes and every malformation.
    assert counts["ok"] >= CASES // 5 and counts["error"] >= CASES // 3, counts
    missing = [m for m in MUTATIONS if summary["by_mutation"].get(m, 0) < 2]
    assert not missing, f"malformations hardly generated: {missing}"
    print(f"\n{CASES} fuzz cases in {elapsed:.1f} s: {counts}")


def test_reference_agrees_with_the_numpy_paper_reference():
    """The fuzz reference itself, against tests/reference.py (written from the
    paper) on a sketched sparse and dense Adagrad-like accumulate."""
    from tests.reference import NpSketch

    rng = np.random.default_rng(0)
    rows, dim, depth, width = 30, 3, 3, 7
    hashes = rng.integers(1, P, size=(depth, 4)).astype(np.int64)
    table = np.abs(rng.normal(size=(depth, width, dim))).astype(np.float32)
    param = rng.normal(size=(rows, dim)).astype(np.float32)
    coefs = np.array([0.1, 1e-3, 1.0, 1.0, 0.0], np.float32)
    for ids in (None, np.array([3, 17, 29, 4])):
        grad = rng.normal(size=(rows if ids is None else len(ids), dim)).astype(np.float32)
        valid = None if ids is None else np.ones(len(ids), bool)
        want_p, (want_t,) = reference_step("adagrad", [SECOND], ["count_min"], False, param, [table],
                                           hashes, coefs, grad, ids, valid)
        npsk = NpSketch(hashes, rows, width, dim, "count_min")
        npsk.table = table.astype(np.float64)
        est = npsk.accumulate(grad.astype(np.float64) ** 2, 1.0, 1.0, None if ids is None else list(ids))
        used = np.arange(rows) if ids is None else ids
        expect = param.astype(np.float64).copy()
        expect[used] -= 0.1 * grad / np.sqrt(est + 1e-3)
        np.testing.assert_allclose(want_t, npsk.table, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(want_p, expect, rtol=1e-5, atol=1e-6)


REPRODUCTIONS = r'''
import json
import tensorflow as tf
from keras_sketch import fused

op = fused.load()
rows, dim = 20, 4
hashes = tf.constant([[3, 5, 7, 11]], tf.int64)
coefs = tf.constant([0.1, 1e-7, 0.9, 0.1, -0.1, 0.99, 0.01, -0.01])
ATTRS = %s


def attrs(**over):
    out = dict(optimizer="adam", slot_kinds=["exact", "count_min"], rows=rows)
    if ATTRS:
        out["slot_roles"] = ["first_moment", "second_moment"]
    out.update(over)
    return out


def tables(var_dtype=tf.float32, m_dtype=tf.float32, v_dtype=tf.float32, var_shape=(rows, dim)):
    var = tf.Variable(tf.ones(var_shape, var_dtype))
    m = tf.Variable(tf.zeros([rows, dim], m_dtype))
    v = tf.Variable(tf.zeros([1, 5, dim], v_dtype))
    return var, m, v, [var.read_value(), m.read_value(), v.read_value()]  # readers: copy-on-write


def dense(var, m, v, **over):
    op.keras_sketch_dense_apply(var.handle, [m.handle, v.handle], hashes, tf.ones([rows, dim]),
                                coefs, **attrs(**over))


def sparse(var, m, v, ids, **over):
    op.keras_sketch_sparse_apply(var.handle, [m.handle, v.handle], hashes, tf.ones([len(ids), dim]),
                                 coefs, tf.constant(ids, tf.int64), tf.ones([len(ids)], tf.bool),
                                 **attrs(**over))


def overflow():
    # rows * dim = 2^62 * 4 wraps around to 0 = the (0, 4) variable's size.
    var = tf.Variable(tf.ones([0, 4]))
    m = tf.Variable(tf.zeros([1, 3, 4]))
    v = tf.Variable(tf.zeros([1, 3, 4]))
    sparse(var, m, v, [1, 2**40], rows=2**62, slot_kinds=["count_sketch", "count_min"])


cases = {
    "float64 variable, dense": lambda: dense(*tables(var_dtype=tf.float64)[:3]),
    "float64 slot, dense": lambda: dense(*tables(m_dtype=tf.float64)[:3]),
    "int32 slot, sparse": lambda: sparse(*tables(v_dtype=tf.int32)[:3], ids=[1, 2]),
    "int32 variable, sparse": lambda: sparse(*tables(var_dtype=tf.int32)[:3], ids=[1, 2]),
    "rows=2**62 with a (0, 4) variable": overflow,
}
out = {}
for name, run in cases.items():
    try:
        run()
        out[name] = "no error"
    except tf.errors.InvalidArgumentError as e:
        out[name] = "InvalidArgument: " + e.message
print(json.dumps(out))
'''


def test_issue_10_crash_reproductions_give_invalid_argument():
    """The crashes the issue reported (abort on a float64/int32 variable or
    slot; out-of-bounds writes after rows*dim overflowed) are clean errors."""
    attrs = "slot_roles" in open(os.path.join(ROOT, "custom_ops", "sketch_update_op.cc")).read()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", REPRODUCTIONS % attrs], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"crashed (exit code {out.returncode}):\n{out.stderr[-3000:]}"
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert "float32" in results["float64 variable, dense"] and "var " in results["float64 variable, dense"]
    assert "slot 0 must be a float32 variable, got double" in results["float64 slot, dense"]
    assert "slot 1 must be a float32 variable, got int32" in results["int32 slot, sparse"]
    assert "var must be a float32 variable, got int32" in results["int32 variable, sparse"]
    assert "overflows int64" in results["rows=2**62 with a (0, 4) variable"]
