"""The context network: convolutional relative position embedding + post-LN or pre-LN transformer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax.models import kernels
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.kernels import cpu
from w2v2_jax.models.kernels.dft_conv import grouped_conv_dft
from w2v2_jax.models.kernels.flash_attention import fused_attention
from w2v2_jax.models.layers import Dropout, LayerNorm, dense, gelu, partitioned

_ACT = ("activation_batch", "activation_length", "activation_embed")


def _conv(x, w, groups: int, pad: int):
  return jax.lax.conv_general_dilated(
    x, w, window_strides=(1,), padding=[(pad, pad)], dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups
  )


class WeightNormConv(nn.Module):
  """Grouped Conv1d(H, H, K, padding K//2) with weight norm over the kernel axis (torch weight_norm dim=2)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h, k, groups = cfg.hidden_size, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
    std = 2.0 * (1.0 / (k * h)) ** 0.5
    v = self.param(
      "weight_v",
      partitioned(nn.initializers.normal(std), ("conv_kernel", "conv_in", "embed")),
      (k, h // groups, h),
      jnp.float32,
    )
    g = self.param(
      "weight_g", partitioned(lambda *_: jnp.sqrt(jnp.sum(v * v, axis=(1, 2))), ("conv_kernel",)), (k,), jnp.float32
    )
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (h,), jnp.float32)
    w = g[:, None, None] * v / jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and dict(mesh.shape).get("tensor", 1) > 1:
      # XLA's SPMD partitioner (jax 0.10.2) returns twice the weight gradient of a grouped conv whose
      # batch is sharded while a mesh axis (tensor) is replicated; sharding the channels (whole
      # groups) over that axis avoids it. Caught by tests/test_train.py's 2x2x2 mesh test (its "xla" case).
      x = jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor"))
    conv = grouped_conv_dft if kernels.resolve(cfg.kernels) == "cpu" else _conv  # the same linear map
    y = conv(x.astype(cfg.compute_dtype), w.astype(cfg.compute_dtype), groups, k // 2)
    return y + bias.astype(cfg.compute_dtype)


class PositionalConvEmbedding(nn.Module):
  """The convolutional relative position embedding: weight-normed conv, drop the last frame if K is even, GELU."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    y = WeightNormConv(self.cfg, name="conv")(x)
    if self.cfg.num_conv_pos_embeddings % 2 == 0:
      y = y[:, :-1]
    return gelu(y)


class Attention(nn.Module):
  """Multi-head self-attention; q scaled by head_dim^-0.5, softmax in float32, padded keys masked.

  The core, softmax(q k^T) v over [b, h, t, d], is the same map whichever kernels run it (models/kernels/),
  with the same dropout mask.
  """

  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x, key_mask):
    cfg = self.cfg
    b, t, h = x.shape
    nh = cfg.num_attention_heads
    hd = h // nh
    impl = kernels.resolve(cfg.kernels)
    proj = lambda name: dense(h, ("embed", "joined_kv"), cfg.compute_dtype, name=name, kernels=impl)
    heads = lambda y: y.reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
    q = heads(proj("q_proj")(x) * jnp.asarray(hd**-0.5, cfg.compute_dtype))
    k = heads(proj("k_proj")(x))
    v = heads(proj("v_proj")(x))
    dropout = Dropout(cfg.attention_dropout)
    out_proj = lambda out: dense(h, ("joined_kv", "embed"), cfg.compute_dtype, name="out_proj", kernels=impl)(
      out.transpose(0, 2, 1, 3).reshape(b, t, h)
    )
    if impl == "gpu_flash":
      return out_proj(fused_attention(q, k, v, key_mask, dropout.key(self.deterministic), cfg.attention_dropout))
    keep = dropout.mask((b, nh, t, t), self.deterministic)

    def core(rows):
      scores = jnp.einsum("bhqd,bhkd->bhqk", q[rows], k[rows], preferred_element_type=jnp.float32)
      if key_mask is not None:
        scores = jnp.where(key_mask[rows, None, None, :], scores, jnp.finfo(jnp.float32).min)
      probs = dropout.apply_mask(jax.nn.softmax(scores, axis=-1), None if keep is None else keep[rows])
      return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(cfg.compute_dtype), v[rows])

    pieces = cpu.attention_pieces(b) if impl == "cpu" else 1
    return out_proj(jnp.concatenate([core(slice(i * b // pieces, (i + 1) * b // pieces)) for i in range(pieces)]))


class FeedForward(nn.Module):
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    impl = kernels.resolve(cfg.kernels)
    x = dense(cfg.intermediate_size, ("embed", "mlp"), cfg.compute_dtype, name="intermediate_dense", kernels=impl)(x)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_mlp"))
    x = Dropout(cfg.activation_dropout)(gelu(x), deterministic=self.deterministic)
    x = dense(cfg.hidden_size, ("mlp", "embed"), cfg.compute_dtype, name="output_dense", kernels=impl)(x)
    return Dropout(cfg.hidden_dropout)(x, deterministic=self.deterministic)


class EncoderLayer(nn.Module):
  """One transformer block: post-LN (x = LN(x + f(x))) or pre-LN (x = x + f(LN(x)))."""

  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x, key_mask):
    cfg = self.cfg
    attention = Attention(cfg, self.deterministic, name="attention")
    drop = Dropout(cfg.hidden_dropout)
    ln = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, name="layer_norm")
    final_ln = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, name="final_layer_norm")
    ffn = FeedForward(cfg, self.deterministic, name="feed_forward")
    if cfg.do_stable_layer_norm:
      x = x + drop(attention(ln(x), key_mask), deterministic=self.deterministic)
      x = x + ffn(final_ln(x))
    else:
      x = ln(x + drop(attention(x, key_mask), deterministic=self.deterministic))
      x = final_ln(x + ffn(x))
    if cfg.do_stable_layer_norm and kernels.resolve(cfg.kernels) == "cpu":
      x = cpu.materialize_grad(x)  # post-LN's LayerNorms already cut the chain
    return nn.with_logical_constraint(x, _ACT)


class Encoder(nn.Module):
  """Position embedding, LayerDrop over the layers, and the post-LN / pre-LN placement of LayerNorms.

  Returns the last hidden state and, like HF's output_hidden_states, the input of every layer plus the
  output of the last one (before the final LayerNorm of a pre-LN model).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, frame_mask, deterministic: bool):
    cfg = self.cfg
    if frame_mask is not None:
      x = jnp.where(frame_mask[..., None], x, 0)
    x = x + PositionalConvEmbedding(cfg, name="pos_conv_embed")(x).astype(x.dtype)
    final_ln = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, name="layer_norm")
    if not cfg.do_stable_layer_norm:
      x = final_ln(x)
    x = Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x.astype(cfg.compute_dtype), _ACT)

    layer_cls = nn.remat(EncoderLayer, prevent_cse=True) if cfg.remat else EncoderLayer
    hidden_states = []
    for i in range(cfg.num_hidden_layers):
      hidden_states.append(x)
      layer = layer_cls(cfg, deterministic, name=f"layers_{i}")
      if deterministic or cfg.layerdrop == 0.0:
        x = layer(x, frame_mask)
      else:
        keep = jax.random.uniform(self.make_rng("layerdrop")) >= cfg.layerdrop
        x = nn.cond(keep, lambda mdl, y, m: mdl(y, m), lambda mdl, y, m: y, layer, x, frame_mask)
    hidden_states.append(x)
    if cfg.do_stable_layer_norm:
      x = final_ln(x)
    return x, tuple(hidden_states)
