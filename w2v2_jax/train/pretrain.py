"""Pre-training as a task: the contrastive + diversity loss with masks and negatives drawn in-graph."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from w2v2_jax.data.pipeline import waveform
from w2v2_jax.models import objectives
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.init import build
from w2v2_jax.models.quantizer import gumbel_temperature
from w2v2_jax.train import health, initial


def make_loss_fn(cfg: ModelConfig, obj: objectives.ObjectiveConfig):
  """Returns loss_fn(params, audio, lengths, key, temperature, deterministic) -> (loss, metrics)."""
  model = build(cfg, "pretraining")

  def loss_fn(params, audio, lengths, key, temperature, deterministic: bool = False):
    k_mask, k_neg, k_drop, k_gumbel, k_layer = jax.random.split(key, 5)
    num_frames = cfg.num_frames(audio.shape[1])
    frame_lengths = cfg.num_frames(lengths) if lengths is not None else jnp.full((audio.shape[0],), num_frames)
    mask = objectives.compute_span_mask(
      k_mask, frame_lengths, num_frames, obj.mask_prob, obj.mask_length, obj.min_masks, obj.require_same_masks
    )
    negatives = objectives.sample_negatives(k_neg, mask, obj.num_negatives)
    out = model.apply(
      {"params": params},
      audio,
      lengths,
      mask,
      temperature,
      deterministic,
      rngs={"dropout": k_drop, "gumbel": k_gumbel, "layerdrop": k_layer},
    )
    return objectives.pretraining_loss(out, mask, negatives, obj)

  return loss_fn


def objective_config(config) -> objectives.ObjectiveConfig:
  fields = objectives.ObjectiveConfig.__dataclass_fields__
  return objectives.ObjectiveConfig(**{k: v for k, v in config.objective.items() if k in fields})


class PretrainingTask:
  """Self-supervised pre-training (config.task="pretrain"): nothing frozen, no labels, no extras."""

  kind = "pretraining"
  whole_utterances = False  # long utterances are cropped to data.max_sample_size

  def __init__(self, config, directory=None, workdir=None):
    del directory, workdir  # pre-training derives nothing from the data or the run
    self.config = config
    self.model_config = ModelConfig.from_dict(config.model.to_dict())
    self.objective = objective_config(config)

  def validate(self, shortest_frames: int) -> None:
    obj = self.objective
    if shortest_frames < obj.mask_length + 1 or shortest_frames < obj.num_negatives // 4:
      raise ValueError(
        f"config.data.min_sample_size={self.config.data.min_sample_size}: {shortest_frames} frames in the "
        f"shortest bucket cannot hold mask spans of config.objective.mask_length={obj.mask_length} and "
        f"draw config.objective.num_negatives={obj.num_negatives}"
      )

  def labels(self, directory, split):
    del directory, split
    return None

  def loss_fn(self, model_cfg: ModelConfig):
    """loss(params, batch, key, step, deterministic) -> (loss, metrics with the masked frames in "count")."""
    loss_fn = make_loss_fn(model_cfg, self.objective)
    latent_temp, normalize = tuple(self.config.objective.latent_temp), self.config.data.normalize

    def loss(params, batch, key, step, deterministic=False):
      temperature = gumbel_temperature(step, *latent_temp)
      audio = waveform(batch["audio"], batch["lengths"], normalize)
      value, metrics = loss_fn(params, audio, batch["lengths"], key, temperature, deterministic)
      return value, dict(metrics, count=metrics["num_masked"], temperature=temperature)

    return loss

  def is_frozen(self, path, step):
    del path, step
    return False

  def initial_params(self, key, shardings=None):
    return initial.initial_params(self.model_config, self.kind, self.config, key, shardings)

  def scorer(self, final: bool):
    del final
    return _NoScorer()

  def train_line(self, m: dict) -> str:
    ppl = "%.1f/%.1f" % (m["prob_perplexity"], m["code_perplexity"])
    return "acc %.3f ppl %s temp %.3f" % (m["accuracy"], ppl, m["temperature"])

  def eval_line(self, m: dict) -> str:
    return "acc %.3f" % m["accuracy"]

  def checkpoint_extras(self) -> dict:
    return {}

  def health_monitor(self):
    cfg, c = self.model_config, self.config
    run = health.Run(
      num_negatives=self.objective.num_negatives,
      codebook_size=cfg.num_codevector_groups * cfg.num_codevectors_per_group,
      warmup_steps=c.optim.get("warmup_steps", 0),
      num_train_steps=c.num_train_steps,
    )
    return health.Monitor(health.PRETRAINING, run, health.Thresholds.from_config(c.get("health")))


class _NoScorer:
  """Pre-training's evaluation is the mean of its per-batch scalars."""

  def add(self, batch, outputs):
    del batch
    return outputs

  def result(self) -> dict:
    return {}
