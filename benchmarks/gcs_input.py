"""Input throughput from a bucket: the GCS emulator behind a proxy that adds 20 ms to every request, at
several read concurrencies, against the same shards on local disk.

  python benchmarks/gcs_input.py [--hours=0.3] [--seconds=20] [--concurrency=8,32,64] [--latency_ms=20]

Prints audio-s/s and reads/s per setting, and the concurrency that a latency needs for a target
throughput by Little's law (reads in flight = reads/s x seconds per read).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import gcs_emulator  # noqa: E402  pylint: disable=wrong-import-position


def bench(data_dir: str, env: dict, concurrency: int, seconds: float, out: str) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "w2v2_jax.cli.bench_input",
    "--what=input",
    f"--data_dir={data_dir}",
    f"--read_concurrency={concurrency}",
    f"--seconds={seconds}",
    f"--json={out}",
  ]
  subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
  with open(out) as f:
    return json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hours", type=float, default=0.3)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--concurrency", default="8,32,64")
  parser.add_argument("--latency_ms", type=float, default=20.0)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  from w2v2_jax import storage  # pylint: disable=import-outside-toplevel
  from w2v2_jax.cli import bench_input  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data import records  # pylint: disable=import-outside-toplevel

  rows = []
  with (
    tempfile.TemporaryDirectory() as tmp,
    gcs_emulator.emulator("bkt", threaded=True) as url,
    gcs_emulator.latency_proxy(url, args.latency_ms / 1000) as slow,
  ):
    local = os.path.join(tmp, "shards")
    bench_input.librispeech_like(local, args.hours)
    os.environ.update(gcs_emulator.client_env(url))
    storage.configure_emulator()
    for name in sorted(os.listdir(local)):  # the same shards, uploaded as they are
      storage.upload(os.path.join(local, name), f"gs://bkt/shards/{name}", keep_local=True)
    env = {**os.environ, **gcs_emulator.client_env(slow), "JAX_PLATFORMS": "cpu"}
    figures = bench(local, env, 1, args.seconds, os.path.join(tmp, "local.json"))
    rows.append(("local disk", "-", figures))
    for c in [int(c) for c in args.concurrency.split(",")]:
      rows.append(
        (
          f"gs:// +{args.latency_ms:g} ms",
          c,
          bench("gs://bkt/shards", env, c, args.seconds, os.path.join(tmp, f"gcs{c}.json")),
        )
      )
    num_records = len(records.load_split(local, "train").ids)
  print(f"{num_records} utterances, {args.hours} h; batch 8, crops of 250,000 samples; {os.cpu_count()} CPUs")
  print(f"{'source':<18} {'reads in flight':>15} {'audio-s/s':>10} {'reads/s':>8}")
  for name, c, f in rows:
    print(f"{name:<18} {c!s:>15} {f['audio_seconds_per_second']:>10,.0f} {f['requests_per_second']:>8,.0f}")
  per_read = rows[0][2]["audio_seconds_per_second"] / rows[0][2]["requests_per_second"]
  for latency_ms in (args.latency_ms, 50.0, 100.0):
    needed = 10_000 / per_read * latency_ms / 1000
    print(
      f"Little's law: 10,000 audio-s/s = {10_000 / per_read:,.0f} reads/s of {per_read:.1f} s each; at "
      f"{latency_ms:g} ms per read that is {needed:.0f} reads in flight"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {"rows": [{"source": n, "concurrency": c, **f} for n, c, f in rows], "audio_seconds_per_read": per_read},
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
