"""The offline speech corpus: English read by eSpeak NG voices, synthesized into prepared shards.

Splits: `unlabeled` (pre-training), `labeled` (fine-tuning) and `test`. The test split uses voices
and sentences that no other split has. Everything follows from the config, seed included, and the
shards are cached under a folder named by its hash: a second call returns at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import time

import numpy as np

from w2v2_jax import storage
from w2v2_jax.data import records, writer
from w2v2_jax.data.audio import SAMPLE_RATE
from w2v2_jax.demo import espeak, rooms, sentences

SPLITS = ("unlabeled", "labeled", "test")
_WORDS_PER_SECOND = 3.8  # eSpeak at 160 words/min (measured); only sizes the plan


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  unlabeled_hours: float = 2.0
  labeled_minutes: float = 10.0
  labeled_voices: int = 0  # train voices the labeled split draws from; 0: all of them
  rooms: bool = False  # every utterance in its own simulated room with noise (demo/rooms.py)
  test_minutes: float = 10.0
  test_voice_fraction: float = 0.15
  test_sentence_fraction: float = 0.15
  max_sentences: int = 3  # per utterance
  seed: int = 0
  shard_size: int = 256

  def fingerprint(self) -> str:
    fields = dataclasses.asdict(self)
    for name in _ADDED_LATER:  # at their defaults, the corpus is the one cached before they existed
      if fields[name] == CorpusConfig.__dataclass_fields__[name].default:
        del fields[name]
    # the synthesizer module's name when the hash was defined (it has moved since): caches stay valid
    blob = json.dumps(fields, sort_keys=True) + "w2v2_jax.data.espeak" + "v1"
    if self.rooms:
      blob += repr(rooms.SETTINGS)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_ADDED_LATER = ("labeled_voices", "rooms")


@dataclasses.dataclass(frozen=True)
class Spec:
  id: str
  text: str
  voice: str
  rate: int
  pitch: int
  pitch_range: int


def _held_out(key: str, fraction: float, seed: int) -> bool:
  h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
  return h / 2**64 < fraction


def voices(cfg: CorpusConfig) -> dict[str, list[str]]:
  """All accent+variant voices, split into train and held-out test voices; `labeled` is the
  train voices the labeled split speaks with (a few, when cfg.labeled_voices says so)."""
  every = [f"{a}+{v}" for a in espeak.ACCENTS for v in espeak.VARIANTS]
  test = [v for v in every if _held_out("voice:" + v, cfg.test_voice_fraction, cfg.seed)]
  train = [v for v in every if v not in test]
  labeled = train
  if cfg.labeled_voices:
    if not 0 < cfg.labeled_voices <= len(train):
      raise ValueError(
        f"corpus labeled_voices={cfg.labeled_voices} (config.data.corpus_labeled_voices): "
        f"choose 1..{len(train)}, or 0 for every training voice"
      )
    rng = np.random.default_rng([cfg.seed, 99])  # half female variants, as a balanced small set would be
    female = [v for v in train if v.split("+")[1] in espeak.FEMALE_VARIANTS]
    other = [v for v in train if v not in female]
    n_female = min(cfg.labeled_voices // 2, len(female))
    labeled = sorted(
      rng.choice(female, n_female, replace=False).tolist()
      + rng.choice(other, cfg.labeled_voices - n_female, replace=False).tolist()
    )
  return {"train": train, "test": test, "labeled": labeled}


def _draw_sentences(rng, cfg: CorpusConfig, test: bool) -> list[str]:
  """One utterance's 1 to max_sentences sentences: held-out ones only for the test split, never elsewhere."""
  parts = []
  while len(parts) < rng.integers(1, cfg.max_sentences + 1):
    s = sentences.sentence(rng)
    if _held_out("sentence:" + s, cfg.test_sentence_fraction, cfg.seed) == test:
      parts.append(s)
  return parts


def plan(cfg: CorpusConfig) -> dict[str, list[Spec]]:
  """The utterances of every split: text, voice, rate and pitch, deterministic for the config."""
  pools = voices(cfg)
  budget_s = {
    "unlabeled": cfg.unlabeled_hours * 3600,
    "labeled": cfg.labeled_minutes * 60,
    "test": cfg.test_minutes * 60,
  }
  out = {}
  for split_no, split in enumerate(SPLITS):
    rng = np.random.default_rng([cfg.seed, split_no])
    pool = pools["train" if split == "unlabeled" else split]
    specs, seconds = [], 0.0
    while seconds < budget_s[split]:
      parts = _draw_sentences(rng, cfg, test=split == "test")
      rate = int(rng.integers(130, 221))
      text = " ".join(parts)
      specs.append(
        Spec(
          id=f"{split}-{len(specs):06d}",
          text=text,
          voice=pool[rng.integers(len(pool))],
          rate=rate,
          pitch=int(rng.integers(20, 81)),
          pitch_range=int(rng.integers(20, 81)),
        )
      )
      seconds += len(text.split()) / _WORDS_PER_SECOND * 160 / rate + 0.27 * len(parts)
    out[split] = specs
  return out


def lm_text(cfg: CorpusConfig, lines: int = 20_000) -> list[str]:
  """A text-only corpus for language models, as LibriSpeech ships one: lines drawn like the
  utterances' (1 to max_sentences sentences) from a stream of their own, without the test sentences."""
  rng = np.random.default_rng([cfg.seed, len(SPLITS)])
  out = []
  while len(out) < lines:
    out.append(" ".join(_draw_sentences(rng, cfg, test=False)))
  return out


def _synthesize_shard(task) -> dict:
  """Worker: synthesizes one shard's utterances, resamples to 16 kHz (puts each in a room), writes the shard."""
  from w2v2_jax.data.audio import resample  # pylint: disable=import-outside-toplevel

  path, split, specs, in_rooms = task

  def utterances():
    with espeak.Synthesizer() as synth:  # fresh state per shard: the same bytes on every run
      for spec in specs:
        seed = int(hashlib.sha256(spec.id.encode()).hexdigest()[:8], 16)
        pcm = synth.synth(spec.text + ".", spec.voice, spec.rate, spec.pitch, spec.pitch_range, seed=seed)
        audio = resample(pcm.astype(np.float32) / 32768, synth.sample_rate, SAMPLE_RATE)
        if in_rooms:
          audio = rooms.in_a_room(audio, np.random.default_rng([seed, 7]))
        yield records.Utterance(
          spec.id, np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16), spec.text, spec.voice
        )

  return records.write_shard(
    path,
    utterances(),
    lambda: {
      "split": split,
      "seen": len(specs),
      "written": len(specs),
      "skipped": [],
      "items_sha": hashlib.sha256(repr(specs).encode()).hexdigest()[:16],
    },
  )


def default_cache_dir() -> str:
  return os.environ.get("W2V2_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "w2v2_jax"))


def ensure_corpus(cfg: CorpusConfig = CorpusConfig(), cache_dir: str | None = None, workers: int = 0, log=print) -> str:
  """Returns the folder of the corpus's shards, synthesizing what is missing (all cores)."""
  out_dir = os.path.join(cache_dir or default_cache_dir(), f"espeak-corpus-{cfg.fingerprint()}")
  report_path = os.path.join(out_dir, "report.json")
  if os.path.exists(report_path):
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  # Several processes on one host (a local multi-process run, parallel tests) may ask at once:
  # one synthesizes, the others wait for it and then find the report.
  with open(os.path.join(out_dir, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(report_path):
      _synthesize(cfg, out_dir, report_path, workers, log)
  return out_dir


def _synthesize(cfg: CorpusConfig, out_dir: str, report_path: str, workers: int, log) -> None:
  tasks = []
  for split, specs in plan(cfg).items():
    for k in range(0, len(specs), cfg.shard_size):
      path = os.path.join(out_dir, records.shard_name(split, k // cfg.shard_size))
      if not os.path.exists(records.index_path(path)):
        tasks.append((path, split, specs[k : k + cfg.shard_size], cfg.rooms))
  start = time.time()
  log(f"corpus: synthesizing {len(tasks)} shards into {out_dir}")
  with multiprocessing.get_context("spawn").Pool(workers or os.cpu_count() or 1) as pool:
    for n, index in enumerate(pool.imap_unordered(_synthesize_shard, tasks), start=1):
      rate = n / (time.time() - start)
      log(
        f"corpus: {n}/{len(tasks)} shards, {sum(index['num_samples']) / SAMPLE_RATE:.0f} s audio "
        f"in the last, {rate * 60:.1f} shards/min, ETA {(len(tasks) - n) / rate:.0f} s"
      )
  report = writer.build_report(out_dir)
  report["config"] = dataclasses.asdict(cfg)
  report["seconds"] = round(time.time() - start, 1)
  for split in report["splits"]:
    records.write_split_index(out_dir, split)
  storage.write_json(report_path, report)
