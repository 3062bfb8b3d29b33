"""The 7-layer convolutional feature encoder (audio -> 20 ms latents) and the feature projection."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from w2v2_jax.models import kernels
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.layers import Dropout, LayerNorm, gelu, partitioned, uniform_range

_KAIMING = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class ConvLayer(nn.Module):
  """conv -> optional norm -> GELU. `norm` is None, "group" (per channel over time) or "layer"."""

  cfg: ModelConfig
  layer_id: int
  norm: str | None

  @nn.compact
  def __call__(self, x):
    cfg, i = self.cfg, self.layer_id
    in_dim = x.shape[-1]
    bound = (1.0 / (in_dim * cfg.conv_kernel[i])) ** 0.5
    x = nn.Conv(
      cfg.conv_dim[i],
      kernel_size=(cfg.conv_kernel[i],),
      strides=(cfg.conv_stride[i],),
      padding="VALID",
      use_bias=cfg.conv_bias,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      kernel_init=partitioned(_KAIMING, ("conv_kernel", "conv_in", "conv_out")),
      bias_init=partitioned(uniform_range(-bound, bound), ("conv_out",)),
      name="conv",
    )(x)
    if self.norm is None:
      return gelu(x)
    axis = -2 if self.norm == "group" else -1
    impl = kernels.resolve(cfg.kernels)
    return LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, axis, then_gelu=True, kernels=impl, name="layer_norm")(x)


class FeatureEncoder(nn.Module):
  """Raw audio [B, L] -> conv features [B, T, C] (before the LayerNorm; the feature penalty uses these)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, audio):
    cfg = self.cfg
    x = audio.astype(cfg.compute_dtype)[..., None]
    for i in range(len(cfg.conv_dim)):
      if cfg.feat_extract_norm == "layer":
        norm = "layer"
      else:
        norm = "group" if i == 0 else None
      x = ConvLayer(cfg, i, norm, name=f"conv_layers_{i}")(x)
    return x


class FeatureProjection(nn.Module):
  """LayerNorm (its output also feeds the quantizer) -> Linear to the hidden size -> dropout."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, features, deterministic: bool):
    cfg = self.cfg
    normed = LayerNorm(cfg.layer_norm_eps, jnp.float32, name="layer_norm")(features)
    bound = features.shape[-1] ** -0.5
    x = nn.Dense(
      cfg.hidden_size,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      kernel_init=partitioned(uniform_range(-bound, bound), ("conv_out", "embed")),
      bias_init=partitioned(uniform_range(-bound, bound), ("embed",)),
      name="projection",
    )(normed.astype(cfg.compute_dtype))
    x = Dropout(cfg.feat_proj_dropout)(x, deterministic=deterministic)
    return x, normed
