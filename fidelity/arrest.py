"""vAFT, AFKD and ARREST against the AFD authors' ``ARREST.py`` (github.com/changzhang777/AFD), the only executable
definition of the three (METHODS.md §9-§12; docs/methods.md): its ``ARREST()`` loss and its loop's
``loss.backward(); optimizer.step()``, against the suite's ``train_step``.

    python -m fidelity.arrest --official /path/to/AFD [--write-golden]

``ARREST()`` (and the ``Cosine`` it calls) are read from the checkout and run as written; the script's module level
(argparse, CIFAR-100 download) is not. Flags as the script's: vaft = no flag, afkd = ``--RGKD``, arrest =
``--RGKD --NR``. The model is the suite's, seen through the authors' interface ``model(x, prejection=True) →
(logits, pooled features)``. The teacher runs in train mode as written (``ARREST.py`` never calls
``model_nat.eval()``), or in eval mode (the script with ``model_nat.eval()`` added): the suite's
``teacher_bn = train`` / ``eval``. The official U(−ε, ε) start ``torch.rand(x.shape).uniform_(−ε, ε)`` is fed the
suite's draw.
"""
from __future__ import annotations

import argparse
import ast
import copy
import math
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import common

BASE = {"arch": "smallcnn", "seed": 0, "n": 16, "iters": 3, "lr": 0.025, "momentum": 0.9, "weight_decay": 5e-4,
        "eps": 8 / 255, "step": 2 / 255, "steps": 10, "beta": 50.0, "theta": 30.0, "epoch": 1,
        "batch_seeds": [1, 2, 3], "noise_seeds": [11, 12, 13], "runner": "fidelity.arrest"}
VARIANTS = {  # fixture name: (suite method, ARREST.py flags, teacher mode, changes to BASE)
    "vaft": ("vaft", {"NR": False, "RGKD": False}, "eval", {}),
    "afkd": ("afkd", {"NR": False, "RGKD": True}, "eval", {}),
    "afkd@teacher-train": ("afkd", {"NR": False, "RGKD": True}, "train", {}),
    "arrest": ("arrest", {"NR": True, "RGKD": True}, "eval", {"theta": 1.0}),
    "arrest@teacher-train": ("arrest", {"NR": True, "RGKD": True}, "train", {"theta": 1.0}),
}


def setting(name: str) -> dict:
    method, flags, teacher, over = VARIANTS[name]
    return {**BASE, **over, "variant": name, "method": method, "flags": flags, "teacher_bn": teacher}


class Projection(nn.Module):
    """The authors' model interface over a suite classifier (the same module: parameters and buffers shared)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x, prejection=False):
        h = self.m.features(x)
        logits = self.m.fc(h)
        return (logits, h) if prejection else logits


def _noise(s: dict, i: int, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(s["noise_seeds"][i])
    return (torch.rand(x.shape, dtype=x.dtype) * 2 - 1).mul_(s["eps"])  # bench.attacks.uniform_noise's draw


def suite_run(s: dict) -> list[dict]:
    from bench.loader import Batch
    from methods import get_method

    m0 = common.model(s["seed"], s["arch"])
    cls = get_method(s["method"])
    hp = cls.resolved_defaults()
    hp.update(lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"], eps=s["eps"],
              attack_step=s["step"], attack_steps=s["steps"])
    if s["method"] in ("afkd", "arrest"):
        hp.update(lam=s["beta"], teacher_bn=s["teacher_bn"])
    if s["method"] == "arrest":
        hp.update(theta=s["theta"])
    info = {"n": s["n"], "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    method = cls(hp, copy.deepcopy(m0), copy.deepcopy(m0), steps_per_epoch=s["iters"], info=info, fused=False)
    out = []
    for i in range(s["iters"]):
        x, y = common.batch(s["batch_seeds"][i], s["n"])
        method.set_lr(s["lr"])
        torch.manual_seed(s["noise_seeds"][i])
        method.train_step(Batch(x, y, torch.arange(s["n"])), s["epoch"] - 1, i)
        out.append(common.summary(m0, method.model))
    return out


def load_arrest(checkout: str, flags: dict) -> types.FunctionType:
    """``ARREST`` of the checkout's ARREST.py, with ``args`` holding the flags."""
    path = Path(checkout) / "ARREST.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the path of a checkout of github.com/changzhang777/AFD")
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("ARREST", "Cosine")]
    assert {n.name for n in keep} == {"ARREST", "Cosine"}
    from torch.autograd import Variable
    ns = {"torch": torch, "F": F, "math": math, "Variable": Variable, "args": types.SimpleNamespace(**flags)}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102 (the authors' code)
    return ns["ARREST"]


class _Start:
    """What ``torch.rand(x.shape)`` returns inside ARREST(): its ``uniform_(−ε, ε)`` is the suite's draw."""

    def __init__(self, noise, eps):
        self.noise, self.eps = noise, eps

    def uniform_(self, a, b):
        assert abs(b - self.eps) < 1e-12 and abs(a + self.eps) < 1e-12
        return self.noise.clone()


def official_run(checkout: str, s: dict) -> list[dict]:
    arrest = load_arrest(checkout, s["flags"])
    real_cuda, real_rand = torch.Tensor.cuda, torch.rand
    m0 = common.model(s["seed"], s["arch"])
    student, teacher = copy.deepcopy(m0), copy.deepcopy(m0)
    model_rob, model_nat = Projection(student), Projection(teacher)
    model_nat.train(s["teacher_bn"] == "train")  # as written: never put in eval mode
    opt = torch.optim.SGD(model_rob.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    out = []
    try:
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        for i in range(s["iters"]):
            x, y = common.batch(s["batch_seeds"][i], s["n"])
            start = _Start(_noise(s, i, x), s["eps"])
            torch.rand = lambda *a, **k: start
            model_rob.train()
            opt.zero_grad()
            loss = arrest(model=model_rob, model_nat=model_nat, x_natural=x, y=y, optimizer=opt,
                          step_size=s["step"], epsilon=s["eps"], perturb_steps=s["steps"], epoch=s["epoch"],
                          beta=s["beta"], theta=s["theta"])
            torch.rand = real_rand
            loss.backward()
            opt.step()
            out.append(common.summary(m0, student))
    finally:
        torch.Tensor.cuda, torch.rand = real_cuda, real_rand
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="a checkout of github.com/changzhang777/AFD")
    ap.add_argument("--write-golden", action="store_true", help="store the official runs as the CI fixtures")
    a = ap.parse_args()
    for name in VARIANTS:
        s = setting(name)
        theirs = official_run(a.official, s)
        common.report(name, [common.compare(o, t) for o, t in zip(suite_run(s), theirs)])
        # the other teacher mode, for the record: how far the suite's update is from ARREST.py as written
        if s["method"] != "vaft":
            other = {**s, "teacher_bn": "train" if s["teacher_bn"] == "eval" else "eval"}
            common.report(f"{name} (suite with teacher_bn={other['teacher_bn']})",
                          [common.compare(o, t) for o, t in zip(suite_run(other), theirs)])
        if a.write_golden:
            path = common.write_golden(name, {"repo": "changzhang777/AFD", "commit": common.commit_of(a.official),
                                              "files": "ARREST.py (ARREST(), Cosine(); the loop's backward and "
                                                       "SGD step)"}, s, theirs)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
