#!/usr/bin/env bash
# TPU VM pods with gcloud. Every command acts on all workers of the slice.
#   launch/tpu_pod.sh create            # create the slice now (or: queue -> a queued resource)
#   launch/tpu_pod.sh setup             # clone/copy this repo to every worker, pip install '.[tpu]'
#   launch/tpu_pod.sh run CONFIG WORKDIR [--config.KEY=VALUE ...]   # WORKDIR: a gs:// path
#   launch/tpu_pod.sh logs              # tail the run's log on worker 0
#   launch/tpu_pod.sh stop | delete
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR (e.g. v5p-128), RUNTIME, PROJECT.
set -euo pipefail
TPU_NAME=${TPU_NAME:-w2v2}; ZONE=${ZONE:-us-east5-a}; ACCELERATOR=${ACCELERATOR:-v5p-128}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}; PROJECT=${PROJECT:-$(gcloud config get-value project)}
REPO_DIR='~/w2v2_jax'
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"; }
case "${1:-}" in
  create) gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
            --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ;;
  queue)  gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --zone="$ZONE" \
            --project="$PROJECT" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ;;
  setup)  gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --project="$PROJECT" --worker=all \
            "$(cd "$(dirname "$0")/.." && pwd)" "$TPU_NAME":"$REPO_DIR"
          ssh_all "cd $REPO_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'" ;;
  run)    shift; config=${1:?config}; workdir=${2:?workdir}; shift 2
          # nohup + setsid: the run survives the ssh session; every worker runs the same command.
          ssh_all "cd $REPO_DIR && . .venv/bin/activate && setsid nohup w2v2-train --config=$config \
            --workdir=$workdir --distributed=on $* > ~/w2v2.log 2>&1 < /dev/null &" ;;
  logs)   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=0 \
            --command="tail -f ~/w2v2.log" ;;
  stop)   ssh_all "pkill -TERM -f w2v2-train || true" ;;   # SIGTERM: each process saves, then exits
  delete) gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
