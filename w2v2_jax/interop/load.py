"""One entry point for every kind of checkpoint the CLIs accept: HF directories, fairseq .pt files and our
Orbax checkpoints."""

from __future__ import annotations

import os

import jax
import numpy as np

from w2v2_jax import storage
from w2v2_jax.interop import fairseq, hf
from w2v2_jax.interop.hf import CheckpointError
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.train import checkpointing

_HF_FILES = (
  "config.json",
  "preprocessor_config.json",
  "vocab.json",
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
)


def localize(path: str) -> str:
  """A checkpoint in a bucket, as the readers of its format need it: an HF directory or a fairseq .pt
  (with its dict.ltr.txt) copied into the local temporary folder; our Orbax checkpoints as they are
  (Orbax reads gs:// itself)."""
  if not storage.is_url(path) or not storage.exists(path):
    return path
  if path.endswith(".pt"):
    dict_url = storage.join(storage.dirname(path), "dict.ltr.txt")
    if storage.exists(dict_url):
      storage.local_copy(dict_url)
    return storage.local_copy(path)
  names = set(storage.listdir(path)) if storage.isdir(path) else set()
  if "config.json" in names and names & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}:
    shards = {n for n in names if n.startswith("model-") and n.endswith(".safetensors")}
    local = [storage.local_copy(storage.join(path, n)) for n in sorted(names & set(_HF_FILES) | shards)]
    return os.path.dirname(local[0])
  return path


def load_pretrained(path: str) -> tuple[ModelConfig, dict, str]:
  """PATH (HF directory, fairseq .pt, our workdir, or one of our step folders; local or gs://) -> (config,
  numpy params, kind)."""
  if not storage.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint file or directory")
  path = localize(path)
  if hf.is_hf_dir(path):
    return hf.load_hf_dir(path)
  if fairseq.is_fairseq_file(path):
    return fairseq.load(path)
  step_dir = checkpointing.resolve_step_dir(path)
  if step_dir is None:
    raise CheckpointError(
      f"{path}: neither a HuggingFace directory (config.json + model.safetensors), a "
      f"fairseq .pt file, nor a w2v2_jax workdir or checkpoint step folder"
    )
  try:
    cfg, params, kind, _ = checkpointing.load_params(step_dir)
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{step_dir}: not a readable w2v2_jax checkpoint ({type(e).__name__}: {e})") from None
  if kind not in hf.KINDS:
    raise CheckpointError(f"{step_dir}: the checkpoint's config names kind {kind!r}; expected one of {hf.KINDS}")
  params = jax.tree.map(np.asarray, params)
  hf.check_params_match(cfg, params, kind, source=step_dir)
  return cfg, params, kind


def load_ctc(path: str):
  """A CTC checkpoint (ours or HF) -> (config, numpy params, Vocabulary, normalize_waveform)."""
  from w2v2_jax.decoding import ctc  # pylint: disable=import-outside-toplevel

  cfg, params, kind = load_pretrained(path)
  path = localize(path)
  if kind != "ctc":
    raise CheckpointError(
      f"{path}: a {kind!r} checkpoint has no CTC head; fine-tune it first "
      "(w2v2-train --config=experiments/demo_finetune.py ...)"
    )
  if hf.is_hf_dir(path):
    vocab_path = os.path.join(path, "vocab.json")
    if not os.path.exists(vocab_path):
      raise CheckpointError(f"{path}: no vocab.json next to the CTC weights")
    with open(os.path.join(path, "config.json")) as f:
      import json  # pylint: disable=import-outside-toplevel

      normalize = bool(json.load(f).get("feat_extract_norm") == "layer")
    return cfg, params, ctc.Vocabulary.load(vocab_path), normalize
  if fairseq.is_fairseq_file(path):
    vocab = fairseq.vocabulary(path)
    if len(vocab) != cfg.vocab_size:
      raise CheckpointError(
        f"{path}: dict.ltr.txt gives {len(vocab)} tokens with the specials, the CTC head has {cfg.vocab_size} outputs"
      )
    return cfg, params, vocab, fairseq.normalize(path, cfg)
  _, _, _, experiment = checkpointing.load_params(checkpointing.resolve_step_dir(path))
  if "vocab" not in experiment:
    raise CheckpointError(f"{path}: the CTC checkpoint carries no vocabulary")
  normalize = bool(experiment.get("data", {}).get("normalize", False))
  return cfg, params, ctc.Vocabulary(tuple(experiment["vocab"])), normalize
