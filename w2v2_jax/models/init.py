"""Building and initialising models by kind, with parameters as plain (unboxed) nested dicts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax.models import kernels, layer_stack
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.wav2vec2 import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining, Wav2Vec2Model

_MODELS = {"pretraining": Wav2Vec2ForPreTraining, "ctc": Wav2Vec2ForCTC}


def build(cfg: ModelConfig, kind: str = "pretraining") -> nn.Module:
  """The Flax module for a kind: "pretraining", "ctc", or "model" (the bare encoder, under wav2vec2/), with
  `cfg.kernels` resolved for the current compile target (models/kernels/)."""
  cfg = kernels.resolved(cfg)
  if kind == "model":
    return _Bare(cfg)
  return _MODELS[kind](cfg)


class _Bare(nn.Module):
  """The bare encoder with the same tree layout as the heads' models: {"wav2vec2": ...}."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, audio, lengths=None, mask_time_indices=None, deterministic: bool = True):
    return Wav2Vec2Model(self.cfg, name="wav2vec2")(audio, lengths, mask_time_indices, deterministic)


def _dummy_audio(cfg: ModelConfig):
  return jnp.zeros((1, cfg.receptive_field + 2 * 320), jnp.float32)


def init_params(cfg: ModelConfig, key, kind: str = "pretraining", boxed: bool = False):
  """Freshly initialised float32 parameters (boxed=True keeps the logical-axis metadata).

  With cfg.scan_layers the values are the looped model's, stacked: a seed gives the same model in
  either form.
  """
  if cfg.scan_layers and not boxed:
    return layer_stack.to_form(init_params(cfg.replace(scan_layers=False), key, kind), scanned=True)
  variables = build(cfg, kind).init({"params": key}, _dummy_audio(cfg))
  params = variables["params"]
  return params if boxed else nn.meta.unbox(params)


def abstract_params(cfg: ModelConfig, kind: str = "pretraining", boxed: bool = False):
  """Parameter shapes without allocating them (jax.ShapeDtypeStruct leaves)."""
  return jax.eval_shape(lambda k: init_params(cfg, k, kind, boxed), jax.random.key(0))


def count_params(cfg: ModelConfig, kind: str = "pretraining") -> int:
  return sum(int(x.size) for x in jax.tree.leaves(abstract_params(cfg, kind)))
