"""Checkpoint -> ONNX model artefact, verified against PyTorch with ONNX Runtime.

Follows STYLE habit 10: export from an ``eval()`` copy after one real forward pass; one input
``clip`` (N x C x T x H x W, only N dynamic) and one output ``logits`` (N x K); the ``fmh.*``
metadata of :mod:`engine.infer.artefact`; ``onnx.checker``; and a parity check on reference
clips at batch 1 and 5 whose worst |logit difference| must stay within ``tolerance``
(1e-4 in fp32), else :class:`~engine.errors.ModelError` and no file is written.

We use the TorchScript-based exporter (``dynamo=False``): for this convolutional graph it gives
a compact graph (Conv, BatchNorm folded into Conv, Relu, MaxPool, Slice with step, Concat,
ReduceMean, Gemm) with a symbolic batch axis and no post-processing. The dynamo exporter
(``dynamo=True``) works too and is selectable; it needs onnxscript.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from engine.errors import ModelError
from engine.infer.artefact import ModelArtefact, build_metadata

from .checkpoints import Checkpoint, load_checkpoint
from .frame_major import FrameMajor
from .lower_onnx import lower_onnx
from .slowfast import SlowFast

__all__ = ["ExportResult", "export_onnx", "CONV3D_MODES", "reference_clips", "metadata_for", "DEFAULT_OPSET",
           "FP32_TOLERANCE", "INPUT_NAME", "OUTPUT_NAME"]

DEFAULT_OPSET = 17
FP32_TOLERANCE = 1e-4
INPUT_NAME = "clip"
OUTPUT_NAME = "logits"
# How the exported graph expresses the 3D convolutions (``fmh export --conv3d``).
CONV3D_MODES = ("frames", "as2d", "none")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    sha256: str
    opset: int
    max_abs_diff: float                      # worst |logit(torch) - logit(ORT)| over all checks
    per_batch: Mapping[int, float]           # batch size -> worst |diff|
    tolerance: float
    n_reference: int
    metadata: Mapping[str, str] = field(repr=False, default_factory=dict)
    model_id: str = ""
    size_bytes: int = 0

    def summary(self) -> str:
        per = ", ".join(f"batch {b}: {d:.2e}" for b, d in self.per_batch.items())
        return (f"{self.path} ({self.size_bytes / 1e6:.2f} MB, opset {self.opset}, "
                f"sha256 {self.sha256[:12]}): ONNX Runtime vs PyTorch max |dlogit| "
                f"{self.max_abs_diff:.2e} <= {self.tolerance:.0e} on {self.n_reference} "
                f"reference clips ({per})")


def reference_clips(config, n: int = 5, seed: int = 0,
                    normalisation: Mapping | None = None) -> np.ndarray:
    """``n`` deterministic preprocessed clips ``(n, C, T, H, W)`` float32 for parity checks:
    a dark disc crossing a noisy bright background at different speeds, through the shared
    preprocessing (so the values span what the model sees)."""
    from engine.infer.preprocess import InputSpec, preprocess
    from .checkpoints import default_normalisation
    rng = np.random.default_rng(seed)
    c, t, h, w = config.input_shape
    norm = dict(normalisation or default_normalisation(c))
    spec = InputSpec.from_meta({"input": {"channels": c, "frames": t, "height": h, "width": w},
                                "normalisation": norm})
    yy, xx = np.mgrid[0:h, 0:w]
    clips = []
    for i in range(n):
        length = int(rng.integers(max(2, t // 2), 2 * t + 1))
        frames = rng.normal(150, 6, size=(length, h, w))
        r = rng.uniform(0.15, 0.3) * min(h, w)
        for j in range(length):
            cx = (j + 0.5) / length * w
            cy = h / 2 + rng.normal(0, 1)
            frames[j][(xx - cx) ** 2 + ((yy - cy) / (1 + 0.3 * i / n)) ** 2 < r * r] -= 70
        clips.append(np.clip(frames, 0, 255).astype(np.uint8))
    return preprocess(clips, spec)


def metadata_for(ckpt: Checkpoint, *, created: str | None = None) -> dict[str, str]:
    """The ``fmh.*`` metadata strings describing ``ckpt``'s ONNX export."""
    cfg = ckpt.config
    return build_metadata(
        arch=cfg.to_dict(),
        input={"layout": "NCTHW", "channels": cfg.in_channels, "frames": cfg.frames,
               "height": cfg.crop, "width": cfg.crop, "dtype": "float32",
               "input_name": INPUT_NAME, "output_name": OUTPUT_NAME},
        sampling=dict(ckpt.sampling), normalisation=dict(ckpt.normalisation),
        classes=list(ckpt.classes), positive_class=ckpt.positive_class,
        threshold=float(ckpt.threshold), validation=dict(ckpt.validation),
        trained_on=ckpt.trained_on or "unknown", created=created)


def _torch_export(model: SlowFast, example: torch.Tensor, path: Path, opset: int,
                  dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the TorchScript exporter's deprecation notice
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            prog = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], opset_version=opset,
                                     dynamo=True, dynamic_shapes={"clip": {0: batch}},
                                     external_data=False)
            prog.save(str(path))
        else:
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                              do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def _ort_session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_onnx(source: Checkpoint | str | os.PathLike, out: str | os.PathLike, *,
                opset: int = DEFAULT_OPSET, reference: np.ndarray | None = None,
                tolerance: float = FP32_TOLERANCE, check_batches: Sequence[int] = (1, 5),
                dynamo: bool = False, created: str | None = None,
                conv3d: str = "as2d") -> ExportResult:
    """Export a checkpoint to a verified ONNX artefact.

    Parameters
    ----------
    source : Checkpoint or path
        One of our checkpoints (:func:`export.checkpoints.load_checkpoint`).
    out : path
        The ``.onnx`` file to write (replaced atomically once verified).
    opset : int
        ONNX opset (>= 17).
    reference : ndarray of float32, shape (n, C, T, H, W), optional
        Preprocessed clips for the parity check (default :func:`reference_clips`).
    tolerance : float
        Largest allowed |logit difference| between PyTorch and ONNX Runtime.
    check_batches : sequence of int
        Batch sizes run through ONNX Runtime (shows the batch axis really is dynamic).
    dynamo : bool
        Use the dynamo-based exporter instead of the TorchScript one.
    conv3d : {"as2d", "none"}
        ``"as2d"`` (default): 3D convolutions with a spatial kernel written as 2D convolutions
        over the frames (:mod:`export.lower_onnx`; the same function, 2.4x faster for the
        demo model on ONNX Runtime's CPU); ``"none"``: the 3D convolutions as they are (e.g. for a consumer
        with fast native 3D convolutions). Recorded in ``fmh.export``.

    Raises
    ------
    ModelError
        Opset too old, export or checker failure, a graph that does not take exactly one
        dynamic-batch input, or parity beyond ``tolerance``.
    """
    if opset < 17:
        raise ModelError(f"opset {opset} is too old; use 17 or newer")
    if conv3d not in CONV3D_MODES:
        raise ModelError(f"conv3d={conv3d!r}: expected one of {', '.join(CONV3D_MODES)}")
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    model = copy.deepcopy(ckpt.build_model()).eval().cpu()
    cfg = model.config
    if reference is None:
        reference = reference_clips(cfg, n=max(check_batches), normalisation=ckpt.normalisation)
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    if reference.ndim != 5 or tuple(reference.shape[1:]) != cfg.input_shape:
        raise ModelError(f"reference clips have shape {reference.shape}, expected "
                         f"(n, {', '.join(map(str, cfg.input_shape))})")
    x = torch.from_numpy(reference)
    with torch.no_grad():
        expected = model(x).numpy()             # the real forward pass, and the reference logits

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with torch.no_grad():
            graph = FrameMajor(model).eval() if conv3d == "frames" else model
            _torch_export(graph, x[:1], tmp, opset, dynamo)
    except Exception as exc:  # noqa: BLE001 - the exporters raise many kinds
        tmp.unlink(missing_ok=True)
        raise ModelError(f"ONNX export of {cfg.name} failed: {type(exc).__name__}: {exc}") from None

    import onnx
    try:
        proto = onnx.load(str(tmp))
        if conv3d == "as2d":
            proto, _ = lower_onnx(proto)
        meta = metadata_for(ckpt, created=created)
        meta["fmh.export"] = json.dumps({"conv3d": conv3d, "opset": opset,
                                         "exporter": "dynamo" if dynamo else "torchscript"})
        set_metadata(proto, meta)
        _check_single_dynamic_input(proto, cfg)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        sess = _ort_session(tmp)
        per_batch: dict[int, float] = {}
        n = reference.shape[0]
        for b in check_batches:
            idx = np.arange(b) % n
            got = sess.run([OUTPUT_NAME], {INPUT_NAME: reference[idx]})[0]
            if got.shape != (b, cfg.num_classes):
                raise ModelError(f"ONNX Runtime returned shape {got.shape} for batch {b}, "
                                 f"expected {(b, cfg.num_classes)}")
            per_batch[b] = float(np.max(np.abs(got - expected[idx])))
        worst = max(per_batch.values())
        if not np.isfinite(worst) or worst > tolerance:
            raise ModelError(f"ONNX parity failed for {out}: max |dlogit| {worst:.3e} > "
                             f"tolerance {tolerance:.0e} ({per_batch})")
    except ModelError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - onnx checker / ORT errors
        tmp.unlink(missing_ok=True)
        raise ModelError(f"exported ONNX for {out} is invalid: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from None
    actual_opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                       default=opset)
    os.replace(tmp, out)
    art = ModelArtefact.load(out)               # the metadata round trip, as the runtime reads it
    return ExportResult(path=out, sha256=art.sha256, opset=actual_opset, max_abs_diff=worst,
                        per_batch=per_batch, tolerance=tolerance, n_reference=n,
                        metadata=meta, model_id=art.model_id, size_bytes=out.stat().st_size)


def set_metadata(proto, meta: Mapping[str, str]) -> None:
    """Replace an ``onnx.ModelProto``'s metadata with ``meta`` and name us as its producer."""
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "fmh-engine"


def _check_single_dynamic_input(proto, cfg) -> None:
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"exported graph has inputs {[i.name for i in inputs]}, expected one")
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims[0].dim_param or any(not d.HasField("dim_value") for d in dims[1:]):
        raise ModelError("exported graph: only the batch axis may be dynamic, got "
                         f"{[d.dim_param or d.dim_value for d in dims]}")
    if [d.dim_value for d in dims[1:]] != list(cfg.input_shape):
        raise ModelError(f"exported graph input {[d.dim_value for d in dims[1:]]} != "
                         f"{list(cfg.input_shape)}")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



