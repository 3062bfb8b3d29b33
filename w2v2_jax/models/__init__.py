"""wav2vec 2.0 models and their configuration presets."""

from w2v2_jax.models.config import ModelConfig, preset
from w2v2_jax.models.quantizer import gumbel_temperature
from w2v2_jax.models.wav2vec2 import (
  EncoderOutput,
  PreTrainingOutput,
  Wav2Vec2ForCTC,
  Wav2Vec2ForPreTraining,
  Wav2Vec2Model,
  frame_mask_from_lengths,
)

__all__ = [
  "ModelConfig",
  "preset",
  "gumbel_temperature",
  "EncoderOutput",
  "PreTrainingOutput",
  "Wav2Vec2ForCTC",
  "Wav2Vec2ForPreTraining",
  "Wav2Vec2Model",
  "frame_mask_from_lengths",
]
