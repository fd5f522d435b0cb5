"""Evaluation: metrics, single- and multi-view prediction, reports (JSON + markdown).

The metrics follow the report (top-1 error, confusion matrix, fetal sensitivity) and pitfall 19
(per-class figures and the confusion matrix in every evaluation, not accuracy alone). The
deployed protocol is one view per cell; the report's 10 temporal x 3 spatial views are
reported beside it, never instead of it (pitfall 21).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .data import CLASSES

__all__ = ["confusion", "roc_auc", "binary_metrics", "threshold_for_sensitivity",
           "per_donor", "softmax", "Predictor", "load_predictor", "predict_dataset",
           "evaluate", "write_report"]


# --------------------------------------------------------------------------------------------
# Metrics (numpy only)
# --------------------------------------------------------------------------------------------

def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float logits (N, K)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = 2) -> np.ndarray:
    """Confusion matrix ``C[true, predicted]`` (counts, int64 (K, K))."""
    yt = np.asarray(y_true, np.int64)
    yp = np.asarray(y_pred, np.int64)
    c = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(c, (yt, yp), 1)
    return c


def roc_auc(y_true: Sequence[int], score: Sequence[float]) -> float:
    """Area under the ROC curve of ``score`` for the positive class 1 (ties count half).

    NaN when only one class is present.
    """
    y = np.asarray(y_true, np.int64)
    s = np.asarray(score, np.float64)
    n_pos = int((y == 1).sum())
    n_neg = int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with mid-ranks for ties
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    ss = s[order]
    i = 0
    while i < len(ss):
        j = i
        while j + 1 < len(ss) and ss[j + 1] == ss[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(y_true: Sequence[int], p_fetal: Sequence[float],
                   threshold: float = 0.5) -> dict:
    """Top-1 error, confusion, sensitivity/specificity for fetal (class 1), AUC.

    A cell is called fetal when ``p_fetal >= threshold``.
    """
    y = np.asarray(y_true, np.int64)
    p = np.asarray(p_fetal, np.float64)
    pred = (p >= threshold).astype(np.int64)
    c = confusion(y, pred)
    tn, fp, fn, tp = (int(v) for v in c.ravel())
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    return {
        "n_cells": int(len(y)), "threshold": float(threshold),
        "top1_error": _ratio(fp + fn, len(y)), "accuracy": _ratio(tp + tn, len(y)),
        "sensitivity": sens, "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2 if not (math.isnan(sens) or math.isnan(spec))
        else float("nan"),
        "precision_fetal": _ratio(tp, tp + fp), "precision_maternal": _ratio(tn, tn + fn),
        "auc": roc_auc(y, p),
        "confusion": {"classes": list(CLASSES), "rows": "true", "cols": "predicted",
                      "matrix": c.tolist()},
    }


def threshold_for_sensitivity(y_true: Sequence[int], p_fetal: Sequence[float],
                              target: float) -> float:
    """A decision threshold whose fetal sensitivity on these cells is at least ``target``.

    Of the thresholds that reach the target, the highest is taken (it keeps the specificity as
    high as the target allows), placed halfway between the k-th highest fetal score and the
    next lower score of any cell, so that a tiny numerical difference (ONNX Runtime vs
    PyTorch) does not move a cell across it. Returns 0.5 when there are no fetal cells.
    """
    y = np.asarray(y_true, np.int64)
    p = np.asarray(p_fetal, np.float64)
    pos = np.sort(p[y == 1])[::-1]
    if len(pos) == 0:
        return 0.5
    k = int(math.ceil(target * len(pos) - 1e-9))   # fetal cells that must be called fetal
    k = min(max(k, 1), len(pos))
    edge = float(pos[k - 1])
    below = p[p < edge]
    if len(below) == 0:
        return edge
    return float(0.5 * (edge + below.max()))


def per_donor(donors: Sequence[str], y_true: Sequence[int], p_fetal: Sequence[float],
              threshold: float) -> list[dict]:
    """Per donor: label, cells, accuracy and mean p(fetal) (the fetal fraction it would report)."""
    d = np.asarray(donors, dtype=object)
    y = np.asarray(y_true, np.int64)
    p = np.asarray(p_fetal, np.float64)
    out = []
    for donor in sorted(set(d.tolist())):
        m = d == donor
        pred = (p[m] >= threshold).astype(np.int64)
        labels = sorted(set(y[m].tolist()))
        out.append({"donor": str(donor),
                    "label": CLASSES[labels[0]] if len(labels) == 1 and labels[0] >= 0 else "mixed",
                    "n_cells": int(m.sum()), "accuracy": float((pred == y[m]).mean()),
                    "fetal_fraction_called": float(pred.mean()),
                    "mean_p_fetal": float(p[m].mean())})
    return out


# --------------------------------------------------------------------------------------------
# Predictors: a torch checkpoint or an ONNX artefact behind one call
# --------------------------------------------------------------------------------------------

@dataclass
class Predictor:
    """``logits(batch float32 N,C,T,H,W) -> (N, K)`` with the model's input ``meta``."""

    meta: dict
    logits: Callable[[np.ndarray], np.ndarray]
    kind: str
    path: str
    threshold: float = 0.5
    model: Any = None          # the torch module (checkpoints only; for Grad-CAM)
    arch: str = ""


def load_predictor(path: str | os.PathLike, *, device: str = "cpu") -> Predictor:
    """Open a checkpoint (``.pt``/``.pth``/``.pyth``) or an ONNX artefact (``.onnx``)."""
    p = Path(path)
    if p.suffix == ".onnx":
        from engine.infer.artefact import ModelArtefact
        import onnxruntime as ort
        art = ModelArtefact.load(p)
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return np.asarray(sess.run(None, {name: np.ascontiguousarray(x, np.float32)})[0])
        meta = dict(art.meta)
        thr = float(meta.get("threshold", 0.5))
        return Predictor(meta, run, "onnx", str(p), thr,
                         arch=str(meta.get("arch", {}).get("name", "")))
    import torch
    from .loop import load_model
    model, info = load_model(p, device=device)

    def run_t(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x)).to(device)).float().cpu().numpy()
    return Predictor(info["meta"], run_t, "torch", str(p), float(info.get("threshold", 0.5)),
                     model, arch=str(info["arch"].get("name", "")))


def predict_dataset(pred: Predictor, dataset, *, views: str = "single", batch_size: int = 8,
                    progress: bool = False) -> np.ndarray:
    """p(fetal) per item of a :class:`~train.data.ClipDataset` (float64 (N,)).

    ``views="multi"`` averages the softmax over the views that ``preprocess(views="multi")``
    makes for each clip (the report's 10 temporal x 3 spatial).
    """
    from engine.infer.preprocess import preprocess
    from tqdm import tqdm
    out = np.empty(len(dataset), np.float64)
    pos = CLASSES.index("fetal")
    idx = range(0, len(dataset), batch_size)
    for s in tqdm(idx, desc=f"predict ({views})", disable=not progress, leave=False):
        ids = list(range(s, min(s + batch_size, len(dataset))))
        clips = [dataset.frames(i) for i in ids]
        if views == "multi":
            x, owner = preprocess(clips, pred.meta, views="multi")
            owner = np.asarray(owner)
            prob = np.concatenate([softmax(pred.logits(x[k:k + 32]))
                                   for k in range(0, len(x), 32)])
            for j, i in enumerate(ids):
                out[i] = prob[owner == j, pos].mean()
        else:
            x = preprocess(clips, pred.meta)
            out[ids] = softmax(pred.logits(x))[:, pos]
    return out


def evaluate(model_path: str | os.PathLike, store_paths: Sequence[str | os.PathLike], *,
             labels: Mapping[str, str] | str | None = None, views: Sequence[str] = ("single",),
             mask_cell: bool = False, threshold: float | None = None, device: str = "cpu",
             batch_size: int = 8, progress: bool = True, gradcam_dir: str | None = None,
             gradcam_n: int = 4) -> dict:
    """Evaluate a model on labelled clip stores; returns the report as a dict.

    Parameters
    ----------
    model_path : path-like
        A checkpoint or an ONNX artefact.
    store_paths : sequence of path-like
        Clip stores or folders of them (labelled; see :func:`train.data.find_stores`).
    *
    labels : mapping or CSV path, optional
        donor -> label, filling in or overriding the stores' labels.
    views : sequence of {"single", "multi"}
        Protocols to evaluate; the first one is the headline.
    mask_cell : bool
        Evaluate on clips with the cell blanked (channel-only confound control).
    threshold : float, optional
        Decision threshold on p(fetal); default the model's own.
    gradcam_dir : path-like, optional
        Write Grad-CAM strips of a few clips there (checkpoints only).
    """
    from .data import ClipDataset, find_stores
    pred = load_predictor(model_path, device=device)
    stores = find_stores(store_paths, labels)
    ds = ClipDataset(stores, pred.meta, mask=mask_cell,
                     pick="constriction" if pred.arch == "frame2d" else None)
    thr = float(pred.threshold if threshold is None else threshold)
    report: dict[str, Any] = {
        "model": str(model_path), "model_kind": pred.kind, "threshold": thr,
        "mask_cell": bool(mask_cell), "stores": [str(s.path) for s in stores],
        "n_donors": len({s.donor for s in stores}),
        "cells_per_class": {c: int((ds.labels == k).sum()) for k, c in enumerate(CLASSES)},
        "views": {},
    }
    for v in views:
        p = predict_dataset(pred, ds, views=v, batch_size=batch_size, progress=progress)
        m = binary_metrics(ds.labels, p, thr)
        m["at_0.5"] = {k: binary_metrics(ds.labels, p, 0.5)[k]
                       for k in ("top1_error", "sensitivity", "specificity")}
        m["per_donor"] = per_donor(ds.donors, ds.labels, p, thr)
        report["views"][v] = m
    if gradcam_dir and pred.model is not None:
        from .gradcam import gradcam_strips
        report["gradcam"] = gradcam_strips(pred.model, ds, pred.meta, gradcam_dir, n=gradcam_n)
    ds.close()
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike,
                 stem: str = "evaluation") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    jp.write_text(json.dumps(report, indent=2, default=float))
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"- stores: {len(report['stores'])}, donors: {report['n_donors']}, cells: "
             + ", ".join(f"{k} {v}" for k, v in report["cells_per_class"].items()),
             f"- decision threshold on p(fetal): {report['threshold']:.4g}",
             f"- cell masked out (channel-only control): {report['mask_cell']}", ""]
    lines += ["| views | top-1 error | sensitivity (fetal) | specificity | balanced acc. | AUC |",
              "|---|---|---|---|---|---|"]
    for v, m in report["views"].items():
        lines.append(f"| {v} | {_fmt(m['top1_error'])} | {_fmt(m['sensitivity'])} | "
                     f"{_fmt(m['specificity'])} | {_fmt(m['balanced_accuracy'])} | "
                     f"{_fmt(m['auc'])} |")
    for v, m in report["views"].items():
        c = m["confusion"]["matrix"]
        lines += ["", f"## {v} view(s): confusion (rows true, columns predicted)", "",
                  "| | maternal | fetal |", "|---|---|---|",
                  f"| maternal | {c[0][0]} | {c[0][1]} |", f"| fetal | {c[1][0]} | {c[1][1]} |",
                  "", "| donor | label | cells | accuracy | called fetal |", "|---|---|---|---|---|"]
        for d in m["per_donor"]:
            lines.append(f"| {d['donor']} | {d['label']} | {d['n_cells']} | "
                         f"{_fmt(d['accuracy'])} | {_fmt(d['fetal_fraction_called'])} |")
    if report.get("gradcam"):
        lines += ["", "## Grad-CAM", ""] + [f"- `{p}`" for p in report["gradcam"]]
    mp.write_text("\n".join(lines) + "\n")
    return jp, mp
