"""The fused attention kernels (Pallas, run in interpret mode on CPU) against XLA's attention core."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2v2_jax import parallel
from w2v2_jax.models import config as presets
from w2v2_jax.models import layers, objectives, transformer
from w2v2_jax.models.init import build, init_params
from w2v2_jax.models.kernels.flash_attention import dropout_seed_from, flash_attention


@pytest.fixture(autouse=True)
def compiled_for_a_gpu(monkeypatch):
  """The kernel switch resolves as for a GPU (on a CPU target gpu_flash keeps XLA's core), so the kernels
  run, in interpret mode on this CPU host."""
  if jax.default_backend() == "cpu":
    monkeypatch.setattr(parallel, "compile_platform", lambda: "gpu")


def _attention_run(kernels, batch=4, frames=21):
  """(loss, grads wrt params and input) of one Attention call with dropout 0.5 and padded keys."""
  cfg = presets.preset("tiny").replace(attention_dropout=0.5, kernels=kernels)
  module = transformer.Attention(cfg, deterministic=False)
  x = jax.random.normal(jax.random.key(0), (batch, frames, cfg.hidden_size))
  key_mask = jnp.arange(frames)[None] < jnp.array([[frames], [15], [frames], [9]])
  params = transformer.Attention(cfg.replace(kernels="xla"), deterministic=False).init(
    {"params": jax.random.key(1), "dropout": jax.random.key(2)}, x, key_mask
  )
  rngs = {"dropout": jax.random.key(3)}
  loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x, key_mask, rngs=rngs)))  # noqa: E731
  jaxpr = str(jax.make_jaxpr(loss)(params, x))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x), jaxpr


def _assert_close(got, want, atol=2e-6):
  # CPU runs the kernels in interpret mode, exact to float32 rounding; a GPU's float32 dots (TF32 in XLA and
  # Triton alike) round differently, still far closer than a wrong mask (rate 0.5) would be.
  rtol, atol = (2e-5, atol) if jax.default_backend() == "cpu" else (2e-2, 1000 * atol)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.slow
def test_flash_attention_is_the_xla_core_with_the_same_dropout_mask():
  """Values and gradients equal XLA's core: the kernels hash keep_mask's bits (rate 0.5: another mask
  would change most outputs), mask padded keys and pad the length to their block."""
  flash, jaxpr = _attention_run("gpu_flash")
  assert "pallas_call" in jaxpr
  xla, jaxpr = _attention_run("xla")
  assert "pallas_call" not in jaxpr
  _assert_close(flash, xla)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU suite forces 8)")
@pytest.mark.slow
def test_flash_attention_over_a_mesh_draws_the_one_device_mask():
  """Under a (data, fsdp, tensor) = 2x2x2 mesh the kernels run per device on their utterances and
  heads (shard_map), hashing global counters: the one-device XLA core's values and gradients."""
  want, _ = _attention_run("xla")
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with jax.set_mesh(mesh):
    got, jaxpr = _attention_run("gpu_flash")
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr
  _assert_close(got, want)


def _core(q, k, v, valid, key, rate):
  """XLA's attention core, as Attention computes it (q scaled already)."""
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  p = jax.nn.softmax(jnp.where(valid[:, None, None, :], s, jnp.finfo(jnp.float32).min), axis=-1)
  p = jnp.where(layers.keep_mask(key, p.shape, 1 - rate), p / (1 - rate), 0.0)
  return jnp.einsum("bhqk,bhkd->bhqd", p, v)


@pytest.mark.parametrize("counter_limit", [2**32, 2**12])
@pytest.mark.slow
def test_flash_attention_over_many_blocks(monkeypatch, counter_limit):
  """45 frames in blocks of 16 (queries and keys in three blocks, the last one padded), one utterance
  with valid keys in the first two blocks only: the online softmax, every block's offsets and the
  dropout bits. With a lower counter limit keep_mask counts within each utterance (the utterance as
  the hash's high word, as it does past 2^32 elements) and the kernels follow."""
  monkeypatch.setattr(layers, "COUNTER_LIMIT", counter_limit)
  b, h, t, d, rate = 2, 3, 45, 16, 0.5  # Triton dots need dims of 16 or more
  q, k, v, w = (jax.random.normal(jax.random.key(i), (b, h, t, d)) for i in range(4))
  valid = jnp.arange(t)[None] < jnp.array([[t], [27]])
  key = jax.random.key(7)
  seed = dropout_seed_from(jax.random.key_data(key), 0, 0)
  interpret = jax.default_backend() == "cpu"  # compiled where the GPU script runs this file
  flash = lambda q, k, v: flash_attention(q, k, v, valid, seed, rate, (b, h), 16, interpret)  # noqa: E731
  xla = lambda q, k, v: _core(q, k, v, valid, key, rate)  # noqa: E731
  runs = [
    jax.jit(jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v) for f in (flash, xla)
  ]
  _assert_close(*runs, atol=5e-5)  # gradients of size ~10 here


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what a CPU host runs")
def test_on_cpu_flash_attention_keeps_the_xla_core(monkeypatch):
  """A config trained with the kernels on GPUs runs on CPU with XLA's core (same values), not the
  kernels interpreted."""
  monkeypatch.undo()
  _, jaxpr = _attention_run("gpu_flash")
  assert "pallas_call" not in jaxpr


@pytest.mark.slow
def test_a_pretraining_step_with_flash_attention_is_the_xla_step():
  """The whole tiny model (two layers, LayerDrop, padded utterances): loss and every gradient equal."""
  runs = []
  for impl in ("gpu_flash", "xla"):
    cfg = presets.tiny().replace(attention_dropout=0.5, kernels=impl)
    params = init_params(cfg, jax.random.key(0))
    audio = jax.random.normal(jax.random.key(1), (2, 8000))
    lengths = jnp.array([8000, 5000])
    frames = cfg.num_frames(8000)
    mask = objectives.compute_span_mask(
      jax.random.key(2), jnp.array([frames, cfg.num_frames(5000)]), frames, 0.65, 10, 2
    )
    negatives = objectives.sample_negatives(jax.random.key(3), mask, 10)
    model = build(cfg)

    def loss(params):
      rngs = {k: jax.random.key(4 + i) for i, k in enumerate(("dropout", "gumbel", "layerdrop"))}
      out = model.apply({"params": params}, audio, lengths, mask, 2.0, False, rngs=rngs)
      return objectives.pretraining_loss(out, mask, negatives, objectives.ObjectiveConfig(num_negatives=10))[0]

    runs.append(jax.jit(jax.value_and_grad(loss))(params))
    assert ("pallas_call" in str(jax.make_jaxpr(loss)(params))) == (impl == "gpu_flash")
  _assert_close(*runs)


def test_flash_attention_refuses_what_it_cannot_run(monkeypatch):
  with pytest.raises(ValueError, match="kernels must be"):
    presets.preset("tiny").replace(kernels="cudnn")
  monkeypatch.setattr(parallel, "compile_platform", lambda: "tpu")
  with pytest.raises(ValueError, match="Triton"):
    _attention_run("gpu_flash")
  q = jnp.zeros((1, 2, 37, 16))
  seed = jnp.zeros((4,), jnp.uint32)
  with pytest.raises(ValueError, match="power of two"):
    flash_attention(q, q, q, jnp.ones((1, 37), bool), seed, 0.1, (1, 2), 12, True)
  monkeypatch.setattr(layers, "COUNTER_LIMIT", 2**9)  # 2 heads x 37 frames x 10 groups >= 2^9
  with pytest.raises(ValueError, match="bernoulli"):
    flash_attention(q, q, q, jnp.ones((1, 37), bool), seed, 0.1, (1, 2), 16, True)
