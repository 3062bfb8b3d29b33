"""config.init: continued pre-training (and fine-tuning) start from a released or earlier checkpoint.

The trainer's first step from an HF Wav2Vec2ForPreTraining directory has transformers' loss on the same
batch, mask, negatives and codewords; a fairseq .pt arrives bitwise; the optimizer, the step and the lr
schedule start fresh; a checkpoint without the pre-training heads is refused; w2v2-train runs with it.
"""

import os
import subprocess
import sys

import conftest
import jax
import numpy as np
import pytest
import torch
import train_config
from hf_reference import hf_config, torch_tensor
from test_fairseq import assert_trees_equal, fairseq_model_cfg, fairseq_state, save_checkpoint
from transformers import Wav2Vec2ForPreTraining as HFPreTraining

from w2v2_jax import parallel
from w2v2_jax.data import pipeline
from w2v2_jax.interop import hf
from w2v2_jax.interop.hf import CheckpointError
from w2v2_jax.models import config as presets
from w2v2_jax.models import layer_stack, objectives
from w2v2_jax.models.init import build, init_params
from w2v2_jax.train import checkpointing, defaults, events, loop, optim, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLES = {"base_style": presets.tiny(stable_layer_norm=False), "lv60_style": presets.tiny(stable_layer_norm=True)}
NO_DROPOUT = dict(
  hidden_dropout=0.0,
  attention_dropout=0.0,
  activation_dropout=0.0,
  feat_proj_dropout=0.0,
  feat_quantizer_dropout=0.0,
  layerdrop=0.0,
)
LENGTHS = [16000, 15000, 14321, 13000, 12345, 16000, 12000, 15500]


def run_config(model: presets.ModelConfig, init: str):
  """A tiny pre-training run on 8 CPU devices (data 2 x fsdp 4) whose model is `model`, from `init`."""
  c = defaults.pretraining_config("tiny")
  for k, v in model.to_dict().items():
    c.model[k] = v
  c.init = init
  c.batch_size = 8
  c.num_train_steps = 10
  c.data.min_sample_size, c.data.max_sample_size, c.data.num_buckets = 8000, 16000, 1
  c.objective.num_negatives = 20
  c.objective.feature_penalty_weight = 0.0  # transformers' loss has no feature penalty
  c.optim.lr, c.optim.warmup_steps = 1e-3, 4
  c.mesh.data, c.mesh.fsdp = 2, 4
  return c


def first_state(config, workdir):
  """(task, layout, step-0 train state) as w2v2-train builds them in an empty workdir (restore_or_init)."""
  task = tasks.make(config)
  layout = loop.plan_layout(config, task=task)
  with jax.set_mesh(layout.mesh):
    mgr = checkpointing.manager(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    start, state = loop.restore_or_init(config, task, layout, mgr, train_data=None)
    mgr.close()
  assert start == 0
  return task, layout, state


def numpy_tree(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_continued_pretraining_first_step_has_transformers_loss(style, tmp_path, monkeypatch):
  """From an HF directory: the params the trainer starts from are the directory's, and its first train step's
  loss (loss x masked count: transformers sums) equals Wav2Vec2ForPreTraining's in training mode on the same
  batch, mask, negatives and Gumbel codewords (transformers draws its Gumbel noise with torch: it is given the
  codewords our step drew from the same key). Dropouts are 0 on both sides."""
  model = STYLES[style].replace(**NO_DROPOUT)
  source = str(tmp_path / "hf")
  torch.manual_seed(0)
  HFPreTraining(hf_config(model)).save_pretrained(source)
  config = run_config(model, source)
  task, layout, state = first_state(config, str(tmp_path / "run"))
  start = numpy_tree(state.params)
  assert_trees_equal(start, hf.load_hf_dir(source)[1])

  rng = np.random.default_rng(0)
  lengths = np.asarray(LENGTHS, np.int32)
  real = np.arange(max(LENGTHS)) < lengths[:, None]
  audio = ((rng.standard_normal((8, max(LENGTHS))) * 3000).astype(np.int16) * real).astype(np.int16)
  batch = {"audio": audio, "lengths": lengths}
  train_step, _ = loop.jit_steps(config, layout, task)
  key = jax.random.key(config.seed + 1, impl=config.rng_impl)  # the loop's key
  with jax.set_mesh(layout.mesh):
    state, metrics = train_step(state, pipeline.to_global(batch, parallel.batch_sharding(layout.mesh), 8), key)
  metrics = numpy_tree(metrics)

  # The step's draws, as the pre-training loss makes them from fold_in(key, step 0).
  cfg, obj = task.model_config, task.objective
  k_mask, k_neg, k_drop, k_gumbel, k_layer = jax.random.split(jax.random.fold_in(key, 0), 5)
  wave = np.asarray(pipeline.waveform(audio, lengths, config.data.normalize))
  num_frames = int(cfg.num_frames(wave.shape[1]))
  mask = objectives.compute_span_mask(
    k_mask, cfg.num_frames(lengths), num_frames, obj.mask_prob, obj.mask_length, obj.min_masks, obj.require_same_masks
  )
  negatives = np.asarray(objectives.sample_negatives(k_neg, mask, obj.num_negatives))
  ours = build(cfg, "pretraining").apply(
    {"params": start},
    wave,
    lengths,
    mask,
    float(metrics["temperature"]),
    False,
    rngs={"dropout": k_drop, "gumbel": k_gumbel, "layerdrop": k_layer},
  )
  code_idx = torch_tensor(ours.quantizer.code_idx, torch.long).reshape(-1)  # [B * T * G], transformers' order
  codewords = torch.nn.functional.one_hot(code_idx, cfg.num_codevectors_per_group).float()
  monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", lambda logits, tau, hard: codewords + 0 * logits)

  ref = HFPreTraining.from_pretrained(source).train()
  attention = np.arange(wave.shape[1])[None] < lengths[:, None]
  with torch.no_grad():
    theirs = ref(
      torch_tensor(wave),
      attention_mask=torch_tensor(attention, torch.long),
      mask_time_indices=torch_tensor(mask),
      sampled_negative_indices=torch_tensor(negatives + (np.arange(8) * num_frames)[:, None, None]),
    )
  masked = float(np.asarray(mask).sum())
  assert metrics["count"] == masked > 0
  summed = float(metrics["loss"]) * masked
  print(f"{style}: loss x masked frames {summed:.6f}, transformers' {float(theirs.loss):.6f}")
  assert abs(summed - float(theirs.loss)) <= 1e-4  # transformers' sum over masked frames
  assert abs(float(metrics["loss"]) - float(theirs.loss) / masked) <= 1e-6  # per masked frame, as the trainer logs
  assert float(metrics["lr"]) == pytest.approx(config.optim.lr / config.optim.warmup_steps)  # warm-up's first lr


@pytest.fixture(scope="module")
def pretrained_workdir(speech_like_shards, tmp_path_factory):
  """A pre-training workdir after 2 updates of tests/train_config.py (Adam moments no longer zero)."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  loop.train_and_evaluate(train_config.get_config(f"{speech_like_shards},2"), workdir)
  return workdir


@pytest.mark.slow
def test_init_starts_a_fresh_optimizer_and_schedule(speech_like_shards, pretrained_workdir, tmp_path):
  """From a workdir at step 2 with Adam moments: the same params, but step 0, zero moments and counts,
  and the lr schedule at its first warm-up value."""
  config = train_config.get_config(f"{speech_like_shards},6")
  config.init = pretrained_workdir
  _, layout, state = first_state(config, str(tmp_path / "run"))
  with jax.set_mesh(layout.mesh):
    mgr = checkpointing.manager(pretrained_workdir)
    source_step, source, _ = checkpointing.restore_run(mgr, layout.abstract_state)
    mgr.close()
  assert source_step == 2 and int(source.step) == 2
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(source.opt_state))
  assert_trees_equal(numpy_tree(state.params), numpy_tree(source.params))
  assert int(state.step) == 0 and int(state.skipped_total) == 0
  fresh = layout.tx.init(state.params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(fresh)
  for leaf, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))
    assert not np.asarray(leaf).any()  # moments and step counts all zero
  lr = optim.schedule(config.optim, config.num_train_steps)
  assert float(lr(state.step)) == pytest.approx(config.optim.lr / config.optim.warmup_steps)

  class Input:  # what restore_or_init asks of the train input on resume
    position = 0

    def restore(self, data_state):
      self.data_state = data_state

  config.init = str(tmp_path / "nowhere")  # never read: the workdir's own checkpoint wins
  with jax.set_mesh(layout.mesh):
    mgr = checkpointing.manager(pretrained_workdir)
    start, resumed = loop.restore_or_init(config, tasks.make(config), layout, mgr, Input())
    mgr.close()
  assert start == 2 and int(resumed.step) == 2


@pytest.mark.parametrize("style,scanned", [("base_style", False), ("lv60_style", True)])
def test_fairseq_pretrained_file_loads_bitwise(style, scanned, tmp_path):
  """The params the trainer starts from equal a fairseq pre-trained .pt's exactly (a scanned run stacks them)."""
  model = STYLES[style]
  params = numpy_tree(init_params(model, jax.random.key(7)))
  path = str(tmp_path / "checkpoint_best.pt")
  save_checkpoint(path, fairseq_state(params, "pretraining", model), fairseq_model_cfg(model))
  config = run_config(model.replace(scan_layers=scanned), path)
  _, _, state = first_state(config, str(tmp_path / "run"))
  assert ("layers" in state.params["wav2vec2"]["encoder"]) is scanned
  assert_trees_equal(layer_stack.to_form(numpy_tree(state.params), scanned=False), params)
  assert int(state.step) == 0


def test_pretraining_refuses_checkpoints_without_its_heads(tmp_path):
  """A bare Wav2Vec2Model directory and a CTC checkpoint: one line naming the path and what to pass instead.
  Another architecture: one line naming the keys that differ."""
  model = presets.tiny()
  bare, ctc = str(tmp_path / "bare"), str(tmp_path / "ctc")
  hf.save_hf_dir(bare, model, numpy_tree(init_params(model, jax.random.key(1))), "model")
  ctc_model = model.replace(vocab_size=9)
  ctc = checkpointing.save_params(ctc, numpy_tree(init_params(ctc_model, jax.random.key(2), "ctc")), ctc_model, "ctc")
  for path, kind in ((bare, "model"), (ctc, "ctc")):
    task = tasks.make(run_config(model, path))
    with pytest.raises(CheckpointError) as e:
      task.initial_params(jax.random.key(0))
    assert str(e.value) == (
      f"config.init={path}: a '{kind}' checkpoint has no quantizer and projection heads to continue "
      "pre-training from; pass a pre-training checkpoint (an HF Wav2Vec2ForPreTraining directory, a fairseq "
      "pre-trained .pt, or a w2v2_jax pre-training workdir), or start CTC fine-tuning from this one"
    )
  # The bare encoder still starts CTC fine-tuning.
  c = run_config(model, bare)
  c.task = "ctc"
  c.finetune = defaults.finetuning_config("tiny").finetune
  c.model.vocab_size = 9
  params = tasks.make(c).initial_params(jax.random.key(0))
  assert_trees_equal(numpy_tree(params["wav2vec2"]), hf.load_hf_dir(bare)[1]["wav2vec2"])

  other = str(tmp_path / "other")
  wide = model.replace(hidden_size=96, num_codevectors_per_group=16)
  hf.save_hf_dir(other, wide, numpy_tree(init_params(wide, jax.random.key(3))), "pretraining")
  with pytest.raises(CheckpointError) as e:
    tasks.make(run_config(model, other)).initial_params(jax.random.key(0))
  assert str(e.value) == (
    f"config.init={other}: its architecture differs from the run's config.model in hidden_size=64 (checkpoint: 96), "
    "num_codevectors_per_group=32 (checkpoint: 16); set config.model_preset / config.model to match the checkpoint"
  )


def _train_cli(*args, module="w2v2_jax.cli.train"):
  env = {**os.environ, "XLA_FLAGS": conftest.FAST_COMPILE, "JAX_PLATFORMS": "cpu"}  # one CPU device
  return subprocess.run(
    [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )


def test_the_old_key_is_named_with_the_new_one(tmp_path):
  for config in ("experiments/demo.py", "experiments/demo_finetune.py"):
    run = _train_cli(f"--config={config}", f"--workdir={tmp_path}", "--config.finetune.init=/somewhere")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == (
      "w2v2-train: error: --config.finetune.init: the config key finetune.init is now init; pass --config.init"
    )
  run = _train_cli(f"--workdir={tmp_path}", "--finetune.finetune.init=/somewhere", module="w2v2_jax.demo.miniature")
  assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == (
    "w2v2-miniature: error: --finetune.finetune.init: the config key finetune.init is now init; pass --finetune.init"
  ), run.stderr[-3000:]


@pytest.mark.slow
def test_w2v2_train_continues_the_demo_from_our_workdir(speech_like_shards, pretrained_workdir, tmp_path):
  """The tiny demo config on the test shards, 2 updates from a pre-training workdir: its first lr is the
  warm-up's, and its parameters are within those 2 updates (lr 4e-5 + 8e-5) of the workdir's."""
  workdir = str(tmp_path / "continued")
  run = _train_cli(
    "--config=experiments/demo.py:2",
    f"--workdir={workdir}",
    f"--config.init={pretrained_workdir}",
    "--config.data.source=shards",
    f"--config.data.data_dir={speech_like_shards}",
    "--config.data.train_split=train",
    "--config.data.valid_split=valid",
    "--config.data.num_buckets=1",
    "--config.log_every_steps=1",
    "--plots=false",
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"from {pretrained_workdir} (a 'pretraining' checkpoint); optimizer, step and lr schedule start at 0" in (
    run.stderr
  )
  assert max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == 2  # this run's steps
  lr = dict(events.read_scalars(workdir)["train/lr"])
  assert lr[1] == pytest.approx(2e-3 / 50, rel=1e-5) and lr[2] == pytest.approx(2 * 2e-3 / 50, rel=1e-5)  # float32
  _, source, _, _ = checkpointing.load_params(checkpointing.resolve_step_dir(pretrained_workdir))
  _, continued, _, _ = checkpointing.load_params(checkpointing.resolve_step_dir(workdir))
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(continued), jax.tree.leaves(source)))
  assert 0 < moved < 2e-4, moved
