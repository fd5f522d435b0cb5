"""SlowFast architecture: parameter counts against PyTorchVideo, one input, adaptive head."""
import pytest

torch = pytest.importorskip("torch")

from export import (SlowFastConfig, count_parameters, flops_per_clip, slowfast_r18,  # noqa: E402
                    slowfast_r50, slowfast_r101)
from export.slowfast import build_from_meta, build_slowfast, randomise_  # noqa: E402

# PyTorchVideo's create_slowfast settings: RGB, alpha 4, beta 1/8, 8 slow / 32 fast frames,
# 224 x 224, fusion kernel 7.
PTV = dict(in_channels=3, alpha=4, beta_inv=8, frames=32, crop=224, fusion_kernel=7)


@pytest.mark.parametrize("builder, classes, expected", [
    (slowfast_r50, 400, 34_566_488),
    (slowfast_r50, 2, 33_649_098),
    (slowfast_r101, 400, 62_913_240),
    (slowfast_r101, 2, 61_995_850),
])
def test_parameter_counts_equal_pytorchvideo(builder, classes, expected):
    with torch.device("meta"):
        model = builder(num_classes=classes, **PTV)
    assert count_parameters(model) == expected


def test_r18_runs_on_grey_64px_clips():
    model = slowfast_r18().eval()          # defaults: 1 channel, 32 frames, 64 x 64, 2 classes
    assert model.config.input_shape == (1, 32, 64, 64)
    x = torch.randn(2, 1, 32, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 2) and torch.isfinite(y).all()


def test_slow_pathway_is_every_alpha_th_frame_of_the_one_input():
    model = randomise_(slowfast_r18(width=16, alpha=4, frames=16, crop=32)).eval()
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0]
        return hook
    model.stem_slow.register_forward_hook(keep("slow"))
    model.stem_fast.register_forward_hook(keep("fast"))
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        model(x)
    assert torch.equal(seen["slow"], x[:, :, ::4])
    assert torch.equal(seen["fast"], x)


def test_head_adapts_to_input_size_with_the_same_weights():
    small = randomise_(slowfast_r18(width=16, crop=64)).eval()
    large = slowfast_r18(width=16, crop=96)
    large.load_state_dict(small.state_dict())   # no weight depends on the crop
    with torch.no_grad():
        y = large.eval()(torch.randn(2, 1, 32, 96, 96))
    assert y.shape == (2, 2)
    names = {type(m).__name__ for m in small.modules()}
    assert "AdaptiveAvgPool3d" not in names and "AvgPool3d" not in names


def test_head_is_a_global_mean_per_pathway():
    model = randomise_(slowfast_r18(width=16, crop=32, frames=16, alpha=4)).eval()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        slow, fast = model.pathway_features(x)
        pooled = torch.cat([slow.mean((2, 3, 4)), fast.mean((2, 3, 4))], 1)
        expected = model.head.proj(pooled)
        assert torch.allclose(model(x), expected, atol=1e-6)
    # the Fast pathway keeps alpha times the Slow frames and 1/beta of the channels
    assert fast.shape[2] == 4 * slow.shape[2]
    assert model.head.proj.in_features == slow.shape[1] + fast.shape[1]


def test_wrong_input_shape_is_rejected_with_the_shapes():
    model = slowfast_r18(width=16).eval()
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 64, 64\)"):
        model(torch.zeros(1, 1, 30, 64, 64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(frames=30), "multiple of alpha"),
    (dict(fusion_kernel=4), "odd"),
    (dict(depth=34), "depth"),
    (dict(crop=16), "crop"),
    (dict(num_classes=0), "num_classes"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlowFastConfig(**kwargs)


def test_builders_take_kwargs_and_config_round_trips():
    with torch.device("meta"):
        m = slowfast_r50(num_classes=3, in_channels=3, alpha=4, beta_inv=8, fusion_kernel=7,
                         tau=16, frames=32, crop=224)
    cfg = m.config
    assert (cfg.depth, cfg.num_classes, cfg.alpha, cfg.tau, cfg.fusion_kernel) == (50, 3, 4, 16, 7)
    assert SlowFastConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["name"] == "slowfast_r50"
    with torch.device("meta"):
        assert build_slowfast(cfg.to_dict()).config == cfg
        assert build_from_meta(cfg.to_dict()).config == cfg
    with pytest.raises(ValueError, match="does not match"):
        SlowFastConfig.from_dict({**cfg.to_dict(), "name": "slowfast_r18"})


def test_fusion_and_stage_widths_follow_beta_and_ratio():
    with torch.device("meta"):
        m = slowfast_r50(**PTV)
    # fusion after the stem: 8 fast channels -> 16, kernel 7 x 1 x 1, stride alpha
    conv = m.fusions[0].conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == \
        (8, 16, (7, 1, 1), (4, 1, 1))
    assert len(m.fusions) == 4                       # after stem, res2, res3, res4
    assert m.stages[0]["slow"][0].conv_a.in_channels == 64 + 16
    assert m.stages[3]["slow"][0].conv_c.out_channels == 2048
    assert m.stages[3]["fast"][0].conv_c.out_channels == 256
    assert m.head.proj.in_features == 2048 + 256


def test_flops_counted_per_clip():
    small = flops_per_clip(slowfast_r18(width=16))
    big = flops_per_clip(slowfast_r18(width=32))
    assert 0 < small < big
