"""w2v2-train: pre-train wav2vec 2.0 from an experiments/ config; re-running the command resumes.

  w2v2-train --config=experiments/demo.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
      [--coordinator=HOST:PORT --num_processes=N --process_id=I]   # multi-host; TPU/SLURM auto-detect
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from w2v2_jax.cli import keep_freed_host_memory, one_line_errors, quiet_libraries, use_compilation_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, TensorBoard events, logs.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize: on (TPU pod / SLURM / GPU cluster auto-detection), "
                                 "off, or auto = on when SLURM_NTASKS > 1 or a TPU pod environment is seen.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "Multi-host: coordinator HOST:PORT (else auto-detect).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_PLOTS = flags.DEFINE_bool("plots", True, "At the end, write curves.png and codebook_usage.png (w2v2-plot) "
                           "into the workdir (process 0).")


def initialize_distributed():
  """jax.distributed for TPU pods, SLURM, or explicit coordinator flags; nothing for one process."""
  import jax  # pylint: disable=import-outside-toplevel
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise ValueError("--coordinator needs --num_processes and --process_id")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    return
  cluster = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") \
      or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
  if _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and cluster):
    jax.distributed.initialize()


@one_line_errors("w2v2-train")
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; use --config.KEY=VALUE")
  if _WORKDIR.value is None:
    raise ValueError("--workdir is required")
  if _CONFIG.value is None:
    raise ValueError("--config is required, e.g. --config=experiments/demo.py")
  keep_freed_host_memory()
  initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  quiet_libraries()
  use_compilation_cache()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info("config:\n%s", _CONFIG.value)
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  finished = result.get("step", 0) >= _CONFIG.value.num_train_steps  # not after a preemption: exit promptly
  if _PLOTS.value and finished and jax.process_index() == 0:
    from w2v2_jax import plot  # pylint: disable=import-outside-toplevel
    try:
      for path in plot.write_plots(_WORKDIR.value):
        logging.info("wrote %s", path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("plots not written (the run itself is complete): %s: %s", type(e).__name__, e)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
