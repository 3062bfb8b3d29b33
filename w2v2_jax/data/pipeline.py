"""Streaming input for training: prepared shards -> cropped, length-bucketed batches per process.

The order of every epoch is a plan computed from the shard indexes alone (utterance lengths), the
seed and the epoch number, identically on every process:
  1. drop utterances shorter than min_sample_size; put each in a length bucket;
  2. permute the utterances; cut each bucket into global batches (dropping each bucket's
     remainder); shuffle the batches; draw each utterance's crop offset;
  3. process p reads rows [r0, r1) of each global batch: disjoint, same count on every host.
A mixture of several data dirs (InputConfig.sources, data/mixture.py) is one split of their records
whose step 2 first draws each source's share of the epoch (a fixed count per source and bucket).
A running batch counter is therefore the whole iterator state, and a restored iterator yields
exactly the batches it would have yielded. tf.data reads and crops in parallel and prefetches.

Bucketing modes (static shapes: one compiled program per bucket):
  crop: each utterance is cropped to the largest bucket length it covers; no padding (fairseq
        pre-training crops to the batch's shortest utterance, also without padding).
  pad:  each utterance is cropped to max_sample_size, then padded up to the next bucket length;
        `lengths` says how much is real.
Bucket lengths (`bucketing`): geometric from min_sample_size to max_sample_size, or fitted to the
split's lengths: the num_buckets lengths that pad least (pad) or cut away least audio (crop).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import hashlib
import threading
import weakref

import numpy as np

from w2v2_jax.data import mixture, records

STRIDE = 320  # the feature encoder's total stride; bucket lengths are multiples of it
BUCKETINGS = ("geometric", "fit")  # how bucket lengths are chosen (InputConfig.bucketing)


def import_tensorflow_in_background() -> threading.Thread:
  """Starts importing TensorFlow (seconds on a small host) in a daemon thread, so that a training run
  overlaps it with building and compiling its state; the first batch's `import tensorflow` then
  finds it loaded, or waits on Python's import lock for the rest (and reports any import error)."""

  def import_quietly():
    try:
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except Exception:  # noqa: BLE001  the main thread's own import raises it with its traceback
      pass

  thread = threading.Thread(target=import_quietly, daemon=True, name="import-tensorflow")
  thread.start()
  return thread


def tensorflow_for_input():
  """TensorFlow for tf.data, kept off the accelerators: a TF that saw the GPUs would reserve their
  memory on its first op, which is JAX's."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialized its devices (e.g. the user's own TF code ran first)
    pass
  return tf


@dataclasses.dataclass(frozen=True)
class InputConfig:
  data_dir: str  # "" for a mixture of `sources`
  split: str
  global_batch: int
  max_sample_size: int = 250_000
  min_sample_size: int = 32_000
  num_buckets: int = 6
  buckets: tuple[int, ...] = ()  # explicit bucket lengths; else `bucketing` picks num_buckets of them
  bucketing: str = "geometric"  # geometric | fit (to the split's lengths: least padding or cropping)
  mode: str = "crop"  # crop | pad
  crop_long: bool = True  # False (CTC): utterances over max_sample_size are left out, not cut
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None  # None = repeat forever
  prefetch: int = 4
  threads: int = 0  # 0 = tf.data AUTOTUNE
  complete: bool = False  # evaluation: every usable utterance once; each bucket's last batch is
  # filled with empty rows (record -1: silence, no transcript) to score nothing
  read_concurrency: int = 64  # a bucket's ranged GETs in flight per input (local files: unused)
  sources: tuple[tuple[str, str], ...] = ()  # a mixture: (name, data dir) pairs, each with `split`
  sampling_alpha: float = 1.0  # a mixture's shares: (hours share)^alpha, normalised (data/mixture.py)
  source_weights: tuple[float, ...] = ()  # or shares proportional to these, one per source

  @property
  def where(self) -> str:
    """The data, as errors name it."""
    return self.data_dir or "config.data.sources " + ",".join(name for name, _ in self.sources)


def bucket_lengths(cfg: InputConfig, usable: np.ndarray | None = None) -> tuple[int, ...]:
  """Ascending bucket lengths in samples: the given ones, fitted to the `usable` lengths of the
  split's utterances (bucketing="fit"), or geometric from min to max."""
  if cfg.buckets:
    return tuple(sorted(int(b) for b in cfg.buckets))
  if cfg.bucketing == "fit":
    if usable is None:
      raise ValueError("data.bucketing='fit' needs the split's utterance lengths")
    return fitted_bucket_lengths(usable, cfg)
  if cfg.bucketing not in BUCKETINGS:
    raise ValueError(f"data.bucketing={cfg.bucketing!r}: use one of {BUCKETINGS}")
  if cfg.num_buckets == 1 or cfg.min_sample_size >= cfg.max_sample_size:
    return (cfg.max_sample_size,) if cfg.mode == "pad" else (cfg.min_sample_size,)
  geo = np.geomspace(cfg.min_sample_size, cfg.max_sample_size, cfg.num_buckets)
  lengths = [int(g // STRIDE * STRIDE) for g in geo[:-1]] + [cfg.max_sample_size]
  lengths[0] = max(lengths[0], cfg.min_sample_size) if cfg.mode == "pad" else cfg.min_sample_size
  return tuple(sorted(set(lengths)))


def widest_bucket(cfg: InputConfig) -> int:
  """The longest batch any split can get: what a program compiled before seeing the data must hold."""
  if cfg.bucketing == "fit" and not cfg.buckets:
    return cfg.max_sample_size
  return max(bucket_lengths(cfg))


def fitted_bucket_lengths(usable: np.ndarray, cfg: InputConfig) -> tuple[int, ...]:
  """At most num_buckets lengths (multiples of STRIDE, clamped to [min, max]_sample_size) that minimise the
  samples padded (pad: each utterance goes up to the next length) or cut away (crop: down to the
  previous one) over `usable`, by dynamic programming over the sorted distinct lengths."""
  usable = np.asarray(usable, np.int64)
  usable = usable[(usable >= cfg.min_sample_size) & (usable <= cfg.max_sample_size)]
  if usable.size == 0:
    return (cfg.max_sample_size,) if cfg.mode == "pad" else (cfg.min_sample_size,)
  pad = cfg.mode == "pad"
  units = -(-usable // STRIDE) if pad else usable // STRIDE
  widths, counts = np.unique(np.clip(units * STRIDE, cfg.min_sample_size, cfg.max_sample_size), return_counts=True)
  cum = np.concatenate([[0], np.cumsum(counts)])
  m, k = len(widths), max(1, min(cfg.num_buckets, len(widths)))
  # best[j]: least waste proxy for the j shortest distinct lengths in b buckets; a bucket holds a run
  # i..j-1 at width widths[j-1] (pad: total samples, minimised) or widths[i] (crop: kept, maximised).
  best = np.full(m + 1, np.inf)
  best[0] = 0.0
  cuts = np.zeros((k + 1, m + 1), np.int64)
  for b in range(1, k + 1):
    new = np.full(m + 1, np.inf)
    for j in range(1, m + 1):
      i = np.arange(j)
      members = cum[j] - cum[i]
      cost = best[i] + (widths[j - 1] * members if pad else -(widths[i] * members).astype(np.float64))
      cuts[b, j] = int(np.argmin(cost))
      new[j] = cost[cuts[b, j]]
    best = new
  lengths, j = [], m
  for b in range(k, 0, -1):
    i = cuts[b, j]
    lengths.append(int(widths[j - 1] if pad else widths[i]))
    j = i
  return tuple(sorted(set(lengths)))


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  records: np.ndarray  # int64 [batches, global_batch]: record index in the split
  starts: np.ndarray  # int64 [batches, global_batch]: crop offset
  lengths: np.ndarray  # int32 [batches, global_batch]: samples kept
  width: np.ndarray  # int64 [batches]: the batch's array length (its bucket)


class Batches:
  """Global batch plans for one split, epoch by epoch (pure numpy, no TF)."""

  def __init__(self, cfg: InputConfig, num_samples: np.ndarray, source: np.ndarray | None = None):
    """`source`: each record's source in a mixture (cfg.sources), which the epoch draws at its share."""
    self.cfg = cfg
    usable = np.minimum(num_samples, cfg.max_sample_size)
    self.keep = num_samples >= cfg.min_sample_size
    if not cfg.crop_long:
      self.keep &= num_samples <= cfg.max_sample_size
    self.buckets = np.asarray(bucket_lengths(cfg, usable[self.keep]), np.int64)
    if cfg.mode == "crop":
      bucket = np.searchsorted(self.buckets, usable, side="right") - 1
      self.keep &= bucket >= 0
    elif cfg.mode == "pad":
      bucket = np.searchsorted(self.buckets, usable, side="left")
      self.keep &= bucket < len(self.buckets)
    else:
      raise ValueError(f"data.mode={cfg.mode!r}: use 'crop' or 'pad'")
    self.num_samples = num_samples
    self.bucket = np.where(self.keep, bucket, -1).astype(np.int16)  # 16 bits: epoch() groups by radix sort
    self.counts = counts = np.bincount(self.bucket[self.keep], minlength=len(self.buckets))
    self.mix = None
    if source is not None:  # each bucket: whole batches of its sources' draws, the same every epoch
      self.mix = mixture.Draws.plan(
        [name for name, _ in cfg.sources],
        source,
        self.bucket,
        self.keep,
        num_samples,
        len(self.buckets),
        cfg.global_batch,
        cfg.sampling_alpha,
        cfg.source_weights,
      )
      self.counts = counts = self.mix.per_cell.sum(0)
    self.batches_per_bucket = -(-counts // cfg.global_batch) if cfg.complete else counts // cfg.global_batch
    self.per_epoch = int(self.batches_per_bucket.sum())
    if self.per_epoch == 0:
      raise ValueError(
        f"{cfg.where} split {cfg.split!r}: {int(self.keep.sum())} usable utterances "
        f"(>= min_sample_size={cfg.min_sample_size}) fill no global batch of "
        f"{cfg.global_batch} in any bucket {self.buckets.tolist()}; lower the batch size "
        "or add data"
      )
    self.dropped = int((~self.keep).sum())  # shorter than min (or, without crop_long, longer than max)
    self._fingerprint = None
    self._last = None  # (epoch, plan): describe() and the first batch share epoch 0's plan

  def epoch(self, epoch: int) -> EpochPlan:
    """The plan of `epoch` (the last one asked for is kept: at 10M utterances a plan takes seconds)."""
    if self._last is not None and self._last[0] == epoch:
      return self._last[1]
    cfg, b = self.cfg, self.cfg.global_batch
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(self.num_samples)) if cfg.shuffle else np.arange(len(self.num_samples))
    first = self.dropped
    if self.mix is not None:  # each source's share: its utterances repeated or subsampled (none left out)
      order, first = self.mix.resample(order, rng, cfg.shuffle), 0
    # Each bucket's members in the permuted order, in one stable sort (left-out utterances, -1, first).
    order = order[np.argsort(self.bucket[order], kind="stable")]
    batches, widths = [], []
    for k, n in enumerate(self.batches_per_bucket):
      members = order[first : first + min(n * b, self.counts[k])]
      first += self.counts[k]
      if len(members) < n * b:  # complete: fill
        members = np.concatenate([members, np.full(n * b - len(members), -1, members.dtype)])
      batches.append(members.reshape(n, b))
      widths.append(np.full(n, self.buckets[k]))
    recs, width = np.concatenate(batches), np.concatenate(widths)
    if cfg.shuffle:
      perm = rng.permutation(len(recs))
      recs, width = recs[perm], width[perm]
    empty = recs < 0
    total = np.where(empty, np.minimum(width[:, None], self.cfg.min_sample_size), self.num_samples[recs])
    kept = np.broadcast_to(width[:, None], recs.shape) if cfg.mode == "crop" else np.minimum(total, cfg.max_sample_size)
    room = total - kept
    del total
    if cfg.shuffle:  # in place: at 10M utterances each temporary is 80 MB
      starts = rng.random(recs.shape)
      starts *= room + 1
      starts = starts.astype(np.int64)
    else:
      starts = room // 2
    plan = EpochPlan(recs, np.minimum(starts, room, out=starts), kept.astype(np.int32), width)
    self._last = (epoch, plan)
    return plan

  def describe(self) -> str:
    """One line for the log: the buckets and how much of epoch 0's audio is padding or cut away."""
    plan = self.epoch(0)
    real = plan.records >= 0
    kept = plan.lengths[real].sum()
    if self.cfg.mode == "pad":
      waste = f"{1 - kept / max(np.broadcast_to(plan.width[:, None], real.shape)[real].sum(), 1):.1%} padding"
    else:
      waste = f"{1 - kept / max(self.num_samples[plan.records[real]].sum(), 1):.1%} of their audio cut away"
    drawn = "draws from" if self.mix else "of"
    return (
      f"{int(real.sum())} {drawn} {len(self.num_samples)} utterances per epoch in {self.per_epoch} batches, "
      f"buckets {[round(b / 16000, 2) for b in self.buckets.tolist()]} s ({self.cfg.bucketing}), {waste}"
    )

  def fingerprint(self) -> str:
    """Identifies the batch sequence: restoring an iterator state checks it. Computed once (it hashes
    every utterance length)."""
    if self._fingerprint is None:
      # Not data_dir (local and gs:// copies resume each other), `complete` (evaluation has no state) or
      # read_concurrency; `bucketing` and a mixture only when set, so that older iterator states restore.
      later = ("bucketing", "sources", "sampling_alpha", "source_weights")
      fields = tuple(
        getattr(self.cfg, f.name)
        for f in dataclasses.fields(self.cfg)
        if f.name not in ("data_dir", "complete", "read_concurrency") + later
      )
      if self.cfg.bucketing != "geometric":
        fields += (self.cfg.bucketing,)
      if self.mix is not None:  # the sources' names and sizes, the rule and the draws (not their dirs)
        fields += (self.mix.names, tuple(self.mix.utterances.tolist()), self.mix.rule, self.mix.per_cell.tolist())
      self._fingerprint = self._repr_digest(fields, self.num_samples)[:16]
    return self._fingerprint

  @staticmethod
  def _repr_digest(fields: tuple, lengths: np.ndarray, chunk: int = 1 << 18) -> str:
    """sha256 of `repr((fields, lengths.tobytes())).encode()`, streamed: the repr of 10M lengths would
    be a 300 MB string. Python's bytes repr quotes with ' unless the bytes hold ' and no "; a chunk with
    the other quote appended is escaped as the whole would be."""
    flat = np.ascontiguousarray(lengths).reshape(-1)
    parts = [flat[i : i + chunk].view(np.uint8) for i in range(0, flat.size, chunk)]
    quote = '"' if any((p == ord("'")).any() for p in parts) and not any((p == ord('"')).any() for p in parts) else "'"
    other = b"'" if quote == '"' else b'"'
    digest = hashlib.sha256(f"({fields!r}, b{quote}".encode())
    for part in parts:
      digest.update(repr(part.tobytes() + other)[2:-2].encode())
    digest.update(f"{quote})".encode())
    return digest.hexdigest()


class AudioInput:
  """Iterator of this process's rows of each global batch: {'audio' [b, L] int16, 'lengths' [b] i32}.

  Audio stays int16 up to the device (half the host work and transfer); `waveform` makes it float
  inside the jitted step.

  `rows` = (r0, r1) picks the rows of the global batch this process feeds; by default the
  process's even share. `state()` / `restore()` save and set the position exactly.
  """

  def __init__(
    self,
    cfg: InputConfig,
    rows: tuple[int, int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    labels: tuple | None = None,
  ):
    self.cfg = cfg
    self.labels = labels  # (ids [N, L] int32, lengths [N] int32) per record: batches gain them
    if cfg.sources:
      self.index, source = mixture.load_split(cfg.sources, cfg.split)
    else:
      self.index, source = records.load_split(cfg.data_dir, cfg.split), None
    self.batches = Batches(cfg, self.index.num_samples, source)
    if rows is None:
      if cfg.global_batch % process_count:
        raise ValueError(f"batch size {cfg.global_batch} does not divide over {process_count} processes")
      per = cfg.global_batch // process_count
      rows = (process_index * per, (process_index + 1) * per)
    self.rows = rows
    self.position = 0
    self._reader = None
    self._plans = collections.OrderedDict()
    self._lock = threading.Lock()
    self._iterator = None
    self._stop = None  # tf.Variable: True ends the running tf.data pipeline (see close)
    _OPEN.add(self)

  # -- plan and reading ------------------------------------------------------------------------
  @property
  def batches_per_epoch(self) -> int:
    return self.batches.per_epoch

  def _plan(self, epoch: int) -> EpochPlan:
    with self._lock:
      if epoch not in self._plans:
        self._plans[epoch] = self.batches.epoch(epoch)
        while len(self._plans) > 3:
          self._plans.popitem(last=False)
      return self._plans[epoch]

  def local_plan(self, position: int):
    """(record ids, starts, lengths, width) of this process's rows of global batch `position`."""
    epoch, k = divmod(int(position), self.batches_per_epoch)
    plan, (r0, r1) = self._plan(epoch), self.rows
    return plan.records[k, r0:r1], plan.starts[k, r0:r1], plan.lengths[k, r0:r1], int(plan.width[k])

  def shares(self, start: int, stop: int) -> dict[str, float]:
    """A mixture's share of each source among the rows of global batches [start, stop); {} for one data dir."""
    mix = self.batches.mix
    if mix is None or stop <= start:
      return {}
    counts = np.zeros(len(mix.names), np.int64)
    for position in range(start, stop):
      epoch, k = divmod(position, self.batches_per_epoch)
      recs = self._plan(epoch).records[k]
      counts += np.bincount(mix.source[recs[recs >= 0]], minlength=len(counts))
    return {name: float(c) / max(int(counts.sum()), 1) for name, c in zip(mix.names, counts)}

  def load(self, position) -> tuple[np.ndarray, ...]:
    """Reads the crops of one local batch straight into a zero-padded int16 array (+ labels)."""
    recs, starts, lengths, width = self.local_plan(position)
    if self._reader is None:
      with self._lock:
        self._reader = self._reader or records.AudioReader(self.index, self.cfg.read_concurrency)
    audio = np.zeros((len(recs), width), np.int16)
    self._reader.read_many(
      [(rec, start, audio[row, :n]) for row, (rec, start, n) in enumerate(zip(recs, starts, lengths)) if rec >= 0]
    )
    if self.labels is not None:
      real = recs >= 0
      return (
        audio,
        lengths.astype(np.int32),
        np.where(real[:, None], self.labels[0][recs], 0).astype(np.int32),
        np.where(real, self.labels[1][recs], 0).astype(np.int32),
      )
    return audio, lengths.astype(np.int32)

  # -- tf.data -----------------------------------------------------------------------------------
  def dataset(self, start: int, stop):
    """tf.data of local batches for global batch counters start, start+1, ... (deterministic);
    it ends early once the boolean tf.Variable `stop` is set."""
    tf = tensorflow_for_input()
    end = self.batches_per_epoch * self.cfg.num_epochs if self.cfg.num_epochs else np.iinfo(np.int64).max
    rows = self.rows[1] - self.rows[0]

    def load(position):
      if self.labels is None:
        audio, lengths = tf.numpy_function(self.load, [position], (tf.int16, tf.int32), stateful=False)
      else:
        audio, lengths, labels, label_lengths = tf.numpy_function(
          self.load, [position], (tf.int16, tf.int32, tf.int32, tf.int32), stateful=False
        )
      audio.set_shape((rows, None))
      lengths.set_shape((rows,))
      if self.labels is None:
        return {"audio": audio, "lengths": lengths}
      labels.set_shape((rows, self.labels[0].shape[1]))
      label_lengths.set_shape((rows,))
      return {"audio": audio, "lengths": lengths, "labels": labels, "label_lengths": label_lengths}

    threads = self.cfg.threads or tf.data.AUTOTUNE
    ds = tf.data.Dataset.range(start, end)
    # upstream of the map, so that once the stream ends no `load` call is left running (see close)
    ds = ds.take_while(lambda _: tf.logical_not(stop.read_value()))
    ds = ds.map(load, num_parallel_calls=threads, deterministic=True)
    return ds.prefetch(self.cfg.prefetch)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._iterator is None:
      tf = tensorflow_for_input()
      with tf.device("/CPU:0"):
        self._stop = tf.Variable(False, trainable=False)
      self._iterator = self.dataset(self.position, self._stop).as_numpy_iterator()
    batch = next(self._iterator)  # StopIteration ends a finite run
    self.position += 1
    return batch

  def close(self) -> None:
    """Stops the reading threads; the next `next()` starts again at `position`.

    Destroying a tf.data iterator waits for its reading threads; at interpreter exit one inside
    `load` (tf.numpy_function) can no longer take the GIL, and the wait never ends (it hung CI).
    So this ends the stream upstream of `load` and drains it first: no `load` is left running."""
    if self._iterator is not None:
      self._stop.assign(True)
      errors = 0
      while errors < 100:  # at most the batches already in flight
        try:
          next(self._iterator)
        except StopIteration:
          break
        except Exception:  # noqa: BLE001  a read error in a discarded batch: read on to the end
          errors += 1
    self._iterator = self._stop = None
    if self._reader is not None:  # its descriptors and download threads; reopened on the next read
      self._reader.close()
      self._reader = None

  # -- exact resume ----------------------------------------------------------------------------
  def state(self) -> dict:
    return {"position": self.position, "fingerprint": self.batches.fingerprint(), "rows": list(self.rows)}

  def restore(self, state: dict) -> None:
    if state["fingerprint"] != self.batches.fingerprint():
      raise ValueError(
        f"data iterator state does not match {self.cfg.where} split "
        f"{self.cfg.split!r}: the data or the data config (batch, buckets, bucketing, seed, "
        "crop, sources) changed since the checkpoint; restore with the same data config (a fine-tuning "
        "run started before data.bucketing existed: --config.data.bucketing=geometric)"
      )
    self.seek(int(state["position"]))

  def seek(self, position: int) -> None:
    """Next batch is global batch `position` (0 = the start, e.g. for another validation pass)."""
    self.close()
    self.position = position


_OPEN = weakref.WeakSet()  # every AudioInput, closed at exit while its threads can still take the GIL


@atexit.register
def _close_all():
  for data in list(_OPEN):
    data.close()


def waveform(audio, lengths, normalize: bool):
  """int16 batch -> float32 in [-1, 1), padding zeroed; `normalize`: zero mean, unit variance
  per utterance over its real samples (fairseq's layer norm over the waveform, eps 1e-5)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  valid = jnp.arange(audio.shape[1])[None, :] < lengths[:, None]
  x = jnp.where(valid, audio.astype(jnp.float32) * (1 / 32768), 0)
  if normalize:
    n = jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)
    mean = x.sum(1, keepdims=True) / n
    var = jnp.where(valid, (x - mean) ** 2, 0).sum(1, keepdims=True) / n
    x = (x - mean) / jnp.sqrt(var + 1e-5)
  return jnp.where(valid, x, 0)


def local_rows(sharding, global_batch: int) -> tuple[int, int]:
  """The contiguous rows of a batch-sharded global array that this process's devices hold (parallel.process_rows,
  which refuses a layout that gives any process other than one block of the common size)."""
  import jax  # pylint: disable=import-outside-toplevel

  from w2v2_jax.parallel import process_rows  # pylint: disable=import-outside-toplevel

  return process_rows(sharding, global_batch)[jax.process_index()]


def to_global(batch: dict, sharding, global_batch: int) -> dict:
  """Local rows -> global jax.Arrays; `sharding` splits dim 0 over the mesh's batch axes."""
  import jax  # pylint: disable=import-outside-toplevel

  return {
    key: jax.make_array_from_process_local_data(sharding, value, (global_batch,) + value.shape[1:])
    for key, value in batch.items()
  }
