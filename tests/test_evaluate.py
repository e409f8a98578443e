"""Evaluation: METHODS §15.1 settings, eval mode, determinism, the AutoAttack wrapper and its resume."""
import json

import pytest
import torch

from bench.data import Split
from bench.errors import BenchError
from bench.evaluate import ATTACKS, evaluate, feature_gap, parse_attacks


def _split(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split((torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8), torch.randint(0, 10, (n,), generator=g))


def test_protocol_constants_are_the_papers():
    assert ATTACKS["pgd20"].steps == 20 and ATTACKS["pgd20"].step == 0.003


def test_evaluation_runs_every_forward_in_eval_mode_and_is_deterministic(tiny_model):
    tiny_model.train()
    modes = []
    tiny_model.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    split = _split()
    a = evaluate(tiny_model, split, ["clean", "pgd20"], batch_size=10, progress=False)
    assert modes and not any(modes)
    b = evaluate(tiny_model, split, ["clean", "pgd20"], batch_size=10, progress=False)
    assert set(a["results"]) == {"clean", "pgd20", "worst"}
    for k in a["results"]:
        assert a["results"][k]["correct"] == b["results"][k]["correct"]
    meta = a["meta"]
    assert meta["n"] == 24 and meta["dtype"] == "float32" and "torch" in meta["versions"] and meta["device"]
    assert a["results"]["pgd20"]["correct"] <= a["results"]["clean"]["correct"]
    assert a["results"]["worst"]["correct"] <= a["results"]["pgd20"]["correct"]


def test_first_n_and_accuracy_units(tiny_model):
    r = evaluate(tiny_model, _split(30), ["clean"], n=12, progress=False)["results"]["clean"]
    assert r["n"] == 12 and r["acc"] == pytest.approx(100.0 * r["correct"] / 12)


def test_parse_attacks():
    assert parse_attacks("clean, PGD20,aa,autoattack") == ["clean", "pgd20", "aa"]
    with pytest.raises(BenchError, match="unknown attack 'cw'.*accepted: clean, pgd20, aa"):
        parse_attacks("clean,cw")


def test_autoattack_wrapper_on_a_tiny_model_and_its_resume(tiny_model, tmp_path, monkeypatch):
    split = _split(12)
    tiny_model.eval()
    rec = evaluate(tiny_model, split, ["clean", "aa"], batch_size=12, state_dir=tmp_path, progress=False)
    aa = rec["results"]["aa"]
    assert aa["n"] == 12 and aa["version"] == "standard"
    assert aa["correct"] <= rec["results"]["clean"]["correct"]
    chunks = list(tmp_path.glob("aa-*.json"))
    assert len(chunks) == 1 and len(json.loads(chunks[0].read_text())["robust"]) == 12

    import pyautoattack

    def refuse(*a, **k):
        raise AssertionError("AutoAttack ran again although its result was saved")

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", refuse)
    again = evaluate(tiny_model, split, ["aa"], batch_size=12, state_dir=tmp_path, progress=False)
    assert again["results"]["aa"]["correct"] == aa["correct"]
    # other weights: the saved chunk does not apply and the attack runs
    with torch.no_grad():
        tiny_model.fc.bias.add_(1.0)
    with pytest.raises(AssertionError, match="ran again"):
        evaluate(tiny_model, split, ["aa"], batch_size=12, state_dir=tmp_path, progress=False)


def test_autoattack_refuses_a_model_in_train_mode(tiny_model):
    from bench.attacks import autoattack

    tiny_model.train()
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="eval mode"):
        autoattack(tiny_model, x, y, eps=8 / 255)


def test_feature_gap_is_zero_without_budget_and_positive_with_it(tiny_model):
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    tiny_model.train()
    assert feature_gap(tiny_model, tiny_model.features, x, y, eps=0.0) == 0.0
    assert feature_gap(tiny_model, tiny_model.features, x, y, eps=8 / 255) > 0.0
    assert all(m.training for m in tiny_model.modules())  # the probe restores the mode


# ---------------------------------------------------------------------------------------------------------------
# numbers that cannot lie


def test_points_round_trip():
    from bench.evaluate import decode_points, encode_points

    c = torch.rand(1001) < 0.3
    assert torch.equal(decode_points(encode_points(c), 1001), c)


def test_a_sound_model_passes_every_check(tiny_model):
    rec = evaluate(tiny_model, _split(40), ["clean", "pgd20", "aa"], batch_size=40, progress=False, check_n=40)
    checks = rec["checks"]
    assert set(checks) == {"deterministic", "eps0_is_clean", "large_eps_breaks", "ordering", "autoattack_flags"}
    assert all(c["passed"] for c in checks.values()), checks
    assert rec["suspect"] == []
    counts = checks["ordering"]["correct"]
    assert counts["clean"] >= counts["pgd20"] >= counts["aa"]


class _Masked(torch.nn.Module):
    """Gradient masking: the input is quantised to 1/4 steps with a zero-gradient rounding, so PGD sees no signal."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x * 4).round() / 4)


class _Noisy(torch.nn.Module):
    """A randomised defence: fresh noise at every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.2 * torch.randn_like(x))


def test_gradient_masking_and_randomness_are_flagged_as_suspect(tiny_model):
    masked = evaluate(_Masked(tiny_model), _split(40), ["clean", "pgd20"], batch_size=40, progress=False, check_n=40)
    assert not masked["checks"]["large_eps_breaks"]["passed"] and "large_eps_breaks" in masked["suspect"]
    noisy = evaluate(_Noisy(tiny_model), _split(40), ["clean"], batch_size=40, progress=False, check_n=40)
    assert not noisy["checks"]["deterministic"]["passed"] and "deterministic" in noisy["suspect"]


def test_an_ordering_violation_is_suspect():
    from bench.evaluate import encode_points, finalize_checks

    def res(bits):
        t = torch.tensor(bits, dtype=torch.bool)
        return {"acc": 100.0 * float(t.float().mean()), "n": len(bits), "points": encode_points(t)}

    rec = finalize_checks({"results": {"clean": res([1, 1, 0, 0]), "pgd20": res([1, 1, 1, 0])}})
    assert rec["suspect"] == ["ordering"] and rec["checks"]["ordering"]["correct"] == {"clean": 2, "pgd20": 3}


# ---------------------------------------------------------------------------------------------------------------
# merging into a run's eval.json: one function for bench run and bench eval


def _result(bits, **extra):
    from bench.evaluate import encode_points

    t = torch.tensor(bits, dtype=torch.bool)
    return {"acc": 100.0 * float(t.float().mean()), "correct": int(t.sum()), "n": len(bits),
            "points": encode_points(t), **extra}


def _record(results, *, digest="d1", eps=8 / 255, checks=None, **meta):
    from bench.evaluate import finalize_checks

    rec = {"meta": {"n": 4, "seed": 0, "eps": eps, "device": "cpu (x)", "weights_sha256": digest, **meta},
           "results": dict(results), "checks": dict(checks or {})}
    return finalize_checks(rec)


def test_merge_eval_keeps_what_the_record_holds_and_adds_what_it_lacks():
    import copy

    from bench.evaluate import PROTOCOL, merge_eval

    model_checks = {"deterministic": {"passed": True}, "large_eps_breaks": {"passed": True, "acc": 0.0}}
    first = _record({"clean": _result([1, 1, 1, 0])}, checks=model_checks, device="gpu A")
    merged, added = merge_eval(None, first)
    assert added == ["clean"] and merged["results"] == first["results"] and merged["meta"]["protocol"] == PROTOCOL
    merged["heads"] = {"f1": {"clean": _result([1, 0, 0, 0])}}
    before = copy.deepcopy(merged)
    # a later evaluation re-measures clean (other numbers, a failed model check) and adds pgd20
    later = _record({"clean": _result([0, 0, 0, 0]), "pgd20": _result([1, 1, 0, 0]),
                     "worst": {"acc": 0.0, "n": 4, "over": ["clean", "pgd20"]}},
                    checks={"deterministic": {"passed": False}, "eps0_is_clean": {"passed": True}}, device="gpu B",
                    n=2)
    out, added = merge_eval(merged, later)
    assert merged == before  # (its input is left as it was)
    assert added == ["pgd20"]
    assert out["results"]["clean"] == first["results"]["clean"]  # what it had stands
    assert out["results"]["pgd20"] == later["results"]["pgd20"]
    assert "worst" not in out["results"]  # over a clean this record did not contribute
    assert out["checks"]["deterministic"] == {"passed": True}  # its model checks stand; missing ones join
    assert out["checks"]["eps0_is_clean"] == {"passed": True} and out["checks"]["large_eps_breaks"]["acc"] == 0.0
    assert out["checks"]["ordering"]["correct"] == {"clean": 3, "pgd20": 2} and out["suspect"] == []
    assert out["meta"]["device"] == "gpu B" and out["meta"]["n"] == 2 and out["meta"]["protocol"] == PROTOCOL
    assert out["heads"] == merged["heads"]  # keys it does not merge are kept
    # a record that adds nothing changes nothing
    same, added = merge_eval(out, _record({"clean": _result([0, 0, 0, 0])}, device="gpu C"))
    assert added == [] and same == out


def test_merge_eval_takes_a_worst_only_over_attacks_it_adds():
    from bench.evaluate import merge_eval

    base, _ = merge_eval(None, _record({"clean": _result([1, 1, 1, 1])}))
    rec = _record({"pgd20": _result([1, 1, 0, 0]), "aa": _result([1, 0, 0, 0], flags=[]),
                   "worst": {"acc": 25.0, "n": 4, "over": ["pgd20", "aa"]}})
    out, added = merge_eval(base, rec)
    assert added == ["pgd20", "aa"] and out["results"]["worst"]["over"] == ["pgd20", "aa"]
    assert out["checks"]["ordering"]["correct"] == {"clean": 4, "pgd20": 2, "aa": 1}
    assert out["checks"]["autoattack_flags"]["passed"]


def test_merge_eval_refuses_another_eps_and_other_weights():
    from bench.evaluate import eval_conflict, merge_eval

    base, _ = merge_eval(None, _record({"clean": _result([1, 1, 1, 1])}))
    at4 = _record({"pgd20": _result([1, 1, 0, 0])}, eps=4 / 255)
    assert "ε = 4/255" in eval_conflict(base, at4) and "ε = 4/255" in eval_conflict(None, at4)
    with pytest.raises(BenchError, match="cannot join eval.json: it was measured at ε = 4/255"):
        merge_eval(base, at4)
    other = _record({"pgd20": _result([1, 1, 0, 0])}, digest="d2")
    assert "other weights (digest d2)" in eval_conflict(base, other)
    with pytest.raises(BenchError, match="other weights"):
        merge_eval(base, other)
    assert eval_conflict({"results": {}, "meta": {"weights_sha256": "d1"}}, other) is None  # nothing measured yet


def test_merge_eval_of_a_head_fills_its_entry_once():
    from bench.evaluate import merge_eval

    base, _ = merge_eval(None, _record({"clean": _result([1, 1, 1, 1])}))
    head = _record({"clean": _result([1, 0, 0, 0]), "pgd20": _result([0, 0, 0, 0]),
                    "worst": {"acc": 0.0, "n": 4, "over": ["clean", "pgd20"]}}, digest="head weights")
    out, added = merge_eval(base, head, head="f2")
    assert added == ["clean", "pgd20"] and out["heads"]["f2"] == head["results"]
    assert {k: v for k, v in out.items() if k != "heads"} == base  # nothing else changes
    again, added = merge_eval(out, _record({"clean": _result([0, 0, 0, 0])}), head="f2")
    assert added == [] and again == out
