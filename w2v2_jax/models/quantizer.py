"""Gumbel-softmax product quantizer: G groups x V codewords, hard straight-through in training."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.layers import partitioned, uniform_range
from w2v2_jax.parallel import constrain_batch


@dataclasses.dataclass(frozen=True)
class QuantizerOutput:
  quantized: jax.Array  # [B, T, codevector_dim], float32
  code_idx: jax.Array  # [B, T, G] chosen codeword per group (the Gumbel sample in training)
  argmax_idx: jax.Array  # [B, T, G] argmax of the raw logits (fairseq's code_perplexity uses these)
  soft_probs: jax.Array  # [B, T, G, V] softmax of the raw logits (no noise, no temperature)


jax.tree_util.register_dataclass(
  QuantizerOutput, data_fields=["quantized", "code_idx", "argmax_idx", "soft_probs"], meta_fields=[]
)


class GumbelVectorQuantizer(nn.Module):
  """All of it in float32. Eval picks the argmax codeword; training samples a hard Gumbel one-hot whose
  gradient is the soft sample's (straight-through). The temperature is an input, so it can be scheduled."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, features, temperature, deterministic: bool):
    cfg = self.cfg
    g, v = cfg.num_codevector_groups, cfg.num_codevectors_per_group
    codevectors = self.param(
      "codevectors",
      partitioned(uniform_range(0.0, 1.0), (None, "codevectors", "vq_dim")),
      (1, g * v, cfg.codevector_dim // g),
      jnp.float32,
    )
    # Activations pinned to the batch sharding, here and on the one-hot: otherwise GSPMD shards them like the
    # parameters they meet (weight_proj's input channels, the codebook's rows: FSDP), and can only get there
    # from the batch-sharded features by replicating them (the features' gradient too, with micro-batches).
    features = constrain_batch(features.astype(jnp.float32))
    logits = nn.Dense(
      g * v,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=partitioned(nn.initializers.normal(1.0), ("conv_out", "codevectors")),
      bias_init=partitioned(nn.initializers.zeros, ("codevectors",)),
      name="weight_proj",
    )(features)
    logits = logits.reshape(*logits.shape[:-1], g, v)
    soft_probs = jax.nn.softmax(logits, axis=-1)
    argmax_idx = jnp.argmax(logits, axis=-1)
    if deterministic:
      code_idx = argmax_idx
      one_hot = jax.nn.one_hot(code_idx, v, dtype=jnp.float32)
    else:
      noise = jax.random.gumbel(self.make_rng("gumbel"), logits.shape, jnp.float32)
      sample = jax.nn.softmax((logits + noise) / temperature, axis=-1)
      code_idx = jnp.argmax(sample, axis=-1)
      hard = jax.nn.one_hot(code_idx, v, dtype=jnp.float32)
      one_hot = hard + (sample - jax.lax.stop_gradient(sample))  # exactly one-hot forward
    one_hot = constrain_batch(one_hot)
    book = codevectors.reshape(g, v, -1)
    quantized = jnp.einsum("...gv,gvd->...gd", one_hot, book, precision=jax.lax.Precision.HIGHEST)
    quantized = quantized.reshape(*quantized.shape[:-2], -1)
    return QuantizerOutput(quantized=quantized, code_idx=code_idx, argmax_idx=argmax_idx, soft_probs=soft_probs)


def gumbel_temperature(step, start: float = 2.0, end: float = 0.5, decay: float = 0.999995):
  """fairseq's latent_temp schedule: max(start * decay**step, end)."""
  return jnp.maximum(start * jnp.power(decay, jnp.asarray(step, jnp.float32)), end)
