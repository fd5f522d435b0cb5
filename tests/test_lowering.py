"""3D convolutions written as 2D ones (export.lower_onnx): the same function, another graph."""
import itertools
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.errors import ModelError
from export.lower_onnx import bias_tap, lower_onnx, lower_onnx_file

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from export import slowfast_r18  # noqa: E402
from export.checkpoints import Checkpoint  # noqa: E402
from export.slowfast import randomise_  # noqa: E402
from export.to_onnx import export_onnx  # noqa: E402

CASES = list(itertools.product(
    [(1, 1, 1), (1, 3, 3), (3, 3, 3), (5, 7, 7), (5, 1, 1), (2, 1, 3)],   # kernel (kt, kh, kw)
    [(1, 1, 1), (1, 2, 2), (2, 1, 1), (4, 2, 1)],                         # stride
    [True, False]))                                                       # bias


def _export(module, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load(str(path))


def _run(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("kernel,stride,bias", CASES)
def test_lowered_conv_equals_conv3d(kernel, stride, bias, tmp_path):
    g = torch.Generator().manual_seed(sum(kernel) * 31 + sum(stride) * 7 + bias)
    kt, kh, kw = kernel
    padding = (kt // 2, kh // 2, kw // 2)
    for c_in, c_out, t in ((1, 1, 8), (3, 5, 9), (6, 2, 16)):
        conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias)
        with torch.no_grad():
            fan_in = conv.weight[0].numel()       # outputs of order 1, as in a trained net
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / fan_in ** 0.5)
            if bias:
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
        x = torch.randn((2, c_in, t, 11, 10), generator=g)
        proto = _export(conv, x[:1], tmp_path / "c.onnx")
        lowered, n = lower_onnx(proto)
        spatial = kh * kw > 1                 # 1 x 1 spatial kernels are left as 3D convs
        assert n == int(spatial)
        ops = {nd.op_type for nd in lowered.graph.node}
        assert "Conv" in ops and not ops & {"Shape", "Gather"}
        dims = {i.name: len(i.dims) for i in lowered.graph.initializer}
        assert {dims[nd.input[1]] for nd in lowered.graph.node
                if nd.op_type == "Conv"} == ({4} if spatial else {5})
        onnx.checker.check_model(lowered, full_check=True)
        with torch.no_grad():
            want = conv(x).numpy()
        got = _run(lowered, x.numpy())
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_bias_goes_on_a_tap_that_every_output_reads():
    assert bias_tap(16, 3, 1, 1) == 1           # a "same" conv: the centre tap
    assert bias_tap(32, 5, 2, 2) == 2
    assert bias_tap(8, 1, 1, 0) == 0
    assert bias_tap(4, 3, 1, 2) is None         # every tap reads padding for some output


def test_what_cannot_be_lowered_is_an_error_naming_the_node(tmp_path):
    x = torch.randn(1, 4, 8, 8, 8)
    proto = _export(nn.Conv3d(4, 4, 3, groups=2, padding=1), x, tmp_path / "g.onnx")
    with pytest.raises(ModelError, match="Conv .*groups/dilation"):
        lower_onnx(proto)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="bad.onnx"):
        lower_onnx_file(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.fixture(scope="module")
def ckpt():
    model = randomise_(slowfast_r18(width=8, alpha=2, frames=16, crop=32), seed=3).eval()
    # non-trivial BatchNorm statistics: they are folded into the convolutions by the export
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return Checkpoint.from_model(model, trained_on="unit test")


def test_export_writes_2d_convs_and_says_so(ckpt, tmp_path):
    ranks = {}
    for mode in ("as2d", "none"):
        res = export_onnx(ckpt, tmp_path / f"{mode}.onnx", conv3d=mode, check_batches=(1, 3))
        assert res.max_abs_diff <= 1e-4                 # parity against PyTorch
        proto = onnx.load(str(res.path))
        init = {i.name: len(i.dims) for i in proto.graph.initializer}
        ranks[mode] = {init[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"}
        meta = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(meta["fmh.export"])["conv3d"] == mode
    assert ranks == {"as2d": {4, 5}, "none": {5}}    # as2d: 1x1-spatial convs stay 3D
    with pytest.raises(ModelError, match="conv3d='winograd'"):
        export_onnx(ckpt, tmp_path / "x.onnx", conv3d="winograd")
    assert not (tmp_path / "x.onnx").exists()


def test_lowering_an_exported_file_keeps_outputs_and_metadata(ckpt, tmp_path):
    src = export_onnx(ckpt, tmp_path / "native.onnx", conv3d="none", check_batches=(1,)).path
    res = lower_onnx_file(src, tmp_path / "low.onnx")
    assert res["convs_lowered"] == sum(isinstance(m, nn.Conv3d) and m.kernel_size[1:] != (1, 1)
                                       for m in ckpt.build_model().modules()) > 0
    assert res["max_abs_diff"] <= 1e-4
    a = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    b = {p.key: p.value for p in onnx.load(str(tmp_path / "low.onnx")).metadata_props}
    assert json.loads(b.pop("fmh.export"))["conv3d"] == "as2d"
    a.pop("fmh.export")
    assert a == b
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 32, 32)).astype(np.float32)
    s1 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    s2 = ort.InferenceSession(str(tmp_path / "low.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(s2.run(None, {"clip": x})[0], s1.run(None, {"clip": x})[0],
                               atol=1e-4)


def test_weights_and_biases_reached_through_identity_nodes_are_lowered(tmp_path):
    """The TorchScript exporter shares identical initializers through Identity nodes."""
    from onnx import helper
    conv = nn.Conv3d(2, 3, 3, padding=1, bias=True)
    x = torch.randn(1, 2, 6, 8, 8)
    proto = _export(conv, x, tmp_path / "c.onnx")
    node = next(n for n in proto.graph.node if n.op_type == "Conv")
    for k in (1, 2):                       # weight and bias behind an Identity each
        init = next(i for i in proto.graph.initializer if i.name == node.input[k])
        shared = init.name + "_shared"
        proto.graph.node.insert(0, helper.make_node("Identity", [shared], [init.name]))
        init.name = shared
    lowered, n = lower_onnx(proto)
    assert n == 1
    with torch.no_grad():
        np.testing.assert_allclose(_run(lowered, x.numpy()), conv(x).numpy(), atol=2e-5)
