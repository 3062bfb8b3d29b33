"""The README's main command learns: the demo pre-training leaves chance level without collapsing."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from w2v2_jax.train import events

pytestmark = pytest.mark.slow

REPO = os.path.join(os.path.dirname(__file__), "..")


def test_demo_pretraining_learns(tmp_path):
  """`w2v2-train --config=experiments/demo.py` as a user runs it (one process, one CPU device), stopped
  after 400 of its 800 updates (same schedule): it leaves chance at ~200; this is the suite's longest test.

  Chance is ln(1 + 100 distractors) = 4.615 with accuracy 1/101; collapse would show as a prob
  perplexity near 1 of the 64 codewords (2 groups x 32).
  """
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "w2v2_jax.cli.train",
      "--config=experiments/demo.py",
      "--config.num_train_steps=400",
      "--config.optim.total_steps=800",
      f"--workdir={tmp_path}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  s = {tag: np.array([v for _, v in points]) for tag, points in events.read_scalars(str(tmp_path)).items()}
  chance = math.log(101)
  first, last = s["train/contrastive"][:4].mean(), s["train/contrastive"][-4:].mean()
  assert first > chance - 0.05, first
  assert last < chance - 0.35, (first, last)  # clearly below chance, not noise
  assert s["valid/loss"][-1] < chance - 0.3, s["valid/loss"]  # held-out voices and sentences too
  assert s["valid/accuracy"][-1] > 5 / 101, s["valid/accuracy"]
  assert s["train/prob_perplexity"].min() > 32, s["train/prob_perplexity"].min()  # far from collapse
  for png in ("curves.png", "codebook_usage.png"):  # the end-of-run plots
    assert os.path.getsize(tmp_path / png) > 10_000, png
