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


def _demo(workdir, *flags):
  """`w2v2-train --config=experiments/demo.py` as a user runs it (one process, one CPU device)."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "w2v2_jax.cli.train", "--config=experiments/demo.py", *flags, f"--workdir={workdir}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )


def test_demo_pretraining_learns(tmp_path):
  """`w2v2-train --config=experiments/demo.py` as a user runs it (one process, one CPU device), stopped
  after 400 of its 800 updates (same schedule): it leaves chance at ~200, inside the band of the demo's
  measured reference curve, with no health alarm; this is the suite's longest test.

  Chance is ln(1 + 100 distractors) = 4.615 with accuracy 1/101; collapse would show as a prob
  perplexity near 1 of the 64 codewords (2 groups x 32).
  """
  run = _demo(tmp_path, "--config.num_train_steps=400", "--config.optim.total_steps=800")
  assert run.returncode == 0, run.stderr[-3000:]
  s = {tag: np.array([v for _, v in points]) for tag, points in events.read_scalars(str(tmp_path)).items()}
  chance = math.log(101)
  first, last = s["train/contrastive"][:4].mean(), s["train/contrastive"][-4:].mean()
  assert first > chance - 0.05, first
  assert last < chance - 0.35, (first, last)  # clearly below chance, not noise
  assert s["valid/loss"][-1] < chance - 0.3, s["valid/loss"]  # held-out voices and sentences too
  assert s["valid/accuracy"][-1] > 5 / 101, s["valid/accuracy"]
  assert s["train/prob_perplexity"].min() > 32, s["train/prob_perplexity"].min()  # far from collapse
  assert "health alarm" not in run.stderr
  warned = [line for line in run.stderr.splitlines() if "] reference: " in line]  # (the config dump has the key)
  assert not warned, warned
  alarms = {tag: v.max() for tag, v in s.items() if tag.startswith("health/")}
  assert len(alarms) == 5 and not any(alarms.values()), alarms
  for png in ("curves.png", "codebook_usage.png"):  # the end-of-run plots
    assert os.path.getsize(tmp_path / png) > 10_000, png


def test_the_demo_with_fairseqs_feature_settings_sits_at_chance_and_is_stopped(tmp_path):
  """fairseq's feature_grad_mult 0.1 and feature penalty 10 keep the tiny model at ln 101 (docs/faq.md).
  The at-chance alarm fires once its wait, max(10 x 50 warm-up updates, 25% of 800) = 500, is over;
  with health.stop_on_collapse the run saves that step and w2v2-train exits 3."""
  run = _demo(
    tmp_path,
    "--config.model.feature_grad_mult=0.1",
    "--config.objective.feature_penalty_weight=10",
    "--config.health.stop_on_collapse=true",
    "--config.eval_every_steps=1000",
    "--plots=false",
  )
  assert run.returncode == 3, run.stderr[-3000:]
  alarms = [line for line in run.stderr.splitlines() if "health alarm" in line]
  assert len(alarms) == 1 and "at_chance" in alarms[0] and "feature_grad_mult" in alarms[0], alarms
  s = events.read_scalars(str(tmp_path))
  assert [step for step, v in s["health/at_chance"] if v] == [500]
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())[-1] == 500
