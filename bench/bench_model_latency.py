"""ONNX Runtime CPU latency of model files at batch 1 (the demo model's speed, issue 5).

Each model gets its own session (``--threads`` intra-op threads, 1 by default: what one
``fmh serve`` worker gets on a 2-core machine), a fixed random input of its own shape,
``--warmup`` runs, then ``--runs`` timed runs per model, **interleaved** across the models so
that they all see the same machine load. Prints median / p99 / max [ms] per model and writes
``bench/out/model_latency.json``.

    .venv/bin/python -m bench.bench_model_latency engine/data/demo_model.onnx [OTHER.onnx ...]

``--compare-lowering`` times, instead of the given files, a network of each one's architecture
(from its ``fmh.arch`` metadata, random weights: the speed does not depend on them) exported
three times, with the 3D convolutions as they are, written as 2D convolutions over the frames
(:mod:`export.lower_onnx`) and with the whole network on frames (:mod:`export.frame_major`),
all in the same interleaved run (needs torch).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def measure(paths: list[str], *, threads: int = 1, warmup: int = 20, runs: int = 300,
            batch: int = 1, seed: int = 0) -> list[dict]:
    """Latency of each ONNX model [ms] (see the module docstring)."""
    import onnxruntime as ort
    sessions = []
    for p in paths:
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        inp = s.get_inputs()[0]
        shape = [batch] + [int(d) for d in inp.shape[1:]]
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        for _ in range(warmup):
            s.run(None, {inp.name: x})
        sessions.append((s, inp.name, x))
    times = [np.empty(runs) for _ in paths]
    for i in range(runs):
        for k, (s, name, x) in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, {name: x})
            times[k][i] = (time.perf_counter() - t0) * 1e3
    return [{"model": str(p), "bytes": os.path.getsize(p), "input": list(x.shape),
             "threads": int(threads), "runs": int(runs),
             "median_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
             "max_ms": float(t.max())} for p, (_, _, x), t in zip(paths, sessions, times)]


def lowering_variants(model: str, out_dir: Path) -> list[str]:
    """Export a random-weight network with ``model``'s architecture with each 3D-conv lowering;
    returns the ONNX paths (conv3d="none", "as2d", "frames")."""
    from engine.infer.artefact import ModelArtefact
    from export.checkpoints import Checkpoint
    from export.slowfast import build_from_meta, randomise_
    from export.to_onnx import CONV3D_MODES, export_onnx
    art = ModelArtefact.load(model)
    net = randomise_(build_from_meta(art.meta["arch"]), seed=0).eval()
    ckpt = Checkpoint.from_model(net, trained_on="benchmark, random weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for mode in reversed(CONV3D_MODES):         # "none" first
        path = out_dir / f"{Path(model).stem}.conv3d-{mode}.onnx"
        res = export_onnx(ckpt, path, conv3d=mode, check_batches=(1,))
        print(f"exported {path.name}: parity max |dlogit| {res.max_abs_diff:.1e}")
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="ONNX files")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads [1]")
    ap.add_argument("--runs", type=int, default=300, help="timed runs per model [300]")
    ap.add_argument("--warmup", type=int, default=20, help="untimed runs per model [20]")
    ap.add_argument("--batch", type=int, default=1, help="batch size [1]")
    ap.add_argument("--compare-lowering", action="store_true",
                    help="time each model's architecture in each --conv3d layout")
    args = ap.parse_args(argv)
    for p in args.models:
        if not Path(p).is_file():
            ap.error(f"model {p!r}: file not found")
    if args.compare_lowering:
        args.models = [v for p in args.models for v in lowering_variants(p, OUT / "lowering")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = measure(args.models, threads=args.threads, warmup=args.warmup, runs=args.runs,
                   batch=args.batch)
    print(f"{'model':<48} {'input':<22} {'median':>8} {'p99':>8} {'max':>8}  [ms]")
    for r in rows:
        print(f"{r['model'][-48:]:<48} {'x'.join(map(str, r['input'])):<22} "
              f"{r['median_ms']:8.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.2f}")
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "model_latency.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "cpus": os.cpu_count(), "load_average_1min": load,
                               "rows": rows}, indent=2))
    print(f"load average {load:.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
