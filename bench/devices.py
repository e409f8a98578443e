"""Device identity: one canonical form of a ``torch.device``, so that comparisons do not depend on how a device
was named.

``torch.device("cuda")`` carries no index (``index is None``), while every CUDA tensor reports ``cuda:<n>``; a
``torch.Generator(device="cuda")`` keeps ``cuda`` too. A test such as ``generator.device != x.device`` is then
true for the same GPU, and code that takes the "other device" branch calls ``torch.rand(..., generator=<a CUDA
generator>)`` for a CPU draw, which raises. Every device the suite resolves is canonical (a CUDA device always
with its index), and every comparison goes through :func:`same_device`.
"""
from __future__ import annotations

import torch


def canonical(device: torch.device | str) -> torch.device:
    """``device`` with the index a tensor created on it would report: ``cuda`` → ``cuda:<current device>``; a CPU
    device without an index (``cpu:0`` → ``cpu``, as CPU tensors report)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.index is None and dev.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether ``a`` and ``b`` name one device (``cuda`` and ``cuda:0`` do while device 0 is current)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    return canonical(a) == canonical(b)
