#!/usr/bin/env bash
# The GPU figures of docs/performance.md, in one run on one NVIDIA GPU (jax[cuda] installed):
#   1. the fused attention kernels against XLA's attention core, compiled for this GPU (values, gradients);
#   2. the BASE pre-training step in bf16 on 15.6 s crops (250,000 samples, fairseq's max_sample_size),
#      XLA's attention against the fused kernels,
#      at batch 8 and 32 (w2v2-bench: step time, audio-s/s, MFU against the datasheet peak);
#   3. a jax.profiler trace of the fused batch-8 step (open with TensorBoard or Perfetto).
# Usage: launch/gpu_bench.sh OUTDIR [STEPS]     (four w2v2-bench runs, each compiling a step and a forward)
set -euo pipefail
out=${1:?output folder}; steps=${2:-10}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
# --noconftest: the suite's conftest forces 8 CPU devices; here the kernels run compiled, on the GPU
JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider --noconftest tests/test_flash_attention.py 2>&1 \
    | tee "$out/flash_test.log" || echo "the kernels' check FAILED (see above); timing them anyway"
for batch in 8 32; do
  for impl in xla gpu_flash; do
    profile=()
    if [[ $batch == 8 && $impl == gpu_flash ]]; then profile=(--profile="$out/profile_b8_gpu_flash"); fi
    python -m w2v2_jax.cli.bench --config=experiments/base_librispeech.py --batch="$batch" --seconds=15.625 \
        --steps="$steps" --config.model.dtype=bfloat16 --config.model.kernels="$impl" \
        --json="$out/base_b${batch}_${impl}.json" "${profile[@]}" 2>&1 | tee "$out/base_b${batch}_${impl}.log"
  done
done
