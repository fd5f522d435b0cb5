"""Export: ONNX parity and graph shape, metadata round trip, fmh export, TensorRT cache logic."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import onnx
import onnxruntime as ort

from engine.cli import main as fmh  # noqa: E402
from engine.errors import ModelError  # noqa: E402
from engine.infer.artefact import ModelArtefact  # noqa: E402
from engine.infer.preprocess import preprocess  # noqa: E402
from export import slowfast_r18  # noqa: E402
from export.checkpoints import Checkpoint, save_checkpoint  # noqa: E402
from export.slowfast import randomise_  # noqa: E402
from export.to_onnx import FP32_TOLERANCE, export_onnx, reference_clips  # noqa: E402
from export.to_trt import (TRT_SKIP_REASON, EngineKey, GpuInfo, build_engine,  # noqa: E402
                           cached_engine_path, check_sidecar, run_engine, tensorrt_available)
from export.verify import TOLERANCES, compare, verify  # noqa: E402

ALLOWED_OPS = {"Conv", "Relu", "Add", "Concat", "MaxPool", "ReduceMean", "Slice", "Gemm",
               "Constant", "MatMul", "Flatten", "Reshape", "Transpose", "Pad"}


@pytest.fixture(scope="module")
def ckpt():
    model = randomise_(slowfast_r18(width=16), seed=7).eval()     # 32 x 64 x 64 grey
    return Checkpoint.from_model(model, threshold=0.35, trained_on="unit test, random weights",
                                 validation={"sensitivity": 0.79, "specificity": 0.91,
                                             "auc": 0.9, "n_cells": 12, "n_donors": 2})


@pytest.fixture(scope="module")
def small_ckpt():
    model = randomise_(slowfast_r18(width=16, frames=16, alpha=4, crop=32), seed=8).eval()
    return Checkpoint.from_model(model, threshold=0.35, trained_on="unit test")


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    return export_onnx(ckpt, path)


def test_parity_is_measured_and_within_tolerance(exported, ckpt):
    assert exported.opset >= 17
    assert set(exported.per_batch) == {1, 5}
    assert 0 < exported.max_abs_diff <= FP32_TOLERANCE        # > 0: a real comparison happened
    # independent check on fresh clips through the shared preprocessing
    rng = np.random.default_rng(5)
    clips = [rng.integers(0, 255, (n, 64, 80), dtype=np.uint8) for n in (9, 32, 70)]
    x = preprocess(clips, ModelArtefact.load(exported.path))
    sess = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"clip": x})[0]
    with torch.no_grad():
        want = ckpt.build_model()(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - want)) <= FP32_TOLERANCE


def test_graph_has_one_input_and_only_a_dynamic_batch(exported):
    model = onnx.load(str(exported.path))
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    assert [i.name for i in inputs] == ["clip"]
    dims = inputs[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [1, 32, 64, 64]
    out = model.graph.output[0].type.tensor_type.shape.dim
    assert out[0].dim_param and out[1].dim_value == 2
    ops = {n.op_type for n in model.graph.node}
    assert ops <= ALLOWED_OPS, ops - ALLOWED_OPS              # no AdaptiveAvgPool, no Loop/If
    sess = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    for b in (1, 5, 3):
        assert sess.run(None, {"clip": np.zeros((b, 1, 32, 64, 64), np.float32)})[0].shape == (b, 2)


def test_metadata_round_trip(exported, ckpt):
    art = ModelArtefact.load(exported.path)
    m = art.meta
    assert m["format"] == "fmh-model/1"
    assert m["arch"]["name"] == "slowfast_r18" and m["arch"]["alpha"] == 8
    assert m["arch"]["width"] == 16 and m["arch"]["num_classes"] == 2
    assert m["input"] == {"layout": "NCTHW", "channels": 1, "frames": 32, "height": 64,
                          "width": 64, "dtype": "float32", "input_name": "clip",
                          "output_name": "logits"}
    assert m["sampling"] == {"mode": "uniform", "crop": "fixed", "canvas": 64}
    assert m["normalisation"]["mean"] == [0.45] and m["normalisation"]["std"] == [0.225]
    assert m["classes"] == ["maternal", "fetal"] and m["positive_class"] == "fetal"
    assert m["output"] == "logits" and m["threshold"] == 0.35
    assert m["validation"]["sensitivity"] == 0.79 and m["validation"]["n_donors"] == 2
    assert m["trained_on"] == "unit test, random weights"
    assert m["software"].startswith("fmh-engine ") and m["created"][:2] == "20"
    assert art.sha256 == exported.sha256 and art.model_id == exported.model_id


def test_parity_is_enforced(small_ckpt, tmp_path):
    out = tmp_path / "strict.onnx"
    with pytest.raises(ModelError, match="parity failed") as err:
        export_onnx(small_ckpt, out, tolerance=1e-12, check_batches=(1,))
    assert "max |dlogit| 0.000e+00" not in str(err.value)       # a real, non-zero difference
    assert not out.exists() and not (tmp_path / "strict.onnx.tmp").exists()
    with pytest.raises(ModelError, match="opset 16"):
        export_onnx(small_ckpt, out, opset=16)


def test_fmh_export_command(small_ckpt, tmp_path, capsys):
    path = save_checkpoint(tmp_path / "m.pt", small_ckpt)
    onnx_path = tmp_path / "m.onnx"
    assert fmh(["export", str(path), "--onnx", str(onnx_path)]) == 0
    text = capsys.readouterr().out
    assert "max |dlogit|" in text and "fmh.threshold = 0.35" in text
    assert ModelArtefact.load(onnx_path).meta["threshold"] == 0.35
    assert fmh(["export", str(tmp_path / "none.pt"), "--onnx", str(onnx_path)]) == 2
    assert "none.pt" in capsys.readouterr().err
    assert fmh(["export", str(path), "--onnx", str(onnx_path), "--opset", "11"]) == 2
    if not tensorrt_available():            # --trt fails before anything is written
        other = tmp_path / "other.onnx"
        assert fmh(["export", str(path), "--onnx", str(other), "--trt", str(tmp_path / "m.plan")]) == 2
        assert "TensorRT" in capsys.readouterr().err and not other.exists()


def test_verify_reports_ort_row(ckpt, exported):
    rows = verify(ckpt, exported.path, reference=reference_clips(ckpt.config, n=3))
    assert [r.backend for r in rows] == ["onnxruntime"] and rows[0].ok
    assert rows[0].argmax_agree == 1.0
    bad = compare("tensorrt-fp16", np.array([[0.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert not bad.ok and bad.measure == "prob" and TOLERANCES["tensorrt-fp16"][1] == 1e-2


# ---------------------------------------------------------------------------------------------
# TensorRT engine cache (TensorRT abstracted by a fake toolkit: runs everywhere)
# ---------------------------------------------------------------------------------------------

class FakeToolkit:
    def __init__(self, version="10.0.1", gpu=GpuInfo("NVIDIA H100 80GB HBM3", "9.0")):
        self._version, self._gpu, self.builds = version, gpu, []

    def version(self):
        return self._version

    def gpu(self):
        return self._gpu

    def build(self, onnx_bytes, key, input_name, calibration, calibration_cache):
        self.builds.append((key, input_name, None if calibration is None else calibration.shape))
        return b"PLAN:" + json.dumps(key.to_json(), sort_keys=True).encode()


def test_engine_is_cached_and_reused(exported, tmp_path):
    tk = FakeToolkit()
    first = build_engine(exported.path, cache_dir=tmp_path, toolkit=tk)
    assert first.built and first.reason == "no engine" and len(tk.builds) == 1
    key = first.key
    assert (key.onnx_sha256, key.tensorrt, key.gpu, key.compute_capability, key.precision) == \
        (exported.sha256, "10.0.1", "NVIDIA H100 80GB HBM3", "9.0", "fp16")
    assert (key.min_batch, key.opt_batch, key.max_batch, key.input_shape) == (1, 8, 8, (1, 32, 64, 64))
    side = json.loads(first.sidecar.read_text())
    assert side["key"] == key.to_json() and side["onnx_sha256"] == exported.sha256
    again = build_engine(exported.path, cache_dir=tmp_path, toolkit=tk)
    assert not again.built and again.path == first.path and len(tk.builds) == 1
    assert cached_engine_path(exported.path, "fp16", cache_dir=tmp_path, toolkit=tk) == first.path


@pytest.mark.parametrize("change", ["tensorrt", "gpu", "precision", "profile"])
def test_other_settings_get_their_own_engine(exported, tmp_path, change):
    base = build_engine(exported.path, cache_dir=tmp_path, toolkit=FakeToolkit())
    tk = FakeToolkit(version="10.1.0" if change == "tensorrt" else "10.0.1",
                     gpu=GpuInfo("NVIDIA L4", "8.9") if change == "gpu"
                     else GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
    kw = {"precision": "fp32"} if change == "precision" else {}
    if change == "profile":
        kw["max_batch"] = 16
    other = build_engine(exported.path, cache_dir=tmp_path, toolkit=tk, **kw)
    assert other.built and other.path != base.path
    # and the old engine is never acceptable under the new key
    assert "stale engine" in check_sidecar(base.path, other.key)


def test_stale_or_corrupt_engine_is_rebuilt_not_run(exported, tmp_path):
    tk = FakeToolkit()
    res = build_engine(exported.path, cache_dir=tmp_path, toolkit=tk)
    # a sidecar edited to claim another GPU (e.g. a cache copied from another machine)
    side = json.loads(res.sidecar.read_text())
    side["key"]["gpu"] = "NVIDIA A100"
    res.sidecar.write_text(json.dumps(side))
    again = build_engine(exported.path, cache_dir=tmp_path, toolkit=tk)
    assert again.built and "gpu" in again.reason and len(tk.builds) == 2
    # a truncated plan
    res.path.write_bytes(res.path.read_bytes()[:5])
    again = build_engine(exported.path, cache_dir=tmp_path, toolkit=tk)
    assert again.built and "sha256" in again.reason
    # a missing sidecar
    res.sidecar.unlink()
    again = build_engine(exported.path, cache_dir=tmp_path, toolkit=tk)
    assert again.built and "no sidecar" in again.reason
    # refusing to run a stale plan happens before TensorRT is touched
    stale = EngineKey(**{**again.key.__dict__, "tensorrt": "9.0"})
    with pytest.raises(ModelError, match="refusing to run"):
        run_engine(again.path, np.zeros((1, 1, 32, 64, 64), np.float32), key=stale)


def test_engine_copy_and_settings_validation(exported, tmp_path):
    tk = FakeToolkit()
    out = tmp_path / "deploy" / "model.plan"
    res = build_engine(exported.path, cache_dir=tmp_path / "cache", out=out, toolkit=tk,
                       max_batch=4, opt_batch=2)
    assert res.path == out and out.is_file() and out.with_suffix(".json").is_file()
    assert check_sidecar(out, res.key) == ""
    with pytest.raises(ModelError, match="precision"):
        build_engine(exported.path, cache_dir=tmp_path, toolkit=tk, precision="fp8")
    with pytest.raises(ModelError, match="opt_batch"):
        build_engine(exported.path, cache_dir=tmp_path, toolkit=tk, max_batch=4, opt_batch=5)
    calib = np.zeros((3, 1, 32, 64, 64), np.float32)
    build_engine(exported.path, cache_dir=tmp_path, toolkit=tk, precision="int8",
                 calibration=calib)
    assert tk.builds[-1][2] == (3, 1, 32, 64, 64)


# ---------------------------------------------------------------------------------------------
# GPU checks (bench/gpu_check.sh runs these with -m gpu)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
def test_torch_cuda_matches_cpu(ckpt):
    rows = verify(ckpt, None, reference=reference_clips(ckpt.config, n=4), cuda=True)
    assert rows[0].backend == "torch-cuda" and rows[0].ok, rows[0]


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason=TRT_SKIP_REASON)
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_engine_parity(ckpt, exported, tmp_path, precision):
    res = build_engine(exported.path, precision=precision, max_batch=4, cache_dir=tmp_path)
    assert res.built
    rows = verify(ckpt, exported.path, engine=res.path, precision=precision,
                  reference=reference_clips(ckpt.config, n=6))
    assert all(r.ok for r in rows), rows
    again = build_engine(exported.path, precision=precision, max_batch=4, cache_dir=tmp_path)
    assert not again.built
