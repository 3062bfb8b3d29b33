"""Fine-tune the demo's pre-trained model with CTC on the offline corpus's 10 labeled minutes, on CPU.

COMMAND:  w2v2-train --config=experiments/demo_finetune.py --workdir=/tmp/w2v2_demo_ctc \
              --config.finetune.init=/tmp/w2v2_demo      # "" (the default) trains from scratch
HARDWARE: any CPU; run the demo pre-training (experiments/demo.py) first to have something to start from.
EXPECTED: measured so far only from scratch for 20 updates (2 CPU cores, 4-9 s per update while the
          4 bucket shapes compile): the CTC loss (summed per utterance, averaged over utterances)
          402 at update 10 -> 183 at update 20; valid CER 0.83, WER 2.28. WER/CER on held-out
          voices go to WORKDIR/eval_results.json. The 300-update figures are not measured yet.
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
