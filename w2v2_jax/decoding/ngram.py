"""A word n-gram language model in ARPA format, estimated from text, for KenLM beam-search decoding.

KenLM's estimator (lmplz) is a C++ binary with Boost that pip cannot install; its Python module
only reads models. This writes the same kind of model: interpolated Kneser-Ney with one discount
per order from the counts of counts (D = n1 / (n1 + 2 n2)), lower orders on continuation counts,
stored as ARPA backoff entries (the probability of a seen n-gram is the interpolated one; the
backoff weight of a context is its interpolation weight), so `kenlm.Model(path)` scores exactly
the interpolated model.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterable

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def _discount(counts: dict) -> float:
  hist = collections.Counter(c for c in counts.values() if c <= 2)
  n1, n2 = hist[1], hist[2]
  return n1 / (n1 + 2 * n2) if n1 and n2 else 0.5


def estimate(sentences: Iterable[str], order: int = 4) -> list[dict]:
  """Sentences (words separated by spaces) -> per order n (index n-1), {ngram tuple: (log10 p, log10 backoff)}."""
  if order < 1:
    raise ValueError(f"n-gram order must be >= 1, got {order}")
  raw = collections.Counter()
  n_sentences = 0
  for sentence in sentences:
    words = [BOS] + sentence.split() + [EOS]
    n_sentences += 1
    for n in range(1, order + 1):
      for i in range(max(0, 1 if n == 1 else 0), len(words) - n + 1):
        raw[tuple(words[i : i + n])] += 1
  if not n_sentences:
    raise ValueError("no sentences to estimate an n-gram model from")
  # Kneser-Ney counts: raw for the top order and for n-grams that start a sentence; otherwise the
  # number of distinct words seen before the n-gram.
  left = collections.Counter(g[1:] for g in raw if len(g) > 1)
  counts = [dict() for _ in range(order)]
  for g, c in raw.items():
    n = len(g)
    counts[n - 1][g] = c if n == order or g[0] == BOS else left.get(g, c)
  vocab = sorted({g[0] for g in counts[0]} | {UNK})  # what can be predicted: not <s>
  probs = [dict() for _ in range(order)]
  gammas = [dict() for _ in range(order)]
  for n in range(1, order + 1):
    table = counts[n - 1]
    d = _discount(table)
    totals, types = collections.Counter(), collections.Counter()
    for g, c in table.items():
      totals[g[:-1]] += c
      types[g[:-1]] += 1
    for h in totals:
      gammas[n - 1][h] = d * types[h] / totals[h]
    for g, c in table.items():
      h = g[:-1]
      lower = 1.0 / len(vocab) if n == 1 else probs[n - 2][g[1:]]
      probs[n - 1][g] = max(c - d, 0.0) / totals[h] + gammas[n - 1][h] * lower
  # the unigram table also holds <unk> (interpolation mass only) and <s> (never predicted)
  uniform = gammas[0][()] / len(vocab)
  probs[0].setdefault((UNK,), uniform)
  out = []
  for n in range(1, order + 1):
    table = {}
    for g, p in probs[n - 1].items():
      bo = gammas[n].get(g) if n < order else None
      table[g] = (math.log10(p), math.log10(bo) if bo else 0.0)
    if n == 1:
      table[(BOS,)] = (-99.0, math.log10(gammas[1][(BOS,)]) if order > 1 else 0.0)
    out.append(table)
  return out


def write_arpa(tables: list[dict], path: str) -> None:
  """Writes estimate()'s tables as an ARPA file (via a temporary name, so readers never see half of one)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write("\\data\\\n")
    for n, table in enumerate(tables, 1):
      f.write(f"ngram {n}={len(table)}\n")
    for n, table in enumerate(tables, 1):
      f.write(f"\n\\{n}-grams:\n")
      for g in sorted(table):
        p, bo = table[g]
        f.write(f"{p:.6f}\t{' '.join(g)}" + (f"\t{bo:.6f}\n" if n < len(tables) else "\n"))
    f.write("\n\\end\\\n")
  os.replace(tmp, path)


def build_arpa(sentences: Iterable[str], path: str, order: int = 4) -> str:
  write_arpa(estimate(sentences, order), path)
  return path
