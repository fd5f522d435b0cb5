"""Evaluation metrics against hand-computed values; Grad-CAM; fmh evaluate end to end."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from train.evaluate import (binary_metrics, confusion, per_donor, roc_auc,  # noqa: E402
                            threshold_for_sensitivity, write_report)


def test_confusion_sensitivity_specificity_by_hand():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.4, 0.6, 0.1, 0.7, 0.2, 0.3, 0.55, 0.05]
    m = binary_metrics(y, p, 0.5)
    # fetal: 0.9 0.8 0.6 called fetal, 0.4 missed -> TP 3, FN 1
    # maternal: 0.7 0.55 called fetal -> FP 2, TN 4
    assert m["confusion"]["matrix"] == [[4, 2], [1, 3]]
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["top1_error"] == pytest.approx(3 / 10)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 4 / 6) / 2)
    assert m["precision_fetal"] == pytest.approx(3 / 5)
    # AUC: pairs (fetal, maternal) with fetal scored higher, by hand:
    # 0.9 beats 6, 0.8 beats 6, 0.6 beats 5 (not 0.7), 0.4 beats 4 (0.1 0.2 0.3 0.05) -> 21/24
    assert m["auc"] == pytest.approx(21 / 24)
    np.testing.assert_array_equal(confusion([0, 1, 1], [1, 1, 0]), [[0, 1], [1, 1]])


def test_auc_ties_and_degenerate():
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0


def test_threshold_for_target_sensitivity():
    y = [1, 1, 1, 1, 0, 0, 0]
    p = [0.9, 0.7, 0.5, 0.2, 0.6, 0.3, 0.1]
    t = threshold_for_sensitivity(y, p, 0.75)     # three of four fetal cells: 0.5 must pass
    assert 0.3 < t <= 0.5                          # halfway to the next lower score (0.3)
    assert t == pytest.approx(0.4)
    assert binary_metrics(y, p, t)["sensitivity"] >= 0.75
    assert binary_metrics(y, p, threshold_for_sensitivity(y, p, 1.0))["sensitivity"] == 1.0
    assert threshold_for_sensitivity([0, 0], [0.2, 0.3], 0.9) == 0.5


def test_per_donor_and_report(tmp_path):
    d = ["a", "a", "b", "b", "b"]
    y = [1, 1, 0, 0, 0]
    p = [0.9, 0.2, 0.1, 0.8, 0.3]
    rows = per_donor(d, y, p, 0.5)
    assert rows[0] == {"donor": "a", "label": "fetal", "n_cells": 2, "accuracy": 0.5,
                       "fetal_fraction_called": 0.5, "mean_p_fetal": pytest.approx(0.55)}
    assert rows[1]["accuracy"] == pytest.approx(2 / 3)
    m = binary_metrics(y, p, 0.5)
    m["at_0.5"] = {}
    m["per_donor"] = rows
    rep = {"model": "m.pt", "stores": ["x"], "n_donors": 2, "cells_per_class": {"fetal": 2},
           "threshold": 0.5, "mask_cell": False, "views": {"single": m}}
    jp, mp = write_report(rep, tmp_path)
    assert json.loads(jp.read_text())["views"]["single"]["confusion"]["matrix"] == [[2, 1], [1, 1]]
    assert "| maternal | 2 | 1 |" in mp.read_text()


def test_gradcam_maps_and_png(tmp_path):
    import cv2
    from export.slowfast import slowfast_r18
    from train.baselines import FrameCNN
    from train.gradcam import gradcam, save_strip
    torch.manual_seed(0)
    model = slowfast_r18(width=8, frames=8, crop=32).eval()
    for p in model.parameters():          # zero-initialised BNs make the gradients vanish
        if p.dim() == 1:
            torch.nn.init.uniform_(p, 0.5, 1.0)
    with torch.no_grad():                 # class 0's score grows with every feature
        model.head.proj.weight[0].fill_(1.0)
    x = torch.randn(1, 1, 8, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps, probs = gradcam(model, x, target=0)
    assert set(maps) == {"slow", "fast"}
    for cam in maps.values():
        assert cam.shape == (8, 32, 32) and cam.dtype == np.float32
        assert 0 <= cam.min() and cam.max() <= 1 and cam.max() > 0
    assert probs.shape == (2,) and probs.sum() == pytest.approx(1, abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    frames = (np.random.default_rng(0).random((8, 32, 32)) * 255).astype(np.uint8)
    path = save_strip(frames, maps, tmp_path / "cam.png", n=4)
    img = cv2.imread(str(path))
    assert img.shape == (3 * 32 * 2, 4 * 32 * 2, 3)
    maps2, _ = gradcam(FrameCNN(width=4, crop=32).eval(), torch.randn(1, 1, 1, 32, 32))
    assert maps2["frame"].shape == (1, 32, 32)


def test_fmh_evaluate_checkpoint_and_onnx(tmp_path, capsys):
    from engine.cli import main
    from tests.test_train import make_stores, tiny_config
    from train.data import find_stores
    from train.loop import build_model, save_model
    stores = make_stores(tmp_path / "stores", 2, 2, clips=3)
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.arch_dict()).eval()
    ck = save_model(tmp_path / "m.pt", model, cfg.arch_dict(), cfg.meta(), threshold=0.5,
                    metrics={"validation": {"sensitivity": 1.0, "specificity": 0.0, "auc": 0.5,
                                            "n_cells": 6, "n_donors": 2},
                             "trained_on": "test blobs, not cells"})
    out = tmp_path / "ev"
    assert main(["evaluate", str(ck), str(tmp_path / "stores"), "--views", "single", "multi",
                 "--gradcam", "2", "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "evaluation.json").read_text())
    assert rep["n_donors"] == 4 and set(rep["views"]) == {"single", "multi"}
    assert sum(map(sum, rep["views"]["single"]["confusion"]["matrix"])) == 12
    assert len(list(out.glob("gradcam_*.png"))) == 2
    # the same model as ONNX gives the same figures
    from export.to_onnx import export_onnx
    onnx_path = tmp_path / "m.onnx"
    export_onnx(ck, onnx_path)
    assert main(["evaluate", str(onnx_path), *map(str, stores), "--out",
                 str(tmp_path / "ev2"), "--quiet"]) == 0
    rep2 = json.loads((tmp_path / "ev2" / "evaluation.json").read_text())
    assert rep2["views"]["single"]["confusion"] == rep["views"]["single"]["confusion"]
    assert rep2["views"]["single"]["auc"] == pytest.approx(rep["views"]["single"]["auc"], abs=1e-6)
    # masked-cell control runs on any store; a missing store is one clean error
    assert main(["evaluate", str(ck), str(tmp_path / "stores"), "--mask-cell", "--quiet"]) == 0
    assert main(["evaluate", str(ck), str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err
    assert len(find_stores([tmp_path / "stores"])) == 4


def test_bundled_demo_model_says_what_it_is():
    """The committed demo model (scripts/make_demo_model.sh) is under 10 MB, says it was trained
    on synthetic cells cut by the front end and tracker (the clips serving classifies), and
    carries validation figures that are counts over its validation cells (what
    ``fmh evaluate`` on the validation stores reproduces; docs/experiments.md)."""
    from engine.infer.artefact import ModelArtefact, default_model_path
    p = default_model_path()
    assert p.is_file() and p.stat().st_size < 10 * 2 ** 20
    art = ModelArtefact.load(p)
    text = art.meta["trained_on"]
    assert "synthetic" in text and "NOT real blood cells" in text
    assert "cut by the fmh front end and tracker" in text
    v = art.meta["validation"]
    assert v["n_fetal"] + v["n_maternal"] == v["n_cells"] and v["n_donors"] >= 8
    for key, n in (("sensitivity", v["n_fetal"]), ("specificity", v["n_maternal"])):
        assert 0 < v[key] <= 1
        assert v[key] * n == pytest.approx(round(v[key] * n), abs=1e-6)   # k of n cells
    assert 0.5 < v["auc"] <= 1
    assert 0 < art.threshold < 1 and art.input_shape == (1, 32, 64, 64)
