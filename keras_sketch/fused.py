"""Loader and caller of the fused sketch-update custom op (custom_ops/).

The op applies a whole sketched optimizer step in place, on CPU, in C++: the
parameter, the exact slots and the sketches of one variable, for dense
gradients and for merged sparse rows.  It computes exactly what the pure-TF
path computes (``keras_sketch.state.accumulate`` + the optimizers' ``_step``).

Which path a step takes is decided in ``SketchOptimizer.update_step``; this
module answers whether the fused op may be used for a variable
(``fused_reason``) and calls it (``apply_dense`` / ``apply_sparse``).

Choosing the path:

* ``fused=None`` (default) on the optimizer: the op when its library loaded,
  else the pure-TF path.  ``KERAS_SKETCH_FUSED=1``/``0`` sets the default.
* ``fused=True`` (or ``KERAS_SKETCH_FUSED=1``): the op; constructing the
  optimizer raises ``RuntimeError`` when the library is unavailable.
* ``fused=False`` (or ``KERAS_SKETCH_FUSED=0``): the pure-TF path.
* ``KERAS_SKETCH_OPS_LIBRARY=/path/to/lib.so`` loads that library instead of
  the one ``pip install`` built next to this file.

Even when chosen, a variable takes the pure-TF path where the op cannot run:
inside ``jit_compile=True`` functions (custom ops have no XLA kernel),
variables that are not float32, variables placed on a GPU (the TensorFlow op
has CPU kernels only), transposed layouts (sketches hashing a variable's last
axis, e.g. the class axis of a wide ``Dense`` kernel) and optimizer
subclasses that override ``_step``.  One log line per optimizer and reason
says which path runs and why.
"""

import glob
import logging
import os

import tensorflow as tf

from keras_sketch.sketch import EXACT
from keras_sketch.tf_internals import in_xla_context, tf_variable

log = logging.getLogger("keras_sketch")

ENV_FUSED = "KERAS_SKETCH_FUSED"
ENV_LIBRARY = "KERAS_SKETCH_OPS_LIBRARY"
_HERE = os.path.dirname(os.path.abspath(__file__))

_library = {"tried": False, "module": None, "path": None, "error": None}

# The op's slot roles (custom_ops/sketch_kinds.h): what the op computes into
# a slot.  The 1st moment accumulates g (Adam, momentum) or RMSprop's
# increment lr*g/sqrt(v+eps); the 2nd moment accumulates g*g.
FIRST_MOMENT = "first_moment"
SECOND_MOMENT = "second_moment"

# The one table of the optimizers the op runs: its name for each one's math
# (an optimizer's ``_fused_kind``) and the role of each slot the optimizer
# declares (``_slot_kinds``), by slot name.  The op is told every slot's role
# (attr ``slot_roles``), so the order of an optimizer's slot dict does not
# matter.
SLOT_ROLES = {
    "adam": {"m": FIRST_MOMENT, "v": SECOND_MOMENT},
    "adagrad": {"v": SECOND_MOMENT},
    "momentum": {"m": FIRST_MOMENT},
    "rmsprop": {"v": SECOND_MOMENT, "m": FIRST_MOMENT},
}


def library_path():
    """The op library to load: ``$KERAS_SKETCH_OPS_LIBRARY`` or the built one."""
    path = os.environ.get(ENV_LIBRARY)
    if path:
        return path
    baseline = glob.glob(os.path.join(_HERE, "_sketch_ops.*so"))
    avx2 = glob.glob(os.path.join(_HERE, "_sketch_ops_avx2.*so"))
    if avx2 and _cpu_has("avx2", "fma"):
        return avx2[0]
    return baseline[0] if baseline else None


def _cpu_has(*flags):
    """Whether /proc/cpuinfo lists every flag (False where it cannot tell)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(flags) <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False


def load():
    """Loads the op library once; returns its module or None."""
    if not _library["tried"]:
        _library["tried"] = True
        path = library_path()
        _library["path"] = path
        if path is None:
            _library["error"] = (
                "the op library was not built (no keras_sketch/_sketch_ops*.so; "
                "reinstall with `pip install --no-build-isolation .` and a C++17 compiler)"
            )
        else:
            try:
                _library["module"] = tf.load_op_library(path)
            except (tf.errors.NotFoundError, OSError) as error:
                _library["error"] = f"loading {path} failed: {error}"
    return _library["module"]


def available():
    return load() is not None


def unavailable_reason():
    load()
    return _library["error"]


def env_choice():
    """``KERAS_SKETCH_FUSED`` as True/False, or None when unset."""
    value = os.environ.get(ENV_FUSED, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_FUSED} must be 0, 1 or auto, got {os.environ[ENV_FUSED]!r}.")


def check_request(fused):
    """Validates an optimizer's ``fused`` argument; raises when the op is
    forced (argument or environment) but its library is unavailable."""
    if fused not in (None, True, False):
        raise ValueError(f"`fused` must be None, True or False, got {fused!r}.")
    choice = fused if fused is not None else env_choice()
    if choice and not available():
        source = "fused=True" if fused else f"{ENV_FUSED}=1"
        raise RuntimeError(
            f"keras_sketch: {source} asks for the fused op, but {unavailable_reason()}."
        )
    return fused


def _optimizer_kind(optimizer):
    """The op's name for the optimizer's math (its ``_fused_kind``), or None."""
    owner = next((c for c in type(optimizer).__mro__ if "_fused_kind" in vars(c)), None)
    if owner is None or type(optimizer)._step is not owner._step:
        return None  # a subclass with other update math cannot use the C++ copy of it
    return owner._fused_kind if owner._fused_kind in SLOT_ROLES else None


def slot_roles(kind, names):
    """The op's role of each slot in ``names`` (in that order) for the
    optimizer kind ``kind``; None when one has no role in the op."""
    roles = SLOT_ROLES.get(kind, {})
    if any(n not in roles for n in names):
        return None
    return [roles[n] for n in names]


def fused_reason(optimizer, layout, variable):
    """``(use_fused, reason)`` for one variable, decided at trace time."""
    choice = optimizer.fused if optimizer.fused is not None else env_choice()
    if choice is False:
        source = "fused=False" if optimizer.fused is False else f"{ENV_FUSED}=0"
        return False, f"disabled by {source}"
    if not available():
        return False, unavailable_reason()
    if in_xla_context():
        return False, "inside a jit_compile=True function (the custom op has no XLA kernel)"
    if _optimizer_kind(optimizer) is None:
        return False, f"{type(optimizer).__name__} has no fused kernel"
    names = list(optimizer._slot_kinds())
    if slot_roles(_optimizer_kind(optimizer), names) is None:
        return False, f"its slots {names} are not all known to the op ({SLOT_ROLES[_optimizer_kind(optimizer)]})"
    if layout.transpose:
        return False, "its sketch hashes the last axis (transposed layout)"
    if tf.as_dtype(variable.dtype) != tf.float32:
        return False, f"dtype {variable.dtype} (the op updates float32 variables)"
    if "GPU" in str(getattr(variable, "device", "") or "").upper():
        return False, "the variable is on a GPU (the TensorFlow op has CPU kernels only)"
    return True, f"library {_library['path']}"


def log_choice(optimizer, variable, use, reason):
    """One log line per optimizer and (path, reason)."""
    seen = optimizer.__dict__.setdefault("_fused_logged", set())
    key = (use, reason)
    if key in seen:
        return
    seen.add(key)
    path = "the fused C++ op" if use else "the pure-TF path"
    level = logging.WARNING if (not use and optimizer.fused is None and not available()
                                and env_choice() is None) else logging.INFO
    log.log(level, "keras_sketch: %s uses %s for %s (and like variables): %s.",
            optimizer.name, path, getattr(variable, "path", variable.name), reason)


def _coefficients(optimizer, slots, lr, t):
    """``(kind, coefs, nesterov)``: the optimizer's scalars, then per slot (in
    state order) ``decay, scale, decay - 1``, from its ``_fused_coefficients``."""
    head, rules, nesterov = optimizer._fused_coefficients(lr, t)
    per = [c for name in slots for c in (rules[name][0], rules[name][1], rules[name][0] - 1.0)]
    dtype = lr.dtype
    values = [tf.cast(v, dtype) for v in head] + [tf.constant(v, dtype) for v in per]
    return _optimizer_kind(optimizer), tf.stack(values), nesterov


def _operands(optimizer, slots, lr, t):
    kind, coefs, nesterov = _coefficients(optimizer, slots, lr, t)
    names = list(slots)
    handles = [tf_variable(slots[n].table).handle for n in names]
    kinds = [slots[n].kind for n in names]
    params = next((s.params for s in slots.values() if s.kind != EXACT), None)
    hashes = tf.zeros([1, 4], tf.int64) if params is None else tf.convert_to_tensor(params)
    attrs = {"optimizer": kind, "slot_kinds": kinds, "slot_roles": slot_roles(kind, names),
             "nesterov": nesterov}
    return handles, hashes, coefs, attrs


def apply_dense(optimizer, layout, slots, variable, g, lr, t):
    """Fused dense step; ``g`` is the ``[rows, dim]`` view of the gradient."""
    handles, hashes, coefs, attrs = _operands(optimizer, slots, lr, t)
    return load().keras_sketch_dense_apply(
        tf_variable(variable).handle, handles, hashes, g, coefs, rows=layout.rows, **attrs
    )


def apply_sparse(optimizer, layout, slots, variable, ids, values, valid, lr, t):
    """Fused step on merged unique rows (``merge_duplicates`` output)."""
    handles, hashes, coefs, attrs = _operands(optimizer, slots, lr, t)
    return load().keras_sketch_sparse_apply(
        tf_variable(variable).handle, handles, hashes, values, coefs, ids, valid, rows=layout.rows, **attrs
    )
