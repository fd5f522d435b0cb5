"""`fmh detect`, `fmh run`, `fmh demo` end to end: run files, counts, truth, every source type,
Ctrl-C, dropped frames, predictions and latency, bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.cli import main as fmh
from engine.config import load_config
from engine.pipeline import RunOptions, latency_summary, run_pipeline
from engine.sources.sim import load_truth

from .conftest import DATA, ROOT
from .helpers_model import make_model

N_FRAMES = 1200
RTDC_CONFIG = ROOT / "configs" / "rtdc.yaml"


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    """A simulated sequence (.npy + truth) and the tiny model."""
    d = tmp_path_factory.mktemp("seq")
    path = d / "s.npy"
    assert fmh(["simulate", "--frames", str(N_FRAMES), "--seed", "5", "--out", str(path),
                "--no-progress"]) == 0
    make_model(d / "tiny.onnx")
    return path


@pytest.fixture(scope="module")
def detected(seq, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    assert fmh(["detect", str(seq), "--out", str(out), "--quiet",
                "--donor", "d07", "--label", "fetal"]) == 0
    return out


def _read(out: Path):
    m = json.loads((out / "manifest.json").read_text())
    cells = pq.read_table(out / "cells.parquet").to_pandas()
    tracks = pq.read_table(out / "tracks.parquet").to_pandas()
    return m, cells, tracks


def _n_clips(path: Path) -> int:
    with h5py.File(path, "r") as h:
        return int(h["cell_id"].shape[0])


def _consistent(out: Path, n_frames: int | None = None) -> dict:
    """The four files agree with each other and the manifest; returns the counts."""
    m, cells, tracks = _read(out)
    c = m["counts"]
    assert len(cells) == tracks["cell_id"].nunique() == c["cells_tracked"]
    assert set(cells["cell_id"]) == set(tracks["cell_id"])
    if (out / "clips.h5").exists():
        assert _n_clips(out / "clips.h5") == c["cells_tracked"] == c["clips_written"]
    assert c["frames_read"] == c["frames_processed"] + c["frames_dropped"] + c["frames_unprocessed"]
    if n_frames is not None:
        assert c["frames_read"] == c["frames_processed"] == n_frames
        assert c["frames_dropped"] == c["frames_unprocessed"] == 0
    per_cell = tracks.groupby("cell_id").size()
    assert (cells.set_index("cell_id")["n_frames"] == per_cell).all()
    return c


def test_detect_writes_consistent_files_that_match_the_truth(seq, detected):
    m, cells, tracks = _read(detected)
    assert m["status"] == "complete" and m["source"]["policy"] == "block"
    c = _consistent(detected, N_FRAMES)
    assert c["cells_tracked"] > 15
    assert m["geometry"]["width"] == 800 and m["background"]["policy"]
    from engine.clipstore import ClipStoreReader
    store = ClipStoreReader(detected / "clips.h5")       # training material as it stands
    assert (store.donor, store.label) == ("d07", "fetal")
    truth = load_truth(seq.with_name("s.truth.json"))
    assert np.array_equal(truth.frame_numbers, np.arange(N_FRAMES))
    status = cells.set_index("cell_id")["status"]
    complete = [t for t in truth.cells if t.complete]
    assert len(complete) >= 10
    found = 0
    for t in complete:
        mid = len(t.frame_numbers) // 2
        f, (x, y) = int(t.frame_numbers[mid]), t.centroids[mid]
        rows = tracks[tracks["frame"] == f]
        d = np.hypot(rows["cx"] - x, rows["cy"] - y)
        if not len(d) or d.min() > 8:
            continue
        cid = int(rows["cell_id"].iloc[int(np.argmin(d.to_numpy()))])
        span = tracks[tracks["cell_id"] == cid]["frame"]
        if (status[cid] == "complete" and span.min() <= t.entry_frame + 5
                and span.max() >= t.exit_frame - 5):
            found += 1
    assert found >= 0.9 * len(complete), f"{found} of {len(complete)} complete cells found"


def test_every_source_type_gives_the_same_cells(seq, detected, tmp_path):
    """tif, folder, h5 of the first 400 frames == npy of the same frames (same tracks)."""
    import cv2
    import tifffile
    n = 400
    frames = np.load(seq, mmap_mode="r")[:n]
    tifffile.imwrite(tmp_path / "s.tif", np.asarray(frames))
    (tmp_path / "folder").mkdir()
    for i, im in enumerate(frames):
        cv2.imwrite(str(tmp_path / "folder" / f"f{i:05d}.png"), np.asarray(im))
    with h5py.File(tmp_path / "s.h5", "w") as h:
        h["images"] = np.asarray(frames)
    np.save(tmp_path / "s400.npy", np.asarray(frames))
    results = {}
    for name in ("s400.npy", "s.tif", "folder", "s.h5"):
        out = tmp_path / f"out_{name}"
        assert fmh(["detect", str(tmp_path / name), "--out", str(out), "--quiet",
                    "--no-clips"]) == 0, name
        _consistent(out, n)
        assert not (out / "clips.h5").exists()
        results[name] = _read(out)[2].sort_values(["cell_id", "frame"]).reset_index(drop=True)
    ref = results.pop("s400.npy")
    assert ref["cell_id"].nunique() >= 3
    for name, tracks in results.items():
        assert tracks.equals(ref), name


@pytest.mark.parametrize("fname", ["cytoshot-test-data.rtdc", "dcnum_thresh_example.rtdc"])
def test_detect_rtdc_with_recorded_background(fname, tmp_path):
    src = DATA / "rtdc" / fname
    with h5py.File(src, "r") as h:
        n_events = h["events/image"].shape[0]
    assert fmh(["detect", str(src), "--out", str(tmp_path), "--quiet",
                "--config", str(RTDC_CONFIG)]) == 0
    m, _, _ = _read(tmp_path)
    c = _consistent(tmp_path)
    assert m["status"] == "complete"
    assert m["background"]["policy"] == "given"            # the recorded image_bg, not a median
    assert m["config"]["frontend"]["polarity"] == "dark"
    assert 0 < c["frames_read"] == c["frames_processed"] <= n_events
    assert c["frame_gaps"] > 0                                # RT-DC stores event frames only
    assert c["frontend_blobs"] > 0


def test_ctrl_c_leaves_valid_files_and_no_shared_memory(seq, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine", "run", "sim://?frames=1000000&seed=2",
           "--model", str(seq.with_name("tiny.onnx")), "--out", str(out), "--quiet",
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    preds = out / "predictions.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if preds.exists() and preds.stat().st_size > 0:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130, stderr
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"fmh-ring-{proc.pid}-")]
    m, cells, _ = _read(out)
    assert m["status"] == "interrupted" and m["stopped_by"] == "SIGINT"
    c = _consistent(out)
    assert 0 < c["frames_processed"] < 1000000
    assert c["clips_sent"] == c["cells_tracked"] == c["predictions"] + c["errors"]
    assert (out / "report.md").exists() and "interrupted" in stdout


def test_live_source_faster_than_the_front_end_drops_counted_frames(tmp_path):
    cfg = load_config(overrides=["ring.slots=8"])
    opts = RunOptions(source="sim://?frames=600&seed=1&live=1", out=tmp_path, progress=False,
                      throttle_s=0.005, write_clips=False)
    s = run_pipeline(cfg, opts)
    c = s.counts
    assert s.status == "complete"
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["source"]["policy"] == "drop-oldest" and m["ring"]["policy"] == "drop-oldest"
    assert c["frames_read"] == 600
    assert c["frames_dropped"] > 0 and c["frames_unprocessed"] == 0
    assert c["frames_read"] == c["frames_processed"] + c["frames_dropped"]
    assert c["frames_dropped"] == m["ring"]["dropped"]


def test_run_gives_every_cell_exactly_one_prediction(seq, tmp_path, capsys):
    out = tmp_path / "run"
    assert fmh(["run", str(seq), "--model", str(seq.with_name("tiny.onnx")), "--out", str(out),
                "--workers", "2", "--quiet"]) == 0
    m, cells, _ = _read(out)
    c = _consistent(out, N_FRAMES)
    assert m["status"] == "complete" and m["model"]["model_id"].startswith("tiny")
    joined = m["dispatcher"]["workers_joined"]          # which backend ran, on what device
    assert len(joined) == 2 and {j["backend"] for j in joined} == {"onnxruntime"}
    assert all("CPUExecutionProvider" in j["device"] and int(j["pid"]) > 0 for j in joined)
    assert c["clips_sent"] == c["cells_tracked"] == c["predictions"] + c["errors"]
    assert c["errors"] == 0 and c["predictions"] > 15
    preds = [json.loads(s) for s in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["cell_id"] for p in preds) == sorted(cells["cell_id"])
    assert cells["label"].isin(["fetal", "maternal"]).all()
    by_id = {p["cell_id"]: p for p in preds}
    for row in cells.itertuples():
        p = by_id[row.cell_id]
        assert row.p_fetal == pytest.approx(p["p_fetal"]) and row.label == p["label"]
        assert p["t_pred_s"] >= p["t_exit_s"] and p["close_frame"] >= p["exit_frame"] == row.last_frame
        assert p["latency_ms"] == pytest.approx((p["t_pred_s"] - p["t_exit_s"]) * 1e3, abs=1e-3)
        assert p["compute_ms"] >= 0 and p["queue_ms"] >= 0
        # the rest of the trip: to the worker and back, apart from the time it held the clip
        assert 0 < p["trip_ms"] < p["latency_ms"] - p["queue_ms"] - p["compute_ms"]
    from engine.features import FEATURES
    from engine.runfiles import TIMING_FIELDS
    assert not set(TIMING_FIELDS) & set(FEATURES)  # one cells.parquet column each
    lat = m["latency"]
    assert lat["trip_ms"]["n"] == lat["total_ms"]["n"]
    usable = sorted(os.sched_getaffinity(0))         # the run gave back the CPUs it pinned
    if len(usable) >= 2:                             # workers apart from the front end
        k = len(usable) // 2
        assert m["cpus"] == {"front_end": usable[:-k], "workers": usable[-k:]}
    else:
        assert m["cpus"] is None
    assert lat["n_cells"] == c["cells_tracked"]
    assert lat["live_from_frame"] is None     # an unpaced replay never runs in real time
    assert lat["total_ms"]["n"] + lat["n_warmup"] + lat["n_end_of_stream"] == lat["n_cells"]
    eos = set(cells.loc[cells["reason"].str.contains("end of stream"), "cell_id"])
    assert lat["n_end_of_stream"] == len(eos)
    assert lat["total_ms"]["p50"] <= lat["total_ms"]["p99"] <= lat["total_ms"]["max"]
    assert (out / "report.md").exists()
    printed = capsys.readouterr().out
    assert "report.md" in printed and "latency" in printed


def test_warm_up_loads_every_kernel_the_frame_loop_uses(tmp_path):
    """Numba loads one specialisation per argument type on first use (~0.1 s from its cache,
    seconds to compile): after _warm_up, a run must not load any in its frame loop (read-only
    ring frames, contested gates and merged cells included), or it stalls mid-run."""
    import importlib
    import pkgutil

    import numba

    import engine
    from engine.pipeline import _warm_up
    kernels = []
    for m in pkgutil.walk_packages(engine.__path__, "engine."):
        if m.name.endswith("__main__") or ".commands" in m.name or ".sources" in m.name:
            continue            # the verbs parse argv; the sources run in their own process
        mod = importlib.import_module(m.name)
        kernels += [f for f in vars(mod).values() if isinstance(f, numba.core.registry.CPUDispatcher)
                    and f.py_func.__module__ == m.name]
    assert len(kernels) >= 5
    cfg = load_config()
    _warm_up(cfg, (150, 800))
    before = {k: set(k.signatures) for k in kernels}
    run_pipeline(cfg, RunOptions(source="sim://?frames=1500&seed=11&rate_hz=20", out=tmp_path / "r",
                                 progress=False, write_clips=False))
    loaded = [f"{k.py_func.__module__}.{k.__name__}" for k in kernels
              if set(k.signatures) - before[k]]
    assert not loaded, f"loaded during the run, not in _warm_up: {loaded}"


def test_demo_runs_the_live_chip_through_the_model(seq, tmp_path, capsys):
    out = tmp_path / "demo"
    assert fmh(["demo", "--seconds", "1.2", "--model", str(seq.with_name("tiny.onnx")),
                "--out", str(out), "--quiet", "--workers", "1"]) == 0
    m, _, _ = _read(out)
    assert m["source"]["live"] is True and m["counts"]["frames_read"] == 600
    # primed on the first 400 frames, the loop then catches up with the live chip
    assert m["latency"]["live_from_frame"] is not None
    assert 400 <= m["latency"]["live_from_frame"] < 600
    assert m["counts"]["clips_sent"] == m["counts"]["predictions"] + m["counts"]["errors"]
    printed = capsys.readouterr().out
    assert "report.md" in printed and str(out) in printed


def test_latency_summary_leaves_out_the_warm_up():
    recs = {i: {"t_exit_s": float(i), "t_closed_s": float(i), "latency_ms": 1000.0 if i < 3 else
                float(i), "queue_ms": 1.0, "compute_ms": 2.0} for i in range(103)}
    s = latency_summary(recs, t_warm=3.0, t_first_pred=1.0)
    assert s["n_cells"] == 103 and s["n_warmup"] == 3
    assert s["total_ms"]["max"] == 102.0 and s["total_ms"]["n"] == 100
    assert s["total_ms_with_warmup"]["max"] == 1000.0
    assert s["compute_ms"]["p99"] == 2.0
    never = latency_summary(recs, t_warm=None, t_first_pred=1.0)
    assert never["n_warmup"] == 1
    # a live run: the frame loop caught up with the source only at t = 10 (priming backlog)
    live = latency_summary(recs, t_warm=3.0, t_first_pred=1.0, t_live=10.0)
    assert live["n_warmup"] == 10 and live["total_ms"]["n"] == 93
    assert latency_summary(recs, t_warm=3.0, t_first_pred=1.0, t_live=0.5)["n_warmup"] == 3
    # cells flushed at the end of the stream never left the channel: counted apart
    eos = latency_summary(recs, t_warm=3.0, t_first_pred=1.0, end_of_stream={101, 102})
    assert eos["n_end_of_stream"] == 2 and eos["n_warmup"] == 3
    assert eos["total_ms"]["max"] == 100.0 and eos["total_ms"]["n"] == 98


@pytest.mark.parametrize("argv, names", [
    (["detect", "{tmp}/missing.npy", "--out", "{tmp}/o"], "missing.npy"),
    (["detect", "{seq}", "--out", "{tmp}/afile"], "afile"),
    (["run", "{seq}", "--out", "{tmp}/o", "--model", "{tmp}/afile"], "afile"),
    (["run", "{seq}", "--out", "{tmp}/o", "--model", "{tmp}/none.onnx"], "none.onnx"),
    (["run", "{seq}", "--out", "{tmp}/o", "--model", "{tiny}", "--workers", "0"], "--workers 0"),
    (["detect", "{seq}", "--out", "{tmp}/o", "--background", "{tmp}/nobg.png"], "nobg.png"),
    (["detect", "sim://?frames=abc", "--out", "{tmp}/o"], "abc"),
])
def test_bad_inputs_exit_2_naming_the_value(argv, names, seq, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder, not a model")
    argv = [a.format(tmp=tmp_path, seq=seq, tiny=seq.with_name("tiny.onnx")) for a in argv]
    assert fmh(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0], err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_elastic_buffer_turns_a_stall_into_latency_not_drops():
    """A live ring that fills while the front end is busy: its frames move to the private
    catch-up buffer in order, none is dropped; beyond the buffer, drops are counted."""
    from engine.pipeline import _Elastic, _ring_frames, _Stop
    from engine.ringbuf import FrameRing
    from engine.types import Frame

    class _Alive:
        @staticmethod
        def is_alive():
            return True

    img = lambda k: np.full((4, 6), k, np.uint8)  # noqa: E731
    # writer and reader in one process through two FrameRing objects
    owner = FrameRing.create(shape=(4, 6), slots=4, policy="drop-oldest", peers=1)
    w = FrameRing.attach(owner.name)
    try:
        el = _Elastic(owner, 8)
        for k in range(4):
            w.put(Frame(k, k, img(k)))
        assert el.behind()
        el.fill()                                  # the ring is empty again
        for k in range(4, 8):
            w.put(Frame(k, k, img(k)))
        el.fill()
        assert el.count == 8 and owner.stats["dropped"] == 0
        for k in range(8, 14):                     # 2 more than the ring holds: dropped
            w.put(Frame(k, k, img(k)))
        w.close_writer()
        got = [(f.index, int(f.image[0, 0])) for f in _ring_frames(owner, _Alive, _Stop(), el)]
        assert [i for i, _ in got] == list(range(8)) + [10, 11, 12, 13]
        assert all(i == v for i, v in got)
        assert owner.stats["dropped"] == 2 and el.info()["max_held"] == 8
    finally:
        w.close()
        owner.close()


def test_a_stall_in_a_live_run_drops_counted_frames_and_no_spurious_cells(tmp_path):
    """A live run (drop-oldest, real-time pacing) whose frame loop stalls for 3 s loses about
    a thousand frames, counted. The scene's focus drifts meanwhile (seed 2 defocuses steadily
    over these frames), so the running background is out of date when frames resume: before
    the fix, every chip edge became blobs and the tracker made spurious cells out of them
    (about 1.7x the cells after the gap here, 3-5x in longer runs); the background is now
    built afresh after the gap, and the cells after it match a run without a stall."""
    n = 2800
    seq = tmp_path / "drift.npy"
    assert fmh(["simulate", "--frames", str(n), "--seed", "2", "--out", str(seq),
                "--no-progress"]) == 0
    ref_out, out = tmp_path / "ref", tmp_path / "stall"
    run_pipeline(load_config(), RunOptions(source=str(seq), out=ref_out, progress=False,
                                           write_clips=False))
    s = run_pipeline(load_config(overrides=["ring.policy=drop-oldest"]),
                     RunOptions(source=str(seq), out=out, speed=1.0, progress=False,
                                write_clips=False, stall=(600, 3.0)))
    c = _consistent(out)
    assert s.status == "complete" and c["frames_read"] == n
    assert c["frames_read"] == c["frames_processed"] + c["frames_dropped"]
    # ~1,100 expected (1,500 frames in 3 s, less what the ring and catch-up buffer hold);
    # on a loaded machine the paced source itself falls behind and fewer arrive meanwhile
    assert c["frames_dropped"] >= 200 and c["frames_unprocessed"] == 0
    _, ref_cells, _ = _read(ref_out)
    _, cells, tracks = _read(out)
    # the gap: the longest run of frame numbers missing from the tracks
    seen = np.unique(tracks["frame"].to_numpy())
    k = int(np.argmax(np.diff(seen)))
    gap_end = int(seen[k + 1])
    assert seen[k + 1] - seen[k] - 1 >= 200
    after = int((cells["first_frame"] >= gap_end).sum())
    ref_after = int((ref_cells["first_frame"] >= gap_end).sum())
    assert ref_after >= 10
    assert after <= 1.25 * ref_after + 3, (after, ref_after, gap_end)
    assert after >= 0.7 * ref_after - 3, (after, ref_after, gap_end)
    assert c["frontend_reprimes"] >= 1
