"""How the optimizers explain themselves: signature, docstring, repr, name.

``help(keras_sketch.CSAdam)`` shows every argument the class takes, though
most reach the base classes through ``**kwargs``: ``describe`` (called for
every subclass of ``CompressedStateMixin``) builds the class's
``__signature__`` from the ``__init__`` of each class on its MRO and appends
the argument docs each of them declares (``_shared_doc``), so the shared
arguments are written once, here.
"""

import inspect
import numbers
import re

import keras
import numpy as np

KERAS_ARGS_DOC = """
    Keras arguments (those of every ``keras.optimizers.Optimizer``, same meaning):
        weight_decay: decoupled weight decay (``x <- x - lr * weight_decay * x``
            every step, on every row), or None.
        clipnorm, clipvalue, global_clipnorm: gradient clipping, at most one
            (``global_clipnorm`` makes sparse gradients dense: Keras's base
            class multiplies them by a tensor).
        use_ema, ema_momentum, ema_overwrite_frequency: a moving average of the
            model's weights, copied into them every ``ema_overwrite_frequency``
            steps and by ``finalize_variable_values``.
        loss_scale_factor: static loss scale; gradients are divided by it
            before the step (sparse ones stay sparse).
        gradient_accumulation_steps: apply the mean of every N gradients
            (N >= 2; makes sparse gradients dense).
        name: default the class name, made unique as Keras names its
            optimizers (``csadam``, ``csadam_1``, ...).
"""

SKETCH_ARGS_DOC = """
    Sketch arguments (shared by the sketched optimizers):
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
        seed: seed of the hash functions (each variable gets its own), in
            [0, 2**32).
        cleaning_factor, cleaning_interval: multiply count-min sketches by
            ``cleaning_factor`` every ``cleaning_interval`` steps (the paper's
            cleaning heuristic).  Off by default (``cleaning_interval=0``).
        fused: ``None`` (default: the fused C++ op when its library loaded,
            or as ``KERAS_SKETCH_FUSED`` says), ``True`` (require it) or
            ``False`` (pure-TF path).  See ``keras_sketch/fused.py``.
        state_budget: ``None``, or in (0, 1]: the state may use at most this
            fraction of the exact Keras optimizer's state bytes; a planner
            then chooses what to keep, sketch or drop (``keras_sketch/plan.py``;
            not combinable with ``compression``, ``width``, ``min_rows``,
            ``hash_axis``).
        catch_up: ``False`` (default): sparse steps are lazy, rows a step
            does not touch keep their state and weights.  ``True``: when a
            row is next touched, it first gets the decay and weight moves of
            the steps it missed (zero-gradient steps of the dense optimizer),
            from a per-row counter of the step that last touched it (int64,
            8 bytes a row, saved with the state).  Needs exact state
            (lossless configuration; ``ValueError`` at build otherwise) and
            runs in TensorFlow, not the fused op.  CSAdam, CSMomentum and
            CSRMSprop; docs/sparse_training.md, "Lazy updates".
        With ``depth=1, compression=1.0, min_rows=1`` the update is exactly
        the Keras optimizer's (sparse gradients: when every row is touched,
        or on every touched row with ``catch_up=True``; untouched rows are
        updated lazily).
"""


def describe(cls):
    """Makes ``help(cls)`` show every argument ``cls`` takes.

    The arguments a class passes on through ``**kwargs`` (the sketch
    arguments of ``SketchOptimizer``, the Keras base arguments) join its
    signature as keyword-only parameters, and the ``_shared_doc`` of each
    class on the way is appended to its docstring.
    """
    params, docs, seen = [], [], set()
    own = next(k for k in cls.__mro__ if "__init__" in vars(k))  # whose arguments are positional
    for klass in cls.__mro__:
        if "_shared_doc" in vars(klass):
            docs.append(vars(klass)["_shared_doc"])
        init = vars(klass).get("__init__")
        if klass is object or init is None:
            continue
        taken = list(inspect.signature(init).parameters.values())[1:]
        for p in taken:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in seen:
                continue
            seen.add(p.name)
            params.append(p if klass is own else p.replace(kind=p.KEYWORD_ONLY))
        if not any(p.kind == p.VAR_KEYWORD for p in taken):
            break
    params.sort(key=lambda p: p.kind == p.KEYWORD_ONLY)  # stable: own arguments first
    cls.__signature__ = inspect.Signature(params)
    cls.__doc__ = (cls.__doc__ or f"{cls.__name__}.").rstrip() + "\n" + "".join(docs)


def unique_name(prefix):
    """``prefix``, then ``prefix_1``, ``prefix_2``, ...: Keras's naming of
    optimizers (its ``auto_name`` counts in the same table).  Leading
    characters a Keras name scope may not start with (``_``) are dropped:
    a subclass ``_Forced`` is named ``forced``."""
    prefix = prefix.lstrip("_-/>") or "optimizer"
    uid = keras.backend.get_uid(prefix)
    return prefix if uid == 1 else f"{prefix}_{uid - 1}"


def _same(value, default):
    if isinstance(value, float) and isinstance(default, numbers.Real) and not isinstance(default, bool):
        return np.float32(value) == np.float32(default)  # the learning rate is a float32 variable
    return value == default


def _short(value):
    if isinstance(value, float):
        return repr(float(f"{value:.7g}"))  # the float32 learning rate 0.01, not 0.009999999776
    if isinstance(value, dict) and "class_name" in value:
        return f"<{value['class_name']}>"  # a serialized schedule
    return repr(value)


def arguments_repr(optimizer):
    """``ClassName(arg=value, ...)`` with the arguments that differ from the
    signature's defaults (the name only when it was chosen)."""
    cls = type(optimizer)
    try:
        config = optimizer.get_config()
    except AttributeError:  # not fully constructed yet
        return object.__repr__(optimizer)
    shown = []
    for arg, param in inspect.signature(cls).parameters.items():
        if arg not in config or _same(config[arg], param.default):
            continue
        if arg == "name" and re.fullmatch(rf"{cls.__name__.lower()}(_\d+)?", str(config[arg])):
            continue
        shown.append(f"{arg}={_short(config[arg])}")
    return f"{cls.__name__}({', '.join(shown)})"
