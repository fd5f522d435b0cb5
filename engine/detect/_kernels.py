"""Numba kernels of the front end: threshold to runs, union-find labelling, per-blob statistics.

Every kernel is ``@njit(cache=True, nogil=True)``, takes arrays and returns arrays (or fills
caller-owned ones) and trusts its inputs: the Python wrappers in :mod:`engine.detect.blobs`
and :mod:`engine.detect.frontend` validate shapes and dtypes.

Conventions
-----------
* A *run* is one row segment of foreground pixels, stored as ``(y, x0, x1)`` with ``x1``
  exclusive, in raster order (rows ascending, ``x0`` ascending within a row).
* Labelling uses **8-connectivity** (pixels touching by an edge or a corner are one blob),
  the same as ``scipy.ndimage.label(mask, structure=np.ones((3, 3)))``.
* Pixel centres are at integer coordinates: the centroid of the single pixel ``img[y, x]`` is
  ``(x, y)``.
* Statistics rows (``NSTAT`` columns, float64) hold raw sums so that two blobs can be merged
  exactly: see the ``S_*`` column indices below.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# Columns of a statistics row (raw sums; derived values come from finish_stats).
S_AREA, S_SX, S_SY, S_SXX, S_SYY, S_SXY, S_BRIGHT, S_X0, S_Y0, S_X1, S_Y1, S_PERIM, \
    S_STRONG, S_PARTS = range(14)
NSTAT = 14

# Columns of a finished row (finish_stats).
F_AREA, F_CX, F_CY, F_X0, F_Y0, F_X1, F_Y1, F_PERIM, F_DEFORM, F_MAJOR, F_MINOR, F_ORIENT, \
    F_BRIGHT, F_PARTS = range(14)
NFIN = 14

_SQRT2 = math.sqrt(2.0)


def _perimeter_weights() -> np.ndarray:
    """Weights of the border-pixel configurations (skimage.measure.perimeter, 4-neighbourhood).

    A border pixel's code is ``1 + 2 * (4-neighbours on the border) + 10 * (diagonal
    neighbours on the border)``; straight and corner configurations weigh 1, diagonal ones
    sqrt(2), mixed ones (1 + sqrt(2)) / 2 (Benkrid et al. 2000, as implemented in
    scikit-image ``measure._regionprops_utils.perimeter``).
    """
    w = np.zeros(50, np.float64)
    for c in (5, 7, 15, 17, 25, 27):
        w[c] = 1.0
    for c in (21, 33):
        w[c] = _SQRT2
    for c in (13, 23):
        w[c] = (1.0 + _SQRT2) / 2.0
    return w


PERIM_WEIGHTS = _perimeter_weights()


# ------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def mask_runs(mask, runs):
    """Row runs of the non-zero pixels of ``mask`` (uint8/bool, (H, W)) into ``runs`` (n, 3).

    Returns the number of runs written; stops (returns -1) when ``runs`` is full.
    """
    H, W = mask.shape
    n = 0
    cap = runs.shape[0]
    for y in range(H):
        x = 0
        while x < W:
            if mask[y, x]:
                s = x
                while x < W and mask[y, x]:
                    x += 1
                if n >= cap:
                    return -1
                runs[n, 0] = y
                runs[n, 1] = s
                runs[n, 2] = x
                n += 1
            else:
                x += 1
    return n


_ONES8 = np.uint64(0x0101010101010101)


@njit(cache=True, nogil=True, inline="always")
def _row_runs(m8, words, i, y, shift, runs, n):
    """Append the runs of the non-zero bytes of row ``i`` of ``m8`` (values 0/1, rows a
    multiple of 8 long; ``words`` is ``m8`` viewed as uint64) to ``runs[n:]`` as
    ``(y, x0 - shift, x1 - shift)``; returns the new count, -1 when ``runs`` is full.
    Words of 8 equal bytes that continue the current state are skipped, so the cost
    follows the transitions, not the row length."""
    cap = runs.shape[0]
    prev = np.uint8(0)
    s = 0
    for wi in range(words.shape[1]):
        wv = words[i, wi]
        if prev == 0:
            if wv == 0:
                continue
        elif wv == _ONES8:
            continue
        a = wi * 8
        for t in range(a, a + 8):
            f = m8[i, t]
            if f != prev:
                if f:
                    s = t
                else:
                    if n >= cap:
                        return -1
                    runs[n, 0] = y
                    runs[n, 1] = s - shift
                    runs[n, 2] = t - shift
                    n += 1
                prev = f
    if prev:
        if n >= cap:
            return -1
        runs[n, 0] = y
        runs[n, 1] = s - shift
        runs[n, 2] = m8.shape[1] - shift
        n += 1
    return n


@njit(cache=True, nogil=True)
def _row_outside_i16(img, lo, hi, off, y):
    """Whether any pixel of row ``y`` has ``img - off`` outside ``[lo, hi]`` (int16 bounds):
    the comparisons or-ed over the row, branch-free (LLVM vectorises it), one reduction per
    row. (Comparisons, not differences: ``lo - v`` overflows int16 at the -32768 of a
    switched-off polarity.)"""
    row = img[y]
    rl = lo[y]
    rh = hi[y]
    m = False
    for x in range(row.shape[0]):
        v = np.int16(np.int16(row[x]) - off)
        m |= (v < rl[x]) | (v > rh[x])
    return m


@njit(cache=True, nogil=True)
def threshold_runs(img, lo, hi, off, runs, rowbuf):
    """Runs of the pixels with ``img - off < lo`` or ``img - off > hi`` over the whole frame.

    ``lo``/``hi`` are int16 (H, W) per-pixel bounds (the background with the threshold folded
    in), ``off`` an integer illumination offset of this frame [grey levels]. Most rows of a
    frame hold no cell, so each row is first tested as a whole (:func:`_row_outside_i16`,
    one vectorised reduction); a row with something outside gets a branch-free 0/1 mask in
    ``rowbuf`` (uint8 scratch of at least ``(W + 7) // 8 * 8`` bytes) whose runs are read by
    skipping 8-byte words without a transition (:func:`_row_runs`).

    Returns the number of runs, or -1 when ``runs`` overflowed.
    """
    H, W = img.shape
    n = 0
    L = (W + 7) // 8 * 8
    m8 = rowbuf[:L].reshape(1, L)
    for x in range(W, L):
        m8[0, x] = 0
    words = m8.view(np.uint64)
    mrow = m8[0, :W]
    # (no row views before the test: each view costs an atomic reference-count pair, and
    # for 150 rows that was a third of the pass)
    for y in range(H):
        if not _row_outside_i16(img, lo, hi, off, y):
            continue
        row = img[y]
        rlo = lo[y]
        rhi = hi[y]
        for x in range(W):
            v = np.int16(np.int16(row[x]) - off)
            mrow[x] = np.uint8((v < rlo[x]) | (v > rhi[x]))
        n = _row_runs(m8, words, 0, y, 0, runs, n)
        if n < 0:
            return -1
    return n


# ------------------------------------------------------------------------------------------
# Union-find on runs
# ------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _find(parent, i):
    r = i
    while parent[r] != r:
        r = parent[r]
    while parent[i] != r:   # path compression
        nxt = parent[i]
        parent[i] = r
        i = nxt
    return r


@njit(cache=True, nogil=True)
def label_runs(runs, n, conn8, run_label):
    """Connected components of ``n`` raster-ordered runs; fills ``run_label`` (0-based).

    Two runs on adjacent rows are connected when they overlap (4-connectivity) or overlap
    or touch diagonally (8-connectivity, ``conn8=True``). The union keeps the smaller run
    index as root, so labels come out in raster order of each blob's first pixel (the
    order of ``scipy.ndimage.label``). Returns the number of labels.
    """
    parent = np.arange(n)
    d = 1 if conn8 else 0
    prev_s = 0
    prev_e = 0
    i = 0
    while i < n:
        y = runs[i, 0]
        j = i
        while j < n and runs[j, 0] == y:
            j += 1
        if prev_e > prev_s and runs[prev_s, 0] == y - 1:
            p = prev_s
            for c in range(i, j):
                cx0 = runs[c, 1]
                cx1 = runs[c, 2]
                while p < prev_e and runs[p, 2] + d <= cx0:
                    p += 1
                q = p
                while q < prev_e and runs[q, 1] < cx1 + d:
                    ra = _find(parent, c)
                    rb = _find(parent, q)
                    if ra < rb:
                        parent[rb] = ra
                    elif rb < ra:
                        parent[ra] = rb
                    q += 1
        prev_s = i
        prev_e = j
        i = j
    k = 0
    for r in range(n):
        root = _find(parent, r)
        if root == r:
            run_label[r] = k
            k += 1
        else:
            run_label[r] = run_label[root]
    return k


@njit(cache=True, nogil=True)
def paint_labels(runs, n, run_label, out, y0, x0):
    """Write ``run_label + 1`` of each run into ``out`` (int32), shifted by (y0, x0)."""
    for r in range(n):
        y = runs[r, 0] - y0
        lab = run_label[r] + 1
        for x in range(runs[r, 1] - x0, runs[r, 2] - x0):
            out[y, x] = lab


# ------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _s2(m):
    """Sum of x^2 for x = 0..m (m >= -1)."""
    return m * (m + 1.0) * (2.0 * m + 1.0) / 6.0


@njit(cache=True, nogil=True)
def accumulate_runs(runs, n, run_label, k, img, use_img, stats, row0):
    """Add area, first and second moments, box and brightness of each run to its label.

    ``stats[row0 + label]`` rows are initialised here. ``img`` gives the brightness when
    ``use_img`` (otherwise brightness stays 0).
    """
    for lab in range(k):
        s = stats[row0 + lab]
        for c in range(NSTAT):
            s[c] = 0.0
        s[S_X0] = 1e18
        s[S_Y0] = 1e18
        s[S_X1] = -1e18
        s[S_Y1] = -1e18
        s[S_PARTS] = 1.0
    for r in range(n):
        s = stats[row0 + run_label[r]]
        y = float(runs[r, 0])
        a = runs[r, 1]
        b = runs[r, 2]
        ln = float(b - a)
        sx = (a + b - 1.0) * ln / 2.0
        s[S_AREA] += ln
        s[S_SX] += sx
        s[S_SY] += y * ln
        s[S_SXX] += _s2(b - 1.0) - _s2(a - 1.0)
        s[S_SYY] += y * y * ln
        s[S_SXY] += y * sx
        if a < s[S_X0]:
            s[S_X0] = a
        if b > s[S_X1]:
            s[S_X1] = b
        if y < s[S_Y0]:
            s[S_Y0] = y
        if y + 1 > s[S_Y1]:
            s[S_Y1] = y + 1
        if use_img:
            acc = 0
            row = img[runs[r, 0]]
            for x in range(a, b):
                acc += row[x]
            s[S_BRIGHT] += acc


@njit(cache=True, nogil=True)
def _accumulate_kept(runs, n, run_label, outrow, strong, stats):
    """:func:`accumulate_runs` (without brightness) for the labels with ``outrow[L] >= 0``,
    into row ``outrow[L]``; their seed-pixel counts ``strong`` go to ``S_STRONG``."""
    for lab in range(outrow.shape[0]):
        o = outrow[lab]
        if o < 0:
            continue
        for c in range(NSTAT):
            stats[o, c] = 0.0
        stats[o, S_X0] = 1e18
        stats[o, S_Y0] = 1e18
        stats[o, S_X1] = -1e18
        stats[o, S_Y1] = -1e18
        stats[o, S_PARTS] = 1.0
        stats[o, S_STRONG] = strong[lab]
    for r in range(n):
        o = outrow[run_label[r]]
        if o < 0:
            continue
        y = float(runs[r, 0])
        a = runs[r, 1]
        b = runs[r, 2]
        ln = float(b - a)
        sx = (a + b - 1.0) * ln / 2.0
        stats[o, S_AREA] += ln
        stats[o, S_SX] += sx
        stats[o, S_SY] += y * ln
        stats[o, S_SXX] += _s2(b - 1.0) - _s2(a - 1.0)
        stats[o, S_SYY] += y * y * ln
        stats[o, S_SXY] += y * sx
        if a < stats[o, S_X0]:
            stats[o, S_X0] = a
        if b > stats[o, S_X1]:
            stats[o, S_X1] = b
        if y < stats[o, S_Y0]:
            stats[o, S_Y0] = y
        if y + 1 > stats[o, S_Y1]:
            stats[o, S_Y1] = y + 1


@njit(cache=True, nogil=True)
def perimeter_from_labels(lab, stats, row0, weights):
    """Add the border-configuration perimeter of every label in ``lab`` to ``stats``.

    ``lab`` is an int32 label image (0 = background, label L -> ``stats[row0 + L - 1]``);
    pixels outside ``lab`` count as background. The estimator is scikit-image's
    ``measure.perimeter`` with the 4-neighbourhood, applied to each label on its own.
    """
    H, W = lab.shape
    border = np.zeros((H, W), np.uint8)
    for y in range(H):
        row = lab[y]
        brow = border[y]
        for x in range(W):
            L = row[x]
            if L == 0:
                continue
            if (y == 0 or lab[y - 1, x] != L or y == H - 1 or lab[y + 1, x] != L
                    or x == 0 or row[x - 1] != L or x == W - 1 or row[x + 1] != L):
                brow[x] = 1
    for y in range(H):
        brow = border[y]
        for x in range(W):
            if brow[x] == 0:
                continue
            L = lab[y, x]
            code = 1
            for dy in range(-1, 2):
                yy = y + dy
                if yy < 0 or yy >= H:
                    continue
                for dx in range(-1, 2):
                    if dx == 0 and dy == 0:
                        continue
                    xx = x + dx
                    if xx < 0 or xx >= W:
                        continue
                    if border[yy, xx] and lab[yy, xx] == L:
                        code += 2 if (dx == 0 or dy == 0) else 10
            if code < weights.shape[0]:
                stats[row0 + L - 1, S_PERIM] += weights[code]


@njit(cache=True, nogil=True)
def finish_stats(stats, n, out):
    """Derived values of ``n`` statistics rows into ``out`` (n, NFIN).

    Centroid [px], half-open box, perimeter [px], deformation ``1 - 2 sqrt(pi A) / P``,
    full axes of the inertia ellipse [px] (4 sqrt of the eigenvalues of the central second
    moments per pixel), orientation [rad] of the major axis from +x (y down), mean brightness.
    """
    for i in range(n):
        s = stats[i]
        a = s[S_AREA]
        cx, cy, mxx, myy, mxy, l1, l2 = _moments(s)
        o = out[i]
        o[F_AREA] = a
        o[F_CX] = cx
        o[F_CY] = cy
        o[F_X0] = s[S_X0]
        o[F_Y0] = s[S_Y0]
        o[F_X1] = s[S_X1]
        o[F_Y1] = s[S_Y1]
        p = s[S_PERIM]
        o[F_PERIM] = p
        o[F_DEFORM] = 1.0 - 2.0 * math.sqrt(math.pi * a) / p if p > 0 else 0.0
        o[F_MAJOR] = 4.0 * math.sqrt(l1)
        o[F_MINOR] = 4.0 * math.sqrt(l2)
        o[F_ORIENT] = 0.5 * math.atan2(2.0 * mxy, mxx - myy)
        o[F_BRIGHT] = s[S_BRIGHT] / a
        o[F_PARTS] = s[S_PARTS]


@njit(cache=True, nogil=True)
def _moments(s):
    """Centroid, central second moments per pixel (+1/12 for the pixel's own extent) and
    their eigenvalues (l1 >= l2 >= 0) of a statistics row."""
    a = s[S_AREA]
    cx = s[S_SX] / a
    cy = s[S_SY] / a
    mxx = s[S_SXX] / a - cx * cx + 1.0 / 12.0
    myy = s[S_SYY] / a - cy * cy + 1.0 / 12.0
    mxy = s[S_SXY] / a - cx * cy
    tr = 0.5 * (mxx + myy)
    det = math.sqrt(max(0.25 * (mxx - myy) ** 2 + mxy * mxy, 0.0))
    return cx, cy, mxx, myy, mxy, tr + det, max(tr - det, 0.0)


@njit(cache=True, nogil=True)
def _ratio(s):
    """Inertia ratio minor/major (0..1) of a statistics row."""
    _, _, _, _, _, l1, l2 = _moments(s)
    if l1 <= 0:
        return 1.0
    return math.sqrt(l2 / l1)


@njit(cache=True, nogil=True)
def _deform(s):
    p = s[S_PERIM]
    if p <= 0:
        return 0.0
    return 1.0 - 2.0 * math.sqrt(math.pi * s[S_AREA]) / p


@njit(cache=True, nogil=True)
def rejoin(stats, n, max_gap, min_deform, min_area, max_area, alive):
    """Merge parts of one cell that the threshold split (report §3.6.1); returns merges made.

    Two blobs are merged when (i) their boxes are at most ``max_gap`` px apart (overlapping
    boxes have gap 0), (ii) at least one of them looks like a part -- low circularity
    (deformation >= ``min_deform``) or smaller than ``min_area`` -- and (iii) the union is
    more compact than either part: its inertia ratio (minor/major axis) is larger than both
    parts' and its area is at most ``max_area``. Two whole neighbouring cells fail (ii) or (iii)
    (their union is elongated), so they stay apart. The pair with the most compact union is
    merged first, then the search repeats. Merged rows add their sums (the perimeter is the
    sum of the parts' perimeters); ``alive[i]`` is cleared for rows merged away.
    """
    merged = 0
    tmp = np.empty(NSTAT, np.float64)
    while True:
        best = -1.0
        bi = -1
        bj = -1
        for i in range(n):
            if not alive[i]:
                continue
            si = stats[i]
            for j in range(i + 1, n):
                if not alive[j]:
                    continue
                sj = stats[j]
                gap = max(0.0, sj[S_X0] - si[S_X1], si[S_X0] - sj[S_X1],
                          sj[S_Y0] - si[S_Y1], si[S_Y0] - sj[S_Y1])
                if gap > max_gap:
                    continue
                if si[S_AREA] + sj[S_AREA] > max_area:
                    continue
                parti = _deform(si) >= min_deform or si[S_AREA] < min_area
                partj = _deform(sj) >= min_deform or sj[S_AREA] < min_area
                if not (parti or partj):
                    continue
                for c in range(NSTAT):
                    tmp[c] = si[c] + sj[c]
                tmp[S_X0] = min(si[S_X0], sj[S_X0])
                tmp[S_Y0] = min(si[S_Y0], sj[S_Y0])
                tmp[S_X1] = max(si[S_X1], sj[S_X1])
                tmp[S_Y1] = max(si[S_Y1], sj[S_Y1])
                ru = _ratio(tmp)
                if ru <= _ratio(si) or ru <= _ratio(sj):
                    continue
                if ru > best:
                    best = ru
                    bi = i
                    bj = j
        if bi < 0:
            return merged
        si = stats[bi]
        sj = stats[bj]
        x0 = min(si[S_X0], sj[S_X0])
        y0 = min(si[S_Y0], sj[S_Y0])
        x1 = max(si[S_X1], sj[S_X1])
        y1 = max(si[S_Y1], sj[S_Y1])
        for c in range(NSTAT):
            si[c] += sj[c]
        si[S_X0] = x0
        si[S_Y0] = y0
        si[S_X1] = x1
        si[S_Y1] = y1
        alive[bj] = False
        merged += 1


# ------------------------------------------------------------------------------------------
# The whole frame
# ------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def fill_holes(mask, stack):
    """Set the background pixels of ``mask`` that the border cannot reach (4-connected) to 1.

    A flood fill from every background pixel on the border marks the outside; what is
    left is a hole in some blob (the cell centre that is as bright as the background).
    ``stack`` is int64 scratch of at least ``mask.size`` entries.
    """
    H, W = mask.shape
    # 0 = background (unvisited), 1 = foreground, 2 = outside
    top = 0
    for y in range(H):
        for x in (0, W - 1):
            if mask[y, x] == 0:
                mask[y, x] = 2
                stack[top] = y * W + x
                top += 1
    for x in range(W):
        for y in (0, H - 1):
            if mask[y, x] == 0:
                mask[y, x] = 2
                stack[top] = y * W + x
                top += 1
    while top > 0:
        top -= 1
        k = stack[top]
        y = k // W
        x = k - y * W
        if y > 0 and mask[y - 1, x] == 0:
            mask[y - 1, x] = 2
            stack[top] = k - W
            top += 1
        if y < H - 1 and mask[y + 1, x] == 0:
            mask[y + 1, x] = 2
            stack[top] = k + W
            top += 1
        if x > 0 and mask[y, x - 1] == 0:
            mask[y, x - 1] = 2
            stack[top] = k - 1
            top += 1
        if x < W - 1 and mask[y, x + 1] == 0:
            mask[y, x + 1] = 2
            stack[top] = k + 1
            top += 1
    for y in range(H):
        for x in range(W):
            mask[y, x] = 1 if mask[y, x] != 2 else 0


@njit(cache=True, nogil=True)
def runs_by_value(lab, runs, run_label, y0, x0):
    """Runs of equal non-zero values of a label image (run_label = value - 1), offset by
    (y0, x0); returns the count, -1 when ``runs`` is full."""
    H, W = lab.shape
    n = 0
    cap = runs.shape[0]
    for y in range(H):
        row = lab[y]
        x = 0
        while x < W:
            v = row[x]
            if v > 0:
                s = x
                x += 1
                while x < W and row[x] == v:
                    x += 1
                if n >= cap:
                    return -1
                runs[n, 0] = y + y0
                runs[n, 1] = s + x0
                runs[n, 2] = x + x0
                run_label[n] = v - 1
                n += 1
            else:
                x += 1
    return n


@njit(cache=True, nogil=True, inline="always")
def _profile_neck(prof, a0, a1, best):
    """The deepest neck of one extent profile ``prof[a0..a1]`` in its middle half, relative
    to the smaller of the maxima on either side: ``(ratio, cut)`` when below ``best``, else
    ``(best, -1)``."""
    span = a1 - a0 + 1
    cut = -1
    if span < 8:
        return best, cut
    lo_c = a0 + span // 4
    hi_c = a1 - span // 4
    # running maxima from the left and from the right: O(span)
    lmax = np.zeros(span + 1, np.int64)
    rmax = np.zeros(span + 1, np.int64)
    for t in range(a0, a1 + 1):
        lmax[t - a0 + 1] = max(lmax[t - a0], prof[t])
    for t in range(a1, a0 - 1, -1):
        rmax[t - a0] = max(rmax[t - a0 + 1], prof[t])
    for c in range(lo_c, hi_c + 1):
        left = lmax[c - a0]          # max over a0 .. c-1
        right = rmax[c - a0 + 1]     # max over c+1 .. a1
        m = min(left, right)
        if m <= 0:
            continue
        r = prof[c] / m
        if r < best:
            best = r
            cut = c
    return best, cut


@njit(cache=True, nogil=True, inline="always")
def _occupied(prof):
    """First and last index with a non-zero extent (``(0, -1)`` when none)."""
    a0 = 0
    while a0 < prof.shape[0] and prof[a0] == 0:
        a0 += 1
    a1 = prof.shape[0] - 1
    while a1 >= a0 and prof[a1] == 0:
        a1 -= 1
    return a0, a1


@njit(cache=True, nogil=True)
def _deepest_neck(ext_x, ext_y, ext_u, ext_v, bx0, bx1, by0, by1, ratio):
    """The deepest neck of a blob from its extent profiles (see :func:`split_neck`):
    ``(axis, cut)`` with the cut an index of that axis' profile; axis -1 when no neck is
    narrower than ``ratio``. Axes: 0 x, 1 y (the deeper of the two; a tie goes to x), and
    only when neither has a neck, 2 the diagonal x + y and 3 the diagonal x - y."""
    best = ratio
    axis = -1
    cut = 0
    for ax in range(4):
        if ax == 2 and axis >= 0:
            break                       # the diagonals only where x and y find no neck
        if ax == 0:
            r, c = _profile_neck(ext_x, bx0, bx1, best)
        elif ax == 1:
            r, c = _profile_neck(ext_y, by0, by1, best)
        else:
            prof = ext_u if ax == 2 else ext_v
            a0, a1 = _occupied(prof)
            r, c = _profile_neck(prof, a0, a1, best)
        if c >= 0:
            best = r
            axis = ax
            cut = c
    return axis, cut


@njit(cache=True, nogil=True, inline="always")
def _diag_add(first, last, x, y, h):
    """Pixel (x, y) on its two diagonal lines, u = x + y and v = x - y + h - 1 (``first``
    and ``last``: (2, W + h - 1) of the first and last column on each line)."""
    u = x + y
    v = x - y + h - 1
    first[0, u] = min(first[0, u], x)
    last[0, u] = max(last[0, u], x)
    first[1, v] = min(first[1, v], x)
    last[1, v] = max(last[1, v], x)


@njit(cache=True, nogil=True, inline="always")
def _diag_extents(first, last):
    """Extent profiles (last - first + 1, 0 where empty) of the two diagonal directions."""
    ext = np.zeros(first.shape, np.int64)
    for k in range(2):
        for t in range(first.shape[1]):
            if last[k, t] >= 0:
                ext[k, t] = last[k, t] - first[k, t] + 1
    return ext


@njit(cache=True, nogil=True)
def neck_runs(runs, nrr, run_label, L, bx0, by0, bw, bh, ratio, where):
    """:func:`split_neck` from the runs of label ``L`` (0-based) whose box starts at
    (``bx0``, ``by0``) and is ``bw`` x ``bh`` px, without a label image.

    The extent profiles (per column: last - first row + 1; per row: last - first column + 1;
    per diagonal line: last - first column + 1) are taken from the runs, so the neck found is
    the one :func:`split_neck` finds on the painted label image. Returns True when there is
    one; ``where`` then holds the axis and the cut in absolute coordinates: the pixels
    beyond it are those with ``x >= cut`` (axis 0), ``y >= cut`` (1), ``x + y >= cut`` (2)
    or ``x - y >= cut`` (3). Nothing is relabelled.
    """
    ext_x = np.zeros(bw, np.int64)
    ext_y = np.zeros(bh, np.int64)
    first_y = np.full(bw, bh, np.int64)
    last_y = np.full(bw, -1, np.int64)
    first_x = np.full(bh, bw, np.int64)
    last_x = np.full(bh, -1, np.int64)
    for r in range(nrr):
        if run_label[r] != L:
            continue
        yy = runs[r, 0] - by0
        a = runs[r, 1] - bx0
        b = runs[r, 2] - bx0
        if a < first_x[yy]:
            first_x[yy] = a
        if b - 1 > last_x[yy]:
            last_x[yy] = b - 1
        for xx in range(a, b):
            if yy < first_y[xx]:
                first_y[xx] = yy
            if yy > last_y[xx]:
                last_y[xx] = yy
    for xx in range(bw):
        ext_x[xx] = last_y[xx] - first_y[xx] + 1 if last_y[xx] >= 0 else 0
    for yy in range(bh):
        ext_y[yy] = last_x[yy] - first_x[yy] + 1 if last_x[yy] >= 0 else 0
    none = np.zeros(0, np.int64)
    axis, cut = _deepest_neck(ext_x, ext_y, none, none, 0, bw - 1, 0, bh - 1, ratio)
    if axis < 0:
        # the diagonals only now (a second pass): most cut blobs have a neck across x or y
        first_d = np.full((2, bw + bh - 1), bw, np.int64)
        last_d = np.full((2, bw + bh - 1), -1, np.int64)
        for r in range(nrr):
            if run_label[r] == L:
                for xx in range(runs[r, 1] - bx0, runs[r, 2] - bx0):
                    _diag_add(first_d, last_d, xx, runs[r, 0] - by0, bh)
        ext_d = _diag_extents(first_d, last_d)
        axis, cut = _deepest_neck(ext_x, ext_y, ext_d[0], ext_d[1], 0, bw - 1, 0, bh - 1,
                                  ratio)
    if axis < 0:
        return False
    where[0] = axis
    if axis == 0:
        where[1] = cut + bx0
    elif axis == 1:
        where[1] = cut + by0
    elif axis == 2:
        where[1] = cut + bx0 + by0
    else:
        where[1] = cut - (bh - 1) + bx0 - by0
    return True


@njit(cache=True, nogil=True)
def split_neck(lab, L, new, ratio, where):
    """Cut label ``L`` of ``lab`` in two at its narrowest neck; the far part becomes ``new``.

    Along x and along y, the blob's extent across each line (last - first pixel + 1, which
    ignores holes) is a profile; the deepest minimum in the middle half of the blob,
    relative to the smaller of the two maxima on either side, is the neck. When it is below
    ``ratio`` the pixels beyond it are relabelled (touching cells in a row or a column).
    When neither has one, the same is done along the two diagonals: cells that touch corner
    to corner have no neck across x or y (where they meet, the blob is as tall and as wide
    as either cell). (Letting a diagonal neck compete with x and y on depth, rather than
    only stand in for them, lost cells on 5 of 19 robustness looks.) Returns True when
    the blob was cut; ``where`` (int64, 2) then holds the axis and ``cut``: the pixels with
    ``x >= cut`` (axis 0), ``y >= cut`` (1), ``x + y >= cut`` (2) or ``x - y >= cut`` (3)
    became ``new``.
    """
    H, W = lab.shape
    ext_x = np.zeros(W, np.int64)
    ext_y = np.zeros(H, np.int64)
    first_y = np.full(W, H, np.int64)
    last_y = np.full(W, -1, np.int64)
    first_x = np.full(H, W, np.int64)
    last_x = np.full(H, -1, np.int64)
    first_d = np.full((2, W + H - 1), W, np.int64)
    last_d = np.full((2, W + H - 1), -1, np.int64)
    bx0, bx1, by0, by1 = W, -1, H, -1
    for y in range(H):
        row = lab[y]
        fx = W
        lx = -1
        for x in range(W):
            if row[x] == L:
                if y < first_y[x]:
                    first_y[x] = y
                last_y[x] = y
                if fx == W:
                    fx = x
                lx = x
                _diag_add(first_d, last_d, x, y, H)
        if lx >= 0:
            first_x[y] = fx
            last_x[y] = lx
            bx0 = min(bx0, fx)
            bx1 = max(bx1, lx)
            by0 = min(by0, y)
            by1 = y
    for x in range(W):
        ext_x[x] = last_y[x] - first_y[x] + 1 if last_y[x] >= 0 else 0
    for y in range(H):
        ext_y[y] = last_x[y] - first_x[y] + 1 if last_x[y] >= 0 else 0
    ext_d = _diag_extents(first_d, last_d)
    axis, cut = _deepest_neck(ext_x, ext_y, ext_d[0], ext_d[1], bx0, bx1, by0, by1, ratio)
    if axis < 0:
        return False
    if axis == 3:
        cut -= H - 1                           # x - y >= cut
    where[0] = axis
    where[1] = cut
    for y in range(H):
        row = lab[y]
        for x in range(W):
            if row[x] == L:
                t = x if axis == 0 else (y if axis == 1 else (x + y if axis == 2 else x - y))
                if t >= cut:
                    row[x] = new
    return True


@njit(cache=True, nogil=True)
def illumination_offset(img, bgi, step_y, step_x, hist):
    """Median of ``img - bgi`` over a regular grid (every ``step_y``-th row, ``step_x``-th
    column) [grey levels, int].

    ``bgi`` is the rounded background (int16). A 511-bin histogram gives the median without
    sorting; cells cover a minority of the samples, so they do not move it.
    """
    for i in range(511):
        hist[i] = 0
    H, W = img.shape
    m = 0
    for y in range(step_y // 2, H, step_y):
        for x in range(step_x // 2, W, step_x):
            hist[np.int32(img[y, x]) - np.int32(bgi[y, x]) + 255] += 1
            m += 1
    half = (m + 1) // 2
    acc = 0
    for i in range(511):
        acc += hist[i]
        if acc >= half:
            return i - 255
    return 0


@njit(cache=True, nogil=True, inline="always")
def _hist_median(hist, n):
    """Median of ``n`` integer samples from their 256-bin histogram, interpolated inside the
    median's bin (samples spread evenly over [v - 0.5, v + 0.5))."""
    half = 0.5 * n
    acc = 0
    for v in range(256):
        c = hist[v]
        if acc + c >= half and c > 0:
            return v - 0.5 + (half - acc) / c
        acc += c
    return 255.0


@njit(cache=True, nogil=True)
def gain_fit(img, bgi, step_y, step_x, boxes, margin, split, hist, out):
    """The two points of frame = gain x background + offset (``FrontEnd._follow_gain``): over
    the illumination grid, outside ``boxes`` (n, 4: x0, y0, x1, y1, grown by ``margin``), the
    medians of background and frame among the samples whose rounded background ``bgi`` is at
    most ``split`` (dark) and above it (bright). ``hist`` is (4, 256) scratch; ``out``
    receives (bg dark, bg bright, frame dark, frame bright, n dark, n bright)."""
    for k in range(4):
        for v in range(256):
            hist[k, v] = 0
    H, W = img.shape
    nb = boxes.shape[0]
    n_lo = 0
    n_hi = 0
    for y in range(step_y // 2, H, step_y):
        for x in range(step_x // 2, W, step_x):
            inside = False
            for i in range(nb):
                if (boxes[i, 0] - margin <= x < boxes[i, 2] + margin
                        and boxes[i, 1] - margin <= y < boxes[i, 3] + margin):
                    inside = True
                    break
            if inside:
                continue
            b = min(max(np.int32(bgi[y, x]), 0), 255)
            if b <= split:
                hist[0, b] += 1
                hist[2, img[y, x]] += 1
                n_lo += 1
            else:
                hist[1, b] += 1
                hist[3, img[y, x]] += 1
                n_hi += 1
    out[4] = n_lo
    out[5] = n_hi
    if n_lo == 0 or n_hi == 0:
        return
    out[0] = _hist_median(hist[0], n_lo)
    out[1] = _hist_median(hist[1], n_hi)
    out[2] = _hist_median(hist[2], n_lo)
    out[3] = _hist_median(hist[3], n_hi)


GROW_ROUNDS = 8     # regions grow by the margin at most this often (8 x 6 px: a cell across)


@njit(cache=True, nogil=True)
def _grow_region(roi, alive, nr, q, runs, nrr, run_label, outrow, margin, W, H):
    """Grow region ``q`` by ``margin`` on each side (not at the image edge) that a kept
    component (``outrow[label] >= 0``) touches, taking in the regions not yet measured that
    it then overlaps. Returns whether it grew."""
    x0 = roi[q, 0]
    y0 = roi[q, 1]
    x1 = roi[q, 2]
    y1 = roi[q, 3]
    left = right = top = bottom = False
    for r in range(nrr):
        if outrow[run_label[r]] < 0:
            continue
        left |= runs[r, 1] == x0 and x0 > 0
        right |= runs[r, 2] == x1 and x1 < W
        top |= runs[r, 0] == y0 and y0 > 0
        bottom |= runs[r, 0] == y1 - 1 and y1 < H
    if not (left or right or top or bottom):
        return False
    if left:
        roi[q, 0] = max(x0 - margin, 0)
    if right:
        roi[q, 2] = min(x1 + margin, W)
    if top:
        roi[q, 1] = max(y0 - margin, 0)
    if bottom:
        roi[q, 3] = min(y1 + margin, H)
    changed = True
    while changed:
        changed = False
        for j in range(q + 1, nr):
            changed |= _absorb(roi, alive, q, j)
    return True


@njit(cache=True, nogil=True, inline="always")
def _absorb(roi, alive, i, j):
    """Region ``i`` takes in region ``j`` (its box becomes the union) when their boxes
    overlap; returns whether it did."""
    if not (alive[j] and roi[i, 0] < roi[j, 2] and roi[j, 0] < roi[i, 2]
            and roi[i, 1] < roi[j, 3] and roi[j, 1] < roi[i, 3]):
        return False
    roi[i, 0] = min(roi[i, 0], roi[j, 0])
    roi[i, 1] = min(roi[i, 1], roi[j, 1])
    roi[i, 2] = max(roi[i, 2], roi[j, 2])
    roi[i, 3] = max(roi[i, 3], roi[j, 3])
    alive[j] = False
    return True


@njit(cache=True, nogil=True)
def _merge_regions(roi, alive, nr):
    """Merge overlapping regions (boxes) into their union, until none overlap."""
    changed = True
    while changed:
        changed = False
        for i in range(nr):
            if alive[i]:
                for j in range(i + 1, nr):
                    changed |= _absorb(roi, alive, i, j)


@njit(cache=True, nogil=True)
def detect_frame(img, lo, hi, lo_w, hi_w, bg_s, kern, thr_dark, thr_bright, off, margin,
                 min_seed, conn8, runs, run_label, rowbuf, stats, weights, holes, split_area,
                 neck_ratio):
    """Find the blobs of one frame: seeds, regions of interest, smoothed threshold, labels.

    1. *Seeds*: runs of pixels far from the background (``img - off`` outside
       ``[lo, hi]``, a high threshold), labelled; seed blobs with fewer than ``min_seed``
       pixels are noise.
    2. *Regions*: each seed blob's box grown by ``margin`` px; overlapping regions merged.
       A region in which a kept component (step 3) touches the border grows by ``margin``
       on that side and is done again, up to ``GROW_ROUNDS`` times (:func:`_grow_region`):
       a component is followed wherever it goes, not cut at a fixed distance from its seeds
       (a faint ring-like cell seeded on one side only was cut into arcs). Regions already
       measured keep their pixels; those not yet measured that it reaches are taken in.
    3. In each region, the frame is smoothed with the separable integer kernel ``kern``
       (binomial, sum ``K``), compared with the equally smoothed background ``bg_s``
       (int64, scaled by ``K*K``): with ``d = smooth(img) - off*K*K - bg_s``, foreground
       where ``d < -thr_dark`` or ``d > thr_bright`` (the low threshold scaled by ``K*K``;
       a huge value switches a polarity off). Without smoothing (``len(kern) == 1``) the
       low threshold is folded into the int16 bounds ``lo_w``/``hi_w`` instead. Components
       are labelled and kept when they contain at least ``min_seed`` seed pixels
       (hysteresis, the seed blobs' own minimum: a patch of background error that a grown
       region reaches needs more than a stray noise pixel to count); only
       the kept ones are measured (moments on the raw pixel grid, brightness from ``img``,
       perimeter). With ``holes``, holes in the mask (background pixels enclosed by
       foreground) are filled first, as dclab's masks are. Components larger than
       ``split_area`` px (> 0) are cut at a narrow neck (:func:`neck_runs`, the neck
       :func:`split_neck` finds): two touching cells.

    Everything is computed from runs, without a label image: the runs of the region's mask
    by a scan that skips 8-byte words without a transition (:func:`_row_runs`), the neck
    from the runs' extent profiles, the perimeter (the estimator of
    :func:`perimeter_from_labels`) from a branch-free border map of the region's padded
    mask, summed along each run (8-neighbours in the mask belong to the same component);
    only a region in which a neck was cut gets a label image, and its border map then
    compares labels.

    Returns the number of rows written to ``stats`` (raw sums, see ``S_*``); -1 when a
    buffer overflowed (the caller grows them and calls again).
    """
    H, W = img.shape
    # ---- 1. seeds
    ns = threshold_runs(img, lo, hi, off, runs, rowbuf)
    if ns < 0:
        return -1
    if ns == 0:
        return 0
    k = label_runs(runs, ns, conn8, run_label)
    # seed boxes and counts
    sb = np.empty((k, 5), np.int64)   # x0, y0, x1, y1, count
    for i in range(k):
        sb[i, 0] = W
        sb[i, 1] = H
        sb[i, 2] = 0
        sb[i, 3] = 0
        sb[i, 4] = 0
    for r in range(ns):
        lab = run_label[r]
        y = runs[r, 0]
        if runs[r, 1] < sb[lab, 0]:
            sb[lab, 0] = runs[r, 1]
        if runs[r, 2] > sb[lab, 2]:
            sb[lab, 2] = runs[r, 2]
        if y < sb[lab, 1]:
            sb[lab, 1] = y
        if y + 1 > sb[lab, 3]:
            sb[lab, 3] = y + 1
        sb[lab, 4] += runs[r, 2] - runs[r, 1]
    # ---- 2. regions
    roi = np.empty((k, 4), np.int64)
    nr = 0
    for i in range(k):
        if sb[i, 4] < min_seed:
            continue
        roi[nr, 0] = max(sb[i, 0] - margin, 0)
        roi[nr, 1] = max(sb[i, 1] - margin, 0)
        roi[nr, 2] = min(sb[i, 2] + margin, W)
        roi[nr, 3] = min(sb[i, 3] + margin, H)
        nr += 1
    alive = np.ones(nr, np.bool_)
    _merge_regions(roi, alive, nr)
    nk = kern.shape[0]
    rad = nk // 2
    ksum = 0
    for t in range(nk):
        ksum += kern[t]
    offs = np.int64(off) * ksum * ksum
    # ---- 3. low threshold inside each region
    nout = 0
    cap = stats.shape[0]
    q = -1
    rounds = 0
    while True:
        if rounds == 0:                       # the next region (rounds > 0: q again, grown)
            q += 1
            while q < nr and not alive[q]:
                q += 1
            if q >= nr:
                break
        x0 = roi[q, 0]
        y0 = roi[q, 1]
        x1 = roi[q, 2]
        y1 = roi[q, 3]
        h = y1 - y0
        w = x1 - x0
        # the region's mask with a one-pixel frame of zeros (outside the region = background)
        # (rows padded to whole 8-byte words for the run scan)
        mp = np.zeros((h + 2, (w + 2 + 7) // 8 * 8), np.uint8)
        if nk == 1:
            # no smoothing: the low threshold is folded into lo_w/hi_w like the seeds';
            # branch-free, so LLVM vectorises the row
            # (rows are sliced first: indices from 0 let Numba drop its wraparound checks)
            for yy in range(h):
                row = img[y0 + yy, x0:x1]
                rl = lo_w[y0 + yy, x0:x1]
                rh = hi_w[y0 + yy, x0:x1]
                mrow = mp[yy + 1, 1:w + 1]
                for xx in range(w):
                    v = np.int16(np.int16(row[xx]) - off)
                    mrow[xx] = np.uint8((v < rl[xx]) | (v > rh[xx]))
        else:
            # horizontal pass over the rows the vertical pass needs (clamped at the image edge)
            hs = np.zeros((h + 2 * rad, w), np.int32)
            prow = np.empty(w + 2 * rad, np.int32)
            for yy in range(h + 2 * rad):
                ys = min(max(y0 + yy - rad, 0), H - 1)
                row = img[ys]
                for xx in range(w + 2 * rad):
                    prow[xx] = row[min(max(x0 + xx - rad, 0), W - 1)]
                hrow = hs[yy]
                for t in range(nk):
                    kt = np.int32(kern[t])
                    for xx in range(w):
                        hrow[xx] += kt * prow[xx + t]
            vacc = np.empty(w, np.int64)
            for yy in range(h):
                for xx in range(w):
                    vacc[xx] = -offs
                for t in range(nk):
                    kt = np.int64(kern[t])
                    hrow = hs[yy + t]
                    for xx in range(w):
                        vacc[xx] += kt * hrow[xx]
                brow = bg_s[y0 + yy]
                mrow = mp[yy + 1]
                for xx in range(w):
                    dv = vacc[xx] - brow[x0 + xx]
                    mrow[xx + 1] = np.uint8((dv > thr_bright) | (dv < -thr_dark))
        if rounds > 0:
            # grown over regions already measured: their pixels stay theirs
            for j in range(q):
                if alive[j]:
                    for yy in range(max(roi[j, 1], y0), min(roi[j, 3], y1)):
                        for xx in range(max(roi[j, 0], x0), min(roi[j, 2], x1)):
                            mp[yy - y0 + 1, xx - x0 + 1] = 0
        if holes:
            fill_holes(mp[1:h + 1, 1:w + 1], np.empty(h * w, np.int64))
        # label the region
        nrr = 0
        words = mp.view(np.uint64)
        for yy in range(h):
            nrr = _row_runs(mp, words, yy + 1, y0 + yy, 1 - x0, runs, nrr)
            if nrr < 0:
                return -1
        if nrr == 0:
            rounds = 0
            continue
        kk = label_runs(runs, nrr, conn8, run_label)
        cut = False
        lab = np.empty((1, 1), np.int32)
        if split_area > 0:
            # area per label; the big ones are cut at their narrowest neck
            area = np.zeros(kk, np.int64)
            for r in range(nrr):
                area[run_label[r]] += runs[r, 2] - runs[r, 1]
            big = False
            for L in range(kk):
                big |= area[L] > split_area
            if big:
                # (the neck is found from the runs; a label image only if a cut is made)
                # a label without a neck stays as it is: it is not tried again
                nocut = np.zeros(16 * kk + 8, np.bool_)
                where = np.zeros(2, np.int64)
                cap_runs = runs.shape[0]
                for _ in range(4):                 # three touching cells need two cuts
                    if not big:
                        break
                    big = False
                    # label boxes (region coordinates): the neck is looked for in the box
                    lb = np.empty((kk, 4), np.int64)
                    for L in range(kk):
                        lb[L, 0] = w
                        lb[L, 1] = h
                        lb[L, 2] = 0
                        lb[L, 3] = 0
                    for r in range(nrr):
                        L = run_label[r]
                        yy = runs[r, 0] - y0
                        lb[L, 0] = min(lb[L, 0], runs[r, 1] - x0)
                        lb[L, 1] = min(lb[L, 1], yy)
                        lb[L, 2] = max(lb[L, 2], runs[r, 2] - x0)
                        lb[L, 3] = max(lb[L, 3], yy + 1)
                    k0 = kk
                    for L in range(k0):
                        if area[L] > split_area and not nocut[L]:
                            if neck_runs(runs, nrr, run_label, L, x0 + lb[L, 0], y0 + lb[L, 1],
                                         lb[L, 2] - lb[L, 0], lb[L, 3] - lb[L, 1], neck_ratio,
                                         where):
                                # the runs follow the cut: beyond it they are the new label's
                                n_all = nrr
                                if where[0] != 1:
                                    # x >= cut, or a diagonal cut: the cut column of row y
                                    # is cut - y (x + y >= cut) or cut + y (x - y >= cut)
                                    for r in range(nrr):
                                        if run_label[r] != L:
                                            continue
                                        cutx = where[1]
                                        if where[0] == 2:
                                            cutx -= runs[r, 0]
                                        elif where[0] == 3:
                                            cutx += runs[r, 0]
                                        if runs[r, 2] > cutx:
                                            if runs[r, 1] >= cutx:
                                                run_label[r] = kk
                                            else:          # straddles the cut: split it
                                                if n_all >= cap_runs:
                                                    return -1
                                                runs[n_all, 0] = runs[r, 0]
                                                runs[n_all, 1] = cutx
                                                runs[n_all, 2] = runs[r, 2]
                                                run_label[n_all] = kk
                                                runs[r, 2] = cutx
                                                n_all += 1
                                else:
                                    cuty = where[1]
                                    for r in range(nrr):
                                        if run_label[r] == L and runs[r, 0] >= cuty:
                                            run_label[r] = kk
                                nrr = n_all
                                kk += 1
                                cut = True
                                big = True
                            else:
                                nocut[L] = True
                    if big:
                        # areas of the new labels
                        area = np.zeros(kk, np.int64)
                        for r in range(nrr):
                            area[run_label[r]] += runs[r, 2] - runs[r, 1]
                if cut:
                    lab = np.zeros((h, w), np.int32)
                    paint_labels(runs, nrr, run_label, lab, y0, x0)
        if nout + kk > cap:
            return -1
        # hysteresis first: only the labels with min_seed seed pixels are measured, each into
        # its final row (a label's sums are added in the same run order as before)
        strong = np.zeros(kk, np.int64)
        for r in range(nrr):
            y = runs[r, 0]
            cnt = 0
            for x in range(runs[r, 1], runs[r, 2]):
                v = np.int16(np.int16(img[y, x]) - off)
                cnt += (v < lo[y, x]) | (v > hi[y, x])
            strong[run_label[r]] += cnt
        outrow = np.empty(kk, np.int64)
        nkeep = 0
        for L in range(kk):
            if strong[L] >= min_seed:
                outrow[L] = nout + nkeep
                nkeep += 1
            else:
                outrow[L] = -1
        if nkeep and rounds < GROW_ROUNDS and _grow_region(roi, alive, nr, q, runs, nrr,
                                                          run_label, outrow, margin, W, H):
            rounds += 1                       # a kept component reaches the border: again
            continue
        rounds = 0
        if nkeep == 0:
            continue
        _accumulate_kept(runs, nrr, run_label, outrow, strong, stats)
        lp = np.empty((1, 1), np.int32)
        bp = np.zeros((h + 2, w + 2), np.uint8)
        if cut:
            # labels no longer follow the 8-connectivity of the mask: a border pixel is one
            # with a 4-neighbour of another label (padded label image, branch-free)
            lp = np.zeros((h + 2, w + 2), np.int32)
            for yy in range(h):
                src = lab[yy]
                dst = lp[yy + 1, 1:w + 1]
                for xx in range(w):
                    dst[xx] = src[xx]
            for yy in range(1, h + 1):
                up = lp[yy - 1, 1:w + 1]
                me = lp[yy, 1:w + 1]
                dn = lp[yy + 1, 1:w + 1]
                lf = lp[yy, 0:w]
                rt = lp[yy, 2:w + 2]
                brow = bp[yy, 1:w + 1]
                for xx in range(w):
                    L = me[xx]
                    brow[xx] = np.uint8((L != 0) & ((up[xx] != L) | (dn[xx] != L)
                                                    | (lf[xx] != L) | (rt[xx] != L)))
        else:
            # border pixels: foreground with a 4-neighbour outside the mask (branch-free)
            for yy in range(1, h + 1):
                up = mp[yy - 1, 1:w + 1]
                me = mp[yy, 1:w + 1]
                dn = mp[yy + 1, 1:w + 1]
                lf = mp[yy, 0:w]
                rt = mp[yy, 2:w + 2]
                brow = bp[yy, 1:w + 1]
                for xx in range(w):
                    brow[xx] = me[xx] & (1 - (up[xx] & dn[xx] & lf[xx] & rt[xx]))
        # per run: brightness, seed pixels (hysteresis) and, uncut, the perimeter (a border
        # pixel's 8-neighbours on the border are in its own 8-connected component)
        # (plain 2-D indexing, no row views: a view in a branchy loop costs Numba an atomic
        # reference-count pair per run, which was most of this loop's time)
        for r in range(nrr):
            srow = outrow[run_label[r]]
            if srow < 0:
                continue
            y = runs[r, 0]
            a = runs[r, 1]
            b = runs[r, 2]
            acc = 0
            for x in range(a, b):
                acc += img[y, x]
            stats[srow, S_BRIGHT] += acc
            # perimeter (scikit-image's border configurations): border pixels among the
            # 8-neighbours of a border pixel that belong to its label; the run's pixels are
            # the padded columns a - x0 + 1 .. b - x0 of row py
            py = y - y0 + 1
            per = 0.0
            if not cut:      # uncut: 8-neighbours in the mask are in the same component
                for t in range(a - x0 + 1, b - x0 + 1):
                    if bp[py, t]:
                        code = (1 + 2 * (bp[py - 1, t] + bp[py + 1, t] + bp[py, t - 1]
                                         + bp[py, t + 1])
                                + 10 * (bp[py - 1, t - 1] + bp[py - 1, t + 1]
                                        + bp[py + 1, t - 1] + bp[py + 1, t + 1]))
                        per += weights[code]
            else:
                L = run_label[r] + 1
                for t in range(a - x0 + 1, b - x0 + 1):
                    if bp[py, t]:
                        code = (1 + 2 * ((bp[py - 1, t] & (lp[py - 1, t] == L))
                                         + (bp[py + 1, t] & (lp[py + 1, t] == L))
                                         + (bp[py, t - 1] & (lp[py, t - 1] == L))
                                         + (bp[py, t + 1] & (lp[py, t + 1] == L)))
                                + 10 * ((bp[py - 1, t - 1] & (lp[py - 1, t - 1] == L))
                                        + (bp[py - 1, t + 1] & (lp[py - 1, t + 1] == L))
                                        + (bp[py + 1, t - 1] & (lp[py + 1, t - 1] == L))
                                        + (bp[py + 1, t + 1] & (lp[py + 1, t + 1] == L))))
                        per += weights[code]
            stats[srow, S_PERIM] += per
        nout += nkeep
    return nout


@njit(cache=True, nogil=True)
def finalize(stats, n, do_rejoin, max_gap, min_deform, min_area, rejoin_max_area, max_area, out):
    """Re-join split parts (:func:`rejoin`), finish the statistics and keep the blobs with
    ``min_area <= area <= max_area``, in one call. ``out`` must hold ``n`` rows.

    Returns (kept, merged, too_small, too_large).
    """
    alive = np.ones(n, np.bool_)
    merged = 0
    if do_rejoin and n > 1:
        merged = rejoin(stats, n, max_gap, min_deform, min_area, rejoin_max_area, alive)
    kept = 0
    small = 0
    large = 0
    for i in range(n):
        if not alive[i]:
            continue
        a = stats[i, S_AREA]
        if a < min_area:
            small += 1
            continue
        if a > max_area:
            large += 1
            continue
        if kept != i:
            for c in range(NSTAT):
                stats[kept, c] = stats[i, c]
        kept += 1
    finish_stats(stats, kept, out)
    return kept, merged, small, large


@njit(cache=True, nogil=True)
def static_flags(cur, prev, pcount, panchor, sites, now, static_frames, count, anchor, flags):
    """Which blobs are stuck debris (see ``FrontEnd._static``); fills ``count``, ``anchor``
    (n, 2) and ``flags`` (n,) and returns the updated static sites (rows cx, cy, area, last
    frame).

    ``cur`` and ``prev`` are finished statistics rows (``F_*`` columns) of this frame's and
    the previous frame's blobs; ``pcount`` and ``panchor`` the previous blobs' counts and
    anchors. A blob continues a previous one's count while it stays within 1 px of that
    blob's anchor (where the count began), so a cell creeping at under 1 px per frame is not
    taken for debris: only the position over the whole count matters, not each step."""
    n = cur.shape[0]
    m = prev.shape[0]
    for i in range(n):
        count[i] = 1
        anchor[i, 0] = cur[i, F_CX]
        anchor[i, 1] = cur[i, F_CY]
        best = 1e18
        bj = -1
        for j in range(m):
            d = math.hypot(cur[i, F_CX] - prev[j, F_CX], cur[i, F_CY] - prev[j, F_CY])
            if d < best:
                best = d
                bj = j
        if (bj >= 0 and best <= 1.0 and abs(cur[i, F_AREA] / prev[bj, F_AREA] - 1.0) <= 0.25
                and math.hypot(cur[i, F_CX] - panchor[bj, 0],
                               cur[i, F_CY] - panchor[bj, 1]) <= 1.0):
            count[i] = pcount[bj] + 1
            anchor[i, 0] = panchor[bj, 0]
            anchor[i, 1] = panchor[bj, 1]
        flags[i] = count[i] >= static_frames
    ns = sites.shape[0]
    for i in range(n):
        best = 1e18
        bj = -1
        for j in range(ns):
            d = math.hypot(cur[i, F_CX] - sites[j, 0], cur[i, F_CY] - sites[j, 1])
            if d < best:
                best = d
                bj = j
        if bj >= 0 and best <= 1.5 and abs(cur[i, F_AREA] / sites[bj, 2] - 1.0) <= 0.25:
            sites[bj, 3] = now
            flags[i] = True
    nnew = 0
    for i in range(n):
        if count[i] == static_frames:
            nnew += 1
    keep = 0
    for j in range(ns):
        if now - sites[j, 3] <= 50 * static_frames:
            keep += 1
    total = min(keep + nnew, 64)
    out = np.empty((total, 4), np.float64)
    k = 0
    skip = keep + nnew - total         # oldest first out
    for j in range(ns):
        if now - sites[j, 3] <= 50 * static_frames:
            if skip > 0:
                skip -= 1
                continue
            for c in range(4):
                out[k, c] = sites[j, c]
            k += 1
    for i in range(n):
        if count[i] == static_frames:
            if skip > 0:
                skip -= 1
                continue
            out[k, 0] = cur[i, F_CX]
            out[k, 1] = cur[i, F_CY]
            out[k, 2] = cur[i, F_AREA]
            out[k, 3] = now
            k += 1
    return out


@njit(cache=True, nogil=True)
def detect_blobs(img, lo, hi, lo_w, hi_w, bg_s, bgi, kern, prm, runs, run_label, rowbuf,
                 stats, weights, hist, out, res):
    """One frame, one call: the illumination offset (:func:`illumination_offset`), the blobs
    (:func:`detect_frame`) and their finished rows (:func:`finalize`) into ``out``.

    ``prm`` (float64) holds the parameters, in order: illumination on (0/1), grid steps y and
    x, scaled low thresholds dark and bright, region margin, seed_min_px, fill holes (0/1),
    split area, neck ratio, re-join (0/1), re-join max gap, re-join min deformation,
    min_area, re-join max area, max_area. ``res`` (int64, 5) receives the offset, the
    merges, the blobs dropped as too small and too large, and the rows before them.
    Returns the number of rows in ``out``, -1 when a buffer overflowed (grow, call again).
    """
    off = 0
    if prm[0] != 0.0:
        off = illumination_offset(img, bgi, int(prm[1]), int(prm[2]), hist)
    res[0] = off
    n = detect_frame(img, lo, hi, lo_w, hi_w, bg_s, kern, np.int64(prm[3]), np.int64(prm[4]),
                     np.int16(off), int(prm[5]), int(prm[6]), True, runs, run_label,
                     rowbuf, stats, weights, prm[7] != 0.0, int(prm[8]), prm[9])
    res[4] = n
    res[1] = 0
    res[2] = 0
    res[3] = 0
    if n <= 0:
        return n
    kept, merged, small, large = finalize(stats, n, prm[10] != 0.0, prm[11], prm[12],
                                          prm[13], prm[14], prm[15], out)
    res[1] = merged
    res[2] = small
    res[3] = large
    return kept


@njit(cache=True, nogil=True, inline="always")
def _median_sorted(s, count):
    h = count // 2
    return s[h] if count % 2 == 1 else (s[h - 1] + s[h]) / 2.0


@njit(cache=True, nogil=True)
def push_sizes(abuf, dbuf, count, fin):
    """Append the areas of the finished rows ``fin`` to the window ``abuf[:count]`` of the
    most recent areas, and their box diameters ``sqrt(width x height)`` to ``dbuf`` (at most
    ``len(abuf)`` each, oldest dropped first); returns the new count and the two windows'
    medians (``np.median``: the mean of the two middle values when even).

    The box diameter is the cell's size also when only its outline is detected (a ring's
    area says little about how far apart two arcs of it can be)."""
    cap = abuf.shape[0]
    n = fin.shape[0]
    for i in range(n):
        if count == cap:
            for k in range(cap - 1):
                abuf[k] = abuf[k + 1]
                dbuf[k] = dbuf[k + 1]
            count -= 1
        abuf[count] = fin[i, F_AREA]
        dbuf[count] = math.sqrt((fin[i, F_X1] - fin[i, F_X0]) * (fin[i, F_Y1] - fin[i, F_Y0]))
        count += 1
    return (count, _median_sorted(np.sort(abuf[:count]), count),
            _median_sorted(np.sort(dbuf[:count]), count))
