"""Where prepare's inputs come from: a directory tree, a TSV manifest, or a TFDS dataset.

Each source yields `Item`s in a deterministic order. File items are decoded later, in worker
processes; TFDS items carry their samples already.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import posixpath
from collections.abc import Iterator

import numpy as np

from w2v2_jax import storage

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aiff", ".aif", ".au", ".sph")


@dataclasses.dataclass(frozen=True)
class Item:
  id: str
  path: str = ""  # file to decode, or "" when `audio` is given
  transcript: str = ""
  speaker: str = ""
  audio: np.ndarray | None = None  # float32 mono, at `rate`
  rate: int = 16000


def from_directory(root: str, speaker_level: int = 0) -> Iterator[Item]:
  """Every audio file under `root` (a folder or a gs:// prefix), sorted. A sibling `<stem>.txt` is its
  transcript.

  speaker_level=N takes the N-th parent folder name as the speaker (LibriSpeech's
  speaker/chapter/file.flac layout is 2); 0 means no speaker.
  """
  if not storage.isdir(root):
    raise ValueError(f"--input={root}: not a directory, TSV manifest or tfds: name")
  files = storage.find(root)  # one listing, also in a bucket
  texts = {f for f in files if f.endswith(".txt")}
  base = root.rstrip("/") + "/" if storage.is_url(root) else os.path.join(root, "")
  for path in sorted(files, key=lambda f: _walk_order(f[len(base) :])):
    if not path.lower().endswith(AUDIO_EXTENSIONS):
      continue
    rel = path[len(base) :].replace(os.sep, "/")
    stem = os.path.splitext(path)[0]
    transcript = ""
    if stem + ".txt" in texts:
      transcript = " ".join(storage.read_bytes(stem + ".txt").decode("utf-8", errors="replace").split())
    parts = posixpath.dirname(rel).split("/")
    speaker = parts[-speaker_level] if 0 < speaker_level <= len(parts) and parts[0] else ""
    yield Item(id=os.path.splitext(rel)[0], path=path, transcript=transcript, speaker=speaker)


def _walk_order(rel: str) -> tuple:
  """os.walk's order with sorted names: a folder's files before its subfolders."""
  parts = rel.replace(os.sep, "/").split("/")
  return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def from_tsv(manifest: str) -> Iterator[Item]:
  """A TSV with a header naming `path` and optionally `transcript`, `speaker`, `id`.

  fairseq's manifests (first line: the root folder; then `relative_path<TAB>num_samples`) work too.
  Relative paths are taken from the manifest's folder (or fairseq's root line).
  """
  f = io.StringIO(storage.read_bytes(manifest).decode("utf-8"), newline="")
  with f:
    first = f.readline().rstrip("\n")
    header = first.split("\t")
    if "path" in header:
      root = storage.dirname(storage.absolute(manifest))
      rows = csv.DictReader(f, fieldnames=header, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
      root = first
      rows = ({"path": line.rstrip("\n").split("\t")[0]} for line in f)
    for line_no, row in enumerate(rows, start=2):
      rel = (row.get("path") or "").strip()
      if not rel:
        raise ValueError(f"{manifest}:{line_no}: empty path column")
      path = rel if os.path.isabs(rel) or storage.is_url(rel) else storage.join(root, rel)
      yield Item(
        id=(row.get("id") or os.path.splitext(rel)[0]).strip(),
        path=path,
        transcript=" ".join((row.get("transcript") or "").split()),
        speaker=(row.get("speaker") or "").strip(),
      )


def from_tfds(spec: str, data_dir: str | None) -> Iterator[Item]:
  """`tfds:NAME[/CONFIG][:SPLIT]` from a prepared TFDS data_dir (never downloads); SPLIT may be an
  expression such as `train_clean100+train_clean360`."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  name, _, split = spec[len("tfds:") :].partition(":")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - tfds raises many types for a missing dataset
    raise ValueError(
      f"--input={spec}: TFDS cannot open {name!r} in --tfds_data_dir={data_dir} "
      f"({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    ) from None
  features = builder.info.features
  audio_keys = [k for k, v in features.items() if isinstance(v, tfds.features.Audio)]
  if not audio_keys:
    raise ValueError(f"--input={spec}: the dataset has no Audio feature (features: {list(features)})")
  key = audio_keys[0]
  rate = int(features[key].sample_rate or 16000)
  split = split or "train"
  for part in split.split("+"):  # a TFDS split expression: train_clean100+train_clean360, train[:10%]
    if part.split("[")[0].strip() not in builder.info.splits:
      raise ValueError(
        f"--input={spec}: no split {part.split('[')[0].strip()!r}; the dataset has "
        f"{list(builder.info.splits)} (join several with +)"
      )
  scale = 1.0 / 32768 if np.dtype(features[key].np_dtype).kind == "i" else 1.0
  for i, ex in enumerate(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))):
    text = ex.get("text", ex.get("transcript", b""))
    speaker = ex.get("speaker_id", ex.get("speaker", b""))
    uid = ex.get("id", f"{name}:{split}:{i}".encode())  # a dataset without ids: unique per input
    as_str = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    audio = np.asarray(ex[key], np.float32).reshape(ex[key].shape[0], -1).mean(axis=1) * scale
    yield Item(
      id=as_str(uid),
      transcript=" ".join(as_str(text).split()),
      speaker=as_str(speaker) if as_str(speaker) else "",
      audio=audio,
      rate=rate,
    )


def open_source(spec: str, speaker_level: int = 0, tfds_data_dir: str | None = None) -> Iterator[Item]:
  if spec.startswith("tfds:"):
    return from_tfds(spec, tfds_data_dir)
  if storage.isfile(spec):
    return from_tsv(spec)
  return from_directory(spec, speaker_level)
