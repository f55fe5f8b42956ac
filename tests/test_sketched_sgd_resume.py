"""SketchedSGD resume: per-replica u/e of two_round and local_topk are saved
replica by replica (checkpoint, .keras, .weights.h5), a resumed 2-replica run
is bit-identical to an uninterrupted one, and state saved by another number of
replicas loads as documented (the saved sum split evenly, with a warning).

The 2-replica runs need two logical CPU devices, configured before TensorFlow
initialises: one fresh process (``tests.sketched_sgd_worker resume``) runs
them all and the tests read its results."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sketch as ks
from keras_sketch.optimizers import state_spec
from tests import sketched_sgd_worker as worker

REPO = Path(__file__).resolve().parent.parent
PER_REPLICA = ("two_round", "local_topk")
STATE = ("replica_momentum", "replica_error")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "resume.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sketched_sgd_worker", "resume", str(out)],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(np.load(out))
    assert int(results["replicas"]) == 2
    return results


def _run(results, prefix):
    return {key[len(prefix) + 1 :]: value for key, value in results.items() if key.startswith(prefix + "/")}


@pytest.mark.parametrize("mode", PER_REPLICA)
def test_per_replica_state_differs_between_replicas_before_save(runs, mode):
    saved = _run(runs, f"{mode}/saved")
    for name in STATE:
        value = saved[f"opt/{name}"]
        assert value.shape == (2, 205), name  # one component per replica
        assert np.abs(value[0] - value[1]).max() > 1e-3, name  # the replicas really differ
        assert np.abs(value).max() > 1e-3, name
    for i in range(5):  # while the weights are mirrored
        np.testing.assert_array_equal(saved[f"w/{i}"][0], saved[f"w/{i}"][1])


@pytest.mark.parametrize("kind", worker.RESUME_FORMATS)
@pytest.mark.parametrize("mode", worker.RESUME_MODES)
def test_two_replica_resume_is_bit_identical(runs, mode, kind):
    expected = _run(runs, f"{mode}/uninterrupted")
    got = _run(runs, f"{mode}/{kind}/resumed")
    assert sorted(got) == sorted(expected)
    assert len([k for k in expected if k.startswith("w/")]) == 5
    for key, value in expected.items():
        assert got[key].shape == value.shape, key  # every replica's component
        assert np.array_equal(got[key], value), f"{mode} {kind} {key}"
    assert int(runs[f"{mode}/{kind}/warnings"]) == 0
    # The M resumed steps moved the weights and the state: the comparison is not of the saved state.
    saved = _run(runs, f"{mode}/saved")
    assert any(not np.array_equal(saved[f"w/{i}"], expected[f"w/{i}"]) for i in range(5))
    if mode in PER_REPLICA:
        for name in STATE:
            assert not np.array_equal(saved[f"opt/{name}"], expected[f"opt/{name}"])
    assert int(expected["opt/iteration"][0]) == 6


@pytest.mark.parametrize("kind", worker.RESUME_FORMATS)
@pytest.mark.parametrize("mode", PER_REPLICA)
def test_two_replica_state_loads_into_one_replica_as_the_sum_with_a_warning(runs, mode, kind):
    saved = _run(runs, f"{mode}/saved")
    loaded = _run(runs, f"{mode}/{kind}/to1")
    for name in STATE:
        assert loaded[f"opt/{name}"].shape == (1, 205)
        np.testing.assert_array_equal(loaded[f"opt/{name}"][0], saved[f"opt/{name}"][0] + saved[f"opt/{name}"][1])
    for i in range(5):
        np.testing.assert_array_equal(loaded[f"w/{i}"][0], saved[f"w/{i}"][0])
    caught = runs[f"{mode}/{kind}/to1/warnings"]
    assert len(caught) == 2 and all("saved by 2 replica(s) and is loaded into 1" in str(w) for w in caught)
    assert sorted(n for n in STATE if any(n in str(w) for w in caught)) == sorted(STATE)


@pytest.mark.parametrize("kind", worker.RESUME_FORMATS)
@pytest.mark.parametrize("mode", PER_REPLICA)
def test_one_replica_state_loads_into_two_replicas_split_evenly_with_a_warning(runs, mode, kind):
    saved = _run(runs, f"{mode}/single_saved")
    loaded = _run(runs, f"{mode}/{kind}/to2")
    for name in STATE:
        value = loaded[f"opt/{name}"]
        assert value.shape == (2, 205)
        half = saved[f"opt/{name}"][0] / np.float32(2)
        np.testing.assert_array_equal(value[0], half)
        np.testing.assert_array_equal(value[1], half)
        np.testing.assert_array_equal(value[0] + value[1], saved[f"opt/{name}"][0])  # the sum is kept
    caught = runs[f"{mode}/{kind}/to2/warnings"]
    assert len(caught) == 2 and all("saved by 1 replica(s) and is loaded into 2" in str(w) for w in caught)


# --- one replica (this process): files as before, bad state refused ----------------------------


def _replica_warnings(caught):
    return [str(w.message) for w in caught if "Per-replica state" in str(w.message)]


@pytest.mark.parametrize("mode", PER_REPLICA)
def test_single_replica_files_keep_the_variable_shape_and_resume_bit_identical(mode, tmp_path):
    x, y = worker.data(96)
    model = worker.resume_model(mode, tf.distribute.get_strategy())
    model.fit(x[:48], y[:48], batch_size=16, verbose=0, shuffle=False)
    paths = worker.save_all(model, str(tmp_path))
    saved_e = model.optimizer.replica_error.numpy()
    model.fit(x[48:], y[48:], batch_size=16, verbose=0, shuffle=False)
    expected = worker.weights(model) + [v.numpy() for v in model.optimizer.variables]
    # Files of one replica are as before: the variable's own shape, under its usual key.
    key = "optimizer/replica_error/.ATTRIBUTES/VARIABLE_VALUE"
    assert dict(tf.train.list_variables(paths["ckpt"]))[key] == [205]
    np.testing.assert_array_equal(tf.train.load_variable(paths["ckpt"], key), saved_e)
    index = [v.name for v in model.optimizer.variables].index("replica_error")
    with h5py.File(paths["h5"]) as f:
        np.testing.assert_array_equal(f[f"optimizer/vars/{index}"][()], saved_e)

    for kind in ("h5", "keras"):  # (checkpoint and .keras: tests/test_sketched_sgd.py)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if kind == "h5":
                restored = worker.resume_model(mode, tf.distribute.get_strategy())
                restored.load_weights(paths["h5"])
            else:
                restored = keras.models.load_model(paths["keras"])
        assert isinstance(restored.optimizer, ks.SketchedSGD)
        assert _replica_warnings(caught) == []  # the replica count matches
        restored.fit(x[48:], y[48:], batch_size=16, verbose=0, shuffle=False)
        got = worker.weights(restored) + [v.numpy() for v in restored.optimizer.variables]
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def test_a_bad_per_replica_entry_is_refused_naming_the_variable_and_nothing_is_loaded():
    opt = worker.resume_model("two_round", tf.distribute.get_strategy()).optimizer
    before = [v.numpy().copy() for v in opt.variables]
    store = {str(i): np.full(v.shape, 7, v.dtype) for i, v in enumerate(opt.variables)}
    index = [v.name for v in opt.variables].index("replica_error")
    store[str(index)] = np.zeros((2, 204), np.float32)  # saved for another model
    with pytest.raises(ValueError, match="replica_error.*\\(2, 204\\)"):
        opt.load_own_variables(store)
    for v, b in zip(opt.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    store[str(index)] = np.ones(205, np.float32)
    opt.load_own_variables(store)  # a good store loads every entry
    np.testing.assert_array_equal(opt.replica_error.numpy(), np.ones(205, np.float32))
    np.testing.assert_array_equal(opt.replica_momentum.numpy(), np.full(205, 7, np.float32))


def test_replica_values_rule():
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    same = state_spec.replica_values("u", rows, [4], 3, [0, 1, 2])
    for r in range(3):
        np.testing.assert_array_equal(same[r], rows[r])
    np.testing.assert_array_equal(state_spec.replica_values("u", rows[1], [4], 1, [0])[0], rows[1])
    with pytest.warns(UserWarning, match="'u' was saved by 3 replica\\(s\\) and is loaded into 2"):
        split = state_spec.replica_values("u", rows, [4], 2, [0, 1])
    for value in split:
        np.testing.assert_array_equal(value, rows.sum(0) / 2)
    with pytest.raises(ValueError, match="'u'.*\\(3, 5\\)"):
        state_spec.replica_values("u", np.zeros((3, 5), np.float32), [4], 3, [0, 1, 2])
    # Restored inside a tf.function (shape known only when it runs): the same rule.
    traced = tf.function(
        lambda saved: state_spec.replica_values("u", saved, [4], 2, [0, 1]),
        input_signature=[tf.TensorSpec(None, tf.float32)],
    )
    np.testing.assert_array_equal(np.stack(traced(rows[:2])), rows[:2])
    np.testing.assert_array_equal(np.stack(traced(rows)), np.stack([rows.sum(0) / 2] * 2))
    np.testing.assert_array_equal(np.stack(traced(rows[2])), np.stack([rows[2] / 2] * 2))
