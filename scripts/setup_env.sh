#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs hisd_jax into it; sourced by demo.sh / test.sh.
# Set PYTHON to choose the interpreter, HISD_VENV to use another venv directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${HISD_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
export PY="$VENV/bin/python"
