"""The model artefact: one ONNX file whose metadata carries everything the runtime needs.

No torch here. The metadata keys (all values strings, JSON where structured) are::

    fmh.format          "fmh-model/1"
    fmh.arch            {"name", "depth", "alpha", "beta_inv", "tau", "fusion_kernel", "num_classes", ...}
    fmh.input           {"layout": "NCTHW", "channels", "frames", "height", "width",
                         "dtype": "float32", "input_name", "output_name"}
    fmh.sampling        {"mode": "uniform"|"stride", "crop": "fixed"|"resize", "canvas", ...}
    fmh.normalisation   {"scale", "mean": [...], "std": [...]}
    fmh.classes         ["maternal", "fetal"]
    fmh.positive_class  "fetal"
    fmh.output          "logits"
    fmh.threshold       "0.5"
    fmh.validation      {"sensitivity", "specificity", "auc", "n_cells", "n_donors"} (null if unknown)
    fmh.trained_on      free text
    fmh.created         ISO 8601 time
    fmh.software        "fmh-engine x.y.z"

:meth:`ModelArtefact.load` checks all of them and the graph's input/output against
``fmh.input``; anything missing or inconsistent raises :class:`~engine.errors.ModelError`
naming the file and the key. ``.meta`` holds the parsed values under the short names
(``meta["input"]["frames"]``, ``meta["threshold"]`` as a float, ...).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelError

__all__ = ["FORMAT", "REQUIRED_KEYS", "ModelArtefact", "default_model_path", "parse_metadata",
           "build_metadata", "load_artefact"]

FORMAT = "fmh-model/1"
_JSON = ("arch", "input", "sampling", "normalisation", "classes", "validation")
_TEXT = ("format", "positive_class", "output", "threshold", "trained_on", "created", "software")
REQUIRED_KEYS = tuple(f"fmh.{k}" for k in ("format", "arch", "input", "sampling", "normalisation",
                                           "classes", "positive_class", "output", "threshold",
                                           "validation", "trained_on", "created", "software"))
SAMPLING_MODES = ("uniform", "stride")
CROP_MODES = ("fixed", "resize", "bbox-resize")
VALIDATION_KEYS = ("sensitivity", "specificity", "auc", "n_cells", "n_donors")


def default_model_path() -> Path:
    """Where the bundled demo model lives: ``engine/data/demo_model.onnx`` (may be absent)."""
    return Path(__file__).resolve().parent.parent / "data" / "demo_model.onnx"


def _fail(where: str, key: str, what: str) -> ModelError:
    return ModelError(f"{where}: metadata {key}: {what}")


def _int(d: Mapping[str, Any], key: str, where: str, section: str, lo: int = 1) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _fail(where, section, f"{key}={v!r} must be an integer >= {lo}")
    return v


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_metadata(props: Mapping[str, str], where: str = "<model>") -> dict[str, Any]:
    """Check and parse ``fmh.*`` metadata strings into ``{short name: value}``.

    Raises
    ------
    ModelError
        Naming ``where`` and the first key that is missing or malformed.
    """
    fmt = props.get("fmh.format")
    if fmt is None:
        raise ModelError(f"{where}: not an fmh model (metadata fmh.format missing); export it "
                         "with `fmh export`")
    if fmt != FORMAT:
        raise _fail(where, "fmh.format", f"{fmt!r} is not supported (expected {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in props]
    if missing:
        raise ModelError(f"{where}: metadata missing {', '.join(missing)}")
    meta: dict[str, Any] = {}
    for key in _JSON:
        text = props[f"fmh.{key}"]
        try:
            meta[key] = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise _fail(where, f"fmh.{key}", f"not valid JSON ({exc}): {str(text)[:60]!r}") from None
    for key in _TEXT:
        meta[key] = props[f"fmh.{key}"]
    _validate(meta, where)
    return meta


def _validate(meta: dict[str, Any], where: str) -> None:
    inp = meta["input"]
    if not isinstance(inp, dict):
        raise _fail(where, "fmh.input", "must be a JSON object")
    if inp.get("layout") != "NCTHW":
        raise _fail(where, "fmh.input", f"layout={inp.get('layout')!r} must be 'NCTHW'")
    if inp.get("dtype") != "float32":
        raise _fail(where, "fmh.input", f"dtype={inp.get('dtype')!r} must be 'float32'")
    channels = _int(inp, "channels", where, "fmh.input")
    for k in ("frames", "height", "width"):
        _int(inp, k, where, "fmh.input")
    for k in ("input_name", "output_name"):
        if not isinstance(inp.get(k), str) or not inp[k]:
            raise _fail(where, "fmh.input", f"{k}={inp.get(k)!r} must be a non-empty string")

    norm = meta["normalisation"]
    if not isinstance(norm, dict) or not _num(norm.get("scale")) or norm["scale"] <= 0:
        raise _fail(where, "fmh.normalisation", f"scale must be a positive number, got {norm!r}")
    for k in ("mean", "std"):
        v = norm.get(k)
        if (not isinstance(v, list) or len(v) not in (1, channels)
                or not all(_num(x) for x in v)):
            raise _fail(where, "fmh.normalisation",
                        f"{k}={v!r} must be a list of 1 or {channels} numbers")
    if any(s <= 0 for s in norm["std"]):
        raise _fail(where, "fmh.normalisation", f"std={norm['std']!r} must be positive")

    samp = meta["sampling"]
    if not isinstance(samp, dict):
        raise _fail(where, "fmh.sampling", "must be a JSON object")
    if samp.get("mode") not in SAMPLING_MODES:
        raise _fail(where, "fmh.sampling", f"mode={samp.get('mode')!r} is not one of "
                    f"{', '.join(SAMPLING_MODES)}")
    if samp["mode"] == "stride":
        _int(samp, "stride", where, "fmh.sampling")
    if samp.get("crop", "fixed") not in CROP_MODES:
        raise _fail(where, "fmh.sampling", f"crop={samp.get('crop')!r} is not one of "
                    f"{', '.join(CROP_MODES)}")

    classes = meta["classes"]
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise _fail(where, "fmh.classes", f"{classes!r} must be a list of distinct names")
    if meta["positive_class"] not in classes:
        raise _fail(where, "fmh.positive_class",
                    f"{meta['positive_class']!r} is not one of {classes}")
    if meta["output"] != "logits":
        raise _fail(where, "fmh.output", f"{meta['output']!r} is not supported (expected 'logits')")
    try:
        thr = float(meta["threshold"])
    except ValueError:
        raise _fail(where, "fmh.threshold", f"{meta['threshold']!r} is not a number") from None
    if not 0.0 <= thr <= 1.0:
        raise _fail(where, "fmh.threshold", f"{thr} is not in [0, 1]")
    meta["threshold"] = thr

    arch = meta["arch"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise _fail(where, "fmh.arch", f"{arch!r} must be an object with a name")
    if arch.get("num_classes", len(classes)) != len(classes):
        raise _fail(where, "fmh.arch", f"num_classes={arch.get('num_classes')} but fmh.classes "
                    f"lists {len(classes)}")
    if not isinstance(meta["validation"], dict):
        raise _fail(where, "fmh.validation", "must be a JSON object")


def build_metadata(*, arch: Mapping[str, Any], input: Mapping[str, Any],
                   sampling: Mapping[str, Any], normalisation: Mapping[str, Any],
                   classes: list[str] | tuple[str, ...], positive_class: str,
                   threshold: float, validation: Mapping[str, Any] | None = None,
                   trained_on: str = "", created: str | None = None,
                   software: str | None = None) -> dict[str, str]:
    """The ``fmh.*`` metadata strings for an ONNX file, checked by :func:`parse_metadata`."""
    if software is None:
        from .. import __version__
        software = f"fmh-engine {__version__}"
    if created is None:
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    val = {k: None for k in VALIDATION_KEYS}
    val.update(dict(validation or {}))
    props = {
        "fmh.format": FORMAT,
        "fmh.arch": json.dumps(dict(arch)),
        "fmh.input": json.dumps(dict(input)),
        "fmh.sampling": json.dumps(dict(sampling)),
        "fmh.normalisation": json.dumps(dict(normalisation)),
        "fmh.classes": json.dumps(list(classes)),
        "fmh.positive_class": str(positive_class),
        "fmh.output": "logits",
        "fmh.threshold": repr(float(threshold)),
        "fmh.validation": json.dumps(val),
        "fmh.trained_on": str(trained_on),
        "fmh.created": created,
        "fmh.software": software,
    }
    parse_metadata(props, "<new model>")
    return props


@dataclass(frozen=True)
class ModelArtefact:
    """A validated model file.

    Attributes
    ----------
    path : Path
    meta : dict
        Parsed metadata under short names: ``arch``, ``input``, ``sampling``,
        ``normalisation``, ``classes``, ``positive_class``, ``output``, ``threshold`` (float),
        ``validation``, ``trained_on``, ``created``, ``software``, ``format``.
    sha256 : str
        Hex digest of the file's bytes.
    model_id : str
        ``<file stem>-<first 12 hex digits of sha256>``.
    raw : dict
        The metadata strings as stored.
    """

    path: Path
    meta: dict[str, Any]
    sha256: str
    model_id: str
    raw: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "ModelArtefact":
        """Read and validate ``path`` (None or "": the bundled demo model).

        Raises
        ------
        ModelError
            File missing, not ONNX, not an fmh model, a metadata key missing or malformed, or a
            graph whose input/output does not match ``fmh.input``.
        """
        bundled = path is None or str(path) == ""
        p = default_model_path() if bundled else Path(path)
        if not p.is_file():
            if bundled:
                raise ModelError(f"{p}: the bundled demo model is not there; train and export "
                                 "one (`fmh train`, `fmh export`) or pass a model path")
            raise ModelError(f"{p}: model file not found")
        data = p.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        try:
            import onnx
        except ImportError:  # pragma: no cover - onnx is a runtime dependency
            raise ModelError("the onnx package is needed to read model metadata") from None
        try:
            model = onnx.load_model_from_string(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
            raise ModelError(f"{p}: not a valid ONNX file ({type(exc).__name__}: "
                             f"{str(exc)[:80]})") from None
        props = {e.key: e.value for e in model.metadata_props}
        meta = parse_metadata(props, str(p))
        _check_graph(model, meta, str(p))
        return cls(path=p, meta=meta, sha256=sha, model_id=f"{p.stem}-{sha[:12]}", raw=props)

    # Conveniences -------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one clip."""
        i = self.meta["input"]
        return (i["channels"], i["frames"], i["height"], i["width"])

    @property
    def input_name(self) -> str:
        return self.meta["input"]["input_name"]

    @property
    def output_name(self) -> str:
        return self.meta["input"]["output_name"]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])

    @property
    def positive_index(self) -> int:
        return self.meta["classes"].index(self.meta["positive_class"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])


def _dims(value_info) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _check_graph(model, meta: dict[str, Any], where: str) -> None:
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    inp = meta["input"]
    if len(inputs) != 1 or inputs[0].name != inp["input_name"]:
        raise _fail(where, "fmh.input", f"graph inputs {[i.name for i in inputs]} are not the "
                    f"single input {inp['input_name']!r}")
    dims = _dims(inputs[0])
    expect = [inp["channels"], inp["frames"], inp["height"], inp["width"]]
    if len(dims) != 5 or dims[1:] != expect:
        raise _fail(where, "fmh.input", f"graph input shape {dims} does not match "
                    f"[batch, {', '.join(map(str, expect))}]")
    outs = [o.name for o in g.output]
    if outs != [inp["output_name"]]:
        raise _fail(where, "fmh.input", f"graph outputs {outs} are not [{inp['output_name']!r}]")
    odims = _dims(g.output[0])
    if len(odims) != 2 or (isinstance(odims[1], int) and odims[1] != len(meta["classes"])):
        raise _fail(where, "fmh.classes", f"graph output shape {odims} does not match "
                    f"{len(meta['classes'])} classes")


def load_artefact(path: str | os.PathLike | None = None) -> ModelArtefact:
    """Same as :meth:`ModelArtefact.load`."""
    return ModelArtefact.load(path)
