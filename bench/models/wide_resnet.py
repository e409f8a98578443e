"""WRN-34-10 in the TRADES / Zagoruyko form (docs/methods.md §1.2): pre-activation blocks, widths 160/320/640, final
BN + ReLU, global average pooling, d = 640. Conv weights N(0, 2/(k²·out)), BN γ = 1, β = 0, fc bias 0.
State-dict names follow TRADES (``block1.layer.0.bn1``, ``convShortcut``, ``fc``) so their checkpoints load as is.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .base import Classifier
from .registry import register_model


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        shortcut = x if self.equal_in_out else self.convShortcut(o)
        out = self.conv1(o)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(Classifier):
    def __init__(self, depth=34, widen=10, num_classes=10, in_channels=3, mean=None, std=None):
        super().__init__(num_classes, in_channels, mean, std)
        assert (depth - 4) % 6 == 0
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def _backbone(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@register_model("wrn-34-10", paper="WideResNet-34-10 (TRADES variant), d = 640, ≈46.2 M parameters")
def wrn_34_10(**kw) -> WideResNet:
    return WideResNet(34, 10, **kw)
