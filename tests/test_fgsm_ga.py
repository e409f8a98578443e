"""FGSM-GA's ``g1_saturated`` (docs/methods.md#fgsm-ga): the GA code takes g₁ through ``clamp(X + δ, 0, 1)`` at
δ = 0, whose gradient at the pixels where x is exactly 0 or 1 is a tie of a min or a max (half under current PyTorch,
zero under the torch 1.4.0 the authors pinned). The option reproduces either; the default (``full``, ∇ₓ at x) keeps
the recorded run hashes."""
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fidelity import common  # noqa: E402


def _grad_through_clamp(model, x, y):
    """∇_δ CE(f(max(min(x + δ, 1), 0)), y) at δ = 0, the clamp written as the GA code's ``utils.clamp`` writes it."""
    delta = torch.zeros_like(x, requires_grad=True)
    one, zero = torch.ones(1, dtype=x.dtype), torch.zeros(1, dtype=x.dtype)
    loss = F.cross_entropy(model(torch.max(torch.min(x + delta, one), zero)), y)
    return torch.autograd.grad(loss, delta)[0]


def test_half_and_zero_are_the_gradient_through_the_ga_codes_clamp():
    from bench.attacks import input_grad
    from fidelity.fgsm_ga import torch14_ties
    from methods.fgsm_ga import g1_at_saturated

    model = common.model(0, "smallcnn")
    model.eval()  # (the same statistics for every forward; the tie rule is the model's input's)
    x, y = common.batch(1, 4)
    saturated = (x == 0) | (x == 1)
    assert 0 < saturated.double().mean() < 1
    g, _ = input_grad(model, x, y)
    assert torch.equal(g1_at_saturated(g, x, "full"), g)
    half = g1_at_saturated(g, x, "half")
    assert torch.allclose(_grad_through_clamp(model, x, y), half, rtol=1e-12, atol=1e-18)  # current PyTorch
    with torch14_ties():
        zero_ = _grad_through_clamp(model, x, y)
    assert torch.allclose(zero_, g1_at_saturated(g, x, "zero"), rtol=1e-12, atol=1e-18)
    assert torch.equal(zero_[saturated], torch.zeros_like(zero_[saturated]))
    assert torch.equal(half[~saturated], g[~saturated]) and not torch.equal(half[saturated], g[saturated])


def test_g1_saturated_changes_the_update_only_on_saturated_images():
    """On images with no pixel at 0 or 1 the three readings are one update; on images with saturated pixels the
    default is far from the GA code under either PyTorch."""
    runner = importlib.import_module("fidelity.fgsm_ga")
    clipped = common.read_golden("fgsm-ga")
    for mode in ("half", "zero"):
        ours = runner.suite_run({**clipped["setting"], "g1_saturated": mode})
        assert max(common.compare(ours[-1], clipped["iterations"][-1]).values()) <= common.EQUAL
    for variant, far in (("fgsm-ga@g1-half", 1e-2), ("fgsm-ga@g1-zero", 1e-1)):
        golden = common.read_golden(variant)
        ours = runner.suite_run({**golden["setting"], "g1_saturated": "full"})
        assert max(common.compare(ours[-1], golden["iterations"][-1]).values()) > far


def test_g1_saturated_is_checked_and_leaves_recorded_run_hashes_alone():
    from bench.config import RunConfig
    from bench.errors import BenchError
    from methods import get_method

    cls = get_method("fgsm-ga")
    with pytest.raises(BenchError, match=r"fgsm-ga.g1_saturated = 'quarter'; accepted: full .* half .* zero"):
        cls.check_hp({**cls.resolved_defaults(), "g1_saturated": "quarter"})
    hp = cls.resolved_defaults()
    assert hp["g1_saturated"] == "full"
    cfg = RunConfig(method="fgsm-ga", dataset="cifar10", arch="smallcnn", seed=0, hp=dict(hp))
    old = RunConfig(method="fgsm-ga", dataset="cifar10", arch="smallcnn", seed=0,
                    hp={k: v for k, v in hp.items() if k != "g1_saturated"})
    assert cfg.run_hash == old.run_hash  # full: the hash of runs recorded before the option
    for mode in ("half", "zero"):
        assert RunConfig(**{**cfg.to_dict(), "hp": {**hp, "g1_saturated": mode}}).run_hash != old.run_hash
