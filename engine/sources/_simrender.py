"""Numba kernels of the synthetic chip: cell motion and frame compositing.

Array in, array out; the caller (:mod:`engine.sources.sim`) owns every array and all random
draws, so the kernels are deterministic. Cell state is one float64 row per cell, with the
columns named below; rows are ordered oldest (front-most) first.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# Cell state columns.
X, Y, U, D, R, SPD, DT, TAU, A, B, ANG, ANG0, D0, U0, CEN, RIM, HALO, SPLIT, DOBS = range(19)
NCOL = 19

# Motion parameters (one float64 vector).
P_VC, P_CHW, P_EXP, P_X0, P_X1, P_GAP, P_AXIS, P_TAUIN, P_LUTX0, P_JIT, P_LAT, P_NOISE, \
    P_RAMP = range(13)
NPARAM = 13

# Cell statistics written by the renderer: area, sum x, sum y, x0, y0, x1, y1 (half-open).
S_AREA, S_SX, S_SY, S_X0, S_Y0, S_X1, S_Y1 = range(7)
NSTAT = 7


@njit(cache=True, nogil=True)
def halfwidth_at(lut, lut_x0, x):
    """Open half-width [px] of the channel at x [px], linear between integer samples."""
    f = x - lut_x0
    if f <= 0.0:
        return lut[0]
    n = lut.shape[0]
    if f >= n - 1:
        return lut[n - 1]
    i = int(f)
    t = f - i
    return lut[i] * (1.0 - t) + lut[i + 1] * t


@njit(cache=True, nogil=True)
def step_cells(st, n, lut, prm, rnd):
    """Advance ``n`` cells by one camera frame, in place.

    Parameters
    ----------
    st : float64 (cap, NCOL)
        Cell state, front-most cell first.
    n : int
        Number of live rows.
    lut : float64 (L,)
        Channel half-width [px] at x = prm[P_LUTX0] + k.
    prm : float64 (NPARAM,)
        Motion parameters.
    rnd : float64 (>= n, 2)
        Standard normal draws: shape jitter, lateral jitter.
    """
    vc = prm[P_VC]
    chw = prm[P_CHW]
    pexp = prm[P_EXP]
    x0 = prm[P_X0]
    x1 = prm[P_X1]
    gap = prm[P_GAP]
    axis = prm[P_AXIS]
    kin = 1.0 - math.exp(-1.0 / prm[P_TAUIN])
    lx0 = prm[P_LUTX0]
    jit = prm[P_JIT]
    lat = prm[P_LAT]
    snoise = prm[P_NOISE]
    ramp = prm[P_RAMP]
    for i in range(n):
        x = st[i, X]
        u = st[i, U]
        r = st[i, R]
        h = halfwidth_at(lut, lx0, x)
        v = vc * (chw / h) ** pexp * st[i, SPD] * (1.0 - lat * u * u)
        xn = x + v
        # Hydrodynamic squeeze: ramps up over the end of the funnel, gone past the exit.
        if xn < x0 - ramp or xn >= x1:
            sq = 0.0
        elif xn < x0:
            sq = (xn - (x0 - ramp)) / ramp
        else:
            sq = 1.0
        tgt = st[i, DT] * sq + st[i, D0] * (1.0 - sq)
        d = st[i, D]
        if tgt > d:
            d += (tgt - d) * kin
        else:
            d += (tgt - d) * (1.0 - math.exp(-1.0 / st[i, TAU]))
        # Confinement: the cell's half-height cannot exceed the open half-width ahead of it.
        hf = halfwidth_at(lut, lx0, xn + 0.5 * st[i, A]) - 0.5
        dfit = 0.0
        if hf < r:
            q = (hf / r) ** 2
            dfit = (1.0 - q) / (1.0 + q)
        if d < dfit:
            d = dfit
        dobs = d + snoise * rnd[i, 0]
        if dobs < dfit:
            dobs = dfit
        if dobs < 0.0:
            dobs = 0.0
        if dobs > 0.9:
            dobs = 0.9
        k = math.sqrt((1.0 + dobs) / (1.0 - dobs))
        a = r * k
        b = r / k
        # No overtaking, no overlap: keep min_gap behind the cell ahead (never step back).
        if i > 0:
            lim = st[i - 1, X] - st[i - 1, A] - gap - a
            if xn > lim:
                xn = lim if lim > x else x
        hn = halfwidth_at(lut, lx0, xn)
        u += 0.05 * (st[i, U0] - u) + jit * rnd[i, 1]
        if u > 0.75:
            u = 0.75
        elif u < -0.75:
            u = -0.75
        room = hn - b - 1.0
        if room < 0.0:
            room = 0.0
        tilt = 1.0 - d / 0.25
        if tilt < 0.0:
            tilt = 0.0
        st[i, X] = xn
        st[i, Y] = axis + u * room
        st[i, U] = u
        st[i, D] = d
        st[i, DOBS] = dobs
        st[i, A] = a
        st[i, B] = b
        st[i, ANG] = st[i, ANG0] * tilt


# Radial profile tables of the cell look, sampled every 1/PROFILE_RES px of signed distance
# to the outline from -PROFILE_IN (inside) to +PROFILE_OUT (outside).
PROFILE_RES = 16.0
PROFILE_IN = 64.0
PROFILE_OUT = 16.0


@njit(cache=True, nogil=True)
def cell_profiles(ws, prof):
    """Fill ``prof`` (3, L) with the plateau, rim and halo profiles for edge softness ws [px].

    The plateau is ~1 inside the cell (3.5 px in from the outline) and 0 outside; the rim is a
    Gaussian band 1.6 px inside the outline; the halo a band 1.2 px outside it.
    """
    wr = math.sqrt(1.3 * 1.3 + ws * ws)
    wh = math.sqrt(1.0 + ws * ws)
    for j in range(prof.shape[1]):
        dist = j / PROFILE_RES - PROFILE_IN
        zc = (dist + 3.5) / ws
        if zc > 30.0:
            prof[0, j] = 0.0
        elif zc < -30.0:
            prof[0, j] = 1.0
        else:
            prof[0, j] = 1.0 / (1.0 + math.exp(zc))
        zr = (dist + 1.6) / wr
        zh = (dist - 1.2) / wh
        prof[1, j] = math.exp(-0.5 * zr * zr)
        prof[2, j] = math.exp(-0.5 * zh * zh)


@njit(cache=True, nogil=True)
def compose(base0, base1, w, gain, noise, noff, nscale, cells, n, debris, nd, prof, reach,
            hot_y, hot_x, hot_v, trans, out, stats):
    """Render one frame into ``out`` (uint8 H×W) and measure each cell's true mask.

    The scene is ``lerp(base0, base1, w) * gain``; debris and cells multiply it by their
    transmission (accumulated in ``trans``, which must hold 1.0 everywhere on entry and is
    reset on exit); then noise (``nscale * noise[noff:]``) is added, the result rounded and
    clipped, and hot pixels set. ``prof`` comes from :func:`cell_profiles`; ``reach`` [px] is
    how far outside its outline a cell is drawn. ``stats[i]`` receives cell i's mask area,
    coordinate sums and half-open box (pixel centres inside the ellipse, within the frame).
    """
    H, W = out.shape
    nprof = prof.shape[1]
    nboxes = nd + n
    boxes = np.empty((nboxes, 4), np.int64)
    # Debris: dark Gaussian specks; columns cx, cy, radius, depth [grey levels at 150].
    for j in range(nd):
        cx = debris[j, 0]
        cy = debris[j, 1]
        rr = debris[j, 2]
        dep = debris[j, 3] / 150.0
        e = 3.0 * rr + 1.0
        ya = max(int(cy - e), 0)
        yb = min(int(cy + e) + 2, H)
        xa = max(int(cx - e), 0)
        xb = min(int(cx + e) + 2, W)
        boxes[j, 0] = xa
        boxes[j, 1] = ya
        boxes[j, 2] = xb
        boxes[j, 3] = yb
        for yy in range(ya, yb):
            for xx in range(xa, xb):
                q = ((xx - cx) ** 2 + (yy - cy) ** 2) / (rr * rr)
                trans[yy, xx] *= 1.0 - dep * math.exp(-0.5 * q)
    for i in range(n):
        cx = cells[i, X]
        cy = cells[i, Y]
        a = cells[i, A]
        b = cells[i, B]
        ang = cells[i, ANG]
        cen = cells[i, CEN] / 150.0
        rim = cells[i, RIM] / 150.0
        halo = cells[i, HALO] / 150.0
        fsp = (cells[i, DOBS] - 0.15) / 0.15
        if fsp < 0.0:
            fsp = 0.0
        elif fsp > 1.0:
            fsp = 1.0
        fsp *= cells[i, SPLIT]
        c = math.cos(ang)
        s = math.sin(ang)
        ex = math.sqrt(a * a * c * c + b * b * s * s) + reach + 1.0
        ey = math.sqrt(a * a * s * s + b * b * c * c) + reach + 1.0
        ya = max(int(cy - ey), 0)
        yb = min(int(cy + ey) + 2, H)
        xa = max(int(cx - ex), 0)
        xb = min(int(cx + ex) + 2, W)
        boxes[nd + i, 0] = xa
        boxes[nd + i, 1] = ya
        boxes[nd + i, 2] = xb
        boxes[nd + i, 3] = yb
        ia2 = 1.0 / (a * a)
        ib2 = 1.0 / (b * b)
        ia = 1.0 / a
        ib = 1.0 / b
        area = 0
        sx = 0.0
        sy = 0.0
        bx0 = W
        by0 = H
        bx1 = 0
        by1 = 0
        for yy in range(ya, yb):
            dy = yy - cy
            for xx in range(xa, xb):
                dx = xx - cx
                xr = c * dx + s * dy
                yr = -s * dx + c * dy
                r2 = xr * xr * ia2 + yr * yr * ib2
                if r2 <= 1.0:
                    area += 1
                    sx += xx
                    sy += yy
                    if xx < bx0:
                        bx0 = xx
                    if xx >= bx1:
                        bx1 = xx + 1
                    if yy < by0:
                        by0 = yy
                    if yy >= by1:
                        by1 = yy + 1
                rho = math.sqrt(r2)
                if rho > 1e-6:
                    g = math.sqrt(xr * xr * ia2 * ia2 + yr * yr * ib2 * ib2) / rho
                    dist = (rho - 1.0) / g
                else:
                    dist = -b
                if dist >= reach:
                    continue
                j = int((dist + PROFILE_IN) * PROFILE_RES + 0.5)
                if j < 0:
                    j = 0
                elif j >= nprof:
                    j = nprof - 1
                m = 1.0
                if fsp > 0.0:
                    t = (abs(yr) * ib - 0.3) / 0.3
                    if t < 0.0:
                        t = 0.0
                    elif t > 1.0:
                        t = 1.0
                    t = t * t * (3.0 - 2.0 * t)
                    m = 1.0 - fsp * (1.0 - t)
                delta = cen * prof[0, j] + m * (rim * prof[1, j] + halo * prof[2, j])
                trans[yy, xx] *= 1.0 + delta
        stats[i, S_AREA] = area
        stats[i, S_SX] = sx
        stats[i, S_SY] = sy
        stats[i, S_X0] = bx0
        stats[i, S_Y0] = by0
        stats[i, S_X1] = bx1
        stats[i, S_Y1] = by1
    k = noff
    g32 = np.float32(gain)
    w32 = np.float32(w)
    ns32 = np.float32(nscale)
    for yy in range(H):
        for xx in range(W):
            p0 = base0[yy, xx]
            v = (p0 + w32 * (base1[yy, xx] - p0)) * g32 * trans[yy, xx] + ns32 * noise[k] + np.float32(0.5)
            k += 1
            v = min(max(v, np.float32(0.0)), np.float32(255.0))
            out[yy, xx] = np.uint8(v)
    for j in range(nboxes):
        for yy in range(boxes[j, 1], boxes[j, 3]):
            for xx in range(boxes[j, 0], boxes[j, 2]):
                trans[yy, xx] = 1.0
    for j in range(hot_y.shape[0]):
        yy = hot_y[j]
        xx = hot_x[j]
        if out[yy, xx] < hot_v[j]:
            out[yy, xx] = hot_v[j]
