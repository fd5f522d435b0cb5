"""Collect the runs of ``scripts/experiments.sh`` into one markdown table (and results.json).

    python -m train.report_experiments runs/exp > runs/exp/results.md
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

RUNS = [("sf_fixed", "SlowFast R18 w16, tau 8, fixed 64x64"),
        ("frame2d", "single-frame 2D CNN, fixed 64x64"),
        ("sf_tau2", "SlowFast R18 w16, tau 2 (alpha 2), fixed 64x64"),
        ("sf_bbox", "SlowFast R18 w16, tau 2 (alpha 2), bbox-resize 64x64"),
        ("sf_masked", "SlowFast R18 w16, cell masked out (channel only)")]


def _f(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def collect(root: Path) -> dict:
    out = {}
    for name, what in RUNS:
        d = root / name
        if not d.is_dir():
            continue
        r: dict = {"what": what}
        log = d / "log.csv"
        if log.exists():
            rows = list(csv.DictReader(open(log)))
            r["epochs_done"] = len(rows)
            r["train_seconds"] = sum(float(x["seconds"]) for x in rows)
            if rows:
                r["final_train_loss"] = float(rows[-1]["train_loss"])
                r["final_train_error"] = float(rows[-1]["train_error"])
        for part in ("val", "test"):
            ev = d / f"eval_{part}" / "evaluation.json"
            if ev.exists():
                e = json.loads(ev.read_text())
                r["threshold"] = e["threshold"]
                for v, m in e["views"].items():
                    r[f"{part}_{v}"] = {k: m[k] for k in ("top1_error", "sensitivity",
                                                          "specificity", "auc", "n_cells",
                                                          "confusion")}
                    r[f"{part}_{v}"]["at_0.5"] = m["at_0.5"]
                    r[f"{part}_{v}"]["n_donors"] = e["n_donors"]
        out[name] = r
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0])
    res = collect(root)
    (root / "results.json").write_text(json.dumps(res, indent=2))
    print("| run | epochs | val AUC | val sens. | val spec. | test AUC | test sens. | test spec. "
          "| test top-1 err. (0.5) | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        v, t = r.get("val_single", {}), r.get("test_single", {})
        print(f"| {name}: {r['what']} | {r.get('epochs_done', '-')} | {_f(v.get('auc'))} | "
              f"{_f(v.get('sensitivity'))} | {_f(v.get('specificity'))} | {_f(t.get('auc'))} | "
              f"{_f(t.get('sensitivity'))} | {_f(t.get('specificity'))} | "
              f"{_f(t.get('at_0.5', {}).get('top1_error'))} | "
              f"{_f(r.get('train_seconds'))} |")
    if "test_multi" in res.get("sf_tau2", {}):
        m, s = res["sf_tau2"]["test_multi"], res["sf_tau2"]["test_single"]
        print(f"\nsf_tau2 on test, single view vs 10x3 views: AUC {_f(s['auc'])} vs "
              f"{_f(m['auc'])}, sensitivity {_f(s['sensitivity'])} vs {_f(m['sensitivity'])}, "
              f"specificity {_f(s['specificity'])} vs {_f(m['specificity'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
