"""The two reference front ends of the benchmark and the report's nearest-neighbour tracker."""
import numpy as np
import pytest

from engine.config import load_config
from engine.detect.reference import NearestNeighbourTracker, OpenCVReference, ScipyReference


def _movie(n=30, H=80, W=300):
    """A dark disc (r=10) moving 8 px/frame to the right over a flat background + noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    frames = np.empty((n, H, W), np.uint8)
    for k in range(n):
        img = 150 + rng.normal(0, 1.0, (H, W))
        img[np.hypot(xx - (20 + 8 * k), yy - 40) <= 10] -= 30
        frames[k] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


@pytest.mark.parametrize("cls", [ScipyReference, OpenCVReference])
def test_reference_finds_the_moving_cell(cls):
    frames = _movie()
    ref = cls(load_config())
    ref.prime(frames)
    for k in (5, 15, 25):
        blobs = ref.process(k, frames[k])
        assert len(blobs) == 1
        assert blobs[0].cx == pytest.approx(20 + 8 * k, abs=1.0)
        assert blobs[0].cy == pytest.approx(40, abs=1.0)


def test_references_agree():
    frames = _movie()
    a, b = ScipyReference(load_config()), OpenCVReference(load_config())
    a.prime(frames)
    b.prime(frames)
    for k in range(2, 28):
        ba, bb = a.process(k, frames[k]), b.process(k, frames[k])
        assert len(ba) == len(bb) == 1
        assert abs(ba[0].cx - bb[0].cx) < 0.5 and abs(ba[0].area - bb[0].area) <= 0.05 * ba[0].area


def test_nearest_neighbour_tracker_cuts_one_clip_per_passage():
    frames = _movie()
    ref = OpenCVReference(load_config())
    ref.prime(frames)
    nn = NearestNeighbourTracker(size=32)
    clips = []
    for k in range(len(frames)):
        clips += nn.next_level(k, frames[k], ref.process(k, frames[k]))
    clips += nn.flush()
    assert len(clips) == 1
    assert clips[0].shape[1:] == (32, 32) and clips[0].shape[0] >= 25


def test_nearest_neighbour_tracker_refuses_backward_steps():
    from engine.types import Blob
    nn = NearestNeighbourTracker(min_frames=1)
    img = np.zeros((10, 100), np.uint8)
    nn.next_level(0, img, [Blob(0, 50.0, 5.0, 60, (45, 0, 55, 10))])
    nn.next_level(1, img, [Blob(1, 40.0, 5.0, 60, (35, 0, 45, 10))])   # 10 px back: new track
    assert len(nn.tracks) == 1 and nn.n_clips == 1
