"""The small, immutable values that travel between the stages of the pipeline.

Defined once here; every stage imports them from this module.

Dtype policy: images are ``uint8`` (H, W) as the camera gives them; the front end computes in
``int16``/``float32``; coordinates are ``float32`` pixels with x to the right (flow direction)
and y down; boxes are half-open ``(x0, y0, x1, y1)`` in integer pixels; times are integer
nanoseconds (``t_ns``) from the source's clock.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import numpy as np

__all__ = ["Frame", "Blob", "BLOB_FIELDS", "TrackStatus", "CellClip", "Prediction",
           "ChipGeometry"]


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera frame.

    Parameters
    ----------
    index : int
        Frame number as the camera (or file) counts it; gaps mean frames the camera lost.
    t_ns : int
        Timestamp [ns] of the exposure on the source's clock.
    image : ndarray of uint8, shape (H, W)
        The pixels; may be a read-only view into a ring slot or a memory map.
    """

    index: int
    t_ns: int
    image: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape  # type: ignore[return-value]


class Blob(NamedTuple):
    """One detected object in one frame (a cell, part of a cell, or debris).

    Units: pixels, pixel² and grey levels. ``bbox`` is half-open ``(x0, y0, x1, y1)``.
    ``deform`` is ``1 - circularity`` with circularity ``2 sqrt(pi area) / perimeter``
    (dclab's definition). ``major``/``minor`` are the full axes of the inertia ellipse and
    ``orientation`` its angle [rad] from the x axis.
    """

    frame_index: int
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]
    perimeter: float = 0.0
    deform: float = 0.0
    major: float = 0.0
    minor: float = 0.0
    orientation: float = 0.0
    brightness: float = 0.0


BLOB_FIELDS = Blob._fields


class TrackStatus(str, enum.Enum):
    """How a track ended."""

    COMPLETE = "complete"      # entered through the inlet and left through the outlet
    TRUNCATED = "truncated"    # in view at start, lost mid-channel, or cut by end of stream


@dataclass(frozen=True, slots=True)
class CellClip:
    """The video of one cell's passage, cut on a fixed canvas centred on the cell.

    Parameters
    ----------
    cell_id : int
        Unique per run.
    frames : ndarray of uint8, shape (T, H, W)
        The crops, one per frame of the passage (missed frames interpolated).
    frame_indices : ndarray of int64, shape (T,)
        Source frame number of each crop.
    centroids : ndarray of float32, shape (T, 2)
        Cell centroid (x, y) [px] in full-frame coordinates.
    boxes : ndarray of int32, shape (T, 4)
        Cell box (x0, y0, x1, y1) [px], half-open, full-frame coordinates.
    areas : ndarray of int32, shape (T,)
        Cell area [px²] per frame (0 where the cell was not detected).
    status : TrackStatus
        Complete or truncated.
    reason : str
        Why a track is truncated ("" when complete).
    t0_ns : int
        Timestamp [ns] of the first frame.
    t_exit_ns : int
        Timestamp [ns] of the frame in which the track was closed (for latency).
    features : mapping of str to float
        Per-cell features (dclab names where one exists).
    """

    cell_id: int
    frames: np.ndarray
    frame_indices: np.ndarray
    centroids: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    status: TrackStatus = TrackStatus.COMPLETE
    reason: str = ""
    t0_ns: int = 0
    t_exit_ns: int = 0
    features: Mapping[str, float] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass(frozen=True, slots=True)
class Prediction:
    """The classifier's answer for one cell, or an explicit error record.

    ``probs`` follow the model's ``class_names``; ``p_fetal`` is the probability of the
    fetal class; ``label`` applies the model's decision threshold. When ``error`` is not empty
    the cell could not be classified and ``p_fetal`` is NaN.
    """

    cell_id: int
    p_fetal: float
    label: str
    probs: tuple[float, ...] = ()
    model_id: str = ""
    latency_ms: float = float("nan")
    error: str = ""


@dataclass(frozen=True, slots=True)
class ChipGeometry:
    """Where the channel is in the image [px]; cells flow left to right.

    The inlet funnel spans ``x < constriction_x0``, the constriction
    ``constriction_x0 <= x < constriction_x1`` and the outlet ``x >= constriction_x1``.
    ``axis_y`` is the channel's centre line, ``constriction_halfwidth`` half the open width of
    the constriction, ``inlet_halfwidth`` half the open width at the left edge of the image,
    ``outlet_halfwidth`` at the right edge.
    """

    width: int
    height: int
    axis_y: float
    constriction_x0: float
    constriction_x1: float
    constriction_halfwidth: float
    inlet_halfwidth: float
    outlet_halfwidth: float
    source: str = "config"   # "config" or "background"

    def region(self, x: float) -> str:
        """Name of the channel region at x [px]: 'inlet', 'constriction' or 'outlet'."""
        if x < self.constriction_x0:
            return "inlet"
        if x < self.constriction_x1:
            return "constriction"
        return "outlet"

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}
