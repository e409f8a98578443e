"""The Method contract, for every registered method (DomainBed's ``test_init_update_predict`` in spirit): it builds
from its defaults, a few training steps move the model and log finite 0-dim tensors, its state survives the
suite's checkpoint format (a method restored at an epoch boundary takes the next epoch as the uninterrupted one
does), and what it exports is the plain architecture, predicting as the trained model does. A tiny CNN and random
images: seconds per method. A method added to the registry is covered without touching this file; one that needs a
setting to step outside a run says so in ``SETUP``."""
import copy
import json

import pytest
import torch

from bench.checkpoint import load_state, save_state
from bench.loader import Batch
from bench.models import create_model
from methods import METHODS, get_method
from methods.base import COMMON_DEFAULTS, STARTS_FROM

N, BATCH = 16, 8  # the training set: two steps an epoch
INFO = {"n": N, "shape": (3, 32, 32), "num_classes": 10, "crop_pad": 4, "flip": True}
# what a method needs, beyond its defaults, to step outside a run: RiFT's MRC stage (before training) chooses the
# module it fine-tunes; here it is given
SETUP = {"rift": {"module": "fc"}}
# a small run, where a method has the setting: 2-step attacks, 2 Free-AT replays, ATAS past its warm-up in epoch 1
# (so the epoch after the restore steps from the restored per-example buffers)
SMALL = {"attack_steps": 2, "replays": 2, "warmup_epochs": 1}


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,), generator=g)


def _build(name):
    """The method on a fresh smallcnn (the same weights every time), moved off its initial BN statistics as a
    trained starting model is; its teacher (the starting model) a copy of it."""
    cls = get_method(name)
    torch.manual_seed(0)
    model = create_model("smallcnn", 10).train()
    with torch.no_grad():
        model(torch.rand(32, 3, 32, 32))
    teacher = copy.deepcopy(model) if cls.starts_from != "scratch" else None
    hp = cls.resolved_defaults()
    hp.update({k: v for k, v in SMALL.items() if k in hp}, batch_size=BATCH, **SETUP.get(name, {}))
    return cls(hp, model, teacher, steps_per_epoch=N // BATCH, info=dict(INFO))


def _epoch(m, epoch, x, y):
    """One epoch as the engine runs it: the global RNG seeded per epoch, the hooks around the steps, the lr set
    before each step. Returns the logged values of the steps and the end-of-epoch row."""
    torch.manual_seed(100 + epoch)
    m.model.train()
    m.begin_epoch(epoch)
    logged = []
    for step in range(m.steps_per_epoch):
        m.set_lr(m.lr_at(epoch, step))
        idx = torch.arange(step * BATCH, (step + 1) * BATCH)
        logged.append(m.train_step(Batch(x[idx], y[idx], idx), epoch, step))
    return logged, m.end_epoch(epoch)


def _tensors(obj, prefix=""):
    """Every tensor of a nested state (dicts, lists), by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, val in items for k, v in _tensors(val, f"{prefix}/{key}").items()}


@pytest.mark.parametrize("name", METHODS.names())
def test_init_steps_state_round_trip_and_export(name, tmp_path):
    cls = get_method(name)
    # registered under its name, with what the planner and the run identity read
    assert cls.name == name and METHODS.get(name) is cls and cls.starts_from in STARTS_FROM
    defaults = cls.resolved_defaults()
    assert set(COMMON_DEFAULTS) <= set(defaults)
    json.dumps(defaults, sort_keys=True)  # the hyper-parameters are a run's identity: plain JSON values
    cls.check_hp(defaults)
    assert cls.resolved_defaults() == defaults and cls.resolved_defaults() is not defaults  # a copy each time

    # init
    x, y = _data()
    m = _build(name)
    assert m.optimizers and all(g["params"] for o in m.optimizers for g in o.param_groups)
    if m.teacher is not None:
        assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())
    start = copy.deepcopy(m.model.state_dict())

    # a few steps: finite 0-dim logs, the model moves
    logged, row = _epoch(m, 0, x, y)
    for out in logged:
        assert out and all(torch.is_tensor(v) and v.dim() == 0 and torch.isfinite(v) for v in out.values()), out
    json.dumps(row)
    moved = max(float((v.double() - start[k].double()).abs().max())
                for k, v in m.model.state_dict().items() if v.dtype.is_floating_point)
    assert moved > 1e-6, f"{name}: two steps left the model as it was"
    json.dumps(m.record())

    # state round trip through the checkpoint format, at the epoch boundary the engine resumes from
    save_state(tmp_path / "ckpt.safetensors", {"model": m.model.state_dict(), "method": m.state_dict()})
    state = load_state(tmp_path / "ckpt.safetensors")
    r = _build(name)
    r.model.load_state_dict(state["model"])
    r.load_state_dict(state["method"])
    saved, restored = _tensors(m.state_dict()), _tensors(r.state_dict())
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    _epoch(m, 1, x, y)
    _epoch(r, 1, x, y)
    a, b = m.model.state_dict(), r.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: the restored method took another step"
    assert r.stopped == m.stopped

    # export: the plain architecture, a copy, predicting as the trained model does
    m.model.eval()
    exported = m.export(m.model).eval()
    plain = create_model("smallcnn", 10).eval()
    plain.load_state_dict(exported.state_dict())  # strict: what bench eval loads from the run's final weights
    with torch.no_grad():
        logits = plain(x)
        torch.testing.assert_close(exported(x), logits)
        torch.testing.assert_close(logits, m.model(x), rtol=1e-4, atol=1e-5)
    assert logits.shape == (N, 10) and torch.isfinite(logits).all()
    assert not any(p.data_ptr() == q.data_ptr() for p in exported.parameters() for q in m.model.parameters())


def test_the_report_orders_the_methods_as_the_paper_does():
    """The methods' ``report_row`` puts natural (the paper's "Standard") first and the paper's methods in its Table 1
    row order; every registered method has its own place."""
    from bench import paper
    from bench.report import method_order

    order = method_order(METHODS.names())
    table1 = list(dict.fromkeys(r.method for r in paper.TABLE1))
    assert order[0] == "natural" and [m for m in order if m in table1] == table1
    rows = [get_method(m).report_row for m in METHODS.names()]
    assert None not in rows and len(set(rows)) == len(rows)
