"""Our train step against HF Flax (4.46.3) and HF PyTorch, side by side, one machine.

  python benchmarks/bench_peers.py [--batch=4] [--seconds=4] [--rounds=5] [--warmup_rounds=1]
      [--peers=hf_flax,hf_torch] [--json=OUT]
      [--venv=~/.cache/w2v2_jax/peers-venv]

All three train the same stable-layer-norm BASE (the one architecture HF Flax pre-trains) on the
same batch shape in fp32, with equal dropouts and no LayerDrop; each full step is forward,
contrastive + diversity loss, backward and an AdamW update. The peers run in a venv this command
builds once (transformers 4.46.3, torch 2.13.0 CPU, and our own jax/flax/optax versions, so the
two JAX stacks share one XLA), each in its own process, waiting on stdin between steps. After
one warm-up step each and --warmup_rounds untimed rounds, the rounds alternate ours, HF Flax, HF
PyTorch, so machine noise falls on all three alike. All three run under the same host allocator:
whatever the environment sets (launch/cpu_glibc.sh, launch/cpu_jemalloc.sh, or glibc's defaults).
Prints each median, audio-s/s, MFU (same analytic FLOPs for all) and our ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from importlib import metadata

from absl import app, flags, logging

from w2v2_jax.cli.common import one_line_errors, split_list, write_json

FLAGS = flags.FLAGS
PEERS = ("hf_flax", "hf_torch")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers_worker.py")


def define_flags():
  flags.DEFINE_string("preset", "base", "Model preset, made stable-layer-norm (base; tiny for a quick check).")
  flags.DEFINE_integer("batch", 4, "Utterances per step.")
  flags.DEFINE_float("seconds", 4.0, "Crop length in seconds (16 kHz).")
  flags.DEFINE_integer("rounds", 5, "Timed steps per framework, alternating.")
  flags.DEFINE_integer(
    "warmup_rounds",
    1,
    "Untimed alternating rounds once every peer is up (the first steps "
    "after the peers start and allocate run slow here).",
  )
  flags.DEFINE_string("peers", ",".join(PEERS), "Comma-separated peers to run: hf_flax, hf_torch.")
  flags.DEFINE_string(
    "venv",
    os.path.join(os.path.expanduser("~"), ".cache", "w2v2_jax", "peers-venv"),
    "Where the peers' virtual environment is built (once) and reused.",
  )
  flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def peer_requirements() -> list[str]:
  """The peers' pins: transformers with Flax wav2vec 2.0, the CPU torch, and our JAX stack."""
  ours = [f"{name}=={metadata.version(name)}" for name in ("jax", "jaxlib", "flax", "optax")]
  return ["transformers==4.46.3", "torch==2.13.0", *ours]


def ensure_venv(path: str) -> str:
  """Builds (or reuses) the peers' venv; returns its python."""
  python = os.path.join(path, "bin", "python")
  marker = os.path.join(path, "w2v2_jax_peers.json")
  wanted = peer_requirements()
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == wanted:
        return python
  logging.info("building the peers' venv in %s: %s (once; a few minutes)", path, " ".join(wanted))
  subprocess.run([sys.executable, "-m", "venv", path], check=True)
  subprocess.run([python, "-m", "pip", "install", "--quiet", *wanted], check=True)
  with open(marker, "w") as f:
    json.dump(wanted, f)
  return python


def benchmark_config(batch: int, preset: str = "base"):
  """Stable-layer-norm BASE as a w2v2-train config, with the dropouts the peers get too."""
  from w2v2_jax.train.defaults import pretraining_config  # pylint: disable=import-outside-toplevel

  c = pretraining_config(preset)
  c.batch_size = batch
  c.data.min_sample_size = 16_000
  c.model.update(
    do_stable_layer_norm=True,
    feat_extract_norm="layer",
    conv_bias=True,
    feature_grad_mult=1.0,
    layerdrop=0.0,
    hidden_dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    feat_proj_dropout=0.1,
    feat_quantizer_dropout=0.1,
    dtype="float32",
    remat_policy="none",
  )
  c.objective.feature_penalty_weight = 0.0  # HF computes none
  c.mesh.fsdp = -1
  return c


def hf_fields(config) -> dict:
  """The same model and objective as transformers' Wav2Vec2Config fields."""
  from w2v2_jax.interop.hf import config_to_hf  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train.pretrain import PretrainingTask  # pylint: disable=import-outside-toplevel

  task = PretrainingTask(config)
  fields = config_to_hf(task.model_config, "pretraining")
  obj = task.objective
  fields.update(
    mask_time_prob=obj.mask_prob,
    mask_time_length=obj.mask_length,
    num_negatives=obj.num_negatives,
    contrastive_logits_temperature=obj.logit_temp,
    diversity_loss_weight=obj.diversity_weight,
  )
  fields.pop("architectures", None)
  return fields


class Peer:
  """A worker process holding one peer's compiled step; .step() times one step there."""

  def __init__(self, python: str, name: str, fields: dict, batch: int, samples: int):
    self.name = name
    self.proc = subprocess.Popen(
      [
        python,
        WORKER,
        f"--framework={name}",
        f"--config={json.dumps(fields)}",
        f"--batch={batch}",
        f"--samples={samples}",
      ],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    self.info = self._read("ready ")

  def _read(self, prefix=""):
    line = self.proc.stdout.readline()
    while line and not line.startswith(prefix or "{"):
      line = self.proc.stdout.readline()  # skip library chatter on stdout
    if not line:
      raise RuntimeError(f"peer {self.name} exited (rc {self.proc.wait()}); its stderr is above")
    return json.loads(line[len(prefix) :])

  def step(self) -> float:
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    return self._read()["seconds"]

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def _timed(call) -> float:
  t = time.perf_counter()
  call()
  return time.perf_counter() - t


@one_line_errors("bench_peers.py")
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  import jax  # pylint: disable=import-outside-toplevel

  from w2v2_jax.cli.bench import OurStep  # pylint: disable=import-outside-toplevel
  from w2v2_jax.models import flops  # pylint: disable=import-outside-toplevel

  peers = split_list(FLAGS.peers)
  unknown = sorted(set(peers) - set(PEERS))
  if unknown:
    raise ValueError(f"--peers: unknown {unknown}; choose from {list(PEERS)}")
  batch, samples = FLAGS.batch, int(FLAGS.seconds * 16000)
  config = benchmark_config(batch, FLAGS.preset)
  peak, peak_source = flops.peak_flops(jax.devices()[0], "float32")  # first, on an idle machine
  python = ensure_venv(FLAGS.venv) if peers else None

  logging.info("compiling our step (stable-LN %s, batch %d x %.2f s, fp32)", FLAGS.preset, batch, FLAGS.seconds)
  ours = OurStep(config, batch, samples)
  ours.train()  # warm-up
  running = {}
  try:
    for name in peers:
      logging.info("starting %s (builds, compiles, warms up)", name)
      running[name] = Peer(python, name, hf_fields(config), batch, samples)
    for r in range(FLAGS.warmup_rounds):
      logging.info(
        "warm-up round %d/%d: %s",
        r + 1,
        FLAGS.warmup_rounds,
        " ".join([f"w2v2_jax {_timed(ours.train):.2f} s"] + [f"{n} {p.step():.2f} s" for n, p in running.items()]),
      )
    times = {"w2v2_jax": [], **{name: [] for name in peers}}
    start = time.time()
    for r in range(FLAGS.rounds):
      times["w2v2_jax"].append(_timed(ours.train))
      for name, peer in running.items():
        times[name].append(peer.step())
      done = r + 1
      eta = (time.time() - start) / done * (FLAGS.rounds - done)
      logging.info(
        "round %d/%d: %s | ETA %.0f s",
        done,
        FLAGS.rounds,
        " ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
        eta,
      )
  finally:
    for peer in running.values():
      peer.close()

  seconds = samples / 16000
  train_flops = flops.train_flops(ours.cfg, samples, batch)
  peak *= len(ours.mesh.devices.flat)
  results = {}
  for name, ts in times.items():
    med = statistics.median(ts)
    results[name] = {
      "step_s_median": round(med, 4),
      "step_s_all": [round(t, 4) for t in ts],
      "audio_s_per_s": round(batch * seconds / med, 3),
      "mfu": round(train_flops / med / peak, 4),
    }
  results["w2v2_jax"]["compile_s"] = round(ours.compile_s, 1)
  for name, peer in running.items():
    results[name].update({k: v for k, v in peer.info.items() if k in ("compile_s", "version", "threads")})
    results[name]["speedup_of_w2v2_jax"] = round(
      results[name]["step_s_median"] / results["w2v2_jax"]["step_s_median"], 3
    )
  figures = {
    "model": f"{FLAGS.preset}, stable layer norm, fp32",
    "batch": batch,
    "seconds": seconds,
    "device": str(jax.devices()[0].device_kind),
    "analytic_gflop_per_step": round(train_flops / 1e9, 1),
    "peak_tflops": round(peak / 1e12, 3),
    "peak_source": peak_source,
    "rounds": FLAGS.rounds,
    "warmup_rounds": FLAGS.warmup_rounds,
    "results": results,
  }
  print(f"{'':10s} {'step s':>8s} {'audio-s/s':>10s} {'MFU':>6s} {'w2v2_jax is':>12s}")
  for name, r in results.items():
    ratio = f"{r['speedup_of_w2v2_jax']:.2f}x faster" if "speedup_of_w2v2_jax" in r else ""
    print(f"{name:10s} {r['step_s_median']:8.3f} {r['audio_s_per_s']:10.3f} {100 * r['mfu']:5.1f}% {ratio:>12s}")
  write_json(FLAGS.json, figures)


def run():
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
