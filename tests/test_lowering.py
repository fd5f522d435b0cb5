"""3D convolutions written as 2D ones (export.lowering): the same function, another graph."""
import itertools
import json

import pytest

torch = pytest.importorskip("torch")
import onnx  # noqa: E402
from torch import nn  # noqa: E402

from engine.errors import ModelError  # noqa: E402
from export import slowfast_r18  # noqa: E402
from export.checkpoints import Checkpoint  # noqa: E402
from export.lowering import Conv3dAs2d, fold_batchnorm, lower_conv3d  # noqa: E402
from export.slowfast import randomise_  # noqa: E402
from export.to_onnx import export_onnx  # noqa: E402

CASES = list(itertools.product(
    [(1, 1, 1), (1, 3, 3), (3, 3, 3), (5, 7, 7), (5, 1, 1), (2, 1, 3)],   # kernel (kt, kh, kw)
    [(1, 1, 1), (1, 2, 2), (2, 1, 1), (4, 2, 1)],                         # stride
    [True, False]))                                                       # bias


@pytest.mark.parametrize("kernel,stride,bias", CASES)
def test_conv3d_as_2d_equals_conv3d(kernel, stride, bias):
    g = torch.Generator().manual_seed(hash((kernel, stride, bias)) % 2 ** 31)
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
        low = Conv3dAs2d(conv, tuple(x.shape[1:]))
        with torch.no_grad():
            want, got = conv(x), low(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_conv3d_as_2d_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="groups=2"):
        Conv3dAs2d(nn.Conv3d(4, 4, 3, groups=2), (4, 8, 8, 8))
    with pytest.raises(ValueError, match="dilation"):
        Conv3dAs2d(nn.Conv3d(4, 4, 3, dilation=2), (4, 8, 8, 8))
    with pytest.raises(ValueError, match="input channels"):
        Conv3dAs2d(nn.Conv3d(4, 4, 3), (3, 8, 8, 8))


@pytest.fixture(scope="module")
def net():
    model = randomise_(slowfast_r18(width=8, alpha=2, frames=16, crop=32), seed=3).eval()
    # non-trivial BatchNorm statistics, so that folding them is really tested
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def test_fold_batchnorm_keeps_the_function(net):
    import copy
    x = torch.randn(2, 1, 16, 32, 32)
    folded = copy.deepcopy(net)
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    assert fold_batchnorm(folded) == n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


def test_lowered_network_is_the_same_function(net):
    x = torch.randn(3, 1, 16, 32, 32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    low = lower_conv3d(net, x[:1])
    assert not any(isinstance(m, nn.Conv3d) for m in low.modules())
    assert sum(isinstance(m, Conv3dAs2d) for m in low.modules()) == sum(
        isinstance(m, nn.Conv3d) for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(low(x), net(x), atol=1e-5, rtol=1e-5)
    # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())


def test_export_writes_2d_convs_and_says_so(net, tmp_path):
    ckpt = Checkpoint.from_model(net, trained_on="unit test")
    ranks = {}
    for mode in ("as2d", "none"):
        res = export_onnx(ckpt, tmp_path / f"{mode}.onnx", conv3d=mode, check_batches=(1, 3))
        assert res.max_abs_diff <= 1e-4
        proto = onnx.load(str(res.path))
        init = {i.name: len(i.dims) for i in proto.graph.initializer}
        ranks[mode] = {init[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"}
        meta = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(meta["fmh.export"])["conv3d"] == mode
        assert not {n.op_type for n in proto.graph.node} & {"Shape", "Gather", "Pad"}
    assert ranks == {"as2d": {4}, "none": {5}}
    with pytest.raises(ModelError, match="conv3d='winograd'"):
        export_onnx(ckpt, tmp_path / "x.onnx", conv3d="winograd")
    assert not (tmp_path / "x.onnx").exists()
