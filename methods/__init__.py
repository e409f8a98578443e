"""Training methods, one module per method, behind the :class:`~methods.base.Method` interface."""
from . import afd, afkd, arrest, natural, pgd_at, vaft  # noqa: F401  (register the methods)
from .base import METHODS, Method, get_method, register_method

__all__ = ["METHODS", "Method", "get_method", "register_method"]
