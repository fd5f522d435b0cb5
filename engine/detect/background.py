"""The background model: the report's median image, kept current without cells leaking in.

Policy (recorded in :meth:`Background.manifest`)
------------------------------------------------
* **Prime** (report §3.6.1, made robust to crowding): ``bg_frames`` frames sampled evenly over
  the sequence. The first estimate is the per-pixel *mode* (:func:`mode_stack`), not the
  report's median: where cells cover a pixel in more than half of the samples (a crowded
  constriction at 30 cells/s covers its exit in over 80 %), the median lands on cell
  interiors and every gap between cells then reads as a blob, while the background stays the
  densest narrow peak of grey levels. The samples are then checked for cells against that
  estimate: none found, the median of all samples (``"median-all-frames"``, the report's
  method); at least half of them cell-free, the median of those (``"median-cell-free-frames"``);
  otherwise each pixel's median leaves out the samples in which a blob covered it, done twice,
  the second time with the blobs found against the first result (``"median-masked-pixels"``).
  The number of samples with cells that had to be used is the warning count
  (``prime_frames_with_cells``), as Shape-In records "bg empty" (pitfalls.md §18). Where cells
  cover a pixel in nearly every sample (a queue in the channel), no estimate from the
  sequence is right; a recorded background is then the remedy.
* **Drift** (illumination, focus): every ``stride = bg_update_frames // 32`` frames,
  :meth:`Background.observe` folds the frame into a running mean with weight
  ``stride / bg_update_frames`` (time constant ``bg_update_frames`` frames, 250 = 0.5 s by
  default), leaving out every pixel inside a moving blob's box grown by a margin; every
  ``bg_update_frames // 2`` frames that running mean becomes the active background (tables
  rebuilt). The time constant was 2000 frames: over a 10,000-frame sequence the simulated
  chip's focus drift then left the background behind by up to 17 grey levels at the walls'
  edges for thousands of frames, cells in the constriction merged with the walls, and tracks
  fell apart (default chip: 90-98 % of cells covered; 3x drift: 33-70 %; now 98-100 % and
  over 90 %, ``bench/bench_robustness.py``, looks ``long`` and ``long-drift``).
  A fold is one vectorised pass over the frame plus the boxes
  (12-30 µs), a commit about 170 µs (500 with smoothing); together a few µs per frame.
  No median is recomputed on the hot path.
* **Gain** (a lamp that dims or brightens scales the image, which the per-frame median
  offset cannot follow: walls and channel move by different amounts): every
  ``gain_every`` frames :class:`~engine.detect.frontend.FrontEnd` fits frame = gain x
  background + offset on the offset grid outside the blobs, and :meth:`Background.rescale`
  applies the mean of 8 such fits (a flickering lamp changes single frames) when it moves
  the background by more than 1.5 grey levels between its dark and bright samples.
* A recorded background (RT-DC ``image_bg``, a user image) replaces the median
  (policy ``"given"``); it is kept current the same way unless ``bg_update_frames == 0``.

The frames are compared with the background twice (see :mod:`engine.detect._kernels`): raw,
against per-pixel int16 bounds ``[lo, hi]`` that fold in the high (seed) threshold, and
smoothed, against the background smoothed with the same integer kernel (int64, scaled).

The report also blurs the frames and the median with a Gaussian of σ = 4 px; that is the
reference implementation's method (:mod:`engine.detect.reference`). Here frames and
background are smoothed alike with ``smooth_sigma`` (the evidence for the choice is in the
front-end benchmark, ``bench/bench_frontend.py --accuracy``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from numba import njit

from ..errors import DetectError

__all__ = ["Background", "gaussian_kernel_int", "median_stack", "mode_stack", "sample_indices"]


def gaussian_kernel_int(sigma: float, scale: int = 256) -> np.ndarray:
    """A sampled Gaussian of ``sigma`` [px] as int64 weights summing to about ``scale``.

    ``sigma == 0`` gives ``[1]`` (no smoothing). The radius is ``ceil(3 sigma)``.
    """
    if sigma <= 0:
        return np.ones(1, np.int64)
    r = int(math.ceil(3.0 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    w = np.rint(g / g.sum() * scale).astype(np.int64)
    return w[w > 0]                          # symmetric, so it stays centred


def sample_indices(n_total: int, n: int) -> np.ndarray:
    """``n`` frame indices spread evenly over ``range(n_total)`` (all when n >= n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


@njit(cache=True, nogil=True)
def _fold(acc, img, boxes, nbox, alpha, margin, saved):
    """acc += alpha * (img - acc) outside the boxes (grown by margin); ``saved`` is float32
    scratch of the image's shape.

    The whole frame is folded in one branch-free loop, which Numba vectorises (12 us for
    800 x 150), with the boxes' pixels saved before and put back after; a loop that tested
    every pixel against a coverage mask took about 8x as long."""
    H, W = img.shape
    for b in range(nbox):
        for y in range(max(boxes[b, 1] - margin, 0), min(boxes[b, 3] + margin, H)):
            for x in range(max(boxes[b, 0] - margin, 0), min(boxes[b, 2] + margin, W)):
                saved[y, x] = acc[y, x]
    for y in range(H):
        ar = acc[y]
        ir = img[y]
        for x in range(W):
            ar[x] += alpha * (np.float32(ir[x]) - ar[x])
    for b in range(nbox):
        for y in range(max(boxes[b, 1] - margin, 0), min(boxes[b, 3] + margin, H)):
            for x in range(max(boxes[b, 0] - margin, 0), min(boxes[b, 2] + margin, W)):
                acc[y, x] = saved[y, x]


@njit(cache=True, nogil=True)
def _tables(image, t, tw, polarity, lo, hi, lo_w, hi_w, rounded, smooth):
    """The comparison tables of a float32 background (``Background._rebuild``).

    ``lo``/``hi`` = ceil/floor(b -/+ t), ``lo_w``/``hi_w`` the same with ``tw``, ``rounded``
    = rint(b) (int16 each); ``polarity`` 1 (dark only) makes ``hi``/``hi_w`` the int16
    maximum, 2 (bright only) ``lo``/``lo_w`` the minimum. ``smooth`` (int64, or an empty
    array) receives rint(b), the smoothed background for a kernel of one tap. The main loop
    has no branch (a commit runs every bg_update_frames / 2 frames).
    """
    H, W = image.shape
    for y in range(H):
        for x in range(W):
            b = np.float64(image[y, x])
            lo[y, x] = np.int16(np.ceil(b - t))
            hi[y, x] = np.int16(np.floor(b + t))
            lo_w[y, x] = np.int16(np.ceil(b - tw))
            hi_w[y, x] = np.int16(np.floor(b + tw))
            rounded[y, x] = np.int16(np.rint(b))
    if smooth.shape[0] == H:
        for y in range(H):
            for x in range(W):
                smooth[y, x] = np.int64(rounded[y, x])
    if polarity == 1:
        hi[:, :] = 32767
        hi_w[:, :] = 32767
    elif polarity == 2:
        lo[:, :] = -32768
        lo_w[:, :] = -32768


class Background:
    """Per-pixel background [grey levels] and the comparison tables derived from it.

    Parameters
    ----------
    image : ndarray (H, W), float or uint8
        The background.
    seed_threshold : float
        High threshold folded into ``lo``/``hi`` [grey levels].
    threshold : float
        Low threshold folded into ``lo_w``/``hi_w`` (used when frames are not smoothed).
    kernel : ndarray of int64
        Integer smoothing kernel (``gaussian_kernel_int``) applied to frames and background.
    policy : str
        How ``image`` was obtained (for the manifest).
    polarity : {"both", "dark", "bright"}
        Which differences count as foreground: both signs (bright-field cells have dark
        rims and bright centres), or only darker (RT-DC's "-6 grey levels") or brighter.
    """

    def __init__(self, image: np.ndarray, seed_threshold: float, kernel: np.ndarray,
                 policy: str = "given", polarity: str = "both", threshold: float = 6.0):
        image = np.asarray(image)
        if image.ndim != 2 or image.size == 0:
            raise DetectError(f"background must be a non-empty 2-D image, got shape {image.shape}")
        if not np.all(np.isfinite(image)):
            raise DetectError("background contains NaN or infinite values")
        self.kernel = np.ascontiguousarray(kernel, np.int64)
        self.seed_threshold = float(seed_threshold)
        self.policy = policy
        self.polarity = polarity
        self.threshold = float(threshold)
        self.image = np.ascontiguousarray(image, np.float32)
        self.prime_frames = 0
        self.prime_frames_with_cells = 0
        self.uncertain_px = 0           # pixels covered by cells in nearly every prime sample
        self.uncertain_box: tuple[int, int, int, int] | None = None
        self.noise_sd = float("nan")
        self.updates = 0
        self.samples = 0
        self.samples_with_cells = 0
        self.rescales = 0
        self._acc: np.ndarray | None = None
        self._saved: np.ndarray | None = None
        self._rebuild()

    # -- tables -------------------------------------------------------------------------
    def _rebuild(self) -> None:
        # one Numba pass (a commit happens every bg_update_frames / 2 frames, in the frame
        # loop); "dark": nothing is brighter than 32767, "bright": nothing darker than -32768.
        # The tables are rewritten in place (fresh arrays cost page faults at every commit).
        shape = self.image.shape
        one_tap = self.kernel.shape[0] == 1 and int(self.kernel[0]) == 1
        if getattr(self, "lo", None) is None or self.lo.shape != shape:
            self.lo = np.empty(shape, np.int16)
            self.hi = np.empty(shape, np.int16)
            self.lo_w = np.empty(shape, np.int16)       # the low threshold
            self.hi_w = np.empty(shape, np.int16)
            self.rounded = np.empty(shape, np.int16)
            self.smooth_scaled = np.empty(shape, np.int64)
            self._sm64: np.ndarray | None = None
        smooth = self.smooth_scaled if one_tap else np.empty((0, 0), np.int64)
        _tables(self.image, self.seed_threshold, self.threshold,
                {"dark": 1, "bright": 2}.get(self.polarity, 0), self.lo, self.hi, self.lo_w,
                self.hi_w, self.rounded, smooth)
        if not one_tap:                            # scaled by K*K = 1 above
            import cv2
            if self._sm64 is None:
                self._sm64 = np.empty(shape, np.float64)
            k = self.kernel.astype(np.float64)
            cv2.sepFilter2D(self.image.astype(np.float64), cv2.CV_64F, k, k, dst=self._sm64,
                            borderType=cv2.BORDER_REPLICATE)
            np.rint(self._sm64, out=self._sm64)
            self.smooth_scaled[...] = self._sm64      # scaled by K*K already
        self.kernel_sum = int(self.kernel.sum())

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape  # type: ignore[return-value]

    # -- drift ----------------------------------------------------------------------------
    def observe(self, image: np.ndarray, boxes: np.ndarray, alpha: float, margin: int) -> None:
        """Fold one frame into the running mean, leaving out the blob boxes (+margin) [px]."""
        if self._acc is None:
            self._acc = self.image.copy()
            self._saved = np.empty(self.image.shape, np.float32)
        nbox = int(boxes.shape[0])
        _fold(self._acc, image, np.ascontiguousarray(boxes, np.int64).reshape(-1, 4), nbox,
              np.float32(alpha), int(margin), self._saved)
        self.samples += 1
        self.samples_with_cells += nbox > 0

    def rescale(self, gain: float, offset: float) -> None:
        """The scene's illumination changed by ``gain`` and ``offset`` (frame = gain x
        background + offset): apply it to the background and the running mean at once
        (tables rebuilt), rather than waiting ``bg_update_frames`` for the mean to follow."""
        self.image = (self.image * np.float32(gain) + np.float32(offset)).astype(np.float32)
        if self._acc is not None:
            # the running mean restarts from the rescaled background: it has already followed
            # part of the change since the last commit, and scaling it too would count that
            # part twice
            self._acc[...] = self.image
        self._rebuild()
        self.rescales += 1

    def commit(self) -> None:
        """Make the running mean the active background (rebuilds the tables)."""
        if self._acc is None:
            return
        self.image = self._acc.copy()
        self._rebuild()
        self.updates += 1

    def manifest(self) -> dict:
        """Policy and counters for the run's manifest."""
        return {"policy": self.policy, "prime_frames": self.prime_frames,
                "prime_frames_with_cells": self.prime_frames_with_cells,
                "uncertain_px": self.uncertain_px,
                "uncertain_box": list(self.uncertain_box) if self.uncertain_box else None,
                "noise_sd": None if math.isnan(self.noise_sd) else round(self.noise_sd, 3),
                "seed_threshold": self.seed_threshold,
                "updates": self.updates, "gain_rescales": self.rescales,
                "update_samples": self.samples,
                "update_samples_with_cells_masked": self.samples_with_cells}


@njit(cache=True, nogil=True)
def _mode_kernel(stack, half, out):
    """Per pixel of a uint8 stack (N, H, W): the densest window of 2*half+1 grey levels and the
    mean of the samples inside it."""
    N, H, W = stack.shape
    hist = np.zeros(256 + 2 * half + 1, np.int64)
    width = 2 * half + 1
    for y in range(H):
        for x in range(W):
            for k in range(N):
                hist[stack[k, y, x]] += 1
            run = 0
            for v in range(width):
                run += hist[v]
            best, at = run, 0
            for v in range(1, 256 - width + 1):
                run += hist[v + width - 1] - hist[v - 1]
                if run > best:
                    best, at = run, v
            s, n = 0, 0
            for k in range(N):
                v = stack[k, y, x]
                hist[v] = 0
                if at <= v < at + width:
                    s += v
                    n += 1
            out[y, x] = s / n


def mode_stack(images: Sequence[np.ndarray], half_width: int = 2) -> np.ndarray:
    """Per-pixel mode [grey levels] of a stack of equally shaped uint8 images, float32: the mean
    of the samples in the densest window of ``2 * half_width + 1`` grey levels.

    Unlike the median it stays on the background where cells cover a pixel in most samples (a
    crowded constriction): the background is one narrow peak of camera noise, while the grey
    levels of the cells that pass (rim, interior, halo, each cell its own) spread out.
    """
    stack = np.ascontiguousarray(np.stack([np.asarray(im) for im in images]))
    if stack.dtype != np.uint8:
        raise DetectError(f"mode_stack needs uint8 images, got {stack.dtype}")
    out = np.empty(stack.shape[1:], np.float32)
    _mode_kernel(stack, int(half_width), out)
    return out


def median_stack(images: Sequence[np.ndarray]) -> np.ndarray:
    """Per-pixel median [grey levels] of a stack of equally shaped uint8 images, float32."""
    stack = np.stack([np.asarray(im) for im in images])
    return np.median(stack, axis=0).astype(np.float32)


def robust_noise_sd(images: Sequence[np.ndarray], bg: np.ndarray) -> float:
    """Noise sd [grey levels] of frames about the background: 1.4826 * MAD of the residuals,
    each frame's residuals taken about their own median first (a frame-wide flicker is not
    pixel noise: the per-frame illumination offset removes it)."""
    res = []
    for im in images:
        r = (np.asarray(im, np.float32) - bg).ravel()[::7]
        res.append(r - np.median(r))
    res = np.concatenate(res)
    med = np.median(res)
    return float(1.4826 * np.median(np.abs(res - med)))
