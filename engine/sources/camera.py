"""Live cameras: a fetch thread feeding a bounded queue, and a GenICam camera via harvesters.

A camera cannot be paused (``live = True``). Its lifecycle follows the microscope
``DataDevice`` pattern: :meth:`Camera.enable` starts acquisition and a fetch thread,
:meth:`Camera.disable` stops both, :meth:`Camera.shutdown` also releases the device; each
wraps a ``_do_*`` hook that implementations fill in. ``open()``/``close()`` (the
:class:`~engine.sources.base.FrameSource` lifecycle) call ``enable()``/``shutdown()``.

The fetch thread calls :meth:`Camera._fetch_frame` and puts frames into a bounded queue. When
the consumer is too slow the queue drops its *oldest* frame and counts it
(:attr:`Camera.queue_dropped`); frames the camera itself lost show as gaps in the frame
numbers (``stats.gaps``) and are counted apart from the queue's drops. An exception in the
fetch loop is logged, counted (:attr:`Camera.n_errors`), kept (:attr:`Camera.errors`) and
forwarded to ``on_error``; it never ends the loop.

:class:`SourceCamera` turns any frame stream (the synthetic chip, a replay) into a camera
that runs at its own pace; :class:`GenICamCamera` drives a real GenICam camera through
harvesters (``pip install fmh-engine[camera]``).
"""
from __future__ import annotations

import collections
import glob
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..errors import SourceError
from ..types import Frame
from .base import FrameSource
from .pacing import Pacer

__all__ = ["Camera", "SourceCamera", "GenICamCamera", "FrameIdUnwrapper"]

log = logging.getLogger(__name__)


class _End:
    def __repr__(self) -> str:
        return "Camera.END"


class Camera(FrameSource):
    """A live source: a fetch thread fills a bounded drop-oldest queue that frames() drains.

    Parameters
    ----------
    name : str
        What the camera is (a URL), for messages and the manifest.
    queue_frames : int
        Capacity of the queue between the fetch thread and the consumer [frames].
    fetch_timeout_s : float
        Longest a single fetch may block [s]; bounds how long disable() waits.
    on_error : callable, optional
        Called with each exception raised in the fetch loop (from the fetch thread).
    stall_timeout_s : float, optional
        If set, frames() raises SourceError when no frame arrived for this long [s].

    Subclasses implement :meth:`_fetch_frame` and the ``_do_enable``/``_do_disable``/
    ``_do_shutdown`` hooks.
    """

    live = True
    END = _End()  # returned by _fetch_frame when the camera's stream has ended

    def __init__(self, name: str, *, queue_frames: int = 256, fetch_timeout_s: float = 0.1,
                 on_error: Callable[[BaseException], None] | None = None,
                 stall_timeout_s: float | None = None):
        super().__init__(name)
        if int(queue_frames) < 1:
            raise SourceError(f"{name}: queue_frames={queue_frames!r} must be >= 1")
        if not fetch_timeout_s > 0:
            raise SourceError(f"{name}: fetch_timeout_s={fetch_timeout_s!r} must be > 0")
        self.queue_frames = int(queue_frames)
        self.fetch_timeout_s = float(fetch_timeout_s)
        self.stall_timeout_s = stall_timeout_s
        self.on_error = on_error
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._carry = 0             # drops owed to the next queued frame
        # Frame-number jumps caused by this queue's own drops are not gaps (they are in
        # queue_dropped): the base class subtracts _skipped_before when it counts gaps.
        self._skipped_before = 0
        self._ended = False         # the stream ended (END was fetched)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._enabled = False
        self._shut = False
        self.frames_fetched = 0
        self.queue_dropped = 0
        self.n_errors = 0
        self.errors: collections.deque = collections.deque(maxlen=64)
        self._last_fetched: int | None = None
        self.camera_gaps = 0        # frame numbers missing between fetched frames

    # -- lifecycle (microscope DataDevice style) ------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        """Start acquisition and the fetch thread (no-op if running)."""
        if self._shut:
            raise SourceError(f"{self.name}: camera was shut down; make a new one")
        if self._enabled:
            return
        self._do_enable()
        with self._cond:
            self._ended = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._fetch_loop, name=f"fetch {self.name}",
                                        daemon=True)
        self._enabled = True
        self._thread.start()

    def disable(self) -> None:
        """Stop the fetch thread (joined) and acquisition; queued frames stay readable."""
        if not self._enabled:
            return
        self._enabled = False
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            self._cond.notify_all()
        try:
            self._do_disable()
        except Exception as exc:  # stopping must not fail the caller
            self._record_error(exc)

    def shutdown(self) -> None:
        """Disable and release the device; idempotent."""
        if self._shut:
            return
        try:
            self.disable()
        finally:
            self._shut = True
            try:
                self._do_shutdown()
            except Exception as exc:
                self._record_error(exc)

    @property
    def stream_ended(self) -> bool:
        """True once the camera's stream has ended (its fetch returned END)."""
        with self._cond:
            return self._ended

    @property
    def thread_alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def _do_open(self) -> None:
        self.enable()

    def _do_close(self) -> None:
        self.shutdown()

    # -- hooks ----------------------------------------------------------------------------
    def _do_enable(self) -> None:
        """Start acquisition on the device."""

    def _do_disable(self) -> None:
        """Stop acquisition on the device."""

    def _do_shutdown(self) -> None:
        """Release the device."""

    def _fetch_frame(self, timeout_s: float) -> "Frame | None | _End":
        """Wait up to ``timeout_s`` [s] for the next frame; return it, None (nothing yet) or
        :attr:`END`. The image must be owned by the frame (copy out of device buffers)."""
        raise NotImplementedError

    # -- fetch thread ---------------------------------------------------------------------
    def _record_error(self, exc: BaseException) -> None:
        self.n_errors += 1
        self.errors.append(exc)
        if self.n_errors <= 10 or self.n_errors % 100 == 0:
            log.warning("%s: error in the fetch loop (#%d): %s", self.name, self.n_errors, exc,
                        exc_info=exc)
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:  # a broken callback must not kill acquisition
                log.exception("%s: on_error callback failed", self.name)

    def _fetch_loop(self) -> None:
        consecutive = 0
        while not self._stop.is_set():
            try:
                item = self._fetch_frame(self.fetch_timeout_s)
            except Exception as exc:
                self._record_error(exc)
                consecutive += 1
                # back off while a device keeps failing, but stay responsive to disable()
                self._stop.wait(min(0.2, 0.001 * 2 ** min(consecutive, 8)))
                continue
            consecutive = 0
            if item is None:
                continue
            if item is Camera.END:
                with self._cond:
                    self._ended = True
                    self._cond.notify_all()
                return
            self._put(item)

    def _put(self, frame: Frame) -> None:
        with self._cond:
            self.frames_fetched += 1
            last = self._last_fetched
            if last is not None and frame.index > last + 1:
                self.camera_gaps += frame.index - last - 1
            self._last_fetched = frame.index
            q = self._queue
            if len(q) >= self.queue_frames:
                _, owed = q.popleft()         # drop the oldest unread frame
                self.queue_dropped += 1
                if q:
                    q[0][1] += owed + 1
                else:
                    self._carry += owed + 1
            q.append([frame, self._carry])
            self._carry = 0
            self._cond.notify()

    # -- consumer -------------------------------------------------------------------------
    def _do_frames(self) -> Iterator[Frame]:
        last_arrival = time.monotonic()
        while True:
            with self._cond:
                while not self._queue:
                    if self._ended or not self._enabled:
                        return
                    self._cond.wait(self.fetch_timeout_s)
                    if (self.stall_timeout_s is not None and not self._queue
                            and time.monotonic() - last_arrival > self.stall_timeout_s):
                        raise SourceError(f"{self.name}: no frame for {self.stall_timeout_s} s "
                                          f"({self.n_errors} fetch errors; last: "
                                          f"{self.errors[-1] if self.errors else 'none'})")
                frame, self._skipped_before = self._queue.popleft()
            last_arrival = time.monotonic()
            yield frame

    # -- description ----------------------------------------------------------------------
    def counters(self) -> dict:
        """Fetched, read, dropped by the queue, camera gaps, fetch errors."""
        with self._cond:
            return {"frames_fetched": self.frames_fetched, "frames_read": self.stats.frames_read,
                    "queue_dropped": self.queue_dropped, "queued": len(self._queue),
                    "camera_gaps": self.camera_gaps, "gaps_read": self.stats.gaps,
                    "errors": self.n_errors}

    def describe(self) -> dict:
        d = super().describe()
        d.update(queue_frames=self.queue_frames, **self.counters())
        return d


class SourceCamera(Camera):
    """Any frame stream played as a free-running camera (the synthetic chip as a camera).

    The stream is read in the fetch thread, optionally paced to ``fps`` like a camera's clock;
    the consumer never slows it down, so a slow consumer loses frames to the queue.

    Parameters
    ----------
    frames : FrameSource, iterable of Frame or of (number, image), or a callable returning one
        What the camera "sees". A FrameSource is opened on enable and closed on shutdown.
    fps : float, optional
        Frame rate [1/s] to run at; None: as fast as the stream produces.
    shape : (H, W), optional
        Frame shape, when ``frames`` cannot tell it.
    """

    def __init__(self, frames, *, fps: float | None = None, shape=None, name: str | None = None,
                 **options):
        self._src = frames
        src_name = getattr(frames, "name", None) or type(frames).__name__
        super().__init__(name or f"camera:{src_name}", **options)
        self._fps = fps if fps is not None else getattr(frames, "fps", None)
        self._run_fps = fps
        self._shape = tuple(shape) if shape is not None else tuple(getattr(frames, "shape", (0, 0)))
        self._it: Iterator | None = None
        self._pacer: Pacer | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def fps(self) -> float | None:
        return self._fps

    def _do_enable(self) -> None:
        if self._it is None:
            src = self._src
            if isinstance(src, FrameSource):
                src.open()
                it = src.frames()
            else:
                it = iter(src() if callable(src) else src)
            self._it = it
            self._pacer = Pacer(self._run_fps, 1.0) if self._run_fps else None

    def _do_shutdown(self) -> None:
        if isinstance(self._src, FrameSource):
            self._src.close()

    def _fetch_frame(self, timeout_s: float):
        try:
            item = next(self._it)
        except StopIteration:
            return Camera.END
        if not isinstance(item, Frame):
            number, image = item
            t_ns = (int(round(number * 1e9 / self._fps)) if self._fps else time.monotonic_ns())
            item = Frame(int(number), t_ns, np.asarray(image))
        if self._shape == (0, 0):
            self._shape = tuple(item.image.shape)
        if self._pacer is not None:
            self._pacer.wait(item)
        return item


class FrameIdUnwrapper:
    """Turns a camera's wrapping frame counter into a monotone frame number.

    GigE Vision 1.x block ids are 16 bit and skip 0 (1..65535, then 1 again): at 500 fps they
    wrap every ~2 min. A drop of more than half the counter's range is taken as a wrap.
    """

    def __init__(self):
        self._last: int | None = None
        self._offset = 0

    def __call__(self, raw: int) -> int:
        raw = int(raw)
        last = self._last
        if last is not None and raw < last:
            modulus = 65535 if last <= 0xFFFF else (0xFFFFFFFF if last <= 0xFFFFFFFF else None)
            if modulus is not None and last - raw > modulus // 2:
                self._offset += modulus
        self._last = raw
        return raw + self._offset


class GenICamCamera(Camera):
    """A GenICam camera through harvesters (``pip install fmh-engine[camera]``).

    URL: ``genicam://<cti-file>?serial=...&pixel_format=Mono8&width=800&height=150&fps=500``.
    Without a CTI file, the producers on ``GENICAM_GENTL64_PATH`` are used.

    Query keys: serial, model, vendor, user_defined_name, id (device selection; default the
    first device), index (position in the device list), pixel_format (only Mono8),
    width, height, offset_x, offset_y (ROI [px]) or roi=x,y,w,h, fps [1/s], exposure_us [µs],
    buffers (producer buffers), queue (frames held for a slow consumer), timeout_ms.

    Frame numbers are the buffers' frame ids (unwrapped), timestamps the buffers' device
    timestamps [ns]. Incomplete buffers are discarded by harvesters and show as gaps.
    """

    DEVICE_KEYS = {"serial": "serial_number", "model": "model", "vendor": "vendor",
                   "user_defined_name": "user_defined_name", "id": "id_"}
    QUERY_KEYS = frozenset(DEVICE_KEYS) | {"index", "pixel_format", "width", "height",
                                           "offset_x", "offset_y", "roi", "fps", "exposure_us",
                                           "buffers", "queue", "timeout_ms"}

    def __init__(self, cti: str | None = None, *, settings: Mapping[str, Any] | None = None,
                 **options):
        settings = dict(settings or {})
        unknown = set(settings) - self.QUERY_KEYS
        if unknown:
            raise SourceError(f"genicam: unknown setting(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(self.QUERY_KEYS))})")
        self.cti_files = self._find_cti(cti)
        self.settings = self._parse(settings)
        if "queue" in self.settings:
            options.setdefault("queue_frames", self.settings["queue"])
        if "timeout_ms" in self.settings:
            options.setdefault("fetch_timeout_s", self.settings["timeout_ms"] / 1000.0)
        name = "genicam://" + (cti or "") + (
            "?" + "&".join(f"{k}={v}" for k, v in sorted(settings.items())) if settings else "")
        super().__init__(name, **options)
        self._h = None
        self._ia = None
        self._unwrap = FrameIdUnwrapper()
        s = self.settings
        self._shape = (int(s.get("height", 0)), int(s.get("width", 0)))
        self._fps = s.get("fps")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_url(cls, url, query: Mapping[str, str], **options) -> "GenICamCamera":
        """Make the camera a ``genicam://`` URL names (``url`` as from urllib's urlparse)."""
        cti = (getattr(url, "netloc", "") or "") + (getattr(url, "path", "") or "")
        return cls(cti or None, settings=query, **options)

    @staticmethod
    def _find_cti(cti: str | None) -> list[str]:
        if cti:
            if not Path(cti).is_file():
                raise SourceError(f"genicam://{cti}: no such GenTL producer (.cti) file")
            return [cti]
        found: list[str] = []
        for folder in os.environ.get("GENICAM_GENTL64_PATH", "").split(os.pathsep):
            if folder:
                found += sorted(glob.glob(os.path.join(folder, "*.cti")))
        if not found:
            raise SourceError("genicam://: no GenTL producer given and none found on "
                              "GENICAM_GENTL64_PATH; use genicam://<path/to/producer.cti>")
        return found

    @staticmethod
    def _parse(q: Mapping[str, Any]) -> dict:
        out: dict[str, Any] = {}
        ints = ("index", "width", "height", "offset_x", "offset_y", "buffers", "queue")
        floats = ("fps", "exposure_us", "timeout_ms")
        for k, v in q.items():
            try:
                if k in ints:
                    out[k] = int(v)
                    if out[k] < 0 or (k in ("width", "height", "buffers", "queue") and out[k] < 1):
                        raise ValueError
                elif k in floats:
                    out[k] = float(v)
                    if not (out[k] > 0 and math.isfinite(out[k])):
                        raise ValueError
                elif k == "roi":
                    x, y, w, h = (int(p) for p in str(v).split(","))
                    if min(x, y) < 0 or min(w, h) < 1:
                        raise ValueError
                    out.update(offset_x=x, offset_y=y, width=w, height=h)
                else:
                    out[k] = str(v)
            except ValueError:
                raise SourceError(f"genicam: {k}={v!r} is not valid") from None
        pf = out.setdefault("pixel_format", "Mono8")
        if pf != "Mono8":
            raise SourceError(f"genicam: pixel_format={pf!r}: only Mono8 (8-bit grey) is supported")
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def fps(self) -> float | None:
        return self._fps

    # -- device ---------------------------------------------------------------------------
    @staticmethod
    def _harvester_class():
        try:
            from harvesters.core import Harvester
        except ImportError as exc:
            raise SourceError(f"genicam: the camera extra is not installed ({exc}); "
                              f"pip install fmh-engine[camera]") from None
        return Harvester

    def _connect(self) -> None:
        Harvester = self._harvester_class()
        h = Harvester()
        try:
            for cti in self.cti_files:
                h.add_file(cti)
            h.update()
            devices = list(h.device_info_list)
            if not devices:
                raise SourceError(f"{self.name}: no camera found by {', '.join(self.cti_files)}")
            s = self.settings
            search = {v: s[k] for k, v in self.DEVICE_KEYS.items() if k in s}
            ia = h.create(search if search else s.get("index", 0))
            self._configure(ia.remote_device.node_map)
            if "buffers" in s:
                ia.num_buffers = s["buffers"]
        except SourceError:
            h.reset()
            raise
        except Exception as exc:
            h.reset()
            raise SourceError(f"{self.name}: cannot open the camera ({type(exc).__name__}: "
                              f"{exc})") from None
        self._h, self._ia = h, ia

    @staticmethod
    def _node(nm, name: str):
        """The feature node ``name``, or None if the camera lacks it (genapi raises its own
        LogicalErrorException, not AttributeError, for a missing node, so no hasattr)."""
        try:
            return getattr(nm, name)
        except Exception:
            return None

    def _configure(self, nm) -> None:
        s = self.settings
        self._set_first(nm, ("PixelFormat",), s["pixel_format"])
        if "width" in s or "offset_x" in s:   # offsets first to 0 so any width fits
            for name in ("OffsetX", "OffsetY"):
                node = self._node(nm, name)
                if node is not None:
                    node.value = 0
        for key, name in (("width", "Width"), ("height", "Height"),
                          ("offset_x", "OffsetX"), ("offset_y", "OffsetY")):
            if key in s:
                self._set_first(nm, (name,), s[key])
        if "exposure_us" in s:
            self._set_first(nm, ("ExposureTime", "ExposureTimeAbs"), s["exposure_us"])
        if "fps" in s:
            enable = self._node(nm, "AcquisitionFrameRateEnable")
            if enable is not None:
                enable.value = True
            self._set_first(nm, ("AcquisitionFrameRate", "AcquisitionFrameRateAbs"), s["fps"])
        self._shape = (int(nm.Height.value), int(nm.Width.value))
        for name in ("AcquisitionFrameRate", "AcquisitionFrameRateAbs"):
            node = self._node(nm, name)
            if node is not None:
                try:
                    self._fps = float(node.value)
                except Exception:
                    pass
                break

    def _set_first(self, nm, names, value) -> None:
        for name in names:
            node = self._node(nm, name)
            if node is not None:
                node.value = value
                return
        raise SourceError(f"{self.name}: the camera has none of the nodes {', '.join(names)}")

    def _do_enable(self) -> None:
        if self._ia is None:
            self._connect()
        self._ia.start()

    def _do_disable(self) -> None:
        if self._ia is not None:
            self._ia.stop()

    def _do_shutdown(self) -> None:
        ia, h, self._ia, self._h = self._ia, self._h, None, None
        try:
            if ia is not None:
                ia.destroy()
        finally:
            if h is not None:
                h.reset()

    def _fetch_frame(self, timeout_s: float):
        buffer = self._ia.try_fetch(timeout=timeout_s)
        if buffer is None:
            return None
        with buffer:  # queued back to the producer on exit
            component = buffer.payload.components[0]
            fmt = component.data_format
            if fmt != "Mono8":
                raise SourceError(f"{self.name}: buffer pixel format {fmt!r}, expected Mono8")
            h, w = int(component.height), int(component.width)
            image = np.array(component.data[: h * w], dtype=np.uint8).reshape(h, w)  # copy
            try:
                raw_id = int(buffer.module.frame_id)
            except Exception:
                raw_id = self.frames_fetched + 1
            try:
                t_ns = int(buffer.timestamp_ns)
            except Exception:
                try:
                    t_ns = int(buffer.timestamp * 1e9 / buffer.timestamp_frequency)
                except Exception:
                    t_ns = time.monotonic_ns()
        return Frame(self._unwrap(raw_id), t_ns, image)

    def describe(self) -> dict:
        d = super().describe()
        d.update(cti_files=self.cti_files, settings=self.settings)
        return d
