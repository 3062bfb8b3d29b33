"""w2v2-train on several processes (2 x 4 CPU devices, gloo on localhost): the end of a run, preemption,
a lost process, and resuming on another process layout."""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import conftest
import jax
import numpy as np
import pytest

from w2v2_jax.train import checkpointing

pytestmark = pytest.mark.slow

STEPS = 8
HOST_TIMEOUT = 10  # seconds; --host_timeout in these tests
QUICK = ("--plots=false", "--config.data.valid_split=none")  # runs other than the reference: no plots, no eval


class _Run:
  """One w2v2-train command on `processes` x `devices` CPU devices, its output read as it comes.

  `when(text, action)`: once `text` appears in process 0's output, `action(run)` (e.g. a signal).
  Several processes scan their layers, as the pod recipes do; one process loops them, so a run that
  moves between the two also resumes across the two parameter forms.
  """

  def __init__(self, data, workdir, steps=STEPS, processes=2, devices=None, extra=()):
    devices = devices or 8 // processes
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    cmd = [
      sys.executable,
      "-m",
      "w2v2_jax.cli.train",
      f"--config={os.path.join(os.path.dirname(__file__), 'train_config.py')}:{data},{steps}",
      f"--workdir={workdir}",
      "--config.checkpoint_every_steps=3",
      f"--config.optim.total_steps={STEPS}",
      f"--host_timeout={HOST_TIMEOUT}",
      f"--config.model.scan_layers={processes > 1}",
      *extra,
    ]
    env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": os.path.dirname(__file__),
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {conftest.FAST_COMPILE}",
      # every program into the session's cache, even the many small ones of a checkpoint save: each
      # run compiles them again otherwise, a quarter of its CPU time
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    if processes > 1:
      cmds = [
        cmd + [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
        for i in range(processes)
      ]
    else:
      cmds = [cmd]
    self.procs = [
      subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds
    ]
    self.lines = [[] for _ in self.procs]
    self.exited = [None] * len(self.procs)  # time.monotonic() at each process's exit
    self._triggers = []
    self._readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(len(self.procs))]
    for t in self._readers:
      t.start()

  def _read(self, i):
    for line in self.procs[i].stdout:
      self.lines[i].append(line)
      if i == 0:
        for trigger in list(self._triggers):
          if trigger[0] in line:
            self._triggers.remove(trigger)
            trigger[1](self)
    self.procs[i].wait()
    self.exited[i] = time.monotonic()

  def when(self, text, action):
    self._triggers.append((text, action))
    return self

  def wait(self, timeout=300):
    deadline = time.monotonic() + timeout
    for p, t in zip(self.procs, self._readers):
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        for q in self.procs:
          q.kill()
        raise AssertionError("the run did not end by itself:\n" + self.tails()) from None
      t.join(timeout=30)
    return [p.returncode for p in self.procs]

  def output(self, i=0):
    return "".join(self.lines[i])

  def tails(self, n=3000):
    return "\n".join(f"--- process {i}:\n{self.output(i)[-n:]}" for i in range(len(self.procs)))

  def saved_steps(self):
    """The step each process logged as saved on preemption."""
    return [
      int(line.split("saved step ")[1].split(";")[0])
      for lines in self.lines
      for line in lines
      if "preempted: saved step" in line
    ]


def _checkpoint(workdir, step=None):
  root = os.path.join(workdir, "checkpoints")
  step = step if step is not None else max(int(d) for d in os.listdir(root) if d.isdigit())
  _, params, _, _ = checkpointing.load_params(os.path.join(root, str(step)))
  with open(os.path.join(root, str(step), "data", "metadata")) as f:
    data = json.load(f)
  return step, params, data


def _assert_params(a, b, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if atol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(speech_like_shards, tmp_path_factory, worker_id):
  """An uninterrupted run on 2 processes x 4 devices, plots on: (workdir, [process 0's output, process 1's]).

  Under pytest-xdist the first worker to need it runs it; the others wait for it and share it.
  """
  root = tmp_path_factory.getbasetemp()
  root = root.parent if worker_id != "master" else root  # the xdist session's folder, shared by its workers
  workdir, outputs = root / "multihost_straight", root / "multihost_straight.json"
  with open(root / "multihost_straight.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not outputs.exists():
      run = _Run(speech_like_shards, str(workdir))
      assert run.wait() == [0, 0], run.tails()
      outputs.write_text(json.dumps([run.output(0), run.output(1)]))
  return str(workdir), json.loads(outputs.read_text())


def test_two_process_run_ends_by_itself_with_its_plots(straight):
  workdir, outputs = straight
  assert f"step {STEPS}/{STEPS}" in outputs[0] and f"step {STEPS}/" not in outputs[1]  # process 0 logs
  for name in ("curves.png", "codebook_usage.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name


def _preempted(data, workdir, targets):
  """A two-process run that gets SIGTERM (to the processes `targets`) once step 2 is logged: both
  processes save the same step and exit 0. Returns that step."""
  run = _Run(data, workdir, extra=QUICK)
  run.when("step 2/", lambda r: [r.procs[i].send_signal(signal.SIGTERM) for i in targets])
  assert run.wait() == [0, 0], run.tails()
  saved = run.saved_steps()
  assert len(saved) == 2 and saved[0] == saved[1] and 2 <= saved[0] < STEPS - 2, run.tails()
  assert _checkpoint(workdir)[0] == saved[0]
  return saved[0]


def test_preempted_processes_save_the_same_step_and_resume_bitwise(speech_like_shards, straight, tmp_path):
  """SIGTERM to both processes; the same command then ends bitwise equal to the uninterrupted run."""
  workdir = str(tmp_path / "preempted")
  stopped = _preempted(speech_like_shards, workdir, (0, 1))
  resumed = _Run(speech_like_shards, workdir, extra=QUICK)
  assert resumed.wait() == [0, 0], resumed.tails()
  assert f"resumed from step {stopped} (data position {stopped})" in resumed.output(0)
  step, params, data = _checkpoint(workdir)
  _, straight_params, straight_data = _checkpoint(straight[0])
  assert step == STEPS and data["position"] == straight_data["position"] == STEPS
  _assert_params(params, straight_params)


def test_one_preempted_process_stops_both_and_the_run_resumes_on_other_layouts(speech_like_shards, straight, tmp_path):
  """SIGTERM to process 1 alone (one preempted VM) stops both at the same step; the run goes on as
  1 process x 8 devices for two steps, then as 2 x 4 again to the end, with the same global batch:
  the data position continues exactly, and the parameters equal the uninterrupted run's within
  float rounding. The one-process run loops the layers that the two-process runs scan."""
  workdir = str(tmp_path / "moved")
  stopped = _preempted(speech_like_shards, workdir, (1,))
  single = _Run(speech_like_shards, workdir, steps=stopped + 2, processes=1, extra=QUICK)
  assert single.wait() == [0], single.tails()
  assert f"resumed from step {stopped} (data position {stopped})" in single.output(0)
  assert _checkpoint(workdir)[2]["position"] == stopped + 2
  assert _checkpoint(workdir)[2]["rows"] == [0, 8]  # saved by the one process that fed every row
  resumed = _Run(speech_like_shards, workdir, extra=QUICK)
  assert resumed.wait() == [0, 0], resumed.tails()
  assert f"resumed from step {stopped + 2} (data position {stopped + 2})" in resumed.output(0)
  step, params, data = _checkpoint(workdir)
  _, straight_params, straight_data = _checkpoint(straight[0])
  assert step == STEPS and data["position"] == straight_data["position"] == STEPS
  assert data["rows"] == [0, 4]  # process 0's half of the batch again
  _assert_params(params, straight_params, atol=1e-5)


def test_a_lost_process_ends_the_others(speech_like_shards, tmp_path):
  """SIGKILL to process 1: process 0 exits non-zero within --host_timeout (and a few seconds), with
  one line naming process 1."""
  killed = {}

  def kill(run):
    run.procs[1].kill()
    killed["at"] = time.monotonic()

  run = _Run(speech_like_shards, str(tmp_path / "lost"), steps=1000, extra=QUICK).when("step 2/", kill)
  codes = run.wait(timeout=120)
  assert codes[1] == -signal.SIGKILL and codes[0] not in (0, None), run.tails()
  waited = run.exited[0] - killed["at"]
  assert waited < HOST_TIMEOUT + 10, f"{waited:.0f} s"
  lines = [l for l in run.lines[0] if "lost process 1 of 2" in l]
  assert len(lines) == 1, run.tails()
