"""AFKD = AFT + RGKD (representation-guided knowledge distillation, Suzuki et al. 2023) — docs/methods.md §11, and the
``vaft+a`` ablation of the AFD paper's Table 3.

L = CE(f_F(x′), y) + λ·[1 − (1/B) Σ_i cos(sg g_P(x_i), g_F(x′_i))]: the frozen teacher's (θᴾ, eval mode, no grad)
features of the **clean** augmented image against the student's features of the **adversarial** image; gradients
flow into the whole student. λ = 50 (``ARREST.py`` default). The attack is the §9 one (PGD-10, step 2/255, eval mode)
on CE only: the alignment term is **not** in the attack objective.

``teacher_bn`` (``eval``, the default, or ``train``): the AFD authors' ``ARREST.py``, which produced the AFD paper's
AFKD and ARREST numbers, never calls ``teacher.eval()``, so its teacher's BatchNorm normalises with the batch's
statistics and its running statistics drift with every teacher forward. ``train`` reproduces that (the teacher's
running statistics are then part of the checkpoint; one process only); ``eval`` is the frozen teacher the method
describes. Both are certified against ``ARREST.py`` (``fidelity/arrest.py``, docs/methods.md).

``vaft+a`` (METHODS §14.7 ablation definitions; docs/methods.md#vaft-a): vAFT plus γ·D_ang(g_F(x′), sg g_P(x))
with γ = 25 and no D₁/D₂ — the same loss with the AFD paper's weight γ. No official code: certified against the
authors' AFKD, ``ARREST.py --RGKD --beta 25`` (``fidelity/afd.py``, fixture ``vaft+a.json``), and checked by
property tests (tests/test_aft.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.attacks import bn_mode
from bench.errors import BenchError

from .base import register_method
from .vaft import AFT_DEFAULTS, VAFT

TEACHER_BN = ("eval", "train")


def angular_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """D_ang(u, v) = 1 − cos(u, v), per example over the feature dimension, averaged over the batch."""
    return 1.0 - F.cosine_similarity(u, v, dim=1).mean()


@register_method
class AFKD(VAFT):
    name = "afkd"
    report_row = 100
    starts_from = "natural"
    paper = "docs/methods.md §11 (AFT + RGKD, Suzuki et al. 2023; AFD Tables 1-2, 5)"
    weight_key = "lam"
    defaults = {**AFT_DEFAULTS, "lam": 50.0, "teacher_bn": "eval"}
    identity_neutral = {"teacher_bn": "eval"}

    @classmethod
    def check_hp(cls, hp):
        super().check_hp(hp)
        if hp.get("teacher_bn", "eval") not in TEACHER_BN:
            raise BenchError(f"{cls.name}.teacher_bn = {hp['teacher_bn']!r}; accepted: eval (a frozen teacher, the "
                             "default) or train (batch statistics, as the AFD authors' ARREST.py)")

    def setup(self) -> None:
        super().setup()
        if self.teacher_train_mode and self.processes > 1:
            raise BenchError(f"{self.name}.teacher_bn = train on {self.processes} processes: a train-mode teacher "
                             "normalises with each process's batch statistics; accepted: one process, or "
                             "teacher_bn = eval")

    @property
    def teacher_train_mode(self) -> bool:
        return self.hp.get("teacher_bn", "eval") == "train"

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """g_P(x) under no_grad: eval mode, or train mode (batch statistics, running statistics updated) with
        ``teacher_bn = train``."""
        with torch.no_grad(), bn_mode(self.teacher, "train" if self.teacher_train_mode else "eval"):
            return self.teacher_net(x)

    def state_dict(self):
        out = super().state_dict()
        if self.teacher_train_mode:  # its running statistics move: they are state
            out["teacher_buffers"] = {k: v for k, v in self.teacher.state_dict().items() if "running" in k
                                      or "num_batches" in k}
        return out

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.teacher_train_mode and "teacher_buffers" in state:
            self.teacher.load_state_dict({**self.teacher.state_dict(), **state["teacher_buffers"]})

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
    report_row = 150
    paper = "AFD Table 3 ablation: vAFT + γ-alignment to the teacher, no D1/D2 (docs/methods.md §14.7)"
    weight_key = "gamma"
    defaults = {**AFT_DEFAULTS, "gamma": 25.0, "teacher_bn": "eval"}
