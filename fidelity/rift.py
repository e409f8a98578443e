"""RiFT against its authors' code (github.com/microsoft/robustlearn, folder ``RiFT/``), stage by stage, each a
fixture of its own:

* ``rift@mrc`` — module robust criticality: ``layer_sharpness`` of ``main.py`` as written, with the D_adv it
  builds by ``generate_adv_dataset`` (``torchattacks.PGD`` of torchattacks v3.4.0, RiFT's ``env.yaml`` pin,
  github.com/Harry24k/adversarial-attacks-pytorch), against the suite's ``RiFT.before_training``. Its
  "iterations": first D_adv (``group_norms = {"d_adv": ‖x′ − x‖}``, entries of x′ − x), then one per probed
  module in model order: the summary of that module's clone after its gradient ascent, against θ_AT, with the
  module's MRC value (max over epochs of CE − L₀) added as ``group_norms["mrc"]``, so every MRC value is compared
  like a group norm, to 1e-10 relative. θ_AT is the comparison's model after 25 clean SGD steps (a fresh one
  predicts almost uniformly: every MRC is about 1e-4 and the norm clip never acts).
* ``rift`` — fine-tuning of the chosen module: three steps of ``train`` of ``main.py``, after ``main()``'s own
  ``--layer`` selection loop (``requires_grad`` for every parameter whose name contains the layer name) and
  ``create_optimizer("SGDM")`` of ``optimizer.py``, against the suite's ``RiFT.train_step`` with ``module`` set
  (``body.6``, a bias-free convolution: both select the same parameter).
* ``rift@interp`` — interpolation: ``interpolation`` of ``utils.py`` over its α = 0, 0.1, …, 1; the model it
  loads each θ(α) into is summarised against θ_AT, against the suite's ``interpolate`` over ``alpha_grid(10)``.

    python -m fidelity.rift --official /path/to/robustlearn/RiFT \\
        --torchattacks /path/to/adversarial-attacks-pytorch [--only NAME] [--write-golden] [--measure]

The functions (and ``main()``'s selection loop) are read from the official files with ``ast`` and run as written;
none is copied here (``main()`` itself needs robustbench, the CIFAR downloads and a GPU). Around them:

* the official ``Normalize`` layer (CIFAR mean / std, put on "cuda") has mean 0 / std 1 (the suite's inputs are
  in [0, 1]; its models normalise inside);
* the CIFAR test set that ``generate_adv_dataset`` attacks is the suite's MRC half of the held-out slice, as
  float64 in [0, 1] (in place of ``ToTensor``'s float32);
* ``torch.utils.data.DataLoader`` yields the batches in the suite's order: the official ``shuffle=True`` would draw
  its permutation from the global RNG; it gets the suite's per-module, per-epoch ``randperm`` instead, as the other
  scripts get the suite's noise. Passes under ``no_grad`` are evaluations and run in order, which changes only the
  summation order of a mean;
* torchattacks' ``uniform_(−ε, ε)`` start is fed the suite's draw.

The official attack step is ``alpha=2/225``, its typo for 2/255, so the fixture's suite run uses ``attack_step =
2/225``. ``--measure`` prints the sizes of the documented deviations: the suite's default 2/255 (D_adv entries
3.3e-1 relative, MRC values up to 8.5 %, and here a different lowest-MRC module), the official ``--layer fc``
also training ``fc.bias``, and the truncated ``num_batches_tracked`` of the official interpolation.
"""
from __future__ import annotations

import argparse
import ast
import copy
import logging
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import common

FILES = {"rift@mrc": "RiFT/main.py (generate_adv_dataset, layer_sharpness), RiFT/dataloader.py (adv_dataset)",
         "rift": "RiFT/main.py (train; main's --layer selection), RiFT/optimizer.py (create_optimizer)",
         "rift@interp": "RiFT/utils.py (interpolation, evaluate)"}
TORCHATTACKS = {"repo": "Harry24k/adversarial-attacks-pytorch", "tag": "v3.4.0 (RiFT env.yaml: torchattacks==3.4.0)"}
BASE = {"arch": "smallcnn", "seed": 0, "runner": "fidelity.rift"}
VARIANTS = {
    # MRC: 6 synthetic images per class, the last 4 held out → 20 MRC + 20 validation images
    "rift@mrc": {"stage": "mrc", "per_class": 6, "train_steps": 25, "holdout_per_class": 4, "data_seed": 3,
                 "eps": 8 / 255, "attack_step": 2 / 225, "attack_steps": 10, "mrc_epochs": 10, "mrc_lr": 1.0,
                 "mrc_batch": 512, "mrc_radius": 0.1},
    "rift": {"stage": "ft", "module": "body.6", "n": 16, "iters": 3, "lr": 0.001, "momentum": 0.9,
             "weight_decay": 5e-4, "batch_seeds": [1, 2, 3]},
    "rift@interp": {"stage": "interp", "ft_seed": 1, "alpha_points": 10},
}
OFFICIAL_MRC = {"epochs": 10, "lr": 1.0, "batch": 512, "radius": 0.1, "dadv_batch": 128}  # hard-coded there


def setting(name: str) -> dict:
    return {**BASE, **VARIANTS[name], "variant": name}


# ---------------------------------------------------------------------------------------------------------------
# the suite's side


def _splits(s: dict):
    from bench.data import make_synthetic

    data = make_synthetic(s["per_class"], seed=s["data_seed"])
    return data.drop_last_per_class(s["holdout_per_class"]), data.last_per_class(s["holdout_per_class"])


def _theta_at(s: dict) -> nn.Module:
    """θ_AT for MRC: the comparison's model after ``train_steps`` SGD steps of clean CE on the training part (a
    freshly initialised model predicts nearly uniformly: its MRC values are all about 1e-4 and the clip never acts)."""
    m = common.model(s["seed"], s["arch"])
    train, _ = _splits(s)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(s["seed"])
    for _ in range(s["train_steps"]):
        idx = torch.randint(0, len(train), (32,), generator=g)
        loss = F.cross_entropy(m(train.x[idx].to(torch.float64) / 255), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def _rift(s: dict, model: nn.Module, **hp):
    from methods import get_method

    cls = get_method("rift")
    h = cls.resolved_defaults()
    h.update({k: s[k] for k in ("holdout_per_class", "eps", "attack_step", "attack_steps", "mrc_epochs", "mrc_lr",
                                "mrc_batch", "mrc_radius", "lr", "momentum", "weight_decay") if k in s}, **hp)
    info = {"n": s.get("n", 16), "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    return cls(h, copy.deepcopy(model), copy.deepcopy(model), steps_per_epoch=s.get("iters", 1), info=info,
               fused=False)


def _x_summary(x_adv: torch.Tensor, x: torch.Tensor) -> dict:
    d = (x_adv - x).reshape(-1)
    idx = torch.linspace(0, d.numel() - 1, common.N_ENTRIES).round().long()
    return {"group_norms": {"d_adv": float(d.norm())}, "entries": d[idx].tolist(), "entry_index": idx.tolist(),
            "delta_norm": float(d.norm())}


def _mrc_suite(s: dict) -> list[dict]:
    from methods import rift
    from methods.base import StageContext

    theta_at = _theta_at(s)
    train, held = _splits(s)
    method = _rift(s, theta_at)
    clones = {}
    real = rift.ascend_module

    def ascend(model, name, *a, **k):  # the suite's probe, its clone kept for the comparison
        out = real(model, name, *a, **k)
        clones[name] = out[0]
        return out

    d_adv = {}
    real_set = rift.adversarial_set

    def adversarial_set(model, split, **k):  # the suite's D_adv, kept with the images it was made from
        d_adv["x"], d_adv["y"] = real_set(model, split, **k)
        d_adv["clean"] = split.x.to(torch.float64) / 255
        return d_adv["x"], d_adv["y"]

    rift.ascend_module, rift.adversarial_set = ascend, adversarial_set
    try:
        method.before_training(StageContext(train=train, heldout=held, device=torch.device("cpu"), seed=s["seed"],
                                            echo=lambda m: None, save=lambda: None))
    finally:
        rift.ascend_module, rift.adversarial_set = real, real_set
    out = [_x_summary(d_adv["x"], d_adv["clean"])]
    for name in rift.candidate_modules(theta_at):
        row = common.summary(theta_at, clones[name])
        row["group_norms"]["mrc"] = method.stage["mrc"][name]
        out.append(row)
    return out


def _ft_suite(s: dict) -> list[dict]:
    from bench.loader import Batch

    m0 = common.model(s["seed"], s["arch"])
    method = _rift(s, m0, module=s["module"])
    method.model.train()
    out = []
    for i in range(s["iters"]):
        x, y = common.batch(s["batch_seeds"][i], s["n"])
        method.set_lr(s["lr"])
        method.train_step(Batch(x, y, torch.arange(s["n"])), 0, i)
        out.append(common.summary(m0, method.model))
    return out


def _interp_models(s: dict) -> tuple[nn.Module, nn.Module]:
    """θ_AT and a θ_FT differing in every entry (another initialisation), BN counters apart (3 vs 10 batches)."""
    at, ft = common.model(s["seed"], s["arch"]), common.model(s["ft_seed"], s["arch"])
    for m, n in ((at, 3), (ft, 10)):
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.num_batches_tracked.fill_(n)
    return at, ft


def _interp_suite(s: dict) -> list[dict]:
    from methods.rift import alpha_grid, interpolate

    at, ft = _interp_models(s)
    work = copy.deepcopy(at)
    out = []
    for alpha in alpha_grid(s["alpha_points"]):
        work.load_state_dict(interpolate(at.state_dict(), ft.state_dict(), alpha))
        out.append(common.summary(at, work))
    return out


def suite_run(s: dict) -> list[dict]:
    with common.one_thread():
        return {"mrc": _mrc_suite, "ft": _ft_suite, "interp": _interp_suite}[s["stage"]](s)


# ---------------------------------------------------------------------------------------------------------------
# the official side


def _official(checkout: str, relpath: str, names: set[str], ns: dict) -> dict:
    """The named top-level functions / classes of an official file, executed in ``ns`` (as written)."""
    path = Path(checkout) / relpath
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the RiFT/ folder of a checkout of github.com/microsoft/robustlearn")
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    assert {n.name for n in keep} == names, (relpath, names)
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102 (the authors' code)
    return ns


class _Unit(nn.Module):
    """The official ``Normalize`` with mean 0 / std 1."""

    def __init__(self, mean=None, std=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("std", torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return (x - self.mean.reshape(1, 3, 1, 1)) / self.std.reshape(1, 3, 1, 1)


class _Loader:
    """``torch.utils.data.DataLoader`` for the official code: the batches in the order ``order(dataset, n)`` gives
    (the suite's), stacked as the default collate does."""

    def __init__(self, dataset, batch_size=1, shuffle=False, order=None, **k):
        self.dataset, self.batch_size, self.order = dataset, batch_size, order

    def __iter__(self):
        n = len(self.dataset)
        idx = self.order(self.dataset, n) if self.order is not None else torch.arange(n)
        for i in range(0, n, self.batch_size):
            items = [self.dataset[int(j)] for j in idx[i:i + self.batch_size]]
            yield torch.stack([a for a, _ in items]), torch.as_tensor(torch.stack([torch.as_tensor(b)
                                                                                 for _, b in items]))


def _quiet_args(**k):
    log = logging.getLogger("fidelity.rift.official")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    return types.SimpleNamespace(dataset="CIFAR10", device="cpu", logger=log, **k)


def _mrc_official(checkout: str, torchattacks_dir: str, s: dict) -> list[dict]:
    from bench.attacks import uniform_noise
    from bench.loader import hash_seed
    from methods.rift import SEED_DADV, SEED_MRC, split_heldout

    assert (s["mrc_epochs"], s["mrc_lr"], s["mrc_batch"], s["mrc_radius"]) == (
        OFFICIAL_MRC["epochs"], OFFICIAL_MRC["lr"], OFFICIAL_MRC["batch"], OFFICIAL_MRC["radius"])
    sys.path.insert(0, str(torchattacks_dir))
    import torchattacks

    theta_at = _theta_at(s)
    _, held = _splits(s)
    mrc_half, _ = split_heldout(held)
    x = mrc_half.x.to(torch.float64) / 255
    assert len(x) <= OFFICIAL_MRC["dadv_batch"] and len(x) <= s["mrc_batch"]  # one chunk on either side
    noise = uniform_noise(x, s["eps"], torch.Generator().manual_seed(hash_seed(s["seed"], SEED_DADV)))
    test_set = list(zip(x, mrc_half.y.tolist()))
    copies, starts, passes, loaded = [], [], [], []

    def deepcopy(obj):  # main.py's ``from copy import deepcopy``: the clones are kept
        out = copy.deepcopy(obj)
        copies.append(out)
        return out

    def uniform_(self, a=0.0, b=1.0, **k):  # torchattacks' start: torch.empty_like(x).uniform_(-eps, eps)
        assert abs(b - s["eps"]) < 1e-12 and abs(a + s["eps"]) < 1e-12 and self.shape == noise.shape
        starts.append(1)
        return self.copy_(noise)

    gens: dict[int, torch.Generator] = {}

    def order(dataset, n):
        if not isinstance(dataset, ns["adv_dataset"]) or not torch.is_grad_enabled():
            return torch.arange(n)  # the attacked set, as the suite takes it; evaluations
        k = len(passes)  # an ascent epoch: the suite's shuffle of module k // epochs, epoch k % epochs
        passes.append(k)
        i = k // s["mrc_epochs"]
        if i not in gens:
            gens[i] = torch.Generator().manual_seed(hash_seed(s["seed"], SEED_MRC, i))
        return torch.randperm(n, generator=gens[i])

    datasets = types.SimpleNamespace(CIFAR10=lambda *a, **k: test_set, CIFAR100=None)
    ns = {"torch": torch, "nn": nn, "F": F, "np": np, "deepcopy": deepcopy, "torchattacks": torchattacks,
          "transforms": types.SimpleNamespace(Compose=lambda t: None, ToTensor=lambda: None),
          "datasets": datasets, "TinyImageNet": None, "Normalize": _Unit, "Dataset": torch.utils.data.Dataset}
    _official(checkout, "dataloader.py", {"adv_dataset"}, ns)
    _official(checkout, "main.py", {"generate_adv_dataset", "layer_sharpness"}, ns)
    real_loader, real_uniform = torch.utils.data.DataLoader, torch.Tensor.uniform_
    torch.utils.data.DataLoader = lambda dataset, *a, **k: loaded.append(dataset) or _Loader(dataset, *a,
                                                                                             order=order, **k)
    torch.Tensor.uniform_ = uniform_
    try:
        ranked = ns["layer_sharpness"](_quiet_args(), copy.deepcopy(theta_at), epsilon=s["mrc_radius"])
    finally:
        torch.utils.data.DataLoader, torch.Tensor.uniform_ = real_loader, real_uniform
    mrc = {k[len("1."):]: v for k, v in ranked}  # the official names are those of nn.Sequential(norm, model)
    # the official probe order (its named_parameters loop), the order of its clones
    probed = [n[:-len(".weight")] for n, _ in theta_at.named_parameters() if n[:-len(".weight")] in mrc]
    # copies: the attacked model (generate_adv_dataset's deepcopy), then one clone per probed module, in order
    # (its other deepcopy, of the clipped weight, is a tensor)
    clones = [c for c in copies if isinstance(c, nn.Module)][1:]
    (d_adv,) = [d for d in loaded if isinstance(d, ns["adv_dataset"])]
    assert len(starts) == 1 and len(clones) == len(mrc) and len(passes) == len(mrc) * s["mrc_epochs"], (
        len(starts), len(clones), len(mrc), len(passes))
    assert torch.equal(d_adv.labels, mrc_half.y)
    out = [_x_summary(d_adv.images, x)]
    for name, clone in zip(probed, clones):
        row = common.summary(theta_at, clone[1])
        row["group_norms"]["mrc"] = mrc[name]
        out.append(row)
    return out


def _selection_loop(checkout: str):
    """main()'s ``for name, param in model.named_parameters(): ... args.layer in name ...`` loop, compiled."""
    path = Path(checkout) / "main.py"
    (main,) = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    loops = [n for n in main.body if isinstance(n, ast.For) and "named_parameters" in ast.unparse(n.iter)
             and "args.layer" in ast.unparse(n)]
    assert len(loops) == 1, "main()'s --layer selection loop not found"
    return compile(ast.Module(body=loops, type_ignores=[]), str(path), "exec")


def _ft_official(checkout: str, s: dict, module: str | None = None) -> list[dict]:
    ns = {"torch": torch, "tqdm": lambda it: it}
    _official(checkout, "main.py", {"train"}, ns)
    create = _official(checkout, "optimizer.py", {"create_optimizer"}, {"torch": torch, "optim": torch.optim}
                       )["create_optimizer"]
    m0 = common.model(s["seed"], s["arch"])
    model = copy.deepcopy(m0)
    exec(_selection_loop(checkout), {"model": model,  # noqa: S102 (the authors' code)
                                     "args": types.SimpleNamespace(layer=module or s["module"])})
    optimizer = create("SGDM", model, s["lr"], s["momentum"], weight_decay=s["weight_decay"])
    batches = [common.batch(b, s["n"]) for b in s["batch_seeds"][:s["iters"]]]
    out = []

    def loader():
        for i, b in enumerate(batches):
            if i:
                out.append(common.summary(m0, model))
            yield b

    ns["train"](_quiet_args(), model, loader(), optimizer, nn.CrossEntropyLoss())
    out.append(common.summary(m0, model))
    return out


def _interp_official(checkout: str, s: dict) -> tuple[list[dict], list[tuple[int, int]]]:
    """The iterations, and per α the (official, suite) ``num_batches_tracked`` of the first BN."""
    from methods.rift import alpha_grid, interpolate

    ns = {"torch": torch, "np": np}
    _official(checkout, "utils.py", {"interpolation", "evaluate"}, ns)
    at, ft = _interp_models(s)
    model = copy.deepcopy(at)
    out, counters = [], []

    def robustness(args, m):  # eval_robustness_func: called with the model θ(α) was loaded into
        out.append(common.summary(at, m))
        counters.append(int(m.body[1].num_batches_tracked))
        return 0.0

    x, y = common.batch(1, 4)
    with tempfile.TemporaryDirectory() as d:
        ns["interpolation"](_quiet_args(), _quiet_args().logger, copy.deepcopy(at.state_dict()),
                            copy.deepcopy(ft.state_dict()), model, [(x, y)], nn.CrossEntropyLoss(), d + "/",
                            robustness)
    ours = [int(interpolate(at.state_dict(), ft.state_dict(), a)["body.1.num_batches_tracked"])
            for a in alpha_grid(s["alpha_points"])]
    return out, list(zip(counters, ours))


def official_run(checkout: str, s: dict, torchattacks_dir: str | None = None) -> list[dict]:
    with common.one_thread():
        return _official_run(checkout, s, torchattacks_dir)


def _official_run(checkout: str, s: dict, torchattacks_dir: str | None) -> list[dict]:
    if s["stage"] == "mrc":
        if torchattacks_dir is None:
            raise SystemExit("rift@mrc needs --torchattacks: a checkout of github.com/"
                             f"{TORCHATTACKS['repo']} at {TORCHATTACKS['tag'].split()[0]}")
        return _mrc_official(checkout, torchattacks_dir, s)
    if s["stage"] == "ft":
        return _ft_official(checkout, s)
    return _interp_official(checkout, s)[0]


def measure(checkout: str, torchattacks_dir: str) -> None:
    """The documented deviations' sizes on the fixtures' settings."""
    s = setting("rift@mrc")
    theirs = official_run(checkout, s, torchattacks_dir)
    ours = suite_run({**s, "attack_step": 2 / 255})
    diffs = [common.compare(o, t) for o, t in zip(ours, theirs)]
    common.report("rift@mrc (suite's default attack_step 2/255 against the official 2/225)", diffs)
    print("  MRC values (official 2/225 | suite 2/255): " + ", ".join(
        f"{name} {t['group_norms']['mrc']:.4f} | {o['group_norms']['mrc']:.4f}"
        for name, o, t in zip(_names(), ours[1:], theirs[1:])))
    print(f"  lowest MRC: official {_lowest(theirs)}, suite at 2/255 {_lowest(ours)}")
    s = setting("rift")
    theirs = _ft_official(checkout, s, module="fc")
    diffs = [common.compare(o, t) for o, t in zip(suite_run({**s, "module": "fc"}), theirs)]
    common.report("rift fine-tuning of fc (the official --layer fc also trains fc.bias)", diffs)
    _, counters = _interp_official(checkout, setting("rift@interp"))
    print("rift@interp num_batches_tracked per alpha (official float truncated | suite; theta_AT 3, theta_FT 10): "
          + ", ".join(f"{a}|{b}" for a, b in counters))


def _names() -> list[str]:
    from methods.rift import candidate_modules

    return candidate_modules(common.model(0))


def _lowest(rows: list[dict]) -> str:
    return min(zip(_names(), rows[1:]), key=lambda nr: nr[1]["group_norms"]["mrc"])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True,
                    help="the RiFT/ folder of a checkout of github.com/microsoft/robustlearn")
    ap.add_argument("--torchattacks", help=f"a checkout of github.com/{TORCHATTACKS['repo']} at "
                                           f"{TORCHATTACKS['tag'].split()[0]} (for rift@mrc)")
    ap.add_argument("--only", help="one fixture name")
    ap.add_argument("--write-golden", action="store_true", help="store the official runs as the CI fixtures")
    ap.add_argument("--measure", action="store_true", help="print the sizes of the documented deviations")
    a = ap.parse_args()
    if a.measure:
        measure(a.official, a.torchattacks)
        return
    for name in [a.only] if a.only else VARIANTS:
        s = setting(name)
        theirs = official_run(a.official, s, a.torchattacks)
        common.report(name, [common.compare(o, t) for o, t in zip(suite_run(s), theirs)])
        if a.write_golden:
            official = {"repo": "microsoft/robustlearn", "commit": common.commit_of(a.official),
                        "files": FILES[name]}
            if s["stage"] == "mrc":
                official["torchattacks"] = {**TORCHATTACKS, "commit": common.commit_of(a.torchattacks)}
            print(f"wrote {common.write_golden(name, official, s, theirs)}")


if __name__ == "__main__":
    main()
