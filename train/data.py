"""Labelled clip stores, donor-level splits, augmentations and the PyTorch dataset.

One clip store (``clips.h5``, :mod:`engine.clipstore`) holds the cells of one sequence, and one
sequence comes from one donor whose label (fetal or maternal) applies to all its cells. Splits
are made over donors, never over cells: a donor's cells in both training and validation let a
model score by recognising the donor (its sample's look) instead of the cell type (report
§4.1.1; pitfall 19).

Tensors are made by :func:`engine.infer.preprocess.preprocess`, the same function the runtime
uses, so training and serving cannot drift apart. Augmentations act on the uint8 frames before
it and respect the physics: cells flow left to right and forwards in time, so there is never a
horizontal flip or a time reversal.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from engine.clipstore import ClipStoreReader
from engine.errors import SourceError

__all__ = ["CLASSES", "StoreInfo", "Split", "find_stores", "split_donors", "check_split",
           "Augment", "mask_cell", "constriction_frame", "ClipDataset", "class_weights", "clip_meta"]

CLASSES = ("maternal", "fetal")     # index = class id; positive class is "fetal"


@dataclass(frozen=True)
class StoreInfo:
    """One labelled clip store: ``path``, ``donor`` id, ``label`` and its number of clips."""

    path: Path
    donor: str
    label: str
    n_clips: int

    @property
    def y(self) -> int:
        return CLASSES.index(self.label)


@dataclass(frozen=True)
class Split:
    """Donor ids of the training, validation and test splits (sorted tuples)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int = 0
    stores: tuple[StoreInfo, ...] = field(default=(), repr=False, compare=False)

    def stores_of(self, part: str) -> list[StoreInfo]:
        donors = set(getattr(self, part))
        return [s for s in self.stores if s.donor in donors]

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"seed": self.seed}
        for part in ("train", "val", "test"):
            st = self.stores_of(part)
            out[part] = {"donors": list(getattr(self, part)),
                         "stores": [str(s.path) for s in st],
                         "cells": {c: sum(s.n_clips for s in st if s.label == c) for c in CLASSES},
                         "donors_per_class": {c: len({s.donor for s in st if s.label == c})
                                              for c in CLASSES}}
        return out


# --------------------------------------------------------------------------------------------
# Finding stores and labels
# --------------------------------------------------------------------------------------------

def read_label_csv(path: str | os.PathLike) -> dict[str, str]:
    """``donor,label`` rows (a header row is allowed) -> {donor: label}."""
    out: dict[str, str] = {}
    try:
        with open(path, newline="") as fh:
            for n, row in enumerate(csv.reader(fh), 1):
                if not row or row[0].startswith("#"):
                    continue
                if n == 1 and row[0].strip().lower() == "donor":
                    continue
                if len(row) < 2:
                    raise ValueError(f"{path}:{n}: expected 'donor,label', got {row!r}")
                donor, label = row[0].strip(), row[1].strip().lower()
                if label not in CLASSES:
                    raise ValueError(f"{path}:{n}: label {label!r} must be 'fetal' or 'maternal'")
                out[donor] = label
    except OSError as exc:
        raise SourceError(f"{path}: cannot read label file ({exc.strerror or exc})") from None
    return out


def find_stores(inputs: Sequence[str | os.PathLike], labels: Mapping[str, str] | str | None = None,
                *, require_label: bool = True) -> list[StoreInfo]:
    """Every clip store named or found (recursively, ``*.h5``) under ``inputs``.

    Parameters
    ----------
    inputs : sequence of path-like
        Store files or folders holding them.
    labels : mapping donor -> label, or a CSV path, optional
        Labels that fill in or override the stores' own ``label`` attribute.
    *
    require_label : bool
        Raise when a store has no label (training); False keeps it with label "" (inference).

    Raises
    ------
    SourceError
        A path does not exist or holds no store.
    ValueError
        A store has no label, or one donor carries two labels.
    """
    if isinstance(labels, (str, os.PathLike)):
        labels = read_label_csv(labels)
    labels = dict(labels or {})
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.h5") if q.is_file())
            if not found:
                raise SourceError(f"{p}: folder holds no clip store (*.h5)")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise SourceError(f"{p}: no such clip store or folder")
    out: list[StoreInfo] = []
    seen: dict[str, str] = {}
    for p in dict.fromkeys(paths):       # keep order, drop duplicates
        with ClipStoreReader(p) as r:
            donor = r.meta["donor"] or p.parent.name
            label = labels.get(donor, r.meta["label"])
            n = len(r)
        if label not in CLASSES:
            if require_label:
                raise ValueError(f"{p}: donor {donor!r} has no label; give one in the store or "
                                 f"with a CSV of donor,label")
            label = ""
        if donor in seen and seen[donor] != label:
            raise ValueError(f"{p}: donor {donor!r} is labelled {label!r} here but "
                             f"{seen[donor]!r} in another store")
        seen[donor] = label
        out.append(StoreInfo(p, donor, label, n))
    return out


# --------------------------------------------------------------------------------------------
# Donor-level splits
# --------------------------------------------------------------------------------------------

def split_donors(stores: Sequence[StoreInfo], fractions: Sequence[float] = (0.7, 0.2, 0.1), *,
                 seed: int = 0) -> Split:
    """Split donors 70/20/10 with the same number of donors of each class in val and test.

    The report kept "a uniform class distribution ... in the test and validation sets"
    (§3.7). Each of validation and test gets ``max(1, round(f * n_donors / 2))`` donors of each
    class (at most what leaves one training donor per class); everything else trains.
    Deterministic for a given ``seed`` and set of donors (independent of their order).

    Raises
    ------
    ValueError
        Fewer than 3 donors of a class (one each for train, val, test), or bad fractions.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1) > 1e-6 or fr[0] <= 0:
        raise ValueError(f"fractions {tuple(fractions)} must be three numbers >= 0 summing to 1")
    by_class: dict[str, list[str]] = {c: sorted({s.donor for s in stores if s.label == c})
                                      for c in CLASSES}
    n_donors = sum(len(v) for v in by_class.values())
    need = 1 + (fr[1] > 0) + (fr[2] > 0)
    for c, ds in by_class.items():
        if len(ds) < need:
            raise ValueError(f"need at least {need} {c} donors for a train/val/test split, "
                             f"got {len(ds)} ({', '.join(ds) or 'none'})")
    n_small = min(len(v) for v in by_class.values())
    per_val = max(1, round(fr[1] * n_donors / 2)) if fr[1] > 0 else 0
    per_test = max(1, round(fr[2] * n_donors / 2)) if fr[2] > 0 else 0
    while per_val + per_test > n_small - 1:       # keep a training donor of each class
        if per_val >= per_test and per_val > 1:
            per_val -= 1
        elif per_test > 1:
            per_test -= 1
        else:
            break
    rng = np.random.default_rng(seed)
    train: list[str] = []
    val: list[str] = []
    test: list[str] = []
    for c in CLASSES:
        ds = list(by_class[c])
        rng.shuffle(ds)
        val += ds[:per_val]
        test += ds[per_val:per_val + per_test]
        train += ds[per_val + per_test:]
    split = Split(tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)), seed,
                  tuple(stores))
    check_split(split)
    return split


def check_split(split: Split) -> None:
    """Raise ``ValueError`` if any donor (or store file) is in two splits."""
    parts = {"train": set(split.train), "val": set(split.val), "test": set(split.test)}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = parts[a] & parts[b]
            if both:
                raise ValueError(f"donor(s) {sorted(both)} are in both {a} and {b}: "
                                 f"a donor-level split must not share donors")
    files: dict[Path, str] = {}
    for part in names:
        for s in split.stores_of(part):
            key = Path(s.path).resolve()
            if key in files and files[key] != part:
                raise ValueError(f"{s.path} is in both {files[key]} and {part}")
            files[key] = part


# --------------------------------------------------------------------------------------------
# Augmentation and the masked-cell control
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augment:
    """Augmentations that respect the flow physics (uint8 frames in, uint8 frames out).

    Parameters
    ----------
    scale : (float, float)
        Range of the zoom factor about the canvas centre (scale jitter; report §3.7).
    vflip : float
        Probability of a vertical flip (the channel is symmetric about its axis).
    shift_px : float
        Largest translation [px] in x and y.
    brightness : float
        Largest additive change [grey levels].
    contrast : float
        Largest relative contrast change (0.1 = ±10 %).

    There is deliberately no horizontal flip and no time reversal: cells flow left to right and
    forwards in time, and a model must not learn the passage backwards.
    """

    scale: tuple[float, float] = (0.9, 1.1)
    vflip: float = 0.5
    shift_px: float = 2.0
    brightness: float = 8.0
    contrast: float = 0.1

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        import cv2
        t, h, w = frames.shape
        s = float(rng.uniform(*self.scale))
        sy = -s if rng.random() < self.vflip else s
        dx, dy = rng.uniform(-self.shift_px, self.shift_px, 2)
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        # x' = s (x - cx) + cx + dx: the x scale is always positive (no horizontal flip)
        m = np.array([[s, 0.0, cx - s * cx + dx], [0.0, sy, cy - sy * cy + dy]], np.float32)
        out = np.empty_like(frames)
        for i in range(t):        # frame i stays frame i: no time reversal
            out[i] = cv2.warpAffine(frames[i], m, (w, h), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REPLICATE)
        c = 1.0 + float(rng.uniform(-self.contrast, self.contrast))
        b = float(rng.uniform(-self.brightness, self.brightness))
        if c != 1.0 or b != 0.0:
            mean = float(out.mean())
            out = np.clip((out.astype(np.float32) - mean) * c + mean + b, 0, 255).astype(np.uint8)
        return out


def mask_cell(frames: np.ndarray, centroids: np.ndarray | None = None, *,
              size: tuple[float, float] = (0.625, 0.8125)) -> np.ndarray:
    """Blank a fixed-size box around the cell: what is left is the channel only.

    The box (``size`` = (height, width) as fractions of the canvas; default 40 x 52 px on a
    64 px canvas, wider than high because a squeezed cell stretches along the flow) is centred
    on the canvas (clips are cut centred on the cell) and filled with each frame's median
    outside it, so neither the cell's pixels nor its size survive, while the channel walls
    around it do. Used by the confound control: a model trained on these clips can only learn
    the channel and the sample's look, and must score at chance on a donor-level split.
    """
    t, h, w = frames.shape
    bh = int(max(2, round(h * size[0])))
    bw = int(max(2, round(w * size[1])))
    y0, x0 = max(0, (h - bh) // 2), max(0, (w - bw) // 2)
    y1, x1 = min(h, y0 + bh), min(w, x0 + bw)
    out = frames.copy()
    keep = np.ones((h, w), bool)
    keep[y0:y1, x0:x1] = False
    if keep.any():
        fill = np.median(frames[:, keep], axis=1).astype(np.uint8)
    else:
        fill = np.full(t, 128, np.uint8)
    out[:, y0:y1, x0:x1] = fill[:, None, None]
    return out


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

def clip_meta(*, frames: int = 32, size: int = 64, channels: int = 1, crop: str = "fixed",
              mean: float = 0.45, std: float = 0.225, mode: str = "uniform") -> dict:
    """The input part of a model's metadata (``input``, ``sampling``, ``normalisation``).

    The same dict is handed to :func:`engine.infer.preprocess.preprocess` during training and
    written into the exported ONNX file, so serving preprocesses exactly as training did.
    """
    return {
        "input": {"layout": "NCTHW", "channels": int(channels), "frames": int(frames),
                  "height": int(size), "width": int(size), "dtype": "float32",
                  "input_name": "clip", "output_name": "logits"},
        "sampling": {"mode": mode, "crop": crop, "canvas": int(size)},
        "normalisation": {"scale": 1.0 / 255.0, "mean": [float(mean)] * channels,
                          "std": [float(std)] * channels},
    }


def constriction_frame(x: np.ndarray, config: Mapping[str, Any] | None = None) -> int:
    """Index of the frame whose centroid x [px] is nearest the constriction's middle."""
    chip = (config or {}).get("chip", {}) if isinstance(config, Mapping) else {}
    if "constriction_x0" in chip and "constriction_x1" in chip:
        mid = 0.5 * (float(chip["constriction_x0"]) + float(chip["constriction_x1"]))
    else:
        mid = 0.5 * (float(np.min(x)) + float(np.max(x)))
    return int(np.argmin(np.abs(np.asarray(x, np.float64) - mid)))


def class_weights(labels: Iterable[int], n_classes: int = 2) -> np.ndarray:
    """Inverse-frequency weights ``N / (K n_k)``, float32 (K,) (1 for an absent class)."""
    y = np.asarray(list(labels), dtype=np.int64)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)
    return w.astype(np.float32)


class ClipDataset:
    """The clips of several labelled stores as ``(tensor C,T,H,W, label, index)`` items.

    Parameters
    ----------
    stores : sequence of StoreInfo
        Labelled stores (see :func:`find_stores`).
    meta : dict
        Model input metadata (see :func:`clip_meta`), passed to ``preprocess``.
    *
    augment : Augment or None
        Training augmentation; None for validation and testing.
    mask : bool
        Blank the cell (channel-only confound control, :func:`mask_cell`).
    seed : int
        Seed of the augmentation; item ``i`` in epoch ``e`` gets the same random draw on every
        run (call :meth:`set_epoch`).
    cache : bool
        Keep the raw frames in memory after the first read.
    min_frames : int
        Skip clips shorter than this.
    presample : bool
        Keep only the frames the model's single-view sampling takes (``sample_indices`` of
        ``engine.infer.preprocess``; exact for ``"uniform"`` sampling, where sampling T frames
        from T is the identity), so the cache holds T frames per clip instead of the passage.
        Not for multi-view evaluation.
    max_per_donor : int
        Keep at most this many clips of each donor (the first ones of its stores); 0: all.
    pick : {None, "constriction"}
        None: the whole clip. "constriction": the one frame in which the cell is nearest the
        middle of the constriction (the single-frame baseline's input; the constriction comes
        from the store's chip config, else the middle of the clip's x range).
    """

    def __init__(self, stores: Sequence[StoreInfo], meta: Mapping[str, Any], *,
                 augment: Augment | None = None, mask: bool = False, seed: int = 0,
                 cache: bool = True, min_frames: int = 1, pick: str | None = None,
                 presample: bool = False, max_per_donor: int = 0):
        if pick not in (None, "constriction"):
            raise ValueError(f"pick {pick!r} must be None or 'constriction'")
        self.pick = pick
        self.presample = bool(presample)
        self.stores = list(stores)
        self.meta = dict(meta)
        self.augment = augment
        self.mask = bool(mask)
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self._readers: dict[int, ClipStoreReader] = {}
        self._frames: dict[tuple[int, int], np.ndarray] = {}
        items, labels, donors, cells = [], [], [], []
        per_donor: dict[str, int] = {}
        for si, s in enumerate(self.stores):
            r = self._reader(si)
            lens = r.n_frames
            ids = r.cell_ids
            for ci in range(len(r)):
                if max_per_donor and per_donor.get(s.donor, 0) >= max_per_donor:
                    break
                if lens[ci] >= min_frames:
                    per_donor[s.donor] = per_donor.get(s.donor, 0) + 1
                    items.append((si, ci))
                    labels.append(CLASSES.index(s.label) if s.label in CLASSES else -1)
                    donors.append(s.donor)
                    cells.append(int(ids[ci]))
        self.items = items
        self.labels = np.asarray(labels, dtype=np.int64)
        self.donors = np.asarray(donors, dtype=object)
        self.cell_ids = np.asarray(cells, dtype=np.int64)

    def _reader(self, si: int) -> ClipStoreReader:
        r = self._readers.get(si)
        if r is None:
            r = self._readers[si] = ClipStoreReader(self.stores[si].path)
        return r

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def raw(self, i: int) -> np.ndarray:
        """The stored frames of item ``i`` (uint8 T,H,W), masked if ``mask``."""
        key = self.items[i]
        fr = self._frames.get(key)
        if fr is None:
            r = self._reader(key[0])
            fr = r.frames(key[1])
            if self.pick == "constriction":
                k = constriction_frame(r.column("centroids", key[1])[:, 0], r.meta["config"])
                fr = fr[k:k + 1]
            elif self.presample:
                from engine.infer.preprocess import InputSpec, sample_indices
                spec = InputSpec.from_meta(self.meta)
                if spec.mode == "uniform":
                    fr = fr[sample_indices(fr.shape[0], spec.frames)]
            if self.mask:
                fr = mask_cell(fr)
            if self.cache:
                self._frames[key] = fr
        return fr

    def frames(self, i: int) -> np.ndarray:
        """Item ``i``'s frames after augmentation (uint8 T,H,W)."""
        fr = self.raw(i)
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            fr = self.augment(fr, rng)
        return fr

    def __getitem__(self, i: int):
        import torch
        from engine.infer.preprocess import preprocess
        x = preprocess([self.frames(i)], self.meta)
        x = x[0] if not isinstance(x, tuple) else x[0][0]
        return torch.from_numpy(np.ascontiguousarray(x)), int(self.labels[i]), i

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()
