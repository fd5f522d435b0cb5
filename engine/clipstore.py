"""Clip stores: the cells of one sequence (one donor) as an HDF5 file, ``clips.h5``.

``fmh detect`` writes one store per sequence; training and evaluation read many of them. The
file needs only numpy and h5py (plain gzip compression, no filter plugins; pitfall 22).

Schema (format ``fmh-clips/1``)
-------------------------------
Root attributes (strings; JSON where structured):

=================  =================================================================
``format``         ``"fmh-clips/1"``
``donor``          donor / sequence id (one store = one sequence = one donor)
``label``          ``"fetal"``, ``"maternal"`` or ``""`` when unknown
``source``         what the clips were cut from (a path or a URI)
``config``         JSON of the run's configuration (may be ``"{}"``)
``software``       ``"fmh-engine x.y.z"``
``created``        ISO 8601 time the store was opened for writing
``extra``          JSON of any further metadata the writer was given
``canvas``         JSON ``[H, W]`` of the crops [px]
``n_clips``        number of complete clips (int); rows past it are ignored
=================  =================================================================

Per-frame datasets, all clips concatenated in order (clip ``i`` occupies rows
``start[i] : start[i] + n_frames[i]``):

``frames`` uint8 (F, H, W), gzip, chunked ~one clip; ``frame_indices`` int64 (F,);
``centroids`` float32 (F, 2) [px] (x, y); ``boxes`` int32 (F, 4) [px] half-open
(x0, y0, x1, y1); ``areas`` int32 (F,) [px²].

Per-clip datasets (N rows): ``start`` int64, ``n_frames`` int32, ``cell_id`` int64,
``status`` uint8 (0 complete, 1 truncated), ``reason`` variable-length str, ``t0_ns`` int64,
``t_exit_ns`` int64, and the group ``features/<name>`` float64 (NaN where a clip lacks the
feature; dclab names where one exists).

Crash safety: the writer resizes the datasets, writes the rows, then bumps ``n_clips`` and
flushes every ``flush_every`` clips; a store whose writer was killed is readable up to the
last flush.

Memory: the writer's footprint stays flat however long the run. HDF5's metadata cache (which
holds the nodes of the chunk index, growing with the file) is capped at ``_MDC_BYTES``: with
the default cap (32 MiB, adaptive) a writer grew by about 9 MB over its first 600 clips of a
live run, about 8 MB of memory per MB of cache (measured with h5py 3.16 / HDF5 2.0); appends
only touch the newest nodes, and the cap costs no measurable time. The datasets stay open
while writing (so the chunk being filled stays cached between clips, not recompressed and
read back at every clip) and each one's chunk cache holds room for ``_CACHE_CHUNKS`` chunks,
fully written chunks evicted first (``rdcc_w0=1``), instead of HDF5 2.0's 8 MiB a dataset.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .errors import SourceError
from .types import CellClip, TrackStatus

__all__ = ["FORMAT", "ClipStoreWriter", "ClipStoreReader", "open_store", "LABELS"]

FORMAT = "fmh-clips/1"
LABELS = ("maternal", "fetal", "")
_PER_FRAME = {"frame_indices": (np.int64, ()), "centroids": (np.float32, (2,)),
              "boxes": (np.int32, (4,)), "areas": (np.int32, ())}
_PER_CLIP = {"start": np.int64, "n_frames": np.int32, "cell_id": np.int64,
             "status": np.uint8, "t0_ns": np.int64, "t_exit_ns": np.int64}
_STATUS_CODE = {TrackStatus.COMPLETE: 0, TrackStatus.TRUNCATED: 1}
_CODE_STATUS = {v: k for k, v in _STATUS_CODE.items()}
_MDC_BYTES = 256 * 1024   # HDF5 metadata cache of a writer, initial and maximum [bytes]
_CACHE_CHUNKS = 2          # chunks each dataset's chunk cache holds while writing
_CACHE_SLOTS = 11          # hash slots of that cache (prime, > _CACHE_CHUNKS)


def _cap_metadata_cache(f: Any, nbytes: int) -> None:
    """Cap the HDF5 metadata cache of the open file ``f`` at ``nbytes`` [bytes] (it still
    adapts below that)."""
    cfg = f.id.get_mdc_config()
    cfg.set_initial_size = True
    cfg.initial_size = cfg.max_size = int(nbytes)
    cfg.min_size = min(cfg.min_size, int(nbytes))
    f.id.set_mdc_config(cfg)


def _append_cache(chunks: tuple[int, ...], dtype: Any) -> dict:
    """Chunk-cache settings for a dataset that is only appended to: room for
    ``_CACHE_CHUNKS`` chunks (the one being filled and the next), fully written chunks evicted
    first. Keyword arguments of ``h5py.Group.create_dataset``."""
    nbytes = int(np.prod(chunks)) * np.dtype(dtype).itemsize
    return {"rdcc_nbytes": _CACHE_CHUNKS * nbytes, "rdcc_nslots": _CACHE_SLOTS, "rdcc_w0": 1.0}


def _software() -> str:
    from . import __version__
    return f"fmh-engine {__version__}"


class ClipStoreWriter:
    """Append :class:`~engine.types.CellClip` values to a new ``clips.h5``.

    Parameters
    ----------
    path : path-like
        The file to create (an existing file is replaced).
    meta : mapping
        ``donor`` (str or int), ``label`` ("fetal", "maternal" or "" when unknown),
        ``source`` (str), ``config`` (mapping or JSON string); any other keys go to ``extra``.
    *
    flush_every : int
        Flush to disk after this many clips (a killed writer loses at most these).
    compression : {"gzip", "lzf", None}
        Compression of ``frames`` (gzip is readable by every HDF5 tool).
    compression_opts : int
        gzip level (1 fast ... 9 small).

    Examples
    --------
    >>> with ClipStoreWriter("clips.h5", {"donor": "d07", "label": "fetal"}) as w:  # doctest: +SKIP
    ...     for clip in clips:
    ...         w.append(clip)
    """

    def __init__(self, path: str | os.PathLike, meta: Mapping[str, Any] | None = None, *,
                 flush_every: int = 16, compression: str | None = "gzip",
                 compression_opts: int = 1):
        import h5py
        meta = dict(meta or {})
        label = str(meta.pop("label", "") or "")
        if label not in LABELS:
            raise ValueError(f"{path}: label {label!r} must be one of 'fetal', 'maternal' or ''")
        if compression not in ("gzip", "lzf", None):
            raise ValueError(f"compression {compression!r} must be 'gzip', 'lzf' or None")
        if int(flush_every) < 1:
            raise ValueError(f"flush_every {flush_every!r} must be >= 1")
        self.path = Path(path)
        self.flush_every = int(flush_every)
        self._compression = compression
        self._compression_opts = compression_opts if compression == "gzip" else None
        config = meta.pop("config", {})
        if not isinstance(config, str):
            config = json.dumps(_jsonable(config))
        try:
            self._f = h5py.File(self.path, "w")
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot create clip store ({exc})") from None
        _cap_metadata_cache(self._f, _MDC_BYTES)
        a = self._f.attrs
        a["format"] = FORMAT
        a["donor"] = str(meta.pop("donor", ""))
        a["label"] = label
        a["source"] = str(meta.pop("source", ""))
        a["config"] = config
        a["software"] = str(meta.pop("software", _software()))
        a["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        a["extra"] = json.dumps(_jsonable(meta))
        a["n_clips"] = 0
        self._n = 0
        self._rows = 0
        self._pending = 0
        self._canvas: tuple[int, int] | None = None
        self._features: dict[str, Any] = {}
        # The datasets stay open while writing, so their chunk caches keep the chunk being
        # filled (reopening one per clip would write and re-read it, compressed, every time).
        self._ds: dict[str, Any] = {}
        self._f.create_group("features")
        for name, dt in _PER_CLIP.items():
            self._ds[name] = self._f.create_dataset(name, shape=(0,), maxshape=(None,),
                                                    dtype=dt, chunks=(1024,),
                                                    **_append_cache((1024,), dt))
        # variable-length strings: a chunk holds 16-byte references to the heap
        self._ds["reason"] = self._f.create_dataset(
            "reason", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,),
            **_append_cache((1024,), np.dtype((np.uint8, 16))))
        self._f.flush()

    # -- writing ---------------------------------------------------------------------------
    def _create_frame_sets(self, h: int, w: int, typical_t: int) -> None:
        chunk_t = int(min(max(typical_t, 8), 256))
        self._ds["frames"] = self._f.create_dataset(
            "frames", shape=(0, h, w), maxshape=(None, h, w), dtype=np.uint8,
            chunks=(chunk_t, h, w), compression=self._compression,
            compression_opts=self._compression_opts, shuffle=False,
            **_append_cache((chunk_t, h, w), np.uint8))
        for name, (dt, tail) in _PER_FRAME.items():
            self._ds[name] = self._f.create_dataset(
                name, shape=(0, *tail), maxshape=(None, *tail), dtype=dt, chunks=(4096, *tail),
                **_append_cache((4096, *tail), dt))
        self._canvas = (h, w)
        self._f.attrs["canvas"] = json.dumps([h, w])

    def append(self, clip: CellClip) -> int:
        """Add one clip; returns its index in the store.

        Raises
        ------
        ValueError
            If the clip's arrays disagree in length, the frames are not uint8 (T, H, W), or the
            canvas differs from the store's.
        """
        if self._f is None:
            raise ValueError(f"{self.path}: writer is closed")
        frames = np.asarray(clip.frames)
        if frames.ndim != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
            raise ValueError(f"{self.path}: clip {clip.cell_id} frames must be uint8 (T, H, W) "
                             f"with T >= 1, got {frames.dtype} {frames.shape}")
        t = frames.shape[0]
        cols = {"frame_indices": clip.frame_indices, "centroids": clip.centroids,
                "boxes": clip.boxes, "areas": clip.areas}
        arrs = {}
        for name, (dt, tail) in _PER_FRAME.items():
            arr = np.asarray(cols[name], dtype=dt)
            if arr.shape != (t, *tail):
                raise ValueError(f"{self.path}: clip {clip.cell_id} {name} has shape {arr.shape}, "
                                 f"expected {(t, *tail)} for {t} frames")
            arrs[name] = arr
        if self._canvas is None:
            self._create_frame_sets(frames.shape[1], frames.shape[2], t)
        elif frames.shape[1:] != self._canvas:
            raise ValueError(f"{self.path}: clip {clip.cell_id} canvas {frames.shape[1:]} differs "
                             f"from the store's {self._canvas}")
        f, ds, r0, n = self._f, self._ds, self._rows, self._n
        r1 = r0 + t
        ds["frames"].resize(r1, axis=0)
        ds["frames"][r0:r1] = frames
        for name, arr in arrs.items():
            ds[name].resize(r1, axis=0)
            ds[name][r0:r1] = arr
        status = TrackStatus(clip.status)
        row = {"start": r0, "n_frames": t, "cell_id": int(clip.cell_id),
               "status": _STATUS_CODE[status], "t0_ns": int(clip.t0_ns),
               "t_exit_ns": int(clip.t_exit_ns)}
        for name, value in row.items():
            ds[name].resize(n + 1, axis=0)
            ds[name][n] = value
        ds["reason"].resize(n + 1, axis=0)
        ds["reason"][n] = str(clip.reason)
        feats = dict(clip.features or {})
        for name in feats:
            if name not in self._features:
                self._features[name] = f["features"].create_dataset(
                    name, shape=(n,), maxshape=(None,), dtype=np.float64, chunks=(1024,),
                    fillvalue=np.nan, **_append_cache((1024,), np.float64))
        for name, fds in self._features.items():
            fds.resize(n + 1, axis=0)
            fds[n] = float(feats.get(name, np.nan))
        self._rows = r1
        self._n = n + 1
        f.attrs["n_clips"] = self._n
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()
        return n

    def flush(self) -> None:
        """Write everything appended so far to disk."""
        if self._f is not None:
            self._f.flush()
            self._pending = 0

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._f is not None:
            self._f.attrs["n_clips"] = self._n
            self._ds.clear()
            self._features.clear()
            self._f.close()
            self._f = None

    def __len__(self) -> int:
        return self._n

    def __enter__(self) -> "ClipStoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ClipStoreReader:
    """Random access to the clips of one ``clips.h5``.

    Parameters
    ----------
    path : path-like
        A store written by :class:`ClipStoreWriter`.

    Attributes
    ----------
    meta : dict
        ``format, donor, label, source, config`` (dict), ``software, created, extra`` (dict),
        ``canvas`` ([H, W]) and ``n_clips``.

    Raises
    ------
    SourceError
        If the file is missing, not HDF5, truncated, or not a clip store; the message names it.
    """

    def __init__(self, path: str | os.PathLike):
        import h5py
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: clip store not found")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise SourceError(f"{self.path}: not a readable HDF5 clip store ({exc})") from None
        try:
            a = self._f.attrs
            fmt = _text(a.get("format", ""))
            if fmt != FORMAT:
                raise SourceError(f"{self.path}: not a clip store (format {fmt!r}, "
                                  f"expected {FORMAT!r})")
            n = int(a.get("n_clips", 0))
            for name in _PER_CLIP:
                n = min(n, self._f[name].shape[0])
            self._canvas = tuple(json.loads(_text(a["canvas"]))) if "canvas" in a else None
            if n and "frames" not in self._f:
                raise SourceError(f"{self.path}: clip store has {n} clips but no frames")
            self._start = self._f["start"][:n].astype(np.int64)
            self._len = self._f["n_frames"][:n].astype(np.int64)
            rows = self._f["frames"].shape[0] if "frames" in self._f else 0
            end = self._start + self._len
            ok = end <= rows
            if not ok.all():  # rows beyond the frames written before a crash
                n = int(np.argmin(ok))
                self._start, self._len = self._start[:n], self._len[:n]
            self._n = n
            self.meta = {
                "format": fmt, "donor": _text(a.get("donor", "")),
                "label": _text(a.get("label", "")), "source": _text(a.get("source", "")),
                "config": _json(a.get("config", "{}")), "software": _text(a.get("software", "")),
                "created": _text(a.get("created", "")), "extra": _json(a.get("extra", "{}")),
                "canvas": list(self._canvas) if self._canvas else None, "n_clips": n,
            }
            self._cell_id = self._f["cell_id"][:n]
            self._status = self._f["status"][:n]
        except SourceError:
            self._f.close()
            raise
        except (KeyError, OSError, ValueError, json.JSONDecodeError) as exc:
            self._f.close()
            raise SourceError(f"{self.path}: corrupt clip store ({exc})") from None

    # -- access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def donor(self) -> str:
        return self.meta["donor"]

    @property
    def label(self) -> str:
        return self.meta["label"]

    @property
    def cell_ids(self) -> np.ndarray:
        """Cell id of every clip, int64 (N,)."""
        return np.asarray(self._cell_id, dtype=np.int64)

    @property
    def n_frames(self) -> np.ndarray:
        """Frames per clip, int64 (N,)."""
        return self._len.copy()

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"{self.path}: clip index {i} out of range (store has {self._n})")
        return i

    def frames(self, i: int) -> np.ndarray:
        """Only the frames of clip ``i``: uint8 (T, H, W)."""
        i = self._index(i)
        s, t = int(self._start[i]), int(self._len[i])
        try:
            return self._f["frames"][s:s + t]
        except (OSError, KeyError) as exc:
            raise SourceError(f"{self.path}: cannot read clip {i} ({exc})") from None

    def column(self, name: str, i: int) -> np.ndarray:
        """One per-frame column (``frame_indices``, ``centroids``, ``boxes``, ``areas``) of
        clip ``i``."""
        if name not in _PER_FRAME:
            raise KeyError(f"{name!r} is not a per-frame column ({', '.join(_PER_FRAME)})")
        i = self._index(i)
        s, t = int(self._start[i]), int(self._len[i])
        return self._f[name][s:s + t]

    def __getitem__(self, i: int) -> CellClip:
        i = self._index(i)
        s, t = int(self._start[i]), int(self._len[i])
        f = self._f
        try:
            frames = f["frames"][s:s + t]
            cols = {name: f[name][s:s + t] for name in _PER_FRAME}
            feats = {}
            for name, ds in f["features"].items():
                if i < ds.shape[0]:
                    v = float(ds[i])
                    if not np.isnan(v):
                        feats[name] = v
            reason = f["reason"][i]
        except (OSError, KeyError) as exc:
            raise SourceError(f"{self.path}: cannot read clip {i} ({exc})") from None
        return CellClip(
            cell_id=int(self._cell_id[i]), frames=frames,
            frame_indices=cols["frame_indices"].astype(np.int64),
            centroids=cols["centroids"].astype(np.float32),
            boxes=cols["boxes"].astype(np.int32), areas=cols["areas"].astype(np.int32),
            status=_CODE_STATUS.get(int(self._status[i]), TrackStatus.TRUNCATED),
            reason=_text(reason), t0_ns=int(f["t0_ns"][i]), t_exit_ns=int(f["t_exit_ns"][i]),
            features=feats)

    def __iter__(self) -> Iterator[CellClip]:
        for i in range(self._n):
            yield self[i]

    def close(self) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "ClipStoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"ClipStoreReader({str(self.path)!r}, donor={self.donor!r}, "
                f"label={self.label!r}, clips={self._n})")


def open_store(path: str | os.PathLike) -> ClipStoreReader:
    """Open a ``clips.h5`` for reading; a folder means ``<folder>/clips.h5``."""
    p = Path(path)
    if p.is_dir():
        p = p / "clips.h5"
    return ClipStoreReader(p)


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _json(v: Any) -> Any:
    return json.loads(_text(v) or "{}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    return obj
