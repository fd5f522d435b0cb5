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
def compose(base, gain, noise, noff, nscale, cells, n, debris, nd, prof, reach,
            hot_y, hot_x, hot_v, trans, out, stats):
    """Render one frame into ``out`` (uint8 H×W) and measure each cell's true mask.

    The scene is ``base * gain`` plus noise (``nscale * noise[noff:]``), rounded and clipped.
    Debris and cells multiply the scene by their transmission, accumulated in ``trans`` over
    their boxes (``trans`` must hold 1.0 everywhere on entry and is reset on exit); only those
    boxes are drawn a second time. Hot pixels are set last. ``prof`` comes from
    :func:`cell_profiles`; ``reach`` [px] is how far outside its outline a cell is drawn.
    ``stats[i]`` receives cell i's mask area, coordinate sums and half-open box (pixel centres
    inside the ellipse, within the frame).
    """
    H, W = out.shape
    nprof = prof.shape[1]
    nboxes = nd + n
    boxes = np.empty((nboxes, 4), np.int64)
    g32 = np.float32(gain)
    ns32 = np.float32(nscale)
    half = np.float32(0.5)
    lo = np.float32(0.0)
    hi = np.float32(255.0)
    bf = base.ravel()
    of = out.ravel()
    nz = noise[noff:noff + bf.size]
    for q in range(bf.size):
        v = bf[q] * g32 + ns32 * nz[q] + half
        of[q] = np.uint8(np.int32(min(max(v, lo), hi)))
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
    p0 = prof[0]
    p1 = prof[1]
    p2 = prof[2]
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
        fsp = min(max(fsp, 0.0), 1.0) * cells[i, SPLIT]
        c = math.cos(ang)
        s = math.sin(ang)
        ia2 = 1.0 / (a * a)
        ib2 = 1.0 / (b * b)
        ib = 1.0 / b
        # Outline (mask) and drawn region (outline grown by reach) as rotated ellipses:
        # A dx^2 + B(dy) dx + C(dy) <= 0 per row.
        qa = c * c * ia2 + s * s * ib2
        qb = 2.0 * c * s * (ia2 - ib2)
        qc = s * s * ia2 + c * c * ib2
        ae = a + reach
        be = b + reach
        ea2 = 1.0 / (ae * ae)
        eb2 = 1.0 / (be * be)
        ra = c * c * ea2 + s * s * eb2
        rb = 2.0 * c * s * (ea2 - eb2)
        rc = s * s * ea2 + c * c * eb2
        ey = math.sqrt(ae * ae * s * s + be * be * c * c)
        ya = max(int(math.ceil(cy - ey)), 0)
        yb = min(int(math.floor(cy + ey)) + 1, H)
        dxa = W
        dxb = 0
        area = 0
        sx = 0.0
        sy = 0.0
        bx0 = W
        by0 = H
        bx1 = 0
        by1 = 0
        for yy in range(ya, yb):
            dy = yy - cy
            # mask span
            mb = qb * dy
            mc = qc * dy * dy - 1.0
            disc = mb * mb - 4.0 * qa * mc
            if disc >= 0.0:
                sq = math.sqrt(disc)
                lo_x = max(int(math.ceil(cx + (-mb - sq) / (2.0 * qa))), 0)
                hi_x = min(int(math.floor(cx + (-mb + sq) / (2.0 * qa))), W - 1)
                if hi_x >= lo_x:
                    cnt = hi_x - lo_x + 1
                    area += cnt
                    sx += 0.5 * (lo_x + hi_x) * cnt
                    sy += yy * cnt
                    bx0 = min(bx0, lo_x)
                    bx1 = max(bx1, hi_x + 1)
                    by0 = min(by0, yy)
                    by1 = max(by1, yy + 1)
            # drawn span
            eb = rb * dy
            ec = rc * dy * dy - 1.0
            disc = eb * eb - 4.0 * ra * ec
            if disc < 0.0:
                continue
            sq = math.sqrt(disc)
            xa = max(int(math.ceil(cx + (-eb - sq) / (2.0 * ra))), 0)
            xb = min(int(math.floor(cx + (-eb + sq) / (2.0 * ra))) + 1, W)
            if xb <= xa:
                continue
            dxa = min(dxa, xa)
            dxb = max(dxb, xb)
            tr = trans[yy]
            f_sdy = np.float32(s * dy)
            f_cdy = np.float32(c * dy)
            f_c = np.float32(c)
            f_s = np.float32(s)
            f_cx = np.float32(cx)
            f_ia2 = np.float32(ia2)
            f_ib2 = np.float32(ib2)
            f_ia4 = np.float32(ia2 * ia2)
            f_ib4 = np.float32(ib2 * ib2)
            f_ib = np.float32(ib)
            f_fsp = np.float32(fsp)
            f_cen = np.float32(cen)
            f_rim = np.float32(rim)
            f_halo = np.float32(halo)
            f_off = np.float32(PROFILE_IN * PROFILE_RES + 0.5)
            f_res = np.float32(PROFILE_RES)
            one = np.float32(1.0)
            zero = np.float32(0.0)
            for xx in range(xa, xb):
                dx = np.float32(xx) - f_cx
                xr = f_c * dx + f_sdy
                yr = f_cdy - f_s * dx
                xr2 = xr * xr
                yr2 = yr * yr
                r2 = xr2 * f_ia2 + yr2 * f_ib2
                # Signed distance to the outline [px], to first order: f / |grad f| with
                # f = r2 - 1 (exact on the outline, close within the drawn band).
                gg = np.float32(2.0) * math.sqrt(xr2 * f_ia4 + yr2 * f_ib4) + np.float32(1e-9)
                jj = min(max(int((r2 - one) / gg * f_res + f_off), 0), nprof - 1)
                t = min(max((abs(yr) * f_ib - np.float32(0.3)) * np.float32(1.0 / 0.3), zero), one)
                m = one - f_fsp * (one - t * t * (np.float32(3.0) - np.float32(2.0) * t))
                delta = f_cen * p0[jj] + m * (f_rim * p1[jj] + f_halo * p2[jj])
                tr[xx] *= one + delta
        boxes[nd + i, 0] = min(dxa, dxb)
        boxes[nd + i, 1] = ya
        boxes[nd + i, 2] = dxb
        boxes[nd + i, 3] = max(ya, yb)
        stats[i, S_AREA] = area
        stats[i, S_SX] = sx
        stats[i, S_SY] = sy
        stats[i, S_X0] = bx0
        stats[i, S_Y0] = by0
        stats[i, S_X1] = bx1
        stats[i, S_Y1] = by1
    for j in range(nboxes):
        x0 = boxes[j, 0]
        x1 = boxes[j, 2]
        for yy in range(boxes[j, 1], boxes[j, 3]):
            brow = base[yy]
            trow = trans[yy]
            orow = out[yy]
            nrow = noise[noff + yy * W:noff + (yy + 1) * W]
            for xx in range(x0, x1):
                v = brow[xx] * g32 * trow[xx] + ns32 * nrow[xx] + half
                orow[xx] = np.uint8(np.int32(min(max(v, lo), hi)))
    for j in range(nboxes):
        x0 = boxes[j, 0]
        x1 = boxes[j, 2]
        for yy in range(boxes[j, 1], boxes[j, 3]):
            trow = trans[yy]
            for xx in range(x0, x1):
                trow[xx] = 1.0
    for j in range(hot_y.shape[0]):
        yy = hot_y[j]
        xx = hot_x[j]
        if out[yy, xx] < hot_v[j]:
            out[yy, xx] = hot_v[j]
