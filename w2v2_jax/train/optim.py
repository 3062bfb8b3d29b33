"""fairseq's optimiser for wav2vec 2.0: Adam with decoupled weight decay and polynomial decay."""

from __future__ import annotations

import optax


def learning_rate(lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0, power: float = 1.0):
  """Linear warm-up to `lr`, then polynomial decay to `end_lr` at `total_steps` (fairseq).

  As fairseq's polynomial_decay, update k < warmup uses lr * (k + 1) / warmup: never zero.
  """
  warmup = optax.linear_schedule(lr / max(warmup_steps, 1), lr, max(warmup_steps - 1, 1))
  decay = optax.polynomial_schedule(lr, end_lr, power, max(total_steps - warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [warmup_steps])


def tri_stage(
  lr: float, total_steps: int, phase_ratio=(0.1, 0.4, 0.5), init_scale: float = 0.01, final_scale: float = 0.05
):
  """fairseq's tri_stage: linear warm-up from init_scale*lr, hold lr, exponential decay to final_scale*lr."""
  warm, hold = (int(r * total_steps) for r in phase_ratio[:2])
  decay = max(total_steps - warm - hold, 1)
  return optax.join_schedules(
    [
      optax.linear_schedule(init_scale * lr, lr, max(warm, 1)),
      optax.constant_schedule(lr),
      optax.exponential_decay(lr, decay, final_scale),  # lr * final_scale ** (k / decay)
      optax.constant_schedule(final_scale * lr),
    ],
    [warm, warm + hold, warm + hold + decay],
  )


def schedule(cfg, num_train_steps: int):
  """The lr schedule named by cfg.schedule: "polynomial" (pre-training) or "tri_stage" (fine-tuning),
  over cfg.total_steps updates (-1: the run's num_train_steps)."""
  total = cfg.total_steps if cfg.total_steps >= 0 else num_train_steps
  if cfg.get("schedule", "polynomial") == "tri_stage":
    return tri_stage(cfg.lr, total, tuple(cfg.phase_ratio), cfg.init_scale, cfg.final_scale)
  return learning_rate(cfg.lr, cfg.warmup_steps, total, cfg.end_lr, cfg.power)


def optimizer(cfg, num_train_steps: int) -> optax.GradientTransformation:
  """AdamW with fairseq's betas/eps/decay over every parameter; optional global-norm clipping."""
  schedule_fn = schedule(cfg, num_train_steps)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts.append(optax.adamw(schedule_fn, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)
