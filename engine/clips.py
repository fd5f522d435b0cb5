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

import math

import numpy as np
from numba import njit

from .types import CellClip, TrackStatus

__all__ = ["BufferPool", "ClipCutter", "ClipRecorder", "cut_fixed", "cut_square", "SHAPE_FIELDS"]

#: per-frame blob statistics the recorder keeps for the features (float32 each)
SHAPE_FIELDS = ("perimeter", "deform", "major", "minor", "orientation", "brightness")


@njit(cache=True, nogil=True)
def _cut_clamped(image, x0, y0, out):
    """Copy ``image[y0:y0 + S, x0:x0 + S']`` into ``out`` (S, S'); rows and columns outside
    the image repeat its edge row/column (indices clamped)."""
    h, w = image.shape
    sy, sx = out.shape
    if x0 >= 0 and y0 >= 0 and x0 + sx <= w and y0 + sy <= h:
        for r in range(sy):
            src = image[y0 + r, x0:x0 + sx]
            dst = out[r]
            for c in range(sx):
                dst[c] = src[c]
        return
    for r in range(sy):
        src = image[min(max(y0 + r, 0), h - 1)]
        dst = out[r]
        for c in range(sx):
            dst[c] = src[min(max(x0 + c, 0), w - 1)]


def cut_fixed(image: np.ndarray, cx: float, cy: float, size: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """A ``size`` x ``size`` copy of ``image`` centred on (cx, cy) [px], edge-padded.

    Parameters
    ----------
    image : ndarray of uint8, shape (H, W)
    cx, cy : float
        Centre [px]; rounded to the nearest pixel.
    size : int
        Canvas side [px].
    out : ndarray of uint8, shape (size, size), optional
        Where to write the crop (e.g. a slot of a clip buffer).

    Returns
    -------
    ndarray of uint8, shape (size, size)
        ``out``, or a new array (never a view of ``image``). Where the canvas leaves the
        image, the nearest edge pixels are repeated (also when it misses the image).
    """
    half = size // 2
    if out is None:
        out = np.empty((size, size), np.uint8)
    _cut_clamped(image, math.floor(cx + 0.5) - half, math.floor(cy + 0.5) - half, out)
    return out


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

    def __call__(self, image: np.ndarray, cx: float, cy: float, box,
                 out: np.ndarray | None = None) -> np.ndarray:
        """The crop of one frame (written into ``out`` when given)."""
        if self.mode == "fixed":
            return cut_fixed(image, cx, cy, self.size, out)
        crop = cut_square(image, box, self.size, self.pad)
        if out is None:
            return crop
        out[...] = crop
        return out


class BufferPool:
    """Crop buffers kept for reuse, so that growing recorders do not fault fresh pages in.

    Large fresh allocations come straight from the kernel (``mmap``) and every page of them is
    zeroed on first touch; a linker that starts and ends tracks all the time would pay that
    for every crop. Buffers are keyed by shape; at most ``keep`` of each shape are held.
    """

    __slots__ = ("keep", "_free")

    def __init__(self, keep: int = 32):
        self.keep = int(keep)
        self._free: dict[tuple[int, int, int], list[np.ndarray]] = {}

    def get(self, cap: int, size: int) -> np.ndarray:
        """An uninitialised uint8 buffer of shape (cap, size, size)."""
        lst = self._free.get((cap, size, size))
        if lst:
            return lst.pop()
        return np.empty((cap, size, size), np.uint8)

    def put(self, buf: np.ndarray) -> None:
        """Give ``buf`` back (nothing may refer to it any more)."""
        lst = self._free.setdefault(buf.shape, [])
        if len(lst) < self.keep:
            lst.append(buf)


class ClipRecorder:
    """Collects one cell's crops and per-frame numbers while its track is live.

    Crops go into a uint8 buffer that grows by doubling up to ``max_frames`` (taken from and
    given back to ``pool`` when one is given); the per-frame numbers into Python lists (cheap
    to append). Everything is copied: nothing refers to a frame after :meth:`add` returns.
    """

    __slots__ = ("size", "max_frames", "n", "frames", "index", "t_ns", "cxy", "box", "area",
                 "shape", "n_detected", "last_detected", "pool")

    def __init__(self, size: int, max_frames: int, capacity: int = 8,
                 pool: BufferPool | None = None):
        self.size = int(size)
        self.max_frames = int(max_frames)
        self.pool = pool
        cap = max(1, min(capacity, self.max_frames))
        self.n = 0
        self.frames = (pool.get(cap, self.size) if pool is not None
                       else np.empty((cap, self.size, self.size), np.uint8))
        self.index: list[int] = []
        self.t_ns: list[int] = []
        self.cxy: list[tuple[float, float]] = []
        self.box: list[tuple[int, int, int, int]] = []
        self.area: list[int] = []
        self.shape: list = []
        self.n_detected = 0
        self.last_detected = -1   # position (in this clip) of the last seen frame

    def release(self) -> None:
        """Give the crop buffer back to the pool (the recorder is not used afterwards)."""
        if self.pool is not None and self.frames.shape[0] > 0:
            self.pool.put(self.frames)
        self.frames = np.empty((0, self.size, self.size), np.uint8)
        self.n = 0

    @property
    def full(self) -> bool:
        return self.n >= self.max_frames

    def slot(self) -> np.ndarray:
        """The (size, size) buffer the next frame's crop is to be written into."""
        if self.n >= self.max_frames:
            raise IndexError("ClipRecorder is full; check .full before adding")
        if self.n == self.frames.shape[0]:
            cap = min(2 * self.frames.shape[0], self.max_frames)
            pool = self.pool
            new = (pool.get(cap, self.size) if pool is not None
                   else np.empty((cap, self.size, self.size), np.uint8))
            new[:self.n] = self.frames[:self.n]
            if pool is not None:
                pool.put(self.frames)
            self.frames = new
        return self.frames[self.n]

    def add(self, crop: np.ndarray | None, index: int, t_ns: int, cx: float, cy: float, box,
            area: int, shape=None, *, seen: bool | None = None) -> None:
        """Append one frame.

        ``crop`` None means it was already written into :meth:`slot`. ``shape`` (the blob's
        statistics) None marks a frame without a measurement; ``seen`` (default: ``shape`` is
        given) marks a frame in which the cell was seen, so that the clip runs up to it.
        """
        if crop is not None:
            self.slot()[...] = crop
        elif self.n >= self.frames.shape[0]:
            raise IndexError("ClipRecorder.add(None, ...) needs the crop written into slot() first")
        i = self.n
        self.index.append(int(index))
        self.t_ns.append(int(t_ns))
        self.cxy.append((cx, cy))
        self.box.append(box)
        self.area.append(int(area))
        self.shape.append(shape)
        if shape is not None:
            self.n_detected += 1
        if seen or (seen is None and shape is not None):
            self.last_detected = i
        self.n = i + 1

    def push(self, index: int, t_ns: int, cx: float, cy: float, box, area: int,
             shape) -> None:
        """:meth:`add` of a measured frame whose crop is already in :meth:`slot` (the
        linker's hot path: no checks)."""
        i = self.n
        self.index.append(index)
        self.t_ns.append(t_ns)
        self.cxy.append((cx, cy))
        self.box.append(box)
        self.area.append(int(area))
        self.shape.append(shape)
        self.n_detected += 1
        self.last_detected = i
        self.n = i + 1

    def trim_to_last_detection(self) -> None:
        """Forget trailing frames that were only predicted (the track ended in a gap)."""
        n = self.last_detected + 1
        self.n = n
        for lst in (self.index, self.t_ns, self.cxy, self.box, self.area, self.shape):
            del lst[n:]

    def build(self, cell_id: int, status: TrackStatus, reason: str, t_exit_ns: int,
              features=None) -> CellClip:
        """The finished :class:`~engine.types.CellClip` (arrays are trimmed copies)."""
        n = self.n
        return CellClip(
            cell_id=int(cell_id), frames=self.frames[:n].copy(),
            frame_indices=np.array(self.index[:n], np.int64),
            centroids=np.array(self.cxy[:n], np.float32).reshape(n, 2),
            boxes=np.array(self.box[:n], np.int32).reshape(n, 4),
            areas=np.array(self.area[:n], np.int32), status=status,
            reason=reason, t0_ns=self.t_ns[0] if n else 0, t_exit_ns=int(t_exit_ns),
            features=dict(features or {}))

    def shapes(self) -> np.ndarray:
        """Per-frame blob statistics, float32 (T, len(SHAPE_FIELDS)); NaN where missed."""
        out = np.full((self.n, len(SHAPE_FIELDS)), np.nan, np.float32)
        for i, sh in enumerate(self.shape[:self.n]):
            if sh is not None:
                out[i] = sh
        return out
