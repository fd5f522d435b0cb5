"""The pipeline: source → ring → front end → tracker → clips → (dispatcher → workers) → files.

One source process reads the camera or file and writes frames into a shared-memory
:class:`~engine.ringbuf.FrameRing`; this process reads the ring, runs the front end and the
tracker, writes the run files as cells finish and, for ``fmh run``, hands every clip to the
:class:`~engine.dispatch.Dispatcher`. Acquisition never waits for classification: the
dispatcher's queue spills to disk instead.

The ring's full-ring policy follows the source: ``block`` for files (a replay can wait),
``drop-oldest`` for live sources (a camera cannot), unless ``ring.policy`` says otherwise.
Every frame is accounted for: ``frames_read`` (frames the source put into the ring) ==
``frames_processed + frames_dropped + frames_unprocessed`` (the last is non-zero only when a
run is stopped with frames still waiting in the ring).

Stopping
--------
Ctrl-C (SIGINT) or SIGTERM asks the run to stop: the source stops, the tracker's live tracks
are flushed (as truncated cells), the predictions of the clips already sent are awaited for
up to ``STOP_WAIT_S`` (a second Ctrl-C stops waiting), every file is closed in a valid state
and the manifest says ``interrupted``. A third Ctrl-C raises ``KeyboardInterrupt`` at once.

Latency
-------
For every classified cell the pipeline records, on the host's monotonic clock, when the frame
in which the cell was last seen (its exit frame) had been processed (``t_exit_s``) and when its
prediction reached the collector (``t_pred_s``). ``latency_ms`` is their difference; its parts
are ``track_ms`` (until the tracker closed the track), ``handoff_ms`` (features, files, clip
store, until the clip was queued), ``queue_ms`` (dispatcher queue, until sent to a worker),
``worker_wait_ms`` (micro-batching in the worker), ``compute_ms`` (preprocessing excluded:
the model's batch) and ``trip_ms`` (to the worker and back: sockets, threads and decoding; the
dispatcher's round trip less the time the worker says it held the clip). The manifest's
``latency`` summarises them over the cells after warm-up: cells whose track closed before
the workers first caught up with the queue (model loading, first-batch compilation) are left
out and counted as ``n_warmup``.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .config import Config
from .errors import EngineError, SourceError
from .types import CellClip, Frame, Prediction

__all__ = ["RunOptions", "RunSummary", "run_pipeline", "latency_summary"]

STOP_WAIT_S = 10.0        # after Ctrl-C: longest wait for predictions of clips already sent [s]
CHECKPOINT_S = 10.0       # cells.parquet and manifest rewritten this often during a run [s]
_FRAME_TIMES = 8192       # processed-frame times kept for the latency lookup (a ring)
READY_TIMEOUT_S = 120.0   # longest wait for workers (model loading) and the clip store [s]
ELASTIC_FACTOR = 4        # live rings: the private catch-up buffer holds this many rings
CLIPSTORE_NICE = 10       # niceness added to the clips.h5 writer process
PROGRESS_EVERY_S = 1.0    # the manifest's "progress" series: one point per second
PROGRESS_POINTS = 3600    # at most this many points (then every other one is dropped)


@dataclass
class RunOptions:
    """What to run and how; the config holds everything per stage.

    Parameters
    ----------
    source : str
        A path or URI (see :func:`engine.sources.open_source`).
    out : Path
        The run folder.
    speed : float, optional
        Replay pacing: None as fast as possible, 1.0 the recorded rate, k k-times faster.
        Live sources (cameras, a live simulator) pace themselves and ignore it.
    loop, max_frames : int
        Replay the source ``loop`` times; stop after ``max_frames`` frames.
    write_clips, classify, model, workers : ...
        clips.h5 on/off; classify with ``workers`` local workers and the model ``model``
        ("" = ``model.path`` or the bundled demo model).
    progress : bool
        Show the live progress line on stderr.
    background : str
        An image file (.npy or image) to use as the background.
    live : bool, optional
        Force the live (drop-oldest) ring policy on or off.
    throttle_s : float
        Sleep this long [s] after every frame: a slow front end, for fault tests of frame
        dropping. 0 in normal use.
    stall : (int, float), optional
        ``(k, s)``: sleep ``s`` [s] once, after the ``k``-th processed frame: a one-off stall
        of the frame loop (a compile, a page-in), for fault tests. None in normal use.
    donor, label : str
        Written into clips.h5 (one sequence = one donor) so the store is training material;
        ``label`` is "fetal", "maternal" or "" when unknown.
    """

    source: str
    out: Path
    speed: float | None = None
    loop: int = 1
    max_frames: int | None = None
    write_clips: bool = True
    classify: bool = False
    model: str = ""
    workers: int = 1
    progress: bool = True
    background: str = ""
    live: bool | None = None
    throttle_s: float = 0.0
    stall: tuple[int, float] | None = None
    donor: str = ""
    label: str = ""


@dataclass
class RunSummary:
    out: Path
    counts: dict = field(default_factory=dict)
    status: str = "complete"
    seconds: float = 0.0
    latency: dict = field(default_factory=dict)
    report_headline: str = ""


# --------------------------------------------------------------------------------------------
# The source process
# --------------------------------------------------------------------------------------------

def _source_main(spec: str, cfg: Config, ring_name: str, opts: dict, status_q, stop_ev,
                 go_ev) -> None:
    """Child process: open the source, wait for ``go_ev`` (the front end is ready), then write
    its frames into the ring until the end or until ``stop_ev`` is set; always closes the
    stream and reports its counters or error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C
    if opts.get("cpus"):
        os.sched_setaffinity(0, set(opts["cpus"]))    # all the run's CPUs (see run_pipeline)
    from .ringbuf import FrameRing
    from .sources import open_source
    from .sources.pacing import paced
    ring = None
    src = None
    report: dict[str, Any] = {"ok": True}
    try:
        ring = FrameRing.attach(ring_name)
        src = open_source(spec, cfg, **opts.get("source_options", {}))
        with src:
            while not go_ev.wait(0.2):
                if stop_ev.is_set():
                    break
            frames = src.frames()
            pacer = None
            if opts.get("speed") is not None and not src.live:   # a live source paces itself
                frames = pacer = paced(frames, src.fps or cfg.camera.fps, opts["speed"])
            for frame in itertools.islice(frames, opts.get("max_frames")):
                if stop_ev.is_set():
                    break
                while not ring.put(frame, timeout=0.2):           # block policy: ring full
                    if stop_ev.is_set():
                        break
            if pacer is not None:
                report["pacer_max_behind_s"] = float(pacer.pacer.max_behind_s)
    except BaseException as exc:  # forwarded, never silent
        report = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "trace": traceback.format_exc()}
    finally:
        if src is not None:
            report.update(source_frames_read=src.stats.frames_read, gaps=src.stats.gaps,
                          gap_events=src.stats.gap_events)
        status_q.put(report)
        if ring is not None:
            try:
                ring.close_writer()
            finally:
                ring.close()


def _clip_writer_main(path: str, meta: dict, clip_q, result_q) -> None:
    """Child process: append the clips that arrive on ``clip_q`` to ``clips.h5`` until None.

    Writing a clip costs milliseconds of HDF5 book-keeping and compression (measured 5-30 ms
    a clip on the 2-core machine); here it runs beside the front end instead of inside its
    frame loop. Keeps draining after an error so the parent never blocks; reports the number
    written and the first error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C
    from .clipstore import ClipStoreWriter
    n, error, writer = 0, "", None
    try:
        writer = ClipStoreWriter(path, meta)
    except BaseException as exc:  # forwarded, never silent
        error = f"{path}: {type(exc).__name__}: {exc}"
    result_q.put({"ready": True, "error": error})
    while True:
        clip = clip_q.get()
        if clip is None:
            break
        if writer is None or error:
            continue
        try:
            writer.append(clip)
            n += 1
        except BaseException as exc:
            error = f"{path}: clip {getattr(clip, 'cell_id', '?')}: {type(exc).__name__}: {exc}"
    if writer is not None:
        try:
            writer.close()
        except BaseException as exc:
            error = error or f"{path}: closing: {type(exc).__name__}: {exc}"
    result_q.put({"written": n, "error": error})


class _ClipStoreProcess:
    """``clips.h5`` written by a child process (see :func:`_clip_writer_main`)."""

    def __init__(self, ctx, path: Path, meta: dict):
        # Unbounded: the frame loop must never wait for the disk (measured: a bounded queue
        # blocked it for seconds while the writer was starved of CPU). Clips arrive at about
        # 10/s; the writer is checked for life at every append.
        self.q = ctx.Queue()
        self.result_q = ctx.Queue()
        self.proc = ctx.Process(target=_clip_writer_main, name="fmh-clipstore",
                                args=(str(path), meta, self.q, self.result_q), daemon=True)
        self.proc.start()
        # Writing is not on any latency path (the queue is unbounded): it yields the CPU to
        # the frame loop and the inference workers, which want it at the same moments (when a
        # cell leaves the channel, its clip goes to both).
        _lower_priority([self.proc.pid], CLIPSTORE_NICE)
        self.sent = 0

    def wait_ready(self, timeout: float) -> str:
        """Wait until the writer has created the file; returns its error ("" when fine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.result_q.get(timeout=0.2)
                return msg.get("error", "")
            except queue_mod.Empty:
                if not self.proc.is_alive():
                    return f"clip store process died (exit code {self.proc.exitcode})"
        return f"clip store not ready after {timeout:g} s"

    def append(self, clip: CellClip) -> None:
        if self.proc.exitcode is not None:
            raise EngineError(f"clip store process died (exit code {self.proc.exitcode})")
        self.q.put(clip)
        self.sent += 1

    def close(self, timeout: float = 120.0) -> dict:
        """Send the end marker, wait for the writer; returns ``written`` and ``error``."""
        try:
            self.q.put(None, timeout=timeout)
        except queue_mod.Full:
            pass
        out: dict = {}
        deadline = time.monotonic() + timeout
        while not out and time.monotonic() < deadline:
            try:
                out = self.result_q.get(timeout=0.2)
                if out.get("ready"):
                    out = {}                    # wait_ready() was not called
                    continue
            except queue_mod.Empty:
                if not self.proc.is_alive():
                    try:
                        out = self.result_q.get(timeout=0.5)
                    except queue_mod.Empty:
                        out = {"written": 0, "error": "clip store process died "
                               f"(exit code {self.proc.exitcode})"}
        if not out:
            out = {"written": 0, "error": f"clip store did not finish in {timeout:g} s"}
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
        self.q.close()
        self.result_q.close()
        return out


def _describe_source(spec: str, cfg: Config, opts: dict) -> tuple[dict, tuple[int, int], bool, np.ndarray | None]:
    """Open the source briefly here to learn its shape, liveness and recorded background."""
    from .sources import open_source
    src = open_source(spec, cfg, **opts)
    with src:
        desc = src.describe()
        bg = src.background()
        return desc, tuple(src.shape), bool(src.live), bg


# --------------------------------------------------------------------------------------------
# Stop requests (Ctrl-C, SIGTERM)
# --------------------------------------------------------------------------------------------

class _Stop:
    """Turns SIGINT/SIGTERM into a request to stop (installed in the main thread only)."""

    def __init__(self):
        self.count = 0
        self.why = ""
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.count > 0

    def _handler(self, signum, _frame) -> None:
        self.count += 1
        self.why = self.why or signal.Signals(signum).name
        if self.count >= 3:
            raise KeyboardInterrupt

    def install(self) -> "_Stop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# --------------------------------------------------------------------------------------------
# Latency book-keeping
# --------------------------------------------------------------------------------------------

class _Latency:
    """Per-cell times on the host's monotonic clock, joined with the dispatcher's timings."""

    def __init__(self):
        self._idx = np.full(_FRAME_TIMES, -1, np.int64)
        self._t = np.zeros(_FRAME_TIMES, np.float64)
        self.pending: dict[int, dict] = {}
        self.n_submitted = 0
        self.n_answered = 0
        self.t_first_pred: float | None = None
        self.t_warm: float | None = None      # first time every submitted clip was answered
        self.t_live: float | None = None      # first time the frame loop had caught up
        self.live_frame: int | None = None    # ... with the source (after priming)
        self.end_of_stream: set[int] = set()  # cells still in view when the stream ended

    def frame_done(self, index: int, t: float) -> None:
        k = index % _FRAME_TIMES
        self._idx[k] = index
        self._t[k] = t

    def frame_time(self, index: int) -> float | None:
        k = index % _FRAME_TIMES
        return float(self._t[k]) if self._idx[k] == index else None

    def closed(self, clip: CellClip, close_frame: int, t_closed: float) -> dict:
        exit_frame = int(clip.frame_indices[-1]) if len(clip.frame_indices) else close_frame
        t_exit = self.frame_time(exit_frame)
        return {"exit_frame": exit_frame, "close_frame": int(close_frame),
                "t_exit_s": t_closed if t_exit is None else t_exit, "t_closed_s": t_closed}

    def submitted(self, cell_id: int, rec: dict) -> None:
        rec["t_submit_s"] = time.monotonic()
        self.pending[cell_id] = rec
        self.n_submitted += 1

    def answered(self, pred: Prediction, dtimings: list | None) -> dict:
        """Called from the dispatcher's thread with each prediction; returns its timing."""
        t = time.monotonic()
        rec = self.pending.pop(int(pred.cell_id), None) or {}
        self.n_answered += 1
        if self.t_first_pred is None:
            self.t_first_pred = t
        if self.t_warm is None and self.n_answered >= self.n_submitted:
            self.t_warm = t
        d = None
        if dtimings and dtimings[-1].get("cell_id") == pred.cell_id:
            d = dtimings.pop()            # keep the dispatcher's list short
        out = {k: rec[k] for k in ("exit_frame", "close_frame") if k in rec}
        out["t_pred_s"] = t
        if "t_exit_s" in rec:
            out["t_exit_s"] = rec["t_exit_s"]
            out["t_closed_s"] = rec["t_closed_s"]
            out["latency_ms"] = (t - rec["t_exit_s"]) * 1e3
            out["track_ms"] = (rec["t_closed_s"] - rec["t_exit_s"]) * 1e3
            out["handoff_ms"] = (rec["t_submit_s"] - rec["t_closed_s"]) * 1e3
        if d is not None:
            out.update(queue_ms=d.get("queue_ms"), worker_wait_ms=d.get("worker_wait_ms"),
                       compute_ms=d.get("compute_ms"), trip_ms=d.get("trip_ms"),
                       attempts=int(d.get("attempts", 1)))
        return out


def _q(values: list[float], qs=(50, 99)) -> dict:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if not len(v):
        return {"n": 0}
    out = {f"p{q}": round(float(np.percentile(v, q)), 3) for q in qs}
    out.update(max=round(float(v.max()), 3), mean=round(float(v.mean()), 3), n=int(len(v)))
    return out


def latency_summary(timings: dict[int, dict], t_warm: float | None,
                    t_first_pred: float | None, t_live: float | None = None,
                    end_of_stream: set[int] | frozenset = frozenset()) -> dict:
    """p50/p99/max of the latency and its parts over the cells after warm-up.

    Warm-up: cells whose track closed before ``t_warm`` (the first moment every clip sent so
    far had been answered), or, if the workers never caught up, before the first prediction;
    and cells closed before ``t_live``, the first moment the frame loop had caught up with a
    live source. A live run starts behind: the background is primed from its first 400
    frames (0.8 s at 500 fps) while the camera goes on, and the loop then works through the
    backlog faster than real time, so cells leave in a compressed burst that queues (the
    worst latencies of every sustained run came from that first second). Cells still in
    view when the stream ends (``end_of_stream``, cell ids) never left the channel: the flush
    emits them together, and they are counted apart (``n_end_of_stream``).
    """
    cut = t_warm if t_warm is not None else t_first_pred
    if t_live is not None and (cut is None or t_live > cut):
        cut = t_live
    recs = [r for r in timings.values() if r.get("latency_ms") is not None]
    left = [r for c, r in timings.items()
            if r.get("latency_ms") is not None and c not in end_of_stream]
    warm = [r for r in left if cut is None or r.get("t_closed_s", r.get("t_exit_s", 0)) >= cut]
    out: dict[str, Any] = {
        "definition": "host-monotonic time from the end of processing of the frame in which "
                      "the cell was last seen to its prediction at the collector; warm-up "
                      "(cells closed before the workers first caught up with the queue, or "
                      "before the frame loop first caught up with a live source) excluded, "
                      "and so are the cells still in view when the stream ended (they never "
                      "left the channel; the end of the stream flushes them at once)",
        "n_cells": len(recs), "n_end_of_stream": len(recs) - len(left),
        "n_warmup": len(left) - len(warm),
        "total_ms": _q([r["latency_ms"] for r in warm]),
    }
    for part in ("track_ms", "handoff_ms", "queue_ms", "worker_wait_ms", "compute_ms",
                 "trip_ms"):
        out[part] = _q([r.get(part) for r in warm])
    out["total_ms_with_warmup"] = _q([r["latency_ms"] for r in recs])
    return out


# --------------------------------------------------------------------------------------------
# The main loop
# --------------------------------------------------------------------------------------------

def run_pipeline(cfg: Config, opts: RunOptions,
                 on_status: Callable[[dict], None] | None = None) -> RunSummary:
    """Run detection (and classification when ``opts.classify``) over one source.

    Parameters
    ----------
    cfg : Config
    opts : RunOptions
    on_status : callable(dict), optional
        Called about twice a second with the counts so far (frames, cells, dropped, queue,
        predictions, fetal).

    Returns
    -------
    RunSummary
        Status ``complete`` or ``interrupted``; the files are in ``opts.out``.

    Raises
    ------
    EngineError
        A bad source, output folder or model (before anything runs), or a run that failed
        (the files then hold everything done until the failure, manifest status ``failed``).
    """
    from .detect.frontend import FrontEnd
    from .ringbuf import FrameRing
    from .runfiles import RunFiles
    from .track.linker import Linker

    t_start = time.perf_counter()
    out = Path(opts.out)
    if opts.throttle_s < 0 or not math.isfinite(opts.throttle_s):
        raise EngineError(f"throttle_s={opts.throttle_s}: must be >= 0")
    if opts.stall is not None and not (len(opts.stall) == 2 and opts.stall[0] >= 0
                                       and 0 <= opts.stall[1] < math.inf):
        raise EngineError(f"stall={opts.stall!r}: must be (frame >= 0, seconds >= 0)")
    desc, shape, live, recorded_bg = _describe_source(opts.source, cfg, {})
    if opts.live is not None:
        live = opts.live
    policy = cfg.ring.policy if cfg.ring.policy != "auto" else ("drop-oldest" if live else "block")
    real_time = live or opts.speed is not None    # frames come at the camera's pace

    background = recorded_bg
    if opts.background:
        background = _load_background(opts.background, shape)

    model_info: dict[str, Any] = {}
    artefact = None
    if opts.classify:
        from .infer.artefact import ModelArtefact
        artefact = ModelArtefact.load(opts.model or cfg.model.path or None)
        model_info = {"path": str(artefact.path), "model_id": artefact.model_id,
                      "sha256": artefact.sha256,
                      "trained_on": artefact.meta.get("trained_on", ""),
                      "validation": artefact.meta.get("validation") or {},
                      "threshold": artefact.threshold,
                      "classes": list(artefact.meta.get("classes", []))}

    files = RunFiles(out, {
        "software": {"name": "fmh-engine", "version": __version__, "python": sys.version.split()[0]},
        "config": cfg.to_dict(), "config_source": cfg.source,
        "source": {"spec": opts.source, **desc, "policy": policy, "speed": opts.speed,
                   "loop": opts.loop, "max_frames": opts.max_frames},
        "model": model_info,
    }, classify=opts.classify)
    for stale in ("report.md", "report.json") + (() if opts.write_clips else ("clips.h5",)):
        (out / stale).unlink(missing_ok=True)          # from an earlier run in this folder

    stop = _Stop().install()
    lat = _Latency()
    timing: dict[str, float] = {}
    series = _Series(t_start)
    clip_store = dispatcher = workers = ring = proc = elastic = None
    status_q = stop_ev = None
    frontend = linker = geometry = None
    regap: dict = {}                 # background rebuilt after gaps (_reprime_after_gaps)
    n_frames = 0
    status, error = "complete", ""
    progress = _Progress(opts.progress, desc.get("n_frames"), opts.max_frames, opts.loop)
    split = affinity = None
    try:
        ctx = mp.get_context("spawn")
        if opts.classify and opts.workers:
            # Local workers on their own CPUs; the frame loop, its threads and the clip writer
            # (niceness +10) on the others, pinned here before any of them starts. The source
            # may use all of them: a simulated one can need more than the frame loop's share
            # (with it on 1 of 2 cores too, a 40 cells/s live simulation fell behind for
            # longer than without pinning). bench/RESULTS.md has the comparison.
            from .dispatch import pin_to, split_cpus
            split = split_cpus(opts.workers, cfg.serving.worker_cpus)
            if split is not None:
                affinity = os.sched_getaffinity(0)
                pin_to(split[0])
        float_cpus = sorted(affinity) if affinity is not None else None
        if opts.write_clips:
            clip_store = _ClipStoreProcess(ctx, out / "clips.h5",
                                           {"source": opts.source, "config": cfg.to_dict(),
                                            "donor": opts.donor, "label": opts.label})
        if opts.classify:
            from .dispatch import Dispatcher, spawn_workers, worker_threads

            def on_prediction(pred: Prediction) -> None:
                files.add_prediction(pred, lat.answered(pred, dispatcher.timings))

            dispatcher = Dispatcher(cfg, on_prediction=on_prediction, record_timings=True,
                                    spill_dir=Path(cfg.serving.spill_dir or out / "spill"))
            dispatcher.start()
            # The workers see the run's serving and model settings, not just the defaults.
            overrides = [f"{sec}.{k}={_yaml_scalar(v)}" for sec in ("serving", "model")
                         for k, v in cfg.to_dict()[sec].items()]
            # Local workers leave one core to the front end; serving.worker_nice > 0 also runs
            # them at a lower priority (acquisition before latency on a busy machine).
            if split is not None:
                threads = max(1, len(split[1]) // opts.workers)
            else:
                threads = worker_threads(opts.workers, reserve=1)
            workers = spawn_workers(str(artefact.path), dispatcher.endpoint, opts.workers,
                                    overrides=overrides, threads=threads,
                                    cpus=split[1] if split is not None else None)
            if cfg.serving.worker_nice:
                _lower_priority([p.pid for p in workers], cfg.serving.worker_nice)
            if opts.progress:
                print(f"fmh: live predictions published on {dispatcher.pub_endpoint}",
                      file=sys.stderr)

        ring = FrameRing.create(shape=shape, slots=cfg.ring.slots, policy=policy)
        status_q, stop_ev, go_ev = ctx.Queue(), ctx.Event(), ctx.Event()
        child_opts = {"speed": opts.speed, "max_frames": opts.max_frames, "cpus": float_cpus,
                      "source_options": {"loop": opts.loop} if opts.loop != 1 else {}}
        proc = ctx.Process(target=_source_main, name="fmh-source",
                           args=(opts.source, cfg, ring.name, child_opts, status_q, stop_ev,
                                 go_ev), daemon=True)
        proc.start()

        # Load the compiled kernels while the source process starts, so that a live source
        # does not overrun the ring while the first frames compile; then let it go.
        t0 = time.perf_counter()
        _warm_up(cfg, shape)
        frontend = FrontEnd(cfg, background=background)
        # Start acquiring only when everything downstream is up: a worker loading its model
        # or a child importing its libraries must not compete with the first live frames.
        if clip_store is not None:
            err = clip_store.wait_ready(READY_TIMEOUT_S)
            if err:
                raise EngineError(f"clips.h5: {err}")
        if dispatcher is not None:
            _wait_for_workers(dispatcher, workers, opts.workers, stop)
        go_ev.set()
        timing["warm_up_s"] = round(time.perf_counter() - t0, 3)
        timing["t_go_s"] = round(time.perf_counter() - t_start, 3)
        elastic = _Elastic(ring, ELASTIC_FACTOR * ring.slots) if policy == "drop-oldest" else None
        frames_iter = _ring_frames(ring, proc, stop, elastic)
        if background is None:
            sample, frames_iter = _take_primer(frames_iter, cfg, stop)
            if sample:
                t0 = time.perf_counter()
                _prime(frontend, [f.image for f in sample], elastic)
                timing["prime_s"] = round(time.perf_counter() - t0, 3)
            del sample
        frames_iter = _reprime_after_gaps(frames_iter, frontend, cfg, stop, elastic, regap)
        geometry = frontend.geometry
        linker = Linker(cfg, geometry)

        def emit(clips: list[CellClip], close_frame: int) -> None:
            t_closed = time.monotonic()
            for clip in clips:
                if not clip.features:
                    from .features import compute_features
                    clip = replace(clip, features=compute_features(clip, geometry, cfg))
                # Classification first: the files and the clip store are not on the latency path.
                if dispatcher is not None:
                    lat.submitted(int(clip.cell_id), lat.closed(clip, close_frame, t_closed))
                    if "end of stream" in clip.reason:
                        lat.end_of_stream.add(int(clip.cell_id))
                    dispatcher.submit(clip)
                files.add_clip(clip)
                if clip_store is not None:
                    clip_store.append(clip)

        next_checkpoint = time.monotonic() + CHECKPOINT_S
        next_point = time.monotonic()
        last_index = -1
        for frame in frames_iter:
            blobs = frontend.process(frame)
            finished = linker.next_level(frame, blobs)
            now = time.monotonic()
            lat.frame_done(frame.index, now)
            if lat.t_live is None and ring is not None and real_time:
                backlog = ring.stats["pending"] + (elastic.count if elastic is not None else 0)
                if backlog <= LIVE_BACKLOG:
                    lat.t_live, lat.live_frame = now, int(frame.index)
            last_index = frame.index
            if finished:
                emit(finished, frame.index)
            n_frames += 1
            if opts.throttle_s:
                time.sleep(opts.throttle_s)
            if opts.stall is not None and n_frames == opts.stall[0]:
                time.sleep(opts.stall[1])
            if progress.due(now, on_status is not None):
                st = _status(n_frames, files, dispatcher, ring)
                progress.update(st)
                if on_status is not None:
                    on_status(st)
            if now >= next_point:
                series.add(n_frames, files, dispatcher, ring)
                next_point = now + PROGRESS_EVERY_S
            if now >= next_checkpoint:
                files.checkpoint(frames_processed=n_frames, cells_tracked=files.n_cells)
                next_checkpoint = now + CHECKPOINT_S
        emit(linker.flush(), last_index)
        if stop.requested:
            status = "interrupted"
    except KeyboardInterrupt:              # the third Ctrl-C: stop now, still close the files
        status = "interrupted"
    except EngineError as exc:
        status, error = "failed", str(exc)
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            elastic_info = elastic.info() if elastic is not None else None
            counts, extra = _shut_down(status, error, stop, files, clip_store, dispatcher,
                                       workers, ring, proc, status_q, stop_ev, frontend, linker,
                                       geometry, n_frames, lat, progress, elastic_info)
            status, error = extra.pop("_status"), extra.get("error", "")
            if regap:
                extra["background_after_gaps"] = regap
            extra["cpus"] = ({"front_end": split[0], "workers": split[1]} if split is not None
                             else None)
            timing["seconds"] = round(time.perf_counter() - t_start, 3)
            files.update_counts(**counts)
            files.close(status, timing=timing, progress=series.to_dict(), **extra)
        finally:
            stop.restore()
            if affinity is not None:            # a run called in-process gives its CPUs back
                os.sched_setaffinity(0, affinity)
    summary = RunSummary(out=out, counts=files.manifest["counts"], status=status,
                         seconds=time.perf_counter() - t_start,
                         latency=files.manifest.get("latency", {}))
    if status == "failed":
        raise EngineError(f"{opts.source}: run failed: {error} (partial results in {out})")
    return summary


def _shut_down(status, error, stop, files, clip_store, dispatcher, workers, ring, proc,
               status_q, stop_ev, frontend, linker, geometry, n_frames, lat, progress, elastic_info=None):
    """Stop the source, close the ring and the clip store, collect the predictions of the
    clips already sent, stop the workers; returns the manifest's counts and extra fields."""
    src_status: dict = {}
    if proc is not None:
        if status != "complete" or stop.requested:
            stop_ev.set()
        src_status = _join_source(proc, status_q)
    if src_status and not src_status.get("ok", True) and status != "interrupted":
        # the source's error is the cause of whatever the main loop saw afterwards
        status, error = "failed", f"source: {src_status.get('error', 'failed')}"
    ring_stats: dict = {}
    if ring is not None:
        ring_stats = dict(ring.stats)
        ring.close()
        ring.unlink()
    clips_written = None
    if clip_store is not None:
        res = clip_store.close()
        clips_written = int(res.get("written", 0))
        if res.get("error") and status != "failed":
            status, error = "failed", f"clips.h5: {res['error']}"
    disp_counts: dict = {}
    if dispatcher is not None:
        if status == "complete":
            timeout = None
        else:
            # Wait a little for the clips already sent; a second Ctrl-C stops waiting.
            deadline = time.monotonic() + STOP_WAIT_S
            first = stop.count
            while (time.monotonic() < deadline and stop.count <= max(first, 1)
                   and dispatcher.counts.get("outstanding", 0)):
                time.sleep(0.05)
            timeout = 0.0
        try:
            dispatcher.close(timeout=timeout)
        except EngineError as exc:
            status, error = "failed", error or str(exc)
        finally:
            disp_counts = dict(dispatcher.counts)
            disp_counts["workers_joined"] = dispatcher.joined
            from .dispatch import stop_workers
            stop_workers(workers)
            spill = dispatcher.spill_dir
            if spill is not None and spill.is_dir() and not any(spill.iterdir()):
                spill.rmdir()                    # nothing left on disk: no empty folder
    progress.close()
    written = int(ring_stats.get("written", 0))
    dropped = int(ring_stats.get("dropped", 0))
    counts = {
        "frames_read": written,
        "frames_processed": n_frames,
        "frames_dropped": dropped,
        "frames_unprocessed": max(0, written - n_frames - dropped),
        "frame_gaps": int(src_status.get("gaps", 0)),
        "cells_tracked": files.n_cells,
        "clips_written": clips_written,
        "clips_sent": int(disp_counts.get("submitted", 0)),
        "clips_spilled": int(disp_counts.get("spilled", 0)),
        "clips_resent": int(disp_counts.get("resent", 0)),
        "predictions": int(disp_counts.get("answered", 0)) - int(disp_counts.get("errors", 0)),
        "errors": int(disp_counts.get("errors", 0)),
        "unanswered": int(disp_counts.get("unanswered", 0)),
    }
    if frontend is not None:
        counts.update({f"frontend_{k}": v for k, v in frontend.stats.items()
                       if isinstance(v, (int, float))})
    if linker is not None:
        counts.update({f"tracker_{k}": v for k, v in getattr(linker, "stats", {}).items()
                       if isinstance(v, (int, float))})
    extra: dict[str, Any] = {
        "_status": status,
        "geometry": geometry.to_dict() if geometry is not None else None,
        "ring": ring_stats, "dispatcher": disp_counts, "elastic": elastic_info,
        "source_status": {k: v for k, v in src_status.items() if k != "trace"},
        "background": frontend.background_info if frontend is not None else {},
    }
    if stop.requested:
        extra["stopped_by"] = stop.why
    if dispatcher is not None:
        extra["latency"] = latency_summary(files.timings(), lat.t_warm, lat.t_first_pred,
                                           lat.t_live, lat.end_of_stream)
        extra["latency"]["live_from_frame"] = lat.live_frame
    if error:
        extra["error"] = error
    return counts, extra


def _join_source(proc, status_q, timeout: float = 15.0) -> dict:
    """Collect the source's report while it exits (draining first, so it can flush)."""
    out: dict = {}
    deadline = time.monotonic() + timeout
    while True:
        try:
            out.update(status_q.get(timeout=0.1))
        except (queue_mod.Empty, EOFError, OSError):
            pass
        if not proc.is_alive() or time.monotonic() > deadline:
            break
    if proc.is_alive():
        proc.terminate()
        out.setdefault("error", "source process did not stop; terminated")
    proc.join(timeout=5)
    try:
        while True:
            out.update(status_q.get_nowait())
    except (queue_mod.Empty, EOFError, OSError):
        pass
    return out


def _wait_for_workers(dispatcher, procs, n: int, stop: _Stop) -> None:
    """Wait until ``n`` local workers have said hello (model loaded)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while dispatcher.counts.get("workers", 0) < n:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise EngineError(f"inference worker exited with status {dead[0].returncode} "
                              "before it was ready (run `fmh serve --model MODEL --connect "
                              f"{dispatcher.endpoint}` to see why)")
        if time.monotonic() > deadline:
            raise EngineError(f"{n} inference worker(s) not ready after {READY_TIMEOUT_S:g} s")
        if stop.requested:
            return
        time.sleep(0.05)


def _lower_priority(pids: list[int], nice: int) -> None:
    """Raise the niceness of processes by ``nice`` (best effort: needs no privilege)."""
    for pid in pids:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid)
                                                     + nice))
        except (OSError, AttributeError):
            pass


def _yaml_scalar(v) -> str:
    import json
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


class _Elastic:
    """Frames moved out of a ``drop-oldest`` ring into this process while the front end is
    behind (priming, a burst of load): a second, private ring of ``cap`` frames, so that a
    stall of a few seconds costs latency, not frames. Its pages are touched only when used.

    The image of a popped frame is valid until the next :meth:`fill` that wraps onto its slot,
    i.e. while it is processed (the loop fills only between frames).
    """

    def __init__(self, ring, cap: int):
        self.ring = ring
        self.cap = int(cap)
        self.buf = np.empty((self.cap, *ring.shape), np.uint8)
        self.index = np.zeros(self.cap, np.int64)
        self.t_ns = np.zeros(self.cap, np.int64)
        self.head = self.count = 0
        self.high = 0          # most frames held at once
        self.moved = 0         # frames that went through here

    def behind(self) -> bool:
        return self.count > 0 or self.ring.stats["pending"] > self.ring.slots // 2

    def fill(self) -> None:
        """Move every frame waiting in the ring here (as room allows)."""
        while self.count < self.cap:
            frame = self.ring.get(timeout=0)
            if frame is None:
                break
            k = (self.head + self.count) % self.cap
            np.copyto(self.buf[k], frame.image)
            self.index[k], self.t_ns[k] = frame.index, frame.t_ns
            self.count += 1
            self.moved += 1
        self.high = max(self.high, self.count)

    def pop(self) -> Frame:
        k = self.head
        self.head = (self.head + 1) % self.cap
        self.count -= 1
        return Frame(int(self.index[k]), int(self.t_ns[k]), self.buf[k])

    def info(self) -> dict:
        return {"capacity": self.cap, "max_held": self.high, "frames_moved": self.moved}


def _prime(frontend, images: list, elastic: _Elastic | None, again: bool = False) -> None:
    """Build the background (``again``: afresh, :meth:`FrontEnd.reprime`); with a live ring,
    keep draining it meanwhile."""
    build = frontend.reprime if again else frontend.prime
    if elastic is None:
        build(images)
        return
    err: list[BaseException] = []

    def work():
        try:
            build(images)
        except BaseException as exc:       # re-raised in the caller's thread
            err.append(exc)

    th = threading.Thread(target=work, name="fmh-prime", daemon=True)
    th.start()
    while th.is_alive():
        elastic.fill()
        th.join(0.01)
    if err:
        raise err[0]


def _ring_frames(ring, proc, stop: _Stop, elastic: _Elastic | None = None):
    """Frames from the ring until end of stream or a stop request.

    With the ``block`` policy an image is a view into its slot, valid until the next frame is
    asked for; consumers that keep pixels copy them. With ``drop-oldest`` and ``elastic``,
    frames move to the elastic buffer whenever the ring is more than half full.
    """
    while not stop.requested:
        if elastic is not None and elastic.behind():
            elastic.fill()
            if elastic.count:
                yield elastic.pop()
                continue
        frame = ring.get(timeout=0.2)
        if frame is None:
            if ring.eos:
                return
            if not proc.is_alive():
                # The writer died: take what it committed, then stop.
                frame = ring.get(timeout=0)
                if frame is None:
                    return
            else:
                continue
        yield frame


def _warm_up(cfg: Config, shape: tuple[int, int]) -> None:
    """Run the front end and the tracker once on synthetic frames (a dark disc moving over a
    flat grey field) so that every compiled kernel is loaded before real frames arrive."""
    from .detect.frontend import FrontEnd
    from .track.linker import Linker
    h, w = shape
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    r = max(3.0, min(h, w) / 10)
    frames = []
    for k in range(6):
        img = np.clip(rng.normal(128, 1.5, (h, w)), 0, 255).astype(np.uint8)
        cx = w * (0.2 + 0.1 * k)
        img[(xx - cx) ** 2 + (yy - h / 2) ** 2 < r * r] = 60
        frames.append(Frame(k, k, img))
    try:
        # Writable frames, then read-only ones as the ring hands them out: Numba compiles (or
        # loads from its cache, ~0.1 s) one specialisation per array type.
        for writable in (True, False):
            fe = FrontEnd(cfg)
            fe.prime([f.image for f in frames] + [np.full((h, w), 128, np.uint8)] * 4)
            linker = Linker(cfg, fe.geometry)
            for f in frames:
                f.image.setflags(write=writable)
                linker.next_level(f, fe.process(f))
            linker.flush()
        # Two cells inside each other's gates, then touching (one blob): the tracker's joint
        # assignment and shared-blob paths, which the first merged cells of a run would
        # otherwise load mid-run.
        linker = Linker(cfg, fe.geometry)
        d = max(2.0, float(cfg.tracker.gate_px) / 2)
        for k in range(10):
            x = 2 * r + 4 * k
            if k < 8:
                blobs = [_disc_blob(k, x, h / 2 + s * d, r) for s in (-1, 1)]
            else:
                blobs = [_disc_blob(k, x, h / 2, r, dy=d)]
            linker.next_level(Frame(len(frames) + k, k, frames[0].image), blobs)
        linker.flush()
    except EngineError:           # a frame size the kernels cannot warm up on: no harm
        pass


def _disc_blob(index: int, cx: float, cy: float, r: float, dy: float = 0.0):
    """A Blob for a disc of radius r at (cx, cy), stretched by ``dy`` up and down."""
    from .types import Blob
    x0, x1 = int(cx - r), int(cx + r) + 1
    y0, y1 = int(cy - r - dy), int(cy + r + dy) + 1
    area = int(math.pi * r * (r + dy))
    return Blob(index, float(cx), float(cy), area, (x0, y0, x1, y1), perimeter=2 * math.pi * r,
                deform=0.05, major=2 * (r + dy), minor=2 * r, brightness=60.0)


def _take_primer(frames_iter, cfg: Config, stop: _Stop):
    """The first frames, sampled for the background (report: 100 frames): every 4th of the
    first 400, so that cells have moved between samples (the first 100 in a row hold the
    same cells and make a slower, masked median: measured, more frames dropped on a live
    source). Later frames wait in the ring meanwhile; the front end's running background
    keeps the background current afterwards, and after a long gap in the stream it is built
    afresh (:func:`_reprime_after_gaps`)."""
    held, sample = _hold_sample(frames_iter, cfg)
    if len(sample) < 3 and not stop.requested and len(held) < 3:
        raise SourceError(f"too few frames ({len(held)}) to build a background; "
                          "give one with --background")
    return sample, _held_then(held, frames_iter)


def _hold_sample(frames_iter, cfg: Config) -> tuple[list[Frame], list[Frame]]:
    """Copies of the next ``4 * bg_frames`` frames (fewer at the end of the stream) and the
    background sample among them (every 4th; all when there are few)."""
    n = cfg.frontend.bg_frames
    stride = 4
    held: list[Frame] = []
    for frame in frames_iter:
        held.append(Frame(frame.index, frame.t_ns, frame.image.copy()))
        if len(held) >= n * stride:
            break
    return held, (held[::stride] if len(held) >= 3 * stride else held)


REPRIME_MIN_GAP = 500          # frames (1 s at 500 fps)
LIVE_BACKLOG = 2               # frames waiting: the loop has caught up with a live source


def _reprime_after_gaps(frames_iter, frontend, cfg: Config, stop: _Stop,
                        elastic: _Elastic | None, info: dict):
    """The frames, with the background built afresh after every gap of at least
    ``bg_update_frames // 4`` frames and at least ``REPRIME_MIN_GAP`` (a shorter gap is not
    worth holding 4 * bg_frames frames for: the running mean catches up with it within its
    time constant).

    A live run that stalls loses frames (drop-oldest), and the scene drifts meanwhile (focus,
    illumination); the running background follows drift only at the pace of the frames it
    processes, so after a gap of seconds it is behind the scene and every edge of the chip
    crosses the thresholds as spurious blobs, which the tracker turns into hundreds of
    spurious cells until the running mean catches up (measured: 1,078 cells instead of 231
    after a 1,740-frame gap in 8,000 simulated frames). Instead, the frames after the gap
    are held (copied), a background is built from them as at the start (every 4th of
    ``4 * bg_frames``) and only then are they processed. Off when ``bg_update_frames`` is 0
    (the background is fixed). ``info`` counts the rebuilds and the largest gap [frames].
    """
    tau = cfg.frontend.bg_update_frames
    min_gap = max(tau // 4, REPRIME_MIN_GAP) if tau > 0 else 0
    last = None
    it = iter(frames_iter)
    for frame in it:
        gap = frame.index - last - 1 if last is not None else 0
        if min_gap <= 0 or gap < min_gap or stop.requested:
            last = frame.index
            yield frame
            continue
        info["max_gap"] = max(info.get("max_gap", 0), int(gap))
        held, sample = _hold_sample(itertools.chain([frame], it), cfg)
        if len(sample) >= 3 and not stop.requested:
            t0 = time.perf_counter()
            _prime(frontend, [f.image for f in sample], elastic, again=True)
            info["rebuilds"] = info.get("rebuilds", 0) + 1
            info["seconds"] = round(info.get("seconds", 0.0) + time.perf_counter() - t0, 3)
        del sample
        last = held[-1].index
        yield from _held_then(held, ())


def _held_then(held: list[Frame], rest):
    """The held primer frames (each released once yielded), then the rest of the stream."""
    held.reverse()
    while held:
        yield held.pop()
    yield from rest


def _load_background(path: str, shape: tuple[int, int]) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"--background {p}: no such file")
    try:
        if p.suffix == ".npy":
            img = np.load(p)
        else:
            import cv2
            img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise OSError("not an image OpenCV can read")
    except (OSError, ValueError) as exc:
        raise SourceError(f"--background {p}: cannot read the image ({exc})") from None
    if img.shape != tuple(shape):
        raise SourceError(f"--background {p}: shape {img.shape} differs from the frames' {shape}")
    return np.asarray(img, dtype=np.uint8)


def _status(n_frames: int, files, dispatcher, ring) -> dict:
    st = {"t": time.monotonic(), "frames": n_frames, "cells": files.n_cells,
          "dropped": int(ring.stats.get("dropped", 0))}
    if dispatcher is not None:
        c = dispatcher.counts
        n = files.n_predictions - files.n_errors
        st.update(queue=int(c.get("queued", 0)), spilled=int(c.get("spilled", 0)),
                  predictions=files.n_predictions, errors=files.n_errors,
                  fetal=files.n_fetal, fetal_fraction=(files.n_fetal / n) if n else None)
    return st


class _Series:
    """A bounded time series of the run's counters for the manifest (``progress``):
    t [s since start], frames processed, frames dropped, cells, queue depth, predictions."""

    FIELDS = ("t", "frames", "dropped", "cells", "queue", "predictions")

    def __init__(self, t_start: float):
        self.t_start = t_start
        self.step = 1
        self.k = 0
        self.rows: list[list] = []

    def add(self, n_frames: int, files, dispatcher, ring) -> None:
        self.k += 1
        if self.k % self.step:
            return
        q = dispatcher.counts.get("queued", 0) if dispatcher is not None else 0
        self.rows.append([round(time.perf_counter() - self.t_start, 2), n_frames,
                          int(ring.stats.get("dropped", 0)), files.n_cells, int(q),
                          files.n_predictions])
        if len(self.rows) > PROGRESS_POINTS:
            self.rows = self.rows[::2]
            self.step *= 2

    def to_dict(self) -> dict:
        return {"fields": list(self.FIELDS), "rows": self.rows}


class _Progress:
    """A live progress line: frames/s, cells, queue depth, dropped frames, predictions,
    running fetal fraction."""

    def __init__(self, enabled: bool, n_frames, max_frames, loop):
        self.enabled = enabled
        total = None
        if n_frames:
            total = n_frames * max(loop, 1)
        if max_frames:
            total = min(total, max_frames) if total else max_frames
        self.bar = None
        self.last = 0.0
        self.n_done = 0
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="frame", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5)

    def due(self, now: float, always: bool = False) -> bool:
        if not (self.enabled or always):
            return False
        if now - self.last >= 0.5:
            self.last = now
            return True
        return False

    def update(self, st: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(st["frames"] - self.n_done)
        self.n_done = st["frames"]
        post = {"cells": st["cells"], "dropped": st["dropped"]}
        if "queue" in st:
            ff = st["fetal_fraction"]
            post.update(queue=st["queue"], preds=st["predictions"],
                        fetal="-" if ff is None else f"{ff:.3f}")
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
