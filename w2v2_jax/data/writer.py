"""Decode, validate, split and write audio into shards, resumably, on every core.

Splitting is by a seeded hash of the utterance id or the speaker, so adding files never moves an
existing utterance to another split. Each shard is one task: a worker decodes its files and writes
the shard and its index; a re-run skips shards whose index exists. Every input item ends up either
written or skipped with a reason, and report.json adds it all up. The output may be a local folder
or a bucket (gs://): each file is written whole, once.

Several machines can share the work: task i of N (`num_tasks`, `task_index`) writes every N-th shard
of the same enumeration, and a final merge writes the report and each split's consolidated index.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import multiprocessing
import os
import time

import numpy as np

from w2v2_jax import storage
from w2v2_jax.data import records
from w2v2_jax.data.audio import SAMPLE_RATE, AudioError, load_audio, resample
from w2v2_jax.data.sources import Item

HIST_EDGES_S = (0, 1, 2, 4, 8, 16, 32, 64, float("inf"))
SILENCE_PEAK = 1e-4  # below this peak (-80 dBFS) a file is digital silence


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  out_dir: str
  min_seconds: float = 1.0
  max_seconds: float = 30.0  # longer unlabeled audio is split into near-equal chunks
  valid_fraction: float = 0.0
  split_by: str = "utterance"  # or "speaker"
  seed: int = 0
  shard_size: int = 256  # items per shard
  workers: int = 0  # 0 = every core
  train_name: str = "train"
  valid_name: str = "valid"
  num_tasks: int = 1  # machines sharing the work; this one writes shards k with k % num_tasks
  task_index: int = 0  # == task_index (the report and the split indexes come from merge())


def assign_split(item: Item, cfg: PrepareConfig) -> str:
  """Seeded hash of the id (or speaker) -> train/valid, stable as the input grows."""
  if cfg.valid_fraction <= 0:
    return cfg.train_name
  if cfg.split_by == "speaker" and not item.speaker:
    raise ValueError(
      f"--split_by=speaker but {item.path or item.id} has no speaker; set "
      "--speaker_level (directory input) or a speaker column (TSV)"
    )
  key = item.speaker if cfg.split_by == "speaker" else item.id
  h = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{key}".encode()).digest()[:8], "little")
  return cfg.valid_name if h / 2**64 < cfg.valid_fraction else cfg.train_name


def to_utterances(item: Item, cfg: PrepareConfig) -> list[records.Utterance]:
  """Decodes and validates one item; raises AudioError with the reason to skip it."""
  name = item.path or item.id
  if item.audio is None:
    audio = load_audio(item.path)
  else:
    audio = np.asarray(item.audio, np.float32)
    if audio.size == 0:
      raise AudioError(f"{name}: the file holds no samples")
    if not np.all(np.isfinite(audio)):
      raise AudioError(f"{name}: the audio contains NaN or Inf samples")
    audio = resample(audio, item.rate)
  peak = float(np.abs(audio).max()) if audio.size else 0.0
  if peak < SILENCE_PEAK:
    raise AudioError(f"{name}: silent (peak {peak:.1e} < {SILENCE_PEAK:.0e})")
  seconds = audio.size / SAMPLE_RATE
  if seconds < cfg.min_seconds:
    raise AudioError(f"{name}: {seconds:.2f} s is shorter than --min_seconds={cfg.min_seconds}")
  pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
  max_len = int(cfg.max_seconds * SAMPLE_RATE)
  if item.transcript or pcm.size <= max_len:  # a transcript cannot be split: keep, crop later
    return [records.Utterance(item.id, pcm, item.transcript, item.speaker)]
  pieces = -(-pcm.size // max_len)
  return [
    records.Utterance(f"{item.id}#{k:03d}", chunk, "", item.speaker)
    for k, chunk in enumerate(np.array_split(pcm, pieces))
  ]


def reason_kind(message: str) -> str:
  """A short category for the summary line, from a skip reason."""
  m = message.lower()
  for key, kind in (
    ("no samples", "empty"),
    ("nan or inf", "non-finite"),
    ("silent", "silent"),
    ("shorter than", "too short"),
    ("no such file", "missing"),
    ("permission", "unreadable"),
    ("unreadable", "undecodable"),
  ):
    if key in m:
      return kind
  return "other"


def write_one_shard(task) -> dict:
  """Worker: (path, split, items, cfg) -> the shard's index, skipped items included."""
  path, split, items, cfg = task
  skipped, chunks = [], []

  def utterances():
    for item in items:
      try:
        utts = to_utterances(item, cfg)
      except storage.StorageError:
        raise  # the bucket itself (missing, no access, no credentials): every file would fail alike
      except Exception as e:  # noqa: BLE001 - one bad file must never end a long run
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, (AudioError, OSError)):
          reason = f"{item.path or item.id}: {type(e).__name__}: {reason}"
        skipped.append({"id": item.id, "path": item.path, "reason": reason})
        continue
      chunks.append(len(utts))
      yield from utts

  return records.write_shard(
    path,
    utterances(),
    lambda: {
      "split": split,
      "seen": len(items),
      "written": len(chunks),
      "skipped": skipped,
      "items_sha": items_fingerprint(items),
    },
  )


def items_fingerprint(items) -> str:
  return hashlib.sha256("\n".join(f"{i.id}\t{i.path}" for i in items).encode()).hexdigest()[:16]


def _tasks(items, cfg: PrepareConfig):
  """Groups items per split into shard tasks, lazily (TFDS items carry audio)."""
  buffers = collections.defaultdict(list)
  counts = collections.Counter()
  for item in items:
    split = assign_split(item, cfg)
    buffers[split].append(item)
    if len(buffers[split]) == cfg.shard_size:
      yield _task(split, counts, buffers.pop(split), cfg)
  for split in sorted(buffers):
    yield _task(split, counts, buffers[split], cfg)


def _task(split, counts, items, cfg):
  path = storage.join(cfg.out_dir, records.shard_name(split, counts[split]))
  counts[split] += 1
  return path, split, items, cfg


def _is_done(task) -> bool:
  path, _, items, _ = task
  index_file = records.index_path(path)
  if not storage.exists(index_file):
    return False
  done = storage.read_json(index_file)
  if done.get("items_sha") != items_fingerprint(items):
    raise ValueError(
      f"{index_file}: this shard was written from other input files; the input "
      "changed since the last run. Use a new --output directory"
    )
  return True


_RUN_SPECIFIC = ("out_dir", "workers", "num_tasks", "task_index")


def _check_settings(cfg: PrepareConfig) -> None:
  """A re-run must use the settings of the run it resumes; else the shards would mix them. Runs that
  write other splits into the same folder (e.g. --split_name=valid) keep settings of their own."""
  path = storage.join(cfg.out_dir, "prepare_config.json")
  mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUN_SPECIFIC}
  saved = storage.read_json(path) if storage.exists(path) else {}
  if saved and "runs" not in saved:  # one run's settings, as older versions wrote them
    saved = {"runs": {saved.get("train_name", "train"): saved}}
  runs = saved.get("runs", {})
  theirs = runs.get(cfg.train_name)
  if theirs is not None:
    diff = sorted(k for k in mine if theirs.get(k) != mine[k])
    if diff:
      raise ValueError(
        f"{path}: --{diff[0]}={mine[diff[0]]} differs from the earlier run's "
        f"{theirs.get(diff[0])}; resume with the same flags or use a new --output"
      )
    return
  clash = {cfg.train_name, cfg.valid_name if cfg.valid_fraction > 0 else None} & {
    s for r in runs.values() for s in (r["train_name"], r["valid_name"] if r["valid_fraction"] > 0 else None)
  } - {None}
  if clash:
    raise ValueError(
      f"{path}: split {sorted(clash)[0]!r} was written by another input; give this input its "
      "own --split_name, or use a new --output"
    )
  storage.write_json(path, {"runs": dict(runs, **{cfg.train_name: mine})})


def prepare(items, cfg: PrepareConfig, log=print) -> dict | None:
  """Writes every shard of this task not yet done, using all cores; one task (the default) then also
  merges: report.json and the split indexes. Returns the report (None for one task of several)."""
  if not 0 <= cfg.task_index < cfg.num_tasks:
    raise ValueError(f"--task_index={cfg.task_index} must be in [0, --num_tasks={cfg.num_tasks})")
  storage.makedirs(cfg.out_dir)
  storage.check_writable(cfg.out_dir)
  _check_settings(cfg)
  workers = cfg.workers or os.cpu_count() or 1
  start, done_now, reused = time.time(), 0, 0
  expected = -(-len(items) // cfg.shard_size) if hasattr(items, "__len__") else None
  if expected is not None and cfg.num_tasks > 1:
    expected = -(-expected // cfg.num_tasks)
  ctx = multiprocessing.get_context("spawn")  # TF and JAX are not fork-safe
  with ctx.Pool(workers) as pool:
    pending = collections.deque()

    def drain(block):
      nonlocal done_now
      while pending and (block or pending[0].ready()):
        pending.popleft().get()
        done_now += 1
        rate = done_now / max(time.time() - start, 1e-9)
        eta = f", ETA {max(expected - reused - done_now, 0) / rate:.0f} s" if expected else ""
        log(f"prepare: {done_now} shards written ({reused} already done), {rate * 60:.1f} shards/min{eta}")

    for number, task in enumerate(_tasks(items, cfg)):
      if number % cfg.num_tasks != cfg.task_index:
        continue  # another machine's
      if _is_done(task):
        reused += 1
        continue
      pending.append(pool.apply_async(write_one_shard, (task,)))
      if len(pending) >= 2 * workers:  # bounded: TFDS tasks hold audio in memory
        pending[0].wait()
      drain(block=False)
    drain(block=True)
  if cfg.num_tasks > 1:
    log(
      f"prepare: task {cfg.task_index} of {cfg.num_tasks} done; when every task is, run the same command with --merge"
    )
    return None
  return merge(cfg.out_dir, items, cfg, seconds=time.time() - start)


def merge(out_dir: str, items=None, cfg: PrepareConfig | None = None, seconds: float | None = None) -> dict:
  """Checks that every shard of the input is written (given `items`), then writes each split's
  consolidated index and report.json. Returns the report."""
  if items is not None:
    missing = [
      (n, path) for n, (path, _, _, _) in enumerate(_tasks(items, cfg)) if not storage.exists(records.index_path(path))
    ]
    if missing:
      n, path = missing[0]
      raise ValueError(
        f"{path}: not written yet ({len(missing)} shards missing); run task "
        f"--task_index={n % cfg.num_tasks} of --num_tasks={cfg.num_tasks} first"
      )
  report = build_report(out_dir)
  for split in report["splits"]:
    records.write_split_index(out_dir, split)
  if seconds is not None:
    report["seconds"] = round(seconds, 1)
  storage.write_json(storage.join(out_dir, "report.json"), report)
  return report


def build_report(out_dir: str) -> dict:
  """Adds up every shard index: counts, hours and a length histogram per split, every skip."""
  splits, skipped = {}, []
  for index in records.read_shard_indexes(storage.glob(out_dir, "*-[0-9][0-9][0-9][0-9][0-9].json")):
    s = splits.setdefault(
      index["split"],
      {"seen": 0, "written": 0, "skipped": 0, "records": 0, "labeled": 0, "samples": 0, "shards": 0, "_lengths": []},
    )
    s["seen"] += index["seen"]
    s["written"] += index["written"]
    s["skipped"] += len(index["skipped"])
    s["records"] += len(index["ids"])
    s["labeled"] += sum(index["labeled"])
    s["samples"] += sum(index["num_samples"])
    s["shards"] += 1
    s["_lengths"].extend(index["num_samples"])
    skipped.extend(index["skipped"])
  for s in splits.values():
    seconds = np.asarray(s.pop("_lengths"), np.float64) / SAMPLE_RATE
    s["hours"] = round(s.pop("samples") / SAMPLE_RATE / 3600, 4)
    counts, _ = np.histogram(seconds, bins=HIST_EDGES_S)
    s["length_histogram_s"] = {
      f"{lo:g}-{hi:g}": int(c) for lo, hi, c in zip(HIST_EDGES_S[:-1], HIST_EDGES_S[1:], counts)
    }
  total = {k: sum(s[k] for s in splits.values()) for k in ("seen", "written", "skipped", "records")}
  reasons = collections.Counter(reason_kind(s["reason"]) for s in skipped)
  return {"total": total, "splits": splits, "skip_reasons": dict(sorted(reasons.items())), "skipped": skipped}


def summary_line(report: dict, out_dir: str) -> str:
  t = report["total"]
  hours = sum(s["hours"] for s in report["splits"].values())
  why = ", ".join(f"{k} {v}" for k, v in report["skip_reasons"].items())
  return (
    f"w2v2-prepare: seen {t['seen']}, written {t['written']} ({t['records']} records, "
    f"{hours:.2f} h), skipped {t['skipped']}{f' ({why})' if why else ''} -> "
    f"{storage.join(out_dir, 'report.json')}"
  )
