"""A SlowFast evaluated frame by frame: the same function as :class:`export.slowfast.SlowFast`,
written with 2D operations on a ``(N * T, C, H, W)`` layout, for export to ONNX Runtime's CPU.

Why: ONNX Runtime's CPU runs a 3D ``Conv`` as im2col + GEMM over the whole clip, and its fast
blocked (NCHWc) kernels exist for 2D convolutions only. :mod:`export.lower_onnx` rewrites
each 3D convolution of an exported graph into 2D ones, but keeps the graph's ``N, C, T, H, W``
layout, so every convolution sits between two Transposes. Here the frames stay on the batch
axis from the input to the head, so consecutive 2D convolutions, batch norms, ReLUs and
residual sums meet no layout change at all:

* a convolution with temporal kernel 1 is a 2D convolution over the ``N * T`` frames;
* one with temporal kernel ``kt > 1`` (stride ``st``, padding ``pt``) computes
  ``y[t] = sum_k W_k * x[st * t + k - pt]`` with one 2D convolution, reshaping to
  ``(N, T, C, H, W)`` (free: T is next to N) to pad and shift in time: either the ``kt``
  shifted frame sequences are stacked on the channels and convolved with the taps laid
  side by side, or each frame is convolved with all taps at once and the shifted results
  are summed (``taps``, below);
* batch norms are folded into the convolutions before them;
* the Slow pathway's input is every ``alpha``-th frame (a strided slice on the T axis);
* the head's global mean runs over (T, H, W) of ``(N, T, C, h, w)``.

It holds no weights of its own: it reads the wrapped model's convolutions and batch norms, so
a change of the model is seen here, and the parity check of the export compares it with the
model itself. Inference only (batch norm uses the running statistics).

``fmh export --conv3d frames`` uses it; ``python -m bench.bench_model_latency`` compared the
layouts (bench/RESULTS.md, "Classifier backends").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .slowfast import BasicBlock, Bottleneck, FuseFastToSlow, SlowFast, Stem

__all__ = ["FrameMajor", "TAPS"]

TAPS = ("auto", "input", "output")


def _out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _folded(conv: nn.Conv3d, bn: nn.BatchNorm3d | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv``'s weight and bias with the inference-mode ``bn`` after it folded in."""
    if bn is None:
        return conv.weight, conv.bias
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.reshape(-1, 1, 1, 1, 1), bias


def _conv(x: torch.Tensor, t: int, h: int, w: int, conv: nn.Conv3d,
          bn: nn.BatchNorm3d | None = None, taps: str = "auto"
          ) -> tuple[torch.Tensor, int, int, int]:
    """``conv`` (a 3D convolution), then ``bn`` if given, on frames ``x`` of shape
    ``(N * t, C, h, w)``; returns the output frames ``(N * t', C', h', w')`` and ``t', h',
    w'``. The batch norm is folded into the weights, so the graph has one convolution (and
    for ``kt > 1`` with the output-side sum, the bias comes after the sum)."""
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1, 1) or isinstance(conv.padding, str):
        raise ValueError(f"FrameMajor: {conv} (groups, dilation or string padding) is not "
                         f"supported")
    kt, kh, kw = conv.kernel_size
    st, sh, sw = conv.stride
    pt, ph, pw = conv.padding
    h2, w2 = _out(h, kh, sh, ph), _out(w, kw, sw, pw)
    weight, bias = _folded(conv, bn)                           # (Co, Ci, kt, kh, kw), (Co,)
    if kt == 1 and st == 1 and pt == 0:
        y = F.conv2d(x, weight[:, :, 0], bias, (sh, sw), (ph, pw))
        return y, t, h2, w2
    c = conv.in_channels
    t2 = _out(t, kt, st, pt)
    span = st * (t2 - 1) + 1
    if taps == "output" or (taps == "auto" and conv.out_channels * h2 * w2 <= c * h * w):
        # one 2D conv gives each tap's maps for every input frame; output frame t sums tap k
        # of input frame st * t + k - pt
        co = conv.out_channels
        w2d = weight.permute(2, 0, 1, 3, 4).reshape(kt * co, c, kh, kw)
        y = F.conv2d(x, w2d, None, (sh, sw), (ph, pw)).reshape(-1, t, kt, co, h2, w2)
        if pt:
            y = F.pad(y, (0, 0, 0, 0, 0, 0, 0, 0, pt, pt))
        out = y[:, 0:span:st, 0]
        for k in range(1, kt):
            out = out + y[:, k:k + span:st, k]
        out = out.reshape(-1, co, h2, w2)
        if bias is not None:
            out = out + bias.reshape(1, co, 1, 1)
        return out, t2, h2, w2
    x5 = x.reshape(-1, t, c, h, w)
    if pt:
        x5 = F.pad(x5, (0, 0, 0, 0, 0, 0, pt, pt))            # zero frames before and after
    taps = [x5[:, k:k + span:st] for k in range(kt)]
    stacked = (torch.cat(taps, dim=2) if kt > 1 else taps[0]).reshape(-1, kt * c, h, w)
    w2d = weight.permute(0, 2, 1, 3, 4).reshape(conv.out_channels, kt * c, kh, kw)
    y = F.conv2d(stacked, w2d, bias, (sh, sw), (ph, pw))
    return y, t2, h2, w2


class FrameMajor(nn.Module):
    """``SlowFast`` on the frames-on-the-batch-axis layout (see the module docstring).

    Parameters
    ----------
    model : SlowFast
        The network to evaluate; its modules are used as they are (not copied).
    taps : {"auto", "input", "output"}
        How a convolution with temporal kernel ``kt > 1`` is written: ``"input"`` stacks
        the ``kt`` shifted frame sequences on the channels and runs one 2D convolution;
        ``"output"`` runs a 2D convolution with ``kt`` times the output channels on every
        input frame and sums tap ``k`` of frame ``st * t + k - pt`` into output frame ``t``.
        ``"auto"`` takes whichever makes the smaller ``kt``-fold buffer (input for wide layers,
        output for the narrow, spatially strided ones such as a small Fast stem).
    """

    def __init__(self, model: SlowFast, taps: str = "auto") -> None:
        super().__init__()
        if taps not in TAPS:
            raise ValueError(f"FrameMajor: taps={taps!r}, expected one of {TAPS}")
        self.model = model
        self.config = model.config
        self.taps = taps

    def _conv(self, x, t, h, w, conv, bn=None):
        return _conv(x, t, h, w, conv, bn, self.taps)

    # -- blocks -----------------------------------------------------------------------------

    def _stem(self, m: Stem, x, t, h, w):
        y, t, h, w = self._conv(x, t, h, w, m.conv, m.bn)
        y = F.relu(y)
        (_, kh, kw), (_, sh, sw), (_, ph, pw) = m.pool.kernel_size, m.pool.stride, m.pool.padding
        y = F.max_pool2d(y, (kh, kw), (sh, sw), (ph, pw))
        return y, t, _out(h, kh, sh, ph), _out(w, kw, sw, pw)

    def _block(self, m: nn.Module, x, t, h, w):
        if isinstance(m, BasicBlock):
            y, t2, h2, w2 = self._conv(x, t, h, w, m.conv_a, m.bn_a)
            y, t2, h2, w2 = self._conv(F.relu(y), t2, h2, w2, m.conv_b, m.bn_b)
        elif isinstance(m, Bottleneck):
            y, t2, h2, w2 = self._conv(x, t, h, w, m.conv_a, m.bn_a)
            y, t2, h2, w2 = self._conv(F.relu(y), t2, h2, w2, m.conv_b, m.bn_b)
            y, t2, h2, w2 = self._conv(F.relu(y), t2, h2, w2, m.conv_c, m.bn_c)
        else:
            raise TypeError(f"FrameMajor: unknown block {type(m).__name__}")
        if m.shortcut is None:
            skip = x
        else:
            skip = self._conv(x, t, h, w, m.shortcut, m.shortcut_bn)[0]
        return F.relu(y + skip), t2, h2, w2

    def _fuse(self, m: FuseFastToSlow, slow, ts, fast, tf, h, w):
        y, t2, _, _ = self._conv(fast, tf, h, w, m.conv, m.bn)
        if t2 != ts:
            raise ValueError(f"FrameMajor: fusion gives {t2} frames for a Slow pathway of {ts}")
        return torch.cat([slow, F.relu(y)], dim=1)

    # -- the network --------------------------------------------------------------------------

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` of clips ``(N, C, T, H, W)``, as ``SlowFast.forward``."""
        cfg = self.config
        m = self.model
        c, t, h, w = cfg.input_shape
        frames = clip.transpose(1, 2)                                     # N, T, C, H, W
        fast = frames.reshape(-1, c, h, w)
        ts = cfg.slow_frames
        slow = frames[:, ::cfg.alpha].reshape(-1, c, h, w)
        slow, ts, hs, ws = self._stem(m.stem_slow, slow, ts, h, w)
        fast, tf, hf, wf = self._stem(m.stem_fast, fast, t, h, w)
        slow = self._fuse(m.fusions[0], slow, ts, fast, tf, hf, wf)
        for k, stage in enumerate(m.stages):
            for block in stage["slow"]:
                slow, ts, hs, ws = self._block(block, slow, ts, hs, ws)
            for block in stage["fast"]:
                fast, tf, hf, wf = self._block(block, fast, tf, hf, wf)
            if k < 3:
                slow = self._fuse(m.fusions[k + 1], slow, ts, fast, tf, hf, wf)
        cs = m.stages[-1]["slow"][-1].final_bn().num_features          # static, not traced
        cf = m.stages[-1]["fast"][-1].final_bn().num_features
        pooled_slow = slow.reshape(-1, ts, cs, hs, ws).mean(dim=(1, 3, 4))
        pooled_fast = fast.reshape(-1, tf, cf, hf, wf).mean(dim=(1, 3, 4))
        x = torch.cat([pooled_slow, pooled_fast], dim=1)
        return m.head.proj(m.head.dropout(x))
