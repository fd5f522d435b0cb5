"""Cell clips -> the model's input tensor. numpy only; shared by training, export checks and
the runtime so that the three cannot drift apart (reference/pitfalls.md, item 5).

A clip is the passage of one cell, ``(T_clip, h, w)`` uint8 on a fixed canvas. The model wants
``float32 (N, C, T, H, W)``:

1. **Temporal sampling** (``fmh.sampling.mode``)

   * ``"uniform"`` (default): T frames spread evenly over the whole passage, the centres of T
     equal segments (view offset 0.5); a passage shorter than T repeats frames (nearest index),
     so every clip covers the cell's entire transit whatever its speed.
   * ``"stride"``: T frames ``stride`` camera frames apart, a window centred on the passage;
     indices outside the passage repeat the first/last frame.

2. **Spatial fit** (``fmh.sampling.crop``) when the canvas is not H x W: ``"fixed"`` takes the
   centre H x W (padding by edge replication when smaller), keeping the pixel scale;
   ``"resize"``/``"bbox-resize"`` resizes the canvas bilinearly (half-pixel centres).

3. **Normalisation**: ``(u8 * scale - mean[c]) / std[c]``; a grey clip is replicated to C
   channels when the model has 3.

``views="multi"`` gives the report's 10 temporal x 3 spatial views per clip (PySlowFast's test
protocol): temporal views shift the sampling phase (uniform) or the window (stride) evenly over
the passage; spatial views are the left, centre and right H x W crops along the flow axis (x)
after fitting the short side (identical when the canvas is already H x W). Temporal views
differ only when the passage has enough frames (about 10 per sampled frame for uniform
sampling); on short passages they repeat. Scores of a clip's views are averaged with
:func:`average_views`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ModelError

__all__ = ["InputSpec", "preprocess", "average_views", "sample_indices", "fit_canvas",
           "normalise", "resize_bilinear", "N_TEMPORAL_VIEWS", "N_SPATIAL_VIEWS"]

N_TEMPORAL_VIEWS = 10
N_SPATIAL_VIEWS = 3


@dataclass(frozen=True)
class InputSpec:
    """What the model expects, read from artefact metadata."""

    channels: int
    frames: int
    height: int
    width: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "uniform"
    stride: int = 1
    crop: str = "fixed"

    @classmethod
    def from_meta(cls, meta: Any) -> "InputSpec":
        """From a :class:`~engine.infer.artefact.ModelArtefact`, its ``.meta`` (short keys) or
        the raw ``fmh.*`` strings."""
        if isinstance(meta, InputSpec):
            return meta
        if hasattr(meta, "meta"):
            meta = meta.meta
        if not isinstance(meta, Mapping):
            raise ModelError(f"preprocess: meta must be a mapping or ModelArtefact, got "
                             f"{type(meta).__name__}")
        if "fmh.format" in meta:
            from .artefact import parse_metadata
            meta = parse_metadata(meta, "<metadata>")
        try:
            inp, norm = meta["input"], meta["normalisation"]
        except KeyError as exc:
            raise ModelError(f"preprocess: metadata lacks {exc.args[0]!r}") from None
        samp = meta.get("sampling", {}) or {}
        c = int(inp["channels"])

        def per_channel(v: Sequence[float], what: str) -> tuple[float, ...]:
            v = tuple(float(x) for x in v)
            if len(v) == 1:
                return v * c
            if len(v) != c:
                raise ModelError(f"preprocess: normalisation {what} {list(v)} has neither 1 nor "
                                 f"{c} values")
            return v
        mode = samp.get("mode", "uniform")
        if mode not in ("uniform", "stride"):
            raise ModelError(f"preprocess: sampling mode {mode!r} is not 'uniform' or 'stride'")
        crop = samp.get("crop", "fixed")
        if crop not in ("fixed", "resize", "bbox-resize"):
            raise ModelError(f"preprocess: sampling crop {crop!r} is not 'fixed' or 'resize'")
        return cls(channels=c, frames=int(inp["frames"]), height=int(inp["height"]),
                   width=int(inp["width"]), scale=float(norm["scale"]),
                   mean=per_channel(norm["mean"], "mean"), std=per_channel(norm["std"], "std"),
                   mode=mode, stride=int(samp.get("stride", 1)),
                   crop="resize" if crop == "bbox-resize" else crop)


def sample_indices(n_frames: int, frames: int, *, offset: float = 0.5, mode: str = "uniform",
                   stride: int = 1) -> np.ndarray:
    """Which of ``n_frames`` passage frames make up a T-frame clip.

    Parameters
    ----------
    n_frames : int
        Frames in the passage (>= 1).
    frames : int
        T, frames the model takes.
    offset : float
        Sampling phase in [0, 1]: 0.5 centres (single view); temporal views use
        ``(j + 0.5) / n_views``. For ``"uniform"`` it is the position inside each of the T
        segments, for ``"stride"`` the position of the window's centre within the passage.
    mode : {"uniform", "stride"}
    stride : int
        Camera frames between samples (``"stride"`` only).

    Returns
    -------
    ndarray of int64, shape (frames,)
        Non-decreasing indices into the passage.
    """
    if n_frames < 1:
        raise ValueError(f"sample_indices: a clip needs at least one frame, got {n_frames}")
    if mode == "uniform":
        pos = (np.arange(frames, dtype=np.float64) + offset) * (n_frames / frames) - 0.5
    elif mode == "stride":
        span = (frames - 1) * stride
        centre = offset * (n_frames - 1) if n_frames > 1 else 0.0
        start = centre - span / 2.0
        pos = start + np.arange(frames, dtype=np.float64) * stride
    else:
        raise ValueError(f"sample_indices: mode {mode!r} is not 'uniform' or 'stride'")
    return np.clip(np.floor(pos + 0.5), 0, n_frames - 1).astype(np.int64)


def resize_bilinear(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``(T, h, w)`` to ``(T, height, width)`` float32 (half-pixel centres,
    no antialiasing: OpenCV's INTER_LINEAR convention)."""
    t, h, w = frames.shape
    src = frames.astype(np.float32, copy=False)

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, n_in - 1)
        i0 = np.floor(x).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (x - i0).astype(np.float32)
    y0, y1, wy = axis(h, height)
    x0, x1, wx = axis(w, width)
    rows = src[:, y0, :] * (1 - wy)[None, :, None] + src[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


def fit_canvas(frames: np.ndarray, height: int, width: int, *, crop: str = "fixed",
               x_frac: float = 0.5) -> np.ndarray:
    """``(T, h, w)`` -> ``(T, height, width)``.

    ``crop="fixed"``: an H x W window at horizontal position ``x_frac`` (0 left, 0.5 centre,
    1 right) and vertically centred, edge-padded where the canvas is smaller. ``"resize"``:
    with ``x_frac=0.5`` the whole canvas resized to H x W; otherwise the short side is resized
    to fit and the window is taken at ``x_frac`` along the long side (multi-view crops).
    """
    t, h, w = frames.shape
    if crop == "resize":
        if (h, w) == (height, width):
            return frames
        if x_frac == 0.5:
            return resize_bilinear(frames, height, width)
        s = max(height / h, width / w)
        frames = resize_bilinear(frames, max(height, round(h * s)), max(width, round(w * s)))
        t, h, w = frames.shape
    elif crop != "fixed":
        raise ValueError(f"fit_canvas: crop {crop!r} is not 'fixed' or 'resize'")
    ph, pw = max(0, height - h), max(0, width - w)
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)),
                        mode="edge")
        t, h, w = frames.shape
    y = (h - height) // 2
    x = int(np.floor(x_frac * (w - width)))       # 0.5 -> (w - width) // 2, like y
    return frames[:, y:y + height, x:x + width]


def normalise(frames: np.ndarray, spec: InputSpec, out: np.ndarray | None = None) -> np.ndarray:
    """``(T, H, W)`` grey values -> float32 ``(C, T, H, W)``: ``(v * scale - mean) / std``."""
    if out is None:
        out = np.empty((spec.channels, *frames.shape), np.float32)
    x = frames.astype(np.float32, copy=False) * np.float32(spec.scale)
    for c in range(spec.channels):
        np.subtract(x, np.float32(spec.mean[c]), out=out[c])
        out[c] *= np.float32(1.0 / spec.std[c])
    return out


def _frames_of(clip: Any, n: int) -> np.ndarray:
    frames = getattr(clip, "frames", clip)
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"preprocess: clip {n} is a {type(clip).__name__}, not a CellClip or "
                        "a (T, H, W) uint8 array")
    if frames.ndim != 3 or frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"preprocess: clip {n} has shape {frames.shape}, expected (T, H, W) "
                         "with T >= 1")
    if frames.dtype != np.uint8:
        raise ValueError(f"preprocess: clip {n} has dtype {frames.dtype}, expected uint8")
    return frames


def preprocess(clips: Sequence[Any], meta: Any, views: str = "single"
               ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Clips -> the model's input batch. Deterministic.

    Parameters
    ----------
    clips : sequence of CellClip or ndarray of uint8, shape (T_clip, h, w)
        Passages of any length and canvas.
    meta : ModelArtefact, its ``.meta``, raw ``fmh.*`` strings or an :class:`InputSpec`
    views : {"single", "multi"}
        One view per clip, or 10 temporal x 3 spatial views.

    Returns
    -------
    batch : ndarray of float32, shape (N, C, T, H, W)
        For ``"multi"``, N = 30 x len(clips), views of clip 0 first.
    index : ndarray of int64, shape (N,)
        Only for ``"multi"``: the clip each row belongs to.
    """
    spec = InputSpec.from_meta(meta)
    if views not in ("single", "multi"):
        raise ValueError(f"preprocess: views={views!r} is not 'single' or 'multi'")
    arrays = [_frames_of(c, n) for n, c in enumerate(clips)]
    if views == "single":
        t_offsets, x_fracs = (0.5,), (0.5,)
    else:
        t_offsets = tuple((j + 0.5) / N_TEMPORAL_VIEWS for j in range(N_TEMPORAL_VIEWS))
        x_fracs = (0.0, 0.5, 1.0)
    per_clip = len(t_offsets) * len(x_fracs)
    out = np.empty((len(arrays) * per_clip, spec.channels, spec.frames, spec.height, spec.width),
                   np.float32)
    row = 0
    for frames in arrays:
        for t_off in t_offsets:
            idx = sample_indices(frames.shape[0], spec.frames, offset=t_off, mode=spec.mode,
                                 stride=spec.stride)
            sampled = frames[idx]
            for x_frac in x_fracs:
                fitted = fit_canvas(sampled, spec.height, spec.width, crop=spec.crop,
                                    x_frac=x_frac)
                normalise(fitted, spec, out=out[row])
                row += 1
    if views == "single":
        return out
    return out, np.repeat(np.arange(len(arrays), dtype=np.int64), per_clip)


def average_views(scores: np.ndarray, index: np.ndarray, n_clips: int | None = None) -> np.ndarray:
    """Mean of the view scores ``(N_views, K)`` of each clip -> ``(n_clips, K)``.

    Average probabilities (not logits) to follow PySlowFast's ensemble.
    """
    scores = np.asarray(scores, dtype=np.float64)
    index = np.asarray(index, dtype=np.int64)
    if scores.ndim != 2 or index.shape != (scores.shape[0],):
        raise ValueError(f"average_views: scores {scores.shape} and index {index.shape} do not "
                         "match")
    n = int(index.max()) + 1 if n_clips is None else int(n_clips)
    sums = np.zeros((n, scores.shape[1]), np.float64)
    np.add.at(sums, index, scores)
    counts = np.bincount(index, minlength=n).astype(np.float64)
    if np.any(counts == 0):
        raise ValueError(f"average_views: clips {np.flatnonzero(counts == 0).tolist()} have no "
                         "views")
    return sums / counts[:, None]
