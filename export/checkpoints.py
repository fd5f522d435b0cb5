"""Our checkpoint format, and conversion from PySlowFast / PyTorchVideo weights.

Our format (``fmh-checkpoint/1``) is a plain dict saved with :func:`torch.save` that
:func:`torch.load` reads with ``weights_only=True``: tensors, strings, numbers, lists and
dicts only. It carries the weights, the full model config, the input normalisation, the clip
sampling, the class names, the decision threshold and the training/validation figures, so that
``fmh export`` needs nothing else.

Foreign checkpoints (PySlowFast ``.pyth`` with a ``model_state`` entry, PyTorchVideo hub
state dicts, either wrapped in ``state_dict``/``model`` or with a DataParallel ``module.``
prefix) are converted through :data:`KEY_MAP`, one table with a row per layer kind. The layout
is detected from the keys, every key must map (no silent partial load: missing and unexpected
keys raise :class:`~engine.errors.ModelError` naming them), and RGB stem weights are folded to
one grey channel by summing over the colour axis (exact when the grey image is fed to all three
channels with the same mean and std, as Kinetics models use: mean 0.45, std 0.225).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from engine.errors import ModelError

from .slowfast import STAGE_DEPTHS, SlowFast, SlowFastConfig

__all__ = ["FORMAT", "Checkpoint", "save_checkpoint", "load_checkpoint", "KEY_MAP",
           "detect_layout", "to_layout", "convert_state_dict", "import_checkpoint",
           "ConversionReport", "default_normalisation", "default_sampling", "LAYOUTS"]

FORMAT = "fmh-checkpoint/1"
LAYOUTS = ("fmh", "pytorchvideo", "pyslowfast")

# One row per layer kind: our key (regex with named groups), PyTorchVideo key, PySlowFast key.
# Fields in the foreign templates: {pi} pathway index (slow 0, fast 1), {k}/{i} stage/block
# indices, {k1} = k + 1, {k2} = k + 2, {x} the parameter or buffer name.
_RES = r"stages\.(?P<k>\d+)\.(?P<p>slow|fast)\.(?P<i>\d+)\."
_PTV_RES = "blocks.{k1}.multipathway_blocks.{pi}.res_blocks.{i}."
_PSF_RES = "s{k2}.pathway{pi}_res{i}."
KEY_MAP: tuple[tuple[str, str, str], ...] = (
    # ours                                     PyTorchVideo                                     PySlowFast
    (r"stem_(?P<p>slow|fast)\.conv\.(?P<x>\w+)", "blocks.0.multipathway_blocks.{pi}.conv.{x}", "s1.pathway{pi}_stem.conv.{x}"),
    (r"stem_(?P<p>slow|fast)\.bn\.(?P<x>\w+)", "blocks.0.multipathway_blocks.{pi}.norm.{x}", "s1.pathway{pi}_stem.bn.{x}"),
    (r"fusions\.(?P<k>\d+)\.conv\.(?P<x>\w+)", "blocks.{k}.multipathway_fusion.conv_fast_to_slow.{x}", "s{k1}_fuse.conv_f2s.{x}"),
    (r"fusions\.(?P<k>\d+)\.bn\.(?P<x>\w+)", "blocks.{k}.multipathway_fusion.norm.{x}", "s{k1}_fuse.bn.{x}"),
    (_RES + r"conv_a\.(?P<x>\w+)", _PTV_RES + "branch2.conv_a.{x}", _PSF_RES + "branch2.a.{x}"),
    (_RES + r"bn_a\.(?P<x>\w+)", _PTV_RES + "branch2.norm_a.{x}", _PSF_RES + "branch2.a_bn.{x}"),
    (_RES + r"conv_b\.(?P<x>\w+)", _PTV_RES + "branch2.conv_b.{x}", _PSF_RES + "branch2.b.{x}"),
    (_RES + r"bn_b\.(?P<x>\w+)", _PTV_RES + "branch2.norm_b.{x}", _PSF_RES + "branch2.b_bn.{x}"),
    (_RES + r"conv_c\.(?P<x>\w+)", _PTV_RES + "branch2.conv_c.{x}", _PSF_RES + "branch2.c.{x}"),
    (_RES + r"bn_c\.(?P<x>\w+)", _PTV_RES + "branch2.norm_c.{x}", _PSF_RES + "branch2.c_bn.{x}"),
    (_RES + r"shortcut\.(?P<x>\w+)", _PTV_RES + "branch1_conv.{x}", _PSF_RES + "branch1.{x}"),
    (_RES + r"shortcut_bn\.(?P<x>\w+)", _PTV_RES + "branch1_norm.{x}", _PSF_RES + "branch1_bn.{x}"),
    (r"head\.proj\.(?P<x>\w+)", "blocks.6.proj.{x}", "head.projection.{x}"),
)
# A key that only one layout has, used to recognise it.
_SIGNATURE = {"fmh": "stem_slow.conv.weight",
              "pytorchvideo": "blocks.0.multipathway_blocks.0.conv.weight",
              "pyslowfast": "s1.pathway0_stem.conv.weight"}
_WRAPPERS = ("model_state", "state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "model.")
_PATHWAYS = ("slow", "fast")


def default_normalisation(channels: int = 1) -> dict[str, Any]:
    """Kinetics/PySlowFast normalisation: x = (u8 / 255 - 0.45) / 0.225 per channel."""
    return {"scale": 1.0 / 255.0, "mean": [0.45] * channels, "std": [0.225] * channels}


def default_sampling(canvas: int = 64) -> dict[str, Any]:
    """Uniform temporal sampling over the passage, fixed canvas centred on the cell."""
    return {"mode": "uniform", "crop": "fixed", "canvas": int(canvas)}


def _plain(value: Any, what: str) -> Any:
    """JSON-safe copy (numpy scalars -> float/int); weights_only loads only plain types."""
    try:
        return json.loads(json.dumps(value, default=_to_builtin, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"checkpoint {what}: not JSON-serialisable ({exc})") from None


def _to_builtin(obj: Any) -> Any:
    if hasattr(obj, "tolist") and callable(obj.tolist):    # numpy/torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not a plain value")


@dataclass(frozen=True)
class Checkpoint:
    """A trained (or converted) model with everything needed to run and export it.

    Parameters
    ----------
    config : SlowFastConfig
    state_dict : dict of str to Tensor
        Weights in our layout (``SlowFast.state_dict()``).
    classes : tuple of str
        Class names in logit order.
    positive_class : str
        The class whose probability is thresholded (``"fetal"``).
    threshold : float
        Decision threshold on p(positive class).
    normalisation : dict
        ``{"scale": s, "mean": [...], "std": [...]}``, applied as ``(u8 * s - mean) / std``.
    sampling : dict
        ``{"mode": "uniform", "crop": "fixed", "canvas": 64}`` (see engine.infer.preprocess).
    metrics : dict
        Training metrics (epoch, losses, ...), free form but JSON-safe.
    validation : dict
        ``sensitivity``, ``specificity``, ``auc``, ``n_cells``, ``n_donors`` on validation.
    trained_on : str
        What the model was trained on, in words.
    extra : dict
        Anything else that is weights_only-safe (optimizer state, epoch, RNG) for resuming.
    """

    config: SlowFastConfig
    state_dict: Mapping[str, torch.Tensor]
    classes: tuple[str, ...] = ("maternal", "fetal")
    positive_class: str = "fetal"
    threshold: float = 0.5
    normalisation: Mapping[str, Any] = field(default_factory=default_normalisation)
    sampling: Mapping[str, Any] = field(default_factory=default_sampling)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    validation: Mapping[str, Any] = field(default_factory=dict)
    trained_on: str = ""
    created: str = ""
    software: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.classes) != self.config.num_classes:
            raise ModelError(f"checkpoint: {len(self.classes)} class names {list(self.classes)} "
                             f"for a model with num_classes={self.config.num_classes}")
        if self.positive_class not in self.classes:
            raise ModelError(f"checkpoint: positive_class {self.positive_class!r} is not one of "
                             f"{list(self.classes)}")
        if not (0.0 <= float(self.threshold) <= 1.0):
            raise ModelError(f"checkpoint: threshold {self.threshold!r} is not in [0, 1]")
        n = self.normalisation
        for key in ("scale", "mean", "std"):
            if key not in n:
                raise ModelError(f"checkpoint: normalisation lacks {key!r}")
        for key in ("mean", "std"):
            if len(n[key]) not in (1, self.config.in_channels):
                raise ModelError(f"checkpoint: normalisation {key} {n[key]} has neither 1 nor "
                                 f"{self.config.in_channels} (in_channels) values")
        if any(float(s) <= 0 for s in n["std"]):
            raise ModelError(f"checkpoint: normalisation std {n['std']} must be positive")

    @classmethod
    def from_model(cls, model: SlowFast, **meta: Any) -> "Checkpoint":
        """Snapshot of a model's weights (on CPU) with the given metadata."""
        sd = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
        if "normalisation" not in meta:
            meta["normalisation"] = default_normalisation(model.config.in_channels)
        if "sampling" not in meta:
            meta["sampling"] = default_sampling(model.config.crop)
        return cls(config=model.config, state_dict=sd, **meta)

    def build_model(self) -> SlowFast:
        """A SlowFast with these weights, in ``eval()`` mode; mismatches raise ModelError."""
        model = SlowFast(self.config)
        _load_strict(model, self.state_dict, "checkpoint")
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        """The saved form: plain types only (loads with ``weights_only=True``)."""
        out = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().to("cpu") for k, v in self.state_dict.items()},
            "classes": list(self.classes),
            "positive_class": self.positive_class,
            "threshold": float(self.threshold),
        }
        for name in ("normalisation", "sampling", "metrics", "validation"):
            out[name] = _plain(dict(getattr(self, name)), name)
        out["trained_on"] = str(self.trained_on)
        out["created"] = self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds")
        out["software"] = self.software or _software()
        out["extra"] = dict(self.extra)
        return out


def _software() -> str:
    from engine import __version__
    return f"fmh-engine {__version__}"


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically to ``path`` (``torch.save``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt.to_dict(), tmp)
    os.replace(tmp, path)
    return path


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: cannot read as a weights-only torch checkpoint ({msg}); "
                         "only tensors and plain values are loaded, never pickled objects") from None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read one of our checkpoints (``weights_only=True``) and validate it.

    Raises
    ------
    ModelError
        Naming the file and the missing/bad entry; a PySlowFast or PyTorchVideo file gets a
        hint to use :func:`import_checkpoint`.
    """
    path = Path(path)
    data = _torch_load(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        hint = ""
        try:
            hint = (f" (looks like a {detect_layout(_unwrap(data))} checkpoint: convert it with "
                    "`fmh export --import-foreign` or export.checkpoints.import_checkpoint)")
        except ModelError:
            pass
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ModelError(f"{path}: not an {FORMAT} checkpoint (format: {got!r}){hint}")
    for key in ("config", "state_dict", "classes"):
        if key not in data:
            raise ModelError(f"{path}: checkpoint lacks {key!r}")
    try:
        config = SlowFastConfig.from_dict(data["config"])
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: bad model config: {exc}") from None
    kwargs = {k: data[k] for k in ("positive_class", "threshold", "normalisation", "sampling",
                                   "metrics", "validation", "trained_on", "created", "software",
                                   "extra") if k in data}
    try:
        ckpt = Checkpoint(config=config, state_dict=data["state_dict"],
                          classes=tuple(data["classes"]), **kwargs)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    _check_keys(_expected_shapes(config), ckpt.state_dict, str(path))
    return ckpt


# --------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------

def _fields(m: re.Match) -> dict[str, Any]:
    g = m.groupdict()
    out: dict[str, Any] = {"x": g["x"]}
    if g.get("p"):
        out["pi"] = _PATHWAYS.index(g["p"])
    if g.get("k") is not None:
        k = int(g["k"])
        out.update(k=k, k1=k + 1, k2=k + 2)
    if g.get("i") is not None:
        out["i"] = int(g["i"])
    return out


def _ours_to(layout: str, key: str) -> str | None:
    if layout == "fmh":
        return key
    col = LAYOUTS.index(layout)
    for row in KEY_MAP:
        m = re.fullmatch(row[0], key)
        if m:
            return row[col].format(**_fields(m))
    return None


def _template_regex(template: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        out.append(rf"(?P<{name}>\w+)" if name == "x" else rf"(?P<{name}>\d+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return "".join(out)


def _ours_template(regex: str) -> str:
    """Our key as a format string: each named group becomes ``{name}``."""
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", regex).replace("\\.", ".")


_REVERSE: dict[str, list[tuple[re.Pattern, str]]] = {
    layout: [(re.compile(_template_regex(row[col])), _ours_template(row[0])) for row in KEY_MAP]
    for col, layout in enumerate(LAYOUTS) if col > 0}


def _foreign_to_ours(layout: str, key: str) -> str | None:
    if layout == "fmh":
        return key
    for pattern, ours in _REVERSE[layout]:
        m = pattern.fullmatch(key)
        if not m:
            continue
        g = {k: int(v) if k != "x" else v for k, v in m.groupdict().items()}
        if "pi" in g:
            if g["pi"] >= len(_PATHWAYS):
                return None
            g["p"] = _PATHWAYS[g["pi"]]
        if "k1" in g:
            g["k"] = g["k1"] - 1
        if "k2" in g:
            g["k"] = g["k2"] - 2
        return ours.format(**g)
    return None


def to_layout(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename our keys into ``layout``'s ("pytorchvideo" or "pyslowfast"); inverse of the
    conversion, used to test it and to hand weights to those code bases."""
    if layout not in LAYOUTS:
        raise ModelError(f"unknown checkpoint layout {layout!r} (known: {', '.join(LAYOUTS)})")
    out = {}
    for key, value in state_dict.items():
        new = _ours_to(layout, key)
        if new is None:
            raise ModelError(f"key {key!r} has no {layout} name in KEY_MAP")
        out[new] = value
    return out


def _unwrap(data: Any) -> dict[str, Any]:
    if isinstance(data, Mapping):
        for name in _WRAPPERS:
            if name in data and isinstance(data[name], Mapping):
                data = data[name]
                break
    if not isinstance(data, Mapping):
        raise ModelError(f"checkpoint holds a {type(data).__name__}, not a state dict")
    sd = dict(data)
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """"fmh", "pytorchvideo" or "pyslowfast", from which signature key the dict has."""
    found = [name for name, key in _SIGNATURE.items() if key in state_dict]
    if len(found) != 1:
        sample = ", ".join(list(state_dict)[:4])
        raise ModelError("cannot tell the checkpoint layout: expected exactly one of the keys "
                         f"{', '.join(_SIGNATURE.values())}; found {found or 'none'} "
                         f"(first keys: {sample})")
    return found[0]


def _infer_config(sd: Mapping[str, torch.Tensor], **overrides: Any) -> SlowFastConfig:
    """Depth, widths, classes, channels and fusion kernel from the shapes of our-layout keys."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ModelError(f"checkpoint lacks {key!r}, needed to infer the architecture")
        return tuple(sd[key].shape)
    stem = shape("stem_slow.conv.weight")
    fast = shape("stem_fast.conv.weight")
    fuse = shape("fusions.0.conv.weight")
    head = shape("head.proj.weight")
    blocks = [len({int(m.group(1)) for k in sd
                   for m in [re.match(rf"stages\.{s}\.slow\.(\d+)\.", k)] if m}) for s in range(4)]
    basic = "stages.0.slow.0.conv_c.weight" not in sd
    depth = next((d for d, n in STAGE_DEPTHS.items() if tuple(blocks) == n and (d == 18) == basic),
                 None)
    if depth is None:
        raise ModelError(f"checkpoint has {blocks} blocks per stage "
                         f"({'basic' if basic else 'bottleneck'}), which matches no depth in "
                         f"{sorted(STAGE_DEPTHS)}")
    inferred = dict(depth=depth, in_channels=stem[1], width=stem[0], beta_inv=stem[0] // fast[0],
                    fusion_kernel=fuse[2], fusion_channel_ratio=fuse[0] // fuse[1],
                    num_classes=head[0])
    inferred.update(overrides)
    try:
        return SlowFastConfig(**inferred)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_state_dict` did."""

    layout: str
    n_tensors: int
    folded_grey: bool
    dropped_head: tuple[str, ...] = ()

    def __str__(self) -> str:
        s = f"{self.layout} layout, {self.n_tensors} tensors"
        if self.folded_grey:
            s += ", RGB stems folded to grey"
        if self.dropped_head:
            s += f", head dropped ({', '.join(self.dropped_head)})"
        return s


def _expected_shapes(config: SlowFastConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = SlowFast(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_keys(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor],
                where: str) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad = [f"{k} {tuple(sd[k].shape)} != {expected[k]}" for k in expected
           if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:8])}"
                        + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:8])}"
                        + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    if bad:
        problems.append(f"wrong shapes: {', '.join(bad[:4])}")
    if problems:
        raise ModelError(f"{where}: weights do not fit the model; " + "; ".join(problems))


def _load_strict(model: SlowFast, sd: Mapping[str, torch.Tensor], where: str) -> None:
    _check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd, where)
    model.load_state_dict(dict(sd), strict=True)


def convert_state_dict(data: Any, *, in_channels: int | None = None,
                       num_classes: int | None = None, reset_head: bool = False,
                       **config: Any) -> tuple[SlowFastConfig, dict[str, torch.Tensor],
                                               ConversionReport]:
    """Translate a PySlowFast/PyTorchVideo (or our) state dict into our layout.

    Parameters
    ----------
    data : mapping
        A state dict, or a checkpoint dict wrapping one under ``model_state``/``state_dict``/
        ``model``; a ``module.`` prefix is removed.
    in_channels : int, optional
        1 folds RGB stem weights to grey (sum over the colour axis); default: as stored.
    num_classes : int, optional
        Classes of the new head. A value different from the stored head requires
        ``reset_head=True``, which drops the stored head (reported) so it is trained anew.
    **config
        Fields that the weights do not determine: ``alpha``, ``tau``, ``frames``, ``crop``,
        ``dropout``.

    Returns
    -------
    config : SlowFastConfig
    state_dict : dict
        Our keys; without ``head.*`` when the head was reset.
    report : ConversionReport

    Raises
    ------
    ModelError
        Unknown layout, any key that does not map (unexpected), any key the model needs that
        is absent (missing), or a wrong shape, each named.
    """
    sd = _unwrap(data)
    layout = detect_layout(sd)
    ours: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in sd.items():
        new = _foreign_to_ours(layout, key)
        if new is None:
            unexpected.append(key)
        else:
            ours[new] = value
    if unexpected:
        raise ModelError(f"{layout} checkpoint: unexpected keys with no entry in KEY_MAP: "
                         f"{', '.join(unexpected[:8])}"
                         + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    stored = _infer_config(ours, **config)
    folded = False
    if in_channels is not None and in_channels != stored.in_channels:
        if in_channels == 1:
            for key in ("stem_slow.conv.weight", "stem_fast.conv.weight"):
                ours[key] = ours[key].sum(dim=1, keepdim=True)
            folded = True
        else:
            raise ModelError(f"{layout} checkpoint: cannot turn {stored.in_channels} input "
                             f"channels into {in_channels} (only RGB -> grey folding)")
    dropped: tuple[str, ...] = ()
    if num_classes is not None and num_classes != stored.num_classes:
        if not reset_head:
            raise ModelError(f"{layout} checkpoint: head has {stored.num_classes} classes, "
                             f"{num_classes} asked; pass reset_head=True to train a new head")
        dropped = tuple(sorted(k for k in ours if k.startswith("head.")))
        for k in dropped:
            del ours[k]
    final = replace(stored, in_channels=1 if folded else stored.in_channels,
                    num_classes=num_classes or stored.num_classes)
    expected = _expected_shapes(final)
    if dropped:
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
    _check_keys(expected, ours, f"{layout} checkpoint")
    return final, ours, ConversionReport(layout, len(ours), folded, dropped)


def import_checkpoint(source: str | os.PathLike | Mapping[str, Any], *,
                      in_channels: int | None = 1, num_classes: int | None = None,
                      reset_head: bool = False, classes: tuple[str, ...] | None = None,
                      seed: int = 0, **config: Any) -> tuple[Checkpoint, ConversionReport]:
    """A :class:`Checkpoint` from a PySlowFast ``.pyth`` / PyTorchVideo file or state dict.

    Defaults fold to one grey channel; ``alpha``, ``frames``, ``crop``, ``tau`` must be given
    when they differ from our defaults (PyTorchVideo's SlowFast-R50 8x8: alpha=4, frames=32,
    crop=224). A reset head is initialised as :meth:`SlowFast.reset_parameters` does (seeded).
    """
    data = _torch_load(Path(source)) if isinstance(source, (str, os.PathLike)) else source
    cfg, sd, report = convert_state_dict(data, in_channels=in_channels, num_classes=num_classes,
                                         reset_head=reset_head, **config)
    if report.dropped_head:
        torch.manual_seed(seed)
        fresh = SlowFast(cfg).state_dict()
        for k in report.dropped_head:
            sd[k] = fresh[k]
    if classes is None:
        classes = ("maternal", "fetal") if cfg.num_classes == 2 else tuple(
            f"class_{i}" for i in range(cfg.num_classes))
    positive = "fetal" if "fetal" in classes else classes[-1]
    ckpt = Checkpoint(config=cfg, state_dict=sd, classes=tuple(classes), positive_class=positive,
                      normalisation=default_normalisation(cfg.in_channels),
                      sampling=default_sampling(cfg.crop),
                      trained_on=f"converted from a {report.layout} checkpoint")
    return ckpt, report

