"""RobustBench model-zoo models for ``bench eval robustbench:<name>``, from files already on disk.

The architecture and the entry come from robustbench's model zoo (``robustbench.model_zoo``, by its dataset and
threat-model names); the weights are read by the suite from ``<model_dir>/<dataset>/<threat>/<name>.pt`` with
``torch.load(weights_only=True)`` — nothing is downloaded, and a missing file is a one-line error with the path.
RobustBench models take [0, 1] inputs and normalise inside, like the suite's.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .compat import import_robustbench
from .errors import BenchError, choice_error


def load_robustbench(name: str, dataset: str, threat_model: str, model_dir: str | Path) -> nn.Module:
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        ds = BenchmarkDataset(dataset)
    except ValueError:
        raise choice_error("robustbench dataset", dataset, [d.value for d in BenchmarkDataset]) from None
    try:
        tm = ThreatModel(threat_model)
    except ValueError:
        raise choice_error("robustbench threat model", threat_model, [t.value for t in ThreatModel]) from None
    zoo = model_dicts.get(ds, {}).get(tm, {})
    if name not in zoo:
        raise BenchError(f"unknown robustbench model {name!r} for {ds.value}/{tm.value}; accepted: "
                         f"{', '.join(sorted(zoo)[:8])}, ... ({len(zoo)} in all)")
    path = Path(model_dir) / ds.value / tm.value / f"{name}.pt"
    if not path.is_file():
        raise BenchError(f"robustbench model file {path} is not on disk; download it on a machine with internet "
                         f"(robustbench.utils.load_model('{name}', model_dir='{model_dir}', dataset='{ds.value}', "
                         f"threat_model='{tm.value}')) and copy it here")
    model = zoo[name]["model"]()
    from .models.loading import read_weights

    sd = read_weights(path)
    own = set(model.state_dict())
    candidates = [sd]
    for prefix in ("module.", "model."):  # DataParallel / wrapper prefixes, as robustbench strips them
        last = candidates[-1]
        if last and all(k.startswith(prefix) for k in last):
            candidates.append({k[len(prefix):]: v for k, v in last.items()})
    best = max(candidates, key=lambda c: len(own & set(c)))
    try:
        model.load_state_dict(best, strict=True)
    except RuntimeError as e:  # what does not fit, in whole words (torch's message is many lines of every key)
        missing, unexpected = sorted(own - set(best)), sorted(set(best) - own)
        parts = [f"{what} {len(keys)} keys (e.g. {', '.join(keys[:4])})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        if not parts:
            parts = [ln.strip() for ln in str(e).splitlines()[1:2]] or [type(e).__name__]
        raise BenchError(f"{path} does not fit robustbench's {name}: {'; '.join(parts)}") from None
    return model.eval()
