"""AFKD = AFT + RGKD (representation-guided knowledge distillation, Suzuki et al. 2023) — METHODS.md §11, and the
``vaft+a`` ablation of the AFD paper's Table 3.

L = CE(f_F(x′), y) + λ·[1 − (1/B) Σ_i cos(sg g_P(x_i), g_F(x′_i))]: the frozen teacher's (θᴾ, eval mode, no grad)
features of the **clean** augmented image against the student's features of the **adversarial** image; gradients
flow into the whole student. λ = 50 (``ARREST.py`` default). The attack is the §9 one (PGD-10, step 2/255, eval mode)
on CE only: the alignment term is **not** in the attack objective.

``vaft+a`` (METHODS §14.7 ablation definitions): vAFT plus γ·D_ang(g_F(x′), sg g_P(x)) with γ = 25 and no D₁/D₂ — the
same loss with the AFD paper's weight γ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import register_method
from .vaft import AFT_DEFAULTS, VAFT


def angular_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """D_ang(u, v) = 1 − cos(u, v), per example over the feature dimension, averaged over the batch."""
    return 1.0 - F.cosine_similarity(u, v, dim=1).mean()


@register_method
class AFKD(VAFT):
    name = "afkd"
    starts_from = "natural"
    paper = "METHODS.md §11 (AFT + RGKD, Suzuki et al. 2023; AFD Tables 1-2, 5)"
    weight_key = "lam"
    defaults = {**AFT_DEFAULTS, "lam": 50.0}

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher_net(x)

    def fine_tune(self, x_in: torch.Tensor, x_clean: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One SGD step on CE(f(x_in)) + w·D_ang(g_F(x_in), sg g_P(x_clean)); student in train mode."""
        t = self.teacher_features(x_clean)
        logits, h = self.net(x_in, with_features=True)
        ce = F.cross_entropy(logits, y)
        align = angular_distance(h, t)
        loss = ce + self.hp[self.weight_key] * align
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach(), "ce": ce.detach(), "align": align.detach(),
                "correct_sum": (logits.argmax(1) == y).sum()}

    def train_step(self, batch, epoch, step):
        x_adv = self.pgd_attack(batch.x, batch.y)  # CE only: the alignment is not in the attack
        return self.fine_tune(x_adv, batch.x, batch.y)


@register_method
class VAFTPlusA(AFKD):
    name = "vaft+a"
    paper = "AFD Table 3 ablation: vAFT + γ-alignment to the teacher, no D1/D2 (METHODS.md §14.7)"
    weight_key = "gamma"
    defaults = {**AFT_DEFAULTS, "gamma": 25.0}
