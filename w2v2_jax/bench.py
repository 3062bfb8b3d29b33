"""w2v2-bench: time the full pre-training forward + backward (loss and gradients) of a model preset.

  w2v2-bench --model=base --batch=4 --seconds=4 [--dtype=bfloat16] [--remat] [--steps=5] [--json=OUT]

Times the loss-and-gradient step and the forward alone: compile time, median time after a warm-up,
audio-seconds per second, analytic FLOPs (w2v2_jax/flops.py) next to XLA's count, MFU against the
chip's peak (CPU: this host's measured fp32 matmul peak) and XLA's peak memory. The optimizer update
is not included; it is a small fraction of the step.
"""
from __future__ import annotations

import statistics
import time

from absl import app, flags

from w2v2_jax.cli import one_line_errors, write_json

_MODEL = flags.DEFINE_string("model", "base", "Model preset (base, large, large_lv60, xlsr_300m, ..., tiny).")
_BATCH = flags.DEFINE_integer("batch", 4, "Utterances per step.")
_SECONDS = flags.DEFINE_float("seconds", 4.0, "Crop length in seconds of 16 kHz audio.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise transformer layers.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after the warm-up step.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def _time(compiled, args_for, steps):
  """Median seconds of `steps` calls after one warm-up call."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(compiled(*args_for(0)))
  times = []
  for i in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args_for(i + 1)))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _compile(fn, args):
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
  return compiled, seconds, float((cost or {}).get("flops", 0.0)), peak


@one_line_errors("w2v2-bench")
def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from w2v2_jax import flops, objectives
  from w2v2_jax.models.config import preset
  from w2v2_jax.models.init import init_params
  from w2v2_jax.train.pretrain import make_loss_fn

  cfg = preset(_MODEL.value).replace(dtype=_DTYPE.value, remat=_REMAT.value)
  batch, samples = _BATCH.value, int(_SECONDS.value * 16000)
  params = init_params(cfg, jax.random.key(0))
  audio = jax.random.normal(jax.random.key(1), (batch, samples), jnp.float32)
  lengths = jnp.full((batch,), samples)
  loss_fn = make_loss_fn(cfg, objectives.ObjectiveConfig())
  temp = jnp.float32(2.0)
  args_for = lambda i: (params, audio, lengths, jax.random.key(2 + i), temp)  # noqa: E731
  train, train_compile_s, train_xla, train_mem = _compile(
      jax.jit(jax.value_and_grad(loss_fn, has_aux=True)), args_for(0))
  fwd, fwd_compile_s, fwd_xla, _ = _compile(
      jax.jit(lambda *a: loss_fn(*a, deterministic=True)), args_for(0))
  train_s = _time(train, args_for, _STEPS.value)
  fwd_s = _time(fwd, args_for, _STEPS.value)

  peak, peak_source = flops.peak_flops(jax.devices()[0], _DTYPE.value)
  train_flops = flops.train_flops(cfg, samples, batch)
  fwd_flops = flops.forward_flops(cfg, samples, batch)
  figures = {
      "model": _MODEL.value, "batch": batch, "seconds": _SECONDS.value, "dtype": _DTYPE.value,
      "remat": _REMAT.value, "device": str(jax.devices()[0].device_kind),
      "compile_s": round(train_compile_s, 2), "forward_compile_s": round(fwd_compile_s, 2),
      "step_s_median": round(train_s, 4), "forward_s_median": round(fwd_s, 4),
      "audio_s_per_s": round(batch * _SECONDS.value / train_s, 2),
      "forward_audio_s_per_s": round(batch * _SECONDS.value / fwd_s, 2),
      "analytic_gflop_per_step": round(train_flops / 1e9, 1), "xla_gflop_per_step": round(train_xla / 1e9, 1),
      "analytic_gflop_forward": round(fwd_flops / 1e9, 1), "xla_gflop_forward": round(fwd_xla / 1e9, 1),
      "peak_tflops": round(peak / 1e12, 3), "peak_source": peak_source,
      "mfu": round(train_flops / train_s / peak, 4), "forward_mfu": round(fwd_flops / fwd_s / peak, 4),
      "peak_memory_gib": round(train_mem / 2**30, 3) if train_mem is not None else None,
  }
  print(" ".join(f"{k}={v}" for k, v in figures.items()))
  write_json(_JSON.value, figures)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
