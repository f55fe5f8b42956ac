"""CUDA kernels of the fused op, through their plain C launcher (ctypes only).

    .venv/bin/python -m pytest tests/gpu -q

* ``test_cuda_sources_compile``: nvcc compiles the kernels for sm_80 and
  sm_90 (static cudart); skips only where no nvcc exists.
* the other tests run the kernels on a GPU against the NumPy reference below
  (same math as the CPU op and the pure-TF path) for dims 1..4097, depths
  1-8, several widths, every optimizer, dense and sparse; and time the dense
  kernel.  They skip, saying why, where there is no GPU (as in CI).
"""

import ctypes
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "custom_ops", "sketch_update_kernels.cu.cc")
P = 2**31 - 1


def _header_enums():
    """The enum names and values of custom_ops/sketch_kinds.h, the one place
    they are defined: {attr name: value} for optimizers, kinds and roles."""
    text = open(os.path.join(ROOT, "custom_ops", "sketch_kinds.h")).read()

    def names(macro):
        return re.findall(r'"([^"]+)"', re.search(r"#define %s \{([^}]*)\}" % macro, text).group(1))

    def values(enum):
        body = re.search(r"enum %s \{([^}]*)\}" % enum, text).group(1)
        return [int(v) for v in re.findall(r"=\s*(\d+)", body)]

    tables = [("KS_OPTIMIZER_NAMES", "KsOptimizer"), ("KS_SLOT_KIND_NAMES", "KsSlotKind"),
              ("KS_SLOT_ROLE_NAMES", "KsSlotRole")]
    return [dict(zip(names(m), values(e))) for m, e in tables]


OPT, KIND, ROLE = _header_enums()
MAX_SLOTS = int(re.search(r"#define KS_MAX_SLOTS (\d+)", open(os.path.join(ROOT, "custom_ops", "sketch_kinds.h")).read()).group(1))


class Problem(ctypes.Structure):
    _fields_ = [
        ("optimizer", ctypes.c_int), ("nesterov", ctypes.c_int), ("num_slots", ctypes.c_int),
        ("slot_kind", ctypes.c_int * MAX_SLOTS), ("slot_role", ctypes.c_int * MAX_SLOTS),
        ("slot", ctypes.c_void_p * MAX_SLOTS),
        ("param", ctypes.c_void_p), ("rows", ctypes.c_int64), ("dim", ctypes.c_int64),
        ("depth", ctypes.c_int), ("width", ctypes.c_int64),
        ("hash", (ctypes.c_int64 * 4) * 8), ("coefs", ctypes.c_float * 8),
    ]


def _nvcc():
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                    if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.fixture(scope="module")
def library():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolchain (nvcc) on this machine")
    out = os.path.join(tempfile.mkdtemp(), "libks_cuda.so")
    cmd = [nvcc, "-std=c++17", "-O3", "--shared", "-Xcompiler", "-fPIC", "-cudart", "static",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-I" + os.path.join(ROOT, "custom_ops"), "-x", "cu", SRC, "-o", out]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return ctypes.CDLL(out)


def test_cuda_sources_compile(library):
    assert hasattr(library, "ks_dense_apply") and hasattr(library, "ks_sparse_apply")


def test_header_enums_parse():
    assert OPT == {"adam": 0, "adagrad": 1, "momentum": 2, "rmsprop": 3}
    assert list(KIND) == ["exact", "count_sketch", "count_min"] and len(set(KIND.values())) == 3
    assert list(ROLE) == ["first_moment", "second_moment"]


def test_launcher_refuses_bad_roles_and_overflow(library):
    """Runs without a GPU: Check() rejects before any kernel launch."""
    def problem(**over):
        prob = Problem(optimizer=OPT["adam"], num_slots=2, rows=10, dim=4, depth=1, width=3)
        prob.param = ctypes.c_void_p(16)  # never dereferenced: validation fails first
        for i, (kind, role) in enumerate([("exact", "first_moment"), ("count_min", "second_moment")]):
            prob.slot_kind[i], prob.slot_role[i], prob.slot[i] = KIND[kind], ROLE[role], 16
        for k, v in over.items():
            setattr(prob, k, v) if not isinstance(v, tuple) else getattr(prob, k).__setitem__(*v)
        return prob
    grad = ctypes.c_void_p(16)
    einval = 1000
    assert library.ks_dense_apply(ctypes.byref(problem(slot_role=(1, ROLE["first_moment"]))), grad, None) == einval
    assert library.ks_dense_apply(ctypes.byref(problem(slot_role=(0, 7))), grad, None) == einval
    assert library.ks_dense_apply(ctypes.byref(problem(optimizer=OPT["momentum"])), grad, None) == einval
    assert library.ks_dense_apply(ctypes.byref(problem(rows=2**62)), grad, None) == einval
    library.ks_sparse_workspace_bytes.restype = ctypes.c_size_t
    assert library.ks_sparse_workspace_bytes(ctypes.byref(problem(dim=2**62)), ctypes.c_int64(2**40)) == 0


@pytest.fixture(scope="module")
def gpu(library):
    count = ctypes.c_int(0)
    if library.ks_device_count(ctypes.byref(count)) != 0 or count.value == 0:
        pytest.skip("no CUDA GPU on this machine (kernels compiled but not run)")
    return library


class Device:
    def __init__(self, lib):
        self.lib, self.ptrs = lib, []

    def put(self, array):
        array = np.ascontiguousarray(array)
        ptr = ctypes.c_void_p()
        assert self.lib.ks_malloc(ctypes.byref(ptr), max(array.nbytes, 4)) == 0
        assert self.lib.ks_memcpy_to_device(ptr, array.ctypes.data, array.nbytes) == 0
        self.ptrs.append(ptr)
        return ptr

    def get(self, ptr, like):
        out = np.empty_like(like)
        assert self.lib.ks_memcpy_to_host(out.ctypes.data, ptr, out.nbytes) == 0
        return out

    def free(self):
        for p in self.ptrs:
            self.lib.ks_free(p)


# --- NumPy reference of one fused step (the pure-TF path's math) ------------
def _locate(hashes, ids, width, rows):
    if width >= rows:
        return ids[None, :], np.ones((1, len(ids)), np.float32)
    x = ids % P
    b = ((hashes[:, :1] * x + hashes[:, 1:2]) % P) % width
    s = 1 - 2 * (((hashes[:, 2:3] * x + hashes[:, 3:4]) % P) % 2)
    return b, s.astype(np.float32)


def _query(table, kind, b, s, signed):
    vals = np.stack([table[j, b[j]] * (s[j][:, None] if signed else 1) for j in range(len(b))])
    if kind == "count_min":
        return np.maximum(vals.min(0), 0)
    if len(b) == 1:
        return vals[0]
    v = np.sort(vals, 0)
    m = len(b) // 2
    return v[m] if len(b) % 2 else 0.5 * (v[m - 1] + v[m])


ROLE_OF = {"m": "first_moment", "v": "second_moment"}


def _roles(opt, n, reverse=False):
    roles = {"adam": ("m", "v") if n == 2 else ("v",), "adagrad": ("v",), "momentum": ("m",),
             "rmsprop": ("v", "m") if n == 2 else ("v",)}[opt]
    return roles[::-1] if reverse else roles


def _reference(opt, kinds, roles, param, slots, hashes, coefs, grad, ids, nesterov):
    rows, dim = param.shape
    param, slots = param.copy(), [s.copy() for s in slots]
    c = coefs
    width = next((s.shape[1] for s, k in zip(slots, kinds) if k != "exact"), rows)
    b, sg = _locate(hashes, ids, width, rows)
    est = {}
    for si in sorted(range(len(roles)), key=lambda i: roles[i] != "v"):  # v first
        kind, role = kinds[si], roles[si]
        decay, scale, dm1 = c[2 + 3 * si: 5 + 3 * si]
        if role == "v":
            x = grad * grad
        elif opt == "rmsprop":
            x = c[0] * grad / np.sqrt(est["v"] + c[1])
        else:
            x = grad
        x = scale * x
        signed = kind == "count_sketch" and width < rows
        if kind == "exact":
            slots[si][ids] = slots[si][ids] + (dm1 * slots[si][ids] + x)
            est[role] = slots[si][ids]
            continue
        delta = dm1 * _query(slots[si], kind, b, sg, signed) + x
        for j in range(len(b)):
            np.add.at(slots[si][j], b[j], delta * (sg[j][:, None] if signed else 1))
        est[role] = _query(slots[si], kind, b, sg, signed)
    if opt == "adam":
        d = c[0] * est.get("m", grad) / (np.sqrt(est["v"]) + c[1])
    elif opt == "adagrad":
        d = c[0] * grad / np.sqrt(est["v"] + c[1])
    elif opt == "momentum":
        d = c[0] * (grad + c[1] * est["m"]) if nesterov else c[0] * est["m"]
    else:
        d = est["m"] if "m" in est else c[0] * grad / np.sqrt(est["v"] + c[1])
    param[ids] -= d
    return param, slots


CASES = [("adam", ["exact", "count_min"]), ("adam", ["count_min"]),
         ("adam", ["count_sketch", "count_min"]), ("adagrad", ["count_min"]),
         ("momentum", ["count_sketch"]), ("rmsprop", ["count_min", "count_sketch"]),
         ("rmsprop", ["count_min", "exact"])]


@pytest.mark.parametrize("reverse", [False, True], ids=["declared", "reversed"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dim,depth,width", [(1, 1, 5), (7, 3, 9), (31, 8, 4), (32, 2, 1),
                                             (33, 1, 40), (1000, 5, 11), (4097, 4, 3)])
def test_kernels_match_numpy_reference(gpu, sparse, dim, depth, width, reverse):
    rng = np.random.default_rng(dim)
    rows = 40
    if width >= rows:
        depth, width = 1, rows
    for opt, kinds in CASES:
        roles = _roles(opt, len(kinds))
        if reverse:  # the launcher is told the roles: slot order must not matter
            kinds, roles = kinds[::-1], roles[::-1]
        param = rng.normal(size=(rows, dim)).astype(np.float32)
        slots = [np.abs(rng.normal(size=(rows, dim) if k == "exact" else (depth, width, dim)))
                 .astype(np.float32) for k in kinds]
        hashes = rng.integers(0, P, size=(depth, 4))
        coefs = np.array([0.01, 1e-3] + [0.9, 0.1, -0.1] * len(kinds), np.float32)
        ids = (rng.choice(rows, size=15, replace=False) if sparse else np.arange(rows))
        grad = rng.normal(size=(len(ids), dim)).astype(np.float32)
        want_p, want_s = _reference(opt, kinds, roles, param, slots, hashes, coefs, grad, ids, True)
        dev = Device(gpu)
        try:
            prob = Problem(optimizer=OPT[opt], nesterov=1, num_slots=len(kinds), rows=rows,
                           dim=dim, depth=depth, width=width)
            prob.param = dev.put(param)
            ptrs = [dev.put(s) for s in slots]
            for i, (k, r, p) in enumerate(zip(kinds, roles, ptrs)):
                prob.slot_kind[i], prob.slot_role[i], prob.slot[i] = KIND[k], ROLE[ROLE_OF[r]], p
            for j in range(depth):
                for q in range(4):
                    prob.hash[j][q] = int(hashes[j, q])
            for i, v in enumerate(coefs):
                prob.coefs[i] = float(v)
            g = dev.put(grad)
            if sparse:
                ws_bytes = gpu.ks_sparse_workspace_bytes(ctypes.byref(prob), ctypes.c_int64(len(ids)))
                ws = dev.put(np.zeros(max(ws_bytes // 4, 1), np.float32))
                rc = gpu.ks_sparse_apply(ctypes.byref(prob), g, dev.put(ids.astype(np.int64)),
                                         dev.put(np.ones(len(ids), np.uint8)),
                                         ctypes.c_int64(len(ids)), ws, None)
            else:
                rc = gpu.ks_dense_apply(ctypes.byref(prob), g, None)
            assert rc == 0 and gpu.ks_synchronize() == 0
            np.testing.assert_allclose(dev.get(prob.param, param), want_p, rtol=1e-4, atol=1e-5)
            for p, w in zip(ptrs, want_s):
                np.testing.assert_allclose(dev.get(p, w), w, rtol=1e-4, atol=1e-5)
        finally:
            dev.free()


def test_dense_kernel_bandwidth(gpu, capsys):
    """Times a 4096 x 4096 CSAdam(beta_1=0) step; prints effective bandwidth
    (bytes of gradient + parameter read + parameter written) for the record."""
    n, width = 4096, 820
    dev = Device(gpu)
    try:
        prob = Problem(optimizer=OPT["adam"], num_slots=1, rows=n, dim=n, depth=1, width=width)
        prob.param = dev.put(np.zeros((n, n), np.float32))
        prob.slot_kind[0], prob.slot[0] = KIND["count_min"], dev.put(np.zeros((1, width, n), np.float32))
        prob.slot_role[0] = ROLE["second_moment"]
        prob.hash[0][0], prob.hash[0][1] = 12345, 678
        for i, v in enumerate([1e-3, 1e-7, 0.999, 0.001, -0.001]):
            prob.coefs[i] = v
        g = dev.put(np.ones((n, n), np.float32))
        ms = ctypes.c_float()
        assert gpu.ks_time_dense(ctypes.byref(prob), g, 20, ctypes.byref(ms)) == 0
        per_step = ms.value / 20
        gbps = 3 * n * n * 4 / (per_step * 1e-3) / 1e9
        with capsys.disabled():
            print(f"\ndense 4096x4096 CSAdam(beta_1=0): {per_step:.3f} ms/step, {gbps:.0f} GB/s")
        assert per_step > 0
    finally:
        dev.free()
