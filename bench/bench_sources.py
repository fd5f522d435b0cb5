"""Replay read rate per file format: frames/s read and copied into a ring-sized slot.

Writes the synthetic chip's frames (800x150 uint8) in each format into a temporary folder,
then times ``open_replay(path).frames()`` with each frame copied into one preallocated slot
(what the replay process does with a ring slot). The reference is the same loop over an
array already in memory (``np.load`` without a memory map): the ceiling for any reader.
The RT-DC row replays the real test file (tests/data/rtdc, 80x320, zstd) looped.
Files are written once and read right after writing, so they are in the page cache: this
measures decoding, not the disk.

Writes ``bench/out/sources.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
RTDC = Path(__file__).resolve().parent.parent / "tests" / "data" / "rtdc" / "dcnum_thresh_example.rtdc"


def _writers():
    import cv2
    import h5py
    import tifffile

    def npy(d, fr):
        p = d / "s.npy"
        np.save(p, fr)
        return p, {}

    def tif(d, fr):
        p = d / "s.tif"
        tifffile.imwrite(p, fr)
        return p, {}

    def tif_zlib(d, fr):
        p = d / "z.tif"
        tifffile.imwrite(p, fr, compression="zlib")
        return p, {}

    def folder_png(d, fr):
        p = d / "png"
        p.mkdir()
        for i, f in enumerate(fr):
            cv2.imwrite(str(p / f"f{i}.png"), f)
        return p, {}

    def h5(d, fr):
        p = d / "s.h5"
        with h5py.File(p, "w") as f:
            f["images"] = fr
        return p, {}

    def h5_gzip(d, fr):
        p = d / "g.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("images", data=fr, chunks=(16,) + fr.shape[1:], compression="gzip",
                             compression_opts=1)
        return p, {}

    def video(fourcc, suffix):
        def write(d, fr):
            p = d / f"v_{fourcc.strip()}{suffix}"
            w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*fourcc), 500.0,
                                (fr.shape[2], fr.shape[1]), isColor=False)
            for f in fr:
                w.write(f)
            w.release()
            return p, {}
        return write

    def rtdc(d, fr):
        from engine.sources.replay import open_replay
        n = open_replay(RTDC).n_frames
        return RTDC, {"loop": max(1, len(fr) // n)}

    return {"npy (memmap)": npy, "tif (memmap)": tif, "tif zlib (pages)": tif_zlib,
            "folder png": folder_png, "hdf5": h5, "hdf5 gzip-1": h5_gzip,
            "avi FFV1": video("FFV1", ".avi"), "avi MJPG": video("MJPG", ".avi"),
            "rtdc zstd (real, looped)": rtdc}


def _time_replay(path, options, repeats: int) -> dict:
    from engine.sources.replay import open_replay
    best = None
    for _ in range(repeats):
        src = open_replay(path, **options)
        slot = np.empty(src.shape, np.uint8)
        n = 0
        t0 = time.perf_counter()
        with src:
            for f in src.frames():
                np.copyto(slot, f.image)
                n += 1
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    return {"frames": n, "seconds": best, "fps": n / best,
            "mb_per_s": n * slot.size / best / 1e6, "shape": list(slot.shape)}


def _time_reference(frames: np.ndarray, repeats: int) -> dict:
    best = None
    slot = np.empty(frames.shape[1:], np.uint8)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in frames:
            np.copyto(slot, f)
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    n = len(frames)
    return {"frames": n, "seconds": best, "fps": n / best, "mb_per_s": n * slot.size / best / 1e6,
            "shape": list(slot.shape)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_sources", description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    from engine.config import load_config
    from engine.sources.sim import SyntheticChip
    frames, _ = SyntheticChip(load_config()).render(args.frames)
    rows = {"in-memory array (reference)": _time_reference(frames, args.repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in _writers().items():
            sub = Path(tmp) / name.split()[0].replace("/", "_")
            sub.mkdir(exist_ok=True)
            path, options = write(sub, frames)
            rows[name] = _time_replay(path, options, args.repeats)
    ref = rows["in-memory array (reference)"]["fps"]
    print(f"{args.frames} frames, best of {args.repeats}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; read + copy into one slot")
    print(f"{'':28s} {'shape':>9s} {'frames/s':>10s} {'MB/s':>8s} {'x 500fps':>9s} {'/ ref':>7s}")
    for name, r in rows.items():
        shape = "x".join(str(s) for s in r["shape"][::-1])
        print(f"{name:28s} {shape:>9s} {r['fps']:10.0f} {r['mb_per_s']:8.0f} "
              f"{r['fps'] / 500.0:9.1f} {r['fps'] / ref:7.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"frames": args.frames, "repeats": args.repeats, "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    (OUT / "sources.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {OUT / 'sources.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
