#!/usr/bin/env bash
# Copy this repository to every worker of a Cloud TPU VM slice and start one cm3jax command there.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/7b.py gs://BUCKET/cm3leon_7b [--config.FIELD=VALUE ...]
#   launch/tpu_pod.sh TPU_NAME ZONE tokenize_images --vqgan_workdir=gs://B/vqgan --out=gs://B/codes ...
#
# A config file trains it (python -m cm3jax.train --config=CONFIG --workdir=WORKDIR); any other
# third argument names a command (tokenize_images, build_memory, ...) whose flags follow. Every
# host runs the same command with --multihost (jax.distributed.initialize() finds the others
# through the TPU metadata): each trains on its own rows of each batch, or encodes its own share
# of the input files. Paths are buckets (gs://) or directories all hosts share (Filestore/NFS).
# Output of worker 0 is printed here; stop it with Ctrl-C, which leaves the command going on the
# TPU VMs (they are started under nohup).
set -euo pipefail
if [ $# -lt 3 ] || { [[ $3 == *.py ]] && [ $# -lt 4 ]; }; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
tpu=$1 zone=$2
if [[ $3 == *.py ]]; then
  command="cm3jax.train --config=$3 --workdir=$4"
  shift 4
else
  command="cm3jax.$3"
  shift 3
fi
log=$(echo "$command" | cut -d' ' -f1 | cut -d. -f2).log
repo=$(cd "$(dirname "$0")/.." && pwd)

gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all \
  "$repo/cm3jax" "$repo/configs" "$repo/requirements.txt" "$repo/requirements-tpu.txt" \
  "$tpu":~/cm3jax/
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd ~/cm3jax && pip install -q -r requirements-tpu.txt &&
  nohup python3 -m $command --multihost $* > $log 2>&1 &
  sleep 1; echo \"started on \$(hostname)\""
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=0 --command "tail -f ~/cm3jax/$log"
