"""keras_sketch.layers.Embedding: equal to keras.layers.Embedding in outputs,
masks, gradients, saving and training; a traced step never reads the table whole."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks
import keras_sketch.distributed
from keras_sketch.tf_internals import tf_variable

ROWS, DIM, SEQ = 500, 6, 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pair(**kwargs):
    """Keras's layer and ours, built, with the same weights."""
    theirs = keras.layers.Embedding(ROWS, DIM, **kwargs)
    ours = ks.layers.Embedding(ROWS, DIM, **kwargs)
    theirs.build()
    ours.build()
    ours.set_weights(theirs.get_weights())
    return theirs, ours


def ids(seed=0, shape=(8, SEQ), low=0):
    return np.random.default_rng(seed).integers(low, ROWS, size=shape)


def table_op_types(concrete, variable):
    """Types of the ops of a traced function (and of the functions it calls:
    ``If``/``While``/``PartitionedCall`` bodies) that take ``variable``'s
    resource handle as input."""

    def consumers(graph, tensor):
        types = []
        for op in tensor.consumers():
            types.append(op.type)
            if op.type == "Identity":
                types += consumers(graph, op.outputs[0])
            offset = 1 if op.type in ("If", "StatelessIf") else 0  # input 0 is the predicate
            for attr in ("f", "then_branch", "else_branch", "body", "cond"):
                try:
                    fn = op.get_attr(attr)
                except (ValueError, TypeError):
                    continue
                sub = graph._get_function(fn.name).graph
                for position, x in enumerate(op.inputs):
                    if x is tensor:
                        types += consumers(sub, sub.inputs[position - offset])
        return types

    handle = tf_variable(variable).handle
    internal = [inner for outer, inner in concrete.graph.captures if outer is handle]
    assert len(internal) == 1, "the traced function does not capture the table"
    return consumers(concrete.graph, internal[0])


def small_model(layer_cls, seed=3, rows=ROWS, **layer_kwargs):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SEQ,), dtype="int32")
    h = layer_cls(rows, DIM, name="table", **layer_kwargs)(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(8, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def data(n=64, seed=0, rows=ROWS):
    rng = np.random.default_rng(seed)
    x = (rng.zipf(1.3, size=(n, SEQ)) % rows).astype(np.int32)
    y = (x[:, :1] % 7 == 0).astype(np.float32) + 0.1 * rng.normal(size=(n, 1)).astype(np.float32)
    return x, y


# --- the forward pass -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32"])
def test_outputs_equal_keras_including_negative_ids(dtype):
    theirs, ours = pair()
    x = ids(low=-ROWS).astype(dtype)  # negative ids count from the end, as ops.take
    np.testing.assert_array_equal(ours(x), theirs(x))
    assert ours(x).dtype == theirs(x).dtype


def test_ragged_and_sparse_ids_equal_keras():
    theirs, ours = pair()
    ragged = tf.ragged.constant([[1, 2, 3], [4], [], [-1, 7]], dtype=tf.int64)
    out = ours(ragged)
    assert isinstance(out, tf.RaggedTensor)
    np.testing.assert_array_equal(out.flat_values, theirs(ragged).flat_values)
    np.testing.assert_array_equal(out.row_splits, theirs(ragged).row_splits)
    sparse = tf.sparse.from_dense(tf.constant([[1, 0, 3], [0, 2, 0]], tf.int64))
    np.testing.assert_array_equal(ours(sparse), theirs(sparse))


def test_forward_gathers_rows_only():
    _, ours = pair()
    for spec in (tf.TensorSpec([None, SEQ], tf.int32), tf.SparseTensorSpec([None, SEQ], tf.int64),
                 tf.RaggedTensorSpec([None, None], tf.int64)):
        fn = tf.function(ours).get_concrete_function(spec)
        types = table_op_types(fn, ours.embeddings)
        assert types == ["ResourceGather"], (spec, types)


def test_mask_equals_keras_and_propagates():
    theirs, ours = pair(mask_zero=True)
    x = ids()
    x[:, -2:] = 0
    np.testing.assert_array_equal(ours.compute_mask(x), theirs.compute_mask(x))
    for layer in (theirs, ours):
        assert layer.supports_masking

    def pooled(cls):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((SEQ,), dtype="int32")
        h = cls(ROWS, DIM, mask_zero=True, name="e")(inputs)
        model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(h))
        return model

    a, b = pooled(keras.layers.Embedding), pooled(ks.layers.Embedding)
    b.set_weights(a.get_weights())
    np.testing.assert_allclose(b(x), a(x), rtol=1e-6)
    # the mask mattered: without it the average differs
    unmasked = keras.ops.mean(b.get_layer("e").embeddings.numpy()[x], axis=1)
    assert not np.allclose(unmasked, b(x))


def test_gradients_equal_keras_and_are_sparse():
    theirs, ours = pair()
    x = ids()
    w = tf.constant(np.random.default_rng(1).normal(size=(1, 1, DIM)), tf.float32)
    grads = []
    for layer in (theirs, ours):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2 * w)
        grads.append(tape.gradient(loss, layer.trainable_variables)[0])
    assert isinstance(grads[1], tf.IndexedSlices)
    np.testing.assert_allclose(tf.convert_to_tensor(grads[1]), tf.convert_to_tensor(grads[0]), rtol=1e-6)


def test_mixed_precision_equals_keras():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        theirs, ours = pair()
        x = ids()
        assert ours.embeddings.dtype == "float32"
        assert ours(x).dtype == "float16"
        np.testing.assert_array_equal(ours(x), theirs(x))
        fn = tf.function(ours).get_concrete_function(tf.TensorSpec([None, SEQ], tf.int32))
        assert "ReadVariableOp" not in table_op_types(fn, ours.embeddings)
    finally:
        keras.mixed_precision.set_global_policy("float32")


# --- configuration, saving, LoRA, quantization ----------------------------------


def test_config_is_keras_config_and_round_trips():
    kwargs = dict(mask_zero=True, embeddings_initializer="he_normal", embeddings_regularizer="l2", name="e")
    theirs, ours = pair(**kwargs)
    assert ours.get_config() == theirs.get_config()
    again = ks.layers.Embedding.from_config(ours.get_config())
    assert type(again) is ks.layers.Embedding and again.mask_zero
    serialized = keras.saving.serialize_keras_object(ours)
    assert serialized["registered_name"] == "keras_sketch>Embedding"
    assert type(keras.saving.deserialize_keras_object(serialized)) is ks.layers.Embedding


def test_weights_argument_and_errors_as_keras():
    table = np.arange(ROWS * DIM, dtype=np.float32).reshape(ROWS, DIM)
    layer = ks.layers.Embedding(ROWS, DIM, weights=table)
    np.testing.assert_array_equal(layer(np.array([[3, 4]])), table[[[3, 4]]])
    with pytest.raises(ValueError, match="input_dim"):
        ks.layers.Embedding(0, DIM)
    with pytest.raises(ValueError, match="output_dim"):
        ks.layers.Embedding(ROWS, 2.5)


def test_keras_file_round_trip_and_keras_weights_load(tmp_path):
    model = small_model(ks.layers.Embedding)
    model.compile(ks.CSAdam(learning_rate=0.01, min_rows=1), "mse")
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("table")) is ks.layers.Embedding
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # training goes on from the saved optimizer state exactly as without saving
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # weights saved from a model with Keras's layer load into one with ours
    keras_model = small_model(keras.layers.Embedding, seed=9)
    keras_model.save_weights(str(tmp_path / "k.weights.h5"))
    ours = small_model(ks.layers.Embedding, seed=4)
    ours.load_weights(str(tmp_path / "k.weights.h5"))
    np.testing.assert_array_equal(ours.predict(x, verbose=0), keras_model.predict(x, verbose=0))


def test_lora_equals_keras():
    theirs, ours = pair(lora_rank=2, name="e")
    assert ours.lora_enabled and [v.name for v in ours.trainable_variables] == ["lora_embeddings_a", "lora_embeddings_b"]
    rng = np.random.default_rng(2)
    for layer in (theirs, ours):  # B starts at zero: give the product something to show
        layer.lora_embeddings_b.assign(rng.normal(size=(2, DIM)).astype(np.float32))
    ours.lora_embeddings_a.assign(theirs.lora_embeddings_a)
    ours.lora_embeddings_b.assign(theirs.lora_embeddings_b)
    x = ids()
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-7)
    grads = []
    for layer in (theirs, ours):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        grads.append([tf.convert_to_tensor(g) for g in tape.gradient(loss, layer.trainable_variables)])
    for a, b in zip(grads[1], grads[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert ours.get_config() == theirs.get_config()


def test_lora_saving_merges_as_keras(tmp_path):
    model = small_model(ks.layers.Embedding, lora_rank=2)
    layer = model.get_layer("table")
    layer.lora_embeddings_b.assign(np.ones((2, DIM), np.float32))
    x, _ = data()
    path = str(tmp_path / "lora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("table")) is ks.layers.Embedding
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_int8_quantization_equals_keras(tmp_path):
    theirs, ours = pair()
    theirs.quantize("int8")
    ours.quantize("int8")
    assert ours.quantization_mode == "int8"
    x = ids()
    np.testing.assert_array_equal(ours(x), theirs(x))
    model = small_model(ks.layers.Embedding)
    model.quantize("int8")
    path = str(tmp_path / "q.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("table").quantization_mode == "int8"
    xx, _ = data()
    np.testing.assert_array_equal(loaded.predict(xx, verbose=0), model.predict(xx, verbose=0))


# --- training -----------------------------------------------------------------------

OPTIMIZERS = {
    "csadam": lambda: ks.CSAdam(learning_rate=0.01, min_rows=64),
    "csadam_beta1_0": lambda: ks.CSAdam(learning_rate=0.01, beta_1=0.0, min_rows=64),
    "csadam_sketched_m": lambda: ks.CSAdam(learning_rate=0.01, min_rows=64, depth=2, first_moment="sketch"),
    "csadam_exact": lambda: ks.CSAdam(learning_rate=0.01, compression=1.0, min_rows=1),
    "csadagrad": lambda: ks.CSAdagrad(learning_rate=0.05, min_rows=64),
    "csmomentum": lambda: ks.CSMomentum(learning_rate=0.05, momentum=0.9, min_rows=64),
    "csrmsprop": lambda: ks.CSRMSprop(learning_rate=0.01, min_rows=64),
    "sm3": lambda: ks.SM3(learning_rate=0.1),
}


def trained(layer_cls, make_optimizer, jit_compile=False, epochs=2):
    model = small_model(layer_cls)
    model.compile(make_optimizer(), "mse", jit_compile=jit_compile)
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False)
    return model


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_training_equals_training_with_keras_layer(name):
    theirs = trained(keras.layers.Embedding, OPTIMIZERS[name])
    ours = trained(ks.layers.Embedding, OPTIMIZERS[name])
    initial = small_model(keras.layers.Embedding).get_weights()[0]
    assert not np.allclose(ours.get_weights()[0], initial), "the table did not train"
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(ours.optimizer.variables, theirs.optimizer.variables):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["csadam", "csadagrad"])
def test_jit_compiled_training_equals_keras_layer(name):
    theirs = trained(keras.layers.Embedding, OPTIMIZERS[name], jit_compile=True, epochs=1)
    ours = trained(ks.layers.Embedding, OPTIMIZERS[name], jit_compile=True, epochs=1)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_with_keras_adam_equals_keras_layer():
    make = lambda: keras.optimizers.Adam(learning_rate=0.01)  # noqa: E731
    theirs, ours = trained(keras.layers.Embedding, make), trained(ks.layers.Embedding, make)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# --- the traced step does not read the table whole ----------------------------------


def traced_step_ops(layer_cls, optimizer, jit_compile=False):
    """Op types on the table's handle in a traced ``model.train_step``
    (forward, gradient and optimizer update), after one real step so the
    optimizer is built."""
    model = small_model(layer_cls)
    model.compile(optimizer, "mse")
    x, y = data(n=16)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    step = tf.function(model.train_step, jit_compile=jit_compile)
    concrete = step.get_concrete_function((tf.constant(x), tf.constant(y)))
    return table_op_types(concrete, model.get_layer("table").embeddings)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_with_our_layer_reads_no_whole_table(name):
    types = traced_step_ops(ks.layers.Embedding, OPTIMIZERS[name]())
    assert "ReadVariableOp" not in types, types
    assert "ResourceGather" in types, types
    # ... while the same step with Keras's layer does (so this test can fail)
    assert "ReadVariableOp" in traced_step_ops(keras.layers.Embedding, OPTIMIZERS[name]())


def test_jit_compiled_step_reads_no_whole_table():
    types = traced_step_ops(ks.layers.Embedding, OPTIMIZERS["csadam"](), jit_compile=True)
    assert "ReadVariableOp" not in types and "ResourceGather" in types, types


# --- tf.distribute ----------------------------------------------------------------

MIRRORED = r"""
import json, sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import keras_sketch as ks
import keras_sketch.distributed
from tests.test_layers import data, small_model, table_op_types

strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
x, y = data(n=32)
out = {}
for name, cls in [("keras", keras.layers.Embedding), ("ours", ks.layers.Embedding)]:
    with strategy.scope():
        model = small_model(cls)
        model.compile(ks.CSAdam(learning_rate=0.01, min_rows=64), "mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    with strategy.scope():
        model2 = small_model(cls)
        optimizer = ks.CSAdagrad(learning_rate=0.05, min_rows=64)
        trainer = ks.distributed.Trainer(model2, optimizer, keras.losses.mean_squared_error, strategy)
    for start in range(0, 32, 16):
        trainer.train_step(x[start:start + 16], y[start:start + 16])
    table = model2.get_layer("table").embeddings
    concrete = trainer._step.get_concrete_function(*trainer.shard(x[:16], y[:16]), tf.constant(16, tf.int64))
    components = strategy.experimental_local_results(table.value)
    reads = [t for c in components for t in table_op_types(concrete, c)]
    out[name] = {"fit": [w.tolist() for w in model.get_weights()],
                 "trainer": [w.tolist() for w in model2.get_weights()], "ops": reads}
print("RESULT" + json.dumps(out))
"""


def test_mirrored_strategy_training_equals_keras_layer():
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "-c", MIRRORED], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    for loop in ("fit", "trainer"):
        for a, b in zip(out["ours"][loop], out["keras"][loop]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-7)
    # every replica gathers its rows from its own copy of the table
    assert "ReadVariableOp" not in out["ours"]["ops"] and out["ours"]["ops"].count("ResourceGather") == 2
    assert "ReadVariableOp" in out["keras"]["ops"]


# --- the one-time warning ---------------------------------------------------------


@pytest.mark.parametrize("make", [OPTIMIZERS["csadam"], OPTIMIZERS["sm3"]], ids=["csadam", "sm3"])
def test_optimizer_warns_once_when_a_sparse_table_is_read_whole(make, caplog):
    x, y = data()
    with caplog.at_level("WARNING", logger="keras_sketch"):
        model = small_model(keras.layers.Embedding)
        model.compile(make(), "mse")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    warnings = [r for r in caplog.records if "reads it whole" in r.getMessage()]
    assert len(warnings) == 1 and "table/embeddings" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="keras_sketch"):
        model = small_model(ks.layers.Embedding)
        model.compile(make(), "mse")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not [r for r in caplog.records if "reads it whole" in r.getMessage()]
