"""A lost process ends a multi-host job: the others exit non-zero within --host_timeout seconds, with one
line naming it, instead of waiting in a collective forever.

Each process bumps a counter in the coordination service's key-value store a few times per timeout and
watches everyone else's. A counter that stops for the timeout means that process or its host is gone;
one that reports an error exit means it failed. JAX's own heartbeat (initialize_options) is the backstop,
set longer so that this line comes first: it aborts with a stack trace. A collective whose peer died may
also raise first (gloo: "Connection closed by peer"); that process still waits out the timeout so that
its log names the lost process.

  jax.distributed.initialize(..., **failures.initialize_options())
  failures.watch_processes()   # right after; nothing with one process
  ...
  failures.finished()          # a clean end: the others stop watching this one
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

from absl import flags, logging

_HOST_TIMEOUT = flags.DEFINE_integer(
  "host_timeout",
  60,
  "Multi-host: seconds without a sign of life from a process (a dead host, a killed "
  "process) before the others exit non-zero, naming it.",
)
_ALIVE = "w2v2_jax/alive/"  # process index -> a counter, bumped while the process lives
_EXIT = "w2v2_jax/exit/"  # process index -> how it ended: "done", "failed" or "gone" (see _Watch)


def host_timeout() -> int:
  """--host_timeout, or its default where flags are not parsed (a library caller)."""
  return _HOST_TIMEOUT.value if flags.FLAGS.is_parsed() else _HOST_TIMEOUT.default


def initialize_options() -> dict:
  """Keyword arguments for jax.distributed.initialize: JAX's heartbeat, twice --host_timeout, as the backstop."""
  return {"heartbeat_timeout_seconds": 2 * host_timeout()}


class _Watch:
  """The daemon thread: publish our counter, read everyone's, end the process when one is lost.

  Exit states (_EXIT): "done" a clean end (JAX's shutdown barrier follows); "failed" an error; "gone"
  left because of another process.
  """

  def __init__(self, client, index: int, count: int, timeout: float):
    self.client, self.index, self.count, self.timeout = client, index, count, timeout
    self.period = max(timeout / 6, 0.2)
    self.clean = False
    self.exiting = False
    threading.Thread(target=self._run, name="w2v2-watch-processes", daemon=True).start()
    atexit.register(self._at_exit)

  def _lost(self, message: str | None, culprit: int | None = None) -> None:
    """Leaves at once; process 0, which hosts the coordination service, once the others have left too
    (or after a few periods), so that none of them is cut off mid-way."""
    if message:
      logging.error("%s; exiting", message)
    try:
      self.client.key_value_set(f"{_EXIT}{self.index}", "gone", allow_overwrite=True)
      others = [str(p) for p in range(self.count) if p not in (self.index, culprit)]
      deadline = time.monotonic() + 3 * self.period
      while self.index == 0 and time.monotonic() < deadline:
        ended = self._ended()
        if all(ended.get(p) in ("done", "gone") for p in others):
          break
        time.sleep(self.period / 4)
    except Exception:  # noqa: BLE001  pylint: disable=broad-except  (the coordination service is gone)
      pass
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    os._exit(1)  # pylint: disable=protected-access  (the main thread may be blocked in a collective)

  def _ended(self) -> dict:
    return {k.rsplit("/", 1)[-1]: v for k, v in self.client.key_value_dir_get(_EXIT)}

  def _at_exit(self) -> None:
    """A clean end goes on to JAX's shutdown, a barrier the others join as they finish. A failure leaves
    without it once every other process has ended (or after --host_timeout): some may be blocked in
    collectives. Meanwhile the thread still names a lost process, e.g. the peer whose death broke a
    collective here. Process 0, which hosts the coordination service, leaves last."""
    self.exiting = True
    try:
      self.client.key_value_set(f"{_EXIT}{self.index}", "done" if self.clean else "failed", allow_overwrite=True)
      if self.clean:
        return
      settled = ("done", "gone") if self.index == 0 else ("done", "gone", "failed")
      deadline = time.monotonic() + self.timeout + (4 if self.index == 0 else 2) * self.period
      while time.monotonic() < deadline:
        ended = self._ended()
        if all(ended.get(str(p)) in settled for p in range(self.count) if p != self.index):
          break
        time.sleep(self.period / 4)
    except Exception:  # noqa: BLE001  pylint: disable=broad-except  (the coordination service is gone)
      if self.clean:
        return
    self._lost(None)

  def _run(self) -> None:
    start = time.monotonic()
    heard = {p: (None, start) for p in range(self.count) if p != self.index}  # last counter, when it moved
    contact = start  # the last answer from the coordination service (on process 0's host)
    beat = 0
    while True:
      time.sleep(self.period)
      if self.clean:
        return  # finished: what is left (the shutdown barrier) has its own timeout
      now = time.monotonic()
      try:
        beat += 1
        self.client.key_value_set(f"{_ALIVE}{self.index}", str(beat), allow_overwrite=True)
        alive = {k.rsplit("/", 1)[-1]: v for k, v in self.client.key_value_dir_get(_ALIVE)}
        exits = self._ended()
        contact = now
      except Exception as e:  # noqa: BLE001  pylint: disable=broad-except
        if self.exiting:
          return
        if now - contact > self.timeout:
          self._lost(
            f"lost process 0 of {self.count} (the coordination service): no answer for "
            f"{now - contact:.0f} s ({type(e).__name__})"
          )
        continue
      for p, (value, since) in heard.items():
        ended = exits.get(str(p))
        if ended in ("done", "gone"):
          continue
        if ended == "failed":
          if self.clean or self.exiting:
            continue  # past the work that needs it, or failing too (_at_exit waits for the others)
          self._lost(f"process {p} of {self.count} stopped with an error (see its log)")
        if alive.get(str(p)) != value:
          heard[p] = (alive.get(str(p)), now)
        elif now - since > self.timeout:
          self._lost(
            f"lost process {p} of {self.count}: no sign of life for {now - since:.0f} s "
            "(its host died, was killed, or hangs)",
            p,
          )


_watch: _Watch | None = None


def watch_processes(timeout: float | None = None) -> None:
  """Starts watching the other processes (after jax.distributed.initialize; nothing with one process)."""
  global _watch  # pylint: disable=global-statement
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import distributed  # pylint: disable=import-outside-toplevel

  client = distributed.global_state.client
  if _watch is None and client is not None and jax.process_count() > 1:
    _watch = _Watch(client, jax.process_index(), jax.process_count(), timeout or host_timeout())


def finished() -> None:
  """This process ended cleanly: the others stop watching it (it may leave before them), and it stops
  watching them (the coordination service may close before this process exits)."""
  if _watch is not None:
    _watch.clean = True
    _watch.exiting = True
    try:
      _watch.client.key_value_set(f"{_EXIT}{_watch.index}", "done", allow_overwrite=True)
    except Exception:  # noqa: BLE001  pylint: disable=broad-except  (at exit, _at_exit tries again)
      pass
