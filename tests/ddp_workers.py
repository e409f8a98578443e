"""What each process of the 2-process gloo groups of ``test_ddp.py`` runs (spawned processes import this module by
name). Every worker saves what it computed to ``<out>/rank<r>.pt``; the test compares it with one process."""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, out: Path, *args) -> list[dict]:
    """Run ``fn(dist, out, *args)`` in ``world`` gloo processes; returns what each rank saved."""
    import torch.multiprocessing as mp

    port = free_port()
    Path(out).mkdir(parents=True, exist_ok=True)
    mp.start_processes(_entry, args=(fn, world, port, str(out), args), nprocs=world, start_method="spawn",
                       join=True)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank: int, fn, world: int, port: int, out: str, args: tuple) -> None:
    import torch.distributed as dist

    from bench.dist import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(Dist(rank, world), Path(out), *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------


def bn_inputs(total: int):
    torch.manual_seed(0)
    x = torch.randn(total, 3, 5, 5) * 3 + 2
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return x, bn


def bn_objective(y: torch.Tensor) -> torch.Tensor:
    return (y ** 3).mean()


def bn_worker(d, out, total: int) -> dict:
    """SyncBatchNorm on this rank's rows: output, input gradient (and its double backward), parameter gradients
    (of the share-seeded objective), running statistics."""
    from bench.dist import SyncBatchNorm, seed_loss

    x, bn = bn_inputs(total)
    s = d.shard(total)
    sbn = SyncBatchNorm(3)
    sbn.load_state_dict(bn.state_dict())
    xl = x[s.rows].clone().requires_grad_(True)
    with d.step(s):
        y = sbn(xl)
        (g,) = torch.autograd.grad(seed_loss(bn_objective(y)), xl, create_graph=True)
        g.pow(2).sum().backward()
    return {"rows": (s.lo, s.hi), "y": y.detach(), "g": g.detach(), "gg": xl.grad, "wgrad": sbn.weight.grad,
            "bgrad": sbn.bias.grad, "running_mean": sbn.running_mean, "running_var": sbn.running_var}


def step_setup(name: str, d, total: int, dtype: torch.dtype = torch.float64, arch: str = "smallcnn"):
    """A smallcnn (sync BN under DDP), the method ``name`` on it, and a fixed batch of ``total`` random images, in
    ``dtype``: float64 by default, so that a step on 2 ranks equals one process's to ~1e-15 on any CPU (in fp32
    the sign of an attack's gradient turns a reduction order into a flipped pixel of δ, and the gap into chance)."""
    from bench.dist import convert_sync_bn
    from bench.loader import Batch
    from bench.models import create_model
    from methods import get_method

    torch.manual_seed(0)
    model = create_model(arch, 10).to(dtype)
    teacher = copy.deepcopy(model) if get_method(name).starts_from != "scratch" else None
    x = torch.rand(total, 3, 32, 32).to(dtype)
    y = torch.randint(0, 10, (total,))
    if d.enabled:
        convert_sync_bn(model)
    cls = get_method(name)
    hp = cls.resolved_defaults()
    hp.update(batch_size=total, lr=0.05)
    if "attack_steps" in hp:
        hp["attack_steps"] = 2
    method = cls(hp, model, teacher, steps_per_epoch=1, info={"n": total, "shape": (3, 32, 32)}, processes=d.world)
    if d.enabled:
        s = d.shard(total)
        batch = Batch(x[s.rows], y[s.rows], torch.arange(total)[s.rows], shard=s, global_idx=torch.arange(total))
    else:
        batch = Batch(x, y, torch.arange(total))
    return method, batch


def step_worker(d, out, names: list[str], total: int, controls: bool = False, arch: str = "smallcnn") -> dict:
    """One training step of each method of ``names`` on this rank's rows of a fixed batch, set up as the engine sets
    it up (``prepare_distributed``, the step context). ``controls``: the same step with the reduction left out — the
    method's prepare_distributed not called (no DDP forward) and the step context's gradient sum skipped (AFD's) —
    which must not give the one-process step (so the equality test can fail)."""
    result = {}
    for name in names:
        method, batch = step_setup(name, d, total, arch=arch)
        ctx = d.step(batch.shard)
        if controls:
            ctx.reduce_grads_ = lambda grads: None
        else:
            method.prepare_distributed(d.wrap)
        torch.manual_seed(1)  # the global RNG of the step (PGD's random start), the same on every rank
        with ctx:
            method.train_step(batch, 0, 0)
        result[name] = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
    return result


def single_step(name: str, total: int, arch: str = "smallcnn") -> dict:
    from bench.dist import SINGLE

    method, batch = step_setup(name, SINGLE, total, arch=arch)
    torch.manual_seed(1)
    method.train_step(batch, 0, 0)
    return {k: v.detach().clone() for k, v in method.model.state_dict().items()}


def eval_setup():
    from bench.data import load_dataset
    from bench.models import create_model

    torch.manual_seed(3)
    model = create_model("smallcnn", 10)
    return model, load_dataset("synthetic").test


def eval_worker(d, out, attacks: list[str], n: int, state_dir: str) -> dict:
    from bench.evaluate import evaluate

    model, test = eval_setup()
    return evaluate(model, test, attacks, n=n, batch_size=8, aa_chunk=4, state_dir=state_dir, progress=False,
                    dist=d)


def check_same_worker(d, out, perturb: bool) -> dict:
    from bench.errors import BenchError
    from bench.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn", 10)
    if perturb and d.rank == 1:
        with torch.no_grad():
            model.fc.bias.add_(1e-3)
    try:
        d.check_same(model, "test")
        return {"raised": None}
    except BenchError as e:
        return {"raised": str(e)}



def gradalign_inputs(zero_rows):
    torch.manual_seed(0)
    g1, g2 = torch.randn(7, 3, 4, 4), torch.randn(7, 3, 4, 4)
    g1[list(zero_rows)] = 0
    return g1, g2


def gradalign_worker(d, out, zero_rows) -> dict:
    """GradAlign's regulariser on this rank's rows (some gradients zero): its share-weighted value and the
    gradient it sends into g₂."""
    from methods.fgsm_ga import gradalign_reg

    g1, g2 = gradalign_inputs(zero_rows)
    s = d.shard(7)
    g2l = g2[s.rows].clone().requires_grad_(True)
    with d.step(s) as ctx:
        reg = gradalign_reg(g1[s.rows], g2l, ctx)
        ctx.backward(reg)
    return {"weighted": float(reg.detach()) * s.share, "grad": g2l.grad}


def rank0_write_fails_worker(d, out) -> dict:
    """A training run whose rank 0 cannot write metrics.jsonl (a full disk): every rank must stop with an error at
    once, none may wait at the next collective for a rank 0 that has stopped."""
    from bench.data import load_dataset
    from bench.engine import Trainer
    from bench.records import RunDir
    from bench.runner import RunRequest, plan

    req = RunRequest(preset="smoke", methods=["natural"], subset=8, epochs=1, attacks="clean", eval_n=16, probe_n=8,
                     device="cpu", results_dir=str(out / "results"), batch_size=40, world_size=d.world)
    cfg = plan(req)[0].cfg
    if d.rank == 0:
        def full(*a, **k):
            raise OSError("No space left on device")
        RunDir.write_metrics = full
    t = Trainer(cfg, load_dataset("synthetic"), RunDir(out / f"run-{d.rank}"), progress=False, echo=lambda s: None,
                dist=d)
    try:
        t.train()
        return {"raised": None}
    except Exception as e:  # noqa: BLE001 - the test looks at what each rank raised
        return {"raised": f"{type(e).__name__}: {e}"}
