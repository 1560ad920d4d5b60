#!/usr/bin/env bash
# Quick start, command 2: set up, then run the test suite (under 10 min on 2 CPU cores).
# pytest's own exit code is returned, so "no tests collected" (5) fails too. Two pytest-xdist
# workers, whole files each (module fixtures built once), sharing one persistent XLA compilation
# cache (tests/conftest.py): ~0.7x the time of one process on 2 cores. HISD_TEST_WORKERS=0 runs
# in this process.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$PY" -m pytest -q -n "${HISD_TEST_WORKERS:-2}" --dist loadfile "$@"
