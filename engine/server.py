"""The inference worker: clips in over ZeroMQ, micro-batched inference, predictions out.

``fmh serve --model M --connect tcp://127.0.0.1:PORT`` runs one :class:`InferenceWorker`. It
connects a DEALER socket to the dispatcher's ROUTER and

1. announces itself (``hello``: model id, max batch, the number of clips it may hold = its
   initial credit);
2. receives ``clip`` messages only up to the credit it granted (credit-based flow control, not
   a blind PUSH whose high-water mark silently blocks or drops, pitfall 11);
3. preprocesses them by the artefact's metadata (:mod:`engine.infer.preprocess`, the code
   training uses), runs the backend on micro-batches (at most ``max_batch`` clips or
   ``max_wait_ms``; at once when no more clips can come: the dispatcher's ``backlog`` hint is
   0 or the worker holds all its credit allows), and answers every clip with one
   ``prediction`` (an explicit error record when the clip cannot be classified), then
   returns the credit;
4. sends a ``heartbeat`` every ``heartbeat_ms``;
5. ends on ``eos`` or SIGTERM after answering what it holds, saying ``bye``.

Malformed messages are counted, logged (rate-limited) and dropped; the worker keeps serving
and holds at most ``max_batch`` clips plus one message in memory. Inference runs in the
worker's one thread, so a batch must take less than ``worker_timeout_ms`` (heartbeats pause
meanwhile); a worker declared dead that answers later is harmless (duplicates are dropped).
"""
from __future__ import annotations

import logging
import os
import socket as _socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import wire
from .errors import ModelError, WireError
from .ringbuf import process_alive
from .types import CellClip

__all__ = ["InferenceWorker"]

log = logging.getLogger(__name__)


class InferenceWorker:
    """One inference worker process (or thread, in tests).

    Parameters
    ----------
    model : path or ModelArtefact
        The ONNX model artefact.
    connect : str
        The dispatcher's endpoint, e.g. ``tcp://127.0.0.1:5555``.
    cfg : Config, optional
        ``cfg.serving`` gives the defaults of the options below, ``cfg.model`` the backend and
        threshold.
    backend : str, optional
        Backend name for :func:`~engine.infer.backends.make_backend` (default
        ``cfg.model.backend``).
    credits, max_batch, max_wait_ms, heartbeat_ms : optional
        Override ``cfg.serving``.
    curve_keys : str, optional
        Folder made by ``fmh keys``; the worker authenticates with its client key and checks
        the dispatcher's server key.
    delay_ms : float
        Artificial extra compute time per clip [ms] (fault tests: a slow worker).
    threads : int
        ONNX Runtime intra-op threads (0: default).
    parent_pid : int, optional
        Exit when this process is gone (workers started by :func:`engine.dispatch.spawn_workers`).
    """

    def __init__(self, model: Any, connect: str, *, cfg: Any = None, backend: str | None = None,
                 credits: int | None = None, max_batch: int | None = None,
                 max_wait_ms: float | None = None, heartbeat_ms: float | None = None,
                 curve_keys: str | None = None, delay_ms: float = 0.0, threads: int = 0,
                 parent_pid: int | None = None, name: str | None = None):
        from .config import load_config
        from .infer.artefact import ModelArtefact
        from .infer.backends import Classifier, make_backend

        cfg = cfg if cfg is not None else load_config()
        s = cfg.serving
        self.cfg = cfg
        self.connect = connect
        self.artefact = model if hasattr(model, "meta") else ModelArtefact.load(model)
        self.max_batch = int(max_batch or s.max_batch)
        self.backend = make_backend(self.artefact, backend or cfg.model.backend,
                                    max_batch=self.max_batch, threads=threads)
        self.classifier = Classifier(self.artefact.meta, cfg.model.threshold)
        self.credits = int(credits or s.credits)
        self.max_wait_ms = float(s.max_wait_ms if max_wait_ms is None else max_wait_ms)
        self.heartbeat_s = float(heartbeat_ms or s.heartbeat_ms) / 1000.0
        self.max_bytes = int(s.max_message_bytes)
        self.curve_keys = curve_keys if curve_keys is not None else (s.curve_keys or None)
        self.delay_s = max(0.0, float(delay_ms)) / 1000.0
        self.parent_pid = parent_pid
        self.name = name or f"{_socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.views = cfg.model.views
        self.stats = {"received": 0, "malformed": 0, "answered": 0, "errors": 0, "batches": 0,
                      "unexpected": 0, "send_timeouts": 0}
        self._stop = threading.Event()
        self._backlog: int | None = None
        self._last_log = 0.0

    # --------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to finish what it holds and leave (thread- and signal-safe)."""
        self._stop.set()

    def run(self) -> dict:
        """Serve until ``eos``, :meth:`stop` or the parent's death; returns the counters."""
        from .infer.backends import Batcher

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 1000)
            # Never block for ever on a dispatcher that is not there (yet): messages queue on
            # the pending connection; a send that cannot be queued in 2 s is dropped and
            # counted (the dispatcher re-sends what is not answered).
            sock.setsockopt(zmq.SNDTIMEO, 2000)
            sock.setsockopt(zmq.ROUTING_ID, self.name.encode()[:200])
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_bytes + wire.MAX_HEADER_BYTES)
            sock.setsockopt(zmq.RCVHWM, max(64, 4 * self.credits))
            if self.curve_keys:
                from .dispatch import curve_client_keys
                pub, sec, server = curve_client_keys(self.curve_keys)
                sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = pub, sec, server
            if self.connect.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(self.connect)
            self._sock = sock
            self._run_id = ""
            self._hello(self.credits)
            batcher = Batcher(self.max_batch, self.max_wait_ms)
            next_hb = time.monotonic() + self.heartbeat_s
            eos = False
            while True:
                now = time.monotonic()
                wake = next_hb
                dl = batcher.deadline()
                if dl is not None:
                    wake = min(wake, dl)
                timeout = max(0, int((wake - now) * 1000))
                if not eos and not self._stop.is_set():
                    if sock.poll(min(timeout, 200), zmq.POLLIN):
                        for _ in range(256):
                            try:
                                kind = self._recv_one(batcher)
                            except zmq.Again:
                                break
                            if kind == "eos":
                                eos = True
                                break
                            if len(batcher) >= self.max_batch:
                                break
                now = time.monotonic()
                # Run a batch when it is full or has waited max_wait_ms, and at once when no
                # more clips can come: the dispatcher has nothing queued, or this worker holds
                # all the clips its credit allows (waiting would only add latency).
                if batcher.due(now) or (len(batcher) and (
                        self._backlog == 0 or len(batcher) >= self.credits
                        or eos or self._stop.is_set())):
                    self._process(batcher.take())
                if (eos or self._stop.is_set()) and not len(batcher):
                    break
                if now >= next_hb:
                    self._send(wire.encode("heartbeat", self._run_id, worker=self.name,
                                           stats=dict(self.stats)))
                    next_hb = now + self.heartbeat_s
                    if self.parent_pid and not process_alive(self.parent_pid):
                        log.warning("worker %s: parent %s is gone; leaving", self.name,
                                    self.parent_pid)
                        self._stop.set()
            self._send(wire.encode("bye", self._run_id, worker=self.name, stats=dict(self.stats)))
        finally:
            sock.close(linger=1000)
            ctx.term()
        return dict(self.stats)

    # --------------------------------------------------------------------------------------
    def _send(self, frames: list) -> None:
        try:
            wire.send(self._sock, frames)
        except zmq.Again:
            self.stats["send_timeouts"] += 1

    def _hello(self, credits: int) -> None:
        self._send(wire.encode("hello", self._run_id, model_id=self.artefact.model_id,
                               max_batch=self.max_batch, credits=max(0, credits),
                               worker=self.name, pid=os.getpid(), backend=self.backend.name,
                               device=" ".join(map(str, self.backend.providers))))

    def _recv_one(self, batcher) -> str:
        try:
            _, msg = wire.recv(self._sock, max_bytes=self.max_bytes, flags=zmq.NOBLOCK)
        except WireError as exc:
            self._malformed(exc, batcher)
            return "malformed"
        kind = msg.kind
        if kind == "clip":
            self.stats["received"] += 1
            self._run_id = msg.header["run"]
            try:
                clip = wire.decode_clip(msg)
            except WireError as exc:
                self._answer_error(msg.header, f"malformed clip: {exc}")
                return "malformed"
            batcher.add((msg.header["seq"], clip, time.monotonic()), time.monotonic())
            self._backlog = msg.header.get("backlog")
        elif kind == "reset":                   # the dispatcher does not know us (restarted)
            self._hello(self.credits - len(batcher))
        elif kind != "eos":
            self.stats["unexpected"] += 1
        return kind

    def _malformed(self, exc: WireError, batcher) -> None:
        self.stats["malformed"] += 1
        now = time.monotonic()
        if now - self._last_log > 5.0:
            self._last_log = now
            log.warning("worker %s: dropped malformed message (%s); %d so far", self.name, exc,
                        self.stats["malformed"])
        h = getattr(exc, "header", None)
        # A clip whose header names its cell and sequence number is answered with an error
        # record, so the dispatcher's accounting (and the cell) is not lost.
        if (isinstance(h, dict) and h.get("kind") == "clip" and h.get("v") == wire.VERSION
                and isinstance(h.get("seq"), int) and isinstance(h.get("cell"), int)
                and not isinstance(h.get("seq"), bool) and not isinstance(h.get("cell"), bool)
                and 0 <= h["seq"] < 2 ** 63 and 0 <= h["cell"] < 2 ** 63
                and isinstance(h.get("run"), str) and len(h["run"]) <= wire.MAX_STR):
            self.stats["received"] += 1
            self._answer_error(h, f"malformed clip: {exc}")

    def _answer_error(self, header: dict, error: str) -> None:
        self.stats["errors"] += 1
        self.stats["answered"] += 1
        self._send(wire.encode("prediction", header["run"], cell=header["cell"],
                               seq=header["seq"], p_fetal=None, label="", probs=[],
                               model_id=self.artefact.model_id, error=error[:1000],
                               worker=self.name))
        self._send(wire.encode("credit", self._run_id, n=1, worker=self.name))

    # --------------------------------------------------------------------------------------
    def _process(self, items: list) -> None:
        """Preprocess, infer and answer one micro-batch of ``(seq, clip, t_recv)``."""
        from .infer.preprocess import preprocess

        t_start = time.monotonic()
        results: dict[int, tuple] = {}
        good: list[tuple[int, CellClip, float]] = []
        tensors = []
        view_of: list[int] = []
        for item in items:
            try:
                x, idx = _prep(preprocess, [item[1]], self.artefact.meta, self.views)
            except Exception as exc:        # a clip this model cannot take: answer, go on
                results[item[0]] = (None, f"preprocess failed: {type(exc).__name__}: {exc}")
                continue
            tensors.append(x)
            view_of.extend([len(good)] * len(x))
            good.append(item)
        compute_ms = 0.0
        if good:
            batch = np.concatenate(tensors) if len(tensors) > 1 else tensors[0]
            t0 = time.perf_counter()
            try:
                logits = self.backend.infer(batch)
                if self.delay_s:
                    time.sleep(self.delay_s * len(good))
                probs, _, _ = self.classifier(logits)
                # Multi-view: average the views' probabilities per clip.
                views = np.asarray(view_of)
                mean = np.zeros((len(good), probs.shape[1]))
                np.add.at(mean, views, probs)
                mean /= np.bincount(views, minlength=len(good))[:, None]
                p = mean[:, self.classifier.positive]
                for k, (seq, clip, _) in enumerate(good):
                    label = self.classifier.label(mean[k])
                    results[seq] = ((float(p[k]), label, tuple(float(v) for v in mean[k])), "")
            except Exception as exc:
                log.error("worker %s: inference failed for a batch of %d: %s", self.name,
                          len(good), exc)
                for seq, _, _ in good:
                    results[seq] = (None, f"inference failed: {type(exc).__name__}: {exc}")
            compute_ms = (time.perf_counter() - t0) * 1e3
        self.stats["batches"] += 1
        for seq, clip, t_recv in items:
            ok, error = results[seq]
            wait_ms = (t_start - t_recv) * 1e3
            if ok is None:
                self.stats["errors"] += 1
                fields = dict(p_fetal=None, label="", probs=[], error=error[:1000])
            else:
                fields = dict(p_fetal=ok[0], label=ok[1], probs=list(ok[2]), error="")
            held_ms = (time.monotonic() - t_recv) * 1e3      # receipt -> answer, this host
            self._send(wire.encode("prediction", self._run_id, cell=int(clip.cell_id), seq=seq,
                                   model_id=self.artefact.model_id, worker=self.name,
                                   compute_ms=compute_ms, wait_ms=wait_ms, held_ms=held_ms,
                                   **fields))
            self.stats["answered"] += 1
        self._send(wire.encode("credit", self._run_id, n=len(items), worker=self.name))


def _prep(preprocess, clips: list, meta: dict, views: str) -> tuple[np.ndarray, Any]:
    out = preprocess(clips, meta, views=views)
    if isinstance(out, tuple):
        x, idx = out[0], out[1]
    else:
        x, idx = out, None
    x = np.asarray(x)
    if x.ndim != 5 or x.dtype != np.float32 or len(x) < 1:
        raise ModelError(f"preprocess returned {x.dtype} {x.shape}, expected float32 (N,C,T,H,W)")
    return x, idx


def worker_main(model: str, connect: str, **kwargs: Any) -> dict:
    """Build and run a worker (used by ``fmh serve``)."""
    return InferenceWorker(Path(model) if not hasattr(model, "meta") else model, connect,
                           **kwargs).run()
