"""w2v2-extract and w2v2-export end to end, including one-line errors for bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
import torch
from hf_reference import hf_config
from transformers import Wav2Vec2ForPreTraining as HFPreTraining
from transformers import Wav2Vec2Model as HFModel

from w2v2_jax.models import config as presets
from w2v2_jax.models.init import init_params
from w2v2_jax.train import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module, *args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", f"w2v2_jax.cli.{module}", *args], capture_output=True, text=True, env=env, timeout=600
  )


def _one_line_error(result, *words):
  assert result.returncode != 0
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  last = lines[-1]
  assert "Traceback" not in result.stderr, result.stderr
  assert last.startswith(("w2v2-extract: error:", "w2v2-export: error:")), result.stderr
  for w in words:
    assert w in last, last


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  HFPreTraining(hf_config(presets.tiny())).save_pretrained(str(path))
  return str(path)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
  path = tmp_path_factory.mktemp("audio")
  rng = np.random.default_rng(0)
  mono16 = (0.1 * rng.standard_normal(16000)).astype(np.float32)
  sf.write(path / "utt_a.wav", mono16, 16000, subtype="FLOAT")
  stereo = (0.1 * rng.standard_normal((2 * 44100 // 2, 2))).astype(np.float32)
  sf.write(path / "utt_b.flac", stereo, 44100)
  (path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage")
  return {
    "a": str(path / "utt_a.wav"),
    "b": str(path / "utt_b.flac"),
    "broken": str(path / "broken.wav"),
    "mono16": mono16,
  }


@pytest.mark.slow
def test_extract_equals_transformers_last_hidden_state(hf_dir, audio_files, tmp_path):
  out = tmp_path / "feats.npz"
  result = _cli(
    "extract", f"--checkpoint={hf_dir}", f"--audio={audio_files['a']},{audio_files['b']}", f"--output={out}"
  )
  assert result.returncode == 0, result.stderr
  feats = np.load(out)
  assert sorted(feats.files) == ["utt_a", "utt_b"]
  model = HFModel.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    ref = model(torch.tensor(audio_files["mono16"])[None], output_hidden_states=True)
  np.testing.assert_allclose(feats["utt_a"], ref.last_hidden_state[0].numpy(), atol=1e-4, rtol=0)
  assert feats["utt_b"].shape == (presets.tiny().num_frames(16000), presets.tiny().hidden_size)  # 1 s at 44.1k

  result = _cli("extract", f"--checkpoint={hf_dir}", f"--audio={audio_files['a']}", f"--output={out}", "--layer=1")
  assert result.returncode == 0, result.stderr
  np.testing.assert_allclose(np.load(out)["utt_a"], ref.hidden_states[1][0].numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_our_workdir_to_each_transformers_class(audio_files, tmp_path):
  cfg = presets.tiny(stable_layer_norm=True)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
  workdir = tmp_path / "run"
  checkpointing.save_params(str(workdir), params, cfg, "pretraining", step=7)
  for target, cls in (("auto", HFPreTraining), ("model", HFModel)):
    out = tmp_path / f"hf_{target}"
    result = _cli("export", f"--checkpoint={workdir}", f"--output={out}", f"--target={target}")
    assert result.returncode == 0, result.stderr
    _, info = cls.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  result = _cli("export", f"--checkpoint={workdir}", f"--output={tmp_path / 'ctc'}", "--target=ctc")
  _one_line_error(result, "lm_head")
  # Extraction from our own workdir equals extraction through the exported HF directory.
  a, b = tmp_path / "a.npz", tmp_path / "b.npz"
  assert _cli("extract", f"--checkpoint={workdir}", f"--audio={audio_files['a']}", f"--output={a}").returncode == 0
  assert (
    _cli("extract", f"--checkpoint={tmp_path / 'hf_model'}", f"--audio={audio_files['a']}", f"--output={b}").returncode
    == 0
  )
  np.testing.assert_array_equal(np.load(a)["utt_a"], np.load(b)["utt_a"])


@pytest.mark.slow
def test_bad_input_gives_one_line_errors(hf_dir, audio_files, tmp_path):
  out = f"--output={tmp_path / 'x.npz'}"
  _one_line_error(
    _cli("extract", f"--checkpoint={hf_dir}", f"--audio={tmp_path / 'nope.wav'}", out), "nope.wav", "no such file"
  )
  _one_line_error(
    _cli("extract", f"--checkpoint={hf_dir}", f"--audio={audio_files['broken']}", out), "broken.wav", "unreadable audio"
  )
  _one_line_error(
    _cli("extract", f"--checkpoint={tmp_path / 'missing'}", f"--audio={audio_files['a']}", out),
    "missing",
    "no such checkpoint",
  )
  # A checkpoint of another architecture.
  other = tmp_path / "hubert"
  other.mkdir()
  for name in ("model.safetensors",):
    (other / name).write_bytes(open(os.path.join(hf_dir, name), "rb").read())
  config = json.load(open(os.path.join(hf_dir, "config.json")))
  json.dump(dict(config, model_type="hubert"), open(other / "config.json", "w"))
  _one_line_error(_cli("export", f"--checkpoint={other}", f"--output={tmp_path / 'o'}"), "model_type='hubert'")
  # An inconsistent config: the weights are for hidden_size 64.
  bad = tmp_path / "inconsistent"
  bad.mkdir()
  (bad / "model.safetensors").write_bytes(open(os.path.join(hf_dir, "model.safetensors"), "rb").read())
  json.dump(dict(config, hidden_size=96, intermediate_size=128), open(bad / "config.json", "w"))
  _one_line_error(_cli("extract", f"--checkpoint={bad}", f"--audio={audio_files['a']}", out), "shape", "disagree")
  json.dump(dict(config, hidden_size=65), open(bad / "config.json", "w"))
  _one_line_error(
    _cli("extract", f"--checkpoint={bad}", f"--audio={audio_files['a']}", out), "inconsistent config.json"
  )
  _one_line_error(
    _cli("extract", f"--checkpoint={hf_dir}", f"--audio={audio_files['a']}", out, "--layer=9"), "--layer=9"
  )


_FAULTS_PROBE = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, so the count does not depend on the host's THP mode
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
def work():  # as XLA:CPU does: a big temporary malloc'ed, written and freed on a worker thread, step after step
  for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = libc.malloc(256 * 2**20)
    ctypes.memset(buf, 1, 256 * 2**20)
    libc.free(buf)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work); t.start(); t.join()
print(min(faults[1:]))
"""


def _cpu_env_with_default_allocator() -> dict:
  """This environment on CPU, less anything that tells glibc's allocator what to do."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
  return {**env, "JAX_PLATFORMS": "cpu"}


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_glibc_launcher_keeps_freed_memory_for_the_next_step():
  """launch/cpu_glibc.sh: a freed 256 MiB buffer comes back without faulting its pages in again (with
  glibc's defaults a worker thread faults all 65536 in on every allocation); a setting the user made
  is kept."""
  env = _cpu_env_with_default_allocator()
  launcher = os.path.join(REPO, "launch", "cpu_glibc.sh")

  def faults(*prefix, extra=None):
    cmd = [*prefix, sys.executable, "-c", _FAULTS_PROBE]
    return int(subprocess.run(cmd, env={**env, **(extra or {})}, capture_output=True, text=True, check=True).stdout)

  assert faults(launcher) < 2000
  assert faults() > 60000
  assert faults(launcher, extra={"MALLOC_MMAP_MAX_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}) > 60000
  shown = subprocess.run(
    [launcher, "sh", "-c", "echo $MALLOC_ARENA_MAX $GLIBC_TUNABLES"],
    env={**env, "MALLOC_ARENA_MAX": "4"},
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  assert shown == ["4", "glibc.malloc.hugetlb=1"]


_ALLOCATOR_AUDIT = """
import runpy, sys
calls = []
def hook(event, args):  # every C function Python looks up through ctypes passes here
  if event == "ctypes.dlsym" and args[1] in ("mallopt", "madvise", "malloc_trim", "sbrk", "brk"):
    calls.append(args[1])
sys.addaudithook(hook)
target, sys.argv = sys.argv[1], sys.argv[1:]
try:
  if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
  else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
  code = 0
except SystemExit as e:
  code = 0 if e.code is None else e.code  # absl's app.run exits with None on success
print("allocator calls:", calls, "exit:", code)
"""


@pytest.mark.slow
def test_the_clis_leave_the_allocator_alone(speech_like_shards, tmp_path):
  """w2v2-train, w2v2-bench and the component timing run to the end without looking up mallopt,
  madvise or the heap's brk through ctypes; the same audit sees a deliberate mallopt."""
  env = _cpu_env_with_default_allocator()
  config = os.path.join(REPO, "tests", "train_config.py")

  def audit(target, *args):
    out = subprocess.run(
      [sys.executable, "-c", _ALLOCATOR_AUDIT, target, *args], env=env, capture_output=True, text=True, timeout=600
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("allocator calls:")]
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    return line[-1]

  control = tmp_path / "control.py"
  control.write_text("import ctypes\nctypes.CDLL(None).mallopt(-8, 1)\n")
  assert audit(str(control)) == "allocator calls: ['mallopt'] exit: 0"
  train = audit(
    "w2v2_jax.cli.train",
    f"--config={config}:{speech_like_shards},1",
    f"--workdir={tmp_path / 'run'}",
    "--plots=false",
    "--config.data.valid_split=none",
  )
  assert train == "allocator calls: [] exit: 0"
  bench = audit("w2v2_jax.cli.bench", f"--config={config}:unused,1", "--batch=8", "--seconds=1", "--steps=1")
  assert bench == "allocator calls: [] exit: 0"
  components = audit(
    os.path.join(REPO, "benchmarks", "bench_components.py"),
    "--preset=tiny",
    "--batch=1",
    "--seconds=0.5",
    "--steps=1",
  )
  assert components == "allocator calls: [] exit: 0"


def test_cpu_jemalloc_launcher_loads_jemalloc_or_says_what_to_install(tmp_path):
  """launch/cpu_jemalloc.sh: the command runs with libjemalloc.so.2 mapped and MALLOC_CONF set (when the
  host has it; JEMALLOC overrides the lookup), and a missing library is one line naming the package."""
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "cpu_jemalloc.sh")
  show = [
    sys.executable,
    "-c",
    "import os; print('libjemalloc' in open('/proc/self/maps').read(), "
    "os.environ.get('MALLOC_CONF', '').startswith('thp:always'))",
  ]
  missing = subprocess.run(
    [script, *show], env={**os.environ, "JEMALLOC": str(tmp_path / "libjemalloc.so.2")}, capture_output=True, text=True
  )
  assert missing.returncode == 1 and missing.stdout == ""
  assert len(missing.stderr.strip().splitlines()) == 1 and "apt-get install libjemalloc2" in missing.stderr
  # The preload itself, with a stand-in library (a copy of libm) where the host has no jemalloc.
  stand_in = tmp_path / "libjemalloc.so.2"
  shutil.copy(_loaded_path("libm.so"), stand_in)
  env = {k: v for k, v in os.environ.items() if k != "MALLOC_CONF"}
  assert subprocess.run(
    [script, *show], env={**env, "JEMALLOC": str(stand_in)}, capture_output=True, text=True, check=True
  ).stdout.split() == ["True", "True"]
  # The lookup: a long library cache (the pipe must not die of SIGPIPE) listing jemalloc for another
  # architecture first, then this one's; and no ldconfig at all.
  arch = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(os.uname().machine, os.uname().machine)
  fake = tmp_path / "bin"
  fake.mkdir()
  cache = tmp_path / "cache.txt"
  cache.write_text(
    "".join(f"\tlibz{i}.so.1 (libc6,{arch}) => /usr/lib/libz{i}.so.1\n" for i in range(5000))
    + "\tlibjemalloc.so.2 (libc6,OtherArch) => /nonexistent/libjemalloc.so.2\n"
    + f"\tlibjemalloc.so.2 (libc6,{arch}) => {stand_in}\n"
    + "".join(f"\tliba{i}.so.1 (libc6,{arch}) => /usr/lib/liba{i}.so.1\n" for i in range(5000))
  )
  (fake / "ldconfig").write_text(f"#!/bin/sh\ncat {cache}\n")
  (fake / "ldconfig").chmod(0o755)
  env.pop("JEMALLOC", None)
  path = f"{fake}:{os.environ['PATH']}"
  assert subprocess.run(
    [script, *show], env={**env, "PATH": path}, capture_output=True, text=True, check=True
  ).stdout.split() == ["True", "True"]
  (fake / "ldconfig").write_text("#!/bin/sh\nexit 127\n")
  none = subprocess.run([script, *show], env={**env, "PATH": path}, capture_output=True, text=True)
  assert none.returncode == 1 and "not found by ldconfig" in none.stderr


def _loaded_path(prefix: str) -> str:
  """The file of a shared library this process has mapped (e.g. 'libm.so')."""
  for line in open("/proc/self/maps"):
    path = line.split()[-1]
    if os.path.basename(path).startswith(prefix):
      return path
  raise FileNotFoundError(prefix)
