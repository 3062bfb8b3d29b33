#!/usr/bin/env bash
# One process per node on a GPU cluster without SLURM. Run it on every node with the same
# COORDINATOR_ADDRESS (host:port of node 0), NUM_PROCESSES, and this node's PROCESS_ID.
# Usage: COORDINATOR_ADDRESS=10.0.0.1:12345 NUM_PROCESSES=4 PROCESS_ID=0 \
#          launch/multinode_gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
: "${COORDINATOR_ADDRESS:?set COORDINATOR_ADDRESS=host:port of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"; : "${PROCESS_ID:?set PROCESS_ID}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec w2v2-train --config="$config" --workdir="$workdir" --coordinator="$COORDINATOR_ADDRESS" \
  --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID" "$@"
