"""w2v2-aot: compile the real sharded train step for a TPU slice on any host; print whether it fits.

  w2v2-aot --config=experiments/base_librispeech.py --topology=v5p-128 [--config.KEY=VALUE ...]

Needs libtpu (pip install 'w2v2-jax[tpu]'); no TPU. First checks that every process (TPU host) of
the slice reads one contiguous, equal block of the global batch, and prints those blocks; then
prints the sharding table, the per-chip memory from XLA's memory analysis against the chip's HBM,
XLA's FLOPs per step, and the step time at the chip's roofline (w2v2_jax/roofline.py) with the MFU
it implies and its ten costliest ops, for the largest bucket (the most memory-hungry shape).
"""

from __future__ import annotations

import collections
import os
import time

from absl import app, flags
from ml_collections import config_flags

from w2v2_jax.cli.common import config_flags_parser, one_line_errors, write_json
from w2v2_jax.models import flops

FLAGS = flags.FLAGS
# The slices the docs and tests name; any size of these chips works.
SLICES = (
  "v4-8",
  "v4-32",
  "v4-64",
  "v5p-8",
  "v5p-16",
  "v5p-64",
  "v5p-128",
  "v5p-256",
  "v5e-8",
  "v5e-256",
  "v6e-8",
  "v6e-64",
)


def define_flags():
  """Defined when the CLI runs, not on import (tests and tools import topology_devices)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("topology", "v5p-128", f"TPU slice: {', '.join(SLICES)}, ...")
  flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
  flags.DEFINE_bool("rows_only", False, "Only check the mesh and each process's batch rows (no compile).")


def topology_devices(slice_name: str):
  """'v5p-128' -> (the 64 chip devices of a 4x4x4 v5p slice (libtpu, compile-only), with their hosts'
  process_index; its Chip)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  kind, _, count = slice_name.partition("-")
  if kind not in flops.TPU_CHIPS or not count.isdigit():
    raise ValueError(f"--topology={slice_name}: use one of {sorted(flops.TPU_CHIPS)} with a size, e.g. v5p-128")
  prefix, chips = flops.TPU_CHIPS[kind].topology, int(count) // flops.TPU_CHIPS[kind].cores
  if kind in ("v4", "v5p"):  # 3-D tori of 2x2x1-chip hosts: the most cubic x<=y<=z, else 2x2x1 (one host)
    per_host = (2, 2, 1)
    shapes = [
      (x, y, chips // (x * y))
      for x in range(1, chips + 1)
      for y in range(1, chips + 1)
      if chips % (x * y) == 0 and all(d % h == 0 for d, h in zip((x, y, chips // (x * y)), per_host))
    ]
    if not shapes:
      raise ValueError(f"--topology={slice_name}: {chips} chips do not tile 2x2x1-chip hosts")
    dims = min(shapes, key=lambda d: (max(d) - min(d), list(d) != sorted(d)))
  else:
    side = int(chips**0.5)
    while chips % side:
      side -= 1
    dims = (side, chips // side)
    per_host = (dims[0], dims[1], 1) if chips <= 8 else (2, 2, 1)  # v5e-8 / v6e-8: one host of 8 chips
  name = f"{prefix}:{'x'.join(map(str, dims))}"
  # Compile-only: no chip is opened, so libtpu's one-process-per-host lock (/tmp/libtpu_lockfile) need not hold.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chip_config = "megacore" if kind == "v4" else "default"  # v4: one device per chip, as on a real pod
  return topologies.get_topology_desc(
    platform="tpu", topology_name=name, chip_config_name=chip_config, chips_per_host_bounds=per_host, num_slices=1
  ).devices, flops.TPU_CHIPS[kind]


def _digits(x: float) -> float:
  return float(f"{x:.4g}")


def roofline_figures(hlo_text: str, cost: dict | None, chip: flops.Chip, model_flops_per_chip: float) -> dict:
  """The step at the chip's roofline (w2v2_jax/roofline.py), the MFU it implies (model FLOPs from
  models/flops.py), its ten costliest ops, and its FLOPs and bytes against XLA's cost_analysis()."""
  from w2v2_jax import roofline  # pylint: disable=import-outside-toplevel

  parsed = roofline.parse(hlo_text)  # a pod step's HLO is large: parsed once for both walks
  est = roofline.estimate(parsed, chip.peak_flops, chip.hbm_bytes_per_s)
  flops_once, bytes_once = roofline.estimate(parsed, chip.peak_flops, chip.hbm_bytes_per_s, True).once()
  ratio = lambda ours, key: round(ours / cost[key], 3) if cost and cost.get(key, 0) > 0 else None  # noqa: E731
  return {
    "chip": chip.datasheet,
    "peak_tflops": chip.peak_flops / 1e12,
    "hbm_tb_per_s": chip.hbm_bytes_per_s / 1e12,
    "step_s": _digits(est.seconds),
    "mfu": _digits(model_flops_per_chip / (est.seconds * chip.peak_flops)),
    "compute_bound_share": _digits(est.compute_bound_seconds / est.seconds),
    "tflop_per_chip": _digits(est.flops / 1e12),
    "hbm_gb_per_chip": _digits(est.bytes / 1e9),
    "collectives": dict(collections.Counter(op.kind for op in est.collectives)),
    "collective_gb_per_chip": _digits(est.collective_bytes / 1e9),
    "unknown_trip_counts": list(est.unknown_trip_counts),
    "vs_xla_flops": ratio(flops_once, "flops"),
    "vs_xla_bytes": ratio(bytes_once, "bytes accessed"),
    "top_ops": est.top(10),
  }


def roofline_lines(r: dict) -> list[str]:
  """What w2v2-aot prints of roofline_figures()."""
  lines = [
    f"roofline on {r['chip']} ({r['peak_tflops']:g} TFLOP/s dense bf16, {r['hbm_tb_per_s']:g} TB/s HBM; public "
    f"datasheet): step {r['step_s'] * 1e3:.4g} ms, MFU {r['mfu']:.1%}; {r['tflop_per_chip']:g} TFLOP and "
    f"{r['hbm_gb_per_chip']:g} GB of HBM traffic per chip; compute-bound ops "
    f"{r['compute_bound_share']:.0%} of the time",
    f"  not in the time: collectives {r['collectives']}, {r['collective_gb_per_chip']:g} GB per chip"
    + (f"; loops counted once (no trip count found): {r['unknown_trip_counts']}" if r["unknown_trip_counts"] else ""),
    f"  against XLA's cost_analysis (each instruction once, whole operands): FLOPs {r['vs_xla_flops']}x, "
    f"bytes {r['vs_xla_bytes']}x",
    f"  {'ms':>8} {'bound':7} {'kind':28} {'times':>5} {'GFLOP':>9} {'MB':>9}  name (jax op)",
  ]
  for op in r["top_ops"]:
    where = op["source"].split("/")
    where = ("backward " if "transpose(" in op["source"] else "") + "/".join(where[-3:])
    lines.append(
      f"  {op['ms']:8.3f} {op['bound']:7} {op['kind']:28} {op['times']:5d} {op['gflop']:9.1f} {op['mb']:9.1f}  "
      f"{op['name']} ({where})"
    )
  return lines


def rows_summary(rows: dict) -> list[str]:
  """One line per process: the block of global batch rows its input pipeline reads."""
  return [f"process {p}: batch rows {a}:{b} ({b - a})" for p, (a, b) in sorted(rows.items())]


@one_line_errors("w2v2-aot")
def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from w2v2_jax import parallel  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train import inputs, loop, tasks  # pylint: disable=import-outside-toplevel

  config = FLAGS.config
  if config is None:
    raise ValueError("--config is required")
  devices, chip = topology_devices(FLAGS.topology)
  layout = loop.plan_layout(config, devices)
  batch_sh = parallel.batch_sharding(layout.mesh)
  rows = parallel.process_rows(batch_sh, config.batch_size)  # refuses a layout the input pipeline cannot feed
  print(f"mesh {dict(layout.mesh.shape)} over {len(devices)} devices, {len(rows)} processes:")
  print("\n".join(rows_summary(rows)))
  if FLAGS.rows_only:
    return
  task = tasks.make(config)
  widest = pipeline.widest_bucket(inputs.input_config(config, "", "", True, task.whole_utterances))
  batch = {
    "audio": jax.ShapeDtypeStruct((config.batch_size, widest), jnp.int16, sharding=batch_sh),
    "lengths": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sh),
  }
  key = jax.ShapeDtypeStruct((), jax.random.key(0, impl=config.rng_impl).dtype)
  train_step, _ = loop.jit_steps(config, layout)
  with jax.set_mesh(layout.mesh):
    start = time.perf_counter()
    lowered = train_step.lower(layout.abstract_state, batch, key)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  model_flops = flops.train_flops(task.model_config, widest, config.batch_size, task.kind) / len(devices)
  per_chip = (
    mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  ) / 2**30
  figures = {
    "topology": FLAGS.topology,
    "chips": len(devices),
    "mesh": dict(layout.mesh.shape),
    "processes": len(rows),
    "batch": config.batch_size,
    "crop_samples": widest,
    "dtype": config.model.dtype,
    "remat_policy": config.model.remat_policy,
    "scan_layers": config.model.scan_layers,
    "lower_s": round(lowered_at - start, 1),
    "compile_s": round(compiled_at - lowered_at, 1),
    "per_chip_gib": round(per_chip, 2),
    "hbm_gib": chip.hbm_gib,
    "fits": per_chip < 0.95 * chip.hbm_gib,
    "temp_gib": round(mem.temp_size_in_bytes / 2**30, 2),
    "argument_gib": round(mem.argument_size_in_bytes / 2**30, 2),
    # XLA's count sees a scanned layer once; the analytic count has every layer (models/flops.py)
    "analytic_tflop_per_step_per_chip": float(f"{model_flops / 1e12:.3g}"),
    "xla_tflop_per_step_per_chip": round(float(cost.get("flops", 0.0)) / 1e12, 2) if cost else None,
  }
  print(f"parameter shardings on mesh {dict(layout.mesh.shape)}:\n{layout.table}")
  print(" ".join(f"{k}={v}" for k, v in figures.items()))
  print(f"{'FITS' if figures['fits'] else 'DOES NOT FIT'}: {per_chip:.2f} GiB of {chip.hbm_gib} GiB HBM per chip")
  figures["roofline"] = roofline_figures(compiled.as_text(), cost, chip, model_flops)
  print("\n".join(roofline_lines(figures["roofline"])))
  write_json(FLAGS.json, figures)


def run():
  define_flags()
  app.run(main, flags_parser=config_flags_parser("w2v2-aot"))


if __name__ == "__main__":
  run()
