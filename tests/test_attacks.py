"""Defining properties of the attacks: range and ε-ball, loss increase, BN mode honoured and restored,
parameter gradients untouched."""
import pytest
import torch
import torch.nn.functional as F

from bench.attacks import bn_mode, fgsm, pgd, project

EPS = 8 / 255


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _in_ball(x_adv, x, eps):
    return bool((x_adv >= 0).all() and (x_adv <= 1).all() and ((x_adv - x).abs() <= eps + 1e-6).all())


@pytest.mark.parametrize("restarts", [1, 3])
def test_pgd_stays_in_range_and_ball_and_raises_loss(tiny_model, restarts):
    x, y = _data()
    x[:4] = 0.0  # pixels at the border of [0, 1]
    x[4:8] = 1.0
    tiny_model.eval()
    x_adv = pgd(tiny_model, x, y, eps=EPS, step=2 / 255, steps=10, restarts=restarts)
    assert _in_ball(x_adv, x, EPS)
    with torch.no_grad():
        assert F.cross_entropy(tiny_model(x_adv), y) > F.cross_entropy(tiny_model(x), y)


def test_fgsm_stays_in_range_and_ball_and_raises_loss(tiny_model):
    x, y = _data()
    tiny_model.eval()
    for rs in (False, True):
        x_adv = fgsm(tiny_model, x, y, eps=EPS, step=1.25 * EPS, random_start=rs, bn="eval")
        assert _in_ball(x_adv, x, EPS)
        with torch.no_grad():
            assert F.cross_entropy(tiny_model(x_adv), y) > F.cross_entropy(tiny_model(x), y)


def _record_modes(model):
    seen = []
    model.register_forward_pre_hook(lambda m, i: seen.append(m.training))
    bn_flags = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda m, i: bn_flags.append(m.training))
    return seen, bn_flags


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_attack_runs_in_the_stated_bn_mode_and_restores_every_flag(tiny_model, attack, mode):
    x, y = _data()
    tiny_model.train()
    odd = tiny_model.body[1]  # one BN layer deliberately in the other mode
    odd.eval()
    before = {n: m.training for n, m in tiny_model.named_modules()}
    seen, bn_flags = _record_modes(tiny_model)
    if attack == "pgd":
        pgd(tiny_model, x, y, eps=EPS, step=2 / 255, steps=3, bn=mode)
    else:
        fgsm(tiny_model, x, y, eps=EPS, bn=mode)
    assert seen and all(s == (mode == "train") for s in seen)
    assert bn_flags and all(s == (mode == "train") for s in bn_flags)
    assert {n: m.training for n, m in tiny_model.named_modules()} == before


def test_eval_mode_attack_does_not_touch_bn_statistics_but_train_mode_does(tiny_model):
    x, y = _data()
    tiny_model.train()
    stats = {k: v.clone() for k, v in tiny_model.state_dict().items() if "running" in k}
    pgd(tiny_model, x, y, eps=EPS, step=2 / 255, steps=3, bn="eval")
    assert all(torch.equal(stats[k], tiny_model.state_dict()[k]) for k in stats)
    pgd(tiny_model, x, y, eps=EPS, step=2 / 255, steps=3, bn="train")
    assert any(not torch.equal(stats[k], tiny_model.state_dict()[k]) for k in stats)


def test_modes_restored_when_the_attack_fails(tiny_model):
    x, y = _data()
    tiny_model.train()

    def boom(logits, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        pgd(tiny_model, x, y, eps=EPS, step=2 / 255, steps=2, loss_fn=boom, bn="eval")
    assert all(m.training for m in tiny_model.modules())


def test_attacks_leave_parameter_gradients_alone(tiny_model):
    x, y = _data()
    pgd(tiny_model, x, y, eps=EPS, step=2 / 255, steps=2)
    fgsm(tiny_model, x, y, eps=EPS)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_pgd_random_start_is_not_clipped_before_the_first_step_unless_asked(tiny_model):
    """METHODS §15.1 / AFD code: x⁰ = x + U(−ε, ε) is not clipped to [0, 1] before the first gradient."""
    x = torch.zeros(4, 3, 32, 32)
    y = torch.zeros(4, dtype=torch.long)
    seen = []
    tiny_model.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
    g = torch.Generator().manual_seed(0)
    pgd(tiny_model, x, y, eps=EPS, step=0.003, steps=1, generator=g)
    assert seen[0].min() < 0
    seen.clear()
    pgd(tiny_model, x, y, eps=EPS, step=0.003, steps=1, clip_start=True, generator=torch.Generator().manual_seed(0))
    assert seen[0].min() >= 0


def test_pgd_restarts_keep_the_worst_case_per_example(tiny_model):
    x, y = _data(32)
    tiny_model.eval()
    torch.manual_seed(0)
    one = pgd(tiny_model, x, y, eps=EPS, step=0.003, steps=2, restarts=1)
    torch.manual_seed(0)
    many = pgd(tiny_model, x, y, eps=EPS, step=0.003, steps=2, restarts=4)
    with torch.no_grad():
        wrong_one = tiny_model(one).argmax(1) != y
        wrong_many = tiny_model(many).argmax(1) != y
    assert bool((wrong_many >= wrong_one).all())  # the first restart is the same; later ones only add


def test_project_and_bad_mode():
    x = torch.full((1, 1, 2, 2), 0.5)
    out = project(torch.tensor([[[[2.0, -2.0], [0.51, 0.49]]]]), x, 0.1)
    assert torch.allclose(out, torch.tensor([[[[0.6, 0.4], [0.51, 0.49]]]]))
    with pytest.raises(ValueError):
        with bn_mode(torch.nn.Linear(1, 1), "frozen"):
            pass
