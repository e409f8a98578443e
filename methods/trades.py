"""TRADES (Zhang et al. 2019) — docs/methods.md §4, the official ``trades_loss``.

Outer loss, all three forwards in **train** mode and nothing detached (the official code):
``L = CE(f(x), y) + β · KL(softmax(f(x)) ‖ softmax(f(x′))) / B``, computed as
``KLDivLoss(sum)(log_softmax(f(x′)), softmax(f(x))) / B`` with a *separate* forward of x for the KL target — three
forwards (x for CE, x′ for the KL input, x again for the KL target), each with its own batch statistics, and the
gradient flows through both the clean and the adversarial branch.

Attack (inner max), model in **eval** mode: ``x′⁰ = x + 0.001·N(0, I)`` (not clipped), then 10 steps of 0.007 on the
KL term (not CE) w.r.t. x′ only, with the clean target ``softmax(f(x))`` fixed, ``Π_ε`` after every step; ε = 8/255
(the official 0.031 is 7.9/255).

Schedule: the AFD-consistent 120 epochs with ×0.1 at 75 / 90 / 100 (§4 "Recommended"); lr 0.1, momentum 0.9, batch
128, weight decay **2e-4** — the official ``train_trades_cifar10.py`` value, which this suite states and keeps
(PGD-AT uses 5e-4; set ``trades.weight_decay=5e-4`` for one wd across the AT baselines).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.attacks import bn_mode, normal_noise, sign_step
from bench.precision import wide

from .base import Method, register_method


def kl_sum(logits_adv: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``KLDivLoss(reduction="sum")(log_softmax(f(x′)), softmax(f(x)))``: Σ_i KL(p(x_i) ‖ p(x′_i))."""
    return F.kl_div(F.log_softmax(wide(logits_adv), dim=1), F.softmax(wide(target_logits), dim=1),
                    reduction="sum")


def trades_attack(model, x: torch.Tensor, *, eps: float, step: float, steps: int, init_std: float = 0.001,
                  forward=None) -> torch.Tensor:
    """The TRADES inner maximisation: PGD on ``kl_sum`` with the clean prediction as the fixed target, model in
    eval mode (every module's mode restored afterwards), start ``x + init_std·N(0, I)`` from the global RNG."""
    fwd = forward if forward is not None else model
    x = x.detach()
    with bn_mode(model, "eval"):
        with torch.no_grad():
            target = fwd(x).detach()
        x_adv = x + init_std * normal_noise(x)
        for _ in range(steps):
            x_adv = sign_step(fwd, x_adv, x, target, step=step, eps=eps, loss_fn=kl_sum)
    return x_adv.detach()


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, logits_target: torch.Tensor, y: torch.Tensor,
                beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, natural CE, robust KL/B) of the official ``trades_loss``; nothing is detached."""
    natural = F.cross_entropy(wide(logits_nat), y)
    robust = kl_sum(logits_adv, logits_target) / y.shape[0]
    return natural + beta * robust, natural, robust


@register_method
class TRADES(Method):
    name = "trades"
    report_row = 30
    starts_from = "scratch"
    paper = "docs/methods.md §4 (Zhang et al. 2019; AFD Tables 1, 2, 5)"
    attack_bn = "eval"
    defaults = {
        "epochs": 120,
        "lr": 0.1,
        "weight_decay": 2e-4,
        "schedule": {"name": "multistep", "milestones": [75, 90, 100], "gamma": 0.1},
        "beta": 6.0,
        "attack_steps": 10,
        "attack_step": 0.007,
        "init_std": 0.001,
    }

    def attack(self, x: torch.Tensor) -> torch.Tensor:
        hp = self.hp
        return trades_attack(self.model, x, eps=hp["eps"], step=hp["attack_step"], steps=hp["attack_steps"],
                             init_std=hp["init_std"], forward=self.attack_net)

    def train_step(self, batch, epoch, step):
        x_adv = self.attack(batch.x)
        self.model.train()
        logits_nat = self.net(batch.x)  # forward 1: CE
        logits_adv = self.net(x_adv)  # forward 2: the KL input
        logits_target = self.net(batch.x)  # forward 3: the KL target (not detached, as the official code)
        loss, natural, robust = trades_loss(logits_nat, logits_adv, logits_target, batch.y, self.hp["beta"])
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach(), "loss_natural": natural.detach(), "loss_robust": robust.detach(),
                "correct_sum": (logits_adv.argmax(1) == batch.y).sum()}  # on x′, as every AT method logs
