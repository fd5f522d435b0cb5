"""Clip store (clips.h5): round trip, crash safety, corrupt files."""
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from engine.clipstore import ClipStoreReader, ClipStoreWriter, open_store
from engine.errors import SourceError
from engine.types import CellClip, TrackStatus


def make_clip(cell_id, t, h=16, w=16, seed=0, features=None, status=TrackStatus.COMPLETE):
    rng = np.random.default_rng(seed + cell_id)
    return CellClip(
        cell_id=cell_id, frames=rng.integers(0, 256, (t, h, w), dtype=np.uint8),
        frame_indices=np.arange(100 + cell_id, 100 + cell_id + t, dtype=np.int64),
        centroids=rng.random((t, 2)).astype(np.float32) * 100,
        boxes=rng.integers(0, 800, (t, 4)).astype(np.int32),
        areas=rng.integers(50, 900, t).astype(np.int32), status=status,
        reason="" if status == TrackStatus.COMPLETE else "lost mid-channel",
        t0_ns=1000 * cell_id, t_exit_ns=1000 * cell_id + 7, features=features or {})


def assert_same(a: CellClip, b: CellClip):
    assert a.cell_id == b.cell_id
    for name in ("frames", "frame_indices", "centroids", "boxes", "areas"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.status == b.status and a.reason == b.reason
    assert a.t0_ns == b.t0_ns and a.t_exit_ns == b.t_exit_ns
    assert dict(a.features) == dict(b.features)


def test_round_trip_variable_length(tmp_path):
    clips = [make_clip(0, 5, features={"deform": 0.1, "area_um": 40.0}),
             make_clip(1, 37, status=TrackStatus.TRUNCATED),
             make_clip(2, 1, features={"deform": 0.3, "velocity": 2.0})]
    path = tmp_path / "clips.h5"
    with ClipStoreWriter(path, {"donor": "d07", "label": "fetal", "source": "sim://?seed=3",
                                "config": {"clips": {"size": 16}}, "note": "x"}) as w:
        for c in clips:
            w.append(c)
        assert len(w) == 3
    r = open_store(tmp_path)   # a folder means folder/clips.h5
    assert len(r) == 3
    assert r.meta["donor"] == "d07" and r.meta["label"] == "fetal"
    assert r.meta["source"] == "sim://?seed=3"
    assert r.meta["config"] == {"clips": {"size": 16}}
    assert r.meta["extra"] == {"note": "x"} and r.meta["canvas"] == [16, 16]
    assert r.meta["software"].startswith("fmh-engine")
    for i, c in enumerate(clips):
        assert_same(r[i], c)
    assert_same(r[-1], clips[-1])
    np.testing.assert_array_equal(r.frames(1), clips[1].frames)
    np.testing.assert_array_equal(r.n_frames, [5, 37, 1])
    with pytest.raises(IndexError):
        r[3]
    r.close()
    # readable by plain h5py, gzip (no plugin)
    with h5py.File(path, "r") as f:
        assert f["frames"].compression == "gzip"
        assert f["frames"].shape == (43, 16, 16)


def test_writer_validates(tmp_path):
    with pytest.raises(ValueError, match="label"):
        ClipStoreWriter(tmp_path / "a.h5", {"label": "foetal"})
    w = ClipStoreWriter(tmp_path / "b.h5", {"donor": 1})
    w.append(make_clip(0, 4))
    with pytest.raises(ValueError, match="canvas"):
        w.append(make_clip(1, 4, h=8))
    bad = make_clip(2, 4)
    with pytest.raises(ValueError, match="centroids"):
        w.append(CellClip(**{**{s: getattr(bad, s) for s in bad.__slots__},
                             "centroids": np.zeros((3, 2), np.float32)}))
    w.close()
    assert len(ClipStoreReader(tmp_path / "b.h5")) == 1


def test_killed_writer_leaves_readable_store(tmp_path):
    path = tmp_path / "clips.h5"
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent.parent)!r})
        from tests.test_clipstore import make_clip
        from engine.clipstore import ClipStoreWriter
        w = ClipStoreWriter({str(path)!r}, {{"donor": "d1", "label": "maternal"}}, flush_every=4)
        for i in range(10):
            w.append(make_clip(i, 6 + i))
        os._exit(0)   # killed: no close, clips 8 and 9 not flushed
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    r = ClipStoreReader(path)
    assert 8 <= len(r) <= 10
    for i in range(len(r)):
        assert_same(r[i], make_clip(i, 6 + i))
    assert r.meta["label"] == "maternal"


def test_missing_and_corrupt_store(tmp_path):
    with pytest.raises(SourceError, match="nope.h5"):
        ClipStoreReader(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(SourceError, match="junk.h5"):
        ClipStoreReader(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(SourceError, match="other.h5.*not a clip store"):
        ClipStoreReader(other)
    # truncated file
    good = tmp_path / "good.h5"
    with ClipStoreWriter(good, {"donor": "d"}) as w:
        for i in range(3):
            w.append(make_clip(i, 20, h=32, w=32))
    data = good.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(SourceError, match="cut.h5"):
        r = ClipStoreReader(cut)
        for c in r:
            pass


def test_writer_caches_stay_bounded(tmp_path):
    """A long run appends thousands of clips: HDF5's metadata cache (the chunk index) and the
    per-dataset chunk caches must not grow with the file (with HDF5's defaults the metadata
    cache reaches 256 KiB after about 3,000 chunks, and costs ~13x that in memory)."""
    from engine import clipstore
    cap = clipstore._MDC_BYTES
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (240, 8, 8), dtype=np.uint8)
    feats = {"deform": 0.1, "area_um": 40.0}
    with ClipStoreWriter(tmp_path / "clips.h5", {"donor": "d"}, flush_every=64) as w:
        w.append(make_clip(0, 5, h=8, w=8, features=feats))    # 8-frame chunks from here on
        base = make_clip(1, 240, h=8, w=8, features=feats)
        for i in range(1, 161):                                # ~4,800 frame chunks
            w.append(CellClip(**{**{s: getattr(base, s) for s in base.__slots__},
                                 "cell_id": i, "frames": frames}))
        f = w._f
        assert f["frames"].id.get_num_chunks() > 4000
        max_size, _, cur_size, _ = f.id.get_mdc_size()
        assert max_size <= cap and cur_size <= cap
        for name in ("frames", "frame_indices", "boxes", "cell_id", "reason", "features/deform"):
            ds = f[name]
            chunk_bytes = int(np.prod(ds.chunks)) * max(ds.dtype.itemsize, 16 if name == "reason" else 0)
            _, nbytes, w0 = ds.id.get_access_plist().get_chunk_cache()
            assert nbytes <= clipstore._CACHE_CHUNKS * chunk_bytes, name
            assert w0 == 1.0, name
    r = ClipStoreReader(tmp_path / "clips.h5")
    assert len(r) == 161
    np.testing.assert_array_equal(r.frames(160), frames)
