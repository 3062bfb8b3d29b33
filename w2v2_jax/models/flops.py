"""Analytic FLOPs of wav2vec 2.0 steps and the peak FLOP/s they are compared with (MFU).

Counts multiply-adds of the matmuls and convolutions as 2 FLOPs each (elementwise work, norms and
softmax are left out, as in the usual MFU convention). A train step is 3x the forward: the backward
computes gradients with respect to both inputs and weights. Rematerialised recomputation is NOT
counted, so MFU measures useful work only. The positional conv counts as the direct conv it is,
even where it is computed with fewer operations (on CPU, as DFT-domain matmuls:
models/kernels/dft_conv.py). Cross-checked against XLA's cost_analysis in
tests/test_flops.py.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from w2v2_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation: how its slices are named, and its public datasheet's figures per chip."""

  datasheet: str  # the chip's name on its public datasheet
  topology: str  # libtpu's topology_name prefix
  cores: int  # cores per chip counted in the slice name (v5p-128 is 64 chips)
  hbm_gib: int
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes_per_s: float
  device_kinds: tuple[str, ...]  # jax's device_kind strings of the chip


# Public datasheets: dense bf16 peak, HBM, HBM bandwidth per chip; keyed by the slice names' prefix.
TPU_CHIPS = {
  "v4": Chip("TPU v4", "v4", 2, 32, 275e12, 1.2e12, ("TPU v4",)),
  "v5p": Chip("TPU v5p", "v5p", 2, 95, 459e12, 2.76e12, ("TPU v5p", "TPU v5")),
  "v5e": Chip("TPU v5e", "v5e", 1, 16, 197e12, 0.82e12, ("TPU v5 lite", "TPU v5e")),
  "v6e": Chip("TPU v6e", "v6e", 1, 32, 918e12, 1.64e12, ("TPU v6 lite", "TPU v6e")),
}

# Dense peak FLOP/s per chip from vendor datasheets (bf16 / fp32-on-tensor-cores where that is the
# compute dtype in use). Keys are jax's device_kind strings; a device kind takes its longest matching key.
PEAK_FLOPS = {
  # NVIDIA, dense (no sparsity). fp32 uses TF32 tensor cores (XLA's default matmul precision).
  "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float32": 494e12},
  "NVIDIA H100": {"bfloat16": 989e12, "float32": 494e12},
  "NVIDIA H200": {"bfloat16": 989e12, "float32": 494e12},
  "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 156e12},
  "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 156e12},
  "Tesla V100-SXM2-32GB": {"bfloat16": 125e12, "float32": 125e12},
  # Google TPUs, bf16 per chip (fp32 matmuls run on the bf16 units).
  **{kind: {"bfloat16": c.peak_flops, "float32": c.peak_flops} for c in TPU_CHIPS.values() for kind in c.device_kinds},
}


def feature_encoder_flops(cfg: ModelConfig, num_samples: int) -> float:
  """FLOPs of the conv feature encoder's forward over one utterance of `num_samples` samples."""
  flops, length, channels = 0.0, num_samples, 1
  for dim, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
    length = (length - k) // s + 1
    flops += 2.0 * length * k * channels * dim
    channels = dim
  return flops


def pos_conv_flops(cfg: ModelConfig, frames: int) -> float:
  """FLOPs of the grouped positional conv's forward over `frames` frames."""
  h = cfg.hidden_size
  return 2.0 * frames * cfg.num_conv_pos_embeddings * (h // cfg.num_conv_pos_embedding_groups) * h


def layer_flops(cfg: ModelConfig, frames: int) -> float:
  """FLOPs of one transformer layer's forward over `frames` frames (projections, attention, FFN)."""
  t, h = frames, cfg.hidden_size
  return 2.0 * t * 4 * h * h + 2.0 * 2 * t * t * h + 2.0 * 2 * t * h * cfg.intermediate_size


def forward_flops(
  cfg: ModelConfig, num_samples: int, batch: int = 1, head: str = "pretraining", num_negatives: int = 100
) -> float:
  """FLOPs of one forward pass over `batch` utterances of `num_samples` samples each."""
  flops = feature_encoder_flops(cfg, num_samples)
  t, h, channels = int(cfg.num_frames(num_samples)), cfg.hidden_size, cfg.conv_dim[-1]
  flops += 2.0 * t * channels * h  # feature projection
  flops += pos_conv_flops(cfg, t)
  flops += cfg.num_hidden_layers * layer_flops(cfg, t)
  if head == "pretraining":
    g, v = cfg.num_codevector_groups, cfg.num_codevectors_per_group
    flops += 2.0 * t * channels * g * v  # quantizer logits
    flops += 2.0 * t * g * v * (cfg.codevector_dim // g)  # one-hot @ codebook (a dense matmul in our code)
    flops += 2.0 * t * cfg.codevector_dim * cfg.proj_codevector_dim  # project_q
    flops += 2.0 * t * h * cfg.proj_codevector_dim  # project_hid
    flops += 2.0 * t * t * cfg.proj_codevector_dim  # all-pairs cosine matrix (negatives are gathered from it)
  elif head == "ctc":
    flops += 2.0 * t * h * cfg.vocab_size
  return batch * flops


def train_flops(cfg: ModelConfig, num_samples: int, batch: int, head: str = "pretraining") -> float:
  """FLOPs of one training step (forward + backward = 3x forward), without remat recomputation."""
  return 3.0 * forward_flops(cfg, num_samples, batch, head)


@functools.cache
def measured_cpu_peak(n: int = 1024, repeats: int = 20) -> float:
  """This host's measured fp32 matmul FLOP/s over all its cores (the best of `repeats` n x n matmuls)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  cpu = jax.devices("cpu")[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


def peak_flops(device, dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from). CPU: measured; else the datasheet table."""
  if device.platform == "cpu":
    # Every forced CPU "device" shares the same cores: the host's peak is split between them.
    return measured_cpu_peak() / max(len(device.client.local_devices()), 1), "measured fp32 matmul"
  kind = device.device_kind
  matches = [name for name in PEAK_FLOPS if kind.startswith(name)]
  if matches:
    name = max(matches, key=len)  # "TPU v5 lite" before "TPU v5"
    peaks = PEAK_FLOPS[name]
    return peaks.get(dtype, peaks["bfloat16"]), f"datasheet ({name}, {dtype})"
  return float("nan"), f"unknown device kind {kind!r} (add it to w2v2_jax.models.flops.PEAK_FLOPS)"
