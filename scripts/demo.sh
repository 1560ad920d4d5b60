#!/usr/bin/env bash
# Quick start, command 1: set up, then train and compare final_only, SDN, BYOT, MoSE, HiSD and
# a dedicated model at every exit on the embedded MultiDigits data (about 8.5 min on 2 CPU
# cores); prints the README's main table.
# Extra arguments go to hisd_jax.compare (e.g. --config configs/compare_multidigits.py:steps=500).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$PY" -m hisd_jax.compare --config configs/compare_multidigits.py --workdir runs/compare "$@"
