"""The one place where the suite bridges package naming: ``robustbench`` imports ``autoattack``.

AutoAttack's code is published on PyPI as ``pyautoattack`` (the same code as github.com/fra31/auto-attack, which
installs under the import name ``autoattack`` and has no PyPI release). robustbench 1.1.1 does
``from autoattack import AutoAttack`` and ``from autoattack.state import EvaluationState`` at import time, so without
help ``import robustbench`` fails on a machine that installed everything from PyPI. :func:`import_robustbench`
registers ``pyautoattack`` and its submodules under the name ``autoattack`` in ``sys.modules`` (only if no real
``autoattack`` package is importable) and then imports robustbench.

robustbench also imports ``pkg_resources``, which setuptools 81 removed; ``pyproject.toml`` pins setuptools < 81.

The suite uses robustbench for its model zoo (architectures and names of published robust models, loaded from files
already on disk by ``bench eval robustbench:<name>``) and its dataset / threat-model names.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import warnings
from types import ModuleType

from .errors import BenchError

_SKIP = {"fab_tf", "utils_tf", "utils_tf2"}  # TensorFlow-only modules, not needed and would import tensorflow


def alias_autoattack() -> ModuleType:
    """Make ``import autoattack`` (and ``autoattack.<sub>``) resolve to ``pyautoattack``; returns the module."""
    existing = sys.modules.get("autoattack")
    if existing is not None:
        return existing
    if importlib.util.find_spec("autoattack") is not None:  # the GitHub package is installed: use it as is
        return importlib.import_module("autoattack")
    import pyautoattack

    sys.modules["autoattack"] = pyautoattack
    for info in pkgutil.iter_modules(pyautoattack.__path__):
        if info.name in _SKIP or info.ispkg:
            continue
        sys.modules[f"autoattack.{info.name}"] = importlib.import_module(f"pyautoattack.{info.name}")
    return pyautoattack


def import_robustbench() -> ModuleType:
    alias_autoattack()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            import robustbench
            import robustbench.eval  # noqa: F401  (the module that needs the alias)
    except ImportError as e:
        raise BenchError(f"robustbench cannot be imported ({e}); install it with pip install robustbench "
                         "'setuptools<81'") from None
    return robustbench
