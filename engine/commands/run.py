"""fmh run: the whole pipeline."""
from __future__ import annotations

HELP = "the whole pipeline: detect, classify and report"
DESCRIPTION = """Frames from SOURCE go through the front end and tracker; every cell's clip is
classified by inference workers over ZeroMQ; DIR receives the run files, predictions as they
arrive, and the per-sample report (report.md and figures)."""


def add_arguments(p) -> None:
    from ._runargs import add_pacing
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--model", default="", metavar="MODEL",
                   help="ONNX model artefact (default: the bundled demo model)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local inference workers (default: serving.workers)")
    p.add_argument("--no-clips", action="store_true", help="do not write clips.h5")
    add_pacing(p)


def run(args) -> int:
    return run_with(args, verb="run")


def run_with(args, verb: str, source: str | None = None, out=None, speed=None) -> int:
    from pathlib import Path

    from ..cli import config_from_args
    from ..errors import ConfigError
    from ..pipeline import RunOptions, run_pipeline
    from ._runargs import print_summary, speed_from_args
    cfg = config_from_args(args)
    workers = args.workers if args.workers is not None else cfg.serving.workers
    if workers < 1:
        raise ConfigError(f"--workers {workers}: need at least one local worker "
                          "(start remote ones with fmh serve and set serving.workers)")
    opts = RunOptions(source=source or args.source, out=Path(out or args.out),
                      speed=speed if speed is not None else speed_from_args(args),
                      loop=getattr(args, "loop", 1), max_frames=getattr(args, "max_frames", None),
                      write_clips=not getattr(args, "no_clips", False), classify=True,
                      model=args.model, workers=workers, progress=not args.quiet,
                      background=getattr(args, "background", "") or "")
    summary = run_pipeline(cfg, opts)
    print_summary(summary, verb)
    from ..report import write_report
    headline = write_report(summary.out, cfg)
    print(headline)
    print(f"fmh {verb}: report: {Path(summary.out) / 'report.md'}")
    return 0 if summary.status == "complete" else 130
