"""The tf.data input: batch plans (buckets, crops, coverage), exact resume, multi-process reads."""

import dataclasses
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from w2v2_jax.data import mixture, records
from w2v2_jax.data.pipeline import STRIDE, AudioInput, Batches, InputConfig, bucket_lengths, waveform, widest_bucket

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """60 utterances of 0.3-3 s noise in 3 shards; sample values encode (utterance, position)."""
  root = tmp_path_factory.mktemp("shards")
  rng = np.random.default_rng(0)
  utts = []
  for i in range(60):
    n = int(rng.integers(4800, 48000))
    audio = ((np.arange(n) % 1000) + 1000 * (i % 30)).astype(np.int16)  # recognisable samples
    utts.append(records.Utterance(f"u{i:03d}", audio))
  records.write_split(str(root), "train", utts, shard_size=20)
  return str(root), utts


@pytest.fixture(scope="module")
def two_sources(shards, tmp_path_factory):
  """The same 60 utterances as two sources: `a` holds the first 40, `b` the last 20 (record i of the
  mixture is utterance i); returns the config.data.sources spec with a at alpha 0.5."""
  _, utts = shards
  root = tmp_path_factory.mktemp("two_sources")
  records.write_split(str(root / "a"), "train", utts[:40], shard_size=20)
  records.write_split(str(root / "b"), "train", utts[40:], shard_size=20)
  return f"a={root / 'a'},b={root / 'b'}"


def _cfg(data, **kw):
  """One data dir, or a mixture (a `name=dir,...` spec) at alpha 0.5."""
  mixed = {"sources": mixture.parse_sources(data), "sampling_alpha": 0.5} if "=" in data else {}
  return InputConfig(
    "" if mixed else data,
    "train",
    **{
      "global_batch": 8,
      "max_sample_size": 24000,
      "min_sample_size": 8000,
      "num_buckets": 3,
      "seed": 5,
      **mixed,
      **kw,
    },
  )


@pytest.mark.parametrize("mixed", [False, True], ids=["one_dir", "mixture"])
def test_batches_are_bucketed_crops_of_the_planned_utterances(shards, two_sources, mixed):
  """Every row is the planned crop of its utterance; a mixture's record i is utterance i too (a's 40,
  then b's 20), read through the same reader, and its per-source shares are the plan's."""
  data_dir, utts = (two_sources, shards[1]) if mixed else shards
  for mode in ("crop", "pad"):
    it = AudioInput(_cfg(data_dir, mode=mode, num_epochs=1))
    buckets = bucket_lengths(it.cfg)
    seen = []
    for position, batch in enumerate(it):
      recs, starts, lengths, width = it.local_plan(position)
      assert batch["audio"].shape == (8, width) and width in buckets and batch["audio"].dtype == np.int16
      for row, (r, s, n) in enumerate(zip(recs, starts, lengths)):
        src = utts[r].audio
        assert src.size >= 8000 and n == batch["lengths"][row]
        np.testing.assert_array_equal(batch["audio"][row, :n], src[s : s + n])  # the planned crop
        assert not batch["audio"][row, n:].any()
        if mode == "crop":
          assert n == width and src.size >= width
        else:
          assert n == min(src.size, 24000) and n <= width
      seen.extend(recs)
    assert position + 1 == it.batches_per_epoch
    usable = sum(u.audio.size >= 8000 for u in utts)
    if mixed:  # b (20 of 60) is upsampled at alpha 0.5: every one of its utterances, some twice
      shares = it.shares(0, it.batches_per_epoch)
      assert shares == {
        "a": it.batches.mix.per_cell[0].sum() / len(seen),
        "b": it.batches.mix.per_cell[1].sum() / len(seen),
      }
      assert shares["b"] > 0.4 and len(seen) == usable // 8 * 8
      assert {r for r in seen if r >= 40} == {i for i in range(40, 60) if utts[i].audio.size >= 8000}
      continue
    assert len(seen) == len(set(seen))  # an epoch never repeats an utterance
    assert usable - len(seen) < 8 * len(buckets)  # only each bucket's remainder is left out


def _waste(lengths, buckets, mode):
  """Samples padded (pad) or cut away (crop) when each length goes to its bucket, or None if one has none."""
  b = np.asarray(sorted(buckets))
  if mode == "pad":
    k = np.searchsorted(b, lengths, side="left")
    return None if (k >= len(b)).any() else int((b[np.minimum(k, len(b) - 1)] - lengths).sum())
  k = np.searchsorted(b, lengths, side="right") - 1
  return None if (k < 0).any() else int((lengths - b[np.maximum(k, 0)]).sum())


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_fitted_buckets_waste_least_of_all_choices(mode):
  """bucketing="fit" equals an exhaustive search over every set of num_buckets lengths (multiples of
  STRIDE in range), and beats the geometric lengths on a skewed split."""
  rng = np.random.default_rng(3)
  cfg = InputConfig(
    "", "train", 8, max_sample_size=64 * STRIDE, min_sample_size=8 * STRIDE, num_buckets=3, mode=mode, bucketing="fit"
  )
  candidates = np.arange(8, 65) * STRIDE
  for trial in range(4):
    lengths = np.clip((rng.lognormal(3.2, 0.5, 40) * STRIDE).astype(np.int64), cfg.min_sample_size, cfg.max_sample_size)
    fitted = bucket_lengths(cfg, lengths)
    assert len(fitted) <= 3 and all(b % STRIDE == 0 and cfg.min_sample_size <= b <= cfg.max_sample_size for b in fitted)
    best = min(w for combo in itertools.combinations(candidates, 3) if (w := _waste(lengths, combo, mode)) is not None)
    assert _waste(lengths, fitted, mode) == best, (trial, fitted)
    geometric = bucket_lengths(dataclasses.replace(cfg, bucketing="geometric"))
    assert best < _waste(np.minimum(lengths, geometric[-1]) if mode == "crop" else lengths, geometric, mode)
  with pytest.raises(ValueError, match="bucketing"):
    bucket_lengths(dataclasses.replace(cfg, bucketing="quantile"), lengths)
  # What w2v2-aot compiles for before seeing the data: no fitted bucket is longer.
  assert widest_bucket(cfg) == cfg.max_sample_size >= max(fitted)


def test_fitted_buckets_plan_whole_utterances_and_keep_old_iterator_states_valid(shards):
  data_dir, utts = shards
  cfg = _cfg(data_dir, mode="pad", crop_long=False, max_sample_size=48000, bucketing="fit", num_epochs=1)
  it = AudioInput(cfg)
  fitted = it.batches.buckets
  sizes = np.array([u.audio.size for u in utts])
  assert fitted[-1] == -(-sizes[sizes >= 8000].max() // STRIDE) * STRIDE  # the longest, not max_sample_size
  geometric = Batches(dataclasses.replace(cfg, bucketing="geometric"), sizes)
  padded = lambda plan: (plan.width[:, None] - plan.lengths).sum() / plan.lengths.sum()  # noqa: E731
  assert padded(it.batches.epoch(0)) < padded(geometric.epoch(0))
  for batch, position in zip(it, itertools.count()):
    recs, _, lengths, width = it.local_plan(position)
    np.testing.assert_array_equal(lengths, sizes[recs])  # whole utterances, never cut
    assert batch["audio"].shape[1] == width >= lengths.max()
  # The fingerprint of a geometric plan is the one computed before `bucketing` existed.
  old_fields = (
    "split",
    "global_batch",
    "max_sample_size",
    "min_sample_size",
    "num_buckets",
    "buckets",
    "mode",
    "crop_long",
    "shuffle",
    "seed",
    "num_epochs",
    "prefetch",
    "threads",
  )
  blob = repr((tuple(getattr(geometric.cfg, f) for f in old_fields), geometric.num_samples.tobytes()))
  assert geometric.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()[:16]
  assert (
    it.batches.fingerprint()
    != Batches(dataclasses.replace(cfg, bucketing="geometric"), it.index.num_samples).fingerprint()
  )


def test_complete_evaluation_reads_every_utterance_once_and_fills_with_empty_rows(shards):
  """CTC evaluation (complete=True) scores the whole split: no bucket remainder is left out."""
  data_dir, utts = shards
  labels = (np.arange(60 * 3, dtype=np.int32).reshape(60, 3) + 10, np.full(60, 3, np.int32))
  cfg = _cfg(data_dir, mode="pad", shuffle=False, num_epochs=1, max_sample_size=48000, crop_long=False, complete=True)
  it = AudioInput(cfg, labels=labels)
  seen, empty = [], 0
  for position, batch in enumerate(it):
    recs, _, lengths, _ = it.local_plan(position)
    for row, r in enumerate(recs):
      if r < 0:
        empty += 1
        assert batch["label_lengths"][row] == 0 and not batch["labels"][row].any()
        assert not batch["audio"][row].any() and 0 < batch["lengths"][row] <= 8000
      else:
        seen.append(int(r))
        np.testing.assert_array_equal(batch["labels"][row], labels[0][r])
        np.testing.assert_array_equal(batch["audio"][row, : lengths[row]], utts[r].audio)
  usable = [i for i, u in enumerate(utts) if u.audio.size >= 8000]
  assert sorted(seen) == usable  # every usable utterance exactly once
  assert 0 < empty < 8 * len(bucket_lengths(cfg))  # only the fill of each bucket's last batch
  incomplete = AudioInput(cfg.__class__(**{**cfg.__dict__, "complete": False}), labels=labels)
  assert incomplete.batches_per_epoch < it.batches_per_epoch  # the control: remainders left out


def test_plan_is_seeded_crops_uniform_and_epochs_differ():
  lengths = np.random.default_rng(1).integers(20_000, 300_000, 5000)
  cfg = InputConfig("unused", "train", global_batch=16)
  a, b = Batches(cfg, lengths), Batches(cfg, lengths)
  e0, e1 = a.epoch(0), a.epoch(1)
  np.testing.assert_array_equal(e0.records, b.epoch(0).records)
  np.testing.assert_array_equal(e0.starts, b.epoch(0).starts)
  assert not np.array_equal(e0.records, e1.records)
  assert len(bucket_lengths(cfg)) <= 6 and a.dropped == int((lengths < 32000).sum())
  # Crop offsets are uniform over the possible positions: chi-square of their relative place.
  room = lengths[e0.records] - e0.lengths
  rel = (e0.starts[room > 1000] / room[room > 1000]).ravel()
  counts = np.histogram(rel, bins=10, range=(0, 1))[0]
  assert stats.chisquare(counts).pvalue > 1e-3
  biased = np.histogram(rel**1.2, bins=10, range=(0, 1))[0]  # a control the test must catch
  assert stats.chisquare(biased).pvalue < 1e-3
  with pytest.raises(ValueError, match="fill no global batch"):
    Batches(InputConfig("d", "train", global_batch=10_000), lengths)


def test_waveform_scales_normalises_and_zeroes_padding():
  rng = np.random.default_rng(0)
  audio = (rng.standard_normal((2, 1000)) * 3000 + 500).astype(np.int16)
  lengths = np.array([1000, 600], np.int32)
  x = np.asarray(waveform(audio, lengths, normalize=False))
  np.testing.assert_allclose(x[0], audio[0] / 32768, rtol=1e-6)
  assert not x[1, 600:].any()
  y = np.asarray(waveform(audio, lengths, normalize=True))
  seg = audio[1, :600] / 32768
  np.testing.assert_allclose(y[1, :600], (seg - seg.mean()) / np.sqrt(seg.var() + 1e-5), atol=1e-4)
  assert not y[1, 600:].any()


def _run(*args, env=None):
  path = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, **(env or {})}
  return subprocess.Popen(
    [sys.executable, os.path.join(HERE, "input_worker.py"), *map(str, args)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.slow
@pytest.mark.parametrize("mixed", [False, True], ids=["one_dir", "mixture"])
def test_restored_iterator_in_a_new_process_yields_the_same_batches(shards, two_sources, tmp_path, mixed):
  """3 batches, the state, then 4 more (across the epoch's end) in a new process equal 4 more read on."""
  data_dir = two_sources if mixed else shards[0]
  out = str(tmp_path / "r")
  for phase in ("first", "second"):
    p = _run("resume", data_dir, out, phase)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
  first, second = np.load(out + ".first.npz"), np.load(out + ".second.npz")
  assert sorted(first.files) == sorted(second.files)
  for k in first.files:
    np.testing.assert_array_equal(first[k], second[k])
  assert json.load(open(out + ".state.json"))["position"] == 3
  assert AudioInput(_cfg(data_dir)).batches_per_epoch < 7  # the 7 batches cross an epoch's end
  with pytest.raises(ValueError, match="changed since the checkpoint"):
    AudioInput(_cfg(data_dir, seed=6)).restore(json.load(open(out + ".state.json")))
  if mixed:  # other shares, or the sources as one dir, are another batch sequence
    with pytest.raises(ValueError, match="changed since the checkpoint"):
      AudioInput(_cfg(data_dir, sampling_alpha=1.0)).restore(json.load(open(out + ".state.json")))
    with pytest.raises(ValueError, match="changed since the checkpoint"):
      AudioInput(_cfg(shards[0])).restore(json.load(open(out + ".state.json")))


class _CountedInput(AudioInput):
  """Counts `load` calls (slowed, so that the reading threads are busy when the consumer stops)."""

  calls = 0

  def load(self, position):
    type(self).calls += 1
    time.sleep(0.02)
    return super().load(position)


def test_close_stops_every_reading_thread_and_next_resumes_at_the_position(shards):
  """Destroying a tf.data iterator with a `load` in flight hung CI once, at interpreter exit, so
  `close` must leave no reading thread running; reading on afterwards continues exactly."""
  data_dir, _ = shards
  plain = AudioInput(_cfg(data_dir))
  expected = [next(plain)["audio"] for _ in range(4)]
  plain.close()
  it = _CountedInput(_cfg(data_dir, prefetch=200, threads=2))  # >= 2 s to fill the buffer
  first = [next(it)["audio"] for _ in range(2)]
  time.sleep(0.2)
  before = _CountedInput.calls
  time.sleep(0.5)
  assert _CountedInput.calls > before  # the control: without close, the threads read on
  it.close()
  closed = _CountedInput.calls
  time.sleep(0.5)
  assert _CountedInput.calls == closed and it.position == 2
  for got, want in zip(first + [next(it)["audio"] for _ in range(2)], expected):
    np.testing.assert_array_equal(got, want)
  it.close()


@pytest.mark.slow
@pytest.mark.parametrize("mixed", [False, True], ids=["one_dir", "mixture"])
def test_two_processes_read_disjoint_rows_covering_the_epoch(shards, two_sources, tmp_path, mixed):
  data_dir = two_sources if mixed else shards[0]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = str(tmp_path / "d")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [_run("distributed", data_dir, out, port, pid, env=env) for pid in (0, 1)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
  r0, r1 = (json.load(open(f"{out}.{pid}.json")) for pid in (0, 1))
  assert r0["rows"] == [0, 4] and r1["rows"] == [4, 8]
  assert len(r0["ids"]) == len(r1["ids"])  # same number of batches: no host can stall the others
  plan = AudioInput(_cfg(data_dir)).batches.epoch(0)
  # each process reads its rows of every planned batch (a mixture repeats utterances across rows)
  assert r0["ids"] == plan.records[:, :4].ravel().tolist() and r1["ids"] == plan.records[:, 4:].ravel().tolist()
  if not mixed:
    assert not set(r0["ids"]) & set(r1["ids"])
  assert sorted(r0["ids"] + r1["ids"]) == sorted(plan.records.ravel().tolist())
  assert r0["sums"] == r1["sums"]  # both see the same global arrays
  assert [s[1] for s in r0["sums"]] == plan.lengths.sum(1).tolist()
