"""Architectures meet the Classifier contract; foreign checkpoints load (and fold) correctly and safely."""
import pytest
import torch

from bench.errors import BenchError
from bench.models import MODELS, create_model
from bench.models.loading import load_weights


@pytest.mark.parametrize("arch,d", [("resnet18", 512), ("preactresnet18", 512), ("resnet50", 2048), ("smallcnn", 64),
                                    ("smallcnn-x2", 128), ("smallvgg", 128)])
def test_contract_features_and_fc(arch, d):
    m = create_model(arch, 7).eval()
    x = torch.rand(2, 3, 32, 32)
    f = m.features(x)
    assert f.shape == (2, d) and m.feature_dim == d
    assert torch.allclose(m(x), m.fc(f), atol=1e-6)
    assert {"normalize.mean", "normalize.std"} <= set(m.state_dict())
    assert m.normalize.is_identity()  # raw [0, 1] inputs by default (AFD convention)


def test_paper_sizes():
    def params(arch):
        return sum(p.numel() for p in create_model(arch, 10).parameters())

    assert abs(params("resnet18") - 11.17e6) < 0.05e6      # AFD §Training Time: ≈11.2 M
    wrn = create_model("wrn-34-10", 10)
    assert wrn.feature_dim == 640 and abs(sum(p.numel() for p in wrn.parameters()) - 46.16e6) < 0.1e6


def test_the_small_cnns_have_their_documented_shapes_and_smallcnn_weights_keep_their_names():
    """smallcnn's parameter names and shapes are those of the one-conv-per-stage model its records were trained
    with (so old smallcnn weights load); the CPU tier's candidates have the sizes bench/configs/cpu.toml states, and
    every model halves the resolution three times (32 → 4 before the pooling)."""
    def params(arch):
        return sum(p.numel() for p in create_model(arch, 10).parameters())

    sd = create_model("smallcnn", 10).state_dict()
    convs = {k: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight") and v.dim() == 4}
    assert convs == {"body.0.weight": (8, 3, 3, 3), "body.3.weight": (16, 8, 3, 3), "body.6.weight": (32, 16, 3, 3),
                     "body.9.weight": (64, 32, 3, 3)}
    assert {f"body.{i}.running_mean" for i in (1, 4, 7, 10)} <= set(sd) and tuple(sd["fc.weight"].shape) == (10, 64)
    assert (params("smallcnn"), params("smallcnn-x2"), params("smallvgg")) == (25_298, 98_970, 295_290)
    for arch, convs_n in (("smallcnn", 4), ("smallcnn-x2", 4), ("smallvgg", 8)):
        m = create_model(arch, 10).eval()
        assert sum(isinstance(x, torch.nn.Conv2d) for x in m.body) == convs_n
        assert m.body(torch.rand(1, 3, 32, 32)).shape[-2:] == (4, 4)


@pytest.mark.parametrize("arch", ["resnet18", "preactresnet18", "smallcnn", "smallvgg"])
def test_stem_adapts_to_64px_and_one_channel(arch):
    m = create_model(arch, 200).eval()
    assert m(torch.rand(1, 3, 64, 64)).shape == (1, 200)
    g = create_model(arch, 10, in_channels=1).eval()
    assert g(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_normalisation_lives_in_the_model():
    m = create_model("smallcnn", 10, mean=[0.5] * 3, std=[0.25] * 3).eval()
    plain = create_model("smallcnn", 10).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("normalize")}, strict=False)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(m(x), plain((x - 0.5) / 0.25), atol=1e-5)


def _kuangliu(sd):
    """Our ResNet-18 state dict under kuangliu/pytorch-cifar's names, wrapped as his checkpoints are."""
    sd = {("linear." + k[3:] if k.startswith("fc.") else k): v for k, v in sd.items() if not k.startswith("normalize")}
    return {"net": {"module." + k: v for k, v in sd.items()}, "acc": 95.0, "epoch": 200}


def test_a_kuangliu_checkpoint_gives_the_same_logits_as_native_weights(tmp_path):
    torch.manual_seed(0)
    native = create_model("resnet18", 10)
    native.train()
    native(torch.rand(8, 3, 32, 32))  # move the BN statistics away from their initial values
    native.eval()
    path = tmp_path / "ckpt.pth"
    torch.save(_kuangliu(native.state_dict()), path)
    loaded = load_weights(create_model("resnet18", 10), path).eval()
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded(x), native(x))


def test_afd_authors_disentangled_checkpoint_is_folded(tmp_path):
    """ResNet_FS: linear1 = D₁, linear2 = D₂, linear = ω; the evaluated model is ω·D₁·g (AFD eq. 2)."""
    torch.manual_seed(0)
    base = create_model("resnet18", 10).eval()
    d1, d2 = torch.randn(512, 512) * 0.05 + torch.eye(512), torch.randn(512, 512)
    sd = {("linear." + k[3:] if k.startswith("fc.") else k): v for k, v in base.state_dict().items()
          if not k.startswith("normalize")}
    sd["linear1.weight"], sd["linear2.weight"] = d1, d2
    torch.save({"state_dict": sd}, tmp_path / "model-ema-20.pth")
    folded = load_weights(create_model("resnet18", 10), tmp_path / "model-ema-20.pth").eval()
    x = torch.rand(3, 3, 32, 32)
    expected = torch.nn.functional.linear(base.features(x) @ d1.T, base.fc.weight, base.fc.bias)
    assert torch.allclose(folded(x), expected, atol=1e-4)


def test_trades_wrn_names_with_an_unused_sub_block_load():
    wrn = create_model("wrn-34-10", 10)
    sd = dict(wrn.state_dict())
    sd["sub_block1.layer.0.conv1.weight"] = torch.zeros(1)
    fresh = create_model("wrn-34-10", 10)
    load_weights(fresh, sd)
    assert torch.equal(fresh.fc.weight, wrn.fc.weight)


def test_mismatches_are_one_line_errors(tmp_path):
    r18 = create_model("resnet18", 10).state_dict()
    with pytest.raises(BenchError, match=r"does not fit architecture preactresnet18: missing \d+ keys \(e\.g\. "):
        load_weights(create_model("preactresnet18", 10), r18)
    with pytest.raises(BenchError, match="has 10 classes; the model for this dataset has 100"):
        load_weights(create_model("resnet18", 100), r18)
    with pytest.raises(BenchError, match="holds no state dict"):
        load_weights(create_model("resnet18", 10), {"epoch": 3, "args": {"lr": 0.1}})


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(BenchError, match="cannot be read as weights only") as e:
        load_weights(create_model("smallcnn", 10), path)
    assert not marker.exists()
    # the message names what was refused, whole, on one line (not torch's boilerplate cut at a width)
    msg = str(e.value)
    assert "\n" not in msg and "names the global posix.system" in msg
    assert msg.endswith("convert it to a plain state dict or safetensors")


def test_foreign_weights_run_raw_unless_normalize_is_given():
    src = create_model("smallcnn", 10, mean=[0.4] * 3, std=[0.2] * 3)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("normalize")}
    raw = load_weights(create_model("smallcnn", 10), sd)
    assert raw.normalize.is_identity()
    normed = load_weights(create_model("smallcnn", 10), sd, normalize=([0.4] * 3, [0.2] * 3))
    assert torch.allclose(normed.normalize.std, src.normalize.std)


def test_registry_rejects_duplicates():
    from bench.models.registry import register_model

    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(lambda **kw: None)
    assert "wrn-34-10" in MODELS.names()
