"""The clip dispatcher: owns delivery of every clip to the inference workers.

:class:`Dispatcher` binds a ROUTER socket (workers connect with DEALER sockets, see
:mod:`engine.server`) and a PUB socket (live subscribers). :meth:`Dispatcher.submit` never
blocks the caller for long: clips wait in a bounded in-memory FIFO (``queue_capacity``) and,
when workers fall behind, spill to disk (``<spill_dir>/<seq>.npy`` + ``<seq>.json``), to be
read back in order. A background thread, which owns the sockets,

* sends a clip only to a worker that granted credit (credit-based flow control);
* tracks the clips each worker holds; a worker silent for ``worker_timeout_ms`` (or one that
  cannot be reached) is declared dead and its clips are sent to others, at most
  ``max_attempts`` times, after which the clip is answered by an explicit error
  :class:`~engine.types.Prediction`;
* accepts exactly one prediction per clip (a re-sent clip answered twice: the second is dropped
  and counted), calls ``on_prediction`` and publishes it on the PUB socket;
* on :meth:`close` waits until every submitted clip has its one prediction, then sends ``eos``
  to the workers.

Endpoints bind to 127.0.0.1 unless ``cfg.serving.host`` says otherwise; a non-local host needs
CURVE keys (``fmh keys``) and the dispatcher then accepts only the client keys in
``<keys>/clients``.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import zmq

from . import wire
from .errors import ConfigError, DeliveryError, WireError
from .types import CellClip, Prediction, TrackStatus

__all__ = ["Dispatcher", "spawn_workers", "stop_workers", "WorkerProcesses", "make_keys",
           "curve_server_keys", "curve_client_keys", "is_local_host", "usable_cpus", "split_cpus",
           "parse_cpus", "pin_to",
           "worker_threads"]

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_CREDIT = 1024               # a worker cannot claim more than this (bounds a rogue peer)
MAX_JOINED = 64                 # workers remembered for the manifest (bounds a flapping peer)


def is_local_host(host: str) -> bool:
    """True for loopback addresses (no CURVE needed)."""
    return host in LOCAL_HOSTS or host.startswith("127.")


# ------------------------------------------------------------------------------------------
# CURVE keys
# ------------------------------------------------------------------------------------------

def make_keys(out: str | os.PathLike, *, client: str = "client") -> dict[str, Path]:
    """Write CURVE key pairs: ``server/server.key[_secret]`` (once) and
    ``clients/<client>.key[_secret]``.

    Give the ``server`` folder to the dispatcher host and ``server/server.key`` (public) plus a
    client's pair to each worker host. Returns the paths written.
    """
    import zmq.auth
    out = Path(out)
    (out / "server").mkdir(parents=True, exist_ok=True)
    (out / "clients").mkdir(parents=True, exist_ok=True)
    paths = {}
    if not (out / "server" / "server.key_secret").exists():
        pub, sec = zmq.auth.create_certificates(str(out / "server"), "server")
        paths.update(server=Path(pub), server_secret=Path(sec))
    pub, sec = zmq.auth.create_certificates(str(out / "clients"), client)
    paths.update(client=Path(pub), client_secret=Path(sec))
    for p in paths.values():
        if p.name.endswith("_secret"):
            os.chmod(p, 0o600)
    return paths


def _load_cert(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth
    if not path.is_file():
        raise ConfigError(f"CURVE key file {path} not found (make keys with `fmh keys --out DIR`)")
    try:
        pub, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"CURVE key file {path} cannot be read: {exc}") from None
    if secret and not sec:
        raise ConfigError(f"CURVE key file {path} holds no secret key")
    return pub, sec


def curve_server_keys(folder: str | os.PathLike) -> tuple[bytes, bytes, Path]:
    """(public, secret, allowed-clients folder) for the dispatcher."""
    folder = Path(folder)
    pub, sec = _load_cert(folder / "server" / "server.key_secret", True)
    clients = folder / "clients"
    if not clients.is_dir() or not any(clients.glob("*.key")):
        raise ConfigError(f"CURVE keys {folder}: no client public keys in {clients}")
    return pub, sec, clients  # type: ignore[return-value]


def curve_client_keys(folder: str | os.PathLike, client: str = "") -> tuple[bytes, bytes, bytes]:
    """(client public, client secret, server public) for a worker or subscriber."""
    folder = Path(folder)
    if client:
        cpath = folder / "clients" / f"{client}.key_secret"
    else:
        found = sorted((folder / "clients").glob("*.key_secret"))
        if not found:
            raise ConfigError(f"CURVE keys {folder}: no client secret key in {folder / 'clients'}")
        cpath = found[0]
    cpub, csec = _load_cert(cpath, True)
    spub, _ = _load_cert(folder / "server" / "server.key", False)
    return cpub, csec, spub  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------
# Book-keeping
# ------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    seq: int
    cell_id: int
    clip: CellClip | None          # None while spilled to disk
    t_submit: float
    attempts: int = 0
    worker: bytes | None = None
    t_sent: float = 0.0


@dataclass
class _Worker:
    ident: bytes
    model_id: str
    max_batch: int
    credit: int
    last_seen: float
    name: str = ""
    inflight: set = field(default_factory=set)
    answered: int = 0


class Dispatcher:
    """Send clips to inference workers and collect exactly one prediction per clip.

    Parameters
    ----------
    cfg : Config
        ``cfg.serving`` gives host, port, queue capacity, heartbeat and timeout, size limits
        and CURVE keys.
    on_prediction : callable(Prediction), optional
        Called once per submitted clip, from the dispatcher's thread, in arrival order.
    spill_dir : path, optional
        Where clips spill when the in-memory queue is full (default ``cfg.serving.spill_dir``
        or a temporary folder).
    run_id : str, optional
        Carried in every message (default: a random id).
    require_curve : bool
        Use CURVE even on a loopback address.
    max_attempts : int, optional
        Sends of one clip before it is answered with an error (workers kept dying on it);
        default ``cfg.serving.max_attempts``.
    record_timings : bool
        Keep per-clip timings (queue wait, worker wait, compute, total) in :attr:`timings`.
    """

    def __init__(self, cfg: Any, on_prediction: Callable[[Prediction], Any] | None = None, *,
                 spill_dir: str | os.PathLike | None = None, run_id: str | None = None,
                 require_curve: bool = False, max_attempts: int | None = None,
                 record_timings: bool = False):
        s = cfg.serving
        self.cfg = cfg
        self.host = s.host
        self.curve_keys = s.curve_keys
        if not is_local_host(s.host) and not s.curve_keys:
            raise ConfigError(f"serving.host={s.host!r} is not a loopback address: set "
                              f"serving.curve_keys to a folder made by `fmh keys`")
        if require_curve and not s.curve_keys:
            raise ConfigError("CURVE required but serving.curve_keys is empty (run `fmh keys`)")
        self.use_curve = bool(s.curve_keys)
        if self.use_curve:
            curve_server_keys(s.curve_keys)           # fail early on missing keys
        max_attempts = s.max_attempts if max_attempts is None else max_attempts
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.on_prediction = on_prediction
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.capacity = int(s.queue_capacity)
        self.max_bytes = int(s.max_message_bytes)
        self.heartbeat_s = float(s.heartbeat_ms) / 1000.0
        self.timeout_s = float(s.worker_timeout_ms) / 1000.0
        self.max_attempts = int(max_attempts)
        self._spill_dir = Path(spill_dir or s.spill_dir) if (spill_dir or s.spill_dir) else None
        self._own_spill = self._spill_dir is None
        self.record_timings = record_timings
        self.timings: list[dict] = []

        self._lock = threading.Lock()
        self._memq: collections.deque[int] = collections.deque()     # seqs in memory, FIFO
        self._spilled: collections.deque[int] = collections.deque()  # seqs on disk, FIFO
        self._resend: collections.deque[int] = collections.deque()   # seqs to send again first
        self._entries: dict[int, _Entry] = {}                        # every unanswered clip
        self._next_seq = 0
        self._counts = dict(submitted=0, sent=0, resent=0, spilled=0, answered=0, errors=0,
                            duplicates_dropped=0, workers_dead=0, workers_seen=0, malformed=0,
                            unanswered=0, callback_errors=0, max_queue=0)
        self._workers: dict[bytes, _Worker] = {}
        self._joined: list[dict] = []        # who joined, with what backend (first MAX_JOINED)
        self._dead_idents: set[bytes] = set()
        self._closing = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self.endpoint = ""
        self.pub_endpoint = ""

    # --------------------------------------------------------------------------------------
    # Public API
    # --------------------------------------------------------------------------------------
    def start(self) -> "Dispatcher":
        """Bind the sockets and start the loop thread; :attr:`endpoint` is then valid."""
        if self._thread is not None:
            return self
        if self._spill_dir is None:
            import tempfile
            self._spill_dir = Path(tempfile.mkdtemp(prefix="fmh-spill-"))
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._main, name="fmh-dispatcher", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __enter__(self) -> "Dispatcher":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close(timeout=None if exc[0] is None else 10.0)

    @property
    def counts(self) -> dict:
        """Counters: submitted, sent, resent, spilled, answered, errors, duplicates_dropped,
        workers_dead, queued (waiting, memory + disk), inflight, workers (alive), ..."""
        with self._lock:
            c = dict(self._counts)
            c["queued"] = len(self._memq) + len(self._spilled) + len(self._resend)
            c["on_disk"] = len(self._spilled)
            c["inflight"] = sum(len(w.inflight) for w in self._workers.values())
            c["workers"] = len(self._workers)
            c["outstanding"] = len(self._entries)
        return c

    @property
    def joined(self) -> list[dict]:
        """The workers that joined (first ``MAX_JOINED``): worker, pid, backend, device,
        model_id, as each said in its hello (strings, cut to 120 characters)."""
        with self._lock:
            return [dict(j) for j in self._joined]

    def worker_info(self) -> list[dict]:
        """A snapshot of the live workers: name, model id, credit, clips held, answered."""
        for _ in range(10):
            try:
                return [{"name": w.name, "model_id": w.model_id, "credit": w.credit,
                         "inflight": len(w.inflight), "answered": w.answered}
                        for w in list(self._workers.values())]
            except RuntimeError:          # changed by the loop thread meanwhile; try again
                continue
        return []

    @property
    def spill_dir(self) -> Path | None:
        return self._spill_dir

    def submit(self, clip: CellClip) -> int:
        """Queue one clip for classification; returns its sequence number.

        Never waits for a worker: the clip goes to the in-memory queue, or to disk when that is
        full (or already spilling, to keep the order).
        """
        if self._thread is None:
            raise DeliveryError("Dispatcher.submit() before start()")
        if not isinstance(clip, CellClip):
            raise TypeError(f"submit() takes a CellClip, got {type(clip).__name__}")
        f = clip.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or not len(f):
            raise ValueError(f"clip {clip.cell_id}: frames must be a uint8 array (T, H, W) with "
                             f"T >= 1, got {getattr(f, 'dtype', type(f).__name__)} "
                             f"{getattr(f, 'shape', '')}")
        with self._lock:
            if self._closing:
                raise DeliveryError(f"clip {clip.cell_id} submitted after close()")
            seq = self._next_seq
            self._next_seq += 1
            e = _Entry(seq, int(clip.cell_id), clip, time.perf_counter())
            self._entries[seq] = e
            self._counts["submitted"] += 1
            if len(self._memq) < self.capacity and not self._spilled:
                self._memq.append(seq)
            else:
                self._write_spill(e)
                e.clip = None
                self._spilled.append(seq)
                self._counts["spilled"] += 1
            q = len(self._memq) + len(self._spilled)
            if q > self._counts["max_queue"]:
                self._counts["max_queue"] = q
        self._wake()
        return seq

    def close(self, timeout: float | None = None) -> dict:
        """Wait until every submitted clip has its prediction, send ``eos``, stop.

        Parameters
        ----------
        timeout : float, optional
            Longest wait [s]; clips still unanswered then are answered with error predictions
            ("not answered before shutdown") and counted as ``unanswered``.

        Returns
        -------
        dict
            The final counters.
        """
        with self._lock:
            self._closing = True
            if timeout is not None:
                self._deadline = time.monotonic() + timeout
        self._wake()
        if self._thread is not None:
            self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        if self._own_spill and self._spill_dir is not None:
            import shutil
            shutil.rmtree(self._spill_dir, ignore_errors=True)
        if self._error is not None:
            raise DeliveryError(f"dispatcher failed: {self._error}") from self._error
        return self.counts

    # --------------------------------------------------------------------------------------
    # Spill to disk (called with the lock held)
    # --------------------------------------------------------------------------------------
    def _spill_paths(self, seq: int) -> tuple[Path, Path]:
        base = self._spill_dir / f"{seq:012d}"  # type: ignore[operator]
        return base.with_suffix(".npy"), base.with_suffix(".json")

    def _write_spill(self, e: _Entry) -> None:
        clip = e.clip
        npy, js = self._spill_paths(e.seq)
        np.save(npy, np.ascontiguousarray(clip.frames, dtype=np.uint8), allow_pickle=False)
        header = {
            "seq": e.seq, "cell": int(clip.cell_id),
            "status": clip.status.value if isinstance(clip.status, TrackStatus) else str(clip.status),
            "reason": clip.reason, "t0_ns": int(clip.t0_ns), "t_exit_ns": int(clip.t_exit_ns),
            "features": {str(k): float(v) for k, v in dict(clip.features).items()},
            "frame_indices": np.asarray(clip.frame_indices, np.int64).tolist(),
            "centroids": np.asarray(clip.centroids, np.float32).tolist(),
            "boxes": np.asarray(clip.boxes, np.int32).tolist(),
            "areas": np.asarray(clip.areas, np.int32).tolist(),
        }
        tmp = js.with_suffix(".tmp")
        tmp.write_text(json.dumps(header))
        os.replace(tmp, js)

    def _read_spill(self, seq: int) -> CellClip:
        npy, js = self._spill_paths(seq)
        h = json.loads(js.read_text())
        frames = np.load(npy, allow_pickle=False)
        clip = CellClip(cell_id=int(h["cell"]), frames=frames,
                        frame_indices=np.asarray(h["frame_indices"], np.int64),
                        centroids=np.asarray(h["centroids"], np.float32).reshape(-1, 2),
                        boxes=np.asarray(h["boxes"], np.int32).reshape(-1, 4),
                        areas=np.asarray(h["areas"], np.int32),
                        status=TrackStatus(h["status"]), reason=h["reason"], t0_ns=h["t0_ns"],
                        t_exit_ns=h["t_exit_ns"], features=h["features"])
        for p in (npy, js):
            p.unlink(missing_ok=True)
        return clip

    def _refill(self) -> None:
        """Move spilled clips back into memory, in order, while there is room."""
        while True:
            with self._lock:
                if not self._spilled or len(self._memq) >= self.capacity:
                    return
                seq = self._spilled[0]
            try:
                clip = self._read_spill(seq)              # disk I/O outside the lock
            except (OSError, ValueError, KeyError) as exc:
                with self._lock:
                    self._spilled.popleft()
                self._answer_error(seq, f"spilled clip could not be read back: {exc}")
                continue
            with self._lock:
                self._spilled.popleft()
                e = self._entries.get(seq)
                if e is not None:
                    e.clip = clip
                    self._memq.append(seq)

    # --------------------------------------------------------------------------------------
    # The loop (its own thread; owns every socket)
    # --------------------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass                                          # the pipe is full: a wake-up is pending

    def _main(self) -> None:
        ctx = zmq.Context()
        auth = None
        router = pub = None
        try:
            router = ctx.socket(zmq.ROUTER)
            pub = ctx.socket(zmq.PUB)
            for sock in (router, pub):
                sock.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)    # unreachable worker -> error, not a drop
            router.setsockopt(zmq.MAXMSGSIZE, self.max_bytes + wire.MAX_HEADER_BYTES)
            router.setsockopt(zmq.SNDHWM, 10000)
            router.setsockopt(zmq.RCVHWM, 10000)
            pub.setsockopt(zmq.SNDHWM, 100000)
            if self.use_curve:
                from zmq.auth.thread import ThreadAuthenticator
                spub, ssec, clients = curve_server_keys(self.curve_keys)
                auth = ThreadAuthenticator(ctx)
                auth.start()
                auth.configure_curve(domain="*", location=str(clients))
                for sock in (router, pub):
                    sock.curve_secretkey, sock.curve_publickey = ssec, spub
                    sock.curve_server = True
            host = f"[{self.host}]" if ":" in self.host else self.host
            if ":" in self.host:
                for sock in (router, pub):
                    sock.setsockopt(zmq.IPV6, 1)
            router.bind(f"tcp://{host}:{self.cfg.serving.port or 0}")
            pub.bind(f"tcp://{host}:{self.cfg.serving.pub_port or 0}")
            self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.pub_endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        except Exception as exc:  # noqa: BLE001 - reported to start()
            self._error = ConfigError(f"dispatcher cannot bind to {self.host}: {exc}") \
                if isinstance(exc, zmq.ZMQError) else exc
            for sock in (router, pub):
                if sock is not None:
                    sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            self._ready.set()
            return
        self._router, self._pub = router, pub
        self._ready.set()
        try:
            self._loop(router)
        except BaseException as exc:  # noqa: BLE001 - surfaced by close()
            log.exception("dispatcher loop failed")
            self._error = exc
        finally:
            router.close(linger=1000)        # let the eos messages leave
            pub.close(linger=200)
            if auth is not None:
                auth.stop()
            ctx.term()
            self._done.set()

    def _loop(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_check = time.monotonic() + min(self.heartbeat_s, 0.1)
        next_stats = time.monotonic() + 1.0
        no_worker_since: float | None = None
        while True:
            now = time.monotonic()
            timeout_ms = max(0.0, min(next_check, next_stats) - now) * 1000
            events = dict(poller.poll(timeout_ms))
            if self._wake_r in events:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            if router in events:
                for _ in range(1000):
                    try:
                        ident, msg = wire.recv(router, max_bytes=self.max_bytes, routed=True,
                                               flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except WireError as exc:
                        self._malformed(exc)
                        continue
                    self._handle(router, ident, msg)
            now = time.monotonic()
            if now >= next_check:
                self._check_workers(now)
                next_check = now + min(self.heartbeat_s, 0.1)
            self._refill()
            self._dispatch(router)
            if now >= next_stats:
                self._publish("stats", counters=self.counts)
                next_stats = now + 1.0
            with self._lock:
                closing, outstanding, deadline = self._closing, len(self._entries), self._deadline
            if closing:
                if not self._workers:
                    no_worker_since = no_worker_since or now
                else:
                    no_worker_since = None
                grace = max(3 * self.timeout_s, 10.0)
                if outstanding and ((deadline is not None and now >= deadline)
                                    or (no_worker_since is not None
                                        and now - no_worker_since > grace)):
                    why = ("not answered before shutdown" if deadline is not None and now >= deadline
                           else "no inference worker alive")
                    self._answer_all(why)
                    outstanding = 0
                if not outstanding:
                    # eos to the live workers and to those declared dead (a slow one may still
                    # be there; an unreachable one is skipped).
                    for ident in list(self._workers) + list(self._dead_idents):
                        self._send(router, ident, wire.encode("eos", self.run_id))
                    self._publish("eos", counters=self.counts)
                    return

    # --------------------------------------------------------------------------------------
    def _send(self, router: zmq.Socket, ident: bytes, frames: list) -> bool:
        try:
            wire.send(router, frames, identity=ident, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                w = self._workers.get(ident)
                if w is not None:
                    self._declare_dead(w, "unreachable")
                return False
            raise

    def _publish(self, kind: str, **fields: Any) -> None:
        try:
            wire.send(self._pub, wire.encode(kind, self.run_id, **fields), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _malformed(self, exc: WireError) -> None:
        self._counts["malformed"] += 1
        if self._counts["malformed"] <= 5 or self._counts["malformed"] % 1000 == 0:
            log.warning("dispatcher: dropped malformed message (%s); %d so far", exc,
                        self._counts["malformed"])

    def _handle(self, router: zmq.Socket, ident: bytes, msg: wire.Message) -> None:
        h, kind = msg.header, msg.kind
        now = time.monotonic()
        w = self._workers.get(ident)
        if kind == "hello":
            self._dead_idents.discard(ident)
            if w is None:
                w = _Worker(ident, h.get("model_id", ""), h["max_batch"], 0, now,
                            name=h.get("worker", ""))
                self._workers[ident] = w
                self._counts["workers_seen"] += 1
                with self._lock:
                    if len(self._joined) < MAX_JOINED:
                        self._joined.append({k: str(h.get(k, ""))[:120] for k in
                                             ("worker", "pid", "backend", "device", "model_id")})
                log.info("worker %s joined (model %s, backend %s on %s)", w.name, w.model_id,
                         h.get("backend", "?"), h.get("device", "?"))
            w.credit = min(h["credits"], MAX_CREDIT)
            w.last_seen = now
            return
        if w is not None:
            w.last_seen = now
        if kind == "prediction":
            self._prediction(h, w)
            if w is None:
                self._send(router, ident, wire.encode("reset", self.run_id))
        elif kind == "credit":
            if w is None:
                self._send(router, ident, wire.encode("reset", self.run_id))
            else:
                w.credit = min(w.credit + h["n"], MAX_CREDIT)
        elif kind == "heartbeat":
            if w is None:
                self._send(router, ident, wire.encode("reset", self.run_id))
        elif kind == "bye":
            if w is not None:
                log.info("worker %s left", w.name)
                self._requeue(w)
                del self._workers[ident]
        else:
            self._counts["malformed"] += 1

    def _prediction(self, h: dict, w: _Worker | None) -> None:
        seq = h["seq"]
        with self._lock:
            e = self._entries.get(seq)
            if e is None or e.cell_id != h["cell"] or e.attempts == 0:
                if e is None and seq < self._next_seq:
                    self._counts["duplicates_dropped"] += 1
                else:
                    self._counts["malformed"] += 1
                return
            del self._entries[seq]
        holder = self._workers.get(e.worker) if e.worker is not None else None
        if holder is not None:
            holder.inflight.discard(seq)
            holder.answered += 1
        now = time.perf_counter()
        latency_ms = (now - e.t_submit) * 1e3
        p = h["p_fetal"]
        pred = Prediction(cell_id=e.cell_id, p_fetal=float("nan") if p is None else float(p),
                          label=h["label"], probs=tuple(float(x) for x in h["probs"]),
                          model_id=h.get("model_id", ""), latency_ms=latency_ms, error=h["error"])
        if self.record_timings:
            self.timings.append({
                "cell_id": e.cell_id, "total_ms": latency_ms,
                "queue_ms": (e.t_sent - e.t_submit) * 1e3,
                "worker_wait_ms": float(h.get("wait_ms", float("nan"))),
                "compute_ms": float(h.get("compute_ms", float("nan"))),
                # to the worker and back (both sockets, both threads), apart from the time
                # the worker held the clip: clock-independent, so right for remote workers
                # (only for a clip sent once: after a resend, the answer may be the first's)
                "trip_ms": ((now - e.t_sent) * 1e3 - float(h.get("held_ms", float("nan")))
                            if e.attempts == 1 else float("nan")),
                "attempts": e.attempts})
        self._deliver(pred, seq, worker=h.get("worker", ""))

    def _deliver(self, pred: Prediction, seq: int, worker: str = "") -> None:
        with self._lock:
            self._counts["answered"] += 1
            if pred.error:
                self._counts["errors"] += 1
        if self.on_prediction is not None:
            try:
                self.on_prediction(pred)
            except Exception:  # noqa: BLE001 - a sink bug must not stop delivery
                self._counts["callback_errors"] += 1
                log.exception("on_prediction failed for cell %s", pred.cell_id)
        self._publish("prediction", cell=pred.cell_id, seq=seq, p_fetal=pred.p_fetal,
                      label=pred.label, probs=list(pred.probs), model_id=pred.model_id,
                      latency_ms=pred.latency_ms, error=pred.error, worker=worker)

    def _answer_error(self, seq: int, error: str) -> None:
        with self._lock:
            e = self._entries.pop(seq, None)
        if e is None:
            return
        self._deliver(Prediction(cell_id=e.cell_id, p_fetal=float("nan"), label="",
                                 latency_ms=(time.perf_counter() - e.t_submit) * 1e3,
                                 error=error), seq)

    def _answer_all(self, why: str) -> None:
        with self._lock:
            seqs = sorted(self._entries)
            self._counts["unanswered"] += len(seqs)
            self._memq.clear()
            self._resend.clear()
            spilled, self._spilled = list(self._spilled), collections.deque()
        for seq in spilled:
            for p in self._spill_paths(seq):
                p.unlink(missing_ok=True)
        for seq in seqs:
            self._answer_error(seq, why)
        for w in self._workers.values():
            w.inflight.clear()

    # --------------------------------------------------------------------------------------
    def _check_workers(self, now: float) -> None:
        for w in list(self._workers.values()):
            if now - w.last_seen > self.timeout_s:
                self._declare_dead(w, f"silent for {now - w.last_seen:.1f} s")

    def _declare_dead(self, w: _Worker, why: str) -> None:
        if self._workers.pop(w.ident, None) is None:
            return
        self._dead_idents.add(w.ident)
        log.warning("worker %s declared dead (%s); re-sending its %d clips", w.name, why,
                    len(w.inflight))
        with self._lock:
            self._counts["workers_dead"] += 1
        self._requeue(w)

    def _requeue(self, w: _Worker) -> None:
        """Put the clips a worker held back at the front of the queue (or give up on them)."""
        failed = []
        with self._lock:
            for seq in sorted(w.inflight, reverse=True):
                e = self._entries.get(seq)
                if e is None:
                    continue
                e.worker = None
                if e.attempts >= self.max_attempts:
                    failed.append((seq, e.attempts))
                else:
                    self._resend.appendleft(seq)
                    self._counts["resent"] += 1
            w.inflight.clear()
        for seq, n in failed:
            self._answer_error(seq, f"no prediction after {n} attempts (workers died or left)")

    def _next_clip(self) -> tuple[_Entry | None, int]:
        """The next clip to send (re-sends first) and how many wait behind it."""
        with self._lock:
            for q in (self._resend, self._memq):
                while q:
                    seq = q.popleft()
                    e = self._entries.get(seq)
                    if e is not None and e.clip is not None:
                        return e, len(self._resend) + len(self._memq) + len(self._spilled)
        return None, 0

    def _dispatch(self, router: zmq.Socket) -> None:
        while True:
            ready = [w for w in self._workers.values() if w.credit > 0]
            if not ready:
                return
            w = max(ready, key=lambda x: (x.credit, -len(x.inflight)))
            e, backlog = self._next_clip()
            if e is None:
                return
            # backlog tells the worker whether more clips are coming (worth waiting for to
            # fill a batch) or not (run the batch now).
            try:
                frames = wire.encode_clip(e.clip, run=self.run_id, seq=e.seq, backlog=backlog)
            except (WireError, TypeError, ValueError) as exc:
                self._answer_error(e.seq, f"clip cannot be encoded: {exc}")
                continue
            t_send = time.perf_counter()       # before the send: the worker may answer
            if not self._send(router, w.ident, frames):
                with self._lock:
                    self._resend.appendleft(e.seq)
                w.credit = 0                 # wait for this worker's next credit
                continue
            w.credit -= 1
            w.inflight.add(e.seq)
            with self._lock:
                e.attempts += 1
                e.worker = w.ident
                e.t_sent = t_send
                self._counts["sent"] += 1


# ------------------------------------------------------------------------------------------
# Local worker processes
# ------------------------------------------------------------------------------------------

class WorkerProcesses(list):
    """The ``subprocess.Popen`` objects of local workers (a list), with :meth:`stop`."""

    def stop(self, timeout: float = 10.0) -> list[int]:
        return stop_workers(self, timeout)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, a container's
    cpuset), not every CPU of the machine as ``os.cpu_count()`` says. Sizing thread pools by
    the machine oversubscribes a pinned run: ONNX Runtime with 15 threads on 2 allowed cores
    dropped 460 of 15,000 frames in a 500 fps replay (bench/RESULTS.md, GPU machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):          # not Linux
        return os.cpu_count() or 1


def parse_cpus(spec: str) -> list[int]:
    """CPU numbers from a list such as ``"1"``, ``"0,2"`` or ``"4-7,9"`` (sorted, unique).

    Raises
    ------
    ConfigError
        Naming the bad list.
    """
    from .errors import ConfigError
    out: set[int] = set()
    try:
        for part in str(spec).split(","):
            part = part.strip()
            lo, dash, hi = part.partition("-")
            a, b = int(lo), int(hi) if dash else int(lo)
            if a < 0 or b < a or b - a > 4096:
                raise ValueError(part)
            out.update(range(a, b + 1))
    except ValueError:
        raise ConfigError(f"CPU list {spec!r}: expected numbers and ranges such as "
                          "'1', '0,2' or '4-7'") from None
    return sorted(out)


def split_cpus(n_workers: int, spec: str = "auto") -> tuple[list[int], list[int]] | None:
    """How a run with ``n_workers`` local workers shares this process's CPUs: ``(front end,
    workers)``, or None for no pinning.

    Why: on a 2-core machine a worker that shares its core with the frame loop runs the demo
    model in 7.0 ms (median) instead of 5.1, and the latency from a cell's exit to its
    prediction has a p99 of 19.8 ms instead of 16.3 (bench/RESULTS.md, fifth round). ``spec``: ``"auto"``
    gives the workers the upper half of the CPUs this process may use (at least 1) when it may
    use 2 or more; ``"none"`` pins nothing; a list (``"1"``, ``"4-7"``) names the workers'
    CPUs, which must be CPUs this process may use and leave at least one to the front end.

    Raises
    ------
    ConfigError
        A list that is malformed, names CPUs this process may not use, or leaves none.
    """
    from .errors import ConfigError
    if n_workers < 1 or spec == "none":
        return None
    try:
        usable = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):          # not Linux: no pinning
        return None
    if spec == "auto":
        if len(usable) < 2:
            return None
        k = max(1, len(usable) // 2)
        return usable[:-k], usable[-k:]
    workers = parse_cpus(spec)
    bad = sorted(set(workers) - set(usable))
    if bad:
        raise ConfigError(f"serving.worker_cpus {spec!r}: CPUs {bad} are not among the ones "
                          f"this process may use ({usable})")
    rest = [c for c in usable if c not in set(workers)]
    if not rest:
        raise ConfigError(f"serving.worker_cpus {spec!r} leaves no CPU to the front end "
                          f"(usable: {usable})")
    return rest, workers


def pin_to(cpus: Sequence[int]) -> None:
    """Run the calling thread, and the threads and processes it starts later, on ``cpus``.

    Raises
    ------
    ConfigError
        CPUs this process may not use.
    """
    from .errors import ConfigError
    want = set(cpus)
    try:
        os.sched_setaffinity(0, want)
        got = os.sched_getaffinity(0)
    except AttributeError:
        raise ConfigError("pinning to CPUs needs Linux (os.sched_setaffinity)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot run on CPUs {sorted(want)}: {exc}") from None
    if got != want:                 # Linux keeps the valid ones of a partly invalid list
        raise ConfigError(f"cannot run on CPUs {sorted(want - got)} (not available here; "
                          f"running on {sorted(got)})")


def worker_threads(n_workers: int, reserve: int = 0) -> int:
    """ONNX Runtime threads for each of ``n_workers`` local workers: the usable CPUs less
    ``reserve`` (left to the front end), shared out; at least 1."""
    return max(1, (usable_cpus() - reserve) // max(1, n_workers))


def spawn_workers(model_path: str | os.PathLike, endpoint: str, n: int, *,
                  config: str | None = None, overrides: Sequence[str] = (),
                  backend: str | None = None, threads: int | None = None,
                  curve_keys: str | None = None, delay_ms: float = 0.0,
                  extra_args: Sequence[str] = (), quiet: bool = True,
                  cpus: Sequence[int] | None = None) -> WorkerProcesses:
    """Start ``n`` local ``fmh serve`` processes connected to ``endpoint``.

    Each worker gets ``--parent-pid`` so it leaves if this process dies, and (by default)
    ``usable_cpus() // n`` ONNX Runtime threads so that workers do not oversubscribe the CPU;
    with ``cpus`` they run there (``fmh serve --cpus``).
    """
    procs = WorkerProcesses()
    if threads is None:
        threads = worker_threads(n)
    for _ in range(n):
        cmd = [sys.executable, "-m", "engine", "serve", "--model", str(model_path),
               "--connect", endpoint, "--parent-pid", str(os.getpid()),
               "--threads", str(threads)]
        if config:
            cmd += ["--config", str(config)]
        for o in overrides:
            cmd += ["--set", o]
        if backend:
            cmd += ["--backend", backend]
        if curve_keys:
            cmd += ["--curve-keys", str(curve_keys)]
        if delay_ms:
            cmd += ["--delay-ms", str(delay_ms)]
        if cpus:
            cmd += ["--cpus", ",".join(map(str, cpus))]
        cmd += list(extra_args)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if quiet else None,
                                start_new_session=True)
        if cpus:
            try:                  # at once from here too: threads it starts before its own
                os.sched_setaffinity(proc.pid, set(cpus))   # --cpus call land there as well
            except (AttributeError, OSError):
                pass              # it pins itself (and says why if it cannot)
        procs.append(proc)
    return procs


def stop_workers(procs: Sequence[subprocess.Popen] | None, timeout: float = 10.0) -> list[int]:
    """Wait for workers to leave (they do on ``eos``), then SIGTERM, then SIGKILL.

    Returns their exit codes.
    """
    if not procs:
        return []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5.0)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]
