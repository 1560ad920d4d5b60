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
# Every package at the version in constraints.txt, the environment the README's results were
# produced with (so they reproduce to the last digit). Reinstall only when this checkout, its
# setup.py or constraints.txt changed (a rerun needs no network). A venv serves one checkout:
# pointing HISD_VENV at another checkout's venv re-points its install.
STAMP="$VENV/.hisd_jax_install"
WANT="$(pwd) $(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$VENV/bin/python" -c "import hisd_jax" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
  echo "$WANT" > "$STAMP"
fi
export PY="$VENV/bin/python"
