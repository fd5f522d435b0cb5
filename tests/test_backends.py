"""Inference backends, micro-batching and the logits -> label step."""
import subprocess
import sys

import numpy as np
import pytest

from engine.errors import ModelError
from engine.infer.artefact import ModelArtefact
from engine.infer.backends import (Batcher, Classifier, OnnxRuntimeBackend, TensorRTBackend,
                                   make_backend, softmax)
from engine.infer.preprocess import preprocess
from tests.helpers_model import expected_p_fetal, make_clip, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ModelArtefact.load(make_model(tmp_path_factory.mktemp("m") / "tiny.onnx"))


def _reference_logits(x, gain=4.0, pivot=0.0):
    m = x.astype(np.float64).mean(axis=(1, 2, 3, 4))
    return np.stack([-gain * m + gain * pivot, gain * m - gain * pivot], axis=1)


def test_onnxruntime_matches_reference_and_splits_big_batches(tiny):
    b = make_backend(tiny, "onnxruntime-cpu", max_batch=3, threads=1)
    assert b.name == "onnxruntime" and b.providers == ("CPUExecutionProvider",)
    x = np.random.default_rng(0).random((8, 1, 8, 16, 16), dtype=np.float32)
    out = b.infer(x)                                   # 3 + 3 + 2
    assert out.dtype == np.float32 and out.shape == (8, 2)
    np.testing.assert_allclose(out, _reference_logits(x), rtol=1e-5, atol=1e-5)


def test_fixed_batch_model_is_padded_and_split(tmp_path):
    art = ModelArtefact.load(make_model(tmp_path / "b2.onnx", batch=2))
    b = make_backend(art, "onnxruntime", max_batch=16)
    assert b.fixed_batch == 2 and b.max_batch == 2
    x = np.random.default_rng(1).random((5, 1, 8, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(b.infer(x), _reference_logits(x), rtol=1e-5, atol=1e-5)


def test_wrong_input_shape_is_a_model_error(tiny):
    b = make_backend(tiny, "onnxruntime")
    with pytest.raises(ModelError, match=r"\(N, 1, 8, 16, 16\)"):
        b.infer(np.zeros((2, 1, 8, 16, 15), np.float32))


def test_auto_picks_onnxruntime_here_and_tensorrt_says_what_it_needs(tiny):
    b = make_backend(tiny, "auto")
    assert isinstance(b, OnnxRuntimeBackend)
    if TensorRTBackend.available():                     # pragma: no cover - GPU hosts
        pytest.skip("TensorRT installed: the missing-TensorRT message cannot be checked")
    with pytest.raises(ModelError, match=r"fmh-engine\[gpu\]"):
        make_backend(tiny, "tensorrt")
    with pytest.raises(ModelError, match="unknown backend"):
        make_backend(tiny, "tflite")


def test_end_to_end_probability_matches_the_model_definition(tiny):
    clips = [make_clip(i) for i in range(4)]
    x = preprocess(clips, tiny.meta)
    probs, p, labels = Classifier(tiny.meta)(make_backend(tiny).infer(x))
    np.testing.assert_allclose(p, [expected_p_fetal(c.frames) for c in clips], rtol=1e-5)
    assert labels == ["fetal" if q >= 0.5 else "maternal" for q in p]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_classifier_threshold_override_and_softmax_stability(tiny):
    logits = np.array([[0.0, 0.0], [1000.0, -1000.0], [-3.0, 3.0]], np.float32)
    probs = softmax(logits)
    assert np.isfinite(probs).all() and probs[1, 0] == 1.0
    _, p, labels = Classifier(tiny.meta)(logits)
    assert labels == ["fetal", "maternal", "fetal"]       # p = 0.5 >= 0.5 -> fetal
    _, _, labels = Classifier(tiny.meta, threshold=0.999)(logits)
    assert labels == ["maternal", "maternal", "maternal"]
    with pytest.raises(ModelError, match="shape"):
        Classifier(tiny.meta)(np.zeros((2, 3)))


def test_batcher_full_or_waited():
    b = Batcher(max_batch=3, max_wait_ms=10)
    assert not b.due(0.0) and b.deadline() is None
    b.add("a", 0.0)
    b.add("b", 0.001)
    assert not b.due(0.005) and b.deadline() == pytest.approx(0.010)
    assert b.due(0.011)                                  # waited long enough
    b.add("c", 0.002)
    b.add("d", 0.003)
    assert b.due(0.003)                                  # full
    assert b.take() == ["a", "b", "c"] and len(b) == 1
    assert b.take() == ["d"] and not b.due(1.0)


def test_backends_module_does_not_import_torch():
    code = ("import sys, engine.infer.backends, engine.server, engine.dispatch, engine.wire; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_backend_runs_the_checkpoint_beside_the_artefact(tmp_path):
    torch = pytest.importorskip("torch")
    from export import slowfast_r18
    from export.checkpoints import Checkpoint, save_checkpoint
    from export.slowfast import randomise_
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # a tiny net: thread start-up would dominate
    try:
        model = randomise_(slowfast_r18(width=8, frames=8, alpha=4, crop=32), seed=3).eval()
        ckpt = Checkpoint.from_model(model, trained_on="unit test")
        # The artefact supplies the input spec; the torch backend runs <stem>.pt beside it.
        art = ModelArtefact.load(make_model(tmp_path / "sf.onnx", frames=8, size=32))
        save_checkpoint(tmp_path / "sf.pt", ckpt)
        x = preprocess([make_clip(i, frames=20, size=32) for i in range(3)], art.meta)
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        tb = make_backend(art, "torch", max_batch=2, device="cpu")           # 2 + 1
        assert tb.name == "torch" and tb.providers[1] == "cpu"
        np.testing.assert_allclose(tb.infer(x), ref, rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ModelError, match="no checkpoint"):
        make_backend(art, "torch", checkpoint=str(tmp_path / "missing.pt"))


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_onnxruntime_on_the_cpu(tmp_path):
    """The engine's torch backend on a GPU (``auto`` picks CUDA) against ORT on the CPU, run
    by ``fmh serve`` as any backend is: same artefact, same preprocessed batch."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
    from export import slowfast_r18
    from export.checkpoints import Checkpoint, save_checkpoint
    from export.slowfast import randomise_
    from export.to_onnx import export_onnx
    model = randomise_(slowfast_r18(width=8, frames=8, alpha=4, crop=32), seed=5).eval()
    ckpt = Checkpoint.from_model(model, trained_on="unit test")
    save_checkpoint(tmp_path / "sf.pt", ckpt)
    export_onnx(ckpt, tmp_path / "sf.onnx")
    art = ModelArtefact.load(tmp_path / "sf.onnx")
    x = preprocess([make_clip(i, frames=20, size=32) for i in range(5)], art.meta)
    want = make_backend(art, "onnxruntime-cpu", max_batch=8).infer(x)
    tb = make_backend(art, "torch", max_batch=4)                          # 4 + 1
    assert tb.providers[1] == "cuda", tb.providers
    got = tb.infer(x)
    assert np.abs(got - want).max() <= 1e-3, np.abs(got - want).max()
