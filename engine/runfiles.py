"""The files of a run (DESIGN.md "Files of a finished run"), written as the run goes.

``RunFiles`` owns one output folder:

- ``manifest.json``: written at start (``status: running``), rewritten at every
  :meth:`RunFiles.checkpoint` with the counts so far, and at the end (``complete``,
  ``interrupted`` or ``failed``); always a complete JSON document (written to a temporary file
  and renamed).
- ``tracks.parquet``: one row per cell per frame, appended in row groups of about
  ``ROW_GROUP`` rows as cells finish; closed (and so valid) at the end of the run, interrupted
  or not.
- ``cells.parquet``: one row per cell with its features, and ``p_fetal``/``label`` (plus the
  latency of its prediction) once classified; rewritten atomically at every checkpoint and at
  the end from rows kept in memory. The rows are kept compact (features and timings as float
  arrays, not dicts of Python floats): 0.85 kB a classified cell with 22 features instead of
  1.7 kB (tracemalloc), i.e. ~0.7 MB per minute at 13 cells/s; the full record of every
  prediction (probs, model id) is in predictions.jsonl.
- ``predictions.jsonl``: one JSON prediction per line, appended and flushed as they arrive.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import SourceError
from .types import CellClip, Prediction

__all__ = ["RunFiles", "TRACK_SCHEMA", "TIMING_FIELDS", "write_json_atomic", "read_manifest"]

TRACK_SCHEMA = pa.schema([
    ("cell_id", pa.int64()), ("frame", pa.int64()), ("cx", pa.float32()), ("cy", pa.float32()),
    ("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()),
    ("area", pa.int32()),
])

ROW_GROUP = 8192          # tracks.parquet rows per row group (flushed earlier at checkpoints)

# Per-cell timing of a classified cell (see engine.pipeline): host-monotonic times [s] and
# the parts of the latency [ms]. Written to predictions.jsonl and cells.parquet.
TIMING_FIELDS = ("exit_frame", "close_frame", "t_exit_s", "t_closed_s", "t_pred_s", "latency_ms", "track_ms",
                 "handoff_ms", "queue_ms", "worker_wait_ms", "compute_ms", "trip_ms", "attempts")

_BASE = ("cell_id", "first_frame", "last_frame", "n_frames", "status", "reason")
_INT_COLS = ("cell_id", "first_frame", "last_frame", "n_frames", "exit_frame", "close_frame",
             "attempts")
_STR_COLS = ("status", "reason", "label", "error")
_NO_PRED = "no prediction"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a run folder; SourceError naming the file when missing or corrupt."""
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(f"{path}: no manifest.json (is this a run folder?)") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: unreadable manifest ({exc})") from None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "value"):
        return o.value
    return str(o)


class RunFiles:
    """Writer of one run folder. Thread-safe: predictions may arrive from another thread.

    Parameters
    ----------
    out : path-like
        The run folder (created).
    manifest : mapping
        Initial manifest content (software, config, source, model...); ``counts`` and the
        start/end times are managed here.
    classify : bool
        The cells will be classified: ``cells.parquet`` gets ``p_fetal``, ``label`` and
        ``error`` columns even when no prediction arrived (an interrupted run).

    Attributes
    ----------
    n_predictions, n_fetal, n_errors : int
        Running counts of the predictions received (for the progress line).
    """

    def __init__(self, out: str | os.PathLike, manifest: Mapping[str, Any], *,
                 classify: bool = False):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise SourceError(f"--out {self.out}: exists and is not a folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".fmh-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SourceError(f"--out {self.out}: cannot write there "
                              f"({exc.strerror or exc})") from None
        self.classify = bool(classify)
        self._lock = threading.Lock()
        self.manifest = dict(manifest)
        self.manifest.setdefault("counts", {})
        self.manifest["status"] = "running"
        self.manifest["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # Per cell, compact (kept for the whole run): cell id -> (first_frame, last_frame,
        # n_frames, status, reason, features float64 array indexed by _feat_idx, NaN = absent);
        # cell id -> (p_fetal, label, error); cell id -> TIMING_FIELDS float64 array (NaN =
        # absent).
        self._cells: dict[int, tuple] = {}
        self._feat_idx: dict[str, int] = {}
        self._preds: dict[int, tuple[float, str, str]] = {}
        self._timing: dict[int, np.ndarray] = {}
        self.n_predictions = self.n_fetal = self.n_errors = 0
        self._rows: list[pa.Table] = []
        self._n_rows = 0
        self._tracks = pq.ParquetWriter(str(self.out / "tracks.parquet"), TRACK_SCHEMA)
        self._pred_file = open(self.out / "predictions.jsonl", "w", buffering=1)
        self._closed = False
        write_json_atomic(self.out / "manifest.json", self.manifest)

    # -- cells ----------------------------------------------------------------------------
    def add_clip(self, clip: CellClip) -> None:
        """Record a finished cell: its per-frame rows and its cell row."""
        n = len(clip.frame_indices)
        b = np.asarray(clip.boxes, dtype=np.int32).reshape(n, 4)
        c = np.asarray(clip.centroids, dtype=np.float32).reshape(n, 2)
        table = pa.table({
            "cell_id": np.full(n, clip.cell_id, np.int64),
            "frame": np.asarray(clip.frame_indices, np.int64),
            "cx": c[:, 0], "cy": c[:, 1],
            "x0": b[:, 0], "y0": b[:, 1], "x1": b[:, 2], "y1": b[:, 3],
            "area": np.asarray(clip.areas, np.int32),
        }, schema=TRACK_SCHEMA)
        feats = [(str(k), float(v) if v is not None else math.nan)
                 for k, v in clip.features.items()
                 # a feature never overwrites a table column
                 if k not in _BASE and k not in TIMING_FIELDS and k not in ("p_fetal", "label",
                                                                            "error")]
        with self._lock:
            if self._closed:
                return
            for k, _ in feats:
                if k not in self._feat_idx:
                    self._feat_idx[k] = len(self._feat_idx)
            values = np.full(len(self._feat_idx), np.nan)
            for k, v in feats:
                values[self._feat_idx[k]] = v
            row = (int(clip.frame_indices[0]) if n else -1,
                   int(clip.frame_indices[-1]) if n else -1, int(n),
                   _intern(getattr(clip.status, "value", str(clip.status))),
                   _intern(str(clip.reason)), values)
            self._rows.append(table)
            self._n_rows += n
            if self._n_rows >= ROW_GROUP:
                self._flush_tracks()
            self._cells[int(clip.cell_id)] = row

    def _flush_tracks(self) -> None:
        if self._rows:
            self._tracks.write_table(pa.concat_tables(self._rows))
            self._rows, self._n_rows = [], 0

    def add_prediction(self, pred: Prediction, timing: Mapping[str, Any] | None = None) -> None:
        """Record a prediction (appended to predictions.jsonl at once).

        Parameters
        ----------
        pred : Prediction
        timing : mapping, optional
            The cell's :data:`TIMING_FIELDS` (host-monotonic times [s], latency parts [ms]).
        """
        rec = {"cell_id": int(pred.cell_id), "p_fetal": _finite_or_none(pred.p_fetal),
               "label": pred.label, "probs": [float(p) for p in pred.probs],
               "model_id": pred.model_id, "latency_ms": _finite_or_none(pred.latency_ms),
               "error": pred.error}
        if timing:
            for k in TIMING_FIELDS:
                if k in timing:
                    v = timing[k]
                    rec[k] = int(v) if k in _INT_COLS else _finite_or_none(v)
        with self._lock:
            cid = int(pred.cell_id)
            first = cid not in self._preds
            self._preds[cid] = (float(pred.p_fetal), _intern(str(pred.label)),
                                _intern(str(pred.error)))
            if timing:
                self._timing[cid] = np.array([math.nan if rec.get(k) is None else rec[k]
                                              for k in TIMING_FIELDS], np.float64)
            if first:
                self.n_predictions += 1
                if pred.error:
                    self.n_errors += 1
                elif pred.label == "fetal":
                    self.n_fetal += 1
            if not self._pred_file.closed:
                self._pred_file.write(json.dumps(rec) + "\n")

    @property
    def n_cells(self) -> int:
        return len(self._cells)

    def predictions(self) -> dict[int, Prediction]:
        """The predictions received so far (cell id -> Prediction with ``cell_id``,
        ``p_fetal``, ``label`` and ``error``; probs and model id are in predictions.jsonl)."""
        with self._lock:
            return {k: Prediction(cell_id=k, p_fetal=p, label=lab, error=err)
                    for k, (p, lab, err) in self._preds.items()}

    def timings(self) -> dict[int, dict]:
        """Per-cell timing records received so far (cell id -> the TIMING_FIELDS it has)."""
        with self._lock:
            return {k: _timing_dict(v) for k, v in self._timing.items()}

    # -- progress and end -----------------------------------------------------------------
    def update_counts(self, **counts: Any) -> None:
        with self._lock:
            self.manifest["counts"].update(counts)

    def checkpoint(self, **counts: Any) -> None:
        """Write what is known so far: tracks row group, cells.parquet, the manifest."""
        with self._lock:
            if self._closed:
                return
            self.manifest["counts"].update(counts)
            self._flush_tracks()
            self._write_cells()
            self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json_atomic(self.out / "manifest.json", self.manifest)

    def close(self, status: str = "complete", **extra: Any) -> None:
        """Write cells.parquet and the final manifest; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._flush_tracks()
            self._tracks.close()
            self._pred_file.close()
            self._write_cells()
            self.manifest.update(extra)
            self.manifest["status"] = status
            self.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json_atomic(self.out / "manifest.json", self.manifest)

    def _write_cells(self) -> None:
        ids = sorted(self._cells)
        rows = [self._cells[i] for i in ids]
        n, nf = len(ids), len(self._feat_idx)
        cols: dict[str, pa.Array] = {"cell_id": pa.array(ids, pa.int64())}
        for j, k in enumerate(_BASE[1:]):
            vals = [r[j] for r in rows]
            cols[k] = pa.array(vals, pa.string() if k in _STR_COLS else pa.int64())
        feats = np.full((n, nf), np.nan)
        for i, r in enumerate(rows):
            feats[i, :len(r[5])] = r[5]
        for k, j in self._feat_idx.items():
            cols[k] = pa.array(feats[:, j], pa.float64())
        if self.classify or self._preds:
            preds = [self._preds.get(i) for i in ids]
            cols["p_fetal"] = pa.array([p[0] if p is not None and not p[2] else math.nan
                                        for p in preds], pa.float64())
            cols["label"] = pa.array([p[1] if p is not None and not p[2] else ""
                                      for p in preds], pa.string())
            cols["error"] = pa.array([p[2] if p is not None else _NO_PRED for p in preds],
                                     pa.string())
            none = np.full(len(TIMING_FIELDS), np.nan)
            t = np.array([self._timing.get(i, none) for i in ids],
                         np.float64).reshape(n, len(TIMING_FIELDS))
            for j, k in enumerate(TIMING_FIELDS):
                if k in _INT_COLS:
                    cols[k] = pa.array(np.where(np.isnan(t[:, j]), -1, t[:, j]).astype(np.int64),
                                       pa.int64())
                else:
                    cols[k] = pa.array(t[:, j], pa.float64())
        tmp = self.out / "cells.parquet.tmp"
        pq.write_table(pa.table(cols), str(tmp))
        os.replace(tmp, self.out / "cells.parquet")


def _intern(text: str) -> str:
    """One shared copy of a short, repeated string (labels, statuses, errors)."""
    return sys.intern(text) if len(text) <= 64 else text


def _timing_dict(values: np.ndarray) -> dict:
    """A compact timing record back to {field: value} (absent fields left out)."""
    out: dict[str, Any] = {}
    for k, v in zip(TIMING_FIELDS, values.tolist()):
        if not math.isnan(v):
            out[k] = int(v) if k in _INT_COLS else v
    return out


def _finite_or_none(x: Any):
    try:
        return float(x) if math.isfinite(float(x)) else None
    except (TypeError, ValueError):
        return None
