"""fmh report: rebuild the per-sample report of a finished run."""
from __future__ import annotations

HELP = "rebuild the per-sample report (report.md, figures) of a finished run"
DESCRIPTION = """Reads DIR/manifest.json and DIR/cells.parquet and writes DIR/report.md,
DIR/report.json and the PNG figures: cells counted, fetal count and fraction (Wilson interval),
the fraction corrected for the model's validated sensitivity and specificity (Rogan-Gladen,
Lang & Reiczigel interval), the estimated fetal bleed and the detection limit of the run.
Blood volume, relevant bleed and confidence come from the config's report section."""


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="run folder (from fmh run / fmh demo)")
    p.add_argument("--method", default="auto",
                   choices=["auto", "lang-reiczigel", "exact", "wilson"],
                   help="interval of the corrected fraction (default auto: lang-reiczigel "
                        "when the validation set's size is known, else exact)")


def run(args) -> int:
    from pathlib import Path

    from ..cli import config_from_args
    from ..errors import EngineError
    from ..report import write_report
    cfg = config_from_args(args)
    run_dir = Path(args.dir)
    if not run_dir.is_dir():
        raise EngineError(f"{run_dir}: not a folder (give the run folder of fmh run)")
    print(write_report(run_dir, cfg, method=args.method))
    print(f"fmh report: wrote {run_dir / 'report.md'}")
    return 0
