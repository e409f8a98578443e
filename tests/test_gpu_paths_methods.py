"""The CUDA-only paths of the methods and of ``bench.dist``, tested on a CPU wherever a CPU can show them (issue 24,
points 2, 6 and 8): every method steps compiled as it steps eagerly (FGSM-GA's double backward included); no host
sync inside a training step of ATAS or FGSM-GA or a train-mode forward of the suite's SyncBatchNorm, with the same
numbers as before; one GPU per local rank; bf16 only where the GPU computes it."""
import contextlib
import copy

import pytest
import torch

import bench.dist as bdist
from bench.dist import SyncBatchNorm, check_bf16, rank_device
from bench.errors import BenchError
from bench.loader import Batch
from bench.models import create_model
from methods import METHODS, get_method
from methods.fgsm_ga import gradalign_reg


def _xy(n=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def _method(name, model, n=16, **hp_over):
    cls = get_method(name)
    hp = cls.resolved_defaults()
    hp.update(batch_size=n, **hp_over)
    if "attack_steps" in hp:
        hp["attack_steps"] = 2
    if name == "rift":
        hp["module"] = "fc"  # the MRC stage's choice, given
    teacher = copy.deepcopy(model) if cls.starts_from != "scratch" else None
    info = {"n": n, "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    return cls(hp, model, teacher, steps_per_epoch=1, info=info)


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_syncs(copies: list | None = None):
    """Inside: every way the suite's code could make the host wait for the device raises :class:`HostSync` — a
    tensor read on the host (``item``, ``tolist``, ``bool``, ``float``, ``int``), a boolean-mask index (its size is
    data-dependent), a tensor made from host data (``torch.tensor``, ``new_tensor``); ``copies`` receives one entry
    per ``.to(<device>)`` (a host-to-device copy on a GPU machine)."""
    def refuse(what):
        def f(*a, **k):
            raise HostSync(what)
        return f

    real_getitem, real_to = torch.Tensor.__getitem__, torch.Tensor.to

    def getitem(self, idx):
        parts = idx if isinstance(idx, tuple) else (idx,)
        if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
            raise HostSync("boolean-mask index")
        return real_getitem(self, idx)

    def to(self, *a, **k):
        if copies is not None and any(isinstance(v, (torch.device, str)) for v in (*a, *k.values())):
            copies.append(1)
        return real_to(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "new_tensor"):
            mp.setattr(torch.Tensor, name, refuse(name))
        mp.setattr(torch.Tensor, "__getitem__", getitem)
        mp.setattr(torch.Tensor, "to", to)
        mp.setattr(torch, "tensor", refuse("torch.tensor"))
        yield


def test_the_sync_detector_catches_what_it_should():
    t = torch.ones(3)
    for f in (lambda: bool(t.any()), lambda: t.sum().item(), lambda: t[t > 0], lambda: torch.tensor([1]),
              lambda: float(t.sum())):
        with no_host_syncs(), pytest.raises(HostSync):
            f()
    copies = []
    with no_host_syncs(copies):
        t[torch.arange(2)].to("cpu")
    assert copies == [1]


# ------------------------------------------------------------------------------------------- 2: --compile


def _old_gradalign_reg(g1, g2):
    """The boolean-indexed single-process form the suite had before (a host sync per step): the reference."""
    a, b = g1.flatten(1), g2.flatten(1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    keep = (na != 0) & (nb != 0)
    if not bool(keep.any()):
        return torch.zeros(())
    return 1.0 - ((a[keep] / na[keep, None]) * (b[keep] / nb[keep, None])).sum(dim=1).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_rows", [(), (1,), (0, 1, 2, 3, 4, 5, 6)])
def test_gradalign_decides_on_the_device_with_the_same_value_and_gradient(dtype, zero_rows):
    torch.manual_seed(0)
    g1, g2 = torch.randn(7, 3, 4, 4, dtype=dtype), torch.randn(7, 3, 4, 4, dtype=dtype)
    g1[list(zero_rows)] = 0
    a, b = g2.clone().requires_grad_(True), g2.clone().requires_grad_(True)
    with no_host_syncs():
        new = gradalign_reg(g1, a)
        new.backward()
    old = _old_gradalign_reg(g1, b)
    if old.requires_grad:
        old.backward()
    if not zero_rows:  # every example kept: bit for bit what the suite computed before
        assert torch.equal(new.detach(), old.detach()) and torch.equal(a.grad, b.grad)
    else:
        torch.testing.assert_close(new.detach(), old.detach().to(dtype), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.grad, b.grad if b.grad is not None else torch.zeros_like(a), rtol=1e-6,
                                   atol=1e-8)


def test_an_fgsm_ga_step_makes_no_host_sync(tiny_model):
    m = _method("fgsm-ga", tiny_model.train())
    x, y = _xy(16)
    with no_host_syncs():
        out = m.train_step(Batch(x, y, torch.arange(16)), 0, 0)
    assert float(out["loss_gradalign"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_every_method_steps_compiled_as_it_steps_eagerly(tiny_model, name):
    """One training step of every registered method with ``compile()`` (as ``--compile`` does) runs — FGSM-GA's
    double backward through its eager g₂ forward — and moves the weights as the eager step does (fp64, where
    compiled and eager attacks agree pixel for pixel: tests/test_speed.py)."""
    tiny_model.double().train()
    built = []
    for _ in range(2):
        torch.manual_seed(0)  # the same state drawn at construction (ATAS's δ)
        built.append(_method(name, copy.deepcopy(tiny_model)))
    eager, comp = built
    comp.compile()
    start = [p.detach().clone() for p in eager.model.parameters()]
    x, y = _xy(16, dtype=torch.float64)
    for m in (eager, comp):
        torch.manual_seed(1)
        m.begin_epoch(0)
        m.train_step(Batch(x, y, torch.arange(16)), 0, 0)
    d_e = torch.cat([(p.detach() - s).flatten() for p, s in zip(eager.model.parameters(), start)])
    d_c = torch.cat([(p.detach() - s).flatten() for p, s in zip(comp.model.parameters(), start)])
    assert d_e.abs().max() > 1e-6, "the step moves the weights"
    assert (d_c - d_e).norm() <= 1e-9 * d_e.norm()
    for a, b in zip(eager.model.buffers(), comp.model.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------- 6: no host sync in a step


def _atas(n=40, bs=16):
    torch.manual_seed(0)
    model = create_model("smallcnn", 10).train()
    m = _method("atas", model, n=n, warmup_epochs=0)  # past the warm-up: the adaptive step sizes run too
    m.steps_per_epoch = -(-n // bs)
    m.hp["batch_size"] = bs
    return m


def _atas_epoch(m, x, y, bs, copies=None, plan=True):
    """One epoch of ``m`` over (x, y) in batches of ``bs``: with the engine's hooks (``plan``), or as a step called
    on its own (each step draws its crops)."""
    torch.manual_seed(5)
    if plan:
        m.begin_epoch(0)
    for step in range(m.steps_per_epoch):
        idx = torch.arange(step * bs, min((step + 1) * bs, x.shape[0]))
        with no_host_syncs(copies) if plan else contextlib.nullcontext():
            m.train_step(Batch(x[idx], y[idx], idx), 0, step)
    return m.end_epoch(0)


def test_atas_steps_copy_nothing_to_the_device_and_draw_the_same_numbers():
    """The epoch's crops and flips are drawn at its start, in the order its steps drew them, and copied once: no
    step makes a host-to-device copy or a host sync, and the epoch trains exactly as per-step draws do."""
    x, y = _xy(40, seed=3)
    planned, ref = _atas(), _atas()
    copies = []
    rows = _atas_epoch(planned, x, y, 16, copies)
    assert copies == [], f"{len(copies)} host-to-device copies in the steps of an epoch"
    assert rows == _atas_epoch(ref, x, y, 16, plan=False)
    for a, b in ((planned.model.state_dict(), ref.model.state_dict()),
                 ({"delta": planned.delta, "gdnorm": planned.gdnorm}, {"delta": ref.delta, "gdnorm": ref.gdnorm})):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert planned.plan is None  # used up by the epoch


def test_atas_plan_is_the_global_batchs_under_data_parallelism():
    """On a shard of each global batch (2 ranks, 7 = 4 + 3 images) a rank's crops are its rows of the global
    batch's, as per-step draws give them."""
    m = _atas(n=7, bs=7)
    torch.manual_seed(2)
    m.plan_epoch()
    torch.manual_seed(2)
    ref = m.draw(7)
    d = bdist.Dist(1, 2)
    s = d.shard(7)
    with d.step(s):
        oy, ox, flip = m.step_transform(s.size, 0, torch.device("cpu"))
    assert torch.equal(torch.stack([oy, ox, flip.long()], 1), ref[s.rows])
    with d.step(s), pytest.raises(RuntimeError, match="ATAS step 1"):
        m.step_transform(s.size, 1, torch.device("cpu"))


@pytest.fixture
def two_ranks(monkeypatch):
    """A fake process group of 2 ranks seen from rank 0, whose all-reduce adds rank 1's slot: a copy of rank 0's
    (so the global batch is the local batch twice)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(bdist, "all_reduce_sum", lambda t: t + t.roll(1, 0))


@pytest.mark.parametrize("total", [6, 1])
def test_sync_bn_train_forward_makes_no_host_sync(two_ranks, total):
    torch.manual_seed(0)
    x = torch.randn(total, 3, 5, 5) * 3 + 2
    bn = torch.nn.BatchNorm2d(3)
    sbn = SyncBatchNorm(3)
    sbn.load_state_dict(bn.state_dict())
    xr = x.clone().requires_grad_(True)
    with no_host_syncs():
        y = sbn.train()(xr)
        (g,) = torch.autograd.grad((y ** 3).mean(), xr, create_graph=True)
        g.pow(2).sum().backward()
    full = bn.train()(torch.cat([x, x]))  # the global batch: these rows twice
    torch.testing.assert_close(y.detach(), full[:total].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sbn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sbn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(sbn.num_batches_tracked) == 1


# ------------------------------------------------------------------- 8: one GPU per rank, bf16 where native


def _fake_cuda(monkeypatch, count=1, capability=(8, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.version, "hip", None)


def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    _fake_cuda(monkeypatch, count=2)
    assert rank_device("auto", 1, local_world=2) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert rank_device("cuda", 0) == torch.device("cuda", 0)
    for local_rank, world in ((0, 3), (2, 3), (3, None)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world or 4))
        with pytest.raises(BenchError, match=r"^[34] processes on this machine \(local rank \d\) but 2 GPU\(s\) "
                                             r"visible: ranks would share a GPU; accepted: at most 2 processes per "
                                             r"machine \(torchrun --nproc-per-node 2\), or --device cpu$"):
            rank_device("auto", local_rank, local_world=world)
    assert rank_device("cpu", 5, local_world=8) == torch.device("cpu")  # CPU ranks share the CPU, as ever


def test_bf16_on_a_gpu_without_native_bf16_is_refused(monkeypatch):
    _fake_cuda(monkeypatch, capability=(7, 0))
    with pytest.raises(BenchError, match=r"--precision bf16 on cuda:0 \(Tesla V100-SXM2-16GB, compute capability "
                                         r"7.0\): no native bf16.*accepted: --precision fp32"):
        check_bf16(torch.device("cuda", 0))
    check_bf16(torch.device("cuda", 0), "fp32")  # other precisions and devices pass
    check_bf16("cpu")
    _fake_cuda(monkeypatch, capability=(8, 0))
    check_bf16(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: bf16 on every GPU it supports
    check_bf16(torch.device("cuda", 0))


def test_sync_bn_train_forward_is_one_graph_under_compile(two_ranks):
    """No host decision inside the forward: torch.compile traces two SyncBatchNorm layers as one graph (a host
    ``if`` on the global count broke the graph at every layer)."""
    import torch._dynamo

    torch._dynamo.reset()
    net = torch.nn.Sequential(SyncBatchNorm(3), torch.nn.ReLU(), SyncBatchNorm(3)).train()
    ex = torch._dynamo.explain(net)(torch.randn(4, 3, 5, 5))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
