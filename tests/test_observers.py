"""``add_gradient_observer``: the public hook through which the diagnostics
see the gradients a keras_sketch optimizer's update step receives."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks
from keras_sketch import diagnostics as dg

ROWS, DIM = 20, 3


def recorder():
    seen = []

    def observer(grads, variables):
        seen.append(([tf.convert_to_tensor(g).numpy() for g in grads], [v.path for v in variables],
                     [type(g).__name__ for g in grads]))

    return seen, observer


def variables():
    return keras.Variable(np.ones((ROWS, DIM), np.float32), name="w"), keras.Variable(np.zeros(DIM, np.float32), name="b")


@pytest.mark.parametrize("make", [lambda **k: ks.CSAdam(min_rows=1, **k), lambda **k: ks.SM3(**k)], ids=["csadam", "sm3"])
def test_observer_sees_unscaled_clipped_gradients_once_per_update(make):
    rng = np.random.default_rng(0)
    opt = make(clipnorm=0.5, loss_scale_factor=4.0)
    w, b = variables()
    seen, observer = recorder()
    remove = opt.add_gradient_observer(observer)
    raw = [rng.normal(size=(ROWS, DIM)).astype(np.float32), rng.normal(size=DIM).astype(np.float32)]
    opt.apply([tf.constant(4.0 * g) for g in raw], [w, b])
    assert len(seen) == 1
    grads, paths, _ = seen[0]
    assert paths == [w.path, b.path]
    for got, g in zip(grads, raw):
        np.testing.assert_allclose(got, g * min(1.0, 0.5 / np.linalg.norm(g)), rtol=1e-6)
    remove()
    opt.apply([tf.constant(g) for g in raw], [w, b])
    assert len(seen) == 1  # removed
    remove()  # twice is harmless


def test_observer_sees_sparse_rows_and_accumulated_gradients_inside_tf_function():
    opt = ks.CSAdam(min_rows=1, gradient_accumulation_steps=2)
    w, b = variables()
    seen = tf.Variable(tf.zeros((ROWS, DIM)))
    calls = tf.Variable(0)

    def observer(grads, variables):
        seen.assign(tf.convert_to_tensor(grads[0]))
        calls.assign_add(1)

    opt.add_gradient_observer(observer)
    g = tf.IndexedSlices(tf.ones((2, DIM)), tf.constant([3, 5]), tf.constant([ROWS, DIM]))

    @tf.function
    def step(scale):
        opt.apply([tf.IndexedSlices(g.values * scale, g.indices, g.dense_shape), tf.ones(DIM)], [w, b])

    step(tf.constant(1.0))
    assert int(calls.numpy()) == 0  # accumulating: no update yet
    step(tf.constant(3.0))
    assert int(calls.numpy()) == 1
    want = np.zeros((ROWS, DIM), np.float32)
    want[[3, 5]] = (1.0 + 3.0) / 2  # Keras averages the accumulated gradients
    np.testing.assert_allclose(seen.numpy(), want)
    # Keras densifies accumulated gradients; without accumulation sparse rows stay sparse.
    plain = ks.CSAdam(min_rows=1)
    seen_types, observer = recorder()
    plain.add_gradient_observer(observer)
    plain.apply([g, tf.ones(DIM)], [w, b])
    assert seen_types[0][2] == ["IndexedSlices", "EagerTensor"]


def test_observers_are_not_saved_and_bad_observers_are_refused(tmp_path):
    opt = ks.CSMomentum(min_rows=1)
    w, b = variables()
    opt.add_gradient_observer(lambda grads, variables: None)
    opt.apply([tf.ones((ROWS, DIM)), tf.ones(DIM)], [w, b])
    path = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "ckpt"))
    fresh = ks.CSMomentum(min_rows=1)
    fresh.build([w, b])
    tf.train.Checkpoint(optimizer=fresh).restore(path).assert_consumed()
    assert "observer" not in str(opt.get_config())
    with pytest.raises(TypeError, match="`observer` must be callable"):
        opt.add_gradient_observer("not a function")


def test_shadow_callback_uses_the_hook_of_keras_sketch_optimizers():
    """The exact shadow of a lossless CSAdagrad under fit with clipping equals
    Keras Adagrad's accumulator on the same run; nothing is patched."""
    def train(opt, callbacks):
        keras.utils.set_random_seed(0)
        inp = keras.Input((12,))
        model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(16, activation="tanh")(inp)))
        model.compile(opt, "mse")
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(64, 12)).astype(np.float32), rng.normal(size=(64, 3)).astype(np.float32)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
        return model, x, y

    ours = ks.CSAdagrad(0.1, initial_accumulator_value=0.0, clipnorm=0.05, depth=1, compression=1.0, min_rows=1)
    cb = dg.ShadowCallback(record_steps=[1])
    model, x, y = train(ours, [cb])
    steps = int(cb.shadow.step.numpy())
    assert steps == 8
    model.train_on_batch(x[:16], y[:16])
    assert int(cb.shadow.step.numpy()) == steps  # the observer was removed after fit
    assert "apply" not in ours.__dict__ and "_backend_update_step" not in ours.__dict__
    keras_opt = keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.0, clipnorm=0.05)
    reference, _, _ = train(keras_opt, [])
    for var, acc in zip(reference.trainable_variables, keras_opt._accumulators):
        if var.path in cb.shadow.exact:
            np.testing.assert_allclose(cb.shadow.exact[var.path].acc.numpy(), acc.numpy(), rtol=1e-5, atol=1e-9)
    assert len(cb.shadow.exact) == 2 and model.optimizer is ours
