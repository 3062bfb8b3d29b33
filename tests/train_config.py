"""A tiny pre-training config for the tests: get_config("DATA_DIR,STEPS")."""

from w2v2_jax.train import defaults


def get_config(arg):
  data_dir, steps = arg.split(",")
  c = defaults.pretraining_config("tiny")
  c.num_train_steps = int(steps)
  c.batch_size = 8
  c.checkpoint_every_steps = 100
  c.log_every_steps = 1
  c.eval_every_steps = 100
  c.eval_batches = 1
  c.data.data_dir = data_dir
  c.data.max_sample_size = 16000
  c.data.min_sample_size = 16000
  c.data.num_buckets = 1
  c.objective.num_negatives = 10
  c.objective.mask_length = 4
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.optim.total_steps = 6
  c.mesh.data = 2
  c.mesh.fsdp = 4
  return c
