"""Training precisions (``--precision``): ``fp32`` (the default), ``bf16`` (autocast, parameters in fp32) and ``fp64``
(parameters, inputs, gradients and the methods' per-example state in float64: slow, a reference for reproducibility
checks — a run on N processes equals the one-process run to about 1e-14 in fp64, where in fp32 the sign of PGD's
gradient amplifies rounding). Evaluation is always fp32 (METHODS §15.1): the exported model is cast to fp32."""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "fp64")


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of a run's parameters, inputs and per-example state."""
    return torch.float64 if precision == "fp64" else torch.float32


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32: a bf16 / fp16 tensor (autocast) is cast to fp32, fp32 and fp64 are kept (a loss, a
    reduction or a norm in an fp64 run stays in fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
