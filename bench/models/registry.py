from __future__ import annotations

from typing import Sequence

from ..registry import Registry
from .base import Classifier

MODELS: Registry = Registry("architecture")


def register_model(name: str, **info):
    def deco(fn):
        fn.arch_name = name
        return MODELS.add(name, fn, **info)
    return deco


def create_model(arch: str, num_classes: int, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> Classifier:
    model = MODELS.get(arch)(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    model.arch = arch
    return model


def build_model(cfg, dataset) -> Classifier:
    """The untrained network of the run ``cfg`` (a :class:`~bench.config.RunConfig`) on ``dataset``: its
    architecture for the dataset's classes and channels, holding the dataset's mean/std when the run normalises its
    inputs (``cfg.normalize``). Training builds it to start from; evaluating a finished run builds it to load the
    run's final weights into."""
    mean_std = dataset.stats() if cfg.normalize else (None, None)
    return create_model(cfg.arch, dataset.num_classes, dataset.channels, *mean_std)
