"""Small CNNs for the CPU: stages of 3×3 conv + BN + ReLU, each stage after the first halving the resolution, then
global average pooling and one linear layer.

* ``smallcnn``: one conv per stage, widths 8-16-32-64, d = 64, 25 k parameters (smoke runs and tests);
* ``smallcnn-x2``: the same at twice the width, 16-32-64-128, d = 128, 99 k parameters;
* ``smallvgg``: two convs per stage (VGG-style), widths 16-32-64-128, d = 128, 295 k parameters.

The two wider ones are for the CPU tier, which trains ``smallvgg`` (``bench/configs/cpu.toml``; README "The CPU
tier" says why that one). All have BatchNorm, so every BN-mode convention of the attacks applies to them as to the
ResNets; none is a paper architecture and the report never compares them with the paper's numbers as if they were.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Classifier
from .registry import register_model


class SmallCNN(Classifier):
    def __init__(self, num_classes=10, in_channels=3, mean=None, std=None, widths=(8, 16, 32, 64), convs=1):
        super().__init__(num_classes, in_channels, mean, std)
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            for j in range(convs):
                stride = 2 if i > 0 and j == 0 else 1
                layers += [nn.Conv2d(c, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def _backbone(self, x):
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


@register_model("smallcnn", paper=None)
def smallcnn(**kw) -> SmallCNN:
    return SmallCNN(**kw)


@register_model("smallcnn-x2", paper=None)
def smallcnn_x2(**kw) -> SmallCNN:
    return SmallCNN(widths=(16, 32, 64, 128), **kw)


@register_model("smallvgg", paper=None)
def smallvgg(**kw) -> SmallCNN:
    return SmallCNN(widths=(16, 32, 64, 128), convs=2, **kw)
