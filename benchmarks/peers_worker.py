"""One peer's wav2vec 2.0 pre-training step, run by benchmarks/bench_peers.py inside the peers' own venv.

  python peers_worker.py --framework=hf_flax|hf_torch --config=JSON --batch=B --samples=N

Standalone on purpose (imports only numpy, torch or jax/flax/optax, and transformers 4.46.3): the
peers are not dependencies of w2v2_jax. It builds the model from the Wav2Vec2Config fields given,
compiles and warms up, prints `ready {...}`, then answers every `step` line on stdin with the wall
seconds of one full train step (forward, contrastive + diversity loss, backward, AdamW update) as
`{"seconds": s}`. Masks and negatives are drawn on the host beforehand with transformers' own
helpers, as both HF pre-training examples do in their data collators; they are not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def hf_flax_step(config, audio, mask, negatives):
  """transformers' FlaxWav2Vec2ForPreTraining with the loss of HF's Flax pre-training example
  (run_wav2vec2_pretrain_flax.py): cosine logits / temperature over the positive and the gathered
  negatives, -1e9 where a negative equals the positive, cross-entropy summed over masked frames,
  plus diversity_loss_weight x (G*V - perplexity) / (G*V); optax AdamW without decay on biases
  and layer-norm scales."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from transformers import FlaxWav2Vec2ForPreTraining  # pylint: disable=import-outside-toplevel

  model = FlaxWav2Vec2ForPreTraining(config, seed=0, dtype=jnp.float32)
  num_codevectors = config.num_codevectors_per_group * config.num_codevector_groups

  def decay_mask(params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
      {p: p[-1] != "bias" and p[-2:] not in (("layer_norm", "scale"), ("final_layer_norm", "scale")) for p in flat}
    )

  tx = optax.adamw(5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, mask=decay_mask)

  def contrastive(quantized, context, negative_indices, mask_time):
    b, t, d = quantized.shape
    negs = quantized.reshape(-1, d)[negative_indices.reshape(-1)]
    negs = negs.reshape(b, t, -1, d).transpose(2, 0, 1, 3)
    targets = jnp.concatenate([quantized[None], negs], axis=0)
    logits = optax.cosine_similarity(context, targets) / config.contrastive_logits_temperature
    neg_is_pos = jnp.concatenate([jnp.zeros((1, b, t), bool), (quantized == negs).all(-1)], axis=0)
    logits = jnp.where(neg_is_pos, -1e9, logits)
    per_frame = optax.softmax_cross_entropy_with_integer_labels(logits.transpose(1, 2, 0), jnp.zeros((b, t), jnp.int32))
    return (per_frame * mask_time).sum()

  def train_step(params, opt_state, batch, rng):
    dropout_rng, gumbel_rng = jax.random.split(rng)

    def loss_fn(p):
      out = model(
        batch["input_values"],
        mask_time_indices=batch["mask_time_indices"],
        gumbel_temperature=2.0,
        params=p,
        dropout_rng=dropout_rng,
        gumbel_rng=gumbel_rng,
        train=True,
      )
      div = (num_codevectors - out.codevector_perplexity) / num_codevectors
      return (
        contrastive(
          out.projected_quantized_states, out.projected_states, batch["negatives"], batch["mask_time_indices"]
        )
        + config.diversity_loss_weight * div
      )

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  batch = {
    "input_values": jnp.asarray(audio),
    "mask_time_indices": jnp.asarray(mask),
    "negatives": jnp.asarray(negatives),
  }
  params, opt_state = model.params, tx.init(model.params)
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, batch, jax.random.PRNGKey(0)).compile()
  compile_s = time.perf_counter() - t0
  state = {"params": params, "opt": opt_state, "i": 0}

  def run():
    state["i"] += 1
    state["params"], state["opt"], loss = compiled(state["params"], state["opt"], batch, jax.random.PRNGKey(state["i"]))
    jax.block_until_ready((state["params"], loss))

  return run, {"compile_s": compile_s, "version": jax.__version__}


def hf_torch_step(config, audio, mask, negatives):
  """transformers' PyTorch Wav2Vec2ForPreTraining: its own loss (contrastive + weighted diversity),
  backward, torch.optim.AdamW; denormals flushed to zero, as XLA does."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Wav2Vec2ForPreTraining  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  # XLA:CPU flushes denormals; without this, repeated steps on one batch slowed torch 2-4x from the
  # 7th step on (5.9 s -> 11.8, 24.9, 25.3 s), not a speed a user would see on real data.
  torch.set_flush_denormal(True)
  model = Wav2Vec2ForPreTraining(config).train()
  model.set_gumbel_temperature(2.0)
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
  inputs = torch.from_numpy(audio)
  mask_t, neg_t = torch.from_numpy(mask), torch.from_numpy(negatives.astype(np.int64))

  def run():
    out = model(inputs, mask_time_indices=mask_t, sampled_negative_indices=neg_t)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return run, {"compile_s": 0.0, "version": torch.__version__, "threads": torch.get_num_threads()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--framework", choices=["hf_flax", "hf_torch"], required=True)
  parser.add_argument("--config", required=True, help="Wav2Vec2Config fields as JSON")
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--samples", type=int, required=True)
  args = parser.parse_args()

  import transformers  # pylint: disable=import-outside-toplevel
  from transformers.models.wav2vec2 import modeling_wav2vec2 as hf  # pylint: disable=import-outside-toplevel

  config = transformers.Wav2Vec2Config(**json.loads(args.config))
  rng = np.random.default_rng(0)
  audio = rng.normal(0, 0.1, (args.batch, args.samples)).astype(np.float32)
  frames = args.samples
  for k, s in zip(config.conv_kernel, config.conv_stride):
    frames = (frames - k) // s + 1
  np.random.seed(0)  # transformers' helpers draw from numpy's global generator
  mask = hf._compute_mask_indices(
    (args.batch, frames),
    config.mask_time_prob,
    config.mask_time_length,  # noqa: SLF001
    min_masks=2,
  )
  negatives = hf._sample_negative_indices((args.batch, frames), config.num_negatives, mask)  # noqa: SLF001
  build = hf_flax_step if args.framework == "hf_flax" else hf_torch_step
  step, info = build(config, audio, mask.astype(bool), negatives.astype(np.int32))
  step()  # warm-up
  info.update(transformers=transformers.__version__, masked_frames=int(mask.sum()), frames=frames)
  print("ready " + json.dumps(info), flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      break
    t = time.perf_counter()
    step()
    print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)


if __name__ == "__main__":
  main()
