"""Where a run's figures go: the console, TensorBoard, WORKDIR/eval_results.json, a notebook's callback,
clu's progress report and profiler; and the throughput figures measured between two log steps."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

import jax
from absl import logging

from w2v2_jax import storage
from w2v2_jax.models import flops
from w2v2_jax.train import events, reference

SHARE = "share/"  # a mixture's source shares among the metrics; TensorBoard: data/share/NAME


class Meter:
  """Audio seconds, FLOPs and input wait since the last log step -> throughput, MFU and goodput; with a
  mixture as `data`, each source's share of the interval's rows (`share/NAME`)."""

  def __init__(self, model_cfg, kind: str, batch_size: int, data=None):
    self.model_cfg, self.kind, self.batch_size, self.data = model_cfg, kind, batch_size, data
    peak, source = flops.peak_flops(jax.local_devices()[0], model_cfg.dtype)
    self.peak = peak * jax.device_count()
    if jax.process_index() == 0:
      logging.info("MFU is against %.3g FLOP/s for %d devices (%s)", self.peak, jax.device_count(), source)
    self._reset()

  def _reset(self):
    self.since, self.audio_samples, self.steps, self.flops, self.input_s = time.time(), 0.0, 0, 0.0, 0.0

  @contextlib.contextmanager
  def waiting_for_input(self):
    """Times the host blocked on the next batch: near all of the time, a data-starved run."""
    start = time.perf_counter()
    yield
    self.input_s += time.perf_counter() - start

  def add(self, batch, metrics) -> None:
    self.audio_samples += metrics["audio_samples"]  # device scalar; summed without a host sync
    self.flops += flops.train_flops(self.model_cfg, batch["audio"].shape[1], self.batch_size, self.kind)
    self.steps += 1

  def summary(self, metrics) -> dict:
    """The step's metrics (host floats) with the interval's throughput figures; starts a new interval."""
    elapsed = time.time() - self.since
    out = {k: float(v) for k, v in metrics.items() if k != "audio_samples"}
    out.update(
      audio_seconds_per_second=float(self.audio_samples) / 16000 / elapsed,
      step_time=elapsed / self.steps,
      mfu=self.flops / elapsed / self.peak,
      input_wait=self.input_s / elapsed,
    )
    if self.data is not None:  # each step took one batch: the interval's are the last `steps` the input gave
      position = self.data.position
      out.update({f"{SHARE}{name}": v for name, v in self.data.shares(position - self.steps, position).items()})
    self._reset()
    return out


class Reporter:
  """One run's outputs of figures. Process 0 writes them; every process logs its console lines."""

  def __init__(self, config, task, workdir: str, on_log=None):
    # clu imports TensorFlow: made once the loop starts, after the run's background import of it
    from clu import periodic_actions  # pylint: disable=import-outside-toplevel

    self.config, self.task, self.workdir, self.on_log = config, task, workdir, on_log
    self.is_main = jax.process_index() == 0
    self.writer = events.EventWriter(storage.join(workdir, "tensorboard")) if self.is_main else None
    self.progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_train_steps, writer=self.writer, every_steps=config.log_every_steps, every_secs=None
    )
    self.health = task.health_monitor()
    self.reference = reference.Check(reference.curves(config))
    self.stop_on_collapse = bool(config.get("health", {}).get("stop_on_collapse", False))
    self.actions = [self.progress]
    self._profile_dir, self._profile = None, None
    t = config.train
    if self.is_main and t.get("profile_steps", 0) > 0:
      # The profiler writes local files; a bucket workdir gets them uploaded when the run ends.
      remote = storage.is_url(workdir)
      self._profile_dir = tempfile.mkdtemp(prefix="w2v2_profile_") if remote else storage.join(workdir, "profile")
      self._profile = periodic_actions.Profile(
        logdir=self._profile_dir,
        num_profile_steps=t.profile_steps,
        profile_duration_ms=None,
        first_profile=t.profile_first_step,
        every_secs=t.profile_every_secs or None,
      )
      self.actions.append(self._profile)

  def after_step(self, step: int) -> None:
    for action in self.actions:
      action(step)

  def timed(self, name: str):
    """A part of the loop whose share of the wall time the progress report shows."""
    return self.progress.timed(name, wait_jax_async_dispatch=False)

  def train(self, step: int, m: dict) -> bool:
    """Logs one training log step and checks the run's health; True: stop (a collapse, with
    config.health.stop_on_collapse). Every process decides alike: the metrics are global."""
    eta = (self.config.num_train_steps - step) * m["step_time"]
    shares = {k: v for k, v in m.items() if k.startswith(SHARE)}
    logging.info(
      "step %d/%d loss %.3f %s lr %.2e gnorm %.2f skipped %d | %.1f audio-s/s %.2f s/step MFU %.1f%% "
      "input wait %.0f%% ETA %s%s",
      step,
      self.config.num_train_steps,
      m["loss"],
      self.task.train_line(m),
      m["lr"],
      m["grad_norm"],
      int(m["skipped_total"]),
      m["audio_seconds_per_second"],
      m["step_time"],
      100 * m["mfu"],
      100 * m["input_wait"],
      time.strftime("%H:%M:%S", time.gmtime(eta)),
      " | share " + " ".join(f"{k[len(SHARE) :]} {v:.1%}" for k, v in shares.items()) if shares else "",
    )
    if self.writer and shares:
      self.writer.write_scalars(step, {f"data/{k}": v for k, v in shares.items()})
    self._write("train", step, {k: v for k, v in m.items() if k not in shares})
    self._compare("train", step, m)
    scalars, alarms = self.health.update(step, m)
    for line in alarms:
      logging.warning("%s", line)
    if self.writer:
      self.writer.write_scalars(step, scalars)
    return self.stop_on_collapse and self.health.collapsed(scalars)

  def eval(self, step: int, ev: dict) -> None:
    if not ev:
      return
    per_source = " ".join(f"{k[: -len('/loss')]} {v:.3f}" for k, v in ev.items() if k.endswith("/loss"))
    by_source = f" | loss {per_source}" if per_source else ""
    logging.info("step %d valid loss %.3f %s%s", step, ev["loss"], self.task.eval_line(ev), by_source)
    if self.is_main:
      record_eval(self.workdir, {"step": step, "split": self.config.data.valid_split, **ev})
    self._write("valid", step, ev)
    self._compare("valid", step, ev)

  def _compare(self, prefix: str, step: int, scalars: dict) -> None:
    line = self.reference.update(step, {f"{prefix}/{k}": v for k, v in scalars.items()})
    if line and self.is_main:  # the metrics are global: one process says it
      logging.warning("%s", line)

  def _write(self, prefix: str, step: int, scalars: dict) -> None:
    if self.writer:
      self.writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in scalars.items()})
      self.writer.flush()
    if self.on_log is not None and self.is_main:
      self.on_log(step, {(f"valid_{k}" if prefix == "valid" else k): v for k, v in scalars.items()})

  def close(self) -> None:
    if self._profile is not None and self._profile._session_running:  # pylint: disable=protected-access
      jax.profiler.stop_trace()  # a run that ended inside its profile
    if self._profile_dir is not None and storage.is_url(self.workdir):
      for root, _, names in os.walk(self._profile_dir):
        for name in names:
          local = os.path.join(root, name)
          relative = os.path.relpath(local, self._profile_dir).replace(os.sep, "/")
          storage.upload(local, storage.join(self.workdir, "profile", relative))
    if self.writer:
      self.writer.close()  # a bucket: the last events' upload


def record_eval(workdir: str, entry: dict) -> None:
  """Adds one evaluation's line to WORKDIR/eval_results.json (JSON lines). The file is rewritten whole,
  never appended to: an object in a bucket cannot be, and a reader sees the old file or the new one."""
  path = storage.join(workdir, "eval_results.json")
  before = storage.read_text(path) if storage.exists(path) else ""
  storage.write_text(path, before + json.dumps(entry) + "\n")
