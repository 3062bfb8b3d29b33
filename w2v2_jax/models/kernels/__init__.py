"""Platform kernels behind one switch, `model.kernels`, resolved once from the platform a step compiles for.

  xla        the plain model, as the layers read: what XLA compiles well on TPU and GPU
  cpu        XLA:CPU forms of the same maps (cpu.py, dft_conv.py): equal values and gradients, faster there
  gpu_flash  attention's core as fused Pallas/Triton kernels (flash_attention.py); the rest as xla
  auto       cpu when compiling for CPU, else xla

The compile target is the mesh's devices, not the host: w2v2-aot on a CPU host builds TPU programs with
the plain kernels. gpu_flash on a CPU host runs the CPU forms with XLA's attention core (the same map),
so a GPU config runs there too; TPU refuses it (no Triton).
"""

from __future__ import annotations

import dataclasses

NAMES = ("auto", "xla", "cpu", "gpu_flash")


def resolve(name: str, platform: str | None = None) -> str:
  """The kernels to build with: `name` for a compile target `platform` (default: the current mesh's
  devices, else JAX's default backend)."""
  if name not in NAMES:
    raise ValueError(f"model.kernels must be one of {', '.join(NAMES)}, got {name!r}")
  if platform is None:
    from w2v2_jax.parallel import compile_platform  # pylint: disable=import-outside-toplevel

    platform = compile_platform()
  if name == "gpu_flash" and platform == "tpu":
    raise ValueError("--config.model.kernels=gpu_flash: the fused kernels are Triton (GPU); use auto or xla on TPU")
  if name == "auto" or (name == "gpu_flash" and platform == "cpu"):
    return "cpu" if platform == "cpu" else "xla"
  return name


def resolved(cfg, platform: str | None = None):
  """`cfg` (a ModelConfig) with its kernels resolved for `platform` (see resolve)."""
  return dataclasses.replace(cfg, kernels=resolve(cfg.kernels, platform))
