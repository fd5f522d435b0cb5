"""fmh bench: run the benchmarks in bench/."""
from __future__ import annotations

HELP = "run benchmarks (python -m bench): front end, ring, simulator, backends, latency"


def add_arguments(p) -> None:
    p.add_argument("name", nargs="?", default="", help="benchmark name or 'all' (empty: list)")
    p.add_argument("args", nargs="*", help="arguments passed to the benchmark")


def run(args) -> int:
    from ..errors import EngineError
    try:
        from bench.__main__ import main
    except ImportError:
        raise EngineError("the bench package is not installed (run from a checkout)") from None
    return main([args.name, *args.args] if args.name else ["--help"])
