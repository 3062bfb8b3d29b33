"""Mesh, logical-axis sharding rules and the parameter sharding table.

Mesh axes are (data, fsdp, tensor). Modules name logical axes on parameters and activations; the
rules that map them onto the mesh live in the experiment config (`config.mesh.rules`), with
DEFAULT_RULES as the FSDP default: parameters sharded over `fsdp` along their largest named dim,
MLP/attention projections over `tensor`, the batch over (data, fsdp).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_mlp", "tensor"),
  ("mlp", "tensor"),
  ("joined_kv", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("conv_out", "fsdp"),
  ("codevectors", "fsdp"),
  ("mlp", "fsdp"),
  ("joined_kv", "fsdp"),
  ("vq_dim", "fsdp"),
  ("layers", None),  # the stacked layer axis of model.scan_layers: each device holds its share of every layer
)
REPLICATED_LIMIT = 2**20  # elements; a bigger parameter replicated under FSDP is an error


def with_axis_rules(fn, rules):
  """`fn` traced under flax's logical axis `rules`, so that nn.with_logical_constraint inside binds."""
  import functools  # pylint: disable=import-outside-toplevel

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def compile_platform() -> str:
  """The platform a step is being compiled for: the mesh's devices (AOT for TPU from a CPU host), else the default."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and getattr(mesh, "abstract_device", None) is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def mesh_platform(mesh: jax.sharding.Mesh) -> str:
  """The platform of a mesh's devices (a TPU topology's, when compiling ahead of time on a CPU host)."""
  return mesh.devices.flat[0].platform


def make_mesh(shape: dict, devices=None) -> jax.sharding.Mesh:
  """Mesh over (data, fsdp, tensor); one size may be -1 (the rest of the devices). Devices in jax's physical
  order, with the batch positions grouped by process (batch_slots_by_process)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(shape.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh: {dict(zip(AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"config.mesh: {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, there are {len(devices)}"
    )
  # Auto axes: GSPMD propagates shardings from the declared parameter/batch shardings and the
  # modules' logical constraints (Explicit sharding-in-types is not what Linen emits).
  try:
    physical = jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices).devices
  except NotImplementedError:  # a TPU torus whose axes the mesh's sizes split (e.g. data=2 on v5p-128's 4x4x4)
    physical = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(batch_slots_by_process(physical), AXES, axis_types=(AxisType.Auto,) * 3)


def batch_slots_by_process(devices: np.ndarray) -> np.ndarray:
  """A [data, fsdp, tensor] device array with its batch slots (the data x fsdp positions) stably sorted by
  process index: process p then holds the p-th contiguous block of the batch, as AudioInput's default rows.

  jax.make_mesh orders a TPU slice's devices along the torus, which interleaves the hosts along the batch
  (v5p-128, fsdp=64, batch 512: process 0 would read rows 0:8, 32:40, ...); a process's slots keep jax's order.
  """
  slots = devices.reshape(devices.shape[0] * devices.shape[1], devices.shape[2])
  order = sorted(range(len(slots)), key=lambda i: sorted({d.process_index for d in slots[i]}))
  return slots[order].reshape(devices.shape)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def process_rows(sharding, global_batch: int, process_count: int | None = None) -> dict[int, tuple[int, int]]:
  """{process_index: (start, stop)}: the rows of a [global_batch, ...] array split by `sharding` on dim 0 that
  each process's devices hold, read from the devices' process_index (so any process of a compile-only topology too).

  Each process's input pipeline reads one slice of the batch, so every process must hold one contiguous block,
  all of one size; any other layout is refused with a one-line error naming the config key to change.
  `process_count` defaults to the larger of the runtime's and the mesh's (a process without devices holds nothing).
  """
  mesh = dict(sharding.mesh.shape)
  axes = sharding.spec[0] if len(sharding.spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  shards = math.prod(mesh[a] for a in axes)
  if global_batch % shards:
    raise ValueError(
      f"config.batch_size={global_batch} does not divide over the mesh's batch axes "
      f"({' x '.join(f'{a}={mesh[a]}' for a in axes)} = {shards} shards); mesh {mesh}"
    )
  held: dict[int, set] = {}
  for device, index in sharding.devices_indices_map((global_batch,)).items():
    held.setdefault(device.process_index, set()).update(range(*index[0].indices(global_batch)))
  count = max(jax.process_count() if process_count is None else process_count, max(held) + 1)
  empty = [p for p in range(count) if p not in held]
  if empty:
    raise ValueError(
      f"config.mesh={mesh}: process(es) {empty[:8]} of {count} hold no batch rows (no device in "
      "the mesh); the mesh must span every process's devices"
    )
  rows = {}
  for p in range(count):
    r = sorted(held[p])
    breaks = [i for i in range(1, len(r)) if r[i] != r[i - 1] + 1]
    if breaks:
      runs = [f"{r[a]}:{r[b - 1] + 1}" for a, b in zip([0] + breaks, breaks + [len(r)])]
      raise ValueError(
        f"config.mesh={mesh}: process {p}'s devices hold batch rows {', '.join(runs[:4])}"
        f"{' ...' if len(runs) > 4 else ''}, not one contiguous block; change config.mesh "
        "(e.g. a config.mesh.tensor that divides each process's devices)"
      )
    rows[p] = (r[0], r[-1] + 1)
  sizes = sorted({b - a for a, b in rows.values()})
  if len(sizes) > 1:
    raise ValueError(
      f"config.mesh={mesh}: processes hold different numbers of batch rows {sizes} of "
      f"config.batch_size={global_batch}; every process must feed the same number"
    )
  return rows


def constrain_batch(x, axis: int = 0):
  """x split over the batch axes on `axis` and replicated otherwise (a no-op outside a mesh): pins an activation
  that GSPMD would otherwise shard like a parameter it meets (and then replicate to reshard)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, P(*(None,) * axis, BATCH_AXES))


def param_shardings(boxed_abstract, mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of boxed (nn.Partitioned) abstract parameters."""
  specs = nn.get_partition_spec(boxed_abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def sharding_table(abstract_params, shardings, mesh) -> tuple[str, list[str]]:
  """A printable table (name, shape, spec, MiB per device) and the names of large replicated params."""
  rows, offenders = [], []
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  total = 0.0
  for (path, leaf), sh in zip(flat, flat_sh):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    shards = math.prod(mesh.shape[a] for dim in sh.spec if dim for a in ((dim,) if isinstance(dim, str) else dim))
    mib = leaf.size * leaf.dtype.itemsize / shards / 2**20
    total += mib
    rows.append(f"  {name:<70} {str(tuple(leaf.shape)):<18} {str(tuple(sh.spec)):<28} {mib:9.2f}")
    if mesh.shape["fsdp"] > 1 and shards == 1 and leaf.size > REPLICATED_LIMIT:
      offenders.append(name)
  head = f"  {'parameter':<70} {'shape':<18} {'spec':<28} {'MiB/dev':>9}"
  return "\n".join([head] + rows + [f"  total parameter memory per device: {total:.1f} MiB"]), offenders
