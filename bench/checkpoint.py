"""Checkpoints without pickle: nested state (model, optimisers, method state, RNG) as one safetensors file.

A nested structure of dicts / lists / tuples / numbers / strings / tensors is split into a flat dict of tensors
(stored as safetensors) and a JSON skeleton (stored in the safetensors metadata) that says where each tensor goes.
Nothing is unpickled on load, so a checkpoint from elsewhere cannot run code. The metadata also carries a SHA-256 of
the whole content — the JSON skeleton (epochs done, losses, RNG states, every number that is not a tensor), the
format, and the tensors' names, dtypes, shapes and bytes — so a file that was truncated or altered anywhere,
header included, is detected and never loaded. (Files of the first format, ``aft-bench-state/1``, covered only the
tensors; they still load, with their tensors checked.)
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import BenchError
from .fsutil import atomic_write

FORMAT = "aft-bench-state/2"
FORMAT_V1 = "aft-bench-state/1"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}")


def _unflatten(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {k: _unflatten(v, tensors) for k, v in skel["__dict__"]}
        if "__tuple__" in skel:
            return tuple(_unflatten(v, tensors) for v in skel["__tuple__"])
        raise ValueError("malformed checkpoint skeleton")
    if isinstance(skel, list):
        return [_unflatten(v, tensors) for v in skel]
    return skel


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a dict of tensors (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a flat dict of tensors atomically as a safetensors file."""
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def state_digest(fmt: str, skeleton: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the format, the skeleton's exact text and the tensors (:func:`tensor_digest`)."""
    h = hashlib.sha256()
    for part in (fmt, skeleton, tensor_digest(tensors)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def save_state(path: str | os.PathLike, state: Any) -> None:
    """Write ``state`` atomically to ``path`` (a .safetensors file)."""
    tensors: dict[str, torch.Tensor] = {}
    skel = json.dumps(_flatten(state, tensors, ""))
    write_safetensors(path, tensors, {"format": FORMAT, "skeleton": skel,
                                      "sha256": state_digest(FORMAT, skel, tensors)})


class CorruptCheckpoint(BenchError):
    pass


def load_state(path: str | os.PathLike) -> Any:
    """Read a state written by :func:`save_state`; raises :class:`CorruptCheckpoint` if it is damaged."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / malformed files
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable ({type(e).__name__}: {_first_line(e)})") from None
    fmt, skel = meta.get("format"), meta.get("skeleton")
    if fmt not in (FORMAT, FORMAT_V1) or not isinstance(skel, str):
        raise CorruptCheckpoint(f"checkpoint {path} is not an aft-bench state file (format {fmt!r})")
    want = state_digest(fmt, skel, tensors) if fmt == FORMAT else tensor_digest(tensors)
    if want != meta.get("sha256"):
        raise CorruptCheckpoint(f"checkpoint {path} fails its SHA-256 check (truncated or modified)")
    try:
        return _unflatten(json.loads(skel), tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"checkpoint {path} has a malformed skeleton ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """An exception's message as one whole line (never cut mid-word)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def load_latest(paths: list[Path]) -> tuple[Any, Path] | None:
    """Load the first readable checkpoint of ``paths`` (newest first), warning about each damaged one."""
    for p in paths:
        if not p.exists():
            continue
        try:
            return load_state(p), p
        except CorruptCheckpoint as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
    return None
