"""fairseq's base_100h CTC fine-tuning of a BASE model pre-trained on LibriSpeech (train_100h labels).

COMMAND:  w2v2-train --config=experiments/base_100h.py --workdir=gs://BUCKET/base_100h \
              --config.data.data_dir=SHARDS --config.init=PRETRAINED   # ours, an HF directory or a fairseq .pt
HARDWARE: 8 x A100/H100 or a v5p-16 slice (BASE fits easily; batch = 96 whole utterances).
EXPECTED: 80_000 updates; the paper's WER without a language model (test-clean/test-other) for a
          BASE pre-trained on LS-960 is the target (10 min 46.9/50.9, 1 h 24.5/29.7, 10 h 11.1/17.6,
          100 h 6.1/13.3, 960 h 3.4/8.5). Not yet run on real data by this project.
          Prepare shards with w2v2-prepare: splits train_100h (labeled) and dev_other.
"""

from w2v2_jax.train.defaults import finetuning_config


def get_config(arg=None):
  del arg
  c = finetuning_config("base", "100h")
  c.num_train_steps = 80_000
  c.finetune.freeze_steps = 0
  c.optim.lr = 3e-5
  c.finetune.mask_prob = 0.65
  c.finetune.mask_channel_prob = 0.5
  c.model["layerdrop"] = 0.1
  return c
