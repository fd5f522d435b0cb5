"""Per-cell features on synthetic passages of ellipses with known shape and speed."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.clips import ClipRecorder, SHAPE_FIELDS
from engine.config import load_config
from engine.features import FEATURES, compute_features
from engine.types import ChipGeometry, TrackStatus

G = ChipGeometry(width=800, height=150, axis_y=75, constriction_x0=300, constriction_x1=560,
                 constriction_halfwidth=11, inlet_halfwidth=62, outlet_halfwidth=62)


@pytest.fixture(scope="module")
def cfg():
    return load_config()


def ellipse(a, b):
    """Area [px²], perimeter (Ramanujan) [px] and dclab deformation of semi-axes a, b [px]."""
    area = math.pi * a * b
    h = ((a - b) / (a + b)) ** 2
    per = math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))
    return area, per, 1.0 - 2.0 * math.sqrt(math.pi * area) / per


# per region: speed [px/frame], semi-axes along x and y [px]
REGIONS = {"inlet": (2.0, 14.0, 14.0), "constriction": (8.0, 22.0, 9.0), "outlet": (3.0, 16.0, 12.0)}


def passage(miss=(), rotate=False):
    """A cell crossing the image; returns (clip, shapes)."""
    rec = ClipRecorder(8, 1000)
    x, f = 16.0, 0
    while x < 780:
        v, a, b = REGIONS[G.region(x)]
        area, per, d = ellipse(a, b)
        box = (int(x - a), int(75 - b), int(math.ceil(x + a)), int(math.ceil(75 + b)))
        det = f not in miss
        orient = math.pi / 2 if rotate else 0.0
        major, minor = 2 * max(a, b), 2 * min(a, b)
        if rotate:
            box = (int(x - b), int(75 - a), int(math.ceil(x + b)), int(math.ceil(75 + a)))
        shape = (per, d, major, minor, orient, 90.0 + (10.0 if G.region(x) == "outlet" else 0))
        rec.add(np.zeros((8, 8), np.uint8), 500 + f, 2_000_000 * f, x, 75.0, box,
                int(round(area)) if det else 0, shape if det else None)
        x += v
        f += 1
    clip = rec.build(0, TrackStatus.COMPLETE, "", 0)
    return clip, rec.shapes()


def test_feature_table_names_every_output(cfg):
    clip, shapes = passage()
    out = compute_features(clip, G, cfg, shapes=shapes)
    assert set(out) == set(FEATURES)
    assert all(isinstance(v, float) for v in out.values())


def test_deformation_area_and_inertia_of_known_ellipses(cfg):
    clip, shapes = passage()
    out = compute_features(clip, G, cfg, shapes=shapes)
    d_in, d_c, d_out = (ellipse(*REGIONS[r][1:])[2] for r in ("inlet", "constriction", "outlet"))
    assert out["deform_inlet"] == pytest.approx(d_in, abs=1e-6)
    assert out["deform_in"] == pytest.approx(d_c, abs=1e-6)
    assert out["deform_out"] == pytest.approx(d_out, abs=1e-6)
    assert out["deform"] == out["deform_in"]
    assert out["deform_max"] == pytest.approx(d_c, abs=1e-6)
    assert d_in < 1e-6 < d_out < d_c
    # the cell spends most frames in the inlet (slow): the overall median area is the inlet's
    assert out["area_msd"] == pytest.approx(round(math.pi * 14 * 14), abs=1)
    assert out["area_um"] == pytest.approx(out["area_msd"] * 0.23 ** 2)
    assert out["area_msd_in"] == pytest.approx(round(math.pi * 22 * 9), abs=1)
    assert out["inert_ratio_raw"] == pytest.approx(22 / 9, rel=1e-5)
    assert out["inert_ratio_prnc"] == pytest.approx(22 / 9, rel=1e-5)
    assert out["aspect"] == pytest.approx(44 / 18, rel=0.08)
    assert out["bright_avg"] == pytest.approx(90.0)
    # the same cell turned by 90 degrees: principal ratio unchanged, raw ratio inverted
    rot = compute_features(*passage(rotate=True)[:1], G, cfg, shapes=passage(rotate=True)[1])
    assert rot["inert_ratio_raw"] == pytest.approx(9 / 22, rel=1e-5)
    assert rot["inert_ratio_prnc"] == pytest.approx(22 / 9, rel=1e-5)
    assert rot["aspect"] < 1


def test_velocity_profile_and_transit_time(cfg):
    clip, shapes = passage()
    out = compute_features(clip, G, cfg, shapes=shapes)
    scale = 0.23 * 500.0       # px/frame -> µm/s
    for short, region in (("inlet", "inlet"), ("in", "constriction"), ("out", "outlet")):
        v = REGIONS[region][0]
        assert out[f"vel_{short}"] == pytest.approx(v, rel=1e-6)
        assert out[f"vel_{short}_um_s"] == pytest.approx(v * scale, rel=1e-6)
    # entry is crossed between an inlet step (2 px) and the constriction: within one frame
    expected = (560 - 300) / 8.0 / 500.0 * 1e3
    assert out["transit_ms"] == pytest.approx(expected, abs=2.5)


def test_missed_frames_and_edge_boxes_are_left_out(cfg):
    clip, shapes = passage(miss=set(range(0, 400, 3)))
    out = compute_features(clip, G, cfg, shapes=shapes)
    assert out["n_detected"] < out["n_frames"]
    assert out["vel_inlet"] == pytest.approx(2.0, rel=1e-6)
    assert out["deform_in"] == pytest.approx(ellipse(22, 9)[2], abs=1e-6)
    # boxes at the image edge: the cut cell's area is not the cell's area
    clip2 = passage()[0]
    boxes = clip2.boxes.copy()
    areas = clip2.areas.copy()
    areas[:100] = 50
    boxes[:100, 0] = 0
    from dataclasses import replace
    out2 = compute_features(replace(clip2, boxes=boxes, areas=areas), G, cfg)
    assert out2["area_msd"] > 50


def test_bare_clip_keeps_the_linker_shape_features(cfg):
    clip, shapes = passage()
    full = compute_features(clip, G, cfg, shapes=shapes)
    bare = compute_features(clip, G, cfg)
    assert math.isnan(bare["deform_in"]) and bare["vel_in"] == full["vel_in"]
    clip.features.update(full)
    again = compute_features(clip, G, cfg)
    assert again == pytest.approx(full, nan_ok=True)
    with pytest.raises(ValueError, match="shapes must have shape"):
        compute_features(clip, G, cfg, shapes=shapes[:3])


def test_short_clip_gives_nans_not_errors(cfg):
    rec = ClipRecorder(8, 10)
    rec.add(np.zeros((8, 8), np.uint8), 0, 0, 100.0, 75.0, (90, 65, 110, 85), 300,
            (60.0, 0.02, 20, 19, 0.0, 80.0))
    clip = rec.build(0, TrackStatus.TRUNCATED, "lost mid-channel", 0)
    out = compute_features(clip, G, cfg, shapes=rec.shapes())
    assert math.isnan(out["vel_inlet"]) and math.isnan(out["transit_ms"])
    assert math.isnan(out["deform_in"]) and out["deform_inlet"] == pytest.approx(0.02)
    assert len(SHAPE_FIELDS) == rec.shapes().shape[1]
