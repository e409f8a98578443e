"""A small CNN (four 3×3 conv + BN + ReLU stages, widths 8-16-32-64, d = 64, 25 k parameters) for CPU smoke runs and tests.

It has BatchNorm, so every BN-mode convention of the attacks applies to it as to the ResNets; it is not a paper
architecture and the report never compares it with the paper's numbers.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Classifier
from .registry import register_model


class SmallCNN(Classifier):
    def __init__(self, num_classes=10, in_channels=3, mean=None, std=None, widths=(8, 16, 32, 64)):
        super().__init__(num_classes, in_channels, mean, std)
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def _backbone(self, x):
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


@register_model("smallcnn", paper=None)
def smallcnn(**kw) -> SmallCNN:
    return SmallCNN(**kw)
