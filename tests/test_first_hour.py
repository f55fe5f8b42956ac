"""A newcomer's first hour: the quickstart from a bare clone, quiet and fast to answer.

* the quickstart, copied into a temporary "clone" with no ``../shared`` beside
  it and an empty TFDS data directory, trains on the bundled sample, says so,
  writes nothing into the TFDS directory and prints none of TensorFlow's
  start-up notices;
* the data sources are tried in the documented order, TFDS data prepared by an
  earlier run is named as such, and ``download=True`` reaches the download;
* data problems end in one message, never a traceback;
* ``--help`` of every example answers without importing TensorFlow;
* the set-up script's stamps skip what did not change (with a stub interpreter).
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keras_sketch_harness import wikitext
from keras_sketch_harness.startup import NOTICES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["quickstart", "lm_wikitext2", "extreme_classification", "image_classification"]


def _bare_clone(tmp_path):
    """The parts of a clone the quickstart needs, in ``tmp_path/clone`` (no ``tmp_path/shared``)."""
    clone = tmp_path / "clone"
    (clone / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "quickstart.py", clone / "examples")
    shutil.copytree(ROOT / "keras_sketch_harness", clone / "keras_sketch_harness",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return clone


def _env(clone, tfds_dir):
    env = {k: v for k, v in os.environ.items() if k not in (wikitext.ENV_DIR, "TF_CPP_MIN_LOG_LEVEL")}
    # The clone's harness first; keras_sketch itself from this checkout.
    env.update(PYTHONPATH=os.pathsep.join([str(clone), str(ROOT)]), TFDS_DATA_DIR=str(tfds_dir))
    return env


def test_quickstart_from_a_bare_clone_uses_the_bundled_sample(tmp_path):
    clone = _bare_clone(tmp_path)
    tfds_dir = tmp_path / "tfds"
    tfds_dir.mkdir()
    out = tmp_path / "out" / "qs"
    proc = subprocess.run(
        [sys.executable, str(clone / "examples" / "quickstart.py"), "--epochs", "1", "--max-steps", "4",
         "--vocab", "500", "--embed", "16", "--hidden", "16", "--batch", "8", "--bptt", "10", "--output", str(out)],
        capture_output=True, text=True, env=_env(clone, tfds_dir), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bundled WikiText-2 sample" in proc.stdout and str(clone / "keras_sketch_harness") in proc.stdout
    assert "NOTE: this is the small sample" in proc.stdout
    for header in ("optimizer", "state bytes", "test ppl", "ms/step"):
        assert header in proc.stdout
    assert "CSAdam(state_budget=0.02)" in proc.stdout and "memory report of CSAdam(state_budget=0.02)" in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 0 and f"plot (loss curves, state bytes): {out}.png" in proc.stdout
    assert list(tfds_dir.iterdir()) == []  # the sample is read directly: nothing prepared, nothing hidden
    # The first line is ours, and none of TensorFlow's start-up notices reach the user.
    assert proc.stdout.startswith("TensorFlow ")
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in NOTICES)], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_data_problem_is_one_message_not_a_traceback(tmp_path):
    clone = _bare_clone(tmp_path)
    env = _env(clone, tmp_path)
    env[wikitext.ENV_DIR] = str(tmp_path / "no-such-dir")
    proc = subprocess.run([sys.executable, str(clone / "examples" / "quickstart.py")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"quickstart: The WikiText-2 directory given by {wikitext.ENV_DIR}" in proc.stderr
    assert "does not exist" in proc.stderr


@pytest.mark.parametrize("name", EXAMPLES)
def test_help_answers_without_importing_tensorflow(name):
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["{name}.py", "--help"]
        try:
            runpy.run_path({str(ROOT / "examples" / f"{name}.py")!r}, run_name="__main__")
        except SystemExit as e:
            assert e.code == 0, e.code
        print("TENSORFLOW_LOADED" if "tensorflow" in sys.modules else "NO_TENSORFLOW")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and proc.stdout.strip().endswith("NO_TENSORFLOW")


# --------------------------------------------------------------------------- the data sources, in order
def _texts(folder, names=("valid.txt", "test.txt"), words="alpha beta gamma"):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f" = {name} = \n {words} \n {words} delta \n")
    return folder


@pytest.fixture
def nothing_present(tmp_path, monkeypatch):
    """No KERAS_SKETCH_WIKITEXT_DIR, no ../shared, an empty TFDS data directory."""
    monkeypatch.delenv(wikitext.ENV_DIR, raising=False)
    monkeypatch.setattr(wikitext, "SHARED_DIR", tmp_path / "shared" / "data" / "wikitext-2")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    return tmp_path


def test_nothing_present_means_the_bundled_sample(nothing_present):
    text = wikitext.load_wikitext2(("validation", "test"))
    assert text.sample and "bundled WikiText-2 sample" in text.source
    assert len(text.tokens["validation"]) == 37_095 and len(text.tokens["test"]) == 17_580
    with pytest.raises(wikitext.DataError, match="only the validation and test splits"):
        wikitext.load_wikitext2(("train", "test"))


def test_an_explicit_directory_comes_first_and_is_read_directly(nothing_present, monkeypatch):
    folder = _texts(nothing_present / "mine")
    monkeypatch.setenv(wikitext.ENV_DIR, str(folder))
    text = wikitext.load_wikitext2(("validation", "test"))
    assert not text.sample and str(folder) in text.source and wikitext.ENV_DIR in text.source
    assert text.tokens["test"][:5] == ["=", "test.txt", "=", "<eos>", "alpha"]
    assert not (nothing_present / "tfds").exists()  # nothing written
    with pytest.raises(wikitext.DataError, match=r"lacks the train split"):
        wikitext.load_wikitext2(("train", "test"))
    with pytest.raises(wikitext.DataError, match="splits must be among"):
        wikitext.load_wikitext2(("training",))


def test_shared_data_is_prepared_once_and_later_runs_say_where_it_came_from(nothing_present, monkeypatch, capsys):
    shared = _texts(nothing_present / "shared" / "data" / "wikitext-2")
    first = wikitext.load_wikitext2(("validation", "test"))
    assert f"writing prepared WikiText-2 (TFDS wikitext2_words) to {nothing_present / 'tfds'}" in capsys.readouterr().out
    assert f"prepared now from {shared}" in first.source and "TFDS_DATA_DIR" in first.source
    # A later clone without ../shared still finds that data, and is told what it is.
    monkeypatch.setattr(wikitext, "SHARED_DIR", nothing_present / "gone")
    later = wikitext.load_wikitext2(("validation", "test"))
    assert later.tokens == first.tokens and not later.sample
    assert f"prepared by an earlier run, perhaps of another clone: prepared from {shared} on " in later.source
    with pytest.raises(wikitext.DataError, match="training split exists only in the official archive"):
        wikitext.load_wikitext2(("train", "test"))


def test_download_reaches_the_download(nothing_present, monkeypatch):
    import tensorflow_datasets as tfds

    archive = _texts(nothing_present / "archive" / "wikitext-2",
                     names=("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"), words="downloaded words")
    urls = []

    def fake_download(self, url):
        urls.append(url)
        return str(archive.parent)

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", fake_download)
    text = wikitext.load_wikitext2(("train", "test"), download=True)
    assert urls == [wikitext.ARCHIVE_URL]
    assert "downloaded now" in text.source and text.tokens["train"][:4] == ["=", "wiki.train.tokens", "=", "<eos>"]


def test_a_failed_download_is_one_message(nothing_present, monkeypatch):
    import tensorflow_datasets as tfds

    def no_network(self, url):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", no_network)
    with pytest.raises(wikitext.DataError, match=r"ConnectionError: Name or service not known. Without network"):
        wikitext.load_wikitext2(("train", "test"), download=True)


# --------------------------------------------------------------------------- the set-up stamps
STUB_PYTHON = """#!/bin/sh
echo "$*" >> "$STUB_LOG"
case "$1" in -c) echo "3.11.7 (stub)";; esac
exit 0
"""


def test_setup_redoes_only_what_changed(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_env.sh", repo / "scripts")
    for name in ("requirements.txt", "requirements-dev.txt", "pyproject.toml", "setup.py"):
        (repo / name).write_text(f"# {name}\n")
    (repo / "custom_ops").mkdir()
    (repo / "custom_ops" / "op.cc").write_text("// op\n")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text(STUB_PYTHON)
    (repo / ".venv" / "bin" / "python").chmod(0o755)
    log = tmp_path / "calls.log"

    def run():
        log.write_text("")
        proc = subprocess.run(["bash", str(repo / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                              env=dict(os.environ, STUB_LOG=str(log)), timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [line for line in log.read_text().splitlines() if line.startswith("-m pip")]

    assert run() == ["-m pip install -q -r requirements-dev.txt", "-m pip install -v --no-build-isolation -e ."]
    assert run() == []  # nothing changed: nothing installed
    (repo / "custom_ops" / "op.cc").write_text("// op, changed\n")
    assert run() == ["-m pip install -v --no-build-isolation -e ."]  # a source changed: only the rebuild
    assert run() == []
    (repo / "requirements.txt").write_text("keras==9.9\n")
    assert run() == ["-m pip install -q -r requirements-dev.txt", "-m pip install -v --no-build-isolation -e ."]
    (repo / "keras_sketch").mkdir()
    (repo / "keras_sketch" / "_sketch_ops.so").write_text("")
    assert run() == ["-m pip install -v --no-build-isolation -e ."]  # the op libraries are part of the stamp
    (repo / "keras_sketch" / "_sketch_ops.so").unlink()  # e.g. git clean: rebuilt
    assert run() == ["-m pip install -v --no-build-isolation -e ."]
