"""The SlowFast written on frames (export.frame_major) and the INT8 export (export.quantize):
the same function as the model, graphs without 3D convolutions or layout changes, an INT8 file
whose measured deviation from PyTorch is what it reports, and `fmh export --int8-onnx`."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from engine.cli import main as fmh  # noqa: E402
from engine.clipstore import ClipStoreWriter  # noqa: E402
from engine.errors import ModelError  # noqa: E402
from engine.infer.artefact import ModelArtefact  # noqa: E402
from engine.infer.backends import make_backend  # noqa: E402
from engine.infer.preprocess import preprocess  # noqa: E402
from engine.types import CellClip  # noqa: E402
from export import slowfast_r18, slowfast_r50  # noqa: E402
from export.checkpoints import Checkpoint, save_checkpoint  # noqa: E402
from export.frame_major import TAPS, FrameMajor  # noqa: E402
from export.quantize import calibration_from_stores, quantize_int8  # noqa: E402
from export.slowfast import randomise_  # noqa: E402
from export.to_onnx import export_onnx, metadata_for, reference_clips  # noqa: E402

ARCHS = [
    (slowfast_r18, dict(width=16, frames=16, alpha=4, crop=32)),
    (slowfast_r18, dict(width=8, frames=12, alpha=2, beta_inv=4, fusion_kernel=7, crop=48)),
    (slowfast_r50, dict(width=16, frames=8, alpha=4, crop=32)),
]


@pytest.mark.parametrize("taps", TAPS)
@pytest.mark.parametrize("build,kw", ARCHS, ids=["r18", "r18-a2-k7", "r50"])
def test_frame_major_computes_the_same_function(build, kw, taps):
    model = randomise_(build(**kw), seed=3).eval()
    x = torch.randn(3, *model.config.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        got = FrameMajor(model, taps)(x)
    assert got.shape == want.shape
    assert torch.max(torch.abs(got - want)) <= 1e-4 * max(1.0, float(want.abs().max()))
    with pytest.raises(ValueError, match="taps='sideways'"):
        FrameMajor(model, "sideways")


def test_frame_major_sees_changes_to_the_model():
    model = randomise_(slowfast_r18(width=16, frames=16, alpha=4, crop=32), seed=1).eval()
    fm = FrameMajor(model)
    x = torch.randn(2, *model.config.input_shape)
    with torch.no_grad():
        before = fm(x)
        model.stages[1]["fast"][0].bn_a.running_mean += 0.5        # reads the live modules
        assert torch.allclose(fm(x), model(x), atol=1e-5)
        assert not torch.allclose(fm(x), before, atol=1e-3)


@pytest.fixture(scope="module")
def ckpt():
    model = randomise_(slowfast_r18(width=16, frames=16, alpha=4, crop=32), seed=8).eval()
    return Checkpoint.from_model(model, threshold=0.4, trained_on="unit test, random weights")


def test_frames_export_has_2d_convs_and_no_layout_changes(ckpt, tmp_path):
    res = export_onnx(ckpt, tmp_path / "f.onnx", conv3d="frames", check_batches=(1, 3))
    assert res.max_abs_diff <= 1e-4
    proto = onnx.load(str(res.path))
    init = {i.name: len(i.dims) for i in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    assert {init[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"} == {4}
    live = {"clip"}                                     # tensors computed from the input
    for n in proto.graph.node:                          # (nodes are in topological order)
        if live & set(n.input):
            live.update(n.output)
    moved = [n for n in proto.graph.node if n.op_type == "Transpose" and live & set(n.input)]
    assert len(moved) == 1 and moved[0].input == ["clip"]    # the input's (C, T) swap only
    assert "BatchNormalization" not in ops              # folded into the convolutions
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["fmh.export"])["conv3d"] == "frames"


def _blob_clips(n, t=20, size=40, seed=0):
    """Dark discs crossing a noisy bright canvas, smaller and more squeezed for half of them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        r0 = 6.0 if i % 2 else 9.0
        frames = np.empty((t, size, size), np.uint8)
        for k in range(t):
            sq = 1.0 + (0.6 if i % 2 else 0.2) * np.sin(np.pi * k / (t - 1))
            cx = size * (0.2 + 0.6 * k / (t - 1))
            inside = ((xx - cx) / (r0 * sq)) ** 2 + ((yy - size / 2) * sq / r0) ** 2 <= 1
            img = 150.0 + rng.normal(0, 3, (size, size))
            img[inside] -= 60
            frames[k] = np.clip(img, 0, 255).astype(np.uint8)
        out.append(frames)
    return out


def _write_store(path, clips, donor="d1"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with ClipStoreWriter(path, {"donor": donor, "label": "maternal"}) as w:
        for i, f in enumerate(clips):
            t = len(f)
            w.append(CellClip(cell_id=i, frames=f, frame_indices=np.arange(t, dtype=np.int64),
                              centroids=np.zeros((t, 2), np.float32),
                              boxes=np.zeros((t, 4), np.int32), areas=np.full(t, 200, np.int32)))
    return path


@pytest.fixture(scope="module")
def calib(ckpt):
    return preprocess(_blob_clips(24, seed=1), metadata_for(ckpt))


def test_int8_file_reports_its_real_deviation_and_runs_in_the_engine(ckpt, calib, tmp_path):
    check = preprocess(_blob_clips(12, seed=2), metadata_for(ckpt))
    res = quantize_int8(ckpt, tmp_path / "q.onnx", calib, check=check, prob_tolerance=0.5)
    proto = onnx.load(str(res.path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    init = {i.name: i for i in proto.graph.initializer}
    conv_w = [n.input[1] for n in proto.graph.node if n.op_type == "Conv"]
    # every convolution reads a dequantized 8-bit 4-D weight
    producers = {o: n for n in proto.graph.node for o in n.output}
    for w in conv_w:
        dq = producers[w]
        assert dq.op_type == "DequantizeLinear" and init[dq.input[0]].data_type == onnx.TensorProto.INT8
        assert len(init[dq.input[0]].dims) == 4
    exp = json.loads({p.key: p.value for p in proto.metadata_props}["fmh.export"])
    assert exp["precision"] == "int8" and exp["quantization"]["calibration_clips"] == 24
    assert exp["check"]["clips"] == 12

    # the reported deviation is the real one, measured here independently
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"clip": check})[0]
    with torch.no_grad():
        want = ckpt.build_model()(torch.from_numpy(check)).numpy()

    def p1(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True))[:, 1]
    dp = np.abs(p1(got) - p1(want))
    assert res.max_prob_diff == pytest.approx(dp.max(), abs=1e-6)
    assert 0 < res.max_prob_diff <= 0.5                  # > 0: it is really 8-bit arithmetic
    assert res.decisions_changed == int(np.sum((p1(got) >= 0.4) != (p1(want) >= 0.4)))
    # what the INT8 file computes is close to the fp32 network on clips like its calibration
    assert np.corrcoef(got[:, 1] - got[:, 0], want[:, 1] - want[:, 0])[0, 1] > 0.9

    art = ModelArtefact.load(res.path)                 # the runtime reads it like any model
    backend = make_backend(art, "onnxruntime-cpu", max_batch=4)
    logits = backend.infer(check[:5])                  # two calls of at most 4 clips
    np.testing.assert_allclose(logits, got[:5], atol=1e-4)


def test_int8_beyond_tolerance_or_bad_clips_writes_nothing(ckpt, calib, tmp_path):
    out = tmp_path / "q.onnx"
    with pytest.raises(ModelError, match="INT8 check failed") as err:
        quantize_int8(ckpt, out, calib, prob_tolerance=1e-9)
    assert "max |dp(fetal)| 0.0000" not in str(err.value)
    assert not out.exists() and not (tmp_path / "q.onnx.tmp").exists()
    with pytest.raises(ModelError, match=r"shape \(4, 1, 16, 64, 64\)"):
        quantize_int8(ckpt, out, np.zeros((4, 1, 16, 64, 64), np.float32))
    bad = calib.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ModelError, match="non-finite"):
        quantize_int8(ckpt, out, bad)
    with pytest.raises(ModelError, match="method 'best'"):
        quantize_int8(ckpt, out, calib, method="best")
    assert not out.exists()


def test_calibration_clips_come_from_stores_through_the_shared_preprocessing(ckpt, tmp_path):
    clips = _blob_clips(7, t=11, seed=4)
    _write_store(tmp_path / "a" / "clips.h5", clips[:4], "a")
    _write_store(tmp_path / "b.h5", clips[4:], "b")
    meta = metadata_for(ckpt)
    x = calibration_from_stores([tmp_path / "a", tmp_path / "b.h5"], meta, n=100)
    assert x.shape == (7, *ckpt.config.input_shape) and x.dtype == np.float32
    want = preprocess(clips, meta)                       # all 7 clips, in store order
    np.testing.assert_array_equal(np.sort(x.reshape(7, -1), 0), np.sort(want.reshape(7, -1), 0))
    assert len(calibration_from_stores([tmp_path / "a"], meta, n=3)) == 3
    with pytest.raises(ModelError, match="no clip store"):
        calibration_from_stores([tmp_path / "nowhere"], meta)


def test_fmh_export_int8(ckpt, tmp_path, capsys):
    path = save_checkpoint(tmp_path / "m.pt", ckpt)
    _write_store(tmp_path / "runs" / "d1" / "clips.h5", _blob_clips(16, seed=5))
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    assert fmh(["export", str(path), "--onnx", str(fp32)]) == 0
    capsys.readouterr()
    args = ["export", str(path), "--onnx", str(fp32), "--int8-onnx", str(int8)]
    assert fmh(args) == 2                                       # no calibration clips
    assert "--int8-onnx needs --calibration" in capsys.readouterr().err
    assert fmh(args + ["--calibration", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err and not int8.exists()
    assert fmh(args + ["--calibration", str(tmp_path / "runs" / "d1"), "--calibration-clips",
                       "6", "--int8-tolerance", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "calibrating on 6 clips, checking on 6" in out and "INT8" in out
    meta = ModelArtefact.load(int8).meta
    assert meta["threshold"] == pytest.approx(0.4)
    assert "INT8 copy" in meta["trained_on"] and "fp32 model's" in meta["trained_on"]
    np.save(tmp_path / "c.npy", reference_clips(ckpt.config, n=3))
    int8.unlink()
    assert fmh(["export", str(path), "--onnx", str(int8), "--int8-onnx", str(int8),
                "--calibration", str(tmp_path / "c.npy")]) == 2          # one file for both
    assert "is the --onnx file" in capsys.readouterr().err
    assert fmh(["export", str(path), "--onnx", str(fp32), "--calibration",
                str(tmp_path / "c.npy")]) == 2                           # nothing uses them
    assert "--calibration is for --int8-onnx" in capsys.readouterr().err
    np.save(tmp_path / "wrong.npy", np.zeros((2, 1, 8, 32, 32), np.float32))
    other = tmp_path / "other.onnx"
    assert fmh(["export", str(path), "--onnx", str(other), "--int8-onnx", str(int8),
                "--calibration", str(tmp_path / "wrong.npy")]) == 2
    assert "shape (2, 1, 8, 32, 32)" in capsys.readouterr().err
    assert not other.exists() and not int8.exists()          # checked before any writing
    assert fmh(args + ["--calibration", str(tmp_path / "c.npy"), "--int8-tolerance", "1e-9"]) == 2
    assert "INT8 check failed" in capsys.readouterr().err and not int8.exists()


def test_calibration_ranges_cover_every_batch(ckpt, calib, tmp_path):
    """Calibration runs batch by batch (memory); the ranges must still span all the clips:
    the input's 8-bit scale follows a bright clip placed in the last batch only."""
    big = np.concatenate([calib, calib, calib[:5] * 1.0])      # 53 clips: 2 batches of 32
    big[-1] *= 6.0
    res = quantize_int8(ckpt, tmp_path / "q.onnx", big, check=calib, prob_tolerance=1.0)
    proto = onnx.load(str(res.path))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    # the 8-bit inputs of the stems: the clip's values moved by layout ops only
    raw, scales = {"clip"}, []
    for n in proto.graph.node:
        if n.input and n.input[0] in raw:
            if n.op_type in ("Transpose", "Reshape", "Slice", "Pad", "Concat"):
                raw.update(n.output)
            elif n.op_type == "QuantizeLinear":
                scales.append(float(init[n.input[1]]))
    lo, hi = min(float(big.min()), 0.0), max(float(big.max()), 0.0)
    assert scales and max(scales) == pytest.approx((hi - lo) / 255, rel=1e-3)
