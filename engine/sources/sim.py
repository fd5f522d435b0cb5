"""The synthetic PolyNano chip: bright-field RBCs flowing through a constriction, with truth.

No real PolyNano recording is available to the project, so every stage is tested,
benchmarked and demonstrated on this simulator. It draws what the report describes
(reference/slowfast-rbc-fmh-report.txt, ch. 2 and §3.6): an 800×150 8-bit camera at 500 fps
looking at channel 4 (a funnel inlet, a 5 µm straight constriction, an outlet that flares out),
red blood cells of ≈30 px that enter on the left, speed up and are squeezed in the
constriction, and relax after it. Fetal and maternal cells overlap heavily in size but differ
in how far they deform in the constriction and how fast they relax after it (``sim`` config),
so one frame is a weak cue and the whole passage a strong one. Some cells have a centre (and,
when squeezed, front and back) so close to the background that a naive ``|frame - bg| > T``
splits them in two, as the report's §3.6.1 observed.

Artefacts: sensor noise, hot pixels, illumination flicker, slow drift of focus and
illumination, sticking debris (some appears mid-sequence) and optional lost camera frames
(the frame number skips). A per-donor look (illumination, wall darkness, small shifts of the
channel) lets the report's "the network learned the channel" confound be reproduced; donor 0
is the nominal chip of the config.

Everything is deterministic per (seed, donor, config). Ground truth comes from the rendered
masks: per cell its class, entry/exit frames and per-frame centroid, half-open box, area and
deformation; per frame the visible cells.

Speed: the static scene is rendered once per donor at a ladder of focus blurs; each frame is
one fused Numba pass (scene × gain, cells composited only where they are, noise from a bank
read at a random offset, rounding) — see :mod:`engine.sources._simrender`.

Examples
--------
>>> from engine.config import load_config
>>> chip = SyntheticChip(load_config())
>>> frames, truth = chip.render(200)
>>> truth.visible(int(truth.frame_numbers[0]))   # doctest: +SKIP
[3, 4]
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import ConfigError, SourceError
from ..types import ChipGeometry, Frame
from . import _simrender as K
from .base import FrameSource

__all__ = ["SyntheticChip", "SyntheticChipSource", "Truth", "CellTruth", "load_truth",
           "truth_path_for", "TRUTH_FORMAT"]

TRUTH_FORMAT = "fmh-sim-truth/1"

# Focus ladder of the pre-rendered static scene [px]: the Gaussian blur of the optics.
_FOCUS_LEVELS = np.linspace(0.5, 2.5, 41)
_NOISE_BANK = 1 << 22          # noise samples in the bank (4 MiB of int8)
_NOISE_Q = 20.0                # bank units per standard deviation
_FLICKER_BANK = 1 << 16
_LUT_MARGIN = 256               # half-width table reaches this far beyond the frame [px]

# Seed-sequence tags of the independent random streams.
_TAG_LOOK, _TAG_CAMERA, _TAG_CELLS, _TAG_GAPS, _TAG_NOISE, _TAG_FLICKER, _TAG_DEBRIS, \
    _TAG_DRIFT = range(7001, 7009)


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CellTruth:
    """What a perfect detector and tracker would report for one cell.

    Parameters
    ----------
    cell_id : int
        Unique per sequence, in order of entry.
    cls : str
        "fetal" or "maternal".
    donor : int
        Donor number of the sequence.
    entry_frame, exit_frame : int
        First and last stored camera frame number in which the cell is visible.
    complete : bool
        Entered at the left edge and left at the right edge inside the recording.
    frame_numbers : ndarray of int64, shape (n,)
        Stored camera frame numbers in which the cell is visible.
    centroids : ndarray of float32, shape (n, 2)
        Centroid (x, y) [px] of the visible part of the cell's mask.
    boxes : ndarray of int32, shape (n, 4)
        Half-open box (x0, y0, x1, y1) [px] of the visible mask.
    areas : ndarray of int32, shape (n,)
        Mask area [px²] (pixel centres inside the cell outline, within the frame).
    deforms : ndarray of float32, shape (n,)
        True deformation ``(a - b) / (a + b)`` of the cell's outline ellipse.
    params : mapping
        The cell's drawn parameters (diameter [px], deformation target, relaxation time
        [frames], speed factor, split-prone flag, ...).
    """

    cell_id: int
    cls: str
    donor: int
    entry_frame: int
    exit_frame: int
    complete: bool
    frame_numbers: np.ndarray
    centroids: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    deforms: np.ndarray
    params: Mapping[str, float] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.frame_numbers.shape[0])

    def to_dict(self) -> dict:
        return {
            "cell_id": self.cell_id, "cls": self.cls, "donor": self.donor,
            "entry_frame": self.entry_frame, "exit_frame": self.exit_frame,
            "complete": self.complete, "params": dict(self.params),
            "frame_numbers": self.frame_numbers.tolist(),
            "centroids": np.round(self.centroids.astype(np.float64), 3).tolist(),
            "boxes": self.boxes.tolist(), "areas": self.areas.tolist(),
            "deforms": np.round(self.deforms.astype(np.float64), 4).tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CellTruth":
        n = len(d["frame_numbers"])
        return cls(
            cell_id=int(d["cell_id"]), cls=str(d["cls"]), donor=int(d["donor"]),
            entry_frame=int(d["entry_frame"]), exit_frame=int(d["exit_frame"]),
            complete=bool(d["complete"]),
            frame_numbers=np.asarray(d["frame_numbers"], np.int64).reshape(n),
            centroids=np.asarray(d["centroids"], np.float32).reshape(n, 2),
            boxes=np.asarray(d["boxes"], np.int32).reshape(n, 4),
            areas=np.asarray(d["areas"], np.int32).reshape(n),
            deforms=np.asarray(d.get("deforms", [0.0] * n), np.float32).reshape(n),
            params={k: float(v) for k, v in d.get("params", {}).items()})


@dataclass(frozen=True)
class Truth:
    """Ground truth of a synthetic sequence.

    Parameters
    ----------
    cells : list of CellTruth
        Every cell visible in at least one stored frame, by id.
    frame_numbers : ndarray of int64, shape (N,)
        Camera frame number of each stored frame (skips where the camera lost frames).
    geometry : ChipGeometry
        The true channel geometry (with the donor's shifts).
    config : dict
        The full configuration that generated the sequence.
    seed, donor : int
        The sequence's seed and donor.
    shape : tuple of int
        Frame shape (H, W) [px].
    fps : float
        Frame rate [1/s].
    """

    cells: list
    frame_numbers: np.ndarray
    geometry: ChipGeometry
    config: dict
    seed: int = 0
    donor: int = 0
    shape: tuple = (150, 800)
    fps: float = 500.0

    def __post_init__(self):
        index: dict[int, list[int]] = {int(n): [] for n in self.frame_numbers}
        for c in self.cells:
            for n in c.frame_numbers:
                index.setdefault(int(n), []).append(c.cell_id)
        object.__setattr__(self, "_visible", index)
        object.__setattr__(self, "_by_id", {c.cell_id: c for c in self.cells})

    def visible(self, number: int) -> list[int]:
        """Ids of the cells visible in camera frame ``number`` (empty for a lost frame)."""
        return list(self._visible.get(int(number), ()))  # type: ignore[attr-defined]

    def cell(self, cell_id: int) -> CellTruth:
        """The truth of one cell; KeyError if it was never visible."""
        return self._by_id[int(cell_id)]  # type: ignore[attr-defined]

    @property
    def gaps(self) -> int:
        """Camera frames lost between the first and last stored frame."""
        fn = self.frame_numbers
        return int(fn[-1] - fn[0] + 1 - fn.shape[0]) if fn.shape[0] else 0

    def counts(self) -> dict:
        """Frames, gaps, cells per class and complete cells."""
        fetal = sum(c.cls == "fetal" for c in self.cells)
        return {"frames": int(self.frame_numbers.shape[0]), "gaps": self.gaps,
                "cells": len(self.cells), "fetal": fetal, "maternal": len(self.cells) - fetal,
                "complete": sum(c.complete for c in self.cells)}

    def to_dict(self) -> dict:
        return {
            "format": TRUTH_FORMAT, "seed": self.seed, "donor": self.donor,
            "shape": list(self.shape), "fps": self.fps, "counts": self.counts(),
            "geometry": self.geometry.to_dict(), "config": self.config,
            "frame_numbers": self.frame_numbers.tolist(),
            "visible": [self.visible(int(n)) for n in self.frame_numbers],
            "cells": [c.to_dict() for c in self.cells],
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the truth as JSON (layout: :meth:`to_dict`); returns the path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh, separators=(",", ":"))
        os.replace(tmp, path)
        return path


def load_truth(path: str | os.PathLike) -> Truth:
    """Read a truth file written by :meth:`Truth.to_json`.

    Raises
    ------
    SourceError
        If the file is missing, not JSON, or not an ``fmh-sim-truth/1`` document.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise SourceError(f"{path}: cannot read truth file ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: truth file is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != TRUTH_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise SourceError(f"{path}: not a simulator truth file (format {got!r}, "
                          f"expected {TRUTH_FORMAT!r})")
    try:
        return Truth(cells=[CellTruth.from_dict(c) for c in data["cells"]],
                     frame_numbers=np.asarray(data["frame_numbers"], np.int64),
                     geometry=ChipGeometry(**data["geometry"]), config=data["config"],
                     seed=int(data["seed"]), donor=int(data["donor"]),
                     shape=tuple(data["shape"]), fps=float(data["fps"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"{path}: truth file is incomplete or malformed ({exc!r})") from None


def truth_path_for(out: str | os.PathLike) -> Path:
    """``s.npy`` -> ``s.truth.json`` (beside the frames)."""
    out = Path(out)
    return out.with_name(out.stem + ".truth.json")


# --------------------------------------------------------------------------------------------
# The chip
# --------------------------------------------------------------------------------------------

def _rng(*tags: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(t) & 0xFFFFFFFF for t in tags]))


class SyntheticChip:
    """A synthetic PolyNano channel-4 recording, generated frame by frame.

    Parameters
    ----------
    cfg : engine.config.Config
        Uses ``cfg.sim`` (seed, donor, rates, looks), ``cfg.chip`` (geometry) and
        ``cfg.camera`` (frame size, fps).

    Attributes
    ----------
    geometry : ChipGeometry
        The true geometry, with the donor's shifts (``source="sim"``).
    truth : Truth
        Ground truth of the frames generated so far.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        s = cfg.sim
        self.sim = s
        if s.gap_rate >= 1.0:
            raise ConfigError(f"{cfg.source}: sim.gap_rate={s.gap_rate!r} would lose every frame "
                              "(must be < 1)")
        self.height, self.width = int(cfg.camera.height), int(cfg.camera.width)
        self.fps = float(cfg.camera.fps)
        self.seed, self.donor = int(s.seed), int(s.donor)
        H, W = self.height, self.width
        self._make_look()
        self._make_scene()
        # Camera: hot pixels are a property of the one camera, the same for every sequence.
        cam = _rng(_TAG_CAMERA)
        k = min(int(s.hot_pixels), H * W)
        flat = cam.choice(H * W, size=k, replace=False) if k else np.zeros(0, np.int64)
        self._hot_y = (flat // W).astype(np.int64)
        self._hot_x = (flat % W).astype(np.int64)
        self._hot_v = cam.integers(200, 256, size=k).astype(np.uint8)
        # Per-sequence random streams.
        self._cells_rng = _rng(self.seed, self.donor, _TAG_CELLS)
        self._gaps_rng = _rng(self.seed, self.donor, _TAG_GAPS)
        self._noise_rng = _rng(self.seed, self.donor, _TAG_NOISE)
        bank = max(_NOISE_BANK, 8 * H * W)
        z = _rng(self.seed, self.donor, _TAG_NOISE + 100).standard_normal(bank, dtype=np.float32)
        self._noise = np.clip(np.rint(z * _NOISE_Q), -127, 127).astype(np.int8)
        self._flicker = (_rng(self.seed, self.donor, _TAG_FLICKER)
                         .standard_normal(_FLICKER_BANK))
        drift = _rng(self.seed, self.donor, _TAG_DRIFT)
        self._drift_periods = drift.uniform([8000, 2000, 6000], [20000, 5000, 15000])
        self._drift_phases = drift.uniform(0, 2 * math.pi, 3)
        self._make_debris()
        # Motion.
        g = self.geometry
        self._prm = np.zeros(K.NPARAM)
        self._prm[K.P_VC] = s.speed_px_per_frame
        self._prm[K.P_CHW] = g.constriction_halfwidth
        self._prm[K.P_EXP] = s.speed_exponent
        self._prm[K.P_X0] = g.constriction_x0
        self._prm[K.P_X1] = g.constriction_x1
        self._prm[K.P_GAP] = s.min_gap_px
        self._prm[K.P_AXIS] = g.axis_y
        self._prm[K.P_TAUIN] = 2.0
        self._prm[K.P_LUTX0] = -_LUT_MARGIN
        self._prm[K.P_JIT] = 0.01
        self._prm[K.P_LAT] = 0.15
        self._prm[K.P_NOISE] = s.shape_noise
        self._prm[K.P_RAMP] = 40.0
        self._st = np.zeros((32, K.NCOL))
        self._ids = np.zeros(32, np.int64)
        self._n = 0
        self._next_id = 0
        self._cells: dict[int, dict] = {}
        self._pending = 0
        self._mean_gap = self.fps / s.rate_hz if s.rate_hz > 0 else math.inf
        self._next_arrival = -float(s.warmup_frames) + self._draw_interval()
        # Rendering scratch.
        self._trans = np.ones((H, W), np.float32)       # per-pixel transmission, kept at 1
        self._prof = np.zeros((3, int((K.PROFILE_IN + K.PROFILE_OUT) * K.PROFILE_RES) + 1),
                              np.float32)
        self._prof_ws = -1.0
        self._stats = np.zeros((32, K.NSTAT))
        self._no_cells = np.zeros((0, K.NCOL))
        # Truth records: one float64 row per visible cell per stored frame.
        self._rows: list[np.ndarray] = []
        self._stored: list[int] = []
        self._truth_cache: tuple[int, Truth] | None = None
        self._number = -int(s.warmup_frames)
        while self._number < 0:
            self._tick()

    # -- static look ------------------------------------------------------------------------
    def _make_look(self) -> None:
        s, c = self.sim, self.cfg.chip
        base = self.cfg.geometry()
        look = s.donor_look if self.donor > 0 else 0.0
        r = _rng(self.donor, _TAG_LOOK)
        z = r.standard_normal(12) * look
        chw = max(base.constriction_halfwidth * (1.0 + 0.04 * z[0]), 1.0)
        x0 = base.constriction_x0 + 6.0 * z[2]
        self.geometry = ChipGeometry(
            width=self.width, height=self.height,
            axis_y=float(base.axis_y + 2.0 * z[1]),
            constriction_x0=float(x0),
            constriction_x1=float(max(base.constriction_x1 + 6.0 * z[2] + 3.0 * z[3], x0 + 1.0)),
            constriction_halfwidth=float(chw),
            inlet_halfwidth=float(max(base.inlet_halfwidth + 2.0 * z[4], chw)),
            outlet_halfwidth=float(max(base.outlet_halfwidth + 2.0 * z[5], chw)),
            source="sim")
        self._funnel = float(max(c.funnel_length * (1.0 + 0.05 * z[6]), 1.0))
        self._flare = float(max(c.flare_length * (1.0 + 0.05 * z[7]), 1.0))
        self._bg_level = float(np.clip(s.background * (1.0 + 0.06 * z[8]), 5.0, 250.0))
        self._wall_level = float(np.clip(s.wall_level + 12.0 * z[9], 0.0, 250.0))
        self._grad = (0.04 + 0.05 * z[10], 0.02 + 0.04 * z[11])
        self._edge_dark = 25.0 * (1.0 + 0.2 * z[9])
        xs = np.arange(-_LUT_MARGIN, self.width + _LUT_MARGIN, dtype=np.float64)
        self._lut = self.halfwidth(xs)

    def halfwidth(self, x: np.ndarray | float) -> np.ndarray:
        """Open half-width of the channel [px] at x [px] (funnel and flare are straight)."""
        g = self.geometry
        x = np.asarray(x, dtype=np.float64)
        f0 = g.constriction_x0 - self._funnel
        t_in = np.clip((x - f0) / self._funnel, 0.0, 1.0)
        t_out = np.clip((x - g.constriction_x1) / self._flare, 0.0, 1.0)
        hw = g.inlet_halfwidth + (g.constriction_halfwidth - g.inlet_halfwidth) * t_in
        out = g.constriction_halfwidth + (g.outlet_halfwidth - g.constriction_halfwidth) * t_out
        return np.where(x < g.constriction_x1, hw, out)

    def _make_scene(self) -> None:
        import cv2
        H, W = self.height, self.width
        g = self.geometry
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
        dist = self.halfwidth(xx[0])[None, :] - np.abs(yy - g.axis_y)   # >0 inside [px]
        gx, gy = self._grad
        u, v = xx / W - 0.5, yy / H - 0.5
        illum = self._bg_level * (1.0 + gx * u + gy * v - 0.12 * (u * u + v * v))
        tex = _rng(self.donor, _TAG_LOOK + 100).standard_normal((H, W))
        tex = cv2.GaussianBlur(tex, (0, 0), 4.0)
        tex *= 3.0 / max(float(tex.std()), 1e-9)
        wall = self._wall_level * (illum / self._bg_level) + tex
        t = 0.5 * (1.0 + np.tanh(dist / 1.2))
        scene = wall + (illum - wall) * t
        scene += (-self._edge_dark * np.exp(-0.5 * (dist / 1.0) ** 2)
                  + 8.0 * np.exp(-0.5 * ((dist - 2.5) / 1.2) ** 2)
                  - 8.0 * np.exp(-0.5 * ((dist + 6.0) / 1.5) ** 2))
        scene = scene.astype(np.float32)
        self._scene = np.stack([cv2.GaussianBlur(scene, (0, 0), float(sg),
                                                 borderType=cv2.BORDER_REFLECT)
                                for sg in _FOCUS_LEVELS])

    def _make_debris(self) -> None:
        n = int(self.sim.debris)
        r = _rng(self.seed, self.donor, _TAG_DEBRIS)
        g = self.geometry
        x = r.uniform(10.0, self.width - 10.0, n)
        hw = self.halfwidth(x)
        y = g.axis_y + r.uniform(-1.0, 1.0, n) * np.maximum(hw - 3.0, 0.0)
        rad = r.uniform(1.2, 2.5, n)
        depth = r.uniform(25.0, 60.0, n)
        appear = r.uniform(0.0, 1000.0, n)
        appear[: (n + 1) // 2] = -np.inf        # half are stuck from the start
        self._debris = np.stack([x, y, rad, depth], axis=1) if n else np.zeros((0, 4))
        self._debris_appear = appear

    # -- time-varying illumination and focus --------------------------------------------------
    def _optics(self, number: int) -> tuple[int, float, float]:
        """Focus level index, gain and cell-edge softness [px] at a frame number."""
        s = self.sim
        P, ph = self._drift_periods, self._drift_phases
        w = 2.0 * math.pi * number
        sigma = 0.9 + s.drift * 0.5 * (1.0 + math.sin(w / P[2] + ph[2]))
        sigma = min(max(sigma, _FOCUS_LEVELS[0]), _FOCUS_LEVELS[-1])
        k = int(round((sigma - _FOCUS_LEVELS[0]) / (_FOCUS_LEVELS[1] - _FOCUS_LEVELS[0])))
        sigma = float(_FOCUS_LEVELS[k])
        slow = 1.0 + s.drift * (0.02 * math.sin(w / P[0] + ph[0])
                                + 0.01 * math.sin(w / P[1] + ph[1]))
        flick = 1.0 + s.flicker_sd / self._bg_level * self._flicker[number % _FLICKER_BANK]
        ws = round(math.sqrt(0.49 + sigma * sigma) * 50.0) / 50.0   # cached to 0.02 px
        return k, slow * flick, ws

    def _debris_at(self, number: int) -> np.ndarray:
        return self._debris[self._debris_appear <= number]

    # -- cells --------------------------------------------------------------------------------
    def _draw_interval(self) -> float:
        if not math.isfinite(self._mean_gap):
            return math.inf
        return float(self._cells_rng.exponential(self._mean_gap))

    def _spawn(self, number: int) -> None:
        s = self.sim
        u = self._cells_rng.random(12)
        fetal = bool(u[0] < s.fetal_fraction)
        ratio = s.fetal_size_ratio
        mean_m = s.cell_diameter_px * 2.0 / (1.0 + ratio)
        mean_d = mean_m * ratio if fetal else mean_m
        z = _normal(u[1:5])
        diam = max(mean_d + s.diameter_sd_px * z[0], 8.0)
        r = 0.5 * diam
        dtgt = float(np.clip((s.deform_fetal if fetal else s.deform_maternal)
                             + s.deform_sd * z[1], 0.02, 0.85))
        tau = ((s.relax_frames_fetal if fetal else s.relax_frames_maternal)
               * math.exp(s.relax_sd * z[2]))
        speed = float(np.clip(1.0 + 0.05 * z[3], 0.85, 1.15))
        split = bool(u[5] < s.split_fraction)
        # Grey levels (at a background of 150): a dark rim, a centre lighter than the rim but
        # still darker than the background, except for split-prone cells whose centre is
        # within a grey level of the background; a faint bright halo outside.
        cen = -0.8 + 1.6 * u[6] if split else -3.0 - 6.0 * u[6]
        rim = -(22.0 + 16.0 * u[8])
        halo = 1.5 + 3.0 * u[9]
        u0 = -0.6 + 1.2 * u[10]
        ang0 = (u[11] - 0.5) * math.pi
        d0 = 0.06 * u[7]
        if self._n == self._st.shape[0]:
            self._st = np.concatenate([self._st, np.zeros_like(self._st)])
            self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
            self._stats = np.zeros((self._st.shape[0], K.NSTAT))
        row = self._st[self._n]
        row[:] = 0.0
        k0 = math.sqrt((1.0 + d0) / (1.0 - d0))
        row[K.X] = -r * k0 - 1.0
        row[K.U] = row[K.U0] = u0
        row[K.R] = r
        row[K.D] = row[K.D0] = row[K.DOBS] = d0
        row[K.SPD] = speed
        row[K.DT] = dtgt
        row[K.TAU] = tau
        row[K.A], row[K.B] = r * k0, r / k0
        row[K.ANG] = row[K.ANG0] = ang0
        row[K.CEN], row[K.RIM], row[K.HALO] = cen, rim, halo
        row[K.SPLIT] = 1.0 if split else 0.0
        row[K.Y] = self.geometry.axis_y + u0 * max(self._lut[_LUT_MARGIN] - r - 1.0, 0.0)
        cid = self._next_id
        self._next_id += 1
        self._ids[self._n] = cid
        self._n += 1
        self._cells[cid] = {
            "cls": "fetal" if fetal else "maternal", "spawn": number, "exit": None,
            "params": {"diameter_px": round(diam, 3), "deform_target": round(dtgt, 4),
                       "relax_frames": round(tau, 3), "speed_factor": round(speed, 4),
                       "split_prone": float(split), "centre_contrast": round(cen, 3),
                       "rim_contrast": round(rim, 3)}}

    def _tick(self) -> int:
        """Advance the flow by one camera frame; returns that frame's number."""
        number = self._number
        while self._next_arrival <= number:
            self._pending += 1
            self._next_arrival += self._draw_interval()
        if self._pending:
            n = self._n
            free = n == 0 or (self._st[n - 1, K.X] - self._st[n - 1, K.A]
                              - self.sim.min_gap_px >= -1.0)
            if free:
                self._spawn(number)
                self._pending -= 1
        n = self._n
        if n:
            rnd = self._cells_rng.standard_normal((n, 2))
            K.step_cells(self._st, n, self._lut, self._prm, rnd)
            gone = self._st[:n, K.X] - self._st[:n, K.A] > self.width + 1.0
            if gone.any():
                for cid in self._ids[:n][gone]:
                    self._cells[int(cid)]["exit"] = number
                keep = ~gone
                m = int(keep.sum())
                self._st[:m] = self._st[:n][keep]
                self._ids[:m] = self._ids[:n][keep]
                self._n = m
        self._number = number + 1
        return number

    # -- frames -------------------------------------------------------------------------------
    def _render(self, number: int, out: np.ndarray, cells: bool = True,
                noise: bool = True) -> None:
        k, gain, ws = self._optics(number)
        n = self._n if cells else 0
        st = self._st if cells else self._no_cells
        nscale = float(self.sim.noise_sd) / _NOISE_Q if noise else 0.0
        noff = int(self._noise_rng.integers(0, self._noise.size - out.size)) if noise else 0
        deb = self._debris_at(number)
        if ws != self._prof_ws:
            K.cell_profiles(ws, self._prof)
            self._prof_ws = ws
        K.compose(self._scene[k], gain, self._noise, noff, nscale,
                  st, n, deb, deb.shape[0], self._prof, 2.5 + 2.5 * ws,
                  self._hot_y, self._hot_x, self._hot_v, self._trans, out, self._stats)

    def frames(self, n: int | None = None, out: np.ndarray | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """Generate the next ``n`` stored frames (endless if None).

        Parameters
        ----------
        n : int, optional
            Stored frames to generate; lost camera frames (``sim.gap_rate``) do not count.
        out : ndarray of uint8, shape (n, H, W), optional
            Write frame i into ``out[i]`` (a memory map, say) instead of a new array.

        Yields
        ------
        number : int
            Camera frame number (skips over lost frames).
        image : ndarray of uint8, shape (H, W)
        """
        H, W = self.height, self.width
        if out is not None:
            if (n is None or out.ndim != 3 or out.shape[0] < n or out.shape[1:] != (H, W)
                    or out.dtype != np.uint8 or not out[:1].flags.c_contiguous):
                raise ValueError(f"out must be a C-contiguous uint8 ({n}, {H}, {W}) array, "
                                 f"got {out.dtype} {out.shape}")
        gap_rate = float(self.sim.gap_rate)
        count = 0
        while n is None or count < n:
            number = self._tick()
            if gap_rate > 0.0 and self._gaps_rng.random() < gap_rate:
                continue
            img = out[count] if out is not None else np.empty((H, W), np.uint8)
            self._render(number, img)
            self._record(number)
            count += 1
            yield number, img

    def render(self, n: int) -> tuple[np.ndarray, Truth]:
        """The next ``n`` stored frames as one (n, H, W) uint8 array, and the truth so far."""
        frames = np.empty((int(n), self.height, self.width), np.uint8)
        for _ in self.frames(int(n), out=frames):
            pass
        return frames, self.truth

    def empty_frame(self, number: int) -> np.ndarray:
        """Frame ``number`` as it would look with no cells and no noise (uint8, H×W).

        Illumination drift, flicker, focus, debris and hot pixels are included.
        """
        out = np.empty((self.height, self.width), np.uint8)
        self._render(int(number), out, cells=False, noise=False)
        return out

    def _record(self, number: int) -> None:
        self._stored.append(number)
        n = self._n
        if not n:
            return
        st = self._stats[:n]
        vis = st[:, K.S_AREA] > 0
        if not vis.any():
            return
        s = st[vis]
        rows = np.empty((s.shape[0], 10))
        rows[:, 0] = number
        rows[:, 1] = self._ids[:n][vis]
        rows[:, 2] = s[:, K.S_SX] / s[:, K.S_AREA]
        rows[:, 3] = s[:, K.S_SY] / s[:, K.S_AREA]
        rows[:, 4:8] = s[:, K.S_X0:K.S_Y1 + 1]
        rows[:, 8] = s[:, K.S_AREA]
        rows[:, 9] = self._st[:n, K.DOBS][vis]
        self._rows.append(rows)

    # -- truth --------------------------------------------------------------------------------
    @property
    def truth(self) -> Truth:
        """Ground truth of every frame generated so far."""
        key = len(self._stored)
        if self._truth_cache is not None and self._truth_cache[0] == key:
            return self._truth_cache[1]
        stored = np.asarray(self._stored, np.int64)
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, 10))
        order = np.lexsort((rows[:, 0], rows[:, 1]))
        rows = rows[order]
        ids = rows[:, 1].astype(np.int64)
        cells = []
        if rows.shape[0]:
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            ends = np.r_[starts[1:], ids.shape[0]]
            first, last_number = int(stored[0]), self._number - 1
            for a, b in zip(starts, ends):
                cid = int(ids[a])
                info = self._cells[cid]
                r = rows[a:b]
                fn = r[:, 0].astype(np.int64)
                exited = info["exit"] is not None and info["exit"] <= last_number
                cells.append(CellTruth(
                    cell_id=cid, cls=info["cls"], donor=self.donor,
                    entry_frame=int(fn[0]), exit_frame=int(fn[-1]),
                    complete=bool(fn[0] != first and exited),
                    frame_numbers=fn, centroids=r[:, 2:4].astype(np.float32),
                    boxes=r[:, 4:8].astype(np.int32), areas=r[:, 8].astype(np.int32),
                    deforms=r[:, 9].astype(np.float32), params=dict(info["params"])))
        truth = Truth(cells=cells, frame_numbers=stored, geometry=self.geometry,
                      config=self.cfg.to_dict(), seed=self.seed, donor=self.donor,
                      shape=(self.height, self.width), fps=self.fps)
        self._truth_cache = (key, truth)
        return truth


def _normal(u: np.ndarray) -> np.ndarray:
    """Standard normals from uniforms in (0, 1) (inverse CDF; keeps the draw count fixed)."""
    from scipy.special import ndtri
    return ndtri(np.clip(u, 1e-12, 1.0 - 1e-12))


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------

class SyntheticChipSource(FrameSource):
    """The synthetic chip as a :class:`FrameSource` (``sim://?seed=3&frames=500``).

    Parameters
    ----------
    cfg : engine.config.Config, optional
        Configuration (defaults if omitted); ``cfg.sim`` sets the sequence.
    frames : int, optional
        Stored frames to yield; None: endless.
    live : bool
        Behave like a camera: frames come at ``cfg.camera.fps`` in real time and a full ring
        drops the oldest instead of blocking.
    pace : bool, optional
        Pace to the frame rate (default: the same as ``live``).
    name : str
        For messages and the manifest.
    """

    def __init__(self, cfg=None, frames: int | None = None, live: bool = False,
                 pace: bool | None = None, name: str = "sim://"):
        super().__init__(name)
        from ..config import load_config
        self.cfg = cfg if cfg is not None else load_config()
        if frames is not None and (isinstance(frames, bool) or int(frames) < 0):
            raise SourceError(f"{name}: frames must be a non-negative integer, got {frames!r}")
        self._n = None if frames is None else int(frames)
        self.live = bool(live)
        self._pace = self.live if pace is None else bool(pace)
        self.chip: SyntheticChip | None = None

    @classmethod
    def from_query(cls, cfg, query: Mapping[str, str], **options: Any) -> "SyntheticChipSource":
        """Build from a ``sim://`` query: any ``sim`` key, ``frames`` and ``live``.

        Raises
        ------
        ConfigError
            For an unknown key or a bad value, naming the URI and the key.
        """
        import yaml
        from ..config import load_config
        cfg = cfg if cfg is not None else load_config()
        query = dict(query)
        name = "sim://" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")

        def parse(key, text):
            try:
                return yaml.safe_load(text) if isinstance(text, str) and text.strip() else text
            except yaml.YAMLError:
                return text

        frames = query.pop("frames", None)
        if frames is not None:
            v = parse("frames", frames)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}: frames={frames!r} must be a non-negative integer")
            frames = v
        live = query.pop("live", None)
        if live is not None:
            v = parse("live", live)
            if v in (1, 0):
                v = bool(v)
            if not isinstance(v, bool):
                raise ConfigError(f"{name}: live={live!r} must be true or false")
            live = v
        if query:
            try:
                cfg = cfg.replace(sim={k: parse(k, v) for k, v in query.items()})
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        opts = dict(options)
        if live is not None:
            opts["live"] = live
        return cls(cfg, frames=frames, name=name, **opts)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.cfg.camera.height), int(self.cfg.camera.width))

    @property
    def fps(self) -> float:
        return float(self.cfg.camera.fps)

    @property
    def n_frames(self) -> int | None:
        return self._n

    @property
    def truth(self) -> Truth:
        """Ground truth of the frames yielded so far."""
        if self.chip is None:
            raise SourceError(f"{self.name}: open the source before asking for its truth")
        return self.chip.truth

    @property
    def geometry(self) -> ChipGeometry:
        """The chip's true geometry (builds the chip if it is not open yet)."""
        if self.chip is None:
            self._do_open()
        return self.chip.geometry  # type: ignore[union-attr]

    def describe(self) -> dict:
        d = super().describe()
        d.update(seed=int(self.cfg.sim.seed), donor=int(self.cfg.sim.donor))
        return d

    def _do_open(self) -> None:
        if self.chip is None:
            self.chip = SyntheticChip(self.cfg)

    def _do_frames(self) -> Iterator[Frame]:
        chip = self.chip
        period_ns = 1e9 / self.fps
        t0 = time.monotonic_ns() if self._pace else 0
        first = None
        for number, image in chip.frames(self._n):
            if first is None:
                first = number
            t_ns = int(round(t0 + (number - first) * period_ns)) if self._pace \
                else int(round(number * period_ns))
            if self._pace:
                wait = t_ns - time.monotonic_ns()
                if wait > 0:
                    time.sleep(wait * 1e-9)
            yield Frame(index=int(number), t_ns=t_ns, image=image)
