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
