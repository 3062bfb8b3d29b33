"""w2v2-bench: time the real sharded pre-training step of an experiment config, and its forward alone.

  w2v2-bench --config=experiments/base_librispeech.py [--batch=4] [--seconds=4] [--steps=5] [--json=OUT]
      [--profile=DIR] [--config.model.dtype=float32 ...]

The step is exactly w2v2-train's (AdamW update, in-graph masks and negatives, donated state) on the
config's mesh over this host's devices, fed a synthetic batch of `--batch` crops of `--seconds`.
Prints compile time, the median step time after a warm-up, audio-seconds per second, analytic
FLOPs (w2v2_jax/models/flops.py) next to XLA's count, MFU against the chip's peak (CPU: this host's
measured fp32 matmul peak; GPU/TPU: datasheet) and XLA's peak memory; the same for the forward
(the evaluation loss: no dropout, no gradient).
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags
from ml_collections import config_flags

from w2v2_jax.cli.common import config_flags_parser, one_line_errors, write_json

FLAGS = flags.FLAGS


def define_flags():
  """Defined when the CLI runs, not on import (the peer comparison imports measure())."""
  config_flags.DEFINE_config_file("config", None, "Pre-training experiment config file.", lock_config=True)
  flags.DEFINE_integer("batch", None, "Utterances per step (default: the config's batch_size).")
  flags.DEFINE_float("seconds", None, "Crop length in seconds (default: the config's max_sample_size).")
  flags.DEFINE_integer("steps", 5, "Timed steps after the warm-up step.")
  flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
  flags.DEFINE_string(
    "profile",
    None,
    "Also trace the timed train steps with jax.profiler into this folder "
    "(open with TensorBoard's profile plugin or Perfetto).",
  )


def median_seconds(call, steps: int) -> float:
  """Median wall seconds of `steps` calls after one warm-up call; `call()` must block until done."""
  call()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def compile_stats(lowered):
  """(compiled, compile seconds, XLA FLOPs, XLA peak bytes or None) of a lowered computation."""
  t0 = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  return compiled, seconds, float((cost or {}).get("flops", 0.0)), peak


class OurStep:
  """w2v2-train's compiled train step (and eval forward) on a synthetic batch; call .train()/.forward()."""

  def __init__(self, config, batch: int, samples: int):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from w2v2_jax import parallel  # pylint: disable=import-outside-toplevel
    from w2v2_jax.train import loop, tasks  # pylint: disable=import-outside-toplevel
    from w2v2_jax.train import step as steps

    if config.get("task", "pretrain") != "pretrain":
      raise ValueError("--config: w2v2-bench times pre-training configs (config.task='pretrain')")
    config = config.copy_and_resolve_references()  # the caller's config stays as it was
    config.batch_size = batch
    task = tasks.make(config)
    self.cfg = task.model_config
    self.batch, self.samples = batch, samples
    layout = loop.plan_layout(config, task=task)
    self.mesh = layout.mesh
    batch_sh = parallel.batch_sharding(layout.mesh)
    rng = np.random.default_rng(0)
    host = {
      "audio": np.clip(rng.normal(0, 3000, (batch, samples)), -32768, 32767).astype(np.int16),
      "lengths": np.full((batch,), samples, np.int32),
    }
    train_step, eval_step = loop.jit_steps(config, layout, task)
    with jax.set_mesh(layout.mesh):
      self.data = jax.device_put(host, batch_sh)
      self.state = jax.jit(lambda p: steps.init_state(p, layout.tx), out_shardings=layout.state_shardings)(
        task.initial_params(jax.random.key(0), layout.param_shardings)
      )
      self.key = jax.random.key(1, impl=config.rng_impl)
      self.train_fn, self.compile_s, self.xla_flops, self.peak_bytes = compile_stats(
        train_step.lower(self.state, self.data, self.key)
      )
      self.forward_fn, self.forward_compile_s, self.forward_xla_flops, _ = compile_stats(
        eval_step.lower(self.state.params, self.data, self.key, jnp.int32(0))
      )
    # XLA counts the FLOPs of one SPMD partition; the step's are the sum over the mesh.
    self.xla_flops *= layout.mesh.size
    self.forward_xla_flops *= layout.mesh.size

  def train(self):
    import jax  # pylint: disable=import-outside-toplevel

    self.state, metrics = self.train_fn(self.state, self.data, self.key)
    jax.block_until_ready((self.state, metrics))

  def forward(self):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    jax.block_until_ready(self.forward_fn(self.state.params, self.data, self.key, jnp.int32(0)))


def measure(config, batch: int, samples: int, steps: int, profile_dir: str | None = None) -> dict:
  """Every figure of one config at one batch shape (see the module docstring)."""
  import contextlib  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from w2v2_jax.models import flops  # pylint: disable=import-outside-toplevel

  # The peak first, on an idle machine: measured after minutes of steps it comes out far too low
  # (docs/performance.md).
  peak, peak_source = flops.peak_flops(jax.devices()[0], config.model.dtype)
  ours = OurStep(config, batch, samples)
  with jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext():
    train_s = median_seconds(ours.train, steps)
  forward_s = median_seconds(ours.forward, steps)
  peak *= len(ours.mesh.devices.flat)
  train_flops = flops.train_flops(ours.cfg, samples, batch)
  forward_flops = flops.forward_flops(ours.cfg, samples, batch)
  seconds = samples / 16000
  return {
    "batch": batch,
    "seconds": seconds,
    "dtype": ours.cfg.dtype,
    "remat_policy": ours.cfg.remat_policy,
    "scan_layers": ours.cfg.scan_layers,
    "kernels": ours.cfg.kernels,
    "mesh": dict(ours.mesh.shape),
    "device": str(jax.devices()[0].device_kind),
    "compile_s": round(ours.compile_s, 2),
    "forward_compile_s": round(ours.forward_compile_s, 2),
    "step_s_median": round(train_s, 4),
    "forward_s_median": round(forward_s, 4),
    "audio_s_per_s": round(batch * seconds / train_s, 2),
    "forward_audio_s_per_s": round(batch * seconds / forward_s, 2),
    "analytic_gflop_per_step": round(train_flops / 1e9, 3),
    "xla_gflop_per_step": round(ours.xla_flops / 1e9, 3),
    "analytic_gflop_forward": round(forward_flops / 1e9, 3),
    "xla_gflop_forward": round(ours.forward_xla_flops / 1e9, 3),
    "peak_tflops": round(peak / 1e12, 3),
    "peak_source": peak_source,
    "mfu": round(train_flops / train_s / peak, 4),
    "forward_mfu": round(forward_flops / forward_s / peak, 4),
    "peak_memory_gib": round(ours.peak_bytes / 2**30, 3) if ours.peak_bytes is not None else None,
  }


@one_line_errors("w2v2-bench")
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  config = FLAGS.config
  if config is None:
    raise ValueError("--config is required, e.g. --config=experiments/base_librispeech.py")
  batch = FLAGS.batch or config.batch_size
  samples = int(FLAGS.seconds * 16000) if FLAGS.seconds else config.data.max_sample_size
  figures = measure(config, batch, samples, FLAGS.steps, FLAGS.profile)
  figures = {"config": config_flags.get_config_filename(FLAGS["config"]), **figures}
  print(" ".join(f"{k}={v}" for k, v in figures.items()))
  write_json(FLAGS.json, figures)


def run():
  define_flags()
  app.run(main, flags_parser=config_flags_parser("w2v2-bench"))


if __name__ == "__main__":
  run()
