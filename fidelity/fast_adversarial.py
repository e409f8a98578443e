"""Running the training loop of Wong et al.'s ``CIFAR10/train_fgsm.py`` / ``train_free.py``
(github.com/locuslab/fast_adversarial) on the CPU for a few iterations: their ``main()`` as written, with what a CPU
without apex, CUDA or the CIFAR-10 download needs replaced around it — apex's ``amp`` by a pass-through (opt level
O0 is fp32), ``.cuda()`` by an identity, ``get_loaders`` by the comparison's batches, ``PreActResNet18()`` by the
comparison's model, the normalisation constants by mean 0 / std 1 (the suite's inputs are in [0, 1]; ε and α are then
the same numbers on both sides), and ``torch.save`` (reached after the training loop) by the end of the run. The
model's state after every batch is summarised."""
from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch import nn

from . import common


class _Done(Exception):
    pass


class _Batches:
    """The official loop's train_loader: yields the batches, and summarises the model after each."""

    def __init__(self, batches, m0, model):
        self.batches, self.m0, self.model, self.out = batches, m0, model, []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i:
                self.out.append(common.summary(self.m0, self.model))
            yield b


def run_main(checkout: str, script: str, argv: list[str], m0: nn.Module, model: nn.Module, batches,
             lrs: list[float]) -> list[dict]:
    """Summaries of the model after each batch; ``lrs`` receives the lr (and checks the momentum) of every
    optimiser step the official loop takes."""
    amp = types.ModuleType("apex.amp")

    def initialize(m, opt, **k):
        opt.register_step_pre_hook(
            lambda o, a, kw: lrs.append((o.param_groups[0]["lr"], o.param_groups[0]["momentum"])))
        return m, opt

    amp.initialize = initialize
    amp.scale_loss = contextlib.contextmanager(lambda loss, opt: (yield loss))
    apex = types.ModuleType("apex")
    apex.amp = amp
    saved_modules = {k: sys.modules.get(k) for k in ("apex", "apex.amp", "utils", "preact_resnet")}
    sys.modules.update({"apex": apex, "apex.amp": amp})
    for k in ("utils", "preact_resnet"):
        sys.modules.pop(k, None)
    real_save, real_cuda, real_argv = torch.save, nn.Module.cuda, sys.argv
    loader = _Batches(batches, m0, model)

    def save(*a, **k):
        raise _Done

    try:
        nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        mod = common.load_official(checkout, f"CIFAR10/{script}", f"official_{script[:-3]}")
        one = torch.ones(3, 1, 1, dtype=next(model.parameters()).dtype)
        mod.std, mod.upper_limit, mod.lower_limit = one, one, torch.zeros_like(one)
        mod.get_loaders = lambda d, b: (loader, [])
        mod.PreActResNet18 = lambda: model
        torch.save = save
        sys.argv = [script, "--opt-level", "O0", "--out-dir", "/tmp/fidelity-out", *argv]
        try:
            mod.main()
        except _Done:
            pass
    finally:
        torch.save, nn.Module.cuda, sys.argv = real_save, real_cuda, real_argv
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    loader.out.append(common.summary(m0, model))
    return loader.out


def cyclic_lrs(steps: list[tuple[float, float]], lr_max: float) -> list[float]:
    """The lr of each official step, after checking that its momentum is CyclicLR's cycled one,
    0.9 − 0.1·lr/lr_max — what the suite's ``schedule.momentum = [0.8, 0.9]`` gives."""
    for lr, mom in steps:
        assert abs(mom - (0.9 - 0.1 * lr / lr_max)) < 1e-12, (lr, mom)
    return [lr for lr, _ in steps]
