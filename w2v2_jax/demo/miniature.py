"""w2v2-miniature: the paper's headline result in miniature, on the offline corpus, on CPU, over seeds.

For each seed: pre-trains on the corpus's unlabeled split, fine-tunes that model with CTC on the 10
labeled minutes, and trains the same architecture from scratch on the same 10 minutes with the same
updates, schedule and masking, once per learning rate of a small sweep (a fair baseline: its best
learning rate is the one compared). Both arms are scored on the test split (held-out voices and
sentences): greedy, and with the fine-tuning config's beam search and n-gram LM. The seed sets the
initial weights, the data order and the step's randomness of every phase.

  w2v2-miniature --workdir=DIR [--seeds=3] [--scratch_lrs=1e-3,2e-3,4e-3]
      [--pretrain=experiments/demo.py] [--finetune=experiments/demo_finetune.py]
      [--pretrain.KEY=VALUE ...] [--finetune.KEY=VALUE ...]

Each phase is an ordinary w2v2-train run in DIR/seed{S}/{pretrain,finetune_pretrained,scratch_lr{LR}}.
DIR/miniature.json keeps every phase's figures as it ends, so re-running the command (with as many
seeds or more) resumes at the first unfinished phase, inside it from its latest checkpoint. The summary
(each arm's mean and standard deviation, the ratio's median and spread) goes there and to the console.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from w2v2_jax import storage
from w2v2_jax.cli.common import (
  config_flags_parser,
  config_key_errors,
  one_line_errors,
  quiet_libraries,
  use_compilation_cache,
)

FLAGS = flags.FLAGS
# (label, metric of miniature.json, target for the median ratio)
DECODINGS = (("greedy", "valid_cer", 0.7), ("beam+LM", "valid_beam_cer", 0.6))


def define_flags():
  """Defined when the CLI runs, not on import (scratch_config is imported by tests and scripts)."""
  config_flags.DEFINE_config_file("pretrain", "experiments/demo.py", "Pre-training config.", lock_config=True)
  config_flags.DEFINE_config_file(
    "finetune", "experiments/demo_finetune.py", "Fine-tuning config (its init is set here).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Folder for the runs and miniature.json.")
  flags.DEFINE_integer("seeds", 1, "Seeds 0..N-1 of the whole pipeline.")
  flags.DEFINE_list("scratch_lrs", ["1e-3", "2e-3", "4e-3"], "The from-scratch arm's learning-rate sweep.")


def scratch_config(finetune_config, lr: float | None = None):
  """The from-scratch baseline: the same architecture, data and updates, with nothing frozen
  (a frozen random encoder would be a straw man), at learning rate `lr` (None: the config's)."""
  c = finetune_config.copy_and_resolve_references()
  c.init = ""
  c.finetune.freeze_steps = 0
  c.model.feature_grad_mult = 1.0
  if lr is not None:
    c.optim.lr = lr
  return c


def seeded(config, seed: int):
  c = config.copy_and_resolve_references()
  c.seed = seed
  return c


def phases(seed: int, seed_dir: str, pretrain, finetune, scratch_lrs) -> list[tuple[str, object]]:
  """(name, config) of one seed's runs, in order: each run's folder is seed_dir/name."""
  pretrained = seeded(finetune, seed)
  pretrained.init = storage.join(seed_dir, "pretrain")
  return [
    ("pretrain", seeded(pretrain, seed)),
    ("finetune_pretrained", pretrained),
    *((f"scratch_lr{lr:g}", seeded(scratch_config(finetune, lr), seed)) for lr in scratch_lrs),
  ]


def run_phase(name, config, workdir) -> dict:
  from w2v2_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel

  logging.info("== %s -> %s", name, workdir)
  start = time.time()
  out = train_and_evaluate(config, workdir)
  figures = {k: v for k, v in out.items() if k != "params" and isinstance(v, (int, float))}
  figures["wall_seconds"] = time.time() - start
  return figures


def summarize(runs: dict) -> dict:
  """miniature.json's runs ({"seed0": {phase: figures}}) -> per seed and over seeds: each arm's CER (the
  scratch arm at its best learning rate), the ratio pre-trained / scratch, and the wall time."""
  per_seed, out = {}, {}
  for seed, phases_done in sorted(runs.items()):
    scratch = {name: f for name, f in phases_done.items() if name.startswith("scratch_lr")}
    row = {"wall_seconds": sum(f["wall_seconds"] for f in phases_done.values())}
    for label, metric, _ in DECODINGS:
      if metric not in phases_done["finetune_pretrained"]:
        continue
      best = min(scratch, key=lambda name, m=metric: scratch[name][metric])
      pre, base = phases_done["finetune_pretrained"][metric], scratch[best][metric]
      row[label] = {
        "pretrained": pre,
        "scratch": base,
        "scratch_lr": best[len("scratch_lr") :],
        "ratio": pre / max(base, 1e-9),
      }
    per_seed[seed] = row
  out["seeds"] = per_seed
  for label, _, target in DECODINGS:
    rows = [r[label] for r in per_seed.values() if label in r]
    if not rows:
      continue
    stats = {}
    for key in ("pretrained", "scratch", "ratio"):
      v = np.array([r[key] for r in rows])
      stats[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    ratios = [r["ratio"] for r in rows]
    stats["ratio"].update(median=float(np.median(ratios)), max=float(max(ratios)), target=target)
    out[label] = stats
  walls = [r["wall_seconds"] for r in per_seed.values()]
  out["wall_seconds"] = {"per_seed_max": max(walls), "total": sum(walls)}
  return out


def print_table(summary: dict) -> None:
  labels = [label for label, _, _ in DECODINGS if label in summary]
  print(f"{'seed':8s}" + "".join(f" {label + ' CER pre / scratch (lr) = ratio':>44s}" for label in labels) + "   wall")
  for seed, row in summary["seeds"].items():
    cells = [
      f"{r['pretrained']:.3f} / {r['scratch']:.3f} ({r['scratch_lr']}) = {r['ratio']:.3f}"
      for r in (row[label] for label in labels)
    ]
    print(f"{seed:8s}" + "".join(f" {c:>44s}" for c in cells) + f" {row['wall_seconds']:6.0f}s")
  for label in labels:
    s = summary[label]
    print(
      f"{label}: pre-trained CER {s['pretrained']['mean']:.3f} +- {s['pretrained']['std']:.3f}, scratch "
      f"{s['scratch']['mean']:.3f} +- {s['scratch']['std']:.3f}; ratio median {s['ratio']['median']:.3f} "
      f"(mean {s['ratio']['mean']:.3f} +- {s['ratio']['std']:.3f}, worst {s['ratio']['max']:.3f}; "
      f"target median <= {s['ratio']['target']})"
    )


@one_line_errors("w2v2-miniature")
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if FLAGS.workdir is None:
    raise ValueError("--workdir is required")
  if FLAGS.seeds < 1:
    raise ValueError(f"--seeds={FLAGS.seeds}: give at least 1")
  try:
    scratch_lrs = [float(lr) for lr in FLAGS.scratch_lrs]
  except ValueError:
    scratch_lrs = []
  if not scratch_lrs or min(scratch_lrs) <= 0:
    raise ValueError(f"--scratch_lrs={','.join(FLAGS.scratch_lrs)}: give learning rates > 0, e.g. 1e-3,2e-3,4e-3")
  quiet_libraries()
  use_compilation_cache()  # seeds and sweep points share most of their programs
  workdir = storage.absolute(FLAGS.workdir)
  path = storage.join(workdir, "miniature.json")
  results = storage.read_json(path) if storage.exists(path) else {}
  runs, this_run = results.setdefault("runs", {}), {}
  for seed in range(FLAGS.seeds):
    seed_dir = storage.join(workdir, f"seed{seed}")
    done = runs.setdefault(f"seed{seed}", {})
    for name, config in phases(seed, seed_dir, FLAGS.pretrain, FLAGS.finetune, scratch_lrs):
      if name in done:
        logging.info("== seed %d %s: done before (%s), skipped", seed, name, path)
      else:
        done[name] = run_phase(f"seed {seed} {name}", config, storage.join(seed_dir, name))
        storage.write_json(path, results, indent=1)  # after each phase: a re-run resumes at the next one
      this_run.setdefault(f"seed{seed}", {})[name] = done[name]
  results["summary"] = summarize(this_run)  # these seeds and this sweep, whatever earlier runs added
  storage.write_json(path, results, indent=1)
  print_table(results["summary"])


def run():
  with config_key_errors("w2v2-miniature"):  # flags with a default config parse their overrides here
    define_flags()
  app.run(main, flags_parser=config_flags_parser("w2v2-miniature"))


if __name__ == "__main__":
  run()
