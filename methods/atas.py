"""ATAS: fast adversarial training with adaptive step size (Huang et al. 2023) — docs/methods.md#atas (the
algorithm, its sources, the certificate against the official ``ATAS.py`` / ``adv_attack.py`` / ``data_aug.py``, the
deviations).

State, kept in the method (so a resumed run continues with the same buffers):

* ``delta``: one perturbation per training image of the **padded** image, N × C × (H+2p) × (W+2p), drawn
  U(−ε, ε) at the start;
* ``gdnorm``: one running squared input-gradient norm v_i per training image, 0 at the start.

Per mini-batch (the method augments itself, so the engine hands it un-augmented images and their indices):

1. one random crop offset (0..2p, 0..2p) and one flip per example, applied alike to the zero-padded clean image and
   to δ_i → x_aug, δ_aug; ``x_init = clip_[0,1](x_aug + δ_aug)`` (the epoch's offsets and flips are drawn at its
   start, in the order its steps would draw them, and copied to the device once: no copy or sync per step);
2. model in **eval** mode, ``g = ∇_x CE(f(x_init), y)``;
3. 1-based epochs ≤ ``warmup_epochs`` (5): step η = ε; after: ``v_i ← β·v_i + (1−β)·‖g_i‖²₂`` (β = 0.5) and
   ``η_i = clip((2·8/255) / (1 + sqrt(v_i)/c), 4/255, 14/255)``, c = 0.01 (the numerator is hard-coded 2·8/255 in
   the official code, not 2ε);
4. ``x′ = Π_ε(x_init + η_i·sign g_i)`` around x_aug, then [0, 1];
5. model in **train** mode, ``CE(f(sg(x′)), y)``, SGD step;
6. ``δ_i ← inverse_transform(x′ − x_aug)`` written into the crop window of the padded buffer (un-flipped); the
   border outside the window keeps its values.

At the start of every 1-based epoch e with e % 10 == 0 and e ≠ the last, the whole buffer is re-drawn U(−ε, ε)
(``--epochs-reset 10``); v is never reset. Schedule: 30 epochs, lr 0.1, ×0.1 at the official epochs 24 and 28
(``MultiStepLR`` over iterations: the first step of 0-based epoch 24 ⇒ 1-based 25 and 29 in this suite's
convention), momentum 0.9, weight decay 5e-4, batch 128. Evaluated on 32×32 test images (the official test loader
pads them to 40×40: docs/methods.md#atas, Deviations).
The official models normalise their input with ImageNet mean/std inside the network; the suite's default is no
normalisation (Decision 1: inputs in [0, 1], normalisation inside the model only with ``--normalize``, then with the
dataset's own statistics). Since c = 0.01 compares against ‖∇ₓ‖ in input units, the adaptive step is not
scale-free: with normalisation every ‖∇ₓ‖ grows by about 1/std ≈ 4.4, shifting η towards its lower bound.

The crops and flips are per-example draws of the step context (``self.ctx.draw``), the input gradient is that of the
batch-mean CE (seeded: ‖∇ₓ‖ sets η), and δ and v are written through ``self.ctx.scatter_``: under data parallelism
the global batch's crops, its gradient, and every process's updated rows of δ and v written on every process.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.attacks import input_grad
from bench.errors import BenchError
from bench.loader import draw_augment, to_device, window_index
from bench.precision import wide

from .base import Method, register_method


def crop_flip(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-example crop of size (h, w) at offsets (oy, ox) of padded images ``x`` (B, C, H+2p, W+2p), then a
    horizontal flip where ``flip``."""
    out = x[window_index(x, oy, ox, h, w)]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def uncrop_flip_(buf: torch.Tensor, values: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                 flip: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`crop_flip`: un-flip ``values`` (B, C, h, w) and write them into the crop windows of
    ``buf`` (B, C, H+2p, W+2p) in place; the rest of ``buf`` is unchanged."""
    h, w = values.shape[-2:]
    values = torch.where(flip[:, None, None, None], values.flip(3), values)
    buf[window_index(buf, oy, ox, h, w)] = values.to(buf.dtype)
    return buf


@register_method
class ATAS(Method):
    name = "atas"
    report_row = 70
    starts_from = "scratch"
    paper = "docs/methods.md §8 (Huang et al. 2023; AFD Tables 1, 5 †)"
    attack_bn = "eval"
    loader_augment = False  # ATAS crops and flips image and perturbation buffer together itself
    defaults = {
        "epochs": 30,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": {"name": "multistep", "milestones": [25, 29], "gamma": 0.1},
        "warmup_epochs": 5,
        "c": 0.01,
        "beta_m": 0.5,
        "min_step": 4 / 255,
        "max_step": 14 / 255,
        "step_numerator": 2 * 8 / 255,
        "reset_every": 10,
    }

    @classmethod
    def check_hp(cls, hp):
        cls.require_int("atas", hp, "warmup_epochs", 0)
        cls.require_int("atas", hp, "reset_every", 1)
        if not 0 < hp["min_step"] <= hp["max_step"] <= 1:
            raise BenchError(f"atas.min_step = {hp['min_step']!r}, atas.max_step = {hp['max_step']!r}; accepted: "
                             "0 < min_step ≤ max_step ≤ 1 (pixel units)")
        for k in ("c", "step_numerator"):
            if not hp[k] > 0:
                raise BenchError(f"atas.{k} = {hp[k]!r}; accepted: a positive number")
        if not 0 <= hp["beta_m"] < 1:
            raise BenchError(f"atas.beta_m = {hp['beta_m']!r}; accepted: a number in [0, 1)")

    def setup(self) -> None:
        super().setup()
        n = int(self.info.get("n", 0))
        c, h, w = self.info.get("shape", (3, 32, 32))
        self.pad = int(self.info.get("crop_pad", 4))
        self.flip = bool(self.info.get("flip", True))
        p = next(self.model.parameters())
        dev = p.device
        self.delta = torch.empty(n, c, h + 2 * self.pad, w + 2 * self.pad, device=dev, dtype=p.dtype)
        self.redraw()
        self.gdnorm = torch.zeros(n, device=dev, dtype=p.dtype)
        self.plan: tuple[torch.Tensor, list[int], list[int]] | None = None  # the epoch's crops (plan_epoch)
        self.begin_epoch_stats()

    def redraw(self) -> None:
        """δ ← U(−ε, ε) over the whole padded buffer (global RNG: the engine seeds it per epoch)."""
        eps = self.hp["eps"]
        self.delta.copy_((torch.rand(self.delta.shape) * 2 - 1).mul_(eps).to(self.delta.device))

    def begin_epoch(self, epoch: int) -> None:
        e = epoch + 1  # the official loop counts epochs from 1
        if e % self.hp["reset_every"] == 0 and e != self.hp["epochs"]:
            self.redraw()
        self.begin_epoch_stats()
        self.plan_epoch()

    def begin_epoch_stats(self) -> None:
        # min, max and sum of the step sizes of this epoch, logged by end_epoch
        self.step_stats = torch.tensor([float("inf"), 0.0, 0.0], device=self.delta.device)
        self.step_count = 0

    def draw(self, m: int) -> torch.Tensor:
        """The crop offsets and flips of ``m`` examples from the global RNG (on the CPU, so results do not depend on
        the device), in this order: m y offsets, m x offsets, m flips; an (m, 3) int64 tensor (oy, ox, flip 0/1).
        The loader's draw (:func:`bench.loader.draw_augment`) from the global generator: the same numbers ATAS drew
        with its own copy of it (with ``crop_pad`` 0, as the synthetic set's, no offsets are drawn: all 0 either
        way)."""
        return draw_augment(None, m, self.pad, self.flip).t().contiguous()

    def plan_epoch(self) -> None:
        """The crops and flips of every step of the epoch (the engine's batches of the global batch size over the
        ``n`` training images), drawn now in the order the steps would draw them one after another — the same
        numbers — and copied to the device once: a step makes no host-to-device copy (on a GPU, no sync). Used up by
        the epoch (:meth:`end_epoch`); without a plan a step draws its own (:meth:`transform`)."""
        n, bs = int(self.info.get("n", 0)), int(self.hp["batch_size"])
        sizes = [min(bs, n - s * bs) for s in range(self.steps_per_epoch)]
        self.plan = None
        if sizes and min(sizes) > 0:
            starts = [s * bs for s in range(len(sizes))]
            self.plan = (to_device(torch.cat([self.draw(m) for m in sizes]), self.delta.device), sizes, starts)

    def transform(self, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One crop offset and flip per example, drawn now (:meth:`draw`; for the whole global batch under data
        parallelism) and copied to ``device`` in one copy."""
        d = to_device(self.ctx.draw(self.draw, b), device)
        return d[:, 0], d[:, 1], d[:, 2].bool()

    def step_transform(self, b: int, step: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The crops and flips of step ``step`` of this epoch's plan (this process's rows of them), else drawn now."""
        if self.plan is None:
            return self.transform(b, device)
        draws, sizes, starts = self.plan
        total = self.ctx.total(b)
        if step >= len(sizes) or sizes[step] != total:
            raise RuntimeError(f"ATAS step {step} has a global batch of {total} images; the epoch's crops were drawn "
                               f"for {len(sizes)} steps of {sizes[:3]}... images")
        d = self.ctx.local(draws[starts[step]:starts[step] + total])
        return d[:, 0], d[:, 1], d[:, 2].bool()

    def step_sizes(self, g: torch.Tensor, idx: torch.Tensor, epoch: int,
                   all_idx: torch.Tensor | None = None) -> torch.Tensor:
        """η_i per example; updates v_i after the warm-up (``all_idx``: the indices of the step's whole batch,
        ``batch.all_idx``, whose rows are written; default ``idx``)."""
        hp = self.hp
        if epoch + 1 <= hp["warmup_epochs"]:
            # in g's dtype: float32 (torch's default) would round ε in a float64 run (9e-9 relative, fidelity.atas)
            return torch.full((g.shape[0],), float(hp["eps"]), device=g.device, dtype=g.dtype)
        v = wide(g.flatten(1)).norm(dim=1).pow(2) * (1 - hp["beta_m"]) + self.gdnorm[idx] * hp["beta_m"]
        self.ctx.scatter_(self.gdnorm, idx if all_idx is None else all_idx, v)
        eta = hp["step_numerator"] / (1 + v.sqrt() / hp["c"])
        return eta.clamp(hp["min_step"], hp["max_step"])

    def train_step(self, batch, epoch, step):
        x, y, idx = batch.x, batch.y, batch.idx
        b, _, h, w = x.shape
        eps, p = self.hp["eps"], self.pad
        oy, ox, flip = self.step_transform(b, step, x.device)
        with torch.no_grad():
            x_aug = crop_flip(F.pad(x, (p, p, p, p)), oy, ox, flip, h, w)
            d_aug = crop_flip(self.delta[idx], oy, ox, flip, h, w)
            x_init = (x_aug + d_aug).clamp(0.0, 1.0)
        self.model.eval()
        # the gradient of the batch-mean CE (seeded): ‖g_i‖ sets the step, so its 1/batch scale counts
        g, _ = input_grad(self.attack_net, x_init, y, seed=True)
        eta = self.step_sizes(g, idx, epoch, batch.all_idx)
        with torch.no_grad():
            x_adv = x_init + eta[:, None, None, None] * g.sign()
            x_adv = torch.min(torch.max(x_adv, x_aug - eps), x_aug + eps).clamp_(0.0, 1.0)
        self.model.train()
        logits = self.net(x_adv)
        loss = F.cross_entropy(wide(logits), y)
        self.ce_step(self.optimizer, loss)
        with torch.no_grad():
            rows = self.delta[idx]
            uncrop_flip_(rows, x_adv - x_aug, oy, ox, flip)
            self.ctx.scatter_(self.delta, batch.all_idx, rows)
            eta = self.ctx.gather(eta)  # (the step sizes of the whole batch, logged)
            self.step_stats[0] = torch.minimum(self.step_stats[0], eta.min())
            self.step_stats[1] = torch.maximum(self.step_stats[1], eta.max())
            self.step_stats[2] += eta.sum()
        self.step_count += eta.shape[0]
        return {"loss": loss.detach(), "correct_sum": (logits.argmax(1) == y).sum()}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        self.plan = None
        s = self.step_stats.tolist()
        return {"step_min_255": round(s[0] * 255, 4), "step_max_255": round(s[1] * 255, 4),
                "step_mean_255": round(s[2] * 255 / max(self.step_count, 1), 4)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "delta": self.delta, "gdnorm": self.gdnorm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["delta"].shape != self.delta.shape:
            raise BenchError(f"ATAS buffer of shape {tuple(state['delta'].shape)} in the checkpoint; this run's "
                             f"training set needs {tuple(self.delta.shape)}")
        self.delta.copy_(state["delta"].to(self.delta.device))
        self.gdnorm.copy_(state["gdnorm"].to(self.gdnorm.device))
