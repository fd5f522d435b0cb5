"""A ring of fixed frame slots in shared memory: one writer process, one reader process.

The source (camera, replay, simulator) writes frames into the ring; the front end reads them in
another process. The ring never allocates after creation and never drops a frame silently::

    ring = FrameRing.create(shape=(150, 800), slots=512, policy="block", peers=2)  # owner
    # in the writer process:                 # in the reader process:
    w = FrameRing.attach(ring.name)          r = FrameRing.attach(ring.name)
    w.put(frame)                             while (frame := r.get()) is not None:
    w.close_writer()                             process(frame)

``get(timeout=...)`` also returns None when no frame came in time; :attr:`FrameRing.eos` tells
the end of the stream from a timeout. Counters: :attr:`FrameRing.stats`.

Policies (what ``put`` does when every slot holds an unread frame)
------------------------------------------------------------------
``block`` (replay)
    the writer waits until the reader releases a slot; nothing is ever dropped. ``get`` returns
    a **zero-copy, read-only view** into the slot; the slot stays reserved for the reader until
    its next ``get`` (or :meth:`FrameRing.release`), so the view is valid until then.
``drop-oldest`` (camera)
    the writer never waits: it overwrites the oldest unread frame. The reader finds out from the
    slot's sequence number (a seqlock: odd while the writer is inside the slot, ``2 s + 2`` once
    frame ``s`` is complete), copies the slot into a private buffer, checks the sequence number
    again and retries with a newer frame if the slot was overwritten meanwhile, so a torn frame
    is never returned. The image returned is a read-only view of that private buffer, valid
    until the next ``get``. Every frame that was written and never returned is counted in
    ``stats["dropped"]``; once the reader has drained the ring, ``written == read + dropped``.

One reader per ring (one read cursor); a second process calling ``get`` gets an error, as does a
second writer. Several consumers need several rings (or a reader that fans out).

Memory layout and ordering
--------------------------
One segment: a header of int64 counters (the writer's and the reader's fields on separate
cache lines, each field stored by one process only, so no read-modify-write races), then per
slot its sequence number, frame number and ``t_ns``, then the images (64-byte aligned). Aligned
int64 stores are atomic on x86-64 and x86-64 keeps stores in program order (TSO), so a reader
that sees the committed count ``W`` advance also sees the slot it covers; the seqlock catches a
reader that races with an overwrite. On weakly ordered CPUs (ARM) this would need fences.
Waiting is a back-off of short sleeps (yield, then 20 µs doubling to 0.5 ms): no semaphore has
to be shared by name between unrelated processes, and the cost is measured by
``python -m bench.bench_ring``.

Lifetime of the segment (no leaked ``/dev/shm`` entries)
--------------------------------------------------------
* The owner (:meth:`FrameRing.create`) expects ``peers`` processes to attach (default 1). When
  the last of them has attached, the attaching process unlinks the name at once: Linux keeps
  the mapping alive for the processes that hold it, and nothing is left to leak whatever
  happens to them afterwards (``kill -9`` included).
* Until then the owner removes the name on normal exit, on ``close()``/``unlink()``, when the
  ring object is garbage collected, on Ctrl-C (``KeyboardInterrupt`` ends the interpreter
  through its exit handlers) and on SIGTERM (``create`` installs a handler that turns SIGTERM
  into ``SystemExit`` where the process still has the default handler). Exit handlers are
  registered with ``multiprocessing.util.Finalize`` so that they also run in
  ``multiprocessing`` children, which skip ``atexit``.
* If the owner is killed with SIGKILL before the peers attached, Python's resource tracker (with
  which ``SharedMemory(create=True)`` registers the name) unlinks it when the owner's process
  tree has gone.
* Python < 3.13 also registers segments that are merely *attached* with the resource tracker,
  which then unlinks them (with a "leaked shared_memory" warning) when the attaching process
  exits, even though the owner still uses them (CPython issue gh-82300; 3.13 added
  ``SharedMemory(track=False)``). :meth:`attach` therefore opens the segment untracked.

A reader waiting on a writer that died without ``close_writer()`` (or a blocked writer whose
reader died) notices within ~50 ms and raises instead of waiting forever.
"""
from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from multiprocessing import shared_memory, util

import numpy as np

from .errors import EngineError, SourceError
from .types import Frame

__all__ = ["FrameRing", "RingPeerError", "POLICIES", "process_alive"]

POLICIES = ("block", "drop-oldest")
_MAGIC = 0x464D4852494E4731  # "FMHRING1"
_VERSION = 1

# Header fields (int64 indices). Lines of 8 fields = 64 bytes; one storing process per line.
# constants, written once by the owner
_H_MAGIC, _H_VERSION, _H_SLOTS, _H_HEIGHT, _H_WIDTH, _H_POLICY, _H_OWNER_PID, _H_PEERS = range(8)
# writer line
_H_W, _H_CLOSED, _H_WRITTEN, _H_WWAITS, _H_WWAIT_NS, _H_WPID, _H_WSTART = range(8, 15)
# reader line
_H_R, _H_READ, _H_DROPPED, _H_RWAITS, _H_RWAIT_NS, _H_RPID, _H_RSTART, _H_TORN = range(16, 24)
# attachers
_H_ATTACHED, _H_UNLINKED = range(24, 26)
_HEADER_INTS = 32
_ALIGN = 64
_PEER_CHECK_S = 0.05


class RingPeerError(EngineError):
    """The process on the other side of a ring died (a blocked writer's reader)."""


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(slots: int, height: int, width: int) -> tuple[int, int, int]:
    """(offset of slot metadata, offset of images, total bytes)."""
    meta = _align(_HEADER_INTS * 8)
    images = _align(meta + 3 * slots * 8)
    return meta, images, images + slots * height * width


def _proc_start(pid: int) -> int:
    """Start time of a process [clock ticks since boot] (0 where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def process_alive(pid: int, start: int = 0) -> bool:
    """True while process ``pid`` (started at ``start``, 0: any start) runs; zombies count as
    dead (``os.kill(pid, 0)`` alone would call a zombie alive)."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return False
    return start == 0 or int(fields[19]) == start


def _shm_unlink(posix_name: str) -> bool:
    """Remove a segment's name without touching the resource tracker; False if already gone."""
    try:
        from _posixshmem import shm_unlink  # the call SharedMemory.unlink makes
        shm_unlink(posix_name)
    except FileNotFoundError:
        return False
    except ImportError:  # pragma: no cover - non-POSIX
        return False
    return True


_TRACKER_LOCK = threading.Lock()


def _open_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach to an existing segment without registering it with the resource tracker."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=False, track=False)
    from multiprocessing import resource_tracker
    with _TRACKER_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None
        try:
            return shared_memory.SharedMemory(name=name, create=False)
        finally:
            resource_tracker.register = register


def _unlink_owned(posix_name: str, header: np.ndarray | None = None) -> None:
    """Exit/GC handler of the owner: remove the name (if still there) and untrack it."""
    if header is not None:
        try:
            header[_H_UNLINKED] = 1
        except Exception:  # pragma: no cover - mapping already gone
            pass
    _shm_unlink(posix_name)
    try:
        from multiprocessing import resource_tracker
        resource_tracker.unregister(posix_name, "shared_memory")
    except Exception:  # pragma: no cover - tracker already gone at interpreter exit
        pass


def _sigterm_to_exit(signum, _frame):
    raise SystemExit(128 + signum)


def _install_sigterm_handler() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _sigterm_to_exit)
    except (ValueError, OSError):  # pragma: no cover - not allowed here
        pass


class _Backoff:
    """Yield a few times, then sleep 20 µs doubling to 0.5 ms."""

    __slots__ = ("n",)

    def __init__(self):
        self.n = 0

    def wait(self) -> None:
        n = self.n
        self.n = n + 1
        time.sleep(0 if n < 4 else min(5e-4, 2e-5 * (1 << min(n - 4, 8))))


class FrameRing:
    """Shared-memory ring of frames; see the module docstring for policies and lifetime.

    Use :meth:`create` (owner) and :meth:`attach` (other processes), not the constructor.

    Attributes
    ----------
    name : str
        Name of the segment, to pass to :meth:`attach` in the other process.
    shape : tuple of int
        (H, W) of every frame [px]; images are uint8.
    slots : int
        Number of frame slots.
    policy : str
        ``"block"`` or ``"drop-oldest"``.
    """

    def __init__(self, shm: shared_memory.SharedMemory, *, owner: bool):
        self._shm = shm
        self._owner = owner
        self.name = shm.name
        head = np.ndarray((_HEADER_INTS,), np.int64, buffer=shm.buf, offset=0)
        if head[_H_MAGIC] != _MAGIC or head[_H_VERSION] != _VERSION:
            raise SourceError(f"shared memory {self.name!r} is not an fmh frame ring "
                              f"(version {_VERSION})")
        self._h = head
        n, hh, ww = int(head[_H_SLOTS]), int(head[_H_HEIGHT]), int(head[_H_WIDTH])
        meta, images, total = _layout(n, hh, ww)
        if shm.size < total:
            raise SourceError(f"shared memory {self.name!r} is {shm.size} bytes, a ring of "
                              f"{n} slots of {hh}x{ww} needs {total}")
        self.slots = n
        self.shape = (hh, ww)
        self.policy = POLICIES[int(head[_H_POLICY])]
        self._seq = np.ndarray((n,), np.int64, buffer=shm.buf, offset=meta)
        self._index = np.ndarray((n,), np.int64, buffer=shm.buf, offset=meta + 8 * n)
        self._tns = np.ndarray((n,), np.int64, buffer=shm.buf, offset=meta + 16 * n)
        self._img = np.ndarray((n, hh, ww), np.uint8, buffer=shm.buf, offset=images)
        self._role: str | None = None
        self._cursor = 0              # reader: next sequence number to return
        self._holding = False         # reader (block): a slot is lent out until the next get
        self._copy: np.ndarray | None = None
        self._finalizer = None
        self._closed = False

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def create(cls, shape: tuple[int, int], slots: int, policy: str = "block",
               name: str | None = None, peers: int = 1) -> "FrameRing":
        """Make a new ring (the owner's call).

        Parameters
        ----------
        shape : (int, int)
            (H, W) of the frames [px]; frames are uint8.
        slots : int
            Number of frame slots (>= 2).
        policy : {"block", "drop-oldest"}
            What a full ring does: the writer waits, or overwrites the oldest unread frame.
        name : str, optional
            Segment name (default ``fmh-ring-<pid>-<random>``).
        peers : int
            Processes that will :meth:`attach`; when the last has attached the name is removed
            (the mapping lives on), so a crash cannot leak it. 0: remove it now (the ring is
            then shared only with ``fork`` children that inherit it).

        Raises
        ------
        SourceError
            On an impossible shape, slot count, policy or peer count, or a name in use.
        """
        try:
            hh, ww = (int(v) for v in shape)
        except (TypeError, ValueError):
            raise SourceError(f"ring shape must be (H, W), got {shape!r}") from None
        if hh < 1 or ww < 1:
            raise SourceError(f"ring shape must be positive (H, W), got {shape!r}")
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 2:
            raise SourceError(f"ring slots must be an integer >= 2, got {slots!r}")
        if policy not in POLICIES:
            raise SourceError(f"ring policy {policy!r} is not one of {', '.join(POLICIES)}")
        if isinstance(peers, bool) or not isinstance(peers, (int, np.integer)) or peers < 0:
            raise SourceError(f"ring peers must be an integer >= 0, got {peers!r}")
        slots = int(slots)
        name = name or f"fmh-ring-{os.getpid()}-{secrets.token_hex(4)}"
        total = _layout(slots, hh, ww)[2]
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=total)
        except FileExistsError:
            raise SourceError(f"shared memory {name!r} already exists; pick another ring "
                              "name") from None
        except OSError as exc:
            raise SourceError(f"cannot create shared memory {name!r} of {total} bytes "
                              f"({exc.strerror or exc})") from None
        head = np.ndarray((_HEADER_INTS,), np.int64, buffer=shm.buf, offset=0)
        head[:] = 0
        head[_H_SLOTS], head[_H_HEIGHT], head[_H_WIDTH] = slots, hh, ww
        head[_H_POLICY] = POLICIES.index(policy)
        head[_H_OWNER_PID], head[_H_PEERS] = os.getpid(), peers
        meta = _layout(slots, hh, ww)[0]
        np.ndarray((slots,), np.int64, buffer=shm.buf, offset=meta)[:] = 0
        head[_H_VERSION] = _VERSION
        head[_H_MAGIC] = _MAGIC
        del head
        ring = cls(shm, owner=True)
        posix_name = shm._name  # with the leading "/" that shm_unlink wants
        ring._finalizer = util.Finalize(ring, _unlink_owned, args=(posix_name,),
                                        exitpriority=100)
        _install_sigterm_handler()
        if peers == 0:
            ring.unlink()
        return ring

    @classmethod
    def attach(cls, name: str) -> "FrameRing":
        """Open a ring made by :meth:`create` in another process.

        Raises
        ------
        SourceError
            If no ring of that name exists (never created, or already fully attached and
            therefore unlinked) or it is not a ring.
        """
        try:
            shm = _open_untracked(name)
        except FileNotFoundError:
            raise SourceError(f"no frame ring named {name!r} (never created, owner gone, or "
                              "all its peers already attached)") from None
        except OSError as exc:
            raise SourceError(f"cannot attach to frame ring {name!r} "
                              f"({exc.strerror or exc})") from None
        if shm.size < _HEADER_INTS * 8:
            shm.close()
            raise SourceError(f"shared memory {name!r} is not an fmh frame ring "
                              f"({shm.size} bytes)")
        try:
            ring = cls(shm, owner=False)
        except SourceError as exc:
            exc.__traceback__ = None          # drop the frames that hold views of the buffer
            try:
                shm.close()
            except BufferError:               # pragma: no cover - a view survived; GC frees it
                pass
            raise exc from None
        h = ring._h
        h[_H_ATTACHED] = h[_H_ATTACHED] + 1
        if h[_H_ATTACHED] >= h[_H_PEERS] and not h[_H_UNLINKED]:
            h[_H_UNLINKED] = 1
            _shm_unlink(shm._name)
        return ring

    # -- writer -----------------------------------------------------------------------------
    def _claim(self, role: str) -> None:
        h = self._h
        pid_f, start_f = (_H_WPID, _H_WSTART) if role == "writer" else (_H_RPID, _H_RSTART)
        if self._role == role:
            return
        if self._closed:
            raise SourceError(f"ring {self.name!r} is closed in this process")
        if self._role is not None:
            raise SourceError(f"ring {self.name!r}: this process is its {self._role}, it "
                              f"cannot also be its {role}")
        other = int(h[pid_f])
        if other and other != os.getpid() and process_alive(other, int(h[start_f])):
            raise SourceError(f"ring {self.name!r} already has a {role} (pid {other}); "
                              f"one {role} per ring")
        h[start_f] = _proc_start(os.getpid())
        h[pid_f] = os.getpid()
        self._role = role
        if role == "reader":
            self._cursor = int(h[_H_R])
            if self.policy == "drop-oldest":
                self._copy = np.empty(self.shape, np.uint8)

    def put(self, frame: Frame, timeout: float | None = None) -> bool:
        """Copy a frame into the next slot.

        Parameters
        ----------
        frame : Frame
            uint8 image of the ring's shape, with its frame number and ``t_ns`` [ns].
        timeout : float, optional
            ``block`` policy: longest wait [s] for a free slot (None: as long as it takes).

        Returns
        -------
        bool
            True when the frame is in the ring; False when ``timeout`` passed with the ring
            still full (the frame was not written and is not counted).

        Raises
        ------
        SourceError
            A frame that is not a ``Frame`` with a uint8 (H, W) image of the ring's shape, a
            ring whose stream was closed, or a second writer.
        RingPeerError
            ``block`` policy: the reader died while the writer waited.
        """
        if self._role != "writer":
            self._claim("writer")
        h = self._h
        if h[_H_CLOSED]:
            raise SourceError(f"ring {self.name!r}: put() after close_writer()")
        img = getattr(frame, "image", None)
        if not isinstance(frame, Frame) or not isinstance(img, np.ndarray):
            raise SourceError(f"ring {self.name!r}: put() takes a Frame with an ndarray image, "
                              f"got {type(frame).__name__}")
        if img.dtype != np.uint8 or img.shape != self.shape:
            raise SourceError(f"ring {self.name!r}: frame {frame.index} is {img.dtype} "
                              f"{img.shape}, the ring holds uint8 {self.shape}")
        s = int(h[_H_W])
        n = self.slots
        if self.policy == "block" and s - int(h[_H_R]) >= n:
            if not self._wait_for_space(s, timeout):
                return False
        k = s % n
        seq = self._seq
        seq[k] = 2 * s + 1                      # odd: the writer is inside slot k
        np.copyto(self._img[k], img)
        self._index[k] = frame.index
        self._tns[k] = frame.t_ns
        seq[k] = 2 * s + 2                      # even: slot k holds frame s, complete
        h[_H_WRITTEN] = s + 1
        h[_H_W] = s + 1                         # publish
        return True

    def _wait_for_space(self, s: int, timeout: float | None) -> bool:
        h = self._h
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        next_check = t0 + _PEER_CHECK_S
        backoff = _Backoff()
        h[_H_WWAITS] = h[_H_WWAITS] + 1
        try:
            while s - int(h[_H_R]) >= self.slots:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return False
                if now >= next_check:
                    next_check = now + _PEER_CHECK_S
                    pid = int(h[_H_RPID])
                    if pid and not process_alive(pid, int(h[_H_RSTART])):
                        raise RingPeerError(f"ring {self.name!r}: reader process {pid} died; "
                                            f"the writer cannot put frame {s}")
                backoff.wait()
            return True
        finally:
            h[_H_WWAIT_NS] = h[_H_WWAIT_NS] + int((time.monotonic() - t0) * 1e9)

    def close_writer(self) -> None:
        """Mark the end of the stream: the reader gets ``None`` after the last frame."""
        if self._role != "writer":
            self._claim("writer")
        self._h[_H_CLOSED] = 1

    # -- reader -----------------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None at the end of the stream.

        Parameters
        ----------
        timeout : float, optional
            Longest wait [s] for a frame (None: as long as it takes).

        Returns
        -------
        Frame or None
            The frame (its image a read-only view, valid until the next ``get``); or None
            once the writer has called :meth:`close_writer` and every frame was returned or
            counted as dropped (then :attr:`eos` is True); or None when ``timeout`` passed
            without a frame (:attr:`eos` is False). With ``timeout=None``, None always means
            the end of the stream.

        Raises
        ------
        SourceError
            The writer died without closing the stream (after every committed frame was
            returned), or a second reader.
        """
        if self._role != "reader":
            self._claim("reader")
        h = self._h
        if self._holding:                        # release the slot lent out by the last get
            h[_H_R] = self._cursor
            self._holding = False
        drop = self.policy == "drop-oldest"
        n = self.slots
        backoff = None
        t0 = deadline = next_check = 0.0
        while True:
            s = self._cursor
            closed = int(h[_H_CLOSED])           # load before W: W is final once closed is seen
            w = int(h[_H_W])
            if s < w:
                if drop and w - s > n:           # frames s .. w-n-1 were overwritten
                    self._skip(w - n - s)
                    continue
                k = s % n
                q1 = int(self._seq[k])
                if q1 != 2 * s + 2:
                    if drop:                     # overwritten (or being overwritten) already
                        self._skip(1)
                        continue
                    raise SourceError(f"ring {self.name!r}: slot {k} holds sequence {q1}, "
                                      f"expected {2 * s + 2} (ring corrupted)")
                index, t_ns = int(self._index[k]), int(self._tns[k])
                if drop:
                    np.copyto(self._copy, self._img[k])
                    if int(self._seq[k]) != q1:  # the writer came in while we copied
                        h[_H_TORN] = h[_H_TORN] + 1
                        self._skip(1)
                        continue
                    image = self._copy.view()
                else:
                    image = self._img[k]
                    self._holding = True
                image.flags.writeable = False
                self._cursor = s + 1
                if drop:
                    h[_H_R] = s + 1
                h[_H_READ] = h[_H_READ] + 1
                if backoff is not None:
                    h[_H_RWAIT_NS] = h[_H_RWAIT_NS] + int((time.monotonic() - t0) * 1e9)
                return Frame(index=index, t_ns=t_ns, image=image)
            if closed:
                h[_H_R] = s
                return None
            # nothing to read yet: wait
            if backoff is None:
                backoff = _Backoff()
                t0 = time.monotonic()
                deadline = None if timeout is None else t0 + timeout
                next_check = t0 + _PEER_CHECK_S
                h[_H_RWAITS] = h[_H_RWAITS] + 1
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                h[_H_RWAIT_NS] = h[_H_RWAIT_NS] + int((now - t0) * 1e9)
                return None                      # timed out: eos stays False
            if now >= next_check:
                next_check = now + _PEER_CHECK_S
                pid = int(h[_H_WPID])
                if pid and not process_alive(pid, int(h[_H_WSTART])) and not h[_H_CLOSED] \
                        and self._cursor >= int(h[_H_W]):
                    raise SourceError(f"ring {self.name!r}: writer process {pid} died without "
                                      f"closing the stream after {int(h[_H_W])} frames")
            backoff.wait()

    def _skip(self, count: int) -> None:
        self._cursor += count
        self._h[_H_DROPPED] = self._h[_H_DROPPED] + count
        self._h[_H_R] = self._cursor

    def release(self) -> None:
        """Reader: give the slot of the last frame back now (its image becomes invalid)."""
        if self._role == "reader" and self._holding:
            self._h[_H_R] = self._cursor
            self._holding = False

    def __iter__(self):
        """Frames until the end of the stream (reader)."""
        while (frame := self.get()) is not None:
            yield frame

    # -- state ------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Counters, exact: ``written``, ``read``, ``dropped``, ``pending`` (written, not yet
        read nor dropped), ``writer_waits``/``writer_wait_s`` (times and time [s] the writer
        waited on a full ring), ``reader_waits``/``reader_wait_s`` (on an empty ring),
        ``torn_retries`` (slots overwritten while being copied, included in ``dropped``),
        ``closed``, ``slots``, ``policy``.

        ``dropped`` includes frames already overwritten that the reader has not reached yet;
        a snapshot taken while the reader is inside ``get`` may count its frame in both
        ``read`` and ``dropped`` until the call returns.
        """
        h = self._h
        w, r, dropped = int(h[_H_W]), int(h[_H_R]), int(h[_H_DROPPED])
        if self._role == "reader":
            r = self._cursor
        if self.policy == "drop-oldest":
            dropped += max(0, w - self.slots - r)
        return {
            "written": int(h[_H_WRITTEN]), "read": int(h[_H_READ]), "dropped": dropped,
            "pending": max(0, w - r - (dropped - int(h[_H_DROPPED]))),
            "writer_waits": int(h[_H_WWAITS]), "writer_wait_s": int(h[_H_WWAIT_NS]) * 1e-9,
            "reader_waits": int(h[_H_RWAITS]), "reader_wait_s": int(h[_H_RWAIT_NS]) * 1e-9,
            "torn_retries": int(h[_H_TORN]), "closed": bool(h[_H_CLOSED]),
            "slots": self.slots, "policy": self.policy,
        }

    @property
    def eos(self) -> bool:
        """True once the stream is closed and every frame was returned or dropped (reader)."""
        h = self._h
        return bool(h[_H_CLOSED]) and self._cursor >= int(h[_H_W])

    @property
    def owner(self) -> bool:
        return self._owner

    def unlink(self) -> None:
        """Remove the segment's name now (the mapping stays valid for whoever holds it)."""
        if self._closed:
            return
        self._h[_H_UNLINKED] = 1
        if self._finalizer is not None:
            self._finalizer()                    # the owner's handler: unlink + untrack
        else:
            _shm_unlink(self._shm._name)

    def close(self) -> None:
        """Unmap this process's view; the owner also removes the name (idempotent)."""
        if self._closed:
            return
        if self._role == "reader":
            self.release()
        if self._owner:
            self.unlink()
        self._closed = True
        self._h = self._seq = self._index = self._tns = self._img = self._copy = None
        try:
            self._shm.close()
        except BufferError:
            # a caller still holds a frame view into the slots: leave the mapping to the
            # garbage collector (the name is gone already, so nothing can leak)
            _LINGERING.append(self._shm)

    def __enter__(self) -> "FrameRing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FrameRing(name={self.name!r}, shape={self.shape}, slots={self.slots}, "
                f"policy={self.policy!r}, owner={self._owner})")


_LINGERING: list = []
