"""Small building blocks shared by the model files: fp32 norms, dense layers with logical axes, GELU,
dropout with cheaper masks."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax.models.kernels import cpu


def partitioned(init, names):
  """An initializer that carries logical axis names, for sharding rules in the config."""
  return nn.with_logical_partitioning(init, names)


def gelu(x):
  """Exact GELU written as torch writes it, x/2 (1 + erf(x/sqrt 2)); flax's default is the tanh approximation.

  erf, not erfc: jax.nn.gelu(approximate=False) uses erfc, which XLA:CPU evaluates markedly slower;
  the two agree to 1e-6 (docs/performance.md).
  """
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed in float32 (two-pass variance); output in `dtype`.

  With `reduce_axis=-2` it normalises each channel over time instead: GroupNorm with one group per
  channel, the BASE extractor's norm on conv 0. With `then_gelu` it returns gelu(LayerNorm(x)), GELU
  after the cast, in `dtype` (kernels="cpu": one function with its own gradient, GELU in float32).
  """

  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  reduce_axis: int = -1
  then_gelu: bool = False
  kernels: str = "xla"

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],), jnp.float32)
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (x.shape[-1],), jnp.float32)
    axis = self.reduce_axis - x.ndim if self.reduce_axis >= 0 else self.reduce_axis
    if self.then_gelu and axis in (-1, -2) and self.kernels == "cpu":
      return cpu.layer_norm_gelu(x, scale, bias, self.eps, axis).astype(self.dtype)
    mean = x.mean(axis, keepdims=True)
    var = jnp.square(x - mean).mean(axis, keepdims=True)
    y = ((x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)
    return gelu(y) if self.then_gelu else y


def _rotate_left(x, bits: int):
  return (x << jnp.uint32(bits)) | (x >> jnp.uint32(32 - bits))


def threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 (20 rounds; Salmon et al. 2011), the bits of jax's threefry2x32_p, written out in full.

  jax lowers its threefry on CPU as a loop of five steps, each writing its state to memory; written
  out, XLA fuses the whole hash with the counters that feed it and the compare that reads it
  (docs/performance.md).
  """
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x1 = x1 + x2
      x2 = _rotate_left(x2, r) ^ x1
    x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x1, x2


COUNTER_LIMIT = 2**32  # Threefry's counter words are 32-bit


def wide_counters(shape) -> bool | None:
  """How keep_mask counts a threefry mask of `shape`: True within each index of the leading axis
  (COUNTER_LIMIT elements or more), False over the whole array, None: past that too (bernoulli)."""
  if not shape:
    return None
  wide = math.prod(shape) >= COUNTER_LIMIT
  if wide and (len(shape) < 2 or math.prod(shape[1:-1]) * -(-shape[-1] // 4) >= COUNTER_LIMIT):
    return None
  return wide


def keep_mask(key, shape, keep_prob: float):
  """Bernoulli(keep_prob) of `shape`, four 16-bit draws per Threefry evaluation (keep_prob to 1/65536).

  jax.random.bernoulli with partitionable Threefry (jax's default) hashes once per element, and
  dropout's hashes are then a visible part of the CPU step (docs/performance.md). Each 2x32 hash
  gives 64 bits: here they are four 16-bit uniforms, counted by each element's index in the global
  array, so a sharded step draws the same mask as one device. Arrays of COUNTER_LIMIT elements or
  more count within each index of the leading axis, which becomes the hash's high word. Other key
  kinds use jax.random.bernoulli.
  """
  threshold = round(keep_prob * 65536)
  if threshold >= 65536 or threshold <= 0:  # also keeps 65536 from wrapping to 0 as a uint16
    return jnp.full(shape, threshold > 0)
  wide = wide_counters(shape)
  if wide is None or str(jax.random.key_impl(key)) != "threefry2x32":
    return jax.random.bernoulli(key, keep_prob, shape)
  groups = -(-shape[-1] // 4)
  grouped = (*shape[:-1], groups)
  counts = jnp.zeros(grouped, jnp.uint32)
  for axis in range(1 if wide else 0, len(grouped)):
    counts = counts + jax.lax.broadcasted_iota(jnp.uint32, grouped, axis) * jnp.uint32(math.prod(grouped[axis + 1 :]))
  high = jax.lax.broadcasted_iota(jnp.uint32, grouped, 0) if wide else jnp.zeros_like(counts)
  k1, k2 = jax.random.key_data(key)
  bits = threefry2x32(k1, k2, high, counts)
  uniform16 = jax.lax.bitcast_convert_type(jnp.stack(bits, -1), jnp.uint16).reshape(*shape[:-1], 4 * groups)
  return uniform16[..., : shape[-1]] < threshold


class Dropout(nn.Module):
  """nn.Dropout (inverted: kept values scaled by 1 / (1 - rate)) with the cheaper keep_mask."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool, rng=None):
    return self.apply_mask(x, self.mask(x.shape, deterministic, rng))

  def mask(self, shape, deterministic: bool, rng=None):
    """The keep mask a call on an array of `shape` draws (None: nothing dropped), to apply in pieces."""
    if self.rate == 1.0 and not deterministic:
      return jnp.zeros(shape, bool)  # needs no dropout rng, as before
    key = self.key(deterministic, rng)
    return None if key is None else keep_mask(key, shape, 1.0 - self.rate)

  def key(self, deterministic: bool, rng=None):
    """The dropout key that mask() hashes (None: nothing dropped), for kernels that draw the mask inside:
    `rng` when the caller hands one down (the encoder layers do), else the module's "dropout" stream."""
    if deterministic or self.rate == 0.0:
      return None
    return self.make_rng("dropout") if rng is None else rng

  def apply_mask(self, x, keep):
    if keep is None:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


def dense(features, names, dtype, kernel_init=nn.initializers.normal(0.02), use_bias=True, name=None, kernels="xla"):
  """nn.Dense with fp32 parameters, a compute dtype, and logical axis names (in, out) on the kernel."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=partitioned(kernel_init, names),
    bias_init=partitioned(nn.initializers.zeros, names[1:]),
    name=name,
    dot_general=cpu.matmul_dot_general if kernels == "cpu" else None,
  )


def uniform_range(low, high):
  """U(low, high) initializer (torch's default Linear/Conv bias init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, low, high)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def grad_multiply(x, scale):
  """Identity forward; multiplies the incoming gradient by `scale` (fairseq's GradMultiply)."""
  return x


def _grad_multiply_fwd(x, scale):
  return x, None


def _grad_multiply_bwd(scale, _, g):
  return (g * jnp.asarray(scale, g.dtype),)


grad_multiply.defvjp(_grad_multiply_fwd, _grad_multiply_bwd)
