"""Latency of the transport + inference workers: ``Dispatcher.submit`` -> ``on_prediction``.

Clips arrive at a steady rate (``--rate`` cells/s) and go through the dispatcher to 1..N local
``fmh serve`` worker processes (ONNX Runtime) and back. Reported per configuration, warm-up
excluded: p50 / p99 / max of the total latency, and its parts:

* ``queue``: submit -> sent to a worker (waiting for credit);
* ``batch_wait``: received by the worker -> its micro-batch starts (``max_wait_ms``);
* ``compute``: preprocessing excluded, the backend call of the clip's batch (incl. softmax);
* ``other``: the rest (ZeroMQ, (de)serialisation, preprocessing, Python).

Models: a tiny ONNX model (transport-bound) and, if present, the bundled demo model
``engine/data/demo_model.onnx``. Writes ``bench/out/latency.json``.

    .venv/bin/python -m bench.bench_latency [--clips 300] [--rate 50] [--workers 1,2] [--slowfast]
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


def tiny_model(path: Path, frames: int = 8, size: int = 16) -> Path:
    """A tiny valid fmh artefact: mean over C,T,H,W, then a 1x2 MatMul to logits."""
    import onnx
    from onnx import TensorProto, helper

    from engine.infer.artefact import build_metadata
    x = helper.make_tensor_value_info("clip", TensorProto.FLOAT, ["N", 1, frames, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [1, 2], [-4.0, 4.0]),
             helper.make_tensor("ax", TensorProto.INT64, [1], [1])]
    nodes = [helper.make_node("ReduceMean", ["clip"], ["m"], axes=[1, 2, 3, 4], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "ax"], ["m2"]),
             helper.make_node("MatMul", ["m2", "w"], ["logits"])]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = build_metadata(
        arch={"name": "tiny_mean", "num_classes": 2},
        input={"layout": "NCTHW", "channels": 1, "frames": frames, "height": size, "width": size,
               "dtype": "float32", "input_name": "clip", "output_name": "logits"},
        sampling={"mode": "uniform", "crop": "fixed", "canvas": size},
        normalisation={"scale": 1 / 255, "mean": [0.45], "std": [0.225]},
        classes=["maternal", "fetal"], positive_class="fetal", threshold=0.5,
        trained_on="nothing (benchmark model)")
    for k, v in meta.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(path))
    return path


def slowfast_model(path: Path) -> Path:
    """A SlowFast-R18 (32 x 64 x 64 grey, the demo's architecture) with random weights,
    exported by ``export.to_onnx`` (needs torch): realistic compute when no demo model exists."""
    from export import slowfast_r18
    from export.checkpoints import Checkpoint
    from export.slowfast import randomise_
    from export.to_onnx import export_onnx
    model = randomise_(slowfast_r18(), seed=0).eval()
    export_onnx(Checkpoint.from_model(model, trained_on="random weights (benchmark)"), path)
    return path


def make_clips(n: int, t: int, size: int, seed: int = 0):
    from engine.types import CellClip
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = rng.integers(0, 256, (t, size, size), dtype=np.uint8)
        cx = np.linspace(10, 700, t, dtype=np.float32)
        out.append(CellClip(cell_id=i, frames=frames, frame_indices=np.arange(t, dtype=np.int64),
                            centroids=np.stack([cx, np.full(t, 75, np.float32)], 1),
                            boxes=np.zeros((t, 4), np.int32), areas=np.full(t, 300, np.int32)))
    return out


def pct(a, q) -> float:
    return float(np.percentile(a, q)) if len(a) else float("nan")


def run_case(model: Path, workers: int, clips: list, rate: float, warmup: int, cfg) -> dict:
    from engine.dispatch import Dispatcher, spawn_workers, stop_workers
    got = []
    d = Dispatcher(cfg, got.append, record_timings=True).start()
    procs = spawn_workers(model, d.endpoint, workers)
    try:
        t_end = time.monotonic() + 120
        while len(d.worker_info()) < workers and time.monotonic() < t_end:
            time.sleep(0.02)
        # Warm-up clips first (sessions, allocators), then the timed clips at `rate`.
        period = 1.0 / rate
        t0 = time.perf_counter()
        for k, clip in enumerate(clips):
            target = t0 + k * period
            while (now := time.perf_counter()) < target:
                time.sleep(min(0.002, target - now))
            d.submit(clip)
        counts = d.close(timeout=300)
    finally:
        stop_workers(procs, timeout=20)
    timed = [t for t in d.timings if t["cell_id"] >= warmup]
    cols = {k: np.array([t[k] for t in timed]) for k in
            ("total_ms", "queue_ms", "worker_wait_ms", "compute_ms")}
    cols["other_ms"] = cols["total_ms"] - cols["queue_ms"] - cols["worker_wait_ms"] - cols["compute_ms"]
    row = {"model": model.name, "workers": workers, "clips": len(timed), "rate_hz": rate,
           "errors": counts["errors"], "answered": counts["answered"],
           "lost": counts["submitted"] - counts["answered"]}
    for k, a in cols.items():
        name = k[:-3]
        row[f"{name}_p50"] = pct(a, 50)
        row[f"{name}_p99"] = pct(a, 99)
        row[f"{name}_max"] = float(a.max()) if len(a) else float("nan")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=300, help="timed clips per case")
    p.add_argument("--warmup", type=int, default=30, help="untimed clips first")
    p.add_argument("--rate", type=float, default=50.0, help="cell arrival rate [1/s]")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--frames", type=int, default=40, help="frames per clip (passage length)")
    p.add_argument("--model", action="append", default=[],
                   help="extra ONNX artefact(s) to time (default: tiny + bundled demo model)")
    p.add_argument("--slowfast", action="store_true",
                   help="also time a random-weight SlowFast-R18 exported here (needs torch)")
    p.add_argument("--slowfast-rate", type=float, default=12.0,
                   help="cell rate for the SlowFast/demo models [1/s] (default: sim.rate_hz)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override (e.g. serving.max_wait_ms=2)")
    args = p.parse_args(argv)

    from engine.config import load_config
    from engine.infer.artefact import ModelArtefact, default_model_path
    cfg = load_config(overrides=args.set)
    tmp = Path(tempfile.mkdtemp(prefix="fmh-bench-latency-"))
    models = [tiny_model(tmp / "tiny.onnx")] + [Path(m) for m in args.model]
    if not args.model and default_model_path().is_file():
        models.append(default_model_path())
    if args.slowfast:
        models.append(slowfast_model(tmp / "slowfast_r18_random.onnx"))
    rows = []
    for model in models:
        rate = args.rate if model.name == "tiny.onnx" else args.slowfast_rate
        art = ModelArtefact.load(model)
        size = max(art.meta["input"]["height"], art.meta["input"]["width"])
        clips = make_clips(args.warmup + args.clips, args.frames, size)
        for n in (int(x) for x in args.workers.split(",")):
            print(f"  {model.name}: {n} worker(s), {args.clips} clips at {rate:g}/s ...",
                  flush=True)
            rows.append(run_case(model, n, clips, rate, args.warmup, cfg))
    hdr = (f"{'model':<26}{'wk':>3}{'n':>5}  {'total p50/p99/max [ms]':>24}  "
           f"{'queue p50/p99':>14}  {'batch wait p50/p99':>18}  {'compute p50/p99':>16}  "
           f"{'other p50/p99':>14}  lost")
    print(hdr)
    for r in rows:
        print(f"{r['model']:<26}{r['workers']:>3}{r['clips']:>5}  "
              f"{r['total_p50']:7.2f} /{r['total_p99']:7.2f} /{r['total_max']:7.1f}  "
              f"{r['queue_p50']:6.2f}/{r['queue_p99']:6.2f}  "
              f"{r['worker_wait_p50']:8.2f}/{r['worker_wait_p99']:8.2f}  "
              f"{r['compute_p50']:7.2f}/{r['compute_p99']:7.2f}  "
              f"{r['other_p50']:6.2f}/{r['other_p99']:6.2f}  {r['lost']}")
    OUT.mkdir(parents=True, exist_ok=True)
    info = {"benchmark": "latency", "command": "python -m bench.bench_latency " + " ".join(argv or sys.argv[1:]),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "config": {"max_batch": cfg.serving.max_batch, "max_wait_ms": cfg.serving.max_wait_ms,
                       "credits": cfg.serving.credits},
            "rows": rows}
    (OUT / "latency.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {OUT / 'latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
