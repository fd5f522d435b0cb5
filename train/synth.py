"""Labelled clip stores from the synthetic chip: one simulated sequence = one donor = one store.

Two ways to cut the clips (``--clips``):

``detect`` (the default)
    Run the simulated sequence through the real front end and tracker, exactly as
    ``fmh detect sim://?... --donor D --label L`` does (:func:`engine.pipeline.run_pipeline`
    with ``write_clips=True``): the clips, with their detected centroids, positions predicted
    through missed frames, merged and split blobs and truncated tracks, are the ones
    ``fmh run`` classifies, so a model trained and validated on them is measured on what it
    will serve. Each donor's folder holds the run files (``manifest.json``,
    ``tracks.parquet``, ``cells.parquet``) beside ``clips.h5``, and ``truth_match.json``: the
    tracked cells matched to the simulator's true cells (:mod:`train.simcheck`).
``truth``
    An "oracle detector": cut at the simulator's TRUE cell positions with the same cutter
    (:class:`engine.clips.ClipCutter`), complete passages only by default. Faster, but the
    clips differ from those serving sees (train/serve skew: the first demo models, trained on
    these, over-called fetal cells in ``fmh demo``; docs/experiments.md).

Which tracks are kept (``--status``): ``all`` (default for ``detect``: serving classifies
every clip the tracker emits, complete and truncated, and the report counts them all) or
``complete`` (default for ``truth``).

A fetal donor's cells are all fetal (cord blood) and a maternal donor's all maternal
(``sim.fetal_fraction`` 1 or 0), as in the report's data set (table 3.1). ``sim.donor_look``
sets how much donors differ in look (illumination, focus, debris, channel position), the
confound of the control experiment.

Run as a module::

    python -m train.synth --out data/synth --donors 6 6 --frames 2000 --size 64
    python -m train.synth --out data/oracle --clips truth ...      # true positions
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engine.clipstore import ClipStoreWriter
from engine.types import CellClip, TrackStatus

__all__ = ["CUTS", "STATUSES", "sim_store", "detect_store", "keep_complete", "make_stores",
           "main"]

CUTS = ("detect", "truth")          # how clips are cut: real front end + tracker, or true positions
STATUSES = ("all", "complete")     # which tracks are kept


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
    sim, cfg = _donor_sim(cfg, donor, label, seed, overrides)
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


def _donor_sim(cfg, donor: int, label: str, seed: int, overrides: Mapping[str, Any] | None):
    """The ``sim`` keys of one donor's sequence and ``cfg`` with them set."""
    if label not in ("fetal", "maternal"):
        raise ValueError(f"label {label!r} must be 'fetal' or 'maternal'")
    sim = {"seed": int(seed), "donor": int(donor),
           "fetal_fraction": 1.0 if label == "fetal" else 0.0, **dict(overrides or {})}
    return sim, cfg.replace(sim=sim)


def detect_store(out_dir: str | os.PathLike, cfg, *, donor: int, label: str, frames: int,
                 seed: int, overrides: Mapping[str, Any] | None = None,
                 complete_only: bool = False, match_truth: bool = True) -> int:
    """Simulate one donor and cut its clips with the real front end and tracker.

    The same call as ``fmh detect "sim://?seed=S&donor=D&fetal_fraction=F&...&frames=N"
    --out out_dir --donor dDDD --label L`` (:func:`engine.pipeline.run_pipeline`, no
    classification), so the store holds exactly the clips ``fmh run`` would classify for this
    sequence: every track the tracker emits, complete and truncated.

    Parameters
    ----------
    out_dir : path-like
        The run folder: ``clips.h5`` (donor ``dDDD``, the label), ``manifest.json``,
        ``tracks.parquet``, ``cells.parquet`` and, with ``match_truth``, ``truth_match.json``.
    cfg : engine.config.Config
        Base configuration (front end, tracker, ``clips.mode``/``clips.size``).
    donor : int
        Donor number (``sim.donor``: the donor's look).
    label : {"fetal", "maternal"}
        All cells of this donor are of this class (``sim.fetal_fraction`` 1 or 0).
    frames : int
        Frames to simulate.
    seed : int
        ``sim.seed``.
    overrides : mapping, optional
        Further ``sim`` keys (``donor_look``, ``rate_hz``, ...).
    complete_only : bool
        Afterwards drop the truncated clips from ``clips.h5`` (serving classifies them too).
    match_truth : bool
        Match the tracked cells to the simulator's true cells and write ``truth_match.json``
        (counts of real cells, non-cells and cells of the wrong class; the last is 0 by
        construction for a one-class donor).

    Returns
    -------
    int
        Number of clips in the store.

    Raises
    ------
    engine.errors.EngineError
        The detection run did not complete.
    """
    from engine.errors import EngineError
    from engine.pipeline import RunOptions, run_pipeline
    sim, cfg = _donor_sim(cfg, donor, label, seed, overrides)
    out = Path(out_dir)
    name = f"d{int(donor):03d}"
    uri = "sim://?" + "&".join(f"{k}={v}" for k, v in sim.items()) + f"&frames={int(frames)}"
    summary = run_pipeline(cfg, RunOptions(source=uri, out=out, write_clips=True,
                                           classify=False, progress=False, donor=name,
                                           label=label))
    if summary.status != "complete":
        raise EngineError(f"{uri}: detection run in {out} ended {summary.status!r}")
    n = int(summary.counts.get("clips_written") or 0)
    if complete_only:
        n = keep_complete(out / "clips.h5")
    if match_truth:
        from train.simcheck import check_run
        res = check_run(out)
        res["label"] = label
        res["clips_in_store"] = n
        res["complete_only"] = bool(complete_only)
        res["tracked_cells_of_other_class"] = int(res["cells"]["matched"]
                                                  - res["cells"]["matched_" + label])
        (out / "truth_match.json").write_text(json.dumps(res, indent=1))
    return n


def keep_complete(path: str | os.PathLike) -> int:
    """Rewrite the clip store ``path`` keeping only its complete clips; returns how many."""
    from engine.clipstore import ClipStoreReader
    path = Path(path)
    tmp = path.with_name(path.stem + ".complete.tmp.h5")
    n = 0
    with ClipStoreReader(path) as r:
        meta = {"donor": r.meta["donor"], "label": r.meta["label"],
                "source": r.meta["source"], "config": r.meta["config"],
                **dict(r.meta["extra"] or {}), "kept": "complete clips only"}
        with ClipStoreWriter(tmp, meta) as w:
            for clip in r:
                if clip.status == TrackStatus.COMPLETE:
                    w.append(clip)
                    n += 1
    os.replace(tmp, path)
    return n


def make_stores(out: str | os.PathLike, *, fetal: int, maternal: int, frames: int,
                size: int = 64, mode: str = "fixed", seed: int = 0, donor_look: float = 1.0,
                first_donor: int = 0, sim: Mapping[str, Any] | None = None,
                progress: bool = True, workers: int = 1, clips: str = "detect",
                status: str | None = None) -> list[Path]:
    """One store per donor under ``out/<donor>/clips.h5``: ``fetal`` fetal donors then
    ``maternal`` maternal donors, donors numbered from ``first_donor``; labels are shuffled
    over the donor numbers with ``seed``.

    ``clips`` is "detect" (the real front end and tracker, :func:`detect_store`) or "truth"
    (true positions, :func:`sim_store`); ``status`` is "all" or "complete" (default: "all"
    for "detect", "complete" for "truth"). ``workers`` donors run in parallel (processes).
    """
    from tqdm import tqdm
    if clips not in CUTS:
        raise ValueError(f"clips {clips!r} must be one of {', '.join(CUTS)}")
    status = status or ("all" if clips == "detect" else "complete")
    if status not in STATUSES:
        raise ValueError(f"status {status!r} must be one of {', '.join(STATUSES)}")
    labels = ["fetal"] * int(fetal) + ["maternal"] * int(maternal)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))      # donor number does not give away the label
    jobs = []
    for k in range(len(labels)):
        donor = first_donor + k
        p = Path(out) / f"d{donor:03d}" / "clips.h5"
        p.parent.mkdir(parents=True, exist_ok=True)
        jobs.append({"path": str(p), "mode": mode, "size": int(size), "donor": donor,
                     "label": labels[order[k]], "frames": int(frames),
                     "seed": seed * 1000 + donor, "clips": clips,
                     "complete_only": status == "complete",
                     "overrides": {"donor_look": donor_look, **dict(sim or {})}})
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        # spawn: each detection run starts its own processes (source, clip writer)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            counts = list(tqdm(ex.map(_one, jobs), total=len(jobs), desc="donors",
                               disable=not progress))
    else:
        counts = [_one(j) for j in tqdm(jobs, desc="donors", disable=not progress)]
    if progress:
        for j, n in zip(jobs, counts):
            print(f"{j['path']}: {j['label']}, {n} clips")
    return [Path(j["path"]) for j in jobs]


def _one(job: Mapping[str, Any]) -> int:
    from engine.config import load_config
    cfg = load_config(overrides={"clips.mode": job["mode"], "clips.size": job["size"]})
    kw = dict(donor=job["donor"], label=job["label"], frames=job["frames"], seed=job["seed"],
              overrides=job["overrides"], complete_only=job["complete_only"])
    if job["clips"] == "truth":
        return sim_store(job["path"], cfg, **kw)
    return detect_store(Path(job["path"]).parent, cfg, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--donors", type=int, nargs=2, default=(6, 6), metavar=("FETAL", "MATERNAL"))
    ap.add_argument("--frames", type=int, default=2000, help="frames per donor")
    ap.add_argument("--size", type=int, default=64, help="clip canvas [px]")
    ap.add_argument("--mode", default="fixed", choices=["fixed", "bbox-resize"],
                    help="crop mode (clips.mode)")
    ap.add_argument("--clips", default="detect", choices=list(CUTS),
                    help="detect: the real front end and tracker, as fmh detect (default); "
                         "truth: cut at the simulator's true positions")
    ap.add_argument("--status", default=None, choices=list(STATUSES),
                    help="tracks kept: all (default with --clips detect) or complete "
                         "(default with --clips truth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first-donor", type=int, default=0,
                    help="number of the first donor (donor 0 is the nominal chip, the look "
                         "fmh demo simulates; 1 keeps it out of the stores)")
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
                sim=extra, workers=a.workers, clips=a.clips, status=a.status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
