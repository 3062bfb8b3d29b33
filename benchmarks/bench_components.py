"""Where a step's time goes: forward and forward+backward of each model part, with its share of the peak.

  python benchmarks/bench_components.py [--preset=base] [--stable_layer_norm] [--batch=4] [--seconds=4]

Times the feature encoder, the positional conv and one transformer layer on their own (gradients
with respect to parameters only, as in training), each against its analytic FLOPs. This is how
the positional conv's slow weight gradient on CPU was found (docs/performance.md).
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("preset", "base", "Model preset.")
  flags.DEFINE_bool("stable_layer_norm", True, "Pre-LN with the layer-norm extractor (HF Flax's architecture).")
  flags.DEFINE_integer("batch", 4, "Utterances.")
  flags.DEFINE_float("seconds", 4.0, "Seconds per utterance.")
  flags.DEFINE_integer("steps", 3, "Timed calls per part (median).")


def _timed(module, x, steps, input_grad, **kwargs):
  """(forward seconds, forward+backward seconds) of `module` on `x`; gradients for the parameters,
  and for `x` too when `input_grad` (hidden states need it in training, the audio does not)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from w2v2_jax.cli.bench import median_seconds  # pylint: disable=import-outside-toplevel

  params = module.init(jax.random.key(0), x, **kwargs)
  rngs = {"dropout": jax.random.key(1)}
  # an encoder layer returns (output, its input): time the output
  output = lambda p, y: jax.tree.leaves(module.apply(p, y, rngs=rngs, **kwargs))[0]  # noqa: E731
  fwd = jax.jit(lambda p: output(p, x))
  loss = lambda p, y: jnp.sum(output(p, y).astype(jnp.float32) ** 2)  # noqa: E731
  grad = jax.jit(jax.grad(loss, argnums=(0, 1) if input_grad else 0))
  return (
    median_seconds(lambda: jax.block_until_ready(fwd(params)), steps),
    median_seconds(lambda: jax.block_until_ready(grad(params, x)), steps),
  )


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel

  from w2v2_jax.models import flops  # pylint: disable=import-outside-toplevel
  from w2v2_jax.models.config import preset  # pylint: disable=import-outside-toplevel
  from w2v2_jax.models.feature_encoder import FeatureEncoder  # pylint: disable=import-outside-toplevel
  from w2v2_jax.models.transformer import EncoderLayer, PositionalConvEmbedding  # pylint: disable=import-outside-toplevel

  cfg = preset(FLAGS.preset).replace(layerdrop=0.0)
  if FLAGS.stable_layer_norm:
    cfg = cfg.replace(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True)
  b, samples = FLAGS.batch, int(FLAGS.seconds * 16000)
  t, h = int(cfg.num_frames(samples)), cfg.hidden_size
  peak = flops.peak_flops(jax.devices()[0], cfg.dtype)[0]
  audio = jax.random.normal(jax.random.key(0), (b, samples))
  hidden = jax.random.normal(jax.random.key(0), (b, t, h))
  parts = [
    ("feature encoder", FeatureEncoder(cfg), audio, False, {}, b * flops.feature_encoder_flops(cfg, samples)),
    ("positional conv", PositionalConvEmbedding(cfg), hidden, True, {}, b * flops.pos_conv_flops(cfg, t)),
    (
      f"transformer layer (x{cfg.num_hidden_layers})",
      EncoderLayer(cfg, False),
      hidden,
      True,
      {"key_mask": None},
      b * flops.layer_flops(cfg, t),
    ),
  ]
  print(f"{cfg.num_hidden_layers}-layer x {h}, batch {b} x {FLAGS.seconds} s, peak {peak / 1e9:.0f} GFLOP/s")
  for name, module, x, input_grad, kwargs, fwd_flops in parts:
    fwd_s, both_s = _timed(module, x, FLAGS.steps, input_grad, **kwargs)
    print(
      f"{name:26s} forward {fwd_s:7.3f} s ({100 * fwd_flops / fwd_s / peak:3.0f}% of peak)   "
      f"forward+backward {both_s:7.3f} s ({100 * 3 * fwd_flops / both_s / peak:3.0f}%)"
    )


if __name__ == "__main__":
  define_flags()
  app.run(main)
