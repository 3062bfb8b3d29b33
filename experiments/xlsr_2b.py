"""XLS-R 2B (Babu et al. 2021): 48 pre-LN layers of 1920, the LV60 recipe scaled up.

COMMAND:  w2v2-train --config=experiments/xlsr_2b.py --workdir=gs://BUCKET/xlsr2b \
              --config.data.data_dir=gs://BUCKET/xlsr
HARDWARE: a v5p-256 (128 chips) or larger: 512 crops of at most 320k samples, bf16, the 48 layers
          scanned and rematerialised; w2v2-aot gives compile time and memory per chip
          (docs/performance.md).
EXPECTED: as xlsr_300m; the LV60 optimisation settings are a starting point (the paper's XLS-R
          runs are not in our facts file), so tune lr and watch prob perplexity (docs/faq.md).
"""

from w2v2_jax.train.defaults import stable_layer_norm_recipe


def get_config(arg=None):
  del arg
  c = stable_layer_norm_recipe("xlsr_2b")
  # No published XLS-R pre-training curve is known to us: c.reference stays empty (docs/faq.md).
  return c
