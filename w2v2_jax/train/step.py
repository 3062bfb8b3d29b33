"""The train state and a task's jitted steps: train (micro-batch accumulation, frozen parameters,
non-finite skip) and eval."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from w2v2_jax.models import kernels
from w2v2_jax.parallel import constrain_batch
from w2v2_jax.train.optim import schedule


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  skipped_in_a_row: jax.Array  # consecutive non-finite steps
  skipped_total: jax.Array


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(zero, params, tx.init(params), zero, zero)


def zero_frozen(task, step, tree):
  """`tree` (gradients or updates) with zeros where the task freezes the parameter at `step`."""

  def leaf(path, x):
    frozen = task.is_frozen(tuple(p.key for p in path), step)
    if frozen is False or frozen is True:  # known when tracing: no select in the program
      return jnp.zeros_like(x) if frozen else x
    return jnp.where(frozen, jnp.zeros_like(x), x)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def apply_if_finite(finite, tx, grads, state, zero_frozen, under_cond: bool):
  """(params, opt_state) after the optimizer update, or unchanged when the loss or gradients are not finite.

  `under_cond` (the cpu kernels) runs the update inside a lax.cond: with the select form, XLA:CPU (no
  multi-output fusion) recomputes the new moments inside the parameter update after writing them in
  place, so it first copies both moment trees (docs/performance.md). Elsewhere the select form avoids
  a predicate read-back that a conditional costs on GPU.
  """

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, zero_frozen(updates)), opt_state  # no decay on frozen ones

  if under_cond:
    return jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
  params, opt_state = update(None)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
  return keep(params, state.params), keep(opt_state, state.opt_state)


def make_train_step(task, model_cfg, tx, cfg):
  """train_step(state, batch, key) -> (state, metrics). Non-finite loss/grads skip the update.

  The batch is split into cfg.train.microbatches pieces; gradients of each piece's summed loss
  are added and divided by the whole batch's normaliser (masked frames, or sentences for CTC), so
  sums over frames or sentences do not depend on the split (pre-training's diversity term is taken
  per piece). One piece takes the gradient of the batch-mean loss directly.
  Parameters the task freezes at this step get neither gradient nor update.
  """
  loss_fn = task.loss_fn(model_cfg)
  micro = cfg.train.microbatches
  schedule_lr_fn = schedule(cfg.optim, cfg.num_train_steps)

  def summed_loss(params, batch, key, step):
    loss, metrics = loss_fn(params, batch, key, step)
    return loss * metrics["count"], metrics  # undo the per-piece normalisation

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
  mean_grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    if micro == 1:
      # The loss is already the batch mean, so its gradient needs no division afterwards: that would
      # be one more pass over every gradient (380 MB for BASE; docs/performance.md).
      (loss, metrics), grads = mean_grad_fn(state.params, batch, key, state.step)
    else:
      # Piece i is rows [i * b, (i + 1) * b), spread over every batch shard: the plain reshape would leave each
      # piece on a fraction of the devices, and the scan's backward reshards through replicas.
      pieces = lambda x: constrain_batch(x.reshape((micro, x.shape[0] // micro) + x.shape[1:]), 1)  # noqa: E731

      def body(carry, xs):
        g_acc, l_acc, n_acc = carry
        piece, i = xs
        (loss, m), g = grad_fn(state.params, piece, jax.random.fold_in(key, i), state.step)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, n_acc + m["count"]), m

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, total, count), ms = jax.lax.scan(
        body, (zeros, 0.0, 0.0), (jax.tree.map(pieces, batch), jnp.arange(micro))
      )
      metrics = jax.tree.map(lambda v: v.mean(0), ms)
      metrics["count"] = count
      count = jnp.maximum(count, 1.0)
      grads = jax.tree.map(lambda g: g / count, grads)
      loss = total / count

    frozen = lambda tree: zero_frozen(task, state.step, tree)  # noqa: E731
    grads = frozen(grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    under_cond = kernels.resolve(model_cfg.kernels) == "cpu"  # at trace time: the compile target's kernels
    params, opt_state = apply_if_finite(finite, tx, grads, state, frozen, under_cond)
    new_state = TrainState(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      skipped_in_a_row=jnp.where(finite, 0, state.skipped_in_a_row + 1),
      skipped_total=state.skipped_total + jnp.where(finite, 0, 1),
    )
    metrics = dict(
      metrics,
      loss=loss,
      grad_norm=grad_norm,
      audio_samples=batch["lengths"].sum(),
      lr=schedule_lr_fn(state.step),
      skipped_total=new_state.skipped_total,
      skipped_in_a_row=new_state.skipped_in_a_row,
    )
    return new_state, metrics

  return train_step


def make_eval_step(task, model_cfg):
  """eval_step(params, batch, key, step) -> metrics: the task's loss without dropout or masking."""
  loss_fn = task.loss_fn(model_cfg)

  def eval_step(params, batch, key, step):
    loss, metrics = loss_fn(params, batch, key, step, deterministic=True)
    return dict(metrics, loss=loss)

  return eval_step
