"""fmh demo: the synthetic chip, live, through the whole pipeline with the bundled model."""
from __future__ import annotations

HELP = "run the synthetic PolyNano chip live through the pipeline with the bundled model"
DESCRIPTION = """Simulates the chip at the camera's frame rate (500 fps) for --seconds, runs the
whole pipeline with the bundled demo model (trained on SYNTHETIC cells), and prints the
report's headline. Files go to --out (default runs/demo)."""


def add_arguments(p) -> None:
    p.add_argument("--seconds", type=float, default=20.0, help="length of the demo [s] (default 20)")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder")
    p.add_argument("--model", default="", metavar="MODEL", help="ONNX model (default: bundled)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="inference workers")
    p.add_argument("--seed", type=int, default=None, help="simulator seed (default sim.seed)")
    p.add_argument("--fast", action="store_true", help="as fast as possible instead of live")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..cli import config_from_args
    from ..errors import ConfigError
    from .run import run_with
    if not args.seconds > 0:
        raise ConfigError(f"--seconds {args.seconds}: must be > 0")
    cfg = config_from_args(args)
    n = max(int(round(args.seconds * cfg.camera.fps)), 1)
    seed = cfg.sim.seed if args.seed is None else args.seed
    live = "0" if args.fast else "1"
    source = f"sim://?frames={n}&seed={seed}&live={live}"
    print(f"fmh demo: simulating {n} frames ({args.seconds:g} s at {cfg.camera.fps:g} fps"
          f"{', as fast as possible' if args.fast else ', live'}) -> {args.out}")
    return run_with(args, verb="demo", source=source, out=args.out,
                    speed=None if args.fast else 1.0)
