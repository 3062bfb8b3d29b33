"""Model properties: parameter counts, straight-through Gumbel, feature_grad_mult, LayerDrop, remat, bf16."""

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np
import pytest

from w2v2_jax.models import config as presets
from w2v2_jax.models import objectives
from w2v2_jax.models.init import build, count_params, init_params


def test_full_size_parameter_counts():
  assert count_params(presets.base()) == 95_044_608
  assert count_params(presets.large_lv60()) == 317_390_592
  assert count_params(presets.base(), "model") == 94_371_712 + 0  # bare BASE (HF Wav2Vec2Model)


def test_receptive_field_and_frames():
  cfg = presets.base()
  assert cfg.receptive_field == 400
  assert cfg.num_frames(16000) == 49 and cfg.num_frames(250000) == 781


def _batch(cfg, batch=2, samples=8000, seed=0):
  audio = jax.random.normal(jax.random.key(seed), (batch, samples))
  num_frames = cfg.num_frames(samples)
  mask = jax.jit(objectives.compute_span_mask, static_argnums=(2, 3, 4, 5))(
    jax.random.key(seed + 1), jnp.full((batch,), num_frames), num_frames, 0.65, 10, 2
  )
  negatives = jax.jit(objectives.sample_negatives, static_argnums=2)(jax.random.key(seed + 2), mask, 10)
  return audio, mask, negatives


def _loss_fn(cfg, audio, mask, negatives, deterministic=False, temperature=2.0):
  model = build(cfg)

  def loss(params, key):
    rngs = {k: jax.random.fold_in(key, i) for i, k in enumerate(("dropout", "gumbel", "layerdrop"))}
    out = model.apply({"params": params}, audio, None, mask, temperature, deterministic, rngs=rngs)
    return objectives.pretraining_loss(out, mask, negatives, objectives.ObjectiveConfig(num_negatives=10))[0]

  return jax.jit(loss)


@pytest.mark.slow
def test_straight_through_gumbel_is_one_hot_with_gradients():
  cfg = presets.tiny()
  params = init_params(cfg, jax.random.key(0))
  model = build(cfg)
  audio, mask, negatives = _batch(cfg)
  rngs = {"gumbel": jax.random.key(1), "dropout": jax.random.key(2), "layerdrop": jax.random.key(3)}
  out = jax.jit(lambda p: model.apply({"params": p}, audio, None, mask, 2.0, False, rngs=rngs))(params)
  g, v = cfg.num_codevector_groups, cfg.num_codevectors_per_group
  book = np.asarray(params["quantizer"]["codevectors"]).reshape(g, v, -1)
  idx = np.asarray(out.quantizer.code_idx)
  expected = np.concatenate([book[j][idx[..., j]] for j in range(g)], axis=-1)
  assert np.array_equal(np.asarray(out.quantizer.quantized), expected)  # exactly the chosen codewords
  grads = jax.grad(_loss_fn(cfg, audio, mask, negatives))(params, jax.random.key(4))
  for name in ("kernel", "bias"):
    assert np.abs(np.asarray(grads["quantizer"]["weight_proj"][name])).max() > 0, name
  assert np.abs(np.asarray(grads["quantizer"]["codevectors"])).max() > 0


@pytest.mark.slow
def test_eval_quantizer_is_argmax():
  cfg = presets.tiny()
  params = init_params(cfg, jax.random.key(0))
  audio, _, _ = _batch(cfg)
  out = jax.jit(build(cfg).apply)({"params": params}, audio)
  logits = (
    out.encoder.extract_features @ params["quantizer"]["weight_proj"]["kernel"]
    + params["quantizer"]["weight_proj"]["bias"]
  )
  logits = np.asarray(logits).reshape(*logits.shape[:2], cfg.num_codevector_groups, -1)
  assert np.array_equal(np.asarray(out.quantizer.code_idx), logits.argmax(-1))
  # In training the sampled codes differ, but code_perplexity's argmax_idx is still the raw-logit argmax.
  trained = jax.jit(
    lambda p: build(cfg.replace(feat_quantizer_dropout=0.0)).apply(
      {"params": p},
      audio,
      None,
      None,
      2.0,
      False,
      rngs={"gumbel": jax.random.key(1), "dropout": jax.random.key(2), "layerdrop": jax.random.key(3)},
    )
  )(params)
  assert not np.array_equal(np.asarray(trained.quantizer.code_idx), logits.argmax(-1))
  assert np.array_equal(np.asarray(trained.quantizer.argmax_idx), logits.argmax(-1))


@pytest.mark.parametrize("mult", [0.25, 0.1, 0.0])
@pytest.mark.slow
def test_feature_grad_mult_scales_encoder_gradients_exactly(mult):
  base_cfg = presets.tiny().replace(
    feature_grad_mult=1.0,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    feat_proj_dropout=0.0,
    feat_quantizer_dropout=0.0,
    layerdrop=0.0,
  )
  params = init_params(base_cfg, jax.random.key(0))
  audio, mask, negatives = _batch(base_cfg)
  g1 = jax.grad(_loss_fn(base_cfg, audio, mask, negatives))(params, jax.random.key(1))
  gm = jax.grad(_loss_fn(base_cfg.replace(feature_grad_mult=mult), audio, mask, negatives))(params, jax.random.key(1))
  fe1, fem = g1["wav2vec2"]["feature_extractor"], gm["wav2vec2"]["feature_extractor"]
  for a, b in zip(jax.tree.leaves(fe1), jax.tree.leaves(fem)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a).max() > 0
    if mult in (0.0, 0.25):  # a power of two scales every float exactly: bitwise equal
      np.testing.assert_array_equal(b, np.float32(mult) * a)
    else:  # 0.1 is inexact in binary; differences stay at float32 rounding of the conv backward sums
      np.testing.assert_allclose(b, mult * a, rtol=0, atol=1e-5 * np.abs(mult * a).max())
  rest1 = {k: v for k, v in g1["wav2vec2"].items() if k != "feature_extractor"}
  restm = {k: v for k, v in gm["wav2vec2"].items() if k != "feature_extractor"}
  for a, b in zip(jax.tree.leaves(rest1), jax.tree.leaves(restm)):  # a different program: rounding only
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_layerdrop_drops_whole_layers():
  cfg = presets.tiny().replace(layerdrop=1.0, hidden_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0)
  params = init_params(cfg, jax.random.key(0))
  audio, _, _ = _batch(cfg)
  model = build(cfg, "model")
  out = jax.jit(
    lambda p: model.apply(
      {"params": p}, audio, deterministic=False, rngs={"dropout": jax.random.key(1), "layerdrop": jax.random.key(2)}
    )
  )(params)
  # Every layer dropped: the output is the transformer input (post-LN: after the first LayerNorm).
  np.testing.assert_array_equal(np.asarray(out.last_hidden_state), np.asarray(out.hidden_states[0]))
  kept = jax.jit(lambda p: model.apply({"params": p}, audio, deterministic=True))(params)
  assert not np.allclose(np.asarray(kept.last_hidden_state), np.asarray(kept.hidden_states[0]))


def test_layerdrop_rate_and_gradients():
  cfg = presets.tiny().replace(
    layerdrop=0.5, num_hidden_layers=1, hidden_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0
  )
  params = init_params(cfg, jax.random.key(0))
  audio, _, _ = _batch(cfg, batch=1, samples=2000)
  model = build(cfg, "model")
  fwd = jax.jit(lambda k: model.apply({"params": params}, audio, deterministic=False, rngs={"layerdrop": k}))
  dropped = [
    bool(np.array_equal(*(np.asarray(x) for x in (o.last_hidden_state, o.hidden_states[0]))))
    for o in (fwd(k) for k in jax.random.split(jax.random.key(1), 200))
  ]
  assert 0.38 < np.mean(dropped) < 0.62


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
@pytest.mark.slow
def test_remat_gives_the_same_gradients(policy):
  cfg = presets.tiny().replace(hidden_dropout=0.0, attention_dropout=0.0, layerdrop=0.0)
  params = init_params(cfg, jax.random.key(0))
  audio, mask, negatives = _batch(cfg)
  g = jax.grad(_loss_fn(cfg, audio, mask, negatives))(params, jax.random.key(1))
  gr = jax.grad(_loss_fn(cfg.replace(remat_policy=policy), audio, mask, negatives))(params, jax.random.key(1))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_loss():
  cfg = presets.tiny().replace(dtype="bfloat16")
  params = init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  audio, mask, negatives = _batch(cfg)
  out = jax.jit(build(cfg).apply)({"params": params}, audio, None, mask)
  assert out.encoder.last_hidden_state.dtype == jnp.bfloat16
  assert out.projected_states.dtype == jnp.float32 and out.quantizer.soft_probs.dtype == jnp.float32
  loss32 = _loss_fn(cfg.replace(dtype="float32"), audio, mask, negatives, deterministic=True)(params, jax.random.key(0))
  loss16 = _loss_fn(cfg, audio, mask, negatives, deterministic=True)(params, jax.random.key(0))
  assert loss16.dtype == jnp.float32 and abs(float(loss16) - float(loss32)) < 0.05 * abs(float(loss32))


def test_config_rejects_inconsistent_values():
  with pytest.raises(ValueError, match="num_attention_heads"):
    presets.tiny().replace(num_attention_heads=5)
  with pytest.raises(ValueError, match="feat_extract_norm"):
    presets.tiny().replace(feat_extract_norm="batch")


@pytest.mark.parametrize(
  "frames,kernel,groups,channels", [(37, 8, 4, 6), (29, 7, 2, 5), (5, 16, 3, 4), (99, 128, 16, 3)]
)
@pytest.mark.slow
def test_dft_positional_conv_has_the_plain_convs_values_and_gradients(frames, kernel, groups, channels):
  """The positional conv's CPU form (models/kernels/dft_conv.py) is the plain grouped conv, gradients included,
  for even and odd kernels, a kernel longer than the input and BASE's kernel; one DFT bin less aliases."""
  from w2v2_jax.models.kernels.dft_conv import dft_length, grouped_conv_dft
  from w2v2_jax.models.transformer import _conv

  h, pad = groups * channels, kernel // 2
  x = jax.random.normal(jax.random.key(0), (3, frames, h))
  w = jax.random.normal(jax.random.key(1), (kernel, channels, h)) * 0.1
  dy = jax.random.normal(jax.random.key(2), (3, frames + 2 * pad - kernel + 1, h))
  y_ref, vjp_ref = jax.vjp(lambda a, b: _conv(a, b, groups, pad), x, w)
  y, vjp = jax.vjp(lambda a, b: grouped_conv_dft(a, b, groups, pad), x, w)
  for got, want in zip((y, *vjp(dy)), (y_ref, *vjp_ref(dy))):  # float32 rounding of sums over frames
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(want)).max())
  aliased = grouped_conv_dft(x, w, groups, pad, length=dft_length(frames, kernel, pad) - 1)
  assert np.abs(np.asarray(aliased - y_ref)).max() > 1e-3


@pytest.mark.slow
def test_materialize_grad_is_the_identity_and_survives_xla(monkeypatch):
  """The pre-LN residual-gradient barrier (models/kernels/cpu.py) changes no value, and XLA:CPU keeps it."""
  from w2v2_jax.models.kernels import cpu

  x = jax.random.normal(jax.random.key(0), (2, 5, 3))
  y, vjp = jax.vjp(cpu.materialize_grad, x)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(vjp(x * 3)[0], x * 3)
  assert np.isnan(np.asarray(vjp(x.at[0, 0, 0].set(jnp.inf))[0])).all()  # non-finite stays non-finite

  cfg = presets.tiny().replace(
    do_stable_layer_norm=True, feat_extract_norm="layer", hidden_dropout=0.0, attention_dropout=0.0, layerdrop=0.0
  )
  params = init_params(cfg, jax.random.key(0))
  audio, mask, negatives = _batch(cfg)
  grad = jax.jit(jax.grad(_loss_fn(cfg, audio, mask, negatives)))
  assert grad.lower(params, jax.random.key(1)).compile().as_text().count("conditional(") == cfg.num_hidden_layers
  g = grad(params, jax.random.key(1))
  monkeypatch.setattr(cpu, "materialize_grad", lambda v: v)
  g_plain = jax.grad(_loss_fn(cfg, audio, mask, negatives))(params, jax.random.key(1))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_gelu_is_torchs_exact_gelu():
  """layers.gelu (erf form, cheaper on XLA:CPU) equals torch's default GELU and jax's erfc form."""
  import torch

  from w2v2_jax.models.layers import gelu

  x = np.linspace(-12, 12, 20001, dtype=np.float32)
  np.testing.assert_allclose(
    gelu(jnp.asarray(x)), torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    jax.vmap(jax.grad(gelu))(jnp.asarray(x)),
    jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(jnp.asarray(x)),
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("shape,offset", [((3, 37, 16), 0.0), ((2, 5, 9, 7), 3.0), ((41, 512), -2.0)])
@pytest.mark.slow
def test_layer_norm_gelu_has_autodiffs_values_and_gradients(shape, offset, axis):
  """kernels.cpu.layer_norm_gelu (CPU's LayerNorm, or per-channel GroupNorm over time, + GELU with its own
  backward) against autodiff of the plain composition: values, and the gradients of input, scale and
  bias, on odd sizes, offset inputs and groups whose variance is below eps."""
  from w2v2_jax.models.kernels.cpu import layer_norm_gelu
  from w2v2_jax.models.layers import gelu

  keys = jax.random.split(jax.random.key(5), 4)
  x = jax.random.normal(keys[0], shape) * 2.0 + offset
  # groups whose variance (~4e-6) eps (1e-5) dominates
  x = x.at[0].multiply(1e-3) if axis == -1 else x.at[..., 0].multiply(1e-3)
  scale = 1.0 + 0.3 * jax.random.normal(keys[1], shape[-1:])
  bias = 0.2 * jax.random.normal(keys[2], shape[-1:])
  upstream = jax.random.normal(keys[3], shape)

  def plain(x, scale, bias):
    mean = x.mean(axis, keepdims=True)
    var = jnp.square(x - mean).mean(axis, keepdims=True)
    return gelu((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias)

  def fused(x, scale, bias):
    return layer_norm_gelu(x, scale, bias, 1e-5, axis)

  want, want_vjp = jax.vjp(plain, x, scale, bias)
  got, got_vjp = jax.jit(lambda *a: jax.vjp(fused, *a))(x, scale, bias)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(jax.jit(got_vjp)(upstream), want_vjp(upstream)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("reduce_axis", [-1, -2])
def test_layer_norm_then_gelu_is_the_same_with_every_kernels(reduce_axis):
  """LayerNorm(then_gelu=True) with the cpu kernels (the fused function) and the plain ones (LayerNorm,
  then GELU) give the same values and parameter gradients, over channels and (BASE's GroupNorm) over time."""
  from w2v2_jax.models import layers

  module = layers.LayerNorm(1e-5, jnp.float32, reduce_axis=reduce_axis, then_gelu=True, kernels="cpu")
  x = jax.random.normal(jax.random.key(0), (2, 23, 24)) + 1.0
  params = module.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
  assert "custom_vjp" in str(jax.make_jaxpr(module.apply)(params, x))
  cpu = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  module = layers.LayerNorm(1e-5, jnp.float32, reduce_axis=reduce_axis, then_gelu=True, kernels="xla")
  assert "custom_vjp" not in str(jax.make_jaxpr(module.apply)(params, x))
  other = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(other)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_threefry_written_out_is_jaxs_threefry():
  """layers.threefry2x32 gives jax's bits exactly: Random123's known answer, and random keys and counters."""
  from w2v2_jax.models.layers import threefry2x32

  kat = threefry2x32(jnp.uint32(0x13198A2E), jnp.uint32(0x03707344), jnp.uint32(0x243F6A88), jnp.uint32(0x85A308D3))
  assert [int(v) for v in kat] == [0xC4923A9C, 0x483DF7A0]
  k1, k2, x1, x2 = (jax.random.bits(k, (1000,), jnp.uint32) for k in jax.random.split(jax.random.key(3), 4))
  want = jax.extend.random.threefry2x32_p.bind(k1, k2, x1, x2)
  for got, ref in zip(jax.jit(threefry2x32)(k1, k2, x1, x2), want):
    np.testing.assert_array_equal(got, ref)


def test_dropout_keep_mask_is_bernoulli_and_independent():
  """layers.keep_mask (four 16-bit draws per Threefry hash) keeps 1 - rate of the values, with no
  correlation between neighbours (the four draws of one hash sit side by side) and none across keys."""
  from scipy import stats

  from w2v2_jax.models.layers import Dropout, keep_mask

  shape, keep = (3, 5, 211, 199), 0.9  # last axis not a multiple of 4: the padding is cut off
  mask = np.asarray(jax.jit(lambda k: keep_mask(k, shape, keep))(jax.random.key(7)))
  assert mask.shape == shape and mask.dtype == bool
  n = mask.size
  assert stats.binomtest(int(mask.sum()), n, keep).pvalue > 1e-4
  flat = mask.reshape(-1).astype(np.float64)
  for lag in (1, 2, 3, 4, 199):
    # Pearson r of independent Bernoullis is ~N(0, 1/n): 5 standard errors
    assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 5 / np.sqrt(n), lag
  # within each group of four (one hash): all 16 patterns at their binomial rates
  quads = mask[..., :196].reshape(-1, 4).astype(int) @ np.array([8, 4, 2, 1])
  expected = np.array([np.prod([keep if b == "1" else 1 - keep for b in f"{q:04b}"]) for q in range(16)])
  assert stats.chisquare(np.bincount(quads, minlength=16), expected * len(quads)).pvalue > 1e-4
  other = np.asarray(keep_mask(jax.random.key(8), shape, keep))
  assert abs(np.corrcoef(flat, other.reshape(-1))[0, 1]) < 5 / np.sqrt(n)
  # a biased mask fails the same checks: keep 0.905 instead of 0.9
  biased = np.asarray(keep_mask(jax.random.key(7), shape, 0.905))
  assert stats.binomtest(int(biased.sum()), n, keep).pvalue < 1e-4
  # other key kinds fall back to jax.random.bernoulli; the module scales kept values by 1 / keep
  rbg = keep_mask(jax.random.key(7, impl="rbg"), (1000,), keep)
  np.testing.assert_array_equal(rbg, jax.random.bernoulli(jax.random.key(7, impl="rbg"), keep, (1000,)))
  x = jnp.ones((64, 128))
  y = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.9], rtol=1e-6)
  np.testing.assert_array_equal(Dropout(0.1).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(Dropout(1.0).apply({}, x, deterministic=False), 0 * x)  # needs no rng
  # exactly the four 16-bit halves of the hash of each group's index (not a silent fallback)
  small = np.asarray(keep_mask(jax.random.key(7), (2, 6), 0.5))
  k1, k2 = jax.random.key_data(jax.random.key(7))
  bits = jax.extend.random.threefry2x32_p.bind(k1, k2, jnp.zeros(4, jnp.uint32), jnp.arange(4, dtype=jnp.uint32))
  halves = np.asarray(jnp.stack(bits, -1)).view(np.uint16).reshape(2, 8)[:, :6]
  np.testing.assert_array_equal(small, halves < 32768)
  # edge cases: keep everything (65536 must not wrap to 0), keep nothing, a scalar, rate 1 with finite gradients
  assert np.asarray(keep_mask(jax.random.key(7), (3, 7), 1.0)).all()
  assert np.asarray(keep_mask(jax.random.key(7), (3, 7), 1 - 1e-6)).all()
  assert not np.asarray(keep_mask(jax.random.key(7), (3, 7), 0.0)).any()
  assert keep_mask(jax.random.key(7), (), 0.5).shape == ()
  zero_grad = jax.grad(
    lambda v: Dropout(1.0).apply({}, v, deterministic=False, rngs={"dropout": jax.random.key(0)}).sum()
  )(x)
  np.testing.assert_array_equal(zero_grad, np.zeros_like(x))


def test_attention_in_two_halves_on_cpu_is_the_whole_batch_attention():
  """With the cpu kernels on one device the attention core runs as two halves of the batch: the same
  values and gradients as the whole batch at once (the plain kernels), with the same dropout mask (rate
  0.5, so a different mask would change most outputs) and padded keys."""
  from w2v2_jax.models import transformer

  cfg = presets.preset("tiny").replace(attention_dropout=0.5, kernels="cpu")
  module = transformer.Attention(cfg, deterministic=False)
  x = jax.random.normal(jax.random.key(0), (4, 21, cfg.hidden_size))
  key_mask = jnp.arange(21)[None] < jnp.array([[21], [15], [21], [9]])
  params = module.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x, key_mask)
  loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x, key_mask, rngs={"dropout": jax.random.key(3)})))  # noqa: E731
  run = lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)  # noqa: E731
  halves = run()
  assert (
    str(jax.make_jaxpr(module.apply)(params, x, key_mask, rngs={"dropout": jax.random.key(3)})).count("dot_general")
    == 2 * 2 + 4
  )  # q, k, v, out projections + two batched matmuls per half
  module = transformer.Attention(cfg.replace(kernels="xla"), deterministic=False)
  assert (
    str(jax.make_jaxpr(module.apply)(params, x, key_mask, rngs={"dropout": jax.random.key(3)})).count("dot_general")
    == 2 + 4
  )
  whole = run()
  for a, b in zip(jax.tree.leaves(halves), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dense_weight_gradient_from_matrices_is_autodiffs():
  """With the cpu kernels dense layers take their weight gradient from [rows, in] x [rows, out] matrices
  (a custom VJP, faster on XLA:CPU): values and gradients equal autodiff's of the plain dot_general."""
  from w2v2_jax.models import layers

  x = jax.random.normal(jax.random.key(0), (3, 7, 32))

  def run(kernels):
    module = layers.dense(48, ("embed", "mlp"), jnp.float32, name="d", kernels=kernels)
    loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x), str(jax.make_jaxpr(loss)(params, x))

  params = layers.dense(48, ("embed", "mlp"), jnp.float32, name="d").init(jax.random.key(1), x)
  ours, jaxpr = run("cpu")
  assert "custom_vjp" in jaxpr
  plain, jaxpr = run("xla")
  assert "custom_vjp" not in jaxpr
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
