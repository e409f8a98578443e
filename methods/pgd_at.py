"""PGD-AT (Madry et al. 2018) — METHODS.md §3, AFD-consistent recipe.

min_θ E max_{‖δ‖∞≤ε} CE(f_θ(x+δ), y): the outer loss is CE on the PGD example only (no clean term).
Attack: PGD-10, ε = 8/255, step 2/255, U(−ε, ε) start, CE on the current model **in eval mode** (running BN
statistics, none updated: the TRADES/AFD convention); the training forward is in train mode on x′ only.
SGD momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, 120 epochs, ×0.1 at epochs 75, 90, 100 (the AFD authors'
AT-baseline schedule, ANCRA ``train_ResNet18_baseline.py``). The last epoch is the model.
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, register_method


@register_method
class PGDAT(Method):
    name = "pgd-at"
    starts_from = "scratch"
    paper = "METHODS.md §3 (Madry et al. 2018; AFD Tables 1, 2, 5)"
    attack_bn = "eval"
    defaults = {
        "epochs": 120,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": {"name": "multistep", "milestones": [75, 90, 100], "gamma": 0.1},
        "attack_steps": 10,
        "attack_step": 2 / 255,
    }

    def train_step(self, batch, epoch, step):
        x_adv = self.pgd_attack(batch.x, batch.y)
        logits = self.net(x_adv)
        loss = F.cross_entropy(logits, batch.y)
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach(), "correct_sum": (logits.argmax(1) == batch.y).sum()}
