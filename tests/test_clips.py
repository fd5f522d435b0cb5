"""Clip cutting: canvas size, centring, edge padding, bbox-resize mode, and clips from the linker."""
from __future__ import annotations

import numpy as np
import pytest

from engine.clips import ClipCutter, ClipRecorder, cut_fixed, cut_square
from engine.config import load_config
from engine.track import Linker
from engine.types import Blob, ChipGeometry, Frame, TrackStatus


@pytest.fixture(scope="module")
def cfg():
    return load_config()


def ramp(h=150, w=800):
    """An image whose pixel value encodes its position: (y * 7 + x) % 251."""
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy * 7 + xx) % 251).astype(np.uint8)


@pytest.mark.parametrize("size", [64, 33, 8])
@pytest.mark.parametrize("cx,cy", [(400.0, 75.0), (400.4, 74.6), (10.0, 5.0), (795.0, 147.0)])
def test_fixed_canvas_centres_a_dot(size, cx, cy):
    img = np.full((150, 800), 20, np.uint8)
    ix, iy = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
    img[iy, ix] = 255
    crop = cut_fixed(img, cx, cy, size)
    assert crop.shape == (size, size) and crop.dtype == np.uint8
    assert crop[size // 2, size // 2] == 255
    assert (crop == 255).sum() == 1


def test_fixed_canvas_is_a_copy_and_pads_with_edge_values():
    img = ramp()
    crop = cut_fixed(img, 400, 75, 64)
    np.testing.assert_array_equal(crop, img[75 - 32:75 + 32, 400 - 32:400 + 32])
    img[75, 400] ^= 0xFF
    assert crop[32, 32] != img[75, 400]           # not a view of the frame
    # at the top-left corner: rows/cols outside repeat the first row/column
    c = cut_fixed(img, 3, 2, 16)
    assert c[0, 0] == img[0, 0]
    np.testing.assert_array_equal(c[:6, 8], np.full(6, img[0, 3]))   # rows above the image
    np.testing.assert_array_equal(c[6, 5:], img[0, :11])
    np.testing.assert_array_equal(c[8, :5], np.full(5, img[2, 0]))   # cols left of the image
    # bottom-right corner
    c = cut_fixed(img, 799, 149, 16)
    assert c[-1, -1] == img[-1, -1]
    assert c[8, 8] == img[149, 799]


def test_bbox_resize_mode():
    img = np.full((150, 800), 100, np.uint8)
    img[60:80, 390:430] = 10          # a 40 x 20 cell
    crop = cut_square(img, (390, 60, 430, 80), 64, pad=0)
    assert crop.shape == (64, 64)
    # the square is 40 x 40 around the box: the cell fills the full width, half the height
    dark = crop < 55
    assert dark[32].all()
    rows = np.nonzero(dark[:, 32])[0]
    assert 30 <= rows.size <= 34 and abs(rows.mean() - 31.5) < 1.0
    # a small cell is scaled up: the size is not kept (unlike the fixed canvas)
    img2 = np.full((150, 800), 100, np.uint8)
    img2[70:80, 400:410] = 10
    crop2 = cut_square(img2, (400, 70, 410, 80), 64, pad=0)
    assert (crop2 < 55).mean() > 0.9
    fixed = cut_fixed(img2, 405, 75, 64)
    assert (fixed < 55).sum() == 100
    # at the image edge it pads, and the cutter dispatches on the mode
    cfg = load_config().replace(clips={"mode": "bbox-resize", "size": 32})
    cut = ClipCutter(cfg.clips)
    assert cut(img, 5.0, 5.0, (0, 0, 10, 12)).shape == (32, 32)


def test_recorder_grows_trims_and_builds():
    rec = ClipRecorder(16, max_frames=100, capacity=2)
    for i in range(10):
        det = i < 7
        rec.add(np.full((16, 16), i, np.uint8), 100 + i, 1000 * i, 1.0 * i, 2.0, (0, 0, 4, 4),
                30 if det else 0, (1, 0.1, 4, 4, 0, 90) if det else None)
    assert rec.n == 10 and rec.n_detected == 7
    rec.trim_to_last_detection()
    clip = rec.build(7, TrackStatus.COMPLETE, "", 99_000)
    assert clip.n_frames == 7
    assert clip.frames[6, 0, 0] == 6
    np.testing.assert_array_equal(clip.frame_indices, np.arange(100, 107))
    assert clip.t0_ns == 0 and clip.t_exit_ns == 99_000
    assert clip.frames.dtype == np.uint8 and clip.centroids.dtype == np.float32
    assert clip.boxes.dtype == np.int32 and clip.areas.dtype == np.int32
    assert rec.shapes().shape == (7, 6)
    full = ClipRecorder(4, max_frames=2)
    for _ in range(2):
        full.add(np.zeros((4, 4), np.uint8), 0, 0, 0, 0, (0, 0, 1, 1), 1, None)
    assert full.full
    with pytest.raises(IndexError):
        full.add(np.zeros((4, 4), np.uint8), 0, 0, 0, 0, (0, 0, 1, 1), 1, None)


def _disc_frames(g, xs, y, r=10, bg=150, fg=60):
    yy, xx = np.mgrid[0:g.height, 0:g.width]
    for x in xs:
        img = np.full((g.height, g.width), bg, np.uint8)
        img[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = fg
        yield img


def test_linker_cuts_clips_centred_on_the_cell_from_ring_like_buffers(cfg):
    """Frames arrive in one reused buffer (a ring slot): the clips still show every frame."""
    g = ChipGeometry(width=200, height=60, axis_y=30, constriction_x0=80, constriction_x1=120,
                     constriction_halfwidth=8, inlet_halfwidth=28, outlet_halfwidth=28)
    xs = list(np.arange(-14.0, 250.0, 4.0))
    slot = np.empty((g.height, g.width), np.uint8)
    linker = Linker(cfg, g)
    clips = []
    for f, img in enumerate(_disc_frames(g, xs, 30)):
        slot[:] = img                                   # the "ring slot" is overwritten
        x = xs[f]
        x0, x1 = max(0, int(x) - 10), min(g.width, int(x) + 11)
        area = int((img < 100).sum())
        blobs = []
        if area >= 50:
            cx = float(np.nonzero(img < 100)[1].mean())
            blobs = [Blob(f, cx, 30.0, area, (x0, 20, x1, 41))]
        if f == 20:
            blobs = []                                  # a missed detection
        clips += linker.next_level(Frame(1000 + f, 10 * f, slot), blobs)
    clips += linker.flush()
    assert len(clips) == 1
    clip = clips[0]
    assert clip.status is TrackStatus.COMPLETE, clip.reason
    assert clip.frames.shape[1:] == (64, 64)
    assert clip.frame_indices[0] == 1000 + next(i for i, x in enumerate(xs) if x + 10 >= 4)
    assert np.all(np.diff(clip.frame_indices) == 1)
    assert clip.areas[20 - (clip.frame_indices[0] - 1000)] == 0
    # for frames with the cell fully inside, the dark disc is centred on the canvas
    for k, (fr, a) in enumerate(zip(clip.frames, clip.areas)):
        x = xs[clip.frame_indices[k] - 1000]
        if a > 0 and 12 < x < g.width - 12:
            dark = np.argwhere(fr < 100)
            assert np.allclose(dark.mean(axis=0), (32, 32), atol=0.6), (k, dark.mean(axis=0))
    # the missed frame was cut at the predicted position: the disc is still near the centre
    k = 20 - (clip.frame_indices[0] - 1000)
    dark = np.argwhere(clip.frames[k] < 100)
    assert dark.size and np.abs(dark.mean(axis=0) - 32).max() < 3


def test_fixed_canvas_equals_clipped_index_reference():
    """Differential: the fast slice-and-replicate path equals indexing with clipped indices."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (150, 800)).astype(np.uint8)
    for _ in range(500):
        cx, cy = rng.uniform(-80, 880), rng.uniform(-80, 230)
        size = int(rng.integers(8, 70))
        x0 = int(np.floor(cx + 0.5)) - size // 2
        y0 = int(np.floor(cy + 0.5)) - size // 2
        rows = np.clip(np.arange(y0, y0 + size), 0, 149)
        cols = np.clip(np.arange(x0, x0 + size), 0, 799)
        np.testing.assert_array_equal(cut_fixed(img, cx, cy, size), img[rows[:, None], cols])
