#!/usr/bin/env bash
# Every GPU check of the model/export side in one go (run on a machine with an NVIDIA GPU):
#   1. what is there (GPU, torch/CUDA, TensorRT),
#   2. the gpu-marked tests (torch CUDA parity; TensorRT build + FP16/FP32 parity, which skip
#      with "needs an NVIDIA GPU with TensorRT" where TensorRT is absent),
#   3. the backend benchmark on CUDA (torch CUDA fp32/fp16, TensorRT fp16 when present).
# Usage: bash bench/gpu_check.sh [OUTDIR]   (PYTHON=... to pick the interpreter)
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
OUTDIR=${1:-bench/out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
rc=0
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
$PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null \
  || echo "tensorrt: not importable (TensorRT checks will skip)"
$PY -m pytest -q -rs -m gpu -p no:cacheprovider --continue-on-collection-errors tests \
  2>&1 | tee "$OUTDIR/gpu_tests.log" || rc=1
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
$PY -m bench.bench_backends --no-cpu --r50-224 --iters 30 --out "$OUTDIR/backends_gpu.json" || rc=1
exit $rc
