"""The fused attention kernels (Pallas, run in interpret mode on CPU) against XLA's attention core."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2v2_jax import parallel
from w2v2_jax.models import config as presets
from w2v2_jax.models import transformer


def _attention_run(attention_impl, batch=4, frames=21):
  """(loss, grads wrt params and input) of one Attention call with dropout 0.5 and padded keys."""
  cfg = presets.preset("tiny").replace(attention_dropout=0.5, attention_impl=attention_impl)
  module = transformer.Attention(cfg, deterministic=False)
  x = jax.random.normal(jax.random.key(0), (batch, frames, cfg.hidden_size))
  key_mask = jnp.arange(frames)[None] < jnp.array([[frames], [15], [frames], [9]])
  params = transformer.Attention(cfg.replace(attention_impl="xla"), deterministic=False).init(
      {"params": jax.random.key(1), "dropout": jax.random.key(2)}, x, key_mask)
  rngs = {"dropout": jax.random.key(3)}
  loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x, key_mask, rngs=rngs)))  # noqa: E731
  jaxpr = str(jax.make_jaxpr(loss)(params, x))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x), jaxpr


def _assert_close(got, want):
  # CPU runs the kernels in interpret mode, exact to float32 rounding; a GPU's float32 dots (TF32 in XLA and
  # Triton alike) round differently, still far closer than a wrong mask (rate 0.5) would be.
  rtol, atol = (2e-5, 2e-6) if jax.default_backend() == "cpu" else (2e-2, 2e-3)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_flash_attention_is_the_xla_core_with_the_same_dropout_mask():
  """Values and gradients equal XLA's core: the kernels hash keep_mask's bits (rate 0.5: another mask
  would change most outputs), mask padded keys and pad the length to their block."""
  flash, jaxpr = _attention_run("flash")
  assert "pallas_call" in jaxpr
  xla, jaxpr = _attention_run("xla")
  assert "pallas_call" not in jaxpr
  _assert_close(flash, xla)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU suite forces 8)")
def test_flash_attention_over_a_mesh_draws_the_one_device_mask():
  """Under a (data, fsdp, tensor) = 2x2x2 mesh the kernels run per device on their utterances and
  heads (shard_map), hashing global counters: the one-device XLA core's values and gradients."""
  want, _ = _attention_run("xla")
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with jax.set_mesh(mesh):
    got, jaxpr = _attention_run("flash")
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr
  _assert_close(got, want)


def test_flash_attention_refuses_what_it_cannot_run(monkeypatch):
  with pytest.raises(ValueError, match="attention_impl must be"):
    presets.preset("tiny").replace(attention_impl="cudnn")
  monkeypatch.setattr(parallel, "compile_platform", lambda: "tpu")
  with pytest.raises(ValueError, match="Triton"):
    _attention_run("flash")
