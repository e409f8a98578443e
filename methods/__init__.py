"""Training methods, one module per method, behind the :class:`~methods.base.Method` interface."""
from . import afd, afkd, arrest, atas, fgsm_ga, fgsm_rs, free_at, natural, pgd_at, rift, trades, vaft  # noqa: F401
from .base import METHODS, Method, get_method, register_method

__all__ = ["METHODS", "Method", "get_method", "register_method"]
