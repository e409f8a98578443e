"""L∞ attacks on models that take inputs in [0, 1]. ε and step sizes are in pixel units (8/255, not 8).

Every attack takes ``bn``: the BatchNorm mode it runs the model in —

* ``"eval"``: running statistics, nothing updated (TRADES/AFD convention, and every evaluation attack);
* ``"train"``: batch statistics, running statistics updated by each forward (Wong et al.'s FGSM-RS / Free-AT);
* ``"keep"``: whatever mode the model is in.

and restores every module's own ``training`` flag afterwards, whatever happens inside. Results lie in [0, 1] and in
the ε-ball around ``x``. Gradients are taken with ``torch.autograd.grad`` w.r.t. the input only, so no parameter's
``.grad`` is touched.

AutoAttack is a thin wrapper of the ``pyautoattack`` package (never a re-implementation), run in fp32, resumable
by chunks of the evaluated set.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import faults
from .fsutil import atomic_write_json

BNMode = Literal["eval", "train", "keep"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: BNMode) -> Iterator[nn.Module]:
    """Run ``model`` in ``mode`` inside the block and restore every module's previous flag on exit."""
    if mode not in ("eval", "train", "keep"):
        raise ValueError(f"unknown BN mode {mode!r}; accepted: eval, train, keep")
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


def assert_eval(model: nn.Module) -> None:
    bad = [n for n, m in model.named_modules() if m.training]
    if bad:
        raise RuntimeError(f"model must be in eval mode for evaluation; in train mode: {bad[:3]}")


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Π_ε: clip to the ε-ball around x, then to [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def uniform_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(−ε, ε) per pixel; drawn from ``generator`` (any device) when given, else the global RNG of x's device."""
    if generator is not None and generator.device != x.device:
        return (torch.rand(x.shape, generator=generator) * 2 - 1).mul_(eps).to(x.device, x.dtype)
    return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1).mul_(eps)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y)


def input_grad(model: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = _ce) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇_x loss, logits) at x, without touching parameter gradients."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits, y)
        (g,) = torch.autograd.grad(loss, x)
    return g, logits.detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
        random_start: bool = True, restarts: int = 1, loss_fn: LossFn = _ce, bn: BNMode = "eval",
        clip_start: bool = False, forward: Callable | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """L∞ PGD (Madry et al.): ``x⁰ = x + U(−ε, ε)`` (``clip_start``: then clipped to [0, 1]; AFD's code and the
    METHODS §15.1 protocol do not clip), then ``steps`` times ``x ← Π_ε(x + step·sign ∇_x loss)``.

    With ``restarts > 1`` the result is the worst case per example: the first restart that fools the model on an
    example is kept for it. ``forward`` (default: ``model``) is the function attacked, e.g. a method's logits
    through a disentangler; ``bn`` is applied to ``model``.
    """
    fwd = forward if forward is not None else model
    x = x.detach()
    with bn_mode(model, bn):
        best = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for r in range(max(1, restarts)):
            x_adv = x + uniform_noise(x, eps, generator) if random_start else x.clone()
            if clip_start:
                x_adv = x_adv.clamp(0.0, 1.0)
            for _ in range(steps):
                g, _ = input_grad(fwd, x_adv, y, loss_fn)
                x_adv = project(x_adv.detach() + step * g.sign(), x, eps)
            if restarts <= 1:
                return x_adv.detach()
            with torch.no_grad():
                wrong = fwd(x_adv).argmax(1) != y
            take = wrong & ~fooled if r > 0 else torch.ones_like(fooled)
            best[take] = x_adv[take].detach()
            fooled |= wrong
        return best


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float | None = None,
         random_start: bool = False, loss_fn: LossFn = _ce, bn: BNMode = "train", forward: Callable | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """FGSM (Goodfellow et al.), or FGSM with a U(−ε, ε) random start (Wong et al.'s FGSM-RS, start clipped to
    [0, 1] as in their code): one step of size ``step`` (default ε), projected to the ε-ball and [0, 1].

    Default ``bn="train"`` is the convention of the fast-AT papers that use it; evaluation passes ``"eval"``.
    """
    fwd = forward if forward is not None else model
    x = x.detach()
    with bn_mode(model, bn):
        x0 = (x + uniform_noise(x, eps, generator)).clamp(0.0, 1.0) if random_start else x
        g, _ = input_grad(fwd, x0, y, loss_fn)
        return project(x0 + (eps if step is None else step) * g.sign(), x, eps).detach()


# ---------------------------------------------------------------------------------------------------------------
# AutoAttack


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str = "standard",
               batch_size: int = 500, chunk: int = 1000, seed: int = 0, state_dir: str | Path | None = None,
               state_key: str = "", progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[str]]:
    """AutoAttack (``pyautoattack``, L∞) on ``(x, y)``: returns the per-point robust flags and the warnings its
    gradient-masking checks raised.

    The model must be in eval mode (checked) and is run in fp32 (autocast disabled). Points are attacked in chunks
    of ``chunk``; each finished chunk's flags are written to ``state_dir`` (keyed by ``state_key``, which the caller
    derives from the weights and settings), so an interrupted evaluation resumes at the first unfinished chunk.
    AutoAttack treats points independently, so chunking changes nothing but the random seeds' bookkeeping.
    """
    from pyautoattack import AutoAttack

    assert_eval(model)
    device = x.device
    flags = torch.zeros(x.shape[0], dtype=torch.bool)
    state_dir = Path(state_dir) if state_dir is not None else None
    capture = _Capture()
    logger = logging.getLogger("auto-attack")
    logger.addHandler(capture)
    propagate, logger.propagate = logger.propagate, False  # its warnings go into the record, not the console
    try:
        for start in range(0, x.shape[0], chunk):
            end = min(start + chunk, x.shape[0])
            path = state_dir / f"aa-{start}-{end}.json" if state_dir is not None else None
            if path is not None and path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("key") == state_key and len(saved["robust"]) == end - start:
                    flags[start:end] = torch.tensor(saved["robust"], dtype=torch.bool)
                    capture.messages.extend(m for m in saved.get("flags", []) if m not in capture.messages)
                    if progress:
                        progress(end - start)
                    continue
            adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=device)
            adversary.logger = logger
            with torch.autocast(device.type, enabled=False):
                _, y_adv = adversary.run_standard_evaluation(x[start:end].float(), y[start:end],
                                                             batch_size=batch_size)
            robust = (y_adv.to(y.device) == y[start:end]).cpu()
            flags[start:end] = robust
            if path is not None:
                atomic_write_json(path, {"key": state_key, "robust": robust.int().tolist(),
                                         "flags": capture.messages})
                faults.point("aa_chunk")
            if progress:
                progress(end - start)
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate
    return flags, capture.messages
