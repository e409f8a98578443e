"""PGD-AT against Rice et al.'s ``train_cifar.py`` (github.com/locuslab/robust_overfitting, "Overfitting in
adversarially robust deep learning", ICML 2020): the PGD training step of its ``main()`` (``attack_pgd`` with a
random start, then CE on the adversarial batch, ``backward``, ``opt.step()``), run as written for three
mini-batches, against the suite's ``PGDAT.train_step``.

    python -m fidelity.pgd_at --official /path/to/robust_overfitting [--write-golden]

``main()`` runs as written, with what a CPU without CUDA or the CIFAR-10 download needs replaced around it:
``.cuda()`` by an identity (``nn.DataParallel`` on a machine without a GPU is a pass-through), ``cifar10()`` by a
stand-in and ``Batches`` by the comparison's batches (float64; the official ``Batches`` would cast to float32),
``PreActResNet18()`` by the comparison's model, the normalisation ``mu`` / ``std`` by 0 / 1 (the suite's inputs are in
[0, 1]; ε and α are then the same numbers on both sides), and its end-of-epoch test loop by the end of the run. The
official start ``delta.uniform_(−ε, ε)`` is fed the suite's U(−ε, ε) draw.

What the script does, and the suite's options that give it (``attack_bn = train``, ``clip_start = true``; the
defaults, eval / false, are the TRADES / AFD convention the suite's PGD-AT recipe follows):

* its attack runs with the model in **train** mode (``model.train()`` once per epoch; every attack forward uses
  batch statistics and moves the BN running statistics);
* its start is clipped to the image box (``delta = clamp(delta, −X, 1 − X)``).

Besides the update, its loop makes two forwards in train mode that move only BN running statistics (no gradient
reaches a parameter, and in train mode the running statistics are never read, so every later parameter update is
unaffected): ``attack_pgd``'s restart-selection loss at the final x′ and, after ``opt.step()``, the clean forward of
its training-accuracy log. The suite's step has neither; the comparison applies the two forwards to the suite's model
after its step (``official_bn_forwards``), so everything else is compared exactly; ``--measure`` prints their size
(and that of the suite's defaults) against the official run.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile

import numpy as np
import torch
from torch import nn

from . import common

OFFICIAL = {"repo": "locuslab/robust_overfitting",
            "files": "train_cifar.py (attack_pgd; main's PGD training step)"}
SETTING = {"arch": "smallcnn", "seed": 0, "n": 16, "iters": 3, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
           "eps": 8 / 255, "step": 2 / 255, "steps": 10, "batch_seeds": [1, 2, 3], "noise_seeds": [11, 12, 13],
           "attack_bn": "train", "clip_start": True, "official_bn_forwards": True}


def _noise(s: dict, i: int, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(s["noise_seeds"][i])
    return (torch.rand(x.shape, dtype=x.dtype) * 2 - 1).mul_(s["eps"])  # bench.attacks.uniform_noise's draw


def suite_run(s: dict) -> list[dict]:
    with common.one_thread():
        return _suite_run(s)


def _suite_run(s: dict) -> list[dict]:
    from bench.attacks import bn_mode
    from methods import get_method

    m0 = common.model(s["seed"], s["arch"])
    cls = get_method("pgd-at")
    hp = cls.resolved_defaults()
    hp.update(lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"], eps=s["eps"],
              attack_step=s["step"], attack_steps=s["steps"], attack_bn=s["attack_bn"], clip_start=s["clip_start"])
    info = {"n": s["n"], "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    method = cls(hp, copy.deepcopy(m0), None, steps_per_epoch=s["iters"], info=info, fused=False)
    if s["official_bn_forwards"]:
        attack = method.pgd_attack

        def pgd_attack(x, y):  # the suite's attack, then attack_pgd's restart-selection forward at the final x′
            x_adv = attack(x, y)
            with torch.no_grad(), bn_mode(method.model, "train"):
                method.model(x_adv)
            return x_adv

        method.pgd_attack = pgd_attack

    def clean_forward(x):  # the official loop's clean training-accuracy forward, after opt.step()
        with torch.no_grad(), bn_mode(method.model, "train"):
            method.model(x)

    return common.suite_steps(method, m0, s, after=clean_forward if s["official_bn_forwards"] else None)


class _Done(Exception):
    pass


class _Batches:
    """The official train_batches: yields the comparison's batches as ``{'input', 'target'}`` and summarises the
    model after each step; ends the run after the last (before the official test loop)."""

    def __init__(self, batches, m0, model):
        self.batches, self.m0, self.model, self.out = batches, m0, model, []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, (x, y) in enumerate(self.batches):
            if i:
                self.out.append(common.summary(self.m0, self.model))
            yield {"input": x, "target": y}
        self.out.append(common.summary(self.m0, self.model))
        raise _Done


def official_run(checkout: str, s: dict = SETTING) -> tuple[list[dict], dict]:
    """The official iterations (the suite needs nothing else)."""
    with common.one_thread():
        return _official_run(checkout, s)


def _official_run(checkout: str, s: dict) -> tuple[list[dict], dict]:
    m0 = common.model(s["seed"], s["arch"])
    model = copy.deepcopy(m0)
    batches = [common.batch(b, s["n"]) for b in s["batch_seeds"][:s["iters"]]]
    noises = [_noise(s, i, x) for i, (x, _) in enumerate(batches)]
    loader = _Batches(batches, m0, model)
    calls = []
    real_uniform, real_cuda, real_argv = torch.Tensor.uniform_, nn.Module.cuda, sys.argv
    saved_modules = {k: sys.modules.get(k) for k in ("utils", "preactresnet", "wideresnet")}
    root = logging.getLogger()
    saved_log = (list(root.handlers), root.level)

    def uniform_(self, a=0.0, b=1.0, **k):  # attack_pgd: delta.uniform_(-epsilon, epsilon), once per batch
        assert abs(b - s["eps"]) < 1e-12 and abs(a + s["eps"]) < 1e-12 and self.shape == noises[len(calls)].shape
        calls.append((a, b))
        return self.copy_(noises[len(calls) - 1])

    def cifar10(root_dir):  # the shapes main() builds its (unused) data sets from
        blank = {"data": np.zeros((1, 32, 32, 3), dtype=np.uint8), "labels": [0]}
        return {"train": blank, "test": blank}

    def make_batches(dataset, batch_size, shuffle, **k):
        return loader if shuffle else []

    try:
        for k in saved_modules:
            sys.modules.pop(k, None)
        nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        mod = common.load_official(checkout, "train_cifar.py", "official_train_cifar")
        mod.mu = torch.zeros(3, 1, 1, dtype=torch.float64)
        mod.std = torch.ones(3, 1, 1, dtype=torch.float64)
        mod.cifar10, mod.Batches, mod.PreActResNet18 = cifar10, make_batches, lambda: model
        with tempfile.TemporaryDirectory() as out_dir:
            sys.argv = ["train_cifar.py", "--fname", out_dir, "--lr-max", str(s["lr"]), "--epochs", "200",
                        "--lr-schedule", "piecewise", "--attack", "pgd", "--epsilon", str(round(s["eps"] * 255)),
                        "--pgd-alpha", str(s["step"] * 255), "--attack-iters", str(s["steps"]), "--restarts", "1",
                        "--norm", "l_inf"]
            assert abs(s["momentum"] - 0.9) < 1e-15 and abs(s["weight_decay"] - 5e-4) < 1e-15  # the script's
            torch.Tensor.uniform_ = uniform_
            try:
                mod.main()
            except _Done:
                pass
            finally:
                torch.Tensor.uniform_ = real_uniform
                for h in root.handlers[len(saved_log[0]):]:
                    h.close()
                root.handlers[:], root.level = saved_log
    finally:
        nn.Module.cuda, sys.argv = real_cuda, real_argv
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert len(calls) == s["iters"] and len(loader.out) == s["iters"], (len(calls), len(loader.out))
    return loader.out, {}


def measure(checkout: str) -> None:
    """How far the suite is from the official update without each of the settings that make them equal."""
    theirs, _ = official_run(checkout)
    for name, change in [("suite defaults (attack_bn=eval, clip_start=false), no extra BN forwards",
                          {"attack_bn": "eval", "clip_start": False, "official_bn_forwards": False}),
                         ("attack_bn=eval", {"attack_bn": "eval"}), ("clip_start=false", {"clip_start": False}),
                         ("without the two BN-statistics forwards", {"official_bn_forwards": False})]:
        diffs = [common.compare(o, t) for o, t in zip(suite_run({**SETTING, **change}), theirs)]
        common.report(f"pgd-at ({name})", diffs)
        stats = max(v for d in diffs for k, v in d.items() if "running_" in k)
        params = max(v for d in diffs for k, v in d.items() if "running_" not in k)
        print(f"  of which: parameters (and entries) {params:.3e}, BN running statistics {stats:.3e}")


def main() -> None:
    if "--measure" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--official", required=True)
        ap.add_argument("--measure", action="store_true")
        measure(ap.parse_args().official)
        return
    common.main("pgd-at", __doc__, OFFICIAL, SETTING, official_run, suite_run)


if __name__ == "__main__":
    main()
