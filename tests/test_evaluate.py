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
