"""Scanned layers (model.scan_layers) against the loop: same loss and gradients, the two parameter forms,
their shardings, and runs that resume across the two."""

import os
import shutil

import jax
import numpy as np
import optax
import pytest
import train_config
from test_model import _batch, _loss_fn

from w2v2_jax import parallel
from w2v2_jax.models import config as presets
from w2v2_jax.models import layer_stack
from w2v2_jax.models.init import build, init_params
from w2v2_jax.train import checkpointing, loop, tasks
from w2v2_jax.train import step as steps


def _loss_and_grads(cfg, params, batch, key):
  """test_model's pre-training loss (dropout, Gumbel and LayerDrop keys folded from `key`) and its gradients."""
  return jax.value_and_grad(_loss_fn(cfg, *batch))(params, key)


@pytest.mark.parametrize(
  "stable_layer_norm,remat_policy",
  [
    (True, "full"),
    pytest.param(False, "none", marks=pytest.mark.slow),
    pytest.param(False, "dots_with_no_batch_dims_saveable", marks=pytest.mark.slow),
  ],
)
def test_scanned_and_looped_encoders_give_the_same_loss_and_gradients(stable_layer_norm, remat_policy):
  """Dropout everywhere and LayerDrop at 0.4 over 4 layers; the key is one under which some layers drop and
  some run, so a scan that drew other masks, or dropped other layers, would differ."""
  cfg = presets.tiny(stable_layer_norm).replace(
    num_hidden_layers=4, layerdrop=0.4, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1
  )
  key = jax.random.key(3)
  params = init_params(cfg, jax.random.key(0))
  batch = _batch(cfg)
  loss, grads = _loss_and_grads(cfg.replace(remat_policy=remat_policy), params, batch, key)
  scanned = cfg.replace(scan_layers=True, remat_policy=remat_policy)
  loss_s, grads_s = _loss_and_grads(scanned, layer_stack.to_form(params, True), batch, key)
  np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-6)
  grads_s = layer_stack.to_form(grads_s, False)
  assert jax.tree.structure(grads_s) == jax.tree.structure(grads)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_s)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # A dropped layer's parameters get no gradient: under this key some layers ran and some were dropped.
  ran = [
    any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["wav2vec2"]["encoder"][f"layers_{i}"]))
    for i in range(4)
  ]
  assert 0 < sum(ran) < 4, ran


def test_a_dropped_layer_is_skipped_by_a_cond_inside_the_scan():
  cfg = presets.tiny().replace(scan_layers=True, layerdrop=0.5)
  params = init_params(cfg, jax.random.key(0))
  audio, _, _ = _batch(cfg)
  model = build(cfg, "model")
  rngs = {"dropout": jax.random.key(1), "layerdrop": jax.random.key(2)}
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, audio, deterministic=False, rngs=rngs))(
    {"wav2vec2": params["wav2vec2"]}
  )
  scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == cfg.num_hidden_layers
  assert "cond" in {e.primitive.name for e in scans[0].params["jaxpr"].jaxpr.eqns}


def test_the_two_forms_convert_both_ways_with_optimizer_state():
  """Adam's moments convert like the parameters; a frozen part (optax's MaskedNode slots) stays frozen."""
  cfg = presets.tiny()
  params = init_params(cfg, jax.random.key(0))
  label = lambda keep: jax.tree_util.tree_map_with_path(  # noqa: E731
    lambda p, _: "frozen" if keep(jax.tree_util.keystr(p)) else "train", params
  )
  tx = lambda labels: optax.multi_transform({"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels)  # noqa: E731
  state = steps.init_state(params, tx(label(lambda p: "'layers_" in p)))
  stacked = layer_stack.to_form(state, True)
  assert layer_stack.is_scanned(state) is False and layer_stack.is_scanned(stacked) is True
  enc = stacked.params["wav2vec2"]["encoder"]
  assert "layers_0" not in enc and enc["layers"]["attention"]["q_proj"]["kernel"].shape == (2, 64, 64)
  assert layer_stack.is_scanned(stacked.opt_state) is True
  back = layer_stack.to_form(stacked, False)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # One layer frozen and another not has no stacked form: refused, not silently unfrozen.
  with pytest.raises(ValueError, match="frozen"):
    layer_stack.to_form(steps.init_state(params, tx(label(lambda p: "'layers_1'" in p))), True)


def test_stacked_layers_shard_as_each_layer_does_with_the_layer_axis_replicated():
  def layout(scan):
    c = train_config.get_config("/nonexistent,1")
    c.model.scan_layers = scan
    c.model.hidden_size, c.model.intermediate_size = 256, 1024  # some parameters past the FSDP size limit
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
    return loop.plan_layout(c)

  looped, scanned = layout(False), layout(True)
  as_loop = layer_stack.to_form(scanned.abstract_state, False)
  assert jax.tree.structure(as_loop) == jax.tree.structure(looped.abstract_state)
  pad = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))  # noqa: E731
  for a, b in zip(jax.tree.leaves(looped.abstract_state), jax.tree.leaves(as_loop)):
    assert a.shape == b.shape and pad(a.sharding.spec, a.ndim) == pad(b.sharding.spec, b.ndim)
  stacked = scanned.abstract_state.params["wav2vec2"]["encoder"]["layers"]
  kernel = stacked["feed_forward"]["intermediate_dense"]["kernel"]
  assert kernel.shape[0] == 2 and kernel.sharding.spec[0] is None and "fsdp" in tuple(kernel.sharding.spec)
  assert parallel.DEFAULT_RULES[-1] == ("layers", None)


def test_the_jitted_step_binds_the_activation_constraints():
  """loop.jit_steps traces under config.mesh.rules: the encoder's nn.with_logical_constraint calls (no-ops
  outside a rules context) become sharding constraints over the batch axes, inside the scan too."""
  import jax.numpy as jnp

  c = train_config.get_config("/nonexistent,1")
  c.model.scan_layers = True
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
  layout = loop.plan_layout(c)
  sh = parallel.batch_sharding(layout.mesh)
  batch = {
    "audio": jax.ShapeDtypeStruct((c.batch_size, 16000), jnp.int16, sharding=sh),
    "lengths": jax.ShapeDtypeStruct((c.batch_size,), jnp.int32, sharding=sh),
  }
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  train_step, _ = loop.jit_steps(c, layout)
  task = tasks.make(c)
  bare = jax.jit(steps.make_train_step(task, task.model_config, layout.tx, c))

  def constraints(fn):
    with jax.set_mesh(layout.mesh):
      text = fn.lower(layout.abstract_state, batch, key).as_text()
    return sum(line.count("sharding_constraint") for line in text.splitlines() if '"data", "fsdp"' in line)

  bound, unbound = constraints(train_step), constraints(bare)
  assert bound >= unbound + 3, (bound, unbound)  # the encoder's input, each layer's output, the FFN's


def _config(data_dir, scan, steps=4):
  """Adam with eps = 1 at lr 1: updates ~ the gradient, so the end-to-end comparison compares gradients
  (Adam's early sign(g) updates would turn reduction-order noise into lr-sized differences)."""
  c = train_config.get_config(f"{data_dir},{steps}")
  c.model.scan_layers = scan
  c.optim.lr, c.optim.eps, c.optim.warmup_steps = 1.0, 1.0, 0
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 5
  return c


@pytest.mark.slow
def test_a_run_resumes_across_the_two_forms_with_its_optimizer_state(speech_like_shards, tmp_path):
  """Looped and scanned runs of 4 steps (checkpoints at 2 and 4) end alike; each one's step-4 checkpoint
  restores into the other form bitwise, optimizer state included; and each, resumed from step 2 in the
  other form, ends where the looped run did."""
  runs = {}
  for scan in (False, True):
    workdir = str(tmp_path / f"scan_{scan}")
    runs[scan] = (workdir, loop.train_and_evaluate(_config(speech_like_shards, scan), workdir))
  straight = runs[False][1]
  for first, (workdir, _) in runs.items():
    mgr = checkpointing.manager(workdir, async_save=False)
    own = checkpointing.restore_run(mgr, loop.plan_layout(_config(speech_like_shards, first)).abstract_state)
    other = checkpointing.restore_run(mgr, loop.plan_layout(_config(speech_like_shards, not first)).abstract_state)
    mgr.close()
    assert own[0] == other[0] == 4 and layer_stack.is_scanned(other[1]) is (not first)
    converted = layer_stack.to_form(jax.device_get(other[1]), first)
    assert jax.tree.structure(converted) == jax.tree.structure(own[1])
    for a, b in zip(jax.tree.leaves(jax.device_get(own[1])), jax.tree.leaves(converted)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    resumed = loop.train_and_evaluate(_config(speech_like_shards, not first), workdir)
    assert resumed["step"] == 4
    for ended in (runs[True][1], resumed):
      params = layer_stack.to_form(jax.device_get(ended["params"]), False)
      for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(jax.device_get(straight["params"]))[0], jax.tree.leaves(params)
      ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
      np.testing.assert_allclose(ended["loss"], straight["loss"], rtol=1e-5)


def test_hf_export_of_scanned_parameters_equals_the_looped_export():
  from w2v2_jax.interop import hf

  params = jax.device_get(init_params(presets.tiny(), jax.random.key(0)))
  looped = hf.params_to_hf(params, "pretraining")
  scanned = hf.params_to_hf(layer_stack.to_form(params, True), "pretraining")
  assert looped.keys() == scanned.keys() and "wav2vec2.encoder.layers.1.attention.q_proj.weight" in looped
  for k in looped:
    np.testing.assert_array_equal(looped[k], scanned[k])


def test_configs_written_with_the_remat_bool_load():
  saved = presets.tiny().to_dict()
  for key in ("remat_policy", "scan_layers"):
    del saved[key]
  assert presets.ModelConfig.from_dict({**saved, "remat": True}).remat_policy == "full"
  assert presets.ModelConfig.from_dict({**saved, "remat": False}).remat_policy == "none"
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    presets.tiny().replace(remat_policy="dots")
