"""GNT/IBRNet's image feature extractor: a ResNet-34-style encoder with a small U-Net decoder.

Instance norm (not batch norm) is used throughout because a "batch" here is the handful of source views of
one scene: batch statistics over them would leak information between views and depend on the view count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a residual; a strided 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), _norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


def _make_layer(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ConvNormELU(nn.Sequential):
    """Decoder conv: conv (same padding) + instance norm + ELU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            _norm(out_channels),
            nn.ELU(inplace=True),
        )


class UpConv(nn.Module):
    """Bilinear x2 upsampling to the skip connection's exact size (handles odd sizes), then a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvNormELU(in_channels, out_channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class ResUNet(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> features [B, out_channels, h, w] at the layer1 resolution (about H/4).

    Encoder: 7x7 stride-2 stem, then layer1..3 (base, 2 base, 4 base channels), each stride 2.
    Decoder: up 4b -> 2b, concat layer2, conv -> 2b; up 2b -> b, concat layer1, conv -> b; 1x1 -> out_channels.
    """

    def __init__(self, out_channels: int = 32, layers: tuple[int, int, int] = (3, 4, 6), base_channels: int = 64):
        super().__init__()
        c1, c2, c3 = base_channels, 2 * base_channels, 4 * base_channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, c1, 7, stride=2, padding=3, bias=False), _norm(c1), nn.ReLU(inplace=True)
        )
        self.layer1 = _make_layer(c1, c1, layers[0], stride=2)
        self.layer2 = _make_layer(c1, c2, layers[1], stride=2)
        self.layer3 = _make_layer(c2, c3, layers[2], stride=2)

        self.up3 = UpConv(c3, c2)
        self.merge3 = ConvNormELU(2 * c2, c2)
        self.up2 = UpConv(c2, c1)
        self.merge2 = ConvNormELU(2 * c1, c1)
        self.out_conv = nn.Conv2d(c1, out_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images * 2.0 - 1.0)
        skip1 = self.layer1(x)  # [B, c1, H/4, W/4]
        skip2 = self.layer2(skip1)  # [B, c2, H/8, W/8]
        deep = self.layer3(skip2)  # [B, c3, H/16, W/16]

        x = self.up3(deep, skip2.shape[-2:])
        x = self.merge3(torch.cat([skip2, x], dim=1))
        x = self.up2(x, skip1.shape[-2:])
        x = self.merge2(torch.cat([skip1, x], dim=1))
        return self.out_conv(x)
