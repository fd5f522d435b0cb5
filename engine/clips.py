"""Per-cell clips: crops cut frame by frame as the linker follows a cell.

Two cutting modes (``cfg.clips.mode``):

``"fixed"``
    A ``size`` x ``size`` canvas at the native pixel scale, centred on the cell's centroid:
    the cell's size and shape stay in the pixels, and the channel walls only show where the
    cell really is near them. Where the canvas leaves the image it is padded with the image's
    edge values (the edge column/row repeated), so no artificial black border appears.
``"bbox-resize"``
    The report's crops (§3.6.3): the square around the cell's bounding box (side = the longer
    box side + ``2 * bbox_pad``), resized to ``size`` x ``size`` with :func:`cv2.resize`. The
    scale changes from frame to frame, so the cell's size is lost.

Crops are copied out of the frame at once (the frame may be a ring slot that is overwritten
after the linker returns), so a clip never needs old frames.

Pixel convention: the canvas centre is pixel ``(size // 2, size // 2)``; a centroid at
integer pixel (cx, cy) lands exactly there.
"""
from __future__ import annotations

import numpy as np

from .types import CellClip, TrackStatus

__all__ = ["ClipCutter", "ClipRecorder", "cut_fixed", "cut_square", "SHAPE_FIELDS"]

#: per-frame blob statistics the recorder keeps for the features (float32 each)
SHAPE_FIELDS = ("perimeter", "deform", "major", "minor", "orientation", "brightness")


def cut_fixed(image: np.ndarray, cx: float, cy: float, size: int) -> np.ndarray:
    """A ``size`` x ``size`` copy of ``image`` centred on (cx, cy) [px], edge-padded.

    Parameters
    ----------
    image : ndarray of uint8, shape (H, W)
    cx, cy : float
        Centre [px]; rounded to the nearest pixel.
    size : int
        Canvas side [px].

    Returns
    -------
    ndarray of uint8, shape (size, size)
        A new array (never a view of ``image``).
    """
    h, w = image.shape
    half = size // 2
    x0 = int(np.floor(cx + 0.5)) - half
    y0 = int(np.floor(cy + 0.5)) - half
    if x0 >= 0 and y0 >= 0 and x0 + size <= w and y0 + size <= h:
        return image[y0:y0 + size, x0:x0 + size].copy()
    rows = np.clip(np.arange(y0, y0 + size), 0, h - 1)
    cols = np.clip(np.arange(x0, x0 + size), 0, w - 1)
    return image[rows[:, None], cols[None, :]]


def cut_square(image: np.ndarray, box, size: int, pad: int = 0) -> np.ndarray:
    """The report's crop: the square around ``box`` (+ ``pad`` [px]) resized to ``size``.

    Parameters
    ----------
    box : (x0, y0, x1, y1)
        Half-open box [px].
    pad : int, optional
        Margin added on every side of the square [px].
    """
    import cv2

    x0, y0, x1, y1 = (int(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1) + 2 * int(pad)
    cx2, cy2 = x0 + x1, y0 + y1          # twice the centre, to stay in integers
    sx0 = (cx2 - side) // 2
    sy0 = (cy2 - side) // 2
    h, w = image.shape
    if sx0 >= 0 and sy0 >= 0 and sx0 + side <= w and sy0 + side <= h:
        sq = image[sy0:sy0 + side, sx0:sx0 + side]
    else:
        rows = np.clip(np.arange(sy0, sy0 + side), 0, h - 1)
        cols = np.clip(np.arange(sx0, sx0 + side), 0, w - 1)
        sq = image[rows[:, None], cols[None, :]]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(sq), (size, size), interpolation=interp)


class ClipCutter:
    """Cuts one crop per frame according to ``cfg.clips`` (``mode``, ``size``, ``bbox_pad``)."""

    def __init__(self, clips_cfg):
        self.mode = clips_cfg.mode
        self.size = int(clips_cfg.size)
        self.pad = int(getattr(clips_cfg, "bbox_pad", 0))
        if self.mode not in ("fixed", "bbox-resize"):
            raise ValueError(f"clips.mode: unknown mode {self.mode!r}; "
                             "choose 'fixed' or 'bbox-resize'")

    def __call__(self, image: np.ndarray, cx: float, cy: float, box) -> np.ndarray:
        if self.mode == "fixed":
            return cut_fixed(image, cx, cy, self.size)
        return cut_square(image, box, self.size, self.pad)


class ClipRecorder:
    """Collects one cell's crops and per-frame numbers while its track is live.

    Storage grows by doubling up to ``max_frames``; everything is copied, nothing refers to a
    frame after :meth:`add` returns.
    """

    __slots__ = ("size", "max_frames", "n", "frames", "index", "t_ns", "cxy", "box", "area",
                 "shape", "n_detected", "last_detected")

    def __init__(self, size: int, max_frames: int, capacity: int = 32):
        self.size = int(size)
        self.max_frames = int(max_frames)
        cap = max(1, min(capacity, self.max_frames))
        self.n = 0
        self.frames = np.empty((cap, self.size, self.size), np.uint8)
        self.index = np.empty(cap, np.int64)
        self.t_ns = np.empty(cap, np.int64)
        self.cxy = np.empty((cap, 2), np.float32)
        self.box = np.empty((cap, 4), np.int32)
        self.area = np.empty(cap, np.int32)
        self.shape = np.full((cap, len(SHAPE_FIELDS)), np.nan, np.float32)
        self.n_detected = 0
        self.last_detected = -1   # position (in this clip) of the last detected frame

    @property
    def full(self) -> bool:
        return self.n >= self.max_frames

    def _grow(self) -> None:
        cap = min(2 * self.frames.shape[0], self.max_frames)
        for name in ("frames", "index", "t_ns", "cxy", "box", "area", "shape"):
            old = getattr(self, name)
            new = np.empty((cap,) + old.shape[1:], old.dtype)
            new[:self.n] = old[:self.n]
            setattr(self, name, new)

    def add(self, crop: np.ndarray, index: int, t_ns: int, cx: float, cy: float, box,
            area: int, shape=None) -> None:
        """Append one frame. ``area`` 0 and ``shape`` None mark a frame without a detection."""
        if self.n >= self.max_frames:
            raise IndexError("ClipRecorder is full; check .full before adding")
        if self.n == self.frames.shape[0]:
            self._grow()
        i = self.n
        self.frames[i] = crop
        self.index[i] = index
        self.t_ns[i] = t_ns
        self.cxy[i, 0] = cx
        self.cxy[i, 1] = cy
        self.box[i] = box
        self.area[i] = area
        if shape is not None:
            self.shape[i] = shape
            self.n_detected += 1
            self.last_detected = i
        else:
            self.shape[i] = np.nan
        self.n = i + 1

    def trim_to_last_detection(self) -> None:
        """Forget trailing frames that were only predicted (the track ended in a gap)."""
        self.n = self.last_detected + 1

    def build(self, cell_id: int, status: TrackStatus, reason: str, t_exit_ns: int,
              features=None) -> CellClip:
        """The finished :class:`~engine.types.CellClip` (arrays are trimmed copies)."""
        n = self.n
        return CellClip(
            cell_id=int(cell_id), frames=self.frames[:n].copy(),
            frame_indices=self.index[:n].copy(), centroids=self.cxy[:n].copy(),
            boxes=self.box[:n].copy(), areas=self.area[:n].copy(), status=status,
            reason=reason, t0_ns=int(self.t_ns[0]) if n else 0, t_exit_ns=int(t_exit_ns),
            features=dict(features or {}))

    def shapes(self) -> np.ndarray:
        """Per-frame blob statistics, float32 (T, len(SHAPE_FIELDS)); NaN where missed."""
        return self.shape[:self.n].copy()
