#!/usr/bin/env bash
# Runs skd_jax on every host of a Cloud TPU VM pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/pskd.py gs://BUCKET/pskd [--config.KEY=VALUE ...]
#
# Every host installs the repository (copied from this machine) and runs the same command with
# --config.distributed=True, so jax.distributed.initialize() finds the other hosts by itself.
# The workdir must be shared by all hosts (a GCS bucket: orbax writes checkpoints there, process 0
# writes the metrics). Preempted? Rerun the same command: the run resumes from its checkpoint.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)

gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$repo" "$tpu":~/skd_jax
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  cd ~/skd_jax
  python3 -m pip install -q -e . 'jax[tpu]==0.10.2'
  python3 -m skd_jax.main --config=$config --workdir=$workdir --config.distributed=True $*
"
