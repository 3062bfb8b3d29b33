"""XLS-R 300M (Babu et al. 2021): the LARGE-LV60 architecture, pre-trained on multilingual audio.

COMMAND:  w2v2-train --config=experiments/xlsr_300m.py --workdir=gs://BUCKET/xlsr300m \
              --config.data.data_dir=/data/xlsr
HARDWARE: as large_lv60 (same shape, 317M parameters): 512 crops of at most 320k samples.
          The optimisation settings are LV60's (our facts file has no XLS-R-specific recipe);
          treat lr and updates as a starting point to tune.
EXPECTED: as large_lv60 in the first 50k updates; watch prob perplexity (docs/faq.md).
"""

from w2v2_jax.train.defaults import stable_layer_norm_recipe


def get_config(arg=None):
  del arg
  return stable_layer_norm_recipe("xlsr_300m")
