"""Alarms for the known ways a wav2vec 2.0 pre-training run fails, read from the logged metrics.

Each detector looks at the series of logged training metrics so far and returns a one-line
diagnosis with the remedy from docs/faq.md, or None. The loop logs an alarm once, when it first
fires, writes health/<name> (1 while it holds, else 0) to TensorBoard at every log step, and with
config.health.stop_on_collapse ends the run on a collapse alarm. The metrics are global, so every
process reaches the same decision at the same step.
"""

from __future__ import annotations

import dataclasses
import math

# What a diagnosis ends with: where its remedies are spelt out.
FAQ = "docs/faq.md"
COLLAPSE = ("at_chance", "codebook_collapse", "trivial_solution")  # what stop_on_collapse stops on


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """config.health: when each alarm fires (these defaults are config.health's; meanings in docs/faq.md)."""

  chance_margin: float = 0.05  # loss within this of ln(K + 1) ...
  chance_accuracy: float = 3.0  # ... and accuracy below this many times chance, 1 / (K + 1)
  chance_wait_warmups: float = 10.0  # not before max(this x warm-up, chance_wait_fraction x updates)
  chance_wait_fraction: float = 0.25
  codebook_fraction: float = 0.1  # prob or code perplexity below this share of G x V ...
  codebook_drop: float = 0.5  # ... or below this share of its own peak, falling over the last logs
  codebook_falling_logs: int = 4
  trivial_accuracy: float = 0.95  # accuracy above this with code perplexity below trivial_perplexity
  trivial_perplexity: float = 2.0
  min_grad_norm: float = 1e-6  # a gradient norm below this after the warm-up
  nonfinite_streak: int = 5  # non-finite steps in a row (skipped updates)

  @classmethod
  def from_config(cls, health) -> Thresholds:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (health or {}).items() if k in fields})


@dataclasses.dataclass(frozen=True)
class Run:
  """What the detectors need to know of the run besides its metrics."""

  num_negatives: int
  codebook_size: int  # G x V
  warmup_steps: int
  num_train_steps: int


def at_chance(series, run: Run, t: Thresholds) -> str | None:
  step, m = series[-1]
  chance = math.log(run.num_negatives + 1)
  wait = max(t.chance_wait_warmups * run.warmup_steps, t.chance_wait_fraction * run.num_train_steps)
  if step < wait or "accuracy" not in m:
    return None
  if abs(m["contrastive"] - chance) <= t.chance_margin and m["accuracy"] < t.chance_accuracy / (run.num_negatives + 1):
    return (
      f"the contrastive loss {m['contrastive']:.3f} sits at chance, ln({run.num_negatives + 1}) = {chance:.3f}, "
      f"with accuracy {m['accuracy']:.4f} at update {step}: the CNN is not learning features smooth in time; "
      f"raise model.feature_grad_mult towards 1 and lower objective.feature_penalty_weight ({FAQ})"
    )
  return None


def codebook_collapse(series, run: Run, t: Thresholds) -> str | None:
  step, m = series[-1]
  if "prob_perplexity" not in m or step < run.warmup_steps:
    return None
  for name in ("prob_perplexity", "code_perplexity"):
    now = m[name]
    if now < t.codebook_fraction * run.codebook_size:
      why = f"{now:.1f} is below {t.codebook_fraction:g} of the {run.codebook_size} codewords"
    else:
      values = [x[name] for _, x in series if name in x]
      recent = values[-t.codebook_falling_logs :]
      falling = len(recent) == t.codebook_falling_logs and all(a > b for a, b in zip(recent, recent[1:]))
      if not (falling and now < t.codebook_drop * max(values)):
        continue
      why = f"{now:.1f} has fallen to {now / max(values):.2f} of its peak {max(values):.1f} and is still falling"
    return (
      f"codebook collapse at update {step}: {name.replace('_', ' ')} {why}; raise "
      f"objective.diversity_loss_weight, keep the Gumbel temperature high for longer (objective.latent_temp) "
      f"or lower optim.lr ({FAQ})"
    )
  return None


def trivial_solution(series, run: Run, t: Thresholds) -> str | None:
  del run
  step, m = series[-1]
  if "accuracy" in m and m["accuracy"] > t.trivial_accuracy and m["code_perplexity"] < t.trivial_perplexity:
    return (
      f"a trivial solution at update {step}: accuracy {m['accuracy']:.3f} with code perplexity "
      f"{m['code_perplexity']:.2f}: every frame maps to the same code, so the targets are easy and say "
      f"nothing; raise objective.diversity_loss_weight or lower optim.lr ({FAQ})"
    )
  return None


def vanishing_gradient(series, run: Run, t: Thresholds) -> str | None:
  step, m = series[-1]
  if step > run.warmup_steps and m["grad_norm"] < t.min_grad_norm:
    return (
      f"the gradient norm is {m['grad_norm']:.2e} at update {step}: nothing is learning; check that the "
      f"parameters are not all frozen and that the loss depends on them, and raise optim.lr ({FAQ})"
    )
  return None


def nonfinite_streak(series, run: Run, t: Thresholds) -> str | None:
  del run
  step, m = series[-1]
  if m["skipped_in_a_row"] >= t.nonfinite_streak:
    return (
      f"{int(m['skipped_in_a_row'])} non-finite steps in a row at update {step}: lower optim.lr, lengthen "
      f"optim.warmup_steps or set optim.clip_norm ({FAQ})"
    )
  return None


PRETRAINING = (at_chance, codebook_collapse, trivial_solution, vanishing_gradient, nonfinite_streak)
ANY_TASK = (vanishing_gradient, nonfinite_streak)


class Monitor:
  """Runs the detectors over the growing series of logged metrics."""

  def __init__(self, detectors, run: Run, thresholds: Thresholds):
    self.detectors, self.run, self.thresholds = detectors, run, thresholds
    self.series, self.raised = [], set()

  def update(self, step: int, metrics: dict) -> tuple[dict, list[str]]:
    """({health/<name>: 0 or 1} for every detector, the diagnoses of alarms that fire for the first time)."""
    self.series.append((step, metrics))
    scalars, new = {}, []
    for detect in self.detectors:
      diagnosis = detect(self.series, self.run, self.thresholds)
      scalars[f"health/{detect.__name__}"] = float(diagnosis is not None)
      if diagnosis is not None and detect.__name__ not in self.raised:
        self.raised.add(detect.__name__)
        new.append(f"health alarm {detect.__name__}: {diagnosis}")
    return scalars, new

  def collapsed(self, scalars: dict) -> bool:
    return any(scalars.get(f"health/{name}", 0.0) for name in COLLAPSE)
