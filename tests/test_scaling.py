"""bench.scaling: the paper's grid is every cell of Tables 1-4 × 3 seeds with its base runs; the wall-clock model
respects dependencies and capacity; docs/scaling.md prints exactly what the model says."""
from pathlib import Path

from bench import scaling
from bench.paper import TABLE1, TABLE2
from bench.scaling import Job, paper_grid, wall_clock
from methods import METHODS

ROOT = Path(__file__).resolve().parent.parent


def test_wall_clock_respects_dependencies_and_capacity():
    jobs = [Job("base", "natural", "d", "a", 0, 1, 10.0), Job("ft1", "afd", "d", "a", 0, 1, 5.0, ["base"]),
            Job("ft2", "vaft", "d", "a", 0, 1, 5.0, ["base"]), Job("solo", "pgd-at", "d", "a", 0, 1, 12.0)]
    assert wall_clock(jobs, 1) == 32.0  # one GPU: the sum
    assert wall_clock(jobs, 2) == 17.0  # base [0, 10] → ft1 [10, 15]; solo [0, 12] → ft2 [12, 17]
    assert wall_clock(jobs, 100) == 15.0  # the critical path base → ft
    assert wall_clock(jobs, 4, ddp=2, efficiency=1.0) == 8.5  # two 2-GPU slots, every job at half its time
    assert scaling.critical_path(jobs) == 15.0


def test_the_paper_grid():
    jobs = paper_grid(seeds=3)
    names = {j.name for j in jobs}
    assert len(names) == len(jobs)
    for r in (*TABLE1, *TABLE2):
        if r.clean is not None:
            assert all(f"{r.dataset}/{r.arch}/{r.method}/s{s}" in names for s in range(3)), (r.method, r.dataset)
    for j in jobs:  # every fine-tuning run waits for its base, of the same dataset, architecture and seed
        if j.after:
            (base,) = j.after
            assert base == f"{j.dataset}/{j.arch}/{scaling.base_of(j.method)}/s{j.seed}" and base in names
    # the bases follow the methods' starts_from (RiFT's PGD-AT base holds out its slice); nothing else waits
    fine_tuning = {m for m in METHODS.names() if METHODS.get(m).starts_from != "scratch"}
    assert {j.method for j in jobs if j.after} == fine_tuning & {j.method for j in jobs}
    assert scaling.base_of("rift") == "pgd-at (holdout)" and scaling.base_of("afd") == "natural"
    assert {scaling.base_of(m) for m in METHODS.names() if METHODS.get(m).starts_from == "scratch"} == {None}
    afd = {(j.dataset, j.arch) for j in jobs if j.method == "afd"}
    assert ("cifar10", "resnet50") in afd and ("tinyimagenet", "wrn-34-10") in afd  # Table 4's RN50, Table 2
    by = {j.name: j for j in jobs}
    # the paper's own ResNet-18 / CIFAR-10 times come back for its own setting: AFD 20 × 46 s
    assert by["cifar10/resnet18/afd/s0"].seconds == 20 * 46
    assert abs(scaling.scale("tinyimagenet", "resnet18") - 8.0) < 0.1  # 2 × images, 4 × pixels
    # the ablations Table 5 does not time take the step of the method they subclass
    per = scaling.paper_seconds_per_epoch()
    assert (scaling.timed_as("vaft+d", per), scaling.timed_as("vaft+a", per)) == ("afd", "afkd")
    assert scaling.timed_as("pgd-at (holdout)", per) == "pgd-at"
    assert by["cifar10/resnet18/vaft+d/s0"].seconds == 20 * 46


def test_docs_print_the_model():
    doc = (ROOT / "docs" / "scaling.md").read_text()
    block = doc.split("<!-- scaling-report:start -->\n")[1].split("\n<!-- scaling-report:end -->")[0]
    assert block == scaling.report(), "docs/scaling.md is stale: regenerate with python -m bench.scaling"
