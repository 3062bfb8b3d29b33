"""The train state and the jitted pre-training steps (train with accumulation and skip; eval)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from w2v2_jax.data.pipeline import waveform
from w2v2_jax.models.quantizer import gumbel_temperature
from w2v2_jax.train.optim import learning_rate
from w2v2_jax.train.pretrain import make_loss_fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  skipped_in_a_row: jax.Array   # consecutive non-finite steps
  skipped_total: jax.Array


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(zero, params, tx.init(params), zero, zero)


def make_train_step(model_cfg, obj_cfg, tx, cfg):
  """train_step(state, batch, key) -> (state, metrics). Non-finite loss/grads skip the update.

  The batch is split into cfg.train.microbatches pieces; gradients of each piece's summed loss
  are added and divided by the whole batch's masked-frame count, so accumulation is exact.
  """
  loss_fn = make_loss_fn(model_cfg, obj_cfg)
  micro = cfg.train.microbatches
  temp = cfg.objective.latent_temp
  o = cfg.optim
  schedule_lr_fn = learning_rate(o.lr, o.warmup_steps, o.total_steps, o.end_lr, o.power)

  def summed_loss(params, audio, lengths, key, temperature):
    loss, metrics = loss_fn(params, audio, lengths, key, temperature)
    return loss * metrics["num_masked"], metrics  # undo the per-piece normalisation

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

  def train_step(state: TrainState, batch, key):
    temperature = gumbel_temperature(state.step, *temp)
    audio = waveform(batch["audio"], batch["lengths"], cfg.data.normalize)
    lengths = batch["lengths"]
    key = jax.random.fold_in(key, state.step)
    if micro == 1:
      (total, metrics), grads = grad_fn(state.params, audio, lengths, key, temperature)
      count = metrics["num_masked"]
    else:
      pieces = lambda x: x.reshape((micro, x.shape[0] // micro) + x.shape[1:])  # noqa: E731
      def body(carry, xs):
        g_acc, l_acc, n_acc = carry
        a, l, i = xs
        (loss, m), g = grad_fn(state.params, a, l, jax.random.fold_in(key, i), temperature)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, n_acc + m["num_masked"]), m
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, total, count), ms = jax.lax.scan(body, (zeros, 0.0, 0.0),
                                               (pieces(audio), pieces(lengths), jnp.arange(micro)))
      metrics = jax.tree.map(lambda v: v.mean(0), ms)
      metrics["num_masked"] = count
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = total / count
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        skipped_in_a_row=jnp.where(finite, 0, state.skipped_in_a_row + 1),
        skipped_total=state.skipped_total + jnp.where(finite, 0, 1))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, temperature=temperature,
                   audio_samples=lengths.sum(),
                   lr=schedule_lr_fn(state.step), skipped_total=new_state.skipped_total,
                   skipped_in_a_row=new_state.skipped_in_a_row)
    return new_state, metrics

  return train_step


def make_eval_step(model_cfg, obj_cfg, cfg):
  """eval_step(params, batch, key, step) -> metrics: the pre-training loss without dropout."""
  loss_fn = make_loss_fn(model_cfg, obj_cfg)

  def eval_step(params, batch, key, step):
    audio = waveform(batch["audio"], batch["lengths"], cfg.data.normalize)
    temperature = gumbel_temperature(step, *cfg.objective.latent_temp)
    loss, metrics = loss_fn(params, audio, batch["lengths"], key, temperature, deterministic=True)
    return dict(metrics, loss=loss)

  return eval_step
