"""TensorFlow without its start-up notices.

A fresh TensorFlow 2.21 process on a machine without a GPU prints, before any
line of ours, absl's "All log messages before absl::InitializeLog()" banner,
oneDNN's and cudart's notices (twice: once per native library) and a
``failed call to cuInit`` error.  ``TF_CPP_MIN_LOG_LEVEL`` does not reach the
lines written before absl is initialised, so ``import_tensorflow()`` sends
file descriptor 2 to a temporary file while TensorFlow loads and finds its
devices, then writes back every line that is not one of those known notices:
a real error is still shown.  It prints one line of its own instead (versions
and devices) when ``announce`` is true.
"""

import os
import sys
import tempfile

# Exact fragments of TensorFlow's start-up notices on a CPU-only machine.
NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on.",
    "cudart_stub.cc",  # "Could not find cuda drivers on your machine, GPU will not be used."
    "failed call to cuInit",
    "cpu_feature_guard.cc",  # "This TensorFlow binary is optimized to use available CPU instructions ..."
    "rebuild TensorFlow with the appropriate compiler flags",
)


def is_notice(line):
    return any(fragment in line for fragment in NOTICES)


def import_tensorflow(announce=False):
    """Imports TensorFlow (and Keras) quietly; returns the ``tensorflow`` module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # INFO and WARNING lines after start-up
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401 - Keras's own start-up happens here too
            import tensorflow as tf

            devices = tf.config.list_physical_devices()  # the cuInit line is written here
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not is_notice(line):
                    sys.stderr.write(line)
            sys.stderr.flush()
    tf.get_logger().setLevel("ERROR")  # retracing warnings: every run here builds a new model
    if announce:
        import keras

        kinds = sorted({d.device_type for d in devices})
        print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}; devices: {', '.join(kinds)}"
              + ("" if "GPU" in kinds else " (no GPU found)"))
    return tf


def quiet_progress_bars():
    """TFDS progress bars only on a terminal (in a log they are raw escape codes)."""
    if not sys.stdout.isatty() or not sys.stderr.isatty():
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
