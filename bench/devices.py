"""Devices: the one that ``--device`` names for a process, alone or a rank of several (:func:`resolve_device`, which
every command and the engine call), how records name it (:func:`device_name`, :func:`device_label`), and one
canonical form of a ``torch.device``, so that comparisons do not depend on how a device was named.

``torch.device("cuda")`` carries no index (``index is None``), while every CUDA tensor reports ``cuda:<n>``; a
``torch.Generator(device="cuda")`` keeps ``cuda`` too. A test such as ``generator.device != x.device`` is then
true for the same GPU, and code that takes the "other device" branch calls ``torch.rand(..., generator=<a CUDA
generator>)`` for a CPU draw, which raises. Every device the suite resolves is canonical (a CUDA device always
with its index), and every comparison goes through :func:`same_device`.
"""
from __future__ import annotations

import torch

from .dist import SINGLE, Dist, rank_device
from .errors import BenchError


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


def resolve_device(name: str | None, dist: Dist = SINGLE) -> torch.device:
    """The device ``--device name`` trains and evaluates on, canonical (:func:`canonical`). On one process: ``auto``
    (a GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; under data parallelism (``dist``)
    the local rank's own GPU, or the CPU (:func:`bench.dist.rank_device`). A name it does not know, or a GPU that is
    not visible here, is a one-line error."""
    if dist.enabled:
        return rank_device(name, dist.local_rank)  # (cuda:<local rank>: canonical)
    name = (name or "auto").lower()
    if name == "auto":
        return canonical("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown --device {name!r}; accepted: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {name}: no CUDA GPU is visible here; accepted: cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BenchError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type != "cpu":
        raise BenchError(f"unknown --device {name!r}; accepted: auto, cpu, cuda, cuda:N")
    return canonical(dev)  # cuda → cuda:<current>: the device its tensors and generators report


def device_name(device: torch.device | str) -> str:
    """What a device is, as the records name it: the GPU's model, or ``cpu (<CPU model>, <threads> threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        model = ""
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"cpu ({model or 'unknown'}, {torch.get_num_threads()} threads)"
    return str(device)


def device_label(device: torch.device | str, dist: Dist = SINGLE) -> str:
    """The device a run trains on as ``config.json`` and every epoch's row of ``metrics.jsonl`` name it:
    :func:`device_name`, or ``2× NVIDIA H100 80GB HBM3 (DDP)`` for a run on several processes."""
    name = device_name(device)
    return f"{dist.world}× {name} (DDP)" if dist.enabled else name
