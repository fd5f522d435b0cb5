"""The single-frame baseline: a small 2D CNN on one frame of the passage.

The report's central claim is that the passage (the deformation through the constriction over
time) carries the signal; a 2D network that sees only the frame in which the cell is in the
middle of the constriction (``ClipDataset(pick="constriction")``) measures how much of the
signal a still image already holds. It takes the same ``N x C x T x H x W`` tensor as SlowFast
(``T = 1`` for its own input; the middle frame is used when ``T > 1``).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FrameCNN"]


class FrameCNN(nn.Module):
    """Four conv-BN-ReLU stages (stride 2) of ``width``, 2, 4, 8 x ``width`` channels,
    global mean, dropout, linear.

    Parameters
    ----------
    width : int
        Channels of the first stage.
    in_channels, num_classes : int
        Input channels and outputs (logits).
    crop : int
        Input height and width [px] (only checked).
    dropout : float
        Dropout before the projection.
    """

    def __init__(self, width: int = 16, in_channels: int = 1, num_classes: int = 2,
                 crop: int = 64, dropout: float = 0.5):
        super().__init__()
        self.crop = int(crop)
        layers = []
        c_in = in_channels
        for k in range(4):
            c_out = width * 2 ** k
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if k == 0 else 2, padding=1,
                                 bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = nn.Linear(c_in, num_classes)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        if clip.dim() != 5:
            raise ValueError(f"FrameCNN: expected N x C x T x H x W, got {tuple(clip.shape)}")
        x = clip[:, :, clip.shape[2] // 2]
        x = self.features(x).mean(dim=(2, 3))
        return self.proj(self.dropout(x))
