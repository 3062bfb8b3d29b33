"""Pre-train a tiny wav2vec 2.0 on the offline eSpeak NG corpus, on CPU, in minutes.

COMMAND:  w2v2-train --config=experiments/demo.py --workdir=/tmp/w2v2_demo   (":STEPS" sets the step count)
HARDWARE: any CPU (2 cores is enough); the corpus (~2 h of speech) is synthesized on first use and
          cached under ~/.cache/w2v2_jax.
EXPECTED: the loss sits at chance (ln 101 = 4.615) for the first 100-250 updates while the feature
          encoder learns, then leaves that plateau and ends near 3.7-3.8 (valid) at update 800, valid
          accuracy ~0.21, prob perplexity ~50-60 of 64 codewords (no collapse). The reference below
          is the measured valid accuracy of 4 seeds; w2v2-plot draws it. ~0.15 s per update on one CPU
          device.

The recipe departs from BASE where a few minutes of CPU demand it: the tiny model, feature_grad_mult
1 and no feature penalty (the CNN must learn features that are smooth in time quickly; with
fairseq's 0.1 and penalty 10 the loss stays at chance for thousands of updates here, see
docs/faq.md), a higher lr and a short warm-up.
"""

from w2v2_jax.train.defaults import pretraining_config


def get_config(arg=None):
  c = pretraining_config("tiny")
  c.num_train_steps = int(arg) if arg else 800
  c.batch_size = 8
  c.checkpoint_every_steps = 200
  c.log_every_steps = 25
  c.eval_every_steps = 200
  c.eval_batches = 4
  c.data.source = "corpus"
  c.data.train_split = "unlabeled"
  c.data.valid_split = "test"
  c.data.max_sample_size = 48_000
  c.data.min_sample_size = 16_000
  c.data.num_buckets = 3
  c.model["feature_grad_mult"] = 1.0
  c.objective.feature_penalty_weight = 0.0
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.mesh.fsdp = -1
  c.reference = {
    "demo_4_seeds": dict(
      metric="valid/accuracy",
      schedule_steps=800,  # measured with the 800-update schedule; demo.py:STEPS runs another
      source="measured: mean of seeds 0-3 of this recipe, 2-core AMD EPYC, 2026-12-07; band max(0.04, 2 std)",
      points=(
        (100, 0.053, 0.040),
        (200, 0.075, 0.074),
        (300, 0.145, 0.040),
        (400, 0.178, 0.050),
        (500, 0.194, 0.042),
        (600, 0.202, 0.040),
        (700, 0.210, 0.040),
        (800, 0.211, 0.040),
      ),
    )
  }
  return c
