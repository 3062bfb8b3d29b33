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


def optimizer(cfg) -> optax.GradientTransformation:
  """AdamW with fairseq's betas/eps/decay over every parameter; optional global-norm clipping."""
  schedule = learning_rate(cfg.lr, cfg.warmup_steps, cfg.total_steps, cfg.end_lr, cfg.power)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)
