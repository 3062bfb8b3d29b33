"""The shard format: TFRecord files of tf.train.Example records, plus a JSON index per shard.

A record holds mono 16 kHz int16 `audio` (raw little-endian bytes), `num_samples`, `id`, and
optional `transcript` and `speaker`; any tf.data.TFRecordDataset can stream it. The JSON index
(written last, so it doubles as the "done" marker) lists every record's id, length and the byte
offset of its audio in the file, and the files skipped while writing the shard. The offsets give
random access: the input pipeline reads just the bytes of a crop (os.pread, no GIL held), so it can
address any utterance by a global index and resume from a single integer.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

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
  def b(v): return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[v]))
  feats = {"audio": b(np.ascontiguousarray(utt.audio, "<i2").tobytes()),
           "num_samples": feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[utt.audio.size])),
           "id": b(utt.id.encode()), "transcript": b(utt.transcript.encode()),
           "speaker": b(utt.speaker.encode())}
  return example_pb2.Example(features=feature_pb2.Features(feature=feats)).SerializeToString(deterministic=True)


def decode(record: bytes) -> Utterance:
  from tensorflow.core.example import example_pb2  # pylint: disable=import-outside-toplevel
  f = example_pb2.Example.FromString(record).features.feature
  return Utterance(id=f["id"].bytes_list.value[0].decode(),
                   audio=np.frombuffer(f["audio"].bytes_list.value[0], "<i2"),
                   transcript=f["transcript"].bytes_list.value[0].decode(),
                   speaker=f["speaker"].bytes_list.value[0].decode())


def write_shard(path: str, utterances, index_extra) -> dict:
  """Writes records to `path` (via a temporary name), then the JSON index that marks it done.

  `index_extra()` is called after `utterances` is exhausted, for counts gathered on the way.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tmp = path + ".tmp"
  ids, lengths, speakers, labeled, transcripts, offsets, position = [], [], [], [], [], [], 0
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
  os.replace(tmp, path)
  index = dict(index_extra(), file=os.path.basename(path), ids=ids, num_samples=lengths,
               audio_offsets=offsets, speakers=speakers, labeled=labeled, transcripts=transcripts)
  _write_json(index_path(path), index)
  return index


def write_split(out_dir: str, split: str, utterances: list, shard_size: int) -> None:
  """In-memory utterances -> complete shards of `split` (synthetic data: benchmarks, tests)."""
  os.makedirs(out_dir, exist_ok=True)
  for k in range(0, len(utterances), shard_size):
    part = utterances[k:k + shard_size]
    write_shard(os.path.join(out_dir, shard_name(split, k // shard_size)), iter(part),
                lambda n=len(part): {"split": split, "seen": n, "written": n, "skipped": []})


def index_path(shard_path: str) -> str:
  return shard_path[:-len(".tfrecord")] + ".json"


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class SplitIndex:
  """All shards of one split in order; record i of the split is `files` concatenated at i."""
  files: tuple[str, ...]
  num_samples: np.ndarray  # int64 [N]
  file_index: np.ndarray   # int32 [N]: which of `files`
  audio_offsets: np.ndarray  # int64 [N]: byte offset of the int16 audio in its file
  ids: tuple[str, ...]
  labeled: np.ndarray  # bool [N]

  def transcripts(self) -> list[str]:
    """Every record's transcript, from the indexes (older shards: read from the records)."""
    out = []
    for path in self.files:
      with open(index_path(path)) as f:
        index = json.load(f)
      out.extend(index["transcripts"] if "transcripts" in index else
                 [decode(r).transcript for r in _records(path)])
    return out


def _records(path: str):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.data.TFRecordDataset(path).as_numpy_iterator()


def load_split(data_dir: str, split: str) -> SplitIndex:
  """Reads the JSON indexes of `split` in `data_dir`; errors name what is missing."""
  shards = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{split}-[0-9][0-9][0-9][0-9][0-9].tfrecord")))
  if not shards:
    have = sorted({os.path.basename(p).rsplit("-", 1)[0] for p in
                   glob.glob(os.path.join(glob.escape(data_dir), "*.tfrecord"))})
    raise ValueError(f"{data_dir}: no shards of split {split!r} (splits here: {have or 'none'}); "
                     "run w2v2-prepare first")
  files, lengths, ids, labeled, file_index, offsets = [], [], [], [], [], []
  for shard in shards:
    if not os.path.exists(index_path(shard)):
      raise ValueError(f"{shard}: shard has no index {os.path.basename(index_path(shard))}; it is "
                       "unfinished, re-run w2v2-prepare to complete it")
    with open(index_path(shard)) as f:
      index = json.load(f)
    files.append(shard)
    file_index.extend([len(files) - 1] * len(index["ids"]))
    offsets.extend(index["audio_offsets"])
    lengths.extend(index["num_samples"])
    ids.extend(index["ids"])
    labeled.extend(index["labeled"])
  return SplitIndex(tuple(files), np.asarray(lengths, np.int64), np.asarray(file_index, np.int32),
                    np.asarray(offsets, np.int64), tuple(ids), np.asarray(labeled, bool))


class AudioReader:
  """Random-access crops of a split's audio: one pread per crop, thread-safe, no GIL while reading."""

  def __init__(self, index: SplitIndex):
    self.index = index
    self._fds = [os.open(f, os.O_RDONLY) for f in index.files]

  def read(self, record: int, start: int, out: np.ndarray) -> None:
    """Fills int16 `out` with samples [start, start + len(out)) of utterance `record`."""
    fd = self._fds[self.index.file_index[record]]
    offset = int(self.index.audio_offsets[record]) + 2 * int(start)
    if os.preadv(fd, [memoryview(out).cast("B")], offset) != out.nbytes:
      raise OSError(f"{self.index.files[self.index.file_index[record]]}: truncated shard (record "
                    f"{self.index.ids[record]!r}); re-run w2v2-prepare into a new folder")

  def close(self):
    for fd in self._fds:
      os.close(fd)
    self._fds = []
