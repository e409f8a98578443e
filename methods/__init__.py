"""Training methods, one module per method, behind the :class:`~methods.base.Method` interface."""
from . import afd, afkd, arrest, atas, fgsm_ga, fgsm_rs, free_at, natural, pgd_at, rift, trades, vaft  # noqa: F401
from .base import METHODS, Method, get_method, register_method

# Spellings of the Table-3 ablations without '+', for TOML bare keys ([method.vaft-d]), regular expressions (grep,
# pytest -k) and URLs, accepted wherever a method is named. The registered names stay what run records, run hashes
# and run directories hold, so that every recorded run keeps its identity.
METHODS.add_alias("vaft-d", "vaft+d")
METHODS.add_alias("vaft-a", "vaft+a")

__all__ = ["METHODS", "Method", "get_method", "register_method"]
