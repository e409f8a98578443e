"""Defining properties of the AFT baselines (vAFT, AFKD, ARREST, vAFT+A; METHODS.md §9-§12), and, for the whole
fine-tuning family, resume mid-run = uninterrupted on CPU and the records the paper's Fig. 1a / Table 4 need."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bench.attacks import pgd
from bench.engine import Trainer
from bench.loader import Batch
from bench.models import create_model
from bench.records import RunDir
from bench.runner import plan
from helpers import resumed_equals_straight, run_request, small_request
from methods import METHODS, get_method
from methods.vaft import VAFT

# the fine-tuning family: every method that starts from the natural model; SKELETON: those on vAFT's skeleton (CE
# on the PGD example, maybe an alignment term), without AFD's disentangler
FAMILY = [m for m in METHODS.names() if get_method(m).starts_from == "natural"]
SKELETON = [m for m in FAMILY if issubclass(get_method(m), VAFT)]


def _pretrained(seed=0):
    torch.manual_seed(seed)
    m = create_model("smallcnn", 10)
    m.train()
    with torch.no_grad():
        m(torch.rand(64, 3, 32, 32))
    return m


def _method(name, **hp):
    base = _pretrained()
    teacher = copy.deepcopy(base)
    cls = get_method(name)
    h = cls.resolved_defaults()
    h.update(hp)
    return cls(h, base, teacher, steps_per_epoch=10)


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


def test_the_family_is_registered_and_starts_from_the_natural_model():
    for name in FAMILY:
        cls = get_method(name)
        assert cls.starts_from == "natural" and cls.attack_bn == "eval"
        hp = cls.resolved_defaults()
        assert (hp["epochs"], hp["lr"], hp["schedule"]["name"], hp["batch_size"]) == (20, 0.025, "suzuki", 128)
    assert {"vaft", "afkd", "arrest", "afd", "afd-literal", "vaft+d", "vaft+a"} <= set(FAMILY)
    assert {"vaft", "afkd", "arrest", "vaft+a"} <= set(SKELETON) and "afd" not in SKELETON
    for name in SKELETON:
        hp = get_method(name).resolved_defaults()
        assert (hp["attack_steps"], hp["attack_step"], hp["ema"]) == (10, 2 / 255, None)
    assert get_method("afkd").resolved_defaults()["lam"] == 50.0
    assert get_method("vaft+a").resolved_defaults()["gamma"] == 25.0
    arrest = get_method("arrest").resolved_defaults()
    assert (arrest["lam"], arrest["theta"], arrest["replay_epochs"]) == (50.0, 30.0, 10)


def _trace(model):
    """(training flag, input) of every pass through the network's convolutional body (the methods call
    ``features`` directly, so a hook on the top module would miss them)."""
    calls = []
    model.body.register_forward_pre_hook(lambda m, i: calls.append((m.training, i[0].detach().clone())))
    return calls


def test_vaft_is_ce_on_the_eval_mode_pgd_example_only():
    m = _method("vaft")
    m.model.train()
    calls = _trace(m.model)
    teacher_calls = _trace(m.teacher)
    b = _batch()
    m.train_step(b, 0, 0)
    assert [c[0] for c in calls] == [False] * 10 + [True] and not teacher_calls


def test_afkd_loss_and_the_alignment_is_not_in_the_attack():
    m = _method("afkd", attack_steps=3)
    ref = copy.deepcopy(m.model)
    b = _batch()
    m.model.train()
    teacher_inputs = []
    m.teacher.body.register_forward_pre_hook(lambda mod, i: teacher_inputs.append(i[0].detach().clone()))
    calls = _trace(m.model)
    torch.manual_seed(5)
    out = m.train_step(b, 0, 0)
    # the attack: exactly the CE PGD of the student, reproduced with the same random start
    torch.manual_seed(5)
    x_ce = pgd(ref, b.x, b.y, eps=8 / 255, step=2 / 255, steps=3, bn="eval")
    x_train = calls[-1][1]
    assert torch.allclose(x_train, x_ce, atol=1e-6)
    # the teacher only sees the clean batch, once, after the attack
    assert len(teacher_inputs) == 1 and torch.equal(teacher_inputs[0], b.x)
    ref.train()
    h = ref.features(x_train)
    with torch.no_grad():
        t = m.teacher.features(b.x)
    expected = F.cross_entropy(ref.fc(h), b.y) + 50.0 * (1 - F.cosine_similarity(h, t, dim=1).mean())
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert not m.teacher.training


def test_the_afkd_alignment_pulls_student_features_toward_the_teacher():
    m = _method("afkd", attack_steps=1, lam=50.0)
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = _batch(64)
    m.model.train()

    def dist():
        with torch.no_grad():
            m.model.eval()
            d = 1 - F.cosine_similarity(m.model.features(b.x), m.teacher.features(b.x), dim=1).mean()
            m.model.train()
            return float(d)

    before = dist()
    m.set_lr(0.01)
    for s in range(5):
        m.fine_tune(b.x, b.x, b.y)
    assert dist() < before


THRESHOLD = 1 - math.cos(math.radians(30))


@pytest.mark.parametrize("shift,epoch,replay", [
    (THRESHOLD + 1e-4, 0, True), (THRESHOLD - 1e-4, 0, False),   # both sides of the angle
    (THRESHOLD + 1e-4, 9, True), (THRESHOLD + 1e-4, 10, False),  # both sides of the epoch limit (1-based 10 / 11)
])
def test_arrest_noisy_replay_follows_the_threshold_and_the_epoch_limit(monkeypatch, shift, epoch, replay):
    m = _method("arrest")
    measured = []

    def fake_shift(x):
        measured.append(True)
        return torch.tensor(shift)

    monkeypatch.setattr(m, "representation_shift", fake_shift)
    m.model.train()
    calls = _trace(m.model)
    b = _batch()
    out = m.train_step(b, epoch, 0)
    assert bool(out["replay"]) is replay
    assert bool(measured) is (epoch < 10)  # no measurement once replay is over
    if replay:  # no attack: one training forward on x + U(−ε, ε), clipped
        assert len(calls) == 1
        x_in = calls[0][1]
        assert (x_in - b.x).abs().max() <= 8 / 255 + 1e-6 and x_in.min() >= 0 and x_in.max() <= 1
        assert not torch.equal(x_in, b.x)
    else:
        assert [c[0] for c in calls] == [False] * 10 + [True]


def test_arrest_measures_the_shift_in_eval_mode_without_grad():
    m = _method("arrest")
    m.model.train()
    b = _batch()
    modes = []
    m.model.body.register_forward_pre_hook(lambda mod, i: modes.append(mod.training))
    d = m.representation_shift(b.x)
    assert modes == [False] and all(mod.training for mod in m.model.modules())
    assert float(d) == pytest.approx(0.0, abs=1e-6)  # the student is still the teacher
    assert not d.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# the family through the engine


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("pre") / "natural.safetensors"
    save_file(_pretrained().state_dict(), path)
    return path


@pytest.mark.parametrize("method", ["afkd", "arrest"])
def test_resume_with_a_train_mode_teacher_equals_an_uninterrupted_run(tmp_path, synthetic, pretrained_file, method):
    """teacher_bn = train: the teacher's running statistics move with every teacher forward, so they are part of the
    checkpoint; a resumed run continues from them (bit for bit on a CPU), and they did move."""
    req = small_request(tmp_path, methods=[method], epochs=3, subset=10, batch_size=32, pretrained=str(pretrained_file),
                        sets=[f"{method}.attack_steps=2", f"{method}.teacher_bn=train"])
    cfg = plan(req)[0].cfg
    a, b = resumed_equals_straight(cfg, synthetic, tmp_path, init_weights=cfg.pretrained_path)
    ta, tb = a.method.teacher.state_dict(), b.method.teacher.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    start = _pretrained().state_dict()
    assert any(not torch.equal(ta[k], start[k].to(ta[k].dtype)) for k in ta if "running_mean" in k)


@pytest.mark.parametrize("method", FAMILY)
def test_resume_mid_run_equals_an_uninterrupted_run(tmp_path, synthetic, pretrained_file, method):
    req = small_request(tmp_path, methods=[method], epochs=3, subset=10, batch_size=32, pretrained=str(pretrained_file),
                        sets=[f"{method}.attack_steps=2"])
    cfg = plan(req)[0].cfg
    resumed_equals_straight(cfg, synthetic, tmp_path, init_weights=cfg.pretrained_path)


@pytest.mark.slow
def test_afd_run_records_the_feature_gaps_and_table_4_heads(tmp_path, pretrained_file):
    (run,) = run_request(small_request(tmp_path, methods=["afd"], epochs=2, subset=10, attacks="clean,pgd20",
                                       eval_n=40, probe_n=8, pretrained=str(pretrained_file)))
    rows = run.read_metrics(start=True)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all("feature_gap" in r and "feature_gap_g" in r for r in rows)
    # at epoch 0 the student is the teacher and D1 = I: the paper's gap equals the plain g-gap
    assert rows[0]["feature_gap"] == pytest.approx(rows[0]["feature_gap_g"], rel=1e-5)
    for key in ("l1", "l2", "l3", "ce", "align", "train_acc"):
        assert key in rows[1]
    ev = run.read_eval()
    assert set(ev["heads"]) == {"f1", "f2"}
    # the f1 head is the evaluated (folded) model itself
    assert ev["heads"]["f1"]["clean"]["correct"] == ev["results"]["clean"]["correct"]
    assert ev["heads"]["f1"]["pgd20"]["correct"] == ev["results"]["pgd20"]["correct"]
    from bench.records import collect_runs

    df = collect_runs(tmp_path / "results")
    row = df[df.method == "afd"].iloc[0]
    assert row["f1_clean"] == ev["heads"]["f1"]["clean"]["acc"] and row["f2_pgd20"] == ev["heads"]["f2"]["pgd20"]["acc"]
    assert row["feature_gap_start"] == rows[0]["feature_gap"]

    from safetensors.torch import load_file

    keys = load_file(run.final_weights)  # the exported weights are a plain network with D1 folded in
    assert "fc.weight" in keys and not any(k.startswith(("d1.", "d2.", "base.")) for k in keys)


# ---------------------------------------------------------------------------------------------------------------
# wiring: each method trains on the example it should, with the loss it should


def _afkd_expected(model_before, teacher, x_in, x_clean, y, weight):
    model_before.train()
    h = model_before.features(x_in)
    with torch.no_grad():
        t = teacher.features(x_clean)
    return F.cross_entropy(model_before.fc(h), y) + weight * (1 - F.cosine_similarity(h, t, dim=1).mean())


# the weight of each skeleton method's alignment term (a method added to the skeleton needs its weight here)
ALIGNMENT_WEIGHT = {"vaft": 0.0, "afkd": 50.0, "vaft+a": 25.0, "arrest": 50.0}


@pytest.mark.parametrize("name", SKELETON)
def test_training_input_is_the_eval_mode_pgd_example_and_the_loss_is_the_methods(name):
    weight = ALIGNMENT_WEIGHT[name]
    m = _method(name, attack_steps=3)
    if name == "arrest":
        m.hp["replay_epochs"] = 0  # no replay: the PGD branch
    ref = copy.deepcopy(m.model)
    b = _batch()
    m.model.train()
    calls = _trace(m.model)
    torch.manual_seed(11)
    out = m.train_step(b, 0, 0)
    torch.manual_seed(11)
    x_pgd = pgd(copy.deepcopy(ref), b.x, b.y, eps=8 / 255, step=2 / 255, steps=3, bn="eval")
    assert torch.allclose(calls[-1][1], x_pgd, atol=1e-6)  # the training forward saw the 2/255 PGD example
    expected = _afkd_expected(ref, m.teacher, x_pgd, b.x, b.y, weight)
    assert torch.allclose(out["loss"], expected, atol=1e-5)


def test_arrest_replay_branch_trains_on_noise_with_the_afkd_loss(monkeypatch):
    m = _method("arrest")
    monkeypatch.setattr(m, "representation_shift", lambda x: torch.tensor(1.0))
    ref = copy.deepcopy(m.model)
    b = _batch()
    m.model.train()
    calls = _trace(m.model)
    out = m.train_step(b, 0, 0)
    x_in = calls[-1][1]
    assert float(out["replay"]) == 1.0
    assert torch.allclose(out["loss"], _afkd_expected(ref, m.teacher, x_in, b.x, b.y, 50.0), atol=1e-5)


def test_arrest_shift_is_the_teacher_student_angular_distance_on_clean_images():
    m = _method("arrest")
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b = _batch()
    m.model.train()
    d = m.representation_shift(b.x)
    m.model.eval()
    with torch.no_grad():
        expected = 1 - F.cosine_similarity(m.teacher.features(b.x), m.model.features(b.x), dim=1).mean()
    assert float(d) == pytest.approx(float(expected), abs=1e-6) and float(d) > 1e-3


@pytest.mark.parametrize("name", FAMILY)
def test_teacher_weights_and_statistics_never_change(name):
    m = _method(name, attack_steps=2)
    before = copy.deepcopy(m.teacher.state_dict())
    m.model.train()
    for step in range(3):
        m.train_step(_batch(seed=step), 0, step)
    assert all(torch.equal(before[k], v) for k, v in m.teacher.state_dict().items())


def test_afd_trains_on_the_adversarial_example_with_clean_teacher_features(monkeypatch):
    m = _method("afd", attack_steps=2)
    seen = {}
    real = m.losses

    def spy(x_adv, x, y):
        seen.update(x_adv=x_adv.detach().clone(), x=x.detach().clone())
        return real(x_adv, x, y)

    monkeypatch.setattr(m, "losses", spy)
    b = _batch()
    m.model.train()
    m.train_step(b, 0, 0)
    assert torch.equal(seen["x"], b.x)
    assert not torch.equal(seen["x_adv"], b.x) and (seen["x_adv"] - b.x).abs().max() <= 8 / 255 + 1e-6


def test_the_schedule_reaches_all_three_afd_optimisers():
    m = _method("afd")
    assert len(m.optimizers) == 3 and {id(o) for o in m.optimizers} == {id(m.o1), id(m.o2), id(m.o)}
    m.set_lr(m.lr_at(12, 0))  # 1-based epoch 13: 0.025·0.8·0.5
    assert all(g["lr"] == pytest.approx(0.01) for o in m.optimizers for g in o.param_groups)


@pytest.mark.parametrize("name", SKELETON)
def test_baselines_probe_their_own_g_on_both_sides(name):
    m = _method(name)
    fwd, nat, adv = m.probe(m.model)
    assert fwd is m.model and nat == m.model.features and adv == m.model.features


def test_afd_evaluates_exports_and_probes_the_ema_copy(tmp_path, synthetic, pretrained_file):
    from safetensors.torch import load_file

    cfg = plan(small_request(tmp_path, methods=["afd"], epochs=1, subset=10, batch_size=32,
                             pretrained=str(pretrained_file), sets=["afd.attack_steps=1"]))[0].cfg
    t = Trainer(cfg, synthetic, RunDir(tmp_path / "r"), init_weights=cfg.pretrained_path, progress=False,
                echo=lambda s: None)
    t.train()
    assert t.ema is not None and t.evaluated_module() is t.ema.module
    assert t.ema.updates == len(t.loader)  # one EMA update per step
    assert "d1.weight" in t.ema.module.state_dict() and "base.body.1.running_mean" in t.ema.module.state_dict()
    t.export()
    saved = load_file(t.run.final_weights)
    folded_ema, folded_raw = t.ema.module.fold().state_dict(), t.method.model.fold().state_dict()
    assert all(torch.equal(saved[k], folded_ema[k].float()) for k in saved)
    assert not all(torch.equal(saved[k], folded_raw[k].float()) for k in saved)
    heads = t.method.eval_heads(t.evaluated_module())
    assert heads["f1"].model is t.ema.module
