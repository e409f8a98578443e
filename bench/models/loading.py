"""Loading weights from elsewhere onto the suite's architectures — without running pickled code.

Accepted files: ``.safetensors`` (a plain state dict, or an aft-bench checkpoint), and ``.pt``/``.pth``/``.ckpt``
read with ``torch.load(weights_only=True)`` (tensors and containers only). Accepted shapes of content: a plain state
dict, or one wrapped as ``{'state_dict' | 'net' | 'model' | 'model_state_dict': ...}``; ``module.`` (DataParallel)
and ``_orig_mod.`` (torch.compile) prefixes are stripped. Key names of kuangliu/pytorch-cifar (``linear``),
TRADES / AFD WideResNets (``fc``, unused ``sub_block1``), Wong's PreAct-ResNet, and the AFD authors' disentangled
models (``ResNet_FS``: ``linear1``/``linear2``; ``WideResNet_FS``: ``fc1``/``fc2``) are mapped onto ours; for the
latter D₁ is folded into the classifier (W_ω·W_D₁, AFD eq. 2) and D₂ dropped, giving the plain evaluated network.

A state dict without normalisation buffers comes from a model that normalised nothing (AFD, TRADES) or normalised
in its data pipeline: it is run on raw [0, 1] inputs unless ``normalize=(mean, std)`` says otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import BenchError

WRAPPER_KEYS = ("state_dict", "net", "model", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")
DROPPED_PREFIXES = ("sub_block1.", "T_revision.")
NORM_KEYS = ("normalize.mean", "normalize.std")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict stored in ``path`` (see module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format", "").startswith("aft-bench-state"):
                    from ..checkpoint import load_state

                    state = load_state(path)
                    return state.get("model", state) if isinstance(state, dict) else state
                return {k: f.get_tensor(k) for k in f.keys()}
        except BenchError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BenchError(f"checkpoint {path} is not a readable safetensors file ({first})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BenchError(f"checkpoint {path} cannot be read as weights only: {_refusal(e)}; convert it to a plain "
                         "state dict or safetensors") from None
    return unwrap(obj, str(path))


def _refusal(e: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in one whole line: the global (class or callable) the
    pickle names when that is the reason, else the first line of the error that is not torch's boilerplate."""
    import re

    text = str(e)
    m = re.search(r"(?:unsupported|Unsupported global:)\s+GLOBAL\s+([\w.]+)", text)
    if m:
        return (f"it names the global {m.group(1)}, which weights-only loading refuses (unpickling it could run "
                "code)")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Weights only load failed")
             and "weights_only" not in ln and not ln.startswith("Check the documentation")]
    return f"{type(e).__name__}: {lines[0] if lines else 'unreadable'}"


def unwrap(obj, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            key = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if key is None:
                raise BenchError(f"{where} holds no state dict (keys: {list(obj)[:6]}; expected tensors or one of "
                                 f"{', '.join(WRAPPER_KEYS)})")
            obj = obj[key]
        elif isinstance(obj, nn.Module):
            obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise BenchError(f"{where} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def to_suite_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a foreign state dict's names onto ours, folding an AFD disentangler into the classifier."""
    if hasattr(model, "suite_keys"):  # a timm model: timm's key names (bench.models.timm_backbone)
        return model.suite_keys(_strip(dict(sd)))
    sd = {k: v for k, v in _strip(dict(sd)).items() if not k.startswith(DROPPED_PREFIXES)}
    # AFD's ResNet_FS: linear1 = D1, linear2 = D2, linear = ω; WideResNet_FS: fc1 = D1, fc2 = D2, fc = ω
    for d1, d2, head in (("linear1", "linear2", "linear"), ("fc1", "fc2", "fc")):
        if f"{d1}.weight" in sd and f"{head}.weight" in sd:
            w_d1 = sd.pop(f"{d1}.weight")
            sd.pop(f"{d2}.weight", None)
            sd[f"{head}.weight"] = sd[f"{head}.weight"] @ w_d1
    own = model.state_dict()
    if "fc.weight" in own and "fc.weight" not in sd and "linear.weight" in sd:
        sd = {("fc." + k[len("linear."):] if k.startswith("linear.") else k): v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, source: str | Path | dict[str, torch.Tensor],
                 normalize: tuple[Sequence[float], Sequence[float]] | None = None,
                 where: str | None = None) -> nn.Module:
    """Load ``source`` (a path or a state dict) into ``model`` in place; returns the model. ``where``: the name
    errors give a state dict (default: the path, or "state dict").

    Raises a one-line :class:`BenchError` listing the first few missing / unexpected keys, or naming a shape that
    differs (e.g. a checkpoint with another number of classes).
    """
    where = where or (str(source) if not isinstance(source, dict) else "state dict")
    sd = read_weights(source) if not isinstance(source, dict) else unwrap(source)
    sd = to_suite_keys(sd, model)
    own = model.state_dict()
    has_norm = all(k in sd for k in NORM_KEYS)
    if not has_norm:
        for k in NORM_KEYS:
            sd.pop(k, None)
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked") and k not in NORM_KEYS]
    unexpected = [k for k in sd if k not in own]
    arch = getattr(model, "arch", type(model).__name__)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:4])})")
        raise BenchError(f"{where} does not fit architecture {arch}: {'; '.join(parts)}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            if k in ("fc.weight", "fc.bias"):
                raise BenchError(f"{where} has {v.shape[0]} classes; the model for this dataset has "
                                 f"{own[k].shape[0]}")
            raise BenchError(f"{where} does not fit architecture {arch}: {k} is {tuple(v.shape)}, expected "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)
    if not has_norm and normalize is not None:
        mean, std = normalize
        model.normalize.mean.copy_(torch.tensor(list(mean)).view_as(model.normalize.mean))
        model.normalize.std.copy_(torch.tensor(list(std)).view_as(model.normalize.std))
    return model
