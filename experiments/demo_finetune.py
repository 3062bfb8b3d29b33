"""Fine-tune the demo's pre-trained model with CTC on the offline corpus's 10 labeled minutes, on CPU.

COMMAND:  w2v2-train --config=experiments/demo_finetune.py --workdir=/tmp/w2v2_demo_ctc \
              --config.init=/tmp/w2v2_demo      # "" (the default) trains from scratch
          w2v2-miniature --workdir=/tmp/w2v2_miniature   # pre-train, fine-tune, and from scratch, compared
HARDWARE: any CPU; run the demo pre-training (experiments/demo.py) first to have something to start from.
EXPECTED: see docs/finetuning.md (the miniature) (valid CER / WER on held-out voices and sentences, greedy and,
          at the end, beam search with a 4-gram LM, from WORKDIR/eval_results.json). ~0.4 s per update
          on 2 CPU cores (4 length buckets fitted to the split: ~13% padding); the beam search needs
          kenlm (CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install kenlm==0.2.0), or
          --config.decode.kenlm= --config.decode.beam=0 for greedy only.
"""

from w2v2_jax.train.defaults import finetuning_config


def get_config(arg=None):
  c = finetuning_config("tiny")
  c.num_train_steps = int(arg) if arg else 1000
  c.batch_size = 8
  c.checkpoint_every_steps = 250
  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.eval_batches = 0
  c.data.source = "corpus"
  c.data.train_split = "labeled"
  c.data.valid_split = "test"
  c.data.min_sample_size = 16_000
  c.data.max_sample_size = 128_000
  c.data.num_buckets = 4
  c.model["layerdrop"] = 0.0
  c.model["feature_grad_mult"] = 1.0  # the tiny CNN learns too (fairseq freezes BASE's); see docs/finetuning.md
  c.finetune.freeze_steps = 100
  c.finetune.mask_prob = 0.5
  c.finetune.mask_channel_length = 8  # the tiny model has 64 channels
  c.finetune.mask_channel_prob = 0.25
  c.decode.beam = 50
  c.decode.kenlm = "corpus"  # a 4-gram on the corpus's LM text (test sentences held out)
  c.optim.lr = 2e-3
  c.mesh.fsdp = -1
  return c
