"""Shared CLI plumbing: expected errors become one 'prog: error: ...' line and exit status 1."""

from __future__ import annotations

import contextlib
import functools
import logging as logging_std
import sys

from w2v2_jax.data.audio import AudioError
from w2v2_jax.interop.hf import CheckpointError

EXPECTED_ERRORS = (AudioError, CheckpointError, OSError, ValueError, FloatingPointError)
# Config keys that moved (old -> new): an override of the old name is told the new one.
RENAMED_CONFIG_KEYS = {"finetune.init": "init"}
_SCHEMA = "w2v2_jax/train/defaults.py"


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


@contextlib.contextmanager
def config_key_errors(prog: str, argv=None):
  """An override of a config key that does not exist (ml_collections raises a bare KeyError or
  AttributeError from inside absl's flag parsing: a traceback) ends with one 'prog: error: ...' line
  naming the flag, and exit status 1. Wraps the parsing, and the definition of a config flag with a default."""
  try:
    yield
  except (KeyError, AttributeError) as e:
    line = unknown_config_key(sys.argv if argv is None else argv, e)
    if line is None:  # not about an override on the command line
      raise
    sys.stderr.write(f"{prog}: error: {line}\n")
    sys.exit(1)


def config_flags_parser(prog: str):
  """absl's flags parser for app.run(flags_parser=...) in a CLI with config-file flags (config_key_errors)."""
  from absl import app  # pylint: disable=import-outside-toplevel

  def parse(argv):
    with config_key_errors(prog, argv):
      return app.parse_flags_with_usage(argv)

  return parse


def unknown_config_key(argv, error: Exception) -> str | None:
  """The line for ml_collections' error about a missing key: which --FLAG.KEY=... names it, and what to do."""
  cause = error.args[0] if error.args else ""
  if isinstance(cause, KeyError):  # the AttributeError of a missing leaf wraps the KeyError
    cause = cause.args[0] if cause.args else ""
  missing, _, hint = str(cause).partition("\n")  # "'lrr'" and 'Did you mean "lr" instead of "lrr"?'
  missing = missing.strip("'\"")
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    flag, _, key = name.partition(".")
    if key and missing in key.split("."):
      if key in RENAMED_CONFIG_KEYS:
        new = RENAMED_CONFIG_KEYS[key]
        return f"--{name}: the config key {key} is now {new}; pass --{flag}.{new}"
      hint = f" ({hint.strip()})" if hint.strip() else ""
      return f"--{name}: the config has no key {key}{hint}; every key is in {_SCHEMA}"
  return None


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
