"""w2v2-prepare: audio files, a TSV manifest or a TFDS dataset -> TFRecord shards + report.json.

  w2v2-prepare --input=DIR|manifest.tsv|tfds:NAME[/CONFIG][:SPLIT] --output=DATA_DIR \
      [--valid_fraction=0.01 --split_by=speaker --speaker_level=2] [--min_seconds=1 --max_seconds=30]

Audio is decoded (soundfile, librosa as fallback), downmixed, resampled to 16 kHz and stored as
int16. Bad files are skipped with their reason in report.json; the run goes on. Unlabeled audio
longer than --max_seconds is split into near-equal chunks; labeled audio is kept whole (the input
pipeline random-crops it). Re-running the same command resumes: finished shards are kept.
"""
from __future__ import annotations

from absl import app, flags

from w2v2_jax.cli import one_line_errors

_INPUT = flags.DEFINE_string("input", None, "Audio directory tree, TSV manifest, or tfds:NAME[:SPLIT].")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder for shards, indexes and report.json.")
_VALID = flags.DEFINE_float("valid_fraction", 0.0, "Fraction of utterances (or speakers) for the valid split.")
_SPLIT_BY = flags.DEFINE_enum("split_by", "utterance", ["utterance", "speaker"], "Unit of the train/valid split.")
_SPEAKER_LEVEL = flags.DEFINE_integer("speaker_level", 0, "Directory input: the N-th parent folder names the "
                                      "speaker (LibriSpeech: 2); 0 = none.")
_MIN = flags.DEFINE_float("min_seconds", 1.0, "Skip audio shorter than this.")
_MAX = flags.DEFINE_float("max_seconds", 30.0, "Split unlabeled audio longer than this into chunks.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the train/valid split hash.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 256, "Input files per shard.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Decoding processes; 0 = every core.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir holding the prepared dataset.")


@one_line_errors("w2v2-prepare")
def main(argv):
  del argv
  from w2v2_jax.data import sources, writer  # pylint: disable=import-outside-toplevel
  for name, value in (("input", _INPUT.value), ("output", _OUTPUT.value)):
    if not value:
      raise ValueError(f"--{name} is required")
  if not 0 <= _VALID.value < 1:
    raise ValueError(f"--valid_fraction={_VALID.value} must be in [0, 1)")
  if not 0 < _MIN.value < _MAX.value:
    raise ValueError(f"--min_seconds={_MIN.value} and --max_seconds={_MAX.value}: need 0 < min < max")
  cfg = writer.PrepareConfig(out_dir=_OUTPUT.value, min_seconds=_MIN.value, max_seconds=_MAX.value,
                             valid_fraction=_VALID.value, split_by=_SPLIT_BY.value, seed=_SEED.value,
                             shard_size=_SHARD_SIZE.value, workers=_WORKERS.value)
  items = sources.open_source(_INPUT.value, _SPEAKER_LEVEL.value, _TFDS_DIR.value)
  if not _INPUT.value.startswith("tfds:"):
    items = list(items)
    if not items:
      raise ValueError(f"--input={_INPUT.value}: no audio files found (extensions: "
                       f"{', '.join(sources.AUDIO_EXTENSIONS)})")
  report = writer.prepare(items, cfg)
  print(writer.summary_line(report, cfg.out_dir), flush=True)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
