"""Rewrites of a trained network that compute the same function faster on ONNX Runtime's CPU.

ONNX Runtime's CPU ``Conv`` runs a 3D convolution as im2col + GEMM over the whole clip. For
the convolutions of a small SlowFast this is memory-bound: the Fast stem (1 input channel,
5 x 7 x 7 kernel, 1-2 output channels on 32 x 64 x 64) unrolls ~245 values per output and
spends about half of the demo model's time there, for a GEMM with one or two rows. A 2D
convolution over the frames does not have that problem, so every ``Conv3d`` is rewritten as

* **frames as batch** when its temporal kernel is 1 (most of SlowFast's convolutions): the
  clip's T axis is folded into N, a ``Conv2d`` runs, and the result is unfolded;
* **a sum over temporal taps** otherwise: one ``Conv2d`` with ``kt x C_out`` outputs runs on
  every frame once, and output frame ``t`` adds tap ``k`` of input frame ``s t + k - p``
  (zero-padded in time). The im2col buffer holds ``C_in x kh x kw`` values per output
  position instead of ``C_in x kt x kh x kw``, and the work is the same.

Every ``BatchNorm3d`` that follows a convolution is folded into it first (the TorchScript
exporter would fold it into a 3D ``Conv``, but not across the reshapes of the rewrite).

The result is numerically the same network (differences at float rounding, ~1e-6); the
export's parity check against the untouched PyTorch model enforces it. The benchmark that
chose this: ``python -m bench.bench_model_latency --compare-lowering`` (bench/RESULTS.md).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["lower_conv3d", "fold_batchnorm", "Conv3dAs2d", "LOWERINGS"]

LOWERINGS = ("as2d", "none")      # values of the export's ``conv3d`` option


class Conv3dAs2d(nn.Module):
    """A ``Conv3d`` (groups 1, dilation 1) computed with one ``Conv2d`` over the frames.

    Parameters
    ----------
    conv : nn.Conv3d
        The convolution to reproduce; its weights are copied.
    in_shape : (C, T, H, W)
        Its input's shape without the batch axis. The sizes are constants of the graph, so
        the exported graph computes no shapes at run time (only the batch axis is free).
    """

    def __init__(self, conv: nn.Conv3d, in_shape: tuple[int, int, int, int]) -> None:
        super().__init__()
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1, 1):
            raise ValueError(f"Conv3dAs2d: groups={conv.groups}, dilation={conv.dilation} "
                             "are not supported (only groups 1, dilation 1)")
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"Conv3dAs2d: padding {conv.padding!r} ({conv.padding_mode}) is "
                             "not supported (only explicit zero padding)")
        c_out, c_in, kt, kh, kw = conv.weight.shape
        if len(in_shape) != 4 or int(in_shape[0]) != c_in:
            raise ValueError(f"Conv3dAs2d: input shape {tuple(in_shape)} does not match the "
                             f"conv's {c_in} input channels")
        self.in_shape = tuple(int(v) for v in in_shape)
        _, t, h, w = self.in_shape
        ho = (h + 2 * conv.padding[1] - kh) // conv.stride[1] + 1
        wo = (w + 2 * conv.padding[2] - kw) // conv.stride[2] + 1
        self.out_hw = (int(ho), int(wo))
        self.kt, self.st, self.pt, self.c_out = kt, int(conv.stride[0]), int(conv.padding[0]), c_out
        w = conv.weight.detach()
        # output channel k * c_out + o of the 2D conv is tap k of output channel o
        self.conv = nn.Conv2d(c_in, kt * c_out, (kh, kw), stride=tuple(conv.stride[1:]),
                              padding=tuple(conv.padding[1:]), bias=False)
        self.conv.weight.data.copy_(w.permute(2, 0, 1, 3, 4).reshape(kt * c_out, c_in, kh, kw))
        bias = None if conv.bias is None else conv.bias.detach().reshape(1, c_out, 1, 1, 1).clone()
        self.register_buffer("bias", bias)
        # Output frames where every tap reads an input frame, and the frames at each end where
        # some taps fall into the zero padding (each summed over its valid taps). Slices and
        # adds with constant bounds, no Pad: the graph computes no shapes at run time.
        t_out = (t + 2 * self.pt - kt) // self.st + 1
        full = [i for i in range(t_out)
                if self.st * i - self.pt >= 0 and self.st * i - self.pt + kt - 1 < t]
        segs: list[tuple[int, int]] = [(i, i + 1) for i in range(full[0] if full else t_out)]
        if full:
            segs.append((full[0], full[-1] + 1))
            segs += [(i, i + 1) for i in range(full[-1] + 1, t_out)]
        self._segments = segs
        self._t_in = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c_in, t, h, w = self.in_shape
        ho, wo = self.out_hw
        kt, st, pt, c_out = self.kt, self.st, self.pt, self.c_out
        z = self.conv(x.transpose(1, 2).reshape(-1, c_in, h, w))
        if kt == 1 and st == 1 and pt == 0:          # frames as batch
            y = z.reshape(-1, t, c_out, ho, wo)
        else:                                         # sum over temporal taps
            z = z.reshape(-1, t, kt * c_out, ho, wo)
            parts = [self._frames(z, t0, t1) for t0, t1 in self._segments]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        y = y.transpose(1, 2)
        return y if self.bias is None else y + self.bias

    def _frames(self, z: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """Output frames ``t0 .. t1-1`` (N, t1-t0, C_out, H', W') from the per-tap maps."""
        st, pt, c_out = self.st, self.pt, self.c_out
        out = None
        for k in range(self.kt):
            first = st * t0 + k - pt                # input frame of tap k for output frame t0
            last = st * (t1 - 1) + k - pt
            if first < 0 or last >= self._t_in:     # (only single-frame end segments)
                continue                            # this tap reads the zero padding
            term = z[:, first:last + 1:st, k * c_out:(k + 1) * c_out]
            out = term if out is None else out + term
        if out is None:                             # every tap in the padding: zeros
            out = z[:, 0:t1 - t0, 0:c_out] * 0.0
        return out


def _bn_name(conv_name: str) -> str:
    """The BatchNorm that follows a conv in our blocks: conv -> bn, conv_a -> bn_a,
    shortcut -> shortcut_bn."""
    if conv_name.startswith("conv"):
        return "bn" + conv_name[4:]
    return conv_name + "_bn"


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every ``BatchNorm3d`` into the ``Conv3d`` before it (in place, eval statistics).

    A conv attribute ``conv``/``conv_x``/``name`` is paired with ``bn``/``bn_x``/``name_bn``
    of the same module (how :mod:`export.slowfast` names them); the BatchNorm becomes an
    ``Identity`` and the conv gets a bias. Returns the number of pairs folded.
    """
    folded = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Conv3d):
                continue
            bn = getattr(module, _bn_name(name), None)
            if not isinstance(bn, nn.BatchNorm3d) or not bn.track_running_stats:
                continue
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            w = child.weight.detach() * scale.reshape(-1, 1, 1, 1, 1)
            b0 = child.bias.detach() if child.bias is not None else torch.zeros_like(scale)
            b = (b0 - bn.running_mean) * scale + bn.bias.detach()
            conv = nn.Conv3d(child.in_channels, child.out_channels, child.kernel_size,
                             stride=child.stride, padding=child.padding,
                             dilation=child.dilation, groups=child.groups, bias=True,
                             padding_mode=child.padding_mode)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(b)
            setattr(module, name, conv)
            setattr(module, _bn_name(name), nn.Identity())
            folded += 1
    return folded


def lower_conv3d(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """An ``eval()`` copy of ``model`` with BatchNorms folded and every ``Conv3d`` replaced by
    :class:`Conv3dAs2d`; the original is not touched.

    Parameters
    ----------
    model : nn.Module
        The network (any module built of ``Conv3d``/``BatchNorm3d`` pairs and other layers).
    example : Tensor, shape (N, C, T, H, W)
        One input: a forward pass records the input shape of every convolution.
    """
    out = copy.deepcopy(model).eval()
    fold_batchnorm(out)
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(mod, args) -> None:
        shapes.setdefault(mod, tuple(args[0].shape[1:]))

    hooks = [m.register_forward_pre_hook(record) for m in out.modules()
             if isinstance(m, nn.Conv3d)]
    try:
        with torch.no_grad():
            out(example)
    finally:
        for h in hooks:
            h.remove()
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv3d):
                if child not in shapes:
                    raise ValueError(f"lower_conv3d: {name} ({child}) is not used in forward")
                setattr(module, name, Conv3dAs2d(child, shapes[child]))
    return out
