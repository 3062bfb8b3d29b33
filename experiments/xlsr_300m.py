"""XLS-R 300M (Babu et al. 2021): the LARGE-LV60 architecture, pre-trained on multilingual audio.

COMMAND:  w2v2-train --config=experiments/xlsr_300m.py --workdir=gs://BUCKET/xlsr300m \
              --config.data.sources=en=gs://BUCKET/xlsr/en,fr=gs://BUCKET/xlsr/fr,sw=gs://BUCKET/xlsr/sw
          (one prepared data dir per language, each with a train and a valid split; docs/data.md)
HARDWARE: as large_lv60 (same shape, 317M parameters): 512 crops of at most 320k samples.
          The optimisation settings are LV60's (our facts file has no XLS-R-specific recipe);
          treat lr and updates as a starting point to tune.
EXPECTED: as large_lv60 in the first 50k updates; watch prob perplexity (docs/faq.md). The log's
          `mixture (alpha 0.5 on hours)` line gives each language's share of an epoch.

Languages are drawn as XLS-R draws them: p_l proportional to (h_l / H)^0.5, h_l the hours of
language l, which upsamples the low-resource ones.
"""

from w2v2_jax.train.defaults import stable_layer_norm_recipe


def get_config(arg=None):
  del arg
  c = stable_layer_norm_recipe("xlsr_300m")
  # Placeholders: replace them (or pass --config.data.sources) with your prepared data dirs.
  c.data.sources = "en=gs://BUCKET/xlsr/en,fr=gs://BUCKET/xlsr/fr,sw=gs://BUCKET/xlsr/sw"
  c.data.sampling_alpha = 0.5
  # No published XLS-R pre-training curve is known to us: c.reference stays empty (docs/faq.md).
  return c
