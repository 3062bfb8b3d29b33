#!/usr/bin/env bash
# Runs a command (a CPU job) with glibc's allocator set for XLA:CPU: one arena, no mmap, no trimming,
# and the heap on transparent huge pages. XLA:CPU mallocs each step's large temporaries on its worker
# threads; with glibc's defaults they are mmapped and unmapped every step, and the kernel zero-fills
# their pages again each time. These settings keep the pages for the next step (docs/performance.md).
# Settings the environment already has are kept. Opt-in: the library never changes the allocator.
# Usage: launch/cpu_glibc.sh COMMAND [ARGS...]
# e.g.   launch/cpu_glibc.sh w2v2-train --config=experiments/demo.py --workdir=/tmp/w2v2_demo
set -euo pipefail
[ "$#" -gt 0 ] || { echo "cpu_glibc.sh: error: no command given; usage: launch/cpu_glibc.sh COMMAND [ARGS...]" >&2; exit 2; }
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-1}
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}
exec "$@"
