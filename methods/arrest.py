"""ARREST = AFT + RGKD + NR (noisy replay), Suzuki et al. 2023 — docs/methods.md §12, as the AFD authors re-implemented
it in ``ARREST.py`` (the only implementation available; it produced the AFD paper's ARREST numbers).

Per mini-batch, **before** the attack: with the student in eval mode and no grad, the batch-mean angular distance
d = mean_i(1 − cos(g_P(x_i), g_F(x_i))) of teacher and student features of the clean batch; if d ≥ 1 − cos θ
(θ = 30°, threshold ≈ 0.134) **and** the epoch is ≤ ``replay_epochs`` (10, 1-based), the PGD example is replaced by
the noisy one x̃ = clip_[0,1](x + U(−ε, ε)) for the whole batch. The loss in either case is AFKD's (λ = 50).
The teacher is in eval mode (the AFD re-implementation left it in train mode: METHODS §9 quirk, §17 #9;
``teacher_bn = train`` reproduces that, see :mod:`methods.afkd`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.attacks import bn_mode, uniform_noise

from .afkd import AFKD
from .base import register_method
from .vaft import AFT_DEFAULTS


@register_method
class ARREST(AFKD):
    name = "arrest"
    report_row = 110
    paper = "docs/methods.md §12 (AFT + RGKD + noisy replay, Suzuki et al. 2023; AFD Tables 1-2, 5)"
    weight_key = "lam"
    defaults = {**AFT_DEFAULTS, "lam": 50.0, "theta": 30.0, "replay_epochs": 10, "teacher_bn": "eval"}

    def representation_shift(self, x: torch.Tensor) -> torch.Tensor:
        """Batch-mean angular distance between teacher and (eval-mode) student features of the clean batch."""
        t = self.teacher_features(x)  # (with teacher_bn = train, a teacher forward that moves its statistics)
        with torch.no_grad(), bn_mode(self.model, "eval"):
            return 1.0 - F.cosine_similarity(t, self.model.features(x), dim=1).mean()

    def replays(self, x: torch.Tensor, epoch: int) -> tuple[bool, torch.Tensor | None]:
        """(replay this batch?, the angular distance if it was measured). ``epoch`` is 0-based.

        The decision needs the distance on the host (one device sync per batch while replay is possible): it
        decides whether the 10-step attack runs at all."""
        if epoch + 1 > self.hp["replay_epochs"] and not self.teacher_train_mode:
            return False, None  # (ARREST.py measures the shift on every batch: with a train-mode teacher it counts)
        d = self.ctx.mean(self.representation_shift(x))  # of the whole batch: one decision on every process
        return epoch + 1 <= self.hp["replay_epochs"] and bool(d >= 1.0 - math.cos(math.radians(self.hp["theta"]))), d

    def train_step(self, batch, epoch, step):
        replay, d = self.replays(batch.x, epoch)
        if replay:
            x_in = (batch.x + uniform_noise(batch.x, self.hp["eps"])).clamp(0.0, 1.0)
        else:
            x_in = self.pgd_attack(batch.x, batch.y)
        out = self.fine_tune(x_in, batch.x, batch.y)
        out["replay"] = torch.tensor(float(replay), device=batch.x.device)
        if d is not None:
            out["shift"] = d
        return out
