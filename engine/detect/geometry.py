"""Find the channel (inlet, constriction, outlet) in a background image; the walls are dark.

Method
------
1. Levels: Otsu's threshold splits the (lightly smoothed) image into walls and channel;
   ``dark``/``open`` are the medians of the two classes and a pixel is *open* when brighter
   than their midpoint. When ``open - dark`` is below
   ``min_contrast`` grey levels there is no channel to see.
2. Per column, the open run that contains the channel axis (the median centre of each
   column's longest open run) gives the open width ``w(x)`` and centre ``c(x)``.
3. The constriction is the longest run of columns whose width is within
   ``max(2 px, 15 %)`` of the narrowest (5th percentile) width. When it covers at least
   90 % of the image width the channel is straight (an RT-DC channel, say): the constriction
   then spans the whole image.
4. Inlet/outlet half widths are the mean half widths of the first/last 3 columns.

Nothing here assumes one layout: walls at any darkness above ``min_contrast``, any axis
position, any constriction length.
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import DetectError
from ..types import ChipGeometry

__all__ = ["find_geometry", "GeometryNotFound"]

log = logging.getLogger(__name__)


class GeometryNotFound(DetectError):
    """The background shows no channel walls to measure."""


def _open_runs(col: np.ndarray) -> list[tuple[int, int]]:
    runs = []
    n = col.size
    y = 0
    while y < n:
        if col[y]:
            s = y
            while y < n and col[y]:
                y += 1
            runs.append((s, y))
        else:
            y += 1
    return runs


def find_geometry(background: np.ndarray, fallback: ChipGeometry | None = None, *,
                  min_contrast: float = 15.0) -> ChipGeometry:
    """The channel geometry [px] seen in ``background``.

    Parameters
    ----------
    background : ndarray (H, W)
        Background image [grey levels] (uint8 or float).
    fallback : ChipGeometry, optional
        Returned (with a logged warning) when the image shows no channel; without it
        :class:`GeometryNotFound` is raised.
    min_contrast : float
        Smallest wall-to-channel contrast [grey levels] that counts as a channel.

    Returns
    -------
    ChipGeometry
        ``source="background"`` when measured, the fallback's source otherwise.
    """
    import cv2
    b = np.asarray(background)
    if b.ndim != 2 or min(b.shape) < 8:
        raise DetectError(f"background must be a 2-D image of at least 8x8 px, got shape {b.shape}")
    H, W = b.shape
    img = cv2.GaussianBlur(np.asarray(b, np.float32), (0, 0), 1.0)
    u8 = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    level, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    lo_cls = img[img <= level]
    hi_cls = img[img > level]
    dark = float(np.median(lo_cls)) if lo_cls.size else float(level)
    bright = float(np.median(hi_cls)) if hi_cls.size else float(level)
    if bright - dark < min_contrast:
        return _fallback(fallback, f"no channel walls in the background (contrast "
                         f"{bright - dark:.1f} < {min_contrast} grey levels)")
    level = 0.5 * (dark + bright)
    is_open = img > level
    # pass 1: the axis from each column's longest open run
    centres = []
    for x in range(W):
        runs = _open_runs(is_open[:, x])
        if runs:
            s, e = max(runs, key=lambda r: r[1] - r[0])
            centres.append(0.5 * (s + e - 1))
    if len(centres) < 0.8 * W:
        return _fallback(fallback, "the channel is not open across the image")
    axis0 = float(np.median(centres))
    # pass 2: the run through the axis in each column
    width = np.zeros(W)
    centre = np.full(W, np.nan)
    walled = 0
    for x in range(W):
        runs = _open_runs(is_open[:, x])
        if not runs:
            continue
        s, e = min(runs, key=lambda r: 0 if r[0] <= axis0 < r[1] else
                   min(abs(r[0] - axis0), abs(r[1] - 1 - axis0)))
        width[x] = e - s
        centre[x] = 0.5 * (s + e - 1)
        walled += (s > 0) + (e < H)
    if walled < 0.8 * W:
        # open to the image edges above and below almost everywhere: no walls in view
        return _fallback(fallback, "no channel walls above and below the flow in the background")
    wmin = float(np.percentile(width[width > 0], 5))
    tol = max(2.0, 0.15 * wmin)
    narrow = width <= wmin + tol
    best = (0, 0)
    x = 0
    while x < W:
        if narrow[x]:
            s = x
            while x < W and narrow[x]:
                x += 1
            if x - s > best[1] - best[0]:
                best = (s, x)
        else:
            x += 1
    x0, x1 = best
    if x1 - x0 >= 0.9 * W:
        x0, x1 = 0, W
    sel = slice(x0, x1)
    half_c = 0.5 * float(np.median(width[sel]))
    axis = float(np.nanmedian(centre[sel]))
    inlet = 0.5 * float(np.mean(width[:3]))
    outlet = 0.5 * float(np.mean(width[-3:]))
    return ChipGeometry(width=W, height=H, axis_y=axis, constriction_x0=float(x0),
                        constriction_x1=float(x1), constriction_halfwidth=half_c,
                        inlet_halfwidth=inlet, outlet_halfwidth=outlet, source="background")


def _fallback(fallback: ChipGeometry | None, why: str) -> ChipGeometry:
    if fallback is None:
        raise GeometryNotFound(f"cannot find the channel: {why}; set frontend.geometry=config "
                               "or give the chip geometry in the config")
    log.warning("channel geometry: %s; using the configured geometry (%s)", why, fallback.source)
    return fallback
