"""Fine-tune the demo's pre-trained model with CTC on the offline corpus's 10 labeled minutes, on CPU.

COMMAND:  w2v2-train --config=experiments/demo_finetune.py --workdir=/tmp/w2v2_demo_ctc \
              --config.finetune.init=/tmp/w2v2_demo      # "" (the default) trains from scratch
HARDWARE: any CPU; run the demo pre-training (experiments/demo.py) first to have something to start from.
EXPECTED: 300 updates in about 10 minutes on 2 CPU cores; the CTC loss falls from ~10+ towards ~3
          (blank-dominated output) and WER/CER on held-out voices are written to
          WORKDIR/eval_results.json. See the README's fine-tuning section for measured figures.
"""
from w2v2_jax.train.defaults import finetuning_config


def get_config(arg=None):
  c = finetuning_config("small")
  c.num_train_steps = int(arg) if arg else 300
  c.batch_size = 8
  c.checkpoint_every_steps = 100
  c.log_every_steps = 10
  c.eval_every_steps = 100
  c.eval_batches = 0
  c.data.source = "corpus"
  c.data.train_split = "labeled"
  c.data.valid_split = "test"
  c.data.min_sample_size = 16_000
  c.data.max_sample_size = 128_000
  c.data.num_buckets = 4
  c.model["layerdrop"] = 0.0
  c.finetune.freeze_steps = 50
  c.finetune.mask_channel_length = 16   # the small model has 256 channels
  c.finetune.mask_channel_prob = 0.25
  c.optim.lr = 5e-4
  c.mesh.fsdp = -1
  return c
