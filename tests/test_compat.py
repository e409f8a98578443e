"""robustbench through the autoattack → pyautoattack alias, and its model zoo from files on disk."""
import sys

import pytest
import torch

from bench.errors import BenchError


def test_alias_makes_robustbench_importable_with_pyautoattacks_code():
    from bench.compat import import_robustbench

    rb = import_robustbench()
    import pyautoattack
    import robustbench.eval

    assert rb.__name__ == "robustbench"
    if sys.modules["autoattack"] is pyautoattack:  # no GitHub autoattack installed: the alias is in use
        assert sys.modules["autoattack.state"] is pyautoattack.state
        assert robustbench.eval.AutoAttack is pyautoattack.AutoAttack


def test_robustbench_zoo_model_loads_from_disk_and_evaluates(tmp_path):
    from bench.compat import import_robustbench
    from bench.zoo import load_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    name = "Wong2020Fast"  # a PreAct-ResNet-18 entry
    entry = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf][name]
    torch.manual_seed(0)
    ref = entry["model"]().eval()
    path = tmp_path / "models" / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    model = load_robustbench(name, "cifar10", "Linf", tmp_path / "models")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), ref(x)) and not model.training
    with pytest.raises(BenchError, match=r"robustbench model file .*Standard\.pt is not on disk"):
        load_robustbench("Standard", "cifar10", "Linf", tmp_path / "models")
    with pytest.raises(BenchError, match="unknown robustbench model 'Nope'"):
        load_robustbench("Nope", "cifar10", "Linf", tmp_path / "models")
    with pytest.raises(BenchError, match="unknown robustbench threat model 'L3'"):
        load_robustbench(name, "cifar10", "L3", tmp_path / "models")
