"""The step context: what a training step uses of the run it belongs to, so that a method written for one process is
correct on N processes without knowing how many there are.

A method reaches the context of the step being run as ``self.ctx`` (:class:`methods.base.Method`); the engine opens
one around every ``train_step`` (``with dist.step(batch.shard)``, :meth:`bench.dist.Dist.step`), and library code
(the attacks' random starts and input gradients) reads the same one through :func:`current`. Every operation is
phrased as the one-process operation it stands for, and on one process — or outside a training step — it *is* that
operation (the same tensors, bit for bit). Under data parallelism (:mod:`bench.dist`: each process holds its shard of
the global batch) it does what makes the step the one-process step on the global batch:

* **losses**: every loss that is differentiated is *seeded* with this process's share of the global batch
  (:meth:`StepContext.seed`, :meth:`~StepContext.backward`, :meth:`~StepContext.grad`): summed over processes, the
  gradients — of the parameters, of the inputs, through synchronised BatchNorm — are the global-batch gradients;
* **parameter gradients** taken with ``torch.autograd.grad`` (:meth:`~StepContext.param_grads`, AFD) are summed
  over processes; those that ``backward()`` leaves in ``.grad`` are summed by the DistributedDataParallel forward
  the method sets up in :meth:`methods.base.Method.prepare_distributed`;
* **per-example draws** (:meth:`~StepContext.draw`) are made for the whole global batch, identically everywhere,
  and each process keeps its rows, so every example gets the numbers it gets on one process;
* **per-example state** (:meth:`~StepContext.scatter_`, :meth:`~StepContext.gather`): every process writes the
  rows of the whole global batch, so the state stays whole and equal on every process;
* **decisions on the batch** (:meth:`~StepContext.mean`, :meth:`~StepContext.sum`,
  :meth:`~StepContext.loss_mean`): computed over the global batch, so every process takes the same one.
"""
from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from .dist import Dist, Shard


class StepContext:
    """One training step's place in the run: the process group (``dist``) and this process's rows of the global
    batch (``shard``; None: the whole batch). Used as a context manager it is the step being run (:func:`current`).
    ``StepContext()`` (:data:`ONE`) is the one-process step."""

    def __init__(self, dist: "Dist | None" = None, shard: "Shard | None" = None):
        self.dist, self.shard = dist, shard
        self._tokens: list[contextvars.Token] = []

    def __repr__(self) -> str:
        return f"StepContext({self.dist!r}, {self.shard!r})"

    def __enter__(self) -> "StepContext":
        self._tokens.append(_CURRENT.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _CURRENT.reset(self._tokens.pop())

    # -- where this process's rows are -------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """True when this process holds only part of the global batch."""
        s = self.shard
        return s is not None and not (s.lo == 0 and s.hi == s.total)

    @property
    def _parallel(self) -> bool:  # several processes: the collectives run
        return self.dist is not None and self.dist.enabled

    @property
    def share(self) -> float:
        """This process's share of the global batch (1 on one process): the weight of its batch-mean losses."""
        return self.shard.share if self._parallel and self.shard is not None else 1.0

    def total(self, n: int) -> int:
        """The size of the global batch of which this process holds ``n`` rows (``n`` on one process)."""
        return self.shard.total if self.shard is not None else n

    def rows(self, n: int) -> slice:
        """This process's positions in the global batch, for a local batch of ``n`` rows (``0:n`` on one process)."""
        return self.shard.rows if self.shard is not None else slice(0, n)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This process's rows of ``t``, a tensor with one row per example of the global batch."""
        return t[self.shard.rows] if self.shard is not None else t

    # -- losses and gradients ----------------------------------------------------------------------------------
    def seed(self, loss: torch.Tensor) -> torch.Tensor:
        """A batch-mean loss about to be differentiated: times this process's share of the global batch when the
        batch is sharded (so that the gradients summed over processes are the global-batch gradients), else
        ``loss`` itself."""
        return loss * self.shard.share if self.sharded else loss

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` of a batch-mean loss: the parameters' ``.grad`` (summed over processes by the
        method's DDP forward) and the inputs' gradients are those of the global batch."""
        self.seed(loss).backward()

    def grad(self, loss: torch.Tensor, inputs, **kwargs) -> tuple[torch.Tensor, ...]:
        """``torch.autograd.grad`` of a batch-mean loss w.r.t. per-example tensors (inputs, perturbations): this
        process's rows of the global batch's input gradient. ``kwargs`` go to ``torch.autograd.grad``."""
        return torch.autograd.grad(self.seed(loss), inputs, **kwargs)

    def param_grads(self, *terms: tuple[torch.Tensor, Sequence[torch.nn.Parameter]]
                    ) -> list[list[torch.Tensor | None]]:
        """The gradients of several batch-mean losses, each w.r.t. its own parameters, all from the graph as it
        stands (``terms``: (loss, parameters) pairs; the graph is kept): for each term, one gradient per parameter,
        ``None`` where the loss does not depend on it at all. They are the global-batch gradients, summed over
        processes in one all-reduce."""
        out = [list(torch.autograd.grad(self.seed(loss), list(params), retain_graph=True, allow_unused=True))
               for loss, params in terms]
        self.reduce_grads_([g for grads in out for g in grads])
        return out

    def reduce_grads_(self, grads: Sequence[torch.Tensor | None]) -> None:
        """In place: every gradient of seeded losses becomes the sum over processes (``None`` entries are left
        alone); nothing on one process."""
        if self._parallel:
            self.dist.reduce_grads_(grads)

    # -- per-example draws and state ---------------------------------------------------------------------------
    def draw(self, draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
        """A per-example random draw for the ``n`` examples of the local batch: ``draw(m)`` returns a tensor whose
        first dimension is m. On a shard it is made for the whole global batch (the same on every process: same RNG
        state) and this process's rows are returned, so every example gets the numbers it gets on one process."""
        if not self.sharded:
            return draw(n)
        s = self.shard
        if n != s.size:
            raise RuntimeError(f"per-example draw for {n} examples inside a training step whose shard has {s.size} "
                               "rows; draw for the whole local batch")
        return draw(s.total)[s.lo:s.hi]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of the whole global batch (``total``, ...) from every process's rows of it (``t``: this
        process's); ``t`` itself on one process."""
        if not self._parallel or self.shard is None:
            return t
        return self.dist.gather_rows(t, self.shard)

    def scatter_(self, buf: torch.Tensor, index, values: torch.Tensor) -> None:
        """``buf[index] = values`` for per-example state: ``index`` addresses the examples of the whole global batch
        (``batch.all_idx``, or positions), ``values`` are this process's rows; every process writes the rows of
        every process, so ``buf`` stays whole and equal everywhere."""
        buf[index] = self.gather(values)

    # -- decisions on the global batch -------------------------------------------------------------------------
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the global batch of a quantity whose local value is a sum over this process's rows."""
        return self.dist.all_sum(t) if self._parallel else t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The global-batch mean of a quantity whose local value is a mean over this process's rows."""
        if not self._parallel:
            return t
        if self.shard is None:
            raise RuntimeError("StepContext.mean on several processes without a shard: use the step's context")
        return self.dist.all_sum(t * self.shard.share)

    def loss_mean(self, local_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """This process's term of the loss Σ/count, a sum over the global batch (``local_sum``: this process's part
        of Σ; ``count``: of the whole global batch, :meth:`sum`), to be seeded like any batch-mean loss: the seeded
        terms of all processes add up to Σ/count. ``local_sum / count`` on one process."""
        return local_sum / (count * self.share)


ONE = StepContext()

_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("bench_step", default=None)


def current() -> StepContext:
    """The context of the training step being run, or :data:`ONE` outside a step."""
    c = _CURRENT.get()
    return ONE if c is None else c


def per_example(draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
    """:meth:`StepContext.draw` of the step being run (library code: attacks' random starts)."""
    return current().draw(draw, n)


def seed_loss(loss: torch.Tensor) -> torch.Tensor:
    """:meth:`StepContext.seed` of the step being run (library code: attacks' input gradients)."""
    return current().seed(loss)


__all__ = ["ONE", "StepContext", "current", "per_example", "seed_loss"]
