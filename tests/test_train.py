"""Training: donor splits, physics-respecting augmentation, the loop (loss falls, checkpoints
load back identically, resume continues deterministically), the single-frame baseline."""
import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.clipstore import ClipStoreWriter                      # noqa: E402
from engine.types import CellClip                                  # noqa: E402
from train.data import (Augment, ClipDataset, Split, StoreInfo, check_split,  # noqa: E402
                        class_weights, find_stores, mask_cell, split_donors)
from train.loop import TrainConfig, build_model, load_model, lr_at, save_model, train  # noqa: E402


def blob_clip(cell_id, label, rng, t=12, size=32, look=0.0):
    """A dark disc crossing the canvas left to right; fetal discs are smaller and squeeze more."""
    yy, xx = np.mgrid[0:size, 0:size]
    r0 = 6.0 if label == "fetal" else 9.0
    frames = np.empty((t, size, size), np.uint8)
    xs = np.linspace(size * 0.3, size * 0.7, t) + rng.normal(0, 0.5)
    for k in range(t):
        squeeze = 1.0 + (0.6 if label == "fetal" else 0.2) * np.sin(np.pi * k / (t - 1))
        rx, ry = r0 * squeeze, r0 / squeeze
        inside = ((xx - xs[k]) / rx) ** 2 + ((yy - size / 2) / ry) ** 2 <= 1
        img = 150.0 + look + rng.normal(0, 2, (size, size))
        img[inside] -= 60
        frames[k] = np.clip(img, 0, 255).astype(np.uint8)
    cen = np.stack([xs + 100, np.full(t, 75.0)], 1).astype(np.float32)
    return CellClip(cell_id=cell_id, frames=frames, frame_indices=np.arange(t, dtype=np.int64),
                    centroids=cen, boxes=np.zeros((t, 4), np.int32),
                    areas=np.full(t, int(np.pi * r0 * r0), np.int32))


def make_stores(root, n_fetal=3, n_maternal=3, clips=6, t=12, size=32, seed=0, label_attr=True):
    rng = np.random.default_rng(seed)
    paths = []
    labels = ["fetal"] * n_fetal + ["maternal"] * n_maternal
    for d, label in enumerate(labels):
        p = root / f"d{d}" / "clips.h5"
        p.parent.mkdir(parents=True)
        with ClipStoreWriter(p, {"donor": f"d{d}", "label": label if label_attr else ""}) as w:
            for c in range(clips):
                w.append(blob_clip(c, label, rng, t, size, look=3.0 * d))
        paths.append(p)
    return paths


def tiny_config(**kw):
    base = dict(width=8, frames=8, size=32, epochs=3, batch_size=4, lr=0.05, warmup_epochs=0.5,
                dropout=0.0, fractions=(0.5, 0.25, 0.25), seed=1)
    base.update(kw)
    return TrainConfig(**base)


# -- splits -------------------------------------------------------------------------------------

def infos(n_f, n_m):
    return ([StoreInfo(f"f{i}.h5", f"F{i}", "fetal", 10) for i in range(n_f)]
            + [StoreInfo(f"m{i}.h5", f"M{i}", "maternal", 10) for i in range(n_m)])


def test_split_donor_level_balanced_deterministic():
    st = infos(8, 14)
    s = split_donors(st, seed=3)
    parts = [set(s.train), set(s.val), set(s.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == {x.donor for x in st}
    for part in ("val", "test"):
        d = s.to_dict()[part]["donors_per_class"]
        assert d["fetal"] == d["maternal"] >= 1
    # 22 donors: 20 % -> 2 of each class in val, 10 % -> 1 of each in test
    assert s.to_dict()["val"]["donors_per_class"]["fetal"] == 2
    assert s.to_dict()["test"]["donors_per_class"]["fetal"] == 1
    assert split_donors(list(reversed(st)), seed=3) == s          # order independent
    assert any(split_donors(st, seed=k).val != s.val for k in range(4, 10))


def test_split_refuses_overlap_and_too_few_donors():
    bad = Split(("A", "B"), ("B",), ("C",))
    with pytest.raises(ValueError, match="'B'.*train and val"):
        check_split(bad)
    with pytest.raises(ValueError, match="fetal donors"):
        split_donors(infos(2, 6))
    # a donor with two stores goes to one split
    st = infos(3, 3) + [StoreInfo("f0b.h5", "F0", "fetal", 5)]
    s = split_donors(st, seed=0)
    assert sum("F0" in p for p in (s.train, s.val, s.test)) == 1


def test_find_stores_labels_from_csv(tmp_path):
    make_stores(tmp_path / "s", 1, 1, clips=1, label_attr=False)
    with pytest.raises(ValueError, match="no label"):
        find_stores([tmp_path / "s"])
    csvp = tmp_path / "labels.csv"
    csvp.write_text("donor,label\nd0,fetal\nd1,maternal\n")
    st = find_stores([tmp_path / "s"], str(csvp))
    assert [(s.donor, s.label, s.n_clips) for s in st] == [("d0", "fetal", 1), ("d1", "maternal", 1)]
    np.testing.assert_allclose(class_weights([0, 0, 0, 1]), [4 / 6, 2.0])


# -- augmentation -------------------------------------------------------------------------------

def test_augment_never_flips_horizontally_or_reverses_time():
    t, size = 10, 32
    frames = np.full((t, size, size), 200, np.uint8)
    for k in range(t):                     # a dark dot moving right, in the upper half
        x = 4 + 2.5 * k
        frames[k, 8:12, int(x):int(x) + 4] = 20
    aug = Augment(brightness=10, contrast=0.1)
    flipped = 0
    for s in range(40):
        out = aug(frames, np.random.default_rng(s))
        assert out.shape == frames.shape and out.dtype == np.uint8
        xs, ys = [], []
        for k in range(t):
            yy, xx = np.nonzero(out[k] < 100)
            xs.append(xx.mean())
            ys.append(yy.mean())
        assert np.all(np.diff(xs) > 0), f"seed {s}: dot no longer moves left to right: {xs}"
        flipped += np.mean(ys) > size / 2
    assert 5 < flipped < 35            # vertical flips do happen (and so would be seen)


def test_mask_cell_keeps_only_the_channel():
    rng = np.random.default_rng(0)
    a = blob_clip(0, "fetal", rng).frames
    b = blob_clip(0, "maternal", rng).frames
    ma, mb = mask_cell(a), mask_cell(b)
    c0, c1 = 16 - 10, 16 + 10
    assert (ma[:, c0:c1, c0:c1] == ma[:, c0:c0 + 1, c0:c0 + 1]).all()
    assert np.abs(ma[:, c0:c1, c0:c1].astype(int) - mb[:, c0:c1, c0:c1]).max() <= 2
    np.testing.assert_array_equal(ma[:, :2], a[:, :2])        # the border is untouched


# -- the loop -----------------------------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert max(lrs) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_checkpoint_round_trip_predicts_identically(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.arch_dict())
    x = torch.randn(3, 1, 8, 32, 32)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x).sum()
    loss.backward()
    opt.step()
    model.eval()
    p = save_model(tmp_path / "m.pt", model, cfg.arch_dict(), cfg.meta(), threshold=0.3,
                   metrics={"validation": {"sensitivity": 0.9}})
    back, info = load_model(p)
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    assert info["threshold"] == pytest.approx(0.3)
    assert info["meta"]["input"]["frames"] == 8 and info["meta"]["sampling"]["mode"] == "uniform"


def test_train_loss_falls_checkpoint_and_resume(tmp_path):
    stores = make_stores(tmp_path / "stores", clips=4)
    cfg = tiny_config(epochs=3)
    out = tmp_path / "run"
    s = train(stores, out, cfg, progress=False)
    hist = s["history"]
    assert len(hist) == 3
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    for f in ("best.pt", "last.pt", "log.csv", "split.json", "summary.json"):
        assert (out / f).exists(), f
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]["donors"]) & set(split["val"]["donors"])
    assert 0 <= s["val"]["sensitivity"] <= 1 and "confusion" in s["val"]

    # resume: a 3-epoch run interrupted after epoch 2 continues at epoch 3 and ends where the
    # uninterrupted run ended (determinism)
    out2 = tmp_path / "run2"
    s1 = train(stores, out2, tiny_config(epochs=3), progress=False, stop_after=2)
    assert s1["stopped_after"] == 2 and not (out2 / "summary.json").exists()
    s2 = train(stores, out2, tiny_config(epochs=3), progress=False)
    assert [h["epoch"] for h in s2["history"]] == [1, 2, 3]
    assert [int(r["epoch"]) for r in csv.DictReader(open(out2 / "log.csv"))] == [1, 2, 3]
    a = torch.load(out / "last.pt", weights_only=True)["model"]
    b = torch.load(out2 / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)

    # a resumed run with a different recipe is refused
    with pytest.raises(ValueError, match="different config"):
        train(stores, out2, tiny_config(epochs=4, lr=0.2), progress=False)
    # a checkpoint written during training loads back and predicts what the summary says
    from train.evaluate import binary_metrics
    from train.loop import _predict
    model, info = load_model(out / "best.pt")
    ds = ClipDataset(find_stores(json.loads((out / "split.json").read_text())["val"]["stores"]),
                     info["meta"], presample=True)
    p, _ = _predict(model, ds, 4, "cpu")
    m = binary_metrics(ds.labels, p, info["threshold"])
    assert m["confusion"] == s["val"]["confusion"]
    assert m["auc"] == pytest.approx(s["val"]["auc"])


def test_frame2d_baseline_and_cli(tmp_path, capsys):
    from engine.cli import main
    make_stores(tmp_path / "stores")
    out = tmp_path / "base"
    rc = main(["train", str(tmp_path / "stores"), "--out", str(out), "--arch", "frame2d",
               "--width", "4", "--size", "32", "--epochs", "2", "--batch-size", "4",
               "--fractions", "0.5", "0.25", "0.25", "--quiet"])
    assert rc == 0
    assert "best epoch" in capsys.readouterr().out
    model, info = load_model(out / "best.pt")
    assert info["arch"]["name"] == "frame2d" and info["meta"]["input"]["frames"] == 1
    ds = ClipDataset(find_stores([tmp_path / "stores"]), info["meta"], pick="constriction")
    x, y, _ = ds[0]
    assert tuple(x.shape) == (1, 1, 32, 32)
    assert main(["train", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


# -- synthetic clip stores through the real front end (train.synth --clips detect) ----------------

def test_synth_detect_stores_are_what_fmh_detect_cuts(tmp_path):
    """``--clips detect`` builds each donor's store by running the simulated sequence through
    the front end and tracker exactly as ``fmh detect`` does: same clips (count, cell ids,
    frames, statuses, truncated ones included), the donor's id and label in the store, every
    tracked cell a true cell of the donor's class; ``--status complete`` keeps complete ones."""
    import shutil

    import pandas as pd

    from engine.cli import main
    from engine.clipstore import ClipStoreReader
    from engine.types import TrackStatus
    from train.synth import keep_complete, make_stores
    paths = make_stores(tmp_path / "s", fetal=1, maternal=1, frames=300, size=48, seed=2,
                        progress=False, clips="detect")
    stores = {s.donor: s for s in find_stores([tmp_path / "s"])}
    assert set(stores) == {"d000", "d001"}
    assert sorted(s.label for s in stores.values()) == ["fetal", "maternal"]
    for p in paths:
        match = json.loads((p.parent / "truth_match.json").read_text())
        with ClipStoreReader(p) as r:
            donor, label, source = r.meta["donor"], r.meta["label"], r.meta["source"]
            assert r.meta["canvas"] == [48, 48] and len(r) == match["clips_in_store"] > 0
            assert len(r) == stores[donor].n_clips
            ours = [r[i] for i in range(len(r))]
        assert match["label"] == label and match["truth"]["fetal_fraction"] == (
            1.0 if label == "fetal" else 0.0)
        assert match["cells"]["matched"] >= len(ours) - 1           # clips are real cells ...
        assert match["tracked_cells_of_other_class"] == 0           # ... of the donor's class
        # the same sequence through `fmh detect` gives the same clips
        out = tmp_path / f"detect_{donor}"
        assert source.startswith("sim://") and f"donor={int(donor[1:])}" in source
        assert main(["detect", source, "--out", str(out), "--donor", donor, "--label", label,
                     "--set", "clips.size=48", "--quiet"]) == 0
        with ClipStoreReader(out / "clips.h5") as r:
            theirs = [r[i] for i in range(len(r))]
            assert (r.meta["donor"], r.meta["label"]) == (donor, label)
        assert len(theirs) == len(ours)
        for a, b in zip(ours, theirs):
            assert a.cell_id == b.cell_id and a.status == b.status
            np.testing.assert_array_equal(a.frame_indices, b.frame_indices)
            np.testing.assert_array_equal(a.frames, b.frames)
        cells = pd.read_parquet(out / "cells.parquet")
        assert len(cells) == len(ours)
    # truncated tracks are kept by default (serving classifies them); complete-only on request
    n_truncated = 0
    for p in paths:
        with ClipStoreReader(p) as r:
            statuses = [r[i].status for i in range(len(r))]
        n_truncated += statuses.count(TrackStatus.TRUNCATED)
        q = tmp_path / "c" / p.parent.name / "clips.h5"
        q.parent.mkdir(parents=True)
        shutil.copy(p, q)
        k = keep_complete(q)
        with ClipStoreReader(q) as r:
            assert len(r) == k == statuses.count(TrackStatus.COMPLETE)
            assert all(r[i].status == TrackStatus.COMPLETE for i in range(len(r)))
            assert r.meta["label"] == stores[r.meta["donor"]].label
    assert n_truncated > 0          # 300 frames: cells in view at the start and at the end
    from train.loop import describe_data
    text = describe_data(list(stores.values()))
    assert "NOT real blood cells" in text and "cut by the fmh front end and tracker" in text
    with pytest.raises(ValueError, match="clips 'oracle'"):
        make_stores(tmp_path / "x", fetal=1, maternal=1, frames=10, clips="oracle")


def test_simcheck_matches_tracked_cells_to_true_cells():
    """Each tracked cell goes to the true cell it follows in most of its frames (within the
    tolerance); a track that follows none, or follows one only briefly, is unmatched."""
    from types import SimpleNamespace

    import pandas as pd

    from train.simcheck import match_cells

    def cell(cid, cls, x0, y):
        fn = np.arange(10, 30, dtype=np.int64)
        cen = np.stack([x0 + 6.0 * (fn - 10), np.full(fn.shape, y)], 1).astype(np.float32)
        return SimpleNamespace(cell_id=cid, cls=cls, complete=True, frame_numbers=fn,
                               centroids=cen)

    truth = SimpleNamespace(cells=[cell(0, "fetal", 10.0, 70.0), cell(1, "maternal", 10.0, 90.0)])
    fn = np.arange(10, 30)
    rows = []
    for k in fn:                           # track 5 follows cell 1 (3 px off), track 6 cell 0
        rows.append((5, k, 10.0 + 6 * (k - 10) + 3.0, 90.0))
        rows.append((6, k, 10.0 + 6 * (k - 10), 71.0))
    for k in fn[:5]:                       # track 7: debris far from every cell
        rows.append((7, k, 400.0, 20.0))
    for k in fn:                           # track 8: on cell 0 for 5 of 20 frames only
        rows.append((8, k, 10.0 + 6 * (k - 10) if k < 15 else 700.0, 70.0))
    tracks = pd.DataFrame(rows, columns=["cell_id", "frame", "cx", "cy"])
    m = match_cells(tracks, truth, tol_px=8.0, min_share=0.5).set_index("cell_id")
    assert m.loc[5, "truth_id"] == 1 and m.loc[5, "truth_cls"] == "maternal"
    assert m.loc[6, "truth_id"] == 0 and m.loc[6, "truth_cls"] == "fetal"
    assert m.loc[7, "truth_id"] == -1 and m.loc[7, "truth_cls"] == ""
    assert m.loc[8, "truth_id"] == -1 and m.loc[8, "share"] == pytest.approx(0.25)
    assert match_cells(tracks, truth, tol_px=2.0).set_index("cell_id").loc[5, "truth_id"] == -1
