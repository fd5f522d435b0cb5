"""The interface every frame source implements, with its lifecycle and gap accounting.

A source is opened, yields :class:`~engine.types.Frame` values in order, and is closed::

    with open_source("s.npy") as src:
        for frame in src.frames():
            ...

Subclasses implement the ``_do_*`` hooks; the public methods add the lifecycle checks and
the counters (frames read, frame-number gaps) so that no subclass can forget them.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import SourceError
from ..types import Frame

__all__ = ["FrameSource", "SourceStats"]


@dataclass
class SourceStats:
    """Counters of one source; ``gaps`` counts missing frame numbers (frames the camera lost)."""

    frames_read: int = 0
    gaps: int = 0
    gap_events: int = 0
    last_index: int = -1


class FrameSource(abc.ABC):
    """Base class of cameras, replays and the synthetic chip.

    Attributes
    ----------
    name : str
        What the source reads (a path or a URI), for messages and the manifest.
    live : bool
        True for sources that cannot be paused (cameras, a live simulator): a full ring drops
        their oldest frames instead of blocking them.
    """

    live: bool = False

    def __init__(self, name: str):
        self.name = str(name)
        self.stats = SourceStats()
        self._state = "new"
        # Frame numbers the subclass skipped on purpose just before the frame it yields next.
        self._skipped_before = 0

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> "FrameSource":
        if self._state == "open":
            return self
        if self._state == "closed":
            raise SourceError(f"{self.name}: source was closed; open a new one")
        self._do_open()
        self._state = "open"
        return self

    def close(self) -> None:
        if self._state == "open":
            try:
                self._do_close()
            finally:
                self._state = "closed"
        else:
            self._state = "closed"

    def __enter__(self) -> "FrameSource":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- frames ---------------------------------------------------------------------------
    def frames(self) -> Iterator[Frame]:
        """Yield frames in order, counting frames read and gaps in the frame numbers."""
        if self._state != "open":
            raise SourceError(f"{self.name}: call open() (or use 'with') before frames()")
        st = self.stats
        for frame in self._do_frames():
            if st.last_index >= 0 and frame.index > st.last_index + 1:
                # Numbers skipped on purpose just before this frame (a replay's step, a
                # camera queue's own drops) are counted by the source elsewhere, not as gaps.
                jump = frame.index - st.last_index - 1
                gap = jump - min(self._skipped_before, jump)
                if gap > 0:
                    st.gaps += gap
                    st.gap_events += 1
            st.last_index = frame.index
            st.frames_read += 1
            yield frame

    # -- description ----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """Frame shape (H, W) [px]."""

    @property
    def fps(self) -> float | None:
        """Recorded or nominal frame rate [1/s], or None when unknown."""
        return None

    @property
    def n_frames(self) -> int | None:
        """Number of frames, or None for an endless source."""
        return None

    def background(self) -> np.ndarray | None:
        """A recorded background image (uint8, H×W) where the format carries one."""
        return None

    def describe(self) -> dict:
        """JSON-safe description for the manifest."""
        return {"name": self.name, "type": type(self).__name__, "shape": list(self.shape),
                "fps": self.fps, "n_frames": self.n_frames, "live": self.live}

    # -- hooks ----------------------------------------------------------------------------
    def _do_open(self) -> None:
        pass

    def _do_close(self) -> None:
        pass

    @abc.abstractmethod
    def _do_frames(self) -> Iterator[Frame]:
        """Yield frames; called only while open."""
