"""wav2vec 2.0 LARGE-LV60 (pre-LN, layer-norm extractor) on Libri-Light 60k h (fairseq vox recipe).

COMMAND:  w2v2-train --config=experiments/large_lv60.py --workdir=gs://BUCKET/lv60 \
              --config.data.data_dir=/data/librilight
HARDWARE: fairseq: 128 V100 x 5.2 days, 1.2M samples per GPU (~2.7 h per update), 1M updates in
          the YAML (paper 600k). Here: 512 crops of at most 320k samples; per-chip memory from
          w2v2-aot (README recipe table).
EXPECTED: loss falls below 2.5 in the first 50k updates; waveform normalisation on, no feature
          penalty, latent_temp (2, 0.1, 0.999995); valid accuracy near 0.70 at the end (the reference
          below, drawn by w2v2-plot).
"""

from w2v2_jax.train.defaults import stable_layer_norm_recipe


def get_config(arg=None):
  del arg
  c = stable_layer_norm_recipe("large_lv60")
  c.reference = {
    "fairseq_large_lv": dict(
      metric="valid/accuracy",
      source="fairseq#2949 (a fairseq author): LARGE on LibriVox ends near 70% accuracy; "
      "placed at this recipe's last update",
      points=((c.num_train_steps, 0.70, 0.04),),
    )
  }
  return c
