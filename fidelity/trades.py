"""TRADES against its authors' ``trades.py`` (github.com/yaodongyu/TRADES): the update of ``trades_loss`` +
``loss.backward()`` + ``optimizer.step()`` of ``train_trades_cifar10.py`` against the suite's ``TRADES.train_step``.

    python -m fidelity.trades --official /path/to/TRADES [--write-golden]

Same float64 weights, batches and the same 0.001·N(0, I) start (the official ``torch.randn(x.shape)`` is fed the
suite's draw); ε = 8/255 on both sides (the official default 0.031 is 7.9/255: a documented setting, not a
difference of the update).
"""
from __future__ import annotations

import copy

import torch

from . import common

SETTING = {"arch": "smallcnn", "seed": 0, "n": 16, "iters": 3, "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4,
           "eps": 8 / 255, "step": 0.007, "steps": 10, "beta": 6.0, "batch_seeds": [1, 2, 3],
           "noise_seeds": [11, 12, 13]}


def suite_run(s: dict) -> list[dict]:
    from methods import get_method

    m0 = common.model(s["seed"], s["arch"])
    cls = get_method("trades")
    hp = cls.resolved_defaults()
    hp.update(lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"], eps=s["eps"],
              attack_step=s["step"], attack_steps=s["steps"], beta=s["beta"], init_std=0.001)
    info = {"n": s["n"], "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    method = cls(hp, copy.deepcopy(m0), None, steps_per_epoch=s["iters"], info=info, fused=False)
    return common.suite_steps(method, m0, s)


def official_run(checkout: str, s: dict = SETTING) -> tuple[list[dict], dict]:
    """The official iterations (the suite needs nothing else)."""
    mod = common.load_official(checkout, "trades.py", "official_trades")
    m0 = common.model(s["seed"], s["arch"])
    net = copy.deepcopy(m0)
    opt = torch.optim.SGD(net.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    out = []
    real_randn = torch.randn
    try:
        for i in range(s["iters"]):
            x, y = common.batch(s["batch_seeds"][i], s["n"])
            torch.manual_seed(s["noise_seeds"][i])
            noise = torch.empty_like(x).normal_()  # what the suite draws
            torch.randn = lambda *a, **k: noise.clone()  # the official start: x + 0.001 * torch.randn(x.shape)
            net.train()
            opt.zero_grad()
            loss = mod.trades_loss(model=net, x_natural=x, y=y, optimizer=opt, step_size=s["step"],
                                   epsilon=s["eps"], perturb_steps=s["steps"], beta=s["beta"], distance="l_inf")
            loss.backward()
            opt.step()
            out.append(common.summary(m0, net))
    finally:
        torch.randn = real_randn
    return out, {}


def main() -> None:
    common.main("trades", __doc__, {"repo": "yaodongyu/TRADES",
                                    "files": "trades.py (trades_loss), train_trades_cifar10.py (the step)"},
                SETTING, official_run, suite_run)


if __name__ == "__main__":
    main()
