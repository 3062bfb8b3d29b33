"""The pre-training objective: fairseq span masking, negative sampling, contrastive + diversity + penalty.

Everything has static shapes (masks are multiplied, never gathered to a data-dependent size) and draws
its randomness from an explicit key, so it runs inside the jitted, sharded train step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from w2v2_jax.models.wav2vec2 import PreTrainingOutput


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """fairseq names in comments; defaults are the BASE recipe."""

  mask_prob: float = 0.65  # mask_prob
  mask_length: int = 10  # mask_length
  min_masks: int = 2  # mask_min_space/min_masks
  require_same_masks: bool = True  # every utterance gets the same number of masked frames
  num_negatives: int = 100  # num_negatives (cross_sample_negatives = 0)
  logit_temp: float = 0.1  # logit_temp
  diversity_weight: float = 0.1  # loss_weights[0]
  feature_penalty_weight: float = 10.0  # loss_weights[1] (0 for LV60)


def compute_span_mask(
  key,
  frame_lengths,
  num_frames: int,
  mask_prob: float,
  mask_length: int,
  min_masks: int = 2,
  require_same_masks: bool = True,
):
  """fairseq's compute_mask_indices (static spans, overlaps allowed), padding-aware, as a [B, T] bool mask.

  Per utterance of sz real frames: n = max(min_masks, int(mask_prob * sz / mask_length + U[0,1))) span
  starts drawn without replacement from [0, sz - mask_length); frames past sz are never masked. With
  require_same_masks every utterance is then subsampled to the batch's smallest masked count.
  """
  batch = frame_lengths.shape[0]
  t = jnp.arange(num_frames)
  k_num, k_start, k_same = jax.random.split(key, 3)
  sz = jnp.asarray(frame_lengths, jnp.int32)
  num = jnp.floor(mask_prob * sz / mask_length + jax.random.uniform(k_num, (batch,))).astype(jnp.int32)
  num = jnp.maximum(min_masks, num)
  min_len = jnp.where(sz - mask_length <= num, sz - num - 1, mask_length)
  high = sz - min_len  # starts come from [0, high)
  max_spans = min(num_frames, max(min_masks, int(mask_prob * num_frames / mask_length + 1)))
  # A random permutation of [0, high) per row; its first `num` entries are the starts.
  scores = jnp.where(t[None] < high[:, None], jax.random.uniform(k_start, (batch, num_frames)), 2.0)
  starts = jnp.argsort(scores, axis=1)[:, :max_spans]
  valid = (jnp.arange(max_spans)[None] < num[:, None]).astype(jnp.int32)
  rows = jnp.arange(batch)[:, None]
  delta = jnp.zeros((batch, num_frames + mask_length + 1), jnp.int32)
  delta = delta.at[rows, starts].add(valid).at[rows, starts + mask_length].add(-valid)
  mask = (jnp.cumsum(delta, axis=1)[:, :num_frames] > 0) & (t[None] < sz[:, None])
  if require_same_masks:
    # Rows without real frames (all padding) must not pull every other row down to zero masks.
    target = jnp.where(sz > 0, mask.sum(axis=1), num_frames).min()
    keep_scores = jnp.where(mask, jax.random.uniform(k_same, mask.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(keep_scores, axis=1), axis=1)
    mask = mask & (rank < target)
  return mask


def sample_negatives(key, mask, num_negatives: int):
  """For every frame, `num_negatives` indices of OTHER masked frames of the same utterance, uniformly.

  Returns int32 [B, T, K] frame indices; meaningful only where `mask` is True. fairseq's trick keeps
  it uniform: draw r in [0, M-1) and skip the frame's own rank (r += r >= own).
  """
  batch, num_frames = mask.shape
  t = jnp.arange(num_frames)
  count = mask.sum(axis=1, keepdims=True)  # M per utterance
  own_rank = jnp.cumsum(mask, axis=1) - 1
  masked_positions = jnp.argsort(jnp.where(mask, t[None], num_frames + t[None]), axis=1)  # masked first
  r = jax.random.randint(key, (batch, num_frames, num_negatives), 0, jnp.maximum(count - 1, 1)[..., None])
  r = r + (r >= own_rank[..., None])
  r = jnp.minimum(r, num_frames - 1)
  neg = jnp.take_along_axis(masked_positions[:, None, :], r, axis=2)
  # An utterance with fewer than 2 masked frames has no other frame: point at itself (its logit is -inf).
  return jnp.where(count[..., None] >= 2, neg, t[None, :, None]).astype(jnp.int32)


def _normalize(x, eps=1e-8):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive_logits(projected, projected_q, code_idx, negatives, temperature: float):
  """[B, T, 1 + K] cosine logits / temperature: the true target first, then the negatives.

  Cosines come from one [B, T, T] similarity matrix, so negatives are an index gather, not a copy
  of K target vectors per frame. A negative with the same codewords as the positive gets -inf.
  """
  hi = jax.lax.Precision.HIGHEST
  ph, pq = _normalize(projected.astype(jnp.float32)), _normalize(projected_q.astype(jnp.float32))
  pos = jnp.sum(ph * pq, axis=-1, keepdims=True)
  sim = jnp.einsum("btd,bsd->bts", ph, pq, precision=hi)
  neg = jnp.take_along_axis(sim, negatives, axis=2)
  neg_codes = jax.vmap(lambda c, n: c[n])(code_idx, negatives)  # [B, T, K, G]
  neg_is_pos = jnp.all(neg_codes == code_idx[:, :, None, :], axis=-1)
  neg = jnp.where(neg_is_pos, -jnp.inf, neg)
  return jnp.concatenate([pos, neg], axis=-1) / temperature


def perplexity(probs, weights):
  """sum over groups of exp(entropy of the weighted mean distribution); probs [B, T, G, V], weights [B, T]."""
  w = weights.astype(jnp.float32)[..., None, None]
  mean = jnp.sum(probs * w, axis=(0, 1)) / jnp.maximum(jnp.sum(w), 1.0)
  return jnp.sum(jnp.exp(-jnp.sum(mean * jnp.log(mean + 1e-7), axis=-1)))


def pretraining_loss(
  out: PreTrainingOutput, mask, negatives, cfg: ObjectiveConfig, sample_size=None, perplexity_weights=None
):
  """wav2vec 2.0 loss, normalised by the masked-frame count (`sample_size`, default: this batch's).

  Returns (loss, metrics). Pass the global masked count as sample_size when accumulating micro-batches,
  so the gradient does not depend on how the batch is split. Perplexities are over the masked frames,
  the quantizer's inputs in fairseq and HF, unless perplexity_weights says otherwise. A masked frame
  with no other masked frame in its utterance has no negatives; it is left out of the loss.
  """
  frame_mask = out.encoder.frame_mask
  mask = mask & frame_mask
  mask = mask & (jnp.sum(mask, axis=1, keepdims=True) >= 2)
  num_masked = jnp.sum(mask).astype(jnp.float32)
  sample_size = jnp.maximum(num_masked if sample_size is None else sample_size, 1.0)
  m = mask.astype(jnp.float32)

  logits = contrastive_logits(
    out.projected_states, out.projected_quantized_states, out.quantizer.code_idx, negatives, cfg.logit_temp
  )
  nll = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
  contrastive_sum = jnp.sum(nll * m)
  # fairseq's accuracy: the positive is the argmax, and not merely tied with every other logit.
  correct = (jnp.argmax(logits, -1) == 0) & ~(jnp.argmin(logits, -1) == 0)
  accuracy = jnp.sum(correct * m) / jnp.maximum(num_masked, 1.0)

  weights = mask if perplexity_weights is None else perplexity_weights
  q = out.quantizer
  num_vars = q.soft_probs.shape[-2] * q.soft_probs.shape[-1]
  prob_ppl = perplexity(q.soft_probs, weights)
  code_ppl = perplexity(jax.nn.one_hot(q.argmax_idx, q.soft_probs.shape[-1]), weights)
  diversity = (num_vars - prob_ppl) / num_vars

  conv = out.encoder.conv_features.astype(jnp.float32)
  fm = frame_mask.astype(jnp.float32)
  penalty = jnp.sum(jnp.square(conv) * fm[..., None]) / jnp.maximum(jnp.sum(fm) * conv.shape[-1], 1.0)

  loss = (
    contrastive_sum + (cfg.diversity_weight * diversity + cfg.feature_penalty_weight * penalty) * num_masked
  ) / sample_size
  metrics = {
    "loss": loss,
    "contrastive": contrastive_sum / jnp.maximum(num_masked, 1.0),
    "diversity": diversity,
    "feature_penalty": penalty,
    "accuracy": accuracy,
    "prob_perplexity": prob_ppl,
    "code_perplexity": code_ppl,
    "mask_fraction": num_masked / jnp.maximum(jnp.sum(fm), 1.0),
    "num_masked": num_masked,
  }
  return loss, metrics
