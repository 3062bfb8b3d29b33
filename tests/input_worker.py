"""Subprocess body for the input tests: `resume` and `distributed` modes (see test_input.py); DATA_DIR is
one data dir or a mixture's `name=dir,...` (at alpha 0.5, as test_input._cfg)."""

import json
import os
import sys


def main():
  mode, data_dir, out = sys.argv[1:4]
  import numpy as np

  from w2v2_jax.data import mixture
  from w2v2_jax.data.pipeline import AudioInput, InputConfig

  mixed = {"sources": mixture.parse_sources(data_dir), "sampling_alpha": 0.5} if "=" in data_dir else {}
  cfg = InputConfig(
    "" if mixed else data_dir,
    "train",
    global_batch=8,
    max_sample_size=24000,
    min_sample_size=8000,
    num_buckets=3,
    seed=5,
    **mixed,
  )
  if mode == "resume":  # argv: first | second
    it = AudioInput(cfg)
    if sys.argv[4] == "first":
      for _ in range(3):
        next(it)
      json.dump(it.state(), open(out + ".state.json", "w"))
    else:
      it.restore(json.load(open(out + ".state.json")))
    batches = [next(it) for _ in range(4)]
    np.savez(out + f".{sys.argv[4]}.npz", **{f"{k}{i}": b[k] for i, b in enumerate(batches) for k in b})
    return
  # distributed: argv: port process_id
  port, pid = int(sys.argv[4]), int(sys.argv[5])
  import jax

  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from w2v2_jax.data.pipeline import local_rows, to_global

  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
  sharding = NamedSharding(mesh, P("data"))
  cfg = InputConfig(**{**cfg.__dict__, "num_epochs": 1})
  it = AudioInput(cfg, rows=local_rows(sharding, cfg.global_batch))
  ids, sums = [], []
  total = jax.jit(lambda a, l: (jnp_sum(a), l.sum()))
  for position, batch in enumerate(it):
    recs, _, _, _ = it.local_plan(position)
    ids.extend(int(r) for r in recs)
    g = to_global(batch, sharding, cfg.global_batch)
    assert g["audio"].shape[0] == cfg.global_batch and g["audio"].dtype == np.int16
    s_audio, s_len = total(g["audio"], g["lengths"])
    sums.append([int(s_audio), int(s_len)])
  json.dump(
    {"ids": ids, "sums": sums, "rows": list(it.rows), "batches": it.batches_per_epoch}, open(out + f".{pid}.json", "w")
  )
  jax.distributed.shutdown()


def jnp_sum(a):
  import jax.numpy as jnp

  return jnp.abs(a.astype(jnp.int32)).sum()


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
