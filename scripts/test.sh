#!/usr/bin/env bash
# Quick start, command 2: set up, then run the test suite (under 10 min on 2 CPU cores).
# pytest's own exit code is returned, so "no tests collected" (5) fails too.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$PY" -m pytest -q "$@"
