"""The contract every architecture of the suite meets.

A :class:`Classifier` takes inputs in [0, 1], normalises them itself (``normalize.mean`` / ``normalize.std`` are
buffers, identity by default, so ε and step sizes are always in pixel units), and splits into a feature extractor
``features(x) -> (B, d)`` (the "last hidden layer" g of the AFD paper, after global average pooling) and one final
linear layer ``fc`` (ω).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        c = len(mean)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def is_identity(self) -> bool:
        return bool((self.mean == 0).all() and (self.std == 1).all())


class Classifier(nn.Module):
    """Base class: subclasses build ``self.fc`` and implement ``_backbone(x) -> (B, d)`` on normalised input."""

    arch: str = ""
    fc: nn.Linear

    def __init__(self, num_classes: int, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.normalize = Normalize(mean if mean is not None else [0.0] * in_channels,
                                   std if std is not None else [1.0] * in_channels)

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def _backbone(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """g(x): the (B, d) penultimate features of inputs in [0, 1]."""
        return self._backbone(self.normalize(x))

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """Logits; with ``with_features``, (logits, g(x)) from one pass (a method that needs both trains through
        one forward, so that DistributedDataParallel sees it)."""
        h = self.features(x)
        return (self.fc(h), h) if with_features else self.fc(h)
