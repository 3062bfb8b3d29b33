"""Test setup: 8 CPU devices (set before jax is imported) and shared tiny fixtures."""

import os
import tempfile

# The tests compile many small programs and run each a few times, so they spend most of their time
# in XLA:CPU's LLVM backend: its optimization level 0 halves compile time (and slows the code ~2.5x;
# test_demo's 800 updates keep the default). Subprocesses and the notebook kernel get FAST_COMPILE
# too, and must, where their results are compared bitwise with this process's.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One XLA compilation cache per test session, shared with the w2v2-train subprocesses the tests start:
# the many runs of the same tiny step compile once. Fresh per session, so nothing stale carries over.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="w2v2_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, "tests expect 8 forced CPU devices"


@pytest.fixture(scope="module")
def speech_like_shards(tmp_path_factory):
  """40 utterances of 1-2 s of a random-pitch harmonic signal with noise, as train (32) and valid (8) shards."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from w2v2_jax.data import records  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("train_shards")
  rng = np.random.default_rng(0)
  utts = []
  for i in range(40):
    n = int(rng.integers(16000, 32000))
    t = np.arange(n) / 16000
    f0 = rng.uniform(100, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 6)) + 0.1 * rng.standard_normal(n)
    utts.append(records.Utterance(f"u{i}", (x / np.abs(x).max() * 12000).astype(np.int16)))
  records.write_split(str(root), "train", utts[:32], shard_size=32)
  records.write_split(str(root), "valid", utts[32:], shard_size=32)
  return str(root)
