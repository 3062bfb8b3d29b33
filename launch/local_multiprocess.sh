#!/usr/bin/env bash
# N processes on this machine, each with its own CPU devices, as one multi-host job (gloo): a
# rehearsal of a pod run. Each process's output is prefixed with [pI].
# Usage: launch/local_multiprocess.sh N CONFIG WORKDIR [--config.KEY=VALUE ...]
# e.g.   launch/local_multiprocess.sh 2 experiments/demo.py /tmp/demo_mp
# Settings (environment): DEVICES_PER_PROCESS (default 2). SIGTERM or Ctrl-C reaches every process,
# which saves and exits; the same command resumes.
set -euo pipefail
die() { echo "local_multiprocess.sh: error: $*" >&2; exit 2; }
[ "$#" -ge 3 ] || die "usage: launch/local_multiprocess.sh N CONFIG WORKDIR [--config.KEY=VALUE ...]"
n=$1; config=$2; workdir=$3; shift 3
devices_each=${DEVICES_PER_PROCESS:-2}
[[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number of processes (got '$n')"
[[ $devices_each =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS must be a positive number (got '$devices_each')"
command -v w2v2-train > /dev/null || die "w2v2-train is not on PATH (activate the venv: . .venv/bin/activate)"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
trap 'kill -TERM "${pids[@]}" 2> /dev/null || true' INT TERM   # every process gets SIGTERM, so every process saves
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_each" JAX_PLATFORMS=cpu \
    w2v2-train --config="$config" --workdir="$workdir" --coordinator="127.0.0.1:$port" \
      --num_processes="$n" --process_id="$i" "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  while :; do
    if wait "$p"; then break; else s=$?; fi
    kill -0 "$p" 2> /dev/null || { status=$s; break; }   # still running: a signal cut the wait short
  done
done
exit "$status"
