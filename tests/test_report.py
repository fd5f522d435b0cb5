"""The per-sample report: intervals (with simulated coverage), bleed, detection limit, files."""
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.cli import main as fmh
from engine.config import load_config
from engine.errors import EngineError
from engine.report import (ReportError, bleed_ml, clopper_pearson_interval, corrected_interval,
                           detection_limit, detection_sentence, rogan_gladen, sample_stats,
                           wilson_interval, write_report)

SE, SP = 0.79, 0.95


# -- pure statistics --------------------------------------------------------------------------

def test_wilson_and_clopper_pearson_match_published_values():
    # Wilson 0/10 and 5/10 at 95 % (e.g. Brown, Cai & DasGupta 2001; R binom.confint)
    iv = wilson_interval(0, 10)
    assert iv.lo == 0 and iv.hi == pytest.approx(0.2775, abs=1e-4)
    iv = wilson_interval(5, 10)
    assert (iv.lo, iv.hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    iv = clopper_pearson_interval(5, 10)
    assert (iv.lo, iv.hi) == pytest.approx((0.1871, 0.8129), abs=1e-4)
    assert clopper_pearson_interval(0, 10).hi == pytest.approx(0.3085, abs=1e-4)


def test_rogan_gladen_inverts_misclassification_and_clips():
    f = 0.1
    p_obs = f * SE + (1 - f) * (1 - SP)
    assert rogan_gladen(p_obs, SE, SP) == pytest.approx(f)
    assert rogan_gladen(0.01, SE, SP) == 0.0                  # below the false-positive rate
    assert rogan_gladen(0.01, SE, SP, clip=False) < 0
    assert rogan_gladen(0.99, SE, SP) == 1.0


def test_errors_name_the_bad_numbers():
    with pytest.raises(ReportError, match=r"sensitivity 0.5 \+ specificity 0.4 = 0.9 <= 1"):
        corrected_interval(10, 100, 0.5, 0.4)
    with pytest.raises(ReportError, match=r"sensitivity 0.6 \+ specificity 0.4 = 1 <= 1"):
        rogan_gladen(0.3, 0.6, 0.4)
    with pytest.raises(ReportError, match=r"no classified cells \(n = 0\)"):
        corrected_interval(0, 0, SE, SP)
    with pytest.raises(ReportError, match="no classified cells"):
        wilson_interval(0, 0)
    with pytest.raises(ReportError, match="specificity 1.2"):
        corrected_interval(1, 10, SE, 1.2)
    with pytest.raises(ReportError, match="'bogus' is not one of"):
        corrected_interval(1, 10, SE, SP, method="bogus")
    with pytest.raises(ReportError, match="needs the validation set's sizes"):
        corrected_interval(1, 10, SE, SP, method="lang-reiczigel")


def test_all_maternal_sample():
    s = sample_stats(0, 2000, {"sensitivity": SE, "specificity": SP})
    assert s.observed.estimate == 0 and s.observed.lo == 0 and s.observed.hi > 0
    assert s.corrected.estimate == 0 and s.corrected.lo == 0
    assert s.bleed.estimate == 0 and s.bleed.hi == pytest.approx(5000 * s.corrected.hi)


def _simulate(rng, f, n, n_val):
    """One sample of n cells, fraction f, through a classifier with Se/Sp; optionally a
    validation set of n_val fetal + n_val maternal cells that estimates Se and Sp."""
    n_fetal = rng.binomial(n, f)
    k = rng.binomial(n_fetal, SE) + rng.binomial(n - n_fetal, 1 - SP)
    if n_val is None:
        return k, SE, SP
    return k, rng.binomial(n_val, SE) / n_val, rng.binomial(n_val, SP) / n_val


# The issue asks for >= 93 % coverage in 200 repeats. 200 repeats measure coverage to about
# +-1.5 %: a method of exactly 95 % falls below 93 % in ~5 % of seeds (seed 20261125 gave
# 185/200 for "exact" at f=0.001 whose coverage over 2000 repeats is 95.5 %). The same criterion
# is therefore checked on 1000 repeats per setting (+-0.7 %), which takes ~1 s in all.
REPEATS = 1000


@pytest.mark.parametrize("method, n_val", [("exact", None), ("wilson", None),
                                           ("lang-reiczigel", 400)])
@pytest.mark.parametrize("f, n", [(0.001, 50_000), (0.01, 5_000), (0.05, 3_000), (0.0, 5_000)])
def test_corrected_interval_covers_true_fraction(f, n, method, n_val):
    rng = np.random.default_rng(20261125)
    covered = 0
    for _ in range(REPEATS):
        k, se, sp = _simulate(rng, f, n, n_val)
        iv = corrected_interval(k, n, se, sp, n_se=n_val, n_sp=n_val, method=method)
        assert 0 <= iv.lo <= iv.estimate <= iv.hi <= 1
        covered += iv.lo <= f <= iv.hi
    coverage = covered / REPEATS
    assert coverage >= 0.93, f"coverage {coverage:.3f} for f={f}, n={n}, {method}"


@pytest.mark.parametrize("f, n", [(0.001, 50_000), (0.01, 5_000), (0.05, 3_000)])
def test_exact_coverage_with_known_se_sp(f, n):
    """Coverage computed exactly (sum of binomial probabilities of every count whose interval
    covers f), no simulation noise: Clopper-Pearson transformed keeps >= 95 %."""
    from scipy import stats
    p = f * SE + (1 - f) * (1 - SP)
    ks = np.arange(int(stats.binom.ppf(1e-10, n, p)), int(stats.binom.isf(1e-10, n, p)) + 1)
    pmf = stats.binom.pmf(ks, n, p)
    for method, floor in (("exact", 0.95), ("wilson", 0.945)):
        cover = [corrected_interval(int(k), n, SE, SP, method=method) for k in ks]
        coverage = float(sum(w for w, iv in zip(pmf, cover) if iv.lo <= f <= iv.hi))
        assert coverage >= floor, f"{method}: {coverage:.4f}"


def test_naive_interval_would_fail_the_coverage_test():
    """The test above can fail: treating the RG estimate as if observed directly (the naive
    method Reiczigel et al. 2010 warn about) covers far less often."""
    rng = np.random.default_rng(1)
    f, n, covered = 0.01, 5000, 0
    for _ in range(REPEATS):
        k, _, _ = _simulate(rng, f, n, None)
        est = rogan_gladen(k / n, SE, SP, clip=False)
        half = 1.96 * math.sqrt(max(est * (1 - est), 0) / n)
        covered += est - half <= f <= est + half
    assert covered / REPEATS < 0.93


def test_detection_limit_is_where_the_lower_bound_leaves_zero():
    for n, kw in ((50_000, {}), (3_000, {}), (50_000, dict(n_se=400, n_sp=400))):
        dl = detection_limit(n, SE, SP, **kw)
        assert 0 < dl < 1
        for factor, positive in ((0.98, False), (1.02, True)):
            fr = dl * factor
            k = n * (fr * SE + (1 - fr) * (1 - SP))
            assert (corrected_interval(k, n, SE, SP, **kw).lo > 0) == positive
    # more cells, lower limit; an uncertain specificity puts a floor under it
    assert detection_limit(50_000, SE, SP) < detection_limit(3_000, SE, SP)
    assert detection_limit(10**7, SE, SP, n_se=400, n_sp=400) > 0.02
    # a useless-but-legal classifier on few cells: nothing is detectable
    assert detection_limit(5, 0.55, 0.5) == math.inf


def test_detection_sentence_says_when_a_relevant_bleed_is_out_of_reach():
    small = sample_stats(60, 3_000, {"sensitivity": SE, "specificity": SP})
    assert small.detection_limit_ml > 30
    assert "cannot distinguish a clinically relevant bleed (30 mL) from zero" in \
        detection_sentence(small)
    big = sample_stats(2600, 50_000, {"sensitivity": SE, "specificity": SP})
    assert big.detection_limit_ml < 30 and big.can_detect_relevant_bleed
    assert "cannot" not in detection_sentence(big)
    assert bleed_ml(0.006) == pytest.approx(30.0)          # 0.6 % fetal cells x 50


def test_validation_sizes_choose_the_method():
    s = sample_stats(300, 5000, {"sensitivity": SE, "specificity": SP,
                                 "n_fetal": 300, "n_maternal": 500})
    assert s.corrected.method == "lang-reiczigel" and (s.n_se, s.n_sp) == (300, 500)
    s = sample_stats(300, 5000, {"sensitivity": SE, "specificity": SP, "n_cells": 800})
    assert (s.n_se, s.n_sp) == (400, 400) and any("class-balanced" in n for n in s.notes)
    s = sample_stats(300, 5000, {"sensitivity": SE, "specificity": SP})
    assert s.corrected.method == "exact" and any("taken as exact" in n for n in s.notes)
    s = sample_stats(300, 5000, {})
    assert s.corrected is None and any("not corrected" in n for n in s.notes)


# -- the run folder ---------------------------------------------------------------------------

def _run_folder(tmp_path, n=400, n_fetal=40, columns=("area_um", "deform_in", "transit_ms"),
                validation=None, classified=True):
    rng = np.random.default_rng(3)
    run = tmp_path / "run"
    run.mkdir()
    label = np.array(["fetal"] * n_fetal + ["maternal"] * (n - n_fetal), dtype=object)
    p = np.where(label == "fetal", rng.uniform(0.5, 1, n), rng.uniform(0, 0.5, n))
    first = np.sort(rng.integers(0, 5000, n))
    data = {"cell_id": np.arange(n), "first_frame": first, "last_frame": first + 60,
            "n_frames": np.full(n, 61), "status": np.where(np.arange(n) % 10, "complete",
                                                          "truncated"),
            "reason": np.full(n, "", dtype=object)}
    if "area_um" in columns:
        data["area_um"] = rng.normal(45, 5, n)
    if "deform_in" in columns:
        data["deform_in"] = rng.normal(0.3, 0.05, n)
    if "transit_ms" in columns:
        data["transit_ms"] = rng.normal(40, 5, n)
    if classified:
        p[-1] = np.nan                                       # one prediction error
        label[-1] = ""
        data["p_fetal"], data["label"] = p, label
    pq.write_table(pa.table(data), run / "cells.parquet")
    manifest = {"status": "complete", "source": {"spec": "sim://?frames=5000"},
                "config": {"camera": {"fps": 500.0}},
                "model": {"model_id": "demo-1234", "sha256": "ab" * 32,
                          "trained_on": "synthetic PolyNano chip, NOT real cells",
                          "threshold": "0.5",
                          "validation": validation if validation is not None else
                          {"sensitivity": SE, "specificity": SP, "n_cells": 800}},
                "counts": {"frames_read": 5000, "frames_dropped": 7, "frame_gaps": 2,
                           "cells_tracked": n, "clips_sent": n, "predictions": n - 1,
                           "errors": 1}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_report_folder_numbers_figures_and_counts(tmp_path):
    run = _run_folder(tmp_path)
    cfg = load_config()
    headline = write_report(run, cfg)
    md = (run / "report.md").read_text()
    summary = json.loads((run / "report.json").read_text())
    s = sample_stats(40, 399, {"sensitivity": SE, "specificity": SP, "n_cells": 800})
    assert headline.startswith("40 of 399 cells fetal")
    assert f"{100 * s.corrected.estimate:.3g} %" in md and f"{100 * s.observed.hi:.3g} %" in md
    assert summary["stats"]["corrected"]["hi"] == pytest.approx(s.corrected.hi)
    assert summary["stats"]["bleed"]["estimate"] == pytest.approx(5000 * s.corrected.estimate)
    assert "demo-1234" in md and "NOT real cells" in md
    for text in ("frames dropped | 7", "frame gaps | 2", "predictions | 399", "errors | 1",
                 "Lang & Reiczigel", "cannot distinguish a clinically relevant bleed"):
        assert text in md, text
    pngs = ["p_fetal_hist.png", "deform_vs_area.png", "transit_time_hist.png",
            "cells_per_second.png"]
    for png in pngs:
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md


def test_report_uses_config_volume(tmp_path):
    run = _run_folder(tmp_path)
    cfg = load_config(overrides=["report.maternal_blood_volume_ml=4000"])
    write_report(run, cfg)
    summary = json.loads((run / "report.json").read_text())
    st = summary["stats"]
    assert st["bleed"]["estimate"] == pytest.approx(4000 * st["corrected"]["estimate"])


def test_report_skips_figures_of_missing_columns(tmp_path):
    run = _run_folder(tmp_path, columns=("area_um",))
    write_report(run)
    md = (run / "report.md").read_text()
    assert not (run / "deform_vs_area.png").exists()
    assert not (run / "transit_time_hist.png").exists()
    assert "deformation vs area figure skipped" in md and "transit time figure skipped" in md
    assert (run / "p_fetal_hist.png").exists()


def test_report_with_no_classified_cells(tmp_path):
    run = _run_folder(tmp_path, classified=False)
    headline = write_report(run)
    assert "No classified cells in this run (400 cells tracked)" in headline
    assert "No classified cells" in (run / "report.md").read_text()


def test_report_with_a_useless_classifier_says_why(tmp_path):
    run = _run_folder(tmp_path, validation={"sensitivity": 0.5, "specificity": 0.5})
    write_report(run)
    assert "sensitivity 0.5 + specificity 0.5 = 1 <= 1" in (run / "report.md").read_text()


def test_missing_or_corrupt_files_name_the_file(tmp_path):
    run = _run_folder(tmp_path)
    (run / "cells.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(EngineError, match=r"cells\.parquet: unreadable or corrupt"):
        write_report(run)
    (run / "cells.parquet").unlink()
    with pytest.raises(EngineError, match=r"cells\.parquet: missing"):
        write_report(run)
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match=r"manifest\.json: unreadable or corrupt"):
        write_report(run)


def test_fmh_report_command(tmp_path, capsys):
    run = _run_folder(tmp_path)
    assert fmh(["report", str(run), "--method", "exact"]) == 0
    out = capsys.readouterr().out
    assert "40 of 399 cells fetal" in out and "report.md" in out
    assert "Clopper" in (run / "report.md").read_text()
    assert fmh(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not a folder" in capsys.readouterr().err
