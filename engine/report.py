"""The per-sample report: fetal fraction with its uncertainty, bleed estimate, detection limit.

Statistics (pure functions of counts, numpy/scipy only)
-------------------------------------------------------
* Observed fetal fraction ``k / n`` with the Wilson score interval (Wilson 1927).
* Corrected ("true") fraction, Rogan & Gladen (1978): ``(p_obs + Sp - 1) / (Se + Sp - 1)``
  clipped to [0, 1], where Se/Sp are the classifier's validated sensitivity and specificity
  for the fetal class. Its interval:

  - ``"lang-reiczigel"`` (used when the validation set's class sizes are known): the adjusted
    interval of Lang & Reiczigel (2014, Prev. Vet. Med. 113:13-22), which adds the variance of
    the estimated Se and Sp to the Rogan-Gladen variance, uses Agresti-Coull-type additions
    (``z²/2`` positives and negatives to the sample, 1 and 1 to each validation set) and a
    shift term; their simulations show coverage close to nominal down to n = 30.
  - ``"exact"`` (Se/Sp taken as known): the Clopper-Pearson limits of the observed fraction
    transformed through Rogan-Gladen (Reiczigel, Földi & Ózsvári 2010, Epidemiol. Infect.
    138:1674-1678). The transform is monotone, so the coverage is that of Clopper-Pearson:
    at least the nominal level whenever Se and Sp are right.
  - ``"wilson"``: the Wilson limits transformed the same way (close to nominal, not
    guaranteed), for comparison.

  Coverage is checked in ``tests/test_report.py``. With Se 0.79 / Sp 0.95 known, computed
  exactly over all counts: "exact" 95.2 / 95.5 / 95.5 %, "wilson" 95.1 / 95.2 / 95.2 % for a
  true fraction of 0.1 % in 50,000 cells, 1 % in 5,000 and 5 % in 3,000. Simulated with Se/Sp
  re-estimated from 400 + 400 validation cells each time (1000 samples): "lang-reiczigel"
  94.9 / 95.0 / 95.6 %.
* Fetal bleed [mL fetal whole blood] = corrected fraction x maternal blood volume (5000 mL by
  default): the Kleihauer-Betke calculation "mL fetal blood = % fetal cells x 50"
  (fetal cells / maternal cells x maternal blood volume; e.g. fpnotebook.com, Kleihauer-Betke
  test; medicalalgorithms.com, "Estimation of fetal-maternal hemorrhage volume with the
  Kleihauer-Betke test"). One 300 µg dose of anti-D covers 30 mL fetal whole blood, hence the
  default clinically relevant bleed of 30 mL.
* Detection limit: the smallest true fraction whose *expected* count of test positives in a
  sample of this size gives a lower confidence limit above zero (the same interval method), i.e.
  the smallest bleed that this run size and this classifier can tell from none. With estimated
  Se/Sp it does not go to zero as cells grow: the uncertainty of the specificity sets a floor.

The report writer reads a run folder (``manifest.json``, ``cells.parquet``) and writes
``report.md``, ``report.json`` and PNG figures beside them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from scipy import stats

from .errors import EngineError

__all__ = ["ReportError", "Interval", "SampleStats", "z_value", "wilson_interval",
           "clopper_pearson_interval", "rogan_gladen", "corrected_interval", "detection_limit",
           "bleed_ml", "sample_stats", "write_report", "METHODS"]

METHODS = ("auto", "lang-reiczigel", "exact", "wilson")
FETAL = "fetal"


class ReportError(EngineError, ValueError):
    """The numbers cannot give a report (no cells, a classifier no better than chance)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval; all fractions in [0, 1]."""

    estimate: float
    lo: float
    hi: float
    method: str = ""
    confidence: float = 0.95

    def scaled(self, factor: float) -> "Interval":
        return Interval(self.estimate * factor, self.lo * factor, self.hi * factor,
                        self.method, self.confidence)


# -- basic intervals --------------------------------------------------------------------------

def z_value(confidence: float) -> float:
    """Two-sided normal quantile for ``confidence`` (0.95 -> 1.96)."""
    if not 0 < confidence < 1:
        raise ReportError(f"confidence {confidence!r} must be between 0 and 1")
    return float(stats.norm.ppf(0.5 + confidence / 2))


def _check_counts(k: float, n: float) -> None:
    if not n > 0:
        raise ReportError(f"no classified cells (n = {n}): a fetal fraction cannot be estimated")
    if not 0 <= k <= n:
        raise ReportError(f"fetal count {k} is outside 0..{n} (cells classified)")


def wilson_interval(k: float, n: float, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a binomial fraction ``k / n`` (Wilson 1927)."""
    _check_counts(k, n)
    z = z_value(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k <= 0 else max(0.0, centre - half)      # exact at the ends (no rounding)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return Interval(p, lo, hi, "wilson", confidence)


def clopper_pearson_interval(k: float, n: float, confidence: float = 0.95) -> Interval:
    """Exact (Clopper-Pearson) interval of ``k / n``; ``k`` may be fractional (expected counts)."""
    _check_counts(k, n)
    a = (1 - confidence) / 2
    lo = 0.0 if k <= 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return Interval(k / n, lo, hi, "clopper-pearson", confidence)


def _check_se_sp(se: float, sp: float) -> None:
    for name, v in (("sensitivity", se), ("specificity", sp)):
        if not (isinstance(v, (int, float, np.floating)) and 0 <= v <= 1):
            raise ReportError(f"model {name} {v!r} must be a number in [0, 1]")
    if se + sp <= 1:
        raise ReportError(f"sensitivity {se:g} + specificity {sp:g} = {se + sp:g} <= 1: the "
                          "classifier is no better than chance, the fraction cannot be corrected")


def rogan_gladen(p_obs: float, se: float, sp: float, clip: bool = True) -> float:
    """Rogan-Gladen corrected fraction ``(p_obs + Sp - 1) / (Se + Sp - 1)`` (clipped to [0, 1])."""
    _check_se_sp(se, sp)
    v = (p_obs + sp - 1) / (se + sp - 1)
    return min(1.0, max(0.0, v)) if clip else v


# -- the corrected interval -------------------------------------------------------------------

def _raw_interval(k: float, n: int, se: float, sp: float, confidence: float, method: str,
                  n_se: float | None, n_sp: float | None) -> tuple[float, float]:
    """Unclipped (lo, hi) of the corrected fraction."""
    if method == "lang-reiczigel":
        z = z_value(confidence)
        n2, k2 = n + z * z, k + z * z / 2
        nse2, nsp2 = n_se + 2, n_sp + 2
        p2 = k2 / n2
        se2 = (se * n_se + 1) / nse2
        sp2 = (sp * n_sp + 1) / nsp2
        youden = se2 + sp2 - 1
        if youden <= 0:
            raise ReportError(f"adjusted sensitivity {se2:g} + specificity {sp2:g} <= 1")
        est = (p2 + sp2 - 1) / youden
        var_se = se2 * (1 - se2) / nse2
        var_sp = sp2 * (1 - sp2) / nsp2
        sd = math.sqrt(p2 * (1 - p2) / n2 + var_se * est * est + var_sp * (1 - est) ** 2) / youden
        shift = 2 * z * z * (est * var_se - (1 - est) * var_sp)
        return est + shift - z * sd, est + shift + z * sd
    if method == "exact":
        iv = clopper_pearson_interval(k, n, confidence)
    elif method == "wilson":
        iv = wilson_interval(k, n, confidence)
    else:
        raise ReportError(f"interval method {method!r} is not one of {', '.join(METHODS)}")
    y = se + sp - 1
    return (iv.lo + sp - 1) / y, (iv.hi + sp - 1) / y


def _method(method: str, n_se, n_sp) -> str:
    if method not in METHODS:
        raise ReportError(f"interval method {method!r} is not one of {', '.join(METHODS)}")
    has_n = n_se is not None and n_sp is not None
    if method == "auto":
        return "lang-reiczigel" if has_n else "exact"
    if method == "lang-reiczigel" and not has_n:
        raise ReportError("the lang-reiczigel interval needs the validation set's sizes "
                          "(fetal and maternal cells)")
    return method


def corrected_interval(k: int, n: int, se: float, sp: float, confidence: float = 0.95,
                       n_se: float | None = None, n_sp: float | None = None,
                       method: str = "auto") -> Interval:
    """Rogan-Gladen corrected fetal fraction with its confidence interval.

    Parameters
    ----------
    k, n : int
        Cells classified fetal, cells classified.
    se, sp : float
        Validated sensitivity and specificity of the classifier for the fetal class.
    confidence : float
        Confidence level of the interval.
    n_se, n_sp : float, optional
        Fetal and maternal cells of the validation set that gave ``se`` and ``sp``; with them
        the interval includes the uncertainty of Se and Sp (Lang & Reiczigel 2014).
    method : {"auto", "lang-reiczigel", "exact", "wilson"}
        ``auto``: lang-reiczigel when ``n_se`` and ``n_sp`` are given, else exact.

    Raises
    ------
    ReportError
        No cells, a count outside 0..n, Se or Sp outside [0, 1], or Se + Sp <= 1.
    """
    _check_counts(k, n)
    _check_se_sp(se, sp)
    for name, v in (("n_se", n_se), ("n_sp", n_sp)):
        if v is not None and not v > 0:
            raise ReportError(f"validation size {name} = {v!r} must be > 0")
    m = _method(method, n_se, n_sp)
    lo, hi = _raw_interval(k, n, se, sp, confidence, m, n_se, n_sp)
    est = rogan_gladen(k / n, se, sp)
    return Interval(est, min(1.0, max(0.0, lo)), min(1.0, max(0.0, hi)), m, confidence)


def detection_limit(n: int, se: float, sp: float, confidence: float = 0.95,
                    n_se: float | None = None, n_sp: float | None = None,
                    method: str = "auto") -> float:
    """Smallest true fetal fraction distinguishable from zero in a run of ``n`` cells.

    The fraction ``f`` at which the expected number of test positives,
    ``n (f Se + (1 - f)(1 - Sp))``, gives a lower confidence limit (same method as
    :func:`corrected_interval`) of exactly zero; larger fractions are, on average, told from
    none. ``inf`` when even a sample of only fetal cells would not be.
    """
    _check_counts(0, n)
    _check_se_sp(se, sp)
    m = _method(method, n_se, n_sp)

    def lower(f: float) -> float:
        k = n * (f * se + (1 - f) * (1 - sp))
        return _raw_interval(k, n, se, sp, confidence, m, n_se, n_sp)[0]

    if lower(1.0) <= 0:
        return math.inf
    if lower(0.0) > 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if lower(mid) > 0:
            hi = mid
        else:
            lo = mid
    return hi


def bleed_ml(fraction: float, maternal_blood_volume_ml: float = 5000.0) -> float:
    """Fetal whole blood [mL] = fetal fraction x maternal blood volume [mL] (Kleihauer-Betke)."""
    if not maternal_blood_volume_ml > 0:
        raise ReportError(f"maternal blood volume {maternal_blood_volume_ml!r} mL must be > 0")
    return fraction * maternal_blood_volume_ml


# -- a sample's numbers -----------------------------------------------------------------------

@dataclass(frozen=True)
class SampleStats:
    """Everything the report says about one sample (fractions in [0, 1], volumes in mL)."""

    n_cells: int
    n_classified: int
    n_fetal: int
    observed: Interval
    corrected: Interval | None
    bleed: Interval | None
    detection_limit: float | None        # fraction
    detection_limit_ml: float | None
    sensitivity: float | None
    specificity: float | None
    n_se: float | None
    n_sp: float | None
    maternal_blood_volume_ml: float
    relevant_bleed_ml: float
    notes: tuple[str, ...] = field(default=())

    @property
    def can_detect_relevant_bleed(self) -> bool | None:
        if self.detection_limit_ml is None:
            return None
        return self.detection_limit_ml <= self.relevant_bleed_ml

    def to_dict(self) -> dict:
        d = asdict(self)
        d["can_detect_relevant_bleed"] = self.can_detect_relevant_bleed
        return d


def _validation_sizes(val: Mapping[str, Any]) -> tuple[float | None, float | None, str]:
    """Fetal/maternal validation sizes from the model's validation record, and a note."""
    for kf, km in (("n_fetal", "n_maternal"), ("n_positive", "n_negative")):
        if isinstance(val.get(kf), (int, float)) and isinstance(val.get(km), (int, float)) \
                and val[kf] > 0 and val[km] > 0:
            return float(val[kf]), float(val[km]), ""
    n = val.get("n_cells")
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 2:
        return n / 2, n / 2, (f"the validation set's class sizes are not recorded; its {int(n)} "
                              "cells are taken as class-balanced (as the training protocol "
                              "builds it) for the uncertainty of Se and Sp")
    return None, None, ("the validation set's size is not recorded: Se and Sp are taken as "
                        "exact, so the interval leaves out their uncertainty")


def sample_stats(n_fetal: int, n_classified: int, validation: Mapping[str, Any] | None,
                 maternal_blood_volume_ml: float = 5000.0, relevant_bleed_ml: float = 30.0,
                 confidence: float = 0.95, n_cells: int | None = None,
                 method: str = "auto") -> SampleStats:
    """The report's numbers for ``n_fetal`` of ``n_classified`` cells classified fetal.

    ``validation`` is the model's record (``sensitivity``, ``specificity`` and optionally
    ``n_fetal``/``n_maternal`` or ``n_cells``). Without usable Se/Sp the corrected numbers are
    None and a note says why. Raises :class:`ReportError` for zero cells.
    """
    observed = wilson_interval(n_fetal, n_classified, confidence)
    notes: list[str] = []
    val = dict(validation or {})
    se, sp = val.get("sensitivity"), val.get("specificity")
    corrected = bleed = None
    dl = dl_ml = None
    n_se = n_sp = None
    if not isinstance(se, (int, float)) or not isinstance(sp, (int, float)):
        notes.append("the model records no validated sensitivity/specificity: the fraction is "
                     "not corrected for misclassification")
        se = sp = None
    else:
        se, sp = float(se), float(sp)
        n_se, n_sp, note = _validation_sizes(val)
        if method == "exact" or method == "wilson":
            n_se = n_sp = None
        elif note:
            notes.append(note)
        corrected = corrected_interval(n_fetal, n_classified, se, sp, confidence, n_se, n_sp,
                                       method)
        bleed = corrected.scaled(maternal_blood_volume_ml)
        dl = detection_limit(n_classified, se, sp, confidence, n_se, n_sp, method)
        dl_ml = dl * maternal_blood_volume_ml
    return SampleStats(
        n_cells=int(n_classified if n_cells is None else n_cells), n_classified=int(n_classified),
        n_fetal=int(n_fetal), observed=observed, corrected=corrected, bleed=bleed,
        detection_limit=dl, detection_limit_ml=dl_ml, sensitivity=se, specificity=sp,
        n_se=n_se, n_sp=n_sp, maternal_blood_volume_ml=maternal_blood_volume_ml,
        relevant_bleed_ml=relevant_bleed_ml, notes=tuple(notes))


def detection_sentence(s: SampleStats) -> str:
    """The detection limit in words."""
    if s.detection_limit is None:
        return "No detection limit: the model records no validated sensitivity/specificity."
    rel = s.relevant_bleed_ml
    if not math.isfinite(s.detection_limit):
        return (f"With {s.n_classified} cells and this classifier no fetal fraction can be told "
                f"from zero: this run cannot distinguish a clinically relevant bleed ({rel:g} mL) "
                "from no bleed.")
    text = (f"With {s.n_classified} cells and this classifier (Se {s.sensitivity:.3g}, Sp "
            f"{s.specificity:.3g}) the smallest fetal fraction distinguishable from zero at "
            f"{s.observed.confidence:.0%} confidence is {_pct(s.detection_limit)} "
            f"(≈ {s.detection_limit_ml:.3g} mL fetal blood).")
    if s.detection_limit_ml > rel:
        text += (f" **This run cannot distinguish a clinically relevant bleed ({rel:g} mL) from "
                 "zero**; more cells or a more specific classifier are needed.")
    else:
        text += f" A clinically relevant bleed ({rel:g} mL) is above this limit."
    return text


def _pct(f: float) -> str:
    return f"{100 * f:.3g} %"


# -- the run folder ---------------------------------------------------------------------------

_AREA = ("area_um", "area_msd", "area")
_DEFORM = ("deform_in", "deform")
_TRANSIT = ("transit_ms", "transit_time_ms")


def _read_run(run: Path) -> tuple[dict, dict[str, np.ndarray]]:
    mpath = run / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise EngineError(f"{mpath}: missing (is {run} a run folder?)") from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"{mpath}: unreadable or corrupt ({exc})") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    cpath = run / "cells.parquet"
    try:
        import pyarrow.parquet as pq
        table = pq.read_table(str(cpath))
    except FileNotFoundError:
        raise EngineError(f"{cpath}: missing (the run wrote no cell table)") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for corrupt files
        raise EngineError(f"{cpath}: unreadable or corrupt ({exc})") from None
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        try:
            cols[name] = col.to_numpy(zero_copy_only=False)
        except Exception:  # pragma: no cover - exotic column types
            continue
    return manifest, cols


def _first(cols: Mapping[str, np.ndarray], names) -> tuple[str | None, np.ndarray | None]:
    for n in names:
        if n in cols:
            try:
                return n, np.asarray(cols[n], dtype=np.float64)
            except (TypeError, ValueError):
                continue
    return None, None


def _get(d: Mapping, *path, default=None):
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return default
        d = d[p]
    return d


def write_report(run_dir: str | os.PathLike, cfg=None, method: str = "auto") -> str:
    """Write ``report.md``, ``report.json`` and the figures of a run folder.

    Parameters
    ----------
    run_dir : path-like
        A run folder with ``manifest.json`` and ``cells.parquet``.
    cfg : Config, optional
        For ``cfg.report`` (blood volume, relevant bleed, confidence); defaults otherwise.
    method : str
        Interval method of the corrected fraction (see :func:`corrected_interval`).

    Returns
    -------
    str
        The headline (one line) for the terminal.

    Raises
    ------
    EngineError
        Naming the file when ``manifest.json`` or ``cells.parquet`` is missing or corrupt.
    """
    run = Path(run_dir)
    if cfg is None:
        from .config import Config
        cfg = Config()
    rc = cfg.report
    manifest, cols = _read_run(run)
    n_rows = len(next(iter(cols.values()))) if cols else 0
    label = np.asarray(cols.get("label", np.full(n_rows, "", object)), dtype=object)
    p_fetal = np.asarray(cols.get("p_fetal", np.full(n_rows, np.nan)), dtype=np.float64)
    classified = np.array([isinstance(v, str) and v != "" for v in label], dtype=bool) \
        & np.isfinite(p_fetal)
    is_fetal = classified & (label == FETAL)
    n_cls, n_fet = int(classified.sum()), int(is_fetal.sum())
    model = manifest.get("model") or {}
    validation = model.get("validation") or {}
    notes: list[str] = []
    if "label" not in cols or "p_fetal" not in cols:
        notes.append("cells.parquet has no p_fetal/label columns: the cells were not classified")
    stats_: SampleStats | None = None
    error = ""
    if n_cls == 0:
        error = (f"No classified cells in this run ({n_rows} cells tracked): no fetal fraction "
                 "can be given.")
    else:
        try:
            stats_ = sample_stats(n_fet, n_cls, validation, rc.maternal_blood_volume_ml,
                                  rc.relevant_bleed_ml, rc.confidence, n_cells=n_rows,
                                  method=method)
        except ReportError as exc:
            error = f"The fraction cannot be corrected: {exc}."
            stats_ = dataclasses.replace(
                sample_stats(n_fet, n_cls, {}, rc.maternal_blood_volume_ml,
                             rc.relevant_bleed_ml, rc.confidence, n_cells=n_rows), notes=())
    figures, fig_notes = _figures(run, cols, classified, is_fetal, manifest, cfg)
    notes += fig_notes
    headline = _headline(stats_, error)
    md = _markdown(run, manifest, stats_, error, figures, notes, n_rows, cols, headline)
    (run / "report.md").write_text(md)
    summary = {"headline": headline, "error": error, "notes": notes, "figures": figures,
               "stats": stats_.to_dict() if stats_ else None,
               "model_id": model.get("model_id") or model.get("id"),
               "counts": manifest.get("counts", {})}
    (run / "report.json").write_text(json.dumps(summary, indent=1, default=float))
    return headline


def _headline(s: SampleStats | None, error: str) -> str:
    if s is None:
        return error
    o = s.observed
    text = (f"{s.n_fetal} of {s.n_classified} cells fetal ({_pct(o.estimate)}, "
            f"{100 * o.confidence:.3g} % CI {_pct(o.lo)}–{_pct(o.hi)})")
    if s.corrected is not None:
        c, b = s.corrected, s.bleed
        text += (f"; corrected {_pct(c.estimate)} ({_pct(c.lo)}–{_pct(c.hi)}), "
                 f"bleed ≈ {b.estimate:.3g} mL ({b.lo:.3g}–{b.hi:.3g} mL)")
        if s.can_detect_relevant_bleed is False:
            text += f"; cannot tell a {s.relevant_bleed_ml:g} mL bleed from zero"
    elif error:
        text += f"; {error}"
    return text


def _markdown(run, manifest, s, error, figures, notes, n_rows, cols, headline) -> str:
    model = manifest.get("model") or {}
    conf = s.observed.confidence if s else 0.95
    lines = [f"# FMH sample report: {run.name}", ""]
    src = _get(manifest, "source", "spec") or _get(manifest, "source") or ""
    if src:
        lines += [f"Source: `{src if isinstance(src, str) else json.dumps(src)}`  "]
    lines += [f"Run status: {manifest.get('status', 'unknown')}; started "
              f"{manifest.get('started', '?')}, finished "
              f"{manifest.get('finished') or manifest.get('ended') or '?'}", ""]
    lines += ["## Result", "", f"**{headline}**", ""]
    if error:
        lines += [f"> {error}", ""]
    if s is not None:
        o = s.observed
        lines += ["| quantity | value | " f"{conf:.0%} interval | method |", "|---|---|---|---|",
                  f"| cells tracked | {n_rows} | | |",
                  f"| cells classified | {s.n_classified} | | |",
                  f"| classified fetal | {s.n_fetal} | | |",
                  f"| observed fetal fraction | {_pct(o.estimate)} | {_pct(o.lo)} – {_pct(o.hi)}"
                  " | Wilson score |"]
        if s.corrected is not None:
            c, b = s.corrected, s.bleed
            method = {"lang-reiczigel": "Rogan–Gladen, Lang & Reiczigel (2014) interval "
                                        "incl. Se/Sp uncertainty",
                      "exact": "Rogan–Gladen, Clopper–Pearson limits transformed "
                               "(Reiczigel et al. 2010)",
                      "wilson": "Rogan–Gladen, Wilson limits transformed"}[c.method]
            lines += [f"| corrected fetal fraction | {_pct(c.estimate)} | {_pct(c.lo)} – "
                      f"{_pct(c.hi)} | {method} |",
                      f"| fetal bleed [mL whole blood] | {b.estimate:.3g} | {b.lo:.3g} – "
                      f"{b.hi:.3g} | corrected fraction × {s.maternal_blood_volume_ml:g} mL "
                      "maternal blood volume (Kleihauer–Betke calculation) |",
                      f"| detection limit | {_pct(s.detection_limit)} "
                      f"(≈ {s.detection_limit_ml:.3g} mL) | | smallest fraction "
                      "distinguishable from zero |"]
        lines += ["", detection_sentence(s), ""]
    lines += ["## Model", ""]
    if model:
        val = model.get("validation") or {}
        lines += [f"- id: `{model.get('model_id') or model.get('id') or '?'}`"
                  + (f" (sha256 `{str(model['sha256'])[:16]}…`)" if model.get("sha256") else ""),
                  f"- trained on: {model.get('trained_on') or 'not recorded'}",
                  "- validation: " + (", ".join(f"{k} {v}" for k, v in val.items())
                                      if val else "not recorded"), ""]
    else:
        lines += ["No model recorded in the manifest (cells not classified).", ""]
    counts = manifest.get("counts") or {}
    lines += ["## Counts", "", "| count | value |", "|---|---|"]
    main = ["frames_read", "frames_processed", "frames_dropped", "frame_gaps", "cells_tracked",
            "clips_sent", "clips_spilled", "clips_resent", "predictions", "errors"]
    for k in main:
        lines.append(f"| {k.replace('_', ' ')} | {counts.get(k, 'not recorded')} |")
    for k, v in counts.items():
        if k not in main:
            lines.append(f"| {k.replace('_', ' ')} | {v} |")
    if "status" in cols:
        st, n = np.unique(np.asarray(cols["status"], dtype=str), return_counts=True)
        lines += ["", "Tracks by status: " + ", ".join(f"{a} {b}" for a, b in zip(st, n))]
    lines += ["", "## Figures", ""]
    for title, fname in figures:
        lines += [f"### {title}", "", f"![{title}]({fname})", ""]
    if notes or (s is not None and s.notes):
        lines += ["## Notes", ""]
        lines += [f"- {n}" for n in (list(s.notes) if s else []) + list(notes)]
        lines.append("")
    lines += ["## Methods", "",
              "Observed fraction: Wilson score interval. Corrected fraction: Rogan & Gladen "
              "(1978), (p_obs + Sp − 1)/(Se + Sp − 1), clipped to [0, 1]; interval by Lang & "
              "Reiczigel (2014) when the validation set's sizes are known (includes the "
              "uncertainty of Se and Sp), else exact Clopper–Pearson limits transformed "
              "(Reiczigel, Földi & Ózsvári 2010). Bleed: fetal fraction × maternal blood volume "
              "(Kleihauer–Betke: mL fetal blood = % fetal cells × 50 for 5000 mL). Detection "
              "limit: the smallest true fraction whose expected count gives a lower confidence "
              "limit above zero.", ""]
    return "\n".join(lines)


def _figures(run: Path, cols, classified, is_fetal, manifest, cfg):
    """PNG figures; returns ([(title, file)], notes about skipped figures)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out, notes = [], []

    def save(fig, name, title):
        FigureCanvasAgg(fig)
        fig.tight_layout()
        fig.savefig(str(run / name), dpi=100)
        out.append((title, name))

    p = np.asarray(cols.get("p_fetal", []), dtype=np.float64)
    if classified.any():
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        ax.hist(p[classified], bins=np.linspace(0, 1, 41), color="0.4")
        thr = _get(manifest, "model", "threshold")
        try:
            ax.axvline(float(thr), color="r", ls="--", label=f"threshold {float(thr):g}")
            ax.legend()
        except (TypeError, ValueError):
            pass
        ax.set_yscale("log" if classified.sum() > 200 else "linear")
        ax.set_xlabel("p(fetal)")
        ax.set_ylabel("cells")
        save(fig, "p_fetal_hist.png", "p(fetal) histogram")
    else:
        notes.append("p(fetal) histogram skipped: no classified cells")

    an, area = _first(cols, _AREA)
    dn, deform = _first(cols, _DEFORM)
    if area is not None and deform is not None:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ok = np.isfinite(area) & np.isfinite(deform)
        for sel, name, colour in ((ok & ~classified, "unclassified", "0.7"),
                                  (ok & classified & ~is_fetal, "maternal", "tab:blue"),
                                  (ok & is_fetal, "fetal", "tab:red")):
            if sel.any():
                ax.scatter(area[sel], deform[sel], s=6, c=colour, label=f"{name} ({sel.sum()})",
                           alpha=0.7, edgecolors="none")
        ax.set_xlabel(an + (" [µm²]" if an == "area_um" else " [px]"))
        ax.set_ylabel(dn + (" (constriction)" if dn == "deform_in" else ""))
        if ok.any():
            ax.legend(fontsize=8)
        save(fig, "deform_vs_area.png", "Deformation vs area, by predicted class")
    else:
        missing = [x for x, c in (("area (" + "/".join(_AREA) + ")", area),
                                  ("deformation (" + "/".join(_DEFORM) + ")", deform)) if c is None]
        notes.append(f"deformation vs area figure skipped: cells.parquet has no {' or '.join(missing)}"
                     " column")

    tn, transit = _first(cols, _TRANSIT)
    if transit is not None and np.isfinite(transit).any():
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        t = transit[np.isfinite(transit)]
        ax.hist(t, bins=40, color="0.4")
        ax.set_xlabel("transit time through the constriction [ms]")
        ax.set_ylabel("cells")
        save(fig, "transit_time_hist.png", "Transit time")
    else:
        notes.append("transit time figure skipped: cells.parquet has no "
                     f"{'/'.join(_TRANSIT)} column with values")

    fps = _get(manifest, "config", "camera", "fps") or _get(manifest, "source", "fps") \
        or cfg.camera.fps
    _, last = _first(cols, ("last_frame", "first_frame"))
    _, first = _first(cols, ("first_frame",))
    if last is not None and np.isfinite(last).any():
        ok = np.isfinite(last)
        origin = np.nanmin(first) if first is not None and np.isfinite(first).any() \
            else last[ok].min()
        t = (last[ok] - origin) / float(fps)          # when each cell left the channel [s]
        edges = np.arange(0.0, math.floor(t.max()) + 2.0, 1.0)
        h, _ = np.histogram(t, bins=edges)
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        ax.stairs(h, edges, color="0.2")
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"time in run [s] (frame / {float(fps):g} fps)")
        ax.set_ylabel("cells per second")
        save(fig, "cells_per_second.png", "Cells per second over the run")
    else:
        notes.append("cells-per-second figure skipped: cells.parquet has no last_frame column")
    return out, notes
