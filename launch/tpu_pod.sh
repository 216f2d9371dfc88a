#!/usr/bin/env bash
# Copy this repository to every worker of a Cloud TPU VM slice and start one training run there.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/7b.py /mnt/shared/cm3leon_7b [--config.FIELD=VALUE ...]
#
# Every host runs the same command with --multihost (jax.distributed.initialize() finds the
# others through the TPU metadata) and feeds its own rows of each batch. The workdir must be a
# directory all hosts share (Filestore/NFS, or a bucket mounted with gcsfuse at the same path on
# every worker). Output of worker 0 is printed here; stop it with Ctrl-C,
# which leaves the run going on the TPU VMs (they are started under nohup).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)

gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all \
  "$repo/cm3jax" "$repo/configs" "$repo/requirements.txt" "$repo/requirements-tpu.txt" \
  "$tpu":~/cm3jax/
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd ~/cm3jax && pip install -q -r requirements-tpu.txt &&
  nohup python3 -m cm3jax.train --config=$config --workdir=$workdir --multihost $* > train.log 2>&1 &
  sleep 1; echo \"started on \$(hostname)\""
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=0 --command "tail -f ~/cm3jax/train.log"
