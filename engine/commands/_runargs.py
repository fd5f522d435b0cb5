"""Flags shared by `fmh detect`, `fmh run` and `fmh demo` (pacing, limits, output)."""
from __future__ import annotations

import argparse


def add_pacing(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pacing")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--realtime", action="store_true",
                   help="replay at the recorded (or configured) frame rate")
    m.add_argument("--speed", type=float, metavar="X",
                   help="replay at X times the recorded frame rate (default: as fast as possible)")
    g.add_argument("--loop", type=int, default=1, metavar="N", help="replay the source N times")
    g.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    p.add_argument("--background", metavar="IMAGE",
                   help="use this image (.npy or an image file) as the background")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def speed_from_args(args) -> float | None:
    from ..errors import ConfigError
    if getattr(args, "realtime", False):
        return 1.0
    speed = getattr(args, "speed", None)
    if speed is not None and not speed > 0:
        raise ConfigError(f"--speed {speed}: must be > 0")
    if getattr(args, "loop", 1) < 1:
        raise ConfigError(f"--loop {args.loop}: must be >= 1")
    if getattr(args, "max_frames", None) is not None and args.max_frames < 1:
        raise ConfigError(f"--max-frames {args.max_frames}: must be >= 1")
    return speed


def print_summary(summary, verb: str) -> None:
    c = summary.counts
    fps = c.get("frames_processed", 0) / summary.seconds if summary.seconds > 0 else 0.0
    print(f"fmh {verb}: {summary.status}: {c.get('frames_processed', 0)} frames "
          f"({fps:,.0f} frames/s), {c.get('cells_tracked', 0)} cells, "
          f"{c.get('frames_dropped', 0)} frames dropped, {c.get('frame_gaps', 0)} frame-number gaps"
          + (f", {c.get('predictions', 0)} predictions, {c.get('errors', 0)} errors"
             if "predictions" in c and c.get("clips_sent") else "")
          + f" in {summary.seconds:.1f} s")
    tot = (getattr(summary, "latency", None) or {}).get("total_ms") or {}
    if tot.get("n"):
        print(f"fmh {verb}: latency exit frame -> prediction: p50 {tot['p50']:.1f} ms, "
              f"p99 {tot['p99']:.1f} ms, max {tot['max']:.1f} ms over {tot['n']} cells "
              f"(warm-up excluded)")
    print(f"fmh {verb}: files in {summary.out}")
