"""Our Flax model equals transformers' PyTorch Wav2Vec2 on the same weights (BASE- and LV60-style)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import hf_config, padded_batch, state_numpy, torch_tensor
from transformers import Wav2Vec2ForCTC as HFCTC
from transformers import Wav2Vec2ForPreTraining as HFPreTraining
from transformers import Wav2Vec2Model as HFModel

from w2v2_jax.interop import hf
from w2v2_jax.models import config as presets
from w2v2_jax.models import layer_stack, objectives
from w2v2_jax.models.init import build, init_params

STYLES = {"base_style": presets.tiny(stable_layer_norm=False), "lv60_style": presets.tiny(stable_layer_norm=True)}
LENGTHS = [16000, 12345, 8000]
NUM_NEGATIVES = 20


@pytest.fixture(
  scope="module",
  params=[
    pytest.param((s, f), marks=[pytest.mark.slow] if f == "scanned" else [])
    for s in sorted(STYLES)
    for f in ("looped", "scanned")
  ],
)
def pair(request):
  """(our config, our params converted from HF, the HF PyTorch model in eval mode), with our layers
  looped or scanned (model.scan_layers, the HF weights stacked)."""
  style, form = request.param
  cfg = STYLES[style]
  assert cfg.do_stable_layer_norm == (style == "lv60_style")
  torch.manual_seed(0)
  ref = HFPreTraining(hf_config(cfg)).eval()
  params, kind = hf.hf_to_params(state_numpy(ref))
  assert kind == "pretraining"
  hf.check_params_match(cfg, params, kind, "hf")
  if form == "scanned":
    cfg = cfg.replace(scan_layers=True)
    params = layer_stack.to_form(params, scanned=True)
    hf.check_params_match(cfg, params, kind, "hf")
  return cfg, params, ref


def _run_both(cfg, params, ref, padded):
  audio, attention, frame_lengths = padded_batch(cfg, LENGTHS)
  num_frames = cfg.num_frames(audio.shape[1])
  mask = objectives.compute_span_mask(jax.random.key(1), jnp.asarray(frame_lengths), num_frames, 0.65, 10, 2)
  negatives = objectives.sample_negatives(jax.random.key(2), mask, NUM_NEGATIVES)
  lengths = jnp.asarray(LENGTHS) if padded else None
  ours = build(cfg).apply({"params": params}, audio, lengths, mask)
  flat_negatives = np.asarray(negatives) + (np.arange(len(LENGTHS)) * num_frames)[:, None, None]
  with torch.no_grad():
    theirs = ref(
      torch_tensor(audio),
      attention_mask=torch_tensor(attention, torch.long) if padded else None,
      mask_time_indices=torch_tensor(mask),
      sampled_negative_indices=torch_tensor(flat_negatives),
      output_hidden_states=True,
    )
    base = ref.wav2vec2(
      torch_tensor(audio),
      attention_mask=torch_tensor(attention, torch.long) if padded else None,
      mask_time_indices=torch_tensor(mask),
      output_hidden_states=True,
    )
  return ours, theirs, base, mask, negatives


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.slow
def test_hidden_states_match(pair, padded):
  """Equal on every real frame to 1e-4. Padded frames' context vectors are masked out of attention and every
  loss; on CPU the positional conv's DFT form rounds relative to the whole sequence (~1e-6), which a post-LN
  layer's LayerNorm of a padded frame's near-zero vector amplifies (2.3e-3 seen), so there only to 1e-2."""
  cfg, params, ref = pair
  ours, _, base, _, _ = _run_both(cfg, params, ref, padded)
  real = np.asarray(ours.encoder.frame_mask)
  assert real.sum() == sum(int(cfg.num_frames(n)) for n in LENGTHS) if padded else real.all()
  pairs = [(ours.encoder.last_hidden_state, base.last_hidden_state, "last_hidden_state")]
  assert len(ours.encoder.hidden_states) == len(base.hidden_states) == cfg.num_hidden_layers + 1
  pairs += [
    (a, b, f"hidden_states[{i}]") for i, (a, b) in enumerate(zip(ours.encoder.hidden_states, base.hidden_states))
  ]
  for a, b, name in pairs:
    a, b = np.asarray(a), b.numpy()
    np.testing.assert_allclose(a[real], b[real], atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_allclose(a[~real], b[~real], atol=1e-2, rtol=0, err_msg=name + ", padded frames")
  np.testing.assert_allclose(np.asarray(ours.encoder.extract_features), base.extract_features.numpy(), atol=1e-5)


def test_quantized_targets_equal_in_eval(pair):
  cfg, params, ref = pair
  ours, theirs, base, _, _ = _run_both(cfg, params, ref, padded=True)
  with torch.no_grad():
    logits = ref.quantizer.weight_proj(base.extract_features)
    ref_idx = logits.view(*logits.shape[:2], cfg.num_codevector_groups, -1).argmax(-1).numpy()
  np.testing.assert_array_equal(np.asarray(ours.quantizer.code_idx), ref_idx)
  np.testing.assert_allclose(
    np.asarray(ours.projected_quantized_states), theirs.projected_quantized_states.numpy(), atol=1e-5, rtol=0
  )


def test_losses_match_given_mask_and_negatives(pair):
  cfg, params, ref = pair
  ours, theirs, _, mask, negatives = _run_both(cfg, params, ref, padded=True)
  _, metrics = objectives.pretraining_loss(
    ours, mask, negatives, objectives.ObjectiveConfig(num_negatives=NUM_NEGATIVES)
  )
  num_masked = float(metrics["num_masked"])
  assert num_masked == float(np.asarray(mask).sum()) > 0
  contrastive_sum = float(metrics["contrastive"]) * num_masked
  assert abs(contrastive_sum - float(theirs.contrastive_loss)) <= 1e-4
  num_vars = cfg.num_codevector_groups * cfg.num_codevectors_per_group
  diversity_sum = (num_vars - float(metrics["code_perplexity"])) / num_vars * num_masked  # eval: hard one-hots
  assert abs(diversity_sum - float(theirs.diversity_loss)) <= 1e-4


@pytest.mark.parametrize("kind,hf_class", [("pretraining", HFPreTraining), ("model", HFModel), ("ctc", HFCTC)])
def test_export_loads_in_transformers_bitwise(tmp_path, kind, hf_class):
  cfg = presets.tiny(stable_layer_norm=True).replace(vocab_size=12 if kind == "ctc" else 0)
  tree_kind = "ctc" if kind == "ctc" else "pretraining"
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3), tree_kind))
  hf.save_hf_dir(str(tmp_path), cfg, params, kind)
  model, info = hf_class.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  exported = hf.params_to_hf(params, kind)
  state = state_numpy(model)
  assert set(state) == set(exported)
  for key, value in exported.items():
    assert state[key].dtype == value.dtype and np.array_equal(state[key], value), key
  # And back: the directory loads into our tree bitwise.
  cfg2, params2, kind2 = hf.load_hf_dir(str(tmp_path))
  assert kind2 == kind and cfg2.replace(vocab_size=cfg.vocab_size) == cfg
  assert all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params2["wav2vec2"]), jax.tree.leaves(params["wav2vec2"]))
  )


def test_loads_transformers_save_pretrained(tmp_path):
  cfg = presets.tiny()
  torch.manual_seed(1)
  ref = HFPreTraining(hf_config(cfg)).eval()
  ref.save_pretrained(str(tmp_path))
  cfg2, params, kind = hf.load_hf_dir(str(tmp_path))
  assert kind == "pretraining" and cfg2 == cfg
  ours = hf.params_to_hf(params, "pretraining")
  for key, value in state_numpy(ref).items():
    assert np.array_equal(ours[key], value), key


def test_torch_bin_is_read_weights_only(tmp_path):
  """A pytorch_model.bin is read with weights_only=True: a pickle that runs code is refused."""
  cfg = presets.tiny()
  torch.manual_seed(2)
  ref = HFPreTraining(hf_config(cfg))
  (tmp_path / "ok").mkdir()
  torch.save(ref.state_dict(), tmp_path / "ok" / "pytorch_model.bin")
  json_config = json.dumps(hf.config_to_hf(cfg, "pretraining"))
  (tmp_path / "ok" / "config.json").write_text(json_config)
  _, params, _ = hf.load_hf_dir(str(tmp_path / "ok"))
  assert np.array_equal(params["quantizer"]["codevectors"], ref.quantizer.codevectors.detach().numpy())

  class Evil:
    def __reduce__(self):
      return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

  (tmp_path / "evil").mkdir()
  torch.save({"x": Evil()}, tmp_path / "evil" / "pytorch_model.bin")
  (tmp_path / "evil" / "config.json").write_text(json_config)
  with pytest.raises(hf.CheckpointError, match="weights-only"):
    hf.load_hf_dir(str(tmp_path / "evil"))
  assert not (tmp_path / "pwned").exists()
