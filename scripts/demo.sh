#!/usr/bin/env bash
# Quick start, command 1: set up, then train and compare final_only, SDN, HiSD and a
# dedicated early-exit model on the embedded MultiDigits data (about 10 min on 2 CPU cores).
# Extra arguments go to hisd_jax.compare (e.g. --config configs/compare_multidigits.py:steps=500).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$PY" -m hisd_jax.compare --config configs/compare_multidigits.py --workdir runs/compare "$@"
