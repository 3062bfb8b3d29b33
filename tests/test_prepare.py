"""w2v2-prepare on every kind of bad input, splits, sources (dir, TSV, fairseq TSV, TFDS), resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from w2v2_jax.data import records, sources, writer
from w2v2_jax.data.sources import Item

RATE = 16000


def _tone(seconds, rate=RATE, channels=1, amp=0.3):
  t = np.arange(int(seconds * rate)) / rate
  x = amp * np.sin(2 * np.pi * 220 * t)[:, None] * np.linspace(1, 0.5, channels)[None]
  return x.astype(np.float32) if channels > 1 else x[:, 0].astype(np.float32)


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory):
  """One audio tree holding every bad case next to good files."""
  root = tmp_path_factory.mktemp("messy")
  spk = root / "spk1" / "ch1"
  spk.mkdir(parents=True)
  sf.write(spk / "good.wav", _tone(2.0), RATE, subtype="PCM_16")
  (spk / "good.txt").write_text("hello there\n")
  sf.write(spk / "stereo44k.wav", _tone(2.0, 44100, channels=2), 44100, subtype="PCM_16")
  sf.write(spk / "eightbit.wav", _tone(2.0, 8000), 8000, subtype="PCM_U8")
  sf.write(spk / "long.flac", _tone(70.0), RATE)  # unlabeled, > max_seconds: split in 3
  sf.write(spk / "longlabeled.flac", _tone(40.0), RATE)
  (spk / "longlabeled.txt").write_text("a long labeled file")
  sf.write(spk / "short.wav", _tone(0.5), RATE)
  sf.write(spk / "silence.wav", np.zeros(RATE * 2, np.float32), RATE)
  nan = _tone(2.0)
  nan[100] = np.nan
  sf.write(spk / "nan.wav", nan, RATE, subtype="FLOAT")
  inf = _tone(2.0)
  inf[5] = np.inf
  sf.write(spk / "inf.wav", inf, RATE, subtype="FLOAT")
  sf.write(spk / "zero_samples.wav", np.zeros(0, np.float32), RATE)
  (spk / "zero_bytes.wav").write_bytes(b"")
  (spk / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(200))
  (spk / "notaudio.mp3").write_text("this is a text file with an audio extension\n" * 20)
  full = (spk / "long.flac").read_bytes()
  (spk / "truncated.flac").write_bytes(full[: len(full) // 3])
  os.symlink(root / "nowhere.wav", spk / "dangling.wav")  # an unreadable file
  return root


EXPECTED_SKIPS = {
  "short.wav": "too short",
  "silence.wav": "silent",
  "nan.wav": "non-finite",
  "inf.wav": "non-finite",
  "zero_samples.wav": "empty",
  "zero_bytes.wav": "undecodable",
  "corrupt.wav": "undecodable",
  "notaudio.mp3": "undecodable",
  "dangling.wav": "missing",
}


def _prepare_cli(*args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "w2v2_jax.cli.prepare", *args], capture_output=True, text=True, env=env, timeout=600
  )


@pytest.mark.slow
def test_bad_inputs_are_converted_or_skipped_with_reasons_and_resume(messy_dir, tmp_path):
  out = tmp_path / "shards"
  args = [f"--input={messy_dir}", f"--output={out}", "--workers=2", "--shard_size=5", "--speaker_level=2"]
  result = _prepare_cli(*args)
  assert result.returncode == 0, result.stderr
  report = json.load(open(out / "report.json"))
  total = report["total"]
  seen = len([p for p in messy_dir.rglob("*") if p.suffix in (".wav", ".flac", ".mp3")])
  assert total["seen"] == seen == total["written"] + total["skipped"]
  skipped = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
  truncated = skipped.pop("truncated.flac", None)  # either skipped, or decoded up to the cut
  for name, kind in EXPECTED_SKIPS.items():
    assert name in skipped, (name, skipped)
    assert writer.reason_kind(skipped[name]) == kind, (name, skipped[name])
    assert name in skipped[name]  # every reason names its file
  assert set(skipped) == set(EXPECTED_SKIPS)
  summary = result.stdout.strip().splitlines()[-1]
  assert f"skipped {total['skipped']}" in summary and f"seen {seen}" in summary, summary

  index = records.load_split(str(out), "train")
  by_id = dict(zip(index.ids, index.num_samples))
  assert by_id["spk1/ch1/good"] == 2 * RATE
  assert abs(by_id["spk1/ch1/stereo44k"] - 2 * RATE) <= 2  # downmixed, resampled
  assert abs(by_id["spk1/ch1/eightbit"] - 2 * RATE) <= 2
  assert [by_id[f"spk1/ch1/long#{k:03d}"] for k in range(3)] == [70 * RATE // 3 + 1, 70 * RATE // 3, 70 * RATE // 3]
  assert by_id["spk1/ch1/longlabeled"] == 40 * RATE  # labeled audio is kept whole
  if truncated is None:
    assert 0 < by_id["spk1/ch1/truncated"] < 70 * RATE

  # The stored samples are the decoded audio; the stereo file was averaged over channels.
  import tensorflow as tf

  utts = {u.id: u for u in (records.decode(b) for b in tf.data.TFRecordDataset(list(index.files)).as_numpy_iterator())}
  np.testing.assert_allclose(utts["spk1/ch1/good"].audio / 32767, _tone(2.0), atol=1e-4)
  assert utts["spk1/ch1/good"].transcript == "hello there" and utts["spk1/ch1/good"].speaker == "spk1"
  assert 0.15 < np.abs(utts["spk1/ch1/stereo44k"].audio / 32767).max() < 0.25  # mean of 0.3 and 0.15

  # Re-running resumes: nothing is rewritten; new flags are refused with a one-line error.
  mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")}
  again = _prepare_cli(*args)
  assert again.returncode == 0, again.stderr
  assert {p: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")} == mtimes
  assert json.load(open(out / "report.json"))["total"] == total
  changed = _prepare_cli(*args, "--min_seconds=3")
  assert (
    changed.returncode == 1
    and changed.stderr.strip().splitlines()[-1].startswith("w2v2-prepare: error:")
    and "--min_seconds=3.0" in changed.stderr
  )


@pytest.mark.slow
def test_unfinished_shard_is_redone(tmp_path):
  items = [Item(id=f"u{i}", audio=_tone(1.5), rate=RATE) for i in range(6)]
  cfg = writer.PrepareConfig(out_dir=str(tmp_path), shard_size=4, workers=1)
  writer.prepare(items, cfg, log=lambda _: None)
  os.remove(tmp_path / "train-00001.json")  # as if killed while writing shard 1
  first = (tmp_path / "train-00000.tfrecord").stat().st_mtime_ns
  lines = []
  report = writer.prepare(items, cfg, log=lines.append)
  assert report["total"] == {"seen": 6, "written": 6, "skipped": 0, "records": 6}
  assert (tmp_path / "train-00000.tfrecord").stat().st_mtime_ns == first
  assert "1 shards written (1 already done)" in lines[-1]
  with pytest.raises(ValueError, match="input changed"):
    writer.prepare(items[:5] + [Item(id="other", audio=_tone(1.5), rate=RATE)], cfg)


def test_split_by_speaker_is_seeded_disjoint_and_stable():
  cfg = writer.PrepareConfig(out_dir="", valid_fraction=0.2, split_by="speaker", seed=3)
  items = [Item(id=f"s{s}/u{u}", speaker=f"s{s}") for s in range(200) for u in range(5)]
  splits = [writer.assign_split(i, cfg) for i in items]
  by_speaker = {}
  for item, split in zip(items, splits):
    by_speaker.setdefault(item.speaker, set()).add(split)
  assert all(len(s) == 1 for s in by_speaker.values())  # a speaker is never in both
  n_valid = sum("valid" in s for s in by_speaker.values())
  assert 20 <= n_valid <= 60  # binomial(200, 0.2): mean 40, sd 5.7
  assert splits == [writer.assign_split(i, cfg) for i in reversed(items)][::-1]
  other = writer.PrepareConfig(out_dir="", valid_fraction=0.2, split_by="speaker", seed=4)
  assert splits != [writer.assign_split(i, other) for i in items]
  with pytest.raises(ValueError, match="has no speaker"):
    writer.assign_split(Item(id="x", path="x.wav"), cfg)


def test_tsv_manifests(tmp_path):
  (tmp_path / "a").mkdir()
  sf.write(tmp_path / "a" / "one.wav", _tone(1.5), RATE)
  (tmp_path / "m.tsv").write_text("path\ttranscript\tspeaker\na/one.wav\thi  there\tbob\n")
  [item] = list(sources.open_source(str(tmp_path / "m.tsv")))
  assert item == Item(id="a/one", path=str(tmp_path / "a" / "one.wav"), transcript="hi there", speaker="bob")
  (tmp_path / "fairseq.tsv").write_text(f"{tmp_path}\na/one.wav\t24000\n")
  [item] = list(sources.open_source(str(tmp_path / "fairseq.tsv")))
  assert item.path == str(tmp_path / "a" / "one.wav") and item.transcript == ""


def test_tfds_dataset_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinySpeech(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "speech": tfds.features.Audio(sample_rate=8000, dtype=np.int16),
            "text": tfds.features.Text(),
            "speaker_id": np.int64,
            "id": tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        audio = (_tone(1.0 + i, 8000) * 32767).astype(np.int16)
        yield i, {"speech": audio, "text": f"utterance {i}", "speaker_id": 7, "id": f"tiny-{i}"}

  TinySpeech(data_dir=str(tmp_path)).download_and_prepare()
  items = list(sources.open_source("tfds:tiny_speech:train", tfds_data_dir=str(tmp_path)))
  assert sorted(i.id for i in items) == ["tiny-0", "tiny-1", "tiny-2"]
  item = next(i for i in items if i.id == "tiny-1")
  assert item.rate == 8000 and item.speaker == "7" and item.transcript == "utterance 1"
  [utt] = writer.to_utterances(item, writer.PrepareConfig(out_dir=""))
  assert utt.audio.dtype == np.int16 and abs(utt.audio.size - 2 * RATE) <= 2
  with pytest.raises(ValueError, match="no split 'test'"):
    list(sources.open_source("tfds:tiny_speech:test", tfds_data_dir=str(tmp_path)))


@pytest.mark.slow
def test_espeak_corpus_splits_voices_and_cache(tmp_path):
  from w2v2_jax.demo import corpus, espeak

  def say(synth):  # eSpeak's output depends on what it said before: same history, same bytes
    return [synth.synth(t, v) for t, v in (("something else first", "en+f3"), ("hello world", "en-us+m1"))]

  with espeak.Synthesizer() as a, espeak.Synthesizer() as b:
    first = say(a)
    b.synth("a different history", "en+klatt")
    with espeak.Synthesizer() as c:  # instances are independent of each other
      np.testing.assert_array_equal(np.concatenate(first), np.concatenate(say(c)))
  synth = espeak.Synthesizer()
  for voice in [f"{a}+m1" for a in espeak.ACCENTS] + [f"en-us+{v}" for v in espeak.VARIANTS]:
    pcm = synth.synth("one two three", voice, rate=170, pitch=50)
    assert pcm.dtype == np.int16 and 0.4 * synth.sample_rate < pcm.size < 3 * synth.sample_rate, voice
  assert not np.array_equal(synth.synth("hello", "en-us+m1", pitch=20), synth.synth("hello", "en-us+m1", pitch=80))

  cfg = corpus.CorpusConfig(unlabeled_hours=0.02, labeled_minutes=0.5, test_minutes=0.5, shard_size=40)
  plan = corpus.plan(cfg)
  assert plan == corpus.plan(cfg) and plan != corpus.plan(corpus.CorpusConfig(seed=1, unlabeled_hours=0.02))
  test_voices = {s.voice for s in plan["test"]}
  train_specs = plan["unlabeled"] + plan["labeled"]
  assert not test_voices & {s.voice for s in train_specs}
  assert not {s.text for s in plan["test"]} & {s.text for s in train_specs}
  full = corpus.plan(corpus.CorpusConfig())["unlabeled"]  # the default 2 h: plenty of variety
  assert len({s.voice for s in full}) > 150 and len({s.rate for s in full}) > 80
  assert len({s.pitch for s in full}) > 50 and len({s.text for s in full}) > 0.95 * len(full)
  # Options added later keep the default corpus's hash, so caches stay valid; a room changes it.
  assert corpus.CorpusConfig().fingerprint() == "f1aa05ec8afd" != corpus.CorpusConfig(rooms=True).fingerprint()
  few = corpus.plan(corpus.CorpusConfig(labeled_voices=8))  # a small labeled set from few speakers
  few_voices = {s.voice for s in few["labeled"]}
  assert len(few_voices) == 8 and few_voices <= {s.voice for s in full}
  assert sum(v.split("+")[1] in espeak.FEMALE_VARIANTS for v in few_voices) == 4
  assert few["unlabeled"] == full and few["test"] == corpus.plan(corpus.CorpusConfig())["test"]

  lines = []
  out = corpus.ensure_corpus(cfg, cache_dir=str(tmp_path), workers=2, log=lines.append)
  report = json.load(open(os.path.join(out, "report.json")))
  assert set(report["splits"]) == {"unlabeled", "labeled", "test"}
  assert 0.5 * 0.02 < report["splits"]["unlabeled"]["hours"] < 2 * 0.02
  assert report["splits"]["test"]["labeled"] == report["splits"]["test"]["records"] > 0
  assert any("ETA" in l for l in lines)
  index = records.load_split(out, "test")
  assert list(index.ids) == [s.id for s in plan["test"]]
  assert corpus.ensure_corpus(cfg, cache_dir=str(tmp_path), log=lines.append) == out  # cached
  again = corpus.ensure_corpus(cfg, cache_dir=str(tmp_path / "again"), workers=1, log=lambda _: None)
  a, b = records.load_split(out, "labeled"), records.load_split(again, "labeled")
  assert [open(f, "rb").read() for f in a.files] == [open(f, "rb").read() for f in b.files]  # deterministic


def test_rooms_add_noise_at_the_drawn_snr_and_reverb():
  """Tone bursts with long silent gaps: the gaps hold only noise (the reverb tail has died), so the
  SNR can be read back; over 40 rooms it stays in rooms.SNR_DB and spreads over it."""
  from w2v2_jax.demo import rooms

  t = np.arange(16000) / 16000
  burst = np.sin(2 * np.pi * 440 * t[:8000]) * np.hanning(8000)
  clean = np.concatenate([np.concatenate([burst, np.zeros(16000)]) for _ in range(3)]).astype(np.float32)
  gaps = np.zeros(clean.size, bool)
  for k in range(3):
    gaps[k * 24000 + 8000 + 14000 : (k + 1) * 24000] = True  # 0.875 s after each burst: past RT60
  snrs, tails = [], []
  for seed in range(40):
    out = rooms.in_a_room(clean, np.random.default_rng(seed))
    assert out.shape == clean.shape and out.dtype == np.float32 and np.abs(out).max() <= 0.9 + 1e-6
    noise = np.mean(out[gaps] ** 2)
    snrs.append(10 * np.log10((np.mean(out**2) - noise) / noise))
    just_after = slice(8000 + 400, 8000 + 1600)  # 25-100 ms after the first burst: reverb over noise
    tails.append(np.mean(out[just_after] ** 2) / noise)
  np.testing.assert_array_equal(
    rooms.in_a_room(clean, np.random.default_rng(3)), rooms.in_a_room(clean, np.random.default_rng(3))
  )
  lo, hi = rooms.SNR_DB
  assert lo - 1.5 < min(snrs) and max(snrs) < hi + 1.5, (min(snrs), max(snrs))
  assert min(snrs) < lo + 5 and max(snrs) > hi - 5  # the whole range is drawn
  assert np.mean(np.array(tails) > 2.5) > 0.2, np.round(sorted(tails), 1)  # the room rings after a burst
