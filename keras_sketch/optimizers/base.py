"""The base class of the sketched optimizers: state building and step paths.

Subclasses declare their auxiliary variables (``_slot_kinds``) and write the
update math once (``_step``), in terms of ``StepState.accumulate``/``ema``.
This class decides, in one place (``update_step``), which path a step takes:
row-sparse for ``tf.IndexedSlices`` gradients, dense otherwise.
"""

import logging
import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_sketch import fused as fused_op
from keras_sketch import memory
from keras_sketch.sketch import COUNT_MIN, COUNT_SKETCH, Sketch, hash_params, sketch_width
from keras_sketch.state import ExactState, Layout, Rows, StepState, merge_duplicates
from keras_sketch.optimizers import state_spec

EXACT = "exact"
HASH_AXES = ("auto", "first", "last")
MAX_DEPTH = 8
log = logging.getLogger("keras_sketch")


def check_number(name, value, low=None, high=None, low_open=False, high_open=False):
    """Raises ``ValueError`` naming ``name`` unless ``value`` is in range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")
    return value


def check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    return int(check_number(name, value, low, high))


class SparseUnscale(tf.IndexedSlices):
    """An ``IndexedSlices`` that Keras's ``apply`` can unscale with ``/``.

    ``keras.optimizers.Optimizer.apply`` divides every gradient by
    ``loss_scale_factor`` with ``g / scale``, which ``tf.IndexedSlices`` does
    not support (TypeError).  Sparse gradients are wrapped in this class, whose
    division returns a plain ``IndexedSlices`` with divided values: the rows
    stay sparse.
    """

    def __truediv__(self, scale):
        values = self.values / tf.cast(scale, self.values.dtype)
        return tf.IndexedSlices(values, self.indices, self.dense_shape)


class CompressedStateMixin:
    """What every keras_sketch optimizer adds to ``keras.optimizers.Optimizer``:
    a memory report and a state restore that refuses mismatched state.

    Subclasses fill ``self._memory_rows`` (one ``memory.variable_row`` dict
    per model variable) in ``build()``, after ``_check_variables``.
    """

    def __init__(self, learning_rate, **kwargs):
        if isinstance(learning_rate, numbers.Real):
            check_number("learning_rate", learning_rate, 0.0)
        super().__init__(learning_rate=learning_rate, **kwargs)

    def _check_variables(self, var_list):
        for var in var_list:
            if not keras.backend.is_float_dtype(var.dtype):
                raise TypeError(
                    f"{type(self).__name__} updates floating-point variables only; "
                    f"variable {var.path!r} has dtype {var.dtype}."
                )

    def memory_report(self):
        """Per-variable optimizer-state memory against the exact optimizer."""
        if not self.built:
            raise ValueError("The optimizer is not built yet: call `build(variables)` or train first.")
        return memory.MemoryReport(self._memory_rows)

    def apply(self, grads, trainable_variables=None):
        """``keras.optimizers.Optimizer.apply``, with sparse loss unscaling.

        Keras unscales gradients with ``g / loss_scale_factor``, a TypeError
        for ``tf.IndexedSlices``; they are wrapped so the division keeps them
        sparse (see ``SparseUnscale``).
        """
        if self.loss_scale_factor is not None:
            grads = [
                SparseUnscale(g.values, g.indices, g.dense_shape)
                if isinstance(g, tf.IndexedSlices)
                else g
                for g in grads
            ]
        return super().apply(grads, trainable_variables)

    def _track_state_spec(self):
        """Call at the end of ``build()``: checkpoints then save the state spec
        and refuse, with a clear error, state saved with other settings."""
        self._keras_sketch_state_spec = state_spec.StateSpecCheck(self)

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[state_spec.SPEC_KEY] = state_spec.encode(state_spec.state_spec(self))

    def load_own_variables(self, store):
        """Restores the state; refuses state saved with other sketch settings.

        Keras's base class warns and skips loading when the number of
        variables differs, which would silently drop trained state.
        """
        keys = [k for k in store.keys() if k != state_spec.SPEC_KEY]
        saved = [store[str(i)] for i in range(len(keys))]
        ours = self.variables
        if state_spec.SPEC_KEY in store.keys():
            error = state_spec.mismatch(
                self.name, state_spec.decode(store[state_spec.SPEC_KEY]), state_spec.state_spec(self)
            )
            if error:
                raise ValueError(error)
        if len(saved) != len(ours):
            raise ValueError(
                f"Cannot load the state of optimizer {self.name!r}: it has {len(ours)} "
                f"variables but the saved state has {len(saved)}. The saved optimizer was "
                "built with other sketch settings (depth, width, compression, min_rows, "
                "hash_axis, momentum options) or for other model variables."
            )
        for var, value in zip(ours, saved):
            if tuple(var.shape) != tuple(np.shape(value)):
                raise ValueError(
                    f"Cannot load the state of optimizer {self.name!r}: variable "
                    f"{var.path!r} has shape {tuple(var.shape)} but the saved one has "
                    f"{tuple(np.shape(value))}. The saved optimizer used other sketch "
                    "settings (depth, width, compression or hash_axis)."
                )
        for var, value in zip(ours, saved):
            var.assign(value)


class SketchOptimizer(CompressedStateMixin, keras.optimizers.Optimizer):
    """Base class: Keras optimizer whose large state lives in count-sketches.

    Sketch arguments (shared by all keras_sketch optimizers):
        depth: hash functions per sketch, 1 to 8.  Default 1: at equal memory
            one wide table beat three narrow ones in our measurements
            (README, "Choosing the defaults").
        compression: sketch size / exact state size, in (0, 1].  The width is
            ``ceil(compression * rows / depth)``.
        width: explicit width (overrides ``compression``).  ``width >= rows``
            gives the identity map: exact, lossless state.
        min_rows: variables whose hashed axis has fewer entries, and all
            scalars and vectors, keep exact state.
        hash_axis: which axis of a (flattened 2-D) variable is hashed:
            ``"first"`` (default: the rows, e.g. the vocabulary of an
            ``Embedding``; a ``Dense`` kernel ``[in, out]`` is sketched only
            when ``in >= min_rows``), ``"last"``, or ``"auto"`` (the longer
            axis: also sketches a softmax kernel along its class axis, the
            paper's setting).  Sketched dense-gradient state damps the step,
            so ``"auto"`` saves more memory but needs a larger learning rate
            (about 2x Adam's best in our WikiText-2 study); the default keeps
            ``CSAdam()`` close to ``Adam()`` at the same learning rate
            (README, "Choosing the defaults").
        seed: seed of the hash functions (each variable gets its own).
        cleaning_factor, cleaning_interval: multiply count-min sketches by
            ``cleaning_factor`` every ``cleaning_interval`` steps (the paper's
            cleaning heuristic).  Off by default (``cleaning_interval=0``).
        fused: ``None`` (default: the fused C++ op when its library loaded,
            or as ``KERAS_SKETCH_FUSED`` says), ``True`` (require it) or
            ``False`` (pure-TF path).  See ``keras_sketch/fused.py``.
    """

    # Number of full-size slots Keras's exact optimizer keeps per variable.
    _exact_slot_count = 1

    def __init__(
        self,
        learning_rate,
        depth=1,
        compression=0.2,
        width=None,
        min_rows=4096,
        hash_axis="first",
        seed=0,
        cleaning_factor=1.0,
        cleaning_interval=0,
        fused=None,
        name=None,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.depth = check_int("depth", depth, 1, MAX_DEPTH)
        self.compression = float(check_number("compression", compression, 0.0, 1.0, low_open=True))
        self.width = None if width is None else check_int("width", width, 1)
        self.min_rows = check_int("min_rows", min_rows, 0)
        if hash_axis not in HASH_AXES:
            raise ValueError(f"`hash_axis` must be one of {HASH_AXES}, got {hash_axis!r}.")
        self.hash_axis = hash_axis
        self.seed = check_int("seed", seed, -(2**63))
        self.cleaning_factor = float(check_number("cleaning_factor", cleaning_factor, 0.0, 1.0))
        self.cleaning_interval = check_int("cleaning_interval", cleaning_interval, 0)
        self._warned_densify = set()
        self.fused = fused_op.check_request(fused)

    # -- to be provided by subclasses ------------------------------------------
    def _slot_kinds(self):
        """Ordered ``{name: (kind, initial_value)}``; kind is ``"exact"``,
        ``"count_sketch"`` or ``"count_min"``."""
        raise NotImplementedError

    def _step(self, g, state, lr, t):
        """Update math: returns what to subtract from the variable's rows."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        self._check_variables(var_list)
        super().build(var_list)
        self._layouts, self._slots, self._memory_rows = [], [], []
        for index, var in enumerate(var_list):
            self._build_variable_state(index, var)
        self._track_state_spec()

    def _choose_layout(self, shape):
        """The 2-D view of a variable and whether it is sketched."""
        layout = Layout(shape)
        if len(shape) < 2:
            return layout, False
        transpose = self.hash_axis == "last" or (self.hash_axis == "auto" and layout.dim > layout.rows)
        hashed = Layout(shape, transpose=True) if transpose else layout
        if hashed.rows >= max(self.min_rows, 1):
            return hashed, True
        return layout, False  # exact state keeps the untransposed view: sparse rows stay sparse

    def _sketch_shape(self, rows):
        width = self.width or sketch_width(rows, self.depth, self.compression)
        if width >= rows:
            return 1, rows  # identity: lossless
        return self.depth, width

    def _build_variable_state(self, index, var):
        layout, sketched = self._choose_layout(var.shape)
        kinds = self._slot_kinds()
        sketched = sketched and any(kind != EXACT for kind, _ in kinds.values())
        params = None
        depth, width = self._sketch_shape(layout.rows) if sketched else (1, layout.rows)
        if sketched:
            values = hash_params(self.seed, index, depth)
            params = self.add_variable(
                shape=values.shape,
                dtype="int64",
                initializer=lambda shape, dtype=None, v=values: tf.constant(v, tf.int64),
                name=f"{_clean(var)}_hash",
            )
        slots = {}
        for name, (kind, initial) in kinds.items():
            init = keras.initializers.Constant(initial)
            if kind == EXACT or not sketched:
                table = self.add_variable(
                    (layout.rows, layout.dim), init, var.dtype, name=f"{_clean(var)}_{name}"
                )
                slots[name] = ExactState(table)
            else:
                table = self.add_variable(
                    (depth, width, layout.dim), init, var.dtype, name=f"{_clean(var)}_{name}_sketch"
                )
                slots[name] = Sketch(table, params, layout.rows, kind)
        self._layouts.append(layout)
        self._slots.append(slots)
        self._memory_rows.append(
            memory.variable_row(var, layout, slots, params, self._exact_slot_count)
        )

    # -- the step --------------------------------------------------------------
    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        layout, slots = self._layouts[index], self._slots[index]
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        t = tf.cast(self.iterations + 1, dtype)
        self._maybe_clean(slots)
        if isinstance(gradient, tf.IndexedSlices) and not layout.sparse_rows:
            self._warn_densify(variable)
            gradient = tf.convert_to_tensor(gradient)
        # The fused C++ op (keras_sketch/fused.py) or the pure-TF math below.
        fused, reason = fused_op.fused_reason(self, layout, variable)
        fused_op.log_choice(self, variable, fused, reason)
        if isinstance(gradient, tf.IndexedSlices):
            ids, values = layout.sparse_view(gradient)
            ids, values, valid = merge_duplicates(ids, tf.cast(values, dtype))
            if fused:
                fused_op.apply_sparse(self, layout, slots, variable, ids, values, valid, lr, t)
                return
            mask = tf.cast(valid, dtype)[:, None]
            delta = self._step(values, StepState(slots, Rows(ids, mask)), lr, t)
            layout.scatter_sub(variable, ids, mask * delta)
        else:
            g = layout.view(tf.cast(gradient, dtype))
            if fused:
                fused_op.apply_dense(self, layout, slots, variable, g, lr, t)
                return
            delta = self._step(g, StepState(slots), lr, t)
            variable.assign_sub(layout.unview(delta))

    def _maybe_clean(self, slots):
        if not self.cleaning_interval or self.cleaning_factor == 1.0:
            return
        targets = [s for s in slots.values() if s.kind == COUNT_MIN and not s.identity]
        if not targets:
            return
        due = tf.equal(tf.math.floormod(self.iterations + 1, self.cleaning_interval), 0)

        def clean():
            for s in targets:
                s.scale(self.cleaning_factor)
            return tf.constant(True)

        tf.cond(due, clean, lambda: tf.constant(False))

    def _warn_densify(self, variable):
        if variable.name not in self._warned_densify:
            self._warned_densify.add(variable.name)
            log.warning(
                "keras_sketch: %s receives sparse gradients but its sketch hashes the last "
                "axis; its gradient is made dense. Pass hash_axis='first' to keep it sparse.",
                variable.name,
            )

    # -- reporting and configuration -------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "depth": self.depth,
                "compression": self.compression,
                "width": self.width,
                "min_rows": self.min_rows,
                "hash_axis": self.hash_axis,
                "seed": self.seed,
                "cleaning_factor": self.cleaning_factor,
                "cleaning_interval": self.cleaning_interval,
                "fused": self.fused,
            }
        )
        return config

def _clean(var):
    return var.path.replace("/", "_").replace(":", "_")


def check_beta(name, value):
    return float(check_number(name, value, 0.0, 1.0, high_open=True))


def check_moment_option(first_moment):
    if first_moment not in (EXACT, "sketch"):
        raise ValueError(f"`first_moment` must be 'exact' or 'sketch', got {first_moment!r}.")
    return first_moment


def moment_kind(first_moment):
    return COUNT_SKETCH if first_moment == "sketch" else EXACT
