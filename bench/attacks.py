"""L∞ attacks on models that take inputs in [0, 1]. ε and step sizes are in pixel units (8/255, not 8).

Every attack takes ``bn``: the BatchNorm mode it runs the model in —

* ``"eval"``: running statistics, nothing updated (TRADES/AFD convention, and every evaluation attack);
* ``"train"``: batch statistics, running statistics updated by each forward (Wong et al.'s FGSM-RS / Free-AT);
* ``"keep"``: whatever mode the model is in.

and restores every module's own ``training`` flag afterwards, whatever happens inside. Results lie in [0, 1] and in
the ε-ball around ``x``. Gradients are taken w.r.t. the input only (``torch.autograd.grad``, or ``torch.func.grad``
in the fused step below), so no parameter's ``.grad`` is touched.

One PGD step is :func:`sign_step`. When the attacked forward is the engine's compiled one
(:class:`CompiledAttackForward`) and no module of the model is in train mode, the step is a single compiled graph:
forward, loss, input gradient (``torch.func.grad``), sign and projection together.

AutoAttack is a thin wrapper of the ``pyautoattack`` package (never a re-implementation), run in fp32, resumable
by chunks of the evaluated set.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import faults
from .devices import same_device
from .dist import rows_like
from .step import per_example, seed_loss
from .fsutil import atomic_write_json
from .precision import wide

if TYPE_CHECKING:
    from .dist import Dist

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
    """U(−ε, ε) per pixel; drawn from ``generator`` (any device) when given, else the global RNG of x's device.
    Inside a training step on a shard of a global batch, drawn for the global batch (:func:`bench.step.per_example`)."""
    def draw(m: int) -> torch.Tensor:
        shape = (m, *x.shape[1:])
        if generator is not None and not same_device(generator.device, x.device):
            return (torch.rand(shape, generator=generator) * 2 - 1).mul_(eps).to(x.device, x.dtype)
        return (torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1).mul_(eps)

    return per_example(draw, x.shape[0])


def normal_noise(x: torch.Tensor) -> torch.Tensor:
    """N(0, 1) per pixel, shaped, typed and laid out like ``x``, from the global RNG of x's device (what
    ``torch.randn_like(x)`` draws). Inside a training step on a shard of a global batch, drawn for the global batch
    (:func:`bench.step.per_example`)."""
    return per_example(lambda m: rows_like(x, m).normal_(), x.shape[0])


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(wide(logits), y)


def input_grad(model: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = _ce,
               seed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇_x loss, logits) at x, without touching parameter gradients. ``seed``: the loss is seeded with the rank's
    batch share inside a sharded training step (:func:`bench.step.seed_loss`) — needed when BatchNorm runs in train
    mode, whose synchronised statistics couple the ranks' losses; in eval mode every example's gradient is its own
    and only its scale (1/local batch) differs, which the sign of an attack step ignores."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits, y)
        (g,) = torch.autograd.grad(seed_loss(loss) if seed else loss, x)
    return g, logits.detach()


class ParamsDetached(nn.Module):
    """``module``'s forward with every parameter detached (``torch.func.functional_call``; the buffers are the
    module's own, so a train-mode BN still updates its running statistics in place): the forward an attack
    differentiates w.r.t. its input. Its values and input gradients are the module's; no gradient can reach a
    parameter through it.

    It exists for ``torch.compile``: eager autograd prunes the weight gradients that ``torch.autograd.grad(loss, x)``
    does not ask for, but a compiled forward's backward (AOTAutograd) computes the gradient of every graph input that
    requires one, so a compiled attack would compute every weight gradient and throw it away. Compiled on top of this
    wrapper, the graph's parameters do not require gradients and the backward computes the input gradient only."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        params = {k: p.detach() for k, p in self.module.named_parameters()}
        return torch.func.functional_call(self.module, params, (x, *args), kwargs)


class CompiledAttackForward:
    """The attacks' forward as the engine compiles it (``Method.compile``): called, it is ``torch.compile`` of
    :class:`ParamsDetached` over ``model``; :meth:`fused_sign_step` is one whole PGD step compiled as one graph.

    Why the fused step: compiled, the forward alone leaves every step's loss, its backward seed, the autograd
    engine's walk of the compiled backward, ``sign``, the step and the two clips to eager ops, each its own kernel
    and pass over the batch. One graph of ``x′ ↦ Π_ε(x′ + step·sign ∇_{x′} loss(f(x′), y))`` (the gradient by
    ``torch.func.grad``) fuses them with the forward's and backward's own kernels and calls the autograd engine not
    at all (``bench perf --ablate-fused-step`` times what that buys on a device).

    ``torch.func.grad`` cannot run a function that updates a captured buffer in place, which a train-mode
    BatchNorm does; so the fused step is taken only when no module of ``model`` is in train mode, and
    :meth:`fused_sign_step` returns ``None`` otherwise (the caller then steps through the compiled forward and
    ``torch.autograd.grad``, which updates the running statistics as the eager model does)."""

    def __init__(self, model: nn.Module, fused: bool = True):
        self.model = model
        self.fused = fused  # False: never fuse (the ablation ``bench perf --ablate-fused-step`` times)
        self.detached = ParamsDetached(model)
        self.forward = torch.compile(self.detached)
        self._step = torch.compile(self._sign_step)

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        return self.forward(x, *args, **kwargs)

    def _sign_step(self, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, step: float,
                   eps: float) -> torch.Tensor:
        g = torch.func.grad(lambda z: loss_fn(self.detached(z), y))(x_adv)
        return project(x_adv + step * g.sign(), x, eps)

    def fused_sign_step(self, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, step: float,
                        eps: float) -> torch.Tensor | None:
        """:func:`sign_step` as one compiled graph, or ``None`` when a module of the model is in train mode (or
        fusing is off)."""
        if not self.fused or any(m.training for m in self.model.modules()):
            return None
        return self._step(x_adv.detach(), x.detach(), y, loss_fn, step, eps)


def sign_step(fwd: Callable, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, step: float, eps: float,
              loss_fn: LossFn = _ce, seed: bool = False) -> torch.Tensor:
    """One signed-gradient ascent step of ``loss_fn(fwd(x′), y)`` w.r.t. x′, projected: ``Π_ε(x′ + step·sign ∇)``
    (``seed``: as :func:`input_grad`). Through the engine's :class:`CompiledAttackForward` in eval mode, one fused
    compiled graph; otherwise :func:`input_grad` and the update."""
    fused = getattr(fwd, "fused_sign_step", None)
    if fused is not None:
        out = fused(x_adv, x, y, loss_fn, step, eps)
        if out is not None:
            return out
    g, _ = input_grad(fwd, x_adv, y, loss_fn, seed=seed)
    return project(x_adv.detach() + step * g.sign(), x, eps)


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
                x_adv = sign_step(fwd, x_adv, x, y, step=step, eps=eps, loss_fn=loss_fn, seed=bn == "train")
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
        return sign_step(fwd, x0, x, y, step=eps if step is None else step, eps=eps, loss_fn=loss_fn,
                         seed=bn == "train").detach()


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
               state_key: str = "", progress: Callable[[int], None] | None = None,
               dist: "Dist | None" = None) -> tuple[torch.Tensor, list[str]]:
    """AutoAttack (``pyautoattack``, L∞) on ``(x, y)``: returns the per-point robust flags and the warnings its
    gradient-masking checks raised.

    The model must be in eval mode (checked) and is run in fp32 (autocast disabled). Points are attacked in chunks
    of ``chunk``; each finished chunk's flags are written to ``state_dir`` (keyed by ``state_key``, which the caller
    derives from the weights and settings), so an interrupted evaluation resumes at the first unfinished chunk.
    AutoAttack treats points independently, so chunking changes nothing but the random seeds' bookkeeping.

    Under data parallelism (``dist``) the chunks are dealt out in rounds of one per rank; after each round the
    flags and warnings are gathered and rank 0 writes the round's chunk files.
    """
    from .dist import SINGLE

    dist = dist if dist is not None else SINGLE
    assert_eval(model)
    flags = torch.zeros(x.shape[0], dtype=torch.bool)
    state_dir = Path(state_dir) if state_dir is not None else None
    capture = _Capture()
    logger = logging.getLogger("auto-attack")
    logger.addHandler(capture)
    propagate, logger.propagate = logger.propagate, False  # its warnings go into the record, not the console
    starts = list(range(0, x.shape[0], chunk))
    try:
        for r0 in range(0, len(starts), dist.world):
            chunks = [(a, min(a + chunk, x.shape[0])) for a in starts[r0:r0 + dist.world]]
            fresh = []  # (start, end) of the chunks attacked in this round (not loaded from their files)
            for i, (start, end) in enumerate(chunks):
                saved = dist.agree(_saved_chunk(state_dir, start, end, state_key))  # rank 0's files decide
                if saved is not None:
                    flags[start:end] = torch.tensor(saved["robust"], dtype=torch.bool)
                    capture.messages.extend(m for m in saved.get("flags", []) if m not in capture.messages)
                    continue
                fresh.append((start, end))
                if i == dist.rank:
                    flags[start:end] = _autoattack_chunk(model, x[start:end], y[start:end], eps=eps,
                                                         version=version, seed=seed, batch_size=batch_size,
                                                         logger=logger)
            if dist.enabled and fresh:  # (on the device: NCCL reduces GPU tensors only)
                flags = (dist.all_sum(flags.to(device=x.device, dtype=torch.int32)) > 0).cpu()
                for msgs in dist.gather_objects(list(capture.messages)):
                    capture.messages.extend(m for m in msgs if m not in capture.messages)
            for start, end in fresh:
                if state_dir is not None and dist.is_main:
                    atomic_write_json(state_dir / f"aa-{start}-{end}.json",
                                      {"key": state_key, "robust": flags[start:end].int().tolist(),
                                       "flags": capture.messages})
                    faults.point("aa_chunk")
            if progress:
                progress(sum(end - start for start, end in chunks))
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate
    return flags, capture.messages


def _saved_chunk(state_dir: Path | None, start: int, end: int, key: str) -> dict | None:
    path = state_dir / f"aa-{start}-{end}.json" if state_dir is not None else None
    if path is None or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("key") == key and len(saved["robust"]) == end - start else None


def _autoattack_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str, seed: int,
                      batch_size: int, logger: logging.Logger) -> torch.Tensor:
    """Robust flags (CPU bool) of one chunk under AutoAttack."""
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=x.device)
    adversary.logger = logger
    with torch.autocast(x.device.type, enabled=False):
        _, y_adv = adversary.run_standard_evaluation(x.float(), y, batch_size=batch_size)
    return (y_adv.to(y.device) == y).cpu()
