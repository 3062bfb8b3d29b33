"""The data code at LibriLight scale: 10M utterances in 20,000 shards, one host of a 64-host job.

  python benchmarks/data_scale.py [--data_dir=/tmp/w2v2-data-scale] [--utterances=10000000] [--shards=20000]
      [--hosts=64 --rows_per_host=8 --host=0] [--steps=2000 --epochs=4] [--max_sample_size=250000]
      [--bucketing=geometric]

Writes synthetic shard indexes (no audio: empty .tfrecord files next to JSON indexes in write_shard's
format, 20 s chunks with some spread; kept for the next run), then times prepare's merge (the split
index alone, then report and index) and, each in a fresh process so that its peak memory is its own, one host's
training input: start-up until the first batch is planned (host 0 also describes the plan, as training
logs it), peak resident memory, and the host work per step (local_plan + state) within an epoch and at
epoch boundaries (the next epoch's whole plan), amortized over the epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

TARGETS = {"startup_s": 60.0, "peak_gib": 2.0, "step_ms": 2.0}


def synthesize(data_dir: str, utterances: int, shards: int, seed: int = 0) -> None:
  """Shard indexes as write_shard writes them (LibriLight chunks of ~20 s), and an empty file per shard."""
  from w2v2_jax.data import records  # pylint: disable=import-outside-toplevel

  os.makedirs(data_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  bounds = np.linspace(0, utterances, shards + 1).astype(np.int64)
  for s in range(shards):
    n = int(bounds[s + 1] - bounds[s])
    seconds = np.clip(rng.normal(20.0, 4.0, n), 1.0, 30.0)  # max_seconds=30 chunks, most near 20 s
    seconds[rng.random(n) < 0.1] *= rng.random()  # a file's last chunk is shorter
    lengths = np.maximum((seconds * 16000).astype(np.int64), 16000)
    sizes = 2 * lengths + 12 + 80 + 4  # framing, the Example's other fields, trailing CRC
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) + 12 + 60
    speaker = f"{s % 7000}"
    ids = [f"large/{speaker}/book_{s:05d}/chapter_{k // 40:02d}_librivox_64kb_mp3#{k % 40:03d}" for k in range(n)]
    path = os.path.join(data_dir, records.shard_name("train", s))
    open(path, "wb").close()
    index = {
      "split": "train",
      "seen": n,
      "written": n,
      "skipped": [],
      "items_sha": f"{s:016x}",
      "file": os.path.basename(path),
      "ids": ids,
      "num_samples": lengths.tolist(),
      "audio_offsets": offsets.tolist(),
      "speakers": [speaker] * n,
      "labeled": [False] * n,
      "transcripts": [""] * n,
    }
    with open(records.index_path(path), "w") as f:
      json.dump(index, f)


def peak_memory() -> dict:
  status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
  return {
    "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "vmhwm_gib": int(status["VmHWM"].split()[0]) / 2**20,
  }


def child_index(args) -> dict:
  from w2v2_jax.data import records  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  path = records.write_split_index(args.data_dir, "train")
  return {"seconds": time.perf_counter() - start, "index_mib": os.path.getsize(path) / 2**20, **peak_memory()}


def child_merge(args) -> dict:
  """All of w2v2-prepare --merge but the check against the input: report.json and the split index."""
  from w2v2_jax.data import writer  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  writer.merge(args.data_dir)
  return {"seconds": time.perf_counter() - start, **peak_memory()}


def child_input(args) -> dict:
  start = time.perf_counter()
  from w2v2_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  imported = time.perf_counter()
  cfg = pipeline.InputConfig(
    args.data_dir,
    "train",
    global_batch=args.hosts * args.rows_per_host,
    max_sample_size=args.max_sample_size,
    bucketing=args.bucketing,
  )
  host = args.host
  rows = (host * args.rows_per_host, (host + 1) * args.rows_per_host)
  data = pipeline.AudioInput(cfg, rows=rows)
  constructed = time.perf_counter()
  if host == 0:  # as train.loop.open_input: process 0 logs the buckets and the waste of epoch 0
    data.batches.describe()
  described = time.perf_counter()
  data.local_plan(0)
  data.state()
  ready = time.perf_counter()
  at_start = peak_memory()
  per_epoch = data.batches_per_epoch
  times = []
  for position in range(1, min(args.steps, per_epoch - 1) + 1):
    t = time.perf_counter()
    data.local_plan(position)
    data.state()
    times.append(time.perf_counter() - t)
  boundaries = []
  for epoch in range(1, args.epochs + 1):  # the first batch of each epoch: its whole plan
    t = time.perf_counter()
    data.local_plan(epoch * per_epoch)
    data.state()
    boundaries.append(time.perf_counter() - t)
  boundary = max(boundaries)
  times = np.asarray(times) * 1e3
  return {
    "import_s": imported - start,
    "construct_s": constructed - imported,
    "describe_s": described - constructed,
    "first_plan_s": ready - described,
    "startup_s": ready - imported,
    "startup_peak_gib": at_start["vmhwm_gib"],
    "utterances": len(data.index.num_samples),
    "batches_per_epoch": per_epoch,
    "buckets": data.batches.buckets.tolist(),
    "global_batch": cfg.global_batch,
    "rows": list(rows),
    "steps": len(times),
    "step_ms_median": float(np.median(times)),
    "step_ms_p99": float(np.percentile(times, 99)),
    "step_ms_max": float(times.max()),
    "epoch_boundary_s": boundary,
    "epoch_boundary_amortized_ms": boundary * 1e3 / per_epoch,
    **peak_memory(),
  }


def run_child(what: str, argv: list[str]) -> dict:
  out = subprocess.run(
    [sys.executable, os.path.abspath(__file__), f"--child={what}", *argv], check=True, capture_output=True, text=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/w2v2-data-scale")
  parser.add_argument("--utterances", type=int, default=10_000_000)
  parser.add_argument("--shards", type=int, default=20_000)
  parser.add_argument("--hosts", type=int, default=64)
  parser.add_argument("--rows_per_host", type=int, default=8)
  parser.add_argument("--host", type=int, default=0, help="this host's index (0 also describes the plan)")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--epochs", type=int, default=4, help="epoch boundaries to time (3 plans stay cached)")
  parser.add_argument("--max_sample_size", type=int, default=250_000)
  parser.add_argument("--bucketing", default="geometric")
  parser.add_argument("--regenerate", action="store_true", help="rewrite the synthetic shard indexes")
  parser.add_argument("--json", default=None, help="also write the figures here")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps({"index": child_index, "merge": child_merge, "input": child_input}[args.child](args)))
    return
  argv = [a for a in sys.argv[1:] if a != "--regenerate" and not a.startswith("--json")]
  marker = os.path.join(args.data_dir, "synthetic.json")
  shape = {"utterances": args.utterances, "shards": args.shards}
  if args.regenerate or not os.path.exists(marker) or json.load(open(marker)) != shape:
    start = time.perf_counter()
    synthesize(args.data_dir, args.utterances, args.shards)
    with open(marker, "w") as f:
      json.dump(shape, f)
    print(
      f"synthesized {args.utterances:,} utterance indexes in {args.shards:,} shards: "
      f"{time.perf_counter() - start:.0f} s",
      flush=True,
    )
  index = run_child("index", argv)
  merge = run_child("merge", argv)
  data = run_child("input", argv)
  figures = {"index": index, "merge": merge, "input": data}
  print(
    f"{data['utterances']:,} utterances in {args.shards:,} shards; host {args.host} of {args.hosts}: "
    f"rows {data['rows']} of a global batch of {data['global_batch']}, {data['batches_per_epoch']:,} batches "
    f"per epoch, buckets {data['buckets']}"
  )
  table = [
    (
      "merge: write_split_index",
      f"{index['seconds']:.1f} s",
      f"peak {index['vmhwm_gib']:.2f} GiB, index {index['index_mib']:.0f} MiB",
    ),
    ("merge: all (report + index)", f"{merge['seconds']:.1f} s", f"peak {merge['vmhwm_gib']:.2f} GiB"),
    ("input: import", f"{data['import_s']:.2f} s", ""),
    (
      "input: start-up to first plan",
      f"{data['startup_s']:.2f} s",
      f"construct {data['construct_s']:.2f} s + describe {data['describe_s']:.2f} s + local_plan(0) and "
      f"state() {data['first_plan_s']:.2f} s "
      f"(target <= {TARGETS['startup_s']:.0f} s)",
    ),
    (
      "input: peak resident memory",
      f"{data['vmhwm_gib']:.2f} GiB",
      f"ru_maxrss {data['ru_maxrss_gib']:.2f} GiB, at start-up {data['startup_peak_gib']:.2f} GiB "
      f"(target <= {TARGETS['peak_gib']:.0f} GiB)",
    ),
    (
      "input: per step (median / p99)",
      f"{data['step_ms_median']:.3f} / {data['step_ms_p99']:.3f} ms",
      f"local_plan + state over {data['steps']} steps, max {data['step_ms_max']:.2f} ms "
      f"(target <= {TARGETS['step_ms']:.0f} ms)",
    ),
    (
      "input: epoch boundary (max)",
      f"{data['epoch_boundary_s']:.2f} s",
      f"over {args.epochs} boundaries; {data['epoch_boundary_amortized_ms']:.3f} ms per step amortized",
    ),
  ]
  for name, value, note in table:
    print(f"{name:<32} {value:>18}  {note}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  main()
