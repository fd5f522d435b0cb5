"""Checkpoint -> INT8 ONNX model artefact for ONNX Runtime's CPU, checked against PyTorch.

ONNX Runtime's 8-bit convolutions (``QLinearConv``, with VNNI or AMX where the CPU has them)
run the wide SlowFasts about twice as fast as its fp32 ones (bench/RESULTS.md, "Classifier
backends"). The steps:

1. export the network with its frames on the batch axis (:mod:`export.frame_major`:
   ONNX Runtime's quantized 3D convolution is several times slower than its 2D one, and the
   graph with Transposes around every convolution (``conv3d="as2d"``) loses most of the gain
   to layout changes);
2. ``onnxruntime.quantization.quant_pre_process`` (shape inference, constant folding);
3. static quantization in the QDQ format (``quantize_static``): weights signed 8-bit per
   output channel, activations unsigned 8-bit with ranges measured on **calibration clips**
   (preprocessed as serving preprocesses them: real clips of the cells the model will see,
   e.g. from a clip store; :func:`calibration_from_stores`);
4. the ``fmh.*`` metadata of the checkpoint, plus ``fmh.export`` with ``precision: "int8"``
   and what the check below measured;
5. a check against the PyTorch model on check clips (by default the calibration clips):
   the largest |p(positive) difference| must stay within ``prob_tolerance`` (0.1 by
   default), and the share of clips whose decision at the model's threshold changes is
   reported. Beyond the tolerance: :class:`~engine.errors.ModelError`, nothing is written.

The fp32 figures in ``fmh.validation`` (used by the report's Rogan-Gladen correction) are
those of the checkpoint (``fmh.trained_on`` says so, and the report shows it); ``fmh evaluate``
on the INT8 file measures its own.

On x86 CPUs without VNNI, ONNX Runtime's u8 x s8 products can saturate; ``reduce_range=True``
quantizes weights to 7 bits for those (ONNX Runtime's quantization guide).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from engine.errors import ModelError
from engine.infer.artefact import ModelArtefact

from .checkpoints import Checkpoint, load_checkpoint
from .frame_major import FrameMajor
from .to_onnx import (DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, _check_single_dynamic_input,
                      _ort_session, _torch_export, metadata_for, set_metadata)

__all__ = ["QuantizeResult", "quantize_int8", "calibration_from_stores", "INT8_PROB_TOLERANCE",
           "CALIBRATION_METHODS"]

INT8_PROB_TOLERANCE = 0.1
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_int8` wrote and measured against PyTorch (fp32)."""

    path: Path
    sha256: str
    n_calibration: int
    n_check: int
    max_prob_diff: float          # worst |p(positive) int8 - p(positive) fp32|
    mean_prob_diff: float
    decisions_changed: int        # check clips whose call at the threshold differs
    max_logit_diff: float
    prob_tolerance: float
    size_bytes: int = 0
    metadata: Mapping[str, str] = field(repr=False, default_factory=dict)

    def summary(self) -> str:
        return (f"{self.path} (INT8, {self.size_bytes / 1e6:.2f} MB, sha256 {self.sha256[:12]}; "
                f"{self.n_calibration} calibration clips): vs PyTorch fp32 on {self.n_check} "
                f"clips max |dp| {self.max_prob_diff:.4f} <= {self.prob_tolerance:g} (mean "
                f"{self.mean_prob_diff:.4f}), {self.decisions_changed} decision(s) changed, "
                f"max |dlogit| {self.max_logit_diff:.3f}")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibration_from_stores(paths: Sequence[str | os.PathLike], meta: Mapping, *,
                            n: int = 64, seed: int = 0) -> np.ndarray:
    """Up to ``n`` preprocessed clips ``(n, C, T, H, W)`` float32 drawn at random from clip stores
    (``clips.h5`` files, or folders holding one: an ``fmh detect`` / ``fmh run`` output), with
    the shared preprocessing of the model input ``meta`` (``fmh.input``, ``fmh.sampling`` and
    ``fmh.normalisation`` under their short names)."""
    from engine.clipstore import ClipStoreReader
    from engine.infer.preprocess import preprocess
    if n < 1:
        raise ValueError(f"n={n}: need at least one calibration clip")
    files = []
    for p in map(Path, paths):
        f = p / "clips.h5" if p.is_dir() else p
        if not f.is_file():
            raise ModelError(f"{p}: no clip store (clips.h5) for calibration")
        files.append(f)
    readers = []
    try:
        for f in files:
            readers.append(ClipStoreReader(f))
        index = [(r, i) for r in readers for i in range(len(r))]
        if not index:
            raise ModelError(f"calibration stores {[str(f) for f in files]} hold no clips")
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(len(index), size=min(n, len(index)), replace=False))
        clips = [index[k][0].frames(index[k][1]) for k in pick]
        return np.ascontiguousarray(preprocess(clips, dict(meta)), dtype=np.float32)
    finally:
        for r in readers:
            r.close()


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over an array, ``batch`` clips an
    item; ``set_range`` (ONNX Runtime's strided calibration) limits it to items
    ``[start, end)``, so the calibrator holds one batch's activations at a time."""

    def __init__(self, clips: np.ndarray, batch: int = 8):
        self.clips, self.batch = clips, batch
        self.n = -(-len(clips) // batch)
        self.set_range(0, self.n)

    def __len__(self) -> int:
        return self.n

    def set_range(self, start_index: int, end_index: int) -> None:
        self.i, self.end = start_index, min(end_index, self.n)

    def get_next(self):
        if self.i >= self.end:
            return None
        x = self.clips[self.i * self.batch:(self.i + 1) * self.batch]
        self.i += 1
        return {INPUT_NAME: x}


def quantize_int8(source: Checkpoint | str | os.PathLike, out: str | os.PathLike,
                  calibration: np.ndarray, *, check: np.ndarray | None = None,
                  prob_tolerance: float = INT8_PROB_TOLERANCE, method: str = "minmax",
                  reduce_range: bool = False, opset: int = DEFAULT_OPSET,
                  created: str | None = None) -> QuantizeResult:
    """Write an INT8 ONNX artefact of a checkpoint (see the module docstring).

    Parameters
    ----------
    source : Checkpoint or path
        The fp32 checkpoint.
    out : path
        The ``.onnx`` file to write (replaced atomically once checked).
    calibration : ndarray of float32, shape (n, C, T, H, W)
        Preprocessed clips whose activations set the 8-bit ranges.
    check : ndarray, optional
        Preprocessed clips for the comparison with PyTorch (default: the calibration clips).
    prob_tolerance : float
        Largest allowed |p(positive class) difference| from PyTorch fp32 on ``check``.
    method : {"minmax", "percentile", "entropy"}
        How activation ranges are taken from the calibration clips.
    reduce_range : bool
        7-bit weights, for x86 CPUs without VNNI.

    Raises
    ------
    ModelError
        Bad calibration clips (shape, count, non-finite values), a quantization failure, or a
        difference from PyTorch beyond ``prob_tolerance``.
    """
    import onnx

    if method not in CALIBRATION_METHODS:
        raise ModelError(f"calibration method {method!r}: expected one of "
                         f"{', '.join(CALIBRATION_METHODS)}")
    if not prob_tolerance > 0:
        raise ModelError(f"prob_tolerance {prob_tolerance}: must be positive")
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    model = copy.deepcopy(ckpt.build_model()).eval().cpu()
    cfg = model.config
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    for what, arr in (("calibration", calibration), ("check", check)):
        if arr is None:
            continue
        if arr.ndim != 5 or tuple(arr.shape[1:]) != cfg.input_shape or len(arr) == 0:
            raise ModelError(f"{what} clips have shape {arr.shape}, expected (n >= 1, "
                             f"{', '.join(map(str, cfg.input_shape))}) for {cfg.name}")
        if not np.isfinite(arr).all():
            raise ModelError(f"{what} clips hold non-finite values")
    check = calibration if check is None else np.ascontiguousarray(check, dtype=np.float32)
    with torch.no_grad():
        expected = np.concatenate([model(torch.from_numpy(check[i:i + 8])).numpy()
                                   for i in range(0, len(check), 8)])

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        _quantize_to(tmp, model, calibration, method, reduce_range, opset)
        proto = onnx.load(str(tmp))
        sess = _ort_session(tmp)
        got = np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: check[i:i + 8]})[0]
                              for i in range(0, len(check), 8)])
        pos = list(ckpt.classes).index(ckpt.positive_class)
        p_ref, p_got = _softmax(expected)[:, pos], _softmax(got)[:, pos]
        dp = np.abs(p_got - p_ref)
        thr = float(ckpt.threshold)
        changed = int(np.sum((p_ref >= thr) != (p_got >= thr)))
        worst = float(dp.max())
        if not np.isfinite(worst) or worst > prob_tolerance:
            raise ModelError(f"INT8 check failed for {out}: max |dp({ckpt.positive_class})| "
                             f"{worst:.4f} > tolerance {prob_tolerance:g} on {len(check)} clips "
                             f"({changed} decisions changed); try more or more representative "
                             f"calibration clips, another calibration method, or keep fp32")
        meta = metadata_for(ckpt, created=created)
        # said where the report shows it: its Rogan-Gladen correction uses fmh.validation
        meta["fmh.trained_on"] += ("; INT8 copy (fmh export --int8-onnx): the validation "
                                   "figures are the fp32 model's, measure this file with "
                                   "fmh evaluate")
        meta["fmh.export"] = json.dumps({
            "conv3d": "frames", "opset": opset, "exporter": "torchscript", "precision": "int8",
            "quantization": {"format": "QDQ", "weights": "int8 per channel",
                             "activations": "uint8", "method": method,
                             "reduce_range": bool(reduce_range),
                             "calibration_clips": int(len(calibration))},
            "check": {"clips": int(len(check)), "max_prob_diff": round(worst, 6),
                      "mean_prob_diff": round(float(dp.mean()), 6),
                      "decisions_changed": changed}})
        set_metadata(proto, meta)
        _check_single_dynamic_input(proto, cfg)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        art = ModelArtefact.load(tmp)            # the metadata as the runtime reads it
        os.replace(tmp, out)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx checker / ORT errors
        raise ModelError(f"INT8 ONNX for {out} is invalid: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from None
    finally:
        tmp.unlink(missing_ok=True)             # any failure, Ctrl-C included: no stray file
    return QuantizeResult(path=out, sha256=art.sha256, n_calibration=len(calibration),
                          n_check=len(check), max_prob_diff=worst,
                          mean_prob_diff=float(dp.mean()), decisions_changed=changed,
                          max_logit_diff=float(np.abs(got - expected).max()),
                          prob_tolerance=float(prob_tolerance), size_bytes=out.stat().st_size,
                          metadata=meta)


def _quantize_to(path: Path, model, calibration: np.ndarray, method: str, reduce_range: bool,
                 opset: int) -> None:
    """Export ``model`` on frames, pre-process and quantize it into ``path`` (QDQ, INT8)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    crop = model.config.crop
    with tempfile.TemporaryDirectory(prefix="fmh-int8-") as work:
        fp32, pre = Path(work) / "fp32.onnx", Path(work) / "pre.onnx"
        try:
            with torch.no_grad():
                _torch_export(FrameMajor(model).eval(), torch.from_numpy(calibration[:1]), fp32,
                              opset, dynamo=False)
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            # The calibrator keeps every activation of the clips it is given: one batch at a
            # time (strided calibration: ranges or histograms merged after each), and one clip
            # per batch at 224 x 224, where an R50 holds gigabytes of activations per clip.
            batch = max(1, 8 * 64 * 64 // (crop * crop))
            quantize_static(str(pre), str(path), _Reader(calibration, batch),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=methods[method],
                            extra_options={"CalibTensorRangeSymmetric": False,
                                           "CalibStridedMinMax": 1})
        except Exception as exc:  # noqa: BLE001 - exporter / quantizer errors
            raise ModelError(f"INT8 quantization of {model.config.name} failed: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from None
