"""w2v2-train: pre-train wav2vec 2.0 from an experiments/ config; re-running the command resumes.

w2v2-train --config=experiments/demo.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
    [--coordinator=HOST:PORT --num_processes=N --process_id=I]   # multi-host; TPU/SLURM auto-detect

Exit status: 0 done or preempted (re-run to resume); 1 an error (one line); 3 stopped on a collapse
alarm (config.health.stop_on_collapse; the last step is saved).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from w2v2_jax.cli.common import config_flags_parser, one_line_errors, quiet_libraries, use_compilation_cache
from w2v2_jax.train import distributed, failures

COLLAPSE_EXIT = 3

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (experiments/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, TensorBoard events, logs.")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "jax.distributed: auto = start it when JAX's cluster detection (TPU VM/GKE, SLURM, "
  "Open MPI, Kubernetes) finds several processes; on = always; off = never.",
)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "Multi-host without a detected cluster: process 0's HOST:PORT.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator: this process's index.")
_PLOTS = flags.DEFINE_bool(
  "plots",
  True,
  "At the end, write curves.png and codebook_usage.png (w2v2-plot) "
  "into the workdir (process 0, reading the checkpoint alone; the others exit).",
)


def initialize_distributed() -> str:
  """jax.distributed as --distributed and the coordinator flags ask (w2v2_jax.train.distributed); one log line."""
  return distributed.initialize(
    _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, **failures.initialize_options()
  )


@one_line_errors("w2v2-train")
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; use --config.KEY=VALUE")
  if _WORKDIR.value is None:
    raise ValueError("--workdir is required")
  if _CONFIG.value is None:
    raise ValueError("--config is required, e.g. --config=experiments/demo.py")
  initialize_distributed()
  failures.watch_processes()  # several processes: a lost one ends the job (--host_timeout)
  import jax  # pylint: disable=import-outside-toplevel

  from w2v2_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel

  quiet_libraries()
  use_compilation_cache()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info("config:\n%s", _CONFIG.value)
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  stopped = result.get("stopped") == "collapse"
  # not after a preemption: exit promptly
  finished = result.get("step", 0) >= _CONFIG.value.num_train_steps or stopped
  failures.finished()  # the other processes may leave first: they have nothing left to do together
  if _PLOTS.value and finished and jax.process_index() == 0:
    # Process-local work only: its checkpoint reads (checkpointing.load_params) join no barrier.
    from w2v2_jax.cli import plot  # pylint: disable=import-outside-toplevel

    try:
      for path in plot.write_plots(_WORKDIR.value):
        logging.info("wrote %s", path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("plots not written (the run itself is complete): %s: %s", type(e).__name__, e)
  status = COLLAPSE_EXIT if stopped else 0
  distributed.leave_together(status)  # several processes: all leave at once, none aborts at exit
  if status:
    sys.exit(status)


def run():
  app.run(main, flags_parser=config_flags_parser("w2v2-train"))


if __name__ == "__main__":
  run()
