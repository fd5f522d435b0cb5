"""ONNX artefact -> TensorRT engine, cached under a key that makes stale engines impossible to run.

An engine is tied to the GPU, the TensorRT version, the builder precision and the optimisation
profile (reference/pitfalls.md, items 7-9). The cache key is

    {ONNX sha256, TensorRT version, GPU name, compute capability, precision,
     profile (min/opt/max batch and the clip shape)}

and the engine file ``<model stem>-<key digest>.plan`` has a JSON sidecar with every field
plus the plan's own sha256. :func:`build_engine` reuses a cached plan only if its sidecar
matches the current key field by field and the plan bytes match their recorded hash; anything
else (another GPU, another TensorRT, an edited ONNX, a truncated file, a missing sidecar) is
rebuilt, never run.

TensorRT is imported lazily. Everything that touches it goes through a :class:`Toolkit`
(version, GPU, build), so the cache logic is tested everywhere with a fake toolkit; the real
one (:class:`TensorRTToolkit`) needs an NVIDIA GPU with TensorRT >= 10.

Precisions: ``fp16`` (default; FP32 fallback per layer is TensorRT's own choice), ``fp32``,
``int8`` (needs calibration clips, preprocessed exactly like serving input; the calibration
cache is keyed like the engine).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from engine.errors import ModelError
from engine.infer.artefact import ModelArtefact

__all__ = ["PRECISIONS", "GpuInfo", "EngineKey", "EngineResult", "Toolkit", "TensorRTToolkit",
           "engine_cache_dir", "engine_key", "cached_engine_path", "engine_path", "build_engine",
           "check_sidecar", "tensorrt_available", "run_engine", "TRT_SKIP_REASON"]

PRECISIONS = ("fp16", "fp32", "int8")
TRT_SKIP_REASON = "needs an NVIDIA GPU with TensorRT"
SIDECAR_FORMAT = "fmh-trt-engine/1"


def tensorrt_available() -> bool:
    """True if ``import tensorrt`` works and a CUDA GPU is visible."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - broken installs raise more than ImportError
        return False
    try:
        return _gpu_info() is not None
    except ModelError:
        return False


def engine_cache_dir() -> Path:
    """``$FMH_TRT_CACHE`` or ``~/.cache/fmh/trt`` (shared with engine.infer.backends)."""
    return Path(os.environ.get("FMH_TRT_CACHE", Path.home() / ".cache" / "fmh" / "trt"))


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str      # "9.0"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two keys are equal iff the engine may be reused."""

    onnx_sha256: str
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    input_shape: tuple[int, int, int, int]     # (C, T, H, W)

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EngineKey":
        names = cls.__dataclass_fields__
        kw = {k: d[k] for k in names}
        kw["input_shape"] = tuple(int(v) for v in kw["input_shape"])
        return cls(**kw)


@dataclass(frozen=True)
class EngineResult:
    path: Path
    sidecar: Path
    key: EngineKey
    built: bool          # False: reused from the cache
    reason: str          # why it was built ("" when reused)
    seconds: float = 0.0


class Toolkit(Protocol):
    """What the cache logic needs from TensorRT (a fake one in tests)."""

    def version(self) -> str: ...

    def gpu(self) -> GpuInfo: ...

    def build(self, onnx_bytes: bytes, key: EngineKey, input_name: str,
              calibration: np.ndarray | None, calibration_cache: Path | None) -> bytes: ...


def _gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of a CUDA device (torch, else nvidia-smi)."""
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return GpuInfo(torch.cuda.get_device_name(device), f"{major}.{minor}")
    except Exception:  # noqa: BLE001
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader",
                              f"--id={device}"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        raise ModelError(f"TensorRT: no CUDA GPU found ({TRT_SKIP_REASON})") from None
    if out.returncode != 0 or "," not in out.stdout:
        raise ModelError(f"TensorRT: no CUDA GPU found ({TRT_SKIP_REASON})")
    name, cc = (s.strip() for s in out.stdout.strip().splitlines()[0].rsplit(",", 1))
    return GpuInfo(name, cc)


class TensorRTToolkit:
    """The real TensorRT (>= 10) builder; torch CUDA tensors hold calibration batches."""

    def __init__(self, device: int = 0, workspace_bytes: int = 4 << 30) -> None:
        try:
            import tensorrt as trt
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"TensorRT is not importable ({type(exc).__name__}: {exc}); "
                             f"{TRT_SKIP_REASON}") from None
        self.trt = trt
        self.device = device
        self.workspace_bytes = workspace_bytes
        self._gpu = _gpu_info(device)

    def version(self) -> str:
        return str(self.trt.__version__)

    def gpu(self) -> GpuInfo:
        return self._gpu

    def build(self, onnx_bytes: bytes, key: EngineKey, input_name: str,
              calibration: np.ndarray | None, calibration_cache: Path | None) -> bytes:
        trt = self.trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)            # explicit batch is the only mode in 10.x
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT cannot parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        shape = key.input_shape
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, (key.min_batch, *shape), (key.opt_batch, *shape),
                          (key.max_batch, *shape))
        config.add_optimization_profile(profile)
        if key.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if key.precision == "int8":
            if calibration is None or len(calibration) == 0:
                raise ModelError("INT8 needs calibration clips (preprocessed like serving input)")
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = _make_calibrator(trt, calibration, key, calibration_cache)
            config.set_calibration_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelError(f"TensorRT {self.version()} failed to build a {key.precision} engine "
                             f"on {key.gpu}")
        return bytes(plan)


def _make_calibrator(trt: Any, clips: np.ndarray, key: EngineKey, cache: Path | None):
    import torch

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batch = min(key.max_batch, len(clips))
            self.clips = np.ascontiguousarray(clips, dtype=np.float32)
            self.pos = 0
            self.buf = torch.empty((self.batch, *key.input_shape), dtype=torch.float32,
                                   device="cuda")

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names: Sequence[str]):
            if self.pos + self.batch > len(self.clips):
                return None
            self.buf.copy_(torch.from_numpy(self.clips[self.pos:self.pos + self.batch]))
            self.pos += self.batch
            return [int(self.buf.data_ptr())]

        def read_calibration_cache(self):
            if cache is not None and cache.is_file():
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data) -> None:
            if cache is not None:
                cache.write_bytes(bytes(data))

    return _Calibrator()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def engine_key(onnx_path: str | os.PathLike, *, precision: str = "fp16", max_batch: int = 8,
               opt_batch: int | None = None, toolkit: Toolkit | None = None,
               artefact: ModelArtefact | None = None) -> EngineKey:
    """The cache key for building ``onnx_path`` here with these settings."""
    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if max_batch < 1:
        raise ModelError(f"max_batch {max_batch} must be >= 1")
    opt = max_batch if opt_batch is None else int(opt_batch)
    if not 1 <= opt <= max_batch:
        raise ModelError(f"opt_batch {opt} must be in 1..max_batch={max_batch}")
    art = artefact or ModelArtefact.load(onnx_path)
    tk = toolkit or TensorRTToolkit()
    gpu = tk.gpu()
    return EngineKey(onnx_sha256=art.sha256, tensorrt=tk.version(), gpu=gpu.name,
                     compute_capability=gpu.compute_capability, precision=precision,
                     min_batch=1, opt_batch=opt, max_batch=int(max_batch),
                     input_shape=art.input_shape)


def _plan_path(cache_dir: Path, stem: str, key: EngineKey) -> Path:
    return cache_dir / f"{stem}-{key.precision}-{key.digest()}.plan"


def cached_engine_path(onnx_path: str | os.PathLike, precision: str = "fp16", *,
                       max_batch: int = 8, opt_batch: int | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       toolkit: Toolkit | None = None) -> Path:
    """Where the engine for ``onnx_path`` on this GPU/TensorRT lives in the cache (whether or
    not it has been built). Any change of model, GPU, TensorRT, precision or profile gives
    another path, so a stale engine is never found."""
    key = engine_key(onnx_path, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                     toolkit=toolkit)
    return _plan_path(Path(cache_dir) if cache_dir else engine_cache_dir(), Path(onnx_path).stem,
                      key)


engine_path = cached_engine_path   # the name engine.infer.backends looks for


def check_sidecar(plan: Path, key: EngineKey) -> str:
    """'' if ``plan`` may be run for ``key``, else why not (stale, foreign or corrupt)."""
    side = plan.with_suffix(".json")
    if not plan.is_file():
        return "no engine"
    if not side.is_file():
        return f"engine {plan.name} has no sidecar"
    try:
        info = json.loads(side.read_text())
        stored = EngineKey.from_json(info["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"sidecar {side.name} unreadable ({type(exc).__name__})"
    if info.get("format") != SIDECAR_FORMAT:
        return f"sidecar {side.name} has format {info.get('format')!r}"
    diffs = [f"{f}: {getattr(stored, f)!r} != {getattr(key, f)!r}"
             for f in EngineKey.__dataclass_fields__ if getattr(stored, f) != getattr(key, f)]
    if diffs:
        return "stale engine (" + "; ".join(diffs) + ")"
    if _sha256_bytes(plan.read_bytes()) != info.get("plan_sha256"):
        return f"engine {plan.name} does not match its recorded sha256 (corrupt or replaced)"
    return ""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_engine(onnx_path: str | os.PathLike, *, precision: str = "fp16", max_batch: int = 8,
                 opt_batch: int | None = None, calibration: np.ndarray | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 out: str | os.PathLike | None = None, force: bool = False,
                 toolkit: Toolkit | None = None) -> EngineResult:
    """The engine for ``onnx_path`` on this machine: reused from the cache if its sidecar
    matches the current key, else (re)built.

    Parameters
    ----------
    onnx_path : path
        A model artefact (validated with :class:`ModelArtefact`).
    precision : {"fp16", "fp32", "int8"}
    max_batch, opt_batch : int
        The one optimisation profile: batch 1..max_batch, tuned for opt_batch (default max).
    calibration : ndarray of float32 (n, C, T, H, W), optional
        Preprocessed clips for INT8 calibration.
    cache_dir : path, optional
        Default :func:`engine_cache_dir`.
    out : path, optional
        Also copy the engine (and its sidecar, ``.json``) here.
    force : bool
        Rebuild even if the cached engine is valid.
    toolkit : Toolkit, optional
        Default :class:`TensorRTToolkit` (needs TensorRT and a GPU).

    Raises
    ------
    ModelError
        Bad artefact or settings, no TensorRT/GPU, or a failed build.
    """
    import time
    art = ModelArtefact.load(onnx_path)
    tk = toolkit or TensorRTToolkit()
    key = engine_key(onnx_path, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                     toolkit=tk, artefact=art)
    cache = Path(cache_dir) if cache_dir else engine_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    plan = _plan_path(cache, Path(onnx_path).stem, key)
    reason = "forced rebuild" if force else check_sidecar(plan, key)
    seconds = 0.0
    if reason:
        t0 = time.perf_counter()
        calib_cache = plan.with_suffix(".calib") if precision == "int8" else None
        data = tk.build(Path(onnx_path).read_bytes(), key, art.input_name, calibration,
                        calib_cache)
        seconds = time.perf_counter() - t0
        _write_atomic(plan, data)
        sidecar = {"format": SIDECAR_FORMAT, "key": key.to_json(), "digest": key.digest(),
                   "plan_sha256": _sha256_bytes(data), "onnx": str(Path(onnx_path).resolve()),
                   "model_id": art.model_id, "build_seconds": round(seconds, 3),
                   "input_name": art.input_name, "output_name": art.output_name,
                   # flat copies for readers that do not know the key layout
                   "onnx_sha256": key.onnx_sha256, "tensorrt": key.tensorrt, "gpu": key.gpu,
                   "compute_capability": key.compute_capability, "precision": key.precision}
        _write_atomic(plan.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.resolve() != plan.resolve():
            shutil.copyfile(plan, out)
            shutil.copyfile(plan.with_suffix(".json"), out.with_suffix(".json"))
        plan = out
    return EngineResult(path=plan, sidecar=plan.with_suffix(".json"), key=key,
                        built=bool(reason), reason=reason, seconds=seconds)


def run_engine(plan: str | os.PathLike, clips: np.ndarray, *, key: EngineKey | None = None,
               input_name: str = "clip", output_name: str = "logits") -> np.ndarray:
    """Run a plan on ``clips`` (float32, batch <= the profile's max) with torch CUDA buffers.

    With ``key``, the sidecar is checked first and a stale engine raises ModelError.
    """
    plan = Path(plan)
    if key is not None:
        why = check_sidecar(plan, key)
        if why:
            raise ModelError(f"{plan}: refusing to run: {why}")
    import tensorrt as trt
    import torch
    logger = trt.Logger(trt.Logger.ERROR)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise ModelError(f"{plan}: TensorRT {trt.__version__} cannot deserialise this engine")
    ctx = engine.create_execution_context()
    x = torch.from_numpy(np.ascontiguousarray(clips, dtype=np.float32)).cuda()
    ctx.set_input_shape(input_name, tuple(x.shape))
    out_shape = tuple(ctx.get_tensor_shape(output_name))
    y = torch.empty(out_shape, dtype=torch.float32, device="cuda")
    ctx.set_tensor_address(input_name, int(x.data_ptr()))
    ctx.set_tensor_address(output_name, int(y.data_ptr()))
    stream = torch.cuda.current_stream()
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise ModelError(f"{plan}: TensorRT execution failed")
    stream.synchronize()
    return y.cpu().numpy()

