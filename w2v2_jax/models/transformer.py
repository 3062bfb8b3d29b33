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
  def __call__(self, x, key_mask, rng=None):
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
      return out_proj(fused_attention(q, k, v, key_mask, dropout.key(self.deterministic, rng), cfg.attention_dropout))
    keep = dropout.mask((b, nh, t, t), self.deterministic, rng)

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
  def __call__(self, x, rngs=(None, None)):
    cfg = self.cfg
    impl = kernels.resolve(cfg.kernels)
    x = dense(cfg.intermediate_size, ("embed", "mlp"), cfg.compute_dtype, name="intermediate_dense", kernels=impl)(x)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_mlp"))
    x = Dropout(cfg.activation_dropout)(gelu(x), self.deterministic, rngs[0])
    x = dense(cfg.hidden_size, ("mlp", "embed"), cfg.compute_dtype, name="output_dense", kernels=impl)(x)
    return Dropout(cfg.hidden_dropout)(x, self.deterministic, rngs[1])


class EncoderLayer(nn.Module):
  """One transformer block: post-LN (x = LN(x + f(x))) or pre-LN (x = x + f(LN(x))), under LayerDrop.

  (x, key_mask, rng, keep) -> (output, x). The layer's dropout key `rng` and its LayerDrop draw `keep`
  come in as arguments, so a loop over the layers and an nn.scan over this same module draw the same
  masks. A dropped layer (keep False) is skipped by a cond and costs no compute. The second output,
  the layer's input, is its entry in the encoder's hidden states.
  """

  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x, key_mask, rng=None, keep=None):
    cfg = self.cfg
    rngs = (None,) * 4 if rng is None else tuple(jax.random.split(rng, 4))

    def block(layer, x):
      del layer  # the submodules below are created in its scope
      attention = Attention(cfg, self.deterministic, name="attention")
      drop = Dropout(cfg.hidden_dropout)
      ln = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, name="layer_norm")
      final_ln = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, name="final_layer_norm")
      ffn = FeedForward(cfg, self.deterministic, name="feed_forward")
      if cfg.do_stable_layer_norm:
        x = x + drop(attention(ln(x), key_mask, rngs[0]), self.deterministic, rngs[1])
        x = x + ffn(final_ln(x), rngs[2:])
      else:
        x = ln(x + drop(attention(x, key_mask, rngs[0]), self.deterministic, rngs[1]))
        x = final_ln(x + ffn(x, rngs[2:]))
      if cfg.do_stable_layer_norm and kernels.resolve(cfg.kernels) == "cpu":
        x = cpu.materialize_grad(x)  # post-LN's LayerNorms already cut the chain
      return nn.with_logical_constraint(x, _ACT)

    y = block(self, x) if keep is None else nn.cond(keep, block, lambda layer, x: x, self, x)
    return y, x


def _remat(layer_cls, cfg: ModelConfig):
  """The layer under cfg.remat_policy: none, full (keep only the layer's input), or a jax.checkpoint_policies name."""
  if cfg.remat_policy == "none":
    return layer_cls
  policy = None if cfg.remat_policy == "full" else getattr(jax.checkpoint_policies, cfg.remat_policy)
  return nn.remat(layer_cls, prevent_cse=not cfg.scan_layers, policy=policy)


def _row(per_layer, i: int):
  """Layer i's entry of a per-layer array (its key or its LayerDrop draw), or None when there is none."""
  return None if per_layer is None else per_layer[i]


class Encoder(nn.Module):
  """Position embedding, LayerDrop over the layers, and the post-LN / pre-LN placement of LayerNorms.

  The layers run as a Python loop (parameters layers_0 ... layers_{N-1}) or, with cfg.scan_layers, as one
  nn.scan over parameters stacked on a leading "layers" axis (models/layer_stack.py converts between the
  two). Either way layer i draws its dropout from split(dropout key, N)[i] and its LayerDrop from
  uniform(layerdrop key, [N])[i].

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

    n = cfg.num_hidden_layers
    drops = max(cfg.hidden_dropout, cfg.attention_dropout, cfg.activation_dropout) > 0.0
    rngs = None if deterministic or not drops else jax.random.split(self.make_rng("dropout"), n)
    keeps = None
    if not deterministic and cfg.layerdrop > 0.0:
      keeps = jax.random.uniform(self.make_rng("layerdrop"), (n,)) >= cfg.layerdrop
    layer_cls = _remat(EncoderLayer, cfg)
    if cfg.scan_layers:
      stack = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, 0, 0),
        length=n,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, inputs = stack(cfg, deterministic, name="layers")(x, frame_mask, rngs, keeps)
      hidden_states = [inputs[i] for i in range(n)]
    else:
      hidden_states = []
      for i in range(n):
        layer = layer_cls(cfg, deterministic, name=f"layers_{i}")
        x, layer_input = layer(x, frame_mask, _row(rngs, i), _row(keeps, i))
        hidden_states.append(layer_input)
    hidden_states.append(x)
    if cfg.do_stable_layer_norm:
      x = final_ln(x)
    return x, tuple(hidden_states)
