#!/usr/bin/env bash
# Several processes of one run on this machine: what a pod or a cluster does, on CPU devices.
#
#   launch/local.sh N K [skd_jax.main arguments]
#   launch/local.sh 2 2 --config=configs/pskd.py:quick --workdir=/tmp/pskd_2x2
#
# Starts N processes of `python -m skd_jax.main ARGUMENTS` (the `python` on PATH, with this
# repository first on PYTHONPATH), each with K CPU devices, joined by jax.distributed through a
# coordinator on localhost: the run sees N x K devices, and trains as it would on one process
# with N x K devices. Process 0 prints the summary on stdout; every process logs to stderr.
#
# Arguments and variables:
#   N                 number of processes (>= 1); each gets --num_processes=N and its
#                     --process_id (0 .. N-1)
#   K                 CPU devices per process (>= 1), set as JAX_NUM_CPU_DEVICES
#   the rest          passed unchanged to every process (--config=..., --workdir=..., ...)
#   PORT              (environment, optional) the coordinator's port on localhost, given to each
#                     process as --coordinator_address=localhost:PORT; default: a free port
#   STOP_GRACE_SECONDS  (environment, optional, default 130) when one process fails, the others
#                     get SIGTERM, and SIGKILL if they are still running this many seconds later;
#                     the default outlasts their own bound (they exit 1 with one line at the
#                     latest --config.distributed_timeout_seconds + 1 s after a process died,
#                     101 s with the default 100)
#
# SIGTERM, SIGINT and SIGHUP sent to this script are forwarded to every process (each process runs
# in its own process group, so Ctrl-C in a terminal reaches them once, through here): they agree
# on a step, save a checkpoint and exit 0; rerun the same command to continue.
#
# Exit status: 0 when every process exited 0; otherwise the status of the first process that
# failed (1 diverged, a write failed or another process died; 2 invalid configuration or data;
# 128 + n for a process killed by signal n). With N = 1 no coordinator is started.
set -u
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N K [skd_jax.main arguments]  (N processes with K CPU devices each)" >&2
  exit 2
fi
num_processes=$1 devices=$2
shift 2
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" JAX_NUM_CPU_DEVICES=$devices

cluster=()
if ((num_processes > 1)); then
  port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
  cluster=(--coordinator_address="localhost:$port" --num_processes="$num_processes")
fi

set -m # every background process in its own process group: terminal signals come through here
declare -A running=() # pid -> process id
for ((i = 0; i < num_processes; i++)); do
  if ((num_processes > 1)); then
    python -m skd_jax.main "$@" "${cluster[@]}" --process_id="$i" &
  else
    python -m skd_jax.main "$@" &
  fi
  running[$!]=$i
done

forward() { kill -s "$1" "${!running[@]}" 2>/dev/null; }
for sig in TERM INT HUP; do
  trap "forward $sig" "$sig"
done

status=0 stopping=0
while ((${#running[@]})); do
  wait -n -p pid "${!running[@]}"
  code=$?
  if [[ -z ${pid:-} ]]; then
    continue # a forwarded signal interrupted the wait; the processes are still running
  fi
  unset "running[$pid]"
  pid=
  if ((code != 0 && status == 0)); then
    status=$code
    forward TERM
    if ((${#running[@]})); then
      (sleep "${STOP_GRACE_SECONDS:-130}" && kill -s KILL "${!running[@]}" 2>/dev/null) &
      stopping=$!
    fi
  fi
done
((stopping)) && kill -- -"$stopping" 2>/dev/null # the timer and its sleep
exit "$status"
