"""Every certified method's update against what its authors' code produced (issue 23; docs/methods.md): the golden
fixtures in tests/golden/fidelity/ were written by ``python -m fidelity.<method> --official <checkout>
--write-golden`` from the official repository at the commit each names; here the suite's ``Method`` runs the same
iterations (float64, same weights, batches and random draws) and must match to 1e-10 relative."""
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fidelity import common  # noqa: E402

FIXTURES = sorted(p.stem for p in common.GOLDEN.glob("*.json"))


def test_there_are_certificates():
    assert {"trades", "fgsm-rs", "free-at", "vaft", "afkd", "afkd@teacher-train", "arrest",
            "arrest@teacher-train"} <= set(FIXTURES)


@pytest.mark.parametrize("method", FIXTURES)
def test_the_suites_update_is_the_official_codes(method):
    golden = common.read_golden(method)
    assert re.fullmatch(r"[0-9a-f]{40}", golden["official"]["commit"]), "a fixture names the official commit"
    runner = importlib.import_module(golden["setting"].get("runner") or f"fidelity.{method.replace('-', '_')}")
    ours = runner.suite_run(golden["setting"])
    assert len(ours) == len(golden["iterations"]) >= 1
    assert golden["iterations"][-1]["delta_norm"] > 0  # (a first step at lr 0, as CyclicLR's, moves only BN stats)
    for i, (o, t) in enumerate(zip(ours, golden["iterations"]), 1):
        diff = common.compare(o, t)
        worst = max(diff, key=diff.get)
        assert diff[worst] <= common.EQUAL, f"{method} iteration {i}: {worst} differs by {diff[worst]:.3e} relative"


def test_a_changed_loss_is_caught():
    """The comparison is sharp: TRADES with β = 5.99 instead of 6 is far outside the tolerance."""
    golden = common.read_golden("trades")
    runner = importlib.import_module("fidelity.trades")
    ours = runner.suite_run({**golden["setting"], "beta": 5.99})
    assert max(common.compare(ours[-1], golden["iterations"][-1]).values()) > 1e-4


def test_wongs_cyclic_momentum_is_part_of_the_update():
    """torch's CyclicLR cycles SGD's momentum 0.9 → 0.8 → 0.9 by default, and Wong et al.'s loops use it: FGSM-RS with
    the momentum held at 0.9 is not the official update."""
    golden = common.read_golden("fgsm-rs")
    runner = importlib.import_module("fidelity.fgsm_rs")
    ours = runner.suite_run({**golden["setting"], "schedule_momentum": [0.9, 0.9]})
    assert max(common.compare(ours[-1], golden["iterations"][-1]).values()) > 1e-3


def test_cyclic_momentum_follows_the_lr():
    from bench.schedules import check_schedule, cyclic_momentum
    from bench.errors import BenchError

    sched = {"name": "cyclic", "peak": 0.5, "momentum": [0.8, 0.9]}
    assert cyclic_momentum(sched, 0.0, 0.2) == pytest.approx(0.9)
    assert cyclic_momentum(sched, 0.2, 0.2) == pytest.approx(0.8)
    assert cyclic_momentum(sched, 0.1, 0.2) == pytest.approx(0.85)
    assert cyclic_momentum({"name": "cyclic"}, 0.1, 0.2) is None
    check_schedule(sched)
    with pytest.raises(BenchError, match=r"momentum = \[0.9, 0.8\]; accepted"):
        check_schedule({**sched, "momentum": [0.9, 0.8]})


@pytest.mark.parametrize("variant", ["afkd", "arrest@teacher-train"])
def test_the_teacher_mode_is_part_of_the_update(variant):
    """ARREST.py's teacher as written (train-mode BN) and with model_nat.eval() give different updates, and the suite's
    teacher_bn selects which: the other mode is far outside the tolerance."""
    golden = common.read_golden(variant)
    runner = importlib.import_module("fidelity.arrest")
    other = {**golden["setting"], "teacher_bn": "train" if golden["setting"]["teacher_bn"] == "eval" else "eval"}
    ours = runner.suite_run(other)
    assert max(common.compare(ours[-1], golden["iterations"][-1]).values()) > 1e-2


def test_teacher_bn_is_checked_and_leaves_recorded_run_hashes_alone():
    from bench.config import RunConfig
    from bench.errors import BenchError
    from methods import get_method

    with pytest.raises(BenchError, match=r"afkd.teacher_bn = 'batch'; accepted: eval .* or train"):
        get_method("afkd").check_hp({**get_method("afkd").resolved_defaults(), "teacher_bn": "batch"})
    hp = get_method("arrest").resolved_defaults()
    cfg = RunConfig(method="arrest", dataset="cifar10", arch="smallcnn", seed=0, hp=dict(hp))
    without = {k: v for k, v in hp.items() if k != "teacher_bn"}
    old = RunConfig(method="arrest", dataset="cifar10", arch="smallcnn", seed=0, hp=without)
    assert cfg.run_hash == old.run_hash  # teacher_bn = eval: the hash of runs recorded before the option
    cfg.hp["teacher_bn"] = "train"
    assert cfg.run_hash != old.run_hash
