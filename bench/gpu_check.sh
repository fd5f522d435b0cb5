#!/usr/bin/env bash
# Every GPU check of the model/export side in one go (run on a machine with an NVIDIA GPU):
#   1. what is there (GPU, torch/CUDA, TensorRT),
#   2. the gpu-marked tests (torch CUDA parity; TensorRT build + FP16/FP32 parity, which skip
#      with "needs an NVIDIA GPU with TensorRT" where TensorRT is absent),
#   3. the backend benchmark on CUDA (torch CUDA fp32/fp16, TensorRT fp16 when present),
#   4. with DEMO_PT=<the bundled demo model's checkpoint> (and pyzmq installed): the whole
#      pipeline (bench_pipeline, PIPELINE_FRAMES frames at 500 fps) with the engine's torch
#      backend on CUDA serving the demo model, then the same replay on ONNX Runtime CPU with
#      all cores and pinned to 2 cores (taskset), to tell the GPU's share of the latency from
#      the share of CPU contention.
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
if [ -n "${DEMO_PT:-}" ]; then
  frames=${PIPELINE_FRAMES:-15000}
  tm="${TMPDIR:-/tmp}/fmh_torch_model"; mkdir -p "$tm"
  cp engine/data/demo_model.onnx "$tm/demo_model.onnx"; cp "$DEMO_PT" "$tm/demo_model.pt"
  $PY -m bench.bench_pipeline --frames "$frames" --model "$tm/demo_model.onnx" \
    --set model.backend=torch && cp bench/out/pipeline.json "$OUTDIR/pipeline_torch_cuda.json" || rc=1
  $PY -m bench.bench_pipeline --frames "$frames" \
    && cp bench/out/pipeline.json "$OUTDIR/pipeline_ort_allcores.json" || rc=1
  if command -v taskset >/dev/null; then
    taskset -c 0,1 $PY -m bench.bench_pipeline --frames "$frames" \
      && cp bench/out/pipeline.json "$OUTDIR/pipeline_ort_2cores.json" || rc=1
  fi
fi
exit $rc
