"""CTC fine-tuning pieces: a letter vocabulary, the CTC loss, greedy and beam decoding, WER and CER.

The vocabulary follows the HuggingFace/fairseq letter convention (ids 0..3 are <pad> = CTC blank, <s>,
</s>, <unk>; "|" separates words), so a vocab.json written here loads in HF's Wav2Vec2CTCTokenizer and back.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
import optax

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
WORD_DELIMITER = "|"
UNK_ID = 3

_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
  """Upper-case, collapse runs of whitespace to one space, strip: the form both vocab and metrics see."""
  return _WHITESPACE.sub(" ", text.upper()).strip()


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Token strings by id; ids 0..3 are the specials, then "|" and letters (fairseq dict order)."""

  tokens: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(self, "tokens", tuple(self.tokens))
    if tuple(self.tokens[:4]) != SPECIALS:
      raise ValueError(f"ids 0..3 must be {list(SPECIALS)}, got {list(self.tokens[:4])}")
    if len(set(self.tokens)) != len(self.tokens):
      raise ValueError("duplicate tokens in vocabulary")

  @classmethod
  def build(cls, transcripts: Iterable[str]) -> Vocabulary:
    """Specials, then every character of the normalised transcripts (spaces as "|", always present),
    by descending count with ties alphabetical, as fairseq's dict.ltr.txt orders them."""
    counts = collections.Counter({WORD_DELIMITER: 0})
    for text in transcripts:
      counts.update(normalize(text).replace(" ", WORD_DELIMITER))
    ordered = sorted(counts, key=lambda tok: (-counts[tok], tok))
    return cls(SPECIALS + tuple(ordered))

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def blank_id(self) -> int:
    return 0

  @property
  def word_delimiter(self) -> str:
    return WORD_DELIMITER

  @functools.cached_property
  def _ids(self) -> dict[str, int]:
    return {tok: i for i, tok in enumerate(self.tokens)}

  def encode(self, text: str) -> list[int]:
    """Ids of the normalised text's characters; spaces become "|", unknown characters <unk> (3)."""
    ids = self._ids
    return [ids.get(WORD_DELIMITER if ch == " " else ch, UNK_ID) for ch in normalize(text)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids (no CTC collapsing): pad/blank, <s>, </s> dropped, "|" a space, <unk> kept as "<unk>"."""
    pieces = [" " if self.tokens[i] == WORD_DELIMITER else self.tokens[i] for i in map(int, ids) if i > 2]
    return _WHITESPACE.sub(" ", "".join(pieces)).strip()

  def save(self, path) -> None:
    """HF vocab.json: {token: id}, in id order (a local path or a URL, written whole)."""
    from w2v2_jax import storage  # pylint: disable=import-outside-toplevel

    storage.write_text(
      path, json.dumps({tok: i for i, tok in enumerate(self.tokens)}, ensure_ascii=False, indent=1) + "\n"
    )

  @classmethod
  def load(cls, path) -> Vocabulary:
    """Read an HF vocab.json; ValueError naming the file unless ids are 0..n-1 with the specials at 0..3."""
    try:
      from w2v2_jax import storage  # pylint: disable=import-outside-toplevel

      mapping = json.loads(storage.read_text(path))
      if not isinstance(mapping, dict) or not all(isinstance(i, int) for i in mapping.values()):
        raise ValueError("expected a JSON object of token -> integer id")
      if sorted(mapping.values()) != list(range(len(mapping))):
        raise ValueError(f"ids are not 0..{len(mapping) - 1}")
      return cls(tuple(sorted(mapping, key=mapping.__getitem__)))
    except ValueError as e:
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f"{path}: not a CTC vocab.json: {msg}") from e


def labels_to_padded(label_ids: Sequence[Sequence[int]], max_len: int | None = None):
  """Right-padded (labels int32 [B, L], paddings float32 [B, L], 1.0 on padding) numpy arrays, as optax wants.

  L is max_len or the longest sequence (at least 1); a longer sequence than max_len is a ValueError.
  """
  longest = max((len(ids) for ids in label_ids), default=0)
  width = max(longest, 1) if max_len is None else max_len
  if longest > width:
    raise ValueError(f"a label sequence has {longest} ids, more than max_len={width}")
  labels = np.zeros((len(label_ids), width), np.int32)
  paddings = np.ones((len(label_ids), width), np.float32)
  for b, ids in enumerate(label_ids):
    labels[b, : len(ids)] = ids
    paddings[b, : len(ids)] = 0.0
  return labels, paddings


def required_frames(labels, label_paddings):
  """Fewest frames a CTC alignment of each label row needs: its length plus its adjacent repeats
  (a blank must separate them). int32 [B]."""
  valid = label_paddings < 0.5
  length = jnp.sum(valid, axis=1)
  repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & valid[:, 1:] & valid[:, :-1], axis=1)
  return (length + repeats).astype(jnp.int32)


def ctc_loss(logits, logit_paddings, labels, label_paddings, blank_id: int = 0, zero_infinity: bool = True):
  """Per-utterance CTC negative log-likelihood, float32 [B], over raw logits [B, T, V] (optax.ctc_loss).

  Paddings are 1.0 on padded frames/labels. With zero_infinity (fairseq/torch), an utterance that has
  fewer valid frames than required_frames gets loss 0 and zero gradient: decided from the lengths and
  labels, not by thresholding the loss. Without it such a row keeps optax's finite stand-in for inf
  (about 1e5: optax's log_epsilon = -1e5 marks impossible states, so losses past ~1e5 are not exact).
  """
  logits = jnp.asarray(logits, jnp.float32)
  logit_paddings = jnp.asarray(logit_paddings, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  label_paddings = jnp.asarray(label_paddings, jnp.float32)
  loss = optax.ctc_loss(logits, logit_paddings, labels, label_paddings, blank_id=blank_id)
  if not zero_infinity:
    return loss
  frames = jnp.sum(1.0 - logit_paddings, axis=1)
  feasible = frames >= required_frames(labels, label_paddings)
  return jnp.where(feasible, loss, 0.0)


def sentence_averaged(per_utt, weights=None):
  """fairseq's sentence_avg: sum of per-utterance losses over the number of utterances with weight > 0
  (weights 0 mark batch padding; default all real)."""
  per_utt = jnp.asarray(per_utt, jnp.float32)
  if weights is None:
    return jnp.sum(per_utt) / max(per_utt.shape[0], 1)
  weights = jnp.asarray(weights, jnp.float32)
  return jnp.sum(per_utt * weights) / jnp.maximum(jnp.sum(weights > 0), 1)


def greedy_decode(frame_ids, lengths, blank_id: int = 0) -> list[list[int]]:
  """Best-path decoding of per-frame argmax ids [B, T] on the host: each row's first lengths[b] frames,
  repeats merged, blanks dropped. (The argmax is taken on device, so only ids travel to the host.)"""
  out = []
  for row, n in zip(np.asarray(frame_ids), np.asarray(lengths).reshape(-1)):
    path = row[: int(n)]
    keep = np.ones(path.shape, bool)
    keep[1:] = path[1:] != path[:-1]
    out.append([int(i) for i in path[keep] if i != blank_id])
  return out


def _normalized_pairs(refs: Sequence[str], hyps: Sequence[str]):
  refs, hyps = list(refs), list(hyps)
  if len(refs) != len(hyps) or not refs:
    raise ValueError(f"need as many hypotheses as references (>= 1), got {len(refs)} and {len(hyps)}")
  return [normalize(r) for r in refs], [normalize(h) for h in hyps]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Corpus WER (word edits over reference words, jiwer) of normalised texts."""
  import jiwer

  return float(jiwer.wer(*_normalized_pairs(refs, hyps)))


def char_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Corpus CER (character edits, spaces included, over reference characters, jiwer) of normalised texts."""
  import jiwer

  return float(jiwer.cer(*_normalized_pairs(refs, hyps)))


# pyctcdecode's labels: blank "", word delimiter " ", its own unk mark; <s> and </s> get characters that
# no transcript holds and are stripped from the output, since CTC fine-tuning never targets them.
_BEAM_LABELS = {PAD: "", WORD_DELIMITER: " ", BOS: "\u2402", EOS: "\u2403", UNK: "\u2047"}


class BeamSearchDecoder:
  """pyctcdecode beam search (optionally with a KenLM model) over one utterance's [T, V] logits."""

  def __init__(self, decoder, beam_width: int):
    self._decoder = decoder
    self.beam_width = beam_width

  def decode(self, logits) -> str:
    """Text for raw logits (or log-probabilities) [T, V], in Vocabulary.decode's form."""
    logits = np.asarray(logits, np.float32)
    log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    text = self._decoder.decode(log_probs, beam_width=self.beam_width)
    text = text.replace(_BEAM_LABELS[BOS], "").replace(_BEAM_LABELS[EOS], "").replace(_BEAM_LABELS[UNK], UNK)
    return _WHITESPACE.sub(" ", text).strip()


def beam_search_decoder(
  vocab: Vocabulary, kenlm_path: str | None = None, alpha: float = 0.5, beta: float = 1.0, beam_width: int = 100
) -> BeamSearchDecoder:
  """A BeamSearchDecoder for vocab; alpha weighs the LM, beta is the word insertion bonus (pyctcdecode's)."""
  try:
    import pyctcdecode
  except ImportError as e:
    raise ImportError(
      "beam search needs pyctcdecode (its metadata pins numpy<2, which works): "
      "pip install pygtrie && pip install --no-deps pyctcdecode"
    ) from e
  if kenlm_path:
    try:
      import kenlm  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    except ImportError as e:
      raise ImportError(
        f"{kenlm_path}: decoding with a KenLM model needs its Python module, built from source "
        "(cmake and a C++ compiler): CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install kenlm==0.2.0"
      ) from e
  labels = [_BEAM_LABELS.get(tok, tok) for tok in vocab.tokens]
  unigrams = None
  if kenlm_path and kenlm_path.endswith(".arpa"):
    # The LM's words without <s>, </s>, <unk>; they must be spelled in the vocabulary's letters.
    from pyctcdecode.language_model import load_unigram_set_from_arpa  # pylint: disable=import-outside-toplevel

    unigrams = sorted(w for w in load_unigram_set_from_arpa(kenlm_path) if w not in (BOS, EOS, UNK))
    letters = set(vocab.tokens)
    unspelled = [w for w in unigrams if not set(w) <= letters]
    if len(unspelled) > len(unigrams) / 2:
      raise ValueError(
        f"{kenlm_path}: {len(unspelled)} of its {len(unigrams)} words use letters outside "
        f"the CTC vocabulary (e.g. {unspelled[0]!r}); build the LM on text in the vocabulary's form "
        "(ctc.normalize: upper case)"
      )
  decoder = pyctcdecode.build_ctcdecoder(labels, kenlm_model_path=kenlm_path, unigrams=unigrams, alpha=alpha, beta=beta)
  return BeamSearchDecoder(decoder, beam_width)
