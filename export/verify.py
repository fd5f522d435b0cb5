"""Numerical agreement of PyTorch, ONNX Runtime and TensorRT on the same reference clips.

Tolerances (stated, per backend and precision; reference/pitfalls.md item 5 — polygraphy's
1e-5 default is too strict for TensorRT):

=====================  ==============================  ======================================
comparison             measure                         tolerance
=====================  ==============================  ======================================
ORT fp32 vs torch      max abs logit difference        1e-4
torch CUDA vs CPU      max abs logit difference        1e-3 (TF32 disabled)
TRT fp32 vs torch      max abs logit difference        1e-3
TRT fp16 vs torch      max abs probability difference  1e-2
TRT int8 vs torch      max abs probability difference  5e-2
=====================  ==============================  ======================================

A row also records whether the predicted class agrees on every clip.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.errors import ModelError

__all__ = ["TOLERANCES", "ParityRow", "compare", "verify", "softmax"]

# backend -> (measure, tolerance); measure "logit" or "prob"
TOLERANCES: dict[str, tuple[str, float]] = {
    "onnxruntime": ("logit", 1e-4),
    "torch-cuda": ("logit", 1e-3),
    "tensorrt-fp32": ("logit", 1e-3),
    "tensorrt-fp16": ("prob", 1e-2),
    "tensorrt-int8": ("prob", 5e-2),
}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class ParityRow:
    backend: str
    measure: str
    max_abs_diff: float
    tolerance: float
    argmax_agree: float        # fraction of clips with the same predicted class
    n_clips: int

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance)

    def __str__(self) -> str:
        return (f"{self.backend:<15} max |d{self.measure}| {self.max_abs_diff:.2e} "
                f"(tol {self.tolerance:.0e}) argmax agree {self.argmax_agree:.0%} "
                f"on {self.n_clips} clips: {'ok' if self.ok else 'FAIL'}")


def compare(backend: str, reference_logits: np.ndarray, logits: np.ndarray) -> ParityRow:
    """One parity row for ``backend`` (a key of :data:`TOLERANCES`)."""
    if backend not in TOLERANCES:
        raise ModelError(f"no stated tolerance for backend {backend!r} "
                         f"(known: {', '.join(TOLERANCES)})")
    measure, tol = TOLERANCES[backend]
    ref = np.asarray(reference_logits, np.float64)
    got = np.asarray(logits, np.float64)
    if ref.shape != got.shape:
        raise ModelError(f"{backend}: output shape {got.shape} != reference {ref.shape}")
    if measure == "prob":
        diff = float(np.max(np.abs(softmax(got) - softmax(ref))))
    else:
        diff = float(np.max(np.abs(got - ref)))
    agree = float(np.mean(np.argmax(got, 1) == np.argmax(ref, 1)))
    return ParityRow(backend, measure, diff, tol, agree, int(ref.shape[0]))


def verify(checkpoint, onnx_path: str | Path | None = None, *, engine: str | Path | None = None,
           precision: str = "fp16", reference: np.ndarray | None = None,
           cuda: bool = False, enforce: bool = True) -> list[ParityRow]:
    """Compare every available backend against PyTorch (CPU, fp32) on reference clips.

    Parameters
    ----------
    checkpoint : Checkpoint or path
    onnx_path : path, optional
        ONNX artefact exported from ``checkpoint`` (ONNX Runtime row).
    engine : path, optional
        TensorRT plan built from ``onnx_path`` at ``precision`` (TensorRT row).
    reference : ndarray (n, C, T, H, W), optional
        Default :func:`export.to_onnx.reference_clips` (8 clips).
    cuda : bool
        Add a PyTorch-CUDA row.
    enforce : bool
        Raise ModelError when any row exceeds its tolerance.
    """
    import torch

    from .checkpoints import Checkpoint, load_checkpoint
    from .to_onnx import reference_clips

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = ckpt.build_model()
    x = reference if reference is not None else reference_clips(ckpt.config, n=8)
    x = np.ascontiguousarray(x, np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    rows: list[ParityRow] = []
    if onnx_path is not None:
        import onnxruntime as ort
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        rows.append(compare("onnxruntime", ref, sess.run(None, {sess.get_inputs()[0].name: x})[0]))
    if cuda:
        prev = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.no_grad():
                got = model.to("cuda")(torch.from_numpy(x).cuda()).cpu().numpy()
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
            model.to("cpu")
        rows.append(compare("torch-cuda", ref, got))
    if engine is not None:
        from .to_trt import run_engine
        got = _run_in_batches(lambda b: run_engine(engine, b), x, _max_batch_of(engine))
        rows.append(compare(f"tensorrt-{precision}", ref, got))
    bad = [r for r in rows if not r.ok]
    if enforce and bad:
        raise ModelError("parity failed: " + "; ".join(str(r) for r in bad))
    return rows


def _max_batch_of(engine: str | Path) -> int:
    import json
    try:
        return int(json.loads(Path(engine).with_suffix(".json").read_text())["key"]["max_batch"])
    except (OSError, ValueError, KeyError):
        return 1


def _run_in_batches(fn, x: np.ndarray, max_batch: int) -> np.ndarray:
    parts: Sequence[np.ndarray] = [fn(x[i:i + max_batch]) for i in range(0, len(x), max_batch)]
    return np.concatenate(parts, axis=0)
