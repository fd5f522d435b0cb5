"""What may still show of a cell whose track ended at the right edge.

Both linkers end a track leaving on the right as soon as it is cut by the edge and missed,
or as soon as too little of it will be in view in the next frame (engine.track._kernels.
EDGE_FACTOR), instead of bridging misses there: that is the frame or frames a prediction
waits for, in the latency from a cell's exit to its prediction. A sliver of such a cell may
still be detected in the frames after; it must not start a new track (a second, truncated
"cell"). Cells flow left to right and none enters on the right, so a blob cut by the right
edge that no live track takes, under the last box of a track that ended there and not to
its left, is that cell: it is absorbed and counted (``remnants``).
"""
from __future__ import annotations

__all__ = ["EdgeRemnants"]

_SLACK_PX = 4.0          # box jitter allowed to the left and in y


class EdgeRemnants:
    """The right-edge exits of the last frames, and the blobs they absorb.

    Parameters
    ----------
    width : int
        Image width [px]; a box is cut by the right edge when its (half-open) x1 >= width.
    max_gap : int
        Frames an exit stays able to absorb after it was last seen.
    """

    def __init__(self, width: int, max_gap: int):
        self.width = float(width)
        self.max_gap = int(max_gap)
        self._exits: list[list[float]] = []     # [x0, y0, y1, last frame]
        self.absorbed = 0

    def __len__(self) -> int:
        return len(self._exits)

    def ended(self, box, frame: int) -> None:
        """A track ended as an exit with last box ``box`` (x0, y0, x1, y1) in ``frame``."""
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 >= self.width:
            self._exits.append([x0, y0, y1, float(frame)])

    def expire(self, frame: int) -> None:
        if self._exits:
            self._exits = [e for e in self._exits if frame - e[3] <= self.max_gap + 1]

    def absorb(self, box, frame: int) -> bool:
        """True (and counted) if a free blob with box ``box`` in ``frame`` is what is left of
        a recent exit; that exit then follows it."""
        if not self._exits:
            return False
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 < self.width:
            return False
        for e in self._exits:
            if (x0 >= e[0] - _SLACK_PX and y0 < e[2] + _SLACK_PX and y1 > e[1] - _SLACK_PX
                    and frame - e[3] <= self.max_gap + 1):
                e[0], e[3] = x0, float(frame)
                self.absorbed += 1
                return True
        return False
