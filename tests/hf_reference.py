"""Helpers to build transformers' PyTorch reference models with our tiny configs."""

import numpy as np
import torch
from transformers import Wav2Vec2Config

from w2v2_jax.interop import hf


def hf_config(cfg, kind="pretraining"):
  d = hf.config_to_hf(cfg, kind)
  d.pop("architectures")
  return Wav2Vec2Config(**d)


def state_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def padded_batch(cfg, lengths, seed=0):
  """Random audio zero-padded to the longest length, its HF attention mask, and the frame lengths."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  total = int(lengths.max())
  attention = np.arange(total)[None] < lengths[:, None]
  audio = (rng.standard_normal((len(lengths), total)) * attention).astype(np.float32)
  return audio, attention, cfg.num_frames(lengths)


def torch_tensor(x, dtype=None):
  t = torch.tensor(np.asarray(x))
  return t if dtype is None else t.to(dtype)
