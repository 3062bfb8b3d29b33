"""Attention's core as fused GPU kernels (Pallas, Triton): scores, key padding, softmax and dropout.

XLA's attention writes the [b, heads, t, t] scores, probabilities and dropout mask to memory several
times a layer (~4 GB per layer for BASE on 8 crops of 15.6 s, by a roofline estimate;
docs/performance.md). These kernels keep a block of scores on chip instead (online softmax forward,
recomputation backward).

The dropout mask is `layers.keep_mask`'s bit for bit: each block hashes the same global counters
with the same Threefry, so values and gradients equal the XLA core's (the tests run the kernels in
Pallas's interpret mode on CPU). q arrives scaled; layout [b, heads, t, head_dim].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from w2v2_jax import parallel
from w2v2_jax.models import layers
from w2v2_jax.models.layers import threefry2x32

_NEG = float(jnp.finfo(jnp.float32).min)  # the XLA core's masked logit


def _keep(seed_ref, b, h, rows, first_col, block_k, *, heads: int, t: int, threshold: int, wide: bool):
  """keep_mask's bits at query `rows` x keys [first_col, first_col + block_k) of global utterance b, head h.

  One Threefry per 4 keys, its two words split into four 16-bit draws in keep_mask's order (interleaved
  along the keys with two-way stacks, the only kind Triton lowers). `wide`: past 2^32 elements the
  utterance is the hash's high word, as in keep_mask.
  """
  u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)  # noqa: E731
  groups = u32(-(-t // 4))
  g = u32(first_col // 4) + jax.lax.iota(jnp.uint32, block_k // 4)
  within = (u32(h) * u32(t) + u32(rows)[:, None]) * groups + g[None, :]
  if wide:
    high, count = jnp.broadcast_to(u32(b), within.shape), within
  else:
    high, count = jnp.zeros_like(within), u32(b) * u32(heads) * u32(t) * groups + within
  x0, x1 = threefry2x32(seed_ref[0], seed_ref[1], high, count)
  words = jnp.stack([x0, x1], -1).reshape(rows.shape[0], block_k // 2)
  u16 = jnp.stack([words & jnp.uint32(0xFFFF), words >> jnp.uint32(16)], -1).reshape(rows.shape[0], block_k)
  return u16 < jnp.uint32(threshold)


def _utterance_and_head(seed_ref):
  """This program's global utterance and head: its grid position plus the piece's offsets in the seed."""
  return (pl.program_id(0).astype(jnp.uint32) + seed_ref[2], pl.program_id(1).astype(jnp.uint32) + seed_ref[3])


def _scores(q, k_ref, valid_ref, start, block_k):
  keys = pl.ds(start * block_k, block_k)
  s = pltriton.dot(q, k_ref[keys, :], trans_b=True).astype(jnp.float32)
  return jnp.where(valid_ref[keys][None, :] != 0, s, _NEG), keys


def _fwd_kernel(seed_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, *, block_k, drop):
  block_q, d = q_ref.shape
  b, h = _utterance_and_head(seed_ref)
  rows = pl.program_id(2) * block_q + jax.lax.iota(jnp.int32, block_q)
  q = q_ref[...]

  def body(j, carry):
    m, l, acc = carry
    s, keys = _scores(q, k_ref, valid_ref, j, block_k)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(p, axis=1)
    if drop is not None:
      p = jnp.where(_keep(seed_ref, b, h, rows, j * block_k, block_k, **drop["hash"]), p * drop["scale"], 0.0)
    acc = acc * alpha[:, None] + pltriton.dot(p.astype(v_ref.dtype), v_ref[keys, :]).astype(jnp.float32)
    return m_new, l, acc

  init = (
    jnp.full((block_q,), _NEG, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
    jnp.zeros((block_q, d), jnp.float32),
  )
  m, l, acc = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dkdv_kernel(
  seed_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block_q, drop
):
  """dK and dV of one block of keys, over all queries."""
  block_k, d = k_ref.shape
  b, h = _utterance_and_head(seed_ref)
  first_col = pl.program_id(2) * block_k
  k, v = k_ref[...], v_ref[...]
  valid = valid_ref[...] != 0

  def body(i, carry):
    dk, dv = carry
    rows_sl = pl.ds(i * block_q, block_q)
    q, do = q_ref[rows_sl, :], do_ref[rows_sl, :]
    s = jnp.where(valid[None, :], pltriton.dot(q, k, trans_b=True).astype(jnp.float32), _NEG)
    p = jnp.exp(s - lse_ref[rows_sl][:, None])
    dp = pltriton.dot(do, v, trans_b=True).astype(jnp.float32)
    p_drop = p
    if drop is not None:
      rows = i * block_q + jax.lax.iota(jnp.int32, block_q)
      keep = _keep(seed_ref, b, h, rows, first_col, block_k, **drop["hash"])
      p_drop = jnp.where(keep, p * drop["scale"], 0.0)
      dp = jnp.where(keep, dp * drop["scale"], 0.0)
    ds = p * (dp - delta_ref[rows_sl][:, None])
    dv = dv + pltriton.dot(p_drop.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
    dk = dk + pltriton.dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
    return dk, dv

  zeros = jnp.zeros((block_k, d), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block_q, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, dq_ref, *, block_k, drop):
  block_q, d = q_ref.shape
  b, h = _utterance_and_head(seed_ref)
  rows = pl.program_id(2) * block_q + jax.lax.iota(jnp.int32, block_q)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq):
    s, keys = _scores(q, k_ref, valid_ref, j, block_k)
    p = jnp.exp(s - lse[:, None])
    dp = pltriton.dot(do, v_ref[keys, :], trans_b=True).astype(jnp.float32)
    if drop is not None:
      dp = jnp.where(_keep(seed_ref, b, h, rows, j * block_k, block_k, **drop["hash"]), dp * drop["scale"], 0.0)
    ds = p * (dp - delta[:, None])
    return dq + pltriton.dot(ds.astype(k_ref.dtype), k_ref[keys, :]).astype(jnp.float32)

  dq = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body, jnp.zeros((block_q, d), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


class _Plan:
  """Static shapes and options of one call: padded length, blocks, grid, dropout hash parameters."""

  def __init__(self, q_shape, rate: float, whole: tuple[int, int], block: int, interpret: bool):
    b, local_heads, t, _ = q_shape
    if block < 4 or block & (block - 1):
      raise ValueError(
        f"flash_attention: block {block} is not a power of two >= 4 (Triton's blocks; four draws per hash)"
      )
    self.block = block
    self.padded = -(-t // block) * block
    self.grid = (b, local_heads, self.padded // block)
    self.interpret = interpret
    self.drop = None
    if rate > 0.0:
      wide = layers.wide_counters((*whole, t, t))
      if wide is None:
        raise ValueError(
          f"--config.model.kernels=gpu_flash: {t} frames x {whole[1]} heads is past keep_mask's "
          "counters (it falls back to jax.random.bernoulli, which the kernels cannot draw); use xla"
        )
      self.drop = {
        "scale": 1.0 / (1.0 - rate),
        "hash": {"heads": whole[1], "t": t, "threshold": round((1.0 - rate) * 65536), "wide": wide},
      }

  def call(self, kernel, out_shape, in_specs, out_specs, args, **kw):
    return pl.pallas_call(
      functools.partial(kernel, drop=self.drop, **kw),
      out_shape=out_shape,
      grid=self.grid,
      in_specs=in_specs,
      out_specs=out_specs,
      interpret=self.interpret,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
    )(*args)

  def block_spec(self, rows: int | None, d: int | None = None):
    """A [rows, d] (or [rows]) block of a [b, heads, t(, d)] array: the grid's block, or the whole length."""
    if d is None:
      if rows is None:
        return pl.BlockSpec((None, None, self.padded), lambda i, j, r: (i, j, 0))
      return pl.BlockSpec((None, None, rows), lambda i, j, r: (i, j, r))
    if rows is None:
      return pl.BlockSpec((None, None, self.padded, d), lambda i, j, r: (i, j, 0, 0))
    return pl.BlockSpec((None, None, rows, d), lambda i, j, r: (i, j, r, 0))

  seed_spec = pl.BlockSpec((4,), lambda i, j, r: (0,))

  def valid_spec(self, whole: bool):
    if whole:
      return pl.BlockSpec((None, self.padded), lambda i, j, r: (i, 0))
    return pl.BlockSpec((None, self.block), lambda i, j, r: (i, r))


def _pad(x, padded):
  return jnp.pad(x, [(0, 0)] * 2 + [(0, padded - x.shape[2])] + [(0, 0)] * (x.ndim - 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def flash_attention(
  q, k, v, key_valid, seed, rate: float, whole: tuple[int, int], block: int = 64, interpret: bool = False
):
  """softmax(q k^T over valid keys) with dropout at `rate`, times v; q, k, v [b, heads, t, d].

  key_valid [b, t] (True on real frames); seed uint32[4]: the dropout key's two words, and the global
  index of this piece's first utterance and first head; `whole`: (utterances, heads) of the whole
  attention. The mask counts [utterances, heads, t, t], as keep_mask does, whichever device holds
  the piece.
  """
  return _forward(q, k, v, key_valid, seed, rate, whole, block, interpret)[0]


def _forward(q, k, v, key_valid, seed, rate, whole, block, interpret):
  plan = _Plan(q.shape, rate, whole, block, interpret)
  t, d = q.shape[2], q.shape[3]
  qp, kp, vp = (_pad(x, plan.padded) for x in (q, k, v))
  valid = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, plan.padded - t)))
  out, lse = plan.call(
    _fwd_kernel,
    (jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct(qp.shape[:3], jnp.float32)),
    [
      plan.seed_spec,
      plan.block_spec(block, d),
      plan.block_spec(None, d),
      plan.block_spec(None, d),
      plan.valid_spec(True),
    ],
    [plan.block_spec(block, d), plan.block_spec(block)],
    (seed, qp, kp, vp, valid),
    block_k=block,
  )
  return out[:, :, :t], (qp, kp, vp, valid, seed, out, lse)


def _fwd(q, k, v, key_valid, seed, rate, whole, block, interpret):
  out, res = _forward(q, k, v, key_valid, seed, rate, whole, block, interpret)
  return out, (res, key_valid)


def _bwd(rate, whole, block, interpret, residuals, g):
  (qp, kp, vp, valid, seed, out, lse), key_valid = residuals
  plan = _Plan(qp.shape[:2] + (g.shape[2], qp.shape[3]), rate, whole, block, interpret)
  t, d = g.shape[2], g.shape[3]
  do = _pad(g, plan.padded).astype(qp.dtype)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # rowsum(dO * O)
  args = (seed, qp, kp, vp, valid, do, lse, delta)
  full, blockwise = plan.block_spec(None, d), plan.block_spec(block, d)
  dk, dv = plan.call(
    _dkdv_kernel,
    (jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)),
    [
      plan.seed_spec,
      full,
      blockwise,
      blockwise,
      plan.valid_spec(False),
      full,
      plan.block_spec(None),
      plan.block_spec(None),
    ],
    [blockwise, blockwise],
    args,
    block_q=block,
  )
  dq = plan.call(
    _dq_kernel,
    jax.ShapeDtypeStruct(qp.shape, qp.dtype),
    [
      plan.seed_spec,
      blockwise,
      full,
      full,
      plan.valid_spec(True),
      blockwise,
      plan.block_spec(block),
      plan.block_spec(block),
    ],
    blockwise,
    args,
    block_k=block,
  )
  no_grad = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)  # noqa: E731  (mask and seed: integers)
  return dq[:, :, :t], dk[:, :, :t], dv[:, :, :t], no_grad(key_valid), no_grad(seed)


flash_attention.defvjp(_fwd, _bwd)


def dropout_seed_from(words, first_utterance, first_head):
  """uint32[4] for flash_attention: a threefry key's two words and the piece's global offsets."""
  offsets = jnp.stack([jnp.asarray(first_utterance), jnp.asarray(first_head)]).astype(jnp.uint32)
  return jnp.concatenate([words.astype(jnp.uint32), offsets])


def fused_attention(q, k, v, key_mask, key, rate: float):
  """flash_attention over the current mesh: each device runs the kernels on its own utterances and heads.

  A Pallas call is opaque to XLA's partitioner, so under a mesh of several devices it runs in a
  shard_map over the batch axes (utterances) and `tensor` (heads). On a CPU host (tests, compiling
  for another platform) the kernels run in Pallas's interpret mode, slowly; TPU has no Triton (the
  kernel switch refuses it, models/kernels/__init__.py).
  """
  b, heads, t, _ = q.shape
  if key_mask is None:
    key_mask = jnp.ones((b, t), bool)
  if key is None:
    words, rate = jnp.zeros((2,), jnp.uint32), 0.0
  elif str(jax.random.key_impl(key)) != "threefry2x32":
    raise ValueError(
      "--config.model.kernels=gpu_flash draws dropout with threefry2x32 keys; "
      f"set --config.rng_impl=threefry2x32 (got {jax.random.key_impl(key)})"
    )
  else:
    words = jax.random.key_data(key)
  run = functools.partial(flash_attention, rate=rate, whole=(b, heads), interpret=jax.default_backend() == "cpu")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(q, k, v, key_mask, dropout_seed_from(words, 0, 0))
  P = jax.sharding.PartitionSpec
  tensor, rows = mesh.shape.get("tensor", 1), math.prod(mesh.shape.get(a, 1) for a in parallel.BATCH_AXES)
  if heads % tensor or b % rows:
    raise ValueError(
      f"--config.model.kernels=gpu_flash: {b} utterances x {heads} heads do not split over "
      f"the mesh's batch axes ({rows}) and tensor ({tensor})"
    )

  def piece(q, k, v, key_mask, words):
    first_utterance = jax.lax.axis_index(parallel.BATCH_AXES) * q.shape[0]
    first_head = jax.lax.axis_index("tensor") * q.shape[1]
    return run(q, k, v, key_mask, dropout_seed_from(words, first_utterance, first_head))

  spec = P(parallel.BATCH_AXES, "tensor", None, None)
  return jax.shard_map(
    piece, mesh=mesh, in_specs=(spec, spec, spec, P(parallel.BATCH_AXES, None), P()), out_specs=spec, check_vma=False
  )(q, k, v, key_mask, words)
