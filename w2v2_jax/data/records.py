"""The shard format: ArrayRecord files of tf.train.Example records, plus a JSON index per shard.

A record holds mono 16 kHz int16 `audio` (raw little-endian bytes), `num_samples`, `id`, and
optional `transcript` and `speaker`. ArrayRecord gives random access, so the input pipeline can
address any record by a global index and resume from a single integer. Each shard's JSON index
(written last, so it doubles as the "done" marker) lists every record's id and length and the
files skipped while writing it.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

WRITER_OPTIONS = "group_size:1,uncompressed"  # random access; int16 audio does not compress


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One prepared utterance: int16 samples at 16 kHz and its labels."""
  id: str
  audio: np.ndarray
  transcript: str = ""
  speaker: str = ""


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.array_record"


def encode(utt: Utterance) -> bytes:
  from tensorflow.core.example import example_pb2, feature_pb2  # pylint: disable=import-outside-toplevel
  def b(v): return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[v]))
  feats = {"audio": b(np.ascontiguousarray(utt.audio, "<i2").tobytes()),
           "num_samples": feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[utt.audio.size])),
           "id": b(utt.id.encode()), "transcript": b(utt.transcript.encode()),
           "speaker": b(utt.speaker.encode())}
  return example_pb2.Example(features=feature_pb2.Features(feature=feats)).SerializeToString()


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
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
  ids, lengths, speakers, labeled = [], [], [], []
  for utt in utterances:
    writer.write(encode(utt))
    ids.append(utt.id)
    lengths.append(int(utt.audio.size))
    speakers.append(utt.speaker)
    labeled.append(bool(utt.transcript))
  writer.close()
  os.replace(tmp, path)
  index = dict(index_extra(), file=os.path.basename(path), ids=ids, num_samples=lengths,
               speakers=speakers, labeled=labeled)
  _write_json(index_path(path), index)
  return index


def index_path(shard_path: str) -> str:
  return shard_path[:-len(".array_record")] + ".json"


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
  ids: tuple[str, ...]
  labeled: np.ndarray  # bool [N]


def load_split(data_dir: str, split: str) -> SplitIndex:
  """Reads the JSON indexes of `split` in `data_dir`; errors name what is missing."""
  shards = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{split}-[0-9][0-9][0-9][0-9][0-9].array_record")))
  if not shards:
    have = sorted({os.path.basename(p).rsplit("-", 1)[0] for p in
                   glob.glob(os.path.join(glob.escape(data_dir), "*.array_record"))})
    raise ValueError(f"{data_dir}: no shards of split {split!r} (splits here: {have or 'none'}); "
                     "run w2v2-prepare first")
  files, lengths, ids, labeled = [], [], [], []
  for shard in shards:
    if not os.path.exists(index_path(shard)):
      raise ValueError(f"{shard}: shard has no index {os.path.basename(index_path(shard))}; it is "
                       "unfinished, re-run w2v2-prepare to complete it")
    with open(index_path(shard)) as f:
      index = json.load(f)
    files.append(shard)
    lengths.extend(index["num_samples"])
    ids.extend(index["ids"])
    labeled.extend(index["labeled"])
  return SplitIndex(tuple(files), np.asarray(lengths, np.int64), tuple(ids), np.asarray(labeled, bool))


def open_records(files):
  """Random-access reader over `files` in order (thread-safe)."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource  # pylint: disable=import-outside-toplevel
  return ArrayRecordDataSource(list(files))
