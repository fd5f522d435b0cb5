"""Reference front ends, written as a user of standard tools would (for the benchmark).

(a) :class:`ScipyReference` -- the report's method (§3.6.1) with SciPy: Gaussian blur
    (σ = ``bg_sigma``) of every frame and of the frames sampled for the median, float
    background, ``abs(frame - background) > T``, ``scipy.ndimage.label`` + ``find_objects``
    and per-object area and centroid (``scipy.ndimage.sum`` / ``center_of_mass``), blobs
    under ``min_area`` dropped.
(b) :class:`OpenCVReference` -- ``cv2.GaussianBlur`` + ``cv2.absdiff`` + ``cv2.threshold`` +
    ``cv2.connectedComponentsWithStats`` with the same parameters.

Both pair with :class:`NearestNeighbourTracker`, the report's tracking (§3.6.2): a blob
continues the track whose last centroid is nearest, when the step is shorter than the
distance from that track to its nearest other blob and does not go right-to-left; unmatched
blobs start tracks; a track unseen in a frame ends and becomes a clip (its crops cut on the
report's bounding-box union).
"""
from __future__ import annotations

import numpy as np

from ..types import Blob

__all__ = ["ScipyReference", "OpenCVReference", "NearestNeighbourTracker"]


def _sample(images, n):
    idx = np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int))
    return [np.asarray(images[int(i)]) for i in idx]


class ScipyReference:
    """The report's detection with SciPy (float images)."""

    name = "scipy (report's method)"

    def __init__(self, cfg):
        f = cfg.frontend
        self.sigma = f.bg_sigma
        self.T = f.threshold
        self.min_area = f.min_area
        self.bg = None

    def prime(self, images):
        from scipy import ndimage as ndi
        blurred = [ndi.gaussian_filter(im.astype(np.float64), self.sigma) for im in
                   _sample(images, 100)]
        self.bg = np.median(np.stack(blurred), axis=0)

    def process(self, index, image) -> list[Blob]:
        from scipy import ndimage as ndi
        diff = ndi.gaussian_filter(image.astype(np.float64), self.sigma) - self.bg
        mask = np.abs(diff) > self.T
        lab, n = ndi.label(mask, structure=np.ones((3, 3)))
        if n == 0:
            return []
        idx = np.arange(1, n + 1)
        areas = ndi.sum(mask, lab, idx)
        cms = ndi.center_of_mass(mask, lab, idx)
        out = []
        for k, sl in enumerate(ndi.find_objects(lab)):
            if sl is None or areas[k] < self.min_area:
                continue
            cy, cx = cms[k]
            out.append(Blob(index, float(cx), float(cy), int(areas[k]),
                            (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)))
        return out


class OpenCVReference:
    """The same method with OpenCV calls (uint8 images, float only for the blur)."""

    name = "opencv"

    def __init__(self, cfg):
        f = cfg.frontend
        self.sigma = f.bg_sigma
        self.T = f.threshold
        self.min_area = f.min_area
        self.bg = None

    def _blur(self, im):
        import cv2
        return cv2.GaussianBlur(im.astype(np.float32), (0, 0), self.sigma)

    def prime(self, images):
        self.bg = np.median(np.stack([self._blur(im) for im in _sample(images, 100)]),
                            axis=0).astype(np.float32)

    def process(self, index, image) -> list[Blob]:
        import cv2
        diff = cv2.absdiff(self._blur(image), self.bg)
        _, mask = cv2.threshold(diff, self.T, 255, cv2.THRESH_BINARY)
        n, lab, st, cen = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        out = []
        for k in range(1, n):
            x, y, w, h, a = st[k]
            if a < self.min_area:
                continue
            out.append(Blob(index, float(cen[k, 0]), float(cen[k, 1]), int(a),
                            (int(x), int(y), int(x + w), int(y + h))))
        return out


class NearestNeighbourTracker:
    """The report's nearest-neighbour tracking and clip cutting (§3.6.2-3.6.3).

    ``next_level(index, image, blobs)`` returns the clips (uint8 (T, S, S) arrays, the
    report's box crops resized to ``size``) of the tracks that ended in this frame.
    """

    def __init__(self, size: int = 64, max_back_px: float = 2.0, min_frames: int = 5):
        self.size = size
        self.max_back = max_back_px
        self.min_frames = min_frames
        self.tracks: list[dict] = []
        self.n_clips = 0
        self._done: list[np.ndarray] = []

    def next_level(self, index: int, image: np.ndarray, blobs: list[Blob]) -> list[np.ndarray]:
        pts = np.array([[b.cx, b.cy] for b in blobs], float).reshape(-1, 2)
        used = np.zeros(len(blobs), bool)
        alive = []
        for t in self.tracks:
            if len(blobs):
                d = np.hypot(*(pts - t["xy"]).T)
                d[used] = np.inf
                d[pts[:, 0] < t["xy"][0] - self.max_back] = np.inf
                j = int(np.argmin(d))
                if np.isfinite(d[j]):
                    others = np.hypot(*(pts - pts[j]).T)
                    others[j] = np.inf
                    if d[j] < others.min():
                        used[j] = True
                        t["xy"] = pts[j]
                        t["items"].append(self._crop(image, blobs[j].bbox))
                        alive.append(t)
                        continue
            self._finish(t)
        for j in np.flatnonzero(~used):
            alive.append({"xy": pts[j], "items": [self._crop(image, blobs[j].bbox)]})
        done, self._done = self._done, []
        self.tracks = alive
        return done

    def _crop(self, image, box):
        import cv2
        x0, y0, x1, y1 = box
        return cv2.resize(image[y0:y1, x0:x1], (self.size, self.size),
                          interpolation=cv2.INTER_LINEAR)

    def _finish(self, t):
        if len(t["items"]) < self.min_frames:
            return
        self.n_clips += 1
        self._done.append(np.stack(t["items"]))

    def flush(self) -> list[np.ndarray]:
        for t in self.tracks:
            self._finish(t)
        self.tracks = []
        done, self._done = self._done, []
        return done
