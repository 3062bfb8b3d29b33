"""fairseq .pt import: checkpoints built here in fairseq's layout (module names, cfg or legacy args,
optimizer history) load bitwise into our tree; the CLIs accept them; a hostile pickle is refused."""

import argparse
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from w2v2_jax.interop import fairseq, hf
from w2v2_jax.interop.hf import CheckpointError
from w2v2_jax.models import config as model_config
from w2v2_jax.models.init import build, init_params

# HF names -> the fairseq modules they come from (fairseq/models/wav2vec/wav2vec2.py and wav2vec2_asr.py).
_TO_FAIRSEQ = (
  (r"^wav2vec2\.feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
  (r"^wav2vec2\.feature_projection\.layer_norm\.", "layer_norm."),
  (r"^wav2vec2\.feature_projection\.projection\.", "post_extract_proj."),
  (r"^wav2vec2\.masked_spec_embed$", "mask_emb"),
  (r"^wav2vec2\.encoder\.pos_conv_embed\.conv\.", "encoder.pos_conv.0."),
  (r"^wav2vec2\.encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
  (r"^wav2vec2\.encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
  (r"^wav2vec2\.encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
  (r"^wav2vec2\.encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
  (r"^wav2vec2\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
  (r"^wav2vec2\.encoder\.layer_norm\.", "encoder.layer_norm."),
  (r"^quantizer\.codevectors$", "quantizer.vars"),
  (r"^quantizer\.weight_proj\.", "quantizer.weight_proj."),
  (r"^project_q\.", "project_q."),
  (r"^project_hid\.", "final_proj."),
  (r"^lm_head\.", "proj."),
)


def fairseq_state(params, kind, cfg):
  """Our params -> a fairseq state dict of torch tensors (weight-norm as weight_g / weight_v)."""
  out = {}
  for key, value in hf.params_to_hf(params, kind).items():
    key = key.replace("parametrizations.weight.original0", "weight_g").replace(
      "parametrizations.weight.original1", "weight_v"
    )
    norm = re.match(r"^wav2vec2\.feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(.*)$", key)
    if norm:  # group norm: Sequential(conv, dropout, GroupNorm, GELU); layer norm: (..., Sequential(T, LN, T), ...)
      i, leaf = norm.groups()
      key = (
        f"feature_extractor.conv_layers.{i}.2.{leaf}"
        if cfg.feat_extract_norm == "group"
        else f"feature_extractor.conv_layers.{i}.2.1.{leaf}"
      )
    else:
      for pattern, repl in _TO_FAIRSEQ:
        if re.match(pattern, key):
          key = re.sub(pattern, repl, key)
          break
      else:
        raise AssertionError(key)
    if kind == "ctc":
      key = "w2v_encoder." + key if key.startswith("proj.") else "w2v_encoder.w2v_model." + key
    out[key] = torch.from_numpy(np.array(value))
  if kind == "pretraining":
    out["encoder.layers.0.self_attn._float_tensor"] = torch.zeros(1)  # fairseq's buffer, no weights
  return out


def fairseq_model_cfg(cfg):
  """A fairseq Wav2Vec2Config dict for `cfg` (conv_feature_layers as fairseq writes it)."""
  layers = " + ".join(f"[({d}, {k}, {s})]" for d, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride))
  return {
    "_name": "wav2vec2",
    "extractor_mode": "default" if cfg.feat_extract_norm == "group" else "layer_norm",
    "encoder_layers": cfg.num_hidden_layers,
    "encoder_embed_dim": cfg.hidden_size,
    "encoder_ffn_embed_dim": cfg.intermediate_size,
    "encoder_attention_heads": cfg.num_attention_heads,
    "activation_fn": "gelu",
    "layer_type": "transformer",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.05,
    "dropout_input": 0.1,
    "dropout_features": 0.1,
    "final_dim": cfg.proj_codevector_dim,
    "layer_norm_first": cfg.do_stable_layer_norm,
    "conv_feature_layers": layers,
    "conv_bias": cfg.conv_bias,
    "logit_temp": 0.1,
    "quantize_targets": True,
    "quantize_input": False,
    "same_quantizer": False,
    "target_glu": False,
    "feature_grad_mult": 0.1,
    "quantizer_depth": 1,
    "quantizer_factor": 3,
    "latent_vars": cfg.num_codevectors_per_group,
    "latent_groups": cfg.num_codevector_groups,
    "latent_dim": 0,
    "mask_length": 10,
    "mask_prob": 0.65,
    "num_negatives": 100,
    "conv_pos": cfg.num_conv_pos_embeddings,
    "conv_pos_groups": cfg.num_conv_pos_embedding_groups,
    "pos_conv_depth": 1,
    "latent_temp": [2.0, 0.5, 0.999995],
  }


def save_checkpoint(path, state, model_cfg, normalize=False, legacy_args=False):
  ckpt = {
    "model": state,
    "optimizer_history": [
      {
        "criterion_name": "Wav2vecCriterion",
        "optimizer_name": "FairseqAdam",
        "lr_scheduler_state": {"best": np.float64(3.25)},
        "num_updates": 400000,
      }
    ],
    "extra_state": {"epoch": 12, "previous_best": np.float64(3.25), "train_iterator": {"epoch": 12}},
    "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98)}]},
  }
  if legacy_args:
    ckpt["args"] = argparse.Namespace(
      arch="wav2vec2",
      task="audio_pretraining",
      normalize=normalize,
      **{k: v for k, v in model_cfg.items() if k != "_name"},
    )
  else:
    ckpt["cfg"] = {
      "common": {"seed": 1},
      "model": model_cfg,
      "task": {"_name": "audio_pretraining", "normalize": normalize, "sample_rate": 16000},
    }
  torch.save(ckpt, path)


def assert_trees_equal(a, b):
  fa, fb = hf._flatten(a), hf._flatten(b)  # pylint: disable=protected-access
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.parametrize("stable_layer_norm,legacy_args", [(False, False), (True, True)])
def test_pretrained_checkpoint_loads_bitwise(tmp_path, stable_layer_norm, legacy_args):
  cfg = model_config.tiny(stable_layer_norm)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3)))
  path = str(tmp_path / "checkpoint_best.pt")
  save_checkpoint(
    path,
    fairseq_state(params, "pretraining", cfg),
    fairseq_model_cfg(cfg),
    normalize=stable_layer_norm,
    legacy_args=legacy_args,
  )
  loaded_cfg, loaded, kind = fairseq.load(path)
  assert kind == "pretraining"
  assert (
    loaded_cfg.replace(
      feature_grad_mult=cfg.feature_grad_mult,
      layerdrop=cfg.layerdrop,
      feat_proj_dropout=cfg.feat_proj_dropout,
      feat_quantizer_dropout=cfg.feat_quantizer_dropout,
    )
    == cfg
  )
  assert_trees_equal(loaded, params)
  assert fairseq.normalize(path, loaded_cfg) is stable_layer_norm


@pytest.mark.slow
def test_finetuned_checkpoint_transcribes_extracts_and_exports(tmp_path):
  cfg = model_config.tiny().replace(vocab_size=4 + 5)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(4), "ctc"))
  path = str(tmp_path / "ft.pt")
  w2v = fairseq_model_cfg(cfg)
  ctc_cfg = {
    "_name": "wav2vec_ctc",
    "w2v_path": "/data/base.pt",
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.1,
    "layerdrop": 0.1,
    "final_dropout": 0.0,
    "apply_mask": True,
    "mask_prob": 0.5,
    "freeze_finetune_updates": 10000,
    "feature_grad_mult": 0.0,
    "w2v_args": {"model": w2v, "task": {"_name": "audio_pretraining", "normalize": False}},
  }
  save_checkpoint(path, fairseq_state(params, "ctc", cfg), ctc_cfg)
  with open(tmp_path / "dict.ltr.txt", "w") as f:
    f.write("| 9000\nE 500\nT 400\nA 300\nO 200\n")
  loaded_cfg, loaded, kind = fairseq.load(path)
  assert kind == "ctc" and loaded_cfg.vocab_size == 9 and loaded_cfg.layerdrop == 0.1
  assert_trees_equal(loaded, params)
  assert fairseq.vocabulary(path).tokens == ("<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O")

  import soundfile as sf

  wav = str(tmp_path / "a.wav")
  audio = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
  sf.write(wav, audio, 16000, subtype="FLOAT")  # lossless: features compare to the array
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", *args],
    capture_output=True,
    text=True,
    env=env,  # noqa: E731
    timeout=300,
  )
  out = run("w2v2_jax.cli.transcribe", f"--checkpoint={path}", f"--audio={wav}")
  assert out.returncode == 0 and out.stdout.startswith(wav + "\t"), out.stderr[-2000:]
  out = run("w2v2_jax.cli.extract", f"--checkpoint={path}", f"--audio={wav}", f"--output={tmp_path / 'f.npz'}")
  assert out.returncode == 0, out.stderr[-2000:]
  features = np.load(tmp_path / "f.npz")["a"]
  expected = build(cfg, "model").apply({"params": {"wav2vec2": params["wav2vec2"]}}, audio[None]).last_hidden_state[0]
  np.testing.assert_allclose(features, np.asarray(expected), rtol=1e-5, atol=1e-5)

  out = run("w2v2_jax.cli.export", f"--checkpoint={path}", f"--output={tmp_path / 'hf'}")
  assert out.returncode == 0, out.stderr[-2000:]
  from transformers import Wav2Vec2ForCTC

  model = Wav2Vec2ForCTC.from_pretrained(str(tmp_path / "hf")).eval()
  with torch.no_grad():
    theirs = model(torch.from_numpy(audio[None])).logits.numpy()
  ours = np.asarray(build(cfg, "ctc").apply({"params": params}, audio[None])[0])
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_hostile_or_foreign_pickles_are_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "evil.pt")
  torch.save({"model": {}, "cfg": {"model": _Exploit(marker)}}, path)
  with pytest.raises(CheckpointError, match=r"evil\.pt: refused or unreadable fairseq checkpoint"):
    fairseq.read(path)
  assert not marker.exists()  # nothing from the pickle ran

  other = str(tmp_path / "other.pt")
  torch.save({"model": {"decoder.embed_tokens.weight": torch.zeros(3, 2)}, "cfg": {"model": {"_name": "x"}}}, other)
  with pytest.raises(CheckpointError, match="unknown fairseq parameter 'decoder.embed_tokens.weight'"):
    fairseq.load(other)
  with pytest.raises(CheckpointError, match=r"conv_feature_layers=.*__import__"):
    fairseq.config_from_fairseq({"conv_feature_layers": "__import__('os').system('true')"})
