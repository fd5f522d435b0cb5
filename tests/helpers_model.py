"""Tiny, valid fmh model artefacts (ONNX with fmh.* metadata) and clips for serving tests.

The model's logits are an affine function of the clip's mean normalised grey level, so the
expected p(fetal) of any clip can be computed in numpy: ``logit_fetal - logit_maternal =
2 * gain * (mean(x) - pivot)`` with ``x = (pixel * scale - mean) / std``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from engine.types import CellClip

FRAMES, SIZE = 8, 16
SCALE, MEAN, STD = 1.0 / 255.0, 0.45, 0.225


def make_model(path: str | Path, *, frames: int = FRAMES, size: int = SIZE, channels: int = 1,
               gain: float = 4.0, pivot: float = 0.0, batch: int | None = None,
               threshold: float = 0.5, extra_meta: dict | None = None) -> Path:
    """Write a tiny ONNX classifier: ReduceMean over C,T,H,W then a MatMul to 2 logits.

    ``batch=None`` gives a dynamic batch dimension; an int fixes it.
    """
    n = batch if batch is not None else "N"
    x = helper.make_tensor_value_info("clip", TensorProto.FLOAT, [n, channels, frames, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 2], [-gain, gain])
    b = helper.make_tensor("b", TensorProto.FLOAT, [2], [gain * pivot, -gain * pivot])
    nodes = [
        helper.make_node("ReduceMean", ["clip"], ["m"], axes=[1, 2, 3, 4], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "ax"], ["m2"]),
        helper.make_node("MatMul", ["m2", "w"], ["mw"]),
        helper.make_node("Add", ["mw", "b"], ["logits"]),
    ]
    ax = helper.make_tensor("ax", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "tiny_fmh", [x], [y], initializer=[w, b, ax])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="fmh-tests")
    model.ir_version = 8
    meta = {
        "fmh.format": "fmh-model/1",
        "fmh.arch": json.dumps({"name": "tiny_mean", "num_classes": 2}),
        "fmh.input": json.dumps({"layout": "NCTHW", "channels": channels, "frames": frames,
                                 "height": size, "width": size, "dtype": "float32",
                                 "input_name": "clip", "output_name": "logits"}),
        "fmh.sampling": json.dumps({"mode": "uniform", "crop": "fixed", "canvas": size}),
        "fmh.normalisation": json.dumps({"scale": SCALE, "mean": [MEAN], "std": [STD]}),
        "fmh.classes": json.dumps(["maternal", "fetal"]),
        "fmh.positive_class": "fetal",
        "fmh.output": "logits",
        "fmh.threshold": str(threshold),
        "fmh.validation": json.dumps({"sensitivity": 0.9, "specificity": 0.99, "auc": 0.97,
                                      "n_cells": 1000, "n_donors": 4}),
        "fmh.trained_on": "nothing: a test model",
        "fmh.created": "2026-01-01T00:00:00Z",
        "fmh.software": "fmh-engine tests",
    }
    meta.update(extra_meta or {})
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def expected_p_fetal(frames: np.ndarray, gain: float = 4.0, pivot: float = 0.0) -> float:
    """p(fetal) the tiny model gives a clip whose frames are already (T, SIZE, SIZE)."""
    x = (frames.astype(np.float64) * SCALE - MEAN) / STD
    d = 2 * gain * (x.mean() - pivot)
    return float(1.0 / (1.0 + np.exp(-d)))


def make_clip(cell_id: int, level: int | None = None, *, frames: int = FRAMES, size: int = SIZE,
              rng: np.random.Generator | None = None) -> CellClip:
    """A small clip of constant grey ``level`` (random when None)."""
    rng = rng if rng is not None else np.random.default_rng(cell_id)
    if level is None:
        img = rng.integers(0, 256, (frames, size, size), dtype=np.uint8)
    else:
        img = np.full((frames, size, size), level, np.uint8)
    t = np.arange(frames, dtype=np.int64) + 10 * cell_id
    cx = np.linspace(10, 700, frames, dtype=np.float32)
    cent = np.stack([cx, np.full(frames, 75, np.float32)], axis=1)
    boxes = np.stack([cx - 8, np.full(frames, 67), cx + 8, np.full(frames, 83)], 1).astype(np.int32)
    return CellClip(cell_id=cell_id, frames=img, frame_indices=t, centroids=cent, boxes=boxes,
                    areas=np.full(frames, 200, np.int32), t0_ns=int(t[0]) * 2_000_000,
                    t_exit_ns=int(t[-1]) * 2_000_000, features={"area_um": 10.5})
