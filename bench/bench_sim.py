"""Synthetic-chip generation speed: frames/s on one core, against the camera's 500 fps.

Run: ``.venv/bin/python -m bench.bench_sim [--frames 5000] [--repeat 3] [--seed 1]``.

Pins itself to one CPU and times, for the default config:

* ``render``: ``SyntheticChip.frames(n, out=...)`` into a preallocated array (no disk);
* ``npy``: ``fmh simulate --out s.npy`` (memory-mapped file, truth JSON included);
* ``tif``: ``fmh simulate --out s.tif`` (page by page) on a fifth of the frames.

Wall-clock and CPU-time frames/s are both reported: on a shared machine the wall clock also
counts time the process waited for the CPU, CPU time does not. Writes ``bench/out/sim.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "sim.json"


def _pin_one_core() -> str:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        return f"pinned to CPU {cpus[-1]} of {len(cpus)}"
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return "not pinned"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.bench_sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=5000, help="frames per timed run (default 5000)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per case (default 3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(OUT), help="JSON result file")
    args = ap.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    pinned = _pin_one_core()

    import numba
    import numpy as np

    from engine.cli import main as fmh
    from engine.config import load_config
    from engine.sources.sim import SyntheticChip

    cfg = load_config(overrides={"sim.seed": args.seed})
    n = int(args.frames)
    fps_cam = float(cfg.camera.fps)
    SyntheticChip(cfg).render(20)                       # compile / load the Numba cache

    rows = []

    def case(name, frames, make_run):
        walls, cpus = [], []
        for _ in range(args.repeat):
            run = make_run()
            w, c = _time(run)
            walls.append(w)
            cpus.append(c)
        best_w, best_c = min(walls), min(cpus)
        rows.append({"case": name, "frames": frames,
                     "wall_s": [round(x, 4) for x in walls], "cpu_s": [round(x, 4) for x in cpus],
                     "fps_wall_best": frames / best_w,
                     "fps_wall_median": frames / statistics.median(walls),
                     "fps_cpu_best": frames / best_c,
                     "x_realtime_wall_best": frames / best_w / fps_cam})

    t0 = time.perf_counter()
    chip = SyntheticChip(cfg)
    init_s = time.perf_counter() - t0
    buf = np.empty((n, cfg.camera.height, cfg.camera.width), np.uint8)

    def make_render():
        c = SyntheticChip(cfg)
        return lambda: [None for _ in c.frames(n, out=buf)]

    case("render (memory)", n, make_render)
    del buf
    with tempfile.TemporaryDirectory(prefix="bench_sim_") as tmp:
        def make_cli(suffix, frames):
            path = Path(tmp) / f"s{suffix}"

            def go():
                with contextlib.redirect_stdout(io.StringIO()):
                    rc = fmh(["simulate", "--frames", str(frames), "--seed", str(args.seed),
                              "--out", str(path), "--no-progress"])
                if rc != 0:
                    raise SystemExit(f"fmh simulate failed with {rc}")
            return go
        case("fmh simulate .npy", n, lambda: make_cli(".npy", n))
        nt = max(n // 5, 1)
        case("fmh simulate .tif", nt, lambda: make_cli(".tif", nt))

    # Where a frame's time goes, on the chip's current state.
    _, truth = chip.render(min(n, 2000))
    cells = float(np.mean([len(truth.visible(int(k))) for k in truth.frame_numbers]))

    print(f"synthetic chip, {cfg.camera.width}x{cfg.camera.height} uint8, camera {fps_cam:g} fps; "
          f"{_cpu_model()}, {pinned}; chip set-up {init_s * 1e3:.0f} ms; "
          f"{cells:.1f} cells in view on average")
    print(f"{'case':<20} {'frames':>7} {'fps wall best':>14} {'fps wall med':>13} "
          f"{'fps cpu best':>13} {'x real time':>12}")
    for r in rows:
        print(f"{r['case']:<20} {r['frames']:>7} {r['fps_wall_best']:>14.0f} "
              f"{r['fps_wall_median']:>13.0f} {r['fps_cpu_best']:>13.0f} "
              f"{r['x_realtime_wall_best']:>12.1f}")
    result = {
        "benchmark": "sim",
        "command": " ".join(["python -m bench.bench_sim",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpu": _cpu_model(), "affinity": pinned, "platform": platform.platform(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "numba": numba.__version__},
        "config": {"frames": n, "repeat": args.repeat, "seed": args.seed,
                   "camera_fps": fps_cam, "mean_cells_in_view": cells},
        "chip_setup_s": init_s, "rows": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
