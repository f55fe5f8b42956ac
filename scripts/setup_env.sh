#!/usr/bin/env bash
# Creates .venv (once) and installs keras_sketch with its pinned dependencies.
# Run by quickstart.sh and test.sh; safe to run again, and fast when nothing changed:
# two stamps in .venv record what was installed, and each step is redone only when
# its inputs change:
#   .venv/.stamp-deps   Python version + requirements*.txt + pyproject.toml -> pip install -r
#   .venv/.stamp-build  setup.py + custom_ops/* + this checkout's path + the op
#                       libraries present after the build -> pip install -e . (rebuilds the op)
# KERAS_SKETCH_REINSTALL=1 redoes both.  PYTHON=python3.11 chooses the interpreter of a new .venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

deps_stamp() {
  { .venv/bin/python -c 'import sys; print(sys.version)'; sha256sum requirements.txt requirements-dev.txt pyproject.toml; } \
    | sha256sum | cut -d' ' -f1
}
build_stamp() {  # the op libraries are listed too: a deleted .so (git clean) means a rebuild
  { echo "$ROOT"; sha256sum setup.py custom_ops/*; ls keras_sketch/_sketch_*.so 2>/dev/null || true; } \
    | sha256sum | cut -d' ' -f1
}
fresh() {  # fresh STAMP_FILE VALUE: the recorded stamp equals VALUE
  [ -z "${KERAS_SKETCH_REINSTALL:-}" ] && [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]
}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY" >&2
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
fi
if ! fresh .venv/.stamp-deps "$(deps_stamp)"; then
  echo "setup: installing the pinned dependencies (requirements-dev.txt) into .venv" >&2
  rm -f .venv/.stamp-deps .venv/.stamp-build
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  deps_stamp > .venv/.stamp-deps
fi
if ! fresh .venv/.stamp-build "$(build_stamp)"; then
  echo "setup: installing keras_sketch (editable) and building its fused CPU op" >&2
  rm -f .venv/.stamp-build
  # The build log is kept, not shown: setuptools' notices (e.g. about editable installs) are
  # noise on success; on failure pip exits non-zero and the log is printed.
  log=.venv/build.log
  if ! .venv/bin/python -m pip install -v --no-build-isolation -e . >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: installing keras_sketch failed (log above, also in $ROOT/$log)" >&2
    exit 1
  fi
  if grep -q "building .* failed, the pure-TF path will be used" "$log"; then
    grep "building .* failed" "$log" >&2  # the op is optional: say why it is missing, carry on
  fi
  build_stamp > .venv/.stamp-build
fi
