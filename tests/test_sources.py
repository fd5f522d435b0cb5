"""Replay sources (engine/sources/replay.py) and pacing (engine/sources/pacing.py).

Round trips write the synthetic chip's frames in each format and read them back; RT-DC is
checked against h5py on the real test files. Error cases check that the message names the
file. Pacing is checked with a fake clock; the one real-time test uses a lower bound only.
"""
from __future__ import annotations

import itertools
import json
import time
import tracemalloc
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import tifffile

from engine.config import load_config
from engine.errors import SourceError
from engine.sources import open_source
from engine.sources.pacing import Pacer, paced
from engine.sources.replay import (Hdf5Replay, ImageFolderReplay, NpyReplay, RtdcReplay,
                                   TiffReplay, VideoReplay, natural_key, open_replay)
from engine.sources.sim import SyntheticChip
from engine.types import Frame

DATA = Path(__file__).resolve().parent / "data"
RTDC_FILES = sorted((DATA / "rtdc").glob("*.rtdc"))
N = 12


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def sim(cfg):
    """Frames the simulator wrote: (N, 150, 800) uint8 and their truth."""
    frames, truth = SyntheticChip(cfg).render(N)
    return frames, truth


@pytest.fixture(scope="module")
def sim_gaps():
    """Simulator frames with lost camera frames (numbers skip)."""
    cfg = load_config(overrides={"sim.gap_rate": 0.2, "sim.seed": 5})
    frames, truth = SyntheticChip(cfg).render(N)
    assert truth.gaps > 0
    return frames, truth


def read_all(src):
    with src:
        frames = [Frame(f.index, f.t_ns, np.array(f.image)) for f in src.frames()]
    return frames


def stack(frames):
    return np.stack([f.image for f in frames])


# ---- writers, one per format: write (N, H, W) uint8 frames, return the path -------------------

def write_npy(d, frames):
    p = d / "s.npy"
    np.save(p, frames)
    return p


def write_tif(d, frames):
    p = d / "s.tif"
    tifffile.imwrite(p, frames)
    return p


def write_tif_zlib(d, frames):
    p = d / "s.tiff"
    tifffile.imwrite(p, frames, compression="zlib")
    return p


def write_folder(d, frames):
    p = d / "imgs"
    p.mkdir()
    for i, f in enumerate(frames):  # unpadded names: natural sort must order them
        assert cv2.imwrite(str(p / f"frame{i}.png"), f)
    return p


def write_h5(d, frames):
    p = d / "s.h5"
    with h5py.File(p, "w") as h5:
        h5.create_dataset("movie/images", data=frames, chunks=(4,) + frames.shape[1:],
                          compression="gzip")
    return p


def write_avi_ffv1(d, frames):
    p = d / "s.avi"
    w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"FFV1"), 500.0,
                        (frames.shape[2], frames.shape[1]), isColor=False)
    assert w.isOpened(), "this OpenCV cannot write FFV1 (lossless) video"
    for f in frames:
        w.write(f)
    w.release()
    return p


LOSSLESS = {"npy": write_npy, "tif": write_tif, "tif-zlib": write_tif_zlib,
            "folder": write_folder, "h5": write_h5, "avi-ffv1": write_avi_ffv1}


@pytest.mark.parametrize("fmt", sorted(LOSSLESS))
def test_round_trip_returns_exactly_the_simulator_frames(fmt, sim, cfg, tmp_path):
    frames, _ = sim
    path = LOSSLESS[fmt](tmp_path, frames)
    src = open_source(str(path), cfg=cfg)
    assert src.n_frames == N and src.shape == frames.shape[1:]
    assert src.fps == 500.0
    got = read_all(src)
    assert [f.index for f in got] == list(range(N))
    np.testing.assert_array_equal(stack(got), frames)
    assert all(f.image.dtype == np.uint8 for f in got)
    assert [f.t_ns for f in got] == [round(i * 1e9 / 500.0) for i in range(N)]
    assert src.stats.frames_read == N and src.stats.gaps == 0
    d = json.loads(json.dumps(src.describe()))           # JSON-safe, for the manifest
    assert d["n_frames"] == N and d["shape"] == list(frames.shape[1:])


def test_lossy_video_round_trip_is_close(sim, tmp_path):
    """MJPG is lossy: compare loosely (mean absolute error of a few grey levels)."""
    frames, _ = sim
    p = tmp_path / "s_mjpg.avi"
    w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), 250.0,
                        (frames.shape[2], frames.shape[1]), isColor=False)
    assert w.isOpened()
    for f in frames:
        w.write(f)
    w.release()
    src = open_replay(p)
    assert isinstance(src, VideoReplay) and src.fps == 250.0 and src.fps_source == "recorded"
    got = stack(read_all(src))
    assert got.shape == frames.shape
    assert np.abs(got.astype(np.int16) - frames).mean() < 3.0


def test_video_start_stop_step(sim, tmp_path):
    frames, _ = sim
    src = open_replay(write_avi_ffv1(tmp_path, frames), start=1, stop=10, step=4)
    got = read_all(src)
    assert [f.index for f in got] == [1, 5, 9]
    np.testing.assert_array_equal(stack(got), frames[1:10:4])
    assert src.stats.gaps == 0


def test_dispatch_by_suffix_and_content(sim, tmp_path):
    frames, _ = sim
    assert isinstance(open_replay(write_npy(tmp_path, frames)), NpyReplay)
    assert isinstance(open_replay(write_tif(tmp_path, frames)), TiffReplay)
    assert isinstance(open_replay(write_h5(tmp_path, frames)), Hdf5Replay)
    assert isinstance(open_replay(write_folder(tmp_path, frames)), ImageFolderReplay)
    assert isinstance(open_replay(RTDC_FILES[0]), RtdcReplay)
    # no known suffix: recognised from the first bytes
    odd = tmp_path / "s.frames"
    odd.write_bytes((tmp_path / "s.npy").read_bytes())
    assert isinstance(open_replay(odd), NpyReplay)
    rt = tmp_path / "copy.h5"
    rt.write_bytes(RTDC_FILES[0].read_bytes())
    assert isinstance(open_replay(rt), RtdcReplay)


# ---- .npy ------------------------------------------------------------------------------------

def test_npy_frames_are_views_of_a_memory_map(sim, tmp_path):
    frames, _ = sim
    src = open_replay(write_npy(tmp_path, frames))
    with src:
        f = next(iter(src.frames()))
        assert isinstance(f.image, np.memmap)
        assert not f.image.flags.writeable


def test_npy_replay_does_not_load_the_file(tmp_path):
    """A ~50 MB file is replayed with a Python-heap peak far below its size."""
    p = tmp_path / "big.npy"
    n, h, w = 420, 150, 800                     # 50.4 MB
    mm = np.lib.format.open_memmap(p, mode="w+", dtype=np.uint8, shape=(n, h, w))
    mm[:, 0, 0] = np.arange(n) % 251
    mm[-1] = 7
    mm.flush()
    del mm
    size = p.stat().st_size
    assert size > 50e6
    src = open_replay(p)
    tracemalloc.start()
    try:
        with src:
            checksum = 0
            for f in src.frames():
                checksum += int(f.image[0, 0])
            last = int(f.image[5, 5])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert checksum == int(sum(np.arange(n) % 251)) - (n - 1) % 251 + 7
    assert last == 7
    assert peak < size / 50, f"peak {peak} B for a {size} B file"


def test_npy_single_frame(tmp_path, sim):
    frame = sim[0][3]
    p = tmp_path / "one.npy"
    np.save(p, frame)
    got = read_all(open_replay(p))
    assert len(got) == 1 and got[0].index == 0
    np.testing.assert_array_equal(got[0].image, frame)


@pytest.mark.parametrize("array", [
    np.zeros((3, 10, 12), np.float32), np.zeros((3, 10, 12), np.uint16),
    np.zeros((2, 3, 10, 12), np.uint8), np.zeros(10, np.uint8), np.zeros((0, 10, 12), np.uint8)],
    ids=["float32", "uint16", "4d", "1d", "empty"])
def test_npy_wrong_dtype_or_shape_names_file_dtype_and_shape(array, tmp_path):
    p = tmp_path / "bad.npy"
    np.save(p, array)
    with pytest.raises(SourceError) as err:
        open_replay(p)
    msg = str(err.value)
    assert str(p) in msg and str(array.dtype) in msg and str(array.shape) in msg


def test_npy_truncated_names_file(sim, tmp_path):
    p = write_npy(tmp_path, sim[0])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(SourceError, match="truncated") as err:
        open_replay(p)
    assert str(p) in str(err.value)


def test_npy_corrupt_header_names_file(tmp_path):
    p = tmp_path / "junk.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00" + b"\xff" * 50)
    with pytest.raises(SourceError) as err:
        open_replay(p)
    assert str(p) in str(err.value)
    q = tmp_path / "text.npy"
    q.write_text("not numpy at all")
    with pytest.raises(SourceError, match="text.npy"):
        open_replay(q)


def test_npy_frame_numbers_from_simulator_truth(sim_gaps, tmp_path):
    """numbers= gives stored frames their camera numbers, so the simulator's gaps are counted."""
    frames, truth = sim_gaps
    src = open_replay(write_npy(tmp_path, frames), numbers=truth.frame_numbers)
    got = read_all(src)
    assert [f.index for f in got] == [int(n) for n in truth.frame_numbers]
    np.testing.assert_array_equal(stack(got), frames)
    assert src.stats.gaps == truth.gaps > 0
    with pytest.raises(SourceError, match="numbers"):
        open_replay(tmp_path / "s.npy", numbers=[1, 2, 3])


# ---- TIFF ------------------------------------------------------------------------------------

def test_tiff_memory_maps_uncompressed_stacks(sim, tmp_path):
    src = open_replay(write_tif(tmp_path, sim[0]))
    with src:
        assert isinstance(next(iter(src.frames())).image, np.memmap)


def test_tiff_reads_compressed_pages_one_at_a_time(sim, tmp_path, monkeypatch):
    frames, _ = sim
    src = open_replay(write_tif_zlib(tmp_path, frames))
    calls = []
    original = tifffile.TiffPage.asarray

    def counting(self, *a, **k):
        out = original(self, *a, **k)
        calls.append(out.shape)
        return out

    monkeypatch.setattr(tifffile.TiffPage, "asarray", counting)
    with src:
        got = list(itertools.islice(src.frames(), 3))
    assert calls == [frames.shape[1:]] * 3      # three pages decoded, each one page
    np.testing.assert_array_equal(stack(got), frames[:3])


@pytest.mark.parametrize("writer", [write_tif, write_tif_zlib], ids=["raw", "zlib"])
def test_tiff_truncated_names_file(writer, sim, tmp_path):
    p = writer(tmp_path, sim[0])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError) as err:
        read_all(open_replay(p))
    assert str(p) in str(err.value)


def test_tiff_corrupt_and_wrong_dtype_name_file(tmp_path):
    p = tmp_path / "junk.tif"
    p.write_bytes(b"II*\x00" + b"\x07" * 300)
    with pytest.raises(SourceError) as err:
        open_replay(p)
    assert str(p) in str(err.value)
    q = tmp_path / "deep.tif"
    tifffile.imwrite(q, np.zeros((3, 10, 12), np.uint16), photometric="minisblack")
    with pytest.raises(SourceError, match="uint16") as err:
        open_replay(q)
    assert str(q) in str(err.value)


# ---- folder ----------------------------------------------------------------------------------

def test_natural_sort():
    names = ["frame10.png", "frame2.png", "frame1.png", "Frame3.png", "frame100.png"]
    assert sorted(names, key=natural_key) == ["frame1.png", "frame2.png", "Frame3.png",
                                              "frame10.png", "frame100.png"]


def test_folder_inconsistent_shape_names_file(sim, tmp_path):
    d = write_folder(tmp_path, sim[0][:3])
    bad = d / "frame3.png"
    cv2.imwrite(str(bad), np.zeros((20, 20), np.uint8))
    src = open_replay(d)
    with pytest.raises(SourceError, match="frame3.png") as err:
        read_all(src)
    assert "shape" in str(err.value)


def test_folder_corrupt_image_and_empty_folder_name_file(sim, tmp_path):
    d = write_folder(tmp_path, sim[0][:2])
    (d / "frame2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SourceError, match="frame2.png"):
        read_all(open_replay(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="empty"):
        open_replay(empty)


def test_folder_numbered_names_give_frame_numbers_and_gaps(sim, tmp_path):
    d = tmp_path / "numbered"
    d.mkdir()
    numbers = [100, 101, 104, 105, 109]
    for k, n in enumerate(numbers):
        cv2.imwrite(str(d / f"cam_{n:06d}.bmp"), sim[0][k])
    src = open_replay(d, numbered=True)
    got = read_all(src)
    assert [f.index for f in got] == numbers
    np.testing.assert_array_equal(stack(got), sim[0][:5])
    assert src.stats.gaps == 5 and src.stats.gap_events == 2


def test_folder_colour_images_become_grey(sim, tmp_path):
    d = tmp_path / "colour"
    d.mkdir()
    cv2.imwrite(str(d / "a1.png"), cv2.cvtColor(sim[0][0], cv2.COLOR_GRAY2BGR))
    got = read_all(open_replay(d))
    np.testing.assert_array_equal(got[0].image, sim[0][0])


# ---- HDF5 ------------------------------------------------------------------------------------

def test_hdf5_frame_numbers_count_gaps(sim_gaps, tmp_path):
    frames, truth = sim_gaps
    p = tmp_path / "g.hdf5"
    with h5py.File(p, "w") as h5:
        h5["other/thing"] = np.zeros((2, 2, 2), np.float32)
        h5["rec/images"] = frames
        h5["rec/images"].attrs["fps"] = 250.0
        h5["rec/frame_number"] = truth.frame_numbers
    src = open_replay(p)
    assert src.describe()["key"] == "rec/images" and src.fps == 250.0
    got = read_all(src)
    assert [f.index for f in got] == list(truth.frame_numbers)
    np.testing.assert_array_equal(stack(got), frames)
    assert [f.t_ns for f in got] == [round(n * 1e9 / 250.0) for n in truth.frame_numbers]
    assert src.stats.gaps == truth.gaps > 0


def test_hdf5_explicit_keys(sim, tmp_path):
    frames, _ = sim
    p = tmp_path / "k.h5"
    with h5py.File(p, "w") as h5:
        h5["a"] = frames[:2]
        h5["b"] = frames
        h5["numbers"] = np.arange(N) * 2
    got = read_all(open_replay(p, key="b", frames_key="numbers"))
    assert [f.index for f in got] == list(range(0, 2 * N, 2))
    np.testing.assert_array_equal(stack(got), frames)
    with pytest.raises(SourceError, match="'nope'"):
        open_replay(p, key="nope")


def test_hdf5_ignores_lookalike_siblings_and_reads_backgrounds(sim, tmp_path):
    frames, _ = sim
    p = tmp_path / "l.h5"
    with h5py.File(p, "w") as h5:
        h5["rec/images"] = frames
        h5["rec/frames"] = np.zeros((2, 3, 3), np.uint8)     # not frame numbers
        h5["rec/background"] = frames[0]
    src = open_replay(p, key="rec/images")
    d = src.describe()
    assert d["frames_key"] is None and d["bg_key"] == "rec/background"
    np.testing.assert_array_equal(src.background(), frames[0])
    assert [f.index for f in read_all(src)] == list(range(N))


def test_hdf5_wrong_dtype_or_no_frames_names_file(tmp_path):
    p = tmp_path / "f.h5"
    with h5py.File(p, "w") as h5:
        h5["x"] = np.zeros((3, 4, 5), np.float32)
    with pytest.raises(SourceError, match="3-D uint8") as err:
        open_replay(p)
    assert str(p) in str(err.value)
    with pytest.raises(SourceError, match="float32") as err:
        open_replay(p, key="x")
    assert str(p) in str(err.value) and "(3, 4, 5)" in str(err.value)


def test_hdf5_corrupt_and_truncated_name_file(sim, tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(SourceError) as err:
        open_replay(junk)
    assert str(junk) in str(err.value)
    p = write_h5(tmp_path, sim[0])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError) as err:
        read_all(open_replay(p))
    assert str(p) in str(err.value)


# ---- RT-DC -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", RTDC_FILES, ids=lambda p: p.stem)
def test_rtdc_matches_h5py(path):
    with h5py.File(path, "r") as h5:
        images = h5["events/image"][()]
        bgs = h5["events/image_bg"][()]
        numbers = h5["events/frame"][()].astype(np.int64)
        times = h5["events/time"][()]
        rate = h5.attrs.get("imaging:frame rate")
    first = np.flatnonzero(np.r_[True, np.diff(numbers) != 0])   # one frame per camera frame
    src = open_source(str(path))
    got = read_all(src)
    assert [f.index for f in got] == list(numbers[first])
    np.testing.assert_array_equal(stack(got), images[first])
    assert [f.t_ns for f in got] == list(np.round(times[first] * 1e9).astype(np.int64))
    span = int(numbers[-1] - numbers[0] + 1)
    assert src.stats.gaps == span - first.size > 0
    if rate is not None:
        assert src.fps == pytest.approx(float(rate))
    else:  # estimated from events/time and events/frame
        per_frame = np.median(np.diff(times[first]) / np.diff(numbers[first]))
        assert src.fps == pytest.approx(1 / per_frame, rel=1e-6)
    assert json.loads(json.dumps(src.describe()))["fps_source"] == "recorded"
    np.testing.assert_array_equal(src.background(), np.median(bgs, axis=0).round().astype(np.uint8))
    k = len(got) // 2
    np.testing.assert_array_equal(src.frame_background(got[k].index), bgs[first[k]])
    # every event, duplicates included
    every = read_all(open_replay(path, unique=False))
    np.testing.assert_array_equal(stack(every), images)


def test_rtdc_loop_keeps_numbers_increasing(tmp_path):
    path = RTDC_FILES[-1]
    one = open_replay(path)
    n = len(read_all(one))
    src = open_replay(path, loop=2)
    got = read_all(src)
    idx = [f.index for f in got]
    assert len(got) == 2 * n == src.n_frames
    assert all(b > a for a, b in zip(idx, idx[1:]))
    assert all(b > a for a, b in zip([f.t_ns for f in got], [f.t_ns for f in got][1:]))
    assert src.stats.gaps == 2 * one.stats.gaps                 # no gap at the wrap
    np.testing.assert_array_equal(stack(got[n:]), stack(got[:n]))
    np.testing.assert_array_equal(src.frame_background(got[n + 1].index),
                                  src.frame_background(got[1].index))


def test_rtdc_without_images_is_an_error(tmp_path):
    p = tmp_path / "features.rtdc"
    with h5py.File(p, "w") as h5:
        h5["events/deform"] = np.zeros(5)
    with pytest.raises(SourceError, match="events/image") as err:
        open_replay(p)
    assert str(p) in str(err.value)


# ---- common options and errors -------------------------------------------------------------

def test_loop_start_stop_step(sim, tmp_path):
    frames, _ = sim
    p = write_npy(tmp_path, frames)
    src = open_replay(p, start=2, stop=9, step=3)
    got = read_all(src)
    assert [f.index for f in got] == [2, 5, 8] and src.n_frames == 3
    np.testing.assert_array_equal(stack(got), frames[2:9:3])
    assert src.stats.gaps == 0                     # skipped on purpose: not gaps
    src = open_replay(p, start=1, stop=5, loop=3)
    got = read_all(src)
    assert [f.index for f in got] == list(range(1, 13))
    np.testing.assert_array_equal(stack(got), np.concatenate([frames[1:5]] * 3))
    assert src.stats.gaps == 0 and src.n_frames == 12
    endless = open_replay(p, loop=0, stop=2)
    assert endless.n_frames is None
    with endless:
        assert [f.index for f in itertools.islice(endless.frames(), 7)] == list(range(7))


def test_fps_override_and_no_rate(sim, tmp_path, cfg):
    p = write_npy(tmp_path, sim[0])
    src = open_replay(p, cfg=cfg, fps=100)
    assert src.fps == 100 and src.fps_source == "option"
    assert [f.t_ns for f in read_all(src)][:3] == [0, 10_000_000, 20_000_000]
    bare = open_replay(p)                          # no config, no recorded rate
    assert bare.fps is None and bare.describe()["timestamps"] == "host clock"
    t = [f.t_ns for f in read_all(bare)]
    assert all(b >= a for a, b in zip(t, t[1:]))
    with pytest.raises(SourceError, match="fps"):
        open_replay(p, fps=0)


def test_missing_unknown_and_bad_options(tmp_path, sim):
    with pytest.raises(SourceError, match="no such file") as err:
        open_source(str(tmp_path / "nope.npy"))
    assert "nope.npy" in str(err.value)
    odd = tmp_path / "data.xyz"
    odd.write_bytes(b"hello world, not frames")
    with pytest.raises(SourceError, match="unknown replay format") as err:
        open_replay(odd)
    assert "data.xyz" in str(err.value)
    p = write_npy(tmp_path, sim[0])
    with pytest.raises(SourceError, match="bogus"):
        open_replay(p, bogus=1)
    with pytest.raises(SourceError, match="start"):
        open_replay(p, start=-1)
    bad_video = tmp_path / "bad.avi"
    bad_video.write_bytes(b"RIFF" + bytes(2000))
    with pytest.raises(SourceError, match="bad.avi"):
        open_replay(bad_video)
    bad_h5 = tmp_path / "bad.h5"
    bad_h5.write_bytes((tmp_path / "s.npy").read_bytes())
    with pytest.raises(SourceError, match="bad.h5"):
        open_replay(bad_h5)


def test_lifecycle(sim, tmp_path):
    src = open_replay(write_npy(tmp_path, sim[0]))
    with pytest.raises(SourceError, match="open"):
        next(iter(src.frames()))
    with src:
        pass
    with pytest.raises(SourceError, match="closed"):
        src.open()


# ---- pacing ----------------------------------------------------------------------------------

class FakeClock:
    """A monotonic clock [ns] that advances only when slept on or told to."""

    def __init__(self):
        self.now = 1_000_000_000
        self.sleeps: list[float] = []

    def __call__(self) -> int:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += int(round(s * 1e9))

    def work(self, s: float) -> None:
        self.now += int(round(s * 1e9))


def make_frames(indices, fps=500.0):
    img = np.zeros((2, 2), np.uint8)
    return [Frame(i, int(i * 1e9 / fps), img) for i in indices]


def test_paced_as_fast_as_possible_passes_everything_in_order():
    frames = make_frames(range(100))
    clock = FakeClock()
    out = list(paced(frames, 500.0, None, clock=clock, sleep=clock.sleep))
    assert out == frames and clock.sleeps == []


def test_pacer_sleeps_only_when_ahead_without_drift():
    clock = FakeClock()
    pacer = Pacer(500.0, 1.0, clock=clock, sleep=clock.sleep)
    for f in make_frames(range(10)):
        pacer.wait(f)
        clock.work(0.0005)                        # consumer needs 0.5 ms of the 2 ms
    # frame k is due 2 ms * k after the first: exactly 18 ms in total, no accumulated error
    assert clock.now - 1_000_000_000 == pytest.approx(18e6 + 5e5, abs=10)
    assert all(s == pytest.approx(0.0015) for s in clock.sleeps)
    assert pacer.behind_s == 0.0


def test_pacer_reports_how_far_behind_and_catches_up():
    clock = FakeClock()
    pacer = Pacer(500.0, 2.0, clock=clock, sleep=clock.sleep)    # due every 1 ms
    frames = make_frames(range(6))
    pacer.wait(frames[0])
    clock.work(0.0045)                            # a 4.5 ms stall
    pacer.wait(frames[1])
    assert pacer.behind_s == pytest.approx(0.0035) and clock.sleeps == []
    assert pacer.behind_frames == pytest.approx(3.5)
    for f in frames[2:5]:                         # due at 2, 3, 4 ms: still late, no sleep
        pacer.wait(f)
    assert clock.sleeps == []
    pacer.wait(frames[5])                         # due at 5 ms, now 4.5 ms: sleeps 0.5 ms
    assert clock.sleeps == [pytest.approx(0.0005)] and pacer.behind_s == 0.0
    assert pacer.max_behind_s == pytest.approx(0.0035)


def test_pacer_respects_gaps_and_timestamps():
    clock = FakeClock()
    pacer = Pacer(500.0, 1.0, clock=clock, sleep=clock.sleep)
    for f in make_frames([0, 1, 5]):              # frames 2-4 lost: 8 ms pass before 5
        pacer.wait(f)
    assert sum(clock.sleeps) == pytest.approx(0.010)
    clock = FakeClock()
    pacer = Pacer(None, 1.0, clock=clock, sleep=clock.sleep)      # no rate: use t_ns
    img = np.zeros((1, 1), np.uint8)
    for f in [Frame(0, 0, img), Frame(1, 3_000_000, img), Frame(2, 4_000_000, img)]:
        pacer.wait(f)
    assert clock.sleeps == [pytest.approx(0.003), pytest.approx(0.001)]
    with pytest.raises(ValueError, match="speed"):
        Pacer(500.0, 0.0)
    with pytest.raises(ValueError, match="fps"):
        Pacer(-1.0, 1.0)


def test_paced_real_time_lower_bound(sim, tmp_path):
    """50 frames at 500 fps take at least ~0.098 s at speed 1 (lower bound only)."""
    frames = np.zeros((50, 4, 4), np.uint8)
    src = open_replay(write_npy(tmp_path, frames), fps=500)
    with src:
        t0 = time.monotonic()
        out = [f.index for f in paced(src.frames(), src.fps, 1.0)]
        elapsed = time.monotonic() - t0
    assert out == list(range(50))
    assert elapsed >= 0.09
