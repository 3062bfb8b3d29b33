"""fairseq wav2vec 2.0 checkpoints (.pt) -> our parameter tree, without executing their pickle.

A fairseq checkpoint is a torch.save'd dict: "model" (the state dict), "cfg" (a plain dict since
fairseq 0.10, with cfg["model"] the Wav2Vec2Config or, fine-tuned, the Wav2Vec2CtcConfig whose
"w2v_args" holds the pre-training config) or, older, "args" (an argparse.Namespace), plus optimizer
history and extra state. It is read with torch's weights-only unpickler, which admits tensors and
containers only; we add argparse.Namespace and numpy scalars, which these files hold. Anything
else in the pickle is refused with a one-line error.

Weights are renamed to HF's names and go through the same import as HF checkpoints (hf.py).
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import re
from typing import Any

import numpy as np

from w2v2_jax.interop import hf
from w2v2_jax.interop.hf import CheckpointError
from w2v2_jax.models.config import ModelConfig

# fairseq state-dict names -> HF names (the "wav2vec2." prefix is added for encoder weights).
_RENAMES = (
  (r"^feature_extractor\.conv_layers\.(\d+)\.0\.", r"feature_extractor.conv_layers.\1.conv."),
  (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.", r"feature_extractor.conv_layers.\1.layer_norm."),
  (r"^feature_extractor\.conv_layers\.0\.2\.", r"feature_extractor.conv_layers.0.layer_norm."),
  (r"^layer_norm\.", r"feature_projection.layer_norm."),
  (r"^post_extract_proj\.", r"feature_projection.projection."),
  (r"^mask_emb$", r"masked_spec_embed"),
  (r"^encoder\.pos_conv\.0\.", r"encoder.pos_conv_embed.conv."),
  (r"^encoder\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.attention."),
  (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.layer_norm."),
  (r"^encoder\.layers\.(\d+)\.fc1\.", r"encoder.layers.\1.feed_forward.intermediate_dense."),
  (r"^encoder\.layers\.(\d+)\.fc2\.", r"encoder.layers.\1.feed_forward.output_dense."),
  (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
  (r"^encoder\.layer_norm\.", r"encoder.layer_norm."),
)
_HEADS = (
  (r"^quantizer\.vars$", "quantizer.codevectors"),
  (r"^quantizer\.weight_proj\.", "quantizer.weight_proj."),
  (r"^project_q\.", "project_q."),
  (r"^final_proj\.", "project_hid."),
  (r"^proj\.", "lm_head."),
)
_FINETUNED_PREFIX = "w2v_encoder.w2v_model."
_SKIPPED = ("_float_tensor",)  # buffers with no weights
_PRETRAINING_ONLY = ("quantizer.", "project_q.", "final_proj.")


def is_fairseq_file(path: str) -> bool:
  return os.path.isfile(path) and path.endswith(".pt")


def read(path: str) -> dict:
  """The checkpoint dict, through the restricted unpickler."""
  return _read(os.path.abspath(path), os.path.getmtime(path))


@functools.lru_cache(maxsize=1)  # load() and then normalize() / the vocabulary read the same file
def _read(path: str, mtime: float) -> dict:
  del mtime  # part of the cache key only
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(f"{path}: reading a fairseq .pt checkpoint needs torch (pip install torch)") from None
  allowed = [
    argparse.Namespace,
    np.dtype,
    type(np.dtype(np.float64)),
    type(np.dtype(np.float32)),
    type(np.dtype(np.int64)),
    np._core.multiarray.scalar,
  ]
  try:
    with torch.serialization.safe_globals(allowed):
      ckpt = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types for a refused or corrupt pickle
    first = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
    raise CheckpointError(
      f"{path}: refused or unreadable fairseq checkpoint ({type(e).__name__}: {first}); "
      "only tensors, containers, argparse.Namespace and numpy scalars are admitted"
    ) from None
  if not isinstance(ckpt, dict) or "model" not in ckpt:
    raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
  return ckpt


def _as_dict(x) -> dict:
  if x is None:
    return {}
  if isinstance(x, argparse.Namespace):
    return vars(x)
  if isinstance(x, dict):
    return x
  raise CheckpointError(f"unexpected fairseq config of type {type(x).__name__}")


def model_configs(ckpt: dict) -> tuple[dict, dict | None]:
  """(pre-training model config, fine-tuning model config or None) from "cfg" or legacy "args"."""
  if ckpt.get("cfg"):
    model = _as_dict(_as_dict(ckpt["cfg"]).get("model"))
  else:
    model = _as_dict(ckpt.get("args"))
  if not model:
    raise CheckpointError("the checkpoint has neither cfg['model'] nor args")
  if model.get("w2v_args") is not None:
    w2v = _as_dict(model["w2v_args"])
    return _as_dict(w2v.get("model", w2v)), model
  if "w2v_path" in model:  # fine-tuned, legacy args without embedded w2v_args
    raise CheckpointError("this fine-tuned checkpoint does not embed its pre-training config (w2v_args)")
  return model, None


def _conv_layers(spec: str) -> list[tuple[int, int, int]]:
  """fairseq's conv_feature_layers string, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4", evaluated
  safely: only list/tuple literals of ints with + and *."""

  def ev(node):
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, (ast.List, ast.Tuple)):
      vals = [ev(e) for e in node.elts]
      return vals if isinstance(node, ast.List) else tuple(vals)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
      return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
      left, right = ev(node.left), ev(node.right)
      return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError(ast.dump(node))

  try:
    layers = ev(ast.parse(spec, mode="eval"))
    return [tuple(int(v) for v in layer) for layer in layers]
  except (SyntaxError, ValueError, TypeError) as e:
    raise CheckpointError(f"cannot read conv_feature_layers={spec!r}: {e}") from None


def config_from_fairseq(model: dict, finetune: dict | None = None, vocab_size: int = 0) -> ModelConfig:
  """fairseq Wav2Vec2Config (dict) -> ModelConfig; refuses variants our model does not implement."""

  def get(key, default):
    value = model.get(key, default)
    return default if value is None else value

  for key, want in (("activation_fn", "gelu"), ("pos_conv_depth", 1), ("quantize_input", False)):
    if get(key, want) != want:
      raise CheckpointError(f"fairseq {key}={model[key]!r} is not supported (only {want!r})")
  mode = get("extractor_mode", "default")
  if mode not in ("default", "layer_norm"):
    raise CheckpointError(f"fairseq extractor_mode={mode!r} is not supported")
  layers = _conv_layers(get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"))
  embed = int(get("encoder_embed_dim", 768))
  final_dim = int(get("final_dim", 0)) or embed
  drop = finetune or model  # dropouts are the fine-tuning run's when there is one
  pick = lambda key, default: float(drop.get(key, model.get(key, default)) or 0.0)  # noqa: E731
  try:
    return ModelConfig(
      conv_dim=tuple(l[0] for l in layers),
      conv_kernel=tuple(l[1] for l in layers),
      conv_stride=tuple(l[2] for l in layers),
      conv_bias=bool(get("conv_bias", False)),
      feat_extract_norm="group" if mode == "default" else "layer",
      feature_grad_mult=float(get("feature_grad_mult", 0.1)),
      hidden_size=embed,
      num_hidden_layers=int(get("encoder_layers", 12)),
      num_attention_heads=int(get("encoder_attention_heads", 12)),
      intermediate_size=int(get("encoder_ffn_embed_dim", 3072)),
      num_conv_pos_embeddings=int(get("conv_pos", 128)),
      num_conv_pos_embedding_groups=int(get("conv_pos_groups", 16)),
      do_stable_layer_norm=bool(get("layer_norm_first", False)),
      hidden_dropout=pick("dropout", 0.1),
      attention_dropout=pick("attention_dropout", 0.1),
      activation_dropout=pick("activation_dropout", 0.0),
      feat_proj_dropout=float(get("dropout_input", 0.0)),
      feat_quantizer_dropout=float(get("dropout_features", 0.0)),
      layerdrop=float((finetune or {}).get("layerdrop", get("encoder_layerdrop", 0.0)) or 0.0),
      num_codevector_groups=int(get("latent_groups", 2)),
      num_codevectors_per_group=int(get("latent_vars", 320)),
      codevector_dim=int(get("latent_dim", 0)) or final_dim,
      proj_codevector_dim=final_dim,
      vocab_size=vocab_size,
      final_dropout=float((finetune or {}).get("final_dropout", 0.0) or 0.0),
    )
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"inconsistent fairseq config: {e}") from None


def hf_state(fairseq_state: dict[str, Any], finetuned: bool) -> dict[str, np.ndarray]:
  """fairseq state dict -> HF state dict (numpy), or a one-line error naming the first unknown key."""
  out = {}
  for key, value in fairseq_state.items():
    name = key
    if finetuned:
      if name.startswith("w2v_encoder.proj."):
        name = name[len("w2v_encoder.") :]
      elif name.startswith(_FINETUNED_PREFIX):
        name = name[len(_FINETUNED_PREFIX) :]
        if name.startswith(_PRETRAINING_ONLY):
          continue  # fairseq keeps them in some fine-tuned files; a CTC model has no use for them
    if name.endswith(_SKIPPED):
      continue
    for pattern, repl in _HEADS:
      if re.match(pattern, name):
        out[re.sub(pattern, repl, name)] = value
        break
    else:
      for pattern, repl in _RENAMES:
        if re.match(pattern, name):
          out[hf.PREFIX + "." + re.sub(pattern, repl, name)] = value
          break
      else:
        raise CheckpointError(f"unknown fairseq parameter {key!r}: not a wav2vec 2.0 checkpoint?")
  return {k: (v.float().numpy() if hasattr(v, "float") else np.asarray(v, np.float32)) for k, v in out.items()}


def load(path: str) -> tuple[ModelConfig, dict, str]:
  """A fairseq .pt file -> (config, params, kind) with kind "pretraining" or "ctc"."""
  ckpt = read(path)
  pretrain_cfg, finetune_cfg = model_configs(ckpt)
  state = ckpt["model"]
  finetuned = finetune_cfg is not None or any(k.startswith("w2v_encoder.") for k in state)
  params, kind = hf.hf_to_params(hf_state(state, finetuned))
  vocab_size = int(params["lm_head"]["kernel"].shape[1]) if kind == "ctc" else 0
  cfg = config_from_fairseq(pretrain_cfg, finetune_cfg, vocab_size)
  hf.check_params_match(cfg, params, kind, source=path)
  return cfg, params, kind


def normalize(path: str, cfg: ModelConfig) -> bool:
  """Whether the model expects zero-mean unit-variance audio: the task's `normalize` (fairseq's own
  switch), else the extractor's convention (layer norm: yes)."""
  ckpt = read(path)
  task = _as_dict(_as_dict(ckpt.get("cfg")).get("task")) if ckpt.get("cfg") else _as_dict(ckpt.get("args"))
  if task.get("normalize") is not None:
    return bool(task["normalize"])
  return cfg.feat_extract_norm == "layer"


def vocabulary(path: str, dict_path: str | None = None):
  """The letters of a fine-tuned checkpoint from fairseq's dict.ltr.txt (beside the .pt unless given).

  fairseq's dictionary is <s>=0, <pad>=1, </s>=2, <unk>=3, then the file's symbols; its CTC blank is
  index 0. Our (and HF's) blank is "<pad>" at index 0, so the first two names swap and the rows of
  the head stay where they are, as HF's converter does.
  """
  from w2v2_jax.decoding import ctc  # pylint: disable=import-outside-toplevel

  dict_path = dict_path or os.path.join(os.path.dirname(os.path.abspath(path)), "dict.ltr.txt")
  if not os.path.isfile(dict_path):
    raise CheckpointError(
      f"{path}: a fine-tuned fairseq checkpoint needs its letter dictionary; put "
      f"dict.ltr.txt beside it (looked for {dict_path})"
    )
  symbols = []
  with open(dict_path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      parts = line.split()  # "SYMBOL COUNT" or "SYMBOL COUNT #fairseq:overwrite"
      if len(parts) < 2 or not parts[1].isdigit():
        raise CheckpointError(f"{dict_path}:{n}: expected 'SYMBOL COUNT', got {line.strip()!r}")
      symbols.append(parts[0])
  return ctc.Vocabulary(ctc.SPECIALS + tuple(s for s in symbols if s not in ctc.SPECIALS))
