"""Every CLI on gs:// paths, against a GCS emulator on localhost; bad buckets, objects and credentials."""

import io
import json
import os
import subprocess
import sys
import time

import conftest
import gcs_emulator
import jax
import numpy as np
import pytest
import soundfile as sf

from w2v2_jax import storage
from w2v2_jax.data import records
from w2v2_jax.demo import corpus
from w2v2_jax.train import checkpointing, events

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def gcs():
  """The emulator with bucket `bkt`; this process's gcsfs and tensorstore point at it."""
  with gcs_emulator.emulator("bkt") as url:
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ.update(gcs_emulator.client_env(url))
    storage.configure_emulator()
    yield url
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _env(url, **extra):
  return {
    **os.environ,
    **gcs_emulator.client_env(url),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": TESTS,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {conftest.FAST_COMPILE}",
    **extra,
  }


def _cli(url, module, *args, cwd, timeout=600, **env):
  return subprocess.run(
    [sys.executable, "-m", f"w2v2_jax.cli.{module}", *args],
    capture_output=True,
    text=True,
    env=_env(url, **env),
    cwd=cwd,
    timeout=timeout,
  )


def _ok(result):
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result


def _wait_for(predicate, proc, what, timeout=400):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[0][-3000:]}"
    assert time.time() < deadline, f"no {what} within {timeout} s"
    time.sleep(0.02)


def _upload_corpus_as_flac(tmp_path) -> list[str]:
  """The offline corpus's labeled and test utterances as FLAC in gs://bkt/audio, with a TSV manifest
  of their gs:// paths; returns the manifest lines."""
  cfg = corpus.CorpusConfig(unlabeled_hours=0.005, labeled_minutes=2.5, test_minutes=0.5, shard_size=64)
  local = corpus.ensure_corpus(cfg, cache_dir=str(tmp_path / "cache"), workers=1, log=lambda _: None)
  lines = ["path\ttranscript\tspeaker"]
  for split in ("labeled", "test"):
    for shard in records.shard_paths(local, split):
      for blob in records._records(shard):  # pylint: disable=protected-access
        utt = records.decode(blob)
        buffer = io.BytesIO()
        sf.write(buffer, utt.audio, 16000, format="FLAC", subtype="PCM_16")
        url = f"gs://bkt/audio/{split}/{utt.id.replace('/', '_')}.flac"
        storage.write_bytes(url, buffer.getvalue())
        lines.append(f"{url}\t{utt.transcript}\t{utt.speaker}")
  storage.write_text("gs://bkt/audio/manifest.tsv", "\n".join(lines) + "\n")
  return lines[1:]


@pytest.mark.slow
def test_pretraining_in_a_bucket_resumes_and_equals_local_disk(gcs, tmp_path):
  """Prepare from a manifest of gs:// FLAC files into the bucket, pre-train there (SIGKILLed after a
  committed checkpoint and during an async save, then resumed, the compilation cache in the bucket too),
  and compare with the same run on local disk: bitwise equal."""
  lines = _upload_corpus_as_flac(tmp_path)
  assert len(lines) >= 40
  prepare = ["--input=gs://bkt/audio/manifest.tsv", "--valid_fraction=0.25", "--shard_size=8", "--workers=1"]
  _ok(_cli(gcs, "prepare", *prepare, "--output=gs://bkt/shards", cwd=tmp_path))
  (tmp_path / "shards").mkdir()
  for name in storage.listdir("gs://bkt/shards"):  # the same data on local disk
    (tmp_path / "shards" / name).write_bytes(storage.read_bytes(f"gs://bkt/shards/{name}"))
  in_bucket, on_disk = (
    records.load_split("gs://bkt/shards", "train"),
    records.load_split(str(tmp_path / "shards"), "train"),
  )
  assert len(in_bucket.files) > 1 and in_bucket.ids == on_disk.ids
  np.testing.assert_array_equal(in_bucket.audio_offsets, on_disk.audio_offsets)
  assert storage.exists("gs://bkt/shards/train.index.npz") and storage.exists("gs://bkt/shards/report.json")

  steps = 6

  def train(data_dir, workdir, *extra):
    return [
      sys.executable,
      "-m",
      "w2v2_jax.cli.train",
      f"--config={TESTS}/train_config.py:{data_dir},{steps}",
      f"--workdir={workdir}",
      "--config.checkpoint_every_steps=2",
      "--config.data.valid_split=valid",
      f"--config.eval_every_steps={steps}",
      *extra,
    ]

  bucket_run = train("gs://bkt/shards", "gs://bkt/run")
  env = _env(gcs, JAX_COMPILATION_CACHE_DIR="gs://bkt/xla-cache")  # every host of a pod would share it
  ckpt = "gs://bkt/run/checkpoints"

  first = subprocess.Popen(
    bucket_run, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  _wait_for(lambda: storage.exists(f"{ckpt}/4/commit_success.txt"), first, "committed step 4")
  first.kill()
  first.wait()

  second = subprocess.Popen(
    bucket_run, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  _wait_for(lambda: storage.exists(f"{ckpt}/6"), second, "the step-6 save")
  second.kill()  # its async save is under way: the step folder exists, its commit marker not yet
  second.wait()
  assert not storage.exists(f"{ckpt}/6/commit_success.txt")
  assert checkpointing.resolve_step_dir("gs://bkt/run") == f"{ckpt}/4"

  third = _ok(subprocess.run(bucket_run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600))
  assert "resumed from step 4" in third.stderr and f"step {steps}/{steps}" in third.stderr
  assert storage.glob("gs://bkt/xla-cache", "*"), "the compilation cache is in the bucket"

  local_run = train(tmp_path / "shards", tmp_path / "run", "--plots=false")
  _ok(subprocess.run(local_run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600))
  _, from_bucket, _, _ = checkpointing.load_params(f"{ckpt}/{steps}")
  _, from_disk, _, _ = checkpointing.load_params(str(tmp_path / "run" / "checkpoints" / str(steps)))
  for a, b in zip(jax.tree.leaves(from_bucket), jax.tree.leaves(from_disk)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  scalars = events.read_scalars("gs://bkt/run")  # the killed runs' unsent events are lost; the last run's are there
  assert [s for s, _ in scalars["train/loss"]][-2:] == [5, 6] and "valid/loss" in scalars
  for name in ("curves.png", "codebook_usage.png"):
    assert storage.read_bytes(f"gs://bkt/run/{name}").startswith(b"\x89PNG")

  assert not os.path.exists(tmp_path / "gs:"), "nothing goes to a local gs: folder"


@pytest.mark.slow
def test_fine_tuning_in_a_bucket_then_every_cli_reads_it(gcs, tmp_path):
  """A short CTC fine-tune with data and workdir in the bucket writes its events, plots, vocab.json and
  eval_results.json there; w2v2-export, -extract, -transcribe and -plot then read from the bucket."""
  cfg = corpus.CorpusConfig(unlabeled_hours=0.005, labeled_minutes=1.0, test_minutes=0.5, shard_size=64)
  local = corpus.ensure_corpus(cfg, cache_dir=str(tmp_path / "cache"), workers=1, log=lambda _: None)
  for split, name in (("labeled", "train"), ("test", "valid")):
    utts = [records.decode(b) for shard in records.shard_paths(local, split) for b in records._records(shard)]  # pylint: disable=protected-access
    records.write_split("gs://bkt/ctc_shards", name, utts, shard_size=16)
    if name == "valid":
      buffer = io.BytesIO()
      sf.write(buffer, utts[0].audio, 16000, format="FLAC", subtype="PCM_16")
      storage.write_bytes("gs://bkt/audio/one.flac", buffer.getvalue())
  tune = [
    sys.executable,
    "-m",
    "w2v2_jax.cli.train",
    f"--config={TESTS}/finetune_config.py:gs://bkt/ctc_shards,3,1",
    "--workdir=gs://bkt/ctc",
    "--config.eval_every_steps=3",
    "--config.data.max_sample_size=80000",
  ]
  _ok(subprocess.run(tune, env=_env(gcs), cwd=tmp_path, capture_output=True, text=True, timeout=600))
  assert [json.loads(line)["step"] for line in storage.read_text("gs://bkt/ctc/eval_results.json").splitlines()] == [3]
  assert "<pad>" in storage.read_json("gs://bkt/ctc/vocab.json")
  assert "train/ctc_loss" in events.read_scalars("gs://bkt/ctc")
  assert storage.read_bytes("gs://bkt/ctc/curves.png").startswith(b"\x89PNG")

  audio = "gs://bkt/audio/one.flac"
  _ok(_cli(gcs, "export", "--checkpoint=gs://bkt/ctc", "--output=gs://bkt/hf", cwd=tmp_path))
  assert {"config.json", "model.safetensors", "vocab.json"} <= set(storage.listdir("gs://bkt/hf"))
  _ok(_cli(gcs, "extract", "--checkpoint=gs://bkt/hf", f"--audio={audio}", "--output=gs://bkt/feats.npz", cwd=tmp_path))
  assert np.load(io.BytesIO(storage.read_bytes("gs://bkt/feats.npz")))["one"].ndim == 2
  text = _ok(_cli(gcs, "transcribe", "--checkpoint=gs://bkt/ctc", f"--audio={audio}", cwd=tmp_path)).stdout
  assert text.startswith(audio + "\t")
  storage.remove("gs://bkt/ctc/curves.png")
  assert "gs://bkt/ctc/curves.png" in _ok(_cli(gcs, "plot", "--workdir=gs://bkt/ctc", cwd=tmp_path)).stdout
  assert storage.exists("gs://bkt/ctc/curves.png")
  assert not os.path.exists(tmp_path / "gs:"), "nothing goes to a local gs: folder"


@pytest.mark.slow
def test_a_mixture_of_a_bucket_and_a_local_dir_reads_as_two_local_dirs(gcs, tmp_path):
  """One source in the bucket, one on local disk: the same batches as both on disk, through the same
  reader, and an iterator state of either restores in the other."""
  from w2v2_jax.data import mixture
  from w2v2_jax.data.pipeline import AudioInput, InputConfig

  rng = np.random.default_rng(0)
  utts = [
    records.Utterance(f"u{i}", rng.integers(-9000, 9000, int(rng.integers(9000, 30000))).astype(np.int16))
    for i in range(36)
  ]
  records.write_split("gs://bkt/mix/a", "train", utts[:24], shard_size=8)
  records.write_split(str(tmp_path / "a"), "train", utts[:24], shard_size=8)
  records.write_split(str(tmp_path / "b"), "train", utts[24:], shard_size=8)

  def mixed(a):
    sources = mixture.parse_sources(f"a={a},b={tmp_path / 'b'}")
    return AudioInput(
      InputConfig(
        "", "train", 8, max_sample_size=16000, min_sample_size=8000, num_buckets=2, sources=sources, sampling_alpha=0.5
      )
    )

  remote, local = mixed("gs://bkt/mix/a"), mixed(tmp_path / "a")
  assert remote.index.files[0].startswith("gs://") and not remote.index.files[-1].startswith("gs://")
  for _ in range(3):
    want, got = next(local), next(remote)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  state = remote.state()
  assert state["position"] == 3
  local.restore(state)
  remote.seek(0)
  for got, want in zip([next(local) for _ in range(5)], [next(remote) for _ in range(8)][3:]):
    np.testing.assert_array_equal(got["audio"], want["audio"])
  remote.close()
  local.close()


def _one_line(result, prog, *words):
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = [l for l in result.stderr.splitlines() if l.strip()][-1]
  assert last.startswith(f"{prog}: error:"), result.stderr[-3000:]
  for w in words:
    assert w in last, last


@pytest.mark.slow
def test_a_missing_bucket_is_one_line_before_any_work(gcs, tmp_path):
  cfg = f"--config={TESTS}/train_config.py:gs://bkt/shards,1"
  result = _cli(gcs, "train", cfg, "--workdir=gs://no-such-bucket/run", cwd=tmp_path, timeout=120)
  _one_line(result, "w2v2-train", "gs://no-such-bucket", "no such bucket")
  assert not os.path.exists(tmp_path / "gs:")


@pytest.mark.slow
def test_a_missing_object_or_data_dir_is_one_line(gcs, tmp_path):
  result = _cli(
    gcs, "export", "--checkpoint=gs://bkt/no/such/run", f"--output={tmp_path / 'out'}", cwd=tmp_path, timeout=120
  )
  _one_line(result, "w2v2-export", "gs://bkt/no/such/run", "no such checkpoint")
  cfg = f"--config={TESTS}/train_config.py:gs://bkt/empty,1"
  result = _cli(gcs, "train", cfg, f"--workdir={tmp_path / 'run'}", cwd=tmp_path, timeout=300)
  _one_line(result, "w2v2-train", "gs://bkt/empty", "no shards")
  assert not os.path.exists(tmp_path / "gs:")


def test_a_scheme_no_backend_serves_is_refused(gcs, tmp_path):
  result = _cli(gcs, "prepare", f"--input={tmp_path}", "--output=zz://bkt/shards", cwd=tmp_path, timeout=120)
  _one_line(result, "w2v2-prepare", "zz://", "no storage backend")


@pytest.mark.parametrize("status,words", [(401, ("not authenticated", "401")), (403, ("permission denied", "403"))])
@pytest.mark.slow
def test_refused_access_is_one_line_within_seconds(tmp_path, status, words, monkeypatch):
  with gcs_emulator.refusing_server(status) as url:
    for cli, args, named in (
      ("prepare", ("--input=gs://bkt/audio/manifest.tsv", "--output=gs://bkt/out"), "gs://bkt/out:"),
      ("extract", ("--checkpoint=gs://bkt/run", "--audio=gs://bkt/a.flac", "--output=x.npz"), "gs://bkt/run"),
    ):
      _one_line(_cli(url, cli, *args, cwd=tmp_path, timeout=120), f"w2v2-{cli}", named, *words)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # the time to the error, without the interpreter's start
    storage.configure_emulator()
    started = time.time()
    with pytest.raises(storage.StorageError, match=words[0]):
      storage.check_writable("gs://bkt/out")
    assert time.time() - started < 10
  assert not os.path.exists(tmp_path / "gs:")


def test_missing_credentials_are_one_line_within_seconds(gcs, tmp_path, monkeypatch):
  key = str(tmp_path / "missing-key.json")
  result = _cli(
    gcs,
    "prepare",
    "--input=gs://bkt/audio",
    "--output=gs://bkt/out",
    cwd=tmp_path,
    timeout=120,
    GOOGLE_APPLICATION_CREDENTIALS=key,
  )
  _one_line(result, "w2v2-prepare", "GOOGLE_APPLICATION_CREDENTIALS", "missing-key.json")
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", key)
  storage._filesystem.cache_clear()  # pylint: disable=protected-access
  started = time.time()
  with pytest.raises(storage.StorageError, match="no such key file"):
    storage.exists("gs://bkt/audio")
  assert time.time() - started < 10
  storage._filesystem.cache_clear()  # pylint: disable=protected-access


def test_storage_writes_whole_files_and_keeps_local_paths(gcs, tmp_path):
  """Local paths behave as os does; URLs join, list and range-read; a rewrite replaces the whole object."""
  local = tmp_path / "a" / "b.json"
  storage.write_json(str(local), {"x": 1})
  assert storage.read_json(str(local)) == {"x": 1} and os.listdir(local.parent) == ["b.json"]
  assert storage.absolute("gs://bkt/x") == "gs://bkt/x" and storage.absolute("x") == os.path.abspath("x")
  storage.write_bytes("gs://bkt/t/one.bin", bytes(range(100)))
  storage.write_bytes("gs://bkt/t/one.bin", bytes(range(50)))  # rewritten whole, never appended
  assert storage.read_bytes("gs://bkt/t/one.bin", 10, 20) == bytes(range(10, 20))
  assert storage.size("gs://bkt/t/one.bin") == 50 and storage.listdir("gs://bkt/t") == ["one.bin"]
  with storage.local_file("gs://bkt/t/two.txt") as tmp:
    with open(tmp, "w") as f:
      f.write("hello")
  assert storage.read_text("gs://bkt/t/two.txt") == "hello"
  assert storage.glob("gs://bkt/t", "*.txt") == ["gs://bkt/t/two.txt"]


def test_tensorboard_events_reach_a_bucket_in_few_uploads(gcs, monkeypatch):
  """Uploads are one object per period, however many log steps; read back in order."""
  uploads = []
  real = storage.upload
  monkeypatch.setattr(storage, "upload", lambda src, dst, **kw: (uploads.append(dst), real(src, dst, **kw)))
  writer = events.EventWriter("gs://bkt/tb/tensorboard", upload_every_s=3600)
  for step in range(1, 101):
    writer.scalar("train/loss", 1.0 / step, step)
    writer.flush()
  assert uploads == []  # no upload at every log step
  writer.close()
  assert len(uploads) == 1
  writer = events.EventWriter("gs://bkt/tb/tensorboard", upload_every_s=0)  # a resumed run: a new file
  writer.scalar("train/loss", 0.5, 100)
  writer.scalar("train/loss", 0.25, 101)
  writer.flush()
  writer.close()
  points = events.read_scalars("gs://bkt/tb")["train/loss"]
  assert len(uploads) == 2 and [s for s, _ in points] == list(range(1, 102))
  assert dict(points)[100] == 0.5  # the later file wins
