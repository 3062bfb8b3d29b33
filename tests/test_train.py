"""w2v2-train: config checks, FSDP-sharded parameters, and exact resume after an interruption."""
import jax
import numpy as np
import pytest

from w2v2_jax.data import records
from w2v2_jax.train import defaults, loop


@pytest.fixture(scope="module")
def speech_like_shards(tmp_path_factory):
  """40 utterances of 1-2 s of a random-pitch harmonic signal with noise."""
  root = tmp_path_factory.mktemp("train_shards")
  rng = np.random.default_rng(0)
  utts = []
  for i in range(40):
    n = int(rng.integers(16000, 32000))
    t = np.arange(n) / 16000
    f0 = rng.uniform(100, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 6)) + 0.1 * rng.standard_normal(n)
    utts.append(records.Utterance(f"u{i}", (x / np.abs(x).max() * 12000).astype(np.int16)))
  for split, part in (("train", utts[:32]), ("valid", utts[32:])):
    records.write_shard(str(root / records.shard_name(split, 0)), iter(part),
                        lambda: {"split": split, "seen": 0, "written": 0, "skipped": []})
  return str(root)


def _config(data_dir, steps):
  c = defaults.pretraining_config("tiny")
  c.num_train_steps = steps
  c.batch_size = 8
  c.checkpoint_every_steps = 100
  c.log_every_steps = 1
  c.eval_every_steps = 100
  c.eval_batches = 1
  c.data.data_dir = data_dir
  c.data.max_sample_size = 16000
  c.data.min_sample_size = 16000
  c.data.num_buckets = 1
  c.objective.num_negatives = 10
  c.objective.mask_length = 4
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.optim.total_steps = 6
  c.mesh.data = 2
  c.mesh.fsdp = 4
  return c


def test_config_errors_name_the_key(speech_like_shards):
  from w2v2_jax import parallel
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  c = _config(speech_like_shards, 1)
  c.batch_size = 6
  with pytest.raises(ValueError, match="config.batch_size=6"):
    loop.validate(c, mesh)
  c = _config(speech_like_shards, 1)
  c.data.min_sample_size = 200
  c.data.max_sample_size = 300
  with pytest.raises(ValueError, match="config.data.min_sample_size=200"):
    loop.validate(c, mesh)
  with pytest.raises(ValueError, match="config.mesh"):
    parallel.make_mesh({"data": 3, "fsdp": -1})
  with pytest.raises(AttributeError):
    c.lock()
    c.optim.learning_rate = 1.0  # locked: unknown keys fail


def test_interrupted_and_resumed_run_is_bitwise_equal(speech_like_shards, tmp_path):
  straight = loop.train_and_evaluate(_config(speech_like_shards, 6), str(tmp_path / "straight"))
  assert straight["step"] == 6 and straight["skipped_total"] == 0
  first = loop.train_and_evaluate(_config(speech_like_shards, 3), str(tmp_path / "resumed"))
  assert first["step"] == 3
  resumed = loop.train_and_evaluate(_config(speech_like_shards, 6), str(tmp_path / "resumed"))
  assert resumed["step"] == 6
  for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert straight["loss"] == resumed["loss"]
  assert "valid_loss" in straight and np.isfinite(straight["valid_loss"])
  # Parameters are sharded FSDP-style over the mesh, not replicated.
  big = max(jax.tree.leaves(straight["params"]), key=lambda x: x.size)
  assert len({str(s.index) for s in big.addressable_shards}) > 1
