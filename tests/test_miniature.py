"""w2v2-miniature over seeds: the summary's arithmetic, and the three phases at tiny size for 2 seeds with
resume."""

import json
import os
import subprocess
import sys

import experiment_file
import numpy as np
import pytest

from w2v2_jax.demo import miniature

REPO = os.path.join(os.path.dirname(__file__), "..")


def _phase(cer, beam_cer, wall=10.0):
  return {"valid_cer": cer, "valid_beam_cer": beam_cer, "wall_seconds": wall}


def test_the_summary_takes_the_scratch_arms_best_rate_per_decoding():
  runs = {
    "seed0": {
      "pretrain": {"wall_seconds": 100.0},
      "finetune_pretrained": _phase(0.30, 0.20),
      "scratch_lr0.001": _phase(0.50, 0.36),
      "scratch_lr0.002": _phase(0.45, 0.40),  # best greedy, worse with the LM
    },
    "seed1": {
      "pretrain": {"wall_seconds": 120.0},
      "finetune_pretrained": _phase(0.36, 0.21),
      "scratch_lr0.001": _phase(0.40, 0.30),
      "scratch_lr0.002": _phase(0.60, 0.35),
    },
  }
  s = miniature.summarize(runs)
  assert s["seeds"]["seed0"]["greedy"]["scratch_lr"] == "0.002"
  assert s["seeds"]["seed0"]["beam+LM"]["scratch_lr"] == "0.001"
  np.testing.assert_allclose(s["seeds"]["seed0"]["greedy"]["ratio"], 0.30 / 0.45)
  np.testing.assert_allclose(s["seeds"]["seed1"]["beam+LM"]["ratio"], 0.21 / 0.30)
  ratios = [0.30 / 0.45, 0.36 / 0.40]
  np.testing.assert_allclose(s["greedy"]["ratio"]["median"], np.median(ratios))
  np.testing.assert_allclose(s["greedy"]["ratio"]["std"], np.std(ratios, ddof=1))
  np.testing.assert_allclose(s["greedy"]["ratio"]["max"], 0.9)
  np.testing.assert_allclose(s["beam+LM"]["pretrained"]["mean"], 0.205)
  np.testing.assert_allclose(s["beam+LM"]["scratch"]["mean"], 0.33)
  assert s["seeds"]["seed1"]["wall_seconds"] == 150.0 and s["wall_seconds"] == {"per_seed_max": 150.0, "total": 280.0}


def test_each_seed_sets_every_phases_seed_and_the_sweep_only_the_scratch_rate():
  pre, fine = experiment_file.config("demo"), experiment_file.config("demo_finetune")
  got = dict(miniature.phases(3, "/w/seed3", pre, fine, [1e-3, 4e-3]))
  assert list(got) == ["pretrain", "finetune_pretrained", "scratch_lr0.001", "scratch_lr0.004"]
  assert {c.seed for c in got.values()} == {3}
  assert got["finetune_pretrained"].init == "/w/seed3/pretrain"
  assert [got[n].optim.lr for n in ("scratch_lr0.001", "scratch_lr0.004")] == [1e-3, 4e-3]
  assert got["finetune_pretrained"].optim.lr == fine.optim.lr and pre.seed == 0 and fine.seed == 0


def _miniature(workdir, seeds):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "w2v2_jax.demo.miniature",
      f"--workdir={workdir}",
      f"--seeds={seeds}",
      "--scratch_lrs=2e-3",  # the sweep's choice is tested above
      "--pretrain=experiments/demo.py:3",
      "--finetune=experiments/demo_finetune.py:3",
      "--pretrain.eval_batches=1",
      "--finetune.eval_batches=1",
      "--pretrain.data.num_buckets=1",  # one program per phase to compile
      "--finetune.data.num_buckets=1",
      "--finetune.finetune.freeze_steps=1",
      "--finetune.decode.beam=4",
      "--finetune.decode.lm_lines=500",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )


@pytest.mark.slow
def test_the_miniature_runs_its_phases_for_two_seeds_and_resumes(tmp_path):
  """Seed 0 alone, then 2 seeds (seed 0 resumed, not recomputed), then the same again (nothing run)."""
  first = _miniature(tmp_path, 1)
  assert first.returncode == 0, first.stderr[-3000:]
  stamp = os.path.getmtime(tmp_path / "seed0" / "finetune_pretrained" / "eval_results.json")
  second = _miniature(tmp_path, 2)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stderr.count("done before") == 3 and "seed 1 pretrain" in second.stderr
  results = json.loads((tmp_path / "miniature.json").read_text())
  assert set(results["runs"]) == {"seed0", "seed1"}
  for seed in ("seed0", "seed1"):
    run = results["runs"][seed]
    assert set(run) == {"pretrain", "finetune_pretrained", "scratch_lr0.002"}
    for name in ("finetune_pretrained", "scratch_lr0.002"):
      assert {"valid_cer", "valid_wer", "valid_beam_cer", "valid_beam_wer", "wall_seconds"} <= set(run[name]), name
  summary = results["summary"]
  for label in ("greedy", "beam+LM"):
    assert set(summary["seeds"]["seed1"][label]) == {"pretrained", "scratch", "scratch_lr", "ratio"}
    assert {"mean", "std", "median", "max"} <= set(summary[label]["ratio"])
  assert "ratio median" in second.stdout
  third = _miniature(tmp_path, 2)
  assert third.returncode == 0, third.stderr[-3000:]
  assert third.stderr.count("done before") == 6
  assert json.loads((tmp_path / "miniature.json").read_text())["runs"] == results["runs"]
  assert os.path.getmtime(tmp_path / "seed0" / "finetune_pretrained" / "eval_results.json") == stamp
