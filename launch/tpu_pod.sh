#!/usr/bin/env bash
# Runs skd_jax on every host of a Cloud TPU VM pod slice, one process per host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [skd_jax.main arguments ...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/pskd.py gs://my-bucket/pskd --config.seed=1
#
# Arguments:
#   TPU_NAME  the TPU VM (pod slice) made with `gcloud compute tpus tpu-vm create`.
#   ZONE      its zone.
#   CONFIG    the config file, relative to the repository (it is run from the hosts' copy), with
#             an optional :argument, e.g. configs/pskd.py or configs/pskd.py:quick.
#   WORKDIR   gs://BUCKET/PATH: the hosts share no disk, so the run's files live in a bucket that
#             the TPU VM's service account may write (orbax writes checkpoints there from every
#             host, process 0 the metrics, summary and config).
#   ...       passed to `python3 -m skd_jax.main` on every host as given, each quoted for the
#             remote shell (e.g. --config.optim.lr=0.05).
# Environment:
#   CLOUDSDK_CORE_PROJECT  the Google Cloud project, when it is not gcloud's configured one (gcloud
#                          reads it; so do its other CLOUDSDK_* settings).
#   PIP_EXTRA              more pip requirements to install on every host (default: none).
#
# What it does: packs this checkout (tracked files and untracked ones git does not ignore, so
# uncommitted edits travel; .venv and workdirs do not), copies the archive to every host, unpacks
# it into ~/skd_jax (replacing an earlier copy), installs it with the `gcs` extra and jax[tpu], and
# runs the same command on all hosts at once with --config.distributed=True, so that
# jax.distributed.initialize() finds the other hosts by itself. The command returns when every
# host has finished, with a non-zero status if any failed.
#
# Preempted, or stopped by a signal (the run saves a checkpoint and exits 0)? Run the same command
# again: it resumes from the newest checkpoint in WORKDIR. At the end the script says whether
# WORKDIR holds summary.json, the sign of a finished run (asked with `gcloud storage ls`).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [skd_jax.main arguments ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
if [[ $workdir != gs://* ]]; then
  echo "error: WORKDIR: expected gs://BUCKET/PATH (a pod's hosts share no disk), got $workdir" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
# Every argument quoted for the hosts' bash: spaces and shell characters arrive unchanged.
remote_args=$(printf ' %q' "--config=$config" "--workdir=$workdir" --config.distributed=True "$@")
pip_extra=${PIP_EXTRA:-}

archive=$(mktemp "${TMPDIR:-/tmp}/skd_jax.XXXXXX")
trap 'rm -f "$archive"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard |
  tar -czf "$archive" -C "$repo" --null -T -

gcloud compute tpus tpu-vm scp --zone="$zone" --worker=all "$archive" "$tpu":skd_jax.tar.gz
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -euo pipefail
  rm -rf ~/skd_jax && mkdir ~/skd_jax && tar -xzf ~/skd_jax.tar.gz -C ~/skd_jax
  cd ~/skd_jax
  python3 -m pip install -q -e '.[gcs]' 'jax[tpu]==0.10.2' $pip_extra
  python3 -m skd_jax.main$remote_args
"

if gcloud storage ls "$workdir/summary.json" >/dev/null 2>&1; then
  echo "finished: $workdir/summary.json"
else
  echo "stopped before the end (no $workdir/summary.json yet): run the same command to resume" >&2
fi
