"""Inference backends on the same SlowFast graphs: clips/s and latency at batch 1 and 8.

Backends: PyTorch eager (CPU), ONNX Runtime (CPU) on the exported graph (3D convolutions as
2D ones, ``fmh export``'s default), on the graph with native 3D convolutions (``--conv3d
none``, row ``onnxruntime-cpu-3d``), on the whole network written on frames (``--conv3d
frames``, row ``onnxruntime-cpu-frames``) and on its INT8 quantization (``fmh export
--int8-onnx``, row ``onnxruntime-cpu-int8``; calibrated on 16 reference clips, and with
random weights its probabilities are not checked: the row is for speed only), and where present PyTorch CUDA (eager fp32,
eager fp16 autocast, and a captured CUDA graph in fp32 and fp16) and TensorRT (FP16). Models: the demo-size R18 (width 16), a full-width R18 and an R50, at 64 x 64
grey with 32 frames; ``--r50-224`` adds R50 at 224 x 224 (slow on a CPU: few iterations).
Weights are random (speed does not depend on them). CPU backends use the same thread count
(``--threads``, default all cores): ``torch.set_num_threads`` and ORT's intra-op threads.

Timing: warm-up runs first (excluded), then ``--iters`` timed runs; latency p50/p95 per batch;
clips/s = batch / median latency. CUDA timings synchronise the device after every run.

    .venv/bin/python -m bench.bench_backends [--iters 10] [--threads 2] [--r50-224]
    .venv/bin/python -m bench backends

Writes bench/out/backends.json. The goal on this CPU: ONNX Runtime >= 1.5x PyTorch eager.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"

MODELS = {
    "r18-w16-64": dict(builder="slowfast_r18", width=16, crop=64),
    "r18-64": dict(builder="slowfast_r18", width=64, crop=64),
    "r50-64": dict(builder="slowfast_r50", width=64, crop=64),
    "r50-224": dict(builder="slowfast_r50", width=64, crop=224),
}


def _time(fn, warmup: int, iters: int, sync=None) -> np.ndarray:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return np.asarray(out)


def _row(model: str, backend: str, batch: int, t: np.ndarray, flops: int, device: str) -> dict:
    p50 = float(np.median(t))
    return {"model": model, "backend": backend, "batch": batch, "device": device,
            "p50_ms": 1e3 * p50, "p95_ms": 1e3 * float(np.percentile(t, 95)),
            "clips_per_s": batch / p50, "gflop_per_clip": flops / 1e9,
            "gflop_per_s": flops * batch / p50 / 1e9, "iters": int(t.size)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_backends", description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10, help="timed runs per cell [10]")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first [3]")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads for torch and ORT [all cores]")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--models", nargs="+", default=["r18-w16-64", "r18-64", "r50-64"],
                    choices=sorted(MODELS))
    ap.add_argument("--r50-224", action="store_true", help="also R50 at 224 x 224 (slow on CPU)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU backends (GPU runs)")
    ap.add_argument("--out", default=str(OUT / "backends.json"))
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    import export
    from export.checkpoints import Checkpoint
    from export.slowfast import flops_per_clip, randomise_
    from export.quantize import quantize_int8
    from export.to_onnx import export_onnx, reference_clips

    torch.set_num_threads(args.threads)
    models = list(args.models) + (["r50-224"] if args.r50_224 and "r50-224" not in args.models
                                  else [])
    cuda = torch.cuda.is_available()
    trt_ok = False
    if cuda:
        from export.to_trt import tensorrt_available
        trt_ok = tensorrt_available()
    cpu_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu_name = torch.cuda.get_device_name(0) if cuda else ""
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="fmh-bench-"))
    for name in models:
        spec = dict(MODELS[name])
        builder = getattr(export, spec.pop("builder"))
        model = randomise_(builder(**spec)).eval()
        flops = flops_per_clip(model)
        ckpt = Checkpoint.from_model(model, trained_on="benchmark, random weights")
        onnx_path = tmp / f"{name}.onnx"
        need_onnx = not args.no_cpu or trt_ok
        onnx_3d = tmp / f"{name}.conv3d.onnx"
        onnx_frames = tmp / f"{name}.frames.onnx"
        onnx_int8 = tmp / f"{name}.int8.onnx"
        if need_onnx:
            export_onnx(ckpt, onnx_path, check_batches=(1,), tolerance=1e-3)
            if not args.no_cpu:
                export_onnx(ckpt, onnx_3d, check_batches=(1,), tolerance=1e-3, conv3d="none")
                export_onnx(ckpt, onnx_frames, check_batches=(1,), tolerance=1e-3,
                            conv3d="frames")
                q = quantize_int8(ckpt, onnx_int8, reference_clips(model.config, n=16),
                                  prob_tolerance=1.0)
                print(f"{name} INT8 vs fp32 (random weights): max |dp| {q.max_prob_diff:.3f}")
        heavy = spec["crop"] >= 224 or "r50" in name
        iters = max(2, args.iters // 3) if heavy and spec["crop"] >= 224 else args.iters
        warm = 1 if spec["crop"] >= 224 else args.warmup
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        cpu_sessions = {
            f"onnxruntime-cpu{tag}": ort.InferenceSession(str(p), so,
                                                           providers=["CPUExecutionProvider"])
            for tag, p in (("", onnx_path), ("-3d", onnx_3d), ("-frames", onnx_frames),
                           ("-int8", onnx_int8))} if need_onnx and not args.no_cpu else {}
        for b in args.batches:
            x = np.random.default_rng(0).standard_normal(
                (b, *model.config.input_shape)).astype(np.float32)
            if not args.no_cpu:
                xt = torch.from_numpy(x)

                def torch_cpu():
                    with torch.inference_mode():
                        model(xt)
                rows.append(_row(name, "torch-cpu", b, _time(torch_cpu, warm, iters), flops,
                                 cpu_name))
                for backend, s in cpu_sessions.items():
                    rows.append(_row(name, backend, b,
                                     _time(lambda s=s: s.run(None, {"clip": x}), warm, iters),
                                     flops, cpu_name))
                for r in rows[-1 - len(cpu_sessions):]:
                    print(_fmt(r), flush=True)
            if cuda:
                rows.extend(_bench_cuda(name, model, x, b, flops, gpu_name, args))
            if trt_ok:
                rows.extend(_bench_trt(name, onnx_path, x, b, flops, gpu_name, args))
    summary = _ratios(rows)
    result = {"machine": {"cpu": cpu_name, "cores": os.cpu_count(), "threads": args.threads,
                          "gpu": gpu_name, "python": sys.version.split()[0],
                          "torch": torch.__version__, "onnxruntime": ort.__version__,
                          "platform": platform.platform()},
              "command": "python -m bench.bench_backends " + " ".join(argv or sys.argv[1:]),
              "rows": rows, "ort_over_torch_cpu": summary}
    print()
    print(f"{'model':<11} {'backend':<22} {'batch':>5} {'p50 ms':>9} {'p95 ms':>9} "
          f"{'clips/s':>9} {'GFLOP/clip':>10} {'GFLOP/s':>8}")
    for r in rows:
        print(_fmt(r))
    if summary:
        print("\nONNX Runtime / PyTorch eager on CPU (clips/s ratio, goal >= 1.5):")
        for k, v in summary.items():
            print(f"  {k:<16} {v:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}  ({cpu_name}, {args.threads} threads"
          + (f"; GPU {gpu_name}" if gpu_name else "") + ")")
    return 0


def _bench_cuda(name, model, x, b, flops, gpu_name, args) -> list[dict]:
    """PyTorch CUDA: eager fp32/fp16 (autocast), and a captured CUDA graph of the fp16 model
    in channels-last-3d (removes the per-kernel launch overhead that dominates small clips)."""
    import copy

    import torch
    rows = []
    torch.backends.cudnn.benchmark = True
    iters = max(args.iters, 20)
    gm = copy.deepcopy(model).to("cuda").eval()
    xg = torch.from_numpy(x).cuda()
    for dtype, label in ((torch.float32, "torch-cuda-fp32"), (torch.float16, "torch-cuda-fp16")):
        def eager(dtype=dtype):
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype,
                                                        enabled=dtype != torch.float32):
                gm(xg)
        rows.append(_row(name, label, b, _time(eager, 5, iters, torch.cuda.synchronize), flops,
                         gpu_name))
        print(_fmt(rows[-1]), flush=True)
    for half, label in ((False, "cuda-graph-fp32"), (True, "cuda-graph-fp16")):
        m = copy.deepcopy(model).to("cuda").eval()
        static_x = xg.clone()
        if half:
            m = m.half().to(memory_format=torch.channels_last_3d)
            static_x = static_x.half().contiguous(memory_format=torch.channels_last_3d)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):                      # cudnn.benchmark picks kernels here
                m(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            m(static_x)
        rows.append(_row(name, label, b, _time(graph.replay, 5, iters, torch.cuda.synchronize),
                         flops, gpu_name))
        print(_fmt(rows[-1]), flush=True)
        del graph, m
    return rows


def _bench_trt(name, onnx_path, x, b, flops, gpu_name, args) -> list[dict]:
    from export.to_trt import build_engine
    rows = []
    try:
        import tensorrt as trt
        import torch
        res = build_engine(onnx_path, precision="fp16", max_batch=max(args.batches),
                           cache_dir=onnx_path.parent / "trt")
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(
            res.path.read_bytes())
        ctx = engine.create_execution_context()
        xg = torch.from_numpy(x).cuda()
        ctx.set_input_shape("clip", tuple(xg.shape))
        y = torch.empty(tuple(ctx.get_tensor_shape("logits")), device="cuda")
        ctx.set_tensor_address("clip", int(xg.data_ptr()))
        ctx.set_tensor_address("logits", int(y.data_ptr()))
        stream = torch.cuda.current_stream()
        t = _time(lambda: ctx.execute_async_v3(stream.cuda_stream), 5, max(args.iters, 20),
                  torch.cuda.synchronize)
        rows.append(_row(name, "tensorrt-fp16", b, t, flops, gpu_name))
        print(_fmt(rows[-1]), flush=True)
    except Exception as exc:  # noqa: BLE001 - report and carry on with the other backends
        print(f"{name}: TensorRT skipped ({type(exc).__name__}: {exc})")
    return rows


def _ratios(rows: list[dict]) -> dict[str, float]:
    by = {(r["model"], r["backend"], r["batch"]): r for r in rows}
    out = {}
    for (model, backend, batch), r in by.items():
        if backend.startswith("onnxruntime-cpu") and (model, "torch-cpu", batch) in by:
            tag = backend[len("onnxruntime-cpu"):].replace("-", " ")
            out[f"{model} b{batch}{tag}"] = (r["clips_per_s"]
                                            / by[(model, "torch-cpu", batch)]["clips_per_s"])
    return out


def _fmt(r: dict) -> str:
    return (f"{r['model']:<11} {r['backend']:<22} {r['batch']:>5} {r['p50_ms']:>9.2f} "
            f"{r['p95_ms']:>9.2f} {r['clips_per_s']:>9.1f} {r['gflop_per_clip']:>10.2f} "
            f"{r['gflop_per_s']:>8.1f}")


if __name__ == "__main__":
    sys.exit(main())
