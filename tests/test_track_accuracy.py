"""Tracking accuracy against the synthetic chip's ground truth (issue 3 targets).

Targets: >= 95 % of the cells that pass completely through the recording are covered by
exactly one COMPLETE track, and identity switches stay <= 1 % of the cells.

Definitions used here:

- a clip's detections are matched to the truth cell whose centroid lies within 8 px in that
  frame; the clip's *owner* is the cell matched most often;
- a cell is *covered* when exactly one clip is owned by it and that clip is COMPLETE;
- an *identity switch* is a change of the matched truth cell between consecutive detections
  of one clip (a track that jumps from one cell to another).

Two paths: the truth itself as detections (with dropped detections, jitter and cells that touch
merged into one blob), which isolates the linker; and the real front end
(:class:`engine.detect.frontend.FrontEnd`) followed by the linker.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.config import load_config
from engine.track import Linker
from engine.types import Blob, Frame

from engine.sources import sim  # noqa: E402

# The robustness benchmark's scoring, so that tests and bench/RESULTS.md measure alike.
from bench.bench_robustness import score_clips as score  # noqa: E402

TOL_PX = 8.0
OTHER_GEOMETRY = {
    "camera.width": 640, "camera.height": 120, "chip.axis_y": 58.0,
    "chip.constriction_x0": 220.0, "chip.constriction_x1": 430.0, "chip.inlet_halfwidth": 50.0,
    "chip.outlet_halfwidth": 45.0, "chip.funnel_length": 110.0, "chip.flare_length": 60.0,
    "sim.wall_level": 95.0, "sim.speed_px_per_frame": 9.0,
}


def render(seed, rate, n, extra=None):
    cfg = load_config(overrides={"sim.seed": seed, "sim.rate_hz": rate, **(extra or {})})
    chip = sim.SyntheticChip(cfg)
    frames, truth = chip.render(n)
    return cfg, chip, frames, truth


def truth_blobs(truth, rng, *, p_miss=0.03, jitter=0.5, merge_gap=1):
    """Per frame number: blobs made from the truth, degraded like a front end would."""
    per: dict[int, list[Blob]] = {}
    for c in truth.cells:
        for f, xy, bx, a in zip(c.frame_numbers.tolist(), c.centroids, c.boxes, c.areas):
            if a < 50 or rng.random() < p_miss:
                continue
            per.setdefault(f, []).append(Blob(
                f, float(xy[0] + rng.normal(0, jitter)), float(xy[1] + rng.normal(0, jitter)),
                int(a), tuple(int(v) for v in bx), deform=0.05, major=30.0, minor=28.0,
                brightness=100.0))
    merged = 0
    for f, bl in per.items():                  # cells within merge_gap px become one blob
        out: list[Blob] = []
        for b in sorted(bl, key=lambda b: b.cx):
            for k, o in enumerate(out):
                gx = max(b.bbox[0] - o.bbox[2], o.bbox[0] - b.bbox[2])
                gy = max(b.bbox[1] - o.bbox[3], o.bbox[1] - b.bbox[3])
                if gx <= merge_gap and gy <= merge_gap:
                    a = o.area + b.area
                    box = (min(o.bbox[0], b.bbox[0]), min(o.bbox[1], b.bbox[1]),
                           max(o.bbox[2], b.bbox[2]), max(o.bbox[3], b.bbox[3]))
                    out[k] = Blob(f, (o.cx * o.area + b.cx * b.area) / a,
                                  (o.cy * o.area + b.cy * b.area) / a, a, box)
                    merged += 1
                    break
            else:
                out.append(b)
        per[f] = out
    return per, merged


def link(cfg, geometry, frames, truth, blobs_of):
    linker = Linker(cfg, geometry)
    clips = []
    live = []
    for i in range(len(frames)):
        num = int(truth.frame_numbers[i])
        frame = Frame(num, num * 2_000_000, frames[i])
        clips += linker.next_level(frame, blobs_of(frame))
        live.append(linker.live)
    clips += linker.flush()
    return linker, clips, live


def check(truth, clips, what, target=0.95):
    n, covered, switches, owners = score(truth, clips)
    assert n >= 20, f"{what}: too few complete cells ({n}) to judge"
    assert covered >= target * n, f"{what}: {covered}/{n} cells covered by one complete track"
    assert switches <= 0.01 * len(truth.cells), f"{what}: {switches} identity switches"
    # every clip that belongs to no cell is noise the linker let through: keep it rare
    assert sum(o is None for o in owners) <= max(2, 0.05 * len(clips)), what
    return covered / n


@pytest.mark.parametrize("seed,rate", [(0, 12.0), (1, 6.0), (2, 24.0)])
def test_linker_on_degraded_truth(seed, rate):
    cfg, chip, frames, truth = render(seed, rate, 2000)
    per, _ = truth_blobs(truth, np.random.default_rng(seed))
    linker, clips, live = link(cfg, chip.geometry, frames, truth,
                               lambda fr: per.get(fr.index, []))
    check(truth, clips, f"seed {seed}, {rate} cells/s")
    in_view = [len(truth.visible(int(f))) for f in truth.frame_numbers]
    assert max(live) <= max(in_view) + 4          # bounded: live tracks ~ cells in view


def test_linker_on_degraded_truth_other_geometry():
    cfg, chip, frames, truth = render(4, 15.0, 2000, OTHER_GEOMETRY)
    assert chip.geometry.width == 640
    per, _ = truth_blobs(truth, np.random.default_rng(4))
    _, clips, _ = link(cfg, chip.geometry, frames, truth, lambda fr: per.get(fr.index, []))
    check(truth, clips, "other geometry")


@pytest.mark.parametrize("seed,rate,extra", [(0, 12.0, None), (5, 20.0, None),
                                             (6, 12.0, OTHER_GEOMETRY)])
def test_frontend_and_linker_on_the_synthetic_chip(seed, rate, extra):
    from engine.detect.frontend import FrontEnd

    cfg, chip, frames, truth = render(seed, rate, 2000, extra)
    fe = FrontEnd(cfg)
    fe.prime(frames)
    _, clips, _ = link(cfg, fe.geometry, frames, truth, fe.process)
    check(truth, clips, f"front end + linker, seed {seed}, {rate} cells/s")


@pytest.mark.parametrize("seed,donor", [(201, 0), (1037, 37)])
def test_frontend_and_linker_on_a_crowded_channel(seed, donor):
    """30 cells/s: the constriction is covered by cells in most frames and cells often touch
    there. Primed as ``fmh run`` primes (the first 400 frames), these cases collapsed to
    3 % and 16 % coverage with a median background; the floor here is below the 0.95 target
    because touching cells in the constriction still cost complete tracks (0.85 with the
    true empty frame as background on the first case)."""
    from engine.detect.frontend import FrontEnd

    cfg, chip, frames, truth = render(seed, 30.0, 2000,
                                      {"sim.donor": donor, "sim.donor_look": 1.0 if donor else 0.0})
    fe = FrontEnd(cfg)
    fe.prime(frames[:400])
    _, clips, _ = link(cfg, fe.geometry, frames, truth, fe.process)
    check(truth, clips, f"crowded channel, seed {seed}, donor {donor}", target=0.85)


def test_frontend_and_linker_on_a_slow_flow():
    """Cells at 2/5 of the default speed: under 1 px per frame in the inlet (once taken for
    stuck debris and dropped) and about 650 frames per passage (once cut as "too long" at a
    512-frame cap; ``clips.max_frames`` is now 2048)."""
    from engine.detect.frontend import FrontEnd

    cfg, chip, frames, truth = render(11, 12.0, 2000, {"sim.speed_px_per_frame": 2.5})
    passage = [len(c.frame_numbers) for c in truth.cells if c.complete]
    assert min(passage) > 512
    fe = FrontEnd(cfg)
    fe.prime(frames[:400])
    _, clips, _ = link(cfg, fe.geometry, frames, truth, fe.process)
    check(truth, clips, "slow flow")


@pytest.mark.parametrize("seed,extra", [
    (11, {"sim.speed_px_per_frame": 20.0}),
    (11, {"sim.noise_sd": 4.0}),
    (12, {"sim.noise_sd": 4.0}),
    (11, {"sim.background": 80.0, "sim.wall_level": 30.0}),
    (12, {"sim.background": 80.0, "sim.wall_level": 30.0}),
], ids=["fast-flow", "noisy-camera-11", "noisy-camera-12", "dim-light-11", "dim-light-12"])
def test_frontend_and_linker_on_other_flows_and_cameras(seed, extra):
    """A flow 3x the default (about 20 px/frame in the constriction: a cell stretches by
    more than 8 px in one frame as it enters, which once read as a second cell in its blob;
    65 % of cells covered), a camera with noise sd 4 grey levels (smoothing chosen from
    the noise measured at priming; 94 % of cells covered on both seeds without it), and dim
    light (background 80 instead of 150: cells become faint rings seeded on part of their
    outline, which fixed-size regions cut into arcs; 84 % and 74 % covered before regions
    grew with their components)."""
    from engine.detect.frontend import FrontEnd

    cfg, chip, frames, truth = render(seed, 12.0, 1500, extra)
    fe = FrontEnd(cfg)
    fe.prime(frames[:400])
    _, clips, _ = link(cfg, fe.geometry, frames, truth, fe.process)
    check(truth, clips, f"seed {seed}, {extra}")
