"""vAFT — vanilla adversarial fine-tuning: docs/methods.md §9 (the shared AFT skeleton) and §10.

Neither Jeddi et al. nor Suzuki et al. released code; the only executable definition is the AFD authors'
``ARREST.py`` without flags (§9), which this follows: the student starts as a copy of the suite's natural model θᴾ;
PGD-10, ε = 8/255, step 2/255, U(−ε, ε) start, CE on the student **in eval mode**; the training forward is in train
mode on x′ only, CE, no clean term, no teacher; one SGD (momentum 0.9, weight decay 5e-4, batch 128), lr₀ 0.025 with
the §9 step schedule ("suzuki": ×0.8 at epoch 11, then halved at 13, 15, 17, 19), 20 epochs, last epoch reported.
The paper's printed lr 0.0025 is selectable with ``--lr 0.0025`` (METHODS §17 #1).
"""
from __future__ import annotations

from .base import register_method
from .pgd_at import PGDAT

AFT_DEFAULTS = {
    "epochs": 20,
    "lr": 0.025,
    "weight_decay": 5e-4,
    "schedule": {"name": "suzuki"},
    "attack_steps": 10,
    "attack_step": 2 / 255,
}


@register_method
class VAFT(PGDAT):
    """The PGD-AT update (CE on the eval-mode PGD-10 example only), run as a fine-tune of θᴾ."""

    name = "vaft"
    report_row = 80
    starts_from = "natural"
    paper = "docs/methods.md §9-§10 (vanilla AFT; AFD Tables 1-3, 5)"
    attack_bn = "eval"
    defaults = dict(AFT_DEFAULTS)
