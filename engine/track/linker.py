"""Incremental linking of blobs into cell tracks, and cutting each track into a CellClip.

Stream first (trackpy's ``Linker.init_level``/``next_level``): the linker sees one frame and its
blobs at a time, keeps only the live tracks, and returns the tracks that finished in that frame
as :class:`~engine.types.CellClip` values, so memory stays bounded however long the stream.

Per frame:

1. **Predict** every live track's position with the motion model (``tracker.predictor``,
   :mod:`engine.track.predict`): by default the channel flow learned from confirmed tracks,
   integrated through gaps.
2. **Gate**: a blob is a candidate for a track when it lies within ``gate_px`` of the prediction
   (the gate grows by ``gate_growth`` per missed frame) and is not more than ``max_back_px``
   behind the last position (cells flow left to right).
3. **Assign** jointly (``tracker.assign``, :mod:`engine.track.assign`): conflicts inside a subnet
   are solved as one assignment problem, not greedily.
4. **Merged cells**: two cells that touch give one blob. A blob that is clearly more than the
   cell(s) it is claimed by (larger by ``merge_area_ratio``, or wider/taller than their
   predicted boxes) is *shared*: the confirmed tracks whose predictions lie inside it are
   carried with it (aligned to its ends), record no area for that frame, and keep their
   identities through the contact; the part of it left of them at the inlet edge starts the
   track of a cell entering behind them. Blobs of one cell's size just outside a track's gate
   but around its prediction are linked to it (a rescue).
5. **Misses**: a track without a candidate is predicted through up to ``max_gap`` frames (its
   crop is cut at the predicted position with area 0); then it ends, as an exit when its last
   box touched the outlet edge, else as lost. A track predicted beyond the right edge ends at
   once. At the right edge no miss is bridged: a track cut by the edge ends at its first
   miss, and one whose part predicted to be in view in the next frame is under twice the
   smallest blob (``frontend.min_area``) ends with the frame it was seen in: the cell has
   left, and waiting would only delay its classification.
6. **New tracks** start from the remaining blobs, except a blob cut by the right edge under
   a track that just ended there (what is left of that cell: :mod:`engine.track.remnants`).

A finished track is a clip from its first to its last detection. It is ``COMPLETE`` when it
entered at the left image edge and left at the right one (within ``edge_margin``); otherwise
``TRUNCATED`` with the reasons ("in view at start" / "appeared mid-channel", "lost mid-channel" /
"end of stream" / "too long"). Tracks with fewer than ``min_frames`` detections, or that moved
less than ``min_travel_px``, are dropped (counted in :attr:`Linker.stats`).

A track that reaches ``clips.max_frames`` is emitted at once as truncated ("too long") and kept
as a *tail* that still claims its blobs (so that it does not spawn a second clip) but records
nothing.

Implementation: the live tracks are rows of one float64 table and the learned flow field one
array, so that the common frame (each track with at most one candidate blob, no blob that
may hold several cells) is one Numba kernel call (:func:`engine.track._kernels.step`):
predict, gate, link, update, cut the crops. Conflicts to solve jointly, blobs shared by
several cells and new tracks go through Python. Crops and per-frame numbers live in a row
store shared by all tracks (rows taken from a free list and given back when a clip is
built), grown by doubling, so memory stays bounded by the frames of the live tracks. The
plain-Python reference, one object per track, is :class:`engine.track.linker_py.PyLinker`;
the tests check that both give identical clips.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np

from ..clips import ClipCutter, _cut_clamped
from ..errors import DetectError
from ..features import compute_features
from ..types import Blob, CellClip, ChipGeometry, Frame, TrackStatus
from . import _kernels as K
from .assign import Assigner
from .predict import PREDICTORS
from .remnants import EdgeRemnants

__all__ = ["Linker", "link_iter"]

_CONFIRM_LINKS = 3   # links before a track teaches the flow field
_AREA_ALPHA = 0.3    # smoothing of a track's typical area
_SHARE_PX = 8        # a blob this much wider/taller than a cell's predicted box holds more
_GROW = 1.2          # ... when it also has this much more area (or several tracks claim it)
_MODES = {"null": K.MODE_NULL, "velocity": K.MODE_VELOCITY, "flow": K.MODE_FLOW}
_FLOW_MIN_SAMPLES = 3     # FlowPredict's defaults
_FLOW_MEMORY = 200
_FLOW_RES_DECAY = 0.8


class Linker:
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

    Notes
    -----
    ``blobs`` with a ``fin`` attribute (the front end's
    :class:`~engine.detect.blobs.BlobList`: the same blobs as a float64 array of finished
    statistics rows, finite centroids) are linked from that array without reading the
    :class:`~engine.types.Blob` values; any other iterable of blobs is converted.

    Examples
    --------
    >>> linker = Linker(cfg, geometry)
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
        if t.predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {t.predictor!r}; choose one of "
                             f"{', '.join(PREDICTORS)}")
        bin_px = float(t.flow_bin_px)
        if bin_px <= 0:
            raise ValueError(f"FlowPredict: bin_px must be > 0, got {bin_px!r}")
        self.predictor_name = t.predictor
        self.assigner = Assigner(t.assign, t.max_subnet)
        self.cutter = ClipCutter(cfg.clips)
        self._fixed = self.cutter.mode == "fixed"
        self._size = self.cutter.size
        self._half = self._size // 2
        self.max_frames = int(cfg.clips.max_frames)
        self.want_features = bool(features)
        self.width = int(geometry.width)
        self.height = int(geometry.height)
        # the learned flow field: grid (ny * nx rows) then its column marginal (nx rows)
        nx = max(1, int(math.ceil(self.width / bin_px)))
        ny = max(1, int(math.ceil(self.height / bin_px)))
        self._fld = np.zeros((ny * nx + nx, 3), np.float64)
        P = np.zeros(K.NP, np.float64)
        P[K.P_MODE] = _MODES[t.predictor]
        P[K.P_BIN] = bin_px
        P[K.P_NX] = nx
        P[K.P_NY] = ny
        P[K.P_MINS] = _FLOW_MIN_SAMPLES
        P[K.P_MEM] = _FLOW_MEMORY
        P[K.P_DECAY] = _FLOW_RES_DECAY
        P[K.P_PRIOR] = float(t.prior_vx)
        P[K.P_GATE] = self.gate
        P[K.P_GROWTH] = self.gate_growth
        P[K.P_BACK] = self.max_back
        P[K.P_SHARE] = _SHARE_PX
        P[K.P_MERGE] = self.merge_ratio
        P[K.P_CELLAREA] = 0.0        # typical area of a tracked cell [px²], learned
        P[K.P_W] = self.width
        P[K.P_EXITX] = self.width - self.margin
        P[K.P_MAXGAP] = self.max_gap
        P[K.P_MINAREA] = self.min_area
        P[K.P_ALPHA] = _AREA_ALPHA
        P[K.P_MAXFR] = self.max_frames
        P[K.P_HALF] = self._half
        P[K.P_FIXED] = 1.0 if self._fixed else 0.0
        P[K.P_CONFIRM] = _CONFIRM_LINKS
        self._P = P
        self._I = np.zeros(K.NI, np.int64)
        # live tracks (rows of _ts, in the order they started) and per-frame scratch
        self._n = 0
        self._ts = np.zeros((16, K.NT), np.float64)
        self._wi = np.zeros((16, K.NWI), np.int64)
        self._wf = np.zeros((16, K.NWF), np.float64)
        self._btrack = np.zeros(16, np.int64)
        self._links = np.zeros((64, 2), np.int64)
        self._lcost = np.zeros(64, np.float64)
        # the row store: one row per recorded frame of a live track (crop + numbers)
        cap = 256
        self._crops = np.empty((cap, self._size, self._size), np.uint8)
        self._rec_i = np.zeros((cap, 2), np.int64)
        self._rec_f = np.zeros((cap, K.NR), np.float64)
        self._free = np.arange(cap - 1, -1, -1, dtype=np.int64)     # a stack; top at the end
        self._I[K.I_FREETOP] = cap
        # a recording track's rows, in order, by slot
        self._slot_rows = np.zeros((8, self.max_frames), np.int64)
        self._free_slots = list(range(7, -1, -1))
        self._next_tid = 0
        self._next_cell = 0
        self._first_index: int | None = None
        self._last_index: int | None = None
        self._last_t_ns = 0
        self._remnants = EdgeRemnants(self.width, self.max_gap)
        self.stats = {k: 0 for k in (
            "frames", "blobs", "tracks_started", "clips", "complete", "truncated",
            "dropped_short", "dropped_static", "gap_frames", "merged_frames", "rescued",
            "contested", "ambiguous", "live", "live_max", "remnants")}

    # -- public ----------------------------------------------------------------------------
    @property
    def live(self) -> int:
        """Number of live tracks (tails included)."""
        return self._n

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
        arr, blist = _as_array(blobs)
        m = arr.shape[0]
        st["blobs"] += m
        n = self._n
        if n == 0 and m == 0:
            return []
        self._reserve(n, m)
        I = self._I
        status = K.step(0, self._ts, n, fi, t_ns, image, arr, m, self._fld, self._P, I,
                        self._wi, self._wf, self._btrack, self._links, self._lcost,
                        self._crops, self._rec_i, self._rec_f, self._slot_rows, self._free)
        extra: list[Blob] = []
        if status != 0:
            extra = self._resolve(status, blist, arr, n, m)
            K.step(1, self._ts, n, fi, t_ns, image, arr, m, self._fld, self._P, I,
                   self._wi, self._wf, self._btrack, self._links, self._lcost,
                   self._crops, self._rec_i, self._rec_f, self._slot_rows, self._free)
        if not self._fixed:
            self._cut_rows(image, n)
        finished = self._end_tracks(frame.t_ns, fi) if I[K.I_NDONE] else []
        rem = self._remnants
        rem.expire(fi)
        if I[K.I_NFREE] or extra:
            for j in range(m):
                if self._btrack[j] == -1 and not rem.absorb(blist[j].bbox, fi):
                    self._start(blist[j], image, fi, t_ns)
            for b in extra:
                if not rem.absorb(b.bbox, fi):
                    self._start(b, image, fi, t_ns)
        st["remnants"] = rem.absorbed
        st["gap_frames"] = int(I[K.I_GAP])
        st["live"] = self._n
        if self._n > st["live_max"]:
            st["live_max"] = self._n
        st["contested"] = self.assigner.stats["contested"]
        st["ambiguous"] = self.assigner.stats["ambiguous"]
        return finished

    def flush(self) -> list[CellClip]:
        """End of stream: finish every live track (truncated, "end of stream")."""
        out = []
        for i in range(self._n):
            clip = self._finish(i, "end", self._last_t_ns)
            if clip is not None:
                out.append(clip)
        self._n = 0
        self.stats["live"] = 0
        return out

    # -- internals ---------------------------------------------------------------------------
    def _reserve(self, n: int, m: int) -> None:
        """Room for this frame: scratch for n tracks, m blobs and n * m links; n free rows."""
        if self._wi.shape[0] < n:
            cap = 2 * n
            self._wi = np.zeros((cap, K.NWI), np.int64)
            self._wf = np.zeros((cap, K.NWF), np.float64)
        if self._btrack.shape[0] < m:
            self._btrack = np.zeros(2 * m, np.int64)
        if self._links.shape[0] < n * m:
            self._links = np.zeros((2 * n * m, 2), np.int64)
            self._lcost = np.zeros(2 * n * m, np.float64)
        if self._I[K.I_FREETOP] < n + 1:
            self._grow_rows()

    def _grow_rows(self) -> None:
        """Double the row store; the new rows go under the free ones (used last)."""
        cap = self._crops.shape[0]
        crops = np.empty((2 * cap, self._size, self._size), np.uint8)
        crops[:cap] = self._crops
        rec_i = np.zeros((2 * cap, 2), np.int64)
        rec_i[:cap] = self._rec_i
        rec_f = np.zeros((2 * cap, K.NR), np.float64)
        rec_f[:cap] = self._rec_f
        top = int(self._I[K.I_FREETOP])
        free = np.empty(2 * cap, np.int64)
        free[:cap] = np.arange(2 * cap - 1, cap - 1, -1)
        free[cap:cap + top] = self._free[:top]
        self._crops, self._rec_i, self._rec_f, self._free = crops, rec_i, rec_f, free
        self._I[K.I_FREETOP] = cap + top

    def _take_slot(self) -> int:
        if not self._free_slots:
            ns = self._slot_rows.shape[0]
            grown = np.zeros((2 * ns, self._slot_rows.shape[1]), np.int64)
            grown[:ns] = self._slot_rows
            self._slot_rows = grown
            self._free_slots = list(range(2 * ns - 1, ns - 1, -1))
        return self._free_slots.pop()

    def _release(self, i: int) -> None:
        """Give the rows and the slot of track row ``i`` back (its clip holds copies)."""
        ts = self._ts
        slot = int(ts[i, K.T_SLOT])
        nrec = int(ts[i, K.T_NREC])
        top = int(self._I[K.I_FREETOP])
        self._free[top:top + nrec] = self._slot_rows[slot, nrec - 1::-1] if nrec else 0
        self._I[K.I_FREETOP] = top + nrec
        self._free_slots.append(slot)
        ts[i, K.T_SLOT] = -1.0
        ts[i, K.T_NREC] = 0.0

    def _start(self, b: Blob, image: np.ndarray, fi: int, t_ns: int) -> None:
        """A new track from blob ``b`` (its first frame recorded)."""
        n = self._n
        if self._ts.shape[0] <= n:
            grown = np.zeros((2 * self._ts.shape[0], K.NT), np.float64)
            grown[:n] = self._ts[:n]
            self._ts = grown
        if self._I[K.I_FREETOP] < 1:
            self._grow_rows()
        slot = self._take_slot()
        x0, y0, x1, y1 = (int(v) for v in b.bbox)
        cx, cy = float(b.cx), float(b.cy)
        r = self._ts[n]
        r[:] = 0.0
        r[K.T_X] = cx
        r[K.T_Y] = cy
        r[K.T_FRAME] = int(b.frame_index)
        r[K.T_BX0], r[K.T_BY0], r[K.T_BX1], r[K.T_BY1] = x0, y0, x1, y1
        r[K.T_AREA] = float(b.area)
        r[K.T_XMIN] = r[K.T_XMAX] = cx
        r[K.T_EXITED] = x1 >= self.width - self.margin
        r[K.T_TID] = self._next_tid
        r[K.T_FIRST] = int(b.frame_index)
        r[K.T_ATSTART] = fi == self._first_index
        r[K.T_ENTRYOK] = x0 <= self.margin and fi != self._first_index
        r[K.T_SLOT] = slot
        self._next_tid += 1
        # its first frame
        top = int(self._I[K.I_FREETOP]) - 1
        row = int(self._free[top])
        self._I[K.I_FREETOP] = top
        self._slot_rows[slot, 0] = row
        r[K.T_NREC] = 1
        r[K.T_NDET] = 1
        r[K.T_LASTDET] = 0
        self._rec_i[row] = (fi, t_ns)
        self._rec_f[row] = (cx, cy, x0, y0, x1, y1, int(b.area), b.perimeter, b.deform,
                            b.major, b.minor, b.orientation, b.brightness)
        if self._fixed:
            h = self._half
            _cut_clamped(image, math.floor(cx + 0.5) - h, math.floor(cy + 0.5) - h,
                         self._crops[row])
        else:
            self.cutter(image, cx, cy, (x0, y0, x1, y1), self._crops[row])
        self._n = n + 1
        self.stats["tracks_started"] += 1

    def _cut_rows(self, image: np.ndarray, n: int) -> None:
        """Crops of the rows recorded by the kernel, for the modes it does not cut."""
        rows = self._wi[:n, K.W_ROW]
        for row in rows[rows >= 0].tolist():
            r = self._rec_f[row]
            box = tuple(int(v) for v in r[K.R_X0:K.R_Y1 + 1])
            self.cutter(image, float(r[K.R_CX]), float(r[K.R_CY]), box, self._crops[row])

    def _end_tracks(self, t_ns: int, fi: int) -> list[CellClip]:
        """Finish the tracks the kernel ended (in track order), keep the rest in order."""
        n = self._n
        done = self._wi[:n, K.W_DONE]
        keep = np.ones(n, np.bool_)
        finished = []
        ts = self._ts
        for i in np.flatnonzero(done).tolist():
            if done[i] == K.DONE_LONG:
                clip = self._finish(i, "too long", t_ns)
                ts[i, K.T_TAIL] = 1.0       # goes on claiming its blobs, records nothing
            else:
                if done[i] == K.DONE_EXIT:
                    self._remnants.ended(ts[i, K.T_BX0:K.T_BY1 + 1].tolist(), fi)
                clip = self._finish(i, "exit" if done[i] == K.DONE_EXIT else "lost", t_ns)
                keep[i] = False
            if clip is not None:
                finished.append(clip)
        if not keep.all():
            k = int(keep.sum())
            ts[:k] = ts[:n][keep]
            self._n = k
        return finished

    def _resolve(self, status: int, blobs: list[Blob], arr: np.ndarray, n: int,
                 m: int) -> list[Blob]:
        """The Python path of a frame: joint assignment (status 1) and blobs that may hold
        several cells; fills the kernel's assignment and carried arrays. Returns the blobs
        of cells entering behind a shared blob (new tracks)."""
        wi, wf = self._wi, self._wf
        if status == 1:
            nl = int(self._I[K.I_NLINKS])
            lk = self._links[:nl].tolist()
            lc = self._lcost[:nl].tolist()
            costs = {(i, j): c for (i, j), c in zip(lk, lc)}
            links = self.assigner(costs, 1.0)
            track_blob = dict(links)
            blob_track = {j: i for i, j in links}
            wi[:n, K.W_ASSIGN] = -1
            for i, j in links:
                wi[i, K.W_ASSIGN] = j
            K.claims(self._ts, n, arr, m, self._P, wi, wf)
        else:
            track_blob = {i: j for i, j in enumerate(wi[:n, K.W_ASSIGN].tolist()) if j >= 0}
            blob_track = {j: i for i, j in track_blob.items()}
        claims: dict[int, list[int]] = {}
        for i, j in enumerate(wi[:n, K.W_CLAIM].tolist()):
            if j >= 0:
                claims.setdefault(j, []).append(i)
        carried, extra = [], []
        if claims:
            rows = self._ts[:n].tolist()
            pred = [(r[0], r[1]) for r in wf[:n, K.W_PX:K.W_PY + 1].tolist()]
            carried, extra = self._explain_big_blobs(blobs, rows, pred, track_blob, blob_track,
                                                     claims)
        else:
            carried = {}
        get = track_blob.get
        wi[:n, K.W_ASSIGN] = [get(i, -1) for i in range(n)]
        wf[:n, K.W_CARRIED] = 0.0
        for i, (cx, cy, box) in carried.items():
            wf[i, K.W_CARRIED:K.W_B0 + 4] = (1.0, cx, cy, *box)
        get = blob_track.get
        self._btrack[:m] = [-1 if t is None else (-2 if t == -1 else t)
                            for t in map(get, range(m))]
        return extra

    def _explain_big_blobs(self, blobs, rows, pred, track_blob, blob_track, claims):
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
        to it (a rescue). Updates the link maps in place. ``rows`` are the track rows as
        lists (``T_*`` columns), ``pred`` their predicted positions, ``claims`` the claiming
        tracks per blob (:func:`engine.track._kernels.claims`, in track order).
        """
        st = self.stats
        small = 0.5 * float(self._P[K.P_CELLAREA])
        carried: dict[int, tuple[float, float, tuple]] = {}
        extra: list[Blob] = []
        W, H = self.width, self.height
        for j, members in claims.items():
            b = blobs[j]
            owner = blob_track.get(j)
            if owner is not None and owner not in members:
                o = rows[owner]
                if o[K.T_NLINKS] < _CONFIRM_LINKS or o[K.T_AREA] < small:
                    continue    # taken by a young track: leave it
                members.insert(0, owner)
            pbox = {}
            for i in members:
                px, py = pred[i]
                x0, y0, x1, y1 = _moved(_box(rows[i]), rows[i], px, py)
                pbox[i] = (max(x0, 0), max(y0, 0), min(x1, W), min(y1, H))
            bw, bh = b.bbox[2] - b.bbox[0], b.bbox[3] - b.bbox[1]
            wider = (bw > max(p[2] - p[0] for p in pbox.values()) + _SHARE_PX
                     or bh > max(p[3] - p[1] for p in pbox.values()) + _SHARE_PX)
            whole = [rows[i][K.T_AREA] for i in members if not _at_edge(_box(rows[i]), W)]
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
                    back = (K.back_allowance_py(self.max_back, float(self._P[K.P_CELLAREA]))
                            + (_SHARE_PX if rows[i][K.T_INFERRED] else 0.0))
                    if b.cx - rows[i][K.T_X] >= -back:
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
                        carried[i] = (px, py, _moved(_box(rows[i]), rows[i], px, py))
                        continue
                    # across the spread: follow the blob's centroid; along it: its end
                    cx, cy = (px, py + b.cy - my) if ax == 0 else (px + b.cx - mx, py)
                    box = _moved(_box(rows[i]), rows[i], cx, cy)
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
            px, py = pred[i]
            pb = _moved(_box(rows[i]), rows[i], px, py)
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

    def _finish(self, i: int, how: str, t_ns: int) -> CellClip | None:
        if self._ts[i, K.T_TAIL]:
            return None
        try:
            return self._clip_of(i, how, t_ns)
        finally:
            self._release(i)        # the clip holds copies: the rows can be reused

    def _clip_of(self, i: int, how: str, t_ns: int) -> CellClip | None:
        r = self._ts[i].tolist()
        st = self.stats
        n = int(r[K.T_NREC])
        if how != "too long":
            n = int(r[K.T_LASTDET]) + 1       # trailing frames that were only predicted go
        if r[K.T_NDET] < self.min_frames:
            st["dropped_short"] += 1
            return None
        if r[K.T_XMAX] - r[K.T_XMIN] < self.min_travel:
            st["dropped_static"] += 1
            return None
        reasons = []
        if not r[K.T_ENTRYOK]:
            reasons.append("in view at start" if r[K.T_ATSTART] else "appeared mid-channel")
        if how == "too long":
            reasons.append("too long")
        elif how == "end":
            reasons.append("end of stream")
        elif how == "lost" or not r[K.T_EXITED]:
            reasons.append("lost mid-channel")
        status = TrackStatus.TRUNCATED if reasons else TrackStatus.COMPLETE
        rows = self._slot_rows[int(r[K.T_SLOT]), :n]
        rf = self._rec_f[rows]
        ri = self._rec_i[rows]
        clip = CellClip(
            cell_id=self._next_cell, frames=self._crops[rows],
            frame_indices=ri[:, 0].copy(), centroids=rf[:, K.R_CX:K.R_CY + 1].astype(np.float32),
            boxes=rf[:, K.R_X0:K.R_Y1 + 1].astype(np.int32),
            areas=rf[:, K.R_AREA].astype(np.int32), status=status, reason="; ".join(reasons),
            t0_ns=int(ri[0, 1]) if n else 0, t_exit_ns=int(t_ns), features={})
        self._next_cell += 1
        if self.want_features:
            shapes = rf[:, K.R_SHAPE:K.R_SHAPE + 6].astype(np.float32)
            feats = compute_features(clip, self.geometry, self.cfg, shapes=shapes)
            clip.features.update(feats)   # the dict is the clip's own (built fresh)
        st["clips"] += 1
        st["complete" if status is TrackStatus.COMPLETE else "truncated"] += 1
        return clip


def _as_array(blobs) -> tuple[np.ndarray, list]:
    """The blobs as finished statistics rows (``K.B_*`` columns) and as a list of Blob."""
    fin = getattr(blobs, "fin", None)
    if fin is not None and fin.shape[0] == len(blobs):
        return fin, blobs
    blist = [b for b in blobs if math.isfinite(b.cx) and math.isfinite(b.cy)]
    arr = np.zeros((len(blist), K.NB), np.float64)
    for j, b in enumerate(blist):
        x0, y0, x1, y1 = b.bbox
        arr[j, :K.B_SHAPE + 6] = (b.area, b.cx, b.cy, x0, y0, x1, y1, b.perimeter, b.deform,
                                  b.major, b.minor, b.orientation, b.brightness)
    return arr, blist


def _box(r) -> tuple[int, int, int, int]:
    """The box of a track row (list of ``T_*`` columns)."""
    return (int(r[K.T_BX0]), int(r[K.T_BY0]), int(r[K.T_BX1]), int(r[K.T_BY1]))


def _at_edge(box, width: int) -> bool:
    return box[0] <= 0 or box[2] >= width


def _moved(box, r, cx: float, cy: float) -> tuple[int, int, int, int]:
    """``box`` shifted by the move from the track's last position (row ``r``) to (cx, cy)."""
    dx = int(round(cx - r[K.T_X]))
    dy = int(round(cy - r[K.T_Y]))
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def link_iter(cfg, geometry: ChipGeometry,
              stream: Iterable[tuple[Frame, list[Blob]]]) -> Iterator[CellClip]:
    """Generator over finished clips for a stream of ``(frame, blobs)``; flushes at the end."""
    linker = Linker(cfg, geometry)
    for frame, blobs in stream:
        yield from linker.next_level(frame, blobs)
    yield from linker.flush()
