"""Labelled clip stores from the synthetic chip, cut at the simulator's true cell positions.

An "oracle detector": the simulator knows where every cell is in every frame, so the clips can
be cut without the front end and tracker (:mod:`engine.detect`, :mod:`engine.track`), with the
same cutter (:class:`engine.clips.ClipCutter`) that ``fmh detect`` uses. Each store is one
donor with one label: a fetal donor's cells are all fetal (cord blood) and a maternal donor's
all maternal, as in the report's data set (table 3.1). ``sim.donor_look`` sets how much donors
differ in look (illumination, focus, debris, channel position), the confound of the control
experiment.

Run as a module::

    python -m train.synth --out data/synth --donors 6 6 --frames 2000 --size 64
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engine.clipstore import ClipStoreWriter
from engine.types import CellClip, TrackStatus

__all__ = ["sim_store", "make_stores", "main"]


def sim_store(path: str | os.PathLike, cfg, *, donor: int, label: str, frames: int,
              seed: int, overrides: Mapping[str, Any] | None = None,
              complete_only: bool = True, min_frames: int = 8) -> int:
    """Simulate ``frames`` frames of one donor and write its cells' clips to ``path``.

    Parameters
    ----------
    path : path-like
        The clip store to write.
    cfg : engine.config.Config
        Base configuration (``clips.mode``/``clips.size`` set how clips are cut).
    donor : int
        Donor number (``sim.donor``: the donor's look).
    label : {"fetal", "maternal"}
        All cells of this donor get this class.
    frames : int
        Frames to simulate.
    seed : int
        ``sim.seed``.
    overrides : mapping, optional
        Further ``sim`` keys (``donor_look``, ``rate_hz``, ...).
    complete_only : bool
        Keep only cells that crossed the whole field of view (inlet to outlet).
    min_frames : int
        Drop shorter passages.

    Returns
    -------
    int
        Number of clips written.
    """
    from engine.clips import ClipCutter
    from engine.sources.sim import SyntheticChip
    if label not in ("fetal", "maternal"):
        raise ValueError(f"label {label!r} must be 'fetal' or 'maternal'")
    sim = {"seed": int(seed), "donor": int(donor),
           "fetal_fraction": 1.0 if label == "fetal" else 0.0, **dict(overrides or {})}
    cfg = cfg.replace(sim=sim)
    chip = SyntheticChip(cfg)
    images, truth = chip.render(int(frames))
    numbers = np.asarray(truth.frame_numbers, np.int64)
    cutter = ClipCutter(cfg.clips)
    name = f"d{int(donor):03d}"
    q = "&".join(f"{k}={v}" for k, v in sim.items())
    meta = {"donor": name, "label": label, "source": f"sim://?{q}&frames={frames}",
            "config": cfg.to_dict(), "oracle": "clips cut at the simulator's true positions",
            "geometry": chip.geometry.to_dict()}
    n = 0
    with ClipStoreWriter(path, meta) as w:
        for cell in truth.cells:
            if cell.cls != label:       # fetal_fraction 0 or 1: cannot happen, but be sure
                continue
            if complete_only and not cell.complete:
                continue
            fn = np.asarray(cell.frame_numbers, np.int64)
            pos = np.searchsorted(numbers, fn)
            ok = (pos < len(numbers)) & (numbers[np.minimum(pos, len(numbers) - 1)] == fn)
            if ok.sum() < min_frames:
                continue
            pos, fn = pos[ok], fn[ok]
            cen = np.asarray(cell.centroids, np.float32)[ok]
            box = np.asarray(cell.boxes, np.int32)[ok]
            area = np.asarray(cell.areas, np.int32)[ok]
            crops = np.stack([cutter(images[p], float(c[0]), float(c[1]), b)
                              for p, c, b in zip(pos, cen, box)])
            w.append(CellClip(cell_id=int(cell.cell_id), frames=crops, frame_indices=fn,
                              centroids=cen, boxes=box, areas=area,
                              status=TrackStatus.COMPLETE if cell.complete
                              else TrackStatus.TRUNCATED,
                              reason="" if cell.complete else "oracle: not a full passage",
                              features={}))
            n += 1
    return n


def make_stores(out: str | os.PathLike, *, fetal: int, maternal: int, frames: int,
                size: int = 64, mode: str = "fixed", seed: int = 0, donor_look: float = 1.0,
                first_donor: int = 0, sim: Mapping[str, Any] | None = None,
                progress: bool = True, workers: int = 1) -> list[Path]:
    """One store per donor under ``out/<donor>/clips.h5``: ``fetal`` fetal donors then
    ``maternal`` maternal donors, donors numbered from ``first_donor``."""
    from tqdm import tqdm
    labels = ["fetal"] * int(fetal) + ["maternal"] * int(maternal)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))      # donor number does not give away the label
    jobs = []
    for k in range(len(labels)):
        donor = first_donor + k
        p = Path(out) / f"d{donor:03d}" / "clips.h5"
        p.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(p), mode, int(size), donor, labels[order[k]], int(frames),
                     seed * 1000 + donor, {"donor_look": donor_look, **dict(sim or {})}))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers) as ex:
            counts = list(tqdm(ex.map(_one, jobs), total=len(jobs), desc="donors",
                               disable=not progress))
    else:
        counts = [_one(j) for j in tqdm(jobs, desc="donors", disable=not progress)]
    if progress:
        for j, n in zip(jobs, counts):
            print(f"{j[0]}: {j[4]}, {n} clips")
    return [Path(j[0]) for j in jobs]


def _one(job) -> int:
    from engine.config import load_config
    path, mode, size, donor, label, frames, seed, overrides = job
    cfg = load_config(overrides={"clips.mode": mode, "clips.size": size})
    return sim_store(path, cfg, donor=donor, label=label, frames=frames, seed=seed,
                     overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--donors", type=int, nargs=2, default=(6, 6), metavar=("FETAL", "MATERNAL"))
    ap.add_argument("--frames", type=int, default=2000, help="frames per donor")
    ap.add_argument("--size", type=int, default=64, help="clip canvas [px]")
    ap.add_argument("--mode", default="fixed", choices=["fixed", "bbox-resize"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first-donor", type=int, default=0)
    ap.add_argument("--donor-look", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=1, help="donors simulated in parallel")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="further sim.* keys, e.g. rate_hz=30")
    a = ap.parse_args(argv)
    import yaml
    extra = {}
    for s in a.set:
        k, _, v = s.partition("=")
        extra[k.strip()] = yaml.safe_load(v)
    make_stores(a.out, fetal=a.donors[0], maternal=a.donors[1], frames=a.frames, size=a.size,
                mode=a.mode, seed=a.seed, donor_look=a.donor_look, first_donor=a.first_donor,
                sim=extra, workers=a.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
