"""Defining properties of the training-from-scratch family (METHODS.md §4-§8): TRADES, Free-AT, FGSM-RS, FGSM-GA,
ATAS; and for each, resume after an interrupted run = an uninterrupted run on CPU."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bench.engine import Trainer
from bench.loader import Batch
from bench.models import create_model
from bench.records import RunDir
from bench.runner import plan
from bench.schedules import lr_at
from helpers import resumed_equals_straight, small_request
from methods import METHODS, get_method
from methods.atas import crop_flip, uncrop_flip_
from methods.fgsm_ga import gradalign_lambda, gradalign_reg
from methods.trades import kl_sum, trades_attack

EPS = 8 / 255
# every method trained from scratch but the two base methods (their resume: tests/test_engine.py)
FAMILY = [m for m in METHODS.names() if get_method(m).starts_from == "scratch" and m not in ("natural", "pgd-at")]


def _model(seed=0):
    torch.manual_seed(seed)
    m = create_model("smallcnn", 10)
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        m(torch.rand(64, 3, 32, 32))
    return m


def _method(name, model=None, n=64, **hp):
    cls = get_method(name)
    h = cls.resolved_defaults()
    h.update(hp)
    info = {"n": n, "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    return cls(h, model if model is not None else _model(), None, steps_per_epoch=4, info=info)


def _batch(n=16, seed=1, idx=None):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
                 torch.arange(n) if idx is None else idx)


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _record_modes(model):
    """A list that receives, per forward of ``model``, whether every BN layer ran in train mode."""
    seen = []
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.register_forward_pre_hook(lambda mod, args: seen.append({b.training for b in bns}))
    return seen


def _inputs(model):
    """A list that receives the input of every forward of ``model``."""
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen


def test_the_family_is_registered_with_its_sources_defaults():
    expect = {  # epochs, lr, wd, schedule name, attack BN
        "trades": (120, 0.1, 2e-4, "multistep", "eval"),
        "free-at": (10, 0.04, 5e-4, "cyclic", "train"),
        "fgsm-rs": (15, 0.2, 5e-4, "cyclic", "train"),
        "fgsm-ga": (30, 0.3, 5e-4, "cyclic", "train"),
        "atas": (30, 0.1, 5e-4, "multistep", "eval"),
    }
    for name, (epochs, lr, wd, sched, bn) in expect.items():
        cls = get_method(name)
        hp = cls.resolved_defaults()
        assert cls.starts_from == "scratch" and cls.attack_bn == bn, name
        assert (hp["epochs"], hp["lr"], hp["weight_decay"], hp["schedule"]["name"]) == (epochs, lr, wd, sched), name
        assert hp["batch_size"] == 128 and hp["momentum"] == 0.9 and hp["eps"] == EPS
    assert get_method("trades").resolved_defaults()["schedule"]["milestones"] == [75, 90, 100]
    t = get_method("trades").resolved_defaults()
    assert (t["beta"], t["attack_steps"], t["attack_step"], t["init_std"]) == (6.0, 10, 0.007, 0.001)
    assert get_method("free-at").resolved_defaults()["replays"] == 8
    assert get_method("fgsm-rs").resolved_defaults()["alpha_ratio"] * EPS == pytest.approx(10 / 255)
    a = get_method("atas").resolved_defaults()
    assert (a["warmup_epochs"], a["c"], a["beta_m"], a["reset_every"]) == (5, 0.01, 0.5, 10)
    assert (a["min_step"], a["max_step"]) == (4 / 255, 14 / 255)
    # the official MultiStepLR at iterations 24·len and 28·len: 0-based epochs 24 and 28 start the decays
    lrs = [lr_at(0.1, a["schedule"], e, 0, 10, 30) for e in range(30)]
    assert lrs[23] == 0.1 and lrs[24] == pytest.approx(0.01) and lrs[27] == pytest.approx(0.01)
    assert lrs[28] == pytest.approx(0.001)


# ------------------------------------------------------------------------------------------------------ TRADES


def test_trades_attack_ascends_the_kl_term_not_ce_from_a_gaussian_start():
    model = _model().eval()
    x, y = _batch().x, _batch().y
    torch.manual_seed(5)
    got = trades_attack(model, x, eps=EPS, step=0.007, steps=1, init_std=0.001)
    torch.manual_seed(5)
    x0 = x + 0.001 * torch.randn_like(x)
    target = model(x).detach()
    x0.requires_grad_(True)
    (g_kl,) = torch.autograd.grad(kl_sum(model(x0), target), x0)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(model(x0), y), x0)
    want = torch.min(torch.max(x0.detach() + 0.007 * g_kl.sign(), x - EPS), x + EPS).clamp(0, 1)
    ce_step = torch.min(torch.max(x0.detach() + 0.007 * g_ce.sign(), x - EPS), x + EPS).clamp(0, 1)
    assert torch.equal(got, want)
    assert not torch.equal(got, ce_step)
    many = trades_attack(model, x, eps=EPS, step=0.007, steps=10)
    assert (many - x).abs().max() <= EPS + 1e-6 and many.min() >= 0 and many.max() <= 1


def test_trades_attack_runs_in_eval_mode_and_moves_no_statistics():
    m = _method("trades", attack_steps=3)
    modes = _record_modes(m.model)
    before = _bn_stats(m.model)
    m.model.train()
    m.attack(_batch().x)
    assert modes and all(s == {False} for s in modes)
    assert all(torch.equal(before[k], v) for k, v in _bn_stats(m.model).items())
    assert m.model.training  # restored


def test_trades_outer_gradient_flows_through_both_branches_three_train_mode_forwards():
    m = _method("trades")
    b = _batch()
    x_adv = (b.x + 0.02 * torch.randn_like(b.x)).clamp(0, 1)
    m.attack = lambda x: x_adv
    ref = copy.deepcopy(m.model).train()
    grads = {}
    m.optimizer.step = lambda *a, **k: grads.update({n: p.grad.clone() for n, p in m.model.named_parameters()})
    modes = _record_modes(m.model)
    m.train_step(b, 0, 0)
    assert len(modes) == 3 and all(s == {True} for s in modes)

    def reference(detach_target):
        nat, adv, tgt = ref(b.x), ref(x_adv), ref(b.x)
        if detach_target:
            tgt = tgt.detach()
        loss = F.cross_entropy(nat, b.y) + 6.0 * F.kl_div(F.log_softmax(adv, 1), F.softmax(tgt, 1),
                                                          reduction="sum") / len(b.y)
        return dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss, list(ref.parameters()))))

    full = reference(False)
    assert all(torch.allclose(grads[n], full[n], atol=1e-6) for n in full)
    ref.load_state_dict(copy.deepcopy(_method("trades").model.state_dict()))  # same start statistics
    detached = reference(True)
    assert any(not torch.allclose(grads[n], detached[n], atol=1e-6) for n in detached)


# ------------------------------------------------------------------------------------------------------ Free-AT


def test_free_at_delta_persists_across_minibatches_and_each_gives_m_steps():
    m = _method("free-at", replays=3)
    steps = []
    real_step = m.optimizer.step
    m.optimizer.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))
    inputs = _inputs(m.model)
    b1, b2 = _batch(seed=1), _batch(seed=2)
    assert torch.count_nonzero(m.delta) == 0  # starts at 0
    m.train_step(b1, 0, 0)
    assert len(steps) == 3 and m.replay_steps == 3
    d1 = m.delta[:16].clone()
    assert torch.count_nonzero(d1) > 0 and d1.abs().max() <= EPS + 1e-7
    assert (b1.x + d1).min() >= 0 and (b1.x + d1).max() <= 1
    m.train_step(b2, 0, 1)
    assert len(steps) == 6
    # the first replay of the second mini-batch starts from the δ the first one left (warm start, never reset)
    assert torch.equal(inputs[3], b2.x + d1)  # no clip in the forward (Wong's model(X + delta))
    # replays inside one mini-batch: the next forward sees the δ the previous replay moved
    assert not torch.equal(inputs[4], inputs[3])


def test_free_at_theta_gradient_is_taken_before_delta_moves():
    m = _method("free-at", replays=2)
    b = _batch()
    seen = []
    real_step = m.optimizer.step

    def step(*a, **k):
        seen.append(({n: p.grad.clone() for n, p in m.model.named_parameters()}, copy.deepcopy(m.model),
                     m.delta[:16].clone()))
        return real_step(*a, **k)

    m.optimizer.step = step
    inputs = _inputs(m.model)
    m.train_step(b, 0, 0)
    for r, (grads, model_before, delta_at_step) in enumerate(seen):
        x_in = inputs[r]
        # by the time θ steps, δ has already moved away from the δ of this replay's forward ...
        assert not torch.equal(b.x + delta_at_step, x_in)
        # ... and the next replay's forward uses the moved δ
        if r + 1 < len(seen):
            assert torch.equal(inputs[r + 1], b.x + delta_at_step)
        # ... yet the θ-gradient is the one of this replay's forward
        loss = F.cross_entropy(model_before.train()(x_in), b.y)
        ref = torch.autograd.grad(loss, list(model_before.parameters()))
        assert all(torch.allclose(grads[n], g, atol=1e-6) for (n, _), g in zip(model_before.named_parameters(), ref))


def test_free_at_counts_epochs_in_passes_and_steps_the_cyclic_lr_per_replay(tmp_path, synthetic):
    req = small_request(tmp_path, methods=["free-at"], epochs=2, subset=8, batch_size=32, sets=["free-at.replays=4"])
    cfg = plan(req)[0].cfg
    t = Trainer(cfg, synthetic, RunDir(tmp_path / "r"), progress=False, echo=lambda s: None)
    lrs = []
    real = t.method.set_lr
    t.method.set_lr = lambda lr: (lrs.append(lr), real(lr))
    t.train()
    spe = len(t.loader)
    rows = t.run.read_metrics()
    assert [r["images"] for r in rows] == [80, 80]  # an epoch is one pass over the 80 images
    assert t.method.replay_steps == 2 * spe * 4
    method_lrs = [t.method.lr_for_replay(e, s, r) for e in range(2) for s in range(spe) for r in range(4)]
    assert max(method_lrs) == pytest.approx(0.04) and method_lrs[-1] == pytest.approx(0.0)
    peak = method_lrs.index(max(method_lrs)) + 1
    assert peak == len(method_lrs) // 2
    assert all(lr in lrs for lr in method_lrs)  # each replay ran at its own lr


def test_free_at_trains_in_train_mode():
    m = _method("free-at", replays=2)
    modes = _record_modes(m.model)
    before = _bn_stats(m.model)
    m.train_step(_batch(), 0, 0)
    assert all(s == {True} for s in modes)
    assert any(not torch.equal(before[k], v) for k, v in _bn_stats(m.model).items())


# ------------------------------------------------------------------------------------------------------ FGSM-RS


def test_fgsm_rs_is_a_clipped_uniform_start_plus_one_train_mode_step_of_1_25_eps():
    m = _method("fgsm-rs")
    b = _batch()
    modes = _record_modes(m.model)
    before = _bn_stats(m.model)
    ref = copy.deepcopy(m.model).train()
    torch.manual_seed(3)
    x_adv = m.attack(b.x, b.y)
    assert modes == [{True}]  # one forward, train mode
    assert any(not torch.equal(before[k], v) for k, v in _bn_stats(m.model).items())  # running stats updated
    torch.manual_seed(3)
    x0 = (b.x + (torch.rand(b.x.shape) * 2 - 1) * EPS).clamp(0, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ref(x0), b.y), x0)
    want = torch.min(torch.max(x0.detach() + 1.25 * EPS * g.sign(), b.x - EPS), b.x + EPS).clamp(0, 1)
    assert torch.allclose(x_adv, want, atol=1e-7)
    assert (x_adv - b.x).abs().max() <= EPS + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_fgsm_rs_early_stop_keeps_the_previous_epochs_weights():
    m = _method("fgsm-rs", early_stop=True)
    accs = iter([0.40, 0.50, 0.25])
    m.early_stop_robust = lambda: next(accs)
    m.first_batch = (_batch().x, _batch().y)
    snapshots = []
    for epoch in range(3):
        with torch.no_grad():
            for p in m.model.parameters():
                p.add_(0.01 * (epoch + 1))
        snapshots.append(copy.deepcopy(m.model.state_dict()))
        row = m.end_epoch(epoch)
        if epoch < 2:
            assert not m.stopped and "early_stopped" not in row
    assert m.stopped and row["early_stopped"]  # 0.25 − 0.50 < −0.2
    now = m.model.state_dict()
    assert all(torch.equal(now[k], snapshots[1][k]) for k in now)
    state = m.state_dict()
    assert state["stopped"] and state["prev_robust"] == 0.5


def test_a_stopped_method_ends_training_early(tmp_path, synthetic, monkeypatch):
    req = small_request(tmp_path, methods=["fgsm-rs"], epochs=4, subset=8, batch_size=32,
                        sets=["fgsm-rs.early_stop=true"])
    cfg = plan(req)[0].cfg
    t = Trainer(cfg, synthetic, RunDir(tmp_path / "r"), progress=False, echo=lambda s: None)
    accs = iter([0.5, 0.6, 0.1, 0.9])
    monkeypatch.setattr(t.method, "early_stop_robust", lambda: next(accs))
    t.train()
    rows = t.run.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["early_stopped"]
    t2 = Trainer(cfg, synthetic, RunDir(tmp_path / "r"), progress=False, echo=lambda s: None)
    assert t2.resume() == 3 and t2.method.stopped
    t2.train()  # nothing more to do
    assert len(t2.run.read_metrics()) == 3


# ------------------------------------------------------------------------------------------------------ FGSM-GA


def test_gradalign_lambda_and_regulariser():
    assert gradalign_lambda(8 / 255) == pytest.approx(0.2)
    assert gradalign_lambda(16 / 255) == pytest.approx(2.0)
    g = torch.randn(6, 3, 8, 8)
    assert gradalign_reg(g, 3.0 * g).abs() < 1e-6  # aligned (any positive scale): zero
    assert gradalign_reg(g, -g) == pytest.approx(2.0)
    g1, g2 = g.clone(), g.clone()
    g1[0] = 0  # an example with a zero gradient is left out of the mean
    g2[1] = -g2[1]
    assert gradalign_reg(g1, g2) == pytest.approx(1 - (4 - 1) / 5)
    assert gradalign_reg(torch.zeros(2, 3), torch.ones(2, 3)) == 0


def test_fgsm_ga_regulariser_reaches_the_weights_only_through_g2(monkeypatch):
    import methods.fgsm_ga as ga

    m = _method("fgsm-ga")
    b = _batch()
    seen = {}

    def spy(g1, g2, dist):
        seen.update(g1=g1, g2=g2)
        return gradalign_reg(g1, g2, dist)

    monkeypatch.setattr(ga, "gradalign_reg", spy)
    modes = _record_modes(m.model)
    inputs = _inputs(m.model)
    ref = copy.deepcopy(m.model)
    m.train_step(b, 0, 0)
    assert not seen["g1"].requires_grad and seen["g1"].grad_fn is None  # detached
    assert seen["g2"].requires_grad and seen["g2"].grad_fn is not None  # create_graph: double backprop
    assert all(s == {True} for s in modes) and len(modes) == 3
    # g1 is the gradient at δ = 0 (the clean image), the training input the zero-init FGSM example
    assert torch.equal(inputs[0], b.x)
    x0 = b.x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(ref.train()(x0), b.y), x0)
    assert torch.allclose(seen["g1"], g1, atol=1e-6)
    assert torch.allclose(inputs[1], (b.x + EPS * g1.sign()).clamp(0, 1), atol=1e-7)
    # g2 is at x + U(−ε, ε), not clipped
    assert (inputs[2] - b.x).abs().max() <= EPS + 1e-7
    # the regulariser has a non-zero gradient w.r.t. the weights (through g2)
    model2 = _method("fgsm-ga").model
    eta = (torch.rand_like(b.x) * 2 - 1) * EPS
    xe = (b.x + eta).requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(model2(xe), b.y), xe, create_graph=True)
    reg_grads = torch.autograd.grad(gradalign_reg(g1, g2), list(model2.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in reg_grads)


# ------------------------------------------------------------------------------------------------------ ATAS


def _loop_crop_flip(x, oy, ox, flip, h, w):  # the official per-example loop, as a reference
    out = torch.zeros(x.shape[0], x.shape[1], h, w)
    for i in range(x.shape[0]):
        out[i] = x[i, :, int(oy[i]):int(oy[i]) + h, int(ox[i]):int(ox[i]) + w]
        if flip[i]:
            out[i] = torch.flip(out[i], [2])
    return out


def test_atas_crop_flip_matches_the_loop_and_write_back_is_its_inverse():
    torch.manual_seed(0)
    buf = torch.randn(12, 3, 40, 40)
    oy, ox = torch.randint(0, 9, (12,)), torch.randint(0, 9, (12,))
    flip = torch.arange(12) % 2 == 0
    crops = crop_flip(buf, oy, ox, flip, 32, 32)
    assert torch.equal(crops, _loop_crop_flip(buf, oy, ox, flip, 32, 32))
    new = torch.randn(12, 3, 32, 32)
    out = uncrop_flip_(buf.clone(), new, oy, ox, flip)
    assert torch.equal(crop_flip(out, oy, ox, flip, 32, 32), new)  # reading back through the transform
    # outside each window the buffer is unchanged; inside, the un-flipped values
    for i in range(12):
        mask = torch.ones(40, 40, dtype=torch.bool)
        mask[oy[i]:oy[i] + 32, ox[i]:ox[i] + 32] = False
        assert torch.equal(out[i][:, mask], buf[i][:, mask])
        win = out[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        assert torch.equal(win, new[i].flip(2) if flip[i] else new[i])


def test_atas_step_sizes_stay_in_bounds_and_follow_the_running_norm():
    m = _method("atas", n=8)
    idx = torch.arange(8)
    g = torch.randn(8, 3, 32, 32) * torch.logspace(-6, 2, 8)[:, None, None, None]
    warm = m.step_sizes(g, idx, epoch=4)  # 1-based epoch 5: still warm-up
    assert torch.all(warm == EPS) and torch.count_nonzero(m.gdnorm) == 0
    eta = m.step_sizes(g, idx, epoch=5)
    assert torch.all(eta >= 4 / 255 - 1e-9) and torch.all(eta <= 14 / 255 + 1e-9)
    assert eta[0] == pytest.approx(14 / 255) and eta[-1] == pytest.approx(4 / 255)
    v = 0.5 * g.flatten(1).norm(dim=1) ** 2
    assert torch.allclose(m.gdnorm, v)
    mid = (2 * 8 / 255) / (1 + v.sqrt() / 0.01)
    inside = (mid > 4 / 255) & (mid < 14 / 255)
    assert inside.any() and torch.allclose(eta[inside], mid[inside])
    m.step_sizes(g, idx, epoch=6)
    assert torch.allclose(m.gdnorm, 0.5 * v + 0.5 * g.flatten(1).norm(dim=1) ** 2)


def test_atas_step_attacks_in_eval_mode_trains_in_train_mode_and_writes_back():
    m = _method("atas", n=40)
    b = _batch(n=16, idx=torch.arange(10, 26))
    modes = _record_modes(m.model)
    inputs = _inputs(m.model)
    delta0 = m.delta.clone()
    torch.manual_seed(7)
    m.train_step(b, 0, 0)
    assert modes == [{False}, {True}]
    torch.manual_seed(7)
    oy, ox, flip = m.transform(16, b.x.device)
    x_aug = crop_flip(F.pad(b.x, (4, 4, 4, 4)), oy, ox, flip, 32, 32)
    x_init = (x_aug + crop_flip(delta0[b.idx], oy, ox, flip, 32, 32)).clamp(0, 1)
    assert torch.equal(inputs[0], x_init)
    x_adv = inputs[1]
    assert (x_adv - x_aug).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # the buffer of the batch's examples now holds x′ − x_aug in their windows; other examples are untouched
    assert torch.allclose(crop_flip(m.delta[b.idx], oy, ox, flip, 32, 32), x_adv - x_aug, atol=1e-7)
    others = torch.ones(40, dtype=torch.bool)
    others[b.idx] = False
    assert torch.equal(m.delta[others], delta0[others])


def _redraw_epochs(m, epochs):
    """The 1-based epochs at whose start ATAS re-draws its buffer."""
    out = []
    for epoch in range(epochs):
        before = m.delta.clone()
        m.begin_epoch(epoch)
        if not torch.equal(before, m.delta):
            out.append(epoch + 1)
    return out


def test_atas_redraws_the_buffer_every_10_epochs_but_not_before_the_last():
    assert _redraw_epochs(_method("atas", n=4, epochs=30), 30) == [10, 20]
    m = _method("atas", n=4, epochs=20)
    assert _redraw_epochs(m, 20) == [10]
    assert m.delta.abs().max() <= EPS and m.delta.shape == (4, 3, 40, 40)


def test_atas_gets_unaugmented_batches_with_their_indices(tmp_path, synthetic):
    req = small_request(tmp_path, methods=["atas"], epochs=1, subset=4, batch_size=16)
    cfg = plan(req)[0].cfg
    t = Trainer(cfg, synthetic, RunDir(tmp_path / "r"), progress=False, echo=lambda s: None)
    batch = next(iter(t.loader.epoch(0)))
    assert torch.equal(batch.x, t.train_split.x[batch.idx].float() / 255)  # no crop, no flip
    pad = t.spec.crop_pad  # the padded buffer follows the dataset's crop padding
    assert t.method.delta.shape == (40, 3, 32 + 2 * pad, 32 + 2 * pad) and t.method.pad == pad


# ------------------------------------------------------------------------------------------------------ all


@pytest.mark.slow
@pytest.mark.parametrize("method", FAMILY)
def test_resume_mid_run_equals_an_uninterrupted_run(tmp_path, synthetic, method):
    sets = {"trades": ["trades.attack_steps=2"], "free-at": ["free-at.replays=2"],
            "fgsm-rs": ["fgsm-rs.early_stop=true"], "fgsm-ga": [],
            "atas": ["atas.warmup_epochs=1", "atas.reset_every=2"]}[method]
    req = small_request(tmp_path, methods=[method], epochs=3, subset=10, batch_size=32, sets=sets)
    cfg = plan(req)[0].cfg
    a, _ = resumed_equals_straight(cfg, synthetic, tmp_path)
    assert all(math.isfinite(r["loss"]) for r in a.run.read_metrics())


# ------------------------------------------------------------------------------------------------------ exact steps


def test_free_at_delta_step_is_plus_eps_sign_of_the_input_gradient():
    m = _method("free-at", replays=1)
    b = _batch()
    ref = copy.deepcopy(m.model).train()
    m.train_step(b, 0, 0)
    d0 = torch.zeros_like(b.x).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ref(b.x + d0), b.y), d0)
    want = torch.max(torch.min((EPS * g.sign()).clamp(-EPS, EPS), 1 - b.x), -b.x)
    assert torch.allclose(m.delta[:16], want, atol=1e-7)
    assert not torch.allclose(m.delta[:16], -want, atol=1e-7)


def test_free_at_delta_moves_at_pixels_on_the_bounds_of_the_valid_range():
    """Pixels at 0 or 1 (saturated images, or where the range clip put x + δ on a bound) must keep moving: a clip in
    the forward has gradient 0 there and would freeze δ (issue 23)."""
    m = _method("free-at", replays=1)
    b = _batch()
    b.x[:, :, :8] = 0.0   # black rows
    b.x[:, :, 8:16] = 1.0  # white rows
    ref = copy.deepcopy(m.model).train()
    m.train_step(b, 0, 0)
    d0 = torch.zeros_like(b.x).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ref(b.x + d0), b.y), d0)
    black, white = torch.zeros_like(b.x, dtype=torch.bool), torch.zeros_like(b.x, dtype=torch.bool)
    black[:, :, :8], white[:, :, 8:16] = True, True
    up, down = black & (g > 0), white & (g < 0)  # the directions the range allows
    assert up.sum() > 100 and down.sum() > 100
    assert torch.allclose(m.delta[:16][up], torch.full_like(m.delta[:16][up], EPS))
    assert torch.allclose(m.delta[:16][down], torch.full_like(m.delta[:16][down], -EPS))


def test_atas_warm_up_step_is_eps_along_the_eval_mode_gradient():
    m = _method("atas", n=16)
    b = _batch(n=16)
    ref = copy.deepcopy(m.model).eval()
    inputs = _inputs(m.model)
    delta0 = m.delta.clone()
    torch.manual_seed(11)
    m.train_step(b, 0, 0)  # epoch 0: warm-up, η = ε
    torch.manual_seed(11)
    oy, ox, flip = m.transform(16, b.x.device)
    x_aug = crop_flip(F.pad(b.x, (4, 4, 4, 4)), oy, ox, flip, 32, 32)
    x_init = (x_aug + crop_flip(delta0[b.idx], oy, ox, flip, 32, 32)).clamp(0, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ref(x_init), b.y), x_init)
    want = torch.min(torch.max(x_init.detach() + EPS * g.sign(), x_aug - EPS), x_aug + EPS).clamp(0, 1)
    assert torch.allclose(inputs[1], want, atol=1e-6)


def test_fgsm_ga_weight_gradient_is_ce_plus_lambda_times_the_regulariser():
    m = _method("fgsm-ga")
    b = _batch()
    ref = copy.deepcopy(m.model).train()
    grads = {}
    m.optimizer.step = lambda *a, **k: grads.update({n: p.grad.clone() for n, p in m.model.named_parameters()})
    torch.manual_seed(4)
    m.train_step(b, 0, 0)
    torch.manual_seed(4)
    x0 = b.x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(ref(x0), b.y), x0)
    x_adv = (b.x + EPS * g1.sign()).clamp(0, 1)
    ce = F.cross_entropy(ref(x_adv), b.y)
    eta = ((torch.rand(b.x.shape) * 2 - 1) * EPS).requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(ref(b.x + eta), b.y), eta, create_graph=True)
    params = list(ref.parameters())
    full = torch.autograd.grad(ce + 0.2 * gradalign_reg(g1, g2), params, retain_graph=True)
    ce_only = torch.autograd.grad(ce, params)
    names = [n for n, _ in ref.named_parameters()]
    assert all(torch.allclose(grads[n], g, atol=1e-5) for n, g in zip(names, full))
    assert any(not torch.allclose(grads[n], g, atol=1e-5) for n, g in zip(names, ce_only))
