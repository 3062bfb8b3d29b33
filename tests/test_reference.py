"""Reference curves: the band between points, the one warning a run gets, the configs that carry them, and
w2v2-plot's overlay."""

import os

import experiment_file
import numpy as np
import pytest

from w2v2_jax.train import reference


def _curve(points, metric="valid/accuracy"):
  return reference.Curve("ref", metric, "a paper", points)


def test_the_band_is_interpolated_between_points_and_absent_outside_them():
  curve = _curve(((100, 0.40, 0.02), (300, 0.60, 0.06)))
  assert curve.band(99) is None and curve.band(301) is None
  np.testing.assert_allclose(curve.band(100), (0.40, 0.38, 0.42))
  np.testing.assert_allclose(curve.band(200), (0.50, 0.46, 0.54))  # value and half-width both halfway
  np.testing.assert_allclose(curve.band(300), (0.60, 0.54, 0.66))
  single = _curve(((400_000, 0.62, 0.03),))
  assert single.band(399_999) is None
  np.testing.assert_allclose(single.band(400_000), (0.62, 0.59, 0.65))


def test_a_run_is_warned_once_when_it_leaves_a_band():
  check = reference.Check([_curve(((100, 0.40, 0.02), (300, 0.60, 0.06)))])
  assert check.update(50, {"valid/accuracy": 0.0}) is None  # before the curve begins
  assert check.update(200, {"valid/accuracy": 0.53}) is None  # inside 0.46-0.54
  assert check.update(200, {"valid/loss": 9.0}) is None  # another metric
  line = check.update(250, {"valid/accuracy": 0.30})
  assert line == (
    "reference: valid/accuracy 0.300 at update 250 is outside the band 0.500-0.600 of ref "
    "(0.550; a paper); see docs/faq.md (is my curve normal?)"
  )
  assert "\n" not in line
  assert check.update(300, {"valid/accuracy": 0.0}) is None  # once per run
  above = reference.Check([_curve(((100, 0.40, 0.02),))])
  assert above.update(100, {"valid/accuracy": 0.99}) is not None  # too good is as suspect (trivial solution)


@pytest.mark.parametrize(
  "entry,message",
  [
    (dict(metric="valid/accuracy", points=((1, 0.5, 0.1),)), r"config.reference.bad: needs \['source'\]"),
    (dict(metric="m", source="s", points=((1, 0.5),)), r"config.reference.bad.points: give \(update, value"),
    (dict(metric="m", source="s", points=((5, 0.5, 0.1), (5, 0.6, 0.1))), "the updates must rise"),
    (dict(metric="m", source="s", points=((5, 0.5, -0.1),)), "half-widths be >= 0"),
  ],
)
def test_a_bad_reference_entry_is_named(entry, message):
  with pytest.raises(ValueError, match=message):
    reference.curves({"reference": {"bad": entry}})


@pytest.mark.parametrize("name,curves", [("base_librispeech", 2), ("large_lv60", 1), ("demo", 1)])
def test_the_pretraining_recipes_carry_their_references_with_sources(name, curves):
  config = experiment_file.config(name)
  found = reference.curves(config)
  assert len(found) == curves and all(c.source and c.metric == "valid/accuracy" for c in found)
  assert all(c.points[-1][0] <= config.num_train_steps for c in found)


def test_a_curve_measured_with_one_schedule_applies_to_that_schedule_only():
  entry = dict(metric="valid/accuracy", source="s", schedule_steps=800, points=((100, 0.1, 0.1),))
  config = {"num_train_steps": 800, "optim": {"total_steps": -1}, "reference": {"demo": entry}}
  assert len(reference.curves(config)) == 1
  config["num_train_steps"] = 5000
  assert reference.curves(config) == []
  config["optim"]["total_steps"] = 800  # stopped early on the same schedule
  assert len(reference.curves(config)) == 1
  assert reference.curves(experiment_file.config("demo")) and not reference.curves(
    experiment_file.config("demo", "5000")
  )


def test_the_demo_reference_covers_the_demos_evaluations():
  config = experiment_file.config("demo")
  (curve,) = reference.curves(config)
  evals = range(config.eval_every_steps, config.num_train_steps + 1, config.eval_every_steps)
  assert all(curve.band(step) is not None for step in evals)


def test_plot_overlays_the_reference_on_the_run(tmp_path):
  from w2v2_jax.cli import plot
  from w2v2_jax.train import events

  writer = events.EventWriter(str(tmp_path / "tensorboard"))
  for step in (100, 200, 300):
    writer.write_scalars(step, {"train/loss": 4.0 - step / 1000, "valid/accuracy": step / 1000})
  writer.close()
  curves = [_curve(((100, 0.1, 0.02), (300, 0.3, 0.02))), _curve(((100, 50.0, 5.0),), metric="train/code_perplexity")]
  panels = plot.curve_panels(events.read_scalars(str(tmp_path)), curves)
  assert ("accuracy", ["valid/accuracy"]) in panels
  assert ("perplexity", ["train/code_perplexity"]) in panels  # drawn before the run logs it
  path = plot.plot_curves(str(tmp_path), None, curves)
  assert os.path.getsize(path) > 10_000


def test_a_misspelt_key_of_plots_reference_config_is_one_line(tmp_path):
  import subprocess
  import sys

  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "w2v2_jax.cli.plot",
      f"--workdir={tmp_path}",
      "--reference=experiments/demo.py",
      "--reference.optim.lrr=1",
    ],
    cwd=os.path.join(os.path.dirname(__file__), ".."),
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
  assert (
    run.stderr.strip()
    .splitlines()[-1]
    .startswith("w2v2-plot: error: --reference.optim.lrr: the config has no key optim.lrr")
  ), run.stderr[-3000:]
  assert "w2v2_jax/train/defaults.py" in run.stderr
