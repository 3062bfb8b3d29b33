"""w2v2-train: config checks, FSDP-sharded parameters, and exact resume after an interruption."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import train_config

from w2v2_jax.train import loop, tasks


def _config(data_dir, steps):
  return train_config.get_config(f"{data_dir},{steps}")


def test_learning_rate_follows_fairseq_polynomial_decay():
  from w2v2_jax.train.optim import learning_rate

  lr = learning_rate(1e-3, warmup_steps=4, total_steps=12)
  np.testing.assert_allclose(
    [float(lr(k)) for k in range(13)],
    [2.5e-4, 5e-4, 7.5e-4, 1e-3] + [1e-3 * (1 - (k - 4) / 8) for k in range(4, 13)],
    rtol=1e-6,
    atol=1e-12,
  )


def test_config_errors_name_the_key(speech_like_shards):
  from w2v2_jax import parallel

  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  c = _config(speech_like_shards, 1)
  c.batch_size = 6
  with pytest.raises(ValueError, match="config.batch_size=6"):
    loop.validate(c, mesh)
  c = _config(speech_like_shards, 1)
  c.data.min_sample_size = 200
  c.data.max_sample_size = 300
  with pytest.raises(ValueError, match="config.data.min_sample_size=200"):
    loop.validate(c, mesh)
  c = _config(speech_like_shards, 1)
  c.data.bucketing = "quantiles"
  with pytest.raises(ValueError, match="config.data.bucketing='quantiles'"):
    loop.validate(c, mesh)
  c = _config(speech_like_shards, 1)
  c.task = "asr"
  with pytest.raises(ValueError, match="config.task='asr'"):
    loop.validate(c, mesh)
  with pytest.raises(ValueError, match="config.mesh"):
    parallel.make_mesh({"data": 3, "fsdp": -1})
  with pytest.raises(AttributeError):
    c.lock()
    c.optim.learning_rate = 1.0  # locked: unknown keys fail


@pytest.mark.slow
def test_preempted_and_resumed_run_is_bitwise_equal(speech_like_shards, tmp_path):
  """w2v2-train gets SIGTERM mid-run (saves, exits 0) or SIGKILL (no save); the same command then
  resumes from the latest complete checkpoint and ends bitwise equal to an uninterrupted run."""
  workdir = str(tmp_path / "resumed")
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",  # XLA_FLAGS as in this process: bitwise comparable
    "PYTHONPATH": os.path.dirname(__file__),
  }

  def cmd(workdir):
    return [
      sys.executable,
      "-m",
      "w2v2_jax.cli.train",
      f"--config={os.path.join(os.path.dirname(__file__), 'train_config.py')}:{speech_like_shards},6",
      f"--workdir={workdir}",
    ]

  proc = subprocess.Popen(cmd(workdir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "step 2/6" in line:
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, "".join(lines[-20:])
  assert any("preempted: saved step" in l for l in lines), "".join(lines[-20:])
  stopped = int(next(l for l in lines if "preempted: saved step" in l).split("saved step ")[1].split(";")[0])
  assert 2 <= stopped < 6
  assert max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == stopped

  # SIGKILL (no chance to save) once the step-2 checkpoint is complete: the rerun restarts from it.
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(
    cmd(killed) + ["--config.checkpoint_every_steps=2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(killed, "checkpoints", "2")) and time.time() < deadline:
    time.sleep(0.05)
  proc.kill()
  assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
  assert max(int(d) for d in os.listdir(os.path.join(killed, "checkpoints")) if d.isdigit()) < 6

  straight = loop.train_and_evaluate(_config(speech_like_shards, 6), str(tmp_path / "straight"))
  assert straight["step"] == 6 and straight["skipped_total"] == 0
  for resumed_dir in (workdir, killed):
    c = _config(speech_like_shards, 6)
    c.checkpoint_every_steps = 2 if resumed_dir == killed else c.checkpoint_every_steps
    resumed = loop.train_and_evaluate(c, resumed_dir)
    assert resumed["step"] == 6
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert straight["loss"] == resumed["loss"]
  assert "valid_loss" in straight and np.isfinite(straight["valid_loss"])
  # Parameters are sharded FSDP-style over the mesh, not replicated.
  big = max(jax.tree.leaves(straight["params"]), key=lambda x: x.size)
  assert len({str(s.index) for s in big.addressable_shards}) > 1


@pytest.mark.slow
def test_compiled_programs_are_kept_under_the_cache_folder_unless_jax_names_one(tmp_path):
  """w2v2-train and w2v2-miniature call cli.common.use_compilation_cache(): XLA's programs go to
  $W2V2_JAX_CACHE/xla, or to JAX_COMPILATION_CACHE_DIR when the user sets it."""
  code = (
    "from w2v2_jax.cli.common import use_compilation_cache; folder = use_compilation_cache(); import jax; "
    "jax.jit(lambda x: jax.numpy.sin(x) @ x)(jax.numpy.ones((64, 64))).block_until_ready(); print(folder)"
  )
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(W2V2_JAX_CACHE=str(tmp_path / "w2v2"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  for own in (None, str(tmp_path / "own")):
    run_env = dict(env, **({"JAX_COMPILATION_CACHE_DIR": own} if own else {}))
    out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = own or str(tmp_path / "w2v2" / "xla")
    assert out.stdout.strip().splitlines()[-1] == folder
    assert os.listdir(folder), f"nothing cached in {folder}"
    if own is None:
      default_entries = sorted(os.listdir(folder))
  assert sorted(os.listdir(tmp_path / "w2v2" / "xla")) == default_entries, "the second run wrote there too"


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_abort(speech_like_shards, tmp_path):
  c = _config(speech_like_shards, 8)
  c.optim.lr = float("nan")  # the first update poisons every parameter; later losses are NaN
  c.optim.warmup_steps = 0
  c.train.max_consecutive_skips = 3
  with pytest.raises(FloatingPointError, match="3 non-finite steps in a row at step 4"):
    loop.train_and_evaluate(c, str(tmp_path / "nan"))


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.slow
def test_skipped_step_leaves_state_untouched(speech_like_shards, platform):
  """Both forms of the guard: the cpu kernels' lax.cond and the select that GPU/TPU steps compile."""
  import jax.numpy as jnp

  from w2v2_jax.models.init import init_params
  from w2v2_jax.train import optim
  from w2v2_jax.train import step as steps

  c = _config(speech_like_shards, 1)
  c.model.kernels = "cpu" if platform == "cpu" else "xla"
  c.optim.warmup_steps = 0
  task = tasks.make(c)
  cfg = task.model_config
  tx = optim.optimizer(c.optim, c.num_train_steps)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {
    "audio": jnp.asarray(rng.integers(-3000, 3000, (8, 16000)), jnp.int16),
    "lengths": jnp.full((8,), 16000, jnp.int32),
  }
  train_step = jax.jit(steps.make_train_step(task, cfg, tx, c))
  bad = jax.tree.map(lambda x: x, params)
  bad["quantizer"]["codevectors"] = bad["quantizer"]["codevectors"].at[0, 0, 0].set(jnp.nan)
  state = steps.init_state(bad, tx)
  new, metrics = train_step(state, batch, jax.random.key(1))
  assert not np.isfinite(float(metrics["loss"])) and int(new.skipped_total) == 1 == int(new.skipped_in_a_row)
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  good, metrics = train_step(steps.init_state(params, tx), batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"])) and int(good.skipped_total) == 0
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(good.params)))


@pytest.mark.slow
def test_micro_batches_give_the_whole_batch_gradient(speech_like_shards):
  """1, 2 and 4 micro-batches of one batch: the same loss, gradient norm and update.

  The CTC loss averages over sentences and each piece has its own count (different utterance and
  label lengths; two rows without labels, so one of four pieces counts 0), so a normaliser applied
  twice or per piece shows. No masks, dropout or LayerDrop, so the three steps see the same model.
  lr = eps = 1 (constant) makes Adam's first update ~g / (|g| + 1): the parameters compare gradients.
  """
  import finetune_config
  import jax.numpy as jnp

  from w2v2_jax.models.init import init_params
  from w2v2_jax.train import optim
  from w2v2_jax.train import step as steps

  c = finetune_config.get_config(f"{speech_like_shards},1,0")
  c.finetune.mask_prob = 0.0
  c.model.update(
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    final_dropout=0.0,
    layerdrop=0.0,
    feature_grad_mult=1.0,
    vocab_size=20,
  )
  c.optim.lr, c.optim.eps, c.optim.warmup_steps, c.optim.schedule, c.optim.end_lr = 1.0, 1.0, 0, "polynomial", 1.0
  assert float(optim.schedule(c.optim, c.num_train_steps)(0)) == 1.0
  task = tasks.make(c)
  cfg = task.model_config
  tx = optim.optimizer(c.optim, c.num_train_steps)
  state = steps.init_state(init_params(cfg, jax.random.key(0), "ctc"), tx)
  rng = np.random.default_rng(0)
  lengths = np.array([16000, 9000, 12000, 16000, 8000, 15000, 11000, 16000], np.int32)
  label_lengths = np.array([7, 3, 0, 0, 2, 9, 4, 6], np.int32)
  batch = {
    "audio": jnp.asarray(rng.integers(-3000, 3000, (8, 16000)) * (np.arange(16000) < lengths[:, None]), jnp.int16),
    "lengths": jnp.asarray(lengths),
    "labels": jnp.asarray(rng.integers(1, 20, (8, 9)) * (np.arange(9) < label_lengths[:, None]), jnp.int32),
    "label_lengths": jnp.asarray(label_lengths),
  }
  results = {}
  for micro in (1, 2, 4):
    c.train.microbatches = micro
    new, metrics = jax.jit(steps.make_train_step(task, cfg, tx, c))(state, batch, jax.random.key(1))
    results[micro] = (float(metrics["loss"]), float(metrics["grad_norm"]), new.params)
  loss, grad_norm, params = results[1]
  assert grad_norm > 0 and np.isfinite(loss)
  for micro in (2, 4):
    np.testing.assert_allclose(results[micro][:2], (loss, grad_norm), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(results[micro][2]), jax.tree.leaves(params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
  "name",
  [
    "demo",
    "base_librispeech",
    "large_librispeech",
    "large_lv60",
    "xlsr_300m",
    "xlsr_2b",
    "demo_finetune",
    "base_10m",
    "base_1h",
    "base_10h",
    "base_100h",
    "base_960h",
  ],
)
def test_every_experiment_config_loads_and_validates(name):
  import experiment_file

  from w2v2_jax import parallel

  module = experiment_file.module(name)
  config = module.get_config()
  assert {"COMMAND:", "HARDWARE:", "EXPECTED:"} <= set(module.__doc__.split())
  loop.validate(config, parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))


@pytest.mark.parametrize("mesh_shape,pos_conv", [((2, 2, 2), "dft"), ((8, 1, 1), "dft"), ((2, 2, 2), "xla")])
@pytest.mark.slow
def test_sharded_step_equals_single_device_step(speech_like_shards, mesh_shape, pos_conv):
  """One train step on a (data, fsdp, tensor) mesh: same loss and updated parameters as on one device.

  Adam's first update is ~lr * sign(g), which turns reduction-order noise in near-zero gradients into
  full-size parameter differences; eps = 1 makes the update ~lr * g, so parameters compare gradients.
  pos_conv="xla" runs the plain kernels, as GPU/TPU compile them (XLA's grouped conv, whose doubled
  weight gradient on a tensor axis models/transformer.py works around), instead of CPU's DFT form.
  """
  import jax.numpy as jnp

  from w2v2_jax import parallel
  from w2v2_jax.models.init import init_params
  from w2v2_jax.train import step as steps

  def config(mesh):
    c = _config(speech_like_shards, 1)
    c.model.kernels = "cpu" if pos_conv == "dft" else "xla"
    c.optim.lr, c.optim.eps, c.optim.warmup_steps = 1.0, 1.0, 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c

  c, c1 = config(mesh_shape), config((1, 1, 1))
  task = tasks.make(c)
  cfg = task.model_config
  rng = np.random.default_rng(0)
  batch = {
    "audio": jnp.asarray(rng.integers(-3000, 3000, (8, 16000)), jnp.int16),
    "lengths": jnp.full((8,), 16000, jnp.int32),
  }
  key = jax.random.key(1)

  one = loop.plan_layout(c1, jax.devices()[:1])
  state = steps.init_state(init_params(cfg, jax.random.key(0)), one.tx)
  single_state, single = jax.jit(steps.make_train_step(tasks.make(c1), cfg, one.tx, c1))(
    jax.device_put(state, jax.devices()[0]), batch, key
  )

  layout = loop.plan_layout(c)
  with jax.set_mesh(layout.mesh):
    sharded_state = jax.device_put(state, layout.state_shardings)
    bsh = parallel.batch_sharding(layout.mesh)
    step = jax.jit(
      steps.make_train_step(task, cfg, layout.tx, c),
      in_shardings=(layout.state_shardings, bsh, None),
      out_shardings=(layout.state_shardings, None),
    )
    new_state, sharded = step(sharded_state, jax.device_put(batch, bsh), key)
  if mesh_shape[1] > 1:  # FSDP really split the parameters
    assert any(len({str(s.index) for s in x.addressable_shards}) > 1 for x in jax.tree.leaves(new_state.params))
  np.testing.assert_allclose(float(sharded["loss"]), float(single["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(single_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_starved_loop_logs_its_input_wait(speech_like_shards, tmp_path, monkeypatch):
  """Batches that take 1 s each to arrive: the logged input wait is most of the wall time. The same
  run writes clu's progress figures, warns once (one line) about a reference curve it is far from, and
  leaves its config as it was."""
  from w2v2_jax.data import pipeline
  from w2v2_jax.train import events, reporting

  to_global = pipeline.to_global

  def slow(*args, **kwargs):
    time.sleep(1.0)
    return to_global(*args, **kwargs)

  c = _config(speech_like_shards, 4)
  c.log_every_steps = 1
  c.reference = {"unreachable": dict(metric="train/loss", source="a test", points=((1, 100.0, 1.0), (9, 100.0, 1.0)))}
  before = c.to_json()
  logs = []
  monkeypatch.setattr(pipeline, "to_global", slow)
  workdir = str(tmp_path / "starved")
  warnings = []
  monkeypatch.setattr(reporting.logging, "warning", lambda fmt, *a: warnings.append(fmt % a))
  loop.train_and_evaluate(c, workdir, on_log=lambda step, m: logs.append((step, m)))
  assert c.to_json() == before
  warned = [w for w in warnings if w.startswith("reference:")]
  assert len(warned) == 1 and "train/loss" in warned[0], warnings
  assert "at update 1 is outside the band 99.000-101.000 of unreachable" in warned[0], warned
  assert [step for step, _ in events.read_scalars(workdir)["steps_per_sec"]] == [2, 3, 4]
  waits = [m["input_wait"] for step, m in logs if "input_wait" in m]
  assert len(waits) == 4 and all(0.0 <= w <= 1.0 for w in waits)
  # Steps that compile (the first, a new bucket length) wait less; the others mostly wait on the input.
  assert sum(w > 0.6 for w in waits) >= 2, waits


def test_the_loop_and_the_step_have_no_task_branches():
  """Pre-training and CTC differ only behind train/tasks.py's interface: neither the loop nor the step
  names a task or tests for a vocabulary."""
  import ast
  import inspect
  import re

  from w2v2_jax.train import step as steps

  for module in (loop, steps):
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):  # the code, not its docstrings (ast.unparse drops the comments)
      body = getattr(node, "body", None)
      if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        node.body = body[1:] or [ast.Pass()]
    source = ast.unparse(tree)
    found = re.findall(r"is_ctc|vocab|\"ctc\"|'ctc'|\"pretrain(?:ing)?\"|config\.task|\.get\(\"task\"", source)
    assert not found, (module.__name__, found)
