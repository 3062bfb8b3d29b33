"""XLA:CPU forms of the model's maps (model.kernels=cpu): each equals the plain form in value and gradient.

- `matmul_dot_general`: nn.Dense's matmul with the weight gradient from [rows, in] x [rows, out]
  matrices; with autodiff's [b, t, .] operands XLA:CPU first copies one into a transposed layout.
- `layer_norm_gelu`: gelu(LayerNorm(x)) (or per-channel GroupNorm over time) with a hand-written
  backward. XLA:CPU's reduction fusions take their broadcast operands materialised, so autodiff's form
  writes the scale and 1/std broadcast to full size; here row means are matrix-vector products and
  each full-size quantity is written once.
- `materialize_grad`: a pre-LN stack's residual gradient computed once, in memory; XLA:CPU otherwise
  fuses the chain of adds across all layers into every consumer and recomputes it there.
- `attention_pieces`: attention's core as two independent halves of the batch; XLA:CPU runs a batched
  matmul on one core, and runs parts of the halves side by side.
The positional conv's form is dft_conv.py. Measured gains: docs/performance.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import w2v2_jax.models.layers as layers  # its gelu; layers imports this module too


def _row_mean(x, weights=None):
  """Mean over the last axis of x (times `weights`) as a matrix-vector product, [..., 1]."""
  w = jnp.ones(x.shape[-1:], x.dtype) if weights is None else weights
  return jnp.dot(x, (w / x.shape[-1])[:, None], precision=jax.lax.Precision.HIGHEST)


def _mean(x, axis: int):
  """Mean over `axis` (-1: channels, as a matrix-vector product; -2: time, XLA's column reduction)."""
  return _row_mean(x) if axis == -1 else jnp.mean(x, axis, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_gelu(x, scale, bias, eps: float, axis: int = -1):
  """gelu(LayerNorm(x)) over axis -1 (or GroupNorm per channel over time, axis -2), with a hand-written
  backward (reverse mode only: no jvp). `scale` and `bias` are per channel (the last axis)."""
  return _layer_norm_gelu_fwd(x, scale, bias, eps, axis)[0]


def _layer_norm_gelu_fwd(x, scale, bias, eps, axis):
  mean = _mean(x, axis)
  rstd = jax.lax.rsqrt(_mean(jnp.square(x - mean), axis) + eps)
  return layers.gelu((x - mean) * rstd * scale + bias), (x, mean, rstd, scale, bias)


def _layer_norm_gelu_bwd(eps, axis, residuals, grad):
  del eps
  x, mean, rstd, scale, bias = residuals
  x_hat = (x - mean) * rstd
  z = x_hat * scale + bias
  # d gelu(z) / dz = Phi(z) + z phi(z)
  dz = grad * (0.5 * (1 + jax.lax.erf(z * 0.7071067811865476)) + z * jnp.exp(-0.5 * z * z) * 0.3989422804014327)
  dz_x_hat = dz * x_hat
  # the norm's input gradient: rstd (dx_hat - mean(dx_hat) - x_hat mean(dx_hat x_hat)), dx_hat = dz scale
  rows = tuple(range(x.ndim - 1))
  if axis == -1:
    dx = rstd * (dz * scale - _row_mean(dz, scale) - x_hat * _row_mean(dz_x_hat, scale))
    return dx, jnp.sum(dz_x_hat, rows), jnp.sum(dz, rows)
  # over time the scale is constant along the axis; the parameter sums reuse the means
  dz_mean, dz_x_hat_mean = jnp.mean(dz, axis, keepdims=True), jnp.mean(dz_x_hat, axis, keepdims=True)
  dx = rstd * scale * (dz - dz_mean - x_hat * dz_x_hat_mean)
  n = x.shape[axis]
  return dx, n * jnp.sum(dz_x_hat_mean, rows), n * jnp.sum(dz_mean, rows)


layer_norm_gelu.defvjp(_layer_norm_gelu_fwd, _layer_norm_gelu_bwd)


@jax.custom_vjp
def _matmul(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, w):
  return _matmul(x, w), (x, w)


def _matmul_bwd(residuals, g):
  x, w = residuals
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
  dw = jax.lax.dot_general(rows(x), rows(g), (((0,), (0,)), ((), ())))
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's dot_general: x [..., in] x w [in, out], differentiated by _matmul_bwd."""
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or precision or preferred_element_type:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)
  return _matmul(lhs, rhs)


@jax.custom_vjp
def materialize_grad(x):
  """Identity forward; backward, the incoming gradient is computed once, in memory, before it flows on.

  XLA deletes optimization barriers, but not a conditional, so the gradient goes through one. Its other
  branch fills NaN when the first element is already non-finite: a non-finite gradient stays
  non-finite, and the train step skips it either way.
  """
  return x


def _materialize_grad_fwd(x):
  return x, None


def _materialize_grad_bwd(_, g):
  finite = jnp.isfinite(g.reshape(-1)[0])
  return (jax.lax.cond(finite, lambda g: g, lambda g: jnp.full_like(g, jnp.nan), g),)


materialize_grad.defvjp(_materialize_grad_fwd, _materialize_grad_bwd)


def attention_pieces(batch: int) -> int:
  """How many independent pieces of the batch attention's core runs as: 2 on one device (an even batch),
  else 1 (under a mesh of several devices the halves would reshard a sharded batch)."""
  mesh = jax.sharding.get_abstract_mesh()
  one_device = mesh.empty or mesh.size == 1
  return 2 if one_device and batch % 2 == 0 else 1
