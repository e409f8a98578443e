"""What every comparison shares: the model, the batch, the summary of an update and its comparison."""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "fidelity"
EQUAL = 1e-10  # "equal": at most this relative difference in float64
N_ENTRIES = 256  # fixed entries of the concatenated parameter delta kept in a fixture


def model(seed: int = 0, arch: str = "smallcnn", num_classes: int = 10) -> nn.Module:
    """The suite's ``arch`` in float64, initialised from ``seed``, with non-trivial BN running statistics."""
    from bench.models import create_model

    torch.manual_seed(seed)
    m = create_model(arch, num_classes).double()
    m.train()
    with torch.no_grad():
        m(torch.rand(32, 3, 32, 32, dtype=torch.float64))
    return m


def batch(seed: int, n: int = 16, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """n float64 images in [0, 1] with saturated regions (rows of exact 0 and exact 1, as real photographs have),
    and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64)
    x[:, :, :4] = 0.0
    x[:, :, 4:8] = 1.0
    return x, torch.randint(0, num_classes, (n,), generator=g)


def load_official(checkout: str | Path, relpath: str, name: str):
    """Import ``relpath`` of an official checkout as module ``name`` (its directory first on sys.path, so its own
    imports resolve), with ``Tensor.cuda`` an identity (the official loops call ``.cuda()``; this runs on a CPU)."""
    path = Path(checkout) / relpath
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the path of a checkout of the official repository")
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def commit_of(checkout: str | Path) -> str:
    """The commit of a checkout (a work tree or a bare mirror)."""
    out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def summary(before: nn.Module, after: nn.Module) -> dict[str, Any]:
    """Per parameter group (``name``): the norm of θ_after − θ_before; and N_ENTRIES fixed entries of the
    concatenated delta; BN running statistics too (they are part of the step)."""
    sb, sa = before.state_dict(), after.state_dict()
    groups = {k: float((sa[k].double() - sb[k].double()).norm()) for k in sa if sa[k].dtype.is_floating_point}
    delta = flat(after) - flat(before)
    idx = torch.linspace(0, delta.numel() - 1, N_ENTRIES).round().long()
    return {"group_norms": groups, "entries": delta[idx].tolist(), "entry_index": idx.tolist(),
            "delta_norm": float(delta.norm())}


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """Relative differences: per group |‖Δ_ours‖ − ‖Δ_theirs‖| / ‖Δ_theirs‖, and of the fixed entries
    ‖e_ours − e_theirs‖ / ‖e_theirs‖."""
    out = {}
    for k, v in theirs["group_norms"].items():
        out[k] = abs(ours["group_norms"][k] - v) / max(abs(v), 1e-300)
    # float64: torch.tensor of a list of floats would be float32, which rounds a 1e-16 difference of two entries
    # either way to float32's ulp (≈ 6e-8 relative) or to nothing
    e1, e2 = (torch.tensor(e["entries"], dtype=torch.float64) for e in (ours, theirs))
    out["entries"] = float((e1 - e2).norm() / e2.norm().clamp_min(1e-300))
    return out


def report(name: str, iters: list[dict[str, float]]) -> float:
    worst = 0.0
    for i, d in enumerate(iters, 1):
        m = max(d.values())
        worst = max(worst, m)
        top = sorted(d.items(), key=lambda kv: -kv[1])[:3]
        print(f"{name} iteration {i}: max relative difference {m:.3e} ({', '.join(f'{k} {v:.1e}' for k, v in top)})")
    print(f"{name}: {'EQUAL' if worst <= EQUAL else 'DIFFERENT'} (max {worst:.3e}; equal means <= {EQUAL:g})")
    return worst


def write_golden(method: str, official: dict[str, str], setting: dict[str, Any], steps: list[dict[str, Any]]) -> Path:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    path = GOLDEN / f"{method}.json"
    path.write_text(json.dumps({"method": method, "official": official, "setting": setting, "iterations": steps},
                               indent=1) + "\n")
    return path


def read_golden(method: str) -> dict[str, Any]:
    return json.loads((GOLDEN / f"{method}.json").read_text())


def snapshot(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)


def suite_steps(method, m0: nn.Module, s: dict[str, Any], lrs: list[float] | None = None,
                after: Callable[[torch.Tensor], None] | None = None) -> list[dict[str, Any]]:
    """The suite's side of a comparison: ``method.train_step`` on the batches of ``s["batch_seeds"]``, each after
    ``torch.manual_seed`` of its ``s["noise_seeds"]`` entry (where the suite draws its noise), at the lr ``lrs[i]``
    (default ``s["lr"]``); the summary against ``m0`` of the model after each step (and after ``after(x)``)."""
    from bench.loader import Batch

    out = []
    for i in range(s["iters"]):
        x, y = batch(s["batch_seeds"][i], s["n"])
        method.set_lr(s["lr"] if lrs is None else lrs[i])
        torch.manual_seed(s["noise_seeds"][i])
        method.train_step(Batch(x, y, torch.arange(s["n"])), 0, i)
        if after is not None:
            after(x)
        out.append(summary(m0, method.model))
    return out


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside the block (restored after): these comparisons make many tiny float64 forwards,
    which two threads make some 40× slower on a two-core machine whose other core is busy (measured: PGD-AT's three
    steps 15 s → 0.2 s). The thread count changes at most the rounding of a reduction."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def main(method: str, doc: str, official: dict[str, str], setting: dict[str, Any],
         official_run: Callable[[str], tuple[list[dict], dict[str, Any]]],
         suite_run: Callable[[dict[str, Any]], list[dict]]) -> None:
    """The command line of a one-variant comparison: ``--official CHECKOUT [--write-golden]``. ``official_run``
    returns the official iterations and what the suite's run must be given besides ``setting`` (recorded in the
    fixture's setting); ``official`` names the repository and files (the commit is read from the checkout)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--official", required=True, help=f"a checkout of github.com/{official['repo']}")
    ap.add_argument("--write-golden", action="store_true", help="store the official run as the CI fixture")
    a = ap.parse_args()
    theirs, extra = official_run(a.official)
    used = {**setting, **extra}
    report(method, [compare(o, t) for o, t in zip(suite_run(used), theirs)])
    if a.write_golden:
        path = write_golden(method, {**official, "commit": commit_of(a.official)}, used, theirs)
        print(f"wrote {path}")
