"""What the AFD paper's whole grid costs: every run behind Tables 1-5 (3 seeds), in GPU-hours, and its wall-clock
time on 1, 8 and 64 GPUs. An **estimate**, stated as one (``docs/scaling.md`` prints its output):

* per-epoch seconds of ResNet-18 on CIFAR-10 from the paper's Table 5 (:data:`bench.paper.TABLE5`, its GPU is not
  stated; the † rows are the ATAS paper's figures on its own GPU), or from targets given by the caller;
* scaled to other architectures by forward FLOPs (counted here with ``torch.utils.flop_counter`` on the suite's
  own models) and to other datasets by images × pixels (Tiny-ImageNet: 2 × the images, 4 × the pixels of CIFAR);
* epochs: the suite's method defaults (the paper's recipes); the natural and PGD-AT base runs that fine-tuning
  methods and RiFT start from are part of the grid, once per dataset × architecture × seed;
* wall clock on G GPUs: one run per GPU, list scheduling (longest remaining chain first) that respects the base →
  fine-tune dependencies; optionally each run of the critical path on ``k`` GPUs with DDP at an assumed efficiency.

``python -m bench.scaling`` prints the tables.
"""
from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass, field

# which methods each table needs, on which (dataset, arch) pairs (the paper's rows; † rows only where it has numbers)
DATASETS = ("cifar10", "cifar100", "tinyimagenet")
IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "tinyimagenet": 100_000}
PIXELS = {"cifar10": 32 * 32, "cifar100": 32 * 32, "tinyimagenet": 64 * 64}
HOLDOUT = " (holdout)"  # a base run trained without its fine-tuning method's held-out slice: "pgd-at (holdout)"


def base_of(method: str) -> str | None:
    """The base run ``method`` waits for, as the grid names it: the model its ``starts_from`` names (natural or
    PGD-AT), ``"pgd-at (holdout)"`` where the base holds out the method's slice (``base_holdout``, RiFT); None for a
    method trained from scratch."""
    from methods import get_method

    from .config import STARTING_METHOD

    cls = get_method(method)
    if cls.starts_from == "scratch":
        return None
    return STARTING_METHOD[cls.starts_from] + (HOLDOUT if cls.base_holdout else "")


def timed_as(method: str, per_epoch: dict[str, float]) -> str:
    """The method whose seconds per epoch stand for ``method``'s: its own where given, else those of the nearest
    registered method it is a subclass of, whose step it takes (vaft+d: afd's, vaft+a: afkd's; Table 5 times
    neither). A held-out base is timed as its method."""
    from methods import METHODS, get_method

    method = method.removesuffix(HOLDOUT)
    if method in per_epoch:
        return method
    for cls in get_method(method).__mro__[1:]:
        name = getattr(cls, "name", "")
        if name in per_epoch and METHODS.get(name) is cls:
            return name
    raise KeyError(f"no seconds per epoch for {method!r} nor for a method it subclasses")


def paper_cells() -> list[tuple[str, str, str]]:
    """(method, dataset, arch) of every cell of Tables 1-4 the suite must fill (Table 5 times Table 1's runs)."""
    from .paper import TABLE1, TABLE2, TABLE3, TABLE4

    cells = {(r.method, r.dataset, r.arch) for r in (*TABLE1, *TABLE2) if r.clean is not None}
    cells |= {(r.method, "cifar10", "resnet18") for r in TABLE3}
    cells |= {("afd", r.dataset, r.arch) for r in TABLE4}
    return sorted(cells)


@functools.lru_cache(maxsize=None)
def forward_flops(arch: str, pixels: int = 32 * 32, num_classes: int = 10) -> float:
    """Forward FLOPs of one image (multiply-add = 2) of the suite's ``arch``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .models import create_model

    side = int(round(pixels ** 0.5))
    model = create_model(arch, num_classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    return float(counter.get_total_flops())


def scale(dataset: str, arch: str) -> float:
    """Compute of one epoch of (dataset, arch) relative to ResNet-18 on CIFAR-10."""
    return (IMAGES[dataset] / IMAGES["cifar10"]) * forward_flops(arch, PIXELS[dataset]) / forward_flops("resnet18")


@dataclass
class Job:
    name: str
    method: str
    dataset: str
    arch: str
    seed: int
    epochs: int
    seconds: float  # on one GPU
    after: list[str] = field(default_factory=list)


def paper_seconds_per_epoch() -> dict[str, float]:
    """ResNet-18 / CIFAR-10 seconds per epoch of each method from Table 5 (the † figure where it is the only one)."""
    from .paper import TABLE5

    out: dict[str, float] = {}
    for row in TABLE5:
        if row.time_one is not None and row.method not in out:
            out[row.method] = float(row.time_one)
    return out


def epochs_of(method: str) -> int:
    from methods import get_method

    return int(get_method(method).resolved_defaults()["epochs"])


def paper_grid(seeds: int = 3, per_epoch: dict[str, float] | None = None) -> list[Job]:
    """Every run of the grid, with its estimated seconds on one GPU, and the base runs it waits for."""
    per_epoch = dict(per_epoch or paper_seconds_per_epoch())
    jobs: dict[str, Job] = {}

    def add(method: str, dataset: str, arch: str, seed: int, after: list[str]) -> str:
        name = f"{dataset}/{arch}/{method}/s{seed}"
        if name not in jobs:
            ep = epochs_of(method.removesuffix(HOLDOUT))
            seconds = ep * per_epoch[timed_as(method, per_epoch)] * scale(dataset, arch)
            jobs[name] = Job(name, method, dataset, arch, seed, ep, seconds, after)
        return name

    for method, dataset, arch in paper_cells():
        base = base_of(method)
        for seed in range(seeds):
            after = [add(base, dataset, arch, seed, [])] if base else []
            add(method, dataset, arch, seed, after)
    return list(jobs.values())


def wall_clock(jobs: list[Job], gpus: int, ddp: int = 1, efficiency: float = 1.0) -> float:
    """Seconds until every job is done on ``gpus`` GPUs: each job on ``ddp`` GPUs at ``efficiency`` (its time
    ÷ (ddp · efficiency)), longest remaining chain first, a job only after the jobs it waits for."""
    by = {j.name: j for j in jobs}
    dur = {j.name: j.seconds / (ddp * efficiency) for j in jobs}
    children: dict[str, list[str]] = {n: [] for n in by}
    for j in jobs:
        for a in j.after:
            children[a].append(j.name)

    @functools.lru_cache(maxsize=None)
    def chain(n: str) -> float:
        return dur[n] + max((chain(c) for c in children[n]), default=0.0)

    slots = max(1, gpus // ddp)
    free = [0.0] * slots  # when each slot is free
    heapq.heapify(free)
    done: dict[str, float] = {}
    waiting = {n: len(by[n].after) for n in by}
    ready = [(-chain(n), n, 0.0) for n in by if waiting[n] == 0]  # (priority, name, earliest start)
    heapq.heapify(ready)
    while ready:
        _, n, earliest = heapq.heappop(ready)
        t = max(heapq.heappop(free), earliest)
        done[n] = t + dur[n]
        heapq.heappush(free, done[n])
        for c in children[n]:
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, (-chain(c), c, max(done[a] for a in by[c].after)))
    return max(done.values(), default=0.0)


def critical_path(jobs: list[Job]) -> float:
    """The longest base → fine-tune chain (seconds): the wall clock with unlimited GPUs, one per run."""
    return wall_clock(jobs, gpus=10 ** 6)


# the pace the suite's engine aims at on an H100 (seconds per ResNet-18 / CIFAR-10 epoch, batch 128): NOT measured
TARGETS = {"natural": 1.5, "pgd-at": 6.0, "afd": 8.0}


def target_seconds_per_epoch() -> dict[str, float]:
    """A hypothetical pace: the targets where there are some, every other method at its paper time × the PGD-AT
    target / paper ratio."""
    paper = paper_seconds_per_epoch()
    ratio = TARGETS["pgd-at"] / paper["pgd-at"]
    return {m: TARGETS.get(m, t * ratio) for m, t in paper.items()}


DDP_GPUS, DDP_EFFICIENCY = 8, 0.7  # assumed, not measured (docs/scaling.md says why)


def report(seeds: int = 3) -> str:
    """The Markdown tables of docs/scaling.md."""
    jobs = paper_grid(seeds)
    bases = {b for j in jobs for b in j.after}
    lines = [f"Runs: {len(jobs)} ({len([j for j in jobs if j.name in bases])} of them "
             f"base runs), {seeds} seeds; {sum(j.epochs for j in jobs)} epochs in all.", "",
             "| pace | GPU-hours | wall clock, 1 GPU | 8 GPUs | 64 GPUs | 64 GPUs, WRN-34-10 Tiny-ImageNet runs on "
             f"{DDP_GPUS}-GPU DDP |",
             "|---|---|---|---|---|---|"]
    for label, per_epoch in (("paper (Table 5, GPU not stated)", None),
                             ("H100 targets (not measured)", target_seconds_per_epoch())):
        js = paper_grid(seeds, per_epoch)
        total = sum(j.seconds for j in js)
        w1, w8, w64 = (wall_clock(js, g) for g in (1, 8, 64))
        ddp, pools = _long_runs_on_ddp(js, 64)
        lines.append(f"| {label} | {total / 3600:.0f} | {w1 / 3600:.0f} h | {w8 / 3600:.1f} h | {w64 / 3600:.1f} h | "
                     f"{ddp / 3600:.1f} h ({pools}) |")
    total = sum(j.seconds for j in jobs)
    lines += ["", "| dataset / arch (paper pace) | runs | GPU-hours | share | longest run |", "|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[Job]] = {}
    for j in jobs:
        groups.setdefault((j.dataset, j.arch), []).append(j)
    for (d, a), js in sorted(groups.items(), key=lambda kv: -sum(j.seconds for j in kv[1])):
        s = sum(j.seconds for j in js)
        longest = max(js, key=lambda j: j.seconds)
        lines.append(f"| {d} / {a} | {len(js)} | {s / 3600:.0f} | {100 * s / total:.0f} % | {longest.method} "
                     f"{longest.seconds / 3600:.1f} h |")
    lines += ["", f"Critical path at paper pace (one GPU per run, unlimited GPUs): {critical_path(jobs) / 3600:.1f} h.",
              "", "FLOPs per image (forward, counted on the suite's models): " + ", ".join(
                  f"{a} {forward_flops(a) / 1e9:.2f} G" for a in ("resnet18", "resnet50", "wrn-34-10"))
              + f"; resnet18 at 64×64 {forward_flops('resnet18', 64 * 64) / 1e9:.2f} G."]
    return "\n".join(lines)


def _long_runs_on_ddp(jobs: list[Job], gpus: int) -> tuple[float, str]:
    """Wall clock on ``gpus`` GPUs when the WRN-34-10 Tiny-ImageNet runs (the longest chains, most of the work) each
    run on :data:`DDP_GPUS` GPUs at :data:`DDP_EFFICIENCY`: two pools sized by their share of the work."""
    long_jobs = [j for j in jobs if j.dataset == "tinyimagenet" and j.arch == "wrn-34-10"]
    rest = [j for j in jobs if j not in long_jobs]
    share = sum(j.seconds for j in long_jobs) / sum(j.seconds for j in jobs)
    g_long = min(gpus - 1, max(DDP_GPUS, int(round(gpus * share / DDP_GPUS)) * DDP_GPUS))
    wall = max(wall_clock(long_jobs, g_long, DDP_GPUS, DDP_EFFICIENCY), wall_clock(rest, gpus - g_long))
    return wall, f"{g_long // DDP_GPUS} groups of {DDP_GPUS} + {gpus - g_long} single GPUs"


if __name__ == "__main__":  # pragma: no cover
    print(report())
