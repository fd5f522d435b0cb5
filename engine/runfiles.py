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
  the end from rows kept in memory (a sequence has hundreds to a few thousand cells).
- ``predictions.jsonl``: one JSON prediction per line, appended and flushed as they arrive.
"""
from __future__ import annotations

import json
import math
import os
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
TIMING_FIELDS = ("exit_frame", "close_frame", "t_exit_s", "t_pred_s", "latency_ms", "track_ms",
                 "handoff_ms", "queue_ms", "worker_wait_ms", "compute_ms", "attempts")

_BASE = ("cell_id", "first_frame", "last_frame", "n_frames", "status", "reason")
_INT_COLS = ("cell_id", "first_frame", "last_frame", "n_frames", "exit_frame", "close_frame",
             "attempts")
_STR_COLS = ("status", "reason", "label", "error")


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
        self._cells: dict[int, dict] = {}
        self._preds: dict[int, Prediction] = {}
        self._timing: dict[int, dict] = {}
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
        row = {"cell_id": int(clip.cell_id),
               "first_frame": int(clip.frame_indices[0]) if n else -1,
               "last_frame": int(clip.frame_indices[-1]) if n else -1,
               "n_frames": int(n), "status": getattr(clip.status, "value", str(clip.status)),
               "reason": clip.reason}
        for k, v in clip.features.items():
            if k in _BASE or k in TIMING_FIELDS or k in ("p_fetal", "label", "error"):
                continue                     # a feature never overwrites a table column
            row[k] = float(v) if v is not None else math.nan
        with self._lock:
            if self._closed:
                return
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
            self._preds[cid] = pred
            if timing:
                self._timing[cid] = {k: rec[k] for k in TIMING_FIELDS if k in rec}
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
        with self._lock:
            return dict(self._preds)

    def timings(self) -> dict[int, dict]:
        """Per-cell timing records received so far (cell id -> TIMING_FIELDS)."""
        with self._lock:
            return {k: dict(v) for k, v in self._timing.items()}

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
        rows = [dict(r) for _, r in sorted(self._cells.items())]
        classified = self.classify or bool(self._preds)
        for r in rows:
            p = self._preds.get(r["cell_id"])
            if classified:
                r["p_fetal"] = float(p.p_fetal) if p is not None and not p.error else math.nan
                r["label"] = (p.label if p is not None and not p.error else "")
                r["error"] = (p.error if p is not None else "no prediction")
                t = self._timing.get(r["cell_id"], {})
                for k in TIMING_FIELDS:
                    r[k] = t.get(k)
        keys = list(_BASE)
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        if classified:
            keys.extend(k for k in ("p_fetal", "label", "error", *TIMING_FIELDS) if k not in keys)
        cols = {}
        for k in keys:
            vals = [r.get(k) for r in rows]
            if k in _STR_COLS:
                cols[k] = pa.array([v if v is not None else "" for v in vals], pa.string())
            elif k in _INT_COLS:
                cols[k] = pa.array([-1 if v is None else int(v) for v in vals], pa.int64())
            else:
                cols[k] = pa.array([math.nan if v is None else float(v) for v in vals],
                                   pa.float64())
        tmp = self.out / "cells.parquet.tmp"
        pq.write_table(pa.table(cols), str(tmp))
        os.replace(tmp, self.out / "cells.parquet")


def _finite_or_none(x: Any):
    try:
        return float(x) if math.isfinite(float(x)) else None
    except (TypeError, ValueError):
        return None
