"""Data-parallel training of one run over several processes: PyTorch's DistributedDataParallel, launched by
``torchrun`` (``torchrun --nproc_per_node N -m bench run ...``, or ``bench run --nproc N``, which starts torchrun), by
submitit on a Slurm cluster, or by anything else that sets the ``torch.distributed`` environment variables.

The contract: **a run on N processes is the run on one process with the same global batch**, up to floating-point
rounding, so that a DDP run keeps the run's identity (its hash), its records are comparable with single-GPU runs,
and it resumes on any number of processes. What that takes, and where it lives:

* **Data** (``bench.loader``): every rank draws the same epoch permutation and the same augmentation numbers for the
  *whole* global batch and keeps its own rows of it (an even split, :meth:`Dist.shard`); each epoch, a rank copies
  only its shard of the training split to its device.
* **Inside a training step** the engine opens the step's context (:meth:`Dist.step`, a
  :class:`bench.step.StepContext`), through which methods and the attacks do everything that couples the ranks:
  per-example draws made for the global batch (PGD's random start, TRADES' Gaussian start, ATAS's crops), losses
  *seeded* with the rank's share of the global batch (a batch-mean loss over ``size`` rows times ``size / total``)
  before they are differentiated, per-example state written for the whole global batch, decisions taken on it.
  Outside a step (evaluation, probes) nothing changes.
* **Gradients**: parameter gradients of seeded losses are *summed* over ranks. Then every gradient — of the
  parameters, of the input (attacks), through synchronised BN, whose statistics couple the ranks — is the
  single-process one, also for uneven shards (weighting the reduced gradients instead would be wrong there: sync
  BN's backward mixes every rank's loss into every rank's gradient). A method whose update is ``loss.backward()``
  trains through ``self.net``, which its ``prepare_distributed`` puts in ``DistributedDataParallel`` with a summing
  communication hook (:meth:`Dist.wrap`); one that takes its gradients with ``torch.autograd.grad`` (AFD's three
  steps) gets them summed by the step context (:meth:`Dist.reduce_grads_`). A check after every epoch
  (:meth:`Dist.check_same`) stops a run whose parameters differ between ranks — the sign of a gradient that was
  never reduced.
* **BatchNorm**: with ``sync_bn`` (the default under DDP) every BN layer is replaced by :class:`SyncBatchNorm`, which
  normalises with the statistics of the global batch (forward and backward), exactly like one BN on one process.
  ``--no-sync-bn`` keeps per-rank statistics (faster, what most DDP codebases do); that changes the trained weights,
  so it becomes part of the run's identity (``RunConfig.bn_ranks``).
* **Per-example state** (ATAS's perturbation buffer, Free-AT's δ): kept whole on every rank; after each step the
  rows a rank updated are gathered (:meth:`Dist.gather_rows`) and written on every rank.
* **Scalars** (train accuracy, losses, NaN guard, ARREST's replay decision, FGSM-RS's early stop): reduced with the
  same batch-share weights (:meth:`Dist.all_sum`).

Only rank 0 writes records and checkpoints; decisions that depend on files are rank 0's (:meth:`Dist.agree`).
Evaluation shards the test set by attack batch (PGD-20) or chunk (AutoAttack) and gathers per-point results.

:data:`SINGLE` (world size 1) makes every one of these a no-op, so single-process runs are bit for bit as before.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import BenchError
from .precision import wide
from .step import StepContext, per_example, seed_loss  # noqa: F401 - the step's draws and seeding, for library code


@dataclass(frozen=True)
class Shard:
    """This rank's rows ``[lo, hi)`` of a global batch of ``total`` images."""

    total: int
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo

    @property
    def share(self) -> float:
        """This rank's share of the global batch: the weight of its batch-mean losses and gradients."""
        return self.size / self.total if self.total else 0.0

    @property
    def rows(self) -> slice:
        return slice(self.lo, self.hi)


def even_shard(total: int, rank: int, world: int) -> Shard:
    """Rank ``rank``'s part of ``total`` rows split as evenly as possible (the first ``total % world`` ranks get one
    more)."""
    base, extra = divmod(total, world)
    lo = rank * base + min(rank, extra)
    return Shard(total, lo, lo + base + (1 if rank < extra else 0))


def rows_like(x: torch.Tensor, m: int) -> torch.Tensor:
    """An uninitialised tensor of ``m`` rows shaped, typed and laid out (memory format) like ``x``, so that an
    in-place random fill draws what ``torch.*_like(x)`` would (for m = len(x))."""
    fmt = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.empty((m, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)


def _world_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def launched_distributed() -> bool:
    """True inside a process started by torchrun (or submitit's distributed environment) with WORLD_SIZE > 1."""
    return _world_env()[1] > 1


class Dist:
    """The process group of one run (rank, world size, device) and the collectives the suite uses; with
    ``world == 1`` (:data:`SINGLE`) every method is a cheap no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, sync_bn: bool = True):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.sync_bn = bool(sync_bn)

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world})"

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "auto", sync_bn: bool = True, timeout_min: float | None = None) -> "Dist":
        """Join the process group that torchrun / submitit described in the environment (``RANK``,
        ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); NCCL when this rank trains on a GPU, gloo
        on CPUs. Without WORLD_SIZE > 1: :data:`SINGLE`. ``timeout_min``: how long a collective may wait for the
        other ranks (default ``$AFT_BENCH_DIST_TIMEOUT_MIN`` or 120: one AutoAttack chunk of a large model, which
        the idle ranks of the last round wait for, fits)."""
        rank, world, local = _world_env()
        if world <= 1:
            return SINGLE
        import torch.distributed as dist

        dev = rank_device(device, local)
        if timeout_min is None:
            timeout_min = float(os.environ.get("AFT_BENCH_DIST_TIMEOUT_MIN", 120))
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=timeout_min))
        if dev.type != "cuda":  # torchrun sets OMP_NUM_THREADS=1; share the cores between the local ranks instead
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
        return cls(dist.get_rank(), dist.get_world_size(), local, sync_bn=sync_bn)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # -- batches ------------------------------------------------------------------------------------------------
    def shard(self, total: int) -> Shard:
        return even_shard(total, self.rank, self.world)

    def step(self, shard: Shard | None) -> StepContext:
        """The context of one training step on ``shard`` (a context manager: the step being run while open); see
        :mod:`bench.step`."""
        return StepContext(self, shard)

    # -- gradients ----------------------------------------------------------------------------------------------
    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel whose communication hook sums the (seeded) gradients over ranks
        (``module`` itself when single-process). Buffers are not broadcast at each forward: with sync BN they are
        equal on every rank anyway, without it they stay rank-local (rank 0's are saved)."""
        if not self.enabled:
            return module
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        kw: dict[str, Any] = {}
        params = inspect.signature(DDP).parameters
        if "forward_sync_buffers" in params:  # torch ≥ 2.14 renamed broadcast_buffers
            kw["forward_sync_buffers"] = False
        else:
            kw["broadcast_buffers"] = False
        dev = next(module.parameters()).device
        if dev.type == "cuda":
            kw["device_ids"] = [dev.index]
        with _quiet_deprecations():
            ddp = DDP(module, **kw)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp

    def reduce_grads_(self, grads: Sequence[torch.Tensor | None]) -> None:
        """In place: every gradient (of losses seeded with :func:`seed_loss`) becomes the global-batch gradient, the
        sum over ranks (one all-reduce for all of them). ``None`` entries (a loss that does not reach that parameter)
        are left alone; they are the same on every rank."""
        if not self.enabled:
            return
        import torch.distributed as dist

        live = [g for g in grads if g is not None]
        if not live:
            return
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in live) else torch.float32
        flat = torch.cat([wide(g.reshape(-1)).to(dtype) for g in live])  # fp64 gradients stay fp64
        dist.all_reduce(flat)
        i = 0
        for g in live:
            n = g.numel()
            g.copy_(flat[i:i + n].view_as(g))
            i += n

    # -- scalars and rows ---------------------------------------------------------------------------------------
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
        return t

    def all_min(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def gather_rows(self, t: torch.Tensor, s: Shard) -> torch.Tensor:
        """The rows of the whole global batch (``total``, ...) from every rank's rows of it (``size``, ...)."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        width = -(-s.total // self.world)
        pad = t.new_zeros((width, *t.shape[1:]))
        pad[:t.shape[0]] = t
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad.contiguous())
        return torch.cat([p[:even_shard(s.total, r, self.world).size] for r, p in enumerate(parts)])

    def agree(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (decisions that depend on files only rank 0 writes)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def main_only(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on rank 0 only (a write, taking a lock) and tell every rank how it went: if it raised, every
        rank raises (a BenchError naming ``what``), so that no rank waits for a rank 0 that has stopped. Returns
        ``fn``'s result on rank 0, None elsewhere."""
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
                error = e
        message = self.agree(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise BenchError(f"rank 0 failed in {what}: {message}")
        return result

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def check_same(self, module: nn.Module, what: str) -> None:
        """Raise if ``module``'s parameters (and, with sync BN, its float buffers) differ between ranks: the sign of
        a gradient that was not reduced, or of rank-local randomness. Cheap: two float64 checksums per rank."""
        if not self.enabled:
            return
        with torch.no_grad():
            vals = [p.detach().double() for p in module.parameters()]
            if self.sync_bn:
                vals += [b.detach().double() for b in module.buffers() if b.dtype.is_floating_point]
            local = torch.stack([sum(v.sum() for v in vals), sum(v.abs().sum() for v in vals)]).cpu()
        rows = self.gather_objects(local.tolist())
        ref = rows[0]
        for r, row in enumerate(rows[1:], 1):
            if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(row, ref)):
                raise BenchError(f"{what}: the parameters of rank {r} differ from rank 0's after an epoch "
                                 f"(checksums {row} vs {ref}): a gradient was not reduced across ranks")


SINGLE = Dist()


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the backward of a sum is the sum of the gradients (itself differentiable, so
    double backward works). ``torch.distributed.nn.functional.all_reduce`` does the same and is deprecated."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of ``t``, differentiable."""
    return _AllReduceSum.apply(t)


def _sum_hook(state: Any, bucket):
    """DDP communication hook: the sum over ranks of the gradients (of seeded losses: :func:`seed_loss`), where
    DDP's default divides by the world size."""
    import torch.distributed as dist

    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def rank_device(requested: str | None, local_rank: int, local_world: int | None = None) -> torch.device:
    """The device of a local rank: ``auto`` / ``cuda`` → ``cuda:<local rank>`` when a GPU is visible, else the CPU;
    an explicit ``cuda:N`` on one process only. ``local_world``: the processes on this machine (default
    ``$LOCAL_WORLD_SIZE``). More local processes than visible GPUs (an external ``torchrun --nproc-per-node``) would
    put two ranks on one GPU: refused."""
    name = (requested or "auto").lower()
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            if local_world is None:
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
            if local_rank >= n or local_world > n:
                raise BenchError(f"{max(local_world, local_rank + 1)} processes on this machine (local rank "
                                 f"{local_rank}) but {n} GPU(s) visible: ranks would share a GPU; accepted: at most "
                                 f"{n} processes per machine (torchrun --nproc-per-node {n}), or --device cpu")
            return torch.device("cuda", local_rank)
        if name == "cuda":
            raise BenchError("--device cuda: no CUDA GPU is visible here; accepted: cpu or auto")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    raise BenchError(f"--device {requested} with several processes; accepted: auto, cuda (one GPU per local rank) "
                     "or cpu")


def check_bf16(device: torch.device | str, precision: str = "bf16") -> None:
    """Refuse ``--precision bf16`` on a CUDA GPU without native bf16 (compute capability below 8.0: pre-Ampere),
    where torch would emulate it, slower than fp32 and not what a bf16 record claims. ROCm GPUs and the CPU pass
    (a CPU's bf16 is oneDNN's concern: ``bench perf`` checks it)."""
    device = torch.device(device)
    if precision != "bf16" or device.type != "cuda" or torch.version.hip:
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise BenchError(f"--precision bf16 on {device} ({torch.cuda.get_device_name(device)}, compute capability "
                         f"{major}.{minor}): no native bf16, which needs compute capability 8.0 or later (Ampere); "
                         "accepted: --precision fp32 or fp64 on this GPU")


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm over the global batch


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch over all ranks; identical to the
    BN it replaces (same parameters, buffers and state-dict keys) in eval mode and on one process.

    torch's own ``nn.SyncBatchNorm`` refuses CPU tensors (so it cannot run under gloo, where the CI tests DDP) and
    has no double backward (FGSM-GA's GradAlign differentiates through the input gradient); this one is plain
    autograd over one differentiable all-reduce per forward (each rank's count, mean and M2 in its own slot,
    combined with Chan et al.'s parallel formula), so forward, backward and double backward equal the full-batch
    BN's up to rounding."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not (use_batch and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        world, rank = dist.get_world_size(), dist.get_rank()
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = wide(x)
        n_local = x.numel() // c
        mean_l = xf.mean(dims) if n_local else xf.new_zeros(c)
        m2_l = ((xf - mean_l.view(1, c, *[1] * (x.dim() - 2))) ** 2).sum(dims) if n_local else xf.new_zeros(c)
        # this rank's row among zero rows: made on the device (no tensor from host data, so no copy or sync)
        row = torch.cat([mean_l, m2_l, xf.new_full((1,), float(n_local))])[None]
        slot = torch.cat([xf.new_zeros(rank, 2 * c + 1), row, xf.new_zeros(world - 1 - rank, 2 * c + 1)])
        allv = all_reduce_sum(slot)
        counts = allv[:, -1].detach()
        n = counts.sum()
        means, m2s = allv[:, :c], allv[:, c:2 * c]
        mean = (counts[:, None] * means).sum(0) / n
        m2 = (m2s + counts[:, None] * (means - mean) ** 2).sum(0)
        var = m2 / n
        shape = (1, c, *[1] * (x.dim() - 2))
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                # decided on the device (a host ``if`` on n would sync, and break the compiled graph per layer)
                unbiased = torch.where(n > 1, var.detach() * (n / (n - 1)), var.detach())
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y.to(x.dtype)


def _swap_bn(module: nn.Module, match: Callable[[nn.Module], bool], make: Callable[..., nn.Module]) -> nn.Module:
    """Replace, in place, every child module that ``match``es by ``make(...)`` with its BN settings, parameters,
    buffers, device and mode."""
    for name, child in list(module.named_children()):
        if match(child):
            floats = [t for t in (*child.parameters(), *child.buffers()) if t.is_floating_point()]
            place = dict(device=floats[0].device, dtype=floats[0].dtype) if floats else {}  # (fp64 stays fp64)
            new = make(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                       **place)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            _swap_bn(child, match, make)
    return module


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm of ``module`` in place by :class:`SyncBatchNorm` with the same parameters and
    buffers (so the state dict is unchanged); returns ``module``."""
    return _swap_bn(module, lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and not isinstance(m, SyncBatchNorm), SyncBatchNorm)


def restore_bn(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert_sync_bn` for export: plain ``BatchNorm2d`` (the suite's models use 2-D BN
    only)."""
    return _swap_bn(module, lambda m: isinstance(m, SyncBatchNorm), nn.BatchNorm2d)


# ---------------------------------------------------------------------------------------------------------------
# launching


def without_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def check_nproc(nproc: int, device: str | None) -> str:
    """Validate ``--nproc`` against the visible GPUs; returns the backend the processes will use."""
    dev = (device or "auto").lower()
    if dev not in ("auto", "cuda", "cpu"):
        raise BenchError(f"--device {device} with --nproc {nproc}; accepted: auto or cuda (one GPU per process) or "
                         "cpu")
    if dev != "cpu" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if nproc > n:
            raise BenchError(f"--nproc {nproc}: only {n} GPU(s) are visible; accepted: at most {n} (one GPU per "
                             "process), or --device cpu")
        return "nccl"
    if dev == "cuda":
        raise BenchError("--device cuda: no CUDA GPU is visible here; accepted: cpu or auto")
    return "gloo"


def torchrun(nproc: int, argv: Sequence[str], device: str | None = "auto") -> int:
    """Run ``bench <argv>`` (``--nproc`` removed) in ``nproc`` processes on this machine under torchrun
    (``python -m torch.distributed.run --standalone``); returns its exit code."""
    import subprocess
    import sys

    backend = check_nproc(nproc, device)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "bench",
           *without_option(argv, "--nproc")]
    print(f"bench: {nproc} processes ({backend}) under torchrun", file=sys.stderr, flush=True)
    return subprocess.call(cmd)
