"""Replay of recorded frames from files: ``.npy``, multipage TIFF, a folder of images, video,
HDF5 and RT-DC (``.rtdc``).

:func:`open_replay` picks the reader from the suffix (or, for an unknown suffix, from the
file's first bytes) and returns a not-yet-open :class:`ReplaySource`. Every reader

- reads lazily: ``.npy`` and uncompressed contiguous TIFF stacks are memory-mapped and each
  frame is a read-only view of the map; other TIFFs are read page by page, folders image by
  image, video frame by frame, HDF5 in chunk-sized blocks; nothing loads the whole recording;
- checks the file when the source is made, so a missing, truncated or corrupt file, or frames
  of the wrong dtype or shape, raise :class:`~engine.errors.SourceError` naming the file;
- yields :class:`~engine.types.Frame` values whose ``index`` is the recorded frame number
  (HDF5 with a frame-number dataset, RT-DC ``events/frame``) or the stored position, so gaps
  the camera left are counted by :class:`~engine.sources.base.FrameSource`;
- takes timestamps from the file where it records them (RT-DC ``events/time``, an HDF5
  ``time``/``t_ns`` dataset), else ``index / fps``, else (no rate known at all) the host's
  monotonic clock at read time.

Common options (all formats)
----------------------------
start, stop, step : int
    Stored frames ``start:stop:step`` (positions in the file, not frame numbers).
    Frames skipped by ``step`` are not counted as gaps.
loop : int
    Replay the selection this many times (``0``: endlessly). Frame numbers and timestamps
    keep increasing across repetitions, so downstream sees one monotone stream.
fps : float
    Override the recorded frame rate [1/s] (and the timestamps derived from it).
numbers : sequence of int
    Frame numbers of the stored frames (e.g. a simulator truth file's ``frame_numbers``),
    for formats that do not record them.

Format options
--------------
HDF5: ``key`` (the image dataset; default the first 3-D uint8 dataset), ``frames_key``
(frame numbers; default a 1-D integer sibling named ``frame``/``frame_number``/...),
``bg_key`` (a 2-D or per-frame 3-D background; default sibling ``image_bg``/``background``).
RT-DC: ``unique`` (default True: one frame per camera frame; several events recorded from the
same camera frame carry the same image).
Folder: ``numbered`` (default False: frame numbers from the last integer in each file name).
"""
from __future__ import annotations

import logging
import math
import re
import time
from bisect import bisect_right
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import SourceError
from ..types import Frame
from .base import FrameSource

__all__ = ["open_replay", "ReplaySource", "NpyReplay", "TiffReplay", "ImageFolderReplay",
           "VideoReplay", "Hdf5Replay", "RtdcReplay", "natural_key",
           "IMAGE_SUFFIXES", "VIDEO_SUFFIXES"]

NPY_SUFFIXES = frozenset({".npy"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
HDF5_SUFFIXES = frozenset({".h5", ".hdf5", ".hdf"})
RTDC_SUFFIXES = frozenset({".rtdc"})
VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mkv", ".mov", ".m4v", ".wmv", ".mpg", ".mpeg",
                            ".webm", ".mj2"})
IMAGE_SUFFIXES = frozenset({".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".pgm", ".pbm",
                            ".ppm", ".webp", ".jp2"})

# block reads of HDF5 datasets are capped at this many bytes [B]
_HDF5_BLOCK_BYTES = 32 * 1024 * 1024


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: ``frame2`` before ``frame10``."""
    return [int(part) if part.isdigit() else part.lower()
            for part in re.split(r"(\d+)", str(name))]


def _grey(image: np.ndarray, where: str, *, bgr: bool) -> np.ndarray:
    """Return an 8-bit grey (H, W) view or conversion of ``image``; raise naming ``where``."""
    if image.dtype != np.uint8:
        raise SourceError(f"{where}: dtype {image.dtype}, shape {image.shape}: only 8-bit "
                          f"(uint8) grey frames are supported")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        import cv2
        code = {(True, 3): cv2.COLOR_BGR2GRAY, (True, 4): cv2.COLOR_BGRA2GRAY,
                (False, 3): cv2.COLOR_RGB2GRAY, (False, 4): cv2.COLOR_RGBA2GRAY}
        return cv2.cvtColor(np.ascontiguousarray(image), code[(bgr, image.shape[2])])
    raise SourceError(f"{where}: shape {image.shape}: expected a grey (H, W) image")


def _as_int(name: str, value: Any, lo: int | None = None) -> int:
    try:
        out = int(value)
        if out != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise SourceError(f"replay option {name}={value!r}: expected an integer") from None
    if lo is not None and out < lo:
        raise SourceError(f"replay option {name}={value!r}: must be >= {lo}")
    return out


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SourceError(f"replay option {name}={value!r}: expected true or false")
    return bool(value)


@contextmanager
def _collect_log(name: str, level: int = logging.ERROR):
    """Collect the messages a library logs (tifffile reports broken files this way)."""
    messages: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger(name)
    handler = _Handler(level)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


class ReplaySource(FrameSource):
    """A recorded file replayed frame by frame; the base of every replay format.

    Subclasses set, in :meth:`_probe` (called from the constructor, holds no file open):
    ``_count`` (stored frames), ``_shape`` (H, W), and optionally ``_recorded_fps``,
    ``_numbers`` (int64 frame number per stored frame), ``_times_ns`` (int64 timestamp per
    stored frame); and implement :meth:`_read` (one stored frame as uint8 (H, W)). Readers
    that can only go forward (video) override :meth:`_iter_positions`.

    Parameters
    ----------
    path : str or Path
        The file or folder.
    cfg : engine.config.Config, optional
        Gives the nominal frame rate (``camera.fps``) when the file records none.
    start, stop, step, loop, fps, numbers
        See the module docstring.
    """

    format = "replay"
    OPTIONS: frozenset[str] = frozenset()
    COMMON_OPTIONS = frozenset({"start", "stop", "step", "loop", "fps", "numbers"})

    def __init__(self, path, *, cfg=None, start: int = 0, stop: int | None = None,
                 step: int = 1, loop: int = 1, fps: float | None = None,
                 numbers: Sequence[int] | None = None):
        super().__init__(str(path))
        self.path = Path(path)
        self._start = _as_int("start", start, lo=0)
        self._stop = None if stop is None else _as_int("stop", stop, lo=0)
        self._step = _as_int("step", step, lo=1)
        self._loop = _as_int("loop", loop, lo=0)
        if fps is not None:
            try:
                fps = float(fps)
            except (TypeError, ValueError):
                raise SourceError(f"{self.path}: fps={fps!r} is not a number") from None
            if not (fps > 0 and math.isfinite(fps)):
                raise SourceError(f"{self.path}: fps={fps!r} must be > 0")
        self._fps_option = fps
        self._cfg_fps = float(cfg.camera.fps) if cfg is not None else None
        self._count = 0
        self._shape: tuple[int, int] = (0, 0)
        self._recorded_fps: float | None = None
        self._numbers: np.ndarray | None = None
        self._times_ns: np.ndarray | None = None
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such file or folder")
        self._probe()
        if numbers is not None:
            nums = np.asarray(numbers)
            if nums.ndim != 1 or nums.shape[0] != self._count or nums.dtype.kind not in "iu":
                raise SourceError(f"{self.path}: numbers= must be {self._count} integers, got "
                                  f"shape {nums.shape} dtype {nums.dtype}")
            self._numbers = nums.astype(np.int64)
            self._times_ns = None
        if self._numbers is not None and self._numbers.size > 1 and np.any(np.diff(self._numbers) < 0):
            bad = int(np.argmax(np.diff(self._numbers) < 0)) + 1
            raise SourceError(f"{self.path}: frame numbers decrease at stored frame {bad} "
                              f"({int(self._numbers[bad - 1])} -> {int(self._numbers[bad])})")
        self._positions = range(self._start, min(self._stop, self._count)
                                if self._stop is not None else self._count, self._step)
        self._rep_starts: list[int] = []   # first frame number of each repetition
        self._rep_offsets: list[int] = []  # number offset of each repetition
        self._skipped_before = 0           # stored frames skipped (step): not gaps (see base)

    # -- description ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def fps(self) -> float | None:
        if self._fps_option is not None:
            return self._fps_option
        if self._recorded_fps is not None:
            return self._recorded_fps
        return self._cfg_fps

    @property
    def fps_source(self) -> str | None:
        """Where :attr:`fps` comes from: "option", "recorded", "config" or None."""
        if self._fps_option is not None:
            return "option"
        if self._recorded_fps is not None:
            return "recorded"
        return "config" if self._cfg_fps is not None else None

    @property
    def stored_frames(self) -> int:
        """Frames stored in the file (before start/stop/step/loop)."""
        return self._count

    @property
    def n_frames(self) -> int | None:
        if self._loop == 0 and len(self._positions):
            return None
        return len(self._positions) * self._loop

    def describe(self) -> dict:
        d = super().describe()
        d.update(format=self.format, path=str(self.path), stored_frames=self._count,
                 start=self._start, stop=self._stop, step=self._step, loop=self._loop,
                 fps_source=self.fps_source, timestamps=self._timestamp_source(),
                 frame_numbers="recorded" if self._numbers is not None else "position")
        return d

    def _timestamp_source(self) -> str:
        if self._times_ns is not None and self._fps_option is None:
            return "recorded"
        return "frame number / fps" if self.fps is not None else "host clock"

    # -- subclass hooks -------------------------------------------------------------------
    def _probe(self) -> None:
        raise NotImplementedError

    def _read(self, pos: int) -> np.ndarray:
        raise NotImplementedError

    def _iter_positions(self, positions: range) -> Iterator[tuple[int, np.ndarray]]:
        for pos in positions:
            yield pos, self._read(pos)

    def _number(self, pos: int) -> int:
        return int(self._numbers[pos]) if self._numbers is not None else pos

    def _do_frames(self) -> Iterator[Frame]:
        positions = self._positions
        if not len(positions):
            return
        fps = self.fps
        ns_per_frame = 1e9 / fps if fps else None
        use_times = self._times_ns is not None and self._fps_option is None
        first_number = self._number(positions[0])
        first_time = int(self._times_ns[positions[0]]) if use_times else 0
        offset, t_offset = 0, 0
        self._rep_starts, self._rep_offsets = [], []
        rep = 0
        while self._loop == 0 or rep < self._loop:
            self._rep_starts.append(first_number + offset)
            self._rep_offsets.append(offset)
            last_number, last_time, prev_pos = None, None, None
            for pos, image in self._iter_positions(positions):
                number = self._number(pos) + offset
                if use_times:
                    t_ns = int(self._times_ns[pos]) + t_offset
                elif ns_per_frame is not None:
                    t_ns = int(round(number * ns_per_frame))
                else:
                    t_ns = time.monotonic_ns()
                self._skipped_before = pos - prev_pos - 1 if prev_pos is not None else 0
                prev_pos = pos
                last_number, last_time = number, t_ns
                yield Frame(number, t_ns, image)
            if last_number is None:
                return
            # the next repetition continues the numbering without a gap
            offset = last_number + 1 - first_number
            if use_times:
                dt = ns_per_frame if ns_per_frame is not None else self._median_dt_ns()
                t_offset = last_time + int(round(dt)) - first_time
            self._skipped_before = 0
            rep += 1

    def _median_dt_ns(self) -> float:
        t = self._times_ns
        if t is None or t.size < 2:
            return 0.0
        d = np.diff(t)
        d = d[d > 0]
        return float(np.median(d)) if d.size else 0.0

    def _position_of(self, index: int) -> int:
        """Stored position of the frame yielded with frame number ``index``."""
        k = bisect_right(self._rep_starts, index) - 1
        number = index - (self._rep_offsets[k] if k >= 0 else 0)
        if self._numbers is None:
            pos = number
        else:
            pos = int(np.searchsorted(self._numbers, number))
            if pos >= self._count or int(self._numbers[pos]) != number:
                raise SourceError(f"{self.path}: no stored frame with number {index}")
        if not 0 <= pos < self._count:
            raise SourceError(f"{self.path}: no stored frame with number {index}")
        return pos


# --------------------------------------------------------------------------------------------
# .npy
# --------------------------------------------------------------------------------------------

class NpyReplay(ReplaySource):
    """A ``.npy`` file of uint8 frames, (N, H, W) or one (H, W) frame, memory-mapped."""

    format = "npy"

    def _probe(self) -> None:
        fmt = np.lib.format
        try:
            with open(self.path, "rb") as fh:
                version = fmt.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = fmt.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, fortran, dtype = fmt.read_array_header_2_0(fh)
                else:
                    shape, fortran, dtype = fmt._read_array_header(fh, version)  # (3, 0)
                self._offset = fh.tell()
        except (ValueError, OSError, EOFError) as exc:
            raise SourceError(f"{self.path}: not a readable .npy file ({exc})") from None
        if dtype != np.uint8 or len(shape) not in (2, 3) or 0 in shape:
            raise SourceError(f"{self.path}: dtype {dtype}, shape {tuple(shape)}: expected "
                              f"uint8 frames of shape (N, H, W) or one (H, W) frame")
        expected = self._offset + int(np.prod(shape)) * dtype.itemsize
        size = self.path.stat().st_size
        if size < expected:
            raise SourceError(f"{self.path}: truncated .npy: {size} bytes, the header "
                              f"({tuple(shape)} {dtype}) needs {expected}")
        self._array_shape = tuple(int(s) for s in shape)
        self._fortran = bool(fortran)
        self._count = 1 if len(shape) == 2 else self._array_shape[0]
        self._shape = self._array_shape[-2:]
        self._mm = None

    def _do_open(self) -> None:
        try:
            mm = np.load(self.path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise SourceError(f"{self.path}: cannot memory-map ({exc})") from None
        self._mm = mm[None] if mm.ndim == 2 else mm

    def _do_close(self) -> None:
        self._mm = None  # the map closes when its last view (a yielded frame) goes

    def _read(self, pos: int) -> np.ndarray:
        image = self._mm[pos]
        return np.ascontiguousarray(image) if self._fortran else image


# --------------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------------

class TiffReplay(ReplaySource):
    """A multipage TIFF: memory-mapped when its pixels are one uncompressed block, else read
    page by page (never the whole stack at once)."""

    format = "tiff"

    def _probe(self) -> None:
        import tifffile
        size = self.path.stat().st_size
        try:
            with _collect_log("tifffile") as problems, tifffile.TiffFile(self.path) as tif:
                n_pages = len(tif.pages)
                if n_pages == 0:
                    raise SourceError(f"{self.path}: TIFF without image pages (corrupt?)")
                series = tif.series[0] if tif.series else None
                first = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
                page_shape, page_dtype = tuple(first.shape), np.dtype(first.dtype)
                last = tif.pages[n_pages - 1]
                last_end = max((o + c for o, c in zip(last.dataoffsets, last.databytecounts)),
                               default=0)
                mappable = None
                if (series is not None and series.dataoffset is not None
                        and np.dtype(series.dtype) == np.uint8 and len(series.shape) in (2, 3)):
                    mappable = (int(series.dataoffset), tuple(int(s) for s in series.shape))
        except SourceError:
            raise
        except Exception as exc:  # tifffile raises many types for broken files
            raise SourceError(f"{self.path}: not a readable TIFF ({type(exc).__name__}: "
                              f"{exc})") from None
        if problems:
            raise SourceError(f"{self.path}: corrupt or truncated TIFF ({problems[0]})")
        if last_end > size:
            raise SourceError(f"{self.path}: truncated TIFF: page {n_pages - 1} needs "
                              f"{last_end} bytes, file has {size}")
        if mappable is not None:
            offset, shape = mappable
            if offset + int(np.prod(shape)) > size:
                raise SourceError(f"{self.path}: truncated TIFF: {shape} uint8 from byte "
                                  f"{offset} needs {offset + int(np.prod(shape))} bytes, file "
                                  f"has {size}")
            self._map = (offset, shape if len(shape) == 3 else (1,) + shape)
            self._count = self._map[1][0]
            self._shape = self._map[1][1:]
        else:
            self._map = None
            grey = len(page_shape) == 2 or (len(page_shape) == 3 and page_shape[-1] in (1, 3, 4))
            if page_dtype != np.uint8 or not grey:
                raise SourceError(f"{self.path}: page dtype {page_dtype}, shape {page_shape}: "
                                  f"expected 8-bit grey pages")
            self._count = n_pages
            self._shape = page_shape[:2]
        self._tif = None
        self._mm = None

    def _do_open(self) -> None:
        if self._map is not None:
            offset, shape = self._map
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
        else:
            import tifffile
            self._tif = tifffile.TiffFile(self.path)

    def _do_close(self) -> None:
        self._mm = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def _read(self, pos: int) -> np.ndarray:
        if self._mm is not None:
            return self._mm[pos]
        where = f"{self.path} page {pos}"
        try:
            image = self._tif.pages[pos].asarray()
        except Exception as exc:
            raise SourceError(f"{where}: cannot read ({type(exc).__name__}: {exc})") from None
        image = _grey(image, where, bgr=False)
        if image.shape != self._shape:
            raise SourceError(f"{where}: shape {image.shape} differs from the first page's "
                              f"{self._shape}")
        return image


# --------------------------------------------------------------------------------------------
# Folder of images
# --------------------------------------------------------------------------------------------

class ImageFolderReplay(ReplaySource):
    """A folder of image files in natural sort order (``frame2`` before ``frame10``), read one
    at a time. With ``numbered=True`` the last integer of each file name is its frame number."""

    format = "folder"
    OPTIONS = frozenset({"numbered"})

    def __init__(self, path, *, numbered: bool = False, **common):
        self._numbered = _as_bool("numbered", numbered)
        super().__init__(path, **common)

    def _probe(self) -> None:
        files = [p for p in self.path.iterdir()
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                 and not p.name.startswith(".")]
        if not files:
            raise SourceError(f"{self.path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files.sort(key=lambda p: natural_key(p.name))
        self._files = files
        self._count = len(files)
        self._shape = self._read_file(files[0]).shape
        if self._numbered:
            nums = []
            for p in files:
                found = re.findall(r"\d+", p.stem)
                if not found:
                    raise SourceError(f"{p}: numbered=True but the name holds no number")
                nums.append(int(found[-1]))
            self._numbers = np.asarray(nums, dtype=np.int64)
            dup = np.flatnonzero(np.diff(self._numbers) == 0)
            if dup.size:
                raise SourceError(f"{files[dup[0] + 1]}: frame number {nums[dup[0]]} repeats")

    def _read_file(self, p: Path) -> np.ndarray:
        import cv2
        image = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        bgr = True
        if image is None and p.suffix.lower() in TIFF_SUFFIXES:
            import tifffile
            try:
                image, bgr = tifffile.imread(p), False
            except Exception:
                image = None
        if image is None:
            raise SourceError(f"{p}: unreadable or corrupt image")
        return _grey(image, str(p), bgr=bgr)

    def _read(self, pos: int) -> np.ndarray:
        p = self._files[pos]
        image = self._read_file(p)
        if image.shape != self._shape:
            raise SourceError(f"{p}: shape {image.shape} differs from the first image's "
                              f"{self._shape} ({self._files[0].name})")
        return image

    def describe(self) -> dict:
        d = super().describe()
        d["first_file"] = self._files[0].name
        return d


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------

class VideoReplay(ReplaySource):
    """A video file through OpenCV, converted to grey; the frame rate is the container's."""

    format = "video"

    def _probe(self) -> None:
        import cv2
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise SourceError(f"{self.path}: OpenCV cannot open this video (corrupt file "
                                  f"or unsupported codec)")
            ok, image = cap.read()
            if not ok or image is None:
                raise SourceError(f"{self.path}: no decodable frame (corrupt or empty video)")
            self._shape = _grey(image, str(self.path), bgr=True).shape
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        finally:
            cap.release()
        self._count_known = count > 0
        self._count = count if count > 0 else 2 ** 62  # unknown: read until the stream ends
        self._recorded_fps = fps if fps > 0 and math.isfinite(fps) else None
        self._cap = None

    @property
    def n_frames(self) -> int | None:
        return super().n_frames if self._count_known else None

    def _do_open(self) -> None:
        import cv2
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise SourceError(f"{self.path}: OpenCV cannot open this video")

    def _do_close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _iter_positions(self, positions: range) -> Iterator[tuple[int, np.ndarray]]:
        import cv2
        cap = self._cap
        if not len(positions):
            return
        first = positions[0]
        cap.set(cv2.CAP_PROP_POS_FRAMES, first)
        if first and int(cap.get(cv2.CAP_PROP_POS_FRAMES)) != first:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)  # seek unsupported: decode forward instead
            for _ in range(first):
                if not cap.grab():
                    return
        pos = first
        end = positions[-1]
        while pos <= end:
            ok, image = cap.read()
            if not ok or image is None:
                return  # the container's frame count may overstate the stream
            yield pos, _grey(image, f"{self.path} frame {pos}", bgr=True)
            for _ in range(positions.step - 1):
                if not cap.grab():
                    return
            pos += positions.step


# --------------------------------------------------------------------------------------------
# HDF5 and RT-DC
# --------------------------------------------------------------------------------------------

def _h5py():
    import h5py
    try:  # compression filters (zstd, lz4, ...) that RT-DC files use
        import hdf5plugin  # noqa: F401
    except ImportError:
        pass
    return h5py


def _h5_error(path, exc: Exception) -> SourceError:
    text = str(exc)
    hint = ""
    if "filter" in text.lower() or "plugin" in text.lower():
        hint = " (a compression filter is missing: pip install hdf5plugin)"
    return SourceError(f"{path}: cannot read HDF5 data ({text}){hint}")


class Hdf5Replay(ReplaySource):
    """An HDF5 dataset of uint8 frames (N, H, W), read in chunk-sized blocks.

    Frame numbers come from ``frames_key`` (or a 1-D integer sibling named ``frame``,
    ``frame_number``, ``frame_numbers``, ``frames`` or ``frame_index``), timestamps from a
    sibling ``time`` [s] or ``t_ns``/``timestamp_ns`` [ns], the frame rate from the image
    dataset's ``fps``/``frame_rate`` attribute or the file's ``imaging:frame rate``.
    """

    format = "hdf5"
    OPTIONS = frozenset({"key", "frames_key", "bg_key"})
    FRAME_KEYS = ("frame", "frame_number", "frame_numbers", "frames", "frame_index")
    TIME_KEYS = (("time", 1e9), ("t_ns", 1.0), ("timestamp_ns", 1.0))
    BG_KEYS = ("image_bg", "background", "bg")

    def __init__(self, path, *, key: str | None = None, frames_key: str | None = None,
                 bg_key: str | None = None, **common):
        self._key, self._frames_key, self._bg_key = key, frames_key, bg_key
        self._unique_positions: np.ndarray | None = None
        super().__init__(path, **common)

    # -- probing --------------------------------------------------------------------------
    def _open_file(self):
        h5py = _h5py()
        try:
            return h5py.File(self.path, "r", rdcc_nbytes=_HDF5_BLOCK_BYTES)
        except OSError as exc:
            raise SourceError(f"{self.path}: not a readable HDF5 file ({exc})") from None

    def _find_images(self, h5) -> str:
        h5py = _h5py()
        if self._key is not None:
            if self._key not in h5 or not isinstance(h5[self._key], h5py.Dataset):
                raise SourceError(f"{self.path}: no dataset {self._key!r}")
            return self._key
        found: list[str] = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim == 3 and obj.dtype == np.uint8:
                found.append(name)
        h5.visititems(visit)
        if not found:
            raise SourceError(f"{self.path}: no 3-D uint8 dataset (N, H, W); name one with "
                              f"key=")
        return found[0]

    def _sibling(self, h5, images_key: str, explicit: str | None, names,
                 ndims: tuple[int, ...]) -> str | None:
        """The dataset named ``explicit``, else the first of ``names`` beside the images
        that has one of ``ndims`` dimensions (others are not what we look for)."""
        h5py = _h5py()
        if explicit is not None:
            if explicit not in h5 or not isinstance(h5[explicit], h5py.Dataset):
                raise SourceError(f"{self.path}: no dataset {explicit!r}")
            return explicit
        parent = images_key.rsplit("/", 1)[0] if "/" in images_key else ""
        for name in names:
            full = f"{parent}/{name}" if parent else name
            if (full in h5 and full != images_key and isinstance(h5[full], h5py.Dataset)
                    and h5[full].ndim in ndims):
                return full
        return None

    def _probe(self) -> None:
        with self._open_file() as h5:
            try:
                self._probe_file(h5)
            except SourceError:
                raise
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise _h5_error(self.path, exc) from None

    def _probe_file(self, h5) -> None:
        key = self._find_images(h5)
        ds = h5[key]
        if ds.dtype != np.uint8 or ds.ndim not in (2, 3) or 0 in ds.shape:
            raise SourceError(f"{self.path}: dataset {key!r} has dtype {ds.dtype}, shape "
                              f"{ds.shape}: expected uint8 frames (N, H, W)")
        self._key = key
        self._3d = ds.ndim == 3
        self._count = ds.shape[0] if self._3d else 1
        self._shape = tuple(int(s) for s in ds.shape[-2:])
        chunk_frames = ds.chunks[0] if (ds.chunks and self._3d) else 1
        frame_bytes = self._shape[0] * self._shape[1]
        budget = max(1, _HDF5_BLOCK_BYTES // frame_bytes)
        self._block = int(min(budget, max(chunk_frames, min(budget, 64))))
        # frame numbers
        fkey = self._sibling(h5, key, self._frames_key, self.FRAME_KEYS, (1,))
        if fkey is not None:
            nums = h5[fkey]
            if nums.ndim != 1 or nums.shape[0] != self._count or nums.dtype.kind not in "iu":
                raise SourceError(f"{self.path}: frame numbers {fkey!r} have dtype {nums.dtype}, "
                                  f"shape {nums.shape}: expected {self._count} integers")
            self._numbers = nums[()].astype(np.int64)
        self._frames_key = fkey
        # timestamps
        parent = key.rsplit("/", 1)[0] if "/" in key else ""
        for name, scale in self.TIME_KEYS:
            full = f"{parent}/{name}" if parent else name
            if full in h5 and h5[full].ndim == 1 and h5[full].shape[0] == self._count:
                t = h5[full][()]
                if t.dtype.kind in "iuf":
                    self._times_ns = np.round(np.asarray(t, dtype=np.float64) * scale).astype(np.int64)
                    self._times_key = full
                    break
        else:
            self._times_key = None
        # frame rate
        for attrs, name in ((ds.attrs, "fps"), (ds.attrs, "frame_rate"),
                            (h5.attrs, "imaging:frame rate"), (h5.attrs, "fps")):
            if name in attrs:
                try:
                    fps = float(np.asarray(attrs[name]).ravel()[0])
                except (TypeError, ValueError, IndexError):
                    continue
                if fps > 0 and math.isfinite(fps):
                    self._recorded_fps = fps
                    break
        # background
        bkey = self._sibling(h5, key, self._bg_key, self.BG_KEYS, (2, 3))
        if bkey is not None:
            bg = h5[bkey]
            ok = bg.dtype == np.uint8 and (tuple(bg.shape) == self._shape or (
                bg.ndim == 3 and tuple(bg.shape[1:]) == self._shape and bg.shape[0] == self._count))
            if not ok:
                raise SourceError(f"{self.path}: background {bkey!r} has dtype {bg.dtype}, shape "
                                  f"{bg.shape}: expected uint8 {self._shape} or "
                                  f"({self._count}, *{self._shape})")
        self._bg_key = bkey
        self._h5 = None
        self._ds = None

    # -- reading --------------------------------------------------------------------------
    def _do_open(self) -> None:
        self._h5 = self._open_file()
        self._ds = self._h5[self._key]
        self._cache_lo, self._cache = -1, None

    def _do_close(self) -> None:
        self._ds, self._cache = None, None
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def _stored(self, pos: int) -> int:
        """Position in the dataset of the pos-th frame (differs only for unique RT-DC)."""
        return int(self._unique_positions[pos]) if self._unique_positions is not None else pos

    def _read(self, pos: int) -> np.ndarray:
        i = self._stored(pos)
        if not self._3d:
            return self._load(slice(None))
        lo = self._cache_lo
        if self._cache is None or not (lo <= i < lo + self._cache.shape[0]):
            lo = (i // self._block) * self._block
            self._cache = self._load(slice(lo, min(lo + self._block, self._ds.shape[0])))
            self._cache_lo = lo
        return self._cache[i - lo]

    def _load(self, sel) -> np.ndarray:
        try:
            return self._ds[sel]
        except (OSError, ValueError) as exc:
            raise _h5_error(f"{self.path} dataset {self._key!r}", exc) from None

    # -- backgrounds ----------------------------------------------------------------------
    def background(self) -> np.ndarray | None:
        """The recorded background: the dataset itself if 2-D, else the pixel-wise median of
        up to 32 evenly spaced per-frame backgrounds (uint8 H×W); None if none recorded."""
        if self._bg_key is None:
            return None
        with self._open_file() as h5:
            bg = h5[self._bg_key]
            try:
                if bg.ndim == 2:
                    return bg[()]
                idx = np.unique(np.linspace(0, bg.shape[0] - 1, min(32, bg.shape[0])).astype(int))
                stack = bg[idx] if idx.size > 1 else bg[idx[0]][None]
            except (OSError, ValueError) as exc:
                raise _h5_error(self.path, exc) from None
        return np.median(stack, axis=0).round().astype(np.uint8)

    def frame_background(self, index: int) -> np.ndarray | None:
        """The recorded background of the frame yielded with frame number ``index``."""
        if self._bg_key is None:
            return None
        pos = self._stored(self._position_of(index))
        with self._open_file() as h5:
            bg = h5[self._bg_key]
            try:
                return bg[()] if bg.ndim == 2 else bg[pos]
            except (OSError, ValueError) as exc:
                raise _h5_error(self.path, exc) from None

    def describe(self) -> dict:
        d = super().describe()
        d.update(key=self._key, frames_key=self._frames_key, times_key=self._times_key,
                 bg_key=self._bg_key)
        return d


class RtdcReplay(Hdf5Replay):
    """An RT-DC file (HDF5, the deformability-cytometry format): ``events/image`` frames,
    ``events/frame`` camera frame numbers (gaps counted), ``events/time`` timestamps [s],
    ``events/image_bg`` the recorded backgrounds, the frame rate from ``imaging:frame rate``
    (else estimated from ``events/time`` and ``events/frame``).

    RT-DC stores one image per *event*; several events found in the same camera frame repeat
    that frame. With ``unique=True`` (default) each camera frame is yielded once.
    """

    format = "rtdc"
    OPTIONS = frozenset({"unique"})

    def __init__(self, path, *, unique: bool = True, **common):
        self._unique = _as_bool("unique", unique)
        super().__init__(path, key="events/image", frames_key=None, bg_key=None, **common)

    def _probe_file(self, h5) -> None:
        if "events" not in h5:
            raise SourceError(f"{self.path}: not an RT-DC file (no 'events' group)")
        if "events/image" not in h5:
            raise SourceError(f"{self.path}: RT-DC file without images (no 'events/image'; "
                              f"a feature-only or basin file?)")
        self._frames_key = "events/frame" if "events/frame" in h5 else None
        self._bg_key = "events/image_bg" if "events/image_bg" in h5 else None
        super()._probe_file(h5)
        self._events = self._count
        if self._numbers is not None and self._unique and self._count > 1:
            keep = np.flatnonzero(np.r_[True, np.diff(self._numbers) != 0])
            if keep.size < self._count:
                self._unique_positions = keep
                self._numbers = self._numbers[keep]
                if self._times_ns is not None:
                    self._times_ns = self._times_ns[keep]
                self._count = int(keep.size)
        if self._recorded_fps is None and self._times_ns is not None and self._numbers is not None:
            dn = np.diff(self._numbers)
            dt = np.diff(self._times_ns)
            ok = dn > 0
            if ok.any():
                per = float(np.median(dt[ok] / dn[ok]))
                if per > 0:
                    self._estimated_fps = 1e9 / per
                    self._recorded_fps = self._estimated_fps

    def describe(self) -> dict:
        d = super().describe()
        d.update(events=self._events, unique=self._unique,
                 fps_estimated=getattr(self, "_estimated_fps", None) is not None)
        return d


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

_BY_SUFFIX = {**{s: NpyReplay for s in NPY_SUFFIXES}, **{s: TiffReplay for s in TIFF_SUFFIXES},
              **{s: Hdf5Replay for s in HDF5_SUFFIXES}, **{s: RtdcReplay for s in RTDC_SUFFIXES},
              **{s: VideoReplay for s in VIDEO_SUFFIXES}}


def _sniff(path: Path) -> type[ReplaySource] | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head.startswith(b"\x93NUMPY"):
        return NpyReplay
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return TiffReplay
    if head == b"\x89HDF\r\n\x1a\n":
        return Hdf5Replay
    return None


def open_replay(path, cfg=None, **options: Any) -> ReplaySource:
    """Make (not yet open) the replay source for a file or a folder of images.

    Parameters
    ----------
    path : str or Path
        ``.npy``, ``.tif``/``.tiff``, ``.h5``/``.hdf5``, ``.rtdc``, a video file
        (``.avi``, ``.mp4``, ``.mkv``, ...) or a folder of images.
    cfg : engine.config.Config, optional
        Gives the nominal frame rate when the file records none.
    **options
        See the module docstring (start, stop, step, loop, fps, numbers, and per format).

    Raises
    ------
    SourceError
        Missing, unreadable, truncated or corrupt file; frames of the wrong dtype or shape;
        unknown format or option. The message names the file.
    """
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder")
    if p.is_dir():
        cls: type[ReplaySource] | None = ImageFolderReplay
    else:
        cls = _BY_SUFFIX.get(p.suffix.lower())
        sniffed = _sniff(p)
        if cls is None:
            cls = sniffed
        if cls is Hdf5Replay and sniffed is Hdf5Replay:
            h5py = _h5py()
            try:
                with h5py.File(p, "r") as h5:
                    if "events/image" in h5:  # an RT-DC file with another suffix
                        cls = RtdcReplay
            except OSError:
                pass  # Hdf5Replay reports it
        elif cls in (Hdf5Replay, RtdcReplay) and sniffed is not Hdf5Replay:
            raise SourceError(f"{p}: not an HDF5 file (bad signature; corrupt or mislabelled)")
        elif cls is NpyReplay and sniffed is not NpyReplay:
            raise SourceError(f"{p}: not a .npy file (bad magic; corrupt or mislabelled)")
        if cls is None:
            known = sorted(NPY_SUFFIXES | TIFF_SUFFIXES | HDF5_SUFFIXES | RTDC_SUFFIXES | VIDEO_SUFFIXES)
            raise SourceError(f"{p}: unknown replay format {p.suffix!r} (use {', '.join(known)} "
                              f"or a folder of images)")
    unknown = set(options) - cls.COMMON_OPTIONS - cls.OPTIONS
    if unknown:
        raise SourceError(f"{p}: unknown option(s) {', '.join(sorted(unknown))} for "
                          f"{cls.format} replay (known: "
                          f"{', '.join(sorted(cls.COMMON_OPTIONS | cls.OPTIONS))})")
    return cls(p, cfg=cfg, **options)
