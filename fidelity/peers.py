"""Speed beside the peers (issue 23): each certified method's official training loop against the suite's step for the
same method, model and batch, side by side in one process on this machine, fp32, median over interleaved steps.

    python -m fidelity.peers --trades DIR --fast-adversarial DIR --robust-overfitting DIR --gradalign DIR \\
        --atas DIR --rift DIR/RiFT --afd DIR [--methods a,b] [--arch smallvgg] [--batch 128] [--rounds 5] \\
        [--no-engine] [--out results/perf]

Each checkout is optional: a method is timed when its official code is given (``--methods`` chooses among them).

**The official side** is the loop its certificate runs (``fidelity/<method>.py``, run as written there: the same
drivers, not a copy), in fp32 at the given arch and batch: the drivers' float64 model and batches are made fp32
(:func:`official_fp32`), a float64 default dtype is kept at fp32, and one intra-op thread (``common.one_thread``)
is not imposed. Every driver summarises the model after each official step (``common.summary``); here that call
is the clock: an official step is the time between two of them, the loop's own per-step work (its logging, its
``loss.item()``) included and the summary itself left out. Its first step is its warm-up (not timed).

**The suite's side**, two of them: ``train_step`` (and the engine's EMA update where the method has one) of
``methods.get_method(name)`` built with its defaults, at the official loop's attack / replay counts, on the same
batches: *eager fp32* (``bench run``'s defaults on a CPU: fp32, no compile, the for-loop SGD), and *engine* (``bench
perf``'s defaults for this device, :func:`bench.perf.engine_settings`: ``torch.compile`` where a C++ compiler is
installed, bf16 autocast where the CPU computes it natively, channels_last and the fused SGD on a GPU only), each
warmed up (compiled) before the clock starts. Data loading is outside every clock: all three sides get in-memory
batches.

**Interleaving**: one suite step of each kind runs inside every gap between two official steps (their order
alternating), so a drift of a shared machine's speed falls on the three alike; the figures are the medians over
``--rounds`` steps of each. Only the measured figures are written (``peers-<device>-<date>.md``), never the peers'
code.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import os
import shlex
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import afd, arrest, atas, common, fgsm_ga, fgsm_rs, free_at, pgd_at, rift, trades

CHECKOUTS = {  # option (dashes for underscores): the repository it is a checkout of
    "trades": "yaodongyu/TRADES",
    "fast_adversarial": "locuslab/fast_adversarial",
    "robust_overfitting": "locuslab/robust_overfitting",
    "gradalign": "tml-epfl/understanding-fast-adv-training",
    "atas": "HuangZhiChao95/ATAS",
    "rift": "microsoft/robustlearn",  # its RiFT/ folder, as fidelity.rift takes it
    "afd": "changzhang777/AFD",
}


@dataclass(frozen=True)
class Plan:
    checkout: str  # a key of CHECKOUTS
    timed: str  # what one official step is, for the record
    official: Callable[[str, dict], Any]  # the certificate's official run: (checkout, setting)
    setting: Callable[[], dict]  # the certificate's setting (resized by :func:`sized`)
    suite: dict = field(default_factory=dict)  # the suite's hp over its defaults (the official loop's work)
    epoch: int = 0  # the epoch the suite's train_step is given


PLANS: dict[str, Plan] = {
    "pgd-at": Plan("robust_overfitting", "train_cifar.py main(): PGD-10 step, CE, SGD step, and its two BN-statistics "
                   "forwards", pgd_at.official_run, lambda: pgd_at.SETTING),
    "trades": Plan("trades", "trades_loss (10 KL steps) + backward + SGD step, as train_trades_cifar10.py",
                   trades.official_run, lambda: trades.SETTING),
    "free-at": Plan("fast_adversarial", "train_free.py main(): one mini-batch = m = 8 replays",
                    free_at.official_run, lambda: {**free_at.SETTING, "replays": 8}, {"replays": 8}),
    # train_fgsm.py's ε is (8/255) / std, a float32 tensor here: the bound of its start, which the certificate
    # checks against the setting's ε to 1e-12, is 8/255 rounded to float32
    "fgsm-rs": Plan("fast_adversarial", "train_fgsm.py main(): FGSM from a random start, SGD step",
                    fgsm_rs.official_run, lambda: {**fgsm_rs.SETTING, "eps": float(torch.tensor(8 / 255).float())}),
    "fgsm-ga": Plan("gradalign", "train.py main(), --attack fgsm --attack_init zero --grad_align_cos_lambda 0.2",
                    fgsm_ga.official_run, lambda: fgsm_ga.setting("fgsm-ga")),
    # reset_every 10: no buffer re-draw among the timed epochs; the suite past its warm-up, as the official
    "atas": Plan("atas", "ATAS.py main(): one epoch of one mini-batch, the adaptive step (after one warm-up epoch); "
                 "its per-example δ / v buffers float64, as the certificate asserts, the model fp32",
                 atas.official_run, lambda: {**atas.BASE, "normalize": "none", "reset_every": 10},
                 {"warmup_epochs": 1}, epoch=1),
    "rift": Plan("rift", "main.py train() of the fine-tuning stage: clean CE, one module (--layer body.6, SGDM); "
                 "the MRC and the interpolation stages are not timed", rift.official_run, lambda: rift.setting("rift"),
                 {"module": "body.6"}),
    "vaft": Plan("afd", "ARREST.py: ARREST() (PGD-10) + backward + SGD step", arrest.official_run,
                 lambda: arrest.setting("vaft")),
    "afkd": Plan("afd", "ARREST.py --RGKD (teacher in eval mode)", arrest.official_run,
                 lambda: arrest.setting("afkd")),
    "arrest": Plan("afd", "ARREST.py --RGKD --NR (teacher in eval mode, θ = 30 as the suite's default)",
                   arrest.official_run, lambda: {**arrest.setting("arrest"), "theta": 30.0}),
    "afd": Plan("afd", "tl+sl.py criterion() (PGD-10, three backward/SGD-step pairs) + its EMA, with PyTorch "
                "1.1's SGD as fidelity/afd.py runs it (the script's in-place steps fail on torch 2.x)",
                afd.official_run, lambda: afd.setting("afd")),
    "vaft+d": Plan("afd", "tl+sl.py --gamma 0, as afd", afd.official_run, lambda: afd.setting("vaft+d")),
    "vaft+a": Plan("afd", "ARREST.py --RGKD --beta 25, as afkd", arrest.official_run, lambda: afd.VAFT_A),
}
SEED_KEYS = {"batch_seeds": 1, "noise_seeds": 11, "epoch_seeds": 21}  # per-step seed lists of the settings


def sized(s: dict, arch: str, n: int, iters: int) -> dict:
    """A certificate's setting at ``arch``, batch ``n`` and ``iters`` official steps (its per-step seeds extended;
    ATAS's training set is the batch itself)."""
    out = {**s, "arch": arch, "n": n, "iters": iters}
    for k, first in SEED_KEYS.items():
        if k in s:
            out[k] = [first + i for i in range(iters)]
    if "n_train" in s:
        out["n_train"] = n
    return out


# -- the official side in fp32 ------------------------------------------------------------------------------------
class _Fp32Module(types.ModuleType):
    """An official module whose float64 tensors, as a driver sets them (``mod.mu = torch.zeros(..., float64)``),
    are kept in float32."""

    def __setattr__(self, name, value):
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            value = value.float()
        super().__setattr__(name, value)


def _float_input(module, args):
    """A forward pre-hook: float64 inputs as float32 (ATAS's certificate keeps its per-example buffers float64, as it
    asserts; the model still computes in fp32)."""
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
        return tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float64 else a for a in args)
    return None


@contextlib.contextmanager
def official_fp32(on_step: Callable[[], None]) -> Iterator[None]:
    """Inside: the certificates' drivers in fp32 at full speed — ``common.model`` fp32 (with :func:`_float_input`),
    ``common.batch`` fp32 (made once per seed: outside the clock), ``torch.set_default_dtype(float64)`` kept at
    float32, ``common.one_thread`` a no-op, official modules :class:`_Fp32Module` — and ``common.summary`` (called
    after every official step) calls ``on_step()`` in place of summarising (as do the norms AFD's and ATAS's
    certificates add to it: the drivers' bookkeeping stays off the clock). All restored after."""
    real = (common.model, common.batch, common.summary, common.one_thread, common.load_official,
            torch.set_default_dtype, afd.ema_groups, atas._state)
    made: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def model(seed: int = 0, arch: str = "smallcnn", num_classes: int = 10) -> nn.Module:
        m = real[0](seed, arch, num_classes).float()
        m.register_forward_pre_hook(_float_input)
        return m

    def batch(seed: int, n: int = 16, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        if (seed, n, num_classes) not in made:
            x, y = real[1](seed, n, num_classes)
            made[seed, n, num_classes] = x.float(), y
        x, y = made[seed, n, num_classes]
        return x.clone(), y.clone()

    def summary(before, after) -> dict[str, Any]:
        on_step()
        return {"group_norms": {}, "entries": [], "entry_index": [], "delta_norm": 0.0}

    def load_official(*a, **k):
        mod = real[4](*a, **k)
        mod.__class__ = _Fp32Module
        return mod

    def set_default_dtype(d):
        real[5](torch.float32 if d == torch.float64 else d)

    (common.model, common.batch, common.summary, common.one_thread, common.load_official,
     torch.set_default_dtype) = model, batch, summary, contextlib.nullcontext, load_official, set_default_dtype
    # the rest of the certificates' bookkeeping after a step (norms of AFD's EMA, of ATAS's buffers): not timed
    afd.ema_groups = lambda before, after: {}
    atas._state = lambda out, delta, gdnorm: out
    try:
        yield
    finally:
        (common.model, common.batch, common.summary, common.one_thread, common.load_official,
         torch.set_default_dtype, afd.ema_groups, atas._state) = real


# what the drivers replace while an official loop runs (its random draws fed, its optimiser watched, .cuda()...):
# as torch has them, for the suite's steps between two official steps
_REPLACED = [(torch, "randn"), (torch, "rand"), (torch, "max"), (torch, "min"), (torch.Tensor, "uniform_"),
             (torch.optim, "SGD"), (nn.init, "uniform_"), (torch.utils.data, "DataLoader"), (torch, "save"),
             (torch, "set_default_dtype")]
_TORCH = [(o, a, getattr(o, a)) for o, a in _REPLACED]


@contextlib.contextmanager
def real_torch() -> Iterator[None]:
    """Inside: torch's own functions where an official loop replaced them, float32 the default dtype and gradients
    on; after: what the official loop had."""
    now = [(o, a, getattr(o, a)) for o, a, _ in _TORCH]
    dtype = torch.get_default_dtype()
    for o, a, v in _TORCH:
        setattr(o, a, v)
    torch.set_default_dtype(torch.float32)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch.set_default_dtype(dtype)
        for o, a, v in now:
            setattr(o, a, v)


# -- the suite's side -----------------------------------------------------------------------------------------------
def suite_step(name: str, plan: Plan, s: dict, engine: dict | None) -> Callable[[int], None]:
    """The suite's step for the setting ``s`` (its batches), eager fp32 (``engine`` None) or with the engine's
    settings; warmed up (compiled) before it is returned. ``step(i)`` trains on the setting's i-th batch."""
    from bench.engine import EMA
    from bench.loader import Batch
    from methods import get_method

    cls = get_method(name)
    hp = cls.resolved_defaults()
    hp.update(plan.suite, batch_size=s["n"])
    model = common.model(0, s["arch"]).float()
    if engine and engine["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(model) if cls.starts_from != "scratch" else None
    info = {"n": s["n"], "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    method = cls(hp, model, teacher, steps_per_epoch=1000, info=info, fused=bool(engine and engine["fused_sgd"]))
    method.set_lr(hp["lr"])
    ema = EMA(method.model, hp["ema"]["decay"], hp["ema"].get("warmup", True)) if hp.get("ema") else None
    if engine and engine["compile"]:
        method.compile()
    batches = []
    for seed in s["batch_seeds"]:
        x, y = common.batch(seed, s["n"])
        x = x.float()
        if engine and engine["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append(Batch(x, y, torch.arange(s["n"])))
    bf16 = bool(engine and engine["bf16"])

    def step(i: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            method.train_step(batches[i % len(batches)], plan.epoch, i)
        if ema is not None:
            ema.update(method.model)

    for i in range(3 if engine and engine["compile"] else 1):  # (compiled: its first steps compile, recompile)
        step(i)
    return step


def _clock(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_method(name: str, checkout: str, *, arch: str, n: int, rounds: int, engine: dict | None,
                echo: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Seconds per step of the official loop and of the suite's step(s), ``rounds`` interleaved steps each."""
    plan = PLANS[name]
    s = sized(plan.setting(), arch, n, rounds + 1)  # the first official step is its warm-up
    suites = {"eager": suite_step(name, plan, s, None)}
    if engine is not None:
        suites["engine"] = suite_step(name, plan, s, engine)
    times: dict[str, list[float]] = {"official": [], **{k: [] for k in suites}}
    state = {"calls": 0, "start": None}

    def on_step() -> None:  # after each official step: its time, then one step of each suite side
        now = time.perf_counter()
        if state["start"] is not None:
            times["official"].append(now - state["start"])
        r = state["calls"]
        state["calls"] += 1
        if r < rounds:
            with real_torch():
                for k in (list(suites) if r % 2 == 0 else list(reversed(suites))):
                    times[k].append(_clock(lambda: suites[k](r)))
            echo(f"  {name} step {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()
                                                                 if v))
        state["start"] = time.perf_counter()

    with official_fp32(on_step):
        plan.official(checkout, s)
    if state["calls"] != rounds + 1 or len(times["official"]) != rounds:
        raise RuntimeError(f"{name}: the official loop summarised {state['calls']} steps; {rounds + 1} expected")
    return times


# -- the record -----------------------------------------------------------------------------------------------------
def _cell(v: list[float]) -> str:
    return f"{statistics.median(v):.3f} ({min(v):.3f}–{max(v):.3f})"


def render(rows: dict[str, dict[str, list[float]]], *, device: str, day: str, command: str, arch: str, n: int,
           rounds: int, engine: dict | None, commits: dict[str, str], skipped: list[str], machine: str) -> str:
    eng = (f"the same step with `bench perf`'s defaults for this device: {engine['precision']}, compile "
           f"{engine['compile']}, channels_last {engine['channels_last']}, fused SGD {engine['fused_sgd']}"
           if engine else "not timed (--no-engine)")
    lines = [f"# The suite's step beside the official loops — {device}, {day}", "",
             f"`{command}`", "",
             f"torch {torch.__version__}, Python {sys.version.split()[0]}, {torch.get_num_threads()} threads. Model "
             f"{arch}, batch {n}, on the CPU. Seconds per mini-batch: median (min–max) over {rounds} interleaved "
             "steps of each side (one suite step of each kind between every two official steps, their order "
             "alternating; the official loop's first step, and the suite's warm-up / compile steps, untimed). "
             "Data loading is outside every clock.", "",
             "- **official**: the loop its certificate runs (`fidelity/<method>.py`, the same driver), in fp32; one "
             "step = what the row says.",
             "- **suite eager**: `train_step` (+ the engine's EMA update where the method has one), fp32, no compile, "
             "the for-loop SGD: `bench run`'s defaults on a CPU, what the CPU tier trains with.",
             f"- **suite engine**: {eng}.", "", machine, "",
             "| method | official s / step | suite eager fp32 s / step | suite engine s / step | eager / official | "
             "engine / official | steps | official step |", "|---|---|---|---|---|---|---|---|"]
    for name, t in rows.items():
        o, e = statistics.median(t["official"]), statistics.median(t["eager"])
        g = t.get("engine")
        lines.append(f"| {name} | {_cell(t['official'])} | {_cell(t['eager'])} | {_cell(g) if g else '—'} | "
                     f"{e / o:.2f}× | {f'{statistics.median(g) / o:.2f}×' if g else '—'} | {len(t['official'])} | "
                     f"{PLANS[name].timed} |")
    lines += ["", "Official code: " + ", ".join(f"{CHECKOUTS[k]}@{c[:12]}" for k, c in commits.items()) + "."]
    if skipped:
        lines += ["", "Not timed (no checkout given): " + ", ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def _revision() -> str:
    """The suite's commit, and whether the code the suite's side runs (bench/, methods/) differs from it."""
    import subprocess

    rev = common.commit_of(common.ROOT)[:12]
    dirty = subprocess.run(["git", "-C", str(common.ROOT), "status", "--porcelain", "--", "bench", "methods"],
                           capture_output=True, text=True).stdout.strip()
    return rev + (" with uncommitted changes in bench/ or methods/" if dirty else "")


def main(argv: list[str] | None = None) -> Path:
    from bench.evaluate import device_name
    from bench.perf import device_slug, engine_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, repo in CHECKOUTS.items():
        ap.add_argument("--" + k.replace("_", "-"), metavar="DIR", help=f"a checkout of github.com/{repo}")
    ap.add_argument("--methods", help=f"comma-separated, among {', '.join(PLANS)} (default: every one whose "
                                      "checkout is given)")
    ap.add_argument("--arch", default="smallvgg")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="timed steps of each side (interleaved)")
    ap.add_argument("--no-engine", action="store_true", help="time the suite eager only (no compile)")
    ap.add_argument("--out", default="results/perf")
    ap.add_argument("--note", default="", help="a sentence on the machine's state, for the record")
    a = ap.parse_args(argv)
    given = {k: getattr(a, k) for k in CHECKOUTS if getattr(a, k)}
    names = a.methods.split(",") if a.methods else [m for m, p in PLANS.items() if p.checkout in given]
    unknown = [m for m in names if m not in PLANS]
    missing = [m for m in names if m in PLANS and PLANS[m].checkout not in given]
    if unknown or missing or not names:
        raise SystemExit("fidelity.peers: " + (f"unknown methods {unknown}; " if unknown else "")
                         + (f"no checkout for {missing} (--{PLANS[missing[0]].checkout.replace('_', '-')})"
                            if missing else "no official checkout given")
                         + f"; options: {', '.join('--' + k.replace('_', '-') for k in CHECKOUTS)}")
    if a.rounds < 1:
        raise SystemExit("fidelity.peers: --rounds must be at least 1")
    engine = None if a.no_engine else engine_settings(torch.device("cpu"))
    torch.manual_seed(0)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = {}
    for name in names:
        print(f"{name}: {PLANS[name].timed}", flush=True)
        rows[name] = time_method(name, given[PLANS[name].checkout], arch=a.arch, n=a.batch, rounds=a.rounds,
                                 engine=engine, echo=lambda m: print(m, flush=True))
    dev = device_name("cpu")
    day = dt.date.today().isoformat()
    commits = {k: common.commit_of(given[k]) for k in CHECKOUTS if k in given and
               any(PLANS[m].checkout == k for m in names)}
    command = "python -m fidelity.peers " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    machine = (f"The suite: aft-bench@{_revision()}. The whole measurement took "
               f"{(time.perf_counter() - t0) / 60:.1f} min; the load average (1 min) was {load0:.1f} at its start and "
               f"{os.getloadavg()[0]:.1f} at its end, on {os.cpu_count()} logical CPUs. " + a.note).strip()
    text = render(rows, device=dev, day=day, command=command, arch=a.arch, n=a.batch, rounds=a.rounds,
                  engine=engine, commits=commits, skipped=[m for m in PLANS if m not in names], machine=machine)
    out = Path(a.out) / f"peers-{device_slug(dev)}-{day}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
