"""PGD-AT (Madry et al. 2018) — docs/methods.md §3, AFD-consistent recipe.

min_θ E max_{‖δ‖∞≤ε} CE(f_θ(x+δ), y): the outer loss is CE on the PGD example only (no clean term).
Attack: PGD-10, ε = 8/255, step 2/255, U(−ε, ε) start, CE on the current model **in eval mode** (running BN
statistics, none updated: the TRADES/AFD convention); the training forward is in train mode on x′ only.
SGD momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, 120 epochs, ×0.1 at epochs 75, 90, 100 (the AFD authors'
AT-baseline schedule, ANCRA ``train_ResNet18_baseline.py``). The last epoch is the model.

Options for the other common PGD-AT convention (Madry et al.'s TF code, Rice et al.'s ``train_cifar.py``, Wong et al.'s
``train_pgd.py``): ``attack_bn = "train"`` attacks with batch statistics (each attack forward moves the BN running
statistics), ``clip_start = true`` clips the U(−ε, ε) start to [0, 1]. Both together give Rice et al.'s update
(fidelity/pgd_at.py). At their defaults (eval, false) they are left out of the run identity: recorded hashes stay.
"""
from __future__ import annotations

import torch.nn.functional as F

from bench.attacks import pgd
from bench.errors import BenchError

from .base import Method, register_method

ATTACK_BN = ("eval", "train")


@register_method
class PGDAT(Method):
    name = "pgd-at"
    report_row = 20
    starts_from = "scratch"
    paper = "docs/methods.md §3 (Madry et al. 2018; AFD Tables 1, 2, 5)"
    attack_bn = "eval"
    defaults = {
        "epochs": 120,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": {"name": "multistep", "milestones": [75, 90, 100], "gamma": 0.1},
        "attack_steps": 10,
        "attack_step": 2 / 255,
        "attack_bn": "eval",  # or "train" (Rice et al. / Madry et al.: batch statistics during the attack)
        "clip_start": False,  # true: the U(−ε, ε) start clipped to [0, 1] (Rice et al.)
    }
    identity_neutral = {"attack_bn": "eval", "clip_start": False}

    @classmethod
    def check_hp(cls, hp):
        if hp.get("attack_bn", "eval") not in ATTACK_BN:
            raise BenchError(f"{cls.name}.attack_bn = {hp['attack_bn']!r}; accepted: eval (running statistics, the "
                             "TRADES / AFD convention, the default) or train (batch statistics, as Rice et al.'s "
                             "train_cifar.py)")

    def setup(self) -> None:
        super().setup()
        PGDAT.check_hp(self.hp)
        # the instance's mode (the class attribute keeps the default); vaft & co. have no such key: their class's
        self.attack_bn = self.hp.get("attack_bn", type(self).attack_bn)

    def pgd_attack(self, x, y):
        hp = self.hp
        return pgd(self.model, x, y, eps=hp["eps"], step=hp["attack_step"], steps=hp["attack_steps"],
                   random_start=True, clip_start=bool(hp.get("clip_start", False)), bn=self.attack_bn,
                   forward=self.attack_net)

    def train_step(self, batch, epoch, step):
        x_adv = self.pgd_attack(batch.x, batch.y)
        logits = self.net(x_adv)
        loss = F.cross_entropy(logits, batch.y)
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach(), "correct_sum": (logits.argmax(1) == batch.y).sum()}
