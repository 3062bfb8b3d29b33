"""The roofline estimate (w2v2_jax/roofline.py) on small programs whose FLOPs and bytes are known: compiled
for this CPU, and for a v5p chip where libtpu is installed (TPU HLO writes dots as convolutions and has no
known_trip_count, so the loop's count is read off its condition and body)."""

import importlib.util
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2v2_jax import roofline
from w2v2_jax.cli import aot
from w2v2_jax.models import flops

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="compile-only TPU topologies need libtpu (pip install -e '.[tpu]')"
)
M, K, N, TRIPS = 64, 96, 80, 7


def _hlo(fn, shapes, dtype=jnp.float32, tpu=False) -> str:
  """The optimized HLO text of jit(fn) for one CPU device, or for one v5p chip."""
  if tpu:
    chip = aot.topology_devices("v5p-8")[0][0]
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh([chip], ("x",)), jax.sharding.PartitionSpec())
  else:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  args = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
  return jax.jit(fn).lower(*args).compile().as_text()


def matmul_then_loop(a, b, c):
  """[M,K] x [K,N], two elementwise ops over [M,N], then TRIPS iterations of x -> sin(x @ c)."""
  y = jnp.tanh(a @ b) + 1.0
  return jax.lax.fori_loop(0, TRIPS, lambda i, x: jnp.sin(x @ c), y)


def test_a_matmul_counts_2mkn_flops_and_its_operands_and_output_bytes():
  est = roofline.estimate(_hlo(matmul_then_loop, [(M, K), (K, N), (N, N)]), 1e12, 1e11)
  (mm,) = [op for op in est.ops if op.flops == 2 * M * K * N]
  assert mm.times == 1 and mm.bytes == (M * K + K * N + M * N) * 4 and mm.kind == "fusion:dot"
  (loop_mm,) = [op for op in est.ops if op.flops == 2 * M * N * N]
  assert loop_mm.times == TRIPS and loop_mm.bytes == (2 * M * N + N * N) * 4
  # tanh and +1 once, sin in every iteration; the loop counter's add per iteration, its compare once more
  elementwise = 2 * M * N + TRIPS * M * N + TRIPS + (TRIPS + 1)
  assert est.flops == 2 * M * K * N + TRIPS * 2 * M * N * N + elementwise
  assert est.unknown_trip_counts == () and est.collectives == ()


def test_a_loop_without_xlas_trip_count_is_counted_from_its_condition_and_step():
  def by_twos(x, c):  # i = 0, 2, ..., 8: five iterations
    return jax.lax.while_loop(lambda s: s[0] < 10, lambda s: (s[0] + 2, jnp.sin(s[1] @ c)), (0, x))[1]

  text = _hlo(by_twos, [(M, N), (N, N)])
  assert '"known_trip_count":{"n":"5"}' in text
  stripped = text.replace('"known_trip_count":{"n":"5"}', '"trip_count_removed":{}')
  for hlo in (text, stripped):
    (mm,) = [op for op in roofline.estimate(hlo, 1e12, 1e11).ops if op.flops == 2 * M * N * N]
    assert mm.times == 5
  # a loop whose bound is not a constant is counted once, and named
  unknown = stripped.replace("constant(10)", "parameter(1)")
  assert roofline.estimate(unknown, 1e12, 1e11).unknown_trip_counts != ()


def test_a_scanned_stack_is_read_one_layer_per_iteration():
  layers, n, b = 8, 128, 64

  def scan(x, w):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

  text = _hlo(scan, [(b, n), (layers, n, n)])
  est = roofline.estimate(text, 1e12, 1e11)
  assert est.flops >= layers * 2 * b * n * n
  layer_reads = [op for op in est.ops if op.times == layers and op.bytes >= n * n * 4]
  assert layer_reads and all(op.bytes < 2 * n * n * 4 + 2 * b * n * 4 for op in layer_reads)
  # counted as cost_analysis() counts (whole operands), each iteration reads the whole stack
  whole = roofline.estimate(text, 1e12, 1e11, whole_operands=True)
  assert whole.bytes > layers * layers * n * n * 4


def test_the_time_is_each_ops_slower_roof_summed():
  ops = (
    roofline.Op("mm", "fusion:dot", flops=4e9, bytes=1e8, times=3),  # 4 s of compute, 0.1 s of memory, 3 times
    roofline.Op("add", "fusion:elementwise", flops=1e6, bytes=5e9, times=2),  # 5 s of memory, twice
  )
  est = roofline.Estimate(ops, (), (), peak_flops=1e9, hbm_bytes_per_s=1e9)
  assert est.seconds == pytest.approx(22.0)
  assert est.compute_bound_seconds == pytest.approx(12.0)
  assert [op.bound(1e9, 1e9) for op in ops] == ["compute", "memory"]
  assert est.flops == pytest.approx(12e9 + 2e6) and est.bytes == pytest.approx(3e8 + 1e10)
  assert [row["name"] for row in est.top(2)] == ["mm", "add"] and est.top(1)[0]["ms"] == pytest.approx(12e3)
  # the compiled matmul: compute-bound at a slow peak, memory-bound at a slow bandwidth
  text = _hlo(matmul_then_loop, [(M, K), (K, N), (N, N)])
  for peak, bandwidth, bound in ((1e6, 1e15, "compute"), (1e15, 1e6, "memory")):
    (mm,) = [op for op in roofline.estimate(text, peak, bandwidth).ops if op.flops == 2 * M * K * N]
    expected = 2 * M * K * N / peak if bound == "compute" else (M * K + K * N + M * N) * 4 / bandwidth
    assert mm.seconds(peak, bandwidth) == pytest.approx(expected) and mm.bound(peak, bandwidth) == bound


def test_valid_taps_skip_padding_and_dilation_holes():
  rng = np.random.default_rng(0)
  for _ in range(200):
    base, size, stride, lhs_d, rhs_d = (int(v) for v in rng.integers(1, 6, 5))
    pad = int(rng.integers(-1, 4))
    extent = (base - 1) * lhs_d + 1
    out = max((extent + 2 * pad - (size - 1) * rhs_d - 1) // stride + 1, 0)
    brute = sum(
      1
      for o, k in itertools.product(range(out), range(size))
      if 0 <= (p := o * stride + k * rhs_d - pad) < extent and p % lhs_d == 0
    )
    assert roofline.valid_taps(out, size, stride, pad, lhs_d, rhs_d, base) == brute


def test_a_transposed_convolution_counts_only_real_multiplies():
  def conv(x, k):  # lhs dilation 2 over length 10, padding 1: 28 of the 57 (output, tap) pairs meet an input
    dims = ("NCH", "OIH", "NCH")
    return jax.lax.conv_general_dilated(x, k, (1,), [(1, 1)], lhs_dilation=(2,), dimension_numbers=dims)

  est = roofline.estimate(_hlo(conv, [(2, 3, 10), (5, 3, 3)]), 1e12, 1e11)
  assert sum(op.flops for op in est.ops) == 2 * 2 * 5 * 3 * 28


@needs_libtpu
def test_on_a_v5p_chip_batched_dots_and_scanned_loops_count_right():
  b, h, t, d = 2, 3, 40, 16  # attention scores: TPU HLO writes the batch dimensions as a dilated window
  scores = roofline.estimate(
    _hlo(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k), [(b, h, t, d)] * 2, jnp.bfloat16, tpu=True), 1e12, 1e11
  )
  assert scores.flops == 2 * b * h * t * t * d
  text = _hlo(matmul_then_loop, [(M, K), (K, N), (N, N)], tpu=True)
  assert '"known_trip_count"' not in text
  loop = roofline.estimate(text, 1e12, 1e11)
  (loop_mm,) = [op for op in loop.ops if op.flops >= 2 * M * N * N and op.times > 1]
  assert loop_mm.times == TRIPS and loop.unknown_trip_counts == ()


@needs_libtpu
def test_each_chips_devices_find_their_own_row_of_the_chip_table():
  for kind, chip in flops.TPU_CHIPS.items():
    device = aot.topology_devices(f"{kind}-8")[0][0]
    peak, source = flops.peak_flops(device, "bfloat16")
    assert device.device_kind in chip.device_kinds and peak == chip.peak_flops, (kind, device.device_kind)
    assert any(f"({name}," in source for name in chip.device_kinds), source  # the longest key, not a prefix
    assert re.fullmatch(r"TPU v\d[a-z]?", chip.datasheet)
