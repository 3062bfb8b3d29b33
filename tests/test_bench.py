"""w2v2-bench and the peer comparison: the figures are consistent and the peers train our architecture."""

import os
import sys

import jax
import numpy as np
import pytest

from w2v2_jax.cli import bench
from w2v2_jax.models.init import init_params
from w2v2_jax.train import loop

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_peers  # noqa: E402  (benchmarks/ sits outside the package)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_peers_get_our_architecture_and_objective():
  import torch
  import transformers

  config = bench_peers.benchmark_config(2, "tiny")
  fields = bench_peers.hf_fields(config)
  hf_cfg = transformers.Wav2Vec2Config(**fields)
  assert hf_cfg.do_stable_layer_norm and hf_cfg.feat_extract_norm == "layer" and hf_cfg.conv_bias
  assert hf_cfg.layerdrop == 0.0 and hf_cfg.num_negatives == 100 and hf_cfg.mask_time_prob == 0.65
  assert hf_cfg.contrastive_logits_temperature == 0.1 and hf_cfg.diversity_loss_weight == 0.1
  torch.manual_seed(0)
  theirs = sum(p.numel() for p in transformers.Wav2Vec2ForPreTraining(hf_cfg).parameters())
  ours = _count(jax.eval_shape(lambda k: init_params(loop.model_config(config), k), jax.random.key(0)))
  assert ours == theirs


@pytest.mark.slow
def test_torch_peer_worker_times_full_steps():
  """The worker protocol, run with this venv's transformers (the Flax peer needs the 4.46.3 venv)."""
  config = bench_peers.benchmark_config(2, "tiny")
  peer = bench_peers.Peer(sys.executable, "hf_torch", bench_peers.hf_fields(config), 2, 16_000)
  try:
    assert peer.info["frames"] == 49 and peer.info["masked_frames"] > 0
    assert all(peer.step() > 0 for _ in range(2))
  finally:
    peer.close()
  assert peer.proc.returncode == 0


@pytest.mark.slow
def test_bench_measures_the_real_train_step(tmp_path):
  from w2v2_jax.train.defaults import pretraining_config

  config = pretraining_config("tiny")
  config.data.min_sample_size = 16_000
  figures = bench.measure(config, batch=8, samples=16_000, steps=1, profile_dir=str(tmp_path))
  assert list(tmp_path.rglob("*.xplane.pb")), "no jax.profiler trace written"
  assert figures["mesh"]["fsdp"] == 8
  # XLA's count is summed over the 8 partitions (one partition's would be ~0.15 of the analytic);
  # the tiny model's elementwise work and SPMD's replicated pieces put it above the matmul count.
  assert 0.8 < figures["xla_gflop_per_step"] / figures["analytic_gflop_per_step"] < 2.0
  assert figures["audio_s_per_s"] == pytest.approx(8 / figures["step_s_median"], rel=2e-3)
  assert 0 < figures["mfu"] < 1 and figures["peak_memory_gib"] > 0
