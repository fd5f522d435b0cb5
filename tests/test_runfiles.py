"""Run files: tracks/cells parquet, predictions.jsonl, manifest; checkpoints; bad folders."""
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.errors import SourceError
from engine.runfiles import TIMING_FIELDS, RunFiles, read_manifest
from engine.types import Prediction, TrackStatus

from .helpers_model import make_clip


def _clip(cid, n=6, status=TrackStatus.COMPLETE, **features):
    from dataclasses import replace
    c = make_clip(cid, frames=n)
    return replace(c, status=status, reason="" if status is TrackStatus.COMPLETE else "end",
                   features={"area_um": 30.0 + cid, "n_frames": 999.0, **features})


def test_files_are_consistent_and_features_never_overwrite_columns(tmp_path):
    f = RunFiles(tmp_path / "run", {"source": {"spec": "x"}}, classify=True)
    for cid in range(3):
        f.add_clip(_clip(cid, n=4 + cid, deform=float("nan")))
    timing = {"exit_frame": 12, "close_frame": 14, "t_exit_s": 10.0, "t_pred_s": 10.02,
              "latency_ms": 20.0, "queue_ms": 1.5, "compute_ms": 3.0, "attempts": 1}
    f.add_prediction(Prediction(0, 0.9, "fetal", (0.1, 0.9), "m"), timing)
    f.add_prediction(Prediction(1, float("nan"), "", (), "m", error="boom"))
    assert (f.n_predictions, f.n_fetal, f.n_errors) == (2, 1, 1)
    f.update_counts(cells_tracked=f.n_cells)
    f.close("complete", extra_field=1)
    out = tmp_path / "run"
    tracks = pq.read_table(out / "tracks.parquet").to_pandas()
    assert sorted(tracks.groupby("cell_id").size().tolist()) == [4, 5, 6]
    cells = pq.read_table(out / "cells.parquet").to_pandas().set_index("cell_id")
    assert cells["n_frames"].tolist() == [4, 5, 6]             # not the feature's 999
    assert cells.loc[0, "label"] == "fetal" and cells.loc[0, "p_fetal"] == pytest.approx(0.9)
    assert cells.loc[1, "error"] == "boom" and math.isnan(cells.loc[1, "p_fetal"])
    assert cells.loc[2, "error"] == "no prediction" and cells.loc[2, "label"] == ""
    assert cells.loc[0, "latency_ms"] == pytest.approx(20.0) and cells.loc[0, "exit_frame"] == 12
    assert math.isnan(cells.loc[1, "latency_ms"]) and cells.loc[1, "exit_frame"] == -1
    assert set(TIMING_FIELDS) <= set(cells.columns)
    lines = [json.loads(s) for s in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["cell_id"] for r in lines] == [0, 1]
    assert lines[0]["t_pred_s"] == pytest.approx(10.02) and lines[1]["p_fetal"] is None
    m = read_manifest(out)
    assert m["status"] == "complete" and m["counts"]["cells_tracked"] == 3
    assert m["extra_field"] == 1
    f.close("failed")                                           # idempotent
    assert read_manifest(out)["status"] == "complete"


def test_checkpoint_leaves_readable_files_while_running(tmp_path):
    f = RunFiles(tmp_path, {}, classify=False)
    for cid in range(5):
        f.add_clip(_clip(cid))
    f.checkpoint(frames_processed=123)
    m = read_manifest(tmp_path)
    assert m["status"] == "running" and m["counts"]["frames_processed"] == 123
    cells = pq.read_table(tmp_path / "cells.parquet")
    assert cells.num_rows == 5 and "p_fetal" not in cells.column_names
    f.add_clip(_clip(5))
    f.close("interrupted")
    assert pq.read_table(tmp_path / "tracks.parquet").num_rows == 6 * 6
    assert pq.read_table(tmp_path / "cells.parquet").num_rows == 6
    assert read_manifest(tmp_path)["status"] == "interrupted"


def test_empty_classified_run_still_has_the_prediction_columns(tmp_path):
    f = RunFiles(tmp_path, {}, classify=True)
    f.close("interrupted")
    cells = pq.read_table(tmp_path / "cells.parquet")
    assert cells.num_rows == 0
    assert {"cell_id", "status", "p_fetal", "label", "latency_ms"} <= set(cells.column_names)


def test_bad_output_folder_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SourceError, match="afile"):
        RunFiles(afile, {})
    with pytest.raises(SourceError, match="below"):
        RunFiles(afile / "below", {})


def test_missing_or_corrupt_manifest_is_named(tmp_path):
    with pytest.raises(SourceError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SourceError, match="unreadable"):
        read_manifest(tmp_path)


def test_track_rows_are_grouped(tmp_path, monkeypatch):
    import engine.runfiles as rf
    monkeypatch.setattr(rf, "ROW_GROUP", 20)
    f = RunFiles(tmp_path, {})
    for cid in range(10):
        f.add_clip(_clip(cid, n=6))
    f.close()
    meta = pq.ParquetFile(tmp_path / "tracks.parquet").metadata
    assert meta.num_rows == 60 and 1 < meta.num_row_groups < 10
    rows = pq.read_table(tmp_path / "tracks.parquet").to_pandas()
    assert np.array_equal(rows["cell_id"].unique(), np.arange(10))


def test_per_cell_records_stay_small(tmp_path):
    """RunFiles keeps one record per cell for the whole run (cells.parquet is rewritten from
    them): it must not hold on to the clip's feature dict, the Prediction or dicts of Python
    floats (measured 2-4 kB a cell that way; a one-hour run at 13 cells/s has ~47,000)."""
    import tracemalloc
    from dataclasses import replace
    base = make_clip(0, frames=4)
    f = RunFiles(tmp_path / "run", {"source": {"spec": "x"}}, classify=True)

    def add(cid):
        feats = {f"feat_{k}": float(np.float64(k + cid * 1e-3)) for k in range(22)}
        f.add_clip(replace(base, cell_id=cid, features=feats))
        timing = {k: float(cid) for k in TIMING_FIELDS}
        f.add_prediction(Prediction(cid, 0.25 + cid * 1e-6, "maternal".join(["", ""]),
                                    (0.75, 0.25), "model-" + "x" * 12), timing)

    for cid in range(50):                    # warm up (first allocations, imports)
        add(cid)
    f.checkpoint()
    n = 400
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for cid in range(50, 50 + n):
            add(cid)
        per_cell = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_cell < 1200, f"{per_cell:.0f} bytes a cell"
    f.close("complete")
    cells = pq.read_table(tmp_path / "run" / "cells.parquet").to_pandas().set_index("cell_id")
    assert len(cells) == 50 + n
    assert cells.loc[449, "feat_21"] == pytest.approx(21 + 0.449)
    assert cells.loc[449, "latency_ms"] == 449.0 and cells.loc[449, "attempts"] == 449
    assert cells.loc[449, "label"] == "maternal"
