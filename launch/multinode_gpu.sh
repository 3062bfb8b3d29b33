#!/usr/bin/env bash
# One process per node, with all of the node's GPUs, on a GPU cluster without SLURM. Run it on every
# node with the same COORDINATOR_ADDRESS (host:port of process 0's node, reachable from all nodes),
# NUM_PROCESSES (the number of nodes) and this node's PROCESS_ID (0 on the coordinator's node).
# Usage: COORDINATOR_ADDRESS=10.0.0.1:12345 NUM_PROCESSES=4 PROCESS_ID=0 \
#          launch/multinode_gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
# WORKDIR must be on a file system (or bucket) every node sees. SIGTERM to this script reaches
# w2v2-train (exec), which saves and exits; re-running the same command on every node resumes.
set -euo pipefail
die() { echo "multinode_gpu.sh: error: $*" >&2; exit 2; }
[ "$#" -ge 2 ] || die "usage: COORDINATOR_ADDRESS=HOST:PORT NUM_PROCESSES=N PROCESS_ID=I" \
  "launch/multinode_gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]"
config=$1; workdir=$2; shift 2
[[ ${COORDINATOR_ADDRESS:-} =~ ^.+:[0-9]+$ ]] \
  || die "set COORDINATOR_ADDRESS=host:port of process 0 (got '${COORDINATOR_ADDRESS:-}')"
[[ ${NUM_PROCESSES:-} =~ ^[1-9][0-9]*$ ]] || die "set NUM_PROCESSES to the number of nodes (got '${NUM_PROCESSES:-}')"
[[ ${PROCESS_ID:-} =~ ^[0-9]+$ ]] && [ "$PROCESS_ID" -lt "$NUM_PROCESSES" ] \
  || die "set PROCESS_ID to this node's index in [0, NUM_PROCESSES=$NUM_PROCESSES) (got '${PROCESS_ID:-}')"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec w2v2-train --config="$config" --workdir="$workdir" --coordinator="$COORDINATOR_ADDRESS" \
  --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID" "$@"
