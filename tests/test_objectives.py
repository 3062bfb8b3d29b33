"""Statistical and exact properties of span masking, negative sampling and the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from w2v2_jax.models import objectives

MASK_ARGS = dict(mask_prob=0.65, mask_length=10, min_masks=2)


def test_masked_fraction_at_500_frames():
  keys = jax.random.split(jax.random.key(0), 400)
  masks = jax.jit(jax.vmap(lambda k: objectives.compute_span_mask(k, jnp.array([500]), 500, **MASK_ARGS)))(keys)
  fraction = float(np.asarray(masks).mean())
  assert abs(fraction - 0.49) <= 0.02, fraction


@pytest.mark.slow
def test_equal_counts_and_never_in_padding():
  lengths = jnp.array([500, 431, 260, 120, 77, 500, 33, 301])
  for seed in range(20):
    mask = np.asarray(objectives.compute_span_mask(jax.random.key(seed), lengths, 500, **MASK_ARGS))
    counts = mask.sum(axis=1)
    assert (counts == counts[0]).all() and counts[0] > 0, counts
    padding = np.arange(500)[None] >= np.asarray(lengths)[:, None]
    assert not (mask & padding).any()


def test_mask_matches_fairseq_span_count_distribution():
  """Without the same-count subsampling, the number of span starts per utterance is
  int(mask_prob * T / mask_length + U)."""
  mask = np.asarray(
    objectives.compute_span_mask(
      jax.random.key(5),
      jnp.full((2000,), 40),
      40,
      mask_prob=0.065,
      mask_length=1,
      min_masks=2,
      require_same_masks=False,
    )
  )
  counts = mask.sum(axis=1)  # spans of length 1 never overlap: count = number of starts
  assert set(np.unique(counts)) <= {2, 3}
  assert abs((counts == 3).mean() - 0.6) < 0.05  # int(0.065 * 40 + U) = int(2.6 + U) is 3 with probability 0.6


def test_mask_is_deterministic_for_a_key():
  a = objectives.compute_span_mask(jax.random.key(7), jnp.array([300, 200]), 300, **MASK_ARGS)
  b = jax.jit(lambda k: objectives.compute_span_mask(k, jnp.array([300, 200]), 300, **MASK_ARGS))(jax.random.key(7))
  assert np.array_equal(np.asarray(a), np.asarray(b))


def test_negatives_are_other_masked_frames_of_same_utterance():
  lengths = jnp.array([200, 150, 90, 200])
  mask = objectives.compute_span_mask(jax.random.key(1), lengths, 200, **MASK_ARGS)
  neg = np.asarray(objectives.sample_negatives(jax.random.key(2), mask, 100))
  mask = np.asarray(mask)
  for b in range(mask.shape[0]):
    frames = np.flatnonzero(mask[b])
    drawn = neg[b, frames]  # [M, K]
    assert (drawn != frames[:, None]).all(), "a negative is the positive itself"
    assert mask[b][drawn].all(), "a negative is not a masked frame of this utterance"


@pytest.mark.slow
def test_negatives_are_uniform_chi_square():
  mask = objectives.compute_span_mask(jax.random.key(3), jnp.array([300]), 300, **MASK_ARGS)
  frames = np.flatnonzero(np.asarray(mask[0]))
  keys = jax.random.split(jax.random.key(4), 60)
  draws = np.concatenate([np.asarray(objectives.sample_negatives(k, mask, 100))[0] for k in keys], axis=1)
  for t in frames[[0, len(frames) // 2, -1]]:
    others = frames[frames != t]
    counts = np.array([(draws[t] == o).sum() for o in others])
    assert counts.sum() == draws.shape[1]
    p = stats.chisquare(counts).pvalue
    assert p > 1e-3, (t, p)


def test_chi_square_detects_a_biased_sampler():
  """The uniformity check above has power: fairseq's sampler without the skip trick is caught."""
  mask = objectives.compute_span_mask(jax.random.key(3), jnp.array([300]), 300, **MASK_ARGS)
  frames = np.flatnonzero(np.asarray(mask[0]))
  rng = np.random.default_rng(0)
  t = frames[0]
  others = frames[frames != t]
  r = rng.integers(0, len(frames) - 1, 6000)
  biased = np.where(frames[r] == t, frames[(r + 1)], frames[r])  # the own frame's mass goes to one neighbour
  counts = np.array([(biased == o).sum() for o in others])
  assert stats.chisquare(counts).pvalue < 1e-3


def test_contrastive_logits_mask_negatives_equal_to_positive():
  b, t, d, k = 1, 6, 8, 3
  rng = np.random.default_rng(0)
  projected = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  projected_q = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  codes = jnp.asarray([[[0, 1], [0, 1], [2, 3], [4, 5], [0, 2], [6, 7]]])
  negatives = jnp.asarray([[[1, 2, 3]] * t])
  logits = np.asarray(objectives.contrastive_logits(projected, projected_q, codes, negatives, 0.1))
  assert logits.shape == (b, t, 1 + k)
  assert np.isneginf(logits[0, 0, 1])  # frame 1 has frame 0's codes
  assert np.isfinite(logits[0, 0, 2:]).all() and np.isfinite(logits[0, 0, 0])
  cos = np.dot(projected[0, 0], projected_q[0, 0]) / np.linalg.norm(projected[0, 0]) / np.linalg.norm(projected_q[0, 0])
  assert logits[0, 0, 0] == pytest.approx(cos / 0.1, rel=1e-5)


def test_perplexity_extremes():
  uniform = jnp.full((2, 5, 2, 4), 0.25)
  assert float(objectives.perplexity(uniform, jnp.ones((2, 5)))) == pytest.approx(8.0, rel=1e-5)
  collapsed = jax.nn.one_hot(jnp.zeros((2, 5, 2), jnp.int32), 4)
  assert float(objectives.perplexity(collapsed, jnp.ones((2, 5)))) == pytest.approx(2.0, rel=1e-5)


def test_an_all_padding_row_does_not_cancel_the_batch_masks():
  mask = np.asarray(objectives.compute_span_mask(jax.random.key(0), jnp.array([500, 0, 300]), 500, **MASK_ARGS))
  assert not mask[1].any()
  assert mask[0].sum() == mask[2].sum() > 100
