"""HuggingFace transformers <-> our parameter tree.

Our tree mirrors HF's module names, so a conversion is renames plus layout changes:
Linear W[out, in] <-> kernel[in, out]; Conv1d W[out, in, k] <-> kernel[k, in, out];
norm weight <-> scale; weight-norm g [1, 1, k] <-> [k], v [out, in/g, k] <-> [k, in/g, out].
No pickle from a file is ever executed: safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from w2v2_jax.models import layer_stack
from w2v2_jax.models.config import ModelConfig

PREFIX = "wav2vec2"
KINDS = ("pretraining", "model", "ctc")
_ARCHITECTURES = {"pretraining": "Wav2Vec2ForPreTraining", "model": "Wav2Vec2Model", "ctc": "Wav2Vec2ForCTC"}
_HF_ONLY_DEFAULTS = {
  "model_type": "wav2vec2",
  "hidden_act": "gelu",
  "feat_extract_activation": "gelu",
  "mask_time_prob": 0.05,
  "mask_time_length": 10,
  "mask_time_min_masks": 2,
  "num_negatives": 100,
  "contrastive_logits_temperature": 0.1,
  "diversity_loss_weight": 0.1,
  "initializer_range": 0.02,
  "feat_extract_dropout": 0.0,
  "ctc_loss_reduction": "sum",
  "ctc_zero_infinity": False,
  "pad_token_id": 0,
}
_NOT_EXPORTED = ("dtype", "remat_policy", "scan_layers", "kernels", "vocab_size")
_WEIGHT_NORM = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: missing files, another architecture, inconsistent config."""


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], has_ctc_head: bool = False) -> ModelConfig:
  """HF config.json dict -> ModelConfig, refusing what our model does not implement."""
  model_type = hf.get("model_type")
  if model_type != "wav2vec2":
    raise CheckpointError(f"config.json has model_type={model_type!r}; only 'wav2vec2' checkpoints are supported")
  for key in ("hidden_act", "feat_extract_activation"):
    if hf.get(key, "gelu") != "gelu":
      raise CheckpointError(f"config.json {key}={hf[key]!r} is not supported (only 'gelu')")
  if hf.get("add_adapter"):
    raise CheckpointError("config.json add_adapter=true (adapter layers) is not supported")
  n = hf.get("num_feat_extract_layers", len(hf.get("conv_dim", ())))
  if n != len(hf.get("conv_dim", ())):
    raise CheckpointError(
      f"config.json num_feat_extract_layers={n} disagrees with len(conv_dim)={len(hf.get('conv_dim', ()))}"
    )
  fields = set(ModelConfig.__dataclass_fields__) - set(_NOT_EXPORTED)
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hf.items() if k in fields}
  kwargs["vocab_size"] = int(hf.get("vocab_size", 0)) if has_ctc_head else 0
  if "feature_grad_mult" not in kwargs:  # not an HF field: the recipe's value for this extractor
    kwargs["feature_grad_mult"] = 0.1 if kwargs.get("feat_extract_norm", "group") == "group" else 1.0
  try:
    return ModelConfig(**kwargs)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"inconsistent config.json: {e}") from None


def config_to_hf(cfg: ModelConfig, kind: str) -> dict[str, Any]:
  d = dict(_HF_ONLY_DEFAULTS)
  d.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items() if k not in _NOT_EXPORTED})
  d["num_feat_extract_layers"] = len(cfg.conv_dim)
  d["architectures"] = [_ARCHITECTURES[kind]]
  d["vocab_size"] = cfg.vocab_size if kind == "ctc" else 32
  return d


# ----------------------------------------------------------------------------- weights


def _leaf(path: list[str], arr: np.ndarray) -> tuple[list[str], np.ndarray]:
  name = path[-1]
  if name == "weight_g":
    return path, arr.reshape(-1)
  if name == "weight_v":
    return path, arr.transpose(2, 1, 0)
  if name == "weight":
    if arr.ndim == 1:
      return path[:-1] + ["scale"], arr
    return path[:-1] + ["kernel"], arr.T if arr.ndim == 2 else arr.transpose(2, 1, 0)
  return path, arr


def hf_to_params(state: dict[str, np.ndarray]) -> tuple[dict, str]:
  """HF state dict (numpy) -> (our nested params, kind). Keys with or without the 'wav2vec2.' prefix."""
  has_prefix = any(k.startswith(PREFIX + ".") for k in state)
  params: dict = {}
  for key, arr in state.items():
    for long, short in _WEIGHT_NORM.items():
      key = key.replace(long, short)
    if not has_prefix and not key.startswith(("quantizer.", "project_hid.", "project_q.", "lm_head.")):
      key = f"{PREFIX}.{key}"
    path = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", key).split(".")
    path, arr = _leaf(path, np.asarray(arr))
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.array(arr, dtype=np.float32)
  if "quantizer" in params:
    kind = "pretraining"
  elif "lm_head" in params:
    kind = "ctc"
  else:
    kind = "model"
  if PREFIX not in params:
    raise CheckpointError("no wav2vec2 encoder weights found in the state dict")
  return params, kind


def params_to_hf(params: dict, kind: str) -> dict[str, np.ndarray]:
  """Our params -> HF state dict for Wav2Vec2ForPreTraining / Wav2Vec2Model / Wav2Vec2ForCTC."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  wanted = {
    "pretraining": (PREFIX, "quantizer", "project_hid", "project_q"),
    "model": (PREFIX,),
    "ctc": (PREFIX, "lm_head"),
  }[kind]
  missing = [w for w in wanted if w not in params]
  if missing:
    raise CheckpointError(f"cannot write a {kind} checkpoint: the parameters have no {missing}")
  params = layer_stack.to_form(params, scanned=False)  # HF's per-layer names
  out = {}

  def walk(node, path):
    for name, value in node.items():
      if isinstance(value, dict):
        walk(value, path + [name])
        continue
      arr = np.asarray(value, np.float32)
      if name == "kernel":
        name, arr = "weight", (arr.T if arr.ndim == 2 else arr.transpose(2, 1, 0))
      elif name == "scale":
        name = "weight"
      elif name == "weight_g":
        name, arr = "parametrizations.weight.original0", arr.reshape(1, 1, -1)
      elif name == "weight_v":
        name, arr = "parametrizations.weight.original1", arr.transpose(2, 1, 0)
      parts = [re.sub(r"_(\d+)$", r".\1", p) if re.search(r"(layers)_\d+$", p) else p for p in path]
      out[".".join(parts + [name])] = np.ascontiguousarray(arr)

  for top in wanted:
    walk({top: params[top]}, [])
  if kind == "model":
    out = {k[len(PREFIX) + 1 :]: v for k, v in out.items()}
  return out


# ----------------------------------------------------------------------------- directories


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and any(
    os.path.isfile(os.path.join(path, f))
    for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
  )


def _read_state(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return load_file(single)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
      state.update(load_file(os.path.join(path, name)))
    return state
  binary = os.path.join(path, "pytorch_model.bin")
  try:
    import torch
  except ImportError:
    raise CheckpointError(
      f"{binary}: reading pytorch_model.bin needs torch (pip install torch), or convert it to model.safetensors"
    ) from None
  try:
    state = torch.load(binary, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
    raise CheckpointError(
      f"{binary}: not a loadable weights-only torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    ) from None
  return {k: v.float().numpy() for k, v in state.items()}


def load_hf_dir(path: str) -> tuple[ModelConfig, dict, str]:
  """Read an HF wav2vec2 directory -> (config, params, kind)."""
  if not is_hf_dir(path):
    raise CheckpointError(
      f"{path}: not a HuggingFace model directory (needs config.json and model.safetensors or pytorch_model.bin)"
    )
  with open(os.path.join(path, "config.json")) as f:
    try:
      hf_cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}/config.json is not valid JSON: {e}") from None
  if not isinstance(hf_cfg, dict):
    raise CheckpointError(f"{path}/config.json must hold a JSON object, not {type(hf_cfg).__name__}")
  try:
    state = _read_state(path)
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - a corrupt safetensors file raises library-specific errors
    raise CheckpointError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
  params, kind = hf_to_params(state)
  cfg = config_from_hf(hf_cfg, has_ctc_head=kind == "ctc")
  check_params_match(cfg, params, kind, source=path)
  return cfg, params, kind


def save_hf_dir(path: str, cfg: ModelConfig, params: dict, kind: str) -> None:
  """Write config.json + model.safetensors that transformers loads with no missing or unexpected keys."""
  from safetensors.numpy import save_file

  os.makedirs(path, exist_ok=True)
  state = params_to_hf(params, kind)
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, kind), f, indent=2, sort_keys=True)
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump(preprocessor_config(cfg), f, indent=2, sort_keys=True)


def preprocessor_config(cfg: ModelConfig) -> dict[str, Any]:
  """HF Wav2Vec2FeatureExtractor settings: layer-norm extractors (LV60, XLS-R) expect normalised audio."""
  layer = cfg.feat_extract_norm == "layer"
  return {
    "feature_extractor_type": "Wav2Vec2FeatureExtractor",
    "feature_size": 1,
    "sampling_rate": 16000,
    "padding_side": "right",
    "padding_value": 0.0,
    "do_normalize": layer,
    "return_attention_mask": layer,
  }


def wants_normalized_audio(path: str, cfg: ModelConfig) -> bool:
  """do_normalize from an HF directory's preprocessor_config.json, else the default for the extractor."""
  pre = os.path.join(path, "preprocessor_config.json")
  if os.path.isfile(pre):
    try:
      with open(pre) as f:
        return bool(json.load(f).get("do_normalize", False))
    except (json.JSONDecodeError, AttributeError) as e:
      raise CheckpointError(f"{pre} is not a valid preprocessor config: {e}") from None
  return preprocessor_config(cfg)["do_normalize"]


def check_params_match(cfg: ModelConfig, params: dict, kind: str, source: str) -> None:
  """Fail with one line naming the first parameter whose name or shape disagrees with `cfg`."""
  from w2v2_jax.models.init import abstract_params

  expected = abstract_params(cfg, kind)
  flat_e, flat_p = _flatten(expected), _flatten(params)
  if "wav2vec2/masked_spec_embed" not in flat_p:  # HF omits it when mask_time_prob == 0; HF's init is U[0, 1)
    flat_p["wav2vec2/masked_spec_embed"] = np.random.default_rng(0).uniform(size=cfg.hidden_size).astype(np.float32)
    params[PREFIX]["masked_spec_embed"] = flat_p["wav2vec2/masked_spec_embed"]
  for name in sorted(set(flat_e) | set(flat_p)):
    if name not in flat_p:
      raise CheckpointError(f"{source}: missing parameter {name} for this config (another architecture?)")
    if name not in flat_e:
      raise CheckpointError(f"{source}: unexpected parameter {name} for this config (another architecture?)")
    if tuple(flat_e[name].shape) != tuple(np.shape(flat_p[name])):
      raise CheckpointError(
        f"{source}: parameter {name} has shape {tuple(np.shape(flat_p[name]))}, the config "
        f"implies {tuple(flat_e[name].shape)}; the config and weights disagree"
      )


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      out.update(_flatten(v, key))
    else:
      out[key] = v
  return out
