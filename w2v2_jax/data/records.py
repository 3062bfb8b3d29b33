"""The shard format: TFRecord files of tf.train.Example records, a JSON index per shard, and one
consolidated index per split.

A record holds mono 16 kHz int16 `audio` (raw little-endian bytes), `num_samples`, `id`, and
optional `transcript` and `speaker`; any tf.data.TFRecordDataset can stream it. The JSON index
(written last, so it doubles as the "done" marker) lists every record's id, length and the byte
offset of its audio in the file, and the files skipped while writing the shard. The offsets give
random access: the input pipeline reads just the bytes of a crop (os.preadv locally, one ranged GET
from a bucket), so it can address any utterance by a global index and resume from a single integer.

`SPLIT.index.npz` gathers every shard index of a split into arrays: one read at start-up, however
many shards (a bucket would otherwise take one GET per shard). Prepare writes it last.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import os
import threading

import numpy as np

from w2v2_jax import storage

_FRAMING = 12  # TFRecord: uint64 length + uint32 masked CRC before the data, uint32 CRC after


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One prepared utterance: int16 samples at 16 kHz and its labels."""

  id: str
  audio: np.ndarray
  transcript: str = ""
  speaker: str = ""


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.tfrecord"


def encode(utt: Utterance) -> bytes:
  from tensorflow.core.example import example_pb2, feature_pb2  # pylint: disable=import-outside-toplevel

  def b(v):
    return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[v]))

  feats = {
    "audio": b(np.ascontiguousarray(utt.audio, "<i2").tobytes()),
    "num_samples": feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[utt.audio.size])),
    "id": b(utt.id.encode()),
    "transcript": b(utt.transcript.encode()),
    "speaker": b(utt.speaker.encode()),
  }
  return example_pb2.Example(features=feature_pb2.Features(feature=feats)).SerializeToString(deterministic=True)


def decode(record: bytes) -> Utterance:
  from tensorflow.core.example import example_pb2  # pylint: disable=import-outside-toplevel

  f = example_pb2.Example.FromString(record).features.feature
  return Utterance(
    id=f["id"].bytes_list.value[0].decode(),
    audio=np.frombuffer(f["audio"].bytes_list.value[0], "<i2"),
    transcript=f["transcript"].bytes_list.value[0].decode(),
    speaker=f["speaker"].bytes_list.value[0].decode(),
  )


def write_shard(path: str, utterances, index_extra) -> dict:
  """Writes records to `path` (a local temporary file, then one move or upload), then the JSON index
  that marks it done.

  `index_extra()` is called after `utterances` is exhausted, for counts gathered on the way.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  ids, lengths, speakers, labeled, transcripts, offsets, position = [], [], [], [], [], [], 0
  with storage.local_file(path, suffix=".tfrecord") as tmp:
    with tf.io.TFRecordWriter(tmp) as writer:
      for utt in utterances:
        blob = encode(utt)
        writer.write(blob)
        audio = np.ascontiguousarray(utt.audio, "<i2").tobytes()
        offsets.append(position + _FRAMING + blob.find(audio))  # any match holds the same bytes
        position += _FRAMING + len(blob) + 4
        ids.append(utt.id)
        lengths.append(int(utt.audio.size))
        speakers.append(utt.speaker)
        labeled.append(bool(utt.transcript))
        transcripts.append(utt.transcript)
  index = dict(
    index_extra(),
    file=storage.basename(path),
    ids=ids,
    num_samples=lengths,
    audio_offsets=offsets,
    speakers=speakers,
    labeled=labeled,
    transcripts=transcripts,
  )
  storage.write_json(index_path(path), index)
  return index


def write_split(out_dir: str, split: str, utterances: list, shard_size: int) -> None:
  """In-memory utterances -> complete shards of `split` and its index (synthetic data: benchmarks, tests)."""
  storage.makedirs(out_dir)
  for k in range(0, len(utterances), shard_size):
    part = utterances[k : k + shard_size]
    write_shard(
      storage.join(out_dir, shard_name(split, k // shard_size)),
      iter(part),
      lambda n=len(part): {"split": split, "seen": n, "written": n, "skipped": []},
    )
  write_split_index(out_dir, split)


def index_path(shard_path: str) -> str:
  return shard_path[: -len(".tfrecord")] + ".json"


def split_index_path(data_dir: str, split: str) -> str:
  return storage.join(data_dir, f"{split}.index.npz")


def shard_paths(data_dir: str, split: str | None = None) -> list[str]:
  """The split's shard files (every split's, if None), sorted: one listing, local or in a bucket."""
  pattern = f"{split}-[0-9][0-9][0-9][0-9][0-9].tfrecord" if split else "*-[0-9][0-9][0-9][0-9][0-9].tfrecord"
  return storage.glob(data_dir, pattern)


def read_shard_indexes(paths: list[str]) -> list[dict]:
  """The JSON indexes of the given shard (or index) paths, read concurrently from a bucket."""
  paths = [p if p.endswith(".json") else index_path(p) for p in paths]
  if paths and storage.is_url(paths[0]):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      return list(pool.map(storage.read_json, paths))
  return [storage.read_json(p) for p in paths]


def _text_array(values) -> np.ndarray:
  return np.asarray([v.encode("utf-8") for v in values], dtype=bytes) if len(values) else np.zeros(0, "S1")


def write_split_index(data_dir: str, split: str) -> str:
  """Gathers the split's shard indexes into SPLIT.index.npz (written whole, atomically); returns its path."""
  shards = shard_paths(data_dir, split)
  missing = [s for s in shards if not storage.exists(index_path(s))] if not storage.is_url(data_dir) else []
  if missing:
    raise ValueError(
      f"{missing[0]}: shard has no index {storage.basename(index_path(missing[0]))}; it is "
      "unfinished, re-run w2v2-prepare to complete it"
    )
  # Shard by shard into arrays, a window of JSON indexes at a time: parsed JSON of 10M utterances would
  # take several GB, their arrays take a fraction.
  parts = {
    "num_samples": [np.zeros(0, np.int64)],
    "file_index": [np.zeros(0, np.int32)],
    "audio_offsets": [np.zeros(0, np.int64)],
    "labeled": [np.zeros(0, bool)],
    "ids": [],
    "transcripts": [],
  }
  for first in range(0, len(shards), 256):
    for k, ix in enumerate(read_shard_indexes(shards[first : first + 256]), start=first):
      parts["num_samples"].append(np.asarray(ix["num_samples"], np.int64))
      parts["file_index"].append(np.full(len(ix["num_samples"]), k, np.int32))
      parts["audio_offsets"].append(np.asarray(ix["audio_offsets"], np.int64))
      parts["labeled"].append(np.asarray(ix["labeled"], bool))
      parts["ids"].append(_text_array(ix["ids"]))
      parts["transcripts"].append(_text_array(ix.get("transcripts", [""] * len(ix["ids"]))))
  arrays = {"files": np.asarray([storage.basename(s) for s in shards], dtype=str)}
  for name in list(parts):
    pieces = parts.pop(name)
    arrays[name] = np.concatenate(pieces) if pieces else np.zeros(0, "S1")
    del pieces
  path = split_index_path(data_dir, split)
  with storage.local_file(path, suffix=".npz") as tmp:  # written in place, not through a copy in memory
    np.savez(tmp, **arrays)
  return path


class SplitIndex:
  """All shards of one split in order; record i of the split is `files` concatenated at i.

  Ids and transcripts stay encoded until asked for: a 10M-utterance split needs only its numbers.
  """

  def __init__(self, files, num_samples, file_index, audio_offsets, ids, labeled, transcripts=None):
    self.files = tuple(files)
    self.num_samples = np.asarray(num_samples, np.int64)  # [N]
    self.file_index = np.asarray(file_index, np.int32)  # [N]: which of `files`
    self.audio_offsets = np.asarray(audio_offsets, np.int64)  # [N]: byte offset of the int16 audio
    self.labeled = np.asarray(labeled, bool)  # [N]
    self._ids, self._transcripts = ids, transcripts  # callables or sequences

  @property
  def ids(self) -> tuple[str, ...]:
    if callable(self._ids):
      self._ids = tuple(i.decode("utf-8") for i in self._ids())
    return tuple(self._ids)

  def id(self, record: int) -> str:
    return self.ids[record] if not callable(self._ids) else self._ids()[record].decode("utf-8")

  def transcripts(self) -> list[str]:
    """Every record's transcript (older shards without them in the index: read from the records)."""
    if callable(self._transcripts):
      return [t.decode("utf-8") for t in self._transcripts()]
    if self._transcripts is not None:
      return list(self._transcripts)
    out = []
    for path, index in zip(self.files, read_shard_indexes(list(self.files))):
      out.extend(index["transcripts"] if "transcripts" in index else [decode(r).transcript for r in _records(path)])
    return out


def concatenate(indexes: list[SplitIndex]) -> SplitIndex:
  """Several splits as one (a mixture of data dirs): their records in order, each file kept where it is."""
  if len(indexes) == 1:
    return indexes[0]
  first_file = np.cumsum([0] + [len(ix.files) for ix in indexes[:-1]])

  def joined(part):
    return lambda: np.concatenate([np.asarray([v.encode("utf-8") for v in part(ix)], bytes) for ix in indexes])

  return SplitIndex(
    [f for ix in indexes for f in ix.files],
    np.concatenate([ix.num_samples for ix in indexes]),
    np.concatenate([ix.file_index + k for ix, k in zip(indexes, first_file)]),
    np.concatenate([ix.audio_offsets for ix in indexes]),
    joined(lambda ix: ix.ids),
    np.concatenate([ix.labeled for ix in indexes]),
    joined(lambda ix: ix.transcripts()),
  )


def _records(path: str):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  return tf.data.TFRecordDataset(path).as_numpy_iterator()


def load_split(data_dir: str, split: str) -> SplitIndex:
  """The split's index: SPLIT.index.npz where prepare wrote it, else (a local folder) the shards' JSON
  indexes. Errors name what is missing."""
  shards = shard_paths(data_dir, split)
  if not shards:
    have = sorted({storage.basename(p).rsplit("-", 1)[0] for p in shard_paths(data_dir)})
    raise ValueError(
      f"{data_dir}: no shards of split {split!r} (splits here: {have or 'none'}); run w2v2-prepare first"
    )
  consolidated = split_index_path(data_dir, split)
  if storage.exists(consolidated):
    index = _load_consolidated(data_dir, consolidated)
    if [storage.basename(f) for f in index.files] == [storage.basename(s) for s in shards]:
      return index
    if storage.is_url(data_dir):
      raise ValueError(
        f"{consolidated} lists other shards than {data_dir} holds; rewrite it with "
        f"w2v2-prepare --merge --output={data_dir}"
      )
  elif storage.is_url(data_dir):
    raise ValueError(
      f"{consolidated}: missing (a bucket is read through one index per split); write it with "
      f"w2v2-prepare --merge --output={data_dir}"
    )
  files, lengths, ids, labeled, file_index, offsets = [], [], [], [], [], []
  for shard in shards:
    if not storage.exists(index_path(shard)):
      raise ValueError(
        f"{shard}: shard has no index {storage.basename(index_path(shard))}; it is "
        "unfinished, re-run w2v2-prepare to complete it"
      )
    index = storage.read_json(index_path(shard))
    files.append(shard)
    file_index.extend([len(files) - 1] * len(index["ids"]))
    offsets.extend(index["audio_offsets"])
    lengths.extend(index["num_samples"])
    ids.extend(index["ids"])
    labeled.extend(index["labeled"])
  return SplitIndex(files, lengths, file_index, offsets, tuple(ids), labeled)


def _load_consolidated(data_dir: str, path: str) -> SplitIndex:
  blob = storage.read_bytes(path) if storage.is_url(path) else path
  archive = np.load(io.BytesIO(blob) if isinstance(blob, bytes) else blob, allow_pickle=False)
  files = [storage.join(data_dir, str(f)) for f in archive["files"]]
  return SplitIndex(
    files,
    archive["num_samples"],
    archive["file_index"],
    archive["audio_offsets"],
    lambda: archive["ids"],
    archive["labeled"],
    lambda: archive["transcripts"],
  )


class AudioReader:
  """Random-access crops of a split's audio, thread-safe.

  Local shards: one preadv per crop (no GIL while reading), with at most `max_open_files` descriptors
  open at once (least recently used closed first), opened when first read. A bucket: one ranged GET per
  crop, at most `concurrency` in flight for this reader.
  """

  def __init__(self, index: SplitIndex, concurrency: int = 64, max_open_files: int = 256):
    self.index = index
    self.remote_files = np.asarray([storage.is_url(f) for f in index.files], bool)  # a mixture may hold both
    self.max_open_files = max_open_files
    self._fds = collections.OrderedDict()  # file number -> [descriptor, readers], least recently used first
    self._lock = threading.Lock()
    self._pool = (
      concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="audio-read")
      if self.remote_files.any()
      else None
    )

  def read(self, record: int, start: int, out: np.ndarray) -> None:
    """Fills int16 `out` with samples [start, start + len(out)) of utterance `record`."""
    self.read_many([(record, start, out)])

  def read_many(self, requests) -> None:
    """Fills each (record, start, out) of a batch; from a bucket, the GETs run concurrently."""
    remote = self.remote_files[self.index.file_index[[r[0] for r in requests]]] if requests else []
    futures = [self._pool.submit(self._read_remote, *r) for r, far in zip(requests, remote) if far]
    for (record, start, out), far in zip(requests, remote):
      if far:
        continue
      offset = int(self.index.audio_offsets[record]) + 2 * int(start)
      file = int(self.index.file_index[record])
      fd = self._acquire(file)
      try:
        if os.preadv(fd, [memoryview(out).cast("B")], offset) != out.nbytes:
          self._truncated(record)
      finally:
        self._release(file)
    for future in futures:
      future.result()

  def _read_remote(self, record: int, start: int, out: np.ndarray) -> None:
    offset = int(self.index.audio_offsets[record]) + 2 * int(start)
    data = storage.read_bytes(self.index.files[self.index.file_index[record]], offset, offset + out.nbytes)
    if len(data) != out.nbytes:
      self._truncated(record)
    memoryview(out).cast("B")[:] = data

  def _acquire(self, file: int) -> int:
    """The file's descriptor, opened if needed, held until `_release` (a held one is never closed)."""
    with self._lock:
      entry = self._fds.get(file)
      if entry is None:
        for idle in [f for f, (_, users) in self._fds.items() if users == 0]:
          if len(self._fds) < self.max_open_files:
            break
          os.close(self._fds.pop(idle)[0])  # least recently used first
        entry = self._fds[file] = [os.open(self.index.files[file], os.O_RDONLY), 0]
      self._fds.move_to_end(file)
      entry[1] += 1
      return entry[0]

  def _release(self, file: int) -> None:
    with self._lock:
      self._fds[file][1] -= 1

  @property
  def open_files(self) -> int:
    return len(self._fds)

  def _truncated(self, record: int):
    path = self.index.files[self.index.file_index[record]]
    raise OSError(f"{path}: truncated shard (record {self.index.id(record)!r}); re-run w2v2-prepare into a new folder")

  def close(self):
    with self._lock:
      for fd, _ in self._fds.values():
        os.close(fd)
      self._fds.clear()
    if self._pool is not None:
      self._pool.shutdown(wait=True)
