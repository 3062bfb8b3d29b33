"""Orbax checkpoints: the one module that speaks Orbax.

Workdir layout: WORKDIR/checkpoints/<step>/{state, data, config, metadata}; `state` is a pytree holding
at least {"params": ...}, `data` the input's position, `config` the model config (and, for runs, the
experiment config and a CTC vocabulary) as JSON.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from w2v2_jax import storage
from w2v2_jax.models import layer_stack
from w2v2_jax.models.config import ModelConfig

CHECKPOINTS = "checkpoints"


def manager(workdir: str, every: int = 1, keep: int | None = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """WORKDIR/checkpoints: a save every `every` steps (or forced), the last `keep` kept, preemption-aware."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, save_interval_steps=every, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(
    storage.absolute(storage.join(workdir, CHECKPOINTS)),
    options=options,
    item_names=("state", "data", "config", "metadata"),
  )


def save(
  mgr: ocp.CheckpointManager,
  step: int,
  state: Any,
  model_cfg: ModelConfig,
  kind: str = "pretraining",
  experiment: dict | None = None,
  data_state: dict | None = None,
  metadata: dict | None = None,
  extras: dict | None = None,
  force: bool = False,
) -> bool:
  """Train state (at least {"params"}) + data-iterator state + configs, and the task's `extras` (CTC:
  its "vocab"); `force` saves off the interval (end, preemption, an import)."""
  config = {"model": model_cfg.to_dict(), "kind": kind, "experiment": experiment or {}, **(extras or {})}
  return mgr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state or {}),
      config=ocp.args.JsonSave(config),
      metadata=ocp.args.JsonSave(metadata or {}),
    ),
    force=force,
  )


def save_params(workdir: str, params: Any, model_cfg: ModelConfig, kind: str, step: int = 0) -> str:
  """Write a params-only checkpoint into WORKDIR/checkpoints/<step> (imports, tests)."""
  mgr = manager(workdir, async_save=False)
  save(mgr, step, {"params": params}, model_cfg, kind, force=True)
  mgr.wait_until_finished()
  mgr.close()
  return storage.join(workdir, CHECKPOINTS, str(step))


def is_step_dir(path: str) -> bool:
  """A step folder whose save completed (an interrupted one lacks its items, or is a temporary name)."""
  if not storage.is_url(path):
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "config"))
  names = set(storage.listdir(path)) if storage.isdir(path) else set()
  # Object stores have no atomic rename: Orbax marks a finished step with commit_success.txt instead
  return {"state", "config", "commit_success.txt"} <= names


def resolve_step_dir(path: str) -> str | None:
  """A workdir, its checkpoints/ folder, or one step folder -> the latest complete step folder (or None)."""
  if is_step_dir(path):
    return path
  for root in (storage.join(path, CHECKPOINTS), path):
    if not storage.isdir(root):
      continue
    steps = sorted((int(d) for d in storage.listdir(root) if d.isdigit()), reverse=True)
    for step in steps:
      if is_step_dir(storage.join(root, str(step))):
        return storage.join(root, str(step))
  return None


def _this_process_only() -> ocp.options.MultiprocessingOptions:
  """Reads by one process alone (one device's copy): no barrier that the other processes would have to join."""
  import jax  # pylint: disable=import-outside-toplevel

  i = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=i, active_processes={i}, barrier_sync_key_prefix=f"p{i}")


def load_config(step_dir: str) -> dict:
  """A step folder's config item: {"model", "kind", "experiment"[, "vocab"]}, without the weights."""
  return ocp.Checkpointer(ocp.JsonCheckpointHandler(), multiprocessing_options=_this_process_only()).restore(
    storage.join(storage.absolute(step_dir), "config")
  )


def load_params(step_dir: str) -> tuple[ModelConfig, Any, str, dict]:
  """Restore only what inference needs: (model config, params as numpy, kind, experiment config).

  Works whatever topology wrote the checkpoint (a pod, several hosts): the saved shapes are read
  from its metadata and restored onto this process's first device, by this process alone.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  step_dir = storage.absolute(step_dir)
  ckptr = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), _saved_tree(step_dir))
  state = ckptr.restore(storage.join(step_dir, "state"), target)
  config = load_config(step_dir)
  params = jax.tree.map(np.asarray, state["params"])
  experiment = dict(config["experiment"], **({"vocab": config["vocab"]} if "vocab" in config else {}))
  return ModelConfig.from_dict(config["model"]), params, config["kind"], experiment


def _saved_tree(step_dir: str) -> Any:
  """The shapes and dtypes of a step folder's state, read from its metadata by this process alone."""
  ckptr = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
  meta = ckptr.metadata(storage.join(step_dir, "state"))
  tree = getattr(meta, "item_metadata", meta)
  return getattr(tree, "tree", tree)


def restore_run(mgr: ocp.CheckpointManager, abstract_state: Any) -> tuple[int, Any, dict] | None:
  """Latest complete checkpoint restored onto `abstract_state`'s shardings (any topology), or None.

  A checkpoint whose encoder layers are in the other form (stacked by model.scan_layers, or per layer)
  is read in its own form and converted, optimizer state included.
  """
  import jax  # pylint: disable=import-outside-toplevel

  step = mgr.latest_step()
  if step is None:
    return None
  wanted = layer_stack.is_scanned(abstract_state)
  saved = layer_stack.is_scanned(_saved_tree(storage.join(str(mgr.directory), str(step))))
  target = abstract_state if saved is None or saved == wanted else layer_stack.to_form(abstract_state, saved)
  restored = mgr.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
  )
  state = restored["state"]
  if target is not abstract_state:
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    state = jax.jit(lambda s: layer_stack.to_form(s, wanted), out_shardings=shardings)(state)
  return step, state, restored["data"]
