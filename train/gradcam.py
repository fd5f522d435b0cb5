"""Grad-CAM for the slow and the fast pathway (report §3.5), saved as PNG strips.

For each pathway's last convolutional layer (the output of res5) with activations
``A[k, t, i, j]``, the weights are the spatially averaged gradients of the class score,
``alpha[t, k] = mean_ij dy_c / dA[k, t, i, j]`` (report eq. 3.5, one weight per feature map
and time step), the map is ``L[t, i, j] = ReLU(sum_k alpha[t, k] A[k, t, i, j])`` (eq. 3.6),
and it is brought to the input's ``T x H x W`` by trilinear interpolation. This is how the
report found its first model looking at the channel instead of the cell.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["gradcam", "save_strip", "gradcam_strips", "target_layers"]


def target_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules whose outputs are the last conv activations, by pathway name."""
    if hasattr(model, "stages") and hasattr(model, "pathway_features"):
        last = model.stages[-1]
        return {"slow": last["slow"], "fast": last["fast"]}
    if hasattr(model, "features"):                  # the single-frame baseline
        return {"frame": model.features}
    raise ValueError(f"Grad-CAM: do not know the last conv layers of {type(model).__name__}")


def gradcam(model: torch.nn.Module, clip: torch.Tensor, target: int | None = None
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Grad-CAM maps of one clip for each pathway.

    Parameters
    ----------
    model : torch.nn.Module
        A SlowFast (or the single-frame baseline); used in eval mode, weights untouched.
    clip : Tensor, shape (1, C, T, H, W)
        The preprocessed clip.
    target : int, optional
        Class index to explain; default the predicted class.

    Returns
    -------
    maps : dict of str to ndarray of float32, shape (T, H, W)
        One map per pathway, scaled to [0, 1] (all zero when nothing contributes).
    probs : ndarray of float32, shape (K,)
        The model's softmax output for the clip.
    """
    if clip.dim() != 5 or clip.shape[0] != 1:
        raise ValueError(f"Grad-CAM: expected one clip 1 x C x T x H x W, got {tuple(clip.shape)}")
    layers = target_layers(model)
    acts: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in layers.items():
        def keep(_m, _inp, out, name=name):
            out.retain_grad()
            acts[name] = out
        hooks.append(mod.register_forward_hook(keep))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = clip.detach().clone()
            logits = model(x)
            cls = int(logits.argmax(1)) if target is None else int(target)
            model.zero_grad(set_to_none=True)
            logits[0, cls].backward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    t, h, w = clip.shape[2:]
    maps = {}
    for name, a in acts.items():
        g = a.grad
        if a.dim() == 4:                 # 2D baseline: N x K x i x j -> add a time axis
            a, g = a.unsqueeze(2), g.unsqueeze(2)
        weights = g.mean(dim=(3, 4), keepdim=True)            # (1, K, t, 1, 1): eq. 3.5
        cam = F.relu((weights * a).sum(dim=1, keepdim=True))  # (1, 1, t, i, j): eq. 3.6
        cam = F.interpolate(cam, size=(t, h, w), mode="trilinear", align_corners=False)
        cam = cam[0, 0].detach().float().cpu().numpy()
        top = float(cam.max())
        maps[name] = (cam / top if top > 0 else cam).astype(np.float32)
    probs = torch.softmax(logits.detach().float(), 1)[0].cpu().numpy()
    return maps, probs


def save_strip(frames: np.ndarray, maps: Mapping[str, np.ndarray], path: str | os.PathLike, *,
               n: int = 8, zoom: int = 2, title: str = "") -> Path:
    """Write a PNG: a row of ``n`` frames, then one row per map blended over the same frames.

    Parameters
    ----------
    frames : ndarray of uint8, shape (T, H, W)
        The clip as the model saw it (same T, H, W as the maps).
    maps : dict of str to ndarray, shape (T, H, W)
        Heat maps in [0, 1].
    """
    import cv2
    frames = np.asarray(frames)
    t = frames.shape[0]
    idx = np.unique(np.linspace(0, t - 1, min(n, t)).round().astype(int))

    def big(img):
        return cv2.resize(img, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    rows = [np.concatenate([big(cv2.cvtColor(frames[i], cv2.COLOR_GRAY2BGR)) for i in idx], 1)]
    for name, cam in maps.items():
        if cam.shape != frames.shape:
            raise ValueError(f"Grad-CAM map {name!r} shape {cam.shape} != frames {frames.shape}")
        tiles = []
        for i in idx:
            heat = cv2.applyColorMap((cam[i] * 255).astype(np.uint8), cv2.COLORMAP_JET)
            grey = cv2.cvtColor(frames[i], cv2.COLOR_GRAY2BGR)
            tiles.append(big(cv2.addWeighted(grey, 0.55, heat, 0.45, 0)))
        row = np.concatenate(tiles, 1)
        cv2.putText(row, name, (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        rows.append(row)
    img = np.concatenate(rows, 0)
    if title:
        bar = np.zeros((16, img.shape[1], 3), np.uint8)
        cv2.putText(bar, title, (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        img = np.concatenate([bar, img], 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"{path}: could not write PNG")
    return path


def _model_view(x: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """The preprocessed clip (C, T, H, W) back to uint8 grey for display."""
    norm = meta["normalisation"]
    mean = float(np.mean(norm["mean"]))
    std = float(np.mean(norm["std"]))
    scale = float(norm["scale"])
    u = (x.mean(axis=0) * std + mean) / scale
    return np.clip(u, 0, 255).astype(np.uint8)


def gradcam_strips(model: torch.nn.Module, dataset, meta: Mapping[str, Any],
                   out_dir: str | os.PathLike, *, n: int = 4, items: Sequence[int] | None = None
                   ) -> list[str]:
    """Grad-CAM strips for ``n`` clips of a dataset (half of each class where possible).

    Returns the written paths, named ``gradcam_<donor>_<cell>.png``.
    """
    if items is None:
        labels = np.asarray(dataset.labels)
        per = max(1, n // 2)
        items = []
        for k in (1, 0):
            items += np.flatnonzero(labels == k)[:per].tolist()
        items = items[:n]
    device = next(model.parameters()).device
    paths = []
    for i in items:
        x, y, _ = dataset[i]
        maps, probs = gradcam(model, x[None].to(device))
        view = _model_view(x.numpy(), meta)
        donor, cell = dataset.donors[i], int(dataset.cell_ids[i])
        title = (f"donor {donor} cell {cell} true {['maternal', 'fetal'][y]} "
                 f"p(fetal) {probs[1]:.2f}")
        p = save_strip(view, maps, Path(out_dir) / f"gradcam_{donor}_{cell}.png", title=title)
        paths.append(str(p))
    return paths
