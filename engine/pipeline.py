"""The pipeline: source → ring → front end → tracker → clips → (dispatcher → workers) → files.

One source process reads the camera or file and writes frames into a shared-memory
:class:`~engine.ringbuf.FrameRing`; this process reads the ring, runs the front end and the
tracker, writes the run files as cells finish and, for ``fmh run``, hands every clip to the
:class:`~engine.dispatch.Dispatcher`. Acquisition never waits for classification: the
dispatcher's queue spills to disk instead.

The ring's full-ring policy follows the source: ``block`` for files (a replay can wait),
``drop-oldest`` for live sources (a camera cannot), unless ``ring.policy`` says otherwise.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .config import Config
from .errors import EngineError, SourceError
from .types import CellClip, Frame, Prediction

__all__ = ["RunOptions", "RunSummary", "run_pipeline"]


@dataclass
class RunOptions:
    """What to run and how; the config holds everything per stage."""

    source: str
    out: Path
    speed: float | None = None        # None: as fast as possible; 1.0: recorded rate
    loop: int = 1
    max_frames: int | None = None
    write_clips: bool = True
    classify: bool = False
    model: str = ""
    workers: int = 1
    progress: bool = True
    background: str = ""              # an image file to use as the background
    live: bool | None = None          # force the live (drop-oldest) policy on or off


@dataclass
class RunSummary:
    out: Path
    counts: dict = field(default_factory=dict)
    status: str = "complete"
    seconds: float = 0.0
    report_headline: str = ""


# --------------------------------------------------------------------------------------------
# The source process
# --------------------------------------------------------------------------------------------

def _source_main(spec: str, cfg: Config, ring_name: str, opts: dict, status_q) -> None:
    """Child process: read the source and write its frames into the ring."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C
    from .ringbuf import FrameRing
    from .sources import open_source
    from .sources.pacing import paced
    ring = None
    try:
        ring = FrameRing.attach(ring_name)
        src = open_source(spec, cfg, **opts.get("source_options", {}))
        with src:
            frames = src.frames()
            if opts.get("speed") is not None:
                frames = paced(frames, src.fps or cfg.camera.fps, opts["speed"])
            n_max = opts.get("max_frames")
            for i, frame in enumerate(frames):
                if n_max is not None and i >= n_max:
                    break
                ring.put(frame)
            status_q.put({"ok": True, "frames_read": src.stats.frames_read,
                          "gaps": src.stats.gaps, "gap_events": src.stats.gap_events})
    except BaseException as exc:  # forwarded, never silent
        status_q.put({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "trace": traceback.format_exc()})
    finally:
        if ring is not None:
            try:
                ring.close_writer()
            finally:
                ring.close()


def _describe_source(spec: str, cfg: Config, opts: dict) -> tuple[dict, tuple[int, int], bool, np.ndarray | None]:
    """Open the source briefly here to learn its shape, liveness and recorded background."""
    from .sources import open_source
    src = open_source(spec, cfg, **opts)
    with src:
        desc = src.describe()
        bg = src.background()
        return desc, tuple(src.shape), bool(src.live), bg


# --------------------------------------------------------------------------------------------
# The main loop
# --------------------------------------------------------------------------------------------

def run_pipeline(cfg: Config, opts: RunOptions,
                 on_status: Callable[[dict], None] | None = None) -> RunSummary:
    """Run detection (and classification when ``opts.classify``) over one source.

    Returns a :class:`RunSummary`; the files are in ``opts.out``. Ctrl-C stops the run
    cleanly: every finished cell is written and the manifest says ``interrupted``.
    """
    from .detect.frontend import FrontEnd
    from .features import compute_features
    from .ringbuf import FrameRing
    from .runfiles import RunFiles
    from .track.linker import Linker

    t_start = time.perf_counter()
    out = Path(opts.out)
    desc, shape, live, recorded_bg = _describe_source(opts.source, cfg, {})
    if opts.live is not None:
        live = opts.live
    policy = cfg.ring.policy if cfg.ring.policy != "auto" else ("drop-oldest" if live else "block")

    background = recorded_bg
    if opts.background:
        background = _load_background(opts.background, shape)

    model_info: dict[str, Any] = {}
    artefact = None
    if opts.classify:
        from .infer.artefact import ModelArtefact, default_model_path
        artefact = ModelArtefact.load(opts.model or cfg.model.path or default_model_path())
        model_info = {"path": str(artefact.path), "model_id": artefact.model_id,
                      "sha256": artefact.sha256,
                      "trained_on": artefact.meta.get("trained_on", ""),
                      "validation": artefact.meta.get("validation") or {},
                      "threshold": artefact.threshold,
                      "classes": list(artefact.meta.get("classes", []))}

    files = RunFiles(out, {
        "software": {"name": "fmh-engine", "version": __version__, "python": sys.version.split()[0]},
        "config": cfg.to_dict(), "config_source": cfg.source,
        "source": {"spec": opts.source, **desc, "policy": policy},
        "model": model_info,
    })

    clip_store = None
    if opts.write_clips:
        from .clipstore import ClipStoreWriter
        clip_store = ClipStoreWriter(out / "clips.h5", {"source": opts.source,
                                                        "software": f"fmh-engine {__version__}"})

    dispatcher = workers = None
    if opts.classify:
        from .dispatch import Dispatcher, spawn_workers
        dispatcher = Dispatcher(cfg, on_prediction=files.add_prediction,
                                spill_dir=Path(cfg.serving.spill_dir or out / "spill"))
        dispatcher.start()
        # The workers see the run's serving and model settings, not just the defaults.
        overrides = [f"{sec}.{k}={_yaml_scalar(v)}" for sec in ("serving", "model")
                     for k, v in cfg.to_dict()[sec].items()]
        workers = spawn_workers(str(artefact.path), dispatcher.endpoint, opts.workers,
                                overrides=overrides)
        if opts.progress:
            print(f"fmh: live predictions published on {dispatcher.pub_endpoint}", file=sys.stderr)

    ring = FrameRing.create(shape=shape, slots=cfg.ring.slots, policy=policy)
    ctx = mp.get_context("spawn")
    status_q = ctx.Queue()
    child_opts = {"speed": opts.speed, "max_frames": opts.max_frames,
                  "source_options": {"loop": opts.loop} if opts.loop != 1 else {}}
    proc = ctx.Process(target=_source_main, name="fmh-source",
                       args=(opts.source, cfg, ring.name, child_opts, status_q), daemon=True)
    proc.start()

    frontend = FrontEnd(cfg, background=background)
    linker = None
    n_frames = 0
    status = "complete"
    error = ""
    progress = _Progress(opts.progress, desc.get("n_frames"), opts.max_frames, opts.loop)
    geometry = None

    def emit(clips: list[CellClip]) -> None:
        for clip in clips:
            feats = compute_features(clip, geometry, cfg)
            clip = _with_features(clip, feats)
            files.add_clip(clip)
            if clip_store is not None:
                clip_store.append(clip)
            if dispatcher is not None:
                dispatcher.submit(clip)

    try:
        frames_iter = _ring_frames(ring, proc)
        if background is None:
            sample, frames_iter = _take_primer(frames_iter, cfg)
            frontend.prime([f.image for f in sample])
        geometry = frontend.geometry
        linker = Linker(cfg, geometry)
        for frame in frames_iter:
            blobs = frontend.process(frame)
            emit(linker.next_level(frame, blobs))
            n_frames += 1
            if progress.due(n_frames):
                progress.update(n_frames, files, dispatcher, ring)
        emit(linker.flush())
    except KeyboardInterrupt:
        status = "interrupted"
        if linker is not None:
            emit(linker.flush())
    except EngineError as exc:
        status, error = "failed", str(exc)
    finally:
        if proc.is_alive() and status != "complete":
            proc.terminate()
        proc.join(timeout=10)
        src_status = _drain(status_q)
        if status == "complete" and src_status and not src_status.get("ok", True):
            status, error = "failed", src_status.get("error", "source failed")
        ring_stats = dict(ring.stats)
        ring.close()
        ring.unlink()
        if clip_store is not None:
            clip_store.close()
        disp_counts = {}
        if dispatcher is not None:
            try:
                dispatcher.close(timeout=None if status == "complete" else 30)
            finally:
                disp_counts = dict(dispatcher.counts)
                from .dispatch import stop_workers
                stop_workers(workers)
        progress.close()
        counts = {
            "frames_read": int(src_status.get("frames_read", n_frames)) if src_status else n_frames,
            "frames_processed": n_frames,
            "frames_dropped": int(ring_stats.get("dropped", 0)),
            "frame_gaps": int(src_status.get("gaps", 0)) if src_status else 0,
            "cells_tracked": files.n_cells,
            "clips_sent": int(disp_counts.get("submitted", 0)),
            "clips_spilled": int(disp_counts.get("spilled", 0)),
            "clips_resent": int(disp_counts.get("resent", 0)),
            "predictions": int(disp_counts.get("answered", 0)),
            "errors": int(disp_counts.get("errors", 0)),
        }
        counts.update({f"frontend_{k}": v for k, v in getattr(frontend, "stats", {}).items()
                       if isinstance(v, (int, float))})
        if linker is not None:
            counts.update({f"tracker_{k}": v for k, v in getattr(linker, "stats", {}).items()
                           if isinstance(v, (int, float))})
        files.update_counts(**counts)
        extra = {"geometry": geometry.to_dict() if geometry is not None else None,
                 "ring": ring_stats, "dispatcher": disp_counts}
        if error:
            extra["error"] = error
        extra["background"] = getattr(frontend, "background_info", {})
        files.close(status, **extra)
    summary = RunSummary(out=out, counts=files.manifest["counts"], status=status,
                         seconds=time.perf_counter() - t_start)
    if status == "failed":
        raise EngineError(f"{opts.source}: run failed: {error} (partial results in {out})")
    return summary


def _yaml_scalar(v) -> str:
    import json
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def _with_features(clip: CellClip, feats: dict) -> CellClip:
    from dataclasses import replace
    merged = dict(clip.features)
    merged.update(feats)
    return replace(clip, features=merged)


def _ring_frames(ring, proc):
    """Frames from the ring until end of stream; copies each image (the slot is reused)."""
    while True:
        frame = ring.get(timeout=0.5)
        if frame is None:
            if getattr(ring, "eos", True) or not proc.is_alive():
                # Either end of stream, or the writer died: drain what is left then stop.
                frame = ring.get(timeout=0)
                if frame is None:
                    return
            else:
                continue
        yield frame


def _take_primer(frames_iter, cfg: Config):
    """The first frames, sampled for the background (report: 100 frames)."""
    n = cfg.frontend.bg_frames
    stride = 4
    held: list[Frame] = []
    for frame in frames_iter:
        held.append(Frame(frame.index, frame.t_ns, frame.image.copy()))
        if len(held) >= n * stride:
            break
    sample = held[::stride] if len(held) >= 3 * stride else held
    if len(sample) < 3:
        raise SourceError(f"too few frames ({len(held)}) to build a background; "
                          "give one with --background")
    return sample, _chain(held, frames_iter)


def _chain(*iters):
    for it in iters:
        yield from it


def _drain(q) -> dict:
    out: dict = {}
    try:
        while True:
            out.update(q.get(timeout=0.2))
    except (queue_mod.Empty, EOFError, OSError):
        pass
    return out


def _load_background(path: str, shape: tuple[int, int]) -> np.ndarray:
    p = Path(path)
    try:
        if p.suffix == ".npy":
            img = np.load(p)
        else:
            import cv2
            img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise OSError("not an image OpenCV can read")
    except (OSError, ValueError) as exc:
        raise SourceError(f"{p}: cannot read background image ({exc})") from None
    if img.shape != tuple(shape):
        raise SourceError(f"{p}: background shape {img.shape} differs from the frames' {shape}")
    return np.asarray(img, dtype=np.uint8)


class _Progress:
    """A live progress line: frames/s, cells, queue depth, dropped frames, predictions, fraction."""

    def __init__(self, enabled: bool, n_frames, max_frames, loop):
        self.enabled = enabled
        total = None
        if n_frames:
            total = n_frames * max(loop, 1)
        if max_frames:
            total = min(total, max_frames) if total else max_frames
        self.bar = None
        self.t0 = time.perf_counter()
        self.last = 0.0
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="frame", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5)
        self.n_done = 0

    def due(self, n: int) -> bool:
        if not self.enabled:
            return False
        now = time.perf_counter()
        if now - self.last >= 0.5:
            self.last = now
            return True
        return False

    def update(self, n: int, files, dispatcher, ring) -> None:
        self.bar.update(n - self.n_done)
        self.n_done = n
        post = {"cells": files.n_cells, "dropped": ring.stats.get("dropped", 0)}
        if dispatcher is not None:
            c = dispatcher.counts
            preds = files.predictions()
            fetal = sum(1 for p in preds.values() if p.label == "fetal")
            post.update(queue=c.get("queued", 0), preds=len(preds),
                        fetal=f"{fetal / len(preds):.3f}" if preds else "-")
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
