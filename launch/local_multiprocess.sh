#!/usr/bin/env bash
# Runs one training job as N local processes joined by jax.distributed on 127.0.0.1.
#
# Usage: launch/local_multiprocess.sh N CONFIG WORKDIR [flags...]
#   e.g. LOCAL_DEVICES=2 launch/local_multiprocess.sh 2 configs/hisd_multidigits.py runs/mp \
#          --config.train.steps=200
#
# Process i runs `python -m hisd_jax.main --config CONFIG --workdir WORKDIR [flags...]` with
# JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i, which
# hisd_jax.parallel.maybe_initialize_distributed turns into jax.distributed.initialize().
# Process 0 also hosts the coordinator. Each process reads only its rows of every global
# batch; all write checkpoints to the same WORKDIR; only process 0 writes metrics and
# results.json. This is how to test multi-host code paths on one machine (CPU collectives
# over gloo). On a real cluster start one process per host with the same three variables
# (on Cloud TPU pods and SLURM, jax.distributed.initialize() finds them by itself).
#
# Environment:
#   PYTHON         interpreter (default: python3)
#   PORT           coordinator port (default: a free port picked by the OS)
#   LOCAL_DEVICES  CPU devices per process (sets JAX_NUM_CPU_DEVICES; default: JAX's own)
#   JAX_CPU_COLLECTIVES_IMPLEMENTATION  default gloo (the only one that needs no MPI)
#   GRACE          seconds the others get to stop after one process fails, before SIGKILL
#                  (default 60)
#   LOG_DIR        per-process logs process_<i>.log, appended to (default: WORKDIR/logs);
#                  process 0 also writes to this terminal
#
# Needs bash >= 5.1 (wait -n -p).
#
# Exit status: 0 when every process succeeds. If one fails the others are stopped and its
# status is returned. SIGTERM/SIGINT to this script is forwarded to every process: a
# preemption notice makes the job save a checkpoint at one step all processes reach and
# exit with 143 (rerun the same command to resume).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
NUM=$1
CONFIG=$2
WORKDIR=$3
shift 3
if ! [[ "$NUM" =~ ^[1-9][0-9]*$ ]]; then
  echo "N must be a positive integer, got '$NUM'" >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
GRACE=${GRACE:-60}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
mkdir -p "$WORKDIR" "$LOG_DIR"
PORT=${PORT:-$("$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}

export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT"
export JAX_NUM_PROCESSES="$NUM"
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}
if [[ -n "${LOCAL_DEVICES:-}" ]]; then
  export JAX_NUM_CPU_DEVICES="$LOCAL_DEVICES"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

pids=()
for ((i = 0; i < NUM; i++)); do
  log="$LOG_DIR/process_$i.log"
  if [[ $i -eq 0 ]]; then
    JAX_PROCESS_ID=$i "$PYTHON" -m hisd_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@" \
      > >(tee -a "$log") 2> >(tee -a "$log" >&2) &
  else
    JAX_PROCESS_ID=$i "$PYTHON" -m hisd_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@" \
      >> "$log" 2>&1 &
  fi
  pids+=($!)
done
echo "started $NUM processes (${pids[*]}) with coordinator $JAX_COORDINATOR_ADDRESS; logs in $LOG_DIR" >&2

forward() {
  for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  exited=""
  set +e
  wait -n -p exited "${running[@]}"
  code=$?
  set -e
  # Interrupted by a forwarded signal (wait then unsets `exited`): keep waiting.
  [[ -z "${exited:-}" ]] && continue
  still=()
  for pid in "${running[@]}"; do
    if [[ $pid != "$exited" ]]; then still+=("$pid"); fi
  done
  running=("${still[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    if ((${#running[@]} > 0)); then
      echo "process $exited exited with status $code; stopping the others" >&2
      forward TERM
      # Peers of a crashed process may hang in collectives (and, with jax.distributed,
      # SIGTERM only asks them to save at a step everyone reaches): kill them after a grace.
      (sleep "$GRACE" && kill -KILL "${running[@]}" 2>/dev/null) &
      watchdog=$!
    fi
  fi
done
if [[ -n "${watchdog:-}" ]]; then kill "$watchdog" 2>/dev/null || true; fi
exit "$status"
