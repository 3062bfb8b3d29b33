"""Reference curves: the published (or measured) values a run's metric should follow, with a band.

An experiment carries them as `config.reference`, a dict of named curves:

  c.reference = {"fairseq_base": dict(metric="valid/accuracy", source="...", points=((400_000, 0.62, 0.04),))}

Each point is (update, value, half-width of the band). Between two points the value and the band are
interpolated linearly; outside the first and last update a curve says nothing. A curve measured with one
learning-rate schedule can say so (`schedule_steps=800`): it then applies only to runs whose schedule
(optim.total_steps, or num_train_steps when that is -1) is as long. w2v2-plot draws the
curves over the run's own, and the trainer warns once, in one line, when an evaluation falls outside a
band at an update the curve covers.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Curve:
  name: str
  metric: str  # a logged tag: "valid/accuracy", "train/code_perplexity", ...
  source: str  # where the figures come from
  points: tuple[tuple[int, float, float], ...]  # (update, value, band half-width), updates rising

  def band(self, step: int) -> tuple[float, float, float] | None:
    """(value, low, high) at `step`, or None outside the updates the curve covers."""
    steps = [p[0] for p in self.points]
    if not steps[0] <= step <= steps[-1]:
      return None
    value = float(np.interp(step, steps, [p[1] for p in self.points]))
    half = float(np.interp(step, steps, [p[2] for p in self.points]))
    return value, value - half, value + half


def schedule_steps(config) -> int:
  """The updates the run's learning-rate schedule spans."""
  total = (config.get("optim") or {}).get("total_steps", -1)
  return int(total) if total and total > 0 else int(config.get("num_train_steps", 0))


def curves(config) -> list[Curve]:
  """The experiment's reference curves (config.reference) that apply to its schedule, checked: one line
  names a bad entry."""
  out = []
  for name, c in (config.get("reference") or {}).items():
    if c.get("schedule_steps") and int(c["schedule_steps"]) != schedule_steps(config):
      continue
    where = f"config.reference.{name}"
    missing = {"metric", "source", "points"} - set(c)
    if missing:
      raise ValueError(f"{where}: needs {sorted(missing)} (metric, source, points of (update, value, half-width))")
    if not c["points"] or any(len(p) != 3 for p in c["points"]):
      raise ValueError(f"{where}.points: give (update, value, half-width) triples, e.g. ((400000, 0.62, 0.04),)")
    points = tuple((int(p[0]), float(p[1]), float(p[2])) for p in c["points"])
    if any(a[0] >= b[0] for a, b in zip(points, points[1:])) or any(p[2] < 0 for p in points):
      raise ValueError(f"{where}.points: the updates must rise and the half-widths be >= 0")
    out.append(Curve(name, str(c["metric"]), str(c["source"]), points))
  return out


class Check:
  """Compares each evaluation with the curves; warns once per run, at the first value outside a band."""

  def __init__(self, reference_curves: list[Curve]):
    self.curves, self.warned = reference_curves, False

  def update(self, step: int, scalars: dict) -> str | None:
    """`scalars`: tag -> value ("valid/accuracy": 0.41, ...). The one-line warning, the first time only."""
    if self.warned:
      return None
    for curve in self.curves:
      band = curve.band(step)
      if band is None or curve.metric not in scalars:
        continue
      value, low, high = band
      got = float(scalars[curve.metric])
      if not low <= got <= high:
        self.warned = True
        return (
          f"reference: {curve.metric} {got:.3f} at update {step} is outside the band {low:.3f}-{high:.3f} "
          f"of {curve.name} ({value:.3f}; {curve.source}); see docs/faq.md (is my curve normal?)"
        )
    return None
