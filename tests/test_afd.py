"""Defining properties of AFD (METHODS.md §14) and its variants ``afd-literal`` and ``vaft+d``."""
import copy

import pytest
import torch
import torch.nn.functional as F

from bench.loader import Batch
from bench.models import create_model
from methods import afd as afd_mod
from methods import get_method
from methods.afd import Disentangled, confusing_label


def _bn_trained_model(seed=0):
    torch.manual_seed(seed)
    m = create_model("smallcnn", 10)
    m.train()
    with torch.no_grad():
        m(torch.rand(64, 3, 32, 32))  # running statistics away from their initial values
    return m


def _method(name="afd", perturb=True, **hp):
    """An AFD method on a small model. With ``perturb``, D1 and D2 are moved away from the identity: at D1 = D2 = I,
    f1 = f2 and ∇cos(f1, sg f2) vanishes, which would hide every L2 term from the tests."""
    base = _bn_trained_model()
    teacher = copy.deepcopy(base)
    cls = get_method(name)
    h = cls.resolved_defaults()
    h.update(hp)
    m = cls(h, base, teacher, steps_per_epoch=10)
    if perturb:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            m.model.d1.weight.add_(0.1 * torch.randn(m.model.d1.weight.shape, generator=g))
            m.model.d2.weight.add_(0.3 * torch.randn(m.model.d2.weight.shape, generator=g))
    return m, base


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


def test_paper_defaults():
    hp = get_method("afd").resolved_defaults()
    assert (hp["alpha"], hp["beta"], hp["gamma"]) == (0.05, 0.25, 25.0)
    assert (hp["attack_steps"], hp["attack_step"], hp["eps"]) == (10, 0.007, 8 / 255)
    assert (hp["lr"], hp["epochs"], hp["weight_decay"], hp["schedule"]) == (0.025, 20, 5e-4, {"name": "suzuki"})
    assert hp["ema"] == {"decay": 0.999, "warmup": True}
    assert get_method("vaft+d").resolved_defaults()["gamma"] == 0.0
    assert get_method("afd-literal").literal and not get_method("afd").literal


def test_at_initialisation_the_training_model_computes_the_pretrained_logits():
    base = _bn_trained_model().eval()
    ref = copy.deepcopy(base)
    model = Disentangled(base).eval()
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(model(x), ref(x))
    _, f1, f2, z1, z2 = model.heads(x)
    assert torch.equal(z1, ref(x)) and torch.equal(z2, ref(x)) and torch.equal(f1, ref.features(x))
    assert model.d1.bias is None and model.d2.bias is None and model.d1.weight.shape == (64, 64)


def _named_grads(loss, model):
    names, params = zip(*model.named_parameters())
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return {n: g for n, g in zip(names, gs) if g is not None and g.abs().sum() > 0}


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_which_parameters_each_loss_reaches(compiled):
    """Also with the engine's compiled backbone (``AFD.compile``): the detach of h before D₂ stays outside the
    compiled graph, so L1 still reaches D₂ and ω only."""
    m, _ = _method()
    if compiled:
        m.compile()
        assert m.backbone is not None
    b = _batch()
    m.model.train()
    L = m.losses(b.x, b.x, b.y)
    # L1 = CE(z2, y'): D2 and ω only — nothing from the f2 branch reaches the backbone, D1 is untouched
    assert set(_named_grads(L["l1"], m.model)) == {"d2.weight", "base.fc.weight", "base.fc.bias"}
    # L2 = cos(f1, sg f2): backbone and D1, never D2 (f2 is detached) nor ω
    l2 = set(_named_grads(L["l2"], m.model))
    assert "d1.weight" in l2 and "d2.weight" not in l2 and not any(n.startswith("base.fc") for n in l2)
    assert any(n.startswith("base.body") for n in l2)
    # L3 = CE(z1, y) + γ·D_ang(f1, t): backbone, D1 and ω, never D2
    l3 = set(_named_grads(L["l3"], m.model))
    assert {"d1.weight", "base.fc.weight"} <= l3 and "d2.weight" not in l3


def test_the_confusing_label_is_never_the_true_label():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 10, generator=g)
    y = torch.randint(0, 10, (500,), generator=g)
    z[:100, :] = 0.0  # ties everywhere
    z[100:200] = z[100:200].scatter(1, y[100:200, None], 100.0)  # the true label is the top-1
    yc = confusing_label(z, y)
    assert not (yc == y).any()
    wrong = z.argmax(1) != y
    assert torch.equal(yc[wrong], z.argmax(1)[wrong])  # top-1 when it is wrong, as the code takes it


def _record_steps(monkeypatch, m):
    seen = []
    real = afd_mod._step

    def spy(opt, params, grads):
        grads = [None if g is None else g.clone() for g in grads]
        seen.append((opt, grads))
        real(opt, params, grads)

    monkeypatch.setattr(afd_mod, "_step", spy)
    return seen


@pytest.mark.parametrize("name", ["afd", "afd-literal"])
def test_three_optimisers_get_exactly_the_gradients_of_section_14_4(monkeypatch, name):
    m, _ = _method(name)
    b = _batch()
    m.model.train()
    L = m.losses(b.x, b.x, b.y)
    g1, g2, g3 = m.gradients(L)
    theta_t = [p.detach().clone() for p in m.theta1]
    seen = _record_steps(monkeypatch, m)
    m.apply(g1, g2, g3)
    (o1, s1), (o2, s2), (o3, s3) = seen
    assert (o1, o2, o3) == (m.o1, m.o2, m.o)
    assert len(s1) == 1 and torch.equal(s1[0], g1[0])  # O1 moves D2 with ∇(αL1)
    fc_w = next(i for i, p in enumerate(m.theta1) if p is m.model.base.fc.weight)
    fc_b = next(i for i, p in enumerate(m.theta1) if p is m.model.base.fc.bias)
    omega = {fc_w: g1[1], fc_b: g1[2]}
    wd = m.hp["weight_decay"]
    assert g2[fc_w] is None and g2[fc_b] is None  # L2 does not depend on ω
    for i, p in enumerate(m.theta1):
        w = omega.get(i, torch.zeros_like(p))
        a = torch.zeros_like(p) if g2[i] is None else g2[i]
        if name == "afd":
            # code-faithful: the ω part of L1 and L2 go to O2, and again with O2's weight decay (old PyTorch left it
            # in the gradient) and L3 to O
            assert torch.allclose(s2[i], w + a)
            assert torch.allclose(s3[i], w + a + wd * theta_t[i] + g3[i], atol=1e-7)
        else:  # literal: O2 gets L2 only (ω, which L2 does not reach, is not stepped), O gets L3 only
            assert (s2[i] is None) if i in omega else torch.equal(s2[i], g2[i])
            assert torch.equal(s3[i], g3[i])
    assert omega[fc_w].abs().sum() > 0  # so the two variants really differ on ω
    assert sum(float(g.abs().sum()) for g in g2 if g is not None) > 0 and sum(float(g.abs().sum()) for g in g3) > 0


@pytest.mark.parametrize("name", ["afd", "afd-literal"])
def test_one_step_equals_the_sgd_arithmetic_of_section_14_4(name):
    """Starting from fresh optimisers, momentum buffers equal the first gradients, so each step is
    p ← p − lr·(g + wd·p): O1 on D2, then O2 and O on θ1 one after the other."""
    m, _ = _method(name)
    b = _batch()
    x_adv = b.x.flip(3)
    ref = copy.deepcopy(m.model).train()
    m.model.train()
    lr, wd, hp = m.hp["lr"], m.hp["weight_decay"], m.hp
    m.set_lr(lr)
    L = m.losses(x_adv, b.x, b.y)
    m.apply(*m.gradients(L))

    with torch.no_grad():
        t = m.teacher.features(b.x)
    _, f1, f2, z1, z2 = ref.heads(x_adv)
    l1 = F.cross_entropy(z2, confusing_label(z1, b.y))
    l2 = F.cosine_similarity(f1, f2.detach(), dim=1).mean()
    l3 = F.cross_entropy(z1, b.y) + hp["gamma"] * (1 - F.cosine_similarity(f1, t, dim=1).mean())
    params = dict(ref.named_parameters())
    names = list(params)

    def grad(loss):
        gs = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True, allow_unused=True)
        return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, gs)}

    G1, G2, G3 = grad(hp["alpha"] * l1), grad(hp["beta"] * l2), grad(l3)
    expected = {}
    for n, p in params.items():
        p = p.detach()
        if n == "d2.weight":
            expected[n] = p - lr * (G1[n] + wd * p)
            continue
        if name == "afd":  # code-faithful, with O2's weight decay carried into O's gradient (old PyTorch)
            w = G1[n] if n.startswith("base.fc") else torch.zeros_like(p)
            p2 = p - lr * (w + G2[n] + wd * p)
            expected[n] = p2 - lr * (w + G2[n] + wd * p + G3[n] + wd * p2)
        else:  # literal: ω is not stepped by O2 (L2 does not reach it); no L1 term on ω
            p2 = p if n.startswith("base.fc") else p - lr * (G2[n] + wd * p)
            expected[n] = p2 - lr * (G3[n] + wd * p2)
    got = dict(m.model.named_parameters())
    for n in names:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


def test_separate_momentum_buffers():
    m, _ = _method("afd")
    b = _batch()
    m.model.train()
    m.apply(*m.gradients(m.losses(b.x, b.x, b.y)))
    d2 = m.model.d2.weight
    assert set(m.o1.state) == {d2} and d2 not in m.o2.state and d2 not in m.o.state
    p = m.model.base.fc.weight
    assert m.o2.state[p]["momentum_buffer"] is not m.o.state[p]["momentum_buffer"]
    assert not torch.equal(m.o2.state[p]["momentum_buffer"], m.o.state[p]["momentum_buffer"])


def test_folding_d1_gives_a_plain_model_with_the_same_logits():
    m, base = _method("afd")
    m.model.eval()
    plain = m.export(m.model).eval()
    assert type(plain) is type(base) and not any(k.startswith(("d1", "d2")) for k in plain.state_dict())
    x = torch.rand(8, 3, 32, 32)
    assert torch.allclose(plain(x), m.model(x), atol=1e-5)
    assert torch.equal(plain.fc.bias, m.model.base.fc.bias)


def test_the_attack_runs_in_eval_mode_through_omega_d1_g_and_restores_train_mode():
    m, _ = _method("afd", perturb=False, attack_steps=3)
    m.model.train()
    modes = []
    m.model.register_forward_pre_hook(lambda mod, i: modes.append(mod.training))
    d1_calls = []
    m.model.d1.register_forward_pre_hook(lambda mod, i: d1_calls.append(mod.training))
    b = _batch()
    m.train_step(b, 0, 0)
    assert modes == [False, False, False]  # the eval forward ω·D1·g: the attack's three steps
    assert d1_calls == [False, False, False, True]  # then one train-mode forward through the heads
    assert all(mod.training for mod in m.model.modules())


def test_teacher_weights_and_bn_statistics_are_unchanged_by_training():
    m, _ = _method("afd", attack_steps=2)
    before = copy.deepcopy(m.teacher.state_dict())
    m.model.train()
    for step in range(3):
        m.train_step(_batch(seed=step), 0, step)
    after = m.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not m.teacher.training and all(not p.requires_grad for p in m.teacher.parameters())


def test_probe_and_heads_follow_the_paper():
    m, _ = _method("afd")
    fwd, nat, adv = m.probe(m.model)
    assert fwd is m.model and nat == m.teacher.features and adv == m.model.f1
    heads = m.eval_heads(m.model)
    x = torch.rand(2, 3, 32, 32)
    m.model.eval()
    with torch.no_grad():
        m.model.d2.weight.mul_(0.5)
        assert torch.allclose(heads["f1"](x), m.model(x))
        assert torch.allclose(heads["f2"](x), m.model.base.fc(m.model.d2(m.model.features(x))))


def test_at_identity_init_l2_has_no_gradient_yet():
    """cos(f1, sg f2) is maximal when f1 = f2 (D1 = D2 = I): L2 starts to act once D1 and D2 diverge."""
    m, _ = _method("afd", perturb=False)
    b = _batch()
    m.model.train()
    L = m.losses(b.x, b.x, b.y)
    assert all(g is None or float(g.abs().max()) < 1e-6 for g in m.gradients(L)[1])


# -- reading = sequential: the authors' code as PyTorch < 1.5 ran it (docs/methods.md#afd, Options) ----------------
def _double_method(name="afd", **hp):
    """As :func:`_method`, in float64 (the two readings differ by ~1e-4 relative after one step: far above float64's
    rounding)."""
    m, base = _method(name, **hp)
    m.model.double()
    m.teacher.double()
    return m, base


def _double_batch(n=16, seed=1):
    b = _batch(n, seed)
    return Batch(b.x.double(), b.y, b.idx)


def test_reading_is_checked_and_leaves_recorded_run_hashes_alone():
    from bench.config import RunConfig
    from bench.errors import BenchError

    cls = get_method("afd")
    with pytest.raises(BenchError, match=r"afd.reading = 'parallel'; accepted: simultaneous .* or sequential"):
        cls.check_hp({**cls.resolved_defaults(), "reading": "parallel"})
    with pytest.raises(BenchError, match=r"afd-literal.reading = 'sequential'; accepted: simultaneous"):
        get_method("afd-literal").check_hp({**get_method("afd-literal").resolved_defaults(), "reading": "sequential"})
    get_method("vaft+d").check_hp({**get_method("vaft+d").resolved_defaults(), "reading": "sequential"})
    from methods import METHODS

    having = [m for m in METHODS.names() if "reading" in get_method(m).resolved_defaults()]
    assert {"afd", "afd-literal", "vaft+d"} <= set(having)
    for name in having:
        hp = get_method(name).resolved_defaults()
        assert hp["reading"] == "simultaneous"
        cfg = RunConfig(method=name, dataset="cifar10", arch="smallcnn", seed=0, hp=dict(hp))
        old = RunConfig(method=name, dataset="cifar10", arch="smallcnn", seed=0,
                        hp={k: v for k, v in hp.items() if k != "reading"})
        assert cfg.run_hash == old.run_hash  # simultaneous: the hash of runs recorded before the option
        if name != "afd-literal":
            assert RunConfig(**{**cfg.to_dict(), "hp": {**hp, "reading": "sequential"}}).run_hash != old.run_hash


def _tiny():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 5)).double().train()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def _hand_derived_late_gradient(net, old, x, y):
    """The gradient PyTorch < 1.5 computed when a backward ran after the weights were changed in place (through
    ``.data``) since the forward, derived by hand: each layer passes the gradient back to its input with the weights it
    has now (conv: none needed here, its input is the image; BN: γ_new·∂x̂/∂x at the forward's batch statistics;
    linear: dy·W_new) and takes its weights' gradient from the forward's activations (dW = dyᵀ·x_old,
    dγ = Σ dy·x̂_old, dβ = Σ dy). Built as a surrogate forward whose value is the old forward's and whose gradients
    are those: ``old`` holds leaves with θ_t's values, ``net`` the new weights (constants here)."""
    conv, bn, fc = net[0], net[1], net[5]
    c = F.conv2d(x, old["0.weight"], padding=1)

    def xhat(u):
        mean, var = u.mean((0, 2, 3), keepdim=True), u.var((0, 2, 3), unbiased=False, keepdim=True)
        return (u - mean) / torch.sqrt(var + bn.eps)

    xh, xh_old = xhat(c), xhat(c.detach())
    b = (old["1.weight"].view(1, -1, 1, 1) * xh_old + old["1.bias"].view(1, -1, 1, 1)
         + bn.weight.detach().view(1, -1, 1, 1) * (xh - xh.detach()))
    h = F.adaptive_avg_pool2d(F.relu(b), 1).flatten(1)
    z = h.detach() @ old["5.weight"].t() + old["5.bias"] + (h - h.detach()) @ fc.weight.detach().t()
    loss = F.cross_entropy(z, y)
    return dict(zip(old, torch.autograd.grad(loss, list(old.values()))))


def test_late_parameters_backward_reads_the_weights_as_they_are_when_it_runs():
    """A backward under LateParameters after an in-place change of the weights is the hand-derived PyTorch < 1.5
    gradient (new weights, old activations) and raises no in-place error; without the hooks torch 2.x refuses it;
    with no change it is the ordinary gradient."""
    net = _tiny()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    params = dict(net.named_parameters())
    old = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}

    def moved():
        with torch.no_grad():
            for k, p in params.items():
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(len(k))))

    late = afd_mod.LateParameters(net.parameters())
    with late.hooks():
        loss = F.cross_entropy(net(x), y)
    plain = dict(zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True)))
    # the weights a backward formula reads are referenced, not saved: conv, BN and linear weights (biases are not)
    assert {id(params[k]) for k in ("0.weight", "1.weight", "5.weight")} <= late.aliased
    moved()
    got = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    ref = _hand_derived_late_gradient(net, old, x, y)
    for k in params:
        assert torch.allclose(got[k], ref[k], rtol=1e-10, atol=1e-13), k
    assert any(not torch.allclose(got[k], plain[k], rtol=1e-3) for k in params)  # the change shows
    with torch.no_grad():  # the same without the hooks: the in-place change is refused
        for k, p in params.items():
            p.copy_(old[k])
    loss = F.cross_entropy(net(x), y)
    moved()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, list(params.values()))
    # and with nothing moved the hooks change nothing
    fresh = _tiny()
    with afd_mod.LateParameters(fresh.parameters()).hooks():
        loss = F.cross_entropy(fresh(x), y)
    ordinary = torch.autograd.grad(F.cross_entropy(fresh(x), y), list(fresh.parameters()))
    for a, b in zip(torch.autograd.grad(loss, list(fresh.parameters())), ordinary):
        assert torch.equal(a, b)


def test_sequential_differs_from_simultaneous_only_through_step_3():
    """From the same state and draws: O₁'s step (D₂) and O₂'s momentum buffers are the same in both readings (G₁, G₂
    read θ_t in both); O's gradient, hence θ₁, differs by a measurable second-order amount (~lr relative)."""
    runs = {}
    for reading in ("simultaneous", "sequential"):
        m, _ = _double_method("afd", reading=reading, attack_steps=2)
        m.model.train()
        m.set_lr(m.hp["lr"])
        torch.manual_seed(5)
        m.train_step(_double_batch(), 0, 0)
        runs[reading] = m
    a, b = runs["simultaneous"], runs["sequential"]
    assert torch.allclose(a.model.d2.weight, b.model.d2.weight, rtol=0, atol=1e-15)
    for p, q in zip(a.theta1, b.theta1):
        assert torch.allclose(a.o2.state[p]["momentum_buffer"], b.o2.state[q]["momentum_buffer"], rtol=1e-12,
                              atol=1e-15)
    ga = torch.cat([a.o.state[p]["momentum_buffer"].flatten() for p in a.theta1])
    gb = torch.cat([b.o.state[p]["momentum_buffer"].flatten() for p in b.theta1])
    rel = float((ga - gb).norm() / ga.norm())
    assert 1e-5 < rel < 1e-2, rel  # (measured 4.5e-4 here)
    ta, tb = (torch.cat([p.detach().flatten() for p in m.theta1]) for m in (a, b))
    assert float((ta - tb).norm()) > 0


def test_sequential_step_3_reads_the_weights_step_2_moved(monkeypatch):
    """Under reading = sequential the backward of L₃ reads θ_{t+½} (after O₂'s step), those of L₁ and L₂ read θ_t;
    no in-place error is raised on the way."""
    m, _ = _double_method("afd", reading="sequential", attack_steps=1)
    fc_w = m.model.base.fc.weight
    reads, after_step = [], []
    real_unpack, real_step = afd_mod.LateParameters.unpack, afd_mod._step

    def unpack(packed):
        if not isinstance(packed, torch.Tensor) and packed[0] is fc_w:
            reads.append((len(after_step), fc_w.detach().clone()))
        return real_unpack(packed)

    def step(opt, params, grads):
        real_step(opt, params, grads)
        after_step.append(fc_w.detach().clone())

    monkeypatch.setattr(afd_mod.LateParameters, "unpack", staticmethod(unpack))
    monkeypatch.setattr(afd_mod, "_step", step)
    theta_t = fc_w.detach().clone()
    m.model.train()
    m.train_step(_double_batch(), 0, 0)
    assert id(fc_w) in m.late.aliased
    assert len(after_step) == 3  # O₁, O₂, O
    assert {n for n, _ in reads} == {0, 2}  # ω's weight is read by L₁'s backward (before any step) and by L₃'s
    for n, value in reads:
        if n == 0:
            assert torch.equal(value, theta_t)
        else:  # after O₁ and O₂: θ_{t+½}, which O₂ moved
            assert torch.equal(value, after_step[1]) and not torch.equal(value, theta_t)


def test_sequential_keeps_the_training_forward_eager_and_refuses_bf16_autocast():
    from bench.errors import BenchError

    m, _ = _method("afd", reading="sequential")
    m.compile()
    assert m.backbone is None  # a compiled graph would save its own tensors, not the parameters
    b = _batch()
    m.model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(BenchError, match="reading = sequential under bf16 autocast"):
            m.losses(b.x, b.x, b.y)


def test_the_reading_is_part_of_the_certified_update():
    """The suite's sequential reading against the simultaneous reading's fixture (tl+sl.py with every backward at
    θ_t) is far outside the certificates' tolerance: the option selects which of the two the suite reproduces."""
    import importlib

    from fidelity import common

    golden = common.read_golden("afd")
    runner = importlib.import_module("fidelity.afd")
    ours = runner.suite_run({**golden["setting"], "reading": "sequential"})
    assert max(common.compare(ours[-1], golden["iterations"][-1]).values()) > 1e-3
