"""The grouped positional conv as matmuls in the frequency domain, for XLA:CPU.

XLA:CPU runs the positional conv (kernel 128, 16 groups) far below its matmul peak, and its weight
gradient slower still. Written as real DFT matrices, the conv is a handful of dense matmuls:
transform the input over time and the kernel over taps, mix channels within each group at each
frequency, and transform back. The DFT length is chosen so that the circular convolution never
wraps onto an output frame, so this is the same linear map as the conv (and autodiff gives its
exact gradients), up to float32 rounding (~1e-6 of the largest value). Measured against XLA's
grouped conv in docs/performance.md.
Memory: the kernel's transform, about (frames + pad) x H x H / groups floats (LARGE at 780 frames:
~220 MB), is kept for the backward; the DFT tables are constants of the padded length.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def dft_length(frames: int, kernel: int, pad: int) -> int:
  """The shortest DFT for which no output frame of the conv aliases: frames + pad.

  Output t reads input s = t + k - pad for taps k < kernel: as a convolution with the flipped kernel,
  t - s lies in the kernel's support [pad - kernel + 1, pad], while t - s over all frames spans
  [-(frames - 1), out - 1] with out = frames + 2 pad - kernel + 1. A shift by n maps no offset of
  that span onto the support once n exceeds both pad + frames - 1 and out - 1 - (pad - kernel + 1),
  and the two are equal.
  """
  return frames + pad


def _cos_sin(freqs: int, positions: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  phase = 2 * np.pi * (np.outer(np.arange(freqs), positions) % n) / n  # reduced mod n: exact angles
  return np.cos(phase), np.sin(phase)


def grouped_conv_dft(x, w, groups: int, pad: int, length: int | None = None):
  """== conv_general_dilated(x, w, stride 1, padding (pad, pad), NWC/WIO/NWC, feature_group_count=groups).

  x [B, T, H] and w [K, H / groups, H]; computed in float32, returned in x's dtype. `length` overrides
  the DFT length (tests show that one less than dft_length() aliases).
  """
  b, t, h = x.shape
  k, c, _ = w.shape
  d = w.shape[-1] // groups
  out = t + 2 * pad - k + 1
  n = dft_length(t, k, pad) if length is None else length
  f = n // 2 + 1
  cos_x, sin_x = _cos_sin(f, np.arange(t), n)  # X_f = sum_s x[s] e^{-i phase}
  cos_w, sin_w = _cos_sin(f, pad - np.arange(k), n)  # the flipped, shifted kernel's transform
  weight = np.where((np.arange(f) == 0) | (2 * np.arange(f) == n), 1.0, 2.0) / n  # real inverse: halves doubled
  cos_y, sin_y = _cos_sin(f, np.arange(out), n)
  to_freq = jnp.asarray(np.concatenate([cos_x, sin_x]), jnp.float32)  # [2F, T]
  kernel_to_freq = jnp.asarray(np.concatenate([cos_w, sin_w]), jnp.float32)  # [2F, K]
  to_time = jnp.asarray(np.concatenate([cos_y, sin_y]).T * np.tile(weight, 2), jnp.float32)  # [out, 2F]

  dtype, x = x.dtype, x.astype(jnp.float32)
  # [2F, B, H] -> per (frequency, group): rows cos-part then sin-part of every utterance, [F, G, 2B, C]
  xf = jnp.einsum("zt,bth->zbh", to_freq, x).reshape(2, f, b, groups, c)
  xf = xf.transpose(1, 3, 0, 2, 4).reshape(f, groups, 2 * b, c)
  # The kernel is transformed in its own layout [K, C * H] and the transform moved to [F, G, C, D]
  # after: the gradient then reaches w through a transpose of rows of D floats, not a slower one from
  # k-minor to k-major (docs/performance.md).
  uf = jnp.einsum("zk,kh->zh", kernel_to_freq, w.astype(jnp.float32).reshape(k, c * groups * d))
  uf = uf.reshape(2, f, c, groups, d).transpose(0, 1, 3, 2, 4)  # [2, F, G, C, D]
  p = jnp.einsum("fgmc,fgcd->fgmd", xf, uf[0])  # rows: Xc Uc, Xs Uc
  q = jnp.einsum("fgmc,fgcd->fgmd", xf, uf[1])  # rows: Xc Us, Xs Us
  # (Xc - i Xs)(Uc - i Us) = (Xc Uc - Xs Us) - i (Xc Us + Xs Uc)
  yf = jnp.stack([p[:, :, :b] - q[:, :, b:], q[:, :, :b] + p[:, :, b:]])  # [2, F, G, B, D]
  y = jnp.einsum("tz,zgbd->btgd", to_time, yf.reshape(2 * f, groups, b, d))
  return y.reshape(b, out, h).astype(dtype)
