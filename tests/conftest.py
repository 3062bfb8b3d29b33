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
