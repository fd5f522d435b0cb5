"""Frames/s through the shared-memory FrameRing between two processes (800x150 uint8).

Usage: ``python -m bench.bench_ring [--frames N] [--slots S] [--latency-frames M]``

Rows:
* ``ring block`` / ``ring drop-oldest``: a writer process puts N frames as fast as it can, the
  reader (this process) gets them; frames/s = frames read / time from first to last frame.
* ``mp.Queue (reference)``: the same frames through ``multiprocessing.Queue`` (pickled), the
  obvious alternative, in the same run, so the ratio is meaningful on a shared machine.
* ``latency @500fps``: the writer paces at 500 frames/s; latency = time the reader got the
  frame - ``t_ns`` stamped just before ``put`` (CLOCK_MONOTONIC is shared by processes).
Writes ``bench/out/ring.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import numpy as np

from engine.ringbuf import FrameRing
from engine.types import Frame

SHAPE = (150, 800)
OUT = Path(__file__).resolve().parent / "out"


def _images(k: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, SHAPE, dtype=np.uint8) for _ in range(k)]


def _ring_writer(name: str, n: int, fps: float) -> None:
    ring = FrameRing.attach(name)
    imgs = _images()
    period = 0 if not fps else int(1e9 / fps)
    t_next = time.monotonic_ns()
    for i in range(n):
        if period:
            while time.monotonic_ns() < t_next:
                time.sleep(max(0.0, (t_next - time.monotonic_ns()) * 1e-9 - 1e-4))
            t_next += period
        ring.put(Frame(i, time.monotonic_ns(), imgs[i % len(imgs)]))
    ring.close_writer()
    ring.close()


def _queue_writer(q, n: int) -> None:
    imgs = _images()
    for i in range(n):
        q.put((i, time.monotonic_ns(), imgs[i % len(imgs)]))
    q.put(None)


def run_ring(policy: str, n: int, slots: int, fps: float = 0.0) -> dict:
    ctx = mp.get_context("spawn")
    with FrameRing.create(SHAPE, slots=slots, policy=policy) as ring:
        p = ctx.Process(target=_ring_writer, args=(ring.name, n, fps), daemon=True)
        p.start()
        first = ring.get(timeout=60)
        t0 = time.perf_counter()
        count, checksum = 1, int(first.image[0, 0])
        lat = [time.monotonic_ns() - first.t_ns]
        for f in ring:
            checksum += int(f.image[0, 0])          # touch the pixels
            lat.append(time.monotonic_ns() - f.t_ns)
            count += 1
        dt = time.perf_counter() - t0
        p.join(30)
        st = ring.stats
    lat_ms = np.asarray(lat[len(lat) // 10:], dtype=np.float64) * 1e-6   # warm-up excluded
    return {"frames_read": count, "seconds": dt, "fps_read": (count - 1) / dt,
            "fps_written": (st["written"] - 1) / dt, "written": st["written"],
            "dropped": st["dropped"], "writer_waits": st["writer_waits"],
            "writer_wait_s": st["writer_wait_s"], "reader_waits": st["reader_waits"],
            "torn_retries": st["torn_retries"],
            "latency_ms_p50": float(np.percentile(lat_ms, 50)),
            "latency_ms_p99": float(np.percentile(lat_ms, 99)),
            "latency_ms_max": float(lat_ms.max())}


def run_queue(n: int, slots: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue(maxsize=slots)
    p = ctx.Process(target=_queue_writer, args=(q, n), daemon=True)
    p.start()
    q.get(timeout=60)
    t0 = time.perf_counter()
    count = 1
    while q.get() is not None:
        count += 1
    dt = time.perf_counter() - t0
    p.join(30)
    return {"frames_read": count, "seconds": dt, "fps_read": (count - 1) / dt,
            "fps_written": (count - 1) / dt, "written": count, "dropped": 0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_ring", description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--latency-frames", type=int, default=1500)
    args = ap.parse_args(argv)
    rows = {
        "ring block": run_ring("block", args.frames, args.slots),
        "ring drop-oldest": run_ring("drop-oldest", args.frames, args.slots),
        "mp.Queue (reference)": run_queue(args.frames, args.slots),
        "latency @500fps block": run_ring("block", args.latency_frames, args.slots, fps=500.0),
        "latency @500fps drop-oldest": run_ring("drop-oldest", args.latency_frames, args.slots,
                                                fps=500.0),
    }
    ref = rows["mp.Queue (reference)"]["fps_read"]
    print(f"{SHAPE[1]}x{SHAPE[0]} uint8, {args.slots} slots, {args.frames} frames "
          f"({args.latency_frames} paced); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'':30s} {'read/s':>9s} {'written/s':>10s} {'x Queue':>8s} {'dropped':>8s} "
          f"{'w.waits':>8s} {'p50 ms':>7s} {'p99 ms':>7s}")
    for name, r in rows.items():
        ratio = "-" if name.startswith("latency") else f"{r['fps_read'] / ref:.2f}"
        print(f"{name:30s} {r['fps_read']:9.0f} {r['fps_written']:10.0f} "
              f"{ratio:>8s} {r['dropped']:8d} {r.get('writer_waits', 0):8d} "
              f"{r.get('latency_ms_p50', float('nan')):7.3f} "
              f"{r.get('latency_ms_p99', float('nan')):7.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"shape": SHAPE, "slots": args.slots, "frames": args.frames,
            "latency_frames": args.latency_frames, "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    (OUT / "ring.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {OUT / 'ring.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
