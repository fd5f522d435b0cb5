"""Our checkpoint format and conversion from PySlowFast / PyTorchVideo layouts."""
import pytest

torch = pytest.importorskip("torch")

from engine.errors import ModelError  # noqa: E402
from export import slowfast_r18, slowfast_r50  # noqa: E402
from export.checkpoints import (Checkpoint, convert_state_dict, detect_layout,  # noqa: E402
                                import_checkpoint, load_checkpoint, save_checkpoint, to_layout)
from export.slowfast import randomise_  # noqa: E402

SMALL = dict(width=16, frames=16, alpha=4, crop=32)


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def r18():
    return randomise_(slowfast_r18(**SMALL), seed=1).eval()


@pytest.fixture(scope="module")
def clip():
    return torch.randn(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(3))


def test_round_trip_is_weights_only_and_identical(tmp_path, r18, clip):
    ckpt = Checkpoint.from_model(r18, threshold=0.3, trained_on="unit test",
                                 metrics={"epoch": 3, "loss": 0.25},
                                 validation={"sensitivity": 0.8, "specificity": 0.9})
    path = save_checkpoint(tmp_path / "m.pt", ckpt)
    raw = torch.load(path, weights_only=True)          # plain types only: no pickled objects
    assert raw["format"] == "fmh-checkpoint/1" and raw["config"]["name"] == "slowfast_r18"
    back = load_checkpoint(path)
    assert back.config == r18.config
    assert (back.threshold, back.trained_on, back.classes) == (0.3, "unit test",
                                                               ("maternal", "fetal"))
    assert back.metrics["epoch"] == 3 and back.validation["specificity"] == 0.9
    assert back.normalisation["mean"] == [0.45] and back.sampling["canvas"] == 32
    assert torch.equal(_out(back.build_model(), clip), _out(r18, clip))
    # the named builder loads our checkpoints too
    assert torch.equal(_out(slowfast_r18(weights=path), clip), _out(r18, clip))


def test_numpy_metrics_are_stored_as_plain_numbers(tmp_path, r18):
    import numpy as np
    ckpt = Checkpoint.from_model(r18, metrics={"auc": np.float32(0.75), "n": np.int64(4),
                                               "curve": np.arange(3)})
    back = load_checkpoint(save_checkpoint(tmp_path / "m.pt", ckpt))
    assert back.metrics == {"auc": 0.75, "n": 4, "curve": [0, 1, 2]}


class _NotAllowed:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "fmh-checkpoint/1", "payload": _NotAllowed()}, path)
    with pytest.raises(ModelError, match="weights-only"):
        load_checkpoint(path)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_inconsistent_metadata_is_refused(r18):
    with pytest.raises(ModelError, match="positive_class"):
        Checkpoint.from_model(r18, positive_class="other")
    with pytest.raises(ModelError, match="class names"):
        Checkpoint.from_model(r18, classes=("a", "b", "c"))


@pytest.mark.parametrize("layout, wrap, prefix", [
    ("pytorchvideo", "model_state", ""),
    ("pyslowfast", "model_state", "module."),
    ("pytorchvideo", None, ""),
])
def test_foreign_layouts_convert_to_identical_outputs(layout, wrap, prefix, r18, clip):
    foreign = {prefix + k: v for k, v in to_layout(r18.state_dict(), layout).items()}
    assert not any(k.startswith("stem_") for k in foreign)
    data = {wrap: foreign, "epoch": 10} if wrap else foreign
    assert detect_layout({k[len(prefix):]: v for k, v in foreign.items()}) == layout
    ckpt, report = import_checkpoint(data, in_channels=None, alpha=4, frames=16, crop=32)
    assert report.layout == layout and not report.folded_grey
    assert ckpt.config == r18.config
    assert torch.equal(_out(ckpt.build_model(), clip), _out(r18, clip))


def test_r50_pytorchvideo_names_and_conversion():
    model = randomise_(slowfast_r50(width=16, frames=16, alpha=4, crop=32), seed=2).eval()
    ptv = to_layout(model.state_dict(), "pytorchvideo")
    # names as PyTorchVideo's create_slowfast writes them
    for key in ("blocks.0.multipathway_blocks.1.conv.weight",
                "blocks.0.multipathway_fusion.conv_fast_to_slow.weight",
                "blocks.1.multipathway_blocks.0.res_blocks.0.branch1_conv.weight",
                "blocks.3.multipathway_blocks.1.res_blocks.5.branch2.norm_c.running_var",
                "blocks.4.multipathway_blocks.0.res_blocks.2.branch2.conv_b.weight",
                "blocks.6.proj.bias"):
        assert key in ptv, key
    psf = to_layout(model.state_dict(), "pyslowfast")
    for key in ("s1.pathway1_stem.bn.running_mean", "s1_fuse.conv_f2s.weight",
                "s2.pathway0_res0.branch1_bn.weight", "s4.pathway1_res5.branch2.c_bn.bias",
                "s4_fuse.bn.weight", "head.projection.weight"):
        assert key in psf, key
    cfg, sd, _ = convert_state_dict({"model_state": psf}, alpha=4, frames=16, crop=32)
    assert cfg.depth == 50 and cfg.width == 16
    rebuilt = slowfast_r50(width=16, frames=16, alpha=4, crop=32)
    rebuilt.load_state_dict(sd)
    x = torch.randn(1, 1, 16, 32, 32)
    assert torch.equal(_out(rebuilt, x), _out(model, x))


def test_missing_and_unexpected_keys_are_named(r18):
    ptv = to_layout(r18.state_dict(), "pytorchvideo")
    gone = "blocks.2.multipathway_blocks.1.res_blocks.1.branch2.conv_a.weight"
    partial = {k: v for k, v in ptv.items() if k != gone}
    with pytest.raises(ModelError, match=r"missing keys: stages\.1\.fast\.1\.conv_a\.weight"):
        convert_state_dict(partial, alpha=4, frames=16, crop=32)
    extra = dict(ptv, **{"blocks.0.multipathway_blocks.0.extra_layer.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match="extra_layer"):
        convert_state_dict(extra, alpha=4, frames=16, crop=32)
    wrong = dict(ptv)
    wrong["blocks.6.proj.bias"] = torch.zeros(5)
    with pytest.raises(ModelError, match="head.proj"):
        convert_state_dict(wrong, alpha=4, frames=16, crop=32)


def test_unknown_layout_is_refused():
    with pytest.raises(ModelError, match="layout"):
        detect_layout({"conv1.weight": torch.zeros(1)})


def test_rgb_stems_fold_to_grey(clip):
    rgb = randomise_(slowfast_r18(in_channels=3, **SMALL), seed=4).eval()
    data = {"model_state": to_layout(rgb.state_dict(), "pyslowfast")}
    ckpt, report = import_checkpoint(data, in_channels=1, alpha=4, frames=16, crop=32)
    assert report.folded_grey and ckpt.config.in_channels == 1
    grey = ckpt.build_model()
    assert grey.stem_slow.conv.weight.shape[1] == 1
    got = _out(grey, clip)
    want = _out(rgb, clip.repeat(1, 3, 1, 1, 1))        # the grey image on all three channels
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="only RGB -> grey"):
        convert_state_dict(to_layout(grey.state_dict(), "pyslowfast"), in_channels=3,
                           alpha=4, frames=16, crop=32)


def test_new_head_only_when_asked(r18, tmp_path):
    kinetics = randomise_(slowfast_r18(num_classes=400, **SMALL))
    data = to_layout(kinetics.state_dict(), "pytorchvideo")
    with pytest.raises(ModelError, match="reset_head"):
        import_checkpoint(data, num_classes=2, alpha=4, frames=16, crop=32)
    ckpt, report = import_checkpoint(data, num_classes=2, reset_head=True, alpha=4, frames=16,
                                     crop=32)
    assert report.dropped_head == ("head.proj.bias", "head.proj.weight")
    assert ckpt.config.num_classes == 2 and ckpt.classes == ("maternal", "fetal")
    model = ckpt.build_model()
    assert torch.equal(model.stages[2]["slow"][1].conv_b.weight,
                       kinetics.stages[2]["slow"][1].conv_b.weight)


def test_foreign_file_needs_conversion_hint(tmp_path, r18):
    path = tmp_path / "SLOWFAST_8x8_R50.pyth"
    torch.save({"model_state": to_layout(r18.state_dict(), "pyslowfast"), "epoch": 1,
                "cfg": "TRAIN:\n  ENABLE: True\n"}, path)
    with pytest.raises(ModelError, match="pyslowfast checkpoint: convert it"):
        load_checkpoint(path)
    ckpt, report = import_checkpoint(path, alpha=4, frames=16, crop=32)
    assert report.layout == "pyslowfast"
