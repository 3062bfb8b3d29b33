"""w2v2-prepare: audio files, a TSV manifest or a TFDS dataset -> TFRecord shards + report.json.

  w2v2-prepare --input=DIR|manifest.tsv|tfds:NAME[/CONFIG][:SPLIT[+SPLIT...]] --output=DATA_DIR \
      [--valid_fraction=0.01 --split_by=speaker --speaker_level=2] [--min_seconds=1 --max_seconds=30] \
      [--split_name=train] [--num_tasks=N --task_index=I | --merge]

Every path may be a gs:// URL (input folder, manifest, the audio it lists, output).

Audio is decoded (soundfile, librosa as fallback), downmixed, resampled to 16 kHz and stored as
int16. Bad files are skipped with their reason in report.json; the run goes on. Unlabeled audio
longer than --max_seconds is split into near-equal chunks; labeled audio is kept whole (the input
pipeline random-crops it). Re-running the same command resumes: finished shards are kept. N machines
can share one input: each runs the command with --num_tasks=N --task_index=I, then one runs it with
--merge, which writes report.json and each split's consolidated index.
"""

from __future__ import annotations

from absl import app, flags

from w2v2_jax.cli.common import one_line_errors

_INPUT = flags.DEFINE_string("input", None, "Audio directory tree, TSV manifest, or tfds:NAME[:SPLIT].")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder for shards, indexes and report.json.")
_VALID = flags.DEFINE_float("valid_fraction", 0.0, "Fraction of utterances (or speakers) for the valid split.")
_SPLIT_BY = flags.DEFINE_enum("split_by", "utterance", ["utterance", "speaker"], "Unit of the train/valid split.")
_SPEAKER_LEVEL = flags.DEFINE_integer(
  "speaker_level", 0, "Directory input: the N-th parent folder names the speaker (LibriSpeech: 2); 0 = none."
)
_MIN = flags.DEFINE_float("min_seconds", 1.0, "Skip audio shorter than this.")
_MAX = flags.DEFINE_float("max_seconds", 30.0, "Split unlabeled audio longer than this into chunks.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the train/valid split hash.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 256, "Input files per shard.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Decoding processes; 0 = every core.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir holding the prepared dataset.")
_SPLIT_NAME = flags.DEFINE_string(
  "split_name",
  "train",
  "Output split of this input (e.g. valid for "
  "tfds:librispeech:dev_clean+dev_other); each input of a folder has its own.",
)
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 1, "Machines sharing this input; each writes every N-th shard.")
_TASK_INDEX = flags.DEFINE_integer("task_index", 0, "This machine's task, in [0, num_tasks).")
_MERGE = flags.DEFINE_bool(
  "merge", False, "After every task: check all shards are written, then write report.json and the split indexes."
)


@one_line_errors("w2v2-prepare")
def main(argv):
  del argv
  from w2v2_jax import storage  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data import sources, writer  # pylint: disable=import-outside-toplevel

  for name, value in (("input", _INPUT.value), ("output", _OUTPUT.value)):
    if not value:
      raise ValueError(f"--{name} is required")
  if not 0 <= _VALID.value < 1:
    raise ValueError(f"--valid_fraction={_VALID.value} must be in [0, 1)")
  if not 0 < _MIN.value < _MAX.value:
    raise ValueError(f"--min_seconds={_MIN.value} and --max_seconds={_MAX.value}: need 0 < min < max")
  if _SPLIT_NAME.value in ("", "valid" if _VALID.value > 0 else None) or "-" in _SPLIT_NAME.value:
    raise ValueError(f"--split_name={_SPLIT_NAME.value!r}: give a name without '-', other than the valid split's")
  cfg = writer.PrepareConfig(
    out_dir=_OUTPUT.value,
    min_seconds=_MIN.value,
    max_seconds=_MAX.value,
    valid_fraction=_VALID.value,
    split_by=_SPLIT_BY.value,
    seed=_SEED.value,
    shard_size=_SHARD_SIZE.value,
    workers=_WORKERS.value,
    train_name=_SPLIT_NAME.value,
    num_tasks=_NUM_TASKS.value,
    task_index=_TASK_INDEX.value,
  )
  storage.check_writable(cfg.out_dir)  # a bad scheme, bucket or access fails before any reading
  items = sources.open_source(_INPUT.value, _SPEAKER_LEVEL.value, _TFDS_DIR.value)
  if not _INPUT.value.startswith("tfds:"):
    items = list(items)
    if not items:
      raise ValueError(
        f"--input={_INPUT.value}: no audio files found (extensions: {', '.join(sources.AUDIO_EXTENSIONS)})"
      )
  if _MERGE.value:
    report = writer.merge(cfg.out_dir, items, cfg)
  else:
    report = writer.prepare(items, cfg)
  if report is None:  # one task of several
    return
  print(writer.summary_line(report, cfg.out_dir), flush=True)
  if report["total"]["seen"] and not report["total"]["written"]:
    raise ValueError(
      f"--input={_INPUT.value}: none of the {report['total']['seen']} inputs could be used "
      f"({', '.join(f'{k} {v}' for k, v in report['skip_reasons'].items())}); see "
      f"{cfg.out_dir}/report.json"
    )


def run():
  app.run(main)


if __name__ == "__main__":
  run()
