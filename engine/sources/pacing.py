"""Pacing a frame stream to its recorded rate, a multiple of it, or as fast as possible.

Each frame is due at ``t0 + (index - index0) / (fps * speed)`` on a monotonic clock, where
``t0`` is when the first frame arrived: due times are computed from the start, never from the
previous frame, so sleeping errors do not accumulate (no drift), and gaps in the frame numbers
(frames the camera lost) take the time they took when recorded. The pacer only sleeps when it
is ahead; when the consumer falls behind, frames go out at once (a replay never drops) and
:attr:`Pacer.behind_s` says by how much, for the progress line. Without a frame rate, the
frames' own timestamps (``t_ns``) set the schedule.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

from ..types import Frame

__all__ = ["Pacer", "Paced", "paced"]


class Pacer:
    """Schedules frames on a monotonic clock.

    Parameters
    ----------
    fps : float or None
        Recorded frame rate [1/s]; None: use the frames' timestamps.
    speed : float or None
        1.0 real time, k: k times faster; None: as fast as possible (never sleeps).
    clock : callable, optional
        Returns monotonic time [ns]; ``time.monotonic_ns`` by default.
    sleep : callable, optional
        Sleeps for a time [s]; ``time.sleep`` by default.
    """

    def __init__(self, fps: float | None, speed: float | None = 1.0, *,
                 clock: Callable[[], int] = time.monotonic_ns,
                 sleep: Callable[[float], None] = time.sleep):
        if fps is not None and not (isinstance(fps, (int, float)) and fps > 0
                                    and math.isfinite(fps)):
            raise ValueError(f"fps={fps!r}: must be a positive number or None")
        if speed is not None and not (isinstance(speed, (int, float)) and speed > 0
                                      and math.isfinite(speed)):
            raise ValueError(f"speed={speed!r}: must be a positive number or None "
                             f"(None: as fast as possible)")
        self.fps = None if fps is None else float(fps)
        self.speed = None if speed is None else float(speed)
        self._clock = clock
        self._sleep = sleep
        self._t0: int | None = None
        self._ref: Frame | None = None
        self.frames = 0          # frames passed
        self.slept_s = 0.0       # total time slept [s]
        self.behind_s = 0.0      # how late the last frame went out [s]
        self.max_behind_s = 0.0  # the worst lateness so far [s]

    def due_ns(self, frame: Frame) -> int | None:
        """Monotonic time [ns] at which ``frame`` is due, or None (no pacing)."""
        if self.speed is None or self._t0 is None:
            return None
        ref = self._ref
        if self.fps is not None:
            elapsed = (frame.index - ref.index) * 1e9 / (self.fps * self.speed)
        else:
            elapsed = (frame.t_ns - ref.t_ns) / self.speed
        return self._t0 + int(elapsed)

    def wait(self, frame: Frame) -> float:
        """Sleep until ``frame`` is due (only if ahead); return how late it is [s] (>= 0)."""
        self.frames += 1
        if self.speed is None:
            return 0.0
        now = self._clock()
        if self._t0 is None:
            self._t0, self._ref = now, frame
            self.behind_s = 0.0
            return 0.0
        due = self.due_ns(frame)
        ahead = (due - now) / 1e9
        if ahead > 0:
            self._sleep(ahead)
            self.slept_s += ahead
            self.behind_s = 0.0
        else:
            self.behind_s = -ahead
            self.max_behind_s = max(self.max_behind_s, self.behind_s)
        return self.behind_s

    @property
    def behind_frames(self) -> float:
        """How late the last frame went out, in frames at the paced rate."""
        if self.speed is None or self.fps is None:
            return 0.0
        return self.behind_s * self.fps * self.speed


class Paced:
    """Iterator over paced frames; its :attr:`pacer` reports how far behind it runs."""

    def __init__(self, frames: Iterable[Frame], pacer: Pacer):
        self._it = iter(frames)
        self.pacer = pacer

    def __iter__(self) -> "Paced":
        return self

    def __next__(self) -> Frame:
        frame = next(self._it)
        self.pacer.wait(frame)
        return frame

    @property
    def behind_s(self) -> float:
        """How late the last frame went out [s]."""
        return self.pacer.behind_s


def paced(frames: Iterable[Frame], fps: float | None, speed: float | None,
          **pacer_options) -> Paced:
    """Pace ``frames`` to ``fps * speed`` frames per second.

    Parameters
    ----------
    frames : iterable of Frame
        The stream (e.g. ``source.frames()``).
    fps : float or None
        The recorded (or configured) frame rate [1/s]; None: use the frames' ``t_ns``.
    speed : float or None
        None: as fast as possible; 1.0: the recorded rate; k: k times faster.

    Returns
    -------
    Paced
        An iterator of the same frames, in order, none dropped; ``.behind_s`` and
        ``.pacer.max_behind_s`` report lateness [s].
    """
    return Paced(frames, Pacer(fps, speed, **pacer_options))
