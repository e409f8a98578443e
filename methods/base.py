"""The Method interface and registry (DESIGN.md; DomainBed's ``Algorithm.update()`` in spirit).

The engine owns the data, the clock and the disk; a method owns its losses, its attack and its optimiser steps:

* ``defaults``: every hyper-parameter with the paper's value (epochs, batch size, lr, schedule, weight decay,
  attack settings, method weights). Presets and flags override them; the resolved values go into the run record.
* ``__init__(hp, model, teacher, steps_per_epoch)``: builds optimisers (several, if the method needs them), extra
  modules and per-example state.
* ``lr_at(epoch, step)``: the schedule; the engine sets it on every param group of every optimiser before a step.
* ``train_step(batch, epoch, step) -> dict`` of 0-dim tensors to log (summed over the epoch by the engine; keys
  ending in ``_sum`` are divided by the number of images, others by the number of steps). No host syncs.
* ``state_dict()`` / ``load_state_dict()``: everything needed to resume mid-run besides the model weights.
* ``export(module)``: the plain classifier that is evaluated (AFD folds D₁ into ω here).
* ``begin_epoch(epoch)`` / ``end_epoch(epoch) -> dict``: hooks around every epoch (ATAS re-draws its buffer; FGSM-RS
  checks for catastrophic overfitting, may set ``self.stopped`` and restore earlier weights).
* ``before_training(ctx)`` / ``after_training(ctx)``: stages around the epochs (RiFT's MRC and interpolation), given a
  :class:`StageContext` with the training data and a held-out slice of it — never the test split; they keep their
  progress in the method state and call ``ctx.save()`` to checkpoint it, so each stage resumes on its own.
* ``record() -> dict``: what the stages found, saved as ``method.json`` in the run directory.
* ``probe(module)``: the function the feature-gap probe attacks and its (natural, adversarial) feature maps.
* ``eval_heads(module)``: extra classifier heads evaluated at the end (AFD's f₁ / f₂ heads, the paper's Table 4).

Forwards: ``self.net`` is the *training* forward (compiled by ``compile()``, and put in DistributedDataParallel by
``prepare_distributed()`` under data parallelism); ``self.attack_net`` is the forward attacks differentiate w.r.t.
the input (compiled, never DDP-wrapped; compiled, it is :class:`bench.attacks.CompiledAttackForward`: no gradient
reaches a parameter through it, and an eval-mode PGD step is one compiled graph).

Several processes: a method is written for one process and is correct on N through ``self.ctx``, the
:class:`bench.step.StepContext` of the step being run, whose operations are the one-process ones on one process:
``ctx.backward(loss)`` / ``ctx.grad(loss, x)`` / ``ctx.param_grads(...)`` differentiate a batch-mean loss (the base
``ce_step`` does), ``ctx.draw`` makes per-example random draws, ``ctx.scatter_`` writes per-example state,
``ctx.mean`` / ``ctx.sum`` decide on the batch. ``prepare_distributed(wrap)`` (called by the engine under data
parallelism only) puts ``self.net`` in DDP, which sums the gradients ``backward()`` leaves in ``.grad``; a method
whose gradients come from ``ctx.param_grads`` makes it a no-op (AFD). ``self.processes``: how many processes train
the run, for options a method cannot offer on several (AFKD's train-mode teacher).

Registering a name twice is an error. Variants and ablations are separate registered classes that reuse code.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from bench.attacks import CompiledAttackForward, pgd
from bench.errors import BenchError
from bench.loader import Batch
from bench.registry import Registry
from bench.schedules import lr_at
from bench.step import StepContext, current

if TYPE_CHECKING:
    from bench.data import Split

METHODS: Registry[type["Method"]] = Registry("method")

STARTS_FROM = ("scratch", "natural", "adversarial")
EPS = 8 / 255

# hyper-parameters every method has, with the conventional CIFAR values (docs/methods.md §18 "Common")
COMMON_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 5e-4,
    "schedule": {"name": "constant"},
    "eps": EPS,
    "ema": None,  # None, or {"decay": 0.999, "warmup": true}: decay_t = min(decay, (t+1)/(t+10)) when warmup
}


def register_method(cls: type["Method"]) -> type["Method"]:
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} has no name")
    if cls.starts_from not in STARTS_FROM:
        raise ValueError(f"{cls.__name__}.starts_from must be one of {STARTS_FROM}")
    METHODS.add(cls.name, cls, starts_from=cls.starts_from, paper=cls.paper)
    return cls


def match_layouts(opt: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (SGD's momentum buffer) its parameter's memory format: checkpoints
    store tensors contiguous, while a channels_last conv weight keeps channels_last strides, and the fused CUDA SGD
    kernel requires equal strides."""
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


class Method:
    name: ClassVar[str] = ""
    starts_from: ClassVar[str] = "scratch"
    paper: ClassVar[str] = ""  # where the method is specified (docs/methods.md section)
    # the place of the method's rows in the report's tables and figures (bench.report.method_order): the paper's row
    # order, a method it does not have beside its closest one; None: after those, by name. A subclass inherits its
    # method's place (and follows it by name) until it sets its own
    report_row: ClassVar[int | None] = None
    attack_bn: ClassVar[str | None] = None  # BN mode of the training attack, recorded in the run config
    # True: the starting model (pgd-at / natural base run) holds out the same ``holdout_per_class`` images (RiFT)
    base_holdout: ClassVar[bool] = False
    # hyper-parameters added after runs were recorded, at the value those runs had: left out of the run identity at
    # that value, so the recorded runs keep their hashes (another value is in the identity as usual)
    identity_neutral: ClassVar[dict[str, Any]] = {}
    loader_augment: ClassVar[bool] = True  # False: the method gets un-augmented batches and augments itself (ATAS)
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def resolved_defaults(cls) -> dict[str, Any]:
        out = copy.deepcopy(COMMON_DEFAULTS)
        out.update(copy.deepcopy(cls.defaults))
        return out

    @classmethod
    def check_hp(cls, hp: dict[str, Any]) -> None:
        """Raise :class:`BenchError` (one line naming the value and what is accepted) for hyper-parameters this
        method cannot run with; called when a run is planned, before anything trains. Default: nothing beyond the
        generic checks of ``bench.config.validate_hp``."""

    @staticmethod
    def require_int(method: str, hp: dict[str, Any], key: str, low: int) -> int:
        v = hp[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise BenchError(f"{method}.{key} = {v!r}; accepted: an integer ≥ {low}")
        return v

    def __init__(self, hp: dict[str, Any], model: nn.Module, teacher: nn.Module | None = None,
                 steps_per_epoch: int = 1, info: dict[str, Any] | None = None, processes: int = 1,
                 fused: bool | None = None):
        self.hp = hp
        self.processes = int(processes)  # processes training the run (data parallelism: the engine's Dist.world)
        # the training set the engine iterates: n images of shape (C, H, W), num_classes, crop_pad, flip
        self.info = info or {}
        self.stopped = False  # set by a method that ends training early (its current weights are the result)
        self.model = model
        # ``fused`` (default: on a GPU): one fused SGD kernel per step instead of torch's per-tensor updates; the
        # same update up to rounding (tests/test_speed.py). On a CPU the default is torch's for-loop update, with which
        # the CPU records are trained, so that a CPU run is reproduced bit for bit.
        self.fused = any(p.is_cuda for p in model.parameters()) if fused is None else bool(fused)
        self.net: Callable[..., torch.Tensor] = model  # training forward: compile() / prepare_distributed() set it
        self.attack_net: Callable[[torch.Tensor], torch.Tensor] = model  # attacks' forward: compiled at most
        self.compiled = False  # compile() ran: a DDP forward is compiled on top (prepare_distributed)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.steps_per_epoch = steps_per_epoch
        self.optimizers: list[torch.optim.Optimizer] = []
        self.setup()
        # the frozen teacher's features g_P (AFKD, ARREST, AFD: under no_grad, eval mode); compiled at most. Taken
        # after setup(), which may make the teacher (RiFT's θ_AT)
        self.teacher_net: Callable[[torch.Tensor], torch.Tensor] | None = getattr(self.teacher, "features", None)

    # -- construction -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Default: one SGD over all model parameters with the method's momentum and weight decay."""
        self.optimizer = self.sgd(self.model.parameters())
        self.optimizers = [self.optimizer]

    def sgd(self, params) -> torch.optim.SGD:
        hp = self.hp
        return torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                               nesterov=hp["nesterov"], fused=self.fused or None)

    def compile(self, *, reset: bool = True, fused_step: bool = True) -> None:
        """``torch.compile`` the forwards: the training forward ``self.net``, the attacks' forward
        ``self.attack_net`` (:class:`bench.attacks.CompiledAttackForward`: the forward on :class:`ParamsDetached`,
        and each eval-mode PGD step fused into one compiled graph) and the teacher's features ``self.teacher_net``.
        Called by the engine with ``compile = true`` once the method is built; under data parallelism
        :meth:`prepare_distributed` compiles the DDP-wrapped training forward in place of ``self.net``.

        Dynamo's caches are reset first: its compiled code is kept per function (``forward``), not per model,
        guarded on the module's class, BN modes, autocast and the tensors' properties, so runs one process trains
        one after another (``bench run`` of several methods, ``bench perf``) add up recompilations of the same
        ``forward`` until dynamo's recompile limit (8), beyond which it runs that forward eagerly with only a warning
        (several compiled engines in one process reach it). A process trains one method at a
        time; the previous method's graphs are dead. ``reset=False`` keeps them: ``bench perf`` builds a second
        compiled engine beside a live one (``fused_step=False``: the compiled forward with eager PGD steps, the
        fused step's ablation)."""
        import torch._dynamo

        if reset:
            torch._dynamo.reset()
        self.net = torch.compile(self.model)
        self.attack_net = CompiledAttackForward(self.model, fused=fused_step)
        if self.teacher_net is not None:
            self.teacher_net = torch.compile(self.teacher.features)
        self.compiled = True

    def prepare_distributed(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Under data parallelism (never called on one process): the engine calls it once before the first epoch,
        after the stage before training (which may choose the parameters that train: RiFT), with ``wrap``, which
        puts a module in DistributedDataParallel summing the gradients over processes (:meth:`bench.dist.Dist.wrap`).
        Default: the training forward ``self.net`` becomes the wrapped model (compiled on top when the method was
        compiled), so that ``backward()`` through it leaves the global-batch gradients in ``.grad``. A method that
        takes its gradients with ``self.ctx.param_grads`` (summed there) overrides it with a no-op."""
        net = wrap(self.model)
        self.net = torch.compile(net) if self.compiled else net

    # -- schedule -----------------------------------------------------------------------------------------------
    def lr_at(self, epoch: int, step: int) -> float:
        return lr_at(self.hp["lr"], self.hp["schedule"], epoch, step, self.steps_per_epoch, self.hp["epochs"])

    def set_lr(self, lr: float) -> None:
        """The lr of every optimiser (and, under a ``cyclic`` schedule with ``momentum``, the momentum that cycles
        inversely to it, as torch's ``CyclicLR`` does in Wong et al.'s code)."""
        from bench.schedules import cyclic_momentum

        mom = cyclic_momentum(self.hp.get("schedule"), lr, self.hp["lr"])
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr
                if mom is not None:
                    g["momentum"] = mom

    # -- training -----------------------------------------------------------------------------------------------
    @property
    def ctx(self) -> StepContext:
        """The :class:`bench.step.StepContext` of the training step being run (the engine opens one around every
        ``train_step``); outside a step the one-process context."""
        return current()

    def train_step(self, batch: Batch, epoch: int, step: int) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> None:
        """Hook called before the first step of every epoch (e.g. to re-draw per-example state)."""

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Hook called after the last step of every epoch, before the checkpoint; returns extra metrics to log."""
        return {}

    def before_training(self, ctx: "StageContext") -> None:
        """A stage before the first epoch (runs on every start; skip what the method state says is done)."""

    def after_training(self, ctx: "StageContext") -> None:
        """A stage after the last epoch (runs on every start once the epochs are done)."""

    def record(self) -> dict[str, Any]:
        """What the method's stages found, written to the run's ``method.json`` (RiFT: every module's MRC, the
        chosen module, the α curve); default nothing."""
        return {}

    def pgd_attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The method's training PGD: ``attack_steps`` steps of ``attack_step`` in the ε-ball, U(−ε, ε) start
        (not clipped, as the AFD/TRADES code), CE on ``self.net``, model in the method's ``attack_bn`` mode."""
        hp = self.hp
        return pgd(self.model, x, y, eps=hp["eps"], step=hp["attack_step"], steps=hp["attack_steps"],
                   random_start=True, bn=self.attack_bn or "eval", forward=self.attack_net)

    @staticmethod
    def ce_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One optimiser step on the batch-mean ``loss`` (the global batch's under data parallelism)."""
        opt.zero_grad(set_to_none=True)
        current().backward(loss)
        opt.step()

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers], "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stopped = bool(state.get("stopped", False))
        opts = state.get("optimizers", [])
        if len(opts) != len(self.optimizers):
            raise BenchError(f"checkpoint holds {len(opts)} optimiser states; method {self.name} has "
                             f"{len(self.optimizers)}")
        for o, s in zip(self.optimizers, opts):
            # how this process steps (fused / foreach) is its own choice, never the checkpoint's: a GPU checkpoint
            # resumed on a CPU would otherwise leave the bit-identical CPU path
            own = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in o.param_groups]
            o.load_state_dict(s)
            for g, keep in zip(o.param_groups, own):
                g.update(keep)
            match_layouts(o)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def export(self, module: nn.Module | None = None) -> nn.Module:
        """The plain classifier to evaluate (a copy of ``module``, default the trained model)."""
        return copy.deepcopy(module if module is not None else self.model)

    def probe(self, module: nn.Module) -> tuple[Callable, Callable, Callable]:
        """(forward attacked, φ_nat, φ_adv) of the feature-gap probe: the gap is ‖φ_nat(x) − φ_adv(x′)‖_∞ with x′
        the PGD-20 example of the forward. Default: the module and its own features g on both sides (AFD Fig. 1a
        for the baselines)."""
        return module, module.features, module.features

    def tsne_features(self, module: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Feature maps whose t-SNE of PGD-20 examples is recorded in ``tsne.json`` (AFD Fig. 3); default none."""
        return {}

    def eval_heads(self, module: nn.Module) -> dict[str, nn.Module]:
        """Extra heads evaluated (clean, PGD-20) on the final model besides the exported classifier; default none."""
        return {}


@dataclass
class StageContext:
    """What a stage before or after the epochs may use: the training images the engine trains on (``train``), the
    held-out slice of the training split (``heldout``, ``holdout_per_class`` images of every class, never trained
    on), the device, the seed, a logger and ``save()`` to checkpoint progress. It holds no test data."""

    train: "Split"
    heldout: "Split | None"
    device: torch.device
    seed: int
    echo: Callable[[str], None]
    save: Callable[[], None]
    progress: bool = False


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)
