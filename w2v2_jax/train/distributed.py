"""Multi-host set-up: jax.distributed for explicit flags or for the cluster JAX's own detection finds.

`--distributed=auto` asks JAX's cluster environments (Open MPI, SLURM, TPU on GKE, Cloud TPU VM,
Kubernetes), in JAX's order and with JAX's checks, but within a few seconds, and starts
jax.distributed only when the cluster runs more than one process. GPU processes get their share of
the node's GPUs: JAX's own default (one GPU, the local rank's) would leave a lone process per node
with one GPU of eight.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import threading

from absl import logging

PROBE_SECONDS = 5.0  # a Cloud TPU VM's metadata server answers in milliseconds; JAX's own probe retries for minutes
MODES = ("auto", "on", "off")
_LABELS = {
  "ompi": "Open MPI",
  "slurm": "SLURM",
  "gketpu": "TPU on GKE",
  "gcetpu": "Cloud TPU VM",
  "K8sCluster": "Kubernetes",
}
_VISIBLE = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


@dataclasses.dataclass(frozen=True)
class Cluster:
  """A cluster environment JAX can bootstrap from: which one, and how many processes it runs."""

  key: str  # JAX's ClusterEnv name ("slurm", "gcetpu", ...), else its class name
  label: str  # for the log line: "SLURM", "Cloud TPU VM", ...
  num_processes: int | None  # None where asking for it failed
  method: str | None  # jax.distributed.initialize's cluster_detection_method for it


@dataclasses.dataclass(frozen=True)
class _Search:
  cluster: Cluster | None
  timed_out: str | None = None  # the label of the environment whose probe did not answer in time


def _environments() -> list:
  """JAX's cluster environments in its detection order, without the opt-in ones (mpi4py).

  Importing them imports jax first, whose Cloud TPU set-up sets the flag the TPU environments read.
  """
  from jax._src import clusters  # pylint: disable=import-outside-toplevel

  return [
    env
    for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
    if not env.opt_in_only_method
  ]


def _key(env) -> str:
  return env.name or env.__name__


def _search(timeout: float) -> _Search:
  """JAX's detection (first environment present, then its process count), given up after `timeout` s."""
  environments = _environments()  # imports jax (seconds), before the clock starts
  state = {"probing": None, "found": None}

  def probe():
    for env in environments:
      state["probing"] = env
      try:
        present = env.is_env_present()
      except Exception as e:  # pylint: disable=broad-except  # e.g. no metadata server: not this environment
        logging.debug("distributed: %s probe failed: %s: %s", env.__name__, type(e).__name__, e)
        present = False
      if present:
        try:
          count = int(env.get_process_count())
        except Exception as e:  # pylint: disable=broad-except
          logging.warning("distributed: %s found, but not its process count: %s: %s", env.__name__, type(e).__name__, e)
          count = None
        key = _key(env)
        state["found"] = Cluster(key, _LABELS.get(key, key), count, env.name or None)
        return
    state["probing"] = None

  thread = threading.Thread(target=probe, name="w2v2-cluster-probe", daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    env = state["probing"]
    return _Search(None, _LABELS.get(_key(env), _key(env)) if env is not None else "cluster detection")
  return _Search(state["found"])


def detect(timeout: float = PROBE_SECONDS) -> Cluster | None:
  """The cluster JAX's own detection would pick, or None if none answers within `timeout` seconds."""
  return _search(timeout).cluster


def _count_visible(value: str) -> int:
  """Devices named in a *_VISIBLE_DEVICES value ("0,1", "GPU-uuid,...", "" or SLURM's "NoDevFiles": none)."""
  return len([d for d in value.split(",") if d.strip() and d.strip() != "NoDevFiles"])


def _tasks_per_node(spec: str, node: int) -> int | None:
  """Node `node`'s entry of SLURM's "8(x2),4" task counts (one number: every node's), or None."""
  counts = []
  for part in spec.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if m is None:
      return None
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  if len(counts) == 1:
    return counts[0]
  return counts[node] if 0 <= node < len(counts) else None


def _local_layout(key: str, environ) -> tuple[int, int] | None:
  """(local rank, processes on this node) from the cluster's environment, for SLURM and Open MPI."""
  try:
    if key == "slurm":
      rank, node = int(environ["SLURM_LOCALID"]), int(environ.get("SLURM_NODEID", "0"))
      for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        tasks = _tasks_per_node(environ[name], node) if name in environ else None
        if tasks:
          return rank, tasks
      return None
    if key == "ompi":
      return int(environ["OMPI_COMM_WORLD_LOCAL_RANK"]), int(environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
  except (KeyError, ValueError):
    return None
  return None


def local_device_ids(local_rank: int, processes_on_node: int, environ=None) -> list[int] | None:
  """This process's GPUs: all it sees if it is alone on its node or SLURM bound GPUs to tasks, else its share.

  The GPUs are those CUDA/ROCR/HIP_VISIBLE_DEVICES name, else SLURM_GPUS_ON_NODE, else /dev/nvidiaN;
  None where there are none (CPU) and JAX's default stands.
  """
  environ = os.environ if environ is None else environ
  named = next((environ[k] for k in _VISIBLE if k in environ), None)
  on_node = environ.get("SLURM_GPUS_ON_NODE", "")
  if named is not None:
    gpus = _count_visible(named)
  elif on_node.isdigit():
    gpus = int(on_node)
  else:
    gpus = len([p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)])
  if gpus == 0:
    return None
  bound = (
    "SLURM_GPUS_PER_TASK" in environ
    or (named is not None and on_node.isdigit() and gpus < int(on_node))
    or gpus < processes_on_node
  )
  if processes_on_node <= 1 or bound:
    return list(range(gpus))
  if gpus % processes_on_node:
    raise ValueError(
      f"{processes_on_node} processes on this node cannot share {gpus} GPUs evenly "
      "(CUDA_VISIBLE_DEVICES or SLURM_GPUS_ON_NODE); set JAX_LOCAL_DEVICE_IDS for each process"
    )
  share = gpus // processes_on_node
  return list(range(local_rank * share, (local_rank + 1) * share))


def _processes(n: int | None) -> str:
  return "one process" if n == 1 else f"{n} processes" if n else "an unknown number of processes"


def initialize(
  mode: str = "auto",
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  timeout: float = PROBE_SECONDS,
  **options,
) -> str:
  """Starts jax.distributed as --distributed=MODE and the explicit flags ask; logs and returns one line on it.

  Explicit --coordinator/--num_processes/--process_id win (all local devices, no detection);
  `off` starts nothing; `auto` starts it when a cluster with several processes is found; `on` always.
  `options` go to jax.distributed.initialize as they are (e.g. heartbeat_timeout_seconds).
  """
  import jax  # pylint: disable=import-outside-toplevel

  if mode not in MODES:
    raise ValueError(f"--distributed={mode}: expected one of {', '.join(MODES)}")
  if coordinator or num_processes is not None or process_id is not None:
    if mode == "off":
      raise ValueError("--distributed=off contradicts --coordinator/--num_processes/--process_id")
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    missing = [
      f
      for f, v in (("--coordinator", coordinator), ("--num_processes", num_processes), ("--process_id", process_id))
      if v is None
    ]
    if missing:
      raise ValueError(f"--coordinator, --num_processes and --process_id go together; missing {', '.join(missing)}")
    if not re.fullmatch(r".+:\d+", coordinator):
      raise ValueError(f"--coordinator={coordinator}: expected HOST:PORT")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    line = f"distributed: --coordinator={coordinator}, {_processes(num_processes)}, this is process {process_id}"
    logging.info(line)
    jax.distributed.initialize(coordinator, num_processes, process_id, cluster_detection_method="deactivate", **options)
    return line
  if mode == "off":
    line = "distributed: off, one process"
    logging.info(line)
    return line
  search = _search(timeout)
  cluster = search.cluster
  if cluster is None:
    late = f" ({search.timed_out} did not answer in {timeout:g} s)" if search.timed_out else ""
    if mode == "on" and search.timed_out:
      line = f"distributed: on{late}; jax.distributed.initialize detects the cluster itself"
      logging.info(line)
      jax.distributed.initialize(**options)
      return line
    if mode == "on":
      raise ValueError(
        "--distributed=on found no cluster (Open MPI, SLURM, TPU VM/GKE, Kubernetes); "
        "pass --coordinator=HOST:PORT --num_processes=N --process_id=I"
      )
    if "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
      raise ValueError(
        "MEGASCALE_COORDINATOR_ADDRESS is set but no TPU VM was found (libtpu and TPU chips); "
        "unset it or pass --distributed=off"
      )
    line = f"distributed: no cluster found{late}, one process"
    logging.info(line)
    return line
  if mode == "auto" and cluster.num_processes == 1:
    line = f"distributed: {cluster.label}, one process"
    logging.info(line)
    return line
  kwargs = dict(options, **({"cluster_detection_method": cluster.method} if cluster.method else {}))
  layout = _local_layout(cluster.key, os.environ)
  if layout is not None and "JAX_LOCAL_DEVICE_IDS" not in os.environ:
    ids = local_device_ids(*layout)
    if ids is not None:
      kwargs["local_device_ids"] = ids
  line = f"distributed: {cluster.label}, {_processes(cluster.num_processes)}"
  if "local_device_ids" in kwargs:
    line += f", local devices {kwargs['local_device_ids']}"
  logging.info(line)
  jax.distributed.initialize(**kwargs)
  return line


def leave_together(status: int = 0) -> None:
  """Ends this process of a finished multi-process job (nothing with one process): it drops its backends
  (their collectives' sockets), meets the others at jax.distributed's shutdown barrier, and exits with `status` at once.

  Left to the interpreter, a process may still be tearing down after the barrier while process 0 has
  already closed the coordination service, or a peer its sockets; it then aborts (SIGABRT), and a run
  that finished reads as failed to its scheduler.
  """
  import sys  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.extend.backend  # pylint: disable=import-outside-toplevel

  if jax.process_count() == 1:
    return
  logging.flush()
  jax.extend.backend.clear_backends()
  jax.distributed.shutdown()
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  os._exit(status)  # pylint: disable=protected-access
