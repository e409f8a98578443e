"""FGSM-GA: FGSM training with GradAlign (Andriushchenko & Flammarion 2020) — docs/methods.md#fgsm-ga, the GA code's
``train.py`` / ``utils.get_input_grad``.

Per mini-batch, every forward in **train** mode, in the official order:

1. ``g₁ = ∇_x CE(f(x), y)`` at δ = 0 (zero-init FGSM), **detached** — no double backprop through g₁;
   ``δ = clip_[−ε,ε](1.25·ε·sign g₁)`` (effectively ε·sign g₁), then x + δ clipped to [0, 1];
2. ``CE(f(x + sg(δ)), y)``;
3. ``g₂ = ∇_η CE(f(x + η), y)`` with η ~ U(−ε, ε) (x + η not clipped, as ``get_input_grad``), computed with
   ``create_graph=True`` so the regulariser's gradient reaches θ through g₂ only;
4. ``L = CE + λ·(1 − mean_{i∈S} cos(g₁ᵢ, g₂ᵢ))``, the cosine over all pixels of an example, S = the examples whose
   two gradients both have non-zero norm (no term when S is empty).

λ = 0.2 at ε = 8/255; ``lam = "auto"`` (default) is the GA scripts' λ(ε) = exp(ε_px·ln 10 / 8 + ln 0.02), which is
0.2 at ε_px = 8. 30 epochs, batch 128, momentum 0.9, weight decay 5e-4, the piecewise-linear cyclic lr
``interp(t, [0, 2·30//5 = 12, 30], [0, 0.30, 0])`` per iteration (schedule ``cyclic`` with peak 0.4). The GA code
trains in apex half precision; the suite trains in fp32 unless ``--precision bf16``.

``g1_saturated``: g₁ at the pixels where x is exactly 0 or 1 (image bounds, crop padding). ``full`` (the default):
∇ₓ CE(f(x), y), the paper's g₁. The GA code takes g₁ w.r.t. δ through ``clamp(X + δ, 0, 1)`` at δ = 0, a
``torch.max(torch.min(·, 1), 0)`` whose gradient at those pixels is a tie of the min or the max: ``half`` is what it
computes under current PyTorch (a tie splits the gradient evenly, since pytorch/pytorch#59669): the FGSM sign is
unchanged, the GradAlign cosine is not; ``zero`` what it computed under the torch 1.4.0 its Dockerfile pins (a tie
passes no gradient to the input; presumably the authors' runs): g₁ is 0 there and the FGSM step leaves those pixels
unchanged (sign 0). The three are equal on images with no pixel at 0 or 1. Certified against the GA code in each reading
(``fidelity/fgsm_ga.py``); at ``full`` the option is left out of the run identity, so recorded hashes stay.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.attacks import bn_mode, input_grad, uniform_noise
from bench.errors import BenchError
from bench.precision import wide
from bench.step import StepContext, current

from .base import Method, register_method


def gradalign_lambda(eps: float) -> float:
    """λ(ε) of the GradAlign scripts, ε in [0, 1] units: exp(ε·255·ln(10)/8 + ln 0.02); λ(8/255) = 0.2."""
    return math.exp(eps * 255.0 * math.log(10.0) / 8.0 + math.log(0.02))


G1_SATURATED = ("full", "half", "zero")


def g1_at_saturated(g1: torch.Tensor, x: torch.Tensor, mode: str) -> torch.Tensor:
    """g₁ with its entries at the pixels where x is exactly 0 or 1 kept (``full``), halved (``half``) or zeroed
    (``zero``): the gradient the GA code's ``clamp(X + δ, 0, 1)`` at δ = 0 passes there under current PyTorch
    (``half``) or torch 1.4.0 (``zero``); elsewhere g₁ is unchanged. No host sync (an elementwise ``where``)."""
    if mode == "full":
        return g1
    keep = 0.5 if mode == "half" else 0.0
    return torch.where((x == 0) | (x == 1), g1 * keep, g1)


def gradalign_reg(g1: torch.Tensor, g2: torch.Tensor, ctx: StepContext | None = None) -> torch.Tensor:
    """1 − mean cosine of the per-example input gradients over the examples where both norms are non-zero (0 when
    none is). ``g1`` is expected detached; gradients flow through ``g2``.

    No host sync: which examples count is decided on the device (a mask and ``torch.where``, no boolean indexing,
    no ``bool()``); with every example kept, the value and its gradient are bit for bit the mean over the batch.

    The mean runs over the kept examples of the whole batch of the step (``ctx``, default the step being run):
    :meth:`~bench.step.StepContext.loss_mean` of the cosines summed over them, and every process's ``g2`` stays in the
    graph, also when none of its examples is kept (the double backward through synchronised BN is a collective)."""
    ctx = ctx if ctx is not None else current()
    a, b = wide(g1.flatten(1)), wide(g2.flatten(1))
    na, nb = a.norm(dim=1), b.norm(dim=1)
    keep = (na != 0) & (nb != 0)
    one = torch.ones_like(na)
    cos = ((a / torch.where(keep, na, one)[:, None]) * (b / torch.where(keep, nb, one)[:, None])).sum(dim=1)
    kept = ctx.sum(keep.sum().float())
    # (cos * keep).sum() / kept is cos.mean() bit for bit when every example is kept (as torch computes a CPU mean)
    reg = 1.0 - ctx.loss_mean((cos * keep).sum(), kept.clamp(min=1))
    return torch.where(kept > 0, reg, (b * 0).sum())  # none kept: 0, with g2 in the graph


@register_method
class FGSMGA(Method):
    name = "fgsm-ga"
    report_row = 60
    starts_from = "scratch"
    paper = "docs/methods.md §7 (Andriushchenko & Flammarion 2020; AFD Tables 1, 5 †)"
    attack_bn = "train"
    defaults = {
        "epochs": 30,
        "lr": 0.3,
        "weight_decay": 5e-4,
        "schedule": {"name": "cyclic", "peak": 0.4},
        "lam": "auto",
        "fgsm_alpha": 1.25,
        "g1_saturated": "full",
    }
    identity_neutral = {"g1_saturated": "full"}  # added after runs were recorded: their g₁ is "full"

    @classmethod
    def check_hp(cls, hp):
        lam = hp["lam"]
        ok = lam == "auto" or (isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam)
                               and lam >= 0)
        if not ok:
            raise BenchError(f"fgsm-ga.lam = {lam!r}; accepted: \"auto\" (λ(ε), 0.2 at 8/255) or a number ≥ 0")
        mode = hp.get("g1_saturated", "full")
        if mode not in G1_SATURATED:
            raise BenchError(f"fgsm-ga.g1_saturated = {mode!r}; accepted: full (∇ₓ at x, the default), half (the GA "
                             "code under current PyTorch) or zero (the GA code under its torch 1.4.0)")

    def setup(self) -> None:
        super().setup()
        lam = self.hp["lam"]
        self.lam = gradalign_lambda(self.hp["eps"]) if lam == "auto" else float(lam)

    def grad2(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """g₂ at x + U(−ε, ε), with the graph kept (double backprop). Its forward is the training forward run
        eagerly, also under ``compile``: the regulariser's backward differentiates through this forward's backward,
        and a compiled graph's backward (aot_autograd) has no double backward. The other forwards stay compiled."""
        eta = uniform_noise(x, self.hp["eps"]).requires_grad_(True)
        eager = getattr(self.net, "_orig_mod", self.net)  # torch.compile's module wraps the original (model or DDP)
        loss = F.cross_entropy(wide(eager(x + eta)), y)
        (g,) = self.ctx.grad(loss, eta, create_graph=True)
        return g

    def train_step(self, batch, epoch, step):
        x, y, eps = batch.x, batch.y, self.hp["eps"]
        self.model.train()
        with bn_mode(self.model, "train"):
            g1, _ = input_grad(self.attack_net, x, y, seed=True)  # at δ = 0, train mode; returned detached
        g1 = g1_at_saturated(g1, x, self.hp.get("g1_saturated", "full"))
        delta = (self.hp["fgsm_alpha"] * eps * g1.sign()).clamp(-eps, eps)
        x_adv = (x + delta).clamp(0.0, 1.0).detach()
        logits = self.net(x_adv)
        ce = F.cross_entropy(wide(logits), y)
        reg = torch.zeros((), device=x.device)
        if self.lam != 0:
            reg = self.lam * gradalign_reg(g1, self.grad2(x, y), self.ctx)
        loss = ce + reg
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach(), "loss_ce": ce.detach(), "loss_gradalign": reg.detach(),
                "correct_sum": (logits.argmax(1) == y).sum()}
