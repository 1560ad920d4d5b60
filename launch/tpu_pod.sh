#!/usr/bin/env bash
# Runs one training job on every worker of a Cloud TPU VM pod slice.
#
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]
#   e.g. launch/tpu_pod.sh my-v4-32 us-central2-b configs/hisd_multidigits.py \
#          gs://my-bucket/runs/hisd --config.train.batch_size=1024
#
# The same command starts on all workers at once (gcloud --worker=all). Each worker runs
# `python -m hisd_jax.main` with HISD_DISTRIBUTED=1, so the program calls
# jax.distributed.initialize(), which finds its peers on a TPU pod by itself. The global
# batch is split over all chips of all workers; each worker reads only its rows.
# WORKDIR must be one every worker sees: a bucket (gs://...) or a shared directory (NFS,
# Filestore). Orbax writes one checkpoint from all workers; only worker 0 writes metrics and
# results. Assumes the repository is checked out at ~/hisd_jax on every worker and installed
# with `pip install -e ~/hisd_jax "jax[tpu]" gcsfs google-cloud-storage` (run the same gcloud
# command with that first).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,16p' "$0"; exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
printf -v EXTRA ' %q' "$@"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/hisd_jax && HISD_DISTRIBUTED=1 python3 -m hisd_jax.main --config $CONFIG --workdir $WORKDIR$EXTRA"
