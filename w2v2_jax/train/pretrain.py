"""The pre-training forward pass as one pure function: masks and negatives drawn in-graph from a key."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from w2v2_jax.models import objectives
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.init import build


def make_loss_fn(cfg: ModelConfig, obj: objectives.ObjectiveConfig):
  """Returns loss_fn(params, audio, lengths, key, temperature, deterministic) -> (loss, metrics)."""
  model = build(cfg, "pretraining")

  def loss_fn(params, audio, lengths, key, temperature, deterministic: bool = False):
    k_mask, k_neg, k_drop, k_gumbel, k_layer = jax.random.split(key, 5)
    num_frames = cfg.num_frames(audio.shape[1])
    frame_lengths = cfg.num_frames(lengths) if lengths is not None else jnp.full((audio.shape[0],), num_frames)
    mask = objectives.compute_span_mask(
      k_mask, frame_lengths, num_frames, obj.mask_prob, obj.mask_length, obj.min_masks, obj.require_same_masks
    )
    negatives = objectives.sample_negatives(k_neg, mask, obj.num_negatives)
    out = model.apply(
      {"params": params},
      audio,
      lengths,
      mask,
      temperature,
      deterministic,
      rngs={"dropout": k_drop, "gumbel": k_gumbel, "layerdrop": k_layer},
    )
    return objectives.pretraining_loss(out, mask, negatives, obj)

  return loss_fn
