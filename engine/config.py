"""Typed, validated configuration: one section per stage, loaded from YAML once.

``load_config()`` reads ``configs/default.yaml`` (or a user file layered on top of it), applies
``section.key=value`` overrides from the command line, and returns a frozen :class:`Config`.
An unknown key, a wrong type or an impossible value raises :class:`ConfigError` naming the file
and the key.

Each section is a frozen dataclass. A field's constraints live in its metadata, written with
:func:`opt`; the validator below reads them, so adding a key is one line in one place.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from .errors import ConfigError

__all__ = ["opt", "Config", "load_config", "default_config_path", "parse_override",
           "CameraConfig", "ChipConfig", "FrontEndConfig", "TrackerConfig", "ClipConfig",
           "ModelConfig", "ServingConfig", "RingConfig", "SimConfig", "ReportConfig"]


def opt(default: Any, *, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, help: str = "") -> Any:
    """A config field with a default, optional numeric bounds and a one-line help text.

    ``lo``/``hi`` bound numbers (and each item of a tuple of numbers); ``lo_open`` makes the
    lower bound strict (``> lo``).
    """
    if isinstance(default, (list, dict)):
        raise TypeError("config defaults must be immutable; use a tuple")
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "help": help})


# --------------------------------------------------------------------------------------------
# Sections. Keep them in the order a frame travels. Units in brackets in the help text.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CameraConfig:
    width: int = opt(800, lo=8, help="frame width [px]")
    height: int = opt(150, lo=8, help="frame height [px]")
    bit_depth: int = opt(8, lo=8, hi=8, help="bits per pixel (only 8-bit grey is supported)")
    fps: float = opt(500.0, lo=0, lo_open=True, help="frame rate [1/s]")
    shutter_us: float = opt(25.0, lo=0, lo_open=True, help="exposure time [µs]")


@dataclass(frozen=True)
class ChipConfig:
    name: str = opt("PolyNano channel 4", help="chip and channel name")
    pixel_size_um: float = opt(0.23, lo=0, lo_open=True, help="object-side pixel size [µm/px]")
    constriction_width_um: float = opt(5.0, lo=0, lo_open=True, help="constriction width [µm]")
    axis_y: float = opt(75.0, lo=0, help="channel centre line [px]")
    constriction_x0: float = opt(300.0, lo=0, help="constriction start [px]")
    constriction_x1: float = opt(560.0, lo=0, help="constriction end [px]")
    inlet_halfwidth: float = opt(62.0, lo=1, help="half open width at the left edge [px]")
    outlet_halfwidth: float = opt(62.0, lo=1, help="half open width at the right edge [px]")
    funnel_length: float = opt(150.0, lo=0, help="length of the inlet funnel taper [px]")
    flare_length: float = opt(80.0, lo=0, help="length of the outlet flare [px]")


@dataclass(frozen=True)
class RingConfig:
    slots: int = opt(512, lo=2, help="frames held in the shared-memory ring")
    policy: Literal["auto", "block", "drop-oldest"] = opt(
        "auto", help="full-ring policy; auto = block for files, drop-oldest for cameras")


@dataclass(frozen=True)
class FrontEndConfig:
    bg_frames: int = opt(100, lo=3, help="frames sampled for the median background")
    bg_sigma: float = opt(4.0, lo=0, help="Gaussian blur of frames and median in the report's method (reference) [px]")
    bg_update_frames: int = opt(250, lo=0,
                                help="time constant of the running background [frames]; it is "
                                "sampled every 1/32 and made active every 1/2 of it (0: never)")
    threshold: float = opt(2.0, lo=0, help="report's T: |blur(frame) - bg| > T, blur bg_sigma "
                            "(the reference method) [grey levels]")
    fg_threshold: float = opt(6.0, lo=0, help="front end's low threshold |frame - bg| > T on frames "
                              "smoothed by smooth_sigma [grey levels]")
    smooth_sigma: float = opt(0.0, lo=0, help="blur of frame and background before thresholding [px]")
    smooth_auto: bool = opt(True, help="raise smooth_sigma to 1 px when the noise measured at "
                            "priming exceeds 2.5 grey levels, to 1.5 px above 5")
    seed_threshold: float = opt(0.0, lo=0, help="seed (high) threshold on the raw difference "
                                "[grey levels]; 0: auto = max(2 fg_threshold, 4.5 noise sd, 3)")
    seed_min_px: int = opt(3, lo=1, help="fewest seed pixels that open a region (noise below) [px]")
    roi_margin: int = opt(6, lo=0, help="region grown around each seed blob [px]")
    polarity: Literal["both", "dark", "bright"] = opt(
        "both", help="foreground is |frame - bg| > T (both), frame - bg < -T (dark) or > T (bright)")
    static_frames: int = opt(10, lo=0, help="blobs that stay within 1 px of one place this many "
                             "frames are stuck debris and dropped (0: keep all)")
    fill_holes: bool = opt(False, help="fill holes in blobs (a cell centre as bright as the "
                           "background), as dclab's masks")
    split_area_factor: float = opt(1.25, lo=0, help="blobs above this x the typical blob area "
                                   "are cut at a narrow neck (touching cells; 0: never)")
    split_neck_ratio: float = opt(0.6, lo=0, hi=1, help="a neck is narrower than this x the "
                                  "blob's extent on both sides")
    illumination: bool = opt(True, help="subtract each frame's median offset from the background")
    gain_every: int = opt(32, lo=0, help="every this many frames, fit frame = gain x background + "
                          "offset outside the blobs; the mean of 8 fits rescales the background "
                          "when it moves it by over 1.5 grey levels (0: never)")
    rejoin_min_deform: float = opt(0.1, lo=0, hi=1, help="a part needs deformation >= this "
                                   "(low circularity) to be re-joined")
    min_area: int = opt(50, lo=1, help="drop blobs smaller than this [px²]")
    max_area: int = opt(5000, lo=1, help="drop blobs larger than this [px²]")
    rejoin: bool = opt(True, help="re-join a cell split in two (report §3.6.1)")
    rejoin_max_gap: float = opt(10.0, lo=0, help="largest gap between the boxes of two parts [px]")
    geometry: Literal["auto", "config"] = opt(
        "auto", help="find the channel from the background (auto) or take it from chip")


@dataclass(frozen=True)
class TrackerConfig:
    gate_px: float = opt(12.0, lo=0, lo_open=True, help="search radius around the prediction [px]")
    max_gap: int = opt(3, lo=0, help="frames a track may miss before it ends")
    max_back_px: float = opt(2.0, lo=0, help="largest backwards step allowed [px]")
    min_frames: int = opt(5, lo=1, help="shorter tracks are discarded as noise")
    edge_margin: float = opt(4.0, lo=0, help="distance from the image edge that counts as entry/exit [px]")
    predictor: Literal["flow", "velocity", "null"] = opt(
        "flow", help="motion model: learned channel flow, constant velocity, or none")
    assign: Literal["lsa", "greedy"] = opt(
        "lsa", help="conflict resolution: joint assignment per subnet, or nearest first")
    prior_vx: float = opt(0.0, help="velocity assumed where the flow is not known yet [px/frame]")
    gate_growth: float = opt(0.25, lo=0, help="gate grows by this fraction per missed frame")
    flow_bin_px: float = opt(8.0, lo=0, lo_open=True, help="grid cell of the learned flow field [px]")
    max_subnet: int = opt(12, lo=1, help="larger conflicts are solved greedily and counted ambiguous")
    merge_area_ratio: float = opt(1.4, lo=1, help="a blob this much larger than a cell may hold two cells")
    min_travel_px: float = opt(5.0, lo=0, help="tracks that move less are dropped as static debris [px]")


@dataclass(frozen=True)
class ClipConfig:
    mode: Literal["fixed", "bbox-resize"] = opt(
        "fixed", help="fixed canvas centred on the cell, or the report's box resized")
    size: int = opt(64, lo=8, help="canvas side [px]")
    max_frames: int = opt(2048, lo=1,
                          help="longest clip kept [frames]; longer tracks are truncated")
    bbox_pad: int = opt(2, lo=0, help="margin around the square box in bbox-resize mode [px]")


@dataclass(frozen=True)
class ModelConfig:
    path: str = opt("", help="ONNX model artefact; empty: the bundled demo model")
    backend: Literal["auto", "onnxruntime", "tensorrt", "torch"] = opt("auto", help="inference backend")
    threshold: float = opt(-1.0, lo=-1, hi=1, help="decision threshold on p(fetal); -1: the model's own")
    views: Literal["single", "multi"] = opt("single", help="single view, or the report's 10x3 views")


@dataclass(frozen=True)
class ServingConfig:
    host: str = opt("127.0.0.1", help="bind address; non-local addresses require CURVE keys")
    port: int = opt(0, lo=0, hi=65535, help="dispatcher port (0: pick a free one)")
    pub_port: int = opt(0, lo=0, hi=65535, help="live predictions PUB port (0: pick a free one)")
    workers: int = opt(1, lo=0, help="local inference workers to start")
    max_batch: int = opt(8, lo=1, help="largest micro-batch")
    max_wait_ms: float = opt(5.0, lo=0, help="longest wait to fill a micro-batch [ms]")
    credits: int = opt(4, lo=1, help="clips a worker may hold at once")
    queue_capacity: int = opt(256, lo=1, help="clips held in memory before spilling to disk")
    spill_dir: str = opt("", help="where spilled clips go (empty: <out>/spill)")
    heartbeat_ms: float = opt(500.0, lo=1, help="worker heartbeat period [ms]")
    worker_timeout_ms: float = opt(3000.0, lo=1, help="a silent worker is declared dead after [ms]")
    max_attempts: int = opt(3, lo=1, help="sends of one clip before it is answered with an error")
    max_message_bytes: int = opt(64 * 1024 * 1024, lo=1024, help="largest accepted message [bytes]")
    curve_keys: str = opt("", help="folder with CURVE keys (fmh keys); required off-host")
    worker_nice: int = opt(0, lo=0, hi=19, help="niceness added to local workers (0: same "
                           "priority as the front end; higher protects acquisition on a busy "
                           "machine at the cost of latency)")
    worker_cpus: str = opt("auto", help="CPUs for the local workers, the rest to the front end: "
                           "'auto' (half of this process's CPUs, at least 1, when it may use "
                           "2 or more), 'none' (no pinning), or a list such as '1' or '4-7'")


@dataclass(frozen=True)
class SimConfig:
    seed: int = opt(0, help="random seed; same seed, same frames")
    rate_hz: float = opt(12.0, lo=0, help="mean cell arrival rate (Poisson) [1/s]")
    fetal_fraction: float = opt(0.5, lo=0, hi=1, help="probability that a cell is fetal")
    donor: int = opt(0, lo=0, help="donor number: sets the per-donor look")
    donor_look: float = opt(1.0, lo=0, help="strength of the per-donor look (0: all donors alike)")
    noise_sd: float = opt(1.5, lo=0, help="sensor noise [grey levels]")
    hot_pixels: int = opt(20, lo=0, help="number of hot pixels")
    flicker_sd: float = opt(0.6, lo=0, help="frame-to-frame illumination flicker [grey levels]")
    drift: float = opt(1.0, lo=0, help="strength of slow focus/illumination drift")
    debris: int = opt(2, lo=0, help="sticking debris particles")
    gap_rate: float = opt(0.0, lo=0, hi=1, help="probability that the camera loses a frame")
    background: float = opt(150.0, lo=0, hi=255, help="mean background grey level")
    wall_level: float = opt(60.0, lo=0, hi=255, help="wall grey level")
    speed_px_per_frame: float = opt(6.0, lo=0, lo_open=True,
                                    help="cell speed in the constriction [px/frame]")
    cell_diameter_px: float = opt(30.0, lo=4, help="mean cell diameter [px]")
    diameter_sd_px: float = opt(2.0, lo=0, help="spread of cell diameters within a class [px]")
    fetal_size_ratio: float = opt(1.05, lo=0, lo_open=True,
                                  help="mean fetal / mean maternal cell diameter")
    speed_exponent: float = opt(0.5, lo=0,
                                help="speed ~ (constriction width / local width)^exponent")
    min_gap_px: float = opt(3.0, lo=0, help="closest approach of two cells along x [px]")
    deform_maternal: float = opt(0.46, lo=0, hi=0.9,
                                 help="maternal deformation (a-b)/(a+b) in the constriction")
    deform_fetal: float = opt(0.43, lo=0, hi=0.9,
                              help="fetal deformation (a-b)/(a+b) in the constriction")
    deform_sd: float = opt(0.03, lo=0, help="per-cell spread of the deformation")
    shape_noise: float = opt(0.03, lo=0, help="frame-to-frame jitter of the deformation")
    relax_frames_maternal: float = opt(5.0, lo=0, lo_open=True,
                                       help="maternal shape relaxation time after the constriction [frames]")
    relax_frames_fetal: float = opt(12.0, lo=0, lo_open=True,
                                    help="fetal shape relaxation time after the constriction [frames]")
    relax_sd: float = opt(0.25, lo=0, help="relative per-cell spread of the relaxation time")
    split_fraction: float = opt(0.15, lo=0, hi=1,
                                help="cells whose centre and ends fade to background when squeezed")
    warmup_frames: int = opt(400, lo=0, help="frames simulated before frame 0 so cells are in view")


@dataclass(frozen=True)
class ReportConfig:
    maternal_blood_volume_ml: float = opt(5000.0, lo=0, lo_open=True,
                                          help="maternal blood volume for the bleed estimate [mL]")
    relevant_bleed_ml: float = opt(30.0, lo=0, lo_open=True,
                                   help="smallest clinically relevant fetal bleed [mL]")
    confidence: float = opt(0.95, lo=0.5, hi=0.999, help="confidence level of intervals")


SECTIONS: dict[str, type] = {
    "camera": CameraConfig, "chip": ChipConfig, "ring": RingConfig,
    "frontend": FrontEndConfig, "tracker": TrackerConfig, "clips": ClipConfig,
    "model": ModelConfig, "serving": ServingConfig, "sim": SimConfig, "report": ReportConfig,
}


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``source`` names the file(s) it came from."""

    camera: CameraConfig = field(default_factory=CameraConfig)
    chip: ChipConfig = field(default_factory=ChipConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    source: str = "<defaults>"

    def to_dict(self) -> dict:
        """Plain nested dict (JSON/YAML-safe) of every section."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def replace(self, **overrides: Any) -> "Config":
        """A copy with ``section_key=value`` or ``section={key: value}`` overrides, validated."""
        pairs = []
        for k, v in overrides.items():
            if isinstance(v, Mapping):
                pairs.extend((f"{k}.{kk}", vv) for kk, vv in v.items())
            else:
                sec, _, key = k.partition("_") if "." not in k else k.partition(".")
                pairs.append((f"{sec}.{key}", v))
        return _apply(self, pairs, where="<override>")

    def geometry(self):
        """The chip config as a :class:`~engine.types.ChipGeometry`."""
        from .types import ChipGeometry
        c = self.chip
        return ChipGeometry(
            width=self.camera.width, height=self.camera.height, axis_y=c.axis_y,
            constriction_x0=c.constriction_x0, constriction_x1=c.constriction_x1,
            constriction_halfwidth=0.5 * c.constriction_width_um / c.pixel_size_um,
            inlet_halfwidth=c.inlet_halfwidth, outlet_halfwidth=c.outlet_halfwidth,
            source="config")


def default_config_path() -> Path:
    """``configs/default.yaml`` of the checkout (or of the installed data files)."""
    here = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    if here.exists():
        return here
    import sys
    return Path(sys.prefix) / "configs" / "default.yaml"


def load_config(path: str | os.PathLike | None = None,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Load the defaults, layer ``path`` on top, then apply overrides.

    Parameters
    ----------
    path : path-like, optional
        A YAML file with any subset of the sections of ``configs/default.yaml``.
    overrides : sequence of "section.key=value" strings, or mapping "section.key" -> value
        Single keys from the command line (values are parsed as YAML scalars).

    Raises
    ------
    ConfigError
        Naming the file and the ``section.key`` that is unknown, mistyped or out of range.
    """
    cfg = Config()
    default = default_config_path()
    if default.exists():
        cfg = _apply_file(cfg, default)
    if path is not None:
        cfg = _apply_file(cfg, Path(path))
    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    else:
        pairs = [parse_override(s) for s in overrides]
    if pairs:
        cfg = _apply(cfg, pairs, where="command line")
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"frontend.threshold=3"`` -> ``("frontend.threshold", 3)``."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"command line: override {text!r} must look like section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _apply_file(cfg: Config, path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    pairs = []
    for sec, body in data.items():
        if sec not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {sec!r} (known: {', '.join(SECTIONS)})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section {sec!r} must be a mapping, got {type(body).__name__}")
        pairs.extend((f"{sec}.{k}", v) for k, v in body.items())
    out = _apply(cfg, pairs, where=str(path))
    return dataclasses.replace(out, source=str(path) if cfg.source == "<defaults>"
                               else f"{cfg.source} + {path}")


def _apply(cfg: Config, pairs: Sequence[tuple[str, Any]], where: str) -> Config:
    changes: dict[str, dict[str, Any]] = {}
    for dotted, value in pairs:
        sec, _, key = str(dotted).partition(".")
        if sec not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {sec!r} in {dotted!r} "
                              f"(known: {', '.join(SECTIONS)})")
        cls = SECTIONS[sec]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {sec}.{key} (known: {', '.join(fields)})")
        hints = typing.get_type_hints(cls)
        changes.setdefault(sec, {})[key] = _check(value, hints[key], fields[key].metadata,
                                                  f"{where}: {sec}.{key}")
    if not changes:
        return cfg
    new = {sec: dataclasses.replace(getattr(cfg, sec), **kv) for sec, kv in changes.items()}
    return dataclasses.replace(cfg, **new)


def _check(value: Any, hint: Any, meta: Mapping[str, Any], name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check(value, args[0], meta, name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_check(v, item, meta, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
        _bounds(value, meta, name)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        _bounds(value, meta, name)
        return value
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)               # YAML reads `1` as a number (a CPU list, a name)
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        if name.endswith("worker_cpus") and not _CPU_SPEC.fullmatch(value.strip()):
            raise ConfigError(f"{name}: {value!r} is not 'auto', 'none' or a CPU list such "
                              "as '1', '0,2' or '4-7'")
        return value
    raise ConfigError(f"{name}: unsupported config type {hint!r}")  # a developer error


_CPU_SPEC = re.compile(r"auto|none|\d+(-\d+)?( *, *\d+(-\d+)?)*")


def _bounds(value: float, meta: Mapping[str, Any], name: str) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        rel = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{name}: {value!r} is out of range (must be {rel} {lo})")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}: {value!r} is out of range (must be <= {hi})")
