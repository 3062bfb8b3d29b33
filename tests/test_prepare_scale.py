"""w2v2-prepare across machines and inputs: N tasks + merge equal one run; several TFDS inputs in one folder."""

import json
import multiprocessing.pool
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import soundfile as sf

from w2v2_jax.data import records, sources, writer

pytestmark = pytest.mark.slow

RATE = 16000


@pytest.fixture
def threads(monkeypatch):
  """prepare's workers as threads of this process: the same tasks, without starting TensorFlow in a new
  process per run (the first run of a test keeps real processes)."""

  def use_threads():
    monkeypatch.setattr(
      writer.multiprocessing, "get_context", lambda _: types.SimpleNamespace(Pool=multiprocessing.pool.ThreadPool)
    )

  return use_threads


def _tone(seconds, freq=220.0, amp=0.3):
  t = np.arange(int(seconds * RATE)) / RATE
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _split(data_dir, split):
  """What a split holds: ids, shard names, and each utterance's shard, audio offset and length."""
  index = records.load_split(str(data_dir), split)
  return {
    "ids": list(index.ids),
    "files": [os.path.basename(f) for f in index.files],
    "file_index": index.file_index.tolist(),
    "audio_offsets": index.audio_offsets.tolist(),
    "num_samples": index.num_samples.tolist(),
  }


def _report(data_dir):
  report = json.load(open(os.path.join(data_dir, "report.json")))
  report.pop("seconds", None)
  return report


def _mtimes(data_dir):
  return {p: os.stat(os.path.join(data_dir, p)).st_mtime_ns for p in os.listdir(data_dir) if p.endswith(".tfrecord")}


def test_tasks_and_merge_equal_one_run(tmp_path, threads):
  root = tmp_path / "audio"
  for s in range(3):
    (root / f"spk{s}").mkdir(parents=True)
    for u in range(8):
      sf.write(root / f"spk{s}" / f"u{u}.wav", _tone(1.1 + 0.1 * u, 200 + 40 * s), RATE, subtype="PCM_16")
  sf.write(root / "spk0" / "silent.wav", np.zeros(RATE * 2, np.float32), RATE)
  sf.write(root / "spk1" / "short.wav", _tone(0.3), RATE)
  items = list(sources.open_source(str(root)))
  assert len(items) == 26

  def cfg(out, **kw):
    return writer.PrepareConfig(out_dir=str(out), valid_fraction=0.3, shard_size=3, workers=1, **kw)

  one = writer.prepare(items, cfg(tmp_path / "one"), log=lambda _: None)
  assert one["total"] == {"seen": 26, "written": 24, "skipped": 2, "records": 24}
  assert set(one["splits"]) == {"train", "valid"} and one["splits"]["valid"]["records"] > 0

  threads()
  shared = tmp_path / "shared"
  assert writer.prepare(items, cfg(shared, num_tasks=3, task_index=0), log=lambda _: None) is None
  # A merge before every task is done is refused, naming the task to run (the CLI: in one line).
  merge = subprocess.run(
    [
      sys.executable,
      "-m",
      "w2v2_jax.cli.prepare",
      f"--input={root}",
      f"--output={shared}",
      "--valid_fraction=0.3",
      "--shard_size=3",
      "--num_tasks=3",
      "--merge",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert merge.returncode == 1
  [line] = [l for l in merge.stderr.splitlines() if l.startswith("w2v2-prepare:")]
  assert "--task_index=1 of --num_tasks=3" in line and "shards missing" in line, merge.stderr
  assert not (shared / "report.json").exists()
  for task in (1, 2):
    assert writer.prepare(items, cfg(shared, num_tasks=3, task_index=task), log=lambda _: None) is None
  merged = writer.merge(str(shared), items, cfg(shared, num_tasks=3))

  one.pop("seconds")
  assert _report(shared) == _report(tmp_path / "one") == merged == one
  for split in ("train", "valid"):
    assert _split(shared, split) == _split(tmp_path / "one", split)
  shards = sorted(p for p in os.listdir(shared) if p.endswith(".tfrecord"))
  assert shards == sorted(p for p in os.listdir(tmp_path / "one") if p.endswith(".tfrecord"))
  for name in shards:  # byte for byte
    assert (shared / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


LIBRISPEECH_SPLITS = {
  "train_clean100": 3,
  "train_clean360": 2,
  "train_other500": 2,
  "dev_clean": 2,
  "dev_other": 2,
  "test_clean": 2,
}


@pytest.fixture(scope="module")
def tiny_librispeech(tmp_path_factory):
  """A TFDS dataset with LibriSpeech's features and split names, a few 1 s examples per split."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyLibrispeech(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "speech": tfds.features.Audio(sample_rate=RATE, dtype=np.int16),
            "text": tfds.features.Text(),
            "speaker_id": np.int64,
            "chapter_id": np.int64,
            "id": tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(k, n) for k, (split, n) in enumerate(LIBRISPEECH_SPLITS.items())}

    def _generate_examples(self, k, n):
      for i in range(n):
        speaker, chapter = 100 + k, 1000 + k
        uid = f"{speaker}-{chapter}-{i:04d}"
        yield (
          uid,
          {
            "speech": (_tone(1.0 + 0.1 * i, 150 + 30 * k) * 32767).astype(np.int16),
            "text": f"utterance {i} of split {k}",
            "speaker_id": speaker,
            "chapter_id": chapter,
            "id": uid,
          },
        )

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  TinyLibrispeech(data_dir=data_dir).download_and_prepare()
  return data_dir


def test_tfds_split_expressions_into_one_folder(tiny_librispeech, tmp_path, threads):
  out = str(tmp_path / "librispeech")

  def run(expression, split_name):
    items = sources.open_source(f"tfds:tiny_librispeech:{expression}", tfds_data_dir=tiny_librispeech)
    cfg = writer.PrepareConfig(out_dir=out, shard_size=2, workers=1, train_name=split_name)
    return writer.prepare(items, cfg, log=lambda _: None)

  inputs = {
    "train": "train_clean100+train_clean360+train_other500",
    "valid": "dev_clean+dev_other",
    "test": "test_clean",
  }
  run(inputs["train"], "train")  # worker processes, as the CLI runs it
  threads()
  for split in ("valid", "test"):
    report = run(inputs[split], split)
  assert set(report["splits"]) == set(inputs) == {p.split("-")[0] for p in os.listdir(out) if p.endswith(".tfrecord")}
  ids = {}
  for split, expression in inputs.items():
    ids[split] = set(records.load_split(out, split).ids)
    assert (
      len(ids[split]) == report["splits"][split]["records"] == sum(LIBRISPEECH_SPLITS[s] for s in expression.split("+"))
    )
    assert report["splits"][split]["labeled"] == len(ids[split])
  assert not ids["train"] & ids["valid"] and not ids["train"] & ids["test"] and not ids["valid"] & ids["test"]
  assert {i.split("-")[0] for i in ids["test"]} == {"105"}  # test_clean's speaker only

  # Re-running one input resumes: no error, no shard rewritten, the same report.
  mtimes = _mtimes(out)
  assert run(inputs["valid"], "valid")["splits"] == report["splits"]
  assert _mtimes(out) == mtimes

  # An unknown split in an expression, and a split name reused for another input, are refused in one line.
  with pytest.raises(ValueError, match="no split 'train_clean999'") as unknown:
    run("train_clean100+train_clean999", "extra")
  assert "\n" not in str(unknown.value)
  with pytest.raises(ValueError, match="valid-00000") as reused:
    run("test_clean", "valid")
  assert "\n" not in str(reused.value)
  assert _mtimes(out) == mtimes
  assert {split: set(records.load_split(out, split).ids) for split in inputs} == ids
