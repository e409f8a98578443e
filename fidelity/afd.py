"""AFD and vAFT+D against the AFD authors' ``tl+sl.py`` (github.com/changzhang777/AFD): its ``criterion()`` (attack,
losses, the three backward/step pairs), its ``EMA`` and the ``ResNet_FS.forward`` of ``models/resnet.py``, against
the suite's ``AFD.train_step`` and the engine's EMA; vAFT+A (no code of its own) against the same authors'
``ARREST.py --RGKD`` with its weight at γ = 25 (:func:`fidelity.arrest.official_run`). docs/methods.md#afd.

    python -m fidelity.afd --official /path/to/AFD [--write-golden]

``criterion``, ``EMA`` and ``ResNet_FS.forward`` are read from the checkout with ``ast`` and run as written; the
script's module level (argparse, CIFAR-10 download, ``main``) is not. ``args`` holds the script's defaults (α = 0.05,
σ = β = 0.25, γ = 25; vaft+d: γ = 0). The model is the suite's, seen through the authors' ``ResNet_FS``: their
forward over ``conv1`` = the suite's g (the rest of their trunk the identity: g ends in a ReLU and a pooling),
``linear1`` = D₁, ``linear2`` = D₂, ``linear`` = ω, initialised to the identity as ``ResNet_FS`` does; the teacher is
the suite's, seen through ``model(x, prejection=True)`` as in :mod:`fidelity.arrest`. The official U(−ε, ε) start
``torch.randn(x.shape).uniform_(−ε, ε)`` is fed the suite's draw.

``criterion`` steps three ``optim.SGD``. The authors ran PyTorch < 1.2, whose SGD (i) added weight decay into
``p.grad`` in place and (ii) wrote the step through ``p.data``, into the very tensors autograd had saved, so the
backward of L₃ after ``optimizer2.step()`` read weights already stepped; PyTorch ≥ 1.5 refuses that backward (an
in-place change of a saved tensor). :class:`OldSGD` is torch 1.1's ``SGD.step`` (torch/optim/sgd.py), run in two
ways, the two readings of the authors' update:

* ``sequential``: as PyTorch < 1.5 ran it on one GPU: each step written through ``.data`` at once (torch 2.x still
  lets a write through ``.data`` past the version check), so step 3's backward reads θ_{t+½}: the suite's
  ``reading = sequential``;
* ``simultaneous``: each step's writes deferred until the next optimiser steps (and the last until ``criterion``
  returns), so every backward reads θ_t while each step still sees the weights and the gradient the previous one
  left (O steps from θ_{t+½} with O₂'s weight decay in its gradient): the suite's default.

Neither emulates ``nn.DataParallel`` (the authors ran two GPUs: BatchNorm statistics over each half of the batch, and
replicas whose weights may or may not alias the stepped ones).

For the record the script also reports the suite's ``afd`` against the other reading, against METHODS.md §14.4's
formula (torch 2.x's SGD, deferred: no weight decay left in the gradient), ``afd-literal`` (Algorithm 1 read
literally, no code of its own) against ``tl+sl.py``, and whether the script runs under torch 2.x as written.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import types
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import arrest, common
from .arrest import Projection, _noise, _Start

BASE = {"arch": "smallcnn", "seed": 0, "n": 16, "iters": 3, "lr": 0.025, "momentum": 0.9, "weight_decay": 5e-4,
        "eps": 8 / 255, "step": 0.007, "steps": 10, "alpha": 0.05, "beta": 0.25, "gamma": 25.0, "epoch": 1,
        "ema": {"decay": 0.999, "warmup": True}, "batch_seeds": [1, 2, 3], "noise_seeds": [11, 12, 13],
        "runner": "fidelity.afd"}
VARIANTS = {  # fixture name: (suite method, reading, changes to BASE)
    "afd": ("afd", "simultaneous", {}),
    "afd@sequential": ("afd", "sequential", {}),
    "vaft+d": ("vaft+d", "simultaneous", {"gamma": 0.0}),
}
# vAFT+A: AFKD's loss at AFD's weight γ = 25 (methods/afkd.py), against ARREST.py --RGKD with --beta 25, teacher eval
VAFT_A = {**arrest.setting("afkd"), "beta": 25.0, "variant": "vaft+a", "method": "vaft+a", "runner": "fidelity.afd"}
OFFICIAL = {"repo": "changzhang777/AFD",
            "files": "tl+sl.py (criterion(), EMA) and models/resnet.py (ResNet_FS.forward), run as written; the "
                     "SGD of PyTorch 1.1 (see fidelity/afd.py)"}
READING = {"simultaneous": "its writes deferred to the next step: every backward reads θ_t",
           "sequential": "writing through p.data at once, as PyTorch < 1.5 on one GPU: step 3's backward reads the "
                         "weights step 2 moved"}


def setting(name: str) -> dict:
    method, reading, over = VARIANTS[name]
    return {**BASE, **over, "variant": name, "method": method, "reading": reading}


# -- the suite ----------------------------------------------------------------------------------------------------
def ema_groups(before: dict, after: dict) -> dict[str, float]:
    """‖EMA − θ₀‖ per floating-point entry of the state (parameters and BN statistics), keys prefixed ``ema.``."""
    return {f"ema.{k}": float((after[k].double() - before[k].double()).norm())
            for k in after if after[k].dtype.is_floating_point}


def suite_run(s: dict) -> list[dict]:
    with common.one_thread():
        return vaft_a_suite_run(s) if s["method"] == "vaft+a" else _suite_run(s)


def _build(s: dict, name: str, **over) -> tuple[nn.Module, object]:
    """(θ₀, the suite's ``name`` built from it) with the setting's optimiser and attack, and ``over``."""
    from methods import get_method

    cls = get_method(name)
    hp = {**cls.resolved_defaults(), "lr": s["lr"], "momentum": s["momentum"], "weight_decay": s["weight_decay"],
          "eps": s["eps"], "attack_step": s["step"], "attack_steps": s["steps"], **over}
    cls.check_hp(hp)
    m0 = common.model(s["seed"], s["arch"])
    info = {"n": s["n"], "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    return m0, cls(hp, copy.deepcopy(m0), copy.deepcopy(m0), steps_per_epoch=s["iters"], info=info, fused=False)


def vaft_a_suite_run(s: dict) -> list[dict]:
    """The suite's vaft+a in :mod:`fidelity.arrest`'s setting, its weight γ = the setting's ``beta``."""
    m0, method = _build(s, "vaft+a", gamma=s["beta"], teacher_bn=s["teacher_bn"])
    return common.suite_steps(method, m0, s)


def _suite_run(s: dict) -> list[dict]:
    """afd / afd-literal / vaft+d: ``train_step`` then the engine's EMA update, per iteration; the summaries of the
    Disentangled model (g, D₁, D₂, ω) and of its EMA copy."""
    from bench.engine import EMA

    _, method = _build(s, s["method"], alpha=s["alpha"], beta=s["beta"], gamma=s["gamma"], ema=s["ema"],
                       reading=s["reading"])
    before = common.snapshot(method.model)
    ema = EMA(method.model, **method.hp["ema"])
    emas = []

    def after(_x):
        ema.update(method.model)
        emas.append(ema_groups(before.state_dict(), ema.module.state_dict()))

    out = common.suite_steps(method, before, s, after=after)
    for step, e in zip(out, emas):
        step["group_norms"].update(e)
    return out


# -- the authors' code --------------------------------------------------------------------------------------------
def load_official(checkout: str, s: dict) -> tuple[types.FunctionType, type, types.FunctionType]:
    """(``criterion``, ``EMA``) of the checkout's tl+sl.py, with ``args`` holding the script's α, σ, γ, and
    ``ResNet_FS.forward`` of its models/resnet.py."""
    root = Path(checkout)
    script, models = root / "tl+sl.py", root / "models" / "resnet.py"
    for path in (script, models):
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass the path of a checkout of github.com/changzhang777/AFD")
    from torch.autograd import Variable

    tree = ast.parse(script.read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in ("criterion", "EMA")]
    assert {n.name for n in keep} == {"criterion", "EMA"}
    args = types.SimpleNamespace(alpha=s["alpha"], sigma=s["beta"], gamma=s["gamma"])
    ns = {"torch": torch, "F": F, "Variable": Variable, "copy": copy, "args": args}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(script), "exec"), ns)  # noqa: S102 (the authors' code)

    tree = ast.parse(models.read_text())
    fs = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ResNet_FS")
    fwd = [n for n in fs.body if isinstance(n, ast.FunctionDef) and n.name == "forward"]
    assert len(fwd) == 1
    mns = {"torch": torch, "F": F, "nn": nn}
    exec(compile(ast.Module(body=fwd, type_ignores=[]), str(models), "exec"), mns)  # noqa: S102 (the authors' code)
    return ns["criterion"], ns["EMA"], mns["forward"]


class FS(nn.Module):
    """The authors' ``ResNet_FS`` over a suite classifier ``base``: their ``forward`` (bound by :func:`official_run`)
    on ``conv1`` = g, ``linear1`` = D₁, ``linear2`` = D₂, ``linear`` = ω. The registered modules are ``base``, ``d1``,
    ``d2``, in that order, as in the suite's ``Disentangled``, so that the two states compare key by key."""

    bn1 = layer1 = layer2 = layer3 = layer4 = avgpool = nn.Identity()  # (g already holds them)
    conv1 = property(lambda self: self.base.features)
    linear = property(lambda self: self.base.fc)
    linear1 = property(lambda self: self.d1)
    linear2 = property(lambda self: self.d2)

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        d, dtype = base.feature_dim, next(base.parameters()).dtype
        self.d1 = nn.Linear(d, d, bias=False)
        self.d2 = nn.Linear(d, d, bias=False)
        self.d1.weight = nn.Parameter(torch.eye(d, dtype=dtype))  # as ResNet_FS.__init__: torch.eye
        self.d2.weight = nn.Parameter(torch.eye(d, dtype=dtype))


class OldSGD(torch.optim.Optimizer):
    """``SGD.step`` of PyTorch 1.1 (torch/optim/sgd.py; BSD licence): weight decay added into ``p.grad`` in place,
    the momentum buffer started as a copy of the first gradient, the step written through ``p.data``. With
    ``pending`` (a list shared by the optimisers of one ``criterion``) each step's writes wait there until the next
    step of any of them, or :func:`flush`. ``wd_in_grad=False``: weight decay as PyTorch ≥ 1.5 adds it, into a
    copy (``p.grad`` keeps the bare gradient)."""

    def __init__(self, params, lr, momentum, weight_decay, pending: list | None = None, wd_in_grad: bool = True):
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": weight_decay,
                                  "nesterov": False})
        self.pending, self.wd_in_grad = pending, wd_in_grad

    @torch.no_grad()
    def step(self, closure=None):
        if self.pending is not None:
            flush(self.pending)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad.data
                if group["weight_decay"] != 0:
                    if self.wd_in_grad:
                        d_p.add_(p.data, alpha=group["weight_decay"])
                    else:
                        d_p = d_p.add(p.data, alpha=group["weight_decay"])
                if group["momentum"] != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf = state["momentum_buffer"]
                        buf.mul_(group["momentum"]).add_(d_p, alpha=1 - group["dampening"])
                    d_p = buf
                if self.pending is None:
                    p.data.add_(d_p, alpha=-group["lr"])
                else:
                    self.pending.append((p, d_p.clone(), -group["lr"]))


def flush(pending: list) -> None:
    for p, d_p, scale in pending:
        p.data.add_(d_p, alpha=scale)
    pending.clear()


def official_run(checkout: str, s: dict, optimiser: str = "old") -> list[dict]:
    """The official iterations. ``optimiser``: ``old`` (PyTorch 1.1's SGD, in the setting's reading), ``new``
    (PyTorch ≥ 1.5's weight decay, in the setting's reading; simultaneous: METHODS.md §14.4's formula), ``as-is``
    (torch's SGD as the script calls it)."""
    with common.one_thread():
        return _official_run(checkout, s, optimiser)


def _official_run(checkout: str, s: dict, optimiser: str) -> list[dict]:
    criterion, EMA, forward = load_official(checkout, s)
    m0 = common.model(s["seed"], s["arch"])
    model_rob = FS(copy.deepcopy(m0))
    model_rob.forward = types.MethodType(forward, model_rob)
    model_nat = Projection(copy.deepcopy(m0)).eval()  # train_align_loss: model_nat.eval()
    before = copy.deepcopy(model_rob)
    pending = [] if s["reading"] == "simultaneous" else None
    rest1 = [p for p in model_rob.parameters() if p is not model_rob.d2.weight]
    rest2 = [p for p in model_rob.parameters() if p is not model_rob.d2.weight]
    sgd = {"lr": s["lr"], "momentum": s["momentum"], "weight_decay": s["weight_decay"]}
    groups = (rest1, list(model_rob.d2.parameters()), rest2)
    if optimiser == "as-is":
        opts = [torch.optim.SGD(ps, **sgd) for ps in groups]
    else:
        opts = [OldSGD(ps, pending=pending, wd_in_grad=optimiser == "old", **sgd) for ps in groups]
    optimizer, optimizer1, optimizer2 = opts
    model_ema = EMA(model_rob)
    out = []
    for i in range(s["iters"]):
        x, y = common.batch(s["batch_seeds"][i], s["n"])
        model_rob.train()
        for o in opts:
            o.zero_grad()
        with _as_on_their_machine(_Start(_noise(s, i, x), s["eps"])):
            criterion(model=model_rob, teacher_model=model_nat, x_natural=x, y=y, optimizer=optimizer,
                      optimizer1=optimizer1, optimizer2=optimizer2, step_size=s["step"], epsilon=s["eps"],
                      perturb_steps=s["steps"], epoch=s["epoch"])
        if pending is not None:
            flush(pending)
        model_ema.update_params(model_rob)
        model_ema.apply_shadow()
        step = common.summary(before, model_rob)
        step["group_norms"].update(ema_groups(before.state_dict(), model_ema.shadow))
        out.append(step)
    return out


@contextlib.contextmanager
def _as_on_their_machine(start: _Start) -> Iterator[None]:
    """Inside ``criterion``: ``.cuda()`` the identity, and ``torch.randn(x.shape)`` the suite's draw (its
    ``uniform_(−ε, ε)``); both restored after."""
    saved = torch.Tensor.cuda, torch.randn
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.randn = lambda *a, **k: start
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.randn = saved


def _versus(title: str, ours: list[dict], theirs: list[dict]) -> None:
    common.report(title, [common.compare(o, t) for o, t in zip(ours, theirs)])


def main() -> None:
    for name in VARIANTS:  # each: the comparison, and with --write-golden its fixture
        s = setting(name)
        official = {**OFFICIAL, "files": f"{OFFICIAL['files']}, {READING[s['reading']]}"}
        common.main(name, __doc__, official, s, lambda checkout, s=s: (official_run(checkout, s), {}), suite_run)
    vaft_a = {**OFFICIAL, "files": "ARREST.py --RGKD --beta 25 (ARREST(), Cosine(); the loop's backward and SGD "
                                   "step), as fidelity/arrest.py runs it"}
    common.main("vaft+a", __doc__, vaft_a, VAFT_A, lambda checkout: (arrest.official_run(checkout, VAFT_A), {}),
                suite_run)
    # for the record: how far the suite's afd (and afd-literal) are from the other readings of the script
    checkout = argparse.ArgumentParser(add_help=False)
    checkout.add_argument("--official", required=True)
    official = checkout.parse_known_args()[0].official
    s = setting("afd")
    ours = suite_run(s)
    _versus("afd against tl+sl.py read sequentially (PyTorch < 1.5, one GPU)", ours,
            official_run(official, {**s, "reading": "sequential"}))
    _versus("afd against METHODS.md §14.4's formula (torch 2.x's SGD: no weight decay in the gradient)", ours,
            official_run(official, s, "new"))
    literal = suite_run({**s, "method": "afd-literal"})
    _versus("afd-literal against tl+sl.py (simultaneous reading)", literal, official_run(official, s))
    try:
        official_run(official, {**s, "iters": 1}, "as-is")
        print("tl+sl.py as written under this torch: runs")
    except RuntimeError as e:
        print(f"tl+sl.py as written under torch {torch.__version__}: {str(e).splitlines()[0]}")


if __name__ == "__main__":
    main()
