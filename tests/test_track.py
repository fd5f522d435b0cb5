"""Linker tests on synthetic blob streams with known trajectories.

The streams are generated directly as blobs (no images): cells follow the channel's velocity
profile (slow in the inlet funnel, fast in the constriction, slower in the outlet, converging
on the axis), with missed detections, spurious blobs, near-collisions, a cell in view at start
and a cell lost mid-channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from engine.config import load_config
from engine.errors import DetectError
from engine.track import Assigner, Linker, make_predictor
from engine.track.assign import assign_greedy, assign_lsa, subnets
from engine.track.predict import TrackState
from engine.types import Blob, ChipGeometry, Frame, TrackStatus

# --------------------------------------------------------------------------------------------
# synthetic flow
# --------------------------------------------------------------------------------------------


def geometry(width=800, height=150, x0=300.0, x1=560.0, hw_c=11.0, hw_in=62.0, hw_out=62.0):
    return ChipGeometry(width=width, height=height, axis_y=height / 2, constriction_x0=x0,
                        constriction_x1=x1, constriction_halfwidth=hw_c, inlet_halfwidth=hw_in,
                        outlet_halfwidth=hw_out)


def halfwidth(g: ChipGeometry, x: float, funnel=150.0, flare=80.0) -> float:
    if x < g.constriction_x0 - funnel:
        return g.inlet_halfwidth
    if x < g.constriction_x0:
        f = (g.constriction_x0 - x) / funnel
        return g.constriction_halfwidth + f * (g.inlet_halfwidth - g.constriction_halfwidth)
    if x < g.constriction_x1:
        return g.constriction_halfwidth
    if x < g.constriction_x1 + flare:
        f = (x - g.constriction_x1) / flare
        return g.constriction_halfwidth + f * (g.outlet_halfwidth - g.constriction_halfwidth)
    return g.outlet_halfwidth


def speed(g: ChipGeometry, x: float, v_c: float) -> float:
    """Mean-flow speed [px/frame] at x: continuity, v * open width = const (floored)."""
    return max(v_c * g.constriction_halfwidth / halfwidth(g, x), 0.25 * v_c)


@dataclass
class Cell:
    cid: int
    start: int          # frame at which the cell is at (x, y)
    x: float
    y: float
    r: float = 14.0
    scale: float = 1.0  # speed relative to the flow
    lost_at: int = 10 ** 9   # no detections from this frame on
    pos: dict = field(default_factory=dict)   # frame -> (x, y) while visible


def simulate(g: ChipGeometry, cells: list[Cell], n_frames: int, *, v_c=7.0, p_miss=0.0,
             jitter=0.0, spurious=0.0, rng=None, min_area=50):
    """Per-frame blob lists plus the truth (filled into ``cell.pos``)."""
    rng = rng or np.random.default_rng(0)
    per_frame = [[] for _ in range(n_frames)]
    for c in cells:
        x, y = c.x, c.y
        for f in range(c.start, n_frames):
            if f > c.start:
                x += speed(g, x, v_c) * c.scale
                room = max(halfwidth(g, x) - c.r, 0.0)   # the walls push the cell inwards
                y = g.axis_y + min(max(y - g.axis_y, -room), room)
            if x - c.r >= g.width:
                break
            x0, x1 = max(0.0, x - c.r), min(float(g.width), x + c.r)
            if x1 <= x0:
                continue
            frac = (x1 - x0) / (2 * c.r)
            area = int(math.pi * c.r * c.r * frac)
            if area < min_area:
                continue
            c.pos[f] = (x, y)
            if f >= c.lost_at or rng.random() < p_miss:
                continue
            cx = 0.5 * (x0 + x1) + rng.normal(0, jitter) if jitter else 0.5 * (x0 + x1)
            cy = y + (rng.normal(0, jitter) if jitter else 0.0)
            box = (int(math.floor(x0)), int(math.floor(y - c.r)), int(math.ceil(x1)),
                   int(math.ceil(y + c.r)))
            per_frame[f].append(Blob(f, float(cx), float(cy), area, box, perimeter=2 * math.pi * c.r,
                                     deform=0.05, major=2 * c.r, minor=2 * c.r, brightness=100.0))
    if spurious:
        for f in range(n_frames):
            if rng.random() < spurious:
                x, y = rng.uniform(0, g.width), rng.uniform(10, g.height - 10)
                per_frame[f].append(Blob(f, x, y, 60, (int(x) - 4, int(y) - 4, int(x) + 4,
                                                       int(y) + 4)))
    return per_frame


def run_linker(cfg, g, per_frame, start_index=0):
    linker = Linker(cfg, g)
    img = np.zeros((g.height, g.width), np.uint8)
    clips, live = [], []
    for f, blobs in enumerate(per_frame):
        clips += linker.next_level(Frame(start_index + f, 1000 * f, img), blobs)
        live.append(linker.live)
    clips += linker.flush()
    return linker, clips, live


def score(clips, cells, tol=8.0):
    """Map each clip to truth cells frame by frame: (owner per clip, switches, clips per cell)."""
    owners, switches = [], 0
    for clip in clips:
        ids = []
        for f, (x, y), a in zip(clip.frame_indices, clip.centroids, clip.areas):
            if a == 0:
                continue
            best, bd = None, tol
            for c in cells:
                p = c.pos.get(int(f))
                if p is not None:
                    d = math.hypot(p[0] - x, p[1] - y)
                    # centroid of a cut cell at the image edge is the visible part's centre
                    d = min(d, abs(p[1] - y) + max(0.0, abs(p[0] - x) - c.r))
                    if d < bd:
                        best, bd = c.cid, d
            ids.append(best)
        real = [i for i in ids if i is not None]
        owner = max(set(real), key=real.count) if real else None
        owners.append(owner)
        switches += sum(1 for a, b in zip(real, real[1:]) if a != b)
    per_cell = {c.cid: owners.count(c.cid) for c in cells}
    return owners, switches, per_cell


@pytest.fixture(scope="module")
def cfg():
    return load_config()


def entering(cid, start, y, **kw):
    return Cell(cid, start, -15.0, y, **kw)


# --------------------------------------------------------------------------------------------
# predictors and assignment
# --------------------------------------------------------------------------------------------

def test_flow_predict_learns_profile_and_integrates_through_gaps():
    g = geometry()
    p = make_predictor("flow", g, bin_px=8.0)
    # teach: many tracks moving along the axis with the channel profile
    for _ in range(5):
        s = TrackState(20.0, g.axis_y, 0)
        x, f = 20.0, 0
        while x < 780:
            x += speed(g, x, 7.0)
            f += 1
            p.observe(s, x, g.axis_y, f)
    fx_in, _, known = p.field(100.0, g.axis_y)
    fx_c, _, known_c = p.field(400.0, g.axis_y)
    assert known and known_c
    assert fx_in == pytest.approx(speed(g, 100.0, 7.0), rel=0.1)
    assert fx_c == pytest.approx(7.0, rel=0.05)
    # a new track entering the constriction: predicted 5 frames ahead by integrating the field
    s = TrackState(280.0, g.axis_y, 0)
    x = 280.0
    for _ in range(5):
        x += speed(g, x, 7.0)
    px, _ = p.predict(s, 5)
    assert px == pytest.approx(x, abs=3.0)
    # constant velocity would be far off: it has no velocity yet and uses the prior 0
    v = make_predictor("velocity", g)
    assert v.predict(TrackState(280.0, g.axis_y, 0), 5)[0] == 280.0


def test_flow_predict_falls_back_to_own_velocity_then_prior():
    g = geometry()
    p = make_predictor("flow", g, prior_vx=2.0)
    s = TrackState(100.0, 70.0, 0)
    assert p.predict(s, 3) == (106.0, 70.0)        # prior
    p.observe(s, 104.0, 71.0, 1, learn=False)
    assert p.predict(s, 2) == (108.0, 72.0)        # own velocity, 1 frame on
    with pytest.raises(ValueError, match="unknown predictor 'kalman'"):
        make_predictor("kalman", g)


def test_subnets_and_strategies():
    links = {(0, 0): 0.1, (0, 1): 0.2, (1, 1): 0.1, (2, 5): 0.3}
    nets = subnets(links)
    assert sorted(nets) == [([0, 1], [0, 1]), ([2], [5])]
    # the classic case where greedy is wrong: track 0 is nearest to blob 1, but only track 0
    # can reach blob 0
    costs = {(0, 0): 0.5, (0, 1): 0.1, (1, 1): 0.2}
    assert sorted(assign_lsa([0, 1], [0, 1], costs, 1.0)) == [(0, 0), (1, 1)]
    assert sorted(assign_greedy([0, 1], [0, 1], costs, 1.0)) == [(0, 1)]
    a = Assigner("lsa")
    assert sorted(a(costs, 1.0)) == [(0, 0), (1, 1)]
    assert a.stats["contested"] == 1
    capped = Assigner("lsa", max_subnet=1)
    assert sorted(capped(costs, 1.0)) == [(0, 1)]
    assert capped.stats["ambiguous"] == 1
    with pytest.raises(ValueError, match="unknown assignment strategy 'hungry'"):
        Assigner("hungry")


# --------------------------------------------------------------------------------------------
# the linker
# --------------------------------------------------------------------------------------------

def test_clean_stream_one_complete_track_per_cell(cfg):
    g = geometry()
    cells = [entering(i, 40 * i, 40 + (i * 37) % 70) for i in range(12)]
    per_frame = simulate(g, cells, 900)
    linker, clips, live = run_linker(cfg, g, per_frame)
    owners, switches, per_cell = score(clips, cells)
    assert switches == 0
    assert all(n == 1 for n in per_cell.values()), per_cell
    assert all(c.status is TrackStatus.COMPLETE and c.reason == "" for c in clips)
    assert linker.stats["complete"] == 12 and linker.stats["truncated"] == 0
    # frames of a clip: consecutive, from entry to the last frame with more than a sliver of
    # the cell in the next one; the slivers after it are absorbed, not new tracks
    absorbed = 0
    for clip, owner in zip(clips, owners):
        cell = cells[owner]
        assert clip.frame_indices[0] == min(cell.pos)
        last = _last_useful(cell, per_frame, g.width, cfg.frontend.min_area)
        end = int(clip.frame_indices[-1])
        assert last <= end <= last + 1          # + 1: the learned flow's lag at the edge
        assert end < max(f for f in cell.pos if _blob_of(cell, per_frame, f))
        absorbed += sum(1 for f in cell.pos if f > end and _blob_of(cell, per_frame, f))
        assert np.all(np.diff(clip.frame_indices) == 1)
        assert clip.t0_ns == 1000 * clip.frame_indices[0]
        assert clip.t_exit_ns >= 1000 * clip.frame_indices[-1]
    assert max(live) <= max(len(b) for b in per_frame)
    assert linker.stats["remnants"] == absorbed > 0


def _blob_of(cell, per_frame, f):
    """The simulated blob of ``cell`` in frame ``f`` (nearest centroid), or None."""
    if f not in cell.pos or f >= len(per_frame) or not per_frame[f]:
        return None
    x, y = cell.pos[f]
    b = min(per_frame[f], key=lambda b: (b.cx - x) ** 2 + (b.cy - y) ** 2)
    return b if abs(b.cx - x) < 20 and abs(b.cy - y) < 20 else None


def _last_useful(cell, per_frame, width, min_area):
    """The frame a leaving cell's track ends with: the first one cut by the right edge after
    which the part of its box still in view, filled as the blob fills its box and moved by
    the cell's true motion (exactly predictable here), is under twice the smallest blob."""
    for f in sorted(cell.pos):
        b = _blob_of(cell, per_frame, f)
        if b is None or b.bbox[2] < width:
            continue
        x0, y0, x1, y1 = b.bbox
        fill = min(b.area / max((x1 - x0) * (y1 - y0), 1), 1.0)
        left = x0 + (cell.pos[f + 1][0] - cell.pos[f][0]) if f + 1 in cell.pos else width
        if fill * (width - left) * (y1 - y0) < 2 * min_area:
            return f
    raise AssertionError("the cell never leaves")


def test_missed_detections_jitter_and_spurious_blobs(cfg):
    g = geometry()
    rng = np.random.default_rng(3)
    cells = [entering(i, 45 * i, rng.uniform(30, 120)) for i in range(20)]
    per_frame = simulate(g, cells, 1300, p_miss=0.08, jitter=0.8, spurious=0.05, rng=rng)
    linker, clips, _ = run_linker(cfg, g, per_frame)
    owners, switches, per_cell = score(clips, cells)
    assert switches == 0
    assert all(n == 1 for n in per_cell.values()), per_cell
    real = [c for c, o in zip(clips, owners) if o is not None]
    assert all(c.status is TrackStatus.COMPLETE for c in real)
    assert linker.stats["gap_frames"] > 0
    assert linker.stats["dropped_short"] > 0          # the spurious blobs
    # missed frames are in the clip with area 0, at the predicted position
    gaps = np.concatenate([c.areas for c in real]) == 0
    assert gaps.any()


def test_gap_longer_than_max_gap_splits_and_marks_lost(cfg):
    g = geometry()
    cell = entering(0, 0, 75.0)
    per_frame = simulate(g, [cell], 400)
    # remove 6 consecutive detections in the constriction
    frames_c = [f for f, (x, _) in sorted(cell.pos.items()) if 350 < x < 500][:6]
    for f in frames_c:
        per_frame[f] = []
    linker, clips, _ = run_linker(cfg, g, per_frame)
    assert len(clips) == 2
    assert clips[0].status is TrackStatus.TRUNCATED and clips[0].reason == "lost mid-channel"
    assert clips[1].reason == "appeared mid-channel"
    # a gap of max_gap frames is bridged
    cell = entering(0, 0, 75.0)
    per_frame = simulate(g, [cell], 400)
    for f in frames_c[:cfg.tracker.max_gap]:
        per_frame[f] = []
    _, clips, _ = run_linker(cfg, g, per_frame)
    assert len(clips) == 1 and clips[0].status is TrackStatus.COMPLETE
    assert (clips[0].areas == 0).sum() == cfg.tracker.max_gap


@pytest.mark.parametrize("dy", [24.0, 28.0, 32.0, 40.0])
def test_near_collisions_keep_identities(cfg, dy):
    """Two cells side by side in the inlet, one faster, converging: no swap, no merge loss."""
    g = geometry()
    a = Cell(0, 5, -15.0, 75.0 - dy / 2)
    b = Cell(1, 0, -15.0, 75.0 + dy / 2, scale=1.15)     # slightly ahead and faster
    # a third cell following closely behind a (about one diameter apart at the slowest)
    c = Cell(2, 25, -15.0, 75.0 - dy / 2)
    # teach the flow with a few cells first, then the close encounter
    lead = [entering(10 + i, 40 * i, 75.0) for i in range(4)]
    for cell in (a, b, c):
        cell.start += 200
    cells = lead + [a, b, c]
    per_frame = simulate(g, cells, 700)
    _, clips, _ = run_linker(cfg, g, per_frame)
    owners, switches, per_cell = score(clips, cells)
    assert switches == 0
    assert all(n == 1 for n in per_cell.values()), per_cell


def test_merged_cells_are_carried_through_contact(cfg):
    """Two cells touching for a few frames give one big blob: both tracks survive."""
    g = geometry()
    lead = [entering(10 + i, 40 * i, 75.0) for i in range(4)]
    a = Cell(0, 200, -15.0, 60.0)
    b = Cell(1, 218, -15.0, 92.0)      # one diameter behind a, lower in the funnel
    cells = lead + [a, b]
    per_frame = simulate(g, cells, 700)
    # replace the two blobs by one merged blob for 6 frames while both are in the inlet
    merged_frames = [f for f in range(280, 286)]
    for f in merged_frames:
        bl = [x for x in per_frame[f] if x.cy > 50]
        pa = min(bl, key=lambda x: abs(x.cy - a.pos[f][1]))
        pb = min(bl, key=lambda x: abs(x.cy - b.pos[f][1]))
        rest = [x for x in per_frame[f] if x is not pa and x is not pb]
        box = (min(pa.bbox[0], pb.bbox[0]), min(pa.bbox[1], pb.bbox[1]),
               max(pa.bbox[2], pb.bbox[2]), max(pa.bbox[3], pb.bbox[3]))
        m = Blob(f, (pa.cx + pb.cx) / 2, (pa.cy + pb.cy) / 2, pa.area + pb.area, box)
        per_frame[f] = rest + [m]
    linker, clips, _ = run_linker(cfg, g, per_frame)
    owners, switches, per_cell = score(clips, cells)
    assert switches == 0
    assert per_cell[0] == 1 and per_cell[1] == 1, per_cell
    assert linker.stats["merged_frames"] >= 2 * len(merged_frames) - 2
    for clip, o in zip(clips, owners):
        if o in (0, 1):
            assert clip.status is TrackStatus.COMPLETE


def test_in_view_at_start_lost_mid_channel_and_end_of_stream(cfg):
    g = geometry()
    cells = [Cell(0, 0, 420.0, 75.0),              # in the constriction when recording starts
             entering(1, 0, 75.0, lost_at=150),    # lost mid-channel
             entering(2, 260, 75.0)]               # still in view at the end
    per_frame = simulate(g, cells, 330)
    linker, clips, live = run_linker(cfg, g, per_frame)
    owners, switches, per_cell = score(clips, cells)
    by_owner = dict(zip(owners, clips))
    assert set(by_owner) == {0, 1, 2}
    assert by_owner[0].status is TrackStatus.TRUNCATED
    assert by_owner[0].reason == "in view at start"
    assert by_owner[1].reason == "lost mid-channel"
    assert by_owner[2].reason == "end of stream"
    assert all(by_owner[k].status is TrackStatus.TRUNCATED for k in (0, 1, 2))
    # the lost cell is emitted max_gap + 1 frames after its last detection, not at the end
    assert by_owner[1].t_exit_ns == 1000 * (149 + cfg.tracker.max_gap + 1)
    assert linker.live == 0


def test_flush_emits_each_live_track_once(cfg):
    g = geometry()
    cells = [entering(i, 10 * i, 40 + 25 * i) for i in range(3)]
    per_frame = simulate(g, cells, 80)
    linker = Linker(cfg, g)
    img = np.zeros((g.height, g.width), np.uint8)
    out = []
    for f, blobs in enumerate(per_frame):
        out += linker.next_level(Frame(f, f, img), blobs)
    assert out == [] and linker.live == 3
    rest = linker.flush()
    assert len(rest) == 3 and {c.reason for c in rest} == {"end of stream"}
    assert sorted(c.cell_id for c in rest) == [0, 1, 2]
    assert linker.flush() == [] and linker.live == 0


def test_bounded_live_tracks_over_a_long_stream(cfg):
    g = geometry()
    rng = np.random.default_rng(5)
    cells = [entering(i, 30 * i, rng.uniform(30, 120)) for i in range(60)]
    per_frame = simulate(g, cells, 2000, p_miss=0.05, spurious=0.1, rng=rng)
    linker, clips, live = run_linker(cfg, g, per_frame)
    in_view = [sum(f in c.pos for c in cells) for f in range(len(per_frame))]
    # live tracks: the cells in view, plus the few spurious blobs waiting out their gap
    assert max(live) <= max(in_view) + 3
    assert live[-1] <= in_view[-1] + 3
    assert linker.stats["live_max"] == max(live)
    owners, switches, per_cell = score(clips, cells)
    assert switches == 0
    assert sum(n == 1 for n in per_cell.values()) >= 59


def test_too_long_track_is_emitted_once_and_kept_as_tail(cfg):
    g = geometry()
    small = cfg.replace(clips={"max_frames": 40})
    cell = entering(0, 0, 75.0)
    per_frame = simulate(g, [cell], 400)
    _, clips, _ = run_linker(small, g, per_frame)
    assert len(clips) == 1
    assert clips[0].n_frames == 40 and clips[0].reason == "too long"


def test_static_debris_is_dropped(cfg):
    g = geometry()
    per_frame = [[Blob(f, 200.0, 40.0, 80, (195, 35, 205, 45))] for f in range(100)]
    linker, clips, _ = run_linker(cfg, g, per_frame)
    assert clips == [] and linker.stats["dropped_static"] == 1


def test_camera_gaps_in_frame_numbers(cfg):
    """Frames the camera lost: numbers skip, the flow carries the prediction across."""
    g = geometry()
    lead = [entering(10 + i, 40 * i, 75.0) for i in range(4)]
    cell = entering(0, 200, 75.0)
    per_frame = simulate(g, lead + [cell], 600)
    linker = Linker(cfg, g)
    img = np.zeros((g.height, g.width), np.uint8)
    clips = []
    # 4 frames lost by the camera while the cell accelerates into the constriction
    lost = set([f for f, (x, _) in sorted(cell.pos.items()) if x > 270][:4])
    for f, blobs in enumerate(per_frame):
        if f in lost:
            continue
        clips += linker.next_level(Frame(f, f, img), blobs)
    clips += linker.flush()
    owners, switches, per_cell = score(clips, lead + [cell])
    assert per_cell[0] == 1 and switches == 0
    clip = clips[owners.index(0)]
    assert not set(clip.frame_indices.tolist()) & lost
    assert clip.status is TrackStatus.COMPLETE


def test_greedy_and_lsa_are_both_usable(cfg):
    g = geometry()
    cells = [entering(i, 40 * i, 75.0) for i in range(5)]
    per_frame = simulate(g, cells, 500)
    for name in ("lsa", "greedy"):
        c2 = cfg.replace(tracker={"assign": name})
        _, clips, _ = run_linker(c2, g, per_frame)
        assert len(clips) == 5


def test_frame_validation(cfg):
    g = geometry()
    linker = Linker(cfg, g)
    with pytest.raises(DetectError, match=r"shape \(10, 10\)"):
        linker.next_level(Frame(0, 0, np.zeros((10, 10), np.uint8)), [])
    img = np.zeros((g.height, g.width), np.uint8)
    linker.next_level(Frame(5, 0, img), [])
    with pytest.raises(DetectError, match="frame number 5 does not follow 5"):
        linker.next_level(Frame(5, 0, img), [])


def test_features_attached_to_clips(cfg):
    g = geometry()
    cells = [entering(0, 0, 75.0)]
    per_frame = simulate(g, cells, 400)
    _, clips, _ = run_linker(cfg, g, per_frame)
    f = clips[0].features
    assert f["deform"] == pytest.approx(0.05)
    assert f["vel_in"] == pytest.approx(7.0, rel=0.05)
    assert f["vel_inlet"] < f["vel_in"]
    assert f["transit_ms"] == pytest.approx(260 / 7.0 / cfg.camera.fps * 1e3, rel=0.05)


def test_fast_flow_needs_the_learned_flow(cfg):
    """25 px/frame in the constriction (twice the gate) with 10 % missed detections: once the
    first cells have taught the field, every later cell is tracked; the constant-velocity and
    static models lose many (they cannot follow the acceleration into the constriction)."""
    g = geometry()
    covered = {}
    for pred in ("flow", "velocity", "null"):
        rng = np.random.default_rng(3)
        cells = [entering(i, 45 * i, rng.uniform(30, 120)) for i in range(20)]
        per_frame = simulate(g, cells, 1300, v_c=25.0, p_miss=0.1, jitter=0.8, rng=rng)
        _, clips, _ = run_linker(cfg.replace(tracker={"predictor": pred}), g, per_frame)
        owners, switches, per_cell = score(clips, cells)
        assert switches == 0
        covered[pred] = sum(1 for c, o in zip(clips, owners)
                            if o is not None and o >= 5 and per_cell[o] == 1
                            and c.status is TrackStatus.COMPLETE)
    assert covered["flow"] == 15
    assert covered["velocity"] <= 12 and covered["null"] <= 2


def test_cell_leaving_on_the_right_closes_with_its_last_useful_frame(cfg):
    """An exit ends the track with the frame after which too little of the cell will be in
    view (no max_gap wait, not even one frame: it only delays classification); the slivers
    still detected after it are absorbed, not new tracks."""
    g = geometry()
    cell = entering(0, 0, 75.0)
    per_frame = simulate(g, [cell], 400)
    last = max(f for f, blobs in enumerate(per_frame) if blobs)
    useful = _last_useful(cell, per_frame, g.width, cfg.frontend.min_area)
    assert useful < last                       # the simulated cell leaves slivers behind
    linker = Linker(cfg, g)
    img = np.zeros((g.height, g.width), np.uint8)
    closed = [f for f, blobs in enumerate(per_frame)
              if linker.next_level(Frame(f, 1000 * f, img), blobs)]
    assert len(closed) == 1 and useful <= closed[0] <= useful + 1 and closed[0] < last, \
        (closed, useful, last)                     # + 1: the learned flow's lag at the edge
    assert linker.stats["remnants"] == last - closed[0] and linker.stats["tracks_started"] == 1


def test_a_miss_at_the_right_edge_ends_the_track_without_splitting_it(cfg):
    """A cell cut by the right edge and then missed has left as far as its clip is
    concerned: the track ends at once, and the rest of the cell, detected again in the
    following frames, is absorbed instead of starting a second (truncated) track."""
    g = geometry()
    cell = entering(0, 0, 75.0)
    per_frame = simulate(g, [cell], 400)
    touch = min(f for f, blobs in enumerate(per_frame) if blobs and blobs[0].bbox[2] >= g.width)
    after = sum(1 for f in range(touch + 2, len(per_frame)) if per_frame[f])
    per_frame[touch + 1] = []                          # most of the cell is still in view
    linker, clips, _ = run_linker(cfg, g, per_frame)
    assert len(clips) == 1 and clips[0].status is TrackStatus.COMPLETE
    assert clips[0].frame_indices[-1] == touch
    assert linker.stats["remnants"] == after > 2 and linker.stats["tracks_started"] == 1
    # a blob cut by the edge with no exit above it starts a track as before
    stray = [[] for _ in range(5)]
    stray[3] = [Blob(3, g.width - 10.0, 140.0, 300, (g.width - 20, 130, g.width, 150))]
    linker2, clips2, _ = run_linker(cfg, g, stray)
    assert linker2.stats["tracks_started"] == 1 and linker2.stats["remnants"] == 0


def test_a_sliver_too_small_to_be_seen_again_ends_the_track_with_its_frame(cfg):
    """The part of a leaving cell predicted for the next frame is under twice the smallest
    blob: the track ends with the frame it was seen in, one frame before the first missing
    one (with min_area alone: 3 frames later; each frame is 2 ms of latency)."""
    g = geometry()
    min_area = cfg.frontend.min_area
    per_frame = simulate(g, [entering(0, 0, 75.0)], 400)
    edge = [f for f, blobs in enumerate(per_frame) if blobs and blobs[0].bbox[2] >= g.width]
    # the last frame whose blob leaves a next-frame sliver in [min_area, 2 min_area)
    k = max(f for f in edge[:-1] if min_area <= per_frame[f + 1][0].area < 2 * min_area)
    for f in range(k + 1, len(per_frame)):
        per_frame[f] = []                              # the front end sees no more of it
    linker = Linker(cfg, g)
    img = np.zeros((g.height, g.width), np.uint8)
    closed = [f for f, blobs in enumerate(per_frame)
              if linker.next_level(Frame(f, 1000 * f, img), blobs)]
    assert closed == [k], (closed, k)


def test_a_cell_carried_out_to_the_exit_in_a_shared_blob_has_exited(cfg):
    """Two cells that touch near the outlet share one blob (each track is carried with it)
    out to the right edge, where the blob is no longer shared out and both tracks end. Each
    must end as an exit (a complete clip), though neither was seen alone at the edge, and
    what is left of them is absorbed. (The trailing cell's clip loses its last frames at the
    image edge; before the tracks ended at once there, both ended as "lost mid-channel".)"""
    from engine.track.linker_py import PyLinker
    g = geometry()
    lead, trail = entering(0, 0, 60.0), entering(1, 8, 90.0)     # told apart by y at the inlet
    per_frame = simulate(g, [lead, trail], 400)
    merged = 0
    for f, bl in enumerate(per_frame):
        if len(bl) == 2 and max(b.bbox[2] for b in bl) >= g.width - 110:
            a, b = sorted(bl, key=lambda b: b.cx)
            box = (a.bbox[0], min(a.bbox[1], b.bbox[1]), b.bbox[2], max(a.bbox[3], b.bbox[3]))
            per_frame[f] = [Blob(f, (a.cx * a.area + b.cx * b.area) / (a.area + b.area), 75.0,
                                 a.area + b.area, box, perimeter=a.perimeter + b.perimeter,
                                 deform=0.3)]
            merged += 1
    assert merged > 3
    for linker_cls in (Linker, PyLinker):
        linker, clips = linker_cls(cfg, g), []
        img = np.zeros((g.height, g.width), np.uint8)
        for f, blobs in enumerate(per_frame):
            clips += linker.next_level(Frame(f, 1000 * f, img), blobs)
        clips += linker.flush()
        owners, switches, per_cell = score(clips, [lead, trail], tol=2.0)   # exact positions
        got = [(c.status, c.reason, o) for c, o in zip(clips, owners)]
        assert sorted(owners) == [0, 1], (linker_cls.__name__, got)
        assert all(c.status is TrackStatus.COMPLETE for c in clips), (linker_cls.__name__, got)
        assert linker.stats["remnants"] > 0


def test_a_large_cell_stepping_back_at_the_constriction_keeps_its_track(cfg):
    """Cells never flow backwards, but the centroid of a large cell that deforms while it
    waits at the constriction's mouth can step back by more than tracker.max_back_px (2 px):
    the allowance grows with the typical cell (a tenth of its diameter), so the track is not
    broken in two (it was, with a fixed 2 px: a "lost" and an "appeared mid-channel" half)."""
    from engine.track.linker_py import PyLinker
    g = geometry()
    r = 21.0                                        # 42 px cells, area about 1400 px²

    def blob(f, x):
        return Blob(f, x, 75.0, int(math.pi * r * r * (0.85 if x - r < 0 or x + r > g.width
                                                        else 1.0)),
                    (max(0, int(x - r)), 54, min(g.width, int(x + r) + 1), 97),
                    perimeter=2 * math.pi * r, deform=0.1)
    xs, x = [], -45.0                               # enters after a few empty frames
    for f in range(400):
        x += -2.8 if f in (160, 161) else 3.0        # two steps back, 5.6 px in all
        xs.append(x)
    per_frame = [[blob(f, x)] if -r < x < g.width + r - 6 else [] for f, x in enumerate(xs)]
    for linker_cls in (Linker, PyLinker):
        linker = linker_cls(cfg, g)
        img = np.zeros((g.height, g.width), np.uint8)
        clips = []
        for f, blobs in enumerate(per_frame):
            clips += linker.next_level(Frame(f, 1000 * f, img), blobs)
        clips += linker.flush()
        assert len(clips) == 1 and clips[0].status is TrackStatus.COMPLETE, \
            (linker_cls.__name__, [(c.status, c.reason) for c in clips])
        assert linker.stats["tracks_started"] == 1


# --------------------------------------------------------------------------------------------
# the kernel linker against the plain-Python reference
# --------------------------------------------------------------------------------------------

def _merge_pairs(per_frame, rng, p=0.15):
    """Replace pairs of nearby blobs by one merged blob in some frames (shared-blob path)."""
    out = []
    for f, bl in enumerate(per_frame):
        bl = list(bl)
        if len(bl) >= 2 and rng.random() < p:
            bl.sort(key=lambda b: b.cx)
            k = int(np.argmin([b2.cx - b1.cx for b1, b2 in zip(bl, bl[1:])]))
            a, b = bl[k], bl[k + 1]
            if b.cx - a.cx < 45:
                box = (min(a.bbox[0], b.bbox[0]), min(a.bbox[1], b.bbox[1]),
                       max(a.bbox[2], b.bbox[2]), max(a.bbox[3], b.bbox[3]))
                bl[k:k + 2] = [Blob(f, (a.cx + b.cx) / 2, (a.cy + b.cy) / 2, a.area + b.area,
                                    box, perimeter=a.perimeter + b.perimeter, deform=0.3)]
        out.append(bl)
    return out


def _same_clips(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("cell_id", "status", "reason", "t0_ns", "t_exit_ns"):
            assert getattr(x, name) == getattr(y, name), name
        for name in ("frames", "frame_indices", "centroids", "boxes", "areas"):
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v), name
        assert x.features.keys() == y.features.keys()
        for k in x.features:
            assert x.features[k] == y.features[k] or (math.isnan(x.features[k])
                                                      and math.isnan(y.features[k])), k


@pytest.mark.parametrize("variant", [
    {}, {"tracker": {"predictor": "velocity"}}, {"tracker": {"predictor": "null"}},
    {"tracker": {"assign": "greedy"}}, {"clips": {"max_frames": 30}},
    {"clips": {"mode": "bbox-resize", "size": 24}}])
def test_kernel_linker_equals_the_python_reference(cfg, variant):
    """Dense streams (missed and spurious blobs, jitter, merged pairs, near-collisions, cells
    in view at start and lost, camera gaps): the kernel linker's clips (crops, numbers,
    status, features) and counters equal the plain-Python PyLinker's."""
    from engine.track.linker_py import PyLinker
    c = cfg.replace(**variant) if variant else cfg
    g = geometry()
    rng = np.random.default_rng(11)
    cells = [entering(i, 14 * i, rng.uniform(35, 115), scale=rng.uniform(0.8, 1.2))
             for i in range(30)] + [Cell(100, 0, 420.0, 75.0), Cell(101, 0, 200.0, 60.0),
                                    entering(102, 30, 75.0, lost_at=120)]
    per_frame = simulate(g, cells, 500, p_miss=0.08, jitter=0.7, spurious=0.2, rng=rng)
    per_frame = _merge_pairs(per_frame, rng)
    img = rng.integers(0, 256, (g.height, g.width), dtype=np.uint8)
    skip = {60, 61, 200}                        # frame numbers the camera lost
    out = []
    for cls in (Linker, PyLinker):
        linker = cls(c, g)
        clips, live = [], []
        for f, blobs in enumerate(per_frame):
            if f in skip:
                continue
            clips += linker.next_level(Frame(f, 10**18 + 1000 * f, img), blobs)
            live.append(linker.live)
        clips += linker.flush()
        out.append((clips, live, dict(linker.stats)))
    (ka, la, sa), (kb, lb, sb) = out
    assert sa["merged_frames"] > 0 and sa["gap_frames"] > 0 and sa["tracks_started"] > 30
    assert la == lb and sa == sb
    _same_clips(ka, kb)


def test_linker_reads_the_front_ends_array_like_the_blob_values(cfg):
    """Blobs handed over as the front end's BlobList (linked from its ``fin`` array) give the
    same clips as the same blobs in a plain list (read value by value)."""
    from engine.detect.blobs import FIELDS, to_blobs
    g = geometry()
    rng = np.random.default_rng(5)
    cells = [entering(i, 20 * i, rng.uniform(40, 110)) for i in range(15)]
    per_frame = _merge_pairs(simulate(g, cells, 400, p_miss=0.05, jitter=0.5, rng=rng), rng)

    def as_blob_list(f, blobs):
        fin = np.zeros((len(blobs), len(FIELDS)))
        for k, b in enumerate(blobs):
            fin[k, :13] = (b.area, b.cx, b.cy, *b.bbox, b.perimeter, b.deform, b.major,
                           b.minor, b.orientation, b.brightness)
        out = to_blobs(fin, f)
        assert list(out) == [b._replace(area=int(b.area), bbox=tuple(b.bbox)) for b in blobs]
        return out

    img = rng.integers(0, 256, (g.height, g.width), dtype=np.uint8)
    results = []
    for wrap in (as_blob_list, lambda f, blobs: list(blobs)):
        linker = Linker(cfg, g)
        clips = []
        for f, blobs in enumerate(per_frame):
            clips += linker.next_level(Frame(f, f, img), wrap(f, blobs))
        results.append((clips + linker.flush(), dict(linker.stats)))
    assert results[0][1] == results[1][1] and results[0][1]["merged_frames"] > 0
    _same_clips(results[0][0], results[1][0])
