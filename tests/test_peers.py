"""``fidelity.peers`` (issue 23, speed beside the peers): its machinery on a tiny setting, with a stand-in for an
official loop that does what the certificates' drivers do (float64 model and batches, one thread, float64 default
dtype, a random draw replaced, ``common.summary`` after every step). No official code is needed; with
``FIDELITY_OFFICIAL_DIR`` (a folder holding the checkouts, named as their repositories: TRADES, fast_adversarial,
robust_overfitting, understanding-fast-adv-training, ATAS, robustlearn, AFD) every plan also runs against its real
official loop, else those cases skip."""
import copy
import os
import re
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fidelity import common, peers  # noqa: E402

SLEEP = 0.05  # the stand-in official step's extra time: the clock must see it


def fake_official(events: list, seen: list):
    """A stand-in for a certificate's official run: ``(checkout, setting)``, as fidelity/trades.py's."""

    def run(checkout, s):
        real_rand = torch.rand
        with common.one_thread():
            m0 = common.model(s["seed"], s["arch"])
            net = copy.deepcopy(m0)
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            batches = [common.batch(b, s["n"]) for b in s["batch_seeds"][:s["iters"]]]
            torch.set_default_dtype(torch.float64)  # (fidelity/fgsm_ga.py does)

            def rand(*a, **k):  # (an official draw replaced: the suite's step must never see it)
                raise AssertionError("the suite's step ran with the official loop's torch.rand")

            torch.rand = rand
            try:
                for x, y in batches:
                    seen.append({"x": x.dtype, "param": next(net.parameters()).dtype, "threads":
                                 torch.get_num_threads(), "default": torch.get_default_dtype()})
                    loss = F.cross_entropy(net(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    time.sleep(SLEEP)
                    events.append("official")
                    common.summary(m0, net)
            finally:
                torch.rand = real_rand
                torch.set_default_dtype(torch.float32)
        return []

    return run


@pytest.fixture
def fake_plan(monkeypatch):
    """``pgd-at`` timed against the stand-in (attack of 2 steps: fast), its checkout option ``--trades``; the
    events: "official" after each official step, the suite side's name after each suite step."""
    events, seen = [], []
    plan = peers.Plan("trades", "a stand-in loop", fake_official(events, seen),
                      lambda: {"arch": "smallcnn", "seed": 0, "n": 16, "iters": 3, "batch_seeds": [1, 2, 3]},
                      {"attack_steps": 2})
    monkeypatch.setitem(peers.PLANS, "pgd-at", plan)
    real_suite_step = peers.suite_step

    def suite_step(name, plan, s, engine):
        step = real_suite_step(name, plan, s, engine)
        kind = "eager" if engine is None else "engine"

        def logged(i):
            step(i)
            events.append(kind)
        return logged

    monkeypatch.setattr(peers, "suite_step", suite_step)
    return events, seen


def test_official_steps_are_timed_in_fp32_with_the_suites_steps_between_them(fake_plan):
    from bench.perf import engine_settings

    events, seen = fake_plan
    threads = torch.get_num_threads()
    real = (common.model, common.batch, common.summary, common.one_thread, torch.rand, torch.set_default_dtype)
    engine = engine_settings(torch.device("cpu"), compile_=False, precision="bf16")  # (compile: too slow for CI)
    times = peers.time_method("pgd-at", "unused", arch="smallcnn", n=4, rounds=2, engine=engine, echo=lambda m: None)
    assert {k: len(v) for k, v in times.items()} == {"official": 2, "eager": 2, "engine": 2}
    assert min(times["official"]) >= SLEEP  # the clock holds the official step ...
    assert max(times["official"]) < 20 * SLEEP + 5  # ... and not the suite's steps (or its warm-ups)
    # the official loop's first step is its warm-up; then one step of each suite side in every gap, order alternating
    assert events == ["official", "eager", "engine", "official", "engine", "eager", "official"]
    assert len(seen) == 3 and all(v == {"x": torch.float32, "param": torch.float32, "threads": threads,
                                        "default": torch.float32} for v in seen)
    assert (common.model, common.batch, common.summary, common.one_thread, torch.rand,
            torch.set_default_dtype) == real
    assert common.model(0).fc.weight.dtype == torch.float64  # (the certificates' own model again)


def test_a_loop_that_does_not_summarise_every_step_is_refused(fake_plan, monkeypatch):
    plan = peers.PLANS["pgd-at"]
    monkeypatch.setitem(peers.PLANS, "pgd-at", peers.Plan(plan.checkout, plan.timed, lambda c, s: None,
                                                         plan.setting, plan.suite))
    with pytest.raises(RuntimeError, match="summarised 0 steps; 3 expected"):
        peers.time_method("pgd-at", "unused", arch="smallcnn", n=4, rounds=2, engine=None, echo=lambda m: None)


def test_the_record(fake_plan, tmp_path):
    out = peers.main(["--trades", str(tmp_path), "--methods", "pgd-at", "--arch", "smallcnn", "--batch", "4",
                      "--rounds", "3", "--no-engine", "--out", str(tmp_path / "perf"), "--note", "A test."])
    assert re.fullmatch(r"peers-cpu-[a-z0-9-]+-\d{4}-\d\d-\d\d\.md", out.name) and out.parent == tmp_path / "perf"
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| pgd-at |")).split(" | ")
    official, eager = (float(c.split()[0]) for c in row[1:3])
    assert official >= SLEEP and row[3] == "—" and row[5] == "—" and row[6] == "3"
    assert abs(float(row[4].rstrip("×")) - eager / official) <= 0.02 * eager / official + 0.01
    assert "python -m fidelity.peers --trades" in text and "--batch 4" in text and "A test." in text
    assert f"torch {torch.__version__}" in text and "load average" in text
    assert "Not timed (no checkout given): " in text and "trades" in text.split("Not timed")[1]


def test_ratios_are_those_of_the_medians():
    rows = {"trades": {"official": [1.0, 4.0, 2.0], "eager": [1.0, 3.0, 1.0], "engine": [0.5, 0.5, 9.0]}}
    text = peers.render(rows, device="cpu (x, 2 threads)", day="2026-01-01", command="c", arch="smallvgg", n=128,
                        rounds=3, engine={"precision": "bf16", "compile": True, "channels_last": False,
                                          "fused_sgd": False}, commits={"trades": "a" * 40}, skipped=[], machine="m")
    row = next(line for line in text.splitlines() if line.startswith("| trades |"))
    assert row.startswith("| trades | 2.000 (1.000–4.000) | 1.000 (1.000–3.000) | 0.500 (0.500–9.000) | 0.50× | "
                          "0.25× | 3 |")
    assert "yaodongyu/TRADES@aaaaaaaaaaaa" in text and "bf16, compile True" in text


def test_the_command_line_refuses_what_it_cannot_time(tmp_path):
    with pytest.raises(SystemExit, match="no official checkout given"):
        peers.main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"no checkout for \['trades'\] \(--trades\)"):
        peers.main(["--afd", str(tmp_path), "--methods", "afd,trades", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown methods"):
        peers.main(["--afd", str(tmp_path), "--methods", "afd,nope", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_every_certified_method_has_a_peer_timing():
    certified = {p.stem.split("@")[0] for p in common.GOLDEN.glob("*.json")}
    assert certified == set(peers.PLANS)


@pytest.mark.parametrize("name", list(peers.PLANS))
def test_each_plan_times_the_official_loops_work(name):
    """The suite's step does the work of the official step it is timed against: the same attack steps (replays)
    and ε, and every setting is resized to the arch, batch and number of steps asked for."""
    from methods import get_method

    plan = peers.PLANS[name]
    s = peers.sized(plan.setting(), "smallvgg", 128, 4)
    assert (s["arch"], s["n"], s["iters"]) == ("smallvgg", 128, 4)
    assert all(len(s[k]) == 4 for k in peers.SEED_KEYS if k in s)
    hp = {**get_method(name).resolved_defaults(), **plan.suite}
    assert set(plan.suite) <= set(get_method(name).resolved_defaults())
    if "steps" in s:
        assert hp["attack_steps"] == s["steps"]
    if "replays" in s:
        assert hp["replays"] == s["replays"]
    if "eps" in s:
        assert abs(hp["eps"] - s["eps"]) < 1e-8
    if "module" in s:
        assert hp["module"] == s["module"]


OFFICIAL_DIR = os.environ.get("FIDELITY_OFFICIAL_DIR")
FOLDERS = {"trades": "TRADES", "fast_adversarial": "fast_adversarial", "robust_overfitting": "robust_overfitting",
           "gradalign": "understanding-fast-adv-training", "atas": "ATAS", "rift": "robustlearn/RiFT", "afd": "AFD"}


@pytest.mark.parametrize("name", list(peers.PLANS))
def test_each_plan_against_its_official_loop(name):
    plan = peers.PLANS[name]
    checkout = Path(OFFICIAL_DIR or "/nonexistent") / FOLDERS[plan.checkout]
    if not checkout.is_dir():
        pytest.skip("no official checkout (FIDELITY_OFFICIAL_DIR)")
    times = peers.time_method(name, str(checkout), arch="smallcnn", n=4, rounds=2, engine=None, echo=lambda m: None)
    assert {k: len(v) for k, v in times.items()} == {"official": 2, "eager": 2}
    assert statistics.median(times["official"]) > 0
