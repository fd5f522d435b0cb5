"""Inference backends behind one protocol, micro-batching, and logits -> probabilities.

A backend runs one model artefact (an ONNX file whose ``fmh.*`` metadata describe its input)
on a float32 batch ``(N, C, T, H, W)`` and returns float32 logits ``(N, classes)``:

* :class:`OnnxRuntimeBackend`: ONNX Runtime on the CPU, or CUDA where onnxruntime-gpu is
  installed;
* :class:`TensorRTBackend`: a TensorRT engine from the engine cache of ``export/to_trt.py``
  (TensorRT and pycuda are imported when the backend is made, never at module import);
* :class:`TorchBackend`: PyTorch, for users with torch (imported inside the class only).

:func:`make_backend` picks TensorRT > ONNX Runtime CUDA > ONNX Runtime CPU for ``"auto"``.
Batches larger than the model takes are split; smaller ones are padded when the model's batch
size is fixed. :class:`Batcher` collects clips up to a maximum batch or a maximum wait;
:class:`Classifier` turns logits into probabilities, ``p_fetal`` and a label.

The runtime never imports torch at module level (DESIGN.md).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from ..errors import ModelError

__all__ = ["Backend", "OnnxRuntimeBackend", "TensorRTBackend", "TorchBackend", "make_backend",
           "available_backends", "Batcher", "Classifier", "softmax", "input_spec", "meta_value"]

log = logging.getLogger(__name__)

GPU_HINT = "needs TensorRT/pycuda (pip install fmh-engine[gpu]) and an NVIDIA GPU"


# ------------------------------------------------------------------------------------------
# Metadata helpers (accept "fmh.input" or "input" keys; JSON strings or parsed values)
# ------------------------------------------------------------------------------------------

def meta_value(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The value of ``fmh.<key>`` (or ``<key>``) in artefact metadata, JSON-decoded if a string."""
    for k in (f"fmh.{key}", key):
        if k in meta:
            v = meta[k]
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    return json.loads(v)
                except ValueError:
                    return v
            return v
    return default


def input_spec(meta: Mapping[str, Any]) -> dict:
    """``fmh.input`` with defaults: layout, channels, frames, height, width, names."""
    spec = meta_value(meta, "input", None)
    if not isinstance(spec, Mapping):
        raise ModelError("model metadata lacks fmh.input (layout, channels, frames, height, width)")
    out = {"layout": "NCTHW", "input_name": "clip", "output_name": "logits", "dtype": "float32"}
    out.update(spec)
    for key in ("channels", "frames", "height", "width"):
        if not isinstance(out.get(key), int) or out[key] < 1:
            raise ModelError(f"model metadata fmh.input.{key} must be a positive integer, "
                             f"got {out.get(key)!r}")
    if out["layout"] != "NCTHW":
        raise ModelError(f"model metadata fmh.input.layout {out['layout']!r} is not supported "
                         f"(expected 'NCTHW')")
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float logits ``(N, K)`` -> probabilities (float64), stable."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Classifier:
    """Logits -> probabilities, p(positive class) and labels, by the model's metadata.

    Parameters
    ----------
    meta : mapping
        Artefact metadata (``fmh.classes``, ``fmh.positive_class``, ``fmh.threshold``,
        ``fmh.output``).
    threshold : float
        Decision threshold on p(positive); a negative value uses the model's own
        (``cfg.model.threshold``).
    """

    def __init__(self, meta: Mapping[str, Any], threshold: float = -1.0):
        classes = meta_value(meta, "classes", ["maternal", "fetal"])
        if not isinstance(classes, list) or len(classes) < 2:
            raise ModelError(f"model metadata fmh.classes must list >= 2 class names, got {classes!r}")
        self.classes = tuple(str(c) for c in classes)
        positive = meta_value(meta, "positive_class", "fetal")
        if positive not in self.classes:
            raise ModelError(f"model metadata fmh.positive_class {positive!r} is not one of "
                             f"{self.classes}")
        self.positive = self.classes.index(positive)
        if threshold is None or threshold < 0:
            try:
                threshold = float(meta_value(meta, "threshold", 0.5))
            except (TypeError, ValueError):
                raise ModelError(f"model metadata fmh.threshold is not a number: "
                                 f"{meta_value(meta, 'threshold')!r}") from None
        if not 0.0 <= threshold <= 1.0:
            raise ModelError(f"decision threshold {threshold!r} is not in [0, 1]")
        self.threshold = float(threshold)
        self.output = str(meta_value(meta, "output", "logits"))

    def __call__(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Return ``probs (N, K)``, ``p_positive (N,)`` and ``labels``."""
        outputs = np.asarray(outputs)
        if outputs.ndim != 2 or outputs.shape[1] != len(self.classes):
            raise ModelError(f"model output has shape {outputs.shape}, expected (N, "
                             f"{len(self.classes)}) for classes {self.classes}")
        probs = softmax(outputs) if self.output == "logits" else outputs.astype(np.float64)
        return probs, probs[:, self.positive], [self.label(row) for row in probs]

    def label(self, probs: np.ndarray) -> str:
        """The label of one row of probabilities: the positive class when p >= threshold,
        else the most probable other class."""
        if probs[self.positive] >= self.threshold:
            return self.classes[self.positive]
        others = [i for i in range(len(self.classes)) if i != self.positive]
        return self.classes[max(others, key=lambda i: probs[i])]


# ------------------------------------------------------------------------------------------
# Micro-batching
# ------------------------------------------------------------------------------------------

class Batcher:
    """Collect items into micro-batches of at most ``max_batch``, waiting at most ``max_wait_ms``.

    The clock is passed in (``now`` [s], e.g. ``time.monotonic()``) so the policy is testable.
    A batch is due when it is full or when its oldest item has waited ``max_wait_ms``.
    """

    def __init__(self, max_batch: int, max_wait_ms: float):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self._items: list = []
        self._t0 = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Any, now: float) -> None:
        if not self._items:
            self._t0 = now
        self._items.append(item)

    def due(self, now: float) -> bool:
        return bool(self._items) and (len(self._items) >= self.max_batch
                                      or now - self._t0 >= self.max_wait)

    def deadline(self) -> float | None:
        """Time [s] at which the current partial batch becomes due (None when empty)."""
        return self._t0 + self.max_wait if self._items else None

    def take(self) -> list:
        """Up to ``max_batch`` items, oldest first (the rest stay, their clock restarted)."""
        batch, self._items = self._items[:self.max_batch], self._items[self.max_batch:]
        return batch


# ------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------

@runtime_checkable
class Backend(Protocol):
    """What every backend offers."""

    name: str
    providers: tuple[str, ...]
    max_batch: int

    def load(self, artefact: Any) -> None: ...

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


class _Base:
    """Shared input checks and batch splitting; subclasses implement ``_run(batch)``."""

    name = "base"

    def __init__(self, max_batch: int = 8):
        self.max_batch = int(max_batch)
        self.fixed_batch: int | None = None
        self.providers: tuple[str, ...] = ()
        self.spec: dict = {}
        self.model_path = ""

    def _check(self, batch: np.ndarray) -> np.ndarray:
        s = self.spec
        want = (s["channels"], s["frames"], s["height"], s["width"])
        if not isinstance(batch, np.ndarray) or batch.ndim != 5 or batch.shape[1:] != want:
            shape = getattr(batch, "shape", None)
            raise ModelError(f"{self.name}: batch shape {shape} does not match the model input "
                             f"(N, {', '.join(map(str, want))}) of {self.model_path}")
        return np.ascontiguousarray(batch, dtype=np.float32)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits float32 ``(N, classes)`` for a float32 batch ``(N, C, T, H, W)``."""
        batch = self._check(batch)
        n = batch.shape[0]
        if n == 0:
            raise ModelError(f"{self.name}: empty batch")
        step = self.fixed_batch or self.max_batch
        outs = []
        for i in range(0, n, step):
            chunk = batch[i:i + step]
            m = chunk.shape[0]
            if self.fixed_batch and m < self.fixed_batch:     # pad a fixed-batch model
                pad = np.zeros((self.fixed_batch - m,) + chunk.shape[1:], np.float32)
                chunk = np.concatenate([chunk, pad])
            out = np.asarray(self._run(chunk), dtype=np.float32)
            if out.ndim != 2 or out.shape[0] != chunk.shape[0]:
                raise ModelError(f"{self.name}: model output has shape {out.shape}, expected "
                                 f"({chunk.shape[0]}, classes)")
            outs.append(out[:m])
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(providers={self.providers}, max_batch={self.max_batch})"


class OnnxRuntimeBackend(_Base):
    """ONNX Runtime; the CUDA execution provider is used when onnxruntime-gpu offers it.

    Parameters
    ----------
    max_batch : int
        Largest batch per call for a model with a dynamic batch dimension.
    device : {"auto", "cpu", "cuda"}
        ``auto`` takes CUDA when available.
    threads : int
        Intra-op threads (0: ONNX Runtime's default).
    """

    name = "onnxruntime"

    def __init__(self, max_batch: int = 8, *, device: str = "auto", threads: int = 0):
        super().__init__(max_batch)
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.threads = int(threads)
        self._session = None

    @staticmethod
    def cuda_available() -> bool:
        import onnxruntime as ort
        return "CUDAExecutionProvider" in ort.get_available_providers()

    def load(self, artefact: Any) -> None:
        import onnxruntime as ort
        path = Path(artefact.path)
        self.model_path = str(path)
        self.spec = input_spec(artefact.meta)
        if self.device == "cuda" and not self.cuda_available():
            raise ModelError(f"onnxruntime-cuda requested for {path} but this ONNX Runtime has "
                             f"no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        providers = ["CPUExecutionProvider"]
        if self.device in ("auto", "cuda") and self.cuda_available():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ModelError(f"{path}: ONNX Runtime cannot load the model ({exc})") from None
        self.providers = tuple(self._session.get_providers())
        inputs = {i.name: i for i in self._session.get_inputs()}
        self._input = self.spec["input_name"] if self.spec["input_name"] in inputs else next(iter(inputs))
        outputs = [o.name for o in self._session.get_outputs()]
        self._output = self.spec["output_name"] if self.spec["output_name"] in outputs else outputs[0]
        dim0 = inputs[self._input].shape[0] if inputs[self._input].shape else None
        if isinstance(dim0, int) and dim0 > 0:
            self.fixed_batch = dim0
            self.max_batch = dim0

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run([self._output], {self._input: batch})[0]


class TensorRTBackend(_Base):
    """A TensorRT engine (TensorRT >= 10, pycuda) built by ``export/to_trt.py`` for this GPU.

    The engine is looked up in the engine cache by the artefact's SHA-256, the TensorRT version,
    the GPU and the precision (see :func:`find_engine`). A stale or foreign engine is never
    run: deserialisation failure raises :class:`ModelError` asking for a rebuild.
    """

    name = "tensorrt"

    def __init__(self, max_batch: int = 8, *, precision: str = "fp16", engine_path: str = "",
                 device: int = 0):
        super().__init__(max_batch)
        self.precision = precision
        self.engine_path = engine_path
        self.device = int(device)

    @staticmethod
    def available() -> bool:
        return (importlib.util.find_spec("tensorrt") is not None
                and importlib.util.find_spec("pycuda") is not None)

    def load(self, artefact: Any) -> None:
        if not self.available():
            raise ModelError(f"tensorrt backend for {artefact.path}: {GPU_HINT}")
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
            cuda.init()
            dev = cuda.Device(self.device)
        except Exception as exc:
            raise ModelError(f"tensorrt backend for {artefact.path}: {GPU_HINT} ({exc})") from None
        self.model_path = str(artefact.path)
        self.spec = input_spec(artefact.meta)
        gpu = dev.name()
        cc = "%d.%d" % dev.compute_capability()
        path = Path(self.engine_path) if self.engine_path else find_engine(
            artefact, trt.__version__, gpu, self.precision, compute_capability=cc)
        if path is None or not path.exists():
            raise ModelError(f"no TensorRT engine for {artefact.path} (sha256 "
                             f"{artefact.sha256[:12]}, TensorRT {trt.__version__}, {gpu}, "
                             f"{self.precision}) in {engine_cache_dir()}; build it with "
                             f"`fmh export --trt {artefact.path}`")
        self._cuda = cuda
        self._cuda_ctx = dev.retain_primary_context()
        self._cuda_ctx.push()
        logger = trt.Logger(trt.Logger.ERROR)
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ModelError(f"{path}: TensorRT {trt.__version__} cannot deserialise this engine "
                             f"(built for another GPU or TensorRT version?); rebuild it with "
                             f"`fmh export --trt {artefact.path}`")
        self._engine = engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise ModelError(f"{path}: expected one input and one output tensor, got {names}")
        self._in, self._out = ins[0], outs[0]
        shape = tuple(engine.get_tensor_shape(self._in))
        if shape[0] == -1:
            self.max_batch = min(self.max_batch, int(engine.get_tensor_profile_shape(self._in, 0)[2][0]))
        else:
            self.fixed_batch = self.max_batch = int(shape[0])
        self.providers = (f"TensorRT {trt.__version__}", gpu)
        k = len(meta_value(artefact.meta, "classes", ["maternal", "fetal"]))
        per = int(np.prod(shape[1:]))
        self._d_in = cuda.mem_alloc(self.max_batch * per * 4)
        self._d_out = cuda.mem_alloc(self.max_batch * k * 4)
        self._classes = k
        self._stream = cuda.Stream()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        cuda = self._cuda
        n = batch.shape[0]
        out = np.empty((n, self._classes), np.float32)
        self._context.set_input_shape(self._in, batch.shape)
        self._context.set_tensor_address(self._in, int(self._d_in))
        self._context.set_tensor_address(self._out, int(self._d_out))
        cuda.memcpy_htod_async(self._d_in, batch, self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise ModelError(f"TensorRT execution failed for {self.model_path}")
        cuda.memcpy_dtoh_async(out, self._d_out, self._stream)
        self._stream.synchronize()
        return out

    def close(self) -> None:
        ctx = getattr(self, "_cuda_ctx", None)
        if ctx is not None:
            ctx.pop()
            self._cuda_ctx = None


def engine_cache_dir() -> Path:
    """The TensorRT engine cache: ``$FMH_TRT_CACHE`` or ``~/.cache/fmh/trt``."""
    return Path(os.environ.get("FMH_TRT_CACHE", Path.home() / ".cache" / "fmh" / "trt"))


def find_engine(artefact: Any, trt_version: str, gpu: str, precision: str, *,
                compute_capability: str | None = None) -> Path | None:
    """Locate the cached engine for an artefact, TensorRT version, GPU and precision.

    Reads the engine cache of ``export/to_trt.py`` without importing it (the runtime needs no
    torch-side package): each plan has a JSON sidecar whose ``key`` names the ONNX SHA-256,
    TensorRT version, GPU, compute capability, precision, batch profile and input shape, and
    whose ``plan_sha256`` is the plan's own digest. Only a plan whose key matches all of
    them, and whose bytes match the digest, is returned (the one with the largest batch
    profile); a stale, foreign or corrupt engine is never picked.
    """
    cache = engine_cache_dir()
    if not cache.is_dir():
        return None
    want_shape = None
    spec = meta_value(artefact.meta, "input", None)
    if isinstance(spec, Mapping):
        want_shape = [spec.get("channels"), spec.get("frames"), spec.get("height"),
                      spec.get("width")]
    best: tuple[int, Path] | None = None
    for side in sorted(cache.glob("*.json")):
        try:
            info = json.loads(side.read_text())
            key = info.get("key", info)
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(key, dict):
            continue
        if (key.get("onnx_sha256") != artefact.sha256 or str(key.get("tensorrt")) != trt_version
                or key.get("gpu") != gpu or key.get("precision") != precision):
            continue
        if compute_capability and key.get("compute_capability") not in (None, compute_capability):
            continue
        if want_shape and key.get("input_shape") not in (None, want_shape):
            continue
        plan = side.with_suffix(".plan")
        if not plan.is_file():
            continue
        digest = info.get("plan_sha256")
        if digest and file_sha256(plan) != digest:
            log.warning("engine %s does not match its recorded sha256; not used", plan)
            continue
        mb = int(key.get("max_batch", 1)) if isinstance(key.get("max_batch", 1), int) else 1
        if best is None or mb > best[0]:
            best = (mb, plan)
    return best[1] if best else None


class TorchBackend(_Base):
    """PyTorch inference for users with torch: the SlowFast of ``export`` and a checkpoint.

    The checkpoint (``fmh-checkpoint/1``) is ``<model stem>.pt`` beside the ONNX file (or
    ``checkpoint=``), read by ``export.checkpoints.load_checkpoint`` (``weights_only=True``).
    torch is imported here only.
    """

    name = "torch"

    def __init__(self, max_batch: int = 8, *, checkpoint: str = "", device: str = "auto"):
        super().__init__(max_batch)
        self.checkpoint = checkpoint
        self.device = device

    def load(self, artefact: Any) -> None:
        try:
            import torch
        except ImportError:
            raise ModelError(f"torch backend for {artefact.path} needs PyTorch "
                             f"(pip install fmh-engine[train])") from None
        self.model_path = str(artefact.path)
        self.spec = input_spec(artefact.meta)
        ckpt = Path(self.checkpoint) if self.checkpoint else Path(artefact.path).with_suffix(".pt")
        if not ckpt.exists():
            raise ModelError(f"torch backend: no checkpoint {ckpt} beside {artefact.path}")
        try:
            from export.checkpoints import load_checkpoint  # torch-side package
        except ImportError as exc:
            raise ModelError(f"torch backend: the export package is needed ({exc})") from None
        net = load_checkpoint(ckpt).build_model()
        dev = "cuda" if self.device == "auto" and torch.cuda.is_available() else (
            "cpu" if self.device == "auto" else self.device)
        self._torch, self._net, self._dev = torch, net.eval().to(dev), dev
        self.providers = (f"torch {torch.__version__}", dev)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            return self._net(torch.from_numpy(batch).to(self._dev)).float().cpu().numpy()


def available_backends() -> list[str]:
    """Names of the backends that can run here, best first."""
    out = []
    if TensorRTBackend.available():
        out.append("tensorrt")
    try:
        if OnnxRuntimeBackend.cuda_available():
            out.append("onnxruntime-cuda")
    except ImportError:
        pass
    if importlib.util.find_spec("onnxruntime") is not None:
        out.append("onnxruntime")
    if importlib.util.find_spec("torch") is not None:
        out.append("torch")
    return out


def make_backend(artefact: Any, name: str = "auto", *, max_batch: int = 8,
                 threads: int = 0, **options: Any) -> _Base:
    """Make and load the backend for an artefact.

    Parameters
    ----------
    artefact : ModelArtefact
        ``.path``, ``.meta``, ``.sha256`` (see :mod:`engine.infer.artefact`).
    name : {"auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu", "torch"}
        ``auto``: TensorRT when installed and a cached engine exists, else ONNX Runtime with
        CUDA when available, else ONNX Runtime on the CPU.
    max_batch : int
        Largest batch per call.
    threads : int
        ONNX Runtime intra-op threads (0: default).
    """
    known = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu", "torch")
    if name not in known:
        raise ModelError(f"unknown backend {name!r} (known: {', '.join(known)})")
    if name == "tensorrt":
        b: _Base = TensorRTBackend(max_batch, **options)
    elif name == "torch":
        b = TorchBackend(max_batch, **options)
    elif name.startswith("onnxruntime"):
        device = {"onnxruntime": "auto", "onnxruntime-cuda": "cuda", "onnxruntime-cpu": "cpu"}[name]
        b = OnnxRuntimeBackend(max_batch, device=device, threads=threads)
    else:
        if TensorRTBackend.available():
            try:
                b = TensorRTBackend(max_batch, **options)
                b.load(artefact)
                return b
            except ModelError as exc:
                log.warning("tensorrt backend not used: %s", exc)
        b = OnnxRuntimeBackend(max_batch, device="auto", threads=threads)
    b.load(artefact)
    return b


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def timed_infer(backend: _Base, batch: np.ndarray) -> tuple[np.ndarray, float]:
    """``backend.infer(batch)`` and its wall time [ms]."""
    t = time.perf_counter()
    out = backend.infer(batch)
    return out, (time.perf_counter() - t) * 1e3
