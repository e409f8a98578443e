"""FGSM-RS, "Fast is better than free" (Wong et al. 2020) — docs/methods.md §6, ``train_fgsm.py``.

Per mini-batch: δ₀ ~ U(−ε, ε) per pixel, clipped so that x + δ₀ ∈ [0, 1]; one FGSM step of α = 1.25·ε = 10/255 on CE
with the model in **train** mode (its running statistics updated by this forward, as in the official code);
``δ = clip_[−ε,ε](δ₀ + α·sign ∇)``, then clipped to the image range; the training forward is ``CE(f(x + sg(δ)), y)``
in train mode. No clean term.

Schedule: 15 epochs, weight decay 5e-4, batch 128, cyclic lr 0 → 0.2 → 0 per step (Wong's ``CyclicLR`` over all
iterations, up half, down half), and with it, as that ``CyclicLR`` does by default (``cycle_momentum``), SGD's
momentum cycling inversely 0.9 → 0.8 → 0.9 (``schedule.momentum = [0.8, 0.9]``; ``[0.9, 0.9]`` holds it at 0.9).
Certified against the authors' loop: ``fidelity/fgsm_rs.py``.

Optional early stopping (``early_stop = true``; off by default as in the official script): after every epoch,
PGD-5 (one U(−ε, ε) start, step 2/255) on the first training batch of that epoch; when its robust accuracy drops by
more than 0.2 (absolute, as a fraction) from the previous epoch's, training stops and the weights after the
previous epoch are the result — Wong's guard against catastrophic overfitting. Deviation: the check runs with the
model in eval mode, so it does not move the running statistics (the official check runs in train mode and
updates them outside any training step), and its PGD keeps stepping an example after it is misclassified (Wong's
``attack_pgd`` freezes such examples; both give the same accuracy up to examples that a later step would move back
across the boundary).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from bench.attacks import fgsm, pgd
from bench.precision import wide
from bench.step import ONE

from .base import Method, register_method


@register_method
class FGSMRS(Method):
    name = "fgsm-rs"
    report_row = 50
    starts_from = "scratch"
    paper = "docs/methods.md §6 (Wong et al. 2020, train_fgsm.py)"
    attack_bn = "train"
    defaults = {
        "epochs": 15,
        "lr": 0.2,
        "weight_decay": 5e-4,
        "schedule": {"name": "cyclic", "peak": 0.5, "momentum": [0.8, 0.9]},
        "alpha_ratio": 1.25,  # α = 1.25·ε (10/255 at ε = 8/255), relative so that it follows --set eps
        "early_stop": False,
        "early_stop_steps": 5,
        "early_stop_step": 2 / 255,
        "early_stop_drop": 0.2,
    }

    def setup(self) -> None:
        super().setup()
        self.first_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.first_ctx = ONE  # that step's context (under data parallelism: its rows of the global batch)
        self.prev_robust: float | None = None  # robust accuracy (fraction) of the last epoch that passed
        self.best_state: dict[str, torch.Tensor] | None = None  # the weights after that epoch

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fgsm(self.model, x, y, eps=self.hp["eps"], step=self.hp["alpha_ratio"] * self.hp["eps"],
                    random_start=True, bn="train", forward=self.attack_net)

    def train_step(self, batch, epoch, step):
        if step == 0:
            self.first_batch = (batch.x.detach().clone(), batch.y.detach().clone())
            self.first_ctx = self.ctx
        x_adv = self.attack(batch.x, batch.y)
        self.model.train()
        logits = self.net(x_adv)
        loss = F.cross_entropy(wide(logits), batch.y)
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach(), "correct_sum": (logits.argmax(1) == batch.y).sum()}

    @torch.no_grad()
    def early_stop_robust(self) -> float:
        """PGD-5 robust accuracy (fraction) on this epoch's first training batch, model in eval mode (under data
        parallelism: on the whole global batch, so that every process takes the same decision): the attack and the
        accuracy run in the context of the step that trained on the batch."""
        assert self.first_batch is not None
        x, y = self.first_batch
        hp = self.hp
        with self.first_ctx as ctx:
            with torch.enable_grad():
                x_adv = pgd(self.model, x, y, eps=hp["eps"], step=hp["early_stop_step"],
                            steps=hp["early_stop_steps"], random_start=True, clip_start=True, bn="eval",
                            forward=self.attack_net)
            training = self.model.training
            self.model.eval()
            acc = float(ctx.mean((self.attack_net(x_adv).argmax(1) == y).float().mean()))
            self.model.train(training)
        return acc

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.hp["early_stop"] or self.first_batch is None:
            return {}
        acc = self.early_stop_robust()
        row: dict[str, Any] = {"early_stop_robust": round(acc, 6)}
        if self.prev_robust is not None and acc - self.prev_robust < -self.hp["early_stop_drop"]:
            assert self.best_state is not None
            self.model.load_state_dict(self.best_state)
            self.stopped = True
            row["early_stopped"] = True  # catastrophic overfitting: the weights of the previous epoch are kept
            return row
        self.prev_robust = acc
        self.best_state = copy.deepcopy(self.model.state_dict())
        return row

    def state_dict(self) -> dict[str, Any]:
        out = {**super().state_dict(), "prev_robust": self.prev_robust}
        if self.best_state is not None:
            out["best_state"] = self.best_state
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.prev_robust = state.get("prev_robust")
        best = state.get("best_state")
        if best is not None:
            dev = next(self.model.parameters()).device
            self.best_state = {k: v.to(dev) for k, v in best.items()}
