"""TensorBoard event files: written to a local folder or a bucket, and read back (plots, tests, scripts)."""

from __future__ import annotations

import collections
import os
import socket
import struct
import tempfile
import time

from w2v2_jax import storage

EVENTS_GLOB = "events.out.tfevents.*"


class EventWriter:
  """Scalars into TensorBoard event files under `logdir` (a folder or a gs:// URL).

  A folder gets one file, flushed at every `flush()`. An object cannot be appended to, and
  re-uploading a growing file at every log step would cost quadratic traffic and break GCS's
  one-write-per-second-per-object limit. So for a URL, events go to a local spool file; at a `flush()`
  at least `upload_every_s` after the last upload, and at `close()`, the spool is closed, uploaded
  once as its own event file, and a new spool begins. TensorBoard reads the files of a folder in
  name order, and the names sort in time order.
  """

  def __init__(self, logdir: str, upload_every_s: float = 60.0):
    self.logdir, self.upload_every_s = logdir, upload_every_s
    self.remote = storage.is_url(logdir)
    self._spool_dir = tempfile.mkdtemp(prefix="w2v2_tensorboard_") if self.remote else None
    self._writer, self._started_ns, self._last_upload, self._pending = None, 0, time.time(), False
    if not self.remote:
      os.makedirs(logdir, exist_ok=True)

  def _open(self):
    if self._writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._started_ns = time.time_ns()
      self._writer = SummaryWriter(self._spool_dir or self.logdir)
    return self._writer

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._open().add_scalar(tag, value, step)
    self._pending = True

  def write_scalars(self, step: int, scalars: dict) -> None:
    """clu's MetricWriter call (its periodic actions write through it)."""
    for tag, value in scalars.items():
      self.scalar(tag, float(value), step)

  def flush(self) -> None:
    if not self.remote:
      if self._writer is not None:
        self._writer.flush()
    elif self._pending and time.time() - self._last_upload >= self.upload_every_s:
      self._upload()

  def _upload(self) -> None:
    self._writer.close()
    for k, name in enumerate(sorted(os.listdir(self._spool_dir))):
      spool = os.path.join(self._spool_dir, name)
      # named by the spool's start, so that the bucket's name order is the write order
      target = f"events.out.tfevents.{self._started_ns:020d}.{socket.gethostname()}.{os.getpid()}.{k}"
      storage.upload(spool, storage.join(self.logdir, target))  # a whole object, once
      if os.path.exists(spool):
        os.remove(spool)
    self._writer, self._pending, self._last_upload = None, False, time.time()

  def close(self) -> None:
    if self.remote and self._pending:
      self._upload()
    elif self._writer is not None:
      self._writer.close()
      self._writer = None


def _records(blob: bytes):
  """The payloads of a TFRecord file: [uint64 length][uint32 crc][data][uint32 crc] each."""
  position = 0
  while position + 12 <= len(blob):
    (length,) = struct.unpack_from("<Q", blob, position)
    start = position + 12
    if start + length + 4 > len(blob):  # a partly written last record (a live run): stop there
      return
    yield blob[start : start + length]
    position = start + length + 4


def event_files(workdir: str) -> list[str]:
  """The run's event files in write order (names hold their start time; local files by mtime)."""
  files = storage.glob(storage.join(workdir, "tensorboard"), EVENTS_GLOB)
  return files if storage.is_url(workdir) else sorted(files, key=os.path.getmtime)


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from every event file under WORKDIR/tensorboard, sorted by step.

  A resumed run starts a new event file; where two files hold the same step, the later file wins.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  files = event_files(workdir)
  if not files:
    raise FileNotFoundError(
      f"no TensorBoard event files under {storage.join(workdir, 'tensorboard')}: is --workdir the w2v2-train workdir?"
    )
  by_tag = collections.defaultdict(dict)
  for path in files:
    for record in _records(storage.read_bytes(path)):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        by_tag[value.tag][int(event.step)] = float(value.simple_value)
  return {tag: sorted(points.items()) for tag, points in by_tag.items()}
