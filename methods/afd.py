"""AFD — Adversarial Fine-tuning via Disentanglement (Zhou et al., AAAI 2025) — docs/methods.md#afd (§14 of its section map;
its § numbers resolve there as anchors ``#methods-14-1`` … ``#methods-14-7``), and its variants:

* ``afd``: the **code-faithful** update of §14.4 (the one that made the paper's numbers, Decision 4), certified
  against the authors' ``tl+sl.py`` (``fidelity/afd.py``; docs/methods.md#afd, Certification);
* ``afd-literal``: Algorithm 1 read literally (§14.4 "paper-literal"; docs/methods.md#afd-literal);
* ``vaft+d``: AFD with γ = 0, disentanglement without alignment (Table 3; docs/methods.md#vaft-d).

Model (§14.1). Between the backbone g and the classifier ω two bias-free d×d linear blocks D₁, D₂, both initialised to
the identity, so the training model starts as the pre-trained one. Training forward on u: h = g(u), f₁ = D₁h,
f₂ = D₂·sg(h) (D₂'s input is detached: nothing from the f₂ branch reaches the backbone), z₁ = ωf₁, z₂ = ωf₂.
Eval forward: ω·D₁·g(u). Exported (evaluated) model: D₁ folded into ω (W_ω·W_D₁, bias unchanged), a plain network.

Step (§14.2-14.4, 14.6). x′ = PGD-10 (ε 8/255, step 0.007, U(−ε, ε) start) of CE(ω D₁ g(x′), y) with the student in
eval mode; teacher features t = g_P(x) of the clean batch (frozen, eval mode, no grad); one train-mode forward on x′;
y′ = argmax_{k≠y} z₁ (no grad);
L₁ = CE(z₂, y′), L₂ = mean cos(f₁, sg f₂), L₃ = CE(z₁, y) + γ·(1 − mean cos(f₁, t)).
Gradients at θ_t, all from that one forward with ``torch.autograd.grad`` before any step:
G₁ = ∇(αL₁) w.r.t. {D₂, ω}, G₂ = ∇(βL₂) w.r.t. θ₁, G₃ = ∇L₃ w.r.t. θ₁ (θ₁ = every parameter but D₂).
Three momentum-SGD optimisers with their own buffers (and weight decay each): O₁ over D₂, O₂ and O over θ₁.

=================  ==============================  =========================
step               code-faithful (``afd``)         literal (``afd-literal``)
=================  ==============================  =========================
O₁ (D₂)            G₁|D₂                           G₁|D₂
O₂ (θ₁)            G₁|ω + G₂                       G₂ (ω not stepped)
O  (θ₁)            G₁|ω + G₂ + wd·θ_t + G₃         G₃
=================  ==============================  =========================

(each optimiser adds its own weight decay wd·θ on top; the extra wd·θ_t of the code-faithful O step is O₂'s weight
decay that old PyTorch left in the accumulated gradient: see ``AFD.apply``.)

The three gradients come from the step context (``self.ctx.param_grads``): under data parallelism they are the
global-batch gradients, summed over processes in one all-reduce before the three steps (no DDP forward).

(The authors' code backpropagates αL₁, βL₂, L₃ in turn with accumulating gradients and steps after each — which
modern PyTorch refuses, METHODS §14.4 / §17 #4. Computing all three at θ_t is that code with every backward reading
θ_t: equal to ``tl+sl.py`` so run to ≤ 3e-14 relative, float64, three iterations; ``fidelity/afd.py``.)

``reading`` (``afd``, ``vaft+d``): ``simultaneous`` (the default, above) or ``sequential``, the authors' code as
PyTorch < 1.5 ran it on one GPU: there SGD wrote the stepped weights through ``.data`` into the very tensors autograd
had saved in the forward, so step 3's backward (of L₃) read the weights θ_{t+½} that O₂ had already stepped, with the
activations of the forward at θ_t (steps 1 and 2 read θ_t: nothing their backwards read has moved yet). The suite
reproduces it without mutating anything autograd holds: under ``sequential`` the training forward runs in
:class:`LateParameters`, whose saved-tensor hooks keep a tensor aliasing a parameter's memory as a reference to the
parameter and read it back when the backward runs; G₃ is then taken after O₁'s and O₂'s steps
(:meth:`AFD.sequential_steps`). The training forward stays eager (a compiled graph saves its own tensors), and bf16
autocast is refused (the backward would read bf16 copies of θ_t, not the parameters). Certified against ``tl+sl.py``
run with PyTorch 1.1's SGD writing through ``.data`` (``fidelity/afd.py``); it differs from ``simultaneous`` by
~1e-4 relative after one iteration, ~1e-2 after three (docs/methods.md#afd).
EMA of every parameter and buffer with decay min(0.999, (t+1)/(t+10)); the EMA copy is what is evaluated.
Hyper-parameters α = 0.05, β = 0.25, γ = 25, lr₀ 0.025 with the §9 schedule, weight decay 5e-4, 20 epochs.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError

from .afkd import angular_distance
from .base import Method, register_method
from .vaft import AFT_DEFAULTS


def identity_linear(d: int) -> nn.Linear:
    lin = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d))
    return lin


class Disentangled(nn.Module):
    """The AFD training model: a :class:`~bench.models.base.Classifier` ``base`` (g and ω) with D₁, D₂ inserted."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        d = base.feature_dim
        p = next(base.parameters())
        self.d1 = identity_linear(d).to(p.device, p.dtype)
        self.d2 = identity_linear(d).to(p.device, p.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """g(x), the backbone features before the disentangler."""
        return self.base.features(x)

    def f1(self, x: torch.Tensor) -> torch.Tensor:
        return self.d1(self.base.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval forward ω·D₁·g(x): what the attack targets and what folding reproduces."""
        return self.base.fc(self.f1(x))

    def heads(self, x: torch.Tensor, features=None) -> tuple[torch.Tensor, ...]:
        """Training forward: (h, f₁, f₂, z₁, z₂) with f₂ = D₂·sg(h); ``features`` computes h = g(x) in place of
        ``base.features`` (the compiled backbone, ``AFD.compile``)."""
        h = (features if features is not None else self.base.features)(x)
        f1 = self.d1(h)
        f2 = self.d2(h.detach())
        return h, f1, f2, self.base.fc(f1), self.base.fc(f2)

    def omega(self) -> list[nn.Parameter]:
        return [self.base.fc.weight, self.base.fc.bias]

    def fold(self) -> nn.Module:
        """A plain copy of ``base`` whose classifier is W_ω·W_D₁ (bias unchanged): its logits are ω·D₁·g."""
        plain = copy.deepcopy(self.base)
        with torch.no_grad():
            plain.fc.weight.copy_(self.base.fc.weight @ self.d1.weight)
        return plain


class _Head(nn.Module):
    """ω·D·g of a :class:`Disentangled` model for D = D₁ or D₂ (the f₁ / f₂ heads of the paper's Table 4)."""

    def __init__(self, model: Disentangled, which: str):
        super().__init__()
        self.model, self.which = model, which

    def forward(self, x):
        d = self.model.d1 if self.which == "f1" else self.model.d2
        return self.model.base.fc(d(self.model.base.features(x)))


def _dense(grads: list[torch.Tensor | None], params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _step(opt: torch.optim.Optimizer, params: Iterable[nn.Parameter], grads: Iterable[torch.Tensor | None]) -> None:
    """One step of ``opt`` with the given gradients; a ``None`` gradient leaves that parameter alone (no weight decay,
    no momentum), as SGD skips parameters without ``.grad``."""
    for p, g in zip(params, grads):
        # in the parameter's own memory format (a channels_last weight may get a contiguous gradient from
        # autograd.grad, and the fused CUDA SGD kernel requires equal strides)
        p.grad = g if g is None or g.stride() == p.stride() else torch.empty_like(p).copy_(g)
    opt.step()


READINGS = ("simultaneous", "sequential")


class LateParameters:
    """Saved-tensor hooks under which a backward reads the parameters as they are when it runs, not as they were in
    the forward: a tensor autograd saves that aliases a parameter's memory (the parameter, or a view such as the
    ``weight.t()`` of a linear layer) is packed as a reference to the parameter and its view geometry, and unpacked
    as that view of the parameter's current value. Any other saved tensor (activations, BN batch statistics, casts)
    is kept as it was. This is what PyTorch < 1.5 did with an optimiser step between forward and backward: its SGD
    wrote through ``.data`` into the tensors autograd had saved. Here autograd holds the reference, never the
    parameter's tensor, so an optimiser step in place is no in-place change of a saved tensor."""

    def __init__(self, params: Iterable[nn.Parameter]):
        self.by_storage = {p.untyped_storage().data_ptr(): p for p in params}
        self.aliased: set[int] = set()  # ids of the parameters a backward will read late (tests)

    def pack(self, t: torch.Tensor) -> Any:
        p = self.by_storage.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        if p is None or p.dtype != t.dtype or p.device != t.device:
            return t
        self.aliased.add(id(p))
        return p, t.size(), t.stride(), t.storage_offset()

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        p, size, stride, offset = packed
        return p.detach().as_strided(size, stride, offset)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def confusing_label(z1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y′ = argmax_{k≠y} z₁[k] (METHODS §14.3, §17 #22): never the true label."""
    z = z1.detach().clone()
    z[torch.arange(z.shape[0], device=z.device), y] = float("-inf")
    return z.argmax(1)


@register_method
class AFD(Method):
    name = "afd"
    report_row = 120
    starts_from = "natural"
    paper = "docs/methods.md §14, code-faithful update of §14.4 (Zhou et al. 2025, Algorithm 1 as the code runs it)"
    attack_bn = "eval"
    literal = False
    defaults = {**AFT_DEFAULTS, "attack_step": 0.007, "alpha": 0.05, "beta": 0.25, "gamma": 25.0,
                "ema": {"decay": 0.999, "warmup": True}, "reading": "simultaneous"}
    identity_neutral = {"reading": "simultaneous"}  # (added after runs were recorded, at their value)

    @classmethod
    def check_hp(cls, hp):
        super().check_hp(hp)
        reading = hp.get("reading", "simultaneous")
        if reading not in READINGS:
            raise BenchError(f"{cls.name}.reading = {reading!r}; accepted: simultaneous (all three gradients at θ_t, "
                             "the default) or sequential (step 3's backward reads the weights step 2 moved, as "
                             "PyTorch < 1.5 ran the authors' code)")
        if reading == "sequential" and cls.literal:
            raise BenchError(f"{cls.name}.reading = 'sequential'; accepted: simultaneous (the sequential reading is "
                             "the authors' code under old PyTorch, which Algorithm 1 read literally is not; use afd)")

    @property
    def sequential(self) -> bool:
        return self.hp.get("reading", "simultaneous") == "sequential"

    def setup(self) -> None:
        self.model = Disentangled(self.model)
        self.net = self.attack_net = self.model
        self.theta2 = [self.model.d2.weight]
        self.theta1 = [p for p in self.model.parameters() if p is not self.model.d2.weight]
        self.omega = self.model.omega()
        self.backbone = None  # g for the training forward heads(); compiled by compile(), else base.features
        self.late: LateParameters | None = None  # reading = sequential: the hooks of the last training forward
        self.o1 = self.sgd(self.theta2)
        self.o2 = self.sgd(self.theta1)
        self.o = self.sgd(self.theta1)
        self.optimizers = [self.o1, self.o2, self.o]

    def compile(self, *, reset: bool = True, fused_step: bool = True) -> None:
        """As every method, and the backbone g of the training forward ``heads()`` (AFD's gradients come from
        ``heads()``, not from ``self.net``). g alone, not ``heads()`` whole: a compiled graph's backward computes the
        gradient of all its inputs, so a compiled ``heads()`` would run g's backward for G₁ too, which reaches only D₂
        and ω through sg(h); with g compiled alone autograd still prunes it there (G₂ and G₃ run it, as eagerly)."""
        super().compile(reset=reset, fused_step=fused_step)
        if not self.sequential:  # (sequential: g stays eager, its saved tensors must be the parameters themselves)
            self.backbone = torch.compile(self.model.base.features)

    def prepare_distributed(self, wrap) -> None:
        """No DDP forward: the three gradients come from ``self.ctx.param_grads``, which sums them over processes."""

    def losses(self, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t = self.teacher_net(x)
        late = contextlib.nullcontext()
        if self.sequential:
            if torch.is_autocast_enabled(x_adv.device.type):
                raise BenchError(f"{self.name}.reading = sequential under bf16 autocast: the backward would read bf16 "
                                 "copies of the weights, not the stepped parameters; accepted: precision fp32 or "
                                 "fp64, or reading = simultaneous")
            self.late = LateParameters(self.model.parameters())  # (kept: the tests read which parameters it aliased)
            late = self.late.hooks()
        with late:
            _, f1, f2, z1, z2 = self.model.heads(x_adv, features=self.backbone)
        y_conf = confusing_label(z1, y)
        l1 = F.cross_entropy(z2, y_conf)
        l2 = F.cosine_similarity(f1, f2.detach(), dim=1).mean()
        ce = F.cross_entropy(z1, y)
        align = angular_distance(f1, t)
        return {"l1": l1, "l2": l2, "l3": ce + self.hp["gamma"] * align, "ce": ce, "align": align, "z1": z1,
                "y_conf": y_conf}

    def gradients(self, L: dict[str, torch.Tensor]) -> tuple[list, list, list]:
        """(G₁ on [D₂] + ω, G₂ on θ₁, G₃ on θ₁), all at θ_t (``None`` where a loss does not reach a parameter)."""
        hp = self.hp
        g1, g2, g3 = self.ctx.param_grads((hp["alpha"] * L["l1"], self.theta2 + self.omega),
                                          (hp["beta"] * L["l2"], self.theta1), (L["l3"], self.theta1))
        return g1, g2, g3

    def o2_gradient(self, g1_omega: list, g2: list) -> list[torch.Tensor]:
        """O₂'s gradient in the code-faithful update: G₁|ω + G₂ on θ₁ (the ω part of L₁ accumulated with L₂)."""
        omega_ids = {id(p): g for p, g in zip(self.omega, _dense(g1_omega, self.omega))}
        g1_theta1 = [omega_ids.get(id(p), torch.zeros_like(p)) for p in self.theta1]
        return [a + b for a, b in zip(g1_theta1, _dense(g2, self.theta1))]

    def apply(self, g1: list, g2: list, g3: list) -> None:
        """The three optimiser steps of §14.4 with the gradients taken at θ_t (see the module docstring)."""
        _step(self.o1, self.theta2, _dense(g1[:1], self.theta2))
        if self.literal:
            # Algorithm 1 read literally: θ₁ ← θ₁ − η∇(βL₂), then θ₁ ← θ₁ − η∇L₃. A parameter a loss does not
            # depend on (ω in L₂) is not stepped by that optimiser at all.
            _step(self.o2, self.theta1, g2)
            _step(self.o, self.theta1, g3)
            return
        s2, g3 = self.o2_gradient(g1[1:], g2), _dense(g3, self.theta1)
        # O's gradient also carries O₂'s weight-decay term wd·θ_t. The authors ran PyTorch < 1.2 (AFD README), whose
        # SGD added weight decay into ``p.grad`` in place (``d_p = p.grad.data; d_p.add_(weight_decay, p.data)``,
        # torch/optim/sgd.py before 1.5), and their code lets gradients accumulate from step 2 into step 3, so O
        # stepped with G₁|ω + G₂ + wd·θ_t + G₃ and then added wd·θ_{t+½} itself: weight decay three times per
        # iteration on θ₁. The specification's formula (§14.4, docs/methods.md#afd) leaves this term out; we keep it,
        # to be faithful to the code that made the paper's numbers (measured: docs/methods.md#afd, Deviations).
        wd = self.hp["weight_decay"]
        s3 = [a + wd * p.detach() + b for a, p, b in zip(s2, self.theta1, g3)]  # at θ_t, before any step
        _step(self.o2, self.theta1, s2)
        _step(self.o, self.theta1, s3)

    def sequential_steps(self, L: dict[str, torch.Tensor]) -> None:
        """``reading = sequential``: the authors' backward/step pairs in their order, from the one forward (run under
        :class:`LateParameters` by :meth:`losses`): G₁ → O₁, G₂ → O₂, then G₃, whose backward reads θ_{t+½} (the
        weights O₂ has stepped) with the activations of θ_t, → O with G₁|ω + G₂ + wd·θ_t + G₃ (O₂'s weight decay
        left in the accumulated gradient, as in the simultaneous reading). Steps 1 and 2 read θ_t: L₁'s backward
        runs before any step, and L₂'s reads no weight of D₂ (f₂ enters it detached)."""
        hp, wd, ctx = self.hp, self.hp["weight_decay"], self.ctx
        (g1,) = ctx.param_grads((hp["alpha"] * L["l1"], self.theta2 + self.omega))
        _step(self.o1, self.theta2, _dense(g1[:1], self.theta2))
        (g2,) = ctx.param_grads((hp["beta"] * L["l2"], self.theta1))
        s2 = self.o2_gradient(g1[1:], g2)
        carried = [a + wd * p.detach() for a, p in zip(s2, self.theta1)]  # at θ_t, before O₂'s step
        _step(self.o2, self.theta1, s2)
        (g3,) = ctx.param_grads((L["l3"], self.theta1))  # reads θ_{t+½}
        _step(self.o, self.theta1, [c + g for c, g in zip(carried, _dense(g3, self.theta1))])

    def train_step(self, batch, epoch, step):
        x_adv = self.pgd_attack(batch.x, batch.y)  # through ω·D₁·g, student in eval mode
        L = self.losses(x_adv, batch.x, batch.y)
        if self.sequential:
            self.sequential_steps(L)
        else:
            self.apply(*self.gradients(L))
        hp = self.hp
        total = hp["alpha"] * L["l1"] + hp["beta"] * L["l2"] + L["l3"]
        return {"loss": total.detach(), "l1": L["l1"].detach(), "l2": L["l2"].detach(), "l3": L["l3"].detach(),
                "ce": L["ce"].detach(), "align": L["align"].detach(),
                "correct_sum": (L["z1"].argmax(1) == batch.y).sum()}

    def export(self, module=None) -> nn.Module:
        return (module if module is not None else self.model).fold()

    def probe(self, module):
        """AFD Fig. 1a / "Empirical Analysis": the distance between f₁ of the adversarial image and the pre-trained
        model's features of the natural image; x′ attacks ω·D₁·g."""
        return module, self.teacher.features, module.f1

    def tsne_features(self, module):
        """AFD Fig. 3: the backbone features g (before disentanglement) and f₁ = D₁·g (after) of the evaluated model."""
        return {"g": module.features, "f1": module.f1}

    def eval_heads(self, module):
        """Table 4: f₁ = ω·D₁·g and f₂ = ω·D₂·g of the evaluated (EMA) model. f₁ is the exported model's function;
        evaluating it unfolded also checks the fold (the numbers must agree)."""
        return {"f1": _Head(module, "f1"), "f2": _Head(module, "f2")}


@register_method
class AFDLiteral(AFD):
    name = "afd-literal"
    report_row = 130
    paper = "docs/methods.md §14.4 'paper-literal': Algorithm 1 read literally (L1 moves only D2, no double counting)"
    literal = True


@register_method
class VAFTPlusD(AFD):
    name = "vaft+d"
    report_row = 140
    paper = "AFD Table 3 ablation: AFD without the alignment term (γ = 0) (docs/methods.md §14.7)"
    defaults = {**AFD.defaults, "gamma": 0.0}
