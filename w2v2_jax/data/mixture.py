"""Several prepared data dirs (languages, corpora) as one training split, each drawn at its share.

A source's share of an epoch's utterances is XLS-R's (Conneau et al. 2020, Babu et al. 2021)
    p_l = q_l^a / sum_k q_k^a,   q_l = h_l / sum_k h_k,
with h_l the hours of audio the epoch plan can use from source l's split (its utterances of at least
min_sample_size) and a = data.sampling_alpha (1: as the sources come, 0: uniform, 0.5: XLS-R), or
p_l = w_l / sum_k w_k for explicit weights. An epoch holds as many utterances as the sources have
together, in whole batches per length bucket (nothing left over, so the same batches every epoch);
source l fills p_l of them, drawing r_l = draws / utterances per utterance: each of its utterances
floor(r_l) times and a fresh random subset of them once more. fairseq's ResamplingDataset also draws
exact per-language counts, but with replacement; these draws reach every utterance of an upsampled
source every epoch.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from w2v2_jax.data import records

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a TensorBoard tag and a metric's prefix


def parse_sources(spec: str) -> tuple[tuple[str, str], ...]:
  """`name=dir,name=dir,...` (config.data.sources) -> ((name, dir), ...); a dir may hold `=`, not `,`."""
  pairs = []
  for entry in (e.strip() for e in spec.split(",")):
    name, sep, directory = entry.partition("=")
    name, directory = name.strip(), directory.strip()
    if not sep or not _NAME.match(name) or not directory:
      raise ValueError(
        f"config.data.sources={spec!r}: entry {entry!r} is not NAME=DATA_DIR (NAME of letters, digits, "
        "'_', '.', '-'; entries separated by ','), e.g. en=gs://BUCKET/en,fr=gs://BUCKET/fr"
      )
    if name in dict(pairs):
      raise ValueError(f"config.data.sources={spec!r}: the name {name!r} appears twice; give each source its own")
    pairs.append((name, directory))
  return tuple(pairs)


def parse_weights(spec: str, names: tuple[str, ...]) -> tuple[float, ...]:
  """`name=weight,...` (config.data.source_weights) in the order of `names`; () for an empty spec."""
  if not spec:
    return ()
  weights = {}
  for entry in (e.strip() for e in spec.split(",")):
    name, _, value = entry.partition("=")
    try:
      weights[name.strip()] = float(value)
    except ValueError:
      raise ValueError(f"config.data.source_weights={spec!r}: entry {entry!r} is not NAME=NUMBER") from None
  if sorted(weights) != sorted(names) or any(w < 0 or not np.isfinite(w) for w in weights.values()):
    raise ValueError(
      f"config.data.source_weights={spec!r}: give every source of config.data.sources ({', '.join(names)}) "
      "exactly one weight >= 0"
    )
  if not sum(weights.values()) > 0:
    raise ValueError(f"config.data.source_weights={spec!r}: at least one weight must be > 0")
  return tuple(weights[n] for n in names)


def check_alpha(alpha: float) -> float:
  if not (np.isfinite(alpha) and alpha >= 0):
    raise ValueError(f"config.data.sampling_alpha={alpha}: use a number >= 0 (1: as the sources come, 0.5: XLS-R)")
  return float(alpha)


def target_shares(hours, alpha: float, weights=()) -> np.ndarray:
  """Each source's share of an epoch: proportional to `weights` if given, else to (hours share)^alpha."""
  if len(weights):
    w = np.asarray(weights, np.float64)
    return w / w.sum()
  q = np.asarray(hours, np.float64) / np.sum(hours)
  p = np.where(q > 0, q ** float(alpha), 0.0)
  return p / p.sum()


def _largest_remainder(targets: np.ndarray, total: int, allowed: np.ndarray | None = None) -> np.ndarray:
  """Integers as near `targets` (which sum to `total`) as can be that sum to `total`: floors, plus one
  for the largest fractional parts (ties: the earlier entry); an entry not `allowed` stays 0."""
  targets = np.where(allowed, targets, 0.0) if allowed is not None else np.asarray(targets, np.float64)
  base = np.floor(targets + 1e-9).astype(np.int64)  # a hair under a whole number (rounding) is that number
  fraction = np.where(allowed, targets - base, -np.inf) if allowed is not None else targets - base
  extra = total - int(base.sum())
  order = np.argsort(-fraction, kind="stable")
  if extra >= 0:
    base[order[:extra]] += 1
  else:  # the targets' sum was a hair over `total`
    base[[i for i in order[::-1] if base[i] > 0][:-extra]] -= 1
  return base


def _whole_batches(ideal: np.ndarray, support: np.ndarray, batch: int, batches: int) -> np.ndarray:
  """Draws per (source, bucket) near `ideal` [S, B] that fill `batches` whole batches: each bucket a
  whole number of them (a remainder left out would favour the sources of some buckets), and each
  source's total its share of them as exactly as whole draws allow."""
  columns = ideal.sum(0)
  per_bucket = batch * _largest_remainder(columns * (batches / columns.sum()), batches, columns > 0)
  rows = _largest_remainder(ideal.sum(1) * (per_bucket.sum() / ideal.sum()), int(per_bucket.sum()))
  scaled = ideal * np.divide(per_bucket, columns, out=np.zeros_like(columns), where=columns > 0)
  draws = np.stack(
    [_largest_remainder(scaled[:, b], int(per_bucket[b]), support[:, b]) for b in range(ideal.shape[1])], 1
  )
  while True:  # move single draws within a bucket, from a source over its total to one under it
    excess = draws.sum(1) - rows
    pairs = ((i, j) for i in np.argsort(-excess) if excess[i] > 0 for j in np.argsort(excess) if excess[j] < 0)
    for i, j in pairs:
      movable = (draws[i] > 0) & support[j]
      if movable.any():  # the bucket where i is most over its ideal relative to j
        gain = np.where(movable, (draws[i] - scaled[i]) - (draws[j] - scaled[j]), -np.inf)
        b = int(np.argmax(gain))
        draws[i, b] -= 1
        draws[j, b] += 1
        break
    else:
      return draws


@dataclasses.dataclass(frozen=True)
class Draws:
  """How many times an epoch draws from each (source, bucket) cell, and each record's cell."""

  names: tuple[str, ...]
  source: np.ndarray  # int32 [N]: each record's source
  cell: np.ndarray  # int32 [N]: source * buckets + bucket, -1 for a record the plan leaves out
  hours: np.ndarray  # [S] usable hours per source
  utterances: np.ndarray  # [S] usable utterances per source
  shares: np.ndarray  # [S] target share of the epoch's utterances
  per_cell: np.ndarray  # int64 [S, B] draws per epoch
  rule: str  # how the shares were set, for the log

  @property
  def repeats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per cell (flat): the draws every record gets, and how many records get one more."""
    usable = np.bincount(self.cell[self.cell >= 0], minlength=self.per_cell.size)
    draws = self.per_cell.ravel()
    base = draws // np.maximum(usable, 1)
    return base, draws - base * usable

  @classmethod
  def plan(cls, names, source, bucket, keep, num_samples, num_buckets, global_batch, alpha, weights) -> Draws:
    s = len(names)
    source = np.asarray(source, np.int32)
    cell = np.where(keep, source * num_buckets + bucket, -1).astype(np.int32)
    usable = np.bincount(cell[keep], minlength=s * num_buckets).reshape(s, num_buckets)
    utterances = usable.sum(1)
    empty = [n for n, u in zip(names, utterances) if u == 0]
    if empty:
      raise ValueError(
        f"config.data.sources: {', '.join(empty)} has no utterance the plan can use (>= data.min_sample_size)"
      )
    hours = np.bincount(source[keep], weights=num_samples[keep], minlength=s) / 16000 / 3600
    shares = target_shares(hours, alpha, weights)
    # An epoch: as many whole batches as the sources' usable utterances fill; source l draws its share of
    # them, at the same rate from each of its buckets (as nearly as whole batches per bucket allow).
    ideal = usable * (shares * keep.sum() / utterances)[:, None]
    per_cell = _whole_batches(ideal, usable > 0, global_batch, int(keep.sum()) // global_batch)
    rule = f"data.source_weights={','.join(f'{w:g}' for w in weights)}" if len(weights) else f"alpha {alpha:g} on hours"
    return cls(tuple(names), source, cell, hours, utterances, shares, per_cell, rule)

  def resample(self, order: np.ndarray, rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    """The epoch's draws from the permuted records `order`: a cell with d draws of its u records takes
    each d // u times and the first d % u of them in `order` once more; shuffled again, so that an
    utterance's copies spread over the epoch."""
    cell = self.cell[order]
    order, cell = order[cell >= 0], cell[cell >= 0]
    base, extra = self.repeats
    by_cell = np.argsort(cell, kind="stable")
    rank = np.empty_like(by_cell)
    rank[by_cell] = np.arange(len(cell)) - np.searchsorted(cell[by_cell], cell[by_cell], side="left")
    drawn = np.repeat(order, base[cell] + (rank < extra[cell]))
    return drawn[rng.permutation(len(drawn))] if shuffle else drawn

  def describe(self) -> str:
    """One line for the log: each source's usable hours and target share, and how often an utterance is drawn."""
    rate = self.per_cell.sum(1) / self.utterances
    size = lambda h: f"{h:.1f} h" if h >= 1 else f"{60 * h:.1f} min"  # noqa: E731
    parts = [f"{n} {size(h)} -> {p:.1%} (x{r:.2f})" for n, h, p, r in zip(self.names, self.hours, self.shares, rate)]
    return f"mixture ({self.rule}): " + ", ".join(parts)


def load_split(sources: tuple[tuple[str, str], ...], split: str) -> tuple[records.SplitIndex, np.ndarray]:
  """The sources' `split` as one index (records of the first source first) and each record's source."""
  indexes = [records.load_split(directory, split) for _, directory in sources]
  source = np.concatenate([np.full(len(ix.num_samples), k, np.int32) for k, ix in enumerate(indexes)])
  return records.concatenate(indexes), source
