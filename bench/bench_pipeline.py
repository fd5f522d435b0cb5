"""Sustained real-time replay through the whole pipeline (issue 5, "Speed").

Simulates ``--frames`` frames (default 30,000 = 60 s at 500 fps) to ``bench/out/`` once, then
replays them at the recorded rate (``fmh run --realtime``) with the camera's ring policy
(``drop-oldest``: a frame the front end cannot take in time is dropped and counted, as with a
camera) through the front end, the tracker, the dispatcher and ``--workers`` ONNX Runtime CPU
workers, with the bundled demo model (or, while it is absent, a randomly initialised SlowFast
R18 of the demo's size exported with ``export.to_onnx``; the JSON says which).

Measured, sampled every ``--interval`` s from outside the run (psutil, the ``fmh run`` process
and all its descendants: source, clip store, workers): CPU use [% of one core, summed] and
memory over time: anonymous resident memory (RSS minus file-backed and shared pages: the
replayed .npy memory map and the shared-memory ring are left out, they are page cache, not
growth) [MB, summed], with the slope of a straight line fitted to it after warm-up [MB/min];
the plain RSS maximum is reported too.
From the run's manifest: frames dropped, clips lost (sent but neither predicted nor answered
with an error), latency from the exit frame to the prediction (p50/p99/max, warm-up
excluded; queue wait and compute apart).

    python -m bench.bench_pipeline                 # 30,000 frames, about 70 s
    python -m bench.bench_pipeline --frames 5000   # shorter
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def _simulate(frames: int, seed: int) -> Path:
    path = OUT / f"pipeline_{frames}_s{seed}.npy"
    if path.exists() and path.with_name(path.stem + ".truth.json").exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "engine", "simulate", "--frames", str(frames),
                    "--seed", str(seed), "--out", str(path), "--no-progress"], check=True)
    return path


def _model(path_arg: str) -> tuple[Path, str]:
    if path_arg:
        return Path(path_arg), "given"
    from engine.infer.artefact import default_model_path
    demo = default_model_path()
    if demo.is_file():
        return demo, "bundled demo model"
    path = OUT / "pipeline_model_r18w16.onnx"
    if not path.exists():
        from export import slowfast_r18
        from export.checkpoints import Checkpoint
        from export.slowfast import randomise_
        from export.to_onnx import export_onnx
        model = randomise_(slowfast_r18(width=16), seed=3).eval()     # 32 x 64 x 64 grey
        ckpt = Checkpoint.from_model(model, threshold=0.5,
                                     trained_on="benchmark stand-in: random weights",
                                     validation={"sensitivity": 0.8, "specificity": 0.9,
                                                 "auc": 0.9, "n_cells": 1, "n_donors": 1})
        export_onnx(ckpt, path)
    return path, "random SlowFast R18 (width 16, 32x64x64) stand-in; demo model absent"


class _Sampler:
    """CPU [% of one core] and RSS [MB] of a process tree, per role."""

    def __init__(self, pid: int):
        import psutil
        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.procs: dict[int, object] = {}
        self.rows: list[dict] = []
        self.t0 = time.monotonic()

    def _role(self, p) -> str:
        try:
            if p.pid == self.root.pid:
                return "main"
            cmd = " ".join(p.cmdline())
        except self.psutil.Error:
            return "other"
        if " serve " in cmd:
            return "worker"
        if "multiprocessing" in cmd or "spawn_main" in cmd:
            return "child"                 # source process, clip store, resource tracker
        return "other"

    def sample(self) -> None:
        ps = self.psutil
        try:
            tree = [self.root] + self.root.children(recursive=True)
        except ps.Error:
            return
        row = {"t": round(time.monotonic() - self.t0, 2), "cpu": 0.0, "rss_mb": 0.0,
               "anon_mb": 0.0, "by_role": {}}
        for p in tree:
            q = self.procs.get(p.pid)
            if q is None:
                self.procs[p.pid] = q = p
                try:
                    q.cpu_percent(None)         # primes the counter
                except ps.Error:
                    pass
                continue
            try:
                cpu = q.cpu_percent(None)
                mi = q.memory_info()
                rss = mi.rss / 2**20
                anon = (mi.rss - getattr(mi, "shared", 0)) / 2**20
            except ps.Error:
                continue
            role = self._role(q)
            row["cpu"] += cpu
            row["rss_mb"] += rss
            row["anon_mb"] += anon
            r = row["by_role"].setdefault(role, {"cpu": 0.0, "rss_mb": 0.0, "anon_mb": 0.0,
                                                 "n": 0})
            r["cpu"] += cpu
            r["rss_mb"] += rss
            r["anon_mb"] += anon
            r["n"] += 1
        self.rows.append(row)


def _slope(rows: list[dict], t_from: float, key: str = "anon_mb") -> float:
    """MB/min of a line fitted from ``t_from`` to 5 s before the end (shutdown left out)."""
    t_end = rows[-1]["t"] - 5.0 if rows else 0.0
    pts = [(r["t"], r[key]) for r in rows if t_from <= r["t"] <= t_end]
    if len(pts) < 3:
        return float("nan")
    t, m = np.array(pts).T
    return float(np.polyfit(t, m, 1)[0] * 60.0)       # MB per minute


def _drops(manifest: dict) -> list[list[float]]:
    """[t, frames dropped in the second before t] where any were dropped (from the
    manifest's progress series)."""
    prog = manifest.get("progress") or {}
    f = prog.get("fields", [])
    if "dropped" not in f:
        return []
    it, idr = f.index("t"), f.index("dropped")
    out, last = [], 0
    for row in prog.get("rows", []):
        if row[idr] > last:
            out.append([row[it], row[idr] - last])
        last = row[idr]
    return out


def _fmt_drops(drops: list) -> str:
    if not drops:
        return "never"
    return ", ".join(f"{t:.0f}:{n}" for t, n in drops[:4]) + (" ..." if len(drops) > 4 else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=30000, help="frames to replay (default 30000)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--model", default="", help="ONNX model (default: the demo model)")
    ap.add_argument("--speed", type=float, default=1.0, help="replay speed (1.0 = 500 fps)")
    ap.add_argument("--interval", type=float, default=0.5, help="sampling period [s]")
    ap.add_argument("--warmup", type=float, default=10.0,
                    help="seconds left out of the memory slope and CPU mean")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override passed to fmh run")
    args = ap.parse_args(argv)
    if args.frames < 1000:
        ap.error("--frames must be >= 1000")

    seq = _simulate(args.frames, args.seed)
    model, model_kind = _model(args.model)
    run_dir = OUT / "pipeline_run"
    cmd = [sys.executable, "-m", "engine", "run", str(seq), "--model", str(model),
           "--out", str(run_dir), "--workers", str(args.workers), "--speed", str(args.speed),
           "--quiet", "--set", "ring.policy=drop-oldest", "--set", "model.backend=onnxruntime"]
    for o in args.overrides:
        cmd += ["--set", o]
    load0 = os.getloadavg()
    print(f"bench pipeline: {args.frames} frames at {500 * args.speed:g} fps, model: {model_kind}",
          flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = _Sampler(proc.pid)
    while proc.poll() is None:
        sampler.sample()
        time.sleep(args.interval)
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        print(stdout, stderr, sep="\n", file=sys.stderr)
        return 1
    m = json.loads((run_dir / "manifest.json").read_text())
    c = m["counts"]
    lat = m.get("latency", {})
    rows = sampler.rows
    steady = [r for r in rows if args.warmup <= r["t"] <= rows[-1]["t"] - 5.0] if rows else []
    roles = sorted({k for r in steady for k in r["by_role"]})
    cpu_by_role = {k: round(float(np.mean([r["by_role"].get(k, {}).get("cpu", 0.0)
                                           for r in steady])), 1) for k in roles} if steady else {}
    result = {
        "machine": _machine(), "command": " ".join(["python -m bench.bench_pipeline"]
                                                   + (argv if argv is not None else sys.argv[1:])),
        "run_command": " ".join(cmd), "model": str(model), "model_kind": model_kind,
        "frames": args.frames, "fps": 500 * args.speed, "workers": args.workers,
        "wall_s": round(wall, 2), "run_s": m.get("timing", {}).get("seconds"),
        "load_average_before": load0, "load_average_after": os.getloadavg(),
        "frames_read": c["frames_read"], "frames_processed": c["frames_processed"],
        "frames_dropped": c["frames_dropped"],
        "cells": c["cells_tracked"], "clips_sent": c["clips_sent"],
        "predictions": c["predictions"], "errors": c["errors"],
        "clips_lost": c["clips_sent"] - c["predictions"] - c["errors"],
        "clips_spilled": c["clips_spilled"], "unanswered": c.get("unanswered", 0),
        "pacer_max_behind_s": m.get("source_status", {}).get("pacer_max_behind_s"),
        "cpu_percent_mean": round(float(np.mean([r["cpu"] for r in steady])), 1) if steady else None,
        "cpu_percent_max": round(float(np.max([r["cpu"] for r in steady])), 1) if steady else None,
        "cpu_percent_by_role": cpu_by_role,
        "anon_mb_start": round(steady[0]["anon_mb"], 1) if steady else None,
        "anon_mb_end": round(steady[-1]["anon_mb"], 1) if steady else None,
        "anon_mb_max": round(max(r["anon_mb"] for r in rows), 1) if rows else None,
        "anon_slope_mb_per_min": round(_slope(rows, args.warmup), 2),
        "rss_mb_max": round(max(r["rss_mb"] for r in rows), 1) if rows else None,
        "rss_slope_mb_per_min": round(_slope(rows, args.warmup, "rss_mb"), 2),
        "drops_timeline": _drops(m),
        "workers_joined": m.get("dispatcher", {}).get("workers_joined"),
        "latency": lat, "samples": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pipeline.json").write_text(json.dumps(result, indent=1))

    t = lat.get("total_ms", {})

    def ms(d, k):
        return f"{d[k]:.1f}" if d.get(k) is not None else "-"

    print(f"{'what':34s} {'value':>14s}")
    for k, v in [
        ("model", model_kind[:40]),
        ("frames replayed / processed", f"{c['frames_read']} / {c['frames_processed']}"),
        ("frames dropped (goal 0)", c["frames_dropped"]),
        ("cells / clips sent", f"{c['cells_tracked']} / {c['clips_sent']}"),
        ("predictions / errors", f"{c['predictions']} / {c['errors']}"),
        ("clips lost (goal 0)", result["clips_lost"]),
        ("clips spilled to disk", c["clips_spilled"]),
        ("CPU mean / max [% of a core]", f"{result['cpu_percent_mean']} / {result['cpu_percent_max']}"),
        ("CPU by role [%]", ", ".join(f"{k} {v}" for k, v in cpu_by_role.items())),
        ("anon mem start / end / max [MB]",
         f"{result['anon_mb_start']} / {result['anon_mb_end']} / {result['anon_mb_max']}"),
        ("anon mem slope after warm-up", f"{result['anon_slope_mb_per_min']} MB/min"),
        ("RSS max (incl. ring, memmap) [MB]", result["rss_mb_max"]),
        ("frames dropped: when [s]", _fmt_drops(result["drops_timeline"])),
        ("latency p50 / p99 / max [ms]", f"{ms(t, 'p50')} / {ms(t, 'p99')} / {ms(t, 'max')}"),
        ("  queue p50 / p99 [ms]", f"{ms(lat.get('queue_ms', {}), 'p50')} / "
                                   f"{ms(lat.get('queue_ms', {}), 'p99')}"),
        ("  worker wait p50 / p99 [ms]", f"{ms(lat.get('worker_wait_ms', {}), 'p50')} / "
                                         f"{ms(lat.get('worker_wait_ms', {}), 'p99')}"),
        ("  compute p50 / p99 [ms]", f"{ms(lat.get('compute_ms', {}), 'p50')} / "
                                     f"{ms(lat.get('compute_ms', {}), 'p99')}"),
        ("  trip to worker and back p50 / p99 [ms]", f"{ms(lat.get('trip_ms', {}), 'p50')} / "
                                                     f"{ms(lat.get('trip_ms', {}), 'p99')}"),
        ("  track close p50 / p99 [ms]", f"{ms(lat.get('track_ms', {}), 'p50')} / "
                                         f"{ms(lat.get('track_ms', {}), 'p99')}"),
        ("cells counted / warm-up / end of stream",
         f"{t.get('n', 0)} / {lat.get('n_warmup', '-')} / {lat.get('n_end_of_stream', '-')}"),
        ("live from frame", lat.get("live_from_frame", "-")),
        ("wall time [s]", f"{wall:.1f}"),
        ("load average before / after", f"{load0[0]:.1f} / {result['load_average_after'][0]:.1f}"),
    ]:
        print(f"{k:34s} {str(v):>14s}")
    print(f"bench pipeline: wrote {OUT / 'pipeline.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
