"""Architectures: a registry of :class:`~bench.models.base.Classifier` builders, and checkpoint loading."""
from . import preact_resnet, resnet, small_cnn, timm_backbone, wide_resnet  # noqa: F401  (register the architectures)
from .base import Classifier, Normalize
from .registry import MODELS, build_model, create_model

timm_backbone.register(MODELS)  # timm:<model name>: any timm classification model

__all__ = ["Classifier", "Normalize", "MODELS", "build_model", "create_model"]
