"""The health alarms on metric series shaped like the failures the peers' trackers report, each beside a
healthy control that must raise nothing."""

import math

import numpy as np
import pytest

from w2v2_jax.train import health

RUN = health.Run(num_negatives=100, codebook_size=640, warmup_steps=100, num_train_steps=4000)
CHANCE = math.log(101)


def _healthy(step):
  """A BASE-like run: at chance for 300 updates, then learning; perplexity high; gradients ~0.5."""
  learnt = max(0.0, (step - 300) / 3700)
  return dict(
    contrastive=CHANCE - 2.5 * learnt,
    accuracy=1 / 101 + 0.55 * learnt,
    prob_perplexity=500 - 50 * learnt,
    code_perplexity=480 - 50 * learnt,
    grad_norm=0.1 + 0.5 * learnt,
    skipped_in_a_row=0,
  )


def _alarms(series_fn, run=RUN, thresholds=health.Thresholds(), every=50):
  monitor = health.Monitor(health.PRETRAINING, run, thresholds)
  raised = {}
  for step in range(every, run.num_train_steps + 1, every):
    scalars, new = monitor.update(step, series_fn(step))
    for line in new:
      raised.setdefault(line.split(":")[0].split()[-1], (step, line))
    assert set(scalars) == {f"health/{d.__name__}" for d in health.PRETRAINING}
  return raised


def test_a_healthy_run_raises_nothing():
  assert _alarms(_healthy) == {}


def test_a_run_pinned_at_chance_raises_once_the_wait_is_over():
  """fairseq#3661-style: the loss stays at ln(101) (4.615 nats; 6.658 in fairseq's log2) with accuracy at
  chance. The wait is max(10 x warm-up, 25% of the updates) = 1000 here."""
  pinned = lambda step: dict(_healthy(0), contrastive=CHANCE + 0.001 * np.sin(step))  # noqa: E731
  raised = _alarms(pinned)
  assert set(raised) == {"at_chance"}
  step, line = raised["at_chance"]
  assert step == 1000 and "feature_grad_mult" in line and "docs/faq.md" in line
  # The healthy demo sits at chance for its first ~200 updates: a wait shorter than that would fire.
  assert _alarms(_healthy, health.Run(100, 64, 50, 800), every=25) == {}


def test_codebook_collapse_by_level_and_by_a_steady_fall():
  low = lambda step: dict(_healthy(step), prob_perplexity=40.0)  # noqa: E731
  step, line = _alarms(low)["codebook_collapse"]
  assert step == 100 and "prob perplexity" in line and "diversity_loss_weight" in line
  # fairseq#3979 / #4948: code perplexity peaks, then falls steadily to under half its peak.
  peaked = lambda step: dict(_healthy(step), code_perplexity=500 - max(0, step - 1000) * 0.2)  # noqa: E731
  step, line = _alarms(peaked)["codebook_collapse"]
  assert 2200 <= step <= 2300 and "code perplexity" in line and "peak" in line
  # A perplexity that dips and recovers is not a steady fall.
  wobbly = lambda step: dict(_healthy(step), code_perplexity=300 + 200 * ((step // 50) % 2))  # noqa: E731
  assert "codebook_collapse" not in _alarms(wobbly)


def test_the_trivial_solution():
  """HF#14387 / HF Flax #19588: accuracy goes to 1 while the code perplexity falls to ~1-2."""

  def trivial(step):
    m = _healthy(step)
    if step >= 2000:
      m.update(accuracy=0.99, code_perplexity=1.3, prob_perplexity=1.5)
    return m

  raised = _alarms(trivial)
  assert raised["trivial_solution"][0] == 2000 and "codebook_collapse" in raised


def test_a_vanishing_gradient_and_a_streak_of_non_finite_steps():
  flat = lambda step: dict(_healthy(step), grad_norm=0.0 if step > 500 else 0.3)  # noqa: E731
  assert _alarms(flat)["vanishing_gradient"][0] == 550
  nan = lambda step: dict(_healthy(step), skipped_in_a_row=7 if step == 1500 else 0)  # noqa: E731
  assert _alarms(nan)["nonfinite_streak"][0] == 1500


def test_thresholds_come_from_config_health():
  import train_config

  c = train_config.get_config("/nonexistent,1")
  assert health.Thresholds.from_config(c.health) == health.Thresholds()
  c.health.chance_margin = 0.5
  assert health.Thresholds.from_config(c.health).chance_margin == 0.5
  with pytest.raises(AttributeError):
    c.lock()
    c.health.chance_marg = 1.0
