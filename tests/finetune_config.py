"""A tiny CTC fine-tuning config for the tests: get_config("DATA_DIR,STEPS,FREEZE_STEPS[,INIT]")."""

from w2v2_jax.train import defaults


def get_config(arg):
  data_dir, steps, freeze, *init = arg.split(",")
  c = defaults.finetuning_config("tiny")
  c.num_train_steps = int(steps)
  c.batch_size = 8
  c.checkpoint_every_steps = 100
  c.log_every_steps = 1
  c.eval_every_steps = 1000
  c.eval_batches = 0
  c.data.data_dir = data_dir
  c.data.train_split = "train"
  c.data.valid_split = "valid"
  c.data.min_sample_size = 8_000
  c.data.max_sample_size = 32_000
  c.data.num_buckets = 1
  c.model["layerdrop"] = 0.0
  c.init = init[0] if init else ""
  c.finetune.freeze_steps = int(freeze)
  c.finetune.mask_prob = 0.1
  c.finetune.mask_length = 2
  c.finetune.mask_channel_prob = 0.0
  c.optim.lr = 3e-3
  c.mesh.data = 2
  c.mesh.fsdp = 4
  return c
