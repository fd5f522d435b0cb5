"""Run benchmarks: ``python -m bench NAME [args]`` or ``python -m bench all``.

Each benchmark is a module ``bench/bench_<name>.py`` with a ``main(argv) -> int`` that prints a
table and writes ``bench/out/<name>.json``. Machines are shared and noisy: compare the ratios
that each benchmark prints (engine vs reference in the same run), not absolute times.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)])
                  if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("available:", ", ".join(names) or "(none)")
        return 0 if argv else 2
    which, rest = argv[0], argv[1:]
    todo = names if which == "all" else [which]
    rc = 0
    for name in todo:
        if name not in names:
            print(f"bench: unknown benchmark {name!r} (available: {', '.join(names)})",
                  file=sys.stderr)
            return 2
        mod = importlib.import_module(f"bench.bench_{name}")
        print(f"== bench {name} ==", flush=True)
        rc = max(rc, int(mod.main(rest) or 0))
    return rc


if __name__ == "__main__":
    sys.exit(main())
