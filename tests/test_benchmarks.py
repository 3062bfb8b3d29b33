"""The scripts in benchmarks/ run to completion at tiny size, as docs/performance.md gives them."""

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
pytestmark = pytest.mark.slow


def _script(name, *args, timeout=600):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, os.path.join(BENCHMARKS, name), *args], capture_output=True, text=True, env=env, timeout=timeout
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def test_bench_components_times_each_part():
  out = _script("bench_components.py", "--preset=tiny", "--batch=1", "--seconds=0.5", "--steps=1")
  for part in ("feature encoder", "positional conv", "transformer layer"):
    assert any(line.startswith(part) and "forward+backward" in line for line in out.splitlines()), out


def test_data_scale_at_tiny_scale(tmp_path):
  figures = tmp_path / "scale.json"
  _script(
    "data_scale.py",
    f"--data_dir={tmp_path / 'data'}",
    "--utterances=3000",
    "--shards=6",
    "--hosts=2",
    "--rows_per_host=2",
    "--steps=5",
    "--epochs=2",
    f"--json={figures}",
  )
  assert json.loads(figures.read_text())


def test_gcs_input_against_the_emulator(tmp_path):
  figures = tmp_path / "gcs.json"
  _script("gcs_input.py", "--hours=0.15", "--seconds=2", "--concurrency=4", "--latency_ms=5", f"--json={figures}")
  rows = json.loads(figures.read_text())
  assert rows, rows
