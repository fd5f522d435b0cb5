"""The linker in plain Python: the reference that :class:`engine.track.linker.Linker` is tested
against.

:class:`PyLinker` is the linker as first written, one Python object per track and per
recorder; its algorithm is documented in :mod:`engine.track.linker`. The production
:class:`~engine.track.linker.Linker` keeps the per-track state in arrays and runs the per-frame
hot path (predict, gate, the common one-blob-per-track assignment, the track updates and the
crop cutting) in Numba kernels (:mod:`engine.track._kernels`); ``tests/test_track.py`` checks
that both give identical clips, features and counters on the same streams. Keep the two in
step when the algorithm changes.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterable

from ..clips import BufferPool, ClipCutter, ClipRecorder, _cut_clamped
from ..errors import DetectError
from ..features import compute_features
from ..types import Blob, CellClip, ChipGeometry, Frame, TrackStatus
from ._kernels import EDGE_FACTOR, back_allowance_py
from .assign import Assigner
from .predict import TrackState, make_predictor
from .remnants import EdgeRemnants

__all__ = ["PyLinker"]

_CONFIRM_LINKS = 3   # links before a track teaches the flow field
_AREA_ALPHA = 0.3    # smoothing of a track's typical area
_SHARE_PX = 8        # a blob this much wider/taller than a cell's predicted box holds more
_GROW = 1.2          # ... when it also has this much more area (or several tracks claim it)


class _Track:
    __slots__ = ("tid", "state", "rec", "first_index", "at_start", "entry_ok", "misses",
                 "box", "area", "tail", "x_min", "x_max", "exited_edge", "inferred")

    def __init__(self, tid: int, blob: Blob, rec: ClipRecorder | None, at_start: bool,
                 entry_ok: bool):
        self.tid = tid
        self.state = TrackState(blob.cx, blob.cy, blob.frame_index)
        self.rec = rec
        self.first_index = blob.frame_index
        self.at_start = at_start
        self.entry_ok = entry_ok
        self.misses = 0
        self.box = tuple(int(v) for v in blob.bbox)
        self.area = float(blob.area)
        self.tail = False
        self.x_min = self.x_max = float(blob.cx)
        self.exited_edge = False
        self.inferred = False      # the last position was inferred (shared blob), not measured


class PyLinker:
    """Links per-frame blobs into cell tracks and cuts their clips, one frame at a time.

    Parameters
    ----------
    cfg : Config
        Uses the ``tracker`` and ``clips`` sections, ``chip.pixel_size_um`` and ``camera.fps``
        (for the features).
    geometry : ChipGeometry
        Image size and channel regions; frames must be ``(geometry.height, geometry.width)``.
    features : bool, optional
        Compute :func:`engine.features.compute_features` into ``clip.features`` (default).

    Attributes
    ----------
    stats : dict of str to int
        Counters: frames, blobs, tracks_started, clips, complete, truncated, dropped_short,
        dropped_static, gap_frames, merged_frames, rescued, contested, ambiguous, live,
        live_max.

    Examples
    --------
    >>> linker = PyLinker(cfg, geometry)
    >>> for frame in frames:
    ...     for clip in linker.next_level(frame, frontend.process(frame)):
    ...         handle(clip)
    >>> for clip in linker.flush():
    ...     handle(clip)
    """

    def __init__(self, cfg, geometry: ChipGeometry, *, features: bool = True):
        t = cfg.tracker
        self.cfg = cfg
        self.geometry = geometry
        self.gate = float(t.gate_px)
        self.gate_growth = float(t.gate_growth)
        self.max_gap = int(t.max_gap)
        self.max_back = float(t.max_back_px)
        self.min_frames = int(t.min_frames)
        self.margin = float(t.edge_margin)
        self.merge_ratio = float(t.merge_area_ratio)
        self.min_travel = float(t.min_travel_px)
        self.min_area = int(cfg.frontend.min_area)
        self.predictor = make_predictor(t.predictor, geometry, prior_vx=t.prior_vx,
                                        bin_px=t.flow_bin_px)
        self.assigner = Assigner(t.assign, t.max_subnet)
        self.cutter = ClipCutter(cfg.clips)
        self._fixed = self.cutter.mode == "fixed"
        self._pool = BufferPool()      # crop buffers reused from track to track
        self._half = self.cutter.size // 2
        self.max_frames = int(cfg.clips.max_frames)
        self.want_features = bool(features)
        self.width = int(geometry.width)
        self.height = int(geometry.height)
        self._tracks: list[_Track] = []
        self._next_tid = 0
        self._next_cell = 0
        self._first_index: int | None = None
        self._last_index: int | None = None
        self._last_t_ns = 0
        self._cell_area = 0.0      # typical area of a tracked cell [px²], learned
        self._remnants = EdgeRemnants(self.width, self.max_gap)
        self.stats = {k: 0 for k in (
            "frames", "blobs", "tracks_started", "clips", "complete", "truncated",
            "dropped_short", "dropped_static", "gap_frames", "merged_frames", "rescued",
            "contested", "ambiguous", "live", "live_max", "remnants")}

    # -- public ----------------------------------------------------------------------------
    @property
    def live(self) -> int:
        """Number of live tracks (tails included)."""
        return len(self._tracks)

    def init_level(self, frame: Frame, blobs: Iterable[Blob]) -> list[CellClip]:
        """Same as :meth:`next_level` (kept for trackpy's naming); the first frame starts it."""
        return self.next_level(frame, blobs)

    def next_level(self, frame: Frame, blobs: Iterable[Blob]) -> list[CellClip]:
        """Link one frame's blobs; return the clips of the tracks that finished in it.

        Parameters
        ----------
        frame : Frame
            The frame the blobs come from (its image is only read during this call).
        blobs : iterable of Blob
            Detections in ``frame``.

        Raises
        ------
        DetectError
            If the frame does not match the geometry or frame numbers go backwards.
        """
        fi = int(frame.index)
        image = frame.image
        if image.shape != (self.height, self.width):
            raise DetectError(f"Linker: frame {fi} has shape {image.shape}, the geometry says "
                              f"({self.height}, {self.width})")
        if self._last_index is not None and fi <= self._last_index:
            raise DetectError(f"Linker: frame number {fi} does not follow {self._last_index}; "
                              "frames must arrive in increasing order")
        if self._first_index is None:
            self._first_index = fi
        self._last_index = fi
        self._last_t_ns = t_ns = int(frame.t_ns)
        st = self.stats
        st["frames"] += 1
        blobs = [b for b in blobs if math.isfinite(b.cx) and math.isfinite(b.cy)]
        st["blobs"] += len(blobs)
        finished: list[CellClip] = []
        tracks = self._tracks
        if not tracks and not blobs:
            return finished

        # 1-2. predict and gate
        pred: list[tuple[float, float]] = []
        costs: dict[tuple[int, int], float] = {}
        order = sorted(range(len(blobs)), key=lambda j: blobs[j].cx)
        xs = [blobs[j].cx for j in order]
        predict = self.predictor.predict
        gate, growth = self.gate, self.gate_growth
        max_back = back_allowance_py(self.max_back, self._cell_area)
        for i, tr in enumerate(tracks):
            s = tr.state
            px, py = predict(s, fi)
            pred.append((px, py))
            g = gate * (1.0 + growth * tr.misses)
            g2 = g * g
            # behind the last position only by max_back (more if that one was inferred)
            back = max_back + (_SHARE_PX if tr.inferred else 0.0)
            xmin = px - g
            if s.x - back > xmin:
                xmin = s.x - back
            lo = bisect.bisect_left(xs, xmin)
            hi = bisect.bisect_right(xs, px + g)
            for k in range(lo, hi):
                b = blobs[order[k]]
                dx, dy = b.cx - px, b.cy - py
                d2 = dx * dx + dy * dy
                if d2 <= g2:
                    costs[(i, order[k])] = d2 / g2

        # 3. joint assignment
        links = self.assigner(costs, 1.0)
        track_blob = dict(links)
        blob_track = {j: i for i, j in links}

        # 4. big blobs that may hold several cells, and rescues just outside the gate
        carried, extra = self._explain_big_blobs(blobs, tracks, pred, track_blob, blob_track)

        # 5. update tracks
        keep: list[_Track] = []
        width = self.width
        exit_x = width - self.margin
        observe = self.predictor.observe
        fixed = self._fixed
        half = self._half
        for i, tr in enumerate(tracks):
            s = tr.state
            j = track_blob.get(i)
            done_reason = None
            if j is not None:
                b = blobs[j]
                bx, by = b.cx, b.cy
                box = b.bbox
                if type(box) is not tuple:
                    box = tuple(box)
                at_edge = box[0] <= 0 or box[2] >= width
                observe(s, bx, by, fi,
                        learn=(s.n_links >= _CONFIRM_LINKS and not at_edge and not tr.tail))
                tr.box = box
                tr.inferred = False
                if at_edge:      # a cell entering or leaving grows/shrinks fast: follow it
                    tr.area = float(b.area)
                else:
                    tr.area += _AREA_ALPHA * (b.area - tr.area)
                    if s.n_links >= _CONFIRM_LINKS and not tr.tail:
                        self._cell_area += 0.02 * (b.area - self._cell_area)
                tr.misses = 0
                if bx < tr.x_min:
                    tr.x_min = bx
                if bx > tr.x_max:
                    tr.x_max = bx
                tr.exited_edge = box[2] >= exit_x
                if not tr.tail:
                    rec = tr.rec
                    if fixed:
                        _cut_clamped(image, math.floor(bx + 0.5) - half,
                                     math.floor(by + 0.5) - half, rec.slot())
                    else:
                        self.cutter(image, bx, by, box, rec.slot())
                    rec.push(fi, t_ns, bx, by, box, b.area, b[5:])
                if box[2] >= width and self._gone_right(tr, predict(s, fi + 1)[0]):
                    done_reason = "exit"          # too little of it will be in view next
            elif i in carried:
                cx, cy, box = carried[i]
                self.predictor.move(s, cx, cy, fi)
                tr.inferred = True
                tr.box = box
                tr.misses = 0
                tr.x_max = max(tr.x_max, cx)
                if box[2] >= exit_x:          # carried out to the exit: it has exited
                    tr.exited_edge = True
                if not tr.tail:       # seen, only not measured alone
                    rec = tr.rec
                    self._cut(image, cx, cy, box, rec)
                    rec.add(None, fi, t_ns, cx, cy, box, 0, None, seen=True)
            else:
                px, py = pred[i]
                tr.misses += 1
                half_w = 0.5 * (tr.box[2] - tr.box[0])
                if (px - half_w >= self.width or tr.misses > self.max_gap
                        or tr.box[2] >= self.width):
                    # seen (or carried) cut by the right edge and now missed: it has left
                    # (what may still show of it is absorbed: engine.track.remnants)
                    done_reason = "exit" if tr.exited_edge else "lost"
                else:
                    st["gap_frames"] += 1
                    if not tr.tail:
                        box = _moved(tr.box, s, px, py)
                        rec = tr.rec
                        self._cut(image, px, py, box, rec)
                        rec.add(None, fi, t_ns, px, py, box, 0, None)
            if done_reason is not None:
                if done_reason == "exit":
                    self._remnants.ended(tr.box, fi)
                clip = self._finish(tr, done_reason, frame.t_ns)
                if clip is not None:
                    finished.append(clip)
                continue
            if not tr.tail and tr.rec.full:
                clip = self._finish(tr, "too long", frame.t_ns)
                if clip is not None:
                    finished.append(clip)
                tr.tail = True
                tr.rec = None
            keep.append(tr)

        # 6. new tracks (from free blobs, and from the free part of a big blob at the inlet)
        self._remnants.expire(fi)
        for j, b in enumerate(blobs + extra):
            if j in blob_track or self._remnants.absorb(b.bbox, fi):
                continue
            tr = _Track(self._next_tid, b, ClipRecorder(self.cutter.size, self.max_frames,
                                                        pool=self._pool),
                        at_start=(fi == self._first_index),
                        entry_ok=(b.bbox[0] <= self.margin and fi != self._first_index))
            self._next_tid += 1
            box = tuple(b.bbox)
            tr.exited_edge = box[2] >= self.width - self.margin
            self._cut(image, b.cx, b.cy, box, tr.rec)
            tr.rec.add(None, fi, t_ns, b.cx, b.cy, box, b.area, _shape_of(b))
            keep.append(tr)
            st["tracks_started"] += 1
        self._tracks = keep
        st["live"] = len(keep)
        st["live_max"] = max(st["live_max"], len(keep))
        st["contested"] = self.assigner.stats["contested"]
        st["ambiguous"] = self.assigner.stats["ambiguous"]
        st["remnants"] = self._remnants.absorbed
        return finished

    def flush(self) -> list[CellClip]:
        """End of stream: finish every live track (truncated, "end of stream")."""
        out = []
        for tr in self._tracks:
            clip = self._finish(tr, "end", self._last_t_ns)
            if clip is not None:
                out.append(clip)
        self._tracks = []
        self.stats["live"] = 0
        return out

    # -- internals ---------------------------------------------------------------------------
    def _gone_right(self, tr: _Track, px: float) -> bool:
        """True when a track seen cut by the right image edge will be out of view at ``px``.

        The part of the cell still inside the image, with its box moved to the prediction
        ``px`` for the next frame and filled as its blob filled its box, is under
        ``EDGE_FACTOR`` (2) times the smallest blob the front end reports
        (``frontend.min_area``): it will not be seen again, so the track ends with this frame
        instead of one or more frames later. Why twice the smallest blob: a sliver at the edge
        keeps less of its outline above the threshold than its last blob did; in a
        30,000-frame replay (726 complete tracks) no sliver predicted under about 60 px
        (50 = min_area) was detected again. A sliver that is seen all the same is absorbed
        (:mod:`engine.track.remnants`), as is anything of a cell cut by the edge whose track
        ended at its first miss there.
        """
        x0, y0, x1, y1 = tr.box
        if x1 < self.width or tr.inferred:
            return False
        box_area = max((x1 - x0) * (y1 - y0), 1)
        fill = min(tr.area / box_area, 1.0)         # the blob's share of its box, as measured
        left = x0 + (px - tr.state.x)
        return fill * (self.width - left) * (y1 - y0) < EDGE_FACTOR * self.min_area

    def _cut(self, image, cx: float, cy: float, box, rec: ClipRecorder) -> None:
        """Cut this frame's crop of a track straight into its recorder's next slot."""
        if self._fixed:      # the common case without the wrappers' Python overhead
            h = self._half
            _cut_clamped(image, math.floor(cx + 0.5) - h, math.floor(cy + 0.5) - h, rec.slot())
        else:
            self.cutter(image, cx, cy, box, rec.slot())

    def _explain_big_blobs(self, blobs, tracks, pred, track_blob, blob_track):
        """Tracks carried along with a blob they share; extra blobs for entering cells.

        A blob *claims* the confirmed tracks (not fragments) that took it, and the unmatched
        ones whose prediction lies inside its box. It is *shared* when it is clearly more than
        one cell: larger than the claimed cell by ``merge_area_ratio``, or wider or taller than
        the claimed cells' predicted boxes by more than ``_SHARE_PX``. Tracks sharing a blob
        are carried with it: the first and last along the axis they are spread on are aligned
        to the blob's ends, any in between stay at their prediction; none records an area.
        When the part of a shared blob left of its cells reaches the left image edge, that part
        is a cell entering behind them and starts a track. An unmatched track whose
        prediction lies inside a free blob of one cell's size, just outside the gate, is linked
        to it (a rescue). Updates the link maps in place.
        """
        st = self.stats
        claims: dict[int, list[int]] = {}
        small = 0.5 * self._cell_area
        for i, tr in enumerate(tracks):
            if tr.state.n_links < _CONFIRM_LINKS or tr.area < small:
                continue        # a young track or a fragment may be noise: it claims nothing
            j = track_blob.get(i)
            if j is not None:
                b = blobs[j]
                tb = tr.box
                if (b.area >= self.merge_ratio * tr.area
                        or b.bbox[2] - b.bbox[0] > tb[2] - tb[0] + _SHARE_PX
                        or b.bbox[3] - b.bbox[1] > tb[3] - tb[1] + _SHARE_PX):
                    claims.setdefault(j, []).append(i)   # may hold more than this cell
                continue
            px, py = pred[i]
            for j, b in enumerate(blobs):
                x0, y0, x1, y1 = b.bbox
                if x0 - 4 <= px < x1 + 4 and y0 - 4 <= py < y1 + 4:
                    claims.setdefault(j, []).append(i)
                    break
        carried: dict[int, tuple[float, float, tuple]] = {}
        extra: list[Blob] = []
        W, H = self.width, self.height
        for j, members in claims.items():
            b = blobs[j]
            owner = blob_track.get(j)
            if owner is not None and owner not in members:
                o = tracks[owner]
                if o.state.n_links < _CONFIRM_LINKS or o.area < small:
                    continue    # taken by a young track: leave it
                members.insert(0, owner)
            pbox = {}
            for i in members:
                px, py = pred[i]
                x0, y0, x1, y1 = _moved(tracks[i].box, tracks[i].state, px, py)
                pbox[i] = (max(x0, 0), max(y0, 0), min(x1, W), min(y1, H))
            bw, bh = b.bbox[2] - b.bbox[0], b.bbox[3] - b.bbox[1]
            wider = (bw > max(p[2] - p[0] for p in pbox.values()) + _SHARE_PX
                     or bh > max(p[3] - p[1] for p in pbox.values()) + _SHARE_PX)
            whole = [tracks[i].area for i in members if not _at_edge(tracks[i].box, W)]
            bigger = bool(whole) and b.area >= self.merge_ratio * max(whole)
            inside = self.margin < b.bbox[0] and b.bbox[2] < W - self.margin
            if wider and len(members) == 1 and inside:
                # A lone cell stretches by more than _SHARE_PX in one frame when it enters
                # the constriction at speed, without gaining area; a second cell in its blob
                # adds area (not so at the image edges, where cells enter and leave).
                wider = bool(whole) and b.area >= _GROW * max(whole)
            if not (wider or bigger):
                if owner is None and len(members) == 1:
                    i = members[0]
                    back = (back_allowance_py(self.max_back, self._cell_area)
                            + (_SHARE_PX if tracks[i].inferred else 0.0))
                    if b.cx - tracks[i].state.x >= -back:
                        track_blob[i] = j
                        blob_track[j] = i
                        st["rescued"] += 1
                continue        # one cell's blob: the other claimants just miss
            for i in members:
                track_blob.pop(i, None)
            blob_track[j] = -1
            st["merged_frames"] += len(members)
            if len(members) >= 2:
                xs = [pred[i][0] for i in members]
                ys = [pred[i][1] for i in members]
                ax = 0 if max(xs) - min(xs) >= max(ys) - min(ys) else 1
                order = sorted(members, key=lambda i: pred[i][ax])
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                for i in members:
                    px, py = pred[i]
                    if i not in (order[0], order[-1]):       # in the middle: as predicted
                        carried[i] = (px, py, _moved(tracks[i].box, tracks[i].state, px, py))
                        continue
                    # across the spread: follow the blob's centroid; along it: its end
                    cx, cy = (px, py + b.cy - my) if ax == 0 else (px + b.cx - mx, py)
                    box = _moved(tracks[i].box, tracks[i].state, cx, cy)
                    d = (b.bbox[ax] - box[ax]) if i == order[0] else (b.bbox[ax + 2] - box[ax + 2])
                    if ax == 0:
                        cx += d
                        box = (box[0] + d, box[1], box[2] + d, box[3])
                    else:
                        cy += d
                        box = (box[0], box[1] + d, box[2], box[3] + d)
                    carried[i] = (cx, cy, box)
                continue
            i = members[0]
            tr = tracks[i]
            px, py = pred[i]
            pb = _moved(tr.box, tr.state, px, py)
            if abs(pb[2] - b.bbox[2]) <= abs(pb[0] - b.bbox[0]):
                dx = b.bbox[2] - pb[2]          # the track is the front (right) part
            else:
                dx = b.bbox[0] - pb[0]          # the track is the rear (left) part
            box = (pb[0] + dx, pb[1], pb[2] + dx, pb[3])
            carried[i] = (px + dx, py, box)
            rest_w = box[0] - b.bbox[0]
            if b.bbox[0] <= self.margin and rest_w >= _SHARE_PX:
                rest_area = max(int(b.area * rest_w / max(bw, 1)), 1)
                extra.append(Blob(b.frame_index, 0.5 * (b.bbox[0] + box[0]), b.cy, rest_area,
                                  (b.bbox[0], b.bbox[1], box[0], b.bbox[3])))
        return carried, extra

    def _finish(self, tr: _Track, how: str, t_ns: int) -> CellClip | None:
        if tr.tail:
            return None
        try:
            return self._clip_of(tr, how, t_ns)
        finally:
            tr.rec.release()        # the clip holds copies: the crop buffer can be reused

    def _clip_of(self, tr: _Track, how: str, t_ns: int) -> CellClip | None:
        rec = tr.rec
        st = self.stats
        if how != "too long":
            rec.trim_to_last_detection()
        if rec.n_detected < self.min_frames:
            st["dropped_short"] += 1
            return None
        if tr.x_max - tr.x_min < self.min_travel:
            st["dropped_static"] += 1
            return None
        reasons = []
        if not tr.entry_ok:
            reasons.append("in view at start" if tr.at_start else "appeared mid-channel")
        if how == "too long":
            reasons.append("too long")
        elif how == "end":
            reasons.append("end of stream")
        elif how == "lost" or not tr.exited_edge:
            reasons.append("lost mid-channel")
        status = TrackStatus.TRUNCATED if reasons else TrackStatus.COMPLETE
        clip = rec.build(self._next_cell, status, "; ".join(reasons), t_ns)
        self._next_cell += 1
        if self.want_features:
            feats = compute_features(clip, self.geometry, self.cfg, shapes=rec.shapes())
            clip.features.update(feats)   # the dict is the clip's own (built fresh)
        st["clips"] += 1
        st["complete" if status is TrackStatus.COMPLETE else "truncated"] += 1
        return clip


def _at_edge(box, width: int) -> bool:
    return box[0] <= 0 or box[2] >= width


def _shape_of(b: Blob) -> tuple[float, ...]:
    return (b.perimeter, b.deform, b.major, b.minor, b.orientation, b.brightness)


def _moved(box, s: TrackState, cx: float, cy: float) -> tuple[int, int, int, int]:
    """``box`` shifted by the move from the track's last position to (cx, cy)."""
    dx = int(round(cx - s.x))
    dy = int(round(cy - s.y))
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
