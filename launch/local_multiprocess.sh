#!/usr/bin/env bash
# N processes on this machine, each with its own CPU devices, as one multi-host job (gloo).
# Usage: launch/local_multiprocess.sh N CONFIG WORKDIR [--config.KEY=VALUE ...]
# e.g.   launch/local_multiprocess.sh 2 experiments/demo.py /tmp/demo_mp
set -euo pipefail
n=${1:?number of processes}; config=${2:?config}; workdir=${3:?workdir}; shift 3
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
devices_each=${DEVICES_PER_PROCESS:-2}
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices_each}" JAX_PLATFORMS=cpu \
    w2v2-train --config="$config" --workdir="$workdir" --coordinator="127.0.0.1:${port}" \
      --num_processes="$n" --process_id="$i" "$@" > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM   # forward preemption: every process saves
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"
