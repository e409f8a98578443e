"""Defining properties of RiFT (METHODS.md §13, Decision 6): MRC on held-out training data, fine-tuning of one
module's weight with every BN re-estimated, interpolation over the whole state dict with the α rule, the test split
never touched, each stage resumable, and the ``method.json`` record."""
import copy
import json

import pytest
import torch

from methods import rift
from bench.data import Dataset, Split, make_synthetic
from bench.engine import Trainer, sealed_test
from bench.errors import BenchError
from bench.loader import Batch
from bench.models import create_model
from bench.records import RunDir
from bench.runner import plan
from helpers import run_request, small_request
from methods import get_method
from methods.base import StageContext

CPU = torch.device("cpu")
HOLD = 4  # held-out images per class in the small runs: 20 MRC + 20 validation images
SMALL_SETS = [f"rift.holdout_per_class={HOLD}", "rift.mrc_epochs=2", "rift.attack_steps=2", "rift.mrc_batch=8"]


# ---------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests do many tiny forwards: one intra-op thread is faster, and far faster when another process
    shares the two cores (conftest's two threads then oversubscribe them). Restored afterwards. Every exact
    comparison below (resumed vs uninterrupted) is thus between runs of one process at one thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def theta_at():
    """A briefly trained smallcnn standing in for θ_AT (a random one predicts a constant: flat losses)."""
    torch.manual_seed(0)
    m = create_model("smallcnn", 10)
    data = make_synthetic(30, seed=5)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    m.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        idx = torch.randint(0, len(data), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(m(data.x[idx].float() / 255), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in m.state_dict().items()}


def _model(state):
    m = create_model("smallcnn", 10)
    m.load_state_dict(state)
    return m


def _rift(state, **hp):
    cls = get_method("rift")
    h = cls.resolved_defaults()
    h.update({"holdout_per_class": HOLD, "mrc_epochs": 2, "attack_steps": 2, "mrc_batch": 8})
    h.update(hp)
    model = _model(state)
    return cls(h, model, copy.deepcopy(model), steps_per_epoch=2)


def _splits(per_class=10):
    data = make_synthetic(per_class, seed=3)
    return data.drop_last_per_class(HOLD), data.last_per_class(HOLD)


def _ctx(train, held, saves=None):
    return StageContext(train=train, heldout=held, device=CPU, seed=0, echo=lambda s: None,
                        save=(lambda: saves.append(1)) if saves is not None else (lambda: None))


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(split):
    return {bytes(img.numpy().tobytes()) for img in split.x}


# ---------------------------------------------------------------------------------------------------------------
# defaults and schedule


def test_registered_from_the_pgd_at_model_with_the_official_recipe():
    cls = get_method("rift")
    assert cls is rift.RiFT and cls.starts_from == "adversarial" and cls.attack_bn == "eval"
    hp = cls.resolved_defaults()
    assert (hp["epochs"], hp["lr"], hp["weight_decay"], hp["momentum"], hp["batch_size"]) == (10, 0.001, 5e-4, 0.9, 128)
    assert (hp["mrc_epochs"], hp["mrc_lr"], hp["mrc_batch"], hp["mrc_radius"]) == (10, 1.0, 512, 0.1)
    assert (hp["attack_steps"], hp["attack_step"], hp["eps"]) == (10, 2 / 255, 8 / 255)
    assert hp["alpha_tolerance"] == 0.1 and hp["module"] is None and hp["holdout_per_class"] >= 2
    assert rift.alpha_grid(hp["alpha_points"]) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    # the official MultiStepLR([epochs // 2]) stepped after every epoch, against the suite's schedule
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.001)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [10 // 2], gamma=0.1)
    official = []
    for _ in range(10):
        official.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    m = cls(hp, create_model("smallcnn", 10), steps_per_epoch=3)
    assert [m.lr_at(e, s) for e in range(10) for s in range(3)] == pytest.approx(
        [lr for lr in official for _ in range(3)], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# stage 2: fine-tuning


def test_fine_tuning_moves_only_the_chosen_weight_while_every_bn_is_re_estimated(theta_at):
    m = _rift(theta_at, module="body.3")
    assert m.stage["chosen_by"] == "hp"
    assert [p for g in m.optimizer.param_groups for p in g["params"]] == [m.model.body[3].weight]
    g = m.optimizer.param_groups[0]
    assert (g["momentum"], g["weight_decay"]) == (0.9, 5e-4)
    before = copy.deepcopy(m.model.state_dict())
    teacher = copy.deepcopy(m.teacher.state_dict())
    m.model.train()
    train, _ = _splits()
    for step in range(3):
        idx = torch.arange(step * 16, step * 16 + 16)
        m.set_lr(m.lr_at(0, step))
        out = m.train_step(Batch(train.x[idx].float() / 255, train.y[idx], idx), 0, step)
        assert out["loss"].ndim == 0 and "correct_sum" in out
    after = m.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    bn_stats = {f"body.{i}.{s}" for i in (1, 4, 7, 10) for s in ("running_mean", "running_var",
                                                                 "num_batches_tracked")}
    assert changed == {"body.3.weight"} | bn_stats  # every other parameter bit-identical
    assert [n for n, p in m.model.named_parameters() if p.requires_grad] == ["body.3.weight"]  # no wasted grads
    assert _equal_states(teacher, m.teacher.state_dict())  # θ_AT frozen


# ---------------------------------------------------------------------------------------------------------------
# stage 3: interpolation and the α rule


def test_interpolation_reproduces_both_endpoints_exactly_over_the_whole_state_dict(theta_at):
    at = _model(theta_at).state_dict()
    ft_model = _model(theta_at)
    ft_model.train()
    with torch.no_grad():
        ft_model.body[6].weight.mul_(1.3)
        for _ in range(3):
            ft_model(torch.rand(16, 3, 32, 32))  # new BN statistics and counters
    ft = ft_model.state_dict()
    assert not torch.equal(at["body.1.running_mean"], ft["body.1.running_mean"])
    assert not torch.equal(at["body.1.num_batches_tracked"], ft["body.1.num_batches_tracked"])
    assert _equal_states(rift.interpolate(at, ft, 0.0), at)
    assert _equal_states(rift.interpolate(at, ft, 1.0), ft)
    mid = rift.interpolate(at, ft, 0.3)
    for k, v in at.items():
        if v.dtype.is_floating_point:  # parameters and running statistics alike
            assert torch.allclose(mid[k], 0.3 * ft[k] + 0.7 * v)
        else:
            assert torch.equal(mid[k], v) and torch.equal(rift.interpolate(at, ft, 0.5)[k], ft[k])
    assert torch.allclose(mid["body.7.running_var"], 0.3 * ft["body.7.running_var"] + 0.7 * at["body.7.running_var"])


def _curve(robust):
    return [{"alpha": a, "clean": 0.0, "robust": r, "n": 100} for a, r in zip(rift.alpha_grid(len(robust) - 1), robust)]


@pytest.mark.parametrize("robust,tol,expected", [
    ([50.0, 50.0, 49.95, 49.8, 40.0, 30.0], 0.1, 0.4),     # 49.95 ≥ 49.9 qualifies, 49.8 does not
    ([50.0, 49.8, 49.0, 48.0, 47.0, 46.0], 0.1, 0.0),       # only α = 0 qualifies
    ([50.0, 49.8, 49.0, 48.0, 47.0, 46.0], 0.2, 0.2),       # the boundary counts (≥)
    ([50.0, 49.0, 50.5, 48.0, 47.0, 46.0], 0.1, 0.4),       # the largest qualifying α, not the first failure
    ([50.0, 50.0, 50.0, 50.0, 50.0, 50.0], 0.0, 1.0),       # α = 1 when robustness never drops
])
def test_the_alpha_rule_picks_the_largest_alpha_within_tolerance(robust, tol, expected):
    curve = _curve(robust)  # α = 0, 0.2, …, 1
    assert rift.choose_alpha(curve, tol) == pytest.approx(expected)


@pytest.mark.parametrize("robust,expected", [
    ([50, 50, 49.95, 49.8] + [30] * 7, 0.2),
    ([50] + [40] * 10, 0.0),
    ([50] * 11, 1.0),
])
def test_after_training_evaluates_every_alpha_on_validation_then_sets_the_model_to_the_chosen_one(
        theta_at, monkeypatch, robust, expected):
    m = _rift(theta_at, module="body.6")
    train, held = _splits()
    with torch.no_grad():  # a fine-tuned model: another body.6 weight and other BN statistics everywhere
        m.model.body[6].weight.mul_(0.9)
        m.model.train()
        m.model(train.x[:32].float() / 255)
    at, ft = copy.deepcopy(m.teacher.state_dict()), copy.deepcopy(m.model.state_dict())
    val = rift.split_heldout(held)[1]
    saves, seen = [], []

    def fake(model, x, y, **kw):
        k = len(seen)
        assert _equal_states(model.state_dict(), rift.interpolate(at, ft, k / 10))
        assert _equal_states(m.model.state_dict(), ft)  # θ_FT stays in place until the curve is complete
        assert len(m.stage["curve"]) == k == len(saves)  # stored point by point, each saved
        assert torch.equal(x, val.x.float() / 255) and torch.equal(y, val.y)
        seen.append(k)
        return 60.0 + k, float(robust[k])

    monkeypatch.setattr(rift, "clean_and_robust", fake)
    ctx = _ctx(train, held, saves)
    m.after_training(ctx)
    assert len(seen) == 11 and len(saves) == 11 and m.stage["done"]
    assert m.stage["alpha"] == pytest.approx(expected)
    assert [p["alpha"] for p in m.stage["curve"]] == rift.alpha_grid(10)
    assert _equal_states(m.model.state_dict(), rift.interpolate(at, ft, m.stage["alpha"]))
    if expected == 0.0:
        assert _equal_states(m.model.state_dict(), at)
    if expected == 1.0:
        assert _equal_states(m.model.state_dict(), ft)
    assert all(p.requires_grad for p in m.model.parameters())
    final = copy.deepcopy(m.model.state_dict())
    m.after_training(ctx)  # runs again on every start once the epochs are done: nothing to do
    assert len(seen) == 11 and _equal_states(m.model.state_dict(), final)


# ---------------------------------------------------------------------------------------------------------------
# stage 1: MRC


def test_the_mrc_probe_ascends_within_the_radius_on_a_clone_in_eval_mode(theta_at):
    model = _model(theta_at)
    model.train()
    before = copy.deepcopy(model.state_dict())
    _, held = _splits()
    x, y = rift.adversarial_set(model, rift.split_heldout(held)[0], eps=8 / 255, step=2 / 255, steps=2, batch=8,
                                device=CPU, seed=1)
    assert x.shape == (20, 3, 32, 32) and (x - held.x[::2].float().div(255)).abs().max() > 0
    l0, _ = rift.loss_and_accuracy(model, x, y, 8)
    for name in rift.candidate_modules(model):
        gen = torch.Generator().manual_seed(0)
        clone, losses, _, ratios = rift.ascend_module(model, name, x, y, epochs=3, lr=1.0, batch=8, radius=0.1,
                                                      generator=gen)
        assert max(losses) - l0 > 0, name  # ascent raises the robust loss: MRC > 0
        assert len(ratios) == 3 and all(r <= 0.1 * (1 + 1e-5) for r in ratios), name
        cs = clone.state_dict()
        assert [k for k in before if not torch.equal(cs[k], before[k])] == [f"{name}.weight"]  # BN stats untouched
        assert not any(mod.training for mod in clone.modules())
    # a large step leaves the ball at once: the rescale puts ΔW on its surface
    _, _, _, ratios = rift.ascend_module(model, "fc", x, y, epochs=2, lr=1e4, batch=8, radius=0.1,
                                        generator=torch.Generator().manual_seed(0))
    assert ratios == pytest.approx([0.1, 0.1], rel=1e-5)
    assert _equal_states(model.state_dict(), before) and all(mod.training for mod in model.modules())


def test_the_mrc_stage_probes_every_module_and_fine_tunes_the_lowest(theta_at, monkeypatch):
    m = _rift(theta_at)
    before = copy.deepcopy(m.model.state_dict())
    train, held = _splits()
    saves = []
    m.before_training(_ctx(train, held, saves))
    names = rift.candidate_modules(m.model)
    assert names == ["body.0", "body.3", "body.6", "body.9", "fc"]
    s = m.stage
    assert list(s["mrc"]) == names and all(v > 0 for v in s["mrc"].values())
    assert all(s["mrc"][n] == pytest.approx(max(s["mrc_detail"][n]["losses"]) - s["l0"]) for n in names)
    assert s["module"] == min(names, key=s["mrc"].get) and s["chosen_by"] == "mrc"
    assert (s["n_mrc"], s["n_val"]) == (20, 20)
    assert len(saves) == 1 + len(names) + 1  # D_adv, every module, the choice
    assert m.d_adv is None and "d_adv" not in m.state_dict()  # dropped once MRC is finished
    assert [p for g in m.optimizer.param_groups for p in g["params"]] == [m.model.get_submodule(s["module"]).weight]
    assert _equal_states(m.model.state_dict(), before)
    # a second start finds MRC done
    monkeypatch.setattr(rift, "ascend_module", lambda *a, **k: pytest.fail("MRC recomputed"))
    m.before_training(_ctx(train, held, saves))


def test_mrc_resumes_after_the_last_finished_module_with_the_same_adversarial_set(theta_at, monkeypatch):
    train, held = _splits()
    full = _rift(theta_at)
    full.before_training(_ctx(train, held))

    class Killed(Exception):
        pass

    killed = _rift(theta_at)
    states = []

    def save():
        states.append(killed.state_dict())
        if len(states) == 3:  # D_adv and two modules done
            raise Killed

    with pytest.raises(Killed):
        killed.before_training(StageContext(train, held, CPU, 0, lambda s: None, save))
    saved = states[-1]
    assert list(saved["rift"]["mrc"]) == ["body.0", "body.3"] and saved["d_adv"]["x"].shape[0] == 20
    resumed = _rift(theta_at)
    resumed.load_state_dict(saved)
    probed = []
    real = rift.ascend_module
    monkeypatch.setattr(rift, "ascend_module", lambda model, name, *a, **k: probed.append(name) or
                        real(model, name, *a, **k))
    resumed.before_training(_ctx(train, held))
    assert probed == ["body.6", "body.9", "fc"]
    assert resumed.stage == full.stage


def test_a_given_module_skips_mrc_and_bad_settings_are_clear_errors(theta_at, monkeypatch):
    monkeypatch.setattr(rift, "ascend_module", lambda *a, **k: pytest.fail("MRC computed"))
    train, held = _splits()
    m = _rift(theta_at, module="fc")
    m.before_training(_ctx(train, held))
    assert m.stage["module"] == "fc" and m.stage["mrc"] == {} and m.record()["chosen_by"] == "hp"
    with pytest.raises(BenchError, match="not a Conv2d / Linear.*accepted: body.0"):
        _rift(theta_at, module="body.1")  # a BatchNorm
    with pytest.raises(BenchError, match="holdout_per_class"):
        _rift(theta_at, holdout_per_class=0)
    with pytest.raises(BenchError, match="integer ≥ 2"):
        _rift(theta_at, holdout_per_class=1)
    with pytest.raises(BenchError, match="held-out slice"):
        _rift(theta_at).before_training(_ctx(train, None))
    no_class_0 = train.take((train.y != 0).nonzero().flatten())
    with pytest.raises(BenchError, match=r"every training image of class\(es\) \[0\]"):
        _rift(theta_at).before_training(_ctx(no_class_0, held))
    one = held.take(torch.tensor([0]))
    with pytest.raises(BenchError, match="too small to split"):
        _rift(theta_at).before_training(_ctx(train, one))
    with pytest.raises(BenchError, match="no module chosen"):
        _rift(theta_at).train_step(Batch(train.x[:4].float() / 255, train.y[:4], torch.arange(4)), 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# the whole method in the engine


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, theta_at):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("at") / "pgd-at.safetensors"
    save_file(theta_at, path)
    return path


def _cfg(tmp_path, weights_file, **kw):
    args = {"methods": ["rift"], "epochs": 2, "subset": 10, "batch_size": 32, "pretrained": str(weights_file),
            "sets": SMALL_SETS}
    args.update(kw)
    return plan(small_request(tmp_path, **args))[0].cfg


def _trainer(cfg, dataset, d):
    return Trainer(cfg, dataset, RunDir(d), init_weights=cfg.pretrained_path, progress=False, echo=lambda s: None)


class _Tripwire:
    """Stands in for the test split once the Trainer is built: records any use."""

    def __init__(self, log):
        object.__setattr__(self, "log", log)

    def __getattr__(self, name):
        self.log.append(name)
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        self.log.append("__len__")
        raise AssertionError("the test split was read (len)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic, weights_file):
    """One uninterrupted RiFT run on a dataset whose test split is a tripwire after construction, with the stages'
    inputs and every dataset load recorded."""
    import bench.data

    tmp = tmp_path_factory.mktemp("rift-ref")
    cfg = _cfg(tmp, weights_file)
    ds = Dataset(synthetic.name, synthetic.classes, synthetic.train, synthetic.test, synthetic.source,
                 synthetic.layout)
    t = _trainer(cfg, ds, tmp / "a")
    log, stage_inputs, loads = [], {"adv": [], "val": []}, []
    ds.test = _Tripwire(log)
    real_adv, real_eval = rift.adversarial_set, rift.clean_and_robust
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rift, "adversarial_set", lambda model, split, **k: stage_inputs["adv"].append(split) or
                   real_adv(model, split, **k))
        mp.setattr(rift, "clean_and_robust", lambda model, x, y, **k: stage_inputs["val"].append(x) or
                   real_eval(model, x, y, **k))
        mp.setattr(bench.data, "load_dataset", lambda *a, **k: loads.append(a) or pytest.fail("dataset loaded"))
        t.train()
    return {"trainer": t, "cfg": cfg, "log": log, "inputs": stage_inputs, "loads": loads, "dir": tmp / "a"}


def test_a_full_run_uses_only_the_held_out_training_slice_never_the_test_split(reference):
    t, inputs = reference["trainer"], reference["inputs"]
    assert reference["log"] == [] and reference["loads"] == []
    assert t.method.stage["done"] and len(t.method.stage["curve"]) == 11 and len(t.metrics) == 3
    held = t.heldout
    assert len(held) == 10 * HOLD and len(t.train_split) == 10 * (10 - HOLD)
    # the images the loader iterates (the synthetic set is not augmented) are disjoint from the held-out ones
    seen = set()
    for epoch in range(2):
        for b in t.loader.epoch(epoch):
            seen |= _rows(Split((b.x * 255).round().to(torch.uint8), b.y))
    assert seen == _rows(t.train_split) and not seen & _rows(held)
    assert not _rows(held) & _rows(t.dataset.train.per_class(10).drop_last_per_class(HOLD))
    # D_adv comes from the MRC half, the α curve from the validation half, both inside the held-out slice
    mrc, val = rift.split_heldout(held)
    assert len(inputs["adv"]) == 1 and torch.equal(inputs["adv"][0].x, mrc.x)
    assert len(inputs["val"]) == 11 and all(torch.equal(x, val.x.float() / 255) for x in inputs["val"])
    assert not _rows(mrc) & _rows(val)


def test_the_test_split_is_sealed_while_training(synthetic):
    ds = Dataset(synthetic.name, synthetic.classes, synthetic.train, synthetic.test, synthetic.source,
                 synthetic.layout)
    with sealed_test(ds):
        with pytest.raises(BenchError, match="sealed"):
            _ = ds.test.x
        with pytest.raises(BenchError, match="sealed"):
            len(ds.test)
        with pytest.raises(BenchError, match="sealed"):
            ds.test.head(4)
    assert ds.test is synthetic.test


def test_method_json_records_the_stages(reference):
    t = reference["trainer"]
    rec = json.loads(RunDir(reference["dir"]).method_record.read_text())
    assert rec["method"] == "rift" and rec == json.loads(json.dumps({"method": "rift", **t.method.record()}))
    names = ["body.0", "body.3", "body.6", "body.9", "fc"]
    assert list(rec["mrc"]) == names and rec["chosen_by"] == "mrc"
    assert rec["module"] == rec["lowest_mrc_module"] == min(names, key=rec["mrc"].get)
    assert isinstance(rec["l0"], float) and rec["l0"] > 0
    assert [p["alpha"] for p in rec["alpha_curve"]] == rift.alpha_grid(10)
    assert all(set(p) == {"alpha", "clean", "robust", "n"} and p["n"] == 20 for p in rec["alpha_curve"])
    assert rec["alpha"] == rift.choose_alpha(rec["alpha_curve"], 0.1) and rec["alpha_tolerance"] == 0.1
    assert (rec["n_mrc"], rec["n_val"], rec["holdout_per_class"]) == (20, 20, HOLD)
    assert "PGD-AT base holds out the same images" in rec["heldout_note"] and "never the test split" in rec["heldout_note"]
    assert rec["done"] is True
    # the final model is θ(α*) of θ_AT (the teacher) and θ_FT (the model in the checkpoint before the last)
    from bench.checkpoint import load_state

    last, prev = t.ckpt_paths
    theta_ft = load_state(prev)["model"]
    assert load_state(prev)["method"]["rift"]["done"] is False and load_state(last)["method"]["rift"]["done"]
    expected = rift.interpolate(t.method.teacher.state_dict(), theta_ft, rec["alpha"])
    assert _equal_states(t.method.model.state_dict(), expected)
    assert all(p.requires_grad for p in t.method.model.parameters())


class _Killed(Exception):
    pass


def _kill_after(trainer, k):
    real, calls = trainer.save_checkpoint, [0]

    def save(epochs_done):
        real(epochs_done)
        calls[0] += 1
        if calls[0] == k:
            raise _Killed(k)

    trainer.save_checkpoint = save


# the saves of a run: D_adv, 5 modules, the choice (7), 2 epochs (9), 11 alphas (20), the end (21)
@pytest.mark.parametrize("kill,modules,epochs,points", [(3, 2, 0, 0),    # in MRC
                                                        (8, 5, 1, 0),    # between fine-tuning epochs
                                                        (14, 5, 2, 5)])  # in the interpolation
def test_a_run_killed_in_any_stage_resumes_to_the_uninterrupted_result(tmp_path, synthetic, reference, monkeypatch,
                                                                       kill, modules, epochs, points):
    a, cfg = reference["trainer"], reference["cfg"]
    b1 = _trainer(cfg, synthetic, tmp_path / "b")
    _kill_after(b1, kill)
    with pytest.raises(_Killed):
        b1.train()
    done_modules = set(b1.method.stage["mrc"])
    done_points = len(b1.method.stage["curve"])
    assert (len(done_modules), done_points) == (modules, points)
    b2 = _trainer(cfg, synthetic, tmp_path / "b")
    assert b2.resume() == epochs
    probed, points = [], []
    real_ascend, real_eval = rift.ascend_module, rift.clean_and_robust
    monkeypatch.setattr(rift, "ascend_module", lambda model, name, *x, **k: probed.append(name) or
                        real_ascend(model, name, *x, **k))
    monkeypatch.setattr(rift, "clean_and_robust", lambda *x, **k: points.append(1) or real_eval(*x, **k))
    b2.train()
    all_modules = ["body.0", "body.3", "body.6", "body.9", "fc"]
    assert probed == [n for n in all_modules if n not in done_modules]  # finished work is not redone
    assert len(points) == 11 - done_points
    assert b2.method.record() == a.method.record()
    assert _equal_states(a.method.model.state_dict(), b2.method.model.state_dict())

    def untimed(d):
        return [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds", "images_per_s")}
                for r in RunDir(d).read_metrics(start=True)]

    assert untimed(tmp_path / "b") == untimed(reference["dir"])
    assert RunDir(tmp_path / "b").method_record.read_text() == RunDir(reference["dir"]).method_record.read_text()


@pytest.mark.slow
def test_bench_run_trains_pgd_at_first_then_rift_from_it(tmp_path):
    req = small_request(tmp_path, methods=["rift"], epochs=1, subset=10, batch_size=32,
                        sets=SMALL_SETS + ["pgd-at.epochs=1", "pgd-at.attack_steps=1"])
    (planned,) = plan(req)
    assert planned.base is not None and planned.base.method == "pgd-at"
    assert planned.cfg.pretrained == planned.base.run_name
    messages = []
    (run,) = run_request(req, echo=messages.append)
    base = RunDir.for_config(planned.base)
    assert base.is_done() and run.is_done()
    assert any("needs the pgd-at model" in s for s in messages)
    rec = run.read_method_record()
    assert rec["method"] == "rift" and rec["done"] and rec["module"] in rec["mrc"]
    assert run.read_eval()["results"]["clean"]["n"] == 50


def test_a_holdout_that_leaves_nothing_to_train_on_is_a_bench_error(tmp_path, synthetic, weights_file):
    cfg = _cfg(tmp_path, weights_file, subset=4, sets=["rift.holdout_per_class=4"])
    with pytest.raises(BenchError, match=r"training split has 0 images.*\(rift.holdout_per_class; lower it"):
        _trainer(cfg, synthetic, tmp_path / "r")


def test_the_pgd_at_base_of_rift_holds_out_the_same_images(tmp_path, synthetic):
    p = plan(small_request(tmp_path, methods=["rift"], subset=20, sets=["rift.holdout_per_class=4"]))[0]
    assert p.base.method == "pgd-at" and p.base.holdout == 4 and p.base.subset == p.cfg.subset == 20
    plain = plan(small_request(tmp_path, methods=["pgd-at"], subset=20))[0].cfg
    assert plain.holdout is None and "holdout" not in plain.identity()  # older runs keep their hashes
    assert plain.run_hash != p.base.run_hash  # RiFT's base is a run of its own
    base = Trainer(p.base, synthetic, RunDir(tmp_path / "b"), progress=False, echo=lambda s: None)
    rift_t = Trainer(p.cfg, synthetic, RunDir(tmp_path / "r"), init_weights=_weights(tmp_path),
                     progress=False, echo=lambda s: None)
    assert len(base.train_split) == len(rift_t.train_split) == 10 * 16
    assert torch.equal(base.train_split.x, rift_t.train_split.x)  # the base trained on exactly RiFT's images
    assert torch.equal(base.heldout.x, rift_t.heldout.x)


def _weights(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(create_model("smallcnn", 10).state_dict(), path)
    return path
