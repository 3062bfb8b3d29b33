"""A run's first parameters, for either task: fresh, or taken from the checkpoint that config.init names.

config.init is an HF directory, a fairseq .pt, or one of our workdirs / step folders, local or gs://
(interop/load.py). Only parameters are taken: the optimizer, the step and the lr schedule start at 0
(train/loop.py's restore_or_init). The checkpoint's architecture must equal config.model's; dropouts,
LayerDrop, feature_grad_mult, dtype and the layer form (model.scan_layers) are the run's own.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from w2v2_jax.interop.hf import CheckpointError
from w2v2_jax.interop.load import load_pretrained
from w2v2_jax.models import layer_stack
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.init import init_params

# What each task's model takes from the checkpoint; the rest (the CTC head) starts fresh.
TAKEN = {"pretraining": ("wav2vec2", "quantizer", "project_hid", "project_q"), "ctc": ("wav2vec2",)}

ENCODER_KEYS = (
  "conv_dim",
  "conv_kernel",
  "conv_stride",
  "conv_bias",
  "feat_extract_norm",
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "intermediate_size",
  "num_conv_pos_embeddings",
  "num_conv_pos_embedding_groups",
  "do_stable_layer_norm",
)
HEAD_KEYS = ("num_codevector_groups", "num_codevectors_per_group", "codevector_dim", "proj_codevector_dim")


def initial_params(cfg: ModelConfig, kind: str, config, key, shardings=None):
  """The `kind` model's parameters for a fresh run, laid out by `shardings` (NamedShardings, or None for
  the default device). Fresh ones are made in one compiled program (eagerly, init dispatches hundreds of
  small ops); with config.init, the parts in TAKEN[kind] are then replaced by the checkpoint's."""
  params = jax.jit(lambda k: init_params(cfg, k, kind), out_shardings=shardings)(key)
  path = config.get("init", "")
  if not path:
    logging.info("random initial parameters (config.init is empty)")
    return params
  src_cfg, src, src_kind = load_pretrained(path)
  if kind == "pretraining" and src_kind != "pretraining":
    raise CheckpointError(
      f"config.init={path}: a {src_kind!r} checkpoint has no quantizer and projection heads to continue "
      "pre-training from; pass a pre-training checkpoint (an HF Wav2Vec2ForPreTraining directory, a fairseq "
      "pre-trained .pt, or a w2v2_jax pre-training workdir), or start CTC fine-tuning from this one"
    )
  check_architecture(path, src_cfg, cfg, ENCODER_KEYS + (HEAD_KEYS if kind == "pretraining" else ()))
  src = layer_stack.to_form({name: src[name] for name in TAKEN[kind]}, cfg.scan_layers)  # the run's layer form
  for name in TAKEN[kind]:
    params[name] = jax.tree_util.tree_map_with_path(_placed_like, params[name], src[name])
  logging.info(
    "initial %s from %s (a %r checkpoint); optimizer, step and lr schedule start at 0",
    "+".join(TAKEN[kind]),
    path,
    src_kind,
  )
  return params


def check_architecture(path: str, src_cfg: ModelConfig, cfg: ModelConfig, keys) -> None:
  """One line naming every key of `keys` where the checkpoint's config and the run's differ."""
  differ = [k for k in keys if getattr(src_cfg, k) != getattr(cfg, k)]
  diff = [f"{k}={getattr(cfg, k)!r} (checkpoint: {getattr(src_cfg, k)!r})" for k in differ]
  if diff:
    raise CheckpointError(
      f"config.init={path}: its architecture differs from the run's config.model in {', '.join(diff)}; "
      "set config.model_preset / config.model to match the checkpoint"
    )


def _placed_like(path, fresh: jax.Array, loaded) -> jax.Array:
  """`loaded` (the whole array, on every process) with the dtype and sharding of `fresh`."""
  loaded = np.asarray(loaded, fresh.dtype)
  if loaded.shape != fresh.shape:  # the architecture check leaves this to a bug
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    raise CheckpointError(f"config.init: parameter {name} has shape {loaded.shape}, the model {fresh.shape}")
  return jax.make_array_from_callback(fresh.shape, fresh.sharding, lambda index: loaded[index])
