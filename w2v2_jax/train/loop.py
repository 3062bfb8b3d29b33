"""A training run, top to bottom: config check, mesh, data, state, step, loop. The task (pre-training
or CTC fine-tuning, train/tasks.py) supplies the loss and what differs; the loop is the same.

Restarting the same command resumes from the latest complete checkpoint, with the data iterator
where it stopped, so an interrupted run ends bitwise equal to an uninterrupted one (same mesh).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from w2v2_jax import parallel, storage
from w2v2_jax.data import pipeline
from w2v2_jax.models import kernels
from w2v2_jax.models.init import init_params
from w2v2_jax.train import checkpointing, inputs, optim, reference, reporting, tasks
from w2v2_jax.train import step as steps


def model_config(config):
  """The run's model config: config.model with what the task derives (CTC: the vocabulary's size)."""
  return tasks.make(config).model_config


def validate(config, mesh, task=None) -> None:
  """Checks that fail before compiling, each naming its key."""
  task = task or tasks.make(config)
  cfg = task.model_config
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % batch_shards:
    raise ValueError(
      f"config.batch_size={config.batch_size} does not divide over the mesh's batch axes (data x fsdp = {batch_shards})"
    )
  if config.batch_size % (config.train.microbatches * batch_shards):
    raise ValueError(
      f"config.train.microbatches={config.train.microbatches}: each micro-batch of "
      f"{config.batch_size} // microbatches must divide over {batch_shards} batch shards"
    )
  bucketing = config.data.get("bucketing", "geometric")
  if bucketing not in pipeline.BUCKETINGS:
    raise ValueError(f"config.data.bucketing={bucketing!r}: use one of {pipeline.BUCKETINGS}")
  shortest = config.data.min_sample_size  # the least real audio of a row, in either mode
  if shortest < cfg.receptive_field:
    raise ValueError(
      f"config.data.min_sample_size={shortest}: the shortest utterance or crop is "
      f"shorter than the receptive field ({cfg.receptive_field} samples)"
    )
  task.validate(int(cfg.num_frames(shortest)))
  if config.data.mode not in ("crop", "pad"):
    raise ValueError(f"config.data.mode={config.data.mode!r}: use 'crop' or 'pad'")
  inputs.sources(config)  # a mixture's keys (data.sources, sampling_alpha, source_weights)
  reference.curves(config)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where everything lives: the mesh, the optimiser, and the state's shapes and shardings."""

  mesh: jax.sharding.Mesh
  tx: Any
  abstract_state: Any  # steps.TrainState of ShapeDtypeStructs
  state_shardings: Any  # steps.TrainState of NamedShardings
  param_shardings: Any
  table: str  # the printable parameter sharding table
  rules: tuple  # logical axis -> mesh axes (config.mesh.rules), for parameters and activations


def plan_layout(config, devices=None, task=None) -> Layout:
  """Mesh from config.mesh (over `devices`, default all), FSDP/tensor shardings from the rules.

  Validates the config first, and refuses large parameters left replicated under FSDP. `task`
  defaults to config.task's, built without data (CTC: config.model.vocab_size outputs).
  """
  task = task or tasks.make(config)
  cfg = task.model_config
  mesh = parallel.make_mesh({a: config.mesh[a] for a in parallel.AXES}, devices)
  validate(config, mesh, task)
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)
  tx = optim.optimizer(config.optim, config.num_train_steps)
  boxed = jax.eval_shape(lambda k: init_params(cfg, k, task.kind, boxed=True), jax.random.key(0))
  param_sh = parallel.param_shardings(boxed, mesh, rules)
  abstract_params = jax.tree.map(
    lambda x: x.value if hasattr(x, "value") else x, boxed, is_leaf=lambda x: hasattr(x, "value")
  )
  table, offenders = parallel.sharding_table(abstract_params, param_sh, mesh)
  if offenders:
    raise ValueError(f"config.mesh.rules leave large parameters replicated under FSDP: {offenders[:3]}")
  abstract_state = jax.eval_shape(lambda: steps.init_state(abstract_params_zeros(abstract_params), tx))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_sh = jax.tree.map(lambda _: replicated, abstract_state)
  state_sh = dataclasses.replace(
    state_sh, params=param_sh, opt_state=_shard_like_params(abstract_state.opt_state, param_sh, replicated)
  )
  abstract_state = jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract_state, state_sh
  )
  return Layout(mesh, tx, abstract_state, state_sh, param_sh, table, rules)


def jit_steps(config, layout: Layout, task=None):
  """w2v2-train's jitted train step (donated state) and eval step for a layout; w2v2-aot and
  w2v2-bench compile these same two."""
  task = task or tasks.make(config)
  cfg = kernels.resolved(task.model_config, parallel.mesh_platform(layout.mesh))  # the compile target's
  batch_sh = parallel.batch_sharding(layout.mesh)
  # Traced under the rules, so that the model's activation constraints bind (outside them flax makes
  # nn.with_logical_constraint a no-op): the scanned layers' carry and residuals keep the batch sharding.
  under_rules = lambda fn: parallel.with_axis_rules(fn, layout.rules)  # noqa: E731
  train_step = jax.jit(
    under_rules(steps.make_train_step(task, cfg, layout.tx, config)),
    donate_argnums=(0,),
    in_shardings=(layout.state_shardings, batch_sh, None),
    out_shardings=(layout.state_shardings, None),
  )
  eval_step = jax.jit(
    under_rules(steps.make_eval_step(task, cfg)), in_shardings=(layout.param_shardings, batch_sh, None, None)
  )
  return train_step, eval_step


class Preemption:
  """One process: SIGTERM sets a flag; the loop saves and exits at the next step boundary.

  Several processes: nothing here. JAX's preemption notifier owns SIGTERM (a handler installed here
  would replace it) and its sync point, reached by every process at the same step, stops the loop.
  """

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def train_and_evaluate(config, workdir: str, on_log=None) -> dict:
  """Runs (or resumes) the task of config.task; returns the last logged metrics, its step and params.

  `on_log(step, metrics)`, if given, is called on process 0 at every log and eval step (e.g. a
  notebook's live plot); metrics are the console's figures as floats.
  """
  storage.makedirs(workdir)
  storage.check_writable(workdir)  # a missing bucket or no access: one line now, not after compiling
  pipeline.import_tensorflow_in_background()  # tf.data is first needed at the first batch
  directory = inputs.data_dir(config)
  task = tasks.make(config, directory, workdir)
  layout = plan_layout(config, task=task)
  if jax.process_index() == 0:
    logging.info("mesh %s; parameter shardings:\n%s", dict(layout.mesh.shape), layout.table)

  batch_sharding = parallel.batch_sharding(layout.mesh)
  rows = pipeline.local_rows(batch_sharding, config.batch_size)
  train_data = inputs.open_train(config, task, directory, rows)
  valid_data = inputs.open_valid(config, task, directory, rows)
  meter = reporting.Meter(task.model_config, task.kind, config.batch_size, train_data)  # before the mesh context
  with jax.set_mesh(layout.mesh):
    mgr = checkpointing.manager(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    start, state = restore_or_init(config, task, layout, mgr, train_data)
    train_step, eval_step = jit_steps(config, layout, task)
    report = reporting.Reporter(config, task, workdir, on_log)
    experiment = json.loads(config.to_json())
    preemption = Preemption()
    key = jax.random.key(config.seed + 1, impl=config.rng_impl)
    last, stop = {}, False
    for step in range(start, config.num_train_steps):
      with meter.waiting_for_input():
        batch = pipeline.to_global(next(train_data), batch_sharding, config.batch_size)
      state, metrics = train_step(state, batch, key)
      meter.add(batch, metrics)
      done, final = step + 1, step + 1 == config.num_train_steps
      report.after_step(done)
      if done % config.log_every_steps == 0 or final:
        last = meter.summary(jax.device_get(metrics))
        refuse_a_diverged_run(config, last, done)
        stop = report.train(done, last)
      if done % config.eval_every_steps == 0 or final:
        with report.timed("eval"):
          ev = evaluate(config, task, valid_data, eval_step, state.params, batch_sharding, done, final)
        report.eval(done, ev)
        last.update({f"valid_{k}": v for k, v in ev.items()})
      # One process: our SIGTERM flag. Several: only Orbax's preemption sync point, which every
      # process reaches at the same step (a flag seen by some processes would deadlock the save).
      preempted = mgr.reached_preemption(done) or (preemption.requested and jax.process_count() == 1)
      with report.timed("checkpoint"):
        checkpointing.save(
          mgr,
          done,
          state,
          task.model_config,
          task.kind,
          experiment,
          train_data.state(),
          {"step": done, "time": time.time()},
          extras=task.checkpoint_extras(),
          force=preempted or final or stop,
        )
      if preempted:
        logging.warning("preempted: saved step %d; re-run the same command to resume", done)
        break
      if stop:
        logging.error("stopped on a collapse alarm (config.health.stop_on_collapse): saved step %d", done)
        last["stopped"] = "collapse"
        break
    mgr.wait_until_finished()
    mgr.close()
  report.close()
  for data in (train_data, *valid_data.values()):
    data.close()  # its reading threads, before the caller moves on (or exits)
  return dict(last, step=int(jax.device_get(state.step)), params=state.params)


def restore_or_init(config, task, layout: Layout, mgr, train_data) -> tuple[int, steps.TrainState]:
  """(first step, state): the latest complete checkpoint with the input where it stopped, or a fresh start."""
  restored = checkpointing.restore_run(mgr, layout.abstract_state)
  if restored is not None:
    start, state, data_state = restored
    train_data.restore(data_state)
    logging.info("resumed from step %d (data position %d)", start, train_data.position)
    return start, state
  params = task.initial_params(jax.random.key(config.seed), layout.param_shardings)
  return 0, jax.jit(lambda p: steps.init_state(p, layout.tx), out_shardings=layout.state_shardings)(params)


def refuse_a_diverged_run(config, metrics: dict, step: int) -> None:
  if int(metrics["skipped_in_a_row"]) >= config.train.max_consecutive_skips:
    raise FloatingPointError(
      f"{int(metrics['skipped_in_a_row'])} non-finite steps in a row at step {step}: lower "
      "config.optim.lr, set config.optim.clip_norm, or raise config.train.max_consecutive_skips"
    )


def evaluate(config, task, valid: dict, eval_step, params, batch_sharding, step, final=False) -> dict:
  """Mean metrics over config.eval_batches batches (<= 0: all) of each valid split in `valid`
  (inputs.open_valid; none: {}), with the task's scorer's (CTC: corpus WER and CER; beam search at the
  `final` one). A mixture's sources each add theirs as `NAME/metric`; the plain keys are the mean over
  all their batches."""
  parts = {
    name: _evaluate_split(config, task, data, eval_step, params, batch_sharding, step, final)
    for name, data in valid.items()
  }
  if set(parts) <= {""}:
    return parts[""][0] if parts else {}
  total = max(sum(n for _, n in parts.values()), 1)
  common = set.intersection(*(set(m) for m, _ in parts.values()))
  overall = {k: sum(m[k] * n for m, n in parts.values()) / total for k in sorted(common)}
  return dict(overall, **{f"{name}/{k}": v for name, (m, _) in parts.items() for k, v in m.items()})


def _evaluate_split(config, task, data, eval_step, params, batch_sharding, step, final) -> tuple[dict, int]:
  """(metrics, batches) of one valid split."""
  data.seek(0)
  scorer = task.scorer(final)
  sums, n = {}, 0
  for batch in data:
    global_batch = pipeline.to_global(batch, batch_sharding, config.batch_size)
    outputs = scorer.add(global_batch, eval_step(params, global_batch, jax.random.key(n), step))
    for k, v in jax.device_get(outputs).items():
      sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
    if n == config.eval_batches:
      break
  return dict({k: v / n for k, v in sums.items()} if n else {}, **scorer.result()), n


def abstract_params_zeros(abstract):
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)


def _shard_like_params(opt_state, param_sh, replicated):
  """Walk the optax state: any subtree shaped like the params tree takes the params' shardings."""
  params_struct = jax.tree.structure(param_sh, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))

  def visit(node):
    try:
      if jax.tree.structure(node) == params_struct:
        return param_sh
    except Exception:  # noqa: BLE001
      pass
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*[visit(c) for c in node])
    if isinstance(node, (tuple, list)):
      return type(node)(visit(c) for c in node)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    return jax.tree.map(lambda _: replicated, node)

  return visit(opt_state)
