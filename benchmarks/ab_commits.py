"""A/B of w2v2-bench's train step between an earlier commit and the working tree, in one process.

The earlier commit's package is exported (git archive) as `w2v2_jax_base` beside this tree's `w2v2_jax`
(or a later commit's, `--this=REV`, as `w2v2_jax_this`);
each builds its own compiled step from its own experiment config, and the two steps alternate, round
by round (which goes first alternates too), so both see the same host, allocator and load.

  python benchmarks/ab_commits.py --base=efa12be --config=experiments/base_librispeech.py \\
      --batch=4 --seconds=4 --steps=3 --rounds=8 --set=model.dtype=float32

Prints each round's step times and ratio (this tree / base; below 1 is faster), their median and
range, and the geometric mean with its 95% t-interval (over log ratios). With --steps=1 each round is
one step of each, back to back. A ratio is firmer than either absolute time on a shared host.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(rev: str, into: str, name: str) -> str:
  """git archive REV's w2v2_jax/ and experiments/ into into/NAME, the package renamed to w2v2_jax_NAME so that
  both versions import side by side; returns REV's short hash."""
  root = os.path.join(into, name)
  os.makedirs(root)
  tar = os.path.join(root, "tree.tar")
  subprocess.run(["git", "-C", REPO, "archive", "-o", tar, rev, "w2v2_jax", "experiments"], check=True)
  with tarfile.open(tar) as t:
    t.extractall(root, filter="data")
  os.rename(os.path.join(root, "w2v2_jax"), os.path.join(root, f"w2v2_jax_{name}"))
  for folder, _, names in os.walk(root):
    for file in names:
      if file.endswith(".py"):
        path = os.path.join(folder, file)
        text = open(path, encoding="utf-8").read()
        open(path, "w", encoding="utf-8").write(re.sub(r"\bw2v2_jax\b", f"w2v2_jax_{name}", text))
  return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", rev], capture_output=True, text=True).stdout.strip()


def load_config(package_root: str, config_path: str, overrides: list[str]):
  """experiments/NAME.py of one version, with KEY=VALUE overrides (VALUE parsed as JSON, else a string)."""
  spec = importlib.util.spec_from_file_location(f"cfg_{abs(hash(package_root))}", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, value = item.split("=", 1)
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      pass
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--base", required=True, help="the earlier commit (any git revision)")
  parser.add_argument("--this", default="", help="the later commit (default: the working tree)")
  parser.add_argument("--config", default="experiments/base_librispeech.py")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seconds", type=float, default=4.0)
  parser.add_argument("--steps", type=int, default=3, help="timed steps of each version per round")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override, for both")
  parser.add_argument("--json", default="", help="also write the figures here")
  args = parser.parse_args()

  tmp = tempfile.mkdtemp(prefix="w2v2_ab_")
  trees = {"base": ("w2v2_jax_base", os.path.join(tmp, "base"))}
  revs = {"base": export(args.base, tmp, "base")}
  if args.this:
    trees["this"], revs["this"] = ("w2v2_jax_this", os.path.join(tmp, "this")), export(args.this, tmp, "this")
  else:
    dirty = subprocess.run(["git", "-C", REPO, "diff", "--quiet"]).returncode != 0
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    trees["this"], revs["this"] = ("w2v2_jax", REPO), head.stdout.strip() + ("+dirty" if dirty else "")
  sys.path[:0] = [root for _, root in trees.values()]
  samples = int(args.seconds * 16000)
  versions = {}
  for name, (package, root) in trees.items():
    bench = importlib.import_module(f"{package}.cli.bench")
    config = load_config(root, os.path.join(root, "experiments", os.path.basename(args.config)), args.set)
    started = time.perf_counter()
    step = bench.OurStep(config, args.batch, samples)
    print(f"{name}: compiled in {step.compile_s:.1f} s ({time.perf_counter() - started:.1f} s to build)", flush=True)
    step.train()  # one untimed step each: first-run allocations
    versions[name] = step

  rounds = []
  for r in range(args.rounds):
    order = ("base", "this") if r % 2 == 0 else ("this", "base")
    times = {}
    for name in order:
      per_step = []
      for _ in range(args.steps):
        start = time.perf_counter()
        versions[name].train()
        per_step.append(time.perf_counter() - start)
      times[name] = statistics.median(per_step)
    ratio = times["this"] / times["base"]
    rounds.append(dict(base=times["base"], this=times["this"], ratio=ratio))
    print(f"round {r + 1}: base {times['base']:.3f} s, this {times['this']:.3f} s, ratio {ratio:.3f}", flush=True)

  ratios = sorted(x["ratio"] for x in rounds)
  logs = [math.log(x) for x in ratios]  # ratios multiply: their spread is symmetric in log space
  half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
  geo = math.exp(statistics.mean(logs))
  interval = (geo * math.exp(-half), geo * math.exp(half))
  summary = dict(
    base=revs["base"],
    this=revs["this"],
    config=args.config,
    batch=args.batch,
    seconds=args.seconds,
    overrides=args.set,
    compile_s={k: v.compile_s for k, v in versions.items()},
    median_step_s={k: statistics.median(x[k] for x in rounds) for k in ("base", "this")},
    median_ratio=statistics.median(ratios),
    ratio_range=(ratios[0], ratios[-1]),
    geometric_mean_ratio=geo,
    ratio_95_interval=interval,
    rounds=rounds,
  )
  print(
    f"this / base step time: median {summary['median_ratio']:.3f} over {len(rounds)} rounds "
    f"(range {ratios[0]:.3f}-{ratios[-1]:.3f}; geometric mean {geo:.3f}, 95% interval "
    f"{interval[0]:.3f}-{interval[1]:.3f}); compile base {versions['base'].compile_s:.1f} s, "
    f"this {versions['this'].compile_s:.1f} s"
  )
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
