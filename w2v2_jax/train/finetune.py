"""CTC fine-tuning as a task: the masked CTC loss, the freeze schedule, WER/CER; the encoder from config.init.

fairseq's recipe: a linear letter head on the pre-trained encoder; the feature encoder stays
frozen; the whole encoder is frozen for the first config.finetune.freeze_steps updates (only the
head learns); time masking (mask_prob, mask_length) and channel masking (mask_channel_prob,
mask_channel_length) on the projected features; CTC with blank 0, zero_infinity and sentence
averaging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from w2v2_jax import storage
from w2v2_jax.data import records
from w2v2_jax.data.pipeline import waveform
from w2v2_jax.decoding import ctc
from w2v2_jax.models import objectives
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.init import build
from w2v2_jax.train import health, initial, inputs


class CtcTask:
  """CTC fine-tuning (config.task="ctc"). Given the data directory and the workdir, the letter
  vocabulary is WORKDIR/vocab.json (a resumed run) or built from the train split, and the final
  evaluation's beam decoder is built at once, so a missing LM fails before training, not after it.
  """

  kind = "ctc"
  whole_utterances = True  # a transcript covers the whole utterance; WER/CER on every one

  def __init__(self, config, directory=None, workdir=None):
    self.config = config
    self.vocab = vocabulary(config, directory, workdir) if directory is not None else None
    size = len(self.vocab) if self.vocab is not None else config.model.vocab_size
    self.model_config = ModelConfig.from_dict(dict(config.model.to_dict(), vocab_size=size))
    self.decoder = beam_decoder(config, workdir, self.vocab) if workdir is not None else None
    self._frozen = frozen(config)

  def validate(self, shortest_frames: int) -> None:
    del shortest_frames  # nothing is masked in spans that must fit

  def labels(self, directory, split):
    return label_arrays(records.load_split(directory, split).transcripts(), self.vocab)

  def loss_fn(self, model_cfg: ModelConfig):
    return ctc_loss_fn(model_cfg, self.config)

  def is_frozen(self, path, step):
    return self._frozen(path, step)

  def initial_params(self, key, shardings=None):
    return initial.initial_params(self.model_config, self.kind, self.config, key, shardings)

  def scorer(self, final: bool):
    return WordErrors(self.vocab, self.decoder if final else None)

  def train_line(self, m: dict) -> str:
    return "ctc %.3f" % m["ctc_loss"]

  def eval_line(self, m: dict) -> str:
    line = "WER %.3f CER %.3f" % (m["wer"], m["cer"])
    if "beam_wer" in m:
      line += " (beam search: WER %.3f CER %.3f)" % (m["beam_wer"], m["beam_cer"])
    return line

  def checkpoint_extras(self) -> dict:
    return {"vocab": list(self.vocab.tokens)}  # the letter vocabulary travels with the weights

  def health_monitor(self):
    c = self.config
    run = health.Run(0, 0, c.optim.get("warmup_steps", 0), c.num_train_steps)
    return health.Monitor(health.ANY_TASK, run, health.Thresholds.from_config(c.get("health")))


class WordErrors:
  """Corpus-level WER and CER of greedy decoding over one evaluation pass, and of beam search when a
  `decoder` is given; the rows of every process are gathered, and rows without a transcript (padding)
  are not scored."""

  def __init__(self, vocab: ctc.Vocabulary, decoder=None):
    self.vocab, self.decoder = vocab, decoder
    self.refs, self.hyps, self.beam_hyps = [], [], []

  def add(self, batch: dict, outputs: dict) -> dict:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    outputs = dict(outputs)
    log_probs = outputs.pop("log_probs", None)
    argmax, frames, labels, label_lengths = multihost_utils.process_allgather(
      (outputs.pop("logits_argmax"), outputs.pop("frame_lengths"), batch["labels"], batch["label_lengths"]),
      tiled=True,
    )
    refs, hyps = error_rates(self.vocab, argmax, frames, labels, label_lengths)
    keep = [i for i, ref in enumerate(refs) if ref]
    self.refs += [refs[i] for i in keep]
    self.hyps += [hyps[i] for i in keep]
    if self.decoder is not None:
      log_probs = multihost_utils.process_allgather(log_probs, tiled=True)
      self.beam_hyps += [self.decoder.decode(log_probs[i, : int(frames[i])]) for i in keep]
    return outputs

  def result(self) -> dict:
    if not self.refs:
      return {}
    out = dict(
      wer=ctc.word_error_rate(self.refs, self.hyps),
      cer=ctc.char_error_rate(self.refs, self.hyps),
      utterances=len(self.refs),
    )
    if self.beam_hyps:
      out.update(
        beam_wer=ctc.word_error_rate(self.refs, self.beam_hyps), beam_cer=ctc.char_error_rate(self.refs, self.beam_hyps)
      )
    logging.info("e.g. REF: %s | HYP: %s", self.refs[0], self.hyps[0])
    return out


def vocabulary(config, directory: str, workdir: str | None) -> ctc.Vocabulary:
  """The run's letter vocabulary: WORKDIR/vocab.json if it exists (resume), else built from the train
  split and written there."""
  path = storage.join(workdir, "vocab.json") if workdir is not None else None
  if path is not None and storage.exists(path):
    return ctc.Vocabulary.load(path)
  transcripts = records.load_split(directory, config.data.train_split).transcripts()
  if not any(transcripts):
    raise ValueError(
      f"config.data.train_split={config.data.train_split!r} in {directory} has no transcripts; "
      "CTC fine-tuning needs a labeled split"
    )
  vocab = ctc.Vocabulary.build(transcripts)
  if path is not None and jax.process_index() == 0:
    vocab.save(path)
  return vocab


def beam_decoder(config, workdir, vocab):
  """The final evaluation's beam-search decoder (config.decode), or None."""
  if not beam_decoding(config):
    return None
  decode = config.decode
  lm_path = decode.kenlm or None
  if lm_path == "corpus":
    if config.data.source != "corpus":
      raise ValueError(
        "config.decode.kenlm='corpus' estimates an n-gram from the offline corpus's LM text; "
        f"with config.data.source={config.data.source!r} give a KenLM file instead"
      )
    from w2v2_jax.decoding import ngram  # pylint: disable=import-outside-toplevel
    from w2v2_jax.demo import corpus  # pylint: disable=import-outside-toplevel

    text = corpus.lm_text(inputs.corpus_config(config), decode.lm_lines)
    kept = storage.join(workdir, "lm.arpa")
    lm_path = ngram.build_arpa(map(ctc.normalize, text), storage.local_path(kept), decode.lm_order)
    if storage.is_url(kept) and jax.process_index() == 0:
      storage.upload(lm_path, kept, keep_local=True)  # KenLM reads the local copy; the workdir keeps one too
    logging.info("%d-gram LM from %d lines of the corpus's LM text -> %s", decode.lm_order, len(text), kept)
  elif lm_path and not storage.exists(lm_path):
    raise ValueError(f"config.decode.kenlm={lm_path!r}: no such file (a KenLM .arpa/.bin, or 'corpus')")
  elif lm_path:
    lm_path = storage.local_copy(lm_path)  # KenLM opens local files only
  return ctc.beam_search_decoder(
    vocab, kenlm_path=lm_path, alpha=decode.alpha, beta=decode.beta, beam_width=max(decode.beam, 1)
  )


def ctc_loss_fn(cfg: ModelConfig, config):
  """loss(params, batch, key, step, deterministic) -> (sentence-averaged CTC loss, metrics)."""
  model = build(cfg, "ctc")
  ft = config.finetune

  def loss(params, batch, key, step, deterministic=False):
    del step
    audio = waveform(batch["audio"], batch["lengths"], config.data.normalize)
    k_time, k_chan, k_drop, k_layer = jax.random.split(key, 4)
    b, num_frames = audio.shape[0], int(cfg.num_frames(audio.shape[1]))
    time_mask = channel_mask = None
    if not deterministic and ft.mask_prob > 0:
      time_mask = objectives.compute_span_mask(
        k_time,
        cfg.num_frames(batch["lengths"]),
        num_frames,
        ft.mask_prob,
        ft.mask_length,
        min_masks=2,
        require_same_masks=False,
      )
    if not deterministic and ft.mask_channel_prob > 0:
      h = cfg.hidden_size
      channel_mask = objectives.compute_span_mask(
        k_chan,
        jnp.full((b,), h),
        h,
        ft.mask_channel_prob,
        ft.mask_channel_length,
        min_masks=0,
        require_same_masks=False,
      )
    logits, enc = model.apply(
      {"params": params},
      audio,
      batch["lengths"],
      time_mask,
      deterministic,
      channel_mask,
      rngs={"dropout": k_drop, "layerdrop": k_layer},
    )
    label_paddings = jnp.arange(batch["labels"].shape[1])[None] >= batch["label_lengths"][:, None]
    per_utt = ctc.ctc_loss(
      logits,
      1.0 - enc.frame_mask.astype(jnp.float32),
      batch["labels"],
      label_paddings.astype(jnp.float32),
      zero_infinity=True,
    )
    real = (batch["label_lengths"] > 0).astype(jnp.float32)  # all-padding rows count for nothing
    sentences = jnp.maximum(real.sum(), 1.0)
    value = jnp.sum(per_utt * real) / sentences
    metrics = {
      "ctc_loss": value,
      "count": real.sum(),
      "frames_per_label": (enc.frame_mask.sum(1) * real).sum() / jnp.maximum(batch["label_lengths"].sum(), 1),
    }
    if not deterministic:
      return value, metrics
    out = dict(metrics, logits_argmax=jnp.argmax(logits, -1), frame_lengths=enc.frame_mask.sum(1))
    if beam_decoding(config):  # the host's beam search needs the whole distribution
      out["log_probs"] = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return value, out

  return loss


def beam_decoding(config) -> bool:
  """Whether the final evaluation also beam-searches (config.decode: a beam width or a KenLM model)."""
  decode = config.get("decode")
  return bool(decode) and (decode.beam > 0 or bool(decode.kenlm))


def frozen(config):
  """is_frozen(path, step): the feature encoder always (when feature_grad_mult is 0), the rest of the
  encoder (wav2vec2/...) for the first config.finetune.freeze_steps updates; the head never."""
  freeze_steps = config.finetune.freeze_steps
  cnn_frozen = config.model.feature_grad_mult == 0.0

  def is_frozen(path: tuple[str, ...], step):
    if path[:1] != ("wav2vec2",):
      return False
    if cnn_frozen and path[:2] == ("wav2vec2", "feature_extractor"):
      return True
    return step < freeze_steps

  return is_frozen


def label_arrays(transcripts, vocab: ctc.Vocabulary, multiple: int = 8):
  """Transcripts -> (ids [N, L] int32, lengths [N] int32), L the longest rounded up to `multiple`."""
  encoded = [vocab.encode(t) for t in transcripts]
  width = max(multiple, -(-max((len(e) for e in encoded), default=1) // multiple) * multiple)
  ids = np.zeros((len(encoded), width), np.int32)
  for i, e in enumerate(encoded):
    ids[i, : len(e)] = e
  return ids, np.asarray([len(e) for e in encoded], np.int32)


def error_rates(vocab: ctc.Vocabulary, argmax, frame_lengths, labels, label_lengths) -> tuple[list, list]:
  """Greedy hypotheses and references (strings) of one evaluated batch."""
  hyps = [vocab.decode(ids) for ids in ctc.greedy_decode(argmax, frame_lengths)]
  refs = [vocab.decode(list(row[:n])) for row, n in zip(np.asarray(labels), np.asarray(label_lengths))]
  return refs, hyps
