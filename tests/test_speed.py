"""The engine's speed features change how fast, never what is computed: the compiled attack forward
(:class:`bench.attacks.ParamsDetached`) and its fused PGD step (:class:`bench.attacks.CompiledAttackForward`), the
fused SGD, dynamo's reset per method, and the side-by-side timing of
``bench perf`` (no timing is asserted: only what is timed, in what order, and with which settings)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from bench.attacks import CompiledAttackForward, ParamsDetached, pgd, project, sign_step
from bench.errors import BenchError
from bench.loader import Batch
from bench.perf import engine_settings, time_interleaved
from methods import get_method


def _xy(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _input_grad(f, x, y, loss_fn=F.cross_entropy):
    xi = x.clone().requires_grad_(True)
    logits = f(xi)
    (g,) = torch.autograd.grad(loss_fn(logits, y), xi)
    return logits.detach(), g


@pytest.mark.parametrize("train", [False, True])
def test_params_detached_is_the_module_with_no_path_to_its_parameters(tiny_model, train):
    x, y = _xy()
    ref = copy.deepcopy(tiny_model).train(train)
    wrapped = ParamsDetached(tiny_model.train(train))
    l0, g0 = _input_grad(ref, x, y)
    l1, g1 = _input_grad(wrapped, x, y)
    # the same function and input gradient, bit for bit: functional_call runs the same eager kernels on the same
    # tensors in one process, whatever the CPU's ISA or thread count (bit-equal on a 2-core AMD EPYC, AVX-512)
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    # train-mode BN updates the module's own running statistics, exactly as the module does
    for a, b in zip(ref.buffers(), tiny_model.buffers()):
        assert torch.equal(a, b)
    if train:
        assert not torch.equal(ref.body[1].running_mean, torch.zeros_like(ref.body[1].running_mean))
    # the defining property: no gradient reaches a parameter through it
    assert not wrapped(x).requires_grad and ref(x).requires_grad
    assert all(p.grad is None for p in tiny_model.parameters())
    # and the module's own parameters are untouched (still leaves that require gradients)
    assert all(p.requires_grad and p.is_leaf for p in tiny_model.parameters())


@pytest.mark.slow
def test_the_compiled_attack_forward_carries_no_parameter_gradient(tiny_model):
    """Compiled (as the engine compiles it), the attack forward's graph has parameters that do not require
    gradients, so its backward computes the input gradient only; the compiled training forward keeps them."""
    m = get_method("pgd-at")(get_method("pgd-at").resolved_defaults(), tiny_model.eval())
    m.compile()
    assert isinstance(m.attack_net, CompiledAttackForward) and m.attack_net.model is m.model
    assert isinstance(m.attack_net.forward._orig_mod, ParamsDetached) and m.attack_net.detached.module is m.model
    assert m.net._orig_mod is m.model
    x, y = _xy()
    assert not m.attack_net(x).requires_grad and m.net(x).requires_grad
    l0, g0 = _input_grad(m.model, x, y)
    l1, g1 = _input_grad(m.attack_net, x, y)
    # 2-core AMD EPYC (AVX-512; also with inductor and oneDNN held to AVX2): logits 7e-9 apart, 7e-4 of the allowed;
    # input gradients 5e-12 apart, 5e-5 of it: margins > 1000×, far above any other vectorisation's rounding
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in m.model.parameters())


def _kl_target(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "trades-kl"])
def test_the_fused_pgd_step_is_the_eager_step(tiny_model, loss):
    """Eval mode: one compiled graph (no graph break) of forward, loss, input gradient, sign and projection, whose
    step is the eager one wherever the gradient's sign is not a rounding's call; no parameter gradient, no BN update.
    The KL case runs in float64: near x its gradient is the difference of two nearly equal softmaxes, whose fp32
    rounding (compiled vs eager) reached 2e-3 of its largest entry on a 2-core AMD EPYC with AVX-512 (4e-4 with AVX2
    code), above the 1e-3 cut below; in fp64 1e-12. The CE case stays fp32 (there 3e-7: a margin of 3000×)."""
    from methods.trades import kl_sum

    model = tiny_model.eval()
    x, y = _xy(16)
    if loss == "trades-kl":
        model, x = model.double(), x.double()
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    loss_fn, target = (F.cross_entropy, y) if loss == "ce" else (kl_sum, _kl_target(model, x))
    buffers = [b.clone() for b in model.buffers()]
    torch._dynamo.reset()  # each CompiledAttackForward is a cache entry of one code object: stay under its limit
    caf = CompiledAttackForward(model)
    explained = torch._dynamo.explain(caf._sign_step)(x_adv, x, target, loss_fn, 2 / 255, 8 / 255)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    fused = caf.fused_sign_step(x_adv, x, target, loss_fn, 2 / 255, 8 / 255)
    eager = sign_step(model, x_adv, x, target, step=2 / 255, eps=8 / 255, loss_fn=loss_fn)
    _, g = _input_grad(model, x_adv, target, loss_fn)
    # where fp32 rounding cannot flip the sign (near x the KL gradient is ~1e-8 at most, its smallest entries noise)
    clear = g.abs() > 1e-3 * g.abs().max()
    assert clear.float().mean() > 0.9
    assert torch.equal(fused[clear], eager[clear])
    # control: the step of the other loss differs on ~40 % of those pixels, so a wrong fused loss is caught
    other_fn, other_t = (kl_sum, _kl_target(model, x)) if loss == "ce" else (F.cross_entropy, y)
    other = sign_step(model, x_adv, x, other_t, step=2 / 255, eps=8 / 255, loss_fn=other_fn)
    assert (other[clear] != fused[clear]).float().mean() > 0.2
    assert torch.equal(eager, project(x_adv + 2 / 255 * g.sign(), x, 8 / 255))  # the eager step is the definition
    assert not fused.requires_grad and (fused - x).abs().max() <= 8 / 255 + 1e-6
    assert fused.min() >= 0 and fused.max() <= 1
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


@pytest.mark.slow
def test_the_attacks_take_the_fused_step_in_eval_mode_only(tiny_model):
    """PGD (bn="eval") and TRADES' attack step through the fused graph, every step; a train-mode attack (bn="train",
    Free-AT / FGSM-RS) does not (``torch.func.grad`` cannot update BN buffers): it steps through the compiled
    forward and updates the running statistics as the eager model does."""
    import torch._dynamo

    from methods.trades import trades_attack

    torch._dynamo.reset()  # every CompiledAttackForward is a cache entry of one code object: stay under its limit

    model = tiny_model
    caf = CompiledAttackForward(model)
    calls = []
    inner = caf._step
    caf._step = lambda *a: calls.append(1) or inner(*a)
    x, y = _xy(16)
    pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=3, bn="eval", forward=caf)
    assert len(calls) == 3
    trades_attack(model, x, eps=8 / 255, step=0.007, steps=2, forward=caf)
    assert len(calls) == 5
    assert model.training  # the attacks restore the mode they found

    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    a = pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=2, bn="train", forward=caf)
    torch.manual_seed(1)
    b = pgd(ref, x, y, eps=8 / 255, step=2 / 255, steps=2, bn="train")
    assert len(calls) == 5  # not fused
    # two fp32 sign steps, compiled vs eager: 0 pixels differ on a 2-core AMD EPYC (AVX-512 and AVX2 code alike), the
    # CE gradient's rounding being 3e-7 of its largest entry; a flip needs |∇| that small, the bound allows 491 pixels
    assert (a - b).abs().gt(1e-6).float().mean() < 0.01
    for p, q in zip(model.buffers(), ref.buffers()):  # measured: 0.7 % of the allowed (margin 140×)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert not torch.equal(model.body[1].running_mean, torch.zeros(8))  # they did move
    assert int(model.body[1].num_batches_tracked) == int(ref.body[1].num_batches_tracked) == 2


@pytest.mark.slow
# a pick, one per kind of compiled forward (PGD, AFD's backbone, the AFT teachers, TRADES's KL attack); every method
# compiled: tests/test_gpu_paths_methods.py
@pytest.mark.parametrize("name", ["pgd-at", "afd", "afkd", "arrest", "trades"])
def test_a_compiled_method_steps_as_the_eager_one(tiny_model, name):
    """One training step of the compiled method (its forwards compiled, the attack's steps fused; AFD's backbone and
    the AFT teachers' features too) moves the weights as the eager method does, in float64. In fp32 the difference
    is decided by rounding, amplified by the attack's signs and by ReLU masks flipping at their kink, and depends on
    the CPU's code: on a 2-core AMD EPYC, 0.16 % (PGD-AT) and 0.56 % (AFKD, ARREST) with AVX-512 code but 2e-6
    with AVX2 code, where instead AFD's attacks differed in 127 pixels and its update by 1.1 % (buffers: 35 % of
    a 3 % tolerance). In fp64 every attack agrees pixel for pixel and the updates to 1e-14 in norm, whatever the
    code; one changed label moves them by 12-36 % (the control below). TRADES is compared in two parts: its attack
    (a KL ascent whose gradient near x is so small on an untrained model that rounding decides signs in fp32, so
    the model's logits are scaled ×10 and the start is 0.03·N(0, I)) and, given one and the same x′, its update
    (three compiled train-mode forwards)."""
    tiny_model.double()
    cls = get_method(name)
    hp = cls.resolved_defaults()
    if name == "trades":
        hp["init_std"] = 0.03
        with torch.no_grad():
            tiny_model.fc.weight.mul_(10)
    teacher = copy.deepcopy(tiny_model) if cls.starts_from != "scratch" else None
    eager = cls(hp, copy.deepcopy(tiny_model), copy.deepcopy(teacher))
    comp = cls(hp, copy.deepcopy(tiny_model), copy.deepcopy(teacher))
    wrong = cls(hp, copy.deepcopy(tiny_model), copy.deepcopy(teacher))  # the control: eager, one label changed
    comp.compile()
    start = [p.detach().clone() for p in eager.model.parameters()]
    x, y = _xy(16)
    x = x.double()
    if name == "trades":
        from methods.trades import kl_sum

        adv = []
        for m in (eager, comp):
            torch.manual_seed(1)
            adv.append(m.attack(x))
        assert (adv[0] != adv[1]).float().mean() <= 1e-3  # fp64: 0 of 49 152 pixels differ (fp32, AVX2 code: 1.5 %)
        with torch.no_grad():
            eager.model.eval()
            kl = [float(kl_sum(eager.model(a), eager.model(x))) for a in adv]
        assert kl[0] > 0 and kl[1] == pytest.approx(kl[0], rel=1e-3)
        for m in (eager, comp, wrong):
            m.attack = lambda _x, xa=adv[0]: xa  # the update's comparison: the same x′ for both
    y_wrong = y.clone()
    y_wrong[0] = (y_wrong[0] + 1) % 10
    for m, labels in ((eager, y), (comp, y), (wrong, y_wrong)):
        torch.manual_seed(1)
        m.train_step(Batch(x, labels, torch.arange(16)), 0, 0)
    d_e = torch.cat([(p.detach() - s).flatten() for p, s in zip(eager.model.parameters(), start)])
    d_c = torch.cat([(p.detach() - s).flatten() for p, s in zip(comp.model.parameters(), start)])
    d_w = torch.cat([(p.detach() - s).flatten() for p, s in zip(wrong.model.parameters(), start)])
    assert d_e.abs().max() > 1e-4
    # in norm, fp64: measured ≤ 1.4e-14 (margin 7e4); the control, one label of 16 changed, ≥ 0.12
    assert (d_c - d_e).norm() <= 1e-9 * d_e.norm()
    assert (d_w - d_e).norm() >= 1e-2 * d_e.norm()
    for a, b in zip(eager.model.buffers(), comp.model.buffers()):  # measured: 1e-11 relative at most
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_compile_without_reset_or_fused_step_for_the_ablation(tiny_model, monkeypatch):
    """``bench perf --ablate-fused-step`` builds its second engine with ``compile(reset=False, fused_step=False)``:
    the first engine's graphs stay, and the attack steps through the compiled forward with eager steps."""
    import torch._dynamo

    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(torch, "compile", lambda mod: mod)
    m = get_method("pgd-at")(get_method("pgd-at").resolved_defaults(), tiny_model.eval())
    m.compile(reset=False, fused_step=False)
    assert calls == [] and m.attack_net.fused is False
    x, y = _xy(4)
    assert m.attack_net.fused_sign_step(x, x, y, F.cross_entropy, 0.01, 0.03) is None  # never fused
    m.compile()
    assert calls == ["reset"] and m.attack_net.fused is True


def test_afd_compiles_its_disentangled_model_for_both_forwards(tiny_model, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda mod: compiled.append(mod) or mod)
    cls = get_method("afd")
    m = cls(cls.resolved_defaults(), tiny_model, copy.deepcopy(tiny_model))
    m.compile()
    assert m.net is m.model and type(m.model).__name__ == "Disentangled"
    assert isinstance(m.attack_net, CompiledAttackForward) and m.attack_net.detached.module is m.model
    # what AFD's step runs: the backbone of heads() and the teacher's features, each compiled (identity here)
    assert m.backbone == m.model.base.features and m.teacher_net == m.teacher.features
    assert m.model.base.features in compiled and m.teacher.features in compiled
    eager = cls(cls.resolved_defaults(), copy.deepcopy(tiny_model), copy.deepcopy(tiny_model))
    assert eager.backbone is None and eager.teacher_net == eager.teacher.features  # not compiled: the modules'


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_fused_sgd_is_the_same_update(tiny_model, nesterov):
    """Three natural steps with the fused SGD (a GPU's default) and with the for-loop SGD (a CPU's) reach the same
    weights and momenta up to fp32 rounding; the CPU default stays the for-loop one."""
    cls = get_method("natural")
    hp = {**cls.resolved_defaults(), "nesterov": nesterov, "weight_decay": 5e-3}
    a = cls(hp, copy.deepcopy(tiny_model))
    b = cls(hp, copy.deepcopy(tiny_model), fused=True)
    assert a.fused is False and not a.optimizer.param_groups[0]["fused"]
    assert b.optimizer.param_groups[0]["fused"] is True
    x, y = _xy(16)
    for step in range(3):
        batch = Batch(x, y, torch.arange(16))
        a.train_step(batch, 0, step)
        b.train_step(batch, 0, step)
    moved = max((p - q).abs().max().item() for p, q in zip(a.model.parameters(), tiny_model.parameters()))
    diff = max((p - q).abs().max().item() for p, q in zip(a.model.parameters(), b.model.parameters()))
    # 2-core AMD EPYC (AVX-512): diff ≤ 5e-8·moved, momenta 0.9 % of the allowed (AVX2 code the same): margins
    # > 100×; the SGD arithmetic is elementwise (no reduction order for the ISA or the threads to change)
    assert moved > 1e-3 and diff <= 1e-5 * moved
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(a.optimizer.state[p]["momentum_buffer"], b.optimizer.state[q]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-7)


def test_every_method_optimiser_takes_the_fused_choice(tiny_model):
    from methods.base import METHODS

    for name in METHODS.names():
        cls = get_method(name)
        teacher = copy.deepcopy(tiny_model) if cls.starts_from != "scratch" else None
        m = cls(cls.resolved_defaults(), copy.deepcopy(tiny_model), teacher, fused=True)
        if name == "rift":  # its one SGD is built when the stage before training has chosen the module
            m._choose("fc", "test")
        assert m.optimizers and all(g["fused"] is True for o in m.optimizers for g in o.param_groups), name


def test_time_interleaved_runs_the_pipelines_side_by_side_in_abba_order():
    calls = []

    def factory(name):
        calls.append(f"build {name}")
        return lambda: calls.append(name)

    res = time_interleaved({"ref": lambda: factory("ref"), "eng": lambda: factory("eng")}, warmup=1, steps=2,
                           repeats=3, device=torch.device("cpu"), batch=4)
    assert calls == ["build ref", "ref", "build eng", "eng",
                     "ref", "ref", "eng", "eng", "eng", "eng", "ref", "ref", "ref", "ref", "eng", "eng"]
    for r in res.values():
        assert r["repeats"] == 3 and len(r["sec_per_step_all"]) == 3 and r["steps"] == 2 and r["warmup"] == 1
        assert r["sec_per_step_min"] <= r["sec_per_step"] <= r["sec_per_step_max"] and r["peak_mem_mb"] > 0


def test_engine_settings_follow_the_device_unless_given(monkeypatch):
    import bench.perf as perf

    cpu = torch.device("cpu")
    monkeypatch.setattr(perf, "_cpp_compiler", lambda: None)
    monkeypatch.setattr(perf, "native_bf16", lambda d: False)
    s = engine_settings(cpu)
    assert (s["precision"], s["compile"], s["channels_last"], s["fused_sgd"]) == ("fp32", False, False, False)
    monkeypatch.setattr(perf, "_cpp_compiler", lambda: "g++")
    monkeypatch.setattr(perf, "native_bf16", lambda d: True)
    s = engine_settings(cpu)
    assert (s["precision"], s["bf16"], s["compile"], s["fused_sgd"]) == ("bf16", True, True, False)
    s = engine_settings(cpu, compile_=False, precision="fp32", channels_last=True)
    assert (s["precision"], s["bf16"], s["compile"], s["channels_last"]) == ("fp32", False, False, True)
    with pytest.raises(BenchError, match=r"precision 'fp16'; accepted: fp32, bf16"):
        engine_settings(cpu, precision="fp16")


def test_bench_perf_refuses_a_bad_precision_in_one_line(tmp_path):
    from click.testing import CliRunner

    from bench.cli import cli

    res = CliRunner().invoke(cli, ["perf", "--device", "cpu", "--precision", "fp8", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "precision 'fp8'; accepted: fp32, bf16" in str(res.exception)
    assert not list(tmp_path.iterdir())


def test_bench_perf_refuses_a_bad_label_before_timing_anything(tmp_path):
    from bench.perf import run_perf

    with pytest.raises(BenchError, match=r"label 'My Run'; accepted: lower-case letters, digits and '-'"):
        run_perf(device="cpu", label="My Run", out_dir=tmp_path, echo=lambda s: None)
    assert not list(tmp_path.iterdir())


def test_each_perf_record_trains_its_own_precision_check(tmp_path, monkeypatch):
    """The check's run identity does not hold the device: a shared directory would hand one device's finished runs
    to another device's record (it did: a 2026-12-01 record reused the AMD runs of 2026-11-25)."""
    import bench.perf as perf

    seen = []

    def fake_check(dev, out_dir, **kw):
        seen.append(out_dir)
        return {"fp32": {"clean": 1.0, "pgd20": 1.0, "n": 1, "run": "a", "device": "cpu"},
                "bf16": {"clean": 1.0, "pgd20": 1.0, "n": 1, "run": "b", "device": "cpu"},
                "difference": {"clean": 0.0, "pgd20": 0.0}, "binomial_se_pp": {"clean": 0.0, "pgd20": 0.0},
                "within_2se": {"clean": True, "pgd20": True}, "setting": "fake"}

    monkeypatch.setattr(perf, "precision_check", fake_check)
    kw = dict(device="cpu", methods=("natural",), batch=4, steps=1, repeats=1, warmup=0, eval_n=4, aa_n=0,
              compile_=False, precision="fp32", science=True, out_dir=tmp_path, echo=lambda s: None)
    a = perf.run_perf(label="one", **kw)
    b = perf.run_perf(label="two", **kw)
    assert seen == [tmp_path / "runs-precision" / a.stem, tmp_path / "runs-precision" / b.stem]
    assert "trained and evaluated on cpu" in a.with_suffix(".md").read_text()
