"""SlowFast networks (Feichtenhofer et al., ICCV 2019) with one input tensor.

The layout follows PySlowFast and PyTorchVideo's ``create_slowfast``: a Slow pathway (few
frames, many channels) and a Fast pathway (``alpha`` times more frames, ``beta_inv`` times fewer
channels), ResNet stages res2..res5, a time-strided convolution that fuses Fast into Slow after
the stem and after res2, res3 and res4 (kernel ``fusion_kernel`` x 1 x 1, stride ``alpha``,
``2 * fast channels`` outputs, BN, ReLU, concatenated to the Slow features), and a head that
averages each pathway globally, concatenates them and projects to the classes.

Two departures from the references, both for deployment (see reference/pitfalls.md, items 1
and 2):

* ``forward`` takes **one** clip, the Fast pathway's ``N x C x T x H x W``; the Slow pathway is
  taken from it inside the graph as every ``alpha``-th frame (frames 0, alpha, 2 alpha, ...).
* The head pools with a global mean over (T, H, W) instead of a fixed ``AvgPool3d`` kernel, so
  the same weights run at 64 x 64 and 224 x 224. At PyTorchVideo's input size the two are the
  same operation, and the parameter count is identical (pooling has no parameters).

Layers are named after what they are (``stem_slow.conv``, ``fusions.0.bn``,
``stages.2.fast.0.conv_b``, ``head.proj``); :mod:`export.checkpoints` maps PySlowFast and
PyTorchVideo names onto these through one table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["SlowFastConfig", "SlowFast", "Bottleneck", "BasicBlock", "Stem", "FuseFastToSlow",
           "Head", "slowfast_r18", "slowfast_r50", "slowfast_r101", "build_slowfast",
           "count_parameters", "randomise_", "flops_per_clip", "build_from_meta", "STAGE_DEPTHS"]

# Residual blocks per stage (res2..res5) and the block each depth uses.
STAGE_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
# Temporal kernel of conv_a per stage (res2..res5): the Slow pathway is temporally 1x1 in
# res2/res3 ("non-degenerate" temporal convolutions only in res4/res5, paper section 3.4).
SLOW_TEMPORAL_KERNELS = (1, 1, 3, 3)
FAST_TEMPORAL_KERNELS = (3, 3, 3, 3)
SPATIAL_STRIDES = (1, 2, 2, 2)


@dataclass(frozen=True)
class SlowFastConfig:
    """Everything that determines a SlowFast network's layers and input.

    Parameters
    ----------
    depth : {18, 50, 101}
        ResNet depth; 18 uses basic blocks, 50 and 101 bottlenecks.
    num_classes : int
        Outputs of the final projection (logits).
    in_channels : int
        Input channels: 1 for a grey camera, 3 for RGB (Kinetics) checkpoints.
    alpha : int
        Frame-rate ratio Fast/Slow; the Slow pathway sees every ``alpha``-th frame.
    beta_inv : int
        Channel ratio Slow/Fast (1/beta).
    tau : int
        Temporal stride of the Slow pathway in camera frames; a sampling parameter recorded with
        the model (the network itself sees ``frames`` frames whatever ``tau`` is).
    fusion_kernel : int
        Temporal kernel of the Fast->Slow fusion convolution (odd).
    fusion_channel_ratio : int
        Fusion output channels per Fast channel.
    frames : int
        Fast-pathway frames T of the input clip (a multiple of ``alpha``).
    crop : int
        Input height and width [px].
    width : int
        Slow-pathway stem channels (64 in the paper); every other width scales with it.
    dropout : float
        Dropout before the projection (training only).
    """

    depth: int = 18
    num_classes: int = 2
    in_channels: int = 1
    alpha: int = 8
    beta_inv: int = 8
    tau: int = 8
    fusion_kernel: int = 5
    fusion_channel_ratio: int = 2
    frames: int = 32
    crop: int = 64
    width: int = 64
    dropout: float = 0.5

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"SlowFastConfig: {what}")
        for name in ("depth", "num_classes", "in_channels", "alpha", "beta_inv", "tau",
                     "fusion_kernel", "fusion_channel_ratio", "frames", "crop", "width"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name}={v!r} must be a positive integer")
        need(self.depth in STAGE_DEPTHS,
             f"depth={self.depth} is not one of {sorted(STAGE_DEPTHS)}")
        need(self.frames % self.alpha == 0,
             f"frames={self.frames} must be a multiple of alpha={self.alpha}")
        need(self.fusion_kernel % 2 == 1,
             f"fusion_kernel={self.fusion_kernel} must be odd (keeps Slow and fused lengths equal)")
        need(self.width % self.beta_inv == 0,
             f"width={self.width} must be divisible by beta_inv={self.beta_inv}")
        need(self.crop >= 32, f"crop={self.crop} must be at least 32 px (the network strides 32x)")
        need(0.0 <= float(self.dropout) < 1.0, f"dropout={self.dropout} must be in [0, 1)")

    @property
    def name(self) -> str:
        return f"slowfast_r{self.depth}"

    @property
    def slow_frames(self) -> int:
        return self.frames // self.alpha

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one clip."""
        return (self.in_channels, self.frames, self.crop, self.crop)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SlowFastConfig":
        """Inverse of :meth:`to_dict`; ignores ``name``, rejects unknown keys."""
        known = {f.name for f in fields(cls)}
        extra = set(data) - known - {"name"}
        if extra:
            raise ValueError(f"SlowFastConfig: unknown keys {sorted(extra)}")
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        if "name" in data and data["name"] != cfg.name:
            raise ValueError(f"SlowFastConfig: name {data['name']!r} does not match "
                             f"depth={cfg.depth} ({cfg.name})")
        return cfg


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

def _bn(channels: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(channels, eps=1e-5, momentum=0.1)


class Stem(nn.Module):
    """Conv (kt x 7 x 7, spatial stride 2) -> BN -> ReLU -> max-pool (1 x 3 x 3, stride 2)."""

    def __init__(self, in_channels: int, out_channels: int, temporal_kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, (temporal_kernel, 7, 7),
                              stride=(1, 2, 2), padding=(temporal_kernel // 2, 3, 3), bias=False)
        self.bn = _bn(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class _Residual(nn.Module):
    """Shared shortcut logic: identity, or 1x1x1 conv + BN when shape changes."""

    shortcut: nn.Module | None
    shortcut_bn: nn.Module | None

    def _make_shortcut(self, dim_in: int, dim_out: int, stride: int) -> None:
        if dim_in != dim_out or stride != 1:
            self.shortcut = nn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False)
            self.shortcut_bn = _bn(dim_out)
        else:
            self.shortcut = None
            self.shortcut_bn = None

    def _skip(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return x
        return self.shortcut_bn(self.shortcut(x))


class Bottleneck(_Residual):
    """conv_a (kt x 1 x 1) -> conv_b (1 x 3 x 3, spatial stride) -> conv_c (1 x 1 x 1), + skip."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, temporal_kernel: int,
                 stride: int) -> None:
        super().__init__()
        kt = temporal_kernel
        self.conv_a = nn.Conv3d(dim_in, dim_inner, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.bn_a = _bn(dim_inner)
        self.conv_b = nn.Conv3d(dim_inner, dim_inner, (1, 3, 3), stride=(1, stride, stride),
                                padding=(0, 1, 1), bias=False)
        self.bn_b = _bn(dim_inner)
        self.conv_c = nn.Conv3d(dim_inner, dim_out, 1, bias=False)
        self.bn_c = _bn(dim_out)
        self.relu = nn.ReLU(inplace=True)
        self._make_shortcut(dim_in, dim_out, stride)

    def final_bn(self) -> nn.BatchNorm3d:
        return self.bn_c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn_a(self.conv_a(x)))
        y = self.relu(self.bn_b(self.conv_b(y)))
        y = self.bn_c(self.conv_c(y))
        return self.relu(y + self._skip(x))


class BasicBlock(_Residual):
    """conv_a (kt x 3 x 3, spatial stride) -> conv_b (1 x 3 x 3), + skip (ResNet-18 style)."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, temporal_kernel: int,
                 stride: int) -> None:
        super().__init__()
        kt = temporal_kernel
        self.conv_a = nn.Conv3d(dim_in, dim_inner, (kt, 3, 3), stride=(1, stride, stride),
                                padding=(kt // 2, 1, 1), bias=False)
        self.bn_a = _bn(dim_inner)
        self.conv_b = nn.Conv3d(dim_inner, dim_out, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn_b = _bn(dim_out)
        self.relu = nn.ReLU(inplace=True)
        self._make_shortcut(dim_in, dim_out, stride)

    def final_bn(self) -> nn.BatchNorm3d:
        return self.bn_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn_a(self.conv_a(x)))
        y = self.bn_b(self.conv_b(y))
        return self.relu(y + self._skip(x))


class FuseFastToSlow(nn.Module):
    """Time-strided conv (k x 1 x 1, stride alpha) -> BN -> ReLU of Fast, concatenated to Slow."""

    def __init__(self, fast_channels: int, channel_ratio: int, kernel: int, alpha: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(fast_channels, fast_channels * channel_ratio, (kernel, 1, 1),
                              stride=(alpha, 1, 1), padding=(kernel // 2, 0, 0), bias=False)
        self.bn = _bn(fast_channels * channel_ratio)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        return torch.cat([slow, self.relu(self.bn(self.conv(fast)))], dim=1)


class Head(nn.Module):
    """Global mean over (T, H, W) of each pathway -> concat -> dropout -> linear (logits)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = nn.Linear(in_features, num_classes)

    def forward(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        x = torch.cat([slow.mean(dim=(2, 3, 4)), fast.mean(dim=(2, 3, 4))], dim=1)
        return self.proj(self.dropout(x))


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

class SlowFast(nn.Module):
    """SlowFast ResNet taking one Fast clip ``N x C x T x H x W``, returning logits ``N x K``.

    Parameters
    ----------
    config : SlowFastConfig
        Depth, widths, alpha/beta/tau, fusion, input geometry and classes.
    """

    def __init__(self, config: SlowFastConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        block = BasicBlock if c.depth == 18 else Bottleneck
        expansion = 1 if c.depth == 18 else 4
        b = c.beta_inv

        self.stem_slow = Stem(c.in_channels, c.width, temporal_kernel=1)
        self.stem_fast = Stem(c.in_channels, c.width // b, temporal_kernel=5)
        fusions = [FuseFastToSlow(c.width // b, c.fusion_channel_ratio, c.fusion_kernel, c.alpha)]

        stages = []
        slow_in = c.width + c.width // b * c.fusion_channel_ratio
        fast_in = c.width // b
        for k, n_blocks in enumerate(STAGE_DEPTHS[c.depth]):
            inner = c.width * 2 ** k
            out = inner * expansion
            if inner % b:
                raise ValueError(f"SlowFastConfig: width={c.width} gives {inner} channels in "
                                 f"res{k + 2}, not divisible by beta_inv={b}")
            pathways = {}
            for name, d_in, d_inner, d_out, kt in (
                    ("slow", slow_in, inner, out, SLOW_TEMPORAL_KERNELS[k]),
                    ("fast", fast_in, inner // b, out // b, FAST_TEMPORAL_KERNELS[k])):
                pathways[name] = nn.Sequential(*[
                    block(d_in if i == 0 else d_out, d_inner, d_out, kt,
                          SPATIAL_STRIDES[k] if i == 0 else 1)
                    for i in range(n_blocks)])
            stages.append(nn.ModuleDict(pathways))
            if k < 3:
                fusions.append(FuseFastToSlow(out // b, c.fusion_channel_ratio, c.fusion_kernel,
                                              c.alpha))
            slow_in = out + out // b * c.fusion_channel_ratio
            fast_in = out // b
        self.fusions = nn.ModuleList(fusions)
        self.stages = nn.ModuleList(stages)
        self.head = Head(out + out // b, c.num_classes, float(c.dropout))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PySlowFast's initialisation: Kaiming (fan-out) convs, zero-initialised last BN of each
        residual branch, N(0, 0.01) projection."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (Bottleneck, BasicBlock)):
                nn.init.zeros_(m.final_bn().weight)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export()):
            expect = self.config.input_shape
            if clip.dim() != 5 or tuple(clip.shape[1:]) != expect:
                raise ValueError(f"SlowFast: input shape {tuple(clip.shape)} does not match "
                                 f"(N, {', '.join(map(str, expect))})")
        return self.head(*self.pathway_features(clip))

    def pathway_features(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The res5 feature maps (slow, fast) before the head (for Grad-CAM).

        The Slow pathway takes frames 0, alpha, 2 alpha, ... of the one input clip (a strided
        Slice in the exported graph), aligned with the centres of the fusion convolution.
        """
        slow = self.stem_slow(clip[:, :, ::self.config.alpha])
        fast = self.stem_fast(clip)
        slow = self.fusions[0](slow, fast)
        for k, stage in enumerate(self.stages):
            slow = stage["slow"](slow)
            fast = stage["fast"](fast)
            if k < 3:
                slow = self.fusions[k + 1](slow, fast)
        return slow, fast


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every weight and BN statistic with random values, in place.

    For parity and conversion tests: a freshly initialised SlowFast has zeroed residual BNs,
    which would hide wrong wiring. Scales keep activations O(1) through any depth.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv3d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm3d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

def build_slowfast(config: SlowFastConfig | Mapping[str, Any]) -> SlowFast:
    """A SlowFast from a config or its ``to_dict()`` form."""
    if not isinstance(config, SlowFastConfig):
        config = SlowFastConfig.from_dict(config)
    return SlowFast(config)


def build_from_meta(arch: Mapping[str, Any]) -> SlowFast:
    """A SlowFast from an ONNX artefact's parsed ``fmh.arch`` (the full config is stored)."""
    return build_slowfast(arch)


def _builder(depth: int, weights: Any, progress: bool, kwargs: dict[str, Any]) -> SlowFast:
    config = replace(SlowFastConfig(depth=depth), **kwargs) if kwargs else SlowFastConfig(depth=depth)
    if weights is None:
        return SlowFast(config)
    from .checkpoints import load_checkpoint
    ckpt = load_checkpoint(weights)
    if ckpt.config.depth != depth:
        raise ValueError(f"{weights}: checkpoint is {ckpt.config.name}, not slowfast_r{depth}")
    if kwargs and replace(ckpt.config, **kwargs) != ckpt.config:
        raise ValueError(f"{weights}: keyword arguments {kwargs} contradict the checkpoint's "
                         f"config {ckpt.config.to_dict()}")
    return ckpt.build_model()


def slowfast_r18(*, weights: Any = None, progress: bool = False, **kwargs: Any) -> SlowFast:
    """SlowFast with ResNet-18 basic blocks (2, 2, 2, 2).

    Parameters
    ----------
    weights : path-like, optional
        One of our checkpoints (:func:`export.checkpoints.save_checkpoint`) to load.
    progress : bool
        Unused (no downloads); kept for torchvision-style call sites.
    **kwargs
        Any :class:`SlowFastConfig` field: ``num_classes``, ``in_channels``, ``alpha``,
        ``beta_inv``, ``tau``, ``fusion_kernel``, ``frames``, ``crop``, ``width``, ...
    """
    return _builder(18, weights, progress, kwargs)


def slowfast_r50(*, weights: Any = None, progress: bool = False, **kwargs: Any) -> SlowFast:
    """SlowFast with ResNet-50 bottlenecks (3, 4, 6, 3); see :func:`slowfast_r18`."""
    return _builder(50, weights, progress, kwargs)


def slowfast_r101(*, weights: Any = None, progress: bool = False, **kwargs: Any) -> SlowFast:
    """SlowFast with ResNet-101 bottlenecks (3, 4, 23, 3); see :func:`slowfast_r18`."""
    return _builder(101, weights, progress, kwargs)


def flops_per_clip(model: SlowFast) -> int:
    """Floating-point operations of one forward pass on one clip (multiply-add = 2 FLOPs),
    counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros((1, *model.config.input_shape), device="meta")
    meta_model = SlowFast(model.config).to("meta") if _on_cpu(model) else model
    meta_model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(x)
    return int(counter.get_total_flops())


def _on_cpu(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is None or p.device.type != "meta"

