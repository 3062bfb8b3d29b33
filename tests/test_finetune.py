"""CTC fine-tuning through w2v2-train: the loss falls, the freeze schedule holds, the checkpoint
transcribes, and its export loads in transformers' Wav2Vec2ForCTC with the same logits."""

import json
import os
import subprocess
import sys

import finetune_config
import jax
import numpy as np
import pytest
import soundfile as sf

from w2v2_jax.data import records
from w2v2_jax.decoding import ctc, ngram
from w2v2_jax.train import loop, optim, tasks

LETTERS = "ABCDE"


def _spoken(text, rng):
  """Each letter a 120 ms tone of its own pitch, words separated by 80 ms of quiet noise."""
  pieces = []
  for word in text.split():
    for ch in word:
      t = np.arange(1920) / 16000
      pieces.append(np.sin(2 * np.pi * (200 + 150 * LETTERS.index(ch)) * t))
    pieces.append(0.01 * rng.standard_normal(1280))
  x = np.concatenate(pieces) + 0.01 * rng.standard_normal(sum(p.size for p in pieces))
  return (x / np.abs(x).max() * 12000).astype(np.int16)


@pytest.fixture(scope="module")
def labeled_shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("ctc_shards")
  rng = np.random.default_rng(0)
  utts = []
  for i in range(48):
    words = [''.join(rng.choice(list(LETTERS), rng.integers(1, 4))) for _ in range(rng.integers(1, 4))]
    text = " ".join(words)
    audio = _spoken(text, rng)
    audio = np.pad(audio, (0, max(0, 8000 - audio.size)))[:32000]
    utts.append(records.Utterance(f"u{i}", audio, transcript=text.lower()))
  records.write_split(str(root), "train", utts[:40], shard_size=40)
  records.write_split(str(root), "valid", utts[40:], shard_size=8)
  return str(root)


def test_tri_stage_schedule():
  lr = optim.tri_stage(1.0, 100, (0.1, 0.4, 0.5), 0.01, 0.05)
  assert float(lr(0)) == pytest.approx(0.01)
  assert float(lr(10)) == pytest.approx(1.0) and float(lr(49)) == pytest.approx(1.0)
  assert float(lr(75)) == pytest.approx(0.05**0.5, rel=1e-3)  # exponential: halfway in log space
  assert float(lr(100)) == pytest.approx(0.05, rel=1e-3) and float(lr(1000)) == pytest.approx(0.05, rel=1e-3)


@pytest.mark.slow
def test_finetune_lowers_ctc_loss_then_transcribes_and_exports(labeled_shards, tmp_path):
  workdir = str(tmp_path / "ctc")
  first = loop.train_and_evaluate(finetune_config.get_config(f"{labeled_shards},1,0"), str(tmp_path / "one"))
  config = finetune_config.get_config(f"{labeled_shards},60,0")
  config.decode.beam = 8  # the last evaluation also beam-searches with a word 3-gram of the train transcripts
  config.decode.kenlm = ngram.build_arpa(
    map(ctc.normalize, records.load_split(labeled_shards, "train").transcripts()), str(tmp_path / "lm.arpa"), order=3
  )
  result = loop.train_and_evaluate(config, workdir)
  assert result["step"] == 60 and result["ctc_loss"] < 0.5 * first["ctc_loss"], (first["ctc_loss"], result["ctc_loss"])
  assert result["valid_loss"] < first["valid_loss"]
  assert 0.0 <= result["valid_cer"] <= first["valid_cer"]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "eval_results.json"))]
  assert lines[-1]["step"] == 60 and set(lines[-1]) >= {"wer", "cer", "loss", "utterances"}
  assert lines[-1]["utterances"] == 8
  assert 0.0 <= lines[-1]["beam_cer"] <= 1.0 and 0.0 <= lines[-1]["beam_wer"] <= 1.0, lines[-1]
  vocab = json.load(open(os.path.join(workdir, "vocab.json")))
  assert vocab["<pad>"] == 0 and "|" in vocab and set(LETTERS) <= set(vocab)

  # w2v2-transcribe: one line per file.
  wavs = []
  for i, text in enumerate(["AB", "CE D"]):
    wavs.append(str(tmp_path / f"{i}.wav"))
    sf.write(wavs[-1], _spoken(text, np.random.default_rng(i)), 16000)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-m", "w2v2_jax.cli.transcribe", f"--checkpoint={workdir}", f"--audio={','.join(wavs)}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [l.split("\t") for l in out.stdout.splitlines()]
  assert [r[0] for r in rows] == wavs and all(len(r) == 2 for r in rows)

  # w2v2-plot on a CTC run: the curves only (no codebook).
  out = subprocess.run(
    [sys.executable, "-m", "w2v2_jax.cli.plot", f"--workdir={workdir}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert out.returncode == 0 and out.stdout.split() == [os.path.join(workdir, "curves.png")], out.stderr[-2000:]
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000

  # w2v2-export -> transformers' Wav2Vec2ForCTC: the same logits, and the vocabulary beside them.
  import torch
  from transformers import Wav2Vec2ForCTC

  from w2v2_jax.interop.load import load_ctc
  from w2v2_jax.models.init import build

  export_dir = str(tmp_path / "hf")
  out = subprocess.run(
    [sys.executable, "-m", "w2v2_jax.cli.export", f"--checkpoint={workdir}", f"--output={export_dir}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.load(open(os.path.join(export_dir, "vocab.json"))) == vocab
  cfg, params, _, _ = load_ctc(workdir)
  audio = np.random.default_rng(1).standard_normal((1, 16000)).astype(np.float32)
  ours = np.asarray(build(cfg, "ctc").apply({"params": params}, audio)[0])
  hf = Wav2Vec2ForCTC.from_pretrained(export_dir).eval()
  with torch.no_grad():
    theirs = hf(torch.from_numpy(audio)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_encoder_frozen_for_the_first_updates(labeled_shards, tmp_path):
  """Starting from a pre-training checkpoint with freeze_steps=3: after 3 updates the encoder is
  exactly the pre-trained one and only the head moved; after 5 the encoder moved too, and the
  feature encoder (feature_grad_mult 0) never does."""
  from w2v2_jax.models.init import init_params
  from w2v2_jax.train import checkpointing

  c = finetune_config.get_config(f"{labeled_shards},3,3")
  pretrained = init_params(loop.model_config(c), jax.random.key(123), "pretraining")
  source = checkpointing.save_params(str(tmp_path / "pretrained"), pretrained, loop.model_config(c), "pretraining")
  run = str(tmp_path / "run")
  c = finetune_config.get_config(f"{labeled_shards},3,3,{source}")
  c.train.profile_steps, c.train.profile_first_step = 1, 1  # clu's Profile: one trace, steps 1-2
  start = init_params(tasks.make(c, labeled_shards, run).model_config, jax.random.key(c.seed), "ctc")
  start["wav2vec2"] = pretrained["wav2vec2"]
  before = c.to_json()
  after3 = loop.train_and_evaluate(c, run)["params"]
  assert c.to_json() == before  # the vocabulary's size is derived, not written into the config
  traces = [n for _, _, names in os.walk(os.path.join(run, "profile")) for n in names if n.endswith(".xplane.pb")]
  assert len(traces) == 1, traces
  after5 = loop.train_and_evaluate(finetune_config.get_config(f"{labeled_shards},5,3,{source}"), run)["params"]

  def same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  assert same(start["wav2vec2"], after3["wav2vec2"])
  assert not same(start["lm_head"], after3["lm_head"])
  assert not same(after3["wav2vec2"]["encoder"], after5["wav2vec2"]["encoder"])
  assert same(start["wav2vec2"]["feature_extractor"], after5["wav2vec2"]["feature_extractor"])


def test_miniature_scratch_baseline_differs_only_in_init_and_freezing():
  import experiment_file

  from w2v2_jax.demo import miniature

  pretrained = experiment_file.config("demo_finetune")
  pretrained.init = "/somewhere/pretrain"
  scratch = miniature.scratch_config(pretrained)
  assert scratch.init == "" and scratch.finetune.freeze_steps == 0 and scratch.model.feature_grad_mult == 1.0
  a, b = pretrained.to_dict(), scratch.to_dict()
  for d in (a, b):
    d.pop("init"), d["finetune"].pop("freeze_steps"), d["model"].pop("feature_grad_mult")
  assert a == b  # same architecture, data, updates, schedule and masking
