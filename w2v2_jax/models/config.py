"""Model configuration: one frozen dataclass, field names shared with HF's Wav2Vec2Config."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# jax.checkpoint_policies that are policies themselves (the others build one from names)
REMAT_POLICIES = (
  "none",
  "full",
  "nothing_saveable",
  "everything_saveable",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "checkpoint_dots",
  "checkpoint_dots_with_no_batch_dims",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a wav2vec 2.0 model. Defaults are BASE (fairseq wav2vec2_base_librispeech)."""

  # Feature encoder (7-layer CNN).
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_extract_norm: str = "group"  # "group" (GroupNorm on conv 0) or "layer" (LayerNorm after every conv)
  feature_grad_mult: float = 0.1  # scales gradients into the feature encoder; 0 freezes it
  # Transformer.
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  do_stable_layer_norm: bool = False  # False: post-LN (BASE, LARGE LS-960); True: pre-LN (LV60, XLS-R)
  layer_norm_eps: float = 1e-5
  # Dropouts (fairseq names in comments).
  hidden_dropout: float = 0.1  # dropout
  attention_dropout: float = 0.1  # attention_dropout
  activation_dropout: float = 0.0  # activation_dropout
  feat_proj_dropout: float = 0.1  # dropout_input
  feat_quantizer_dropout: float = 0.1  # dropout_features
  layerdrop: float = 0.05  # encoder_layerdrop
  # Quantizer and pre-training heads.
  num_codevector_groups: int = 2
  num_codevectors_per_group: int = 320
  codevector_dim: int = 256  # fairseq final_dim (= vq dim)
  proj_codevector_dim: int = 256
  # CTC head (0 = none).
  vocab_size: int = 0
  final_dropout: float = 0.0
  # Numerics and memory.
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat_policy: str = "none"  # none | full | a jax.checkpoint_policies name: what a layer keeps for the backward
  scan_layers: bool = False  # one nn.scan over the stacked layers (compile time flat in depth), else a loop
  kernels: str = "auto"  # auto | xla | cpu | gpu_flash: platform kernels, resolved when built (models/kernels/)

  def __post_init__(self):
    n = len(self.conv_dim)
    if len(self.conv_kernel) != n or len(self.conv_stride) != n:
      raise ValueError(
        f"conv_dim, conv_kernel and conv_stride must have equal lengths, got "
        f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}"
      )
    if self.feat_extract_norm not in ("group", "layer"):
      raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
      )
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_conv_pos_embedding_groups "
        f"{self.num_conv_pos_embedding_groups}"
      )
    if self.codevector_dim % self.num_codevector_groups:
      raise ValueError(
        f"codevector_dim {self.codevector_dim} is not divisible by num_codevector_groups {self.num_codevector_groups}"
      )
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {', '.join(REMAT_POLICIES)}, got {self.remat_policy!r}")
    if self.kernels not in ("auto", "xla", "cpu", "gpu_flash"):
      raise ValueError(f"kernels must be one of auto, xla, cpu, gpu_flash, got {self.kernels!r}")
    if self.kernels == "gpu_flash" and self.attention_dropout >= 1.0:
      raise ValueError("kernels='gpu_flash' needs attention_dropout < 1")
    if not 0.0 <= self.feature_grad_mult:
      raise ValueError(f"feature_grad_mult must be >= 0, got {self.feature_grad_mult}")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def receptive_field(self) -> int:
    """Samples seen by one output frame of the feature encoder (400 for the standard CNN)."""
    field = 1
    for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
      field = (field - 1) * s + k
    return field

  def num_frames(self, num_samples):
    """Feature-encoder output length: floor((L - k) / s) + 1 per conv (works on ints and arrays)."""
    for k, s in zip(self.conv_kernel, self.conv_stride):
      num_samples = (num_samples - k) // s + 1
    return num_samples

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    d = dict(d)
    if "attention_impl" in d:  # checkpoints written before model.kernels: xla -> auto, flash -> gpu_flash
      d.setdefault("kernels", "gpu_flash" if d.pop("attention_impl") == "flash" else "auto")
    if "remat" in d:  # checkpoints written before model.remat_policy: a bool
      d.setdefault("remat_policy", "full" if d.pop("remat") else "none")
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(fields)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)


def base() -> ModelConfig:
  """BASE: 12 x 768, post-LN, group-norm extractor (95,044,608 parameters with the pre-training heads)."""
  return ModelConfig()


def large() -> ModelConfig:
  """LARGE as pre-trained on LS-960: 24 x 1024, post-LN, group-norm extractor, no conv bias."""
  return ModelConfig(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    codevector_dim=768,
    proj_codevector_dim=768,
    layerdrop=0.2,
  )


def large_lv60() -> ModelConfig:
  """LARGE-LV60 (wav2vec2_large_librivox): pre-LN, layer-norm extractor, conv bias, no dropout.

  317,390,592 parameters with the pre-training heads.
  """
  return large().replace(
    do_stable_layer_norm=True,
    feat_extract_norm="layer",
    conv_bias=True,
    feature_grad_mult=1.0,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    feat_quantizer_dropout=0.0,
    layerdrop=0.0,
  )


def xlsr_300m() -> ModelConfig:
  """XLS-R 300M: the LV60 shape with XLS-R's dropouts."""
  return large_lv60().replace(
    hidden_dropout=0.1, attention_dropout=0.1, feat_proj_dropout=0.1, feat_quantizer_dropout=0.1, layerdrop=0.1
  )


def xlsr_1b() -> ModelConfig:
  """XLS-R 1B: 48 x 1280, FFN 5120."""
  return xlsr_300m().replace(
    hidden_size=1280, num_hidden_layers=48, intermediate_size=5120, codevector_dim=1024, proj_codevector_dim=1024
  )


def xlsr_2b() -> ModelConfig:
  """XLS-R 2B: 48 x 1920, FFN 7680."""
  return xlsr_300m().replace(
    hidden_size=1920, num_hidden_layers=48, intermediate_size=7680, codevector_dim=1024, proj_codevector_dim=1024
  )


def tiny(stable_layer_norm: bool = False) -> ModelConfig:
  """A few-thousand-parameter model with the real CNN strides, for tests and the CPU demo."""
  cfg = ModelConfig(
    conv_dim=(32,) * 7,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    num_codevectors_per_group=32,
    codevector_dim=32,
    proj_codevector_dim=32,
  )
  if stable_layer_norm:
    cfg = cfg.replace(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True, feature_grad_mult=1.0)
  return cfg


def small() -> ModelConfig:
  """A 4-layer x 256 model on a 128-channel CNN, between tiny and BASE (FLOPs tests, CPU trials)."""
  return ModelConfig(
    conv_dim=(128,) * 7,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    num_conv_pos_embeddings=32,
    num_conv_pos_embedding_groups=8,
    num_codevectors_per_group=64,
    codevector_dim=64,
    proj_codevector_dim=64,
    layerdrop=0.0,
  )


PRESETS = {
  "base": base,
  "large": large,
  "large_lv60": large_lv60,
  "xlsr_300m": xlsr_300m,
  "xlsr_1b": xlsr_1b,
  "xlsr_2b": xlsr_2b,
  "tiny": tiny,
  "small": small,
}


def preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]()
