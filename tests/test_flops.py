"""Analytic FLOPs (w2v2_jax/models/flops.py) against XLA's own count, and the MFU inputs."""

import jax
import jax.numpy as jnp
import pytest

from w2v2_jax.models import flops, objectives
from w2v2_jax.models.config import preset
from w2v2_jax.models.init import init_params
from w2v2_jax.train.pretrain import make_loss_fn


def _xla_flops(fn, args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize(
  "name,train,low,high", [("base", True, 0.99, 1.02), ("base", False, 0.99, 1.03), ("small", True, 1.0, 1.10)]
)
@pytest.mark.slow
def test_analytic_flops_match_xla(name, train, low, high):
  """XLA counts matmuls plus elementwise work, so it is about the analytic (matmul-only) figure or a little
  more: for BASE within a few percent, so the formula misses no matmul and double-counts none. The BASE
  forward reads 0.994 since GELU uses erf (one XLA op per element; erfc was expanded into many, 1.016);
  where that last 0.6% goes is not yet known. The BASE gradient reads 0.996 since dropout hashes four
  mask values per Threefry call (1.005 before; 0.999 until the hash was written out, layers.threefry2x32).
  The positional conv is counted as the plain conv: on CPU it runs as DFT-domain matmuls
  (models/kernels/dft_conv.py), which do less arithmetic for the same result."""
  cfg = preset(name).replace(kernels="xla")
  n, batch = 32000, 2
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  loss_fn = make_loss_fn(cfg, objectives.ObjectiveConfig())
  args = (
    params,
    jax.ShapeDtypeStruct((batch, n), jnp.float32),
    jax.ShapeDtypeStruct((batch,), jnp.int32),
    jax.random.key(0),
    jnp.float32(2.0),
  )
  if train:
    xla, analytic = _xla_flops(jax.grad(lambda *a: loss_fn(*a)[0]), args), flops.train_flops(cfg, n, batch)
  else:
    xla = _xla_flops(lambda *a: loss_fn(*a, deterministic=True)[0], args)
    analytic = flops.forward_flops(cfg, n, batch)
  assert low <= xla / analytic <= high, (xla, analytic)


def test_flops_scale_with_batch_and_layers():
  cfg = preset("base")
  assert flops.forward_flops(cfg, 16000, 4) == pytest.approx(4 * flops.forward_flops(cfg, 16000, 1))
  deeper = cfg.replace(num_hidden_layers=24)
  assert flops.forward_flops(deeper, 16000) > 1.5 * flops.forward_flops(cfg, 16000)


def test_peak_flops():
  cpu_peak, source = flops.peak_flops(jax.devices()[0], "float32")
  assert cpu_peak > 1e9 and "measured" in source  # any CPU does more than 1 GFLOP/s per device

  class Fake:
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

  assert flops.peak_flops(Fake(), "bfloat16")[0] == 989e12
  Fake.device_kind = "Some Future Chip"
  peak, source = flops.peak_flops(Fake(), "bfloat16")
  assert peak != peak and "PEAK_FLOPS" in source  # NaN, with a pointer to where to add the chip
