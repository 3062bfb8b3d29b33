"""w2v2-bench-input: input-pipeline and preparation throughput, in audio-seconds per second.

  w2v2-bench-input --what=input   [--data_dir=D|gs://... --split=train] [--batch=8 --max_sample_size=250000]
                                  [--read_concurrency=64]
  w2v2-bench-input --what=prepare [--hours=0.5]     # 16 kHz FLAC tree -> shards, audio-hours/min
  w2v2-bench-input --what=corpus  [--hours=0.5]     # eSpeak NG synthesis -> shards, audio-hours/min

Without --data_dir, `input` builds LibriSpeech-like shards (2-35 s utterances, mean ~12 s) in a
temporary folder first. The input figure counts only real (unpadded) samples delivered.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

from w2v2_jax.cli.common import write_json
from w2v2_jax.data.pipeline import BUCKETINGS

_WHAT = flags.DEFINE_enum("what", "input", ["input", "prepare", "corpus"], "Which throughput to measure.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared shards (input); default: synthetic ones.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (one process).")
_MAX = flags.DEFINE_integer("max_sample_size", 250_000, "Crop length in samples.")
_MIN = flags.DEFINE_integer("min_sample_size", 32_000, "Minimum utterance length in samples.")
_MODE = flags.DEFINE_enum("mode", "crop", ["crop", "pad"], "Bucketing mode.")
_BUCKETING = flags.DEFINE_enum("bucketing", "geometric", list(BUCKETINGS), "Bucket lengths (data.bucketing).")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "How long to time the input pipeline.")
_HOURS = flags.DEFINE_float("hours", 0.5, "Audio hours to synthesize for the synthetic data.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
_CONCURRENCY = flags.DEFINE_integer("read_concurrency", 64, "A bucket's ranged GETs in flight (data.read_concurrency).")


def librispeech_like(out_dir: str, hours: float, seed: int = 0, as_flac: bool = False) -> None:
  """Noise utterances with LibriSpeech's length spread, as shards (or as a FLAC tree)."""
  import numpy as np

  from w2v2_jax.data import records

  rng = np.random.default_rng(seed)
  total, utts = 0, []
  while total < hours * 3600 * 16000:
    n = int(np.clip(rng.gamma(4.0, 3.0), 2.0, 35.0) * 16000)
    utts.append(records.Utterance(f"u{len(utts):06d}", (rng.standard_normal(n) * 3000).astype(np.int16)))
    total += n
  if as_flac:
    import soundfile as sf

    for u in utts:
      sub = os.path.join(out_dir, u.id[:4])
      os.makedirs(sub, exist_ok=True)
      sf.write(os.path.join(sub, u.id + ".flac"), u.audio, 16000, subtype="PCM_16")
    return
  records.write_split(out_dir, "train", utts, shard_size=256)


def bench_input(data_dir: str) -> dict:
  from w2v2_jax.data.pipeline import AudioInput, InputConfig

  cfg = InputConfig(
    data_dir,
    _SPLIT.value,
    _BATCH.value,
    max_sample_size=_MAX.value,
    min_sample_size=_MIN.value,
    mode=_MODE.value,
    bucketing=_BUCKETING.value,
    read_concurrency=_CONCURRENCY.value,
  )
  it = AudioInput(cfg)
  for _ in range(3):  # warm-up: plan, readers, thread pool
    next(it)
  start, samples, padded, batches, reads = time.time(), 0, 0, 0, 0
  while time.time() - start < _SECONDS.value:
    batch = next(it)
    reads += int((batch["lengths"] > 0).sum())  # one read (a ranged GET from a bucket) per row
    samples += int(batch["lengths"].sum())
    padded += batch["audio"].size
    batches += 1
    if batches % 50 == 0:
      print(f"  {batches} batches, {samples / 16000 / (time.time() - start):,.0f} audio-s/s", flush=True)
  elapsed = time.time() - start
  it.close()
  return {
    "audio_seconds_per_second": samples / 16000 / elapsed,
    "batches_per_second": batches / elapsed,
    "requests_per_second": reads / elapsed,
    "read_concurrency": _CONCURRENCY.value,
    "padding_fraction": 1 - samples / padded,
    "batch": _BATCH.value,
    "max_sample_size": _MAX.value,
    "mode": _MODE.value,
    "bucketing": _BUCKETING.value,
    "buckets": it.batches.buckets.tolist(),
  }


def main(argv):
  del argv
  figures = {"what": _WHAT.value, "cpus": os.cpu_count()}
  with tempfile.TemporaryDirectory() as tmp:
    if _WHAT.value == "input":
      data_dir = _DATA_DIR.value
      if data_dir is None:
        data_dir = os.path.join(tmp, "shards")
        librispeech_like(data_dir, _HOURS.value)
      figures.update(bench_input(data_dir))
      print(
        f"input: {figures['audio_seconds_per_second']:,.0f} audio-s/s delivered "
        f"({figures['batches_per_second']:.1f} batches/s of {_BATCH.value}, "
        f"{figures['requests_per_second']:,.0f} reads/s, crop {_MAX.value}, "
        f"mode {_MODE.value}, padding {figures['padding_fraction']:.1%})"
      )
    elif _WHAT.value == "prepare":
      from w2v2_jax.data import sources, writer

      librispeech_like(os.path.join(tmp, "flac"), _HOURS.value, as_flac=True)
      start = time.time()
      report = writer.prepare(
        list(sources.from_directory(os.path.join(tmp, "flac"))),
        writer.PrepareConfig(out_dir=os.path.join(tmp, "out"), max_seconds=40),
      )
      hours = sum(s["hours"] for s in report["splits"].values())
      figures.update(
        hours=hours, seconds=time.time() - start, audio_hours_per_minute=hours / (time.time() - start) * 60
      )
      print(
        f"prepare: {hours:.2f} h of 16 kHz FLAC in {figures['seconds']:.1f} s = "
        f"{figures['audio_hours_per_minute']:.2f} audio-h/min"
      )
    else:
      from w2v2_jax.demo import corpus

      start = time.time()
      out = corpus.ensure_corpus(
        corpus.CorpusConfig(unlabeled_hours=_HOURS.value, labeled_minutes=0, test_minutes=0), cache_dir=tmp
      )
      with open(os.path.join(out, "report.json")) as f:
        hours = sum(s["hours"] for s in json.load(f)["splits"].values())
      figures.update(
        hours=hours, seconds=time.time() - start, audio_hours_per_minute=hours / (time.time() - start) * 60
      )
      print(
        f"corpus: {hours:.2f} h synthesized in {figures['seconds']:.1f} s = "
        f"{figures['audio_hours_per_minute']:.2f} audio-h/min"
      )
  write_json(_JSON.value, figures)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
