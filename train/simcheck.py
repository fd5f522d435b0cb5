"""Check a run of the synthetic chip against the simulator's truth, cell by cell.

A run of ``fmh detect``/``fmh run``/``fmh demo`` on a ``sim://`` source can be scored exactly:
the simulator is deterministic, so the same source spec and configuration (both in the run's
``manifest.json``) give the same sequence and its ground truth
(:class:`engine.sources.sim.Truth`). Every tracked cell (``tracks.parquet``) is matched to the
true cell whose centroid lies within ``tol_px`` of it in most of its detected frames; a
tracked cell matched in fewer than ``min_share`` of its frames is "unmatched" (debris, a
fragment, two cells merged).

This gives, for a classified run, the classifier's sensitivity and specificity on the clips
serving actually produced (detected, tracked, complete and truncated), the true fetal fraction
of the sample, and how far the report's observed and Rogan-Gladen corrected fractions are
from it. For a ``fmh detect`` run it says how many clips of a one-class donor are real cells.

Run as a module::

    python -m train.simcheck runs/demo [runs/demo2 ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["source_truth", "match_cells", "check_run", "main"]


def source_truth(spec: str, cfg):
    """The ground truth of the ``sim://`` source ``spec`` under ``cfg`` (re-simulated).

    Raises
    ------
    ValueError
        ``spec`` is not a ``sim://`` source.
    """
    from engine.sources import open_source
    from engine.sources.sim import SyntheticChipSource
    src = open_source(spec, cfg)
    if not isinstance(src, SyntheticChipSource):
        raise ValueError(f"{spec}: not a sim:// source, so there is no ground truth")
    with src:
        for _ in src.frames():
            pass
        return src.truth


def match_cells(tracks, truth, *, tol_px: float = 8.0, min_share: float = 0.5):
    """Match tracked cells to true cells by centroid distance, frame by frame.

    Parameters
    ----------
    tracks : pandas.DataFrame
        ``cell_id, frame, cx, cy`` per detected frame (``tracks.parquet``).
    truth : engine.sources.sim.Truth
        The sequence's ground truth.
    tol_px : float
        Largest centroid distance [px] that counts as the same cell in a frame.
    min_share : float
        Fraction of a tracked cell's frames that must match its true cell.

    Returns
    -------
    pandas.DataFrame
        One row per tracked cell: ``cell_id, n_frames, truth_id`` (-1 when unmatched),
        ``share`` (matched fraction of its frames), ``truth_cls`` ("" when unmatched) and
        ``truth_complete``.
    """
    import pandas as pd
    rows = [(int(c.cell_id), c.frame_numbers, c.centroids[:, 0], c.centroids[:, 1]) for c in truth.cells]
    t = pd.DataFrame({
        "truth_id": np.concatenate([np.full(len(r[1]), r[0], np.int64) for r in rows])
        if rows else np.zeros(0, np.int64),
        "frame": np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.int64),
        "tx": np.concatenate([r[2] for r in rows]) if rows else np.zeros(0, np.float32),
        "ty": np.concatenate([r[3] for r in rows]) if rows else np.zeros(0, np.float32)})
    tr = tracks[["cell_id", "frame", "cx", "cy"]].copy()
    tr["frame"] = tr["frame"].astype(np.int64)
    n_frames = tr.groupby("cell_id").size().rename("n_frames")
    m = tr.merge(t, on="frame", how="inner")
    m = m[np.hypot(m["cx"] - m["tx"], m["cy"] - m["ty"]) <= tol_px]
    votes = m.groupby(["cell_id", "truth_id"]).size().rename("n").reset_index()
    votes = votes.sort_values(["cell_id", "n", "truth_id"], ascending=[True, False, True])
    best = votes.drop_duplicates("cell_id").set_index("cell_id")
    out = n_frames.to_frame().join(best, how="left")
    out["n"] = out["n"].fillna(0).astype(np.int64)
    out["share"] = out["n"] / out["n_frames"]
    ok = out["share"] >= min_share
    out["truth_id"] = np.where(ok, out["truth_id"].fillna(-1), -1).astype(np.int64)
    cls = {int(c.cell_id): c.cls for c in truth.cells}
    comp = {int(c.cell_id): bool(c.complete) for c in truth.cells}
    out["truth_cls"] = [cls.get(int(i), "") for i in out["truth_id"]]
    out["truth_complete"] = [comp.get(int(i), False) for i in out["truth_id"]]
    return out.drop(columns="n").reset_index()


def _config_of(manifest: dict):
    from engine.config import load_config
    flat = {f"{sec}.{k}": v for sec, d in (manifest.get("config") or {}).items()
            if isinstance(d, dict) for k, v in d.items()}
    return load_config(overrides=flat)


def check_run(run_dir: str | os.PathLike, *, tol_px: float = 8.0,
              min_share: float = 0.5) -> dict[str, Any]:
    """Score one run of a ``sim://`` source against the simulator's truth.

    Returns
    -------
    dict
        ``truth``: true cells and their fetal fraction (all cells seen, complete passages);
        ``cells``: tracked cells, matched, by status; for a classified run ``report``
        (observed and corrected fractions from ``report.json``), ``called_fetal`` and
        ``per_cell`` (sensitivity, specificity and counts on matched cells: all, complete,
        truncated) and ``matched_truth_fetal_fraction``.
    """
    import pandas as pd
    run = Path(run_dir)
    try:
        manifest = json.loads((run / "manifest.json").read_text())
        tracks = pd.read_parquet(run / "tracks.parquet")
        cells = pd.read_parquet(run / "cells.parquet")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{run}: not a readable run folder ({exc})") from None
    spec = (manifest.get("source") or {}).get("spec", "")
    truth = source_truth(spec, _config_of(manifest))
    match = match_cells(tracks, truth, tol_px=tol_px, min_share=min_share)
    cells = cells.merge(match, on="cell_id", how="left")
    cells["truth_cls"] = cells["truth_cls"].fillna("")
    t_cls = np.array([c.cls for c in truth.cells])
    t_comp = np.array([c.complete for c in truth.cells], bool)
    out: dict[str, Any] = {
        "run": str(run), "source": spec, "model": (manifest.get("model") or {}).get("path", ""),
        "truth": {"cells": int(len(t_cls)), "fetal": int((t_cls == "fetal").sum()),
                  "fetal_fraction": float((t_cls == "fetal").mean()) if len(t_cls) else None,
                  "complete": int(t_comp.sum()),
                  "complete_fetal_fraction": float((t_cls[t_comp] == "fetal").mean())
                  if t_comp.any() else None},
        "cells": {"tracked": int(len(cells)),
                  "matched": int((cells["truth_cls"] != "").sum()),
                  "matched_fetal": int((cells["truth_cls"] == "fetal").sum()),
                  "matched_maternal": int((cells["truth_cls"] == "maternal").sum()),
                  "by_status": {str(k): int(v) for k, v in cells["status"].value_counts().items()},
                  "distinct_truth_cells": int(cells.loc[cells["truth_id"] >= 0,
                                                        "truth_id"].nunique())},
    }
    if "label" in cells.columns and "p_fetal" in cells.columns:
        lab = cells["label"].fillna("").astype(str)
        classified = (lab != "") & np.isfinite(cells["p_fetal"].astype(float))
        called = classified & (lab == "fetal")
        out["called_fetal"] = {"n": int(classified.sum()), "fetal": int(called.sum()),
                               "fraction": float(called.sum() / max(int(classified.sum()), 1))}
        per: dict[str, Any] = {}
        for name, sel in (("all", classified),
                          ("complete", classified & (cells["status"] == "complete")),
                          ("truncated", classified & (cells["status"] == "truncated"))):
            y = cells["truth_cls"][sel]
            c = called[sel]
            fet, mat = y == "fetal", y == "maternal"
            per[name] = {"n": int(sel.sum()), "unmatched": int((y == "").sum()),
                         "unmatched_called_fetal": int((c & (y == "")).sum()),
                         "fetal": int(fet.sum()), "maternal": int(mat.sum()),
                         "sensitivity": float((c & fet).sum() / fet.sum()) if fet.any() else None,
                         "specificity": float((~c & mat).sum() / mat.sum()) if mat.any() else None}
        out["per_cell"] = per
        m = classified & (cells["truth_cls"] != "")
        out["matched_truth_fetal_fraction"] = (float((cells["truth_cls"][m] == "fetal").mean())
                                               if m.any() else None)
        try:
            rep = json.loads((run / "report.json").read_text())
        except (OSError, ValueError):
            rep = {}
        out["report"] = _report_fractions(rep)
    return out


def _report_fractions(rep: dict) -> dict:
    """Observed and corrected fractions with their intervals from a ``report.json``."""
    out: dict[str, Any] = {}

    def find(d, key):
        if isinstance(d, dict):
            if key in d and isinstance(d[key], dict):
                return d[key]
            for v in d.values():
                r = find(v, key)
                if r is not None:
                    return r
        return None

    for key in ("observed", "corrected"):
        d = find(rep, key)
        if d is not None:
            out[key] = {k: d.get(k) for k in ("estimate", "lo", "hi") if k in d}
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.simcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="run folders of sim:// sources")
    ap.add_argument("--tol", type=float, default=8.0, help="centroid match distance [px]")
    ap.add_argument("--json", default="", metavar="FILE", help="also write the results here")
    a = ap.parse_args(argv)
    results = [check_run(r, tol_px=a.tol) for r in a.runs]
    print("| run | true fetal fraction (all / complete cells) | cells tracked (matched) | "
          "called fetal | corrected | Se / Sp all | Se / Sp complete | Se / Sp truncated |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        t, c = r["truth"], r["cells"]
        line = (f"| {r['run']} | {_pct(t['fetal_fraction'])} / "
                f"{_pct(t['complete_fetal_fraction'])} | {c['tracked']} ({c['matched']}) | ")
        if "per_cell" in r:
            rep = r.get("report", {})
            corr = rep.get("corrected", {})
            p = r["per_cell"]
            line += (f"{_pct(r['called_fetal']['fraction'])} | {_pct(corr.get('estimate'))} "
                     f"({_pct(corr.get('lo'))} - {_pct(corr.get('hi'))}) | "
                     + " | ".join(f"{_num(p[k]['sensitivity'])} / {_num(p[k]['specificity'])}"
                                  f" (n {p[k]['n']})" for k in ("all", "complete", "truncated"))
                     + " |")
        else:
            line += "- | - | - | - | - |"
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
