"""Shared CLI plumbing: expected errors become one 'prog: error: ...' line and exit status 1."""

from __future__ import annotations

import functools
import logging as logging_std
import sys

from w2v2_jax.data.audio import AudioError
from w2v2_jax.interop.hf import CheckpointError

EXPECTED_ERRORS = (AudioError, CheckpointError, OSError, ValueError, FloatingPointError)


def one_line_errors(prog: str):
  """Decorator for absl mains: known bad input -> a single stderr line, not a traceback."""

  def wrap(main):
    @functools.wraps(main)
    def run(argv):
      try:
        return main(argv)
      except EXPECTED_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"{prog}: error: {msg}\n")
        sys.exit(1)

    return run

  return wrap


def use_compilation_cache() -> str:
  """Keeps XLA's compiled programs on disk, so a resumed, repeated or similar run skips compiling:
  JAX_COMPILATION_CACHE_DIR if set, else $W2V2_JAX_CACHE/xla (~/.cache/w2v2_jax/xla).
  JAX_ENABLE_COMPILATION_CACHE=false turns it off. Returns the folder."""
  import os  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from w2v2_jax.demo.corpus import default_cache_dir  # pylint: disable=import-outside-toplevel

  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "xla"))
  return jax.config.jax_compilation_cache_dir


def keep_freed_host_memory() -> bool:
  """On a glibc host running JAX on CPU, freed host memory stays mapped for reuse; returns whether applied.

  XLA:CPU mallocs each step's temporaries (2.3 GB for stable-LN BASE, batch 4 x 4 s) on its worker
  threads, whose glibc arenas mmap anything over 64 MB and unmap it when freed: the kernel then
  zero-fills ~640k fresh pages every step, in system time (docs/performance.md). One arena, no mmap
  and no trimming keep those pages for the next step. The heap is also reserved ahead and backed by
  transparent huge pages (`_huge_page_heap`; large callocs then zero-fill at once). Call it before
  JAX's first computation: a thread that already has an arena keeps it. Skipped when GLIBC_TUNABLES
  or a MALLOC_* variable says the user manages the allocator, and when JAX will run on an
  accelerator (JAX_PLATFORMS not starting with cpu, or a TPU/GPU plugin installed without it).
  """
  import ctypes  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel

  if platform.libc_ver()[0] != "glibc" or any(k == "GLIBC_TUNABLES" or k.startswith("MALLOC_") for k in os.environ):
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    if not platforms.startswith("cpu"):
      return False
  elif any(importlib.util.find_spec(m) for m in _ACCELERATOR_PLUGINS):
    return False
  libc = ctypes.CDLL(None)
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
  # mallopt takes an int: -1 becomes SIZE_MAX for the trim threshold, i.e. never trim.
  applied = all(
    libc.mallopt(param, value) == 1 for param, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1))
  )
  if applied:
    _huge_page_heap(libc)
  return applied


def _huge_page_heap(libc) -> bool:
  """Grows the (never trimmed) heap by half the RAM, unused, and marks it MADV_HUGEPAGE; returns whether done.

  XLA:CPU's temporaries then sit on 2 MiB pages, a faster step than with 4 KiB pages
  (docs/performance.md; which of fewer TLB misses or fewer page faults gives it was not isolated).
  Only address space is reserved: malloc'ed pages fault in when first written, as before, but a
  large calloc (np.zeros, bytes(n)) now zero-fills, and so touches, its pages at once, since the
  heap's top is no longer fresh from sbrk. Growth past the reservation gets 4 KiB pages. Skipped
  unless the kernel offers huge pages on request, overcommits heuristically (strict accounting would
  charge the whole reservation) and the reservation lands in the [heap] mapping (brk blocked: glibc
  falls back to mmap).
  """
  import ctypes  # pylint: disable=import-outside-toplevel

  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      if "[never]" in f.read():
        return False
    with open("/proc/sys/vm/overcommit_memory") as f:
      if f.read().strip() == "2":
        return False
    with open("/proc/meminfo") as f:
      total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
  except (OSError, StopIteration, ValueError):
    return False
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  block = libc.malloc(total // 2)  # no mmap: from the heap's top (sbrk); freed, it stays there untrimmed
  if not block:
    return False
  libc.free(block)
  with open("/proc/self/maps") as f:
    heap = [[int(a, 16) for a in line.split()[0].split("-")] for line in f if line.rstrip().endswith("[heap]")]
  if not heap:
    return False
  start, end = min(a for a, _ in heap), max(b for _, b in heap)
  if not start <= block < end:
    return False
  madv_hugepage = 14
  return libc.madvise(start, end - start, madv_hugepage) == 0


_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def write_json(path: str | None, figures: dict) -> None:
  """Benchmark CLIs: also write their figures to --json=PATH when given."""
  if path:
    import json  # pylint: disable=import-outside-toplevel

    with open(path, "w") as f:
      json.dump(figures, f, indent=1)


def split_list(value: str) -> list[str]:
  return [v.strip() for v in value.split(",") if v.strip()]


class _DropLibraryInfo(logging_std.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console; warnings still show."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def quiet_libraries():
  for handler in logging_std.getLogger().handlers + logging_std.getLogger("absl").handlers:
    handler.addFilter(_DropLibraryInfo())
