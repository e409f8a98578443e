"""``--arch timm:<name>``: timm models as suite Classifiers, checkpoints as timm stores them, and the fine-tuning
family on them (bench/models/timm_backbone.py). Three families, randomly initialised and small: a ResNet
(resnet10t), a ConvNeXt (convnext_atto) and a ViT (timm's test_vit, at 32×32 with ``@32`` and at its own 160×160
through the on-device resize)."""
import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.errors import BenchError
from bench.loader import Batch
from bench.models import MODELS, create_model
from bench.models.loading import load_weights
from bench.models.timm_backbone import TimmClassifier, load_backbone, pretrained_role
from bench.runner import plan
from helpers import bench_cli, resumed_equals_straight, run_request, small_request
from methods import METHODS, get_method

ARCHS = ["timm:resnet10t", "timm:convnext_atto", "timm:test_vit@32"]
KWARGS = {"timm:resnet10t": {}, "timm:convnext_atto": {}, "timm:test_vit@32": {"img_size": 32}}


def _timm_net(arch, num_classes=1000, seed=1, **over):
    """The plain timm model of ``arch`` (what timm.create_model gives), BN statistics moved off their start."""
    name = arch[len("timm:"):].split("@")[0]
    torch.manual_seed(seed)
    net = timm.create_model(name, num_classes=num_classes, **{**KWARGS.get(arch, {}), **over})
    size = net.patch_embed.img_size[0] if hasattr(net, "patch_embed") else 32
    net.train()
    with torch.no_grad():
        net(torch.rand(8, 3, size, size))
    return net.eval()


def _normalized(model, x):
    return (x - model.normalize.mean) / model.normalize.std


@pytest.mark.parametrize("arch", ARCHS)
def test_contract_features_fc_and_the_normalisation_inside(arch):
    """features = timm's pooled pre-logits, fc = its final linear layer, forward = fc(features); inputs in [0, 1]
    with the model's own mean / std inside: the suite model is the timm model applied to normalised inputs."""
    torch.manual_seed(0)
    m = create_model(arch, 7).eval()
    assert isinstance(m, TimmClassifier) and isinstance(m.fc, torch.nn.Linear) and m.fc.out_features == 7
    x = torch.rand(3, 3, 32, 32)
    f = m.features(x)
    assert f.shape == (3, m.feature_dim)
    assert torch.allclose(m(x), m.fc(f), atol=1e-6)
    z, h = m(x, with_features=True)
    assert torch.equal(h, f) and torch.allclose(z, m(x), atol=1e-6)
    name = arch[len("timm:"):].split("@")[0]
    cfg = timm.create_model(name, **KWARGS[arch]).pretrained_cfg
    assert m.normalize.mean.flatten().tolist() == pytest.approx(list(cfg["mean"]))
    assert m.normalize.std.flatten().tolist() == pytest.approx(list(cfg["std"]))
    assert not m.normalize.is_identity()
    ref = timm.create_model(name, num_classes=7, **KWARGS[arch]).eval()
    ref.load_state_dict(m.timm_state_dict())
    assert torch.allclose(m(x), ref(_normalized(m, x)), atol=1e-5)
    assert torch.allclose(f, ref.forward_head(ref.forward_features(_normalized(m, x)), pre_logits=True), atol=1e-5)
    # the head is outside timm's module: one copy of ω in the state dict
    sd = m.state_dict()
    assert {"fc.weight", "fc.bias", "normalize.mean", "normalize.std"} <= set(sd)
    assert not any(k.startswith(f"net.{m.classifier_key}.") for k in sd)


def test_channels_classes_and_the_on_device_resize():
    """A 1-channel dataset and another class count; a ViT built for 160×160 sees 32×32 inputs resized bilinearly
    inside features (after the attack: gradients reach the 32×32 pixels), a size-agnostic CNN sees them as they are."""
    g = create_model("timm:resnet10t", 3, in_channels=1).eval()
    assert g(torch.rand(2, 1, 28, 28)).shape == (2, 3) and g.resize is None
    assert g.normalize.mean.shape == (1, 1, 1, 1)
    vit = create_model("timm:test_vit", 10).eval()
    assert vit.resize == (160, 160)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    f = vit.features(x)
    up = F.interpolate(x.detach(), size=(160, 160), mode="bilinear", align_corners=False)
    assert torch.allclose(f, vit._backbone(vit.normalize(up)), atol=1e-6)
    vit.fc(f).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    r224 = create_model("timm:resnet10t@64", 10).eval()
    assert r224.resize == (64, 64) and r224(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def _save(sd, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)  # as timm / the hub's pytorch_model.bin: a weights-only state dict
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_timm_checkpoint_with_its_imagenet_head_loads_and_gives_the_same_logits(tmp_path, arch, suffix):
    """A state dict as timm saves it (timm key names, 1000-class head): into a 1000-class suite model it gives the
    timm model's logits; into the dataset's 10-class model it is a backbone (same features, the head its own)."""
    net = _timm_net(arch)
    path = _save(net.state_dict(), tmp_path / f"in1k{suffix}")
    x = torch.rand(4, 3, 32, 32)
    m1000 = load_weights(create_model(arch, 1000), path).eval()
    assert torch.allclose(m1000(x), net(_normalized(m1000, x)), atol=1e-5)
    assert pretrained_role(m1000, path) == "start"
    m10 = create_model(arch, 10).eval()
    head = copy.deepcopy(m10.fc.state_dict())
    assert pretrained_role(m10, path) == "backbone"
    load_backbone(m10, path)
    assert all(torch.equal(head[k], v) for k, v in m10.fc.state_dict().items())
    want = net.forward_head(net.forward_features(_normalized(m10, x)), pre_logits=True)
    assert torch.allclose(m10.features(x), want, atol=1e-5)
    with pytest.raises(BenchError, match=r"has 1000 classes; the model for this dataset has 10"):
        load_weights(create_model(arch, 10), path)


def test_the_family_filter_resamples_a_vit_and_the_stem_takes_one_channel(tmp_path):
    """A ViT checkpoint of 160×160 (10×10 patches) into ``@32`` (2×2): timm's own filter resamples the position
    embedding; a 3-channel stem into a 1-channel model is adapted as timm adapts it (summed over RGB)."""
    net = _timm_net("timm:test_vit")
    path = _save(net.state_dict(), tmp_path / "vit160.safetensors")
    m = create_model("timm:test_vit@32", 10)
    load_backbone(m, path)
    assert m.net.pos_embed.shape == (1, 1 + 4, 64)
    assert torch.equal(m.net.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)
    r = _timm_net("timm:resnet10t")
    g = load_backbone(create_model("timm:resnet10t", 10, in_channels=1), _save(r.state_dict(), tmp_path / "r.pth"))
    assert torch.allclose(g.net.conv1[0].weight, r.conv1[0].weight.sum(1, keepdim=True), atol=1e-6)


def test_suite_weights_round_trip_and_a_dataset_head_is_a_starting_model(tmp_path):
    m = create_model("timm:convnext_atto", 10).eval()
    suite = _save(m.state_dict(), tmp_path / "suite.safetensors")
    timm_named = _save(m.timm_state_dict(), tmp_path / "timm10.pth")
    x = torch.rand(2, 3, 32, 32)
    for p in (suite, timm_named):
        other = create_model("timm:convnext_atto", 10)
        assert pretrained_role(other, p) == "start"
        assert torch.allclose(load_weights(other, p).eval()(x), m(x), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_afd_fold_reproduces_the_unfolded_logits(arch):
    torch.manual_seed(0)
    base = create_model(arch, 10)
    cls = get_method("afd")
    m = cls(cls.resolved_defaults(), base, copy.deepcopy(base), steps_per_epoch=4)
    with torch.no_grad():
        m.model.d1.weight.add_(0.1 * torch.randn_like(m.model.d1.weight))
    m.model.eval()
    x = torch.rand(3, 3, 32, 32)
    folded = m.export(m.model).eval()
    assert type(folded) is TimmClassifier
    assert torch.allclose(folded(x), m.model(x), atol=1e-5)


AFT = ["vaft", "afkd", "arrest", "afd"]  # a pick: the paper's four fine-tuning methods, on every timm family


@pytest.mark.parametrize("method", AFT)
@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step_of_each_fine_tuning_method_moves_the_student(arch, method):
    """One step on a batch: every parameter of the student moves (AFD: the backbone, ω, D₁ and D₂), the teacher
    (the starting model) stays as it was. The base is moved off timm's initialisation, as a trained starting model
    is: timm zero-initialises each residual branch's last norm scale (``zero_init_last``), which alone would keep the
    branch's first layers out of the loss's gradient in a first step."""
    torch.manual_seed(0)
    base = create_model(arch, 10)
    with torch.no_grad():
        for mod in base.modules():
            if isinstance(mod, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)) and mod.weight is not None:
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
    teacher = copy.deepcopy(base)
    cls = get_method(method)
    hp = {**cls.resolved_defaults(), "attack_steps": 2}
    m = cls(hp, base, teacher, steps_per_epoch=4)
    if method == "afd":  # off the identity, so that every loss reaches D₁ and D₂ (see tests/test_afd.py)
        with torch.no_grad():
            m.model.d1.weight.add_(0.1 * torch.randn_like(m.model.d1.weight))
            m.model.d2.weight.add_(0.3 * torch.randn_like(m.model.d2.weight))
    before = {k: v.detach().clone() for k, v in m.model.named_parameters()}
    t_before = {k: v.detach().clone() for k, v in m.teacher.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g), torch.arange(8))
    m.model.train()
    m.set_lr(0.05)
    out = m.train_step(batch, 0, 0)
    assert torch.isfinite(out["loss"])
    still = [k for k, v in m.model.named_parameters() if torch.equal(v, before[k])]
    assert not still, f"{method} on {arch} left {still[:5]} unchanged"
    assert all(torch.equal(v, t_before[k]) for k, v in m.teacher.state_dict().items())


# every other registered method, on one timm model (RiFT's training step is natural training of one module; its
# stage on a timm model is tested below)
OTHERS = [m for m in METHODS.names() if m not in AFT and m != "rift"]


@pytest.mark.parametrize("method", OTHERS)
def test_one_training_step_of_every_other_method_on_a_timm_model(method):
    """The from-scratch methods (ATAS's per-image δ of the padded image, Free-AT's carried δ, GradAlign's double
    backprop) and the remaining fine-tuning variants take a step on a timm model and move it."""
    torch.manual_seed(0)
    base = create_model("timm:resnet10t", 10)
    cls = get_method(method)
    teacher = copy.deepcopy(base) if cls.starts_from != "scratch" else None
    hp = cls.resolved_defaults()
    if "attack_steps" in hp:
        hp["attack_steps"] = 2
    m = cls(hp, base, teacher, steps_per_epoch=4, info={"n": 8, "shape": (3, 32, 32)})
    before = torch.cat([p.detach().reshape(-1).clone() for p in m.model.parameters()])
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g), torch.arange(8))
    m.model.train()
    m.set_lr(0.05)
    out = m.train_step(batch, 0, 0)
    assert torch.isfinite(torch.as_tensor(out["loss"]))
    after = torch.cat([p.detach().reshape(-1) for p in m.model.parameters()])
    assert float((after - before).abs().max()) > 1e-6, f"{method} did not move the timm model"


def test_rift_probes_the_convolutions_and_the_head_of_a_timm_model():
    from methods.rift import candidate_modules

    names = candidate_modules(create_model("timm:resnet10t", 10))
    assert "fc" in names and "net.conv1.0" in names and len(names) > 10


@pytest.fixture(scope="module")
def in1k_file(tmp_path_factory):
    """An 'ImageNet' checkpoint of timm:resnet10t as the hub stores it: model.safetensors, 1000-class head."""
    return _save(_timm_net("timm:resnet10t").state_dict(), tmp_path_factory.mktemp("hub") / "model.safetensors")


def test_the_fine_tuning_family_starts_from_a_natural_fine_tuning_of_the_backbone(tmp_path, in1k_file):
    """--pretrained of an ImageNet checkpoint: the AFT methods' starting model is the natural run initialised from
    it (head new), which the from-scratch methods in the command share; the file's digest is in every identity;
    the suite's own archs keep their hashes."""
    req = small_request(tmp_path, methods=["natural", "vaft", "afd"], arch="timm:resnet10t",
                        pretrained=str(in1k_file), epochs=None)  # (--epochs would make the listed natural another run)
    planned = {p.cfg.method: p for p in plan(req)}
    nat = planned["natural"].cfg
    assert nat.init.startswith("file:") and nat.init_path == str(in1k_file) and nat.pretrained is None
    for m in ("vaft", "afd"):
        p = planned[m]
        assert p.base.run_name == nat.run_name and p.cfg.pretrained == nat.run_name and p.cfg.init is None
    assert nat.run_name.startswith("synthetic_timm-resnet10t_natural_s0_")
    other = tmp_path / "other.safetensors"
    _save(_timm_net("timm:resnet10t", seed=2).state_dict(), other)
    again = plan(small_request(tmp_path, methods=["vaft"], arch="timm:resnet10t", pretrained=str(other)))[0]
    plain = plan(small_request(tmp_path, methods=["vaft"], arch="timm:resnet10t"))[0]
    names = {again.base.run_name, plain.base.run_name, nat.run_name}
    assert len(names) == 3  # other weights, no weights: other runs
    vit = plan(small_request(tmp_path, methods=["natural"], arch="timm:test_vit@32"))[0].cfg
    assert vit.run_name.startswith("synthetic_timm-test_vit-r32_natural_s0_") and "init" not in vit.identity()
    suite = plan(small_request(tmp_path, methods=["natural"]))[0].cfg
    assert "init" not in suite.identity()


def test_resume_is_bit_identical_from_the_backbone_and_for_afd(tmp_path, synthetic, in1k_file):
    req = small_request(tmp_path, methods=["natural"], arch="timm:resnet10t", pretrained=str(in1k_file),
                        subset=4, epochs=2, batch_size=16)
    cfg = plan(req)[0].cfg
    a, _ = resumed_equals_straight(cfg, synthetic, tmp_path / "nat", stop_after=1)
    start = _timm_net("timm:resnet10t").state_dict()
    w = a.method.model.state_dict()
    assert not torch.equal(w["net.layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])  # (it trained)
    # AFD (EMA, D₁/D₂, three optimisers) from a starting model in timm's names with the dataset's head
    vit = create_model("timm:test_vit@32", 10)
    start10 = _save(vit.timm_state_dict(), tmp_path / "vit10.safetensors")
    req = small_request(tmp_path, methods=["afd"], arch="timm:test_vit@32", pretrained=str(start10), subset=4,
                        epochs=2, batch_size=16, sets=["afd.attack_steps=1"])
    cfg = plan(req)[0].cfg
    assert cfg.init is None and cfg.pretrained.startswith("file:")
    resumed_equals_straight(cfg, synthetic, tmp_path / "afd", init_weights=cfg.pretrained_path, stop_after=1)


SMALL = ["--dataset", "synthetic", "--subset", "4", "--epochs", "1", "--batch-size", "20", "--eval-n", "20",
         "--probe-n", "4", "--device", "cpu", "-q", "--set", "natural.epochs=1", "--set", "natural.batch_size=20"]


@pytest.mark.slow
def test_bench_run_of_vaft_and_afd_on_a_timm_backbone_then_bench_eval(capsys, monkeypatch, tmp_path, in1k_file):
    """The command of the README on the synthetic data: the natural base fine-tunes the backbone, vAFT and AFD start
    from it, every attack (AutoAttack too) evaluates, the report's rows name the arch; bench eval of the run and of
    its weights in timm's names agree."""
    res = tmp_path / "results"
    code, out, err = bench_cli(capsys, monkeypatch, "run", "--methods", "vaft,afd", "--arch", "timm:resnet10t",
                               "--pretrained", str(in1k_file), "--attacks", "clean,pgd20,aa", "--aa-n", "4",
                               "--results", str(res), *SMALL, "--set", "attack_steps=1")
    assert code == 0, err
    runs = {json.loads((p / "config.json").read_text())["config"]["method"]: p for p in (res / "runs").iterdir()}
    assert sorted(runs) == ["afd", "natural", "vaft"]
    cfgs = {m: json.loads((p / "config.json").read_text())["config"] for m, p in runs.items()}
    assert cfgs["natural"]["init"].startswith("file:") and cfgs["afd"]["pretrained"] == runs["natural"].name
    for m in ("vaft", "afd"):
        ev = json.loads((runs[m] / "eval.json").read_text())["results"]
        assert {"clean", "pgd20", "aa"} <= set(ev)
    assert "synthetic_timm-resnet10t_afd_s0_" in out
    from bench.report import groups_of, read_runs, settings_table

    st = settings_table(groups_of(read_runs(res))).set_index("method")  # the report's settings table
    assert set(st["arch"]) == {"timm:resnet10t"} and st.loc["natural", "pretrained"].startswith("backbone file:")
    code, out, err = bench_cli(capsys, monkeypatch, "eval", str(runs["afd"]), "--attacks", "clean", "--n", "20",
                               "--device", "cpu", "-q")
    assert code == 0, err
    clean = json.loads((runs["afd"] / "eval.json").read_text())["results"]["clean"]["acc"]
    m = load_weights(create_model("timm:resnet10t", 10), runs["afd"] / "ckpt" / "model.safetensors")
    exported = _save(m.timm_state_dict(), tmp_path / "afd-timm.safetensors")
    code, out, err = bench_cli(capsys, monkeypatch, "eval", str(exported), "--arch", "timm:resnet10t", "--dataset",
                               "synthetic", "--attacks", "clean", "--n", "20", "--device", "cpu", "-q")
    assert code == 0, err
    assert f"{clean:6.2f}%" in out


@pytest.mark.parametrize("args,pattern", [
    (["--arch", "timm:resnt50"], r"unknown timm model 'resnt50' \(--arch timm:resnt50\); accepted: timm:<model name> "
                                 r"or timm:<model name>@<input size> .*close: resnet50"),
    (["--arch", "timm:resnet50@0"], r"--arch timm:resnet50@0: input size '0'; accepted: .*a size from 8 to 1024"),
    (["--arch", "resnet19"], r"unknown architecture 'resnet19'; accepted: .*, timm:<model name>, wrn-34-10$"),
    (["--arch", "timm:convnext_atto@8"], r"--arch timm:convnext_atto@8 cannot take the dataset's 32×32 images "
                                         r"\(.*\); accepted: timm:convnext_atto@<size> with a size it takes"),
    (["--arch", "timm:levit_128s@32"], r"timm:levit_128s@32: its classifier is tuple, not one linear layer"),
])
def test_bad_timm_archs_are_one_line(capsys, monkeypatch, tmp_path, args, pattern):
    import re

    code, out, err = bench_cli(capsys, monkeypatch, "run", "--methods", "natural", *args, "--results",
                               str(tmp_path / "r"), *SMALL)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err.strip()), err
    assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())


def test_a_model_timm_cannot_build_is_one_line(capsys, monkeypatch, tmp_path):
    def refuse(name, **kw):
        raise ValueError(f"{name} does not support in_chans={kw['in_chans']}\n(traceback detail)")

    monkeypatch.setattr(timm, "create_model", refuse)
    code, out, err = bench_cli(capsys, monkeypatch, "run", "--methods", "natural", "--arch", "timm:resnet10t",
                               "--results", str(tmp_path / "r"), *SMALL)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("timm cannot build timm:resnet10t with 10 classes and 3 input channel(s) (ValueError: resnet10t does "
            "not support in_chans=3); accepted: timm:<model name>") in err


def test_a_file_that_does_not_fit_the_timm_model_is_one_line(capsys, monkeypatch, tmp_path, in1k_file):
    code, out, err = bench_cli(capsys, monkeypatch, "run", "--methods", "vaft", "--arch", "timm:convnext_atto",
                               "--pretrained", str(in1k_file), "--results", str(tmp_path / "r"), *SMALL)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--pretrained {in1k_file}: {in1k_file} does not fit architecture timm:convnext_atto: missing" in err


def test_a_ddp_step_on_a_timm_model_is_the_one_process_step(tmp_path):
    """2 processes (7 images: 4 + 3, synchronised BN, float64): one step of vAFT and of AFD on a timm ResNet gives
    the one-process weights (tests/test_ddp.py does this for every method on the suite's own model)."""
    import ddp_workers as W

    names = ["vaft", "afd"]
    ranks = W.spawn(W.step_worker, 2, tmp_path / "ok", names, 7, False, "timm:resnet10t")
    for name in names:
        ref = W.single_step(name, 7, "timm:resnet10t")
        for r in ranks:
            gap = max(float((r[name][k].double() - v.double()).abs().max()) for k, v in ref.items()
                      if v.is_floating_point())
            assert gap < 1e-10, f"{name}: a 2-process step differs from one process's by {gap:.3g}"


def test_bench_list_says_how_to_name_a_timm_model(capsys, monkeypatch):
    code, out, _ = bench_cli(capsys, monkeypatch, "list")
    assert code == 0 and "timm:<name>" in out and "timm:resnet50" in out
    assert MODELS.get("timm:resnet10t").arch_name == "timm:resnet10t"
