"""FGSM-GA against Andriushchenko & Flammarion's ``train.py`` (github.com/tml-epfl/understanding-fast-adv-training,
GradAlign), its ``main()`` run as written — zero-init FGSM with ``--grad_align_cos_lambda`` — for its epoch 0 (one
iteration without an optimiser step) and three mini-batches of epoch 1, against the suite's ``FGSMGA.train_step``.

    python -m fidelity.fgsm_ga --official /path/to/understanding-fast-adv-training [--write-golden]
    python -m fidelity.fgsm_ga --official ... --measure [--images CIFAR10-DATA-DIR]   (the deviations' sizes)

What a CPU without apex, CUDA or the data needs is replaced around ``main()``: apex by an empty module (fp32, no
``--half_prec``), ``.cuda()`` and ``torch.cuda.FloatTensor`` (the bounds of ``utils.clamp``) by CPU equivalents,
``data.get_loaders`` by the comparison's batches, ``models.get_model`` by the comparison's model (and
``utils.initialize_weights`` by nothing: the weights are the comparison's), the logger and the iteration-0
evaluation (``rob_acc``, ``get_grad_np``, ``avg_cos_np``: eval mode, nothing they do reaches the model's state) by
stubs; the default dtype is float64 while it runs (its ``torch.zeros`` buffers, ``get_uniform_delta``'s included).
The official ``delta.uniform_(−ε, ε)`` of g₂ is fed the suite's U(−ε, ε) draw. The GA code casts no loss with
``.float()`` (its losses are ``F.cross_entropy`` of the model's output), so nothing is switched off for float64.
λ: the official ``--grad_align_cos_lambda 0.2``, the suite's default ``lam = "auto"`` (λ(8/255) = 0.2 to an ulp).
The suite's lr is its own schedule (``cyclic``, peak 0.4), checked against the official
``interp(t, [0, 2E//5, E], [0, lr_max, 0])`` at E = 5 epochs step by step.

The official epoch 0 runs one iteration without ``opt.step()``: its three train-mode forwards move the BN running
statistics and nothing else. The suite has no such iteration; the harness gives the suite's model the same
three forwards (the suite's ``train_step`` on the epoch-0 batch and draw with its optimiser step left out,
``official_epoch0``) so that the rest is compared exactly; ``--measure`` prints the size of leaving them out.

Three fixtures, one per reading of g₁ at the pixels where x is exactly 0 or 1 (``g1_saturated``, methods/fgsm_ga.py):

* ``fgsm-ga``: images clipped to [1/255, 254/255] (no pixel at a bound), where all readings agree: the default
  ``full``;
* ``fgsm-ga@g1-half``: images with saturated rows, ``train.py`` under current PyTorch (a tie of ``clamp``'s
  ``torch.max`` / ``torch.min`` splits the gradient evenly, pytorch/pytorch#59669): ``half``;
* ``fgsm-ga@g1-zero``: the same images, ``train.py`` under torch 1.4.0's rule for the element-wise max / min,
  emulated (the rule before #59669, ``tools/autograd/derivatives.yaml``: ``max(self, other)`` passes the gradient to
  self where self > other, ``min`` where self < other, else to other; the authors' Dockerfile pins torch 1.4.0):
  ``zero``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import sys
import tempfile
import types

import torch
from torch import nn

from . import common

OFFICIAL = {"repo": "tml-epfl/understanding-fast-adv-training",
            "files": "train.py (main's training loop, --attack fgsm --attack_init zero --grad_align_cos_lambda), "
                     "utils.py (get_input_grad, clamp, get_lr_schedule)"}
BASE = {"arch": "smallcnn", "seed": 0, "n": 16, "iters": 3, "epochs": 5, "lr": 0.3, "weight_decay": 5e-4,
        "eps": 8 / 255, "lam": 0.2, "fgsm_alpha": 1.25, "batch_seeds": [1, 2, 3], "noise_seeds": [11, 12, 13],
        "epoch0_batch_seed": 4, "epoch0_noise_seed": 10, "official_epoch0": True, "images": None,
        "runner": "fidelity.fgsm_ga"}
VARIANTS = {  # fixture name: (suite's g1_saturated, tie rule of the official run, image range)
    "fgsm-ga": ("full", "current", [1 / 255, 254 / 255]),
    "fgsm-ga@g1-half": ("half", "current", None),
    "fgsm-ga@g1-zero": ("zero", "torch-1.4.0", None),
}


def setting(name: str) -> dict:
    g1, ties, clip = VARIANTS[name]
    return {**BASE, "variant": name, "g1_saturated": g1, "ties": ties, "clip": clip}


def _batch(s: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The comparison's batch: ``common.batch`` (clipped to ``s["clip"]`` if set) or, with ``s["images"]`` (a
    CIFAR-10 data directory, ``--measure`` only), n training images drawn by ``seed`` with the training augmentation
    both loaders use (pad 4 with zeros, random crop, random flip)."""
    if s.get("images"):
        from bench.loader import augment

        train = _cifar10_train(s["images"])
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, len(train), (s["n"],), generator=g)
        x = augment(train.x[idx], g, pad=4, flip=True).double() / 255
        return x, train.y[idx]
    x, y = common.batch(seed, s["n"])
    return (x if s["clip"] is None else x.clamp(*s["clip"])), y


@functools.lru_cache(maxsize=1)
def _cifar10_train(data_dir: str):
    from bench.data import load_dataset

    return load_dataset("cifar10", data_dir).train


def _noise(seed: int, x: torch.Tensor, eps: float) -> torch.Tensor:
    torch.manual_seed(seed)
    return (torch.rand(x.shape, dtype=x.dtype) * 2 - 1).mul_(eps)  # bench.attacks.uniform_noise's draw


def suite_run(s: dict, states: list | None = None) -> list[dict]:
    """The suite's steps (``states``, if given, receives the model's state after each)."""
    with common.one_thread():
        return _suite_run(s, states)


def _suite_run(s: dict, states: list | None) -> list[dict]:
    from bench.loader import Batch
    from methods import get_method
    from methods.fgsm_ga import gradalign_lambda

    m0 = common.model(s["seed"], s["arch"])
    cls = get_method("fgsm-ga")
    hp = cls.resolved_defaults()  # lam "auto" and fgsm_alpha 1.25: the official 0.2 (to an ulp) and 1.25
    assert hp["lam"] == "auto" and abs(gradalign_lambda(s["eps"]) - s["lam"]) < 1e-15
    assert hp["fgsm_alpha"] == s["fgsm_alpha"]
    hp.update(epochs=s["epochs"], lr=s["lr"], weight_decay=s["weight_decay"], eps=s["eps"],
              g1_saturated=s["g1_saturated"])
    cls.check_hp(hp)
    info = {"n": s["n"], "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    method = cls(hp, copy.deepcopy(m0), None, steps_per_epoch=s["iters"], info=info, fused=False)
    if s["official_epoch0"]:  # the official epoch 0: the step's forwards, no optimiser step
        x, y = _batch(s, s["epoch0_batch_seed"])
        torch.manual_seed(s["epoch0_noise_seed"])
        method.ce_step = lambda opt, loss: None
        method.train_step(Batch(x, y, torch.arange(s["n"])), 0, 0)
        del method.ce_step
        assert torch.equal(common.flat(method.model), common.flat(m0))
    out = []
    for i in range(s["iters"]):
        x, y = _batch(s, s["batch_seeds"][i])
        lr = method.lr_at(0, i)
        if "official_lrs" in s:
            assert abs(lr - s["official_lrs"][i]) <= 1e-15 * s["lr"], (i, lr, s["official_lrs"][i])
        method.set_lr(lr)
        torch.manual_seed(s["noise_seeds"][i])
        method.train_step(Batch(x, y, torch.arange(s["n"])), 0, i)
        out.append(common.summary(m0, method.model))
        if states is not None:
            states.append(copy.deepcopy(method.model.state_dict()))
    return out


class _Done(Exception):
    pass


class _Loader:
    """``train_batches`` of the official loop. Epoch 0: its one batch (the loop breaks when it asks for a second),
    checked to move no parameter. Epoch 1: the batches, the model summarised against the start after each; then the
    run ends."""

    def __init__(self, epoch0, batches, m0, model):
        self.epoch0, self.batches, self.m0, self.model = epoch0, batches, m0, model
        self.epoch, self.out = 0, []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.epoch += 1
        if self.epoch == 1:
            yield self.epoch0
            assert torch.equal(common.flat(self.model), common.flat(self.m0)), "epoch 0 takes no optimiser step"
            yield self.epoch0  # (not used: the loop breaks)
            raise AssertionError("the official epoch 0 ran a second iteration")
        for i, b in enumerate(self.batches):
            if i:
                self.out.append(common.summary(self.m0, self.model))
            yield b
        self.out.append(common.summary(self.m0, self.model))
        raise _Done


class _Torch14Tie(torch.autograd.Function):
    """Element-wise ``torch.max(a, b)`` / ``torch.min(a, b)`` with torch 1.4.0's backward: the gradient goes to ``a``
    where a > b (max) / a < b (min), to ``b`` elsewhere — at a tie, all of it to ``b``."""

    @staticmethod
    def forward(ctx, a, b, real, is_max):
        ctx.save_for_backward(a, b)
        ctx.is_max = is_max
        return real(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        to_a = a > b if ctx.is_max else a < b
        ga = g.masked_fill(~to_a, 0).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
        gb = g.masked_fill(to_a, 0).sum_to_size(b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None


@contextlib.contextmanager
def torch14_ties():
    """Inside the block, ``torch.max(a, b)`` / ``torch.min(a, b)`` of two tensors differentiate as in torch 1.4.0
    (:class:`_Torch14Tie`); every other call is the real one."""
    real_max, real_min = torch.max, torch.min

    def wrap(real, is_max):
        def f(*a, **k):
            if len(a) == 2 and not k and all(torch.is_tensor(t) for t in a):
                return _Torch14Tie.apply(a[0], a[1], real, is_max)
            return real(*a, **k)
        return f

    torch.max, torch.min = wrap(real_max, True), wrap(real_min, False)
    try:
        yield
    finally:
        torch.max, torch.min = real_max, real_min


def official_run(checkout: str, s: dict) -> tuple[list[dict], dict]:
    """The official iterations of epoch 1 (after its epoch 0), the lr of each (``official_lrs``) and the PyTorch
    they ran under (``official_torch``; with ``s["ties"] = "torch-1.4.0"`` its min / max ties as 1.4.0's)."""
    with common.one_thread():
        return _official_run(checkout, s)


def _official_run(checkout: str, s: dict) -> tuple[list[dict], dict]:
    m0 = common.model(s["seed"], s["arch"])
    model = copy.deepcopy(m0)
    batches = [_batch(s, b) for b in s["batch_seeds"][:s["iters"]]]
    x0 = _batch(s, s["epoch0_batch_seed"])
    noises = [_noise(s["epoch0_noise_seed"], x0[0], s["eps"])]
    noises += [_noise(seed, x, s["eps"]) for seed, (x, _) in zip(s["noise_seeds"], batches)]
    loader = _Loader(x0, batches, m0, model)
    calls, lrs = [], []
    real_uniform, real_sgd = torch.Tensor.uniform_, torch.optim.SGD

    def uniform_(self, a=0.0, b=1.0, **k):  # get_uniform_delta's delta.uniform_(-eps, eps): the suite's draw
        assert abs(a + s["eps"]) < 1e-15 and abs(b - s["eps"]) < 1e-15 and self.shape == noises[len(calls)].shape
        calls.append(a)
        return self.copy_(noises[len(calls) - 1])

    class SGD(real_sgd):
        def step(self, *a, **k):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)

    apex, amp = types.ModuleType("apex"), types.ModuleType("apex.amp")
    apex.amp = amp
    names = ("apex", "apex.amp", "utils", "data", "models")
    saved = {k: sys.modules.get(k) for k in names}
    real = (torch.cuda.FloatTensor, nn.Module.cuda, torch.get_default_dtype(), sys.argv, os.getcwd(),
            os.environ.get("CUDA_VISIBLE_DEVICES"))
    ties = torch14_ties() if s["ties"] == "torch-1.4.0" else contextlib.nullcontext()
    argv = ["train.py", "--dataset", "cifar10", "--model", "resnet18", "--attack", "fgsm", "--attack_init", "zero",
            "--eps", str(s["eps"] * 255), "--fgsm_alpha", str(s["fgsm_alpha"]), "--grad_align_cos_lambda",
            str(s["lam"]), "--epochs", str(s["epochs"]), "--lr_schedule", "cyclic", "--lr_max", str(s["lr"]),
            "--weight_decay", str(s["weight_decay"]), "--batch_size", str(s["n"])]
    try:
        sys.modules.update({"apex": apex, "apex.amp": amp})
        for k in names[2:]:
            sys.modules.pop(k, None)
        nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        torch.cuda.FloatTensor = lambda *size: torch.empty(*size)  # utils.clamp's bounds (default dtype)
        mod = common.load_official(checkout, "train.py", "official_ga_train")
        mod.data.get_loaders = lambda *a, **k: loader if k.get("train_set") and k.get("data_augm") else []
        mod.models.get_model = lambda *a, **k: model
        mod.utils.initialize_weights = lambda module: None
        mod.utils.configure_logger = lambda *a: types.SimpleNamespace(info=lambda *a, **k: None)
        mod.rob_acc = lambda *a, **k: (0.0, 0.0, None)
        mod.utils.get_grad_np = lambda *a, **k: None
        mod.utils.avg_cos_np = lambda *a, **k: 0.0
        torch.Tensor.uniform_ = uniform_
        torch.optim.SGD = SGD
        torch.set_default_dtype(torch.float64)
        sys.argv = argv
        os.chdir(tempfile.mkdtemp(prefix="fidelity-ga-"))  # main() makes models/ in the working directory
        with ties:
            try:
                mod.main()
            except _Done:
                pass
    finally:
        torch.Tensor.uniform_, torch.optim.SGD = real_uniform, real_sgd
        torch.cuda.FloatTensor, nn.Module.cuda = real[0], real[1]
        torch.set_default_dtype(real[2])
        sys.argv = real[3]
        os.chdir(real[4])
        if real[5] is None:  # main() sets CUDA_VISIBLE_DEVICES
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = real[5]
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert len(calls) == 1 + s["iters"] and len(lrs) == s["iters"] and len(loader.out) == s["iters"]
    return loader.out, {"official_lrs": lrs, "official_torch": torch.__version__}


def _vs(theirs: list[dict], s: dict) -> list[dict[str, float]]:
    return [common.compare(o, t) for o, t in zip(suite_run(s), theirs)]


def _split(label: str, diffs: list[dict[str, float]]) -> None:
    common.report(label, diffs)
    stats = max(v for d in diffs for k, v in d.items() if "running_" in k)
    params = max(v for d in diffs for k, v in d.items() if "running_" not in k and "num_batches" not in k)
    print(f"  of which: parameters (and entries) {params:.3e}, BN running statistics {stats:.3e}")


def measure(checkout: str, images: str | None) -> None:
    """How far the suite's defaults are from each official reading, and the size of the official epoch 0."""
    for name in ("fgsm-ga@g1-half", "fgsm-ga@g1-zero"):
        s = setting(name)
        theirs, extra = official_run(checkout, s)
        _split(f"{name} (suite with g1_saturated=full)", _vs(theirs, {**s, **extra, "g1_saturated": "full"}))
    s = setting("fgsm-ga")
    theirs, extra = official_run(checkout, s)
    _split("fgsm-ga (suite without the official epoch 0's forwards)", _vs(theirs, {**s, **extra,
                                                                                  "official_epoch0": False}))
    with_, without = [], []
    suite_run(s, with_)
    suite_run({**s, "official_epoch0": False}, without)
    prev = None
    for i, (a, b) in enumerate(zip(with_, without), 1):
        keys = [k for k in a if "running_" in k]
        rel = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in keys)
        size = {k: float((a[k] - b[k]).norm()) for k in keys}
        shrink = "" if prev is None else f"; the difference shrinks ×{max(size[k] / prev[k] for k in keys):.4f}"
        print(f"  iteration {i}: running statistics with vs without epoch 0: max relative {rel:.3e}{shrink} "
              "per iteration (three train-mode forwards at BN momentum 0.1: 0.9³ = 0.729)")
        prev = size
    if images:
        for name in ("fgsm-ga@g1-half", "fgsm-ga@g1-zero"):
            s = {**setting(name), "images": images}
            x, _ = _batch(s, s["batch_seeds"][0])
            print(f"CIFAR-10 training batches: {float(((x == 0) | (x == 1)).double().mean()):.1%} of the pixels of "
                  "the first at 0 or 1")
            theirs, extra = official_run(checkout, s)
            common.report(f"{name} on CIFAR-10", _vs(theirs, {**s, **extra}))
            common.report(f"{name} on CIFAR-10 (suite with g1_saturated=full)",
                          _vs(theirs, {**s, **extra, "g1_saturated": "full"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help=f"a checkout of github.com/{OFFICIAL['repo']}")
    ap.add_argument("--write-golden", action="store_true", help="store the official runs as the CI fixtures")
    ap.add_argument("--measure", action="store_true", help="the sizes of the deviations instead")
    ap.add_argument("--images", help="with --measure: a CIFAR-10 data directory or archive (real images too)")
    a = ap.parse_args()
    if a.measure:
        measure(a.official, a.images)
        return
    commit = common.commit_of(a.official)
    for name in VARIANTS:
        theirs, extra = official_run(a.official, setting(name))
        used = {**setting(name), **extra}
        common.report(name, _vs(theirs, used))
        if a.write_golden:
            print(f"wrote {common.write_golden(name, {**OFFICIAL, 'commit': commit}, used, theirs)}")


if __name__ == "__main__":
    main()
