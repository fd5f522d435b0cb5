"""Differential tests: our run-based labelling and statistics against scipy.ndimage/numpy.

Connectivity: 8 (the front end's choice), compared with ``structure=np.ones((3, 3))``;
4-connectivity is checked too, against scipy's default cross structure.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage as ndi

from engine.detect import FIELDS, label, measure
from engine.errors import DetectError

COL = {name: i for i, name in enumerate(FIELDS)}

masks = st.integers(1, 40).flatmap(
    lambda h: st.integers(1, 40).flatmap(
        lambda w: st.floats(0.05, 0.8).flatmap(
            lambda p: arrays(np.uint8, (h, w), elements=st.integers(0, 99)).map(
                lambda a: (a < p * 100).astype(np.uint8)))))


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images are equal up to a renaming of the labels."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fa, fb = a[a > 0], b[b > 0]
    pairs = np.unique(np.stack([fa, fb]), axis=1)
    return (len(np.unique(pairs[0])) == pairs.shape[1]
            and len(np.unique(pairs[1])) == pairs.shape[1])


@settings(max_examples=150, deadline=None)
@given(masks)
def test_labelling_equals_scipy_8_connectivity(mask):
    ours, n = label(mask, connectivity=8)
    ref, nref = ndi.label(mask, structure=np.ones((3, 3)))
    assert n == nref
    assert _same_partition(ours, ref)
    # raster order of first pixel, as scipy
    assert np.array_equal(ours, ref)


@settings(max_examples=80, deadline=None)
@given(masks)
def test_labelling_equals_scipy_4_connectivity(mask):
    ours, n = label(mask, connectivity=4)
    ref, nref = ndi.label(mask)
    assert n == nref
    assert _same_partition(ours, ref)


@settings(max_examples=100, deadline=None)
@given(masks, st.integers(0, 2**32 - 1))
def test_blob_stats_equal_numpy(mask, seed):
    image = np.random.default_rng(seed).integers(0, 256, mask.shape, dtype=np.uint8)
    lab, n = label(mask)
    fin = measure(lab, n, image)
    assert fin.shape == (n, len(FIELDS))
    for k in range(1, n + 1):
        ys, xs = np.nonzero(lab == k)
        row = fin[k - 1]
        assert row[COL["area"]] == ys.size
        assert row[COL["cx"]] == pytest.approx(xs.mean(), abs=1e-9)
        assert row[COL["cy"]] == pytest.approx(ys.mean(), abs=1e-9)
        assert (row[COL["x0"]], row[COL["y0"]], row[COL["x1"]], row[COL["y1"]]) == \
            (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert row[COL["brightness"]] == pytest.approx(image[ys, xs].mean(), rel=1e-9)
    # boxes agree with scipy's find_objects
    for k, sl in enumerate(ndi.find_objects(lab)):
        row = fin[k]
        assert (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) == \
            (row[COL["x0"]], row[COL["y0"]], row[COL["x1"]], row[COL["y1"]])


def test_disc_shape_statistics():
    yy, xx = np.mgrid[:101, :121]
    disc = ((xx - 60.0) ** 2 + (yy - 50.0) ** 2 <= 30.0 ** 2)
    fin = measure(*label(disc))
    row = fin[0]
    assert row[COL["perimeter"]] == pytest.approx(2 * np.pi * 30, rel=0.06)
    assert 0 <= row[COL["deform"]] < 0.06          # round: low deformation
    assert row[COL["major"]] == pytest.approx(60, rel=0.02)
    assert row[COL["minor"]] == pytest.approx(60, rel=0.02)


def test_ellipse_axes_and_orientation():
    yy, xx = np.mgrid[:121, :121].astype(float)
    th = np.deg2rad(30.0)
    u = (xx - 60) * np.cos(th) + (yy - 60) * np.sin(th)
    v = -(xx - 60) * np.sin(th) + (yy - 60) * np.cos(th)
    ell = (u / 40) ** 2 + (v / 15) ** 2 <= 1
    row = measure(*label(ell))[0]
    assert row[COL["major"]] == pytest.approx(80, rel=0.03)
    assert row[COL["minor"]] == pytest.approx(30, rel=0.05)
    assert row[COL["orientation"]] == pytest.approx(th, abs=0.02)
    assert row[COL["deform"]] > 0.1                 # elongated: clearly not round


def test_bad_inputs_name_the_problem():
    with pytest.raises(DetectError, match="2-D"):
        label(np.zeros((3, 3, 3)))
    with pytest.raises(DetectError, match="connectivity"):
        label(np.zeros((3, 3)), connectivity=6)


# -- the fused per-frame kernel against the label-image statistics ---------------------------

def _fused(image, bg=100, seed=20, low=10, split_area=0, margin=3):
    """Statistics rows of K.detect_frame on ``image`` against a flat background."""
    from engine.detect import _kernels as K
    H, W = image.shape
    lo = np.full((H, W), bg - seed, np.int16)
    hi = np.full((H, W), bg + seed, np.int16)
    lo_w = np.full((H, W), bg - low, np.int16)
    hi_w = np.full((H, W), bg + low, np.int16)
    runs = np.empty((H * W + 1, 3), np.int64)
    stats = np.empty((H * W + 1, K.NSTAT), np.float64)
    n = K.detect_frame(image, lo, hi, lo_w, hi_w, np.zeros((H, W), np.int64),
                       np.ones(1, np.int64), 1, 1, np.int16(0), margin, 1, True, runs,
                       np.empty(H * W + 1, np.int64), np.empty((W + 7) // 8 * 8, np.uint8),
                       stats, K.PERIM_WEIGHTS, False, split_area, 0.6)
    out = np.empty((n, K.NFIN), np.float64)
    K.finish_stats(stats, n, out)
    return out[np.lexsort((out[:, COL["cx"]], out[:, COL["cy"]]))]


@pytest.mark.parametrize("seed", range(12))
def test_fused_kernel_equals_label_image_statistics(seed):
    """Run-based perimeter, moments and brightness of the per-frame kernel equal measure()
    on the label image (scikit-image's perimeter estimator on each label)."""
    rng = np.random.default_rng(seed)
    H, W = 60, 90
    mask = np.zeros((H, W), bool)
    yy, xx = np.mgrid[:H, :W]
    for _ in range(rng.integers(1, 6)):          # discs, ellipses, ragged noise, at edges too
        cx, cy = rng.uniform(-5, W + 5), rng.uniform(-5, H + 5)
        a, b = rng.uniform(2, 14), rng.uniform(2, 14)
        mask |= ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
    mask &= rng.random((H, W)) > 0.1             # holes and ragged borders
    image = np.where(mask, rng.integers(20, 60, (H, W)), 100).astype(np.uint8)
    lab, n = label(mask)
    ref = measure(lab, n, image)
    ref = ref[np.lexsort((ref[:, COL["cx"]], ref[:, COL["cy"]]))]
    got = _fused(image)
    assert got.shape[0] == n
    for c in ("area", "cx", "cy", "x0", "y0", "x1", "y1", "perimeter", "brightness", "major",
              "minor"):
        np.testing.assert_allclose(got[:, COL[c]], ref[:, COL[c]], rtol=1e-9, atol=1e-9,
                                   err_msg=c)


def test_fused_kernel_perimeter_after_a_neck_cut():
    """Two touching discs are cut at the neck; each part's perimeter is the label-image
    estimator's on the cut label image (the cut makes the parts' borders)."""
    from engine.detect import _kernels as K
    H, W = 60, 100
    yy, xx = np.mgrid[:H, :W]
    mask = ((xx - 35) ** 2 + (yy - 30) ** 2 <= 13 ** 2) | ((xx - 60) ** 2 + (yy - 31) ** 2 <= 13 ** 2)
    ragged = np.random.default_rng(5).random((H, W)) > 0.15    # many border configurations
    mask &= ragged | ((xx - 47) ** 2 < 16)                     # (the neck stays whole)
    image = np.where(mask, 30, 100).astype(np.uint8)
    lab, n = label(mask)
    assert n == 1
    assert K.split_neck(lab, 1, 2, 0.6, np.zeros(2, np.int64))
    stats = np.zeros((2, K.NSTAT))
    K.perimeter_from_labels(lab, stats, 0, K.PERIM_WEIGHTS)
    ref = measure(lab, 2, image)
    ref[:, COL["perimeter"]] = stats[:, K.S_PERIM]
    ref = ref[np.lexsort((ref[:, COL["cx"]], ref[:, COL["cy"]]))]
    got = _fused(image, split_area=int(mask.sum() * 0.6))
    assert got.shape[0] == 2
    for c in ("area", "cx", "cy", "x0", "x1", "perimeter", "brightness"):
        np.testing.assert_allclose(got[:, COL[c]], ref[:, COL[c]], rtol=1e-9, atol=1e-9,
                                   err_msg=c)



@pytest.mark.parametrize("down", [True, False])
def test_cells_touching_corner_to_corner_are_cut_on_the_diagonal(down):
    """Two discs that touch along a diagonal have no neck across x or y (where they meet the
    blob is as wide and as tall as either); the diagonal profile finds it, and the fused
    kernel returns two blobs with the discs' centroids and areas."""
    H, W = 70, 90
    yy, xx = np.mgrid[:H, :W]
    dy = 17 if down else -17
    c1, c2 = (30, 35 - dy / 2), (53, 35 + dy / 2)       # 28.7 px apart, radius 14.5
    d1 = (xx - c1[0]) ** 2 + (yy - c1[1]) ** 2 <= 14.5 ** 2
    d2 = (xx - c2[0]) ** 2 + (yy - c2[1]) ** 2 <= 14.5 ** 2
    mask = d1 | d2
    lab, n = label(mask)
    assert n == 1
    xs = np.nonzero(mask)[1]
    for x in range(xs.min() + 5, xs.max() - 5):        # no neck across x: every column
        col = np.nonzero(mask[:, x])[0]                 # at least 60 % of the tallest
        assert col.max() - col.min() + 1 >= 0.6 * 29
    image = np.where(mask, 30, 100).astype(np.uint8)
    got = _fused(image, split_area=int(mask.sum() * 0.6))
    assert got.shape[0] == 2, got[:, [COL["cx"], COL["cy"], COL["area"]]]
    for row, c, d in zip(got[np.argsort(got[:, COL["cx"]])], (c1, c2), (d1, d2)):
        assert abs(row[COL["cx"]] - c[0]) < 1.5 and abs(row[COL["cy"]] - c[1]) < 1.5
        assert abs(row[COL["area"]] - d.sum()) < 0.1 * d.sum()

# -- the kernels the per-frame pass uses instead of their label-image versions -------------

def _touching_blobs(rng, H=70, W=110):
    """Chains of 1-3 touching or nearly touching ellipses along x, y or a diagonal, ragged
    (necks of every depth)."""
    yy, xx = np.mgrid[:H, :W]
    mask = np.zeros((H, W), bool)
    kind = rng.integers(0, 4)             # a row, a column, or down / up a diagonal
    c0 = rng.uniform(20, 35)
    for k in range(int(rng.integers(1, 4))):
        a, b = rng.uniform(7, 14), rng.uniform(7, 14)
        step = c0 + k * rng.uniform(12, 28)
        if kind == 0:
            cx, cy = step, H / 2 + rng.normal(0, 4)
        elif kind == 1:
            cx, cy = W / 2 + rng.normal(0, 4), min(step, H - 8) * 0.6
        else:
            d = (step - 20) * 0.7
            cx, cy = 20 + d * 1.2, (12 + d if kind == 2 else H - 12 - d)
        mask |= ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
    return mask & (rng.random((H, W)) > rng.uniform(0, 0.25))


def test_neck_from_runs_equals_split_neck_on_the_label_image():
    """neck_runs (profiles from the runs, no label image) finds the neck split_neck finds
    on the painted label image, for every label of random touching blobs."""
    from engine.detect import _kernels as K
    found = tried = 0
    axes = set()
    for seed in range(80):
        rng = np.random.default_rng(seed)
        mask = _touching_blobs(rng)
        lab, n = label(mask)
        runs = np.empty((mask.size + 1, 3), np.int64)
        nr = K.mask_runs(mask.astype(np.uint8), runs)
        rl = np.empty(mask.size + 1, np.int64)
        assert K.label_runs(runs, nr, True, rl) == n
        for L in range(n):
            ys, xs = np.nonzero(lab == L + 1)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            for ratio in (0.4, 0.6, 0.8):
                where_img = np.zeros(2, np.int64)
                sub = lab[y0:y1, x0:x1].copy()
                a = K.split_neck(sub, L + 1, n + 1, ratio, where_img)
                where_runs = np.zeros(2, np.int64)
                b = K.neck_runs(runs, nr, rl, L, x0, y0, x1 - x0, y1 - y0, ratio, where_runs)
                assert a == b, (seed, L, ratio)
                tried += 1
                if a:
                    found += 1
                    ax = int(where_img[0])
                    axes.add(ax)
                    shift = (x0, y0, x0 + y0, x0 - y0)[ax]
                    assert where_runs[0] == ax
                    assert where_runs[1] == where_img[1] + shift
    assert found >= 20 and tried - found >= 20, (found, tried)
    assert {0, 1, 2, 3} <= axes, axes


@settings(max_examples=150, deadline=None)
@given(masks)
def test_word_skipping_row_runs_equal_mask_runs(mask):
    """The per-frame pass's run scan (whole 8-byte words skipped) gives mask_runs' runs."""
    from engine.detect import _kernels as K
    H, W = mask.shape
    padded = np.zeros((H, (W + 2 + 7) // 8 * 8), np.uint8)
    padded[:, 1:W + 1] = mask
    ref = np.empty((mask.size + 1, 3), np.int64)
    nref = K.mask_runs(mask, ref)
    got = np.empty_like(ref)
    n = 0
    words = padded.view(np.uint64)
    for y in range(H):
        n = K._row_runs(padded, words, y, y, 1, got, n)
    assert n == nref and np.array_equal(got[:n], ref[:nref])
    # a full buffer is reported, not overrun
    if nref > 1:
        small = np.empty((nref - 1, 3), np.int64)
        m = 0
        for y in range(H):
            m = K._row_runs(padded, words, y, y, 1, small, m)
            if m < 0:
                break
        assert m == -1


def test_one_call_frame_kernel_equals_its_parts():
    """detect_blobs (offset + detection + re-join/finish in one call) gives what the three
    kernels give called one after the other, with and without an illumination offset."""
    from engine.config import load_config
    from engine.detect import FrontEnd
    from engine.detect import _kernels as K
    from engine.sources import sim
    cfg = load_config(overrides=["sim.seed=4", "sim.rate_hz=25"])
    frames, _ = sim.SyntheticChip(cfg).render(160)
    fe = FrontEnd(cfg)
    fe.prime(frames)
    fe._area_buf[:64] = 600.0               # typical cell size known: splits and re-joins on
    fe._diam_buf[:64] = 28.0
    fe._n_areas, fe._typical, fe._typical_diam = 64, 600.0, 28.0
    fe._set_params()
    bg, prm = fe.bg, fe._prm
    f = cfg.frontend
    checked = 0
    for i in range(60, 160, 3):
        for shift in (0, 9):                       # a flicker the offset takes out
            img = np.clip(frames[i].astype(np.int16) + shift, 0, 255).astype(np.uint8)
            res = np.zeros(5, np.int64)
            fin = np.empty((4096, K.NFIN))
            kept = K.detect_blobs(img, bg.lo, bg.hi, bg.lo_w, bg.hi_w, bg.smooth_scaled,
                                  bg.rounded, fe.kernel, prm, fe._runs, fe._run_label,
                                  fe._rowbuf, np.empty((4096, K.NSTAT)), K.PERIM_WEIGHTS,
                                  np.empty(511, np.int64), fin, res)
            off = K.illumination_offset(img, bg.rounded, int(prm[1]), int(prm[2]),
                                        np.empty(511, np.int64))
            stats = np.empty((4096, K.NSTAT))
            n = K.detect_frame(img, bg.lo, bg.hi, bg.lo_w, bg.hi_w, bg.smooth_scaled,
                               fe.kernel, int(prm[3]), int(prm[4]), np.int16(off),
                               int(prm[5]), f.seed_min_px, True, fe._runs, fe._run_label,
                               fe._rowbuf, stats, K.PERIM_WEIGHTS, f.fill_holes, int(prm[8]),
                               f.split_neck_ratio)
            out = np.empty((max(n, 1), K.NFIN))
            k2, merged, small, large = K.finalize(stats, n, f.rejoin, f.rejoin_max_gap,
                                                  f.rejoin_min_deform, f.min_area, prm[14],
                                                  f.max_area, out) if n > 0 else (0, 0, 0, 0)
            assert res[0] == off and res[4] == n
            assert kept == k2 and (res[1], res[2], res[3]) == (merged, small, large)
            assert np.array_equal(fin[:kept], out[:k2])
            checked += kept
    assert checked > 50


def test_recent_sizes_window_and_medians_equal_numpy():
    """push_sizes keeps the last 256 areas and box diameters in order and gives np.median of
    each window."""
    from engine.detect import _kernels as K
    rng = np.random.default_rng(2)
    abuf, dbuf, count = np.zeros(256), np.zeros(256), 0
    ref_a, ref_d = np.zeros(0), np.zeros(0)
    for step in range(120):
        fin = np.zeros((int(rng.integers(1, 9)), K.NFIN))
        fin[:, K.F_AREA] = rng.integers(50, 2000, fin.shape[0])
        fin[:, K.F_X0] = rng.integers(0, 700, fin.shape[0])
        fin[:, K.F_X1] = fin[:, K.F_X0] + rng.integers(1, 90, fin.shape[0])
        fin[:, K.F_Y0] = rng.integers(0, 100, fin.shape[0])
        fin[:, K.F_Y1] = fin[:, K.F_Y0] + rng.integers(1, 50, fin.shape[0])
        count, med_a, med_d = K.push_sizes(abuf, dbuf, count, fin)
        ref_a = np.r_[ref_a, fin[:, K.F_AREA]][-256:]
        diam = np.sqrt((fin[:, K.F_X1] - fin[:, K.F_X0]) * (fin[:, K.F_Y1] - fin[:, K.F_Y0]))
        ref_d = np.r_[ref_d, diam][-256:]
        assert count == ref_a.size and np.array_equal(abuf[:count], ref_a)
        assert np.allclose(dbuf[:count], ref_d, rtol=0, atol=1e-12)
        assert med_a == float(np.median(ref_a))
        assert med_d == pytest.approx(float(np.median(ref_d)), abs=1e-12)
    assert count == 256


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(-300, 300))
def test_threshold_runs_equal_the_mask_of_the_comparison(seed, off):
    """The seeds' pass (rows tested whole, then masked and scanned by 8-byte words) gives
    the runs of ``(img - off < lo) | (img - off > hi)``, in raster order, for any width
    (ragged last word included), sparse or dense foreground, and bounds beyond 0..255."""
    from engine.detect import _kernels as K
    rng = np.random.default_rng(seed)
    H, W = int(rng.integers(1, 12)), int(rng.integers(1, 140))
    bg = rng.uniform(-20, 280) + rng.normal(0, rng.uniform(0, 60), (H, W))
    t = float(rng.uniform(1, 30))
    lo = np.ceil(bg - t).clip(-32768, 32767).astype(np.int16)
    hi = np.floor(bg + t).clip(-32768, 32767).astype(np.int16)
    if rng.random() < 0.2:                     # one polarity switched off
        (lo if rng.random() < 0.5 else hi)[:] = -32768 if rng.random() < 0.5 else 32767
    img = (bg + rng.normal(0, rng.uniform(0, 2) * t, (H, W))).clip(0, 255).astype(np.uint8)
    off = int(np.clip(off, -255, 255))
    runs = np.empty((H * W + 1, 3), np.int64)
    n = K.threshold_runs(img, lo, hi, np.int16(off), runs, np.empty((W + 7) // 8 * 8, np.uint8))
    v = img.astype(np.int64) - off
    mask = ((v < lo) | (v > hi)).astype(np.uint8)
    ref = np.empty_like(runs)
    assert np.array_equal(runs[:n], ref[:K.mask_runs(mask, ref)])
