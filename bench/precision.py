"""Training precisions (``--precision``): ``fp32`` (the default), ``bf16`` (autocast, parameters in fp32) and ``fp64``
(parameters, inputs, gradients and the methods' per-example state in float64: slow, a reference for reproducibility
checks — a run on N processes equals the one-process run to about 1e-14 in fp64, where in fp32 the sign of PGD's
gradient amplifies rounding). Evaluation is always fp32 (METHODS §15.1): the exported model is cast to fp32."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("fp32", "bf16", "fp64")


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of a run's parameters, inputs and per-example state."""
    return torch.float64 if precision == "fp64" else torch.float32


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32: a bf16 / fp16 tensor (autocast) is cast to fp32, fp32 and fp64 are kept (a loss, a
    reduction or a norm in an fp64 run stays in fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _fp32_knobs() -> list[tuple[object, str, object]]:
    """(object, attribute, value for full fp32) of every switch that lets CUDA compute fp32 work in TF32: the
    ``fp32_precision`` settings of torch ≥ 2.9, else the older ``allow_tf32`` flags. cuDNN convolutions default to
    TF32 on Ampere and later GPUs; nothing here changes anything on a CPU."""
    be = torch.backends
    if hasattr(getattr(be.cudnn, "conv", None), "fp32_precision"):
        knobs = [(be.cudnn.conv, "fp32_precision", "ieee"), (be.cuda.matmul, "fp32_precision", "ieee")]
        if hasattr(getattr(be.cudnn, "rnn", None), "fp32_precision"):
            knobs.append((be.cudnn.rnn, "fp32_precision", "ieee"))
        return knobs
    return [(be.cudnn, "allow_tf32", False), (be.cuda.matmul, "allow_tf32", False)]


def fp32_math() -> str:
    """How fp32 convolutions and matmuls are computed right now: ``ieee`` (full fp32) or ``tf32`` (some of them
    in TF32 on a GPU that has it)."""
    return "ieee" if all(getattr(o, a) == v for o, a, v in _fp32_knobs()) else "tf32"


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Inside the block, fp32 convolutions and matmuls are computed in full fp32 (no TF32), as the suite's "fp32"
    evaluation and fp32 training promise and record (``fp32_math`` in ``eval.json`` and ``metrics.jsonl``); the
    previous settings are restored after it."""
    knobs = _fp32_knobs()
    saved = [getattr(o, a) for o, a, _ in knobs]
    try:
        for o, a, v in knobs:
            setattr(o, a, v)
        yield
    finally:
        for (o, a, _), old in zip(knobs, saved):
            setattr(o, a, old)
