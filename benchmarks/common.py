"""What the benchmark scripts share: where results go, and the harness they use.

The harness itself (optimizers by name, state bytes, timing, the LM and its
data, results files) is ``keras_sketch_harness``, installed with the package
and shared with ``examples/``; this module adds the benchmarks' paths.  The
scripts import it as a sibling (Python puts a script's own folder on the
path), so nothing edits ``sys.path``.
"""

from pathlib import Path

from keras_sketch_harness.harness import (  # noqa: F401 - re-exported for the benchmark scripts
    LR_GRID,
    LR_START,
    adaptive_rates,
    load_json,
    machine_info,
    machine_line,
    make_optimizer,
    median_time,
    replace_section,
    save_json,
    state_bytes,
)
from keras_sketch_harness.lm import build_lm, lm_data, lm_loss, train_lm  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"


def quiet_tf():
    """TensorFlow without its start-up notices and retracing warnings (each run builds a new model)."""
    from keras_sketch_harness import startup

    return startup.import_tensorflow()
