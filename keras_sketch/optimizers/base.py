"""The base class of the sketched optimizers: state building and step paths.

Subclasses declare their auxiliary variables (``_slot_kinds``) and write the
update math once (``_step``), in terms of ``StepState.accumulate``/``ema``.
This class decides, in one place (``update_step``), which path a step takes:
row-sparse for ``tf.IndexedSlices`` gradients, dense otherwise.
"""

import dataclasses
import logging
import math
import numbers
import zlib

import keras
import numpy as np
import tensorflow as tf

from keras_sketch import fused as fused_op
from keras_sketch import guard, memory, plan
from keras_sketch.factored import FACTORED, FACTORED_KINDS, FACTORED_SKETCH, FactoredState
from keras_sketch.layers import link_catch_up, warn_if_read_whole
from keras_sketch.optimizers import describe, state_spec
from keras_sketch.sketch import COUNT_MIN, COUNT_SKETCH, EXACT, Sketch, hash_params
from keras_sketch.state import ExactState, Rows, StepState, merge_duplicates
from keras_sketch.tf_internals import in_xla_context, tf_variable, variable_path

HASH_AXES = ("auto", "first", "last")
MAX_DEPTH = 8
MAX_SEED = 2**32 - 1  # the hashes' generator takes the seed's 32 bits
log = logging.getLogger("keras_sketch")


def check_number(name, value, low=None, high=None, low_open=False, high_open=False):
    """Raises ``ValueError`` naming ``name`` unless ``value`` is a finite
    number in range (``TypeError`` unless it is a number at all)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
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


def check_bool(name, value):
    """Booleans must be booleans: ``nesterov='no'`` is not ``True``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


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
    a memory report, a state restore that refuses mismatched state, and
    gradient observers (``add_gradient_observer``).

    Subclasses create their state with ``_add_state_variable`` and fill
    ``self._memory_rows`` (one ``memory.state_row`` dict per model variable)
    in ``build()``, after ``_check_variables``.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        describe.describe(cls)

    def __init__(self, learning_rate, name=None, **kwargs):
        if isinstance(learning_rate, numbers.Real):
            check_number("learning_rate", learning_rate, 0.0)
        if name is None:
            name = describe.unique_name(type(self).__name__.lower())
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self._gradient_observers = _Observers()

    def __repr__(self):
        """``CSAdam(learning_rate=0.01, amsgrad=True)``: the arguments that
        differ from their defaults."""
        return describe.arguments_repr(self)

    _shared_doc = describe.KERAS_ARGS_DOC

    def add_gradient_observer(self, observer):
        """Calls ``observer(grads, variables)`` once per update, inside
        ``apply``, with the gradients the update step receives: unscaled by
        ``loss_scale_factor``, averaged over ``gradient_accumulation_steps``
        and clipped (``clipnorm``, ``clipvalue``, ``global_clipnorm``), in the
        order of ``variables``; sparse gradients stay ``tf.IndexedSlices``.
        The call happens while ``apply`` is traced, so an observer that
        records must do so with TensorFlow ops (``tf.Variable`` updates);
        a ``tf.function`` traced before the observer was added does not call
        it (Keras's ``model.make_train_function(force=True)`` traces again).
        Under ``tf.distribute`` it runs once per replica, with that replica's
        gradients.  Returns a function that removes the observer.
        (``keras_sketch.diagnostics.ShadowCallback`` uses this hook.)
        """
        if not callable(observer):
            raise TypeError(f"`observer` must be callable, got {observer!r}.")
        self._gradient_observers.fns.append(observer)

        def remove():
            if observer in self._gradient_observers.fns:
                self._gradient_observers.fns.remove(observer)

        return remove

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Keras calls this once per update, after its unscaling, accumulation
        # and clipping, with the gradients every update_step then receives.
        for observer in list(self._gradient_observers.fns):
            observer(list(grads), list(trainable_variables))
        return super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _add_state_variable(self, var, suffix, shape, initializer="zeros", dtype=None):
        """One state variable of model variable ``var``, named
        ``<var's path>_<suffix>`` (``/`` and ``:`` replaced), ``var``'s dtype
        unless ``dtype`` is given: how every keras_sketch optimizer names its state."""
        name = variable_path(var).replace("/", "_").replace(":", "_")
        return self.add_variable(shape, initializer, dtype or var.dtype, name=f"{name}_{suffix}")

    def _check_variables(self, var_list):
        for var in var_list:
            if not keras.backend.is_float_dtype(var.dtype):
                raise TypeError(
                    f"{type(self).__name__} updates floating-point variables only; "
                    f"variable {variable_path(var)!r} has dtype {var.dtype}."
                )

    def memory_report(self):
        """Per-variable optimizer-state memory against the exact optimizer."""
        if not self.built:
            raise ValueError("The optimizer is not built yet: call `build(variables)` or train first.")
        return memory.MemoryReport(self._memory_rows, getattr(self, "state_budget", None))

    def apply(self, grads, trainable_variables=None):
        """``keras.optimizers.Optimizer.apply``, after validating every
        gradient against its variable (``keras_sketch.guard``: an invalid
        step raises before any variable is written), with sparse loss
        unscaling: Keras unscales gradients with ``g / loss_scale_factor``,
        a TypeError for ``tf.IndexedSlices``; they are wrapped so the
        division keeps them sparse (see ``SparseUnscale``).
        """
        grads = list(grads)
        variables = trainable_variables if trainable_variables is not None else self._trainable_variables
        checks = [c for c in guard.check_gradients(grads, list(variables or [])) if c is not None]
        with tf.control_dependencies(checks):  # every op of the step runs after them
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
        """Keras's variables, plus the state spec with a checksum of every
        state variable (``.weights.h5`` files have no checksum of their own)."""
        super().save_own_variables(store)
        spec = state_spec.state_spec(self)
        spec["checksum"] = _checksum(np.asarray(v) for v in self.variables)
        store[state_spec.SPEC_KEY] = state_spec.encode(spec)

    def load_own_variables(self, store):
        """Restores the state; refuses state saved with other sketch settings,
        by another optimizer, or corrupted since it was saved.

        Keras's base class warns and skips loading when the number of
        variables differs, which would silently drop trained state.
        """
        keys = [k for k in store.keys() if k != state_spec.SPEC_KEY]
        saved = [np.asarray(store[str(i)]) for i in range(len(keys))]
        ours = self.variables
        if state_spec.SPEC_KEY not in store.keys():
            raise ValueError(
                f"Cannot load the state of optimizer {self.name!r} ({type(self).__name__}): the "
                f"saved optimizer state ({len(saved)} variables) has no keras_sketch state spec, so "
                "it was saved by another optimizer (e.g. keras.optimizers.Adam). Optimizer state "
                "does not carry over between optimizers: compile with the saved optimizer, or "
                "load the model weights only (`load_weights(..., skip_mismatch=True)` / "
                "`compile=False`) and start the optimizer afresh."
            )
        saved_spec = state_spec.decode(store[state_spec.SPEC_KEY])
        error = state_spec.mismatch(self.name, saved_spec, state_spec.state_spec(self))
        if error:
            raise ValueError(error)
        if len(saved) != len(ours):
            raise ValueError(
                f"Cannot load the state of optimizer {self.name!r}: it has {len(ours)} "
                f"variables but the saved state has {len(saved)}. The saved optimizer was "
                "built with other sketch settings (depth, width, compression, min_rows, "
                "hash_axis, state_budget, momentum options) or for other model variables."
            )
        for var, value in zip(ours, saved):
            if tuple(var.shape) != tuple(value.shape) or tf.as_dtype(var.dtype).as_numpy_dtype != value.dtype:
                raise ValueError(
                    f"Cannot load the state of optimizer {self.name!r}: variable "
                    f"{variable_path(var)!r} is {tuple(var.shape)} {var.dtype} but the saved one is "
                    f"{tuple(value.shape)} {value.dtype}. The saved optimizer used other settings "
                    "(depth, width, compression, hash_axis or state_budget) or another dtype."
                )
        if "checksum" in saved_spec and saved_spec["checksum"] != _checksum(saved):
            raise ValueError(
                f"Cannot load the state of optimizer {self.name!r}: the saved optimizer state is "
                "corrupted (its checksum does not match the one written when it was saved). "
                "Nothing was loaded."
            )
        for var, value in zip(ours, saved):
            var.assign(value)


class SketchOptimizer(CompressedStateMixin, keras.optimizers.Optimizer):
    """Base class: Keras optimizer whose large state lives in count-sketches.

    Subclasses list their own arguments; ``describe`` adds the sketch and
    Keras arguments below to their signature and docstring.
    """

    _shared_doc = describe.SKETCH_ARGS_DOC

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
        state_budget=None,
        catch_up=False,
        name=None,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.catch_up = check_bool("catch_up", catch_up)
        if self.catch_up and type(self)._catch_up is SketchOptimizer._catch_up:
            raise ValueError(f"`catch_up` is not available for {type(self).__name__}: {self._no_catch_up}.")
        self.depth = check_int("depth", depth, 1, MAX_DEPTH)
        self.compression = float(check_number("compression", compression, 0.0, 1.0, low_open=True))
        self.width = None if width is None else check_int("width", width, 1)
        self.min_rows = check_int("min_rows", min_rows, 0)
        if hash_axis not in HASH_AXES:
            raise ValueError(f"`hash_axis` must be one of {HASH_AXES}, got {hash_axis!r}.")
        self.hash_axis = hash_axis
        self.seed = check_int("seed", seed, 0, MAX_SEED)
        self.cleaning_factor = float(check_number("cleaning_factor", cleaning_factor, 0.0, 1.0))
        self.cleaning_interval = check_int("cleaning_interval", cleaning_interval, 0)
        self.state_budget = None if state_budget is None else float(
            check_number("state_budget", state_budget, 0.0, 1.0, low_open=True)
        )
        if self.state_budget is not None:
            chosen = {"compression": compression != 0.2, "width": width is not None,
                      "min_rows": min_rows != 4096, "hash_axis": hash_axis != "first"}
            for arg, given in chosen.items():
                if given:
                    raise ValueError(
                        f"`{arg}` cannot be combined with `state_budget`: the budget's planner "
                        "chooses what to sketch, along which axis and how wide. Pass one or the other."
                    )
        self._warned_densify = set()
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"`fused` must be None, True or False, got {fused!r}.")
        self.fused = fused_op.check_request(fused)

    # -- to be provided by subclasses ------------------------------------------
    def _slot_kinds(self):
        """Ordered ``{name: (kind, initial_value)}``; kind is ``"exact"``,
        ``"count_sketch"`` or ``"count_min"``."""
        raise NotImplementedError

    def _step(self, g, state, lr, t):
        """Update math: returns what to subtract from the variable's rows."""
        raise NotImplementedError

    # Why ``catch_up`` is not offered, for optimizers without ``_catch_up``.
    _no_catch_up = "it has no catch-up rule"

    def _catch_up(self, state, last, skipped, lr_at):
        """The missed steps of the step's rows (``catch_up=True``), before
        their own step: decays their slots as ``skipped`` ``[k, 1]`` steps
        with a zero gradient would (steps ``last + 1 .. last + skipped``,
        ``last`` ``[k, 1]`` the step that last touched each row) and returns
        the weight move those steps make (``[k, dim]``, to subtract).
        ``lr_at(t)`` is the learning rate of step(s) ``t``."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------
    # Slots the update math can run without (``state_budget`` drops them first).
    _droppable_slots = ()

    def build(self, var_list):
        """Plans every variable's state (``keras_sketch.plan``: what is exact,
        sketched or dropped, along which axis, and the step's path), then
        creates exactly the state variables the plans list.  Called by Keras
        on the first ``apply``; ``memory_report()`` shows the plans."""
        if self.built:
            return
        self._check_variables(var_list)
        plans = self._make_plans(var_list)
        if self.catch_up:
            _check_exact_for_catch_up(var_list, plans)
        super().build(var_list)
        self._plans = [
            dataclasses.replace(p, **dict(zip(("fused", "fused_reason"), self._path(p, v))))
            for p, v in zip(plans, var_list)
        ]
        self.dropped_slots = tuple(sorted({n for p in self._plans for n in p.dropped}))
        self._layouts, self._slots, self._memory_rows, self._last_step = [], [], [], []
        for index, (var, var_plan) in enumerate(zip(var_list, self._plans)):
            fused_op.log_choice(self, var, var_plan.fused, var_plan.fused_reason)
            self._build_variable_state(index, var, var_plan)
        self._track_state_spec()

    def _make_plans(self, var_list):
        """Every variable's ``plan.VariablePlan``: the one place that decides."""
        kinds = self._slot_kinds()
        if self.state_budget is None:
            return [
                plan.rule_plan(v.shape, kinds, self.depth, self.compression, self.width,
                               self.min_rows, self.hash_axis)
                for v in var_list
            ]
        return plan.budget_plans(
            [tuple(v.shape) for v in var_list],
            [memory.itemsize(v.dtype) for v in var_list],
            kinds, self._droppable_slots, self._exact_slot_count, self.state_budget, self.depth,
            estimator=self._budget_estimator(),
        )

    def _budget_estimator(self):
        """The 2nd-moment form ``state_budget``'s planner may use
        (``plan.ESTIMATORS``); ``"auto"``: its rules choose."""
        return "auto"

    def _path(self, var_plan, var):
        """``(fused, reason)``: whether the fused op can run this variable's step."""
        option = "catch_up" if self.catch_up else self._fused_unsupported()
        if option:
            return False, f"{option}: the fused op has no kernel for it"
        if set(FACTORED_KINDS) & set(var_plan.compressed_kinds):
            return False, "factored state (the fused op has no kernel for it)"
        return fused_op.fused_reason(self, var_plan.layout, var)

    def _fused_unsupported(self):
        """The option of this optimizer the fused op cannot run (e.g.
        ``"amsgrad"``), or None."""
        return None

    def _build_variable_state(self, index, var, var_plan):
        """Creates the state variables ``var_plan`` lists."""
        layout = var_plan.layout
        params = None
        if var_plan.hashed:
            values = hash_params(self.seed, index, var_plan.depth)
            params = self._add_state_variable(
                var, "hash", values.shape, lambda shape, dtype=None, v=values: tf.constant(v, tf.int64), "int64"
            )
        slots = {}
        for slot in var_plan.slots:
            init = _filled(slot.initial)
            if slot.kind == FACTORED:
                row = self._add_state_variable(var, f"{slot.name}_row", slot.shape[:1], init)
                col = self._add_state_variable(var, f"{slot.name}_col", slot.shape[1:], init)
                slots[slot.name] = FactoredState(row, col)
            elif slot.kind == FACTORED_SKETCH:  # R hashed into a [1, width, 1] table, C exact
                depth, width, dim = slot.shape
                table = self._add_state_variable(var, f"{slot.name}_row_sketch", (depth, width, 1), init)
                col = self._add_state_variable(var, f"{slot.name}_col", (dim,), init)
                row = Sketch(table, params, layout.rows, COUNT_MIN, known_params=values)
                slots[slot.name] = FactoredState(row, col)
            elif slot.sketched:
                table = self._add_state_variable(var, f"{slot.name}_sketch", slot.shape, init)
                slots[slot.name] = Sketch(table, params, layout.rows, slot.kind)
            else:
                table = self._add_state_variable(var, slot.name, slot.shape, init)
                slots[slot.name] = ExactState(table)
        counter = None
        if self.catch_up:  # the step that last touched each row (0: none yet)
            counter = self._add_state_variable(var, "last_step", (layout.rows,), "zeros", "int64")
            link_catch_up(var, self)
        self._last_step.append(counter)
        self._layouts.append(layout)
        self._slots.append(slots)
        self._memory_rows.append(
            memory.variable_row(var, var_plan, slots, params, self._exact_slot_count, counter)
        )

    # -- the step --------------------------------------------------------------
    def update_step(self, gradient, variable, learning_rate):
        """One variable's step, on the path its plan chose: row-sparse for a
        ``tf.IndexedSlices`` gradient (duplicate ids merged, only the touched
        rows and their buckets change), dense otherwise; through the fused
        C++ op where the plan allows it, else the optimizer's ``_step`` in
        TensorFlow.  Gradient rows holding NaN/Inf are left out first
        (``keras_sketch.guard``)."""
        index = self._get_variable_index(variable)
        var_plan, slots = self._plans[index], self._slots[index]
        layout, dtype = var_plan.layout, variable.dtype
        lr = tf.cast(learning_rate, dtype)
        t = tf.cast(self.iterations + 1, dtype)
        self._maybe_clean(slots)
        if isinstance(gradient, tf.IndexedSlices) and not layout.sparse_rows:
            self._warn_densify(variable)
            gradient = tf.convert_to_tensor(gradient)
        # The plan chose the fused op where it can run; XLA compiles no custom op.
        fused = var_plan.fused and not in_xla_context()
        if isinstance(gradient, tf.IndexedSlices):
            warn_if_read_whole(self, variable)
            ids, values = layout.sparse_view(gradient)
            values, finite = guard.finite_rows(tf.cast(values, dtype))
            if in_xla_context():
                finite = finite & guard.in_range(ids, layout.rows)
                ids = tf.where(finite, ids, tf.zeros_like(ids))
            guard.report_dropped(variable, finite)
            values = values * tf.cast(finite, dtype)[:, None]
            ids, values, valid = merge_duplicates(ids, values, keep=finite)
            if fused:
                fused_op.apply_sparse(self, layout, slots, variable, ids, values, valid, lr, t)
                return
            mask = tf.cast(valid, dtype)[:, None]
            state = StepState(slots, Rows(ids, mask))
            missed = self._catch_up_rows(index, state, ids, valid, lr) if self.catch_up else 0.0
            delta = self._step(values, state, lr, t)
            layout.scatter_sub(variable, ids, mask * (delta + missed))
        else:
            g, finite = guard.finite_rows(layout.view(tf.cast(gradient, dtype)))
            guard.report_dropped(variable, finite)
            if fused:
                fused_op.apply_dense(self, layout, slots, variable, g, lr, t)
                return
            missed = 0.0
            if self.catch_up:  # every row is touched: all catch up (through the row path)
                ids, rows = _every_row(layout, dtype)
                missed = self._catch_up_rows(index, StepState(slots, rows), ids, None, lr)
            delta = self._step(g, StepState(slots), lr, t)
            variable.assign_sub(layout.unview(delta + missed))

    def catch_up_all(self):
        """With ``catch_up=True``: brings every row up to date now, applying
        the decay and moves of the steps each row missed since it was last
        touched (a dense operation on every table), so the weights equal
        the dense optimizer's on *every* row, not only on touched ones.
        Call it before evaluating, exporting or saving weights for use
        without the optimizer; training continues correctly afterwards.
        Does nothing with ``catch_up=False`` or before the first step."""
        if not self.catch_up or not self.built:
            return
        lr = tf.convert_to_tensor(self.learning_rate)
        for index, variable in enumerate(self._trainable_variables):
            layout, dtype = self._layouts[index], variable.dtype
            ids, rows = _every_row(layout, dtype)
            missed = self._catch_up_rows(index, StepState(self._slots[index], rows), ids, None,
                                         tf.cast(lr, dtype), done=True)
            variable.assign_sub(layout.unview(missed))

    def pending_move(self, variable, ids):
        """With ``catch_up=True``: the weight move rows ``ids`` of ``variable``
        still owe for the steps they missed since they were last touched, as
        of the step about to be taken.  ``variable[ids] - pending_move(...)``
        is what the dense optimizer's rows hold now; a training forward pass
        of ``keras_sketch.layers.Embedding`` reads its rows so, and the step
        then applies the same moves (``_catch_up_rows``), so gradients are
        taken where the dense optimizer takes them.  Only reads (state and
        counters are unchanged) and only the rows ``ids``.  ``ids``: int
        tensor of any shape; the result has shape ``ids.shape + [dim]``, or
        is None when nothing is owed by construction (``catch_up=False``,
        not built yet, or no missed move, e.g. Adam with ``beta_1=0``)."""
        if not (self.catch_up and self.built):
            return None
        index = self._get_variable_index(variable)
        layout, dtype = self._layouts[index], variable.dtype
        if not layout.sparse_rows or len(layout.shape) != 2:
            raise ValueError(f"`pending_move` needs a [rows, dim] variable, got {variable_path(variable)!r} "
                             f"of shape {layout.shape}.")
        flat = tf.reshape(tf.cast(ids, tf.int64), [-1])
        last = tf_variable(self._last_step[index]).sparse_read(flat)
        lr = tf.cast(tf.convert_to_tensor(self.learning_rate), dtype)
        rows = Rows(flat, tf.ones(tf.stack([tf.size(flat), 1]), dtype))
        move = self._missed_since(StepState(self._slots[index], rows, frozen=True), last, lr)
        if isinstance(move, float):
            return None
        return tf.reshape(move, tf.concat([tf.shape(ids), [layout.dim]], 0))

    def _catch_up_rows(self, index, state, ids, valid, lr, done=False):
        """Applies the steps rows ``ids`` missed since they were last touched
        (``_catch_up``), records this step as their last, and returns the
        missed weight move (``[k, dim]``).  ``valid`` (bool ``[k]`` or None)
        marks real rows: padding and left-out rows are not recorded.  With
        ``done`` the rows are brought up to the last completed step instead
        of the one being taken (``catch_up_all``)."""
        counter = tf_variable(self._last_step[index])
        last = tf.gather(tf.convert_to_tensor(counter), ids) if valid is None else counter.sparse_read(ids)
        missed = self._missed_since(state, last, lr)
        stamp = tf.fill(tf.shape(ids), tf.cast(self.iterations, tf.int64) + (0 if done else 1))
        if valid is None:
            counter.assign(stamp)
        else:  # entries that are no real rows keep their stamp; XLA's (all id 0) agree with a real row 0
            row_zero = tf.equal(ids, 0)
            touched = valid | (row_zero & tf.reduce_any(valid & row_zero))
            counter.scatter_nd_update(ids[:, None], tf.where(touched, stamp, last))
        return missed

    def _missed_since(self, state, last, lr):
        """``_catch_up`` of rows last touched at steps ``last`` (int64 ``[k]``):
        the steps ``last + 1 .. iterations`` they missed, completed steps
        only (the step being taken, if any, is applied after)."""
        skipped = (tf.cast(self.iterations, tf.int64) - last)[:, None]
        return self._catch_up(state, tf.cast(last, lr.dtype)[:, None], skipped, self._learning_rate_at(lr))

    def _learning_rate_at(self, lr):
        """``lr_at(t)``: the learning rate step(s) ``t`` (1-based, a float
        tensor) used.  A ``LearningRateSchedule`` is evaluated at their
        iterations ``t - 1`` (it must accept a tensor of steps, as Keras's
        built-in decays do); a float or callable learning rate is taken as
        constant over the missed steps: this step's ``lr``."""
        schedule = self._learning_rate
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            return lambda t: tf.cast(schedule(t - 1.0), lr.dtype)
        return lambda t: lr

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
                "state_budget": self.state_budget,
                "catch_up": self.catch_up,
            }
        )
        return config

class _Observers:
    """The gradient observers of one optimizer (a plain holder: Keras and
    TensorFlow track lists set on an optimizer as checkpoint dependencies)."""

    def __init__(self):
        self.fns = []


def _every_row(layout, dtype):
    """``(ids, Rows)`` of every row of a layout: the catch-up of a dense step
    and of ``catch_up_all`` goes through the row path."""
    ids = tf.range(layout.rows, dtype=tf.int64)
    return ids, Rows(ids, tf.ones([layout.rows, 1], dtype))


def _check_exact_for_catch_up(var_list, plans):
    """``catch_up`` replays a row's missed steps from its own state, which
    only exact (per-row) state has: a sketch bucket or a factored estimate
    mixes rows that skipped different numbers of steps."""
    for var, var_plan in zip(var_list, plans):
        if var_plan.sketched:
            kinds = ", ".join(var_plan.compressed_kinds)
            raise ValueError(
                f"`catch_up=True` needs exact per-row state, but variable {variable_path(var)!r} "
                f"{tuple(var.shape)} would keep {kinds} state (width {var_plan.width} < "
                f"{var_plan.layout.rows} rows, or factored): its rows share buckets and cannot catch "
                "up separately. Use a lossless configuration (depth=1, compression=1.0 or "
                "width >= rows, or min_rows above the variable's rows; no state_budget below 1), "
                "or catch_up=False."
            )


def _filled(value):
    """An initializer whose only full-size buffer is the state itself:
    ``tf.fill`` makes one tensor, which the new variable adopts.
    (``keras.initializers.Constant`` multiplies a full-size ``ones`` by the
    value: a temporary as large as the slot at build time.)"""
    return lambda shape, dtype=None: tf.fill(shape, tf.cast(value, dtype))



def _checksum(arrays):
    """CRC-32 of the bytes of ``arrays`` in order (as a hex string)."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
    return f"{crc:08x}"




def check_beta(name, value):
    return float(check_number(name, value, 0.0, 1.0, high_open=True))


def check_moment_option(first_moment):
    if first_moment not in (EXACT, "sketch"):
        raise ValueError(f"`first_moment` must be 'exact' or 'sketch', got {first_moment!r}.")
    return first_moment


def moment_kind(first_moment):
    return COUNT_SKETCH if first_moment == "sketch" else EXACT
