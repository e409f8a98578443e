"""ATAS against its authors' ``ATAS.py`` (github.com/HuangZhiChao95/ATAS, Huang et al., "Fast adversarial training
with adaptive step size", 2023): its ``main()`` run as written for three epochs of one mini-batch each (``train``
with ``adv_attack.get_adv_constant_step_size`` / ``get_adv_adaptive_step_size`` and ``data_aug``'s ``aug`` /
``aug_trans`` / ``inverse_aug``), against the suite's ``ATAS`` (``begin_epoch``, ``train_step``) on the same float64
weights, batches and random draws.

    python -m fidelity.atas --official /path/to/ATAS [--write-golden] [--measure]

The three epochs cover every part of the method: ``--warmup-epochs 1 --epochs-reset 2 --epochs 3`` make epoch 1 a
warm-up epoch (step ε), epoch 2 re-draw the whole perturbation buffer and take the first adaptive step (v from 0),
epoch 3 an adaptive step from the δ and v that epoch 2 wrote back. The training set has 24 images, each epoch's batch
is 16 of them (a different subset each epoch), so rows are read back that another epoch wrote, and rows that no batch
touched keep their draw.

``main()`` runs as written, with what a CPU without CUDA or the CIFAR-10 download needs replaced around it:
``.cuda()`` by an identity (``nn.DataParallel`` on a machine without a GPU is a pass-through), ``data.load_data`` by
the comparison's batches (zero-padded to 40×40 as the official ``Pad(4)`` transform does, with their indices),
``PreActResNet18`` by the comparison's model, ``tqdm`` by a silent loop and ``torch.save`` (after the loop) by nothing.
Its float32 buffers (``delta`` and ``gdnorm`` in ``main``, the crops ``aug`` and ``aug_trans`` write into) are made
float64 (their dtype switched, as the other comparisons switch off a loss's ``.float()``). Its random draws are fed
the suite's: the buffer's initial ``torch.rand`` draw and the re-draw ``nn.init.uniform_(delta, −ε, ε)`` get the
suite's U(−ε, ε) buffers, and ``data_aug``'s ``random.getrandbits(1)`` / ``random.randint(0, 8)`` (flip, row
offset, column offset per example) the suite's crop offsets and flips of the epoch.

Variants: ``atas`` runs the official model with its Normalize layer given mean 0 / std 1 (the suite's default model
has no normalisation, Decision 1), at c = 8e-5: the comparison's small model at its initialisation has small input
gradients, and at the default c = 0.01 every adaptive η would sit at its upper bound 14/255; at 8e-5 they lie inside
(4/255, 14/255) and some on the lower bound, so the formula itself is compared. ``atas@imagenet-normalize`` runs the
official model as written (ImageNet mean/std, every hyper-parameter at the script's value: η at the upper bound)
against the suite's model with the same normalisation in its own input layer (``normalize.mean`` / ``.std``).
``--measure`` prints the size of the difference the normalisation makes (the official model as written against the
suite's default) and the step sizes η of every epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import types
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import common

OFFICIAL = {"repo": "HuangZhiChao95/ATAS",
            "files": "ATAS.py (main, train), adv_attack.py (get_adv_constant_step_size, get_adv_adaptive_step_size), "
                     "data_aug.py (aug, aug_trans, inverse_aug)"}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ATAS.py main's Normalize
BASE = {"arch": "smallcnn", "seed": 0, "n_train": 24, "n": 16, "iters": 3, "lr": 0.1, "momentum": 0.9,
        "weight_decay": 5e-4, "eps": 8 / 255, "warmup_epochs": 1, "reset_every": 2, "c": 0.01, "beta_m": 0.5,
        "min_step": 4 / 255, "max_step": 14 / 255, "batch_seeds": [1, 2, 3], "delta_seed": 10,
        "epoch_seeds": [11, 12, 13], "runner": "fidelity.atas"}
# c: smallcnn at its initialisation has small input gradients (√v ≈ 2e-4 at batch 16), so at the default c = 0.01
# every η sits at its upper bound 14/255; c = 8e-5 puts them inside (4, 14)/255 and some at 4/255
VARIANTS = {
    "atas": {**BASE, "c": 8e-5, "normalize": "none"},
    "atas@imagenet-normalize": {**BASE, "normalize": "imagenet"}}
SETTING = VARIANTS["atas"]
OFFICIAL_MODULES = ("adv_attack", "data", "data_aug", "models", "models.wideresnet", "models.preact_resnet",
                    "models.normalize")


def _batch(s: dict, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Epoch ``e``'s batch: ``s["n"]`` images (common.batch) standing for training images ``idx`` (a subset of the
    ``s["n_train"]``, other per epoch)."""
    x, y = common.batch(s["batch_seeds"][e], s["n"])
    g = torch.Generator().manual_seed(1000 + s["batch_seeds"][e])
    return x, y, torch.randperm(s["n_train"], generator=g)[:s["n"]]


def _buffer_draw(s: dict) -> torch.Tensor:
    """The suite's U(−ε, ε) buffer draw (``ATAS.redraw``) from the global RNG, in float64."""
    return (torch.rand(s["n_train"], 3, 40, 40) * 2 - 1).mul_(s["eps"]).double()


def _draws(s: dict) -> tuple[torch.Tensor, list[dict]]:
    """The suite's random draws: the initial buffer, and per epoch the re-draw (or None) and the crops, each epoch from
    the global RNG seeded with its ``epoch_seeds`` entry, in the order ``ATAS.begin_epoch`` draws them."""
    from bench.loader import draw_augment

    torch.manual_seed(s["delta_seed"])
    delta0 = _buffer_draw(s)
    out = []
    for e in range(s["iters"]):
        torch.manual_seed(s["epoch_seeds"][e])
        ep = e + 1
        redraw = _buffer_draw(s) if ep % s["reset_every"] == 0 and ep != s["iters"] else None
        out.append({"redraw": redraw, "crops": draw_augment(None, s["n"], 4, True)})  # rows: oy, ox, flip
    return delta0, out


def _state(out: dict, delta: torch.Tensor, gdnorm: torch.Tensor) -> dict:
    """A summary with the per-example state added: the norms of the whole δ buffer and of v."""
    out["group_norms"]["atas.delta"] = float(delta.double().norm())
    out["group_norms"]["atas.gdnorm"] = float(gdnorm.double().norm())
    return out


def _imagenet(m: nn.Module) -> nn.Module:
    """``m`` with the ImageNet mean/std in its own input layer (float64)."""
    with torch.no_grad():
        m.normalize.mean.copy_(torch.tensor(IMAGENET[0], dtype=torch.float64).view(1, 3, 1, 1))
        m.normalize.std.copy_(torch.tensor(IMAGENET[1], dtype=torch.float64).view(1, 3, 1, 1))
    return m


def suite_run(s: dict, steps: list | None = None) -> list[dict]:
    """The suite's epochs as the engine runs them (global RNG seeded, ``begin_epoch``, the step, ``end_epoch``);
    ``steps`` receives each epoch's step sizes η."""
    with common.one_thread():
        return _suite_epochs(s, steps)


def _suite_epochs(s: dict, steps: list | None) -> list[dict]:
    from bench.loader import Batch
    from methods import get_method

    m0 = common.model(s["seed"], s["arch"])
    if s["normalize"] == "imagenet":
        m0 = _imagenet(m0)
    cls = get_method("atas")
    hp = cls.resolved_defaults()
    hp.update({k: s[k] for k in ("lr", "momentum", "weight_decay", "eps", "warmup_epochs", "reset_every", "c",
                                 "beta_m", "min_step", "max_step")})
    hp.update(epochs=s["iters"], batch_size=s["n"])
    info = {"n": s["n_train"], "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    torch.manual_seed(s["delta_seed"])  # the buffer is drawn at construction
    method = cls(hp, copy.deepcopy(m0), None, steps_per_epoch=1, info=info, fused=False)
    step_sizes = method.step_sizes
    out = []
    for e in range(s["iters"]):
        x, y, idx = _batch(s, e)
        method.set_lr(s["lr"])
        torch.manual_seed(s["epoch_seeds"][e])
        method.begin_epoch(e)
        if steps is not None:
            method.step_sizes = lambda *a, **k: steps.append(step_sizes(*a, **k)) or steps[-1]
        method.train_step(Batch(x, y, idx), e, 0)
        method.end_epoch(e)
        out.append(_state(common.summary(m0, method.model), method.delta, method.gdnorm))
    return out


class _Random:
    """data_aug's ``random``: hands out the suite's draws of the epoch in the order ``aug`` asks for them (per
    example: flip, row offset, column offset)."""

    def __init__(self):
        self.queue: list[tuple[str, int]] = []

    def load(self, crops: torch.Tensor) -> None:
        oy, ox, flip = crops.tolist()
        self.queue = [d for i in range(len(oy)) for d in (("bits", flip[i]), ("int", oy[i]), ("int", ox[i]))]

    def getrandbits(self, k):
        kind, v = self.queue.pop(0)
        assert kind == "bits" and k == 1
        return v

    def randint(self, a, b):
        kind, v = self.queue.pop(0)
        assert kind == "int" and (a, b) == (0, 8)
        return v


class _Float64Torch(types.ModuleType):
    """``torch`` for an official module: ``rand`` / ``zeros`` make float64 where it asks for float32, on the CPU where
    it asks for ``cuda:0``; ``save`` does nothing; everything else is torch's."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _kw(k):
        if k.get("dtype") in (None, torch.float32):
            k["dtype"] = torch.float64
        k.pop("device", None)
        return k

    def rand(self, *a, **k):
        return torch.rand(*a, **self._kw(k))

    def zeros(self, *a, **k):
        return torch.zeros(*a, **self._kw(k))

    def save(self, *a, **k):
        pass


class _Bar:
    """A silent ``tqdm.tqdm``."""

    def __init__(self, it, total=None):
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix(self, **k):
        pass


class _Loader:
    """The official train_loader: one batch an epoch, ``(padded images, labels, indices)``."""

    def __init__(self, batches):
        self.batches, self.epoch = batches, 0

    def __len__(self):
        return 1

    def __iter__(self):
        x, y, idx = self.batches[self.epoch]
        self.epoch += 1
        yield F.pad(x, (4, 4, 4, 4)), y, idx  # the official transforms.Pad(padding=4): zeros


@contextlib.contextmanager
def _around_official(s: dict, delta_shape: tuple, redraw) -> Iterator[str]:
    """What the official ``main()`` runs inside: none of the checkout's top-level modules imported yet (and after,
    what was there before), ``nn.Module.cuda`` an identity, ``nn.init.uniform_`` (main's buffer re-draw) by
    ``redraw(tensor)``, ``sys.argv`` the script's command line for ``s`` (its model directory a temporary one,
    yielded)."""
    saved = {k: sys.modules.pop(k, None) for k in OFFICIAL_MODULES}
    real_uniform, real_cuda, real_argv = nn.init.uniform_, nn.Module.cuda, sys.argv

    def uniform_(t, a=0.0, b=1.0, **k):  # main: nn.init.uniform_(delta, -epsilon, epsilon)
        assert (a, b) == (-s["eps"], s["eps"]) and tuple(t.shape) == delta_shape
        return redraw(t)

    try:
        nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        nn.init.uniform_ = uniform_
        with tempfile.TemporaryDirectory() as out_dir:
            sys.argv = ["ATAS.py", "--dataset", "cifar10", "--arch", "PreActResNet18", "--batch-size", str(s["n"]),
                        "--epochs", str(s["iters"]), "--epochs-reset", str(s["reset_every"]),
                        "--warmup-epochs", str(s["warmup_epochs"]), "--lr", str(s["lr"]),
                        "--wd", str(s["weight_decay"]), "--momentum", str(s["momentum"]),
                        "--epsilon", str(round(s["eps"] * 255)), "--max-step-size", str(round(s["max_step"] * 255)),
                        "--min-step-size", str(round(s["min_step"] * 255)), "--c", str(s["c"]),
                        "--beta", str(s["beta_m"]), "--decay-steps", "24", "28", "--num-workers", "0",
                        "--model-dir", out_dir]
            yield out_dir
    finally:
        nn.init.uniform_, nn.Module.cuda, sys.argv = real_uniform, real_cuda, real_argv
        for k in OFFICIAL_MODULES:
            sys.modules.pop(k, None)
        sys.modules.update({k: v for k, v in saved.items() if v is not None})


def official_run(checkout: str, s: dict = SETTING) -> tuple[list[dict], dict]:
    """The official iterations (the suite needs nothing else)."""
    m0 = common.model(s["seed"], s["arch"])
    net = copy.deepcopy(m0)
    loader = _Loader([_batch(s, e) for e in range(s["iters"])])
    delta0, draws = _draws(s)
    rnd, out, redraws = _Random(), [], []

    def redraw(t):  # at the start of a re-draw epoch, before its train(): the suite's re-draw
        e = loader.epoch
        assert draws[e]["redraw"] is not None
        redraws.append(e)
        return t.copy_(draws[e]["redraw"])

    with common.one_thread(), _around_official(s, tuple(delta0.shape), redraw):
        mod = common.load_official(checkout, "ATAS.py", "official_atas")
        assert mod.args.epsilon == s["eps"] and mod.args.step_size == s["eps"]
        assert (mod.args.min_step_size, mod.args.max_step_size) == (s["min_step"], s["max_step"])
        aug = sys.modules["data_aug"]
        aug.torch, aug.random = _Float64Torch(), rnd
        mod.torch, mod.tqdm = _Float64Torch(), types.SimpleNamespace(tqdm=_Bar)
        mod.data.load_data = lambda dataset, bs, workers: (loader, [], s["n_train"])
        mod.PreActResNet18 = lambda num_classes: net
        if s["normalize"] == "none":  # the official Normalize layer with mean 0 / std 1: the identity
            official_normalize = mod.Normalize
            mod.Normalize = lambda mean, std: official_normalize(np.zeros(3), np.ones(3))
        real_train = mod.train

        def train(args, model, train_loader, delta, optimizer, scheduler, gdnorms, epoch):
            if epoch == 1:  # main's initial draw (torch.rand · 2 − 1) · ε, fed the suite's
                assert delta.dtype == torch.float64 and delta.shape == delta0.shape
                assert delta.abs().max() <= s["eps"] and gdnorms.abs().max() == 0
                delta.copy_(delta0)
            rnd.load(draws[epoch - 1]["crops"])
            real_train(args, model, train_loader, delta, optimizer, scheduler, gdnorms, epoch)
            assert not rnd.queue and loader.epoch == epoch
            assert optimizer.param_groups[0]["lr"] == s["lr"]  # (MultiStepLR's milestones lie far ahead)
            out.append(_state(common.summary(m0, net), delta, gdnorms))

        mod.train = train
        mod.main()
    assert len(out) == s["iters"] and redraws == [e for e in range(s["iters"]) if draws[e]["redraw"] is not None]
    return out, {}


def measure(checkout: str) -> None:
    """The size of the normalisation deviation (ATAS.py as written, with its ImageNet Normalize, against the suite's
    model without and with that normalisation), and the step sizes η of each epoch, at the default c and at the
    certificate's."""
    for c in (BASE["c"], VARIANTS["atas"]["c"]):
        theirs, _ = official_run(checkout, {**BASE, "c": c, "normalize": "imagenet"})
        for norm in ("none", "imagenet"):
            s, steps = {**BASE, "c": c, "normalize": norm}, []
            diffs = [common.compare(o, t) for o, t in zip(suite_run(s, steps), theirs)]
            common.report(f"atas (c={c:g}, suite normalize={norm}) vs ATAS.py as written (ImageNet Normalize)", diffs)
            for e, eta in enumerate(steps, 1):
                eta = eta * 255
                low = int((eta <= s["min_step"] * 255 + 1e-9).sum())
                high = int((eta >= s["max_step"] * 255 - 1e-9).sum())
                print(f"  epoch {e}: η·255 in [{float(eta.min()):.3f}, {float(eta.max()):.3f}], mean "
                      f"{float(eta.mean()):.3f}; of {eta.numel()}: {low} at the lower bound, {high} at the upper")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help=f"a checkout of github.com/{OFFICIAL['repo']}")
    ap.add_argument("--write-golden", action="store_true", help="store the official runs as the CI fixtures")
    ap.add_argument("--measure", action="store_true", help="the size of the normalisation deviation")
    a = ap.parse_args()
    if a.measure:
        measure(a.official)
        return
    for name, s in VARIANTS.items():
        theirs, _ = official_run(a.official, s)
        common.report(name, [common.compare(o, t) for o, t in zip(suite_run(s), theirs)])
        if a.write_golden:
            official = {**OFFICIAL, "commit": common.commit_of(Path(a.official))}
            print(f"wrote {common.write_golden(name, official, s, theirs)}")


if __name__ == "__main__":
    main()
