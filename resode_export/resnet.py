"""The layers of a torchvision-layout ResNet around its ODE blocks: stem, transitions, head.

An imported torchvision ResNet becomes stem → [transition → ODE block] × stages → head. The
transition is the stage's first block kept as it is (it changes the width or the resolution);
the stage's other blocks, all of one shape, become the ODE block (:class:`~.fields.ResBlockField`).

BatchNorm (inference statistics) is an affine map per channel, held in one of two forms:
``fold`` (in the convolution's weight and bias: what a deployed graph runs) or ``frozen`` (a
bias-free convolution followed by a per-channel scale and shift, torchvision's FrozenBatchNorm2d:
the trainable form for fine-tuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvAffine(nn.Module):
    """conv (bias: the folded BN) or conv → scale, shift (the frozen BN)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1,
                 bn: str = "fold"):
        super().__init__()
        self.bn = bn
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=bn == "fold")
        if bn == "frozen":
            self.scale = nn.Parameter(torch.ones(cout))
            self.shift = nn.Parameter(torch.zeros(cout))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn == "frozen":
            x = x * self.scale[:, None, None] + self.shift[:, None, None]
        return x


STEM_KERNELS = (7, 3)


class Stem(nn.Module):
    """torchvision's conv7×7 / 2 → BN → relu → maxpool 3×3 / 2, or (``kernel`` 3) the small-image stem that
    CIFAR-style ResNets put in its place: conv3×3 / 1 → BN → relu, no maxpool."""

    def __init__(self, cin: int, width: int, bn: str, kernel: int = 7):
        super().__init__()
        self.kernel = kernel
        small = kernel == 3
        self.conv = ConvAffine(cin, width, kernel, stride=1 if small else 2, padding=kernel // 2, bn=bn)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv(x))
        return x if self.kernel == 3 else F.max_pool2d(x, 3, stride=2, padding=1)


class ResidualBlock(nn.Module):
    """One torchvision block, relu(x + F(x)) or relu(downsample(x) + F(x)), the stride on the 3×3 conv
    (torchvision's "ResNet v1.5")."""

    def __init__(self, cin: int, cout: int, inner: int, stride: int, kind: str, cardinality: int, bn: str):
        super().__init__()
        if kind == "basic":
            self.convs = nn.ModuleList([ConvAffine(cin, inner, 3, stride, 1, bn=bn), ConvAffine(inner, cout, 3, 1, 1, bn=bn)])
        else:
            self.convs = nn.ModuleList([ConvAffine(cin, inner, 1, bn=bn),
                                        ConvAffine(inner, inner, 3, stride, 1, groups=cardinality, bn=bn),
                                        ConvAffine(inner, cout, 1, bn=bn)])
        self.downsample = ConvAffine(cin, cout, 1, stride, bn=bn) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i, conv in enumerate(self.convs):
            out = conv(out)
            if i < len(self.convs) - 1:
                out = F.relu(out)
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Head(nn.Module):
    """global average pool → fully connected."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def stage_stride(stage: int) -> int:
    """torchvision: the first stage keeps the stem's resolution, every later one halves it."""
    return 1 if stage == 0 else 2


__all__ = ["STEM_KERNELS", "ConvAffine", "Head", "ResidualBlock", "Stem", "stage_stride"]
