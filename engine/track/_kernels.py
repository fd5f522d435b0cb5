"""Numba kernels of the linker's per-frame hot path (:class:`engine.track.linker.Linker`).

The linker keeps every live track as one row of a float64 table (``T_*`` columns) and the
learned flow field as one array, so that a frame is one kernel call in the common case:
:func:`step` predicts every track (the motion models of :mod:`engine.track.predict`), gates
the blobs around the predictions, takes the links when no track and no blob has two
candidates (the assigner's own fast path), and updates the tracks: motion state, flow field,
area, misses, the end-of-track tests, and each recording track's crop and per-frame numbers
(written into a shared row store). It stops half-way (status 1 or 2) when the frame needs
the Python path: a conflict to solve jointly, or a blob that may hold several cells; the
linker then resolves it and calls :func:`step` again with ``stage=1`` for the updates.

Every kernel mirrors the Python code it replaces operation for operation (same order of
floating-point operations), so that the linker's output is identical to the reference
:class:`engine.track.linker_py.PyLinker`; ``tests/test_track.py`` checks this.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..clips import _cut_clamped

# Track table columns (float64; integers and flags stored exactly)
(T_X, T_Y, T_FRAME, T_VX, T_VY, T_HASVEL, T_RX, T_RY, T_HASRES, T_NLINKS, T_MISSES,
 T_BX0, T_BY0, T_BX1, T_BY1, T_AREA, T_TAIL, T_XMIN, T_XMAX, T_EXITED, T_INFERRED,
 T_SLOT, T_NREC, T_NDET, T_LASTDET, T_TID, T_FIRST, T_ATSTART, T_ENTRYOK) = range(29)
NT = 29

# Blob table columns: the front end's finished statistics rows (engine.detect._kernels F_*)
B_AREA, B_CX, B_CY, B_X0, B_Y0, B_X1, B_Y1 = range(7)
B_SHAPE = 7          # 6 columns from here: perimeter, deform, major, minor, orientation, bright
NB = 14

# Parameters and mutable float state (float64 vector)
(P_MODE, P_BIN, P_NX, P_NY, P_MINS, P_MEM, P_DECAY, P_PRIOR, P_GATE, P_GROWTH, P_BACK,
 P_SHARE, P_MERGE, P_CELLAREA, P_W, P_EXITX, P_MAXGAP, P_MINAREA, P_ALPHA, P_MAXFR, P_HALF,
 P_FIXED, P_CONFIRM) = range(23)
NP = 23
MODE_NULL, MODE_VELOCITY, MODE_FLOW = 0, 1, 2

# Integer state and outputs (int64 vector)
I_FREETOP, I_GAP, I_LEARNED, I_NLINKS, I_NDONE, I_NFREE = range(6)
NI = 6

# Per-track scratch: wi (int64) and wf (float64) columns
W_ASSIGN, W_DONE, W_ROW, W_CLAIM = range(4)
NWI = 4
W_PX, W_PY, W_CARRIED, W_CX, W_CY, W_B0 = range(6)    # W_B0..W_B0+3: the carried box
NWF = 10

# Record rows: rec_f columns (float64); rec_i holds (frame index, t_ns)
R_CX, R_CY, R_X0, R_Y0, R_X1, R_Y1, R_AREA = range(7)
R_SHAPE = 7
NR = 13

DONE_EXIT, DONE_LOST, DONE_LONG = 1, 2, 3


@njit(cache=True, nogil=True, inline="always")
def _cells(P, x, y):
    """The flow-field rows of (x, y): its bin, and its column's row (all y)."""
    b = P[P_BIN]
    nx = int(P[P_NX])
    ny = int(P[P_NY])
    ix = int(x / b)
    iy = int(y / b)
    ix = 0 if ix < 0 else (nx - 1 if ix >= nx else ix)
    iy = 0 if iy < 0 else (ny - 1 if iy >= ny else iy)
    return iy * nx + ix, ny * nx + ix


@njit(cache=True, nogil=True, inline="always")
def _field(fld, P, x, y):
    """FlowPredict.field: learned velocity at (x, y) and whether it is known."""
    g, c = _cells(P, x, y)
    n = fld[g, 0]
    if n >= P[P_MINS]:
        return fld[g, 1] / n, fld[g, 2] / n, True
    n = fld[c, 0]
    if n >= P[P_MINS]:
        return fld[c, 1] / n, fld[c, 2] / n, True
    return 0.0, 0.0, False


@njit(cache=True, nogil=True)
def predict(ts, i, fi, fld, P):
    """Predicted centroid (x, y) [px] of track row ``i`` in frame ``fi`` (the predictors'
    ``predict``)."""
    x = ts[i, T_X]
    y = ts[i, T_Y]
    mode = int(P[P_MODE])
    if mode == MODE_NULL:
        return x, y
    dt = fi - int(ts[i, T_FRAME])
    has_vel = ts[i, T_HASVEL] != 0.0
    if mode == MODE_VELOCITY:
        if has_vel:
            return x + ts[i, T_VX] * dt, y + ts[i, T_VY] * dt
        return x + P[P_PRIOR] * dt, y
    has_res = ts[i, T_HASRES] != 0.0
    rx = ts[i, T_RX]
    ry = ts[i, T_RY]
    decay = P[P_DECAY]
    for _ in range(max(dt, 0)):
        fx, fy, known = _field(fld, P, x, y)
        if known:
            if has_res:
                fx += rx
                fy += ry
                rx *= decay
                ry *= decay
        elif has_vel:
            fx = ts[i, T_VX]
            fy = ts[i, T_VY]
        else:
            fx = P[P_PRIOR]
            fy = 0.0
        x += fx
        y += fy
    return x, y


@njit(cache=True, nogil=True)
def _learn(fld, P, x, y, vx, vy):
    mem = P[P_MEM]
    for g in _cells(P, x, y):
        if fld[g, 0] >= mem:
            k = (mem - 1.0) / fld[g, 0]
            fld[g, 0] *= k
            fld[g, 1] *= k
            fld[g, 2] *= k
        fld[g, 0] += 1.0
        fld[g, 1] += vx
        fld[g, 2] += vy


@njit(cache=True, nogil=True)
def observe(ts, i, x, y, fi, learn, fld, P, I):
    """A new detection of track row ``i`` at (x, y) [px] in frame ``fi`` (``observe``)."""
    dt = fi - int(ts[i, T_FRAME])
    if dt > 0:
        vx = (x - ts[i, T_X]) / dt
        vy = (y - ts[i, T_Y]) / dt
        if int(P[P_MODE]) == MODE_FLOW:
            mx = 0.5 * (x + ts[i, T_X])
            my = 0.5 * (y + ts[i, T_Y])
            fx, fy, known = _field(fld, P, mx, my)
            if known:
                rx = vx - fx
                ry = vy - fy
                if ts[i, T_HASRES] != 0.0:
                    ts[i, T_RX] = 0.5 * (ts[i, T_RX] + rx)
                    ts[i, T_RY] = 0.5 * (ts[i, T_RY] + ry)
                else:
                    ts[i, T_RX] = rx
                    ts[i, T_RY] = ry
                    ts[i, T_HASRES] = 1.0
            if learn:
                _learn(fld, P, mx, my, vx, vy)
                I[I_LEARNED] += 1
        if ts[i, T_HASVEL] != 0.0:
            ts[i, T_VX] = 0.5 * (ts[i, T_VX] + vx)
            ts[i, T_VY] = 0.5 * (ts[i, T_VY] + vy)
        else:
            ts[i, T_VX] = vx
            ts[i, T_VY] = vy
            ts[i, T_HASVEL] = 1.0
        ts[i, T_NLINKS] += 1.0
    ts[i, T_X] = x
    ts[i, T_Y] = y
    ts[i, T_FRAME] = fi


@njit(cache=True, nogil=True)
def move(ts, i, x, y, fi, P):
    """Place track row ``i`` at an inferred (x, y) [px] in frame ``fi`` (``move``)."""
    if int(P[P_MODE]) == MODE_FLOW:
        dt = fi - int(ts[i, T_FRAME])
        if dt > 0 and ts[i, T_HASRES] != 0.0:
            k = P[P_DECAY] ** float(dt)
            ts[i, T_RX] *= k
            ts[i, T_RY] *= k
    ts[i, T_X] = x
    ts[i, T_Y] = y
    ts[i, T_FRAME] = fi


@njit(cache=True, nogil=True)
def record(ts, i, fi, t_ns, image, cx, cy, b0, b1, b2, b3, area, B, j, seen, P, I, crops,
           rec_i, rec_f, slot_rows, free):
    """Append one frame to the recording of track row ``i``: a row from the free store,
    the crop (fixed mode; otherwise the caller cuts it) and the numbers. ``j`` >= 0: the
    blob measured in this frame (its shape columns are kept, the frame counts as
    detected); else the shape is NaN and ``seen`` marks a frame in which the cell was seen
    but not measured alone. Returns the row."""
    top = I[I_FREETOP] - 1
    row = free[top]
    I[I_FREETOP] = top
    slot = int(ts[i, T_SLOT])
    k = int(ts[i, T_NREC])
    slot_rows[slot, k] = row
    ts[i, T_NREC] = k + 1
    rec_i[row, 0] = fi
    rec_i[row, 1] = t_ns
    r = rec_f[row]
    r[R_CX] = cx
    r[R_CY] = cy
    r[R_X0] = b0
    r[R_Y0] = b1
    r[R_X1] = b2
    r[R_Y1] = b3
    r[R_AREA] = area
    if j >= 0:
        for c in range(6):
            r[R_SHAPE + c] = B[j, B_SHAPE + c]
        ts[i, T_NDET] += 1.0
        ts[i, T_LASTDET] = k
    else:
        for c in range(6):
            r[R_SHAPE + c] = np.nan
        if seen:
            ts[i, T_LASTDET] = k
    if P[P_FIXED] != 0.0:
        half = int(P[P_HALF])
        _cut_clamped(image, int(math.floor(cx + 0.5)) - half, int(math.floor(cy + 0.5)) - half,
                     crops[row])
    return row


#: How far behind its last position a track may find its cell, as a share of the typical cell
#: diameter (at least tracker.max_back_px): cells never flow backwards, but the centroid of a
#: large cell that deforms while it waits at the constriction's mouth can step back by more
#: than 2 px (45 px cells: 2-3 px), and a fixed allowance then broke its track in two.
BACK_FRACTION = 0.1


def back_allowance_py(max_back: float, cell_area: float) -> float:
    """:func:`back_allowance` for the plain-Python linker (the same arithmetic)."""
    return max(max_back, BACK_FRACTION * math.sqrt(4.0 * cell_area / math.pi))


@njit(cache=True, nogil=True)
def back_allowance(P):
    """The backwards step allowed this frame [px]: ``tracker.max_back_px``, or
    ``BACK_FRACTION`` of the diameter of the typical tracked cell when that is more."""
    return max(P[P_BACK], BACK_FRACTION * math.sqrt(4.0 * P[P_CELLAREA] / math.pi))


#: A cell leaving on the right is gone once the part of it predicted to be still in view in
#: the next frame is under EDGE_FACTOR x frontend.min_area: its track ends with the frame in
#: which it was last seen (engine.track.linker_py.PyLinker._gone_right).
EDGE_FACTOR = 2.0


@njit(cache=True, nogil=True)
def _gone_right(ts, i, px, P):
    """Linker._gone_right: a track last seen at the right edge whose predicted visible part
    is under ``EDGE_FACTOR`` times the smallest blob."""
    W = P[P_W]
    x0 = ts[i, T_BX0]
    y0 = ts[i, T_BY0]
    x1 = ts[i, T_BX1]
    y1 = ts[i, T_BY1]
    if x1 < W or ts[i, T_INFERRED] != 0.0:
        return False
    box_area = max((x1 - x0) * (y1 - y0), 1.0)
    fill = min(ts[i, T_AREA] / box_area, 1.0)
    left = x0 + (px - ts[i, T_X])
    return fill * (W - left) * (y1 - y0) < EDGE_FACTOR * P[P_MINAREA]


@njit(cache=True, nogil=True)
def simple_subnets(links, lcost, nl, n, m, wi, btrack):
    """The assigner (:class:`engine.track.assign.Assigner`) for frames whose subnets are
    all simple: every connected group of gated links has one track or one blob, and its
    cheapest link wins (ties: the smallest track, then blob index, as the assigner's
    ``min`` over its sorted subnet). Fills ``wi[:, W_ASSIGN]`` and ``btrack`` and returns
    True; returns False (nothing to use) when a subnet has two tracks and two blobs, a
    conflict that is solved jointly by the caller."""
    # union-find over tracks 0..n-1 and blobs n..n+m-1
    parent = np.arange(n + m)
    for q in range(nl):
        a = links[q, 0]
        b = n + links[q, 1]
        while parent[a] != a:
            a = parent[a]
        while parent[b] != b:
            b = parent[b]
        if a != b:
            parent[b] = a
    root = np.empty(n + m, np.int64)
    for v in range(n + m):
        r = v
        while parent[r] != r:
            r = parent[r]
        root[v] = r
    nt = np.zeros(n + m, np.int64)
    nb = np.zeros(n + m, np.int64)
    for i in range(n):
        nt[root[i]] += 1
    for j in range(m):
        nb[root[n + j]] += 1
    best = np.full(n + m, -1, np.int64)
    for q in range(nl):
        r = root[links[q, 0]]
        if nt[r] >= 2 and nb[r] >= 2:
            return False
        k = best[r]
        if (k < 0 or lcost[q] < lcost[k]
                or (lcost[q] == lcost[k]
                    and (links[q, 0] < links[k, 0]
                         or (links[q, 0] == links[k, 0] and links[q, 1] < links[k, 1])))):
            best[r] = q
    for i in range(n):
        wi[i, W_ASSIGN] = -1
    for j in range(m):
        btrack[j] = -1
    for v in range(n + m):
        q = best[v]
        if q >= 0:
            wi[links[q, 0], W_ASSIGN] = links[q, 1]
            btrack[links[q, 1]] = links[q, 0]
    return True


@njit(cache=True, nogil=True)
def claims(ts, n, B, m, P, wi, wf):
    """The blob each track *claims* (``Linker._explain_big_blobs``) into ``wi[:, W_CLAIM]``
    (-1: none), from the links in ``wi[:, W_ASSIGN]`` and the predictions; returns how many
    tracks claim one.

    A confirmed track that is not a fragment claims its own blob when that is larger than
    the track's cell by ``merge_area_ratio`` or wider/taller than its box by ``_SHARE_PX``;
    without a blob, it claims the first blob whose box (grown by 4 px) holds its
    prediction.
    """
    conf = P[P_CONFIRM]
    share = P[P_SHARE]
    small = 0.5 * P[P_CELLAREA]
    nc = 0
    for i in range(n):
        wi[i, W_CLAIM] = -1
        if ts[i, T_NLINKS] < conf or ts[i, T_AREA] < small:
            continue
        j = wi[i, W_ASSIGN]
        if j >= 0:
            if (B[j, B_AREA] >= P[P_MERGE] * ts[i, T_AREA]
                    or B[j, B_X1] - B[j, B_X0] > ts[i, T_BX1] - ts[i, T_BX0] + share
                    or B[j, B_Y1] - B[j, B_Y0] > ts[i, T_BY1] - ts[i, T_BY0] + share):
                wi[i, W_CLAIM] = j
                nc += 1
            continue
        px = wf[i, W_PX]
        py = wf[i, W_PY]
        for j in range(m):
            if (B[j, B_X0] - 4 <= px < B[j, B_X1] + 4
                    and B[j, B_Y0] - 4 <= py < B[j, B_Y1] + 4):
                wi[i, W_CLAIM] = j
                nc += 1
                break
    return nc


@njit(cache=True, nogil=True)
def step(stage, ts, n, fi, t_ns, image, B, m, fld, P, I, wi, wf, btrack, links, lcost,
         crops, rec_i, rec_f, slot_rows, free):
    """One frame of the linker for ``n`` live tracks (rows of ``ts``) and ``m`` blobs.

    ``stage`` 0: predict every track into ``wf[:, W_PX:W_PY+1]``, gate, write the gated
    links (track, blob) and costs (squared distance / squared gate) into ``links``/``lcost``
    (``I[I_NLINKS]``), in the reference's order. When a track or a blob has two candidates,
    return 1 (the caller solves the subnet jointly). Otherwise take the links (``wi[:,
    W_ASSIGN]``, ``btrack``); when a track claims a blob (:func:`claims`, into ``wi[:,
    W_CLAIM]``), return 2 (the caller explains it). Otherwise go on with the updates and
    return 0.

    ``stage`` 1: only the updates, from ``wi[:, W_ASSIGN]`` (blob per track or -1) and the
    carried positions (``wf[:, W_CARRIED]`` set: the track moves with a shared blob to
    ``W_CX, W_CY`` and box ``W_B0..``). Per track, ``wi[:, W_DONE]`` receives how it ended
    (``DONE_*``, 0: goes on) and ``wi[:, W_ROW]`` the record row written (-1: none);
    ``I[I_NDONE]`` counts ended tracks and ``I[I_NFREE]`` the blobs no track took.

    The caller guarantees at least ``n`` free rows in the store.
    """
    conf = P[P_CONFIRM]
    share = P[P_SHARE]
    if stage == 0:
        gate = P[P_GATE]
        growth = P[P_GROWTH]
        max_back = back_allowance(P)
        order = np.argsort(B[:m, B_CX], kind="mergesort")
        nl = 0
        for i in range(n):
            px, py = predict(ts, i, fi, fld, P)
            wf[i, W_PX] = px
            wf[i, W_PY] = py
            g = gate * (1.0 + growth * ts[i, T_MISSES])
            g2 = g * g
            back = max_back + (share if ts[i, T_INFERRED] != 0.0 else 0.0)
            xmin = px - g
            if ts[i, T_X] - back > xmin:
                xmin = ts[i, T_X] - back
            xmax = px + g
            for k in range(m):
                j = order[k]
                bx = B[j, B_CX]
                if bx < xmin:
                    continue
                if bx > xmax:
                    break
                dx = bx - px
                dy = B[j, B_CY] - py
                d2 = dx * dx + dy * dy
                if d2 <= g2:
                    links[nl, 0] = i
                    links[nl, 1] = j
                    lcost[nl] = d2 / g2
                    nl += 1
        I[I_NLINKS] = nl
        # the assigner's fast path: no track and no blob appears twice
        for i in range(n):
            wi[i, W_ASSIGN] = -1
            wf[i, W_CARRIED] = 0.0
        for j in range(m):
            btrack[j] = -1
        conflict = False
        for q in range(nl):
            i = links[q, 0]
            j = links[q, 1]
            if wi[i, W_ASSIGN] >= 0 or btrack[j] >= 0:
                conflict = True
                break
            wi[i, W_ASSIGN] = j
            btrack[j] = i
        if conflict and not simple_subnets(links, lcost, nl, n, m, wi, btrack):
            return 1
        if claims(ts, n, B, m, P, wi, wf) > 0:
            return 2
    # ---- updates
    W = P[P_W]
    exit_x = P[P_EXITX]
    max_gap = P[P_MAXGAP]
    alpha = P[P_ALPHA]
    max_frames = P[P_MAXFR]
    ndone = 0
    for i in range(n):
        j = wi[i, W_ASSIGN]
        wi[i, W_DONE] = 0
        wi[i, W_ROW] = -1
        tail = ts[i, T_TAIL] != 0.0
        if j >= 0:
            bx = B[j, B_CX]
            by = B[j, B_CY]
            b0 = B[j, B_X0]
            b1 = B[j, B_Y0]
            b2 = B[j, B_X1]
            b3 = B[j, B_Y1]
            barea = B[j, B_AREA]
            at_edge = b0 <= 0 or b2 >= W
            observe(ts, i, bx, by, fi,
                    ts[i, T_NLINKS] >= conf and not at_edge and not tail, fld, P, I)
            ts[i, T_BX0] = b0
            ts[i, T_BY0] = b1
            ts[i, T_BX1] = b2
            ts[i, T_BY1] = b3
            ts[i, T_INFERRED] = 0.0
            if at_edge:
                ts[i, T_AREA] = barea
            else:
                ts[i, T_AREA] += alpha * (barea - ts[i, T_AREA])
                if ts[i, T_NLINKS] >= conf and not tail:
                    P[P_CELLAREA] += 0.02 * (barea - P[P_CELLAREA])
            ts[i, T_MISSES] = 0.0
            if bx < ts[i, T_XMIN]:
                ts[i, T_XMIN] = bx
            if bx > ts[i, T_XMAX]:
                ts[i, T_XMAX] = bx
            ts[i, T_EXITED] = 1.0 if b2 >= exit_x else 0.0
            if not tail:
                wi[i, W_ROW] = record(ts, i, fi, t_ns, image, bx, by, b0, b1, b2, b3,
                                      float(int(barea)), B, j, True, P, I, crops, rec_i,
                                      rec_f, slot_rows, free)
            if b2 >= W:
                # leaving on the right: ends now if too little of it will be in view next
                nx, _ = predict(ts, i, fi + 1, fld, P)
                if _gone_right(ts, i, nx, P):
                    wi[i, W_DONE] = DONE_EXIT
                    ndone += 1
                    continue
        elif wf[i, W_CARRIED] != 0.0:
            cx = wf[i, W_CX]
            cy = wf[i, W_CY]
            move(ts, i, cx, cy, fi, P)
            ts[i, T_INFERRED] = 1.0
            ts[i, T_BX0] = wf[i, W_B0]
            ts[i, T_BY0] = wf[i, W_B0 + 1]
            ts[i, T_BX1] = wf[i, W_B0 + 2]
            ts[i, T_BY1] = wf[i, W_B0 + 3]
            ts[i, T_MISSES] = 0.0
            ts[i, T_XMAX] = max(ts[i, T_XMAX], cx)
            if wf[i, W_B0 + 2] >= exit_x:      # carried out to the exit: it has exited
                ts[i, T_EXITED] = 1.0
            if not tail:
                wi[i, W_ROW] = record(ts, i, fi, t_ns, image, cx, cy, wf[i, W_B0],
                                      wf[i, W_B0 + 1], wf[i, W_B0 + 2], wf[i, W_B0 + 3], 0.0,
                                      B, -1, True, P, I, crops, rec_i, rec_f, slot_rows, free)
        else:
            px = wf[i, W_PX]
            py = wf[i, W_PY]
            ts[i, T_MISSES] += 1.0
            half_w = 0.5 * (ts[i, T_BX1] - ts[i, T_BX0])
            if (px - half_w >= W or ts[i, T_MISSES] > max_gap
                    or ts[i, T_BX1] >= W):
                # a cell last seen (or carried) cut by the right edge and now missed has left:
                # what may still show of it is absorbed (engine.track.remnants)
                wi[i, W_DONE] = DONE_EXIT if ts[i, T_EXITED] != 0.0 else DONE_LOST
                ndone += 1
                continue
            I[I_GAP] += 1
            if not tail:
                # the box moved with the prediction (Python's round: half to even)
                dx = float(round(px - ts[i, T_X]))
                dy = float(round(py - ts[i, T_Y]))
                wi[i, W_ROW] = record(ts, i, fi, t_ns, image, px, py, ts[i, T_BX0] + dx,
                                      ts[i, T_BY0] + dy, ts[i, T_BX1] + dx, ts[i, T_BY1] + dy,
                                      0.0, B, -1, False, P, I, crops, rec_i, rec_f, slot_rows,
                                      free)
        if not tail and ts[i, T_NREC] >= max_frames:
            wi[i, W_DONE] = DONE_LONG
            ndone += 1
    I[I_NDONE] = ndone
    nfree = 0
    for j in range(m):
        if btrack[j] == -1:
            nfree += 1
    I[I_NFREE] = nfree
    return 0
