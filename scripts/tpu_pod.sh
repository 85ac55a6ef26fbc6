#!/bin/bash
# Training on a TPU pod slice: the same command on every worker (JAX finds the coordinator,
# process count and index from the TPU VM's metadata), all TPU cores one mesh.
#
#   bash scripts/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=v ...]
#   bash scripts/tpu_pod.sh my-v5p-64 us-east5-a configs/xl.py /mnt/shared/runs/xl --config.mesh.fsdp=4
#
# Assumes the repository is cloned and installed ('pip install -e .[tpu]') in ~/linnaeus_jax on
# every worker, and WORKDIR is a folder all workers share (Filestore, or a gcsfuse-mounted
# bucket). A preempted spot/queued-resource slice sends SIGTERM: each worker saves its shards
# of a checkpoint and exits 143; running this script again resumes.
set -euo pipefail
TPU=${1:?usage: bash scripts/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=v ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
EXTRA=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="\
  cd ~/linnaeus_jax && python -m linnaeus_jax.main --config=$CONFIG --workdir=$WORKDIR \
  --preempted_exit_code=143$EXTRA"
