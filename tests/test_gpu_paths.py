"""The CUDA-only paths, tested on a CPU wherever a CPU can show the behaviour (issue 24): device identity, optimiser
state layouts and flags on resume, full-fp32 evaluation and training, the device of every epoch, per-epoch
randomness copied once, the EMA update."""
import copy

import pytest
import torch

import bench.engine as engine
from bench.attacks import pgd, uniform_noise
from bench.checkpoint import load_state, save_state
from bench.devices import canonical, resolve_device, same_device
from bench.engine import EMA, Trainer
from bench.evaluate import evaluate
from bench.loader import DeviceLoader, augment, hash_seed
from bench.models import create_model
from bench.precision import fp32_math, full_fp32
from bench.records import RunDir
from bench.report import epochs_device
from bench.runner import plan
from helpers import small_request
from methods import get_method
from methods.afd import _step


def _fake_cuda(monkeypatch, current=0, count=1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


# ------------------------------------------------------------------------------------------------ 1: devices


def test_cuda_without_an_index_is_the_current_gpu(monkeypatch):
    _fake_cuda(monkeypatch, current=1, count=2)
    assert canonical("cuda") == torch.device("cuda", 1)
    assert same_device(torch.device("cuda"), torch.device("cuda", 1))
    assert not same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert same_device("cpu", torch.device("cpu", 0)) and not same_device("cpu", "cuda")
    # the devices the suite resolves carry the index their tensors and generators report
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_one_resolve_device_names_the_device_of_one_process_and_of_a_rank(monkeypatch):
    from bench.devices import device_label
    from bench.dist import Dist
    from bench.errors import BenchError

    _fake_cuda(monkeypatch, current=0, count=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    rank1 = Dist(rank=1, world=2, local_rank=1)
    assert resolve_device("auto", rank1) == resolve_device("cuda", rank1) == torch.device("cuda", 1)
    assert resolve_device("cpu", rank1) == torch.device("cpu")
    with pytest.raises(BenchError, match="with several processes"):
        resolve_device("cuda:0", rank1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_label(torch.device("cuda", 1), rank1) == "2× NVIDIA H200 (DDP)"
    assert device_label(torch.device("cuda", 0)) == "NVIDIA H200"


class _NamedOtherwise(torch.Generator):
    """A generator on x's device whose ``device`` compares unequal to x's (as ``cuda`` vs ``cuda:0``)."""

    @property
    def device(self):
        return torch.device("cpu", 0)


def test_a_generator_on_the_inputs_device_draws_there_however_the_device_is_named(monkeypatch):
    """``torch.Generator(device="cuda")`` reports ``cuda``, its inputs ``cuda:0``: the draw must still be made on the
    input's device with that generator (a CPU draw from a CUDA generator raises). Here a CPU generator that reports
    ``cpu:0``, and a ``torch.rand`` that raises as CUDA would when that generator is used for a draw elsewhere."""
    real = torch.rand

    def rand(*a, generator=None, device=None, **k):
        if generator is not None and device is None:
            raise RuntimeError("Expected a 'cpu' device type for generator but found 'cuda'")
        return real(*a, generator=generator, device=device, **k)

    monkeypatch.setattr(torch, "rand", rand)
    x = torch.rand(4, 3, 8, 8, device="cpu")
    g = _NamedOtherwise()
    g.manual_seed(3)
    d = uniform_noise(x, 0.1, generator=g)
    ref = (real(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1).mul_(0.1)
    assert torch.equal(d, ref)
    model = create_model("smallcnn", 10).eval()
    g.manual_seed(3)
    pgd(model, x, torch.zeros(4, dtype=torch.long), eps=0.03, step=0.01, steps=1, bn="eval", generator=g)


# ------------------------------------------------------------------------------------ 3 and 5: optimiser state


def _method(name="pgd-at", channels_last=False, fused=None):
    torch.manual_seed(0)
    model = create_model("smallcnn", 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cls = get_method(name)
    hp = cls.resolved_defaults()
    hp.update(attack_steps=1) if "attack_steps" in hp else None
    info = {"n": 16, "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
    return cls(hp, model, None, steps_per_epoch=2, info=info, fused=fused)


def _step_once(m):
    from bench.loader import Batch
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    m.train_step(Batch(x, torch.randint(0, 10, (8,), generator=g), torch.arange(8)), 0, 0)


def test_resumed_momentum_buffers_keep_their_parameters_memory_format(tmp_path):
    m = _method(channels_last=True)
    _step_once(m)
    conv = [p for p in m.model.parameters() if p.dim() == 4]
    assert conv and all(p.stride() != p.contiguous().stride() for p in conv)  # channels_last weights
    save_state(tmp_path / "c.safetensors", {"method": m.state_dict()})  # checkpoints store tensors contiguous
    m2 = _method(channels_last=True)
    m2.load_state_dict(load_state(tmp_path / "c.safetensors")["method"])
    for p in m2.model.parameters():
        buf = m2.optimizer.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride(), "a momentum buffer left in another memory format than its parameter"
    ref = {k: v for k, v in m.optimizer.state_dict()["state"].items()}
    got = m2.optimizer.state_dict()["state"]
    assert all(torch.equal(ref[k]["momentum_buffer"], got[k]["momentum_buffer"]) for k in ref)


def test_a_checkpoints_fused_flag_does_not_override_this_processs_choice():
    gpu = _method(fused=True)  # as a GPU process would build it
    _step_once(gpu)
    state = gpu.state_dict()
    assert state["optimizers"][0]["param_groups"][0]["fused"] is True
    cpu = _method(fused=False)
    cpu.load_state_dict(state)
    assert all(not g.get("fused") for g in cpu.optimizer.param_groups)


def test_afd_gives_each_parameter_a_gradient_in_its_own_memory_format():
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    g = torch.randn(4, 3, 3, 3)  # contiguous, as autograd.grad may return it
    _step(opt, [w], [g])
    assert w.grad.stride() == w.stride() and torch.equal(w.grad, g)


# ------------------------------------------------------------------------------------------------ 4: fp32


def test_full_fp32_switches_tf32_off_and_restores_it():
    before = fp32_math()
    with full_fp32():
        assert fp32_math() == "ieee"
    assert fp32_math() == before


def test_evaluation_computes_in_full_fp32_and_records_it(synthetic):
    seen = []
    model = create_model("smallcnn", synthetic.num_classes).eval()
    model.register_forward_pre_hook(lambda mod, args: seen.append(fp32_math()))
    rec = evaluate(model, synthetic.test, ["clean", "pgd20"], n=16, batch_size=16, checks=False)
    assert seen and set(seen) == {"ieee"}
    assert rec["meta"]["fp32_math"] == "ieee" and rec["meta"]["dtype"] == "float32"


def test_fp32_training_computes_in_full_fp32_and_every_epoch_names_its_device(tmp_path, synthetic, monkeypatch):
    req = small_request(tmp_path, methods=["natural"], epochs=2, subset=8, batch_size=32)
    cfg = plan(req)[0].cfg
    t = Trainer(cfg, synthetic, RunDir(tmp_path / "r"), progress=False, echo=lambda s: None)
    seen = []
    t.method.model.register_forward_pre_hook(lambda mod, args: seen.append(fp32_math()))
    t.train(stop_after=1)
    rows = [r for r in t.run.read_metrics() if r.get("epoch", 0) >= 1]
    assert "ieee" in seen and rows[0]["fp32_math"] == "ieee" and rows[0]["device"] == t.device_label
    # resumed on "another device": the rows say which epoch ran where, the report credits the run to neither
    monkeypatch.setattr(engine, "device_label", lambda device, dist=None: "NVIDIA H200 (pretend)")
    said = []
    t2 = Trainer(cfg, synthetic, RunDir(tmp_path / "r"), progress=False, echo=said.append)
    t2.resume()
    t2.train()
    rows = [r for r in t2.run.read_metrics() if r.get("epoch", 0) >= 1]
    assert [r["device"] for r in rows] == [t.device_label, "NVIDIA H200 (pretend)"]
    assert any("ran on" in s and "NVIDIA H200 (pretend)" in s for s in said)
    assert epochs_device(rows, "cfg device").startswith("mixed (")
    assert epochs_device(rows[:1], "cfg device") == t.device_label
    assert epochs_device([{"epoch": 1, "seconds": 1.0}], "cfg device") == "cfg device"  # older records


# ------------------------------------------------------------------------------------ 6: per-epoch randomness


def _reference_epoch(loader, epoch):
    """The batches as drawn before issue 24: per batch, the crop and flip numbers drawn and copied one by one."""
    gen = torch.Generator().manual_seed(hash_seed(loader.seed, epoch))
    n = loader.y.shape[0]
    order = torch.randperm(n, generator=gen)
    out = []
    for step in range(len(loader)):
        idx = order[step * loader.batch_size:(step + 1) * loader.batch_size]
        out.append((augment(loader.x[idx], gen, loader.pad, loader.flip), loader.y[idx]))
    return out


def test_epoch_randomness_is_copied_to_the_device_once_and_draws_the_same_numbers(synthetic, monkeypatch):
    loader = DeviceLoader(synthetic.train, 24, "cpu", seed=5)
    assert len(loader) >= 3
    ref = _reference_epoch(loader, 2)
    copies = []
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        if any(isinstance(v, (torch.device, str)) for v in (*a, *k.values())):
            copies.append(1)
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    it = loader.epoch(2)
    first = next(it)
    at_first = len(copies)
    rest = list(it)
    assert len(copies) == at_first, "a host-to-device copy per batch"
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    for b, (x, y) in zip([first, *rest], ref):
        assert torch.equal(b.x, x.float().div_(255)) and torch.equal(b.y, y)
    # resuming inside an epoch gives the same later batches
    later = list(loader.epoch(2, start_step=2))
    assert all(torch.equal(a.x, b.x) for a, b in zip(later, rest[1:]))


# ------------------------------------------------------------------------------------------------ 7: EMA


def test_ema_update_over_all_tensors_at_once_equals_the_per_tensor_update():
    torch.manual_seed(0)
    net = create_model("smallcnn", 10)
    ema = EMA(net, decay=0.9, warmup=True)
    ref = copy.deepcopy(ema.module)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.rand(8, 3, 32, 32))
        d = ema.current_decay()
        src = net.state_dict()
        for k, v in ref.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(src[k].to(v.dtype), alpha=1 - d)
            else:
                v.copy_(src[k])
        ema.update(net)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), ref.state_dict().values()))
