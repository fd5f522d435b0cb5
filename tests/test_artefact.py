"""Model artefact metadata and the shared preprocessing (both torch-free)."""
import json
import subprocess
import sys

import numpy as np
import pytest

import onnx
from onnx import TensorProto, helper  # noqa: E402

from engine.errors import ModelError  # noqa: E402
from engine.infer.artefact import (REQUIRED_KEYS, ModelArtefact, build_metadata,  # noqa: E402
                                   default_model_path, parse_metadata)
from engine.infer.preprocess import (InputSpec, average_views, fit_canvas,  # noqa: E402
                                     preprocess, resize_bilinear, sample_indices)
from engine.types import CellClip  # noqa: E402


def _meta(**changes):
    kw = dict(arch={"name": "slowfast_r18", "depth": 18, "alpha": 8, "beta_inv": 8, "tau": 8,
                    "fusion_kernel": 5, "num_classes": 2},
              input={"layout": "NCTHW", "channels": 1, "frames": 8, "height": 16, "width": 16,
                     "dtype": "float32", "input_name": "clip", "output_name": "logits"},
              sampling={"mode": "uniform", "crop": "fixed", "canvas": 16},
              normalisation={"scale": 1 / 255, "mean": [0.45], "std": [0.225]},
              classes=["maternal", "fetal"], positive_class="fetal", threshold=0.4,
              validation={"sensitivity": 0.79, "specificity": 0.9, "auc": 0.88, "n_cells": 100,
                          "n_donors": 3},
              trained_on="synthetic PolyNano chip, NOT real cells")
    kw.update(changes)
    return build_metadata(**kw)


def _write_model(path, props, shape=(1, 8, 16, 16), in_name="clip", out_name="logits"):
    """A tiny valid graph: logits = mean over (T, H, W) of the clip times W."""
    x = helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", *shape])
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [shape[0], 2], [1.0, -1.0] * shape[0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [2, 3, 4])
    nodes = [helper.make_node("ReduceMean", [in_name, "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], [out_name])]
    graph = helper.make_graph(nodes, "tiny", [x], [y], [w, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for k, v in props.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(path))
    return path


def test_round_trip_of_every_key(tmp_path):
    props = _meta()
    assert set(props) == set(REQUIRED_KEYS)
    art = ModelArtefact.load(_write_model(tmp_path / "tiny.onnx", props))
    m = art.meta
    assert m["format"] == "fmh-model/1" and m["arch"]["name"] == "slowfast_r18"
    assert m["input"]["frames"] == 8 and m["classes"] == ["maternal", "fetal"]
    assert m["threshold"] == 0.4 and m["validation"]["sensitivity"] == 0.79
    assert m["trained_on"].startswith("synthetic") and m["software"].startswith("fmh-engine")
    assert art.input_shape == (1, 8, 16, 16) and art.positive_index == 1
    assert len(art.sha256) == 64 and art.model_id == f"tiny-{art.sha256[:12]}"
    assert art.raw == props


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_each_missing_key_is_named(tmp_path, key):
    props = _meta()
    del props[key]
    path = _write_model(tmp_path / "m.onnx", props)
    with pytest.raises(ModelError, match=key.replace(".", r"\.")) as err:
        ModelArtefact.load(path)
    assert "m.onnx" in str(err.value) or key == "fmh.format"


@pytest.mark.parametrize("key, value, match", [
    ("fmh.input", "{not json", "fmh.input"),
    ("fmh.format", "fmh-model/9", "fmh.format"),
    ("fmh.threshold", "high", "fmh.threshold"),
    ("fmh.positive_class", "neutrophil", "fmh.positive_class"),
    ("fmh.normalisation", json.dumps({"scale": 1, "mean": [0, 0], "std": [1]}), "mean"),
    ("fmh.output", "probabilities", "fmh.output"),
    ("fmh.arch", json.dumps({"name": "x", "num_classes": 3}), "num_classes"),
])
def test_malformed_values_are_named(tmp_path, key, value, match):
    props = dict(_meta(), **{key: value})
    with pytest.raises(ModelError, match=match):
        ModelArtefact.load(_write_model(tmp_path / "m.onnx", props))


def test_graph_must_match_the_declared_input(tmp_path):
    path = _write_model(tmp_path / "m.onnx", _meta(), shape=(1, 4, 16, 16))
    with pytest.raises(ModelError, match="graph input shape"):
        ModelArtefact.load(path)
    path = _write_model(tmp_path / "n.onnx", _meta(), in_name="x")
    with pytest.raises(ModelError, match="single input 'clip'"):
        ModelArtefact.load(path)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "broken.onnx"
    good = _write_model(tmp_path / "ok.onnx", _meta()).read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    with pytest.raises(ModelError, match="broken.onnx"):
        ModelArtefact.load(bad)
    with pytest.raises(ModelError, match="not found"):
        ModelArtefact.load(tmp_path / "absent.onnx")


def test_bundled_model_location():
    p = default_model_path()
    assert p.name == "demo_model.onnx" and p.parent.name == "data" and \
        p.parent.parent.name == "engine"
    if not p.exists():
        with pytest.raises(ModelError, match="bundled demo model"):
            ModelArtefact.load(None)
    else:
        assert ModelArtefact.load("").path == p


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, engine.infer.artefact, engine.infer.preprocess; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

SPEC = InputSpec(channels=1, frames=8, height=16, width=16, scale=1 / 255, mean=(0.45,),
                 std=(0.225,))


def test_uniform_sampling():
    assert sample_indices(8, 8).tolist() == list(range(8))
    assert sample_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]   # segment centres
    short = sample_indices(3, 8)                                            # repeats frames
    assert short.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    long = sample_indices(1000, 8)
    assert long[0] < 125 and long[-1] >= 875 and np.all(np.diff(long) > 0)
    early, late = sample_indices(40, 8, offset=0.05), sample_indices(40, 8, offset=0.95)
    assert np.all(early < late)


def test_stride_sampling():
    idx = sample_indices(100, 8, mode="stride", stride=2)
    assert np.all(np.diff(idx) == 2) and abs((idx[0] + idx[-1]) / 2 - 49.5) <= 1
    # a window longer than the passage repeats the first and last frames
    assert sample_indices(4, 8, mode="stride", stride=2).tolist() == [0, 0, 0, 1, 3, 3, 3, 3]


def test_normalisation_and_shapes():
    frames = np.full((8, 16, 16), 200, np.uint8)
    frames[:, 0, 0] = 0
    x = preprocess([frames], SPEC)
    assert x.shape == (1, 1, 8, 16, 16) and x.dtype == np.float32
    assert x[0, 0, 0, 1, 1] == pytest.approx((200 / 255 - 0.45) / 0.225, rel=1e-6)
    assert x[0, 0, 0, 0, 0] == pytest.approx(-0.45 / 0.225, rel=1e-6)


def test_grey_is_replicated_to_three_channels_with_per_channel_stats():
    spec = InputSpec(channels=3, frames=8, height=16, width=16, scale=1 / 255,
                     mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3))
    frames = np.full((5, 16, 16), 128, np.uint8)
    x = preprocess([frames], spec)
    assert x.shape == (1, 3, 8, 16, 16)
    for c, (m, s) in enumerate(zip(spec.mean, spec.std)):
        assert np.allclose(x[0, c], (128 / 255 - m) / s, atol=1e-6)


def test_canvas_is_cropped_or_padded_at_fixed_scale():
    big = np.zeros((4, 20, 30), np.uint8)
    big[:, 10, 15] = 255                                   # the centre pixel
    out = fit_canvas(big, 16, 16)
    assert out.shape == (4, 16, 16) and out[0, 8, 8] == 255
    small = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    padded = fit_canvas(small, 16, 16)
    assert padded.shape == (4, 16, 16)
    assert np.array_equal(padded[:, 4:12, 4:12], small)
    assert np.array_equal(padded[:, 0, 4:12], small[:, 0])          # edge replication


def test_resize_mode():
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (2, 32, 1)).astype(np.uint8)
    out = resize_bilinear(ramp, 16, 16)
    assert out.shape == (2, 16, 16) and np.all(np.diff(out[0, 0]) > 0)
    same = resize_bilinear(ramp, 32, 32)
    assert np.allclose(same, ramp)
    spec = InputSpec(**{**SPEC.__dict__, "crop": "resize"})
    assert preprocess([ramp], spec).shape == (1, 1, 8, 16, 16)


def test_multi_view_index_and_averaging():
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (n, 16, 24), dtype=np.uint8) for n in (5, 120)]
    x, index = preprocess(clips, SPEC, views="multi")
    assert x.shape == (60, 1, 8, 16, 16)
    assert index.tolist() == [0] * 30 + [1] * 30
    # spatial views of a wider canvas differ (left / centre / right), temporal views too
    assert not np.array_equal(x[30], x[31]) and not np.array_equal(x[30], x[33])
    single = preprocess(clips, SPEC)
    assert single.shape == (2, 1, 8, 16, 16)
    assert np.array_equal(single[1], preprocess([clips[1][:, :, 4:20]], SPEC)[0])  # centre crop
    scores = np.zeros((60, 2))
    scores[:30, 1] = 1.0
    scores[30:, 0] = np.arange(30)
    avg = average_views(scores, index, 2)
    assert np.allclose(avg, [[0, 1], [14.5, 0]])


def test_deterministic_and_accepts_cellclips_and_raw_metadata():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (13, 16, 16), dtype=np.uint8)
    clip = CellClip(cell_id=1, frames=frames, frame_indices=np.arange(13),
                    centroids=np.zeros((13, 2), np.float32), boxes=np.zeros((13, 4), np.int32),
                    areas=np.zeros(13, np.int32))
    a = preprocess([clip], _meta())             # raw fmh.* strings
    b = preprocess([frames], parse_metadata(_meta()))
    assert np.array_equal(a, b) and np.array_equal(a, preprocess([frames], SPEC))


def test_bad_clips_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        preprocess([np.zeros((4, 16, 16), np.float32)], SPEC)
    with pytest.raises(ValueError, match="shape"):
        preprocess([np.zeros((16, 16), np.uint8)], SPEC)
    with pytest.raises(ValueError, match="views"):
        preprocess([np.zeros((4, 16, 16), np.uint8)], SPEC, views="ten")
    with pytest.raises(ModelError, match="input"):
        preprocess([np.zeros((4, 16, 16), np.uint8)], {"sampling": {}})
