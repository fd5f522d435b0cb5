"""The front end: one frame in, its blobs out (background, foreground, labels, statistics).

Per frame (:meth:`FrontEnd.process`)
-----------------------------------
1. Illumination offset: the median of ``frame - background`` over about 1000 pixels on a grid
   (histogram, no sort) is subtracted, so frame-wide flicker does not reach the threshold.
2. One fused Numba pass (:func:`engine.detect._kernels.detect_frame`): *seeds* are the pixels
   farther than the seed threshold from the background (raw frame, per-pixel int16 bounds);
   around each seed blob a region is smoothed with the integer Gaussian kernel of
   ``smooth_sigma`` and thresholded at ``fg_threshold`` against the background smoothed alike;
   components are labelled (8-connectivity, runs + union-find) and measured in the same
   pass; components with fewer than ``seed_min_px`` seed pixels are dropped (hysteresis).
   Regions grow while a component reaches their border, so a faint cell whose outline is
   seeded on one side only is still found whole.
3. Split cells are re-joined (report §3.6.1; :func:`engine.detect._kernels.rejoin`), blobs
   outside ``[min_area, max_area]`` dropped.
4. Blobs that stayed within 1 px of one place for ``static_frames`` frames are debris stuck to the
   chip, not cells in the flow: they are dropped (counted) and not masked from the background
   update, so they fade into it.
5. Every ``stride = bg_update_frames / 32`` frames the frame is folded into a running mean
   outside the moving blobs' boxes (time constant ``bg_update_frames``), which becomes the
   active background every ``bg_update_frames / 2`` frames (:mod:`engine.detect.background`).
   Every ``gain_every`` frames frame = gain x background + offset is fitted outside the blobs;
   the mean of 8 fits rescales the background when a lamp has dimmed or brightened.

Only the regions around seeds are smoothed, so the cost is one pass over the frame plus work
proportional to the cells in view.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Sequence

import numpy as np

from ..errors import DetectError
from ..types import Blob, ChipGeometry, Frame
from . import _kernels as K
from .background import (Background, gaussian_kernel_int, median_stack, mode_stack,
                         robust_noise_sd, sample_indices)
from .blobs import to_blobs
from .geometry import find_geometry

__all__ = ["FrontEnd"]

log = logging.getLogger(__name__)

_OFF = 1 << 62      # a threshold no difference reaches: switches one polarity off
_GAIN_SAMPLES = 8   # gain fits averaged before the background is rescaled (_follow_gain)
#: Samples folded into the running background per time constant (``bg_update_frames``), and
#: commits of it as the active background per time constant. More samples keep crowds of
#: cells from stirring a short time constant (30 cells/s, seed 201, cells covered: 16 folds
#: 0.907 with 3 identity switches, 32 folds 0.935 with none); each fold costs 12-30 us (about
#: 40 in the frame loop), each commit about 170 (500 smoothed).
BG_FOLDS = 32
BG_COMMITS = 2


class FrontEnd:
    """Background model + detection for one stream of equally sized uint8 frames.

    Parameters
    ----------
    cfg : engine.config.Config
        Uses ``cfg.frontend`` (thresholds, areas, background policy), ``cfg.chip`` and
        ``cfg.camera`` (the configured geometry).
    background : ndarray (H, W), optional
        A recorded background (RT-DC ``image_bg``, a user image) instead of :meth:`prime`.
    geometry : ChipGeometry, optional
        The channel; default: found from the background (``frontend.geometry = "auto"``,
        falling back to the config) or the config.

    Attributes
    ----------
    stats : dict
        ``frames``, ``blobs``, ``rejoined``, ``reprimes`` (see :meth:`reprime`) and per-stage
        times ``us_*`` [µs, summed]: ``us_detect`` (the fused kernel: offset, detection,
        re-join), ``us_blobs`` (debris test, Blob values), ``us_background``.
    """

    def __init__(self, cfg, background: np.ndarray | None = None,
                 geometry: ChipGeometry | None = None):
        self.cfg = cfg
        f = cfg.frontend
        self._f = f
        self.smooth_sigma = float(f.smooth_sigma)
        self.kernel = gaussian_kernel_int(self.smooth_sigma)
        self._geometry_given = geometry
        self._geometry: ChipGeometry | None = geometry
        self.geometry_note = "given" if geometry is not None else ""
        self.bg: Background | None = None
        self.stats = {"frames": 0, "blobs": 0, "rejoined": 0, "dropped_small": 0,
                      "dropped_large": 0, "static_dropped": 0, "buffer_grows": 0, "reprimes": 0,
                      "us_detect": 0.0, "us_blobs": 0.0, "us_background": 0.0}
        self._runs = np.empty((4096, 3), np.int64)
        self._run_label = np.empty(4096, np.int64)
        self._stats = np.empty((256, K.NSTAT), np.float64)
        self._fin = np.empty((256, K.NFIN), np.float64)
        self._res = np.zeros(5, np.int64)
        self._prm = np.zeros(16, np.float64)
        self._rowbuf = np.empty(8, np.uint8)
        self._hist = np.empty(511, np.int64)
        self._step = (8, 16)
        self._since_commit = 0
        self._prev = (np.zeros((0, K.NFIN)), np.zeros(0, np.int64), np.zeros((0, 2)))
        self._sites = np.zeros((0, 4))            # static debris: cx, cy, area, last frame
        self._area_buf = np.zeros(256)            # the last 256 blob areas (typical cell size)
        self._diam_buf = np.zeros(256)            # and their box diameters
        self._n_areas = 0
        self._typical = 0.0
        self._typical_diam = 0.0
        self._gain_split: tuple | None = None     # (background key, dark/bright split level)
        self._gain_fits: list = []
        self._gain_hist = np.zeros((4, 256), np.int64)
        self._gain_out = np.zeros(6)
        if background is not None:
            self.set_background(background, policy="given")

    # -- background -------------------------------------------------------------------------
    def _seed_threshold(self, noise_sd: float) -> float:
        f = self._f
        if f.seed_threshold > 0:
            return float(f.seed_threshold)
        sd = noise_sd if math.isfinite(noise_sd) else 1.5
        return max(2.0 * f.fg_threshold, 4.5 * sd, 3.0)

    def _smoothing(self, noise_sd: float) -> float:
        """The blur [px] for camera noise ``noise_sd`` [grey levels] (``frontend.smooth_auto``).

        The front end compares raw frames with the background at ``fg_threshold`` (6 grey
        levels), which suits the 1.5-3 grey levels of noise of the RT-DC recordings in
        ``shared/data``; with noisier frames the low threshold floods the regions around cells
        and cells fall apart into fragments (simulated chip at noise sd 5: 75 % of cells got one
        complete track raw, 94 % blurred by 1 px; sd 6: 34 % raw, 81 % blurred by 1.5 px).
        A 1 px Gaussian divides pixel noise by about 3.5.
        """
        sigma = float(self._f.smooth_sigma)
        if not self._f.smooth_auto or not math.isfinite(noise_sd):
            return sigma
        if noise_sd > 5.0:
            return max(sigma, 1.5)
        if noise_sd > 2.5:
            return max(sigma, 1.0)
        return sigma

    def set_background(self, image: np.ndarray, policy: str = "given",
                       noise_sd: float = float("nan")) -> None:
        """Use ``image`` [grey levels] as the background from now on (tables rebuilt)."""
        image = np.asarray(image)
        if image.ndim != 2:
            raise DetectError(f"background must be a 2-D image (H, W), got shape {image.shape}")
        if self.bg is not None and self.bg.shape != image.shape:
            raise DetectError(f"background shape {image.shape} differs from the current "
                              f"{self.bg.shape}")
        sigma = self._smoothing(noise_sd)
        if sigma != self.smooth_sigma:
            self.smooth_sigma = sigma
            self.kernel = gaussian_kernel_int(sigma)
        bg = Background(image, self._seed_threshold(noise_sd), self.kernel, policy,
                        polarity=self._f.polarity, threshold=self._f.fg_threshold)
        bg.noise_sd = noise_sd
        if self.bg is not None:
            bg.prime_frames = self.bg.prime_frames
            bg.prime_frames_with_cells = self.bg.prime_frames_with_cells
        self.bg = bg
        H, W = image.shape
        self._rowbuf = np.empty((W + 7) // 8 * 8, np.uint8)
        # about 1000 samples on a regular grid for the illumination offset
        sy = max(1, int(round(math.sqrt(H * W / 1000.0) / 1.4)))
        self._step = (sy, max(1, int(round(H * W / 1000.0 / sy))))
        self._since_commit = 0
        self._set_params()
        if self._geometry_given is None:
            self._geometry = None      # found again lazily from the new background

    def prime(self, images: Sequence[np.ndarray]) -> None:
        """Build the background from frames sampled over the sequence (report §3.6.1).

        ``images`` may be any sequence (a list, an (N, H, W) array or memory map); at most
        ``frontend.bg_frames`` of them, spread evenly, are read. Samples with cells are left
        out when enough cell-free ones remain (see :mod:`engine.detect.background`).
        """
        n_total = len(images)
        if n_total == 0:
            raise DetectError("prime() needs at least one frame, got none")
        idx = sample_indices(n_total, self._f.bg_frames)
        sample = [np.asarray(images[int(i)]) for i in idx]
        for im in sample:
            self._check_image(im)
        # First estimate: the per-pixel mode, which stays on the background even where cells
        # cover a pixel in most samples (a crowded constriction), where the median would not.
        bg0 = mode_stack(sample)
        sd = robust_noise_sd(sample, bg0)
        self.set_background(bg0, policy="mode-all-frames", noise_sd=sd)
        # which samples hold cells? (against the first estimate)
        boxes = self._sample_boxes(sample, idx)
        free = [im for im, bx in zip(sample, boxes) if not bx]
        n_cells = len(sample) - len(free)
        uncertain = None
        if n_cells == 0:
            policy, bg, warn = "median-all-frames", median_stack(sample), 0
        elif len(free) >= max(3, len(sample) // 2):
            policy, bg, warn = "median-cell-free-frames", median_stack(free), 0
        else:
            # Crowded: each pixel's median leaves out the samples in which a cell covered it,
            # twice, the second time with the cells found against the first masked median.
            bg, _ = self._masked_median(sample, boxes, bg0)
            self.set_background(bg, policy="median-masked-pixels", noise_sd=sd)
            boxes = self._sample_boxes(sample, idx)
            bg, n_free = self._masked_median(sample, boxes, bg)
            policy, warn = "median-masked-pixels", n_cells
            uncertain = n_free * 10 < len(sample)        # covered in more than 90 %
        sd = robust_noise_sd(free if free else sample, bg)
        self.set_background(bg, policy=policy, noise_sd=sd)
        self.bg.prime_frames = len(sample)
        self.bg.prime_frames_with_cells = warn
        if uncertain is not None:
            self._report_uncertain(uncertain)

    def _report_uncertain(self, uncertain: np.ndarray) -> None:
        """Record (and log) the pixels that blob boxes (grown by ``roi_margin``, as the
        masked median leaves them out) covered in more than 90 % of the priming samples:
        their background is a guess (a queue of cells that never clears; or, with few
        samples, an estimate that went wrong there and made blobs of the empty samples
        too), and cells there may be missed or merged with it for as long as it lasts,
        since the running mean leaves blobs out. Fewer than ``min_area`` such pixels are
        noise and are not reported."""
        n = int(uncertain.sum())
        if n < self._f.min_area:
            return
        ys, xs = np.nonzero(uncertain)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        self.bg.uncertain_px = n
        self.bg.uncertain_box = box
        log.warning("background: %d px in x %d-%d, y %d-%d were inside blobs in more "
                    "than 90 %% of the %d priming samples (cells that never left, or a "
                    "background estimate that is wrong there), so their background is a "
                    "guess and cells there may be missed; pass an image of the empty "
                    "channel as --background IMAGE", n, box[0], box[2], box[1], box[3],
                    self.bg.prime_frames)

    def _sample_boxes(self, sample: list, idx: np.ndarray) -> list[list[tuple]]:
        """Per background sample: the boxes of the blobs found against the current background."""
        boxes = []
        for im, i in zip(sample, idx):
            fin = self._detect(np.ascontiguousarray(im), int(i))
            boxes.append([tuple(r) for r in fin[:, K.F_X0:K.F_Y1 + 1].astype(np.int64).tolist()])
        return boxes

    def _masked_median(self, sample: list, boxes: list,
                       fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel median of the samples, each without its blob boxes (grown by
        ``roi_margin``), ``fallback`` where every sample was covered; and per pixel the
        number of samples that were not covered."""
        stack = np.stack(sample).astype(np.float32)
        m = self._f.roi_margin
        for k, bx in enumerate(boxes):
            for (x0, y0, x1, y1) in bx:
                stack[k, max(y0 - m, 0):y1 + m, max(x0 - m, 0):x1 + m] = np.nan
        with warnings.catch_warnings():          # pixels covered in every sample
            warnings.simplefilter("ignore", RuntimeWarning)
            bg = np.nanmedian(stack, axis=0)
        n_free = np.sum(~np.isnan(stack), axis=0)
        return np.where(np.isnan(bg), fallback, bg).astype(np.float32), n_free

    def reprime(self, images: Sequence[np.ndarray]) -> None:
        """Build the background afresh from ``images`` (as :meth:`prime`), keeping the geometry.

        For a stream that resumes after a long gap (frames dropped in a stall, a camera that
        paused): the running background follows drift at the pace of the frames processed
        (time constant ``bg_update_frames``), so a gap of hundreds of frames leaves it behind
        the scene (focus or illumination drifted meanwhile), and the difference reaches the
        thresholds along every edge of the chip as spurious blobs until the running mean has
        caught up. Counted in ``stats["reprimes"]``.
        """
        geometry, note = self._geometry, self.geometry_note
        self.prime(images)
        if geometry is not None:             # the tracker already uses it: keep it
            self._geometry, self.geometry_note = geometry, note
        self.stats["reprimes"] += 1

    @property
    def background(self) -> np.ndarray | None:
        """The active background [grey levels], float32 (H, W), or None before priming."""
        return None if self.bg is None else self.bg.image

    @property
    def geometry(self) -> ChipGeometry:
        """The channel: given, found from the background, or from the config."""
        if self._geometry is None:
            cfg_geo = self.cfg.geometry()
            if self._f.geometry == "config" or self.bg is None:
                self._geometry = cfg_geo
                self.geometry_note = "config"
            else:
                try:
                    self._geometry = find_geometry(self.bg.image)
                    self.geometry_note = "found in the background"
                except DetectError as exc:
                    self._geometry = cfg_geo
                    self.geometry_note = f"config ({exc})"
        return self._geometry

    # -- per frame --------------------------------------------------------------------------
    def _check_image(self, image: np.ndarray) -> None:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
            desc = (f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
                    else type(image).__name__)
            raise DetectError(f"frames must be uint8 arrays of shape (H, W), got {desc}")
        if self.bg is not None and image.shape != self.bg.shape:
            raise DetectError(f"frame shape {image.shape} differs from the background's "
                              f"{self.bg.shape}")

    def process(self, frame: Frame) -> list[Blob]:
        """The blobs of one frame (the hot path).

        Raises
        ------
        DetectError
            When no background was set, or the frame is not uint8 of the background's shape.
        """
        if self.bg is None:
            raise DetectError("no background: call prime(frames) or pass background= first")
        image = frame.image
        self._check_image(image)
        if not image.flags.c_contiguous:
            image = np.ascontiguousarray(image)
        fin = self._detect(image, frame.index)
        t0 = time.perf_counter()
        f = self._f
        static = self._static(fin) if f.static_frames > 0 else None
        if f.gain_every > 0 and self.stats["frames"] % f.gain_every == f.gain_every - 1:
            t1 = time.perf_counter()
            self._follow_gain(image, fin)
            self.stats["us_background"] += (time.perf_counter() - t1) * 1e6
        if f.bg_update_frames > 0:
            stride = max(1, f.bg_update_frames // BG_FOLDS)
            n = self.stats["frames"]
            if n % stride == 0:
                t1 = time.perf_counter()
                # moving blobs are masked out; static ones (stuck debris) may fade in
                moving = fin if static is None else fin[~static]
                boxes = moving[:, K.F_X0:K.F_Y1 + 1].astype(np.int64)
                self.bg.observe(image, boxes, stride / f.bg_update_frames, f.roi_margin)
                self.stats["us_background"] += (time.perf_counter() - t1) * 1e6
            self._since_commit += 1
            if self._since_commit >= max(stride, f.bg_update_frames // BG_COMMITS):
                t1 = time.perf_counter()
                self.bg.commit()
                self._since_commit = 0
                self.stats["us_background"] += (time.perf_counter() - t1) * 1e6
        if static is not None and static.any():
            self.stats["static_dropped"] += int(static.sum())
            fin = fin[~static]
        blobs = to_blobs(fin, frame.index)
        st = self.stats
        st["frames"] += 1
        st["blobs"] += len(blobs)
        st["us_blobs"] += (time.perf_counter() - t0) * 1e6
        return blobs

    def _follow_gain(self, image: np.ndarray, fin: np.ndarray) -> None:
        """Track the scene's gain: fit frame = gain x background + offset on the illumination
        grid outside the blobs' boxes (grown by ``roi_margin``), average the fits of the last
        ``_GAIN_SAMPLES`` calls, and rescale the background when the average moves it by more
        than 1.5 grey levels between its dark and bright samples.

        One frame's fit is not enough: a lamp flickers frame to frame (the per-frame offset
        takes that out), and a background rescaled to one flickering frame stays wrong. The
        medians of frame and background over the samples darker and brighter than the
        background's median give two points of the line (robust to the cells in view). It
        needs contrast in the background (walls against channel): with less than 20 grey
        levels between the two halves the gain is left alone."""
        bg = self.bg
        key = (id(bg), bg.updates, bg.rescales)
        sy, sx = self._step
        if self._gain_split is None or self._gain_split[0] != key:
            # dark and bright halves: split at the background's median on the grid
            grid = bg.rounded[sy // 2::sy, sx // 2::sx]
            self._gain_split = (key, int(np.median(grid)))
            self._gain_fits = []
        boxes = np.ascontiguousarray(fin[:, K.F_X0:K.F_Y1 + 1], np.int64)
        out = self._gain_out
        K.gain_fit(image, bg.rounded, sy, sx, boxes, self._f.roi_margin,
                   self._gain_split[1], self._gain_hist, out)
        b_lo, b_hi, v_lo, v_hi = out[:4].tolist()
        if out[4] < 20 or out[5] < 20 or b_hi - b_lo < 20.0:
            return
        gain = (v_hi - v_lo) / (b_hi - b_lo)
        self._gain_fits.append((gain, v_lo - gain * b_lo))
        if len(self._gain_fits) < _GAIN_SAMPLES:
            return
        del self._gain_fits[:-_GAIN_SAMPLES]
        gain = sum(g for g, _ in self._gain_fits) / _GAIN_SAMPLES
        offset = sum(o for _, o in self._gain_fits) / _GAIN_SAMPLES
        if 0.5 < gain < 2.0 and abs(gain - 1.0) * (b_hi - b_lo) > 1.5:
            bg.rescale(gain, offset)            # a new key: the fits start afresh

    def _static(self, fin: np.ndarray) -> np.ndarray:
        """Flags of blobs (finished rows ``fin``) that are debris stuck to the chip, not cells
        in the flow.

        A blob that has not moved (within 1 px of where it was ``static_frames`` frames ago,
        area within 25 %) for ``static_frames`` consecutive frames becomes a *static site*;
        later blobs at a site (<= 1.5 px, area within 25 %) are flagged at once, so debris
        that flickers in and out of the threshold stays suppressed. Sites unseen for
        50 * ``static_frames`` frames expire.
        """
        n = fin.shape[0]
        now = self.stats["frames"]
        if n == 0:
            self._prev = (fin, np.zeros(0, np.int64), np.zeros((0, 2)))
            return np.zeros(0, np.bool_)
        count = np.empty(n, np.int64)
        flags = np.empty(n, np.bool_)
        anchor = np.empty((n, 2))
        prev, pcount, panchor = self._prev
        self._sites = K.static_flags(fin, prev, pcount, panchor, self._sites, float(now),
                                     self._f.static_frames, count, anchor, flags)
        self._prev = (fin, count, anchor)
        return flags

    def _set_params(self) -> None:
        """The fused kernel's parameter vector (thresholds, areas; see ``K.detect_blobs``)."""
        f = self._f
        bg = self.bg
        thr_s = int(math.floor(f.fg_threshold * bg.kernel_sum * bg.kernel_sum))
        self._prm[:] = (
            1.0 if f.illumination else 0.0, self._step[0], self._step[1],
            thr_s if f.polarity != "bright" else _OFF, thr_s if f.polarity != "dark" else _OFF,
            f.roi_margin + len(self.kernel) // 2, f.seed_min_px, 1.0 if f.fill_holes else 0.0,
            self._split_area(), f.split_neck_ratio, 1.0 if f.rejoin else 0.0,
            self._rejoin_gap(), f.rejoin_min_deform, f.min_area, self._rejoin_cap(), f.max_area)

    def _detect(self, image: np.ndarray, index: int) -> np.ndarray:
        """Finished statistics rows (``F_*`` columns) of the blobs of one frame (a new array)."""
        bg = self.bg
        t0 = time.perf_counter()
        while True:
            kept = K.detect_blobs(image, bg.lo, bg.hi, bg.lo_w, bg.hi_w, bg.smooth_scaled,
                                  bg.rounded, self.kernel, self._prm, self._runs,
                                  self._run_label, self._rowbuf, self._stats, K.PERIM_WEIGHTS,
                                  self._hist, self._fin, self._res)
            if kept >= 0:
                break
            self._grow()
        fin = self._fin[:kept].copy()
        res = self._res
        if res[1] or res[2] or res[3]:
            self.stats["rejoined"] += int(res[1])
            self.stats["dropped_small"] += int(res[2])
            self.stats["dropped_large"] += int(res[3])
        if kept and (self._n_areas < 64 or index % 16 == 0):
            self._n_areas, self._typical, self._typical_diam = K.push_sizes(
                self._area_buf, self._diam_buf, self._n_areas, fin)
            self._prm[8] = self._split_area()
            self._prm[14] = self._rejoin_cap()
            self._prm[11] = self._rejoin_gap()
        self.stats["us_detect"] += (time.perf_counter() - t0) * 1e6
        return fin

    def _rejoin_cap(self) -> float:
        """Largest area a re-joined blob may have [px²]: 1.3 x the median area of recent
        blobs (whole cells), so two neighbouring cells are never joined into one."""
        if self._n_areas < 16:
            return float(self._f.max_area)
        return min(1.3 * self._typical, float(self._f.max_area))

    def _rejoin_gap(self) -> float:
        """Widest gap [px] between the boxes of two parts of one cell that are re-joined:
        ``rejoin_max_gap``, or a third of the typical blob's box diameter when that is larger
        (the outline of a 45 px cell entering or leaving the constriction breaks into a top
        and a bottom arc 11-12 px apart). The box, not the area: where only the outline of
        a cell is detected, its area gives the diameter of a much smaller disc."""
        gap = float(self._f.rejoin_max_gap)
        if self._n_areas < 16:
            return gap
        return max(gap, self._typical_diam / 3.0)

    def _split_area(self) -> int:
        """Blobs larger than this [px²] are checked for a neck (two touching cells):
        ``split_area_factor`` x the median area of recent blobs; 0 (off) until 16 blobs
        were seen or when the factor is 0."""
        if self._f.split_area_factor <= 0 or self._n_areas < 16:
            return 0
        return int(self._f.split_area_factor * self._typical)

    def _grow(self) -> None:
        self._runs = np.empty((self._runs.shape[0] * 4, 3), np.int64)
        self._run_label = np.empty(self._runs.shape[0], np.int64)
        self._stats = np.empty((self._stats.shape[0] * 4, K.NSTAT), np.float64)
        self._fin = np.empty((self._stats.shape[0], K.NFIN), np.float64)
        self.stats["buffer_grows"] += 1

    # -- reporting --------------------------------------------------------------------------
    @property
    def background_info(self) -> dict:
        """Background policy and warning counts, and where the geometry came from (manifest)."""
        info = {} if self.bg is None else self.bg.manifest()
        info["geometry_note"] = self.geometry_note if self._geometry is not None else ""
        info["static_sites"] = int(self._sites.shape[0])
        return info

    def manifest(self) -> dict:
        """Background policy and counters, geometry and its origin, per-stage mean µs."""
        n = max(self.stats["frames"], 1)
        out = {"background": None if self.bg is None else self.bg.manifest(),
               "geometry": self.geometry.to_dict(), "geometry_note": self.geometry_note,
               "smooth_sigma": self.smooth_sigma, "smoothing_kernel": self.kernel.tolist()}
        out.update({k: v for k, v in self.stats.items() if not k.startswith("us_")})
        out.update({f"{k}_per_frame": round(v / n, 3) for k, v in self.stats.items()
                    if k.startswith("us_")})
        return out
