"""CTC pieces: vocabulary order and files, loss and gradient against torch, zero_infinity, decoding, WER/CER."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from w2v2_jax.decoding import ctc, ngram

TRANSCRIPTS = ["the cat sat", "  The  hat\tthat sat ", "a cat"]


def test_vocabulary_build_orders_by_frequency():
  vocab = ctc.Vocabulary.build(TRANSCRIPTS)
  # Counts: T 9, A 7, | 6, H 4, then C, E, S 2 each: ties alphabetical.
  assert vocab.tokens[:4] == ("<pad>", "<s>", "</s>", "<unk>")
  assert vocab.tokens[4:] == ("T", "A", "|", "H", "C", "E", "S")
  assert len(vocab) == 11 and vocab.blank_id == 0 and vocab.word_delimiter == "|"
  assert "|" in ctc.Vocabulary.build(["abc"]).tokens  # always present, even with no space


def test_normalize():
  assert ctc.normalize("  the\t cat\n sat ") == "THE CAT SAT"


def test_encode_decode_round_trip_and_unknown():
  vocab = ctc.Vocabulary.build(TRANSCRIPTS)
  ids = vocab.encode(" that  cat ")
  assert ids == [4, 7, 5, 4, 6, 8, 5, 4]
  assert vocab.decode(ids) == "THAT CAT"
  assert vocab.decode([0, 1] + ids + [2, 0]) == "THAT CAT"  # pad/blank, bos, eos dropped
  assert vocab.encode("tax") == [4, 5, 3]
  assert vocab.decode(vocab.encode("tax")) == "TA<unk>"


def test_save_load_round_trip(tmp_path):
  vocab = ctc.Vocabulary.build(TRANSCRIPTS)
  path = tmp_path / "vocab.json"
  vocab.save(path)
  mapping = json.loads(path.read_text())
  assert mapping["<pad>"] == 0 and mapping["|"] == 6 and list(mapping.values()) == list(range(len(vocab)))
  assert ctc.Vocabulary.load(path) == vocab


@pytest.mark.parametrize(
  "mapping",
  [
    {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "A": 5},  # a gap in the ids
    {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "A": 4},  # specials out of place
    {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "A": "4"},  # not an integer id
  ],
)
def test_load_rejects_corrupt_file(tmp_path, mapping):
  path = tmp_path / "bad_vocab.json"
  path.write_text(json.dumps(mapping))
  with pytest.raises(ValueError, match="bad_vocab.json") as err:
    ctc.Vocabulary.load(path)
  assert "\n" not in str(err.value)


def test_labels_to_padded():
  labels, paddings = ctc.labels_to_padded([[5, 6, 7], [], [8]])
  np.testing.assert_array_equal(labels, [[5, 6, 7], [0, 0, 0], [8, 0, 0]])
  np.testing.assert_array_equal(paddings, [[0, 0, 0], [1, 1, 1], [0, 1, 1]])
  assert labels.dtype == np.int32 and paddings.dtype == np.float32
  assert ctc.labels_to_padded([[1]], max_len=4)[0].shape == (1, 4)
  with pytest.raises(ValueError):
    ctc.labels_to_padded([[1, 2, 3]], max_len=2)


def _batch(seed=0):
  """Random logits with varied frame and label lengths; labels include adjacent repeats."""
  rng = np.random.default_rng(seed)
  batch, frames, vocab = 5, 20, 7
  logits = rng.normal(size=(batch, frames, vocab)).astype(np.float32) * 2
  frame_lengths = np.array([20, 17, 9, 14, 6])
  label_ids = [[1, 2, 2, 3, 4, 4, 4], [5, 5, 1], [2], [3, 1, 3, 6, 6, 2], [4, 4]]
  labels, label_paddings = ctc.labels_to_padded(label_ids)
  logit_paddings = (np.arange(frames)[None] >= frame_lengths[:, None]).astype(np.float32)
  return logits, logit_paddings, labels, label_paddings, frame_lengths, label_ids


def _torch_loss_and_grad(logits, frame_lengths, label_ids, zero_infinity):
  x = torch.tensor(logits, requires_grad=True)
  log_probs = torch.log_softmax(x, dim=-1).transpose(0, 1)  # (T, B, V)
  targets = torch.tensor([i for ids in label_ids for i in ids], dtype=torch.long)
  loss = torch.nn.functional.ctc_loss(
    log_probs,
    targets,
    torch.tensor(frame_lengths),
    torch.tensor([len(ids) for ids in label_ids]),
    blank=0,
    reduction="none",
    zero_infinity=zero_infinity,
  )
  loss.sum().backward()
  return loss.detach().numpy(), x.grad.numpy()


def _jax_loss_and_grad(logits, logit_paddings, labels, label_paddings, zero_infinity):
  """Per-utterance losses and the gradient of their sum w.r.t. the logits, jitted (eager is slow)."""

  def total(x):
    per_utt = ctc.ctc_loss(x, logit_paddings, labels, label_paddings, zero_infinity=zero_infinity)
    return per_utt.sum(), per_utt

  (_, loss), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(logits))
  return np.asarray(loss), np.asarray(grad)


def test_loss_and_gradient_match_torch():
  logits, logit_paddings, labels, label_paddings, frame_lengths, label_ids = _batch()
  loss, grad = _jax_loss_and_grad(logits, logit_paddings, labels, label_paddings, zero_infinity=False)
  ref_loss, ref_grad = _torch_loss_and_grad(logits, frame_lengths, label_ids, zero_infinity=False)
  assert loss.dtype == np.float32 and loss.shape == (5,)
  assert np.all(np.isfinite(ref_loss))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-4)
  assert np.all(grad[logit_paddings > 0] == 0)  # padded frames get no gradient


def test_required_frames_counts_repeats():
  _, _, labels, label_paddings, _, _ = _batch()
  np.testing.assert_array_equal(ctc.required_frames(labels, label_paddings), [7 + 3, 3 + 1, 1, 6 + 1, 2 + 1])


def test_zero_infinity_zeroes_infeasible_rows_only():
  logits, logit_paddings, labels, label_paddings, frame_lengths, label_ids = _batch(1)
  # Row 4: 6 frames for [4, 4]; make it 2 frames: [4, 4] needs 3 (a blank between the repeats).
  frame_lengths = frame_lengths.copy()
  frame_lengths[4] = 2
  logit_paddings = (np.arange(logits.shape[1])[None] >= frame_lengths[:, None]).astype(np.float32)
  # Row 2: [1, 1, 1] in exactly 3 frames, impossible too (needs 5).
  label_ids = list(label_ids)
  label_ids[2] = [1, 1, 1]
  frame_lengths[2] = 3
  logit_paddings[2] = np.arange(logits.shape[1]) >= 3
  # Row 3: [3, 1, 3, 6, 6, 2] needs 7 frames and gets exactly 7: feasible.
  frame_lengths[3] = 7
  logit_paddings[3] = np.arange(logits.shape[1]) >= 7
  labels, label_paddings = ctc.labels_to_padded(label_ids)

  loss, grad = _jax_loss_and_grad(logits, logit_paddings, labels, label_paddings, zero_infinity=True)
  raw = np.asarray(
    jax.jit(ctc.ctc_loss, static_argnames="zero_infinity")(
      logits, logit_paddings, labels, label_paddings, zero_infinity=False
    )
  )
  ref_loss, ref_grad = _torch_loss_and_grad(logits, frame_lengths, label_ids, zero_infinity=True)
  ref_inf, _ = _torch_loss_and_grad(logits, frame_lengths, label_ids, zero_infinity=False)

  infeasible = np.array([False, False, True, False, True])
  assert np.all(np.isinf(ref_inf[infeasible])) and np.all(np.isfinite(ref_inf[~infeasible]))
  assert np.all(raw[infeasible] > 1e3)  # optax's floored stand-in for inf
  np.testing.assert_array_equal(loss[infeasible], 0.0)
  np.testing.assert_array_equal(ref_loss[infeasible], 0.0)
  np.testing.assert_array_equal(grad[infeasible], 0.0)
  np.testing.assert_allclose(loss[~infeasible], raw[~infeasible], rtol=0)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_zero_infinity_keeps_huge_feasible_losses():
  """Feasibility comes from lengths, not a loss threshold: an unlikely but possible alignment keeps its loss."""
  logits = np.zeros((1, 4, 5), np.float32)
  # Every frame all but certainly blank; the label [1, 1] still fits (1, blank, 1). Its loss, 2 * 3e4,
  # stays under 1e5, where optax's log_epsilon floor would stop tracking torch.
  logits[..., 0] = 3e4
  labels, label_paddings = ctc.labels_to_padded([[1, 1]])
  loss = float(ctc.ctc_loss(logits, np.zeros((1, 4), np.float32), labels, label_paddings)[0])
  ref, _ = _torch_loss_and_grad(logits, np.array([4]), [[1, 1]], zero_infinity=True)
  assert loss > 5e4
  np.testing.assert_allclose(loss, ref[0], rtol=1e-4)


def test_sentence_averaged():
  per_utt = jnp.array([1.0, 2.0, 6.0, 100.0])
  assert float(ctc.sentence_averaged(per_utt)) == pytest.approx(109 / 4)
  assert float(ctc.sentence_averaged(per_utt, jnp.array([1, 1, 1, 0]))) == pytest.approx(3.0)
  assert float(ctc.sentence_averaged(per_utt, jnp.zeros(4))) == 0.0


def _peaky(path, vocab_size, peak=8.0):
  """Logits [T, V] whose per-frame argmax follows `path`."""
  logits = np.zeros((len(path), vocab_size), np.float32)
  logits[np.arange(len(path)), path] = peak
  return logits


def test_greedy_decode_collapses_repeats_and_respects_lengths():
  a, b = 5, 6
  path = [a, a, 0, a, b, b]  # "A A blank A B B" -> A, A, B
  logits = np.stack([_peaky(path, 8), _peaky([b, 0, b, b, a, a], 8)])
  assert ctc.greedy_decode(logits.argmax(-1), [6, 6]) == [[a, a, b], [b, b, a]]
  assert ctc.greedy_decode(logits.argmax(-1), [3, 4]) == [[a], [b, b]]
  assert ctc.greedy_decode(jnp.asarray(logits).argmax(-1), np.array([0, 1])) == [[], [b]]


def test_error_rates():
  assert ctc.word_error_rate(["THE CAT SAT"], ["THE CAT SIT"]) == pytest.approx(1 / 3)
  assert ctc.char_error_rate(["THE CAT SAT"], ["THE CAT SIT"]) == pytest.approx(1 / 11)
  # Normalised first: case and spacing are not errors.
  assert ctc.word_error_rate(["the  cat sat"], [" THE CAT SAT"]) == 0.0
  # Corpus level: 2 word errors (1 sub + 1 deletion) over 5 reference words, not a mean of ratios.
  assert ctc.word_error_rate(["a b c", "d e"], ["a x c", "d"]) == pytest.approx(2 / 5)
  # CER: "ab cd" -> "abd" is 2 deletions (" ", "c") over 5 characters.
  assert ctc.char_error_rate(["ab cd", "e"], ["abd", "e"]) == pytest.approx(2 / 6)


def _spoken_peaky(vocab, text):
  """Peaky logits spelling `text`: two frames a letter, a blank between repeats, a blank at the end."""
  ids = vocab.encode(text)
  path = []
  for prev, i in zip([None] + ids, ids):
    path += [0, i, i] if i == prev else [i, i]
  return _peaky(path + [0], len(vocab))


def test_beam_search_matches_greedy_on_peaky_logits():
  pytest.importorskip("pyctcdecode")
  vocab = ctc.Vocabulary.build(TRANSCRIPTS)
  logits = _spoken_peaky(vocab, "that cat")
  greedy = vocab.decode(ctc.greedy_decode(logits.argmax(-1)[None], [len(logits)])[0])
  assert greedy == "THAT CAT"
  assert ctc.beam_search_decoder(vocab, beam_width=16).decode(logits) == greedy


def test_beam_search_with_an_lm_prefers_its_words_and_rejects_an_lm_in_the_wrong_case(tmp_path):
  vocab = ctc.Vocabulary.build(TRANSCRIPTS)
  logits = _spoken_peaky(vocab, "that cat")
  # Blur the last letter between T and C: "THAT CAC" and "THAT CAT" are near-equal acoustically.
  t_id, c_id = vocab.encode("t")[0], vocab.encode("c")[0]
  logits[-3:-1, c_id] = logits[-3:-1, t_id] + 0.1
  assert vocab.decode(ctc.greedy_decode(logits.argmax(-1)[None], [len(logits)])[0]) == "THAT CAC"
  lm = ngram.build_arpa(["THAT CAT"] * 3 + ["THE CAT"], str(tmp_path / "lm.arpa"), order=2)
  assert ctc.beam_search_decoder(vocab, kenlm_path=lm, beam_width=16).decode(logits) == "THAT CAT"
  lower = ngram.build_arpa(["that cat"], str(tmp_path / "lower.arpa"), order=2)
  with pytest.raises(ValueError, match="letters outside the CTC vocabulary"):
    ctc.beam_search_decoder(vocab, kenlm_path=lower)
