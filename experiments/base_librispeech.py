"""fairseq's wav2vec 2.0 BASE recipe on LibriSpeech 960 h (Baevski et al. 2020, Table 9).

COMMAND:  w2v2-prepare --input=/data/LibriSpeech --output=/data/ls960 --speaker_level=2 \\
              --valid_fraction=0.01 --split_by=speaker --max_seconds=35
          w2v2-train --config=experiments/base_librispeech.py --workdir=gs://BUCKET/base_ls960 \\
              --config.data.data_dir=/data/ls960
HARDWARE: fairseq: 64 V100 x 1.6 days, max_tokens 1.4M samples per GPU, 400k updates: ~1.6 h of
          audio per update. Here: 384 crops of at most 250k samples (mode crop, 6 buckets), about
          the same audio per update.
          Fit: see the README's recipe table (w2v2-aot --config=experiments/base_librispeech.py
          --topology=v5p-16 for the per-chip memory).
EXPECTED: the loss falls from ~4.6 to ~2 within the first 20k updates; prob perplexity rises
          to several hundred of 640 codewords; accuracy of ~0.6 at the end (fairseq's logs). The
          reference curves below are drawn by w2v2-plot; the trainer warns when valid accuracy
          leaves their band.
"""

from w2v2_jax.train.defaults import pretraining_config


def get_config(arg=None):
  del arg
  c = pretraining_config("base")
  c.num_train_steps = 400_000
  c.batch_size = 384  # crops of <= 250k samples: ~1.6 h per update, as fairseq
  c.data.max_sample_size = 250_000
  c.data.min_sample_size = 32_000
  c.data.normalize = False
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 32_000
  c.objective.latent_temp = (2.0, 0.5, 0.999995)
  c.model["layerdrop"] = 0.05  # encoder_layerdrop
  c.model["dtype"] = "bfloat16"
  c.mesh.fsdp = -1
  c.reference = {
    "nvidia_hourglass_base": dict(
      metric="valid/accuracy",
      source="NVIDIA DeepLearningExamples wav2vec2 README: mean of 8 seeds (std ~0.01) of their Hourglass "
      "variant of BASE on LibriSpeech 960 h; band +-0.05 for the variant's difference",
      points=tuple(
        (update, accuracy, 0.05)
        for update, accuracy in (
          (50_000, 0.491),
          (100_000, 0.537),
          (150_000, 0.564),
          (200_000, 0.580),
          (250_000, 0.599),
          (300_000, 0.610),
          (350_000, 0.619),
          (400_000, 0.629),
        )
      ),
    ),
    "fairseq_base": dict(
      metric="valid/accuracy",
      source="fairseq#2949 (a fairseq author): BASE on LibriSpeech ends near 62% accuracy",
      points=((400_000, 0.62, 0.03),),
    ),
  }
  return c
