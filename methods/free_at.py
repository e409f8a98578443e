"""Free-AT, "Adversarial training for free!" (Shafahi et al. 2019) — docs/methods.md §5, Wong et al.'s PyTorch settings.

One perturbation tensor δ with the shape of one mini-batch, zero at the start, is carried across mini-batches and
epochs and never reset. Every mini-batch is replayed m = 8 times; each replay is

1. one forward of ``f(x + δ)`` in **train** mode (batch statistics, running statistics updated), CE;
2. **one** backward that gives both ∇_θ and ∇_δ;
3. ``δ ← clip_[−ε,ε](δ + ε·sign ∇_δ)``, then clipped so that x + δ ∈ [0, 1] (Wong's order of the two clamps);
4. an SGD step on θ with the gradient of step 2, i.e. taken *before* δ moved.

So a mini-batch gives exactly m optimiser steps, and an epoch is one pass over the data (m·len(loader) steps):
10 epochs as METHODS §5 recommends and AFD Table 5 lists ("Free-AT†: 10 epochs"). The lr follows Wong's triangular
``CyclicLR`` 0 → 0.04 → 0 over all 10·len(loader)·m replays, evaluated per replay, with SGD's momentum cycling
inversely 0.9 → 0.8 → 0.9 as that ``CyclicLR`` does by default (``schedule.momentum``); weight decay 5e-4,
batch 128. The forward takes ``x + δ`` with no clip, as Wong's ``model(X + delta[:X.size(0)])``: δ is kept inside
the valid range of the batch it last moved on (step 3), so on the first replay of a new batch ``x + δ`` may leave
[0, 1] by up to ε, exactly as in the authors' code. (A clip in the forward would not be harmless: the gradient of
``clamp`` is 0 at both bounds, so δ's sign step would be 0 and δ would freeze at every pixel that is 0 or 1 or that
step 3 put on a bound, for every later replay.) The
last mini-batch of an epoch may be smaller: it uses (and updates) the first rows of δ, as Wong's ``delta[:X.size(0)]``.
δ's rows are positions in the batch: a process uses those of its rows of the global batch (``self.ctx.rows``), and
after each mini-batch writes them through ``self.ctx.scatter_``, so that under data parallelism every process holds
(and checkpoints) the whole δ of the single-process run.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.precision import wide
from bench.schedules import cyclic_factor

from .base import Method, register_method


@register_method
class FreeAT(Method):
    name = "free-at"
    report_row = 40
    starts_from = "scratch"
    paper = "docs/methods.md §5 (Shafahi et al. 2019; Wong et al. 2020 train_free.py; AFD Tables 1, 5 †)"
    attack_bn = "train"
    defaults = {
        "epochs": 10,
        "lr": 0.04,
        "weight_decay": 5e-4,
        "schedule": {"name": "cyclic", "peak": 0.5, "momentum": [0.8, 0.9]},  # evaluated per replay, see lr_for_replay
        "replays": 8,
    }

    @classmethod
    def check_hp(cls, hp):
        cls.require_int("free-at", hp, "replays", 1)

    def setup(self) -> None:
        super().setup()
        c, h, w = self.info.get("shape", (3, 32, 32))
        p = next(self.model.parameters())
        self.delta = torch.zeros(self.hp["batch_size"], c, h, w, device=p.device, dtype=p.dtype)
        self.replay_steps = 0  # optimiser steps taken so far (all replays of all mini-batches)

    def lr_for_replay(self, epoch: int, step: int, r: int) -> float:
        """The cyclic lr of replay ``r`` of mini-batch ``step`` in ``epoch``: the run is epochs·len(loader)·m
        optimiser steps, and replay t (1-based) sits at t / total of it."""
        sched = self.hp["schedule"]
        if sched.get("name") != "cyclic":
            return self.lr_at(epoch, step)
        m = self.hp["replays"]
        total = self.hp["epochs"] * self.steps_per_epoch * m
        # (t + 1): the step's lr is read at its end, GradAlign's convention; Wong's CyclicLR reads it at its start
        # (its first step has lr 0) — one step of difference in 10·len(loader)·8
        t = (epoch * self.steps_per_epoch + step) * m + r + 1
        return self.hp["lr"] * cyclic_factor(t / total, float(sched.get("peak", 0.5)))

    def train_step(self, batch, epoch, step):
        x, y = batch.x, batch.y
        b, eps = y.shape[0], self.hp["eps"]
        ctx = self.ctx
        rows = ctx.rows(b)  # δ's rows of this batch: positions in the global batch (the first b on one process)
        self.model.train()
        loss_sum = torch.zeros((), device=x.device)
        correct = None
        for r in range(self.hp["replays"]):
            self.set_lr(self.lr_for_replay(epoch, step, r))
            delta = self.delta[rows].clone().requires_grad_(True)
            logits = self.net(x + delta)  # no clip: see the docstring
            loss = F.cross_entropy(wide(logits), y)
            self.optimizer.zero_grad(set_to_none=True)
            ctx.backward(loss)  # one backward: ∇θ into .grad, ∇δ into delta.grad
            with torch.no_grad():
                d = (delta + eps * delta.grad.sign()).clamp_(-eps, eps)
                d = torch.max(torch.min(d, 1.0 - x), -x)  # x + δ in [0, 1]
                self.delta[rows] = d
            self.optimizer.step()  # the θ-gradient of the forward before δ moved
            self.replay_steps += 1
            loss_sum = loss_sum + loss.detach()
            if correct is None:
                correct = (logits.argmax(1) == y).sum()
        with torch.no_grad():  # δ's rows of the whole batch: those the other processes moved (one process: its own)
            ctx.scatter_(self.delta, slice(0, ctx.total(b)), self.delta[rows])
        return {"loss": loss_sum / self.hp["replays"], "correct_sum": correct}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "delta": self.delta, "replay_steps": self.replay_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.delta.copy_(state["delta"].to(self.delta.device))
        self.replay_steps = int(state["replay_steps"])
