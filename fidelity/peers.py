"""Speed beside the peers (issue 23): each official training loop against the suite's step for the same method, model
and batch, side by side in one process on this machine, fp32, median over interleaved rounds.

    python -m fidelity.peers --trades /path/to/TRADES --fast-adversarial /path/to/fast_adversarial \\
        [--arch smallvgg] [--batch 128] [--rounds 5] [--out results/perf]

The suite runs with ``bench run``'s defaults (eager, fp32, no compile); its time per step is one ``train_step``.
The official TRADES step is ``trades_loss`` + backward + SGD step (``train_trades_cifar10.py``); Wong et al.'s
loops (``train_fgsm.py``, ``train_free.py``, one mini-batch = m replays) are their ``main()`` as written
(:mod:`fidelity.fast_adversarial`), timed per mini-batch between the batches their loader hands out. Only the
measured figures are written (``peers-<device>-<date>.md``), never the peers' code.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import statistics
import time
from pathlib import Path

import torch

from . import common


def _model(arch: str) -> torch.nn.Module:
    return common.model(0, arch).float()


def _batches(k: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.float() if t.is_floating_point() else t for t in common.batch(100 + i, n)) for i in range(k)]


def _suite_step(name: str, arch: str, n: int, hp_over: dict):
    from bench.loader import Batch
    from methods import get_method

    cls = get_method(name)
    hp = cls.resolved_defaults()
    hp.update(hp_over)
    hp["batch_size"] = n
    info = {"n": n, "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    m = cls(hp, _model(arch), None, steps_per_epoch=1000, info=info)
    m.set_lr(hp["lr"])
    idx = torch.arange(n)

    def step(b, i):
        m.train_step(Batch(b[0], b[1], idx), 0, i)
    return step


def _trades_official(checkout: str, arch: str):
    mod = common.load_official(checkout, "trades.py", "official_trades")
    net = _model(arch)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)

    def step(b, i):
        net.train()
        opt.zero_grad()
        loss = mod.trades_loss(model=net, x_natural=b[0], y=b[1], optimizer=opt, step_size=0.007, epsilon=8 / 255,
                               perturb_steps=10, beta=6.0)
        loss.backward()
        opt.step()
    return step


def _wong_times(checkout: str, script: str, arch: str, batches, extra: list[str]) -> list[float]:
    """Seconds per mini-batch of Wong et al.'s loop as written (the first mini-batch is its warm-up)."""
    from .fast_adversarial import _Batches, run_main

    stamps: list[float] = []
    real_iter = _Batches.__iter__

    def timed_iter(self):
        for b in real_iter(self):
            stamps.append(time.perf_counter())
            yield b
        stamps.append(time.perf_counter())

    _Batches.__iter__ = timed_iter
    real_summary = common.summary
    common.summary = lambda a, b: {}  # (no summaries inside the timed loop)
    try:
        m = _model(arch)
        run_main(checkout, script, ["--batch-size", str(batches[0][0].shape[0]), "--epochs", "1", *extra],
                 m, copy.deepcopy(m), batches, [])
    finally:
        _Batches.__iter__, common.summary = real_iter, real_summary
    return [b - a for a, b in zip(stamps, stamps[1:])][1:]


def _timed(step, batches) -> list[float]:
    out = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        step(b, i)
        out.append(time.perf_counter() - t0)
    return out[1:]  # the first is the warm-up


def main() -> None:
    from bench.evaluate import device_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trades", required=True, help="a checkout of github.com/yaodongyu/TRADES")
    ap.add_argument("--fast-adversarial", required=True, help="a checkout of github.com/locuslab/fast_adversarial")
    ap.add_argument("--arch", default="smallvgg")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (official, suite), each of 3 steps")
    ap.add_argument("--out", default="results/perf")
    a = ap.parse_args()
    torch.manual_seed(0)
    fa = a.fast_adversarial
    rows = []
    plans = [
        ("trades", lambda bs: _timed(_trades_official(a.trades, a.arch), bs), {"lr": 0.1}),
        ("fgsm-rs", lambda bs: _wong_times(fa, "train_fgsm.py", a.arch, bs, ["--lr-max", "0.2"]), {}),
        ("free-at", lambda bs: _wong_times(fa, "train_free.py", a.arch, bs, ["--lr-max", "0.04",
                                                                            "--minibatch-replays", "8"]), {}),
    ]
    for name, official, over in plans:
        theirs, ours = [], []
        for r in range(a.rounds):  # interleaved: official, suite, official, suite, ...
            bs = _batches(4, a.batch)
            theirs += official(bs)
            ours += _timed(_suite_step(name, a.arch, a.batch, over), bs)
            print(f"{name} round {r + 1}/{a.rounds}: official {statistics.median(theirs):.3f} s, suite "
                  f"{statistics.median(ours):.3f} s per mini-batch", flush=True)
        rows.append((name, statistics.median(theirs), statistics.median(ours), len(theirs)))
    dev = device_name("cpu")
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    day = dt.date.today().isoformat()
    out = Path(a.out) / f"peers-{slug}-{day}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# The suite's step beside the official loops — {dev}, {day}", "",
             f"`python -m fidelity.peers --trades <checkout> --fast-adversarial <checkout> --arch {a.arch} "
             f"--batch {a.batch} --rounds {a.rounds}`; torch {torch.__version__}, {torch.get_num_threads()} threads. "
             f"Model {a.arch}, batch {a.batch}, fp32 on the CPU; the suite with `bench run`'s defaults (eager, no "
             "compile). Seconds per mini-batch: median over the rounds' steps (each round: 3 timed steps after one "
             "untimed, official and suite interleaved).", "",
             "Official code: yaodongyu/TRADES@" + common.commit_of(a.trades)[:12] + " (`trades_loss`), "
             "locuslab/fast_adversarial@" + common.commit_of(fa)[:12] + " (`train_fgsm.py`, `train_free.py` "
             "with m = 8, `main()` as written).", "",
             "| method | official s / mini-batch | suite s / mini-batch | suite / official | steps timed |",
             "|---|---|---|---|---|"]
    for name, t, o, k in rows:
        lines.append(f"| {name} | {t:.3f} | {o:.3f} | {o / t:.2f}× | {k} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
