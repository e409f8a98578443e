"""FGSM-RS against Wong et al.'s ``CIFAR10/train_fgsm.py`` (github.com/locuslab/fast_adversarial), its loop run as
written (:mod:`fidelity.fast_adversarial`) for three mini-batches, against the suite's ``FGSMRS.train_step``.

    python -m fidelity.fgsm_rs --official /path/to/fast_adversarial [--write-golden]

Same float64 weights and batches; the official per-channel ``delta[:, j].uniform_(-ε, ε)`` start is fed the suite's
U(−ε, ε) draw; the official ``CyclicLR`` (lr 0 → 0.2 → 0 over the three steps, momentum cycling 0.9 → 0.8 → 0.9 with
it) runs as written, and the suite's step is given the lr of each official step (the suite's schedule reads the lr
one step ahead of ``CyclicLR``, documented in docs/methods.md; the momentum follows from the lr on both sides).
"""
from __future__ import annotations

import copy

import torch

from . import common

SETTING = {"arch": "smallcnn", "seed": 0, "n": 16, "iters": 3, "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4,
           "eps": 8 / 255, "alpha": 10 / 255, "batch_seeds": [1, 2, 3], "noise_seeds": [11, 12, 13]}


def _noise(s: dict, i: int, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(s["noise_seeds"][i])
    return (torch.rand(x.shape, dtype=x.dtype) * 2 - 1).mul_(s["eps"])  # bench.attacks.uniform_noise's draw


def suite_run(s: dict) -> list[dict]:
    """The suite's steps at the official steps' learning rates (``s["official_lrs"]``)."""
    from methods import get_method

    m0 = common.model(s["seed"], s["arch"])
    cls = get_method("fgsm-rs")
    hp = cls.resolved_defaults()
    hp.update(lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"], eps=s["eps"],
              alpha_ratio=s["alpha"] / s["eps"])
    if "schedule_momentum" in s:  # (a test's variation)
        hp["schedule"] = {**hp["schedule"], "momentum": s["schedule_momentum"]}
    info = {"n": s["n"], "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    method = cls(hp, copy.deepcopy(m0), None, steps_per_epoch=s["iters"], info=info, fused=False)
    return common.suite_steps(method, m0, s, lrs=s["official_lrs"])


def official_run(checkout: str, s: dict = SETTING) -> tuple[list[dict], dict]:
    """The official iterations, and the lr of each official step (``official_lrs``)."""
    from .fast_adversarial import cyclic_lrs, run_main

    m0 = common.model(s["seed"], s["arch"])
    batches = [common.batch(b, s["n"]) for b in s["batch_seeds"][:s["iters"]]]
    noises = [_noise(s, i, x) for i, (x, _) in enumerate(batches)]
    calls = []
    real_uniform = torch.Tensor.uniform_

    def uniform_(self, a=0.0, b=1.0, **k):  # delta[:, j, :, :].uniform_(-ε_j, ε_j), j = 0, 1, 2 per batch
        i, j = divmod(len(calls), 3)
        calls.append((a, b))
        assert abs(b - s["eps"]) < 1e-12 and self.shape == noises[i][:, j].shape
        return self.copy_(noises[i][:, j])

    torch.Tensor.uniform_ = uniform_
    steps: list = []
    try:
        out = run_main(checkout, "train_fgsm.py", [
            "--batch-size", str(s["n"]), "--epochs", "1", "--lr-min", "0", "--lr-max", str(s["lr"]),
            "--momentum", str(s["momentum"]), "--weight-decay", str(s["weight_decay"]), "--epsilon", "8",
            "--alpha", str(s["alpha"] * 255), "--delta-init", "random"], m0, copy.deepcopy(m0), batches, steps)
    finally:
        torch.Tensor.uniform_ = real_uniform
    assert len(calls) == 3 * s["iters"] and len(steps) == s["iters"]
    return out, {"official_lrs": cyclic_lrs(steps, s["lr"])}


def main() -> None:
    common.main("fgsm-rs", __doc__, {"repo": "locuslab/fast_adversarial",
                                     "files": "CIFAR10/train_fgsm.py (main's training loop)"},
                SETTING, official_run, suite_run)


if __name__ == "__main__":
    main()
