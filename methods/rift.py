"""RiFT — Robust Critical Fine-Tuning (Zhu et al., ICCV 2023): docs/methods.md §13, Decision 6, §17 #17-18.

Starts from the suite's own PGD-AT model θ_AT (``starts_from = "adversarial"``: the runner trains ``pgd-at`` first;
the engine hands its weights over as the model and as the frozen, eval-mode ``teacher``, which is θ_AT throughout).
Three stages, each resumable on its own (progress in the method state, ``ctx.save()`` after every unit of work):

1. **Module Robust Criticality** (``before_training``). The held-out slice of the *training* split (the last
   ``holdout_per_class`` images of every class, never trained on by RiFT) is split per class by alternating index:
   positions 0, 2, 4, … → the MRC half, 1, 3, 5, … → the validation half. D_adv = PGD-10 of θ_AT on the MRC half
   (ε = 8/255, step 2/255, U(−ε, ε) start clipped to [0, 1] as torchattacks does, CE, eval mode, seeded), built
   once and kept in the method state until MRC is finished (a resumed run uses the very same tensors).
   L₀ = CE of θ_AT on D_adv. For every ``nn.Conv2d`` / ``nn.Linear`` whose name has no "sub" (the official skip
   for the BoT WRN's unused ``sub_block1``): a clone of θ_AT in eval mode (BN frozen) with only that module's
   weight W trainable makes ``mrc_epochs`` (10) epochs of gradient **ascent** on CE over D_adv (plain SGD, lr 1, no
   momentum, batch 512, shuffled by a generator seeded per module); after each epoch, if ‖W − W₀‖_F > 0.1·‖W₀‖_F,
   W − W₀ is rescaled to norm 0.1·‖W₀‖_F; then CE on D_adv is evaluated. MRC(W) = max over epochs of L − L₀.
   The module with the lowest MRC is fine-tuned. ``module`` (hp) names one instead; then MRC is not computed at
   all (as the official ``--layer`` run without ``--cal_mrc``), and the record says ``chosen_by: "hp"``.
2. **Fine-tuning** (the engine's epochs): CE on the clean augmented training batches, the model in **train** mode
   (every BN layer re-estimates its running statistics on clean data) but only the chosen module's weight in the
   optimiser (SGD momentum 0.9, lr 0.001, weight decay 5e-4, batch 128, 10 epochs). The official
   ``MultiStepLR([epochs // 2 = 5])`` stepped after every epoch gives 0-based epochs 0-4 at lr₀ and 5-9 at 0.1·lr₀;
   in this suite's 1-based multistep convention (``k = #{m ≤ e + 1}``, bench/schedules.py) that is
   ``milestones = [6]``. The last epoch is θ_FT.
3. **Interpolation** (``after_training``): θ(α) = α·θ_FT + (1 − α)·θ_AT over the **entire** state dict, BN running
   statistics included, for α ∈ {0, 0.1, …, 1}; clean and PGD-10 (as for D_adv, one random start from a generator
   re-seeded identically for every α: common random numbers) accuracy on the validation half, eval mode. The
   chosen α* is the largest α with robust(α) ≥ robust(0) − ``alpha_tolerance`` (0.1 percentage points, METHODS §13
   "Recommended"); the model becomes θ(α*).

Sources: ``[RiFT-code main.py: generate_adv_dataset, layer_sharpness, train, main; utils.py: interpolation]``
(microsoft/robustlearn ``RiFT/``), docs/methods.md §13. Deviations from the official code, all deliberate:

* MRC data: the official D_adv is built on the CIFAR **test** split; here on the MRC half of a held-out slice of the
  training split (Decision 6), held out of the PGD-AT base model as well: ``bench run`` trains RiFT's own
  ``pgd-at`` base with the same subset and ``holdout`` (a run of its own, not the Table-1 PGD-AT run, which trains
  on every image), so θ_AT has never seen the images that MRC and the choice of α use — otherwise robust
  overfitting would make robust(α = 0) a training-set number. With ``--pretrained`` the suite cannot know what that
  model saw (recorded in ``method.json``).
* Attack step 2/255: the official PGD uses ``alpha=2/225`` (≈ 0.00889), a typo for 2/255.
* Checkpoint: the official code keeps the epoch with the best clean **test** accuracy; here the last epoch.
* α: chosen by hand on the test set in the official code ("max IID increase while not dropping robustness so
  much"); here by the rule above on the validation half.
* Augmentation: the official random crop pads by **reflection**; the suite's loader pads with zeros (and the
  synthetic dataset does not crop at all). Inputs stay in [0, 1] (normalisation, if any, is inside the model).
* Fine-tuned parameters: the official code trains every parameter whose name *contains* the layer name (for a
  ``Linear`` that includes its bias; a name like ``body.1`` would also match ``body.10``); here exactly the chosen
  module's weight. For the ResNet/WRN convolutions (no bias) this is the same thing.
* Integer buffers (BN ``num_batches_tracked``) are not interpolated: θ(α) takes θ_AT's value for α < 0.5 and
  θ_FT's for α ≥ 0.5 (the official float arithmetic truncates α·n_FT + (1 − α)·n_AT into the long buffer; the
  counter only matters for BN with ``momentum=None``, which no model here uses).
* MRC ``max_loss`` starts at 0 in the official code; as CE ≥ 0 that equals the max over epochs used here.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import bn_mode, pgd
from bench.data import Split
from bench.errors import BenchError
from bench.loader import hash_seed
from bench.precision import wide

from .base import Method, StageContext, register_method

PROBED = (nn.Conv2d, nn.Linear)
# seed tags of the stages' generators (any fixed numbers; they only have to differ from each other)
SEED_DADV, SEED_MRC, SEED_VAL = 0xAD5, 0x3C, 0x7A1

HELDOUT_NOTE = ("MRC and alpha selection use the held-out slice (the last holdout_per_class images of every class of "
                "this run's training split): never the test split, and never trained on by RiFT's fine-tuning. The "
                "suite-trained PGD-AT base holds out the same images (same subset, holdout = holdout_per_class), so "
                "theta_AT has not seen them either; a --pretrained base may have")
ALPHA_RULE = "largest alpha with robust(alpha) >= robust(0) - alpha_tolerance (percentage points), validation half"


# ---------------------------------------------------------------------------------------------------------------
# the pieces (pure functions, tested on their own)


def candidate_modules(model: nn.Module) -> list[str]:
    """Names of the modules MRC probes: every Conv2d / Linear, skipping names that contain "sub"."""
    return [n for n, m in model.named_modules() if isinstance(m, PROBED) and "sub" not in n]


def split_heldout(held: Split) -> tuple[Split, Split]:
    """(MRC half, validation half) of the held-out slice: within every class, alternating positions (0, 2, … → MRC;
    1, 3, … → validation), so both halves are class-balanced and disjoint."""
    mrc = torch.zeros(len(held), dtype=torch.bool)
    for c in held.y.unique():
        idx = (held.y == c).nonzero().flatten()
        mrc[idx[0::2]] = True
    return held.take(mrc.nonzero().flatten()), held.take((~mrc).nonzero().flatten())


def _batches(n: int, batch: int, order: torch.Tensor | None = None):
    for i in range(0, n, batch):
        yield order[i:i + batch] if order is not None else slice(i, i + batch)


def adversarial_set(model: nn.Module, split: Split, *, eps: float, step: float, steps: int, batch: int,
                    device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D_adv: PGD-``steps`` of ``model`` (eval mode) on ``split``, U(−ε, ε) start clipped to [0, 1] (torchattacks),
    from a generator seeded by ``seed``. Returns float images in [0, 1] and labels, on ``device``."""
    x = split.x.to(device).to(next(model.parameters()).dtype).div_(255)  # fp32 (fp64 for precision fp64)
    y = split.y.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = [pgd(model, x[s], y[s], eps=eps, step=step, steps=steps, random_start=True, clip_start=True, bn="eval",
               generator=gen) for s in _batches(len(y), batch)]
    return (torch.cat(out) if out else x[:0]), y


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """(mean CE, accuracy in %) of ``model`` in eval mode on (x, y)."""
    total, correct = 0.0, 0
    with bn_mode(model, "eval"):
        for s in _batches(len(y), batch):
            logits = wide(model(x[s]))
            total += float(F.cross_entropy(logits, y[s], reduction="sum"))
            correct += int((logits.argmax(1) == y[s]).sum())
    n = max(len(y), 1)
    return total / n, 100.0 * correct / n


def ascend_module(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                  batch: int, radius: float, generator: torch.Generator
                  ) -> tuple[nn.Module, list[float], list[float], list[float]]:
    """The MRC probe of one module: a clone of ``model`` (eval mode, all parameters frozen but ``name``.weight),
    ``epochs`` epochs of gradient ascent on CE over (x, y) (SGD lr ``lr``, no momentum, shuffled batches of
    ``batch`` drawn from ``generator``), after each epoch ‖ΔW‖_F clipped to ``radius``·‖W₀‖_F, then CE evaluated.

    Returns (clone, CE after each epoch, accuracy % after each epoch, ‖ΔW‖/‖W₀‖ after each epoch). ``model`` is not
    touched."""
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    w = clone.get_submodule(name).weight
    w0 = w.detach().clone()
    norm0 = float(w0.norm())
    losses, accs, ratios = [], [], []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(x.device)
        for idx in _batches(len(y), batch, order):
            w.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(wide(clone(x[idx])), y[idx])
                (g,) = torch.autograd.grad(loss, w)
            w.requires_grad_(False)
            with torch.no_grad():
                w.add_(g, alpha=lr)  # an SGD step on −CE: ascent
        with torch.no_grad():
            diff = w - w0
            ratio = float(diff.norm()) / norm0 if norm0 > 0 else 0.0
            if ratio > radius:
                w.copy_(w0 + diff * (radius / ratio))
            ratios.append(float((w - w0).norm()) / norm0 if norm0 > 0 else 0.0)
        loss, acc = loss_and_accuracy(clone, x, y, batch)
        losses.append(loss)
        accs.append(acc)
    return clone, losses, accs, ratios


def interpolate(theta_at: dict[str, torch.Tensor], theta_ft: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """θ(α) = α·θ_FT + (1 − α)·θ_AT for every floating-point entry of the state dict (parameters and BN running
    statistics, the official arithmetic, exact at α = 0 and α = 1); integer buffers (``num_batches_tracked``) from
    θ_AT for α < 0.5, from θ_FT for α ≥ 0.5."""
    if theta_at.keys() != theta_ft.keys():
        raise BenchError("interpolation needs two state dicts of the same architecture")
    out = {}
    for k, a in theta_at.items():
        f = theta_ft[k].to(a.device)
        if a.dtype.is_floating_point:
            out[k] = alpha * f + (1 - alpha) * a
        else:
            out[k] = (f if alpha >= 0.5 else a).clone()
    return out


@torch.no_grad()
def clean_and_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
                     batch: int, generator: torch.Generator) -> tuple[float, float]:
    """(clean accuracy %, PGD-``steps`` accuracy %) of ``model`` in eval mode; the PGD starts at U(−ε, ε) (clipped
    to [0, 1]) drawn from ``generator``."""
    clean = robust = 0
    with bn_mode(model, "eval"):
        for s in _batches(len(y), batch):
            clean += int((model(x[s]).argmax(1) == y[s]).sum())
            x_adv = pgd(model, x[s], y[s], eps=eps, step=step, steps=steps, random_start=True, clip_start=True,
                        bn="eval", generator=generator)
            robust += int((model(x_adv).argmax(1) == y[s]).sum())
    n = max(len(y), 1)
    return 100.0 * clean / n, 100.0 * robust / n


def choose_alpha(curve: list[dict[str, Any]], tolerance: float) -> float:
    """The largest α whose robust accuracy is ≥ robust(α = 0) − ``tolerance`` (percentage points)."""
    base = [p["robust"] for p in curve if p["alpha"] == 0]
    if not base:
        raise BenchError("the interpolation curve has no alpha = 0 point")
    ok = [p["alpha"] for p in curve if p["robust"] >= base[0] - tolerance - 1e-9]
    return max(ok)


def alpha_grid(points: int) -> list[float]:
    """α = k / points for k = 0 … points (0, 0.1, …, 1 for 10)."""
    return [round(k / points, 12) for k in range(points + 1)]


# ---------------------------------------------------------------------------------------------------------------
# the method


def _fresh_stage() -> dict[str, Any]:
    return {"l0": None, "acc0": None, "mrc": {}, "mrc_detail": {}, "module": None, "chosen_by": None, "curve": [],
            "alpha": None, "done": False, "n_mrc": None, "n_val": None}


@register_method
class RiFT(Method):
    name = "rift"
    report_row = 90
    starts_from = "adversarial"
    base_holdout = True  # the PGD-AT base is trained without the held-out slice
    paper = "docs/methods.md §13 (Zhu et al. 2023; AFD Tables 1, 2, 5)"
    attack_bn = "eval"  # the stages' PGD (D_adv and the α validation); the fine-tuning itself has no attack
    defaults = {
        "epochs": 10,
        "lr": 0.001,
        "weight_decay": 5e-4,
        # official MultiStepLR([5]) stepped per epoch = ×0.1 from 0-based epoch 5 = the suite's 1-based milestone 6
        "schedule": {"name": "multistep", "milestones": [6], "gamma": 0.1},
        # the last N images of every class of the training split are held out (engine: ctx.heldout) and split in
        # halves: MRC data and α validation. 100 → 500 + 500 images on CIFAR-10 (the official MRC used the 10 000
        # test images); lower it on datasets with few images per class (CIFAR-100, Tiny-ImageNet, smoke runs)
        "holdout_per_class": 100,
        "module": None,  # None: the lowest-MRC module; or a module name (e.g. "layer2.1.conv2"): MRC is skipped
        "mrc_epochs": 10,
        "mrc_lr": 1.0,
        "mrc_batch": 512,  # the ascent batch; also the chunk size of the stages' attacks / evaluations (no effect there)
        "mrc_radius": 0.1,  # ‖ΔW‖_F ≤ 0.1·‖W₀‖_F
        "attack_steps": 10,  # PGD-10 of D_adv and of the α validation
        "attack_step": 2 / 255,  # the official code has 2/225, a typo for 2/255 (METHODS §13)
        "alpha_points": 10,  # α ∈ {0, 1/10, …, 1}
        "alpha_tolerance": 0.1,  # percentage points of validation robust accuracy
    }

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def check_hp(cls, hp: dict[str, Any]) -> None:
        if hp.get("ema"):
            raise BenchError("rift.ema is not supported: RiFT's result is the interpolated model θ(α*)")
        if not hp.get("holdout_per_class"):
            raise BenchError("rift needs a held-out slice of the training split for MRC and the choice of alpha: "
                             "set rift.holdout_per_class to an integer ≥ 2 (default 100)")
        cls.require_int("rift", hp, "holdout_per_class", 2)
        for k in ("mrc_epochs", "mrc_batch", "alpha_points"):
            cls.require_int("rift", hp, k, 1)
        for k in ("mrc_lr", "mrc_radius"):
            if not hp[k] > 0:
                raise BenchError(f"rift.{k} = {hp[k]!r}; accepted: a positive number")
        if not hp["alpha_tolerance"] >= 0:
            raise BenchError(f"rift.alpha_tolerance = {hp['alpha_tolerance']!r}; accepted: a number ≥ 0 "
                             "(percentage points)")

    def setup(self) -> None:
        hp = self.hp
        self.check_hp(hp)
        if self.teacher is None:  # θ_AT is the starting model (the engine always passes it as the teacher)
            self.teacher = copy.deepcopy(self.model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.stage = _fresh_stage()
        self.d_adv: tuple[torch.Tensor, torch.Tensor] | None = None  # kept (and checkpointed) while MRC runs
        self.optimizer = None
        self.optimizers = []
        if hp.get("module") is not None:
            self._choose(str(hp["module"]), "hp")

    def _check_module(self, name: str) -> nn.Parameter:
        try:
            mod = self.model.get_submodule(name)
        except AttributeError:
            mod = None
        if not isinstance(mod, PROBED):
            raise BenchError(f"rift.module = {name!r} is not a Conv2d / Linear module of this model; accepted: "
                             f"{', '.join(candidate_modules(self.model))}")
        return mod.weight

    def _choose(self, name: str, by: str) -> None:
        """Fine-tune ``name``.weight only: one SGD over it, every other parameter frozen."""
        w = self._check_module(name)
        self.stage["module"], self.stage["chosen_by"] = name, by
        for p in self.model.parameters():
            p.requires_grad_(p is w)
        self.optimizer = self.sgd([w])
        self.optimizers = [self.optimizer]

    def _release(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)

    # -- the held-out data ----------------------------------------------------------------------------------------
    def halves(self, ctx: StageContext) -> tuple[Split, Split]:
        held = ctx.heldout
        if held is None or len(held) == 0:
            raise BenchError("rift got no held-out slice of the training split; set rift.holdout_per_class ≥ 2")
        missing = sorted(set(held.y.unique().tolist()) - set(ctx.train.y.unique().tolist()))
        if missing:
            raise BenchError(f"rift.holdout_per_class = {self.hp['holdout_per_class']} holds out every training "
                             f"image of class(es) {missing[:10]}; lower rift.holdout_per_class or train on more "
                             "images per class (--subset)")
        mrc, val = split_heldout(held)
        if len(mrc) == 0 or len(val) == 0:
            raise BenchError(f"the held-out slice ({len(held)} images) is too small to split into MRC and "
                             "validation halves; raise rift.holdout_per_class")
        self.stage["n_mrc"], self.stage["n_val"] = len(mrc), len(val)
        return mrc, val

    # -- stage 1: MRC -----------------------------------------------------------------------------------------------
    def before_training(self, ctx: StageContext) -> None:
        mrc_split, _ = self.halves(ctx)
        if self.stage["module"] is not None:  # MRC finished earlier, or the module was given
            return
        hp, theta_at = self.hp, self.teacher
        if self.d_adv is None:
            self.d_adv = adversarial_set(theta_at, mrc_split, eps=hp["eps"], step=hp["attack_step"],
                                         steps=hp["attack_steps"], batch=hp["mrc_batch"], device=ctx.device,
                                         seed=hash_seed(ctx.seed, SEED_DADV))
            l0, acc0 = loss_and_accuracy(theta_at, *self.d_adv, hp["mrc_batch"])
            self.stage.update(l0=l0, acc0=acc0, mrc={}, mrc_detail={})
            ctx.echo(f"RiFT MRC: D_adv of {len(self.d_adv[1])} held-out images, L0 {l0:.4f}, robust acc {acc0:.2f}%")
            ctx.save()
        x, y = (t.to(ctx.device) for t in self.d_adv)
        l0 = self.stage["l0"]
        names = candidate_modules(theta_at)
        if not names:
            raise BenchError("rift: the model has no Conv2d / Linear module to fine-tune")
        for i, name in enumerate(names):
            if name in self.stage["mrc"]:
                continue
            gen = torch.Generator().manual_seed(hash_seed(ctx.seed, SEED_MRC, i))
            _, losses, accs, ratios = ascend_module(theta_at, name, x, y, epochs=hp["mrc_epochs"], lr=hp["mrc_lr"],
                                                    batch=hp["mrc_batch"], radius=hp["mrc_radius"], generator=gen)
            worst = max(range(len(losses)), key=lambda e: losses[e])
            self.stage["mrc"][name] = losses[worst] - l0
            self.stage["mrc_detail"][name] = {"losses": losses, "robust_acc": accs, "delta_ratio": ratios,
                                              "robust_acc_drop": self.stage["acc0"] - accs[worst]}
            ctx.echo(f"RiFT MRC {i + 1}/{len(names)} {name}: {self.stage['mrc'][name]:.4f} (robust acc drop "
                     f"{self.stage['acc0'] - accs[worst]:.2f} pp)")
            ctx.save()
        chosen = min(names, key=lambda n: self.stage["mrc"][n])  # ties: the first in model order
        self._choose(chosen, "mrc")
        self.d_adv = None
        ctx.echo(f"RiFT: fine-tuning {chosen} (lowest MRC {self.stage['mrc'][chosen]:.4f})")
        ctx.save()

    # -- stage 2: fine-tuning ---------------------------------------------------------------------------------------
    def train_step(self, batch, epoch, step):
        if self.optimizer is None:
            raise BenchError("rift: no module chosen yet (the MRC stage did not run)")
        logits = self.net(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach(), "correct_sum": (logits.argmax(1) == batch.y).sum()}

    # -- stage 3: interpolation -------------------------------------------------------------------------------------
    def after_training(self, ctx: StageContext) -> None:
        if self.stage["done"]:
            self._release()
            return
        _, val = self.halves(ctx)
        hp = self.hp
        theta_at = self.teacher.state_dict()
        # the model is not changed until the curve is complete, so a resumed run finds θ_FT in its checkpoint
        theta_ft = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        work = copy.deepcopy(self.model).eval()
        x = val.x.to(ctx.device).to(next(self.model.parameters()).dtype).div_(255)
        y = val.y.to(ctx.device)
        curve = self.stage["curve"]
        for k, alpha in enumerate(alpha_grid(hp["alpha_points"])):
            if k < len(curve):
                continue
            work.load_state_dict(interpolate(theta_at, theta_ft, alpha))
            gen = torch.Generator(device=ctx.device).manual_seed(hash_seed(ctx.seed, SEED_VAL))
            clean, robust = clean_and_robust(work, x, y, eps=hp["eps"], step=hp["attack_step"],
                                             steps=hp["attack_steps"], batch=hp["mrc_batch"], generator=gen)
            curve.append({"alpha": alpha, "clean": clean, "robust": robust, "n": len(y)})
            ctx.echo(f"RiFT alpha {alpha:.2f}: clean {clean:.2f}%, PGD-{hp['attack_steps']} {robust:.2f}% "
                     f"(validation, n={len(y)})")
            ctx.save()
        alpha = choose_alpha(curve, hp["alpha_tolerance"])
        with torch.no_grad():
            self.model.load_state_dict(interpolate(theta_at, theta_ft, alpha))
        self.stage["alpha"], self.stage["done"] = alpha, True
        self._release()
        ctx.echo(f"RiFT: alpha* = {alpha:g} (tolerance {hp['alpha_tolerance']} pp)")
        # no ctx.save() here: the engine checkpoints right after this stage, the model θ(α*) and `done` together

    # -- records and state ------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        s, hp = self.stage, self.hp
        mrc = dict(s["mrc"])
        return {
            "module": s["module"],
            "chosen_by": s["chosen_by"],
            "lowest_mrc_module": min(mrc, key=mrc.get) if mrc else None,
            "l0": s["l0"],
            "robust_acc_d_adv": s["acc0"],
            "mrc": mrc,
            "mrc_detail": copy.deepcopy(s["mrc_detail"]),
            "alpha_curve": copy.deepcopy(s["curve"]),
            "alpha": s["alpha"],
            "alpha_tolerance": hp["alpha_tolerance"],
            "alpha_rule": ALPHA_RULE,
            "n_mrc": s["n_mrc"],
            "n_val": s["n_val"],
            "holdout_per_class": hp["holdout_per_class"],
            "attack": (f"PGD-{hp['attack_steps']}, eps {hp['eps']:.6g}, step {hp['attack_step']:.6g}, U(-eps, eps) "
                       "start clipped to [0, 1], eval mode"),
            "mrc_settings": {"epochs": hp["mrc_epochs"], "lr": hp["mrc_lr"], "batch": hp["mrc_batch"],
                             "radius": hp["mrc_radius"]},
            "heldout_note": HELDOUT_NOTE,
            "done": s["done"],
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rift"] = copy.deepcopy(self.stage)
        if self.d_adv is not None:
            state["d_adv"] = {"x": self.d_adv[0], "y": self.d_adv[1]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stage = _fresh_stage()
        stage.update(copy.deepcopy(state.get("rift", {})))
        self.stage = stage
        d = state.get("d_adv")
        self.d_adv = (d["x"], d["y"]) if d is not None else None
        if stage["module"] is not None:
            self._choose(stage["module"], stage["chosen_by"])
        else:
            self.optimizer, self.optimizers = None, []
            self._release()
        super().load_state_dict(state)


__all__ = ["RiFT", "adversarial_set", "alpha_grid", "ascend_module", "candidate_modules", "choose_alpha",
           "clean_and_robust", "interpolate", "loss_and_accuracy", "split_heldout"]
