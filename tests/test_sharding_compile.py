"""The sharded train and eval steps compile without XLA's "Involuntary full rematerialization".

The SPMD partitioner logs that warning (C++, stderr) when it can only reach an operand's sharding by
replicating it first: on a pod, a silent all-gather of an activation. Each case compiles w2v2-train's
jitted steps in a subprocess, so the log is on a stderr the test can read, and with the compilation
cache off, so that every program is really partitioned.
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

WARNING = "Involuntary full rematerialization"

_PROBE = r"""
import sys
import jax
import jax.numpy as jnp
mesh, task, pinned, names, micro = sys.argv[1:6]
from w2v2_jax import parallel
from w2v2_jax.models import quantizer
from w2v2_jax.train import loop

if pinned == "unpinned":  # the quantizer without its batch constraints: the warning must show
  quantizer.constrain_batch = lambda x: x
if task == "ctc":
  import finetune_config
  c = finetune_config.get_config("unused,4,0")
  c.model.vocab_size = 12
else:
  import train_config
  c = train_config.get_config("unused,4")
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(s) for s in mesh.split(","))
c.train.microbatches = int(micro)
c.optim.total_steps = c.num_train_steps
layout = loop.plan_layout(c)
sh = parallel.batch_sharding(layout.mesh)
rows = c.batch_size
batch = {"audio": jax.ShapeDtypeStruct((rows, 16000), jnp.int16, sharding=sh),
         "lengths": jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sh)}
if task == "ctc":
  batch.update(labels=jax.ShapeDtypeStruct((rows, 20), jnp.int32, sharding=sh),
               label_lengths=jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sh))
key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
step = jax.ShapeDtypeStruct((), jnp.int32)
train_step, eval_step = loop.jit_steps(c, layout)
with jax.set_mesh(layout.mesh):
  steps = {"train": (train_step, (layout.abstract_state, batch, key)),
           "eval": (eval_step, (layout.abstract_state.params, batch, key, step))}
  for name in names.split(","):
    fn, args = steps[name]
    print(f"<<< {name}", file=sys.stderr, flush=True)
    fn.lower(*args).compile()
    print(f">>> {name}", file=sys.stderr, flush=True)
"""


def compile_logs(
  mesh: str, task: str = "pretrain", pinned: bool = True, names=("train", "eval"), microbatches: int = 1
) -> dict:
  """{step name: its stderr} of compiling w2v2-train's steps on a (data, fsdp, tensor) mesh of 8 CPU devices."""
  tests = os.path.dirname(os.path.abspath(__file__))
  env = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "0",
    "JAX_ENABLE_COMPILATION_CACHE": "false",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
  }
  proc = subprocess.run(
    [sys.executable, "-c", _PROBE, mesh, task, "pinned" if pinned else "unpinned", ",".join(names), str(microbatches)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  logs = {}
  for name in names:
    start, end = proc.stderr.index(f"<<< {name}"), proc.stderr.index(f">>> {name}")
    logs[name] = proc.stderr[start:end]
  return logs


def remat_lines(log: str) -> list:
  return [line for line in log.splitlines() if WARNING in line]


# (2, 4, 1): the tests' default; (1, 8, 1): fsdp=-1 over 8 devices, what the demo gets from 2 processes x 4
# devices (the partitioner sees the same program and device count); (2, 2, 2) with tensor; (8, 1, 1) pure data.
@pytest.mark.parametrize("mesh", ["2,4,1", "1,8,1", "2,2,2", "8,1,1"])
def test_pretraining_steps_compile_without_involuntary_remat(mesh):
  logs = compile_logs(mesh)
  assert not remat_lines(logs["train"]) and not remat_lines(logs["eval"]), logs


@pytest.mark.parametrize("task", ["pretrain", "ctc"])
def test_micro_batched_train_step_compiles_without_involuntary_remat(task):
  """Micro-batches (a scan over pieces of the batch) on a mesh with tensor: each piece spans every batch shard."""
  logs = compile_logs("1,4,2", task, names=("train",), microbatches=2)
  assert not remat_lines(logs["train"]), logs


def test_ctc_steps_compile_without_involuntary_remat():
  logs = compile_logs("2,2,2", "ctc")
  assert not remat_lines(logs["train"]) and not remat_lines(logs["eval"]), logs


def test_the_log_shows_the_warning_without_the_quantizer_constraint():
  """The check can fail: without the quantizer's batch constraint the eval step's one-hot is resharded the slow
  way, and the warning reaches the captured log."""
  logs = compile_logs("1,8,1", pinned=False, names=("eval",))
  assert any("quantizer" in line for line in remat_lines(logs["eval"])), logs["eval"][-3000:]
