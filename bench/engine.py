"""The training loop: epochs, the method's schedule, optional EMA, AMP / channels_last / torch.compile, timing,
the feature-gap probe, checkpoints and resume.

The engine owns the data, the clock and the disk; the method owns its losses, attacks and optimiser steps. Per
epoch it records loss, train accuracy, lr, wall time (synchronised, probe / checkpoint / evaluation excluded),
images/s, peak GPU memory and the feature gap (METHODS-consistent probe, AFD Fig. 1a) in ``metrics.jsonl``, and
writes a checkpoint (model, EMA, optimisers, method state, metrics) as safetensors. Shuffling, augmentation and the
global RNG of epoch e are seeded from (seed, e), so a run resumed from its checkpoint after epoch e reaches the same
weights bit for bit on a CPU as one that was never interrupted.

Under data parallelism (``dist``, :mod:`bench.dist`) every rank runs this loop on its shard of each global batch;
the engine converts BN to :class:`~bench.dist.SyncBatchNorm` (``sync_bn``), has the method set up its training
forward for it (``Method.prepare_distributed``: DistributedDataParallel by default), opens the step context
(:meth:`Dist.step`, :mod:`bench.step`) around every ``train_step``, reduces the epoch's sums, checks after every
epoch that all ranks hold the same parameters, and lets rank 0 alone probe, write records and checkpoints. Every
rank resumes from rank 0's checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import faults
from .checkpoint import load_latest, save_state
from .config import RunConfig
from .data import Dataset
from .devices import device_label, resolve_device
from .dist import SINGLE, Dist, check_bf16, convert_sync_bn, restore_bn
from .errors import BenchError
from .evaluate import feature_gaps
from .loader import DeviceLoader, hash_seed
from .precision import fp32_math, full_fp32, param_dtype
from .models import build_model
from .models.loading import load_weights
from .records import RunDir

log = logging.getLogger("bench")


class EMA:
    """Exponential moving average of all parameters *and* buffers (BN statistics included) of a module.

    ``decay_t = min(decay, (t+1)/(t+10))`` with ``warmup`` (AFD's ``tl+sl.py``, t = number of updates so far),
    else ``decay``. Integer buffers (``num_batches_tracked``) are copied.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0

    def current_decay(self) -> float:
        return min(self.decay, (self.updates + 1) / (self.updates + 10)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        src = module.state_dict()
        mine, theirs = [], []
        for k, v in self.module.state_dict().items():
            s = src[k].detach()
            if v.dtype.is_floating_point:
                mine.append(v)
                theirs.append(s.to(v.dtype))  # (the same tensor when the dtypes agree)
            else:
                v.copy_(s)
        # v ← d·v + (1 − d)·s for all tensors at once (a few kernels instead of one pair per tensor)
        if mine:
            torch._foreach_mul_(mine, d)
            torch._foreach_add_(mine, theirs, alpha=1 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def _summarise(sums: dict[str, torch.Tensor], steps: int, images: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in sums.items():
        v = float(v)
        if k == "correct_sum":
            out["train_acc"] = 100.0 * v / max(images, 1)
        elif k.endswith("_sum"):
            out[k[:-4]] = v / max(images, 1)
        else:
            out[k] = v / max(steps, 1)
    return out


class _SealedSplit:
    """Stands in for the test split while a method trains: any use of it is an error (RiFT's stages, and every
    other method, must select and fine-tune on training data only; docs/methods.md Decision 6)."""

    def __getattr__(self, name: str):
        raise BenchError(f"the test split is sealed during training (attribute {name!r} was read); stages may use "
                         "only the training split and its held-out slice")

    def __len__(self) -> int:
        raise BenchError("the test split is sealed during training; stages may use only the training split and "
                         "its held-out slice")


@contextlib.contextmanager
def sealed_test(dataset: Dataset) -> Iterator[None]:
    """Replace ``dataset.test`` by :class:`_SealedSplit` inside the block (the feature-gap probe's images were
    copied at construction and are only ever read by the probe, which moves no weight)."""
    saved = dataset.test
    dataset.test = _SealedSplit()  # type: ignore[assignment]
    try:
        yield
    finally:
        dataset.test = saved


class Trainer:
    """Trains one run (``cfg``) in ``run`` on ``dataset``; see the module docstring."""

    def __init__(self, cfg: RunConfig, dataset: Dataset, run: RunDir, *, init_weights: str | Path | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print, dist: Dist = SINGLE):
        from methods import get_method

        self.cfg, self.dataset, self.run, self.dist = cfg, dataset, run, dist
        self.progress, self.echo = progress and dist.is_main, echo if dist.is_main else (lambda s: None)
        self.device = resolve_device(cfg.device, dist)
        check_bf16(self.device, cfg.precision)  # (a pre-Ampere GPU would emulate bf16)
        self.device_label = device_label(self.device, dist)
        if self.device.type == "cuda":
            # cuDNN picks the fastest convolution algorithm for each shape once (the shapes of a run are fixed)
            torch.backends.cudnn.benchmark = True
        self.method_cls = get_method(cfg.method)
        self.dtype = param_dtype(cfg.precision)  # parameters, inputs and per-example state (fp64: float64)
        hp = cfg.hp
        train = dataset.train.per_class(cfg.subset) if cfg.subset else dataset.train
        held = int(cfg.holdout or hp.get("holdout_per_class", 0) or 0)
        # a method may keep the last `holdout_per_class` images of every class out of training (RiFT's MRC and
        # validation data): it gets them through its StageContext, never the test split; `cfg.holdout` keeps the
        # same images out of the training of RiFT's PGD-AT base
        self.heldout = train.last_per_class(held) if held else None
        if held:
            train = train.drop_last_per_class(held)
        from .data import DATASETS

        spec = DATASETS.get(cfg.dataset)
        self.spec = spec
        self.loader = DeviceLoader(train, hp["batch_size"], self.device, seed=hash_seed(cfg.seed, 17),
                                   pad=spec.crop_pad, flip=spec.flip, augment=self.method_cls.loader_augment,
                                   dist=dist, dtype=self.dtype)
        self.train_split = train
        if dist.enabled:
            self._check_shards(len(train), hp["batch_size"])
        if len(self.loader) == 0:
            raise BenchError(f"the training split has {len(train)} images, fewer than one batch of "
                             f"{hp['batch_size']}" + (f" after holding out the last {held} images of every class "
                             f"({cfg.method}.holdout_per_class; lower it or raise --subset)" if held else ""))
        torch.manual_seed(hash_seed(cfg.seed, 0xA11))
        model = build_model(cfg, dataset)
        teacher = None
        if init_weights is None and cfg.init_path is not None:  # a pre-trained backbone, classifier new
            from .models.timm_backbone import load_backbone

            load_backbone(model, cfg.init_path, digest=cfg.init, run=cfg.run_name)
        if init_weights is not None:
            load_weights(model, init_weights)
            teacher = copy.deepcopy(model)
        elif self.method_cls.starts_from != "scratch":
            raise BenchError(f"method {cfg.method} starts from a {self.method_cls.starts_from} model; none given")
        model = model.to(self.device, self.dtype)
        if teacher is not None:
            teacher = teacher.to(self.device, self.dtype)
        if dist.enabled and dist.sync_bn:
            convert_sync_bn(model)  # same parameters and buffers: the state dict is unchanged
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        info = {"n": len(train), "shape": tuple(train.x.shape[1:]), "num_classes": dataset.num_classes,
                "crop_pad": spec.crop_pad, "flip": spec.flip}
        self.method = self.method_cls(hp, model, teacher, len(self.loader), info, processes=dist.world)
        trained = self.method.model  # may wrap the architecture (AFD adds D1, D2)
        if cfg.compile:
            self.method.compile()
        self.ema = EMA(trained, hp["ema"]["decay"], hp["ema"].get("warmup", True)) if hp.get("ema") else None
        probe = dataset.test.head(cfg.probe_n)
        self.probe_x = probe.x.to(self.device).to(self.dtype).div_(255)
        self.probe_y = probe.y.to(self.device)
        self.metrics: list[dict[str, Any]] = []
        self.start_epoch = 0
        self._distributed = False  # the method's prepare_distributed ran (data parallelism, before the first epoch)

    def _check_shards(self, n: int, batch: int) -> None:
        """Under data parallelism every rank needs rows of every batch: at least one image (synchronised BN) or two
        (per-rank BN) of each. A last batch that one process trains but the ranks could not share would make the
        run differ from its one-process self under the same identity: refused."""
        w = self.dist.world
        per = 1 if self.dist.sync_bn else 2
        if batch < per * w:
            raise BenchError(f"batch size {batch} on {w} processes: every process needs at least {per} image(s) of "
                             f"each batch; accepted: a batch size ≥ {per * w}, or fewer processes")
        rest = n % batch
        if self.dist.sync_bn and 2 <= rest < w:
            raise BenchError(f"the last batch of every epoch has {rest} images ({n} training images, batch {batch}),"
                             f" fewer than the {w} processes: one process trains on it, {w} could not, and the run "
                             f"would not be itself; accepted: at most {rest} processes, or a batch size or --subset "
                             f"that leaves 0, 1 or at least {w} images over")

    # -- checkpoints --------------------------------------------------------------------------------------------
    @property
    def ckpt_paths(self) -> tuple[Path, Path]:
        return self.run.ckpt_dir / "last.safetensors", self.run.ckpt_dir / "prev.safetensors"

    def state(self, epochs_done: int) -> dict[str, Any]:
        return {"run_hash": self.cfg.run_hash, "epochs_done": epochs_done, "model": self.method.model.state_dict(),
                "method": self.method.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "metrics": self.metrics}

    def save_checkpoint(self, epochs_done: int) -> None:
        if not self.dist.is_main:
            return
        last, prev = self.ckpt_paths
        state = self.state(epochs_done)
        if last.exists():
            os.replace(last, prev)
        save_state(last, state)

    def resume(self) -> int:
        found = load_latest(list(self.ckpt_paths))
        if found is None:
            return 0
        state, path = found
        if state.get("run_hash") != self.cfg.run_hash:
            raise BenchError(f"checkpoint {path} belongs to another configuration (hash {state.get('run_hash')}, "
                             f"this run {self.cfg.run_hash})")
        self.method.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.metrics = list(state["metrics"])
        self.start_epoch = int(state["epochs_done"])
        before = [m["device"] for m in self.metrics if m.get("device")]
        if before and before[-1] != self.device_label:  # recorded per epoch, and said
            self.echo(f"[{self.tag}] note: epochs 1-{self.start_epoch} ran on {before[-1]}, the rest runs on "
                      f"{self.device_label}; each epoch's row of metrics.jsonl names its device")
        # (every rank waits for rank 0's write, and stops if it failed: no rank is left at a barrier)
        self.dist.main_only(lambda: self.run.write_metrics(self.metrics), "writing metrics.jsonl on resume")
        if self.start_epoch:
            self.echo(f"[{self.tag}] resuming after epoch {self.start_epoch} from {path.name}")
        return self.start_epoch

    # -- the loop -----------------------------------------------------------------------------------------------
    @property
    def tag(self) -> str:
        return f"{self.cfg.method} s{self.cfg.seed}"

    def evaluated_module(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.method.model

    def train(self, stop_after: int | None = None) -> None:
        """Train from the current epoch to the last (or only ``stop_after`` epochs, for tests): the method's stage
        before training, the epochs, then its stage after training once every epoch is done (or the method
        stopped early). The test split is sealed throughout."""
        epochs = self.cfg.hp["epochs"]
        amp = self.cfg.precision == "bf16"
        end = epochs if stop_after is None else min(epochs, self.start_epoch + stop_after)
        ctx = self.stage_context()
        with sealed_test(self.dataset):
            self.method.before_training(ctx)
            self.dist.main_only(self._write_method_record, "writing method.json")
        if not self.metrics and self.probe_x.shape[0]:
            # epoch 0: the gap of the starting model (the left end of the paper's Fig. 1a curves)
            self.metrics.append({"epoch": 0, **self.probe()})
            self.dist.main_only(self._write_metrics, "writing metrics.jsonl")
        self._prepare_distributed()
        # fp32 (and fp64) training computes in full fp32: no TF32 convolutions (cuDNN's default on Ampere and later)
        with sealed_test(self.dataset), (contextlib.nullcontext() if amp else full_fp32()):
            self._epochs(end, epochs, amp)
            if self.start_epoch >= epochs or self.method.stopped:
                self.method.after_training(ctx)
                self.dist.main_only(lambda: (self.save_checkpoint(self.start_epoch), self._write_method_record()),
                                    "writing the checkpoint after training")

    def _prepare_distributed(self) -> None:
        """Under data parallelism, once: the method sets up its training forward for several processes (after the
        stage before training, which may choose the parameters that train: RiFT)."""
        if not self.dist.enabled or self._distributed:
            return
        self.method.prepare_distributed(self.dist.wrap)
        self._distributed = True

    def _write_metrics(self) -> None:
        if self.dist.is_main:
            self.run.write_metrics(self.metrics)

    def _write_method_record(self) -> None:
        from .fsutil import atomic_write_json

        if not self.dist.is_main:
            return
        rec = self.method.record()
        if rec:
            atomic_write_json(self.run.method_record, {"method": self.cfg.method, **rec})

    def _epochs(self, end: int, epochs: int, amp: bool) -> None:
        from tqdm import tqdm

        cfg, dev, dist = self.cfg, self.device, self.dist
        for epoch in range(self.start_epoch, end):
            if self.method.stopped:  # the method ended training early (e.g. FGSM-RS early stopping)
                break
            torch.manual_seed(hash_seed(cfg.seed, epoch, 1))
            self.method.model.train()
            self.method.begin_epoch(epoch)
            sums: dict[str, torch.Tensor] = {}
            # on the device once per epoch: the step of the first non-finite loss is found without a host sync
            first_bad = torch.tensor(-1, device=dev)
            step_ids = torch.arange(len(self.loader), device=dev)
            images = 0
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                torch.cuda.synchronize(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            bar = tqdm(total=len(self.loader), desc=f"{self.tag} epoch {epoch + 1}/{epochs}", unit="step",
                       leave=False, disable=None if self.progress else True)
            lr = self.method.lr_at(epoch, 0)
            for step, batch in enumerate(self.loader.epoch(epoch)):
                lr = self.method.lr_at(epoch, step)
                self.method.set_lr(lr)
                if cfg.channels_last:
                    batch.x = batch.x.contiguous(memory_format=torch.channels_last)
                with dist.step(batch.shard), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    out = self.method.train_step(batch, epoch, step)
                if self.ema is not None:
                    self.ema.update(self.method.model)
                for k, v in out.items():
                    v = v.detach().float()
                    if dist.enabled and not k.endswith("_sum"):  # a mean over this rank's rows: weighted by share
                        v = v * batch.shard.share
                    sums[k] = sums[k] + v if k in sums else v
                if "loss" in out:
                    bad = ~torch.isfinite(out["loss"].detach())
                    first_bad = torch.where((first_bad < 0) & bad, step_ids[step], first_bad)
                images += batch.y.shape[0]
                bar.update(1)
                faults.point("step")
            bar.close()
            if dist.enabled:
                sums, images, first_bad = self._reduce_epoch(sums, images, first_bad)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            dist.check_same(self.method.model, f"{self.tag} epoch {epoch + 1}")
            if int(first_bad) >= 0:
                raise BenchError(f"{self.tag}: the loss became NaN or inf at epoch {epoch + 1}, step "
                                 f"{int(first_bad) + 1}; training stopped, the last good checkpoint "
                                 f"(after epoch {epoch}) is kept")
            # cpu_seconds: this process's CPU time (all its threads) in the epoch: the cost, which another load on
            # the machine stretches far less than the wall-clock seconds
            # the device each epoch ran on (a run resumed on another machine says so, epoch by epoch: Table 5
            # credits every epoch to its own device) and how its fp32 work was computed
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "seconds": round(seconds, 4),
                                   "cpu_seconds": round(time.process_time() - c0, 4),
                                   "device": self.device_label, "fp32_math": "bf16 autocast" if amp else fp32_math(),
                                   "images": images, "images_per_s": round(images / max(seconds, 1e-9), 2)}
            row.update({k: round(v, 6) for k, v in _summarise(sums, len(self.loader), images).items()})
            if dev.type == "cuda":
                row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
            row.update(self.method.end_epoch(epoch))
            if self.probe_x.shape[0] and dist.is_main:
                row.update(self.probe())
            self.metrics.append(row)
            self.start_epoch = epoch + 1
            # the epoch ends, on every rank, once rank 0 has its checkpoint on disk (or every rank stops if it failed)
            dist.main_only(lambda: (self.save_checkpoint(epoch + 1), self._write_metrics()),
                           f"writing the checkpoint of epoch {epoch + 1}")
            self.echo(self.format_row(row, epochs))
            if self.method.stopped:
                self.echo(f"[{self.tag}] {self.cfg.method} stopped training after epoch {epoch + 1}")
            faults.point("epoch")

    def _reduce_epoch(self, sums: dict[str, torch.Tensor], images: int,
                      first_bad: torch.Tensor) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
        """The epoch's sums, image count and first non-finite step over all ranks (one all-reduce for the sums)."""
        keys = sorted(sums)
        packed = torch.stack([sums[k].reshape(()) for k in keys] + [torch.tensor(float(images), device=self.device)])
        packed = self.dist.all_sum(packed)
        big = torch.iinfo(torch.int64).max
        bad = self.dist.all_min(torch.where(first_bad < 0, torch.full_like(first_bad, big), first_bad))
        return ({k: packed[i] for i, k in enumerate(keys)}, int(packed[-1]),
                torch.where(bad == big, torch.full_like(bad, -1), bad))

    def stage_context(self):
        from methods.base import StageContext

        return StageContext(train=self.train_split, heldout=self.heldout, device=self.device, seed=self.cfg.seed,
                            echo=lambda s: self.echo(f"[{self.tag}] {s}"),
                            save=lambda: self.dist.main_only(lambda: self.save_checkpoint(self.start_epoch),
                                                             "writing the stage's checkpoint"),
                            progress=self.progress)

    def probe(self) -> dict[str, float]:
        """Feature gaps of the evaluated module on the fixed probe batch: ``feature_gap`` as the method defines it
        (AFD Fig. 1a) and ``feature_gap_g``, ‖g(x) − g(x′)‖_∞ of the backbone features, the same for every method."""
        module = self.evaluated_module()
        fwd, nat, adv = self.method.probe(module)
        gaps = feature_gaps(module, self.probe_x, self.probe_y, {"feature_gap": (nat, adv),
                                                                 "feature_gap_g": (module.features, module.features)},
                            eps=self.cfg.hp["eps"], seed=self.cfg.seed, forward=fwd)
        return {k: round(v, 6) for k, v in gaps.items()}

    def format_row(self, row: dict[str, Any], epochs: int) -> str:
        parts = [f"[{self.tag}] epoch {row['epoch']}/{epochs}", f"loss {row.get('loss', math.nan):.4f}"]
        if "train_acc" in row:
            parts.append(f"train acc {row['train_acc']:.1f}%")
        parts.append(f"lr {row['lr']:.4g}")
        parts.append(f"{row['seconds']:.1f}s ({row['images_per_s']:.0f} img/s)")
        if "feature_gap" in row:
            parts.append(f"feature gap {row['feature_gap']:.4f}")
        return "  ".join(parts)

    # -- the end ------------------------------------------------------------------------------------------------
    def export(self) -> nn.Module:
        """Export the evaluated classifier and save it as ``ckpt/model.safetensors`` (plain weights)."""
        from .checkpoint import write_safetensors

        model = restore_bn(self.method.export(self.evaluated_module())).to("cpu").float()
        model = model.to(memory_format=torch.contiguous_format)
        meta = {"arch": self.cfg.arch, "num_classes": str(self.dataset.num_classes),
                "channels": str(self.dataset.channels), "run": self.cfg.run_name, "method": self.cfg.method}
        self.dist.main_only(lambda: write_safetensors(self.run.final_weights, model.state_dict(), meta),
                            "writing the final weights")
        return model


__all__ = ["EMA", "Trainer", "sealed_test"]
