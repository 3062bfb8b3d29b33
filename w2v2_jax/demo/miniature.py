"""w2v2-miniature: the paper's headline result in miniature, on the offline corpus, on CPU.

Pre-trains on the corpus's unlabeled split, fine-tunes that model with CTC on the 10 labeled
minutes, trains the same architecture from scratch on the same 10 minutes with the same number of
updates, and reports both CERs and WERs on the test split (held-out voices and sentences): greedy,
and with the fine-tuning config's beam search and n-gram LM (the paper's headline decodes with one).

  w2v2-miniature --workdir=DIR [--pretrain=experiments/demo.py] [--finetune=experiments/demo_finetune.py]
      [--pretrain.KEY=VALUE ...] [--finetune.KEY=VALUE ...]

Each phase is an ordinary w2v2-train run in DIR/{pretrain,finetune_pretrained,finetune_scratch};
DIR/miniature.json gets each phase's figures as it ends, so re-running the command resumes at the
unfinished phase (inside it, from its latest checkpoint). The table goes to the console too.
"""

from __future__ import annotations

import time

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


def define_flags():
  """Defined when the CLI runs, not on import (scratch_config is imported by tests and scripts)."""
  config_flags.DEFINE_config_file("pretrain", "experiments/demo.py", "Pre-training config.", lock_config=True)
  config_flags.DEFINE_config_file(
    "finetune", "experiments/demo_finetune.py", "Fine-tuning config (its init is set here).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Folder for the three runs and miniature.json.")


def scratch_config(finetune_config):
  """The from-scratch baseline: the same architecture, data and updates, with nothing frozen
  (a frozen random encoder would be a straw man)."""
  c = finetune_config.copy_and_resolve_references()
  c.init = ""
  c.finetune.freeze_steps = 0
  c.model.feature_grad_mult = 1.0
  return c


def run_phase(name, config, workdir) -> dict:
  from w2v2_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel

  logging.info("== %s -> %s", name, workdir)
  start = time.time()
  out = train_and_evaluate(config, workdir)
  figures = {k: v for k, v in out.items() if k != "params" and isinstance(v, (int, float))}
  figures["wall_seconds"] = time.time() - start
  return figures


@one_line_errors("w2v2-miniature")
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if FLAGS.workdir is None:
    raise ValueError("--workdir is required")
  quiet_libraries()
  use_compilation_cache()  # the scratch run reuses the pre-trained one's programs where they are equal
  workdir = storage.absolute(FLAGS.workdir)
  pre_dir = storage.join(workdir, "pretrain")
  pretrained = FLAGS.finetune.copy_and_resolve_references()
  pretrained.init = pre_dir
  phases = [
    ("pretrain", "pre-training", FLAGS.pretrain),
    ("finetune_pretrained", "fine-tuning the pre-trained model", pretrained),
    ("finetune_scratch", "training from scratch", scratch_config(FLAGS.finetune)),
  ]
  path = storage.join(workdir, "miniature.json")
  results = storage.read_json(path) if storage.exists(path) else {}
  for name, what, config in phases:
    if name in results:
      logging.info("== %s: done before (%s), skipped", what, path)
      continue
    results[name] = run_phase(what, config, storage.join(workdir, name))
    storage.write_json(path, results, indent=1)  # after each phase, so a re-run resumes at the next one
  pre, scratch = results["finetune_pretrained"], results["finetune_scratch"]
  beam = "valid_beam_cer" in pre and "valid_beam_cer" in scratch
  results["cer_ratio"] = pre["valid_cer"] / max(scratch["valid_cer"], 1e-9)
  if beam:
    results["beam_cer_ratio"] = pre["valid_beam_cer"] / max(scratch["valid_beam_cer"], 1e-9)
  results["total_wall_seconds"] = sum(results[name]["wall_seconds"] for name, _, _ in phases)
  storage.write_json(path, results, indent=1)
  print(
    f"{'':24s} {'greedy CER':>10s} {'WER':>6s}"
    + (f" {'beam+LM CER':>11s} {'WER':>6s}" if beam else "")
    + f" {'wall':>8s}"
  )
  for name in ("finetune_pretrained", "finetune_scratch"):
    r = results[name]
    print(
      f"{name:24s} {r['valid_cer']:10.3f} {r['valid_wer']:6.3f}"
      + (f" {r['valid_beam_cer']:11.3f} {r['valid_beam_wer']:6.3f}" if beam else "")
      + f" {r['wall_seconds']:7.0f}s"
    )
  print(
    f"pre-trained CER / scratch CER = {results['cer_ratio']:.3f} greedy"
    + (f", {results['beam_cer_ratio']:.3f} beam search + LM" if beam else "")
    + " (target <= 0.6); "
    f"pre-training {results['pretrain']['wall_seconds']:.0f} s; total {results['total_wall_seconds']:.0f} s"
  )


def run():
  with config_key_errors("w2v2-miniature"):  # flags with a default config parse their overrides here
    define_flags()
  app.run(main, flags_parser=config_flags_parser("w2v2-miniature"))


if __name__ == "__main__":
  run()
