"""The ``fmh`` command: one verb per module in :mod:`engine.commands`.

Each verb module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``
and imports its heavy dependencies inside ``run`` so that ``fmh --help`` stays fast. Common
flags (``--config``, ``--set``) are added here. Errors the engine raises on purpose end the
command with exit status 2 and one line naming the bad value; Ctrl-C ends it with 130.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import EngineError

# Verb -> module under engine.commands; a verb whose module is absent is not offered.
VERBS = ["simulate", "detect", "run", "demo", "serve", "keys", "train", "evaluate", "export",
         "report", "bench"]


def _load_verbs() -> dict:
    mods = {}
    for verb in VERBS:
        try:
            mods[verb] = importlib.import_module(f"engine.commands.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name == f"engine.commands.{verb}":
                continue
            raise
    return mods


def add_common(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeated ``--set section.key=value``."""
    p.add_argument("--config", metavar="FILE", help="YAML config layered over configs/default.yaml")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   dest="overrides", help="override one config key (repeatable)")


def config_from_args(args):
    """The validated config for a parsed command line."""
    from .config import load_config
    return load_config(getattr(args, "config", None), getattr(args, "overrides", ()))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="fmh", description="Fetal-maternal RBC classification beside the PolyNano chip.")
    parser.add_argument("--version", action="version", version=f"fmh-engine {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, mod in _load_verbs().items():
        p = sub.add_parser(verb, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common(p)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except EngineError as exc:
        print(f"fmh {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmh {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
