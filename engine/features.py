"""Per-cell features of a finished clip, named as in dclab where dclab has the feature.

One table (:data:`FEATURES`) holds every name, its unit and its meaning. Shape numbers come from
the per-frame blob statistics (perimeter, deformation, inertia ellipse, brightness), which the
:class:`~engine.track.linker.Linker` keeps with each track; it calls :func:`compute_features`
with them when the clip is finished and stores the result in ``clip.features``. Called later on
a bare clip (``shapes=None``), the shape features are taken from ``clip.features`` when present,
else they are NaN; the kinematic features (area, velocity, transit time) are always recomputed
from the clip's per-frame centroids and areas.

Regions follow :meth:`ChipGeometry.region`: ``inlet`` (funnel, x < constriction_x0),
``in`` (the constriction) and ``out`` (outlet). Region statistics use only the frames in which
the cell was detected (area > 0) and, for shapes, whose box does not touch the image edge.

Definitions (dclab, ``dclab/definitions/feat_const.py``): ``deform`` = 1 - circularity with
circularity = 2 sqrt(pi A) / P; ``aspect`` = box width / box height; ``inert_ratio_raw`` =
sqrt(mu20 / mu02) (second central moments along x and y); ``inert_ratio_prnc`` = principal
inertia ratio (major / minor axis); ``area_um`` = area [µm²]; ``bright_avg`` = mean grey level
inside the cell.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .clips import SHAPE_FIELDS
from .types import CellClip, ChipGeometry

__all__ = ["compute_features", "FEATURES", "REGIONS"]

REGIONS = (("inlet", "inlet"), ("in", "constriction"), ("out", "outlet"))

#: name -> (unit, meaning). dclab names where dclab has the feature.
FEATURES: dict[str, tuple[str, str]] = {
    "area_msd": ("px", "median measured area over detected frames (dclab area_msd)"),
    "area_um": ("µm²", "median area (dclab area_um)"),
    "area_msd_in": ("px", "median area in the constriction"),
    "deform": ("", "median deformation 1 - circularity in the constriction (dclab deform)"),
    "deform_inlet": ("", "median deformation in the inlet funnel"),
    "deform_in": ("", "median deformation in the constriction"),
    "deform_out": ("", "median deformation in the outlet"),
    "deform_max": ("", "largest per-frame deformation"),
    "aspect": ("", "median box aspect ratio w/h in the constriction (dclab aspect)"),
    "aspect_inlet": ("", "median box aspect ratio in the inlet"),
    "aspect_out": ("", "median box aspect ratio in the outlet"),
    "inert_ratio_raw": ("", "median sqrt(mu20/mu02) in the constriction (dclab inert_ratio_raw)"),
    "inert_ratio_prnc": ("", "median major/minor axis in the constriction (dclab inert_ratio_prnc)"),
    "bright_avg": ("a.u.", "median of the per-frame mean grey level (dclab bright_avg)"),
    "vel_inlet": ("px/frame", "mean speed in the inlet"),
    "vel_in": ("px/frame", "mean speed in the constriction"),
    "vel_out": ("px/frame", "mean speed in the outlet"),
    "vel_inlet_um_s": ("µm/s", "mean speed in the inlet"),
    "vel_in_um_s": ("µm/s", "mean speed in the constriction"),
    "vel_out_um_s": ("µm/s", "mean speed in the outlet"),
    "transit_ms": ("ms", "time from entering to leaving the constriction (centroid crossings)"),
    "n_frames": ("", "frames in the clip"),
    "n_detected": ("", "frames in which the cell was detected"),
}

_SHAPE_KEYS = ("deform", "deform_inlet", "deform_in", "deform_out", "deform_max", "aspect",
               "aspect_inlet", "aspect_out", "inert_ratio_raw", "inert_ratio_prnc",
               "bright_avg")
_NAN = float("nan")
_IN = 1      # region code of the constriction (REGIONS order)


def _median(a: np.ndarray) -> float:
    """Median of the finite values (as ``np.median``; a sort is cheaper on short arrays)."""
    a = np.sort(a[np.isfinite(a)])
    n = a.size
    if n == 0:
        return _NAN
    m = n // 2
    return float(a[m]) if n % 2 else float(0.5 * (a[m - 1] + a[m]))


def _mean_speed(x: np.ndarray, y: np.ndarray, f: np.ndarray) -> float:
    """Path length / frames elapsed over consecutive samples [px/frame]."""
    if x.size < 2 or f[-1] <= f[0]:
        return _NAN
    path = float(np.hypot(np.diff(x), np.diff(y)).sum())
    return path / float(f[-1] - f[0])


def _crossing(x: np.ndarray, f: np.ndarray, xc: float) -> float:
    """Frame (fractional) at which x first reaches ``xc``, interpolated; NaN if never/at start."""
    above = np.nonzero(x >= xc)[0]
    if above.size == 0 or above[0] == 0:
        return _NAN
    i = int(above[0])
    x0, x1, f0, f1 = float(x[i - 1]), float(x[i]), float(f[i - 1]), float(f[i])
    if x1 == x0:
        return f1
    return f0 + (xc - x0) / (x1 - x0) * (f1 - f0)


def compute_features(clip: CellClip, geometry: ChipGeometry, cfg, *,
                     shapes: np.ndarray | None = None) -> dict[str, float]:
    """Per-cell features of ``clip`` (see :data:`FEATURES` for names and units).

    Parameters
    ----------
    clip : CellClip
        A finished clip.
    geometry : ChipGeometry
        Where the constriction is [px].
    cfg : Config
        Uses ``chip.pixel_size_um`` [µm/px] and ``camera.fps`` [1/s].
    shapes : ndarray of float32, shape (T, len(SHAPE_FIELDS)), optional
        Per-frame blob statistics in :data:`engine.clips.SHAPE_FIELDS` order, NaN where the
        cell was not detected (the linker passes them). Without them the shape features come
        from ``clip.features`` (or are NaN).

    Returns
    -------
    dict of str to float
        NaN where a feature is undefined (e.g. no frame in the constriction).
    """
    px_um = float(cfg.chip.pixel_size_um)
    fps = float(cfg.camera.fps)
    n = clip.n_frames
    out: dict[str, float] = {"n_frames": float(n)}
    if shapes is not None and (shapes.ndim != 2 or shapes.shape != (n, len(SHAPE_FIELDS))):
        raise ValueError(f"compute_features: shapes must have shape ({n}, {len(SHAPE_FIELDS)}), "
                         f"got {getattr(shapes, 'shape', None)}")
    areas = np.asarray(clip.areas, np.float64)
    det = areas > 0
    out["n_detected"] = float(det.sum())
    f_all = np.asarray(clip.frame_indices, np.float64)
    cx = np.asarray(clip.centroids[:, 0], np.float64)
    cy = np.asarray(clip.centroids[:, 1], np.float64)
    boxes = np.asarray(clip.boxes, np.int64)
    # boxes touching the image edge hold a cut cell: keep them out of size and shape numbers
    inside = ((boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < geometry.width)
              & (boxes[:, 3] < geometry.height)) if n else np.zeros(0, bool)
    good = det & inside
    # region codes 0 inlet, 1 constriction, 2 outlet (as ChipGeometry.region, vectorised)
    region = ((cx >= geometry.constriction_x0).astype(np.int8)
              + (cx >= geometry.constriction_x1).astype(np.int8))

    a = areas[good] if good.any() else areas[det]
    out["area_msd"] = _median(a) if a.size else _NAN
    out["area_um"] = out["area_msd"] * px_um * px_um
    sel = good & (region == _IN)
    out["area_msd_in"] = _median(areas[sel]) if sel.any() else _NAN

    # kinematics from detected frames only
    fd, xd, yd, rd = f_all[det], cx[det], cy[det], region[det]
    for code, (short, _) in enumerate(REGIONS):
        m = rd == code
        v = _mean_speed(xd[m], yd[m], fd[m]) if m.sum() >= 2 else _NAN
        out[f"vel_{short}"] = v
        out[f"vel_{short}_um_s"] = v * px_um * fps
    t_in = _crossing(xd, fd, geometry.constriction_x0) if fd.size >= 2 else _NAN
    t_out = _crossing(xd, fd, geometry.constriction_x1) if fd.size >= 2 else _NAN
    out["transit_ms"] = (t_out - t_in) / fps * 1e3 if math.isfinite(t_in + t_out) else _NAN

    # shapes
    if shapes is None:
        prev: Mapping[str, float] = clip.features or {}
        for k in _SHAPE_KEYS:
            out[k] = float(prev.get(k, _NAN))
        return out
    col = {k: shapes[:, i].astype(np.float64) for i, k in enumerate(SHAPE_FIELDS)}
    w = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 1).astype(np.float64)
    aspect = np.where(good, w / h, np.nan)
    deform = np.where(good, col["deform"], np.nan)
    a2 = (0.5 * col["major"]) ** 2
    b2 = (0.5 * col["minor"]) ** 2
    c2, s2 = np.cos(col["orientation"]) ** 2, np.sin(col["orientation"]) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        mu20 = a2 * c2 + b2 * s2
        mu02 = a2 * s2 + b2 * c2
        irr = np.where(good & (mu02 > 0), np.sqrt(mu20 / np.where(mu02 > 0, mu02, 1.0)), np.nan)
        irp = np.where(good & (col["minor"] > 0),
                       col["major"] / np.where(col["minor"] > 0, col["minor"], 1.0), np.nan)
    for code, (short, _) in enumerate(REGIONS):
        m = region == code
        out[f"deform_{short}"] = _median(deform[m])
        if short != "in":
            out[f"aspect_{short}"] = _median(aspect[m])
    m_in = region == _IN
    out["deform"] = out["deform_in"]
    d = deform[np.isfinite(deform)]
    out["deform_max"] = float(d.max()) if d.size else _NAN
    out["aspect"] = _median(aspect[m_in])
    out["inert_ratio_raw"] = _median(irr[m_in])
    out["inert_ratio_prnc"] = _median(irp[m_in])
    out["bright_avg"] = _median(np.where(det, col["brightness"], np.nan))
    return out
