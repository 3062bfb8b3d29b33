"""The config schema every pre-training experiment shares; experiments/*.py override it."""

import dataclasses

import ml_collections

from w2v2_jax import parallel
from w2v2_jax.models import objectives
from w2v2_jax.models.config import preset
from w2v2_jax.train import health


def pretraining_config(model_preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Parameters to start from (train/initial.py): an HF directory, a fairseq .pt, or one of our workdirs / step
  # folders, local or gs://. Optimizer, step and lr schedule start fresh; "" = random initialisation.
  # Pre-training takes the encoder, quantizer and projection heads; CTC fine-tuning the encoder.
  c.init = ""
  # PRNG of the train step (dropout, masks, negatives, Gumbel noise). threefry2x32 is partitioned
  # over the mesh. "rbg" makes a one-device CPU step faster, but XLA does not partition its bit
  # generator: every device draws the whole global batch's bits (docs/performance.md).
  c.rng_impl = "threefry2x32"
  c.num_train_steps = 400_000
  c.batch_size = 64  # global utterances per step (after cropping)
  c.checkpoint_every_steps = 5_000
  c.keep_checkpoints = 3
  c.log_every_steps = 100
  c.eval_every_steps = 5_000
  c.eval_batches = 20

  c.model_preset = model_preset
  c.model = preset(model_preset).to_dict()  # every ModelConfig field, overridable
  # The pod recipes scan their layers (compile time flat in depth, docs/training.md); the tiny CPU demo
  # and the tests loop.
  c.model["scan_layers"] = model_preset != "tiny"

  obj = objectives.ObjectiveConfig()
  c.objective = ml_collections.ConfigDict({f: getattr(obj, f) for f in obj.__dataclass_fields__})
  c.objective.latent_temp = (2.0, 0.5, 0.999995)  # start, end, decay per update (fairseq)

  c.data = ml_collections.ConfigDict()
  c.data.source = "shards"  # "shards" (w2v2-prepare output) or "corpus" (offline eSpeak)
  c.data.data_dir = ""
  # A mixture of prepared data dirs (languages, corpora) instead of data_dir, which must then be "":
  # "en=gs://B/en,fr=gs://B/fr", each with train_split and valid_split (docs/data.md).
  c.data.sources = ""
  c.data.sampling_alpha = 1.0  # a source's share of an epoch ∝ (its share of the hours)^alpha; XLS-R: 0.5
  c.data.source_weights = ""  # "en=2,fr=1": shares ∝ these instead (sampling_alpha unused)
  c.data.train_split = "train"
  c.data.valid_split = "valid"
  c.data.corpus_hours = 2.0  # source=corpus: unlabeled hours to synthesize (cached)
  c.data.corpus_labeled_voices = 0  # source=corpus: voices of the labeled split (0: every train voice)
  c.data.corpus_rooms = False  # source=corpus: simulated rooms and noise on every utterance
  c.data.max_sample_size = 250_000
  c.data.min_sample_size = 32_000
  c.data.num_buckets = 6
  c.data.bucketing = "geometric"  # or "fit": the bucket lengths that cut away least of the split's audio
  c.data.mode = "crop"
  c.data.normalize = False
  c.data.read_concurrency = 64  # a gs:// data dir: ranged GETs in flight per input (docs/cloud_storage.md)

  c.optim = ml_collections.ConfigDict(
    dict(
      lr=5e-4,
      warmup_steps=32_000,
      total_steps=-1,
      end_lr=0.0,
      power=1.0,
      b1=0.9,
      b2=0.98,
      eps=1e-6,
      weight_decay=0.01,
      clip_norm=0.0,
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      microbatches=1,
      max_consecutive_skips=20,
      profile_steps=0,  # > 0: a profiler trace of this many steps into WORKDIR/profile (docs/training.md)
      profile_first_step=10,  # the first trace starts here, after compilation
      profile_every_secs=3600.0,  # and another one this often; 0: only the first
    )
  )
  # train/health.py's alarms: their thresholds (defaults in health.Thresholds; what each means and what
  # to do: docs/faq.md), and stop_on_collapse: True saves and ends the run on a collapse alarm (exit 3).
  c.health = ml_collections.ConfigDict(dict(stop_on_collapse=False, **dataclasses.asdict(health.Thresholds())))
  # Published or measured values a metric should follow: {name: dict(metric, source, points)} (train/reference.py);
  # w2v2-plot overlays them and the trainer warns once when an evaluation leaves a band.
  c.reference = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.mesh.rules = parallel.DEFAULT_RULES  # logical axis -> mesh axes, first free match wins
  return c


def stable_layer_norm_recipe(model_preset: str) -> ml_collections.ConfigDict:
  """fairseq's LARGE-LV60 (wav2vec2_large_librivox) recipe for a pre-LN, layer-norm-extractor model."""
  c = pretraining_config(model_preset)
  c.num_train_steps = 600_000  # the paper's (the YAML says 1M)
  c.batch_size = 512  # crops of <= 320k samples: ~2.7 h per update, as 128 x 1.2M samples
  c.data.max_sample_size = 320_000
  c.data.normalize = True
  c.optim.lr = 3e-4  # the paper's value (the fairseq YAML says 0.005)
  c.optim.warmup_steps = 32_000
  c.objective.latent_temp = (2.0, 0.1, 0.999995)
  c.objective.feature_penalty_weight = 0.0
  c.model["layerdrop"] = 0.0
  c.model["dtype"] = "bfloat16"
  c.model["remat_policy"] = "full"
  return c


def finetuning_config(model_preset: str, labeled: str = "10h") -> ml_collections.ConfigDict:
  """fairseq's CTC fine-tuning recipe for BASE (base_10h.yaml; other splits change a few keys)."""
  c = pretraining_config(model_preset)
  c.task = "ctc"
  c.num_train_steps = 20_000
  c.batch_size = 96  # ~8 x 3.2M samples of whole utterances per update, as fairseq
  c.checkpoint_every_steps = 1_000
  c.log_every_steps = 50
  c.eval_every_steps = 1_000
  c.eval_batches = 0  # 0: the whole validation split (WER/CER on every utterance)
  c.data.train_split = f"train_{labeled}"
  c.data.valid_split = "dev_other"
  c.data.mode = "pad"  # whole utterances: the transcript covers all of it
  c.data.bucketing = "fit"  # bucket lengths fitted to the split: least padding for num_buckets
  c.data.min_sample_size = 16_000
  c.data.max_sample_size = 560_000  # 35 s; longer utterances are left out (and counted), never cut
  c.model["feature_grad_mult"] = 0.0  # the feature encoder stays frozen
  c.model["layerdrop"] = 0.05
  c.model["activation_dropout"] = 0.1
  c.finetune = ml_collections.ConfigDict(
    dict(
      freeze_steps=10_000,  # the whole encoder is frozen (only the head learns) for these updates
      mask_prob=0.65,
      mask_length=10,
      mask_channel_prob=0.5,
      mask_channel_length=64,
    )
  )
  c.decode = ml_collections.ConfigDict(
    dict(  # the final evaluation's beam search, beside greedy decoding
      beam=0,  # beam width; 0 with no kenlm: greedy only
      kenlm="",  # a KenLM model (.arpa/.bin), or "corpus": a word n-gram estimated from
      # the offline corpus's LM text (test sentences held out) into WORKDIR/lm.arpa
      alpha=0.5,
      beta=1.0,  # LM weight and word insertion bonus (ctc.beam_search_decoder's defaults)
      lm_order=4,
      lm_lines=20_000,
    )
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      schedule="tri_stage",
      lr=5e-5,
      phase_ratio=(0.1, 0.4, 0.5),
      init_scale=0.01,
      final_scale=0.05,
      warmup_steps=0,
      total_steps=-1,
      end_lr=0.0,
      power=1.0,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      weight_decay=0.0,
      clip_norm=0.0,
    )
  )
  return c
