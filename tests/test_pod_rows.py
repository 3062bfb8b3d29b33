"""Each process of a pod reads one contiguous, equal block of the global batch, for every slice w2v2-aot knows
under every recipe's mesh; layouts that cannot work are refused, naming the config key.

The slices are libtpu's compile-only topology descriptions (pip install -e '.[tpu]'): their devices carry
the process_index of their TPU host, so every process's rows are computed on this one CPU host.
"""

import functools
import glob
import importlib.util
import json
import os
import subprocess
import sys

import experiment_file
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from w2v2_jax import parallel
from w2v2_jax.cli import aot
from w2v2_jax.data import pipeline

EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(EXPERIMENTS, "*.py")))
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="compile-only TPU topologies need libtpu (pip install -e '.[tpu]')"
)


@functools.cache
def slice_devices(name: str):
  return aot.topology_devices(name)[0]


@functools.cache
def recipe(name: str):
  return experiment_file.config(name)


def mesh_of(config, devices):
  return parallel.make_mesh({a: config.mesh[a] for a in parallel.AXES}, devices)


def test_one_process_holds_the_whole_batch():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  sharding = parallel.batch_sharding(mesh)
  assert parallel.process_rows(sharding, 16) == {0: (0, 16)}
  assert pipeline.local_rows(sharding, 16) == (0, 16)
  with pytest.raises(ValueError, match=r"config.batch_size=12 does not divide .*data=2 x fsdp=4 = 8"):
    parallel.process_rows(sharding, 12)


def test_mesh_order_is_jaxs_on_one_process():
  """Regrouping batch slots by process changes nothing where every device is one process's."""
  for shape in ((2, 4, 1), (2, 2, 2), (1, 8, 1)):
    ours = parallel.make_mesh(dict(zip(parallel.AXES, shape))).devices
    jaxs = jax.make_mesh(shape, parallel.AXES, axis_types=(AxisType.Auto,) * 3).devices
    assert [d.id for d in ours.flat] == [d.id for d in jaxs.flat]


@needs_libtpu
@pytest.mark.parametrize("recipe_name", RECIPES)
@pytest.mark.parametrize("slice_name", aot.SLICES)
def test_every_process_reads_one_equal_block(slice_name, recipe_name):
  config = recipe(recipe_name)
  devices = slice_devices(slice_name)
  processes = sorted({d.process_index for d in devices})
  mesh = mesh_of(config, devices)
  sharding = parallel.batch_sharding(mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % shards:
    with pytest.raises(ValueError, match=rf"^config.batch_size={config.batch_size} does not divide"):
      parallel.process_rows(sharding, config.batch_size)
    return
  rows = parallel.process_rows(sharding, config.batch_size)
  assert sorted(rows) == processes
  # Checked here from the devices themselves: each device's rows lie in its process's block ...
  for device, index in sharding.devices_indices_map((config.batch_size,)).items():
    start, stop = rows[device.process_index]
    assert start <= index[0].start and index[0].stop <= stop
  # ... and the blocks (tensor=1 in every recipe: none shared) tile the batch in equal parts.
  blocks = sorted(rows.values())
  size = config.batch_size // len(processes)
  assert blocks == [(i * size, (i + 1) * size) for i in range(len(processes))]


@needs_libtpu
def test_the_torus_order_alone_interleaves_the_hosts():
  """Why make_mesh regroups: jax's device order for a v5p-128 torus gives process 0 scattered rows, refused."""
  devices = slice_devices("v5p-128")
  torus = jax.make_mesh((1, 64, 1), parallel.AXES, devices=devices, axis_types=(AxisType.Auto,) * 3)
  with pytest.raises(ValueError, match=r"^config.mesh=.*process 0's devices hold batch rows 0:\d+, \d+:\d+"):
    parallel.process_rows(parallel.batch_sharding(torus), 512)
  regrouped = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  assert sorted(d.id for d in regrouped.devices.flat) == sorted(d.id for d in torus.devices.flat)
  assert len(set(parallel.process_rows(parallel.batch_sharding(regrouped), 512).values())) == 16


@needs_libtpu
def test_layouts_that_cannot_feed_every_process_are_refused():
  devices = slice_devices("v5p-16")  # 2 hosts of 4 chips
  by_process = {p: [d for d in devices if d.process_index == p] for p in (0, 1)}
  one_host = Mesh(np.array(by_process[0]).reshape(1, 4, 1), parallel.AXES, axis_types=(AxisType.Auto,) * 3)
  with pytest.raises(ValueError, match=r"^config.mesh=.*process\(es\) \[1\] of 2 hold no batch rows"):
    parallel.process_rows(parallel.batch_sharding(one_host), 8, process_count=2)
  lopsided = Mesh(
    np.array(by_process[0] + by_process[1][:2]).reshape(1, 6, 1), parallel.AXES, axis_types=(AxisType.Auto,) * 3
  )
  with pytest.raises(ValueError, match=r"^config.mesh=.*different numbers of batch rows \[4, 8\]"):
    parallel.process_rows(parallel.batch_sharding(lopsided), 12)
  interleaved = Mesh(
    np.array([by_process[i % 2][i // 2] for i in range(8)]).reshape(1, 8, 1),
    parallel.AXES,
    axis_types=(AxisType.Auto,) * 3,
  )
  with pytest.raises(ValueError, match=r"not one contiguous block"):
    parallel.process_rows(NamedSharding(interleaved, P(parallel.BATCH_AXES)), 8)


def _aot(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "w2v2_jax.cli.aot", *args], capture_output=True, text=True, env=env, timeout=300
  )


@needs_libtpu
@pytest.mark.slow
def test_aot_prints_each_process_rows_or_one_line_naming_the_key():
  config = os.path.join(EXPERIMENTS, "base_librispeech.py")
  ok = _aot(f"--config={config}", "--topology=v5p-64", "--rows_only")
  assert ok.returncode == 0, ok.stderr[-2000:]
  lines = [line for line in ok.stdout.splitlines() if line.startswith("process ")]
  assert lines == [f"process {p}: batch rows {48 * p}:{48 * (p + 1)} (48)" for p in range(8)], ok.stdout
  bad = _aot(f"--config={config}", "--topology=v5p-64", "--rows_only", "--config.batch_size=100")
  errors = [line for line in bad.stderr.splitlines() if line.startswith("w2v2-aot: error:")]
  assert bad.returncode == 1 and len(errors) == 1 and "config.batch_size=100" in errors[0], bad.stderr[-2000:]


@needs_libtpu
@pytest.mark.slow
def test_aot_compiles_a_scanned_tiny_model_for_a_slice_and_writes_its_figures(tmp_path):
  """The documented command to completion, at tiny size: exit 0, the verdict line, and the JSON figures."""
  config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_config.py")
  out = tmp_path / "aot.json"
  run = _aot(
    f"--config={config}:unused,2",
    "--topology=v5p-8",
    "--config.mesh.data=1",
    "--config.model.scan_layers=True",
    f"--json={out}",
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert "FITS:" in run.stdout, run.stdout[-2000:]
  figures = json.loads(out.read_text())
  assert figures["chips"] == 4 and figures["scan_layers"] is True and figures["fits"] is True
  assert figures["compile_s"] > 0 and figures["lower_s"] > 0 and 0 < figures["per_chip_gib"] < 95
  assert figures["analytic_tflop_per_step_per_chip"] > 0
  roof = figures["roofline"]  # the step at the chip's roofline, every scanned layer counted
  assert roof["chip"] == "TPU v5p" and roof["step_s"] > 0 and 0 < roof["mfu"] < 1 and len(roof["top_ops"]) == 10
  assert roof["unknown_trip_counts"] == [] and 0.9 < roof["vs_xla_flops"] < 1.1, roof
  assert "roofline on TPU v5p" in run.stdout


def _lowered_train_step(config, devices) -> str:
  """StableHLO of w2v2-train's step for `devices`, lowered (not compiled) on this host."""
  import jax.numpy as jnp

  from w2v2_jax.train import loop

  layout = loop.plan_layout(config, devices)
  batch_sh = parallel.batch_sharding(layout.mesh)
  batch = {
    "audio": jax.ShapeDtypeStruct((config.batch_size, 16000), jnp.int16, sharding=batch_sh),
    "lengths": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sh),
  }
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)  # outside the mesh: no TPU runs it
  train_step, _ = loop.jit_steps(config, layout)
  with jax.set_mesh(layout.mesh):
    return train_step.lower(layout.abstract_state, batch, key).as_text()


@needs_libtpu
def test_the_kernel_switch_follows_the_compile_target_not_the_host():
  """model.kernels=auto: the step lowered on this CPU host for a v5p slice has XLA's grouped positional
  conv; lowered for this host's own CPU devices it has the CPU form instead (DFT-domain matmuls)."""
  import re

  import train_config

  config = train_config.get_config("unused,2")
  config.mesh.data, config.mesh.fsdp = 1, 4
  assert config.model.kernels == "auto"
  grouped = lambda text: {int(g) for g in re.findall(r"feature_group_count = (\d+)", text)} - {1}  # noqa: E731
  groups = config.model.num_conv_pos_embedding_groups
  assert grouped(_lowered_train_step(config, slice_devices("v5p-8"))) == {groups}
  assert grouped(_lowered_train_step(config, jax.devices()[:4])) == set()
