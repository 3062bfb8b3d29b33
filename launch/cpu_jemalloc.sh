#!/usr/bin/env bash
# Runs a command (a CPU job) under jemalloc on transparent huge pages: XLA:CPU mallocs thousands of
# scratch buffers a step, and glibc's bins cost ~5% of its CPU time; the stable-LN BASE step took
# 0.92 of its time with glibc set by launch/cpu_glibc.sh (docs/performance.md). Needs libjemalloc.so.2
# (Debian/Ubuntu: apt-get install libjemalloc2), or JEMALLOC=/path/to/libjemalloc.so.2.
# Usage: launch/cpu_jemalloc.sh COMMAND [ARGS...]
# e.g.   launch/cpu_jemalloc.sh w2v2-train --config=experiments/demo.py --workdir=/tmp/w2v2_demo
set -euo pipefail
[ "$#" -gt 0 ] || { echo "cpu_jemalloc.sh: error: no command given; usage: launch/cpu_jemalloc.sh COMMAND [ARGS...]" >&2; exit 2; }
case "$(uname -m)" in
  x86_64) arch="x86-64" ;;
  aarch64 | arm64) arch="AArch64" ;;
  *) arch="$(uname -m)" ;;
esac
if [ -z "${JEMALLOC:-}" ]; then
  # ldconfig may be missing, and awk reads to the end so a long cache never dies of SIGPIPE.
  ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
  JEMALLOC=$({ "$ldconfig" -p 2>/dev/null || true; } |
    awk -v arch="$arch" '!found && /libjemalloc\.so\.2 / && index($0, arch) {print $NF; found = 1}')
  lookup="not found by ldconfig"
else
  lookup="not found at JEMALLOC=$JEMALLOC"
fi
if [ -z "$JEMALLOC" ] || [ ! -f "$JEMALLOC" ]; then
  echo "cpu_jemalloc.sh: error: libjemalloc.so.2 $lookup; install it (apt-get install libjemalloc2) or set JEMALLOC=/path/to/libjemalloc.so.2" >&2
  exit 1
fi
export LD_PRELOAD="$JEMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
# Huge pages, and freed pages kept for the next step (as launch/cpu_glibc.sh does for glibc).
export MALLOC_CONF=${MALLOC_CONF:-thp:always,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1}
exec "$@"
