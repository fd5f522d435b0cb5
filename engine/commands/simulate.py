"""``fmh simulate``: write a synthetic PolyNano sequence (.npy or .tif) and its ground truth."""
from __future__ import annotations

HELP = "write a synthetic PolyNano sequence (.npy/.tif) and <stem>.truth.json beside it"
DESCRIPTION = """\
Write a synthetic PolyNano chip sequence with ground truth.

Frames are streamed to disk as they are made: a memory-mapped .npy (N, H, W) uint8, or a
multipage TIFF (one page per frame, appended 128 pages at a time). The truth (per cell: class,
entry/exit frames, per-frame centroid, box, area; per frame: the visible cells) goes to
<stem>.truth.json beside it (s.npy -> s.truth.json).

examples:
  fmh simulate --frames 5000 --seed 1 --out s.npy
  fmh simulate --frames 2000 --donor 3 --fetal-fraction 1 --out fetal3.tif
  fmh simulate --frames 1000 --out g.npy --set sim.gap_rate=0.01
"""

SUFFIXES = (".npy", ".tif", ".tiff")


def add_arguments(p) -> None:
    p.add_argument("--frames", type=int, default=5000, metavar="N",
                   help="stored frames to write (default 5000)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed (sim.seed)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, .npy or .tif")
    p.add_argument("--rate", type=float, default=None, metavar="HZ",
                   help="mean cell arrival rate [1/s] (sim.rate_hz)")
    p.add_argument("--fetal-fraction", type=float, default=None, metavar="F",
                   help="probability that a cell is fetal (sim.fetal_fraction)")
    p.add_argument("--donor", type=int, default=None, metavar="D",
                   help="donor number: sets the per-donor look (sim.donor)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import time
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from ..cli import config_from_args
    from ..errors import ConfigError, EngineError
    from ..sources.sim import SyntheticChip, truth_path_for

    out = Path(args.out)
    if out.suffix.lower() not in SUFFIXES:
        raise EngineError(f"--out {out}: unsupported suffix {out.suffix!r} "
                          f"(use {', '.join(SUFFIXES)})")
    if out.parent and not out.parent.exists():
        raise EngineError(f"--out {out}: folder {out.parent} does not exist")
    if args.frames is None or args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: must be a positive integer")
    cfg = config_from_args(args)
    sim = {k: v for k, v in (("seed", args.seed), ("rate_hz", args.rate),
                             ("fetal_fraction", args.fetal_fraction), ("donor", args.donor))
           if v is not None}
    if sim:
        try:
            cfg = cfg.replace(sim=sim)
        except ConfigError as exc:
            raise ConfigError(f"command line: {exc}") from None
    n = int(args.frames)
    H, W = cfg.camera.height, cfg.camera.width
    truth_path = truth_path_for(out)

    t0 = time.perf_counter()
    chip = SyntheticChip(cfg)
    t_start = time.perf_counter()
    bar = tqdm(total=n, unit="frame", desc=f"simulate {out.name}", disable=args.no_progress,
               mininterval=0.25, smoothing=0.1)
    try:
        if out.suffix.lower() == ".npy":
            mm = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(n, H, W))
            done = 0
            for _ in chip.frames(n, out=mm):
                done += 1
                if done % 64 == 0:
                    bar.update(64)
            bar.update(done % 64)
            mm.flush()
            del mm
        else:
            import tifffile
            bigtiff = n * H * W > 2 ** 31
            chunk = np.empty((min(n, 128), H, W), np.uint8)
            with tifffile.TiffWriter(out, bigtiff=bigtiff) as tw:
                done = 0
                while done < n:
                    k = min(n - done, chunk.shape[0])
                    for _ in chip.frames(k, out=chunk):
                        pass
                    # One page per frame, appended to one contiguous series, 128 at a time.
                    tw.write(chunk[:k], contiguous=True, photometric="minisblack", metadata=None)
                    done += k
                    bar.update(k)
    except OSError as exc:
        raise EngineError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    finally:
        bar.close()
    t_frames = time.perf_counter() - t_start
    truth = chip.truth
    truth.to_json(truth_path)
    total = time.perf_counter() - t0
    c = truth.counts()
    print(f"wrote {out}: {c['frames']} frames {W}x{H} uint8"
          + (f" ({c['gaps']} lost camera frames)" if c["gaps"] else ""))
    print(f"wrote {truth_path}: {c['cells']} cells ({c['fetal']} fetal, {c['maternal']} maternal, "
          f"{c['complete']} complete passages), seed {truth.seed}, donor {truth.donor}")
    rate = n / max(t_frames, 1e-9)
    print(f"{total:.2f} s in all, frames in {t_frames:.2f} s = {rate:.0f} frames/s "
          f"({rate / cfg.camera.fps:.1f}x real time at {cfg.camera.fps:g} fps)")
    return 0
