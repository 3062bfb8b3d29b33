"""w2v2-bench: time the full pre-training forward + backward (loss and gradients) of a model preset.

  w2v2-bench --model=base --batch=4 --seconds=4 [--dtype=bfloat16] [--remat] [--steps=5] [--json=OUT]

Prints compile time, the median step time after one warm-up, audio-seconds per second, and XLA's
FLOP count for the step. (The optimizer update is not included; it is a small fraction of the step.)
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


@one_line_errors("w2v2-bench")
def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from w2v2_jax import objectives
  from w2v2_jax.models.config import preset
  from w2v2_jax.models.init import init_params
  from w2v2_jax.train.pretrain import make_loss_fn

  cfg = preset(_MODEL.value).replace(dtype=_DTYPE.value, remat=_REMAT.value)
  samples = int(_SECONDS.value * 16000)
  params = init_params(cfg, jax.random.key(0))
  audio = jax.random.normal(jax.random.key(1), (_BATCH.value, samples), jnp.float32)
  lengths = jnp.full((_BATCH.value,), samples)
  loss_fn = make_loss_fn(cfg, objectives.ObjectiveConfig())
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  args = (params, audio, lengths, jax.random.key(2), jnp.float32(2.0))

  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for i in range(_STEPS.value):
    t = time.perf_counter()
    (loss, _), _ = compiled(params, audio, lengths, jax.random.key(3 + i), jnp.float32(2.0))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  median = statistics.median(times)
  figures = {"model": _MODEL.value, "batch": _BATCH.value, "seconds": _SECONDS.value, "dtype": _DTYPE.value,
             "remat": _REMAT.value, "device": str(jax.devices()[0].device_kind), "compile_s": round(compile_s, 2),
             "step_s_median": round(median, 3), "audio_s_per_s": round(_BATCH.value * _SECONDS.value / median, 2),
             "xla_gflop_per_step": round(flops / 1e9, 1), "loss": round(float(loss), 4)}
  print(" ".join(f"{k}={v}" for k, v in figures.items()))
  write_json(_JSON.value, figures)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
