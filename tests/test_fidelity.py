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
            "arrest@teacher-train", "pgd-at", "rift", "rift@mrc", "rift@interp", "fgsm-ga",
            "fgsm-ga@g1-half", "fgsm-ga@g1-zero", "atas", "atas@imagenet-normalize",
            "afd", "afd@sequential", "vaft+d", "vaft+a"} <= set(FIXTURES)


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


def test_entries_are_compared_in_float64():
    """A fixture's entries are float64 numbers: a difference in the 16th digit is ~1e-16 relative, not rounded to
    float32's ulp (≈ 6e-8, which a 1e-10 tolerance would report as a difference) or to nothing."""
    e = [0.1 + k * 1e-3 for k in range(8)]
    row = {"group_norms": {}, "entries": e}
    nudged = {"group_norms": {}, "entries": [e[0] * (1 + 2e-16), *e[1:]]}
    assert common.compare(nudged, row)["entries"] < 1e-15
    far = {"group_norms": {}, "entries": [e[0] * (1 + 1e-9), *e[1:]]}
    assert 1e-11 < common.compare(far, row)["entries"] < 1e-9


def test_rices_conventions_are_part_of_pgd_ats_update():
    """Rice et al.'s train_cifar.py attacks in train mode from a start clipped to [0, 1]: the suite's defaults (eval
    mode, unclipped start, the TRADES / AFD convention) are far from its update."""
    golden = common.read_golden("pgd-at")
    runner = importlib.import_module("fidelity.pgd_at")
    ours = runner.suite_run({**golden["setting"], "attack_bn": "eval", "clip_start": False})
    assert max(common.compare(ours[-1], golden["iterations"][-1]).values()) > 1e-1


def test_pgd_at_attack_bn_and_clip_start_are_checked_and_leave_recorded_run_hashes_alone():
    from bench.config import RunConfig
    from bench.errors import BenchError
    from methods import get_method

    cls = get_method("pgd-at")
    with pytest.raises(BenchError, match=r"pgd-at.attack_bn = 'keep'; accepted: eval .* or train"):
        cls.check_hp({**cls.resolved_defaults(), "attack_bn": "keep"})
    hp = cls.resolved_defaults()
    cfg = RunConfig(method="pgd-at", dataset="cifar10", arch="smallcnn", seed=0, hp=dict(hp))
    old = RunConfig(method="pgd-at", dataset="cifar10", arch="smallcnn", seed=0,
                    hp={k: v for k, v in hp.items() if k not in ("attack_bn", "clip_start")})
    assert cfg.run_hash == old.run_hash  # the defaults: the hashes of runs recorded before the options
    for k, v in (("attack_bn", "train"), ("clip_start", True)):
        assert RunConfig(**{**cfg.to_dict(), "hp": {**hp, k: v}}).run_hash != old.run_hash
    assert get_method("vaft").resolved_defaults().keys().isdisjoint({"attack_bn", "clip_start"})


def test_the_official_rift_step_typo_changes_mrc():
    """RiFT's D_adv uses alpha=2/225 (a typo for 2/255); the certificate runs the suite at 2/225. At the suite's
    default 2/255, D_adv and the MRC values are far from the official ones."""
    golden = common.read_golden("rift@mrc")
    runner = importlib.import_module("fidelity.rift")
    ours = runner.suite_run({**golden["setting"], "attack_step": 2 / 255})
    assert common.compare(ours[0], golden["iterations"][0])["entries"] > 1e-2
    assert max(common.compare(o, t)["mrc"] for o, t in zip(ours[1:], golden["iterations"][1:])) > 1e-2
