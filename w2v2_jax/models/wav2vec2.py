"""wav2vec 2.0 models: the bare encoder, the pre-training model and the CTC model.

Parameter names mirror HuggingFace's (wav2vec2/feature_extractor/conv_layers_0/conv/kernel ...) so
conversion is a table of renames and transposes (see w2v2_jax/interop/hf.py).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax.models import kernels
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.feature_encoder import FeatureEncoder, FeatureProjection
from w2v2_jax.models.layers import Dropout, dense, grad_multiply, partitioned, uniform_range
from w2v2_jax.models.quantizer import GumbelVectorQuantizer, QuantizerOutput
from w2v2_jax.models.transformer import Encoder


@dataclasses.dataclass(frozen=True)
class EncoderOutput:
  last_hidden_state: jax.Array  # [B, T, H]
  extract_features: jax.Array  # [B, T, C] LayerNorm-ed conv features (the quantizer's input), float32
  conv_features: jax.Array  # [B, T, C] raw conv features, before the LayerNorm (for the feature penalty)
  frame_mask: jax.Array  # [B, T] bool, True on real (non-padded) frames
  hidden_states: tuple  # num_hidden_layers + 1 entries, as HF's output_hidden_states


jax.tree_util.register_dataclass(
  EncoderOutput, data_fields=[f.name for f in dataclasses.fields(EncoderOutput)], meta_fields=[]
)


def frame_mask_from_lengths(cfg: ModelConfig, lengths, num_frames: int):
  """[B] sample counts -> [B, T] bool mask of the frames that the conv stack computes from real audio."""
  if lengths is None:
    return None
  return jnp.arange(num_frames)[None, :] < cfg.num_frames(jnp.asarray(lengths))[:, None]


class Wav2Vec2Model(nn.Module):
  """Audio -> CNN -> LayerNorm + projection -> (mask embedding) -> transformer."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self, audio, lengths=None, mask_time_indices=None, deterministic: bool = True, mask_channel_indices=None
  ):
    cfg = self.cfg
    conv_features = FeatureEncoder(cfg, name="feature_extractor")(audio)
    if cfg.feature_grad_mult == 0.0:
      conv_features = jax.lax.stop_gradient(conv_features)
    elif cfg.feature_grad_mult != 1.0:
      conv_features = grad_multiply(conv_features, cfg.feature_grad_mult)
    frame_mask = frame_mask_from_lengths(cfg, lengths, conv_features.shape[1])
    x, extract_features = FeatureProjection(cfg, name="feature_projection")(conv_features, deterministic)
    mask_embed = self.param(
      "masked_spec_embed", partitioned(uniform_range(0.0, 1.0), ("embed",)), (cfg.hidden_size,), jnp.float32
    )
    if mask_time_indices is not None:
      x = jnp.where(mask_time_indices[..., None], mask_embed.astype(x.dtype), x)
    if mask_channel_indices is not None:  # fine-tuning's channel masking: [B, H] channels zeroed
      x = jnp.where(mask_channel_indices[:, None, :], jnp.zeros((), x.dtype), x)
    x, hidden_states = Encoder(cfg, name="encoder")(x, frame_mask, deterministic)
    if frame_mask is None:
      frame_mask = jnp.ones(x.shape[:2], bool)
    return EncoderOutput(
      last_hidden_state=x,
      extract_features=extract_features,
      conv_features=conv_features,
      frame_mask=frame_mask,
      hidden_states=hidden_states,
    )


@dataclasses.dataclass(frozen=True)
class PreTrainingOutput:
  encoder: EncoderOutput
  projected_states: jax.Array  # project_hid(c_t), [B, T, proj_codevector_dim], float32
  projected_quantized_states: jax.Array  # project_q(q_t), [B, T, proj_codevector_dim], float32
  quantizer: QuantizerOutput


jax.tree_util.register_dataclass(
  PreTrainingOutput, data_fields=[f.name for f in dataclasses.fields(PreTrainingOutput)], meta_fields=[]
)


class Wav2Vec2ForPreTraining(nn.Module):
  """The encoder plus the quantizer (on the unmasked features) and the two projection heads."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, audio, lengths=None, mask_time_indices=None, gumbel_temperature=2.0, deterministic: bool = True):
    cfg = self.cfg
    enc = Wav2Vec2Model(cfg, name="wav2vec2")(audio, lengths, mask_time_indices, deterministic)
    features = Dropout(cfg.feat_quantizer_dropout)(enc.extract_features, deterministic=deterministic)
    q = GumbelVectorQuantizer(cfg, name="quantizer")(features, gumbel_temperature, deterministic)

    def head(fan_in, names, name):
      bound = fan_in**-0.5
      return nn.Dense(
        cfg.proj_codevector_dim,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=partitioned(uniform_range(-bound, bound), names),
        bias_init=partitioned(uniform_range(-bound, bound), names[1:]),
        name=name,
      )

    projected = head(cfg.hidden_size, ("embed", "vq_dim"), "project_hid")(enc.last_hidden_state.astype(jnp.float32))
    projected_q = head(cfg.codevector_dim, ("vq_dim", "vq_dim_out"), "project_q")(q.quantized)
    return PreTrainingOutput(
      encoder=enc, projected_states=projected, projected_quantized_states=projected_q, quantizer=q
    )


class Wav2Vec2ForCTC(nn.Module):
  """The encoder plus dropout and a linear letter head (logits in float32)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self, audio, lengths=None, mask_time_indices=None, deterministic: bool = True, mask_channel_indices=None
  ):
    cfg = self.cfg
    if cfg.vocab_size <= 0:
      raise ValueError("Wav2Vec2ForCTC needs model.vocab_size > 0 (the size of the letter vocabulary)")
    enc = Wav2Vec2Model(cfg, name="wav2vec2")(audio, lengths, mask_time_indices, deterministic, mask_channel_indices)
    x = Dropout(cfg.final_dropout)(enc.last_hidden_state, deterministic=deterministic)
    logits = dense(
      cfg.vocab_size,
      ("embed", "vocab"),
      jnp.float32,
      kernel_init=nn.initializers.xavier_uniform(),
      name="lm_head",
      kernels=kernels.resolve(cfg.kernels),
    )(x.astype(jnp.float32))
    return logits, enc
