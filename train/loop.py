"""The training recipe (report §3.7) with resume, best-on-validation checkpoints and a CSV log.

Defaults are the report's: SGD with learning rate 0.1, momentum 0.9, weight decay 1e-4,
batch 8, a linear warm-up followed by a cosine schedule, cross-entropy over the two classes
(weighted by inverse class frequency: the report's training set was skewed towards maternal
cells, §4.1.3), SlowFast with alpha = 8, beta = 1/8, tau = 8, here ResNet-18 at 64 x 64 px and
one grey channel (the cells are ~30 px; upscaling to 224 px wastes compute, DESIGN.md).

Files written into ``out``:

``last.pt``
    Training state after the last finished epoch (model, optimiser, schedule, RNG); the next
    run with the same ``out`` resumes from it.
``best.pt``
    The model of the epoch with the highest validation ROC AUC (ties: lower loss; the
    threshold is set afterwards on validation, so a threshold-free criterion), in the
    model-checkpoint format of :mod:`export.checkpoints` for SlowFast (so ``fmh export`` takes
    it), with the decision threshold chosen on validation for the target fetal sensitivity and
    the validation figures.
``log.csv``, ``split.json``, ``summary.json``
    One row per epoch; the donor split; final validation and test figures.

Every random draw is seeded: model initialisation (``torch.manual_seed``), the order of the
training clips (a ``torch.Generator`` re-seeded each epoch), the augmentation (seeded per
epoch and item) and dropout (the RNG state is saved in ``last.pt``).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .data import (CLASSES, Augment, ClipDataset, Split, StoreInfo, check_split, class_weights,
                   clip_meta, find_stores, split_donors)

__all__ = ["TrainConfig", "train", "build_model", "load_model", "save_model", "lr_at"]

TRAIN_STATE = "fmh-train-state/1"
MODEL_FORMAT = "fmh-train-model/1"


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run (defaults: the report's recipe at 64 x 64 px).

    Model: ``arch`` ("slowfast_r18", "slowfast_r50", "slowfast_r101" or "frame2d", the
    single-frame baseline of :mod:`train.baselines`), ``width`` (slow stem channels, 64 in the
    paper), ``alpha``, ``beta_inv``, ``tau``, ``fusion_kernel``, ``dropout``; input ``frames``
    (T), ``size`` (H = W [px]), ``channels``, ``crop`` ("fixed" or "bbox-resize", how the clips
    were cut). Optimisation: ``epochs``, ``batch_size``, ``lr``, ``momentum``,
    ``weight_decay``, ``warmup_epochs``, ``lr_min`` (cosine floor, fraction of ``lr``),
    ``balance`` ("loss": class-weighted loss, "sampler": class-balanced sampling, "none").
    Data: ``fractions`` (train/val/test donors), ``augment``, ``mask_cell`` (channel-only
    control), ``min_frames``, ``max_clips_per_donor`` (training clips kept per donor, the first
    ones of each store; 0: all). Decision: ``target_sensitivity`` (fetal sensitivity the
    threshold is set for on validation). ``seed``, ``device``.
    """

    arch: str = "slowfast_r18"
    width: int = 64
    alpha: int = 8
    beta_inv: int = 8
    tau: int = 8
    fusion_kernel: int = 5
    dropout: float = 0.5
    frames: int = 32
    size: int = 64
    channels: int = 1
    crop: str = "fixed"
    epochs: int = 30
    batch_size: int = 8
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 2.0
    lr_min: float = 0.0
    balance: str = "loss"
    fractions: tuple[float, float, float] = (0.7, 0.2, 0.1)
    augment: bool = True
    mask_cell: bool = False
    min_frames: int = 1
    max_clips_per_donor: int = 0
    target_sensitivity: float = 0.9
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.arch not in ("slowfast_r18", "slowfast_r50", "slowfast_r101", "frame2d"):
            raise ValueError(f"arch {self.arch!r} must be slowfast_r18/r50/r101 or frame2d")
        if self.balance not in ("loss", "sampler", "none"):
            raise ValueError(f"balance {self.balance!r} must be 'loss', 'sampler' or 'none'")
        if self.crop not in ("fixed", "bbox-resize"):
            raise ValueError(f"crop {self.crop!r} must be 'fixed' or 'bbox-resize'")
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity {self.target_sensitivity} must be in (0, 1]")
        for name in ("epochs", "batch_size", "frames", "size", "channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fractions"] = list(self.fractions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "fractions" in kw:
            kw["fractions"] = tuple(kw["fractions"])
        return cls(**kw)

    def meta(self) -> dict:
        """Model input metadata for ``preprocess`` (see :func:`train.data.clip_meta`)."""
        frames = 1 if self.arch == "frame2d" else self.frames
        return clip_meta(frames=frames, size=self.size, channels=self.channels, crop=self.crop)

    def arch_dict(self) -> dict:
        if self.arch == "frame2d":
            return {"name": "frame2d", "width": self.width, "in_channels": self.channels,
                    "num_classes": len(CLASSES), "crop": self.size, "dropout": self.dropout}
        return {"name": self.arch, "depth": int(self.arch.split("_r")[1]), "alpha": self.alpha,
                "beta_inv": self.beta_inv, "tau": self.tau, "fusion_kernel": self.fusion_kernel,
                "num_classes": len(CLASSES), "in_channels": self.channels,
                "frames": self.frames, "crop": self.size, "width": self.width,
                "dropout": self.dropout}


# --------------------------------------------------------------------------------------------
# Models and their files
# --------------------------------------------------------------------------------------------

def build_model(arch: Mapping[str, Any]):
    """A fresh model from an ``arch`` dict (:meth:`TrainConfig.arch_dict`)."""
    a = dict(arch)
    name = a.pop("name")
    if name == "frame2d":
        from .baselines import FrameCNN
        return FrameCNN(**a)
    from export.slowfast import build_slowfast
    a.pop("name", None)
    return build_slowfast({"name": name, **a})


def save_model(path: str | os.PathLike, model, arch: Mapping[str, Any], meta: Mapping[str, Any],
               *, threshold: float = 0.5, metrics: Mapping[str, Any] | None = None,
               train_config: Mapping[str, Any] | None = None) -> Path:
    """Write a model file that :func:`load_model` (and ``fmh evaluate``) reads.

    A SlowFast is written with :func:`export.checkpoints.save_checkpoint` (so ``fmh export``
    takes it); the extra training information travels in its metrics. The single-frame
    baseline is written as a plain dict of tensors and JSON text (``weights_only`` safe).
    """
    import torch
    path = Path(path)
    info = {"format": MODEL_FORMAT, "arch": dict(arch), "meta": dict(meta),
            "threshold": float(threshold), "classes": list(CLASSES),
            "metrics": dict(metrics or {}), "train_config": dict(train_config or {})}
    if arch["name"].startswith("slowfast"):
        from export.checkpoints import Checkpoint, save_checkpoint
        m = dict(metrics or {})
        validation = dict(m.pop("validation", {}))
        trained_on = str(m.pop("trained_on", "") or "")
        ckpt = Checkpoint.from_model(
            model, threshold=float(threshold), normalisation=dict(meta["normalisation"]),
            sampling=dict(meta["sampling"]), validation=validation,
            metrics={**m, "train_config": dict(train_config or {})}, trained_on=trained_on)
        return save_checkpoint(path, ckpt)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": MODEL_FORMAT, "info": json.dumps(info, default=float),
                "state_dict": state}, tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike, *, device: str = "cpu"):
    """Load a model written by :func:`save_model` (or any checkpoint of export.checkpoints).

    Returns ``(model in eval mode on device, info)`` where ``info`` has ``arch``, ``meta``
    (input metadata for preprocess), ``threshold``, ``metrics``.

    Raises
    ------
    engine.errors.ModelError
        The file is missing, not a checkpoint, or does not match its architecture.
    """
    import torch
    from engine.errors import ModelError
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: model file not found")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds here
        raise ModelError(f"{p}: not a readable checkpoint ({exc})") from None
    if isinstance(raw, dict) and raw.get("format") == MODEL_FORMAT:
        info = json.loads(raw["info"])
        model = build_model(info["arch"])
        missing, unexpected = model.load_state_dict(raw["state_dict"], strict=False)
        if missing or unexpected:
            raise ModelError(f"{p}: weights do not match {info['arch']['name']} "
                             f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    else:
        from export.checkpoints import load_checkpoint
        try:
            ckpt = load_checkpoint(p)
        except (ValueError, KeyError) as exc:
            raise ModelError(f"{p}: {exc}") from None
        model = ckpt.build_model()
        info = _info_from_checkpoint(ckpt)
    model.eval().to(device)
    return model, info


def _info_from_checkpoint(ckpt) -> dict:
    cfg = ckpt.config
    meta = {"input": clip_meta(frames=cfg.frames, size=cfg.crop,
                               channels=cfg.in_channels)["input"],
            "sampling": dict(ckpt.sampling), "normalisation": dict(ckpt.normalisation)}
    metrics = dict(ckpt.metrics)
    metrics["validation"] = dict(ckpt.validation)
    return {"arch": cfg.to_dict(), "meta": meta, "threshold": float(ckpt.threshold),
            "metrics": metrics, "trained_on": ckpt.trained_on}


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------

def lr_at(step: int, total: int, warmup: int, lr: float, lr_min: float = 0.0) -> float:
    """Learning rate at iteration ``step``: linear warm-up over ``warmup`` iterations from
    ``lr / warmup`` to ``lr``, then a half cosine down to ``lr_min * lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    floor = lr * lr_min
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_error", "val_loss", "val_error",
              "val_balanced_error", "val_sensitivity", "val_specificity", "val_auc", "seconds"]


def _seed_all(seed: int) -> None:
    import random
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _predict(model, ds: ClipDataset, batch_size: int, device: str, loss_fn=None):
    """p(fetal) and mean loss over a dataset (model in eval mode)."""
    import torch
    from torch.utils.data import DataLoader
    model.eval()
    probs, losses, n = [], 0.0, 0
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    with torch.no_grad():
        for x, y, _ in loader:
            x, y = x.to(device), y.to(device)
            out = model(x).float()
            if loss_fn is not None:
                losses += float(loss_fn(out, y)) * len(y)
                n += len(y)
            probs.append(torch.softmax(out, 1)[:, CLASSES.index("fetal")].cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros(0)
    return p.astype(np.float64), (losses / n if n else float("nan"))


def train(stores: Sequence[str | os.PathLike] | Sequence[StoreInfo], out: str | os.PathLike,
          config: TrainConfig = TrainConfig(), *, labels: Mapping[str, str] | str | None = None,
          resume: bool = True, progress: bool = True, split: Split | None = None,
          stop_after: int | None = None, trained_on: str | None = None) -> dict:
    """Train on labelled clip stores; returns the summary (also written to summary.json).

    Parameters
    ----------
    stores : sequence of path-like or StoreInfo
        Clip stores (or folders of them), one donor each, labelled.
    out : path-like
        Output folder (created); an existing ``last.pt`` there is resumed when ``resume``.
    config : TrainConfig
        The recipe.
    *
    labels : mapping or CSV path, optional
        donor -> label, filling in or overriding the stores' labels.
    resume : bool
        Continue from ``out/last.pt`` if present (its config must match).
    split : Split, optional
        Use this donor split instead of making one (it is checked).
    stop_after : int, optional
        Stop after this epoch as an interruption would (``last.pt`` written, no summary); a
        later call resumes. Continuing with a larger ``epochs`` than the first run stretches
        the cosine schedule from where it stands, so it is not the same as a longer run.
    trained_on : str, optional
        What the data is, in words (goes into the checkpoint and the ONNX metadata); default
        from the stores' sources (simulated stores say so).
    """
    import torch
    from torch.utils.data import DataLoader, WeightedRandomSampler
    from tqdm import tqdm
    from .evaluate import binary_metrics, threshold_for_sensitivity

    cfg = config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    infos = (list(stores) if stores and isinstance(stores[0], StoreInfo)
             else find_stores(stores, labels))
    if split is None:
        split = split_donors(infos, cfg.fractions, seed=cfg.seed)
    check_split(split)
    if trained_on is None:
        trained_on = describe_data(split.stores)
    (out / "split.json").write_text(json.dumps(split.to_dict(), indent=2))

    _seed_all(cfg.seed)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    meta = cfg.meta()
    pick = "constriction" if cfg.arch == "frame2d" else None
    aug = Augment() if cfg.augment else None
    train_ds = ClipDataset(split.stores_of("train"), meta, augment=aug, mask=cfg.mask_cell,
                           seed=cfg.seed, min_frames=cfg.min_frames, pick=pick, presample=True,
                           max_per_donor=cfg.max_clips_per_donor)
    val_ds = ClipDataset(split.stores_of("val"), meta, mask=cfg.mask_cell,
                         min_frames=cfg.min_frames, pick=pick, presample=True)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ValueError(f"empty split: {len(train_ds)} training and {len(val_ds)} validation "
                         f"clips")
    model = build_model(cfg.arch_dict()).to(device)
    weights = class_weights(train_ds.labels)
    loss_w = torch.tensor(weights if cfg.balance == "loss" else np.ones(2, np.float32),
                          device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=loss_w)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    start_epoch, best_key, step = 0, (float("inf"), float("inf")), 0
    history: list[dict] = []
    last = out / "last.pt"
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state.get("format") != TRAIN_STATE:
            raise ValueError(f"{last}: not a training state file")
        saved = json.loads(state["config"])
        mine = cfg.to_dict()
        diff = {k: (saved.get(k), mine[k]) for k in mine
                if k not in ("epochs", "device") and saved.get(k) != mine[k]}
        if diff:
            raise ValueError(f"{last}: was trained with a different config {diff}; use a new "
                             f"--out or --no-resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        step = int(state["step"])
        best_key = tuple(json.loads(state["best_key"]))
        history = json.loads(state["history"])
        torch.set_rng_state(state["rng"])
    log_path = out / "log.csv"
    if start_epoch == 0 or not log_path.exists():
        with open(log_path, "w", newline="") as fh:
            csv.writer(fh).writerow(LOG_FIELDS)

    g = torch.Generator()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_ds.set_epoch(epoch)
        g.manual_seed(cfg.seed * 100003 + epoch)
        if cfg.balance == "sampler":
            sw = weights[train_ds.labels]
            sampler = WeightedRandomSampler(torch.as_tensor(sw, dtype=torch.double),
                                            len(train_ds), replacement=True, generator=g)
            loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                                num_workers=0)
        else:
            loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                num_workers=0)
        model.train()
        tot_loss, tot_err, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False)
        for x, y, _ in bar:
            lr = lr_at(step, total, warmup, cfg.lr, cfg.lr_min)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = x.to(device), y.to(device)
            if len(y) == 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                   for m in model.modules()):
                step += 1          # BatchNorm cannot train on a batch of one
                continue
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            tot_loss += float(loss.detach()) * len(y)
            tot_err += int((logits.argmax(1) != y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{tot_loss / max(seen, 1):.3f}", lr=f"{lr:.3g}")
        p_val, val_loss = _predict(model, val_ds, cfg.batch_size, device, loss_fn)
        m = binary_metrics(val_ds.labels, p_val, 0.5)
        row = {"epoch": epoch + 1, "lr": lr_at(max(step - 1, 0), total, warmup, cfg.lr, cfg.lr_min),
               "train_loss": tot_loss / max(seen, 1), "train_error": tot_err / max(seen, 1),
               "val_loss": val_loss, "val_error": m["top1_error"],
               "val_balanced_error": 1 - m["balanced_accuracy"],
               "val_sensitivity": m["sensitivity"], "val_specificity": m["specificity"],
               "val_auc": m["auc"], "seconds": time.perf_counter() - t0}
        history.append(row)
        with open(log_path, "a", newline="") as fh:
            csv.writer(fh).writerow([row[k] for k in LOG_FIELDS])
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
                  f"err {row['train_error']:.3f} | val loss {val_loss:.4f} "
                  f"bal.err {row['val_balanced_error']:.3f} AUC {m['auc']:.3f} "
                  f"({row['seconds']:.1f} s)", flush=True)
        key = (-_nan_small(m["auc"]), _nan_big(val_loss))
        if key < best_key:
            best_key = key
            thr = threshold_for_sensitivity(val_ds.labels, p_val, cfg.target_sensitivity)
            vm = binary_metrics(val_ds.labels, p_val, thr)
            save_model(out / "best.pt", model, cfg.arch_dict(), meta, threshold=thr,
                       metrics={"epoch": epoch + 1, "validation": _short(vm, val_ds),
                                "val_top1_error": vm["top1_error"], "trained_on": trained_on},
                       train_config=cfg.to_dict())
        state = {"format": TRAIN_STATE, "config": json.dumps(cfg.to_dict()),
                 "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "epoch": epoch, "step": step, "best_key": json.dumps(list(best_key)),
                 "history": json.dumps(history), "rng": torch.get_rng_state()}
        tmp = out / "last.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, last)
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
            train_ds.close()
            val_ds.close()
            return {"stopped_after": epoch + 1, "history": history}

    summary = _summarise(out, cfg, split, meta, pick, progress)
    summary["history"] = history
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    train_ds.close()
    val_ds.close()
    return summary


def _nan_small(v: float) -> float:
    return float("-inf") if v is None or math.isnan(v) else float(v)


def _nan_big(v: float) -> float:
    return float("inf") if v is None or math.isnan(v) else float(v)


def _short(m: Mapping[str, Any], ds: ClipDataset) -> dict:
    """The validation figures an artefact carries (fmh.validation keys; the class sizes give
    the report the uncertainty of sensitivity and specificity)."""
    labels = np.asarray(ds.labels)
    return {"sensitivity": m["sensitivity"], "specificity": m["specificity"], "auc": m["auc"],
            "n_cells": int(len(ds)), "n_donors": int(len(set(ds.donors.tolist()))),
            "n_fetal": int((labels == CLASSES.index("fetal")).sum()),
            "n_maternal": int((labels == CLASSES.index("maternal")).sum())}


def describe_data(stores: Sequence[StoreInfo]) -> str:
    """``trained_on`` text: says plainly when the stores come from the simulator."""
    from engine.clipstore import ClipStoreReader
    sources, oracle = [], []
    for s in stores:
        with ClipStoreReader(s.path) as r:
            sources.append(r.meta["source"])
            oracle.append(bool((r.meta["extra"] or {}).get("oracle")))
    n_d = len({s.donor for s in stores})
    n_c = sum(s.n_clips for s in stores)
    if sources and all(src.startswith("sim://") for src in sources):
        cut = ("cut at the simulator's true positions" if all(oracle) else
               "cut by the fmh front end and tracker" if not any(oracle) else
               "cut partly at true positions, partly by the front end and tracker")
        return (f"synthetic cells from the fmh-engine PolyNano chip simulator, NOT real blood "
                f"cells ({n_d} simulated donors, {n_c} clips {cut})")
    return f"{n_d} donors, {n_c} clips from {len(set(sources))} sources"


def _summarise(out: Path, cfg: TrainConfig, split: Split, meta: dict, pick, progress) -> dict:
    """Figures of best.pt on validation and test (single view, its own threshold)."""
    from .evaluate import binary_metrics, per_donor
    best, info = load_model(out / "best.pt", device=cfg.device)
    thr = info["threshold"]
    res: dict[str, Any] = {"config": cfg.to_dict(), "threshold": thr,
                           "best_epoch": info["metrics"].get("epoch"), "split": split.to_dict()}
    for part in ("val", "test"):
        st = split.stores_of(part)
        if not st:
            continue
        ds = ClipDataset(st, meta, mask=cfg.mask_cell, min_frames=cfg.min_frames, pick=pick,
                         presample=True)
        p, _ = _predict(best, ds, cfg.batch_size, cfg.device)
        m = binary_metrics(ds.labels, p, thr)
        m["at_0.5"] = {k: binary_metrics(ds.labels, p, 0.5)[k]
                       for k in ("top1_error", "sensitivity", "specificity")}
        m["per_donor"] = per_donor(ds.donors, ds.labels, p, thr)
        res[part] = m
        ds.close()
    return res
