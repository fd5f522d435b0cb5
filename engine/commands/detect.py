"""fmh detect: front end and tracker only."""
from __future__ import annotations

HELP = "detect, track and cut clips (no classification); writes the run files"
DESCRIPTION = """Run the front end and the tracker over SOURCE and write, in DIR:
  manifest.json, tracks.parquet, cells.parquet and clips.h5 (training material).

SOURCE is a path (.npy, .tif, folder of images, video, .h5, .rtdc) or a URI
(sim://?frames=5000&seed=1, genicam://...)."""


def add_arguments(p) -> None:
    from ._runargs import add_pacing
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-clips", action="store_true", help="do not write clips.h5")
    p.add_argument("--donor", default="", help="donor / sequence id stored in clips.h5")
    p.add_argument("--label", default="", choices=["", "fetal", "maternal"],
                   help="the donor's class, stored in clips.h5 (training material)")
    add_pacing(p)


def run(args) -> int:
    from pathlib import Path

    from ..cli import config_from_args
    from ..pipeline import RunOptions, run_pipeline
    from ._runargs import print_summary, speed_from_args
    cfg = config_from_args(args)
    opts = RunOptions(source=args.source, out=Path(args.out), speed=speed_from_args(args),
                      loop=args.loop, max_frames=args.max_frames,
                      write_clips=not args.no_clips, classify=False,
                      progress=not args.quiet, background=args.background or "",
                      donor=args.donor, label=args.label)
    summary = run_pipeline(cfg, opts)
    print_summary(summary, "detect")
    return 0 if summary.status == "complete" else 130
