"""Free-AT against Wong et al.'s ``CIFAR10/train_free.py`` (github.com/locuslab/fast_adversarial), its loop run as
written (:mod:`fidelity.fast_adversarial`) for three mini-batches of m = 4 replays, against the suite's
``FreeAT.train_step``.

    python -m fidelity.free_at --official /path/to/fast_adversarial [--write-golden]

Same float64 weights and batches (δ starts at 0 on both sides: nothing random); the official ``CyclicLR`` (with its
momentum cycling) runs as written and every suite replay is given the lr of the official step it matches.
"""
from __future__ import annotations

import copy

import torch

from . import common

SETTING = {"arch": "smallcnn", "seed": 0, "n": 16, "iters": 3, "replays": 4, "lr": 0.04, "momentum": 0.9,
           "weight_decay": 5e-4, "eps": 8 / 255, "batch_seeds": [1, 2, 3]}


def suite_run(s: dict) -> list[dict]:
    """The suite's replays at the official steps' learning rates (``s["official_lrs"]``)."""
    from bench.loader import Batch
    from methods import get_method

    lrs = s["official_lrs"]
    m0 = common.model(s["seed"], s["arch"])
    cls = get_method("free-at")
    hp = cls.resolved_defaults()
    hp.update(lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"], eps=s["eps"],
              replays=s["replays"], batch_size=s["n"])
    info = {"n": s["n"], "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    method = cls(hp, copy.deepcopy(m0), None, steps_per_epoch=s["iters"], info=info, fused=False)
    method.lr_for_replay = lambda epoch, step, r: lrs[step * s["replays"] + r]
    out = []
    for i in range(s["iters"]):
        x, y = common.batch(s["batch_seeds"][i], s["n"])
        method.train_step(Batch(x, y, torch.arange(s["n"])), 0, i)
        out.append(common.summary(m0, method.model))
    return out


def official_run(checkout: str, s: dict = SETTING) -> tuple[list[dict], dict]:
    """The official iterations, and the lr of each official step (``official_lrs``)."""
    from .fast_adversarial import cyclic_lrs, run_main

    m0 = common.model(s["seed"], s["arch"])
    batches = [common.batch(b, s["n"]) for b in s["batch_seeds"][:s["iters"]]]
    steps: list = []
    out = run_main(checkout, "train_free.py", [
        "--batch-size", str(s["n"]), "--epochs", "1", "--lr-min", "0", "--lr-max", str(s["lr"]),
        "--momentum", str(s["momentum"]), "--weight-decay", str(s["weight_decay"]), "--epsilon", "8",
        "--minibatch-replays", str(s["replays"])], m0, copy.deepcopy(m0), batches, steps)
    assert len(steps) == s["iters"] * s["replays"]
    return out, {"official_lrs": cyclic_lrs(steps, s["lr"])}


def main() -> None:
    common.main("free-at", __doc__, {"repo": "locuslab/fast_adversarial",
                                     "files": "CIFAR10/train_free.py (main's training loop)"},
                SETTING, official_run, suite_run)


if __name__ == "__main__":
    main()
