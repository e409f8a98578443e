"""Natural (standard) training — docs/methods.md §2; the shared starting model θᴾ of the AFT methods.

Plain CE on clean augmented images, model in train mode; SGD momentum 0.9, lr 0.1, weight decay 5e-4, batch 128,
100 epochs, ×0.1 at epochs 50 and 75 (§2 "Recommended"; the AFD authors did not release their recipe), inputs in
[0, 1] without normalisation (as AFD's fine-tuning code assumes). The last epoch is the model.
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, register_method


@register_method
class Natural(Method):
    name = "natural"
    report_row = 10
    starts_from = "scratch"
    paper = "docs/methods.md §2 (natural pre-training, AFD Table 5 'Standard')"
    attack_bn = None
    defaults = {
        "epochs": 100,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": {"name": "multistep", "milestones": [50, 75], "gamma": 0.1},
    }

    def train_step(self, batch, epoch, step):
        logits = self.net(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach(), "correct_sum": (logits.argmax(1) == batch.y).sum()}
