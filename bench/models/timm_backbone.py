"""Any timm classification model as a suite :class:`~bench.models.base.Classifier`: ``--arch timm:<model name>``
(``timm:<model name>@<size>`` to run it at ``size``×``size``).

The contract, as for the suite's own architectures:

* ``features(x)`` is timm's pooled pre-logit feature vector (``forward_head(forward_features(x), pre_logits=True)``:
  global pooling, and the head's norm / pre-logits layers where the model has them); ``fc`` is the model's final
  linear layer, taken out of the timm model (which keeps an identity in its place), so AFD's D₁ folds into it and
  the feature-gap probe measures g.
* Inputs are in [0, 1]; the model's own normalisation (mean / std of its pretrained config, e.g. ImageNet's) is held
  inside as ``normalize`` buffers (``--normalize`` puts the training set's statistics there instead). A model for
  other than 3 input channels takes the mean of the three means / stds.
* The number of classes and input channels are the dataset's (timm's ``num_classes`` / ``in_chans``).
* Input size: a model that takes any size (CNNs with global pooling: ResNets, ConvNeXts, ...) sees the dataset's
  images as they are; a model built for one size (``fixed_input_size`` in its config: ViTs, ...) is built at
  ``@size`` if given, else at its own size (224 for ``vit_tiny_patch16_224``), and inputs of another size are
  resized on the device — bilinearly, inside ``features``, after the attack: ε, step sizes and AutoAttack stay in the
  dataset's pixel space. ``@size`` on a size-agnostic model resizes its inputs to ``size`` too (an ImageNet ResNet-50
  sees 32×32 CIFAR images as 224×224 with ``timm:resnet50@224``). A model that cannot take the dataset's size is
  refused when the run is planned, naming an ``@size`` that it takes.

Weights: ``suite_keys`` maps a state dict in timm's key names (what ``timm`` and the Hugging Face hub store:
``model.safetensors`` / ``pytorch_model.bin``, or ``torch.save(model.state_dict())``) onto ours (``net.<timm key>``,
the classifier as ``fc``), through the family's own checkpoint filter (e.g. a ViT's position embedding resampled to
the grid of ``@size``) and timm's adaptation of the first convolution to 1 input channel; ``timm_state_dict`` is the
inverse (a fine-tuned model back in timm's names). :func:`pretrained_role` tells an ImageNet-style checkpoint (no
head, or a head of another number of classes: a *backbone* the suite fine-tunes naturally first, head new) from a
starting model for the dataset (head of its classes); :func:`load_backbone` loads the former.
"""
from __future__ import annotations

import difflib
import functools
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BenchError
from .base import Classifier

PREFIX = "timm:"
ACCEPTED = "timm:<model name> or timm:<model name>@<input size> with a name of timm.list_models()"


def is_timm(arch: str | None) -> bool:
    return isinstance(arch, str) and arch.startswith(PREFIX)


def parse_arch(arch: str) -> tuple[str, int | None]:
    """``timm:<name>[@<size>]`` → (name, size or None); a one-line error for a name timm does not know."""
    rest = arch[len(PREFIX):] if is_timm(arch) else arch
    name, at, size_s = rest.partition("@")
    size = None
    if at:
        if not re.fullmatch(r"[0-9]{1,4}", size_s) or not 8 <= int(size_s) <= 1024:
            raise BenchError(f"--arch {arch}: input size {size_s!r}; accepted: {ACCEPTED} (a size from 8 to 1024, "
                             "e.g. timm:vit_tiny_patch16_224@224)")
        size = int(size_s)
    import timm

    if not name or not timm.is_model(name):
        near = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=4, cutoff=0.6)
        hint = f"; close: {', '.join(near)}" if near else ""
        raise BenchError(f"unknown timm model {name!r} (--arch {arch}); accepted: {ACCEPTED} (timm "
                         f"{timm.__version__}{hint})")
    return name, size


def _own_cfg(name: str) -> dict[str, Any]:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    return [sum(values) / len(values)] * channels


class TimmClassifier(Classifier):
    """A timm model split into ``net`` (everything up to the pre-logit features) and ``fc``; see the module
    docstring. ``timm_name``: the timm model name; ``resize``: (H, W) the inputs are resized to, or None."""

    def __init__(self, timm_name: str, size: int | None, num_classes: int, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        import timm

        cfg = _own_cfg(timm_name)
        own_mean = _per_channel(cfg.get("mean", (0.0, 0.0, 0.0)), in_channels)
        own_std = _per_channel(cfg.get("std", (1.0, 1.0, 1.0)), in_channels)
        super().__init__(num_classes, in_channels, mean if mean is not None else own_mean,
                         std if std is not None else own_std)
        fixed = bool(cfg.get("fixed_input_size", False))
        kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels}
        if fixed and size is not None:
            kwargs["img_size"] = size
        what = f"timm:{timm_name}" + (f"@{size}" if size else "")
        try:
            net = timm.create_model(timm_name, pretrained=False, **kwargs)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BenchError(f"timm cannot build {what} with {num_classes} classes and {in_channels} input "
                             f"channel(s) ({type(e).__name__}: {first}); accepted: {ACCEPTED} that timm builds so"
                             ) from None
        head = net.get_classifier()
        if not isinstance(head, nn.Linear) or head.out_features != num_classes or head.bias is None:
            raise BenchError(f"{what}: its classifier is {type(head).__name__}, not one linear layer (with a bias) "
                             f"of {num_classes} outputs, which the suite's methods need (features g and ω); accepted: "
                             "a timm model whose get_classifier() is an nn.Linear")
        self.timm_name = timm_name
        self.classifier_keys = self._keys(net.pretrained_cfg.get("classifier"), "fc")
        self.first_conv_keys = self._keys(net.pretrained_cfg.get("first_conv"), None)
        net.reset_classifier(0)
        self.net = net
        self.fc = head
        if size is not None:
            self.resize: tuple[int, int] | None = (size, size)
        elif fixed:
            self.resize = tuple(int(v) for v in net.pretrained_cfg.get("input_size", cfg["input_size"])[-2:])
        else:
            self.resize = None

    @staticmethod
    def _keys(value, default) -> tuple[str, ...]:
        if value is None:
            return (default,) if default else ()
        return (value,) if isinstance(value, str) else tuple(value)

    def _backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is not None and tuple(x.shape[-2:]) != self.resize:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
        return self._backbone(self.normalize(x))

    # -- weights in timm's key names ----------------------------------------------------------------------------
    @property
    def classifier_key(self) -> str:
        return self.classifier_keys[0]

    def suite_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``sd`` in our key names: a suite state dict (``net.*`` keys) as it is; one in timm's names through the
        family's checkpoint filter, the first convolution adapted to ``in_channels``, the classifier as ``fc``."""
        if any(k.startswith("net.") for k in sd):
            return sd
        sd = dict(sd)
        module = sys.modules.get(type(self.net).__module__)
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                try:
                    sd = filter_fn(sd, self.net)
                except TypeError:
                    sd = filter_fn(sd)
            except Exception:  # (a file of another model: the load below names its missing / unexpected keys)
                pass
        if self.in_channels != 3:
            from timm.models._manipulate import adapt_input_conv

            for k in self.first_conv_keys:
                w = sd.get(f"{k}.weight")
                if w is not None and w.dim() == 4 and w.shape[1] == 3:
                    sd[f"{k}.weight"] = adapt_input_conv(self.in_channels, w)
        out: dict[str, torch.Tensor] = {}
        heads = {f"{self.classifier_key}.weight": "fc.weight", f"{self.classifier_key}.bias": "fc.bias"}
        for k, v in sd.items():
            if k in heads:
                out[heads[k]] = v
            elif not any(k.startswith(c + ".") for c in self.classifier_keys[1:]):
                out["net." + k] = v
        return out

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in timm's key names (what ``timm.create_model(name, num_classes=K)`` loads): the inverse of
        :meth:`suite_keys`, normalisation left out (timm normalises in its data pipeline)."""
        out = {k[len("net."):]: v for k, v in self.state_dict().items() if k.startswith("net.")}
        out.update({f"{self.classifier_key}.{k}": v for k, v in self.fc.state_dict().items()})
        return out


def resolve(rest: str):
    """The registry's builder for ``timm:<rest>`` (validated here, built by :func:`bench.models.create_model`)."""
    name, size = parse_arch(PREFIX + rest)
    builder = functools.partial(TimmClassifier, name, size)
    builder.arch_name = PREFIX + rest  # type: ignore[attr-defined]
    return builder


# ---------------------------------------------------------------------------------------------------------------
# pre-trained files and the checks made when a run is planned


def _head_rows(model: TimmClassifier, sd: dict[str, torch.Tensor]) -> int | None:
    from .loading import _strip

    sd = _strip(dict(sd))
    if any(k.startswith("net.") for k in sd):
        w = sd.get("fc.weight")
    else:
        w = sd.get(f"{model.classifier_key}.weight")
    return int(w.shape[0]) if w is not None and w.dim() == 2 else None


def pretrained_role(model: Classifier, path: str | Path) -> str:
    """``"backbone"`` for a timm-named checkpoint whose head is missing or has another number of classes than
    ``model`` (ImageNet's 1000: the suite fine-tunes it naturally on the dataset first, head new); ``"start"`` for
    one that is a model of the dataset (suite weights, or a timm head of its classes: the fine-tuning methods start
    from it, as from the suite's own natural model)."""
    from .loading import _strip, read_weights

    if not isinstance(model, TimmClassifier):
        return "start"
    sd = read_weights(path)
    if any(k.startswith("net.") for k in _strip(dict(sd))):
        return "start"
    return "start" if _head_rows(model, sd) == model.num_classes else "backbone"


def load_backbone(model: Classifier, path: str | Path, digest: str | None = None, run: str = "") -> Classifier:
    """Load everything of ``path`` but its classifier into ``model`` (which keeps its own, freshly initialised
    ``fc``); a one-line error naming what does not fit, or, given the ``digest`` (``file:<sha256>``) ``run`` was
    planned with, that the file changed since."""
    from ..runner import file_digest
    from .loading import load_weights, read_weights, to_suite_keys

    if digest is not None and Path(path).is_file() and f"file:{file_digest(path)}" != digest:
        raise BenchError(f"the pre-trained backbone {path} changed since run {run} was planned with it ({digest}); "
                         "accepted: that file as it was, or plan the run again (bench run) to start from the file "
                         "as it is now")

    sd = {k: v for k, v in to_suite_keys(read_weights(path), model).items() if not k.startswith("fc.")}
    sd.update({f"fc.{k}": v for k, v in model.fc.state_dict().items()})
    return load_weights(model, sd, where=str(path))


def check_input(model: Classifier, channels: int, size: int, arch: str) -> None:
    """A one-line error unless ``model`` takes a batch of ``channels``×``size``×``size`` images (timm models only:
    e.g. a ConvNeXt's downsampling leaves nothing of 28×28 images)."""
    if not isinstance(model, TimmClassifier):
        return
    def refusal(s: int) -> str | None:
        try:
            with torch.no_grad():
                model(torch.zeros(1, channels, s, s))
            return None
        except Exception as e:
            return (str(e).strip().splitlines() or [type(e).__name__])[0]

    def takes(s: int) -> bool:
        return refusal(s) is None

    was = model.training
    model.eval()
    try:
        first = refusal(size)
        if first is None:
            return
        base = arch.split("@")[0]
        ok = next((s for s in (32, 64, 96, 128, 160, 224) if s > size and takes(s)), None)
        raise BenchError(f"--arch {arch} cannot take the dataset's {size}×{size} images ({first[:160]}); accepted: "
                         f"{base}@<size> with a size it takes (inputs resized on the device)"
                         + (f", e.g. {base}@{ok}" if ok else ""))
    finally:
        model.train(was)


def check_sync_bn(model: Classifier, arch: str) -> None:
    """Under data parallelism with synchronised BN: a one-line error for a model with BatchNorm layers of timm's own
    kinds (BatchNormAct2d: BN with its activation inside), which the suite's SyncBatchNorm does not replace
    faithfully."""
    odd = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and type(m) is not nn.BatchNorm2d})
    if odd:
        raise BenchError(f"--arch {arch} has BatchNorm layers of kind {', '.join(odd)}, which --sync-bn cannot "
                         "synchronise; accepted: --no-sync-bn (per-process statistics), one process, or a model with "
                         "plain BatchNorm2d or none")


def register(models) -> None:
    models.add_family(PREFIX, resolve, placeholder="model name",
                      paper="any timm classification model (timm:<name>, timm:<name>@<input size>); e.g. "
                            "timm:resnet50, timm:convnext_atto, timm:vit_tiny_patch16_224")
