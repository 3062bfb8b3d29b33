#!/usr/bin/env bash
# A TPU VM slice (every worker of it) with gcloud: create or queue it, copy this checkout to
# ~/w2v2_jax on each worker, install it (Python 3.11 from uv), run w2v2-train on every worker.
#   launch/tpu_pod.sh create | queue           # the slice now (tpu-vm create), or a queued resource
#   launch/tpu_pod.sh wait                     # until the queued resource is ACTIVE
#   launch/tpu_pod.sh sync                     # this checkout's files -> ~/w2v2_jax (replaced; .venv kept)
#   launch/tpu_pod.sh setup                    # sync + uv + ~/w2v2_jax/.venv (Python 3.11) + pip install -e '.[tpu]'
#   launch/tpu_pod.sh run CONFIG WORKDIR [--config.KEY=VALUE ...]   # WORKDIR: gs://... (seen by every worker)
#   launch/tpu_pod.sh logs [-f] [LINES]        # the last LINES (100) of every worker's log, [worker I] first
#   launch/tpu_pod.sh stop                     # SIGTERM to w2v2-train on every worker: each saves, then exits
#   launch/tpu_pod.sh status                   # the slice's state (READY, PREEMPTED, ...) and the queued resource's
#   launch/tpu_pod.sh delete                   # the slice and its queued resource
#   launch/tpu_pod.sh recreate CONFIG WORKDIR [...]   # delete + queue + wait + setup + run: resumes a preempted run
# Settings (environment): TPU_NAME (w2v2), ZONE (us-east5-a), ACCELERATOR (v5p-128), RUNTIME
# (v2-alpha-tpuv5), PROJECT (gcloud's default), SPOT=1 for spot capacity, SSH_FLAGS (extra flags for
# tpu-vm ssh/scp, e.g. --tunnel-through-iap).
set -euo pipefail
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" >&2; exit 2; }  # the comment above
TPU_NAME=${TPU_NAME:-w2v2}; ZONE=${ZONE:-us-east5-a}; ACCELERATOR=${ACCELERATOR:-v5p-128}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
[ -n "${1:-}" ] || usage
PROJECT=${PROJECT:-$(gcloud config get-value project 2> /dev/null || true)}
[ -n "$PROJECT" ] || die "no project: set PROJECT or run 'gcloud config set project ID'"
SRC=$(cd "$(dirname "$0")/.." && pwd)
read -ra ssh_flags <<< "${SSH_FLAGS:-}"
spot=(); if [ "${SPOT:-0}" = 1 ]; then spot=(--spot); fi
where=(--zone="$ZONE" --project="$PROJECT")
# Empty arrays expand as ${a[@]+"${a[@]}"}: bash before 4.4 (macOS's) calls "${a[@]}" unbound under set -u.
# On a worker: whether ~/w2v2.pid names a live w2v2-train (expanded there, hence the single quotes).
# shellcheck disable=SC2016
RUNNING='[ -f ~/w2v2.pid ] && ps -ww -p "$(cat ~/w2v2.pid)" -o args= | grep -q w2v2-train'

ssh_workers() {  # WORKER (all or an index) COMMAND: COMMAND in each worker's login shell
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="$1" ${ssh_flags[@]+"${ssh_flags[@]}"} --command="$2"
}

quote() { printf '%q ' "$@"; }

workers() {  # the number of workers of the slice
  local ips
  ips=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" --format='value(networkEndpoints[].ipAddress)') \
    && [ -n "$ips" ] || die "TPU $TPU_NAME in $ZONE has no workers (not created yet? see 'status')"
  tr ';' '\n' <<< "$ips" | grep -c .
}

queued_exists() { gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" > /dev/null 2>&1; }
tpu_exists() { gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" > /dev/null 2>&1; }

create() {
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" ${spot[@]+"${spot[@]}"}
}

queue() {
  gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${where[@]}" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ${spot[@]+"${spot[@]}"}
}

wait_active() {
  local state
  while :; do
    state=$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" --format='value(state.state)')
    case "$state" in
      ACTIVE) echo "tpu_pod.sh: queued resource $TPU_NAME is ACTIVE"; return ;;
      FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state; 'delete' it and queue again" ;;
      *) echo "tpu_pod.sh: queued resource $TPU_NAME is ${state:-unknown}; checking again in 60 s"; sleep 60 ;;
    esac
  done
}

sync_code() {
  # The checkout's files (git's tracked and untracked-but-not-ignored ones; without git: all but
  # .git and .venv) as one tarball, unpacked over an emptied ~/w2v2_jax: a re-run updates the
  # copy, removes deleted files, never nests, and keeps the worker's .venv.
  local tgz
  tgz=$(mktemp "${TMPDIR:-/tmp}/w2v2_src.XXXXXX")
  if git -C "$SRC" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    git -C "$SRC" ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do if [ -e "$SRC/$f" ]; then printf '%s\0' "$f"; fi; done \
      | tar -C "$SRC" --null -czf "$tgz" -T -   # (deleted files git still tracks are left out)
  else
    tar -C "$SRC" --exclude=./.git --exclude=./.venv -czf "$tgz" .
  fi
  gcloud compute tpus tpu-vm scp "$tgz" "$TPU_NAME:w2v2_src.tgz" "${where[@]}" --worker=all ${ssh_flags[@]+"${ssh_flags[@]}"}
  rm -f "$tgz"
  ssh_workers all "if $RUNNING; then echo \"w2v2-train is running (tpu_pod.sh stop first)\" >&2; exit 1; fi
    mkdir -p ~/w2v2_jax && cd ~/w2v2_jax && find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} + \
      && tar -xzf ~/w2v2_src.tgz && rm -f ~/w2v2_src.tgz"
}

setup() {
  sync_code
  # uv brings Python 3.11 where the image has an older one (Ubuntu 22.04: 3.10); a .venv on an
  # older Python (or none) is made anew. Single quotes: expanded on the worker.
  # shellcheck disable=SC2016
  ssh_workers all 'export PATH="$HOME/.local/bin:$PATH"
    command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
    cd ~/w2v2_jax || exit 1
    if ! .venv/bin/python -c "import sys; sys.exit(sys.version_info < (3, 11))" 2> /dev/null; then
      rm -rf .venv && uv venv --python 3.11 .venv || exit 1
    fi
    uv pip install --python .venv/bin/python -e ".[tpu]"'
}

run() {
  [ "$#" -ge 2 ] || die "usage: tpu_pod.sh run CONFIG WORKDIR [--config.KEY=VALUE ...]"
  local config=$1 workdir=$2 cmd
  shift 2
  case "$workdir" in
    gs://*) ;;
    *) echo "tpu_pod.sh: warning: WORKDIR=$workdir is not gs://; every worker must see the same folder" >&2 ;;
  esac
  cmd=$(quote w2v2-train --config="$config" --workdir="$workdir" --distributed=on "$@")
  # setsid + nohup: the run outlives the ssh session; its pid (setsid does not fork here) goes to ~/w2v2.pid.
  ssh_workers all "cd ~/w2v2_jax && . .venv/bin/activate || exit 1
    if $RUNNING; then echo \"w2v2-train is already running (pid \$(cat ~/w2v2.pid))\" >&2; exit 1; fi
    echo \"== \$(date -u) $cmd\" >> ~/w2v2.log
    nohup setsid $cmd >> ~/w2v2.log 2>&1 < /dev/null &
    echo \$! > ~/w2v2.pid"
}

logs() {
  local follow='' lines=100 n i
  if [ "${1:-}" = -f ]; then follow=-F; shift; fi
  if [ -n "${1:-}" ]; then lines=$1; fi
  [[ $lines =~ ^[0-9]+$ ]] || die "LINES must be a number (got '$lines')"
  n=$(workers)
  for ((i = 0; i < n; i++)); do
    ssh_workers "$i" "tail -n $lines $follow ~/w2v2.log" 2>&1 | sed -u "s/^/[worker $i] /" &
  done
  wait
}

stop() {
  ssh_workers all "if $RUNNING; then kill -TERM \"\$(cat ~/w2v2.pid)\" && echo \"SIGTERM sent to w2v2-train\";
    else echo 'w2v2-train is not running'; fi"
}

status() {
  local state
  if tpu_exists; then
    state=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" --format='value(state)')
    echo "TPU $TPU_NAME: $state"
  else
    echo "TPU $TPU_NAME: none"
  fi
  if queued_exists; then
    state=$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" --format='value(state.state)')
    echo "queued resource $TPU_NAME: $state"
  fi
}

delete() {
  # --force: the queued resource's slice goes with it; a slice made by 'create' has none.
  if queued_exists; then
    gcloud compute tpus queued-resources delete "$TPU_NAME" "${where[@]}" --force --quiet
  fi
  if tpu_exists; then
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
  fi
}

command=$1; shift
case "$command" in
  create) create ;;
  queue) queue ;;
  wait) wait_active ;;
  sync) sync_code ;;
  setup) setup ;;
  run) run "$@" ;;
  logs) logs "$@" ;;
  stop) stop ;;
  status) status ;;
  delete) delete ;;
  recreate)
    [ "$#" -ge 2 ] || die "usage: tpu_pod.sh recreate CONFIG WORKDIR [--config.KEY=VALUE ...] (the run's own arguments)"
    delete; queue; wait_active; setup; run "$@" ;;
  *) usage ;;
esac
