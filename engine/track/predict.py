"""Motion prediction for the linker: where will a cell be in the next frame?

Predictors follow trackpy's ``observe``/``predict`` protocol (``trackpy/predict.py``,
``ChannelPredict``): the linker tells a predictor about every confirmed link (``observe``), and
asks it where a track will be ``dt`` frames after its last detection (``predict``).

In a microfluidic channel the velocity is a function of *where* the cell is: slow in the wide
inlet funnel, fast in the constriction, slower again in the outlet (continuity: the mean speed
scales with 1 / open width). :class:`FlowPredict` therefore learns the velocity field on a
coarse grid over the image from the confirmed tracks it observes, and integrates it step by step
through gaps, so that a cell accelerating into the constriction is predicted correctly even
while it is not detected. A track's own deviation from the field (a large cell moving slower
than the flow) is kept as a per-track residual.

Fallbacks, in order: learned field at the predicted point (+ the track's residual); the track's
own last velocity; the prior velocity ``(prior_vx, 0)`` [px/frame].

Units: pixels and frames (velocities in px/frame).
"""
from __future__ import annotations

import math

__all__ = ["TrackState", "NullPredict", "VelocityPredict", "FlowPredict", "PREDICTORS",
           "make_predictor"]


class TrackState:
    """Motion state of one live track (plain Python floats: the hot path is small).

    Attributes
    ----------
    x, y : float
        Last detected centroid [px].
    frame : int
        Frame number of the last detection.
    vx, vy : float
        Smoothed own velocity [px/frame]; valid when ``has_vel``.
    rx, ry : float
        Smoothed residual of the own velocity against the learned field [px/frame]; valid when
        ``has_res``.
    n_links : int
        Number of links (detection to detection) so far.
    """

    __slots__ = ("x", "y", "frame", "vx", "vy", "has_vel", "rx", "ry", "has_res", "n_links")

    def __init__(self, x: float, y: float, frame: int):
        self.x = float(x)
        self.y = float(y)
        self.frame = int(frame)
        self.vx = self.vy = 0.0
        self.rx = self.ry = 0.0
        self.has_vel = False
        self.has_res = False
        self.n_links = 0


class NullPredict:
    """Predicts that a cell stays where it was last seen (plain nearest-neighbour linking)."""

    name = "null"

    def __init__(self, geometry=None, *, prior_vx: float = 0.0, **_):
        self.prior_vx = float(prior_vx)

    def observe(self, state: TrackState, x: float, y: float, frame: int, *,
                learn: bool = True) -> None:
        """Record a new detection of ``state``'s track at (x, y) [px] in ``frame``."""
        dt = frame - state.frame
        if dt > 0:
            vx, vy = (x - state.x) / dt, (y - state.y) / dt
            if state.has_vel:
                state.vx = 0.5 * (state.vx + vx)
                state.vy = 0.5 * (state.vy + vy)
            else:
                state.vx, state.vy, state.has_vel = vx, vy, True
            state.n_links += 1
        state.x, state.y, state.frame = float(x), float(y), int(frame)

    def move(self, state: TrackState, x: float, y: float, frame: int) -> None:
        """Place the track at (x, y) [px] in ``frame`` without measuring a velocity.

        For positions that are inferred, not measured (a cell hidden in a merged blob).
        """
        state.x, state.y, state.frame = float(x), float(y), int(frame)

    def predict(self, state: TrackState, frame: int) -> tuple[float, float]:
        """Predicted centroid (x, y) [px] of the track in ``frame``."""
        return state.x, state.y


class VelocityPredict(NullPredict):
    """Constant velocity: the track's own smoothed last velocity, else the prior."""

    name = "velocity"

    def predict(self, state: TrackState, frame: int) -> tuple[float, float]:
        dt = frame - state.frame
        if state.has_vel:
            return state.x + state.vx * dt, state.y + state.vy * dt
        return state.x + self.prior_vx * dt, state.y


class FlowPredict(NullPredict):
    """Learns the channel's velocity field v(x, y) from confirmed links; integrates it.

    Parameters
    ----------
    geometry : ChipGeometry
        Image size [px] (the grid covers the image).
    bin_px : float, optional
        Grid cell size [px] of the learned field (x and y).
    prior_vx : float, optional
        Velocity [px/frame] assumed where nothing is known yet.
    min_samples : int, optional
        Observations a grid cell needs before it is trusted.
    memory : int, optional
        Effective number of observations kept per grid cell (older ones fade out, so the field
        follows a slowly changing pressure).
    res_decay : float, optional
        Per unseen frame, a track's residual velocity shrinks by this factor.
    """

    name = "flow"

    def __init__(self, geometry, *, bin_px: float = 8.0, prior_vx: float = 0.0,
                 min_samples: int = 3, memory: int = 200, res_decay: float = 0.8, **_):
        super().__init__(geometry, prior_vx=prior_vx)
        if bin_px <= 0:
            raise ValueError(f"FlowPredict: bin_px must be > 0, got {bin_px!r}")
        self.bin = float(bin_px)
        self.nx = max(1, int(math.ceil(geometry.width / self.bin)))
        self.ny = max(1, int(math.ceil(geometry.height / self.bin)))
        self.min_samples = int(min_samples)
        self.memory = float(memory)
        n = self.nx * self.ny
        # 2-D grid and its column (x only) marginal: [count, sum vx, sum vy]
        self._grid = [[0.0, 0.0, 0.0] for _ in range(n)]
        self._col = [[0.0, 0.0, 0.0] for _ in range(self.nx)]
        self.n_observed = 0
        self.res_decay = float(res_decay)

    # -- the field ---------------------------------------------------------------------------
    def move(self, state: TrackState, x: float, y: float, frame: int) -> None:
        dt = frame - state.frame
        if dt > 0 and state.has_res:
            k = self.res_decay ** dt
            state.rx *= k
            state.ry *= k
        super().move(state, x, y, frame)

    def _cells(self, x: float, y: float):
        ix = int(x / self.bin)
        iy = int(y / self.bin)
        ix = 0 if ix < 0 else (self.nx - 1 if ix >= self.nx else ix)
        iy = 0 if iy < 0 else (self.ny - 1 if iy >= self.ny else iy)
        return self._grid[iy * self.nx + ix], self._col[ix]

    def field(self, x: float, y: float) -> tuple[float, float, bool]:
        """Learned velocity (vx, vy) [px/frame] at (x, y) [px], and whether it is known."""
        ix = int(x / self.bin)
        iy = int(y / self.bin)
        nx = self.nx
        ix = 0 if ix < 0 else (nx - 1 if ix >= nx else ix)
        iy = 0 if iy < 0 else (self.ny - 1 if iy >= self.ny else iy)
        g = self._grid[iy * nx + ix]
        n = g[0]
        if n >= self.min_samples:
            return g[1] / n, g[2] / n, True
        c = self._col[ix]
        n = c[0]
        if n >= self.min_samples:
            return c[1] / n, c[2] / n, True
        return 0.0, 0.0, False

    def _learn(self, x: float, y: float, vx: float, vy: float) -> None:
        mem = self.memory
        for acc in self._cells(x, y):
            if acc[0] >= mem:
                k = (mem - 1.0) / acc[0]
                acc[0] *= k
                acc[1] *= k
                acc[2] *= k
            acc[0] += 1.0
            acc[1] += vx
            acc[2] += vy
        self.n_observed += 1

    # -- observe / predict -------------------------------------------------------------------
    def observe(self, state: TrackState, x: float, y: float, frame: int, *,
                learn: bool = True) -> None:
        """Record a detection; ``learn`` adds the link to the field (confirmed, clean links)."""
        dt = frame - state.frame
        x = float(x)
        y = float(y)
        if dt > 0:
            vx, vy = (x - state.x) / dt, (y - state.y) / dt
            mx, my = 0.5 * (x + state.x), 0.5 * (y + state.y)
            fx, fy, known = self.field(mx, my)
            if known:
                rx, ry = vx - fx, vy - fy
                if state.has_res:
                    state.rx = 0.5 * (state.rx + rx)
                    state.ry = 0.5 * (state.ry + ry)
                else:
                    state.rx, state.ry, state.has_res = rx, ry, True
            if learn:
                self._learn(mx, my, vx, vy)
        NullPredict.observe(self, state, x, y, frame)     # own velocity, position

    def predict(self, state: TrackState, frame: int) -> tuple[float, float]:
        dt = frame - state.frame
        x, y = state.x, state.y
        rx, ry = state.rx, state.ry
        for _ in range(max(dt, 0)):
            fx, fy, known = self.field(x, y)
            if known:
                if state.has_res:
                    fx += rx
                    fy += ry
                    rx *= self.res_decay      # unseen, a cell falls back into the flow
                    ry *= self.res_decay
            elif state.has_vel:
                fx, fy = state.vx, state.vy
            else:
                fx, fy = self.prior_vx, 0.0
            x += fx
            y += fy
        return x, y


PREDICTORS = {"null": NullPredict, "velocity": VelocityPredict, "flow": FlowPredict}


def make_predictor(name: str, geometry, **options):
    """The predictor called ``name`` (one of :data:`PREDICTORS`)."""
    try:
        cls = PREDICTORS[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}") \
            from None
    return cls(geometry, **options)
