"""Defining properties of natural training and PGD-AT, and the starting-model mechanism of fine-tuning methods."""
import copy

import pytest
import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.loader import Batch
from bench.schedules import lr_at
from methods import get_method
from methods.base import METHODS, Method, register_method
from helpers import run_request, small_request


def _batch(n=16):
    g = torch.Generator().manual_seed(0)
    return Batch(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


def _method(name, model, **hp):
    cls = get_method(name)
    h = cls.resolved_defaults()
    h.update(hp)
    return cls(h, model)


def _trace(model):
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append((m.training, i[0].detach().clone())))
    return calls


def test_paper_defaults():
    nat, at = get_method("natural").resolved_defaults(), get_method("pgd-at").resolved_defaults()
    assert (nat["epochs"], nat["lr"], nat["weight_decay"], nat["schedule"]["milestones"]) == (100, 0.1, 5e-4, [50, 75])
    assert (at["epochs"], at["attack_steps"], at["attack_step"], at["eps"]) == (120, 10, 2 / 255, 8 / 255)
    assert at["schedule"]["milestones"] == [75, 90, 100] and at["batch_size"] == 128 and at["momentum"] == 0.9
    assert get_method("pgd-at").attack_bn == "eval"


def test_natural_trains_in_train_mode_on_the_clean_batch(tiny_model):
    m = _method("natural", tiny_model)
    tiny_model.train()
    calls = _trace(tiny_model)
    b = _batch()
    before = [p.clone() for p in tiny_model.parameters()]
    out = m.train_step(b, 0, 0)
    assert len(calls) == 1 and calls[0][0] is True and torch.equal(calls[0][1], b.x)
    assert out["loss"].ndim == 0 and any(not torch.equal(p, q) for p, q in zip(before, tiny_model.parameters()))


def test_pgd_at_attacks_in_eval_mode_then_trains_in_train_mode_on_the_adversarial_batch_only(tiny_model):
    m = _method("pgd-at", tiny_model, attack_steps=10)
    tiny_model.train()
    calls = _trace(tiny_model)
    b = _batch()
    stats = tiny_model.body[1].running_mean.clone()
    first_conv = copy.deepcopy(tiny_model.body[0])  # before the optimiser step
    m.train_step(b, 0, 0)
    assert len(calls) == 11  # 10 attack steps + 1 training forward, no clean forward
    assert [c[0] for c in calls] == [False] * 10 + [True]
    x_train = calls[-1][1]
    assert not torch.equal(x_train, b.x) and (x_train - b.x).abs().max() <= 8 / 255 + 1e-6
    assert x_train.min() >= 0 and x_train.max() <= 1
    # the attack did not update BN statistics: only the single training forward did (one momentum step)
    with torch.no_grad():
        bn_input_mean = first_conv(x_train).mean(dim=(0, 2, 3))
    assert torch.allclose(tiny_model.body[1].running_mean, stats * 0.9 + 0.1 * bn_input_mean, atol=1e-5)
    assert all(mod.training for mod in tiny_model.modules())


def test_pgd_at_attack_bn_train_attacks_with_batch_statistics_and_clip_start_clips(tiny_model):
    """Rice et al.'s conventions (options; fidelity/pgd_at.py): every attack forward in train mode, and the
    U(−ε, ε) start clipped to [0, 1] (the unclipped default leaves [0, 1] at the saturated pixels)."""
    b = _batch()
    b.x[:, :, :4] = 0.0
    b.x[:, :, 4:8] = 1.0
    starts = {}
    for clip in (False, True):
        m = _method("pgd-at", tiny_model, attack_steps=2, attack_bn="train", clip_start=clip)
        assert m.attack_bn == "train" and type(m).attack_bn == "eval"
        tiny_model.train()
        calls = _trace(tiny_model)
        torch.manual_seed(0)
        m.train_step(b, 0, 0)
        assert [c[0] for c in calls] == [True] * 3  # 2 attack steps + the training forward, all in train mode
        starts[clip] = calls[0][1]
        tiny_model._forward_pre_hooks.clear()
    assert starts[False].min() < 0 and starts[False].max() > 1
    assert starts[True].min() >= 0 and starts[True].max() <= 1
    with pytest.raises(BenchError, match="pgd-at.attack_bn = 'keep'"):
        _method("pgd-at", tiny_model, attack_bn="keep")


def test_pgd_at_loss_is_ce_on_the_adversarial_example(tiny_model):
    """The reported loss equals CE of the pre-step model on the example the training forward saw."""
    m = _method("pgd-at", tiny_model, attack_steps=3)
    tiny_model.train()
    frozen = copy.deepcopy(tiny_model)
    calls = _trace(tiny_model)
    b = _batch()
    out = m.train_step(b, 0, 0)
    frozen.train()
    expected = F.cross_entropy(frozen(calls[-1][1]), b.y)
    assert torch.allclose(out["loss"], expected, atol=1e-5)


@pytest.mark.parametrize("e,lr", [(0, 0.1), (48, 0.1), (49, 0.01), (73, 0.01), (74, 0.001), (99, 0.001)])
def test_multistep_counts_epochs_from_one_like_the_sources(e, lr):
    sched = {"name": "multistep", "milestones": [50, 75], "gamma": 0.1}
    assert lr_at(0.1, sched, e, 0, 10, 100) == pytest.approx(lr)


def test_suzuki_schedule_of_the_aft_methods():
    lrs = [lr_at(0.025, {"name": "suzuki"}, e, 0, 10, 20) for e in range(20)]
    assert lrs == pytest.approx([0.025] * 10 + [0.02, 0.02, 0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025,
                                                0.00125, 0.00125])


def test_cosine_and_piecewise():
    assert lr_at(0.2, {"name": "cosine"}, 0, 0, 10, 2) == pytest.approx(0.2)
    assert lr_at(0.2, {"name": "cosine"}, 1, 0, 10, 2) == pytest.approx(0.1)
    tri = {"name": "piecewise", "points": [[0, 0], [12, 1], [30, 0]]}
    assert lr_at(0.3, tri, 11, 9, 10, 30) == pytest.approx(0.3)
    assert lr_at(0.3, tri, 29, 9, 10, 30) == pytest.approx(0.0, abs=1e-12)


class _FineTune(Method):
    """A test method that starts from the suite's natural model and checks what it was given."""

    name = "test-finetune"
    starts_from = "natural"
    defaults = {"epochs": 1, "lr": 0.01}

    def setup(self):
        super().setup()
        assert self.teacher is not None and not self.teacher.training
        assert all(not p.requires_grad for p in self.teacher.parameters())
        # the student starts as a copy of the teacher
        assert all(torch.equal(a, b) for a, b in zip(self.model.state_dict().values(),
                                                     self.teacher.state_dict().values()))

    def train_step(self, batch, epoch, step):
        loss = F.cross_entropy(self.net(batch.x), batch.y)
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach()}


@pytest.fixture
def finetune_method():
    register_method(_FineTune)
    yield
    METHODS.remove("test-finetune")


def test_a_fine_tuning_method_gets_the_suites_natural_model_trained_once(tmp_path, finetune_method):
    messages = []
    runs = run_request(small_request(tmp_path, methods=["test-finetune"], seeds="0"), echo=messages.append)
    natural = [p for p in (tmp_path / "results" / "runs").iterdir() if "_natural_" in p.name]
    assert len(natural) == 1 and (natural[0] / "done").is_file()
    assert runs[0].read_config()["config"]["pretrained"] == natural[0].name
    assert any("training it first" in m for m in messages)
    # the natural model is the preset's natural run (smoke: 8 epochs), not shortened by --epochs
    from bench.records import RunDir

    assert len(RunDir(natural[0]).read_metrics()) == 8
    # a second fine-tuning run (another hyper-parameter) reuses it
    messages.clear()
    run_request(small_request(tmp_path, methods=["test-finetune"], lr=0.02), echo=messages.append)
    assert not any("training it first" in m for m in messages)
    assert len([p for p in (tmp_path / "results" / "runs").iterdir() if "_natural_" in p.name]) == 1


def test_pretrained_path_overrides_the_suite_model(tmp_path, finetune_method, tiny_model):
    from safetensors.torch import save_file

    path = tmp_path / "mine.safetensors"
    save_file(tiny_model.state_dict(), path)
    (run,) = run_request(small_request(tmp_path, methods=["test-finetune"], pretrained=str(path)))
    assert run.read_config()["config"]["pretrained"].startswith("file:")
    assert not [p for p in (tmp_path / "results" / "runs").iterdir() if "_natural_" in p.name]


def test_pretrained_of_the_wrong_kind_is_refused(tmp_path, finetune_method):
    from bench.errors import BenchError
    from bench.runner import plan

    (pgd_run,) = run_request(small_request(tmp_path, methods=["pgd-at"], epochs=1))
    for given in (pgd_run.path, pgd_run.final_weights):
        with pytest.raises(BenchError, match=r"is a pgd-at model; test-finetune starts from a natural model"):
            plan(small_request(tmp_path, methods=["test-finetune"], pretrained=str(given)))
    (nat_run,) = run_request(small_request(tmp_path, methods=["natural"], epochs=1))
    (p,) = plan(small_request(tmp_path, methods=["test-finetune"], pretrained=str(nat_run.path)))
    assert p.cfg.pretrained_path == str(nat_run.final_weights) and p.cfg.pretrained.startswith("file:")
    with pytest.raises(BenchError, match="is a directory but not a finished run"):
        plan(small_request(tmp_path, methods=["test-finetune"], pretrained=str(tmp_path)))


def test_suzuki_milestones_compress_the_schedule():
    """The tier's 10-epoch AFT runs: the ×0.8 and the four halvings at epochs 6-10 (the 20-epoch rule halved)."""
    sched = {"name": "suzuki", "milestones": [6, 7, 8, 9, 10]}
    lrs = [lr_at(0.025, sched, e, 0, 10, 10) for e in range(10)]
    assert lrs == pytest.approx([0.025] * 5 + [0.02, 0.01, 0.005, 0.0025, 0.00125])
    # the default is the paper's, explicitly
    default = [lr_at(0.025, {"name": "suzuki", "milestones": [11, 13, 15, 17, 19]}, e, 0, 10, 20) for e in range(20)]
    assert default == [lr_at(0.025, {"name": "suzuki"}, e, 0, 10, 20) for e in range(20)]


@pytest.mark.parametrize("schedule,match", [
    ({"name": "cosin"}, "unknown schedule 'cosin'; accepted: constant, multistep"),
    ({"name": "multistep", "milestones": [50, 75], "gamma": "x"}, "gamma = 'x'; accepted: a non-negative number"),
    ({"name": "multistep", "milestones": [50, 75], "gamma": -0.1}, "gamma = -0.1; accepted"),
    ({"name": "multistep", "milestones": "50"}, "milestones = '50'; accepted: a list of non-decreasing"),
    ({"name": "multistep", "milestones": [75, 50]}, r"milestones = \[75, 50\]"),
    ({"name": "multistep", "milestones": [0.5]}, "positive integers"),
    ({"name": "multistep", "milestone": [50]}, "schedule 'multistep' takes no 'milestone'; accepted keys: milestones, gamma"),
    ({"name": "suzuki", "milestones": [6, 7]}, "a list of 5 non-decreasing"),
    ({"name": "cyclic", "peak": 1.5}, "peak = 1.5; accepted: a number strictly between 0 and 1"),
    ({"name": "piecewise", "points": [[0, 0], [12]]}, r"points = .*accepted: \[\[epoch, factor\], ...\]"),
    ({"name": "cosine", "gamma": 0.1}, "takes no 'gamma'; accepted keys: none"),
    (5, "schedule = 5; accepted: a schedule name"),
])
def test_bad_schedules_are_refused_when_the_hyper_parameters_are_resolved(schedule, match):
    from bench.config import resolve_hp
    with pytest.raises(BenchError, match=match):
        resolve_hp("pgd-at", {"method": {"pgd-at": {"schedule": schedule}}}, {}, [])
