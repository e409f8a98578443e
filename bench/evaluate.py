"""Evaluation exactly as METHODS.md §15.1 (the AFD paper's protocol).

* model in eval mode (set, then checked for every module), fp32 (autocast off);
* ``clean``: top-1 accuracy;
* ``pgd20``: L∞ PGD, ε = 8/255, 20 steps of 0.003, one U(−ε, ε) random start not clipped before the first step,
  CE on the logits, projection to the ε-ball then [0, 1] after each step;
* ``aa``: AutoAttack ``standard`` (APGD-CE, APGD-T, FAB-T, Square) from pyautoattack, ε = 8/255;
* ``worst``: correct under every attack that was run (per point), when more than one was.

on the first ``n`` test images (the full test set by default). Each number is stored with its n, seed, device,
dtype and package versions. The PGD random starts come from a generator seeded by (seed, batch), so the same model
gives the same numbers every time — also when the test set is shared by several processes (``dist``): rank r
attacks the batches b ≡ r (mod world) and AutoAttack's chunks likewise, and the per-point results are gathered, so
the record is the one a single process writes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import faults
from .attacks import assert_eval, autoattack, bn_mode, pgd
from .checkpoint import tensor_digest
from .data import Split
from .devices import canonical
from .dist import SINGLE, Dist
from .errors import BenchError
from .loader import hash_seed
from .precision import fp32_math, full_fp32

EPS = 8 / 255


@dataclass(frozen=True)
class AttackSpec:
    name: str
    description: str
    steps: int = 0
    step: float = 0.0


ATTACKS = {
    "clean": AttackSpec("clean", "no attack"),
    "pgd20": AttackSpec("pgd20", "L∞ PGD-20, step 0.003, one U(−ε,ε) start (METHODS §15.1)", 20, 0.003),
    "aa": AttackSpec("aa", "AutoAttack standard (pyautoattack): APGD-CE, APGD-T, FAB-T, Square"),
}


def parse_attacks(text: str | Sequence[str]) -> list[str]:
    names = [a.strip().lower() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()]
    aliases = {"autoattack": "aa", "pgd-20": "pgd20", "natural": "clean"}
    names = [aliases.get(a, a) for a in names]
    bad = [a for a in names if a not in ATTACKS]
    if bad or not names:
        raise BenchError(f"unknown attack {bad[0] if bad else text!r}; accepted: {', '.join(ATTACKS)} "
                         "(comma-separated)")
    return list(dict.fromkeys(names))


def weights_digest(model: nn.Module) -> str:
    return tensor_digest(model.state_dict())[:16]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        model = ""
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"cpu ({model or 'unknown'}, {torch.get_num_threads()} threads)"
    return str(device)


def predict(model: Callable, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def encode_points(correct: torch.Tensor) -> str:
    """Per-point correctness as a hex string (one bit per test image, in order)."""
    return np.packbits(correct.detach().cpu().numpy().astype(np.uint8)).tobytes().hex()


def decode_points(text: str, n: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


# ---------------------------------------------------------------------------------------------------------------
# sanity checks: numbers that cannot lie

LARGE_EPS, LARGE_EPS_MAX_ACC = 0.5, 5.0


def model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0) -> dict[str, dict]:
    """Checks of the evaluated function on a few images: two eval forwards agree; PGD with ε = 0 returns the clean
    accuracy; PGD with ε = 0.5 (10 steps of 0.1) drives accuracy to at most 5 % (a model it cannot break is masking
    its gradients, or the attack is broken)."""
    out: dict[str, dict] = {}
    with torch.no_grad():
        a, b = model(x), model(x)
    diff = float((a - b).abs().max())
    out["deterministic"] = {"passed": bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5)), "max_abs_diff": diff}
    clean = int((a.argmax(1) == y).sum())
    gen = torch.Generator(device=x.device).manual_seed(hash_seed(seed, 31))
    x0 = pgd(model, x, y, eps=0.0, step=0.003, steps=2, bn="eval", generator=gen)
    at0 = int((predict(model, x0) == y).sum())
    out["eps0_is_clean"] = {"passed": at0 == clean and bool(torch.equal(x0, x)), "clean": clean, "pgd_eps0": at0,
                            "n": int(y.shape[0])}
    xl = pgd(model, x, y, eps=LARGE_EPS, step=0.1, steps=10, bn="eval", generator=gen)
    acc_l = 100.0 * float((predict(model, xl) == y).float().mean())
    out["large_eps_breaks"] = {"passed": acc_l <= LARGE_EPS_MAX_ACC, "eps": LARGE_EPS, "acc": acc_l,
                               "max_acc": LARGE_EPS_MAX_ACC, "n": int(y.shape[0])}
    return out


def finalize_checks(record: dict) -> dict:
    """Add the checks that compare attacks (AA ≤ PGD-20 ≤ clean on the same points; AutoAttack's own flags) and
    the ``suspect`` list (names of failed checks) to an eval record; returns it."""
    checks = record.setdefault("checks", {})
    res = {k: v for k, v in record.get("results", {}).items() if "points" in v}
    order = [a for a in ("clean", "pgd20", "aa") if a in res]
    if len(order) > 1:
        m = min(res[a]["n"] for a in order)
        counts = {a: int(decode_points(res[a]["points"], res[a]["n"])[:m].sum()) for a in order}
        seq = [counts[a] for a in order]
        checks["ordering"] = {"passed": all(u >= v for u, v in zip(seq, seq[1:])), "n": m, "correct": counts}
    if "aa" in record.get("results", {}):
        flags = record["results"]["aa"].get("flags", [])
        checks["autoattack_flags"] = {"passed": not flags, "messages": flags}
    record["suspect"] = sorted(k for k, v in checks.items() if not v.get("passed", True))
    return record


@full_fp32()
def evaluate(model: nn.Module, split: Split, attacks: Sequence[str], *, n: int | None = None, eps: float = EPS,
             batch_size: int = 256, device: torch.device | str = "cpu", seed: int = 0,
             state_dir: str | Path | None = None, progress: bool = True, aa_chunk: int = 1000,
             checks: bool = True, check_n: int = 64, dist: Dist = SINGLE) -> dict:
    """Evaluate ``model`` on the first ``n`` images of ``split`` under ``attacks``; returns the eval record.

    With ``checks``, :func:`model_checks` run on the first ``check_n`` images, and :func:`finalize_checks` adds the
    cross-attack checks; any failure is listed in ``record["suspect"]``."""
    from tqdm import tqdm

    from .records import environment

    attacks = parse_attacks(attacks)
    device = canonical(device)
    split = split.head(n)
    n = len(split)
    model = model.to(device).float()
    model.eval()
    assert_eval(model)
    digest = weights_digest(model)
    x_all = split.x.to(device).float().div_(255)
    y_all = split.y.to(device)
    per_point: dict[str, torch.Tensor] = {}
    results: dict[str, dict] = {}
    # dtype float32 and fp32_math ieee: no TF32 anywhere (cuDNN's default on Ampere and later GPUs is TF32)
    meta = {"n": n, "seed": seed, "eps": eps, "device": device_name(device), "dtype": "float32",
            "fp32_math": fp32_math(),
            "weights_sha256": digest, "versions": environment()}
    if dist.enabled:
        meta["ranks"] = dist.world
    for name in attacks:
        t0, c0 = time.perf_counter(), time.process_time()
        extra: dict = {}
        with torch.autocast(device.type, enabled=False):
            if name == "aa":
                bar = tqdm(total=n, desc="AutoAttack", unit="img", leave=False, disable=not progress or None)
                key = f"{digest}|{eps}|{seed}|standard|{n}"
                # on a GPU, a chunk's points go through AutoAttack as one batch (256 leaves an H100 nearly idle)
                aa_batch = batch_size if device.type != "cuda" else max(batch_size, aa_chunk)
                flags, warnings_ = autoattack(model, x_all, y_all, eps=eps, batch_size=aa_batch, seed=seed,
                                              state_dir=state_dir, state_key=key, progress=bar.update,
                                              chunk=aa_chunk, dist=dist)
                bar.close()
                correct = flags.to(device)
                extra = {"version": "standard", "flags": warnings_, "batch": aa_batch}
            else:
                spec = ATTACKS[name]
                correct = torch.zeros(n, dtype=torch.bool, device=device)
                batches = range(0, n, batch_size)
                for bi, i in enumerate(tqdm(batches, desc=name, unit="batch", leave=False,
                                            disable=not progress or None)):
                    if bi % dist.world != dist.rank:
                        continue  # another rank's batch
                    xb, yb = x_all[i:i + batch_size], y_all[i:i + batch_size]
                    if spec.steps:
                        gen = torch.Generator(device=device).manual_seed(hash_seed(seed, bi))
                        xb = pgd(model, xb, yb, eps=eps, step=spec.step, steps=spec.steps, random_start=True,
                                 bn="eval", generator=gen)
                    correct[i:i + batch_size] = predict(model, xb) == yb
                if dist.enabled:  # every point was attacked by exactly one rank
                    correct = dist.all_sum(correct.to(torch.int32)) > 0
                if spec.steps:
                    extra = {"steps": spec.steps, "step": spec.step, "restarts": 1, "random_start": "uniform"}
        assert_eval(model)  # no attack may leave the model in train mode
        per_point[name] = correct
        c = int(correct.sum())
        results[name] = {"acc": 100.0 * c / n, "correct": c, "n": n, "seconds": round(time.perf_counter() - t0, 3),
                         "cpu_seconds": round(time.process_time() - c0, 3),
                         "points": encode_points(correct), **extra}
        faults.point("attack")
    if len(per_point) > 1:
        worst = torch.stack(list(per_point.values())).all(0)
        c = int(worst.sum())
        results["worst"] = {"acc": 100.0 * c / n, "correct": c, "n": n, "over": list(per_point)}
    record = {"meta": meta, "results": results, "checks": {}}
    if checks:
        with torch.autocast(device.type, enabled=False):
            record["checks"] = model_checks(model, x_all[:check_n], y_all[:check_n], seed=seed)
        assert_eval(model)
    return finalize_checks(record)


@full_fp32()
def feature_gaps(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 pairs: dict[str, tuple[Callable, Callable]], *, eps: float = EPS, seed: int = 0,
                 forward: Callable | None = None) -> dict[str, float]:
    """The AFD paper's Fig. 1a measure: for each named pair (φ_nat, φ_adv), the mean over images of
    ‖φ_nat(x) − φ_adv(x′)‖_∞, where x′ is the PGD-20 (§15.1) example of ``forward`` (default ``model``), computed
    once for all pairs with the model in eval mode (its modes are restored afterwards)."""
    if x.numel() == 0:
        raise BenchError("the feature-gap probe needs at least one image")
    out = {}
    with torch.autocast(x.device.type, enabled=False), bn_mode(model, "eval"):
        gen = torch.Generator(device=x.device).manual_seed(hash_seed(seed, 7919))
        x_adv = pgd(model, x, y, eps=eps, step=ATTACKS["pgd20"].step, steps=ATTACKS["pgd20"].steps, bn="eval",
                    forward=forward, generator=gen)
        with torch.no_grad():
            for name, (nat, adv) in pairs.items():
                out[name] = float((nat(x) - adv(x_adv)).abs().amax(dim=1).mean())
    return out


def tsne_embedding(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   features: dict[str, Callable[[torch.Tensor], torch.Tensor]], *, eps: float = EPS, seed: int = 0,
                   batch_size: int = 256, perplexity: float = 30.0) -> dict[str, Any]:
    """AFD Fig. 3: t-SNE (scikit-learn, PCA init, seeded) of the features of PGD-20 (§15.1) examples of ``model``
    (eval mode) for each named feature map, e.g. ``g`` (before disentanglement) and ``f1`` (after). Returns JSON-able
    {name: [[u, v], ...], "labels": [...], "n", "perplexity", "seed"}."""
    from sklearn.manifold import TSNE

    feats: dict[str, list[torch.Tensor]] = {k: [] for k in features}
    gen = torch.Generator(device=x.device).manual_seed(hash_seed(seed, 0x75E))
    with torch.autocast(x.device.type, enabled=False), bn_mode(model, "eval"):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_adv = pgd(model, xb, yb, eps=eps, step=ATTACKS["pgd20"].step, steps=ATTACKS["pgd20"].steps, bn="eval",
                        generator=gen)
            with torch.no_grad():
                for k, f in features.items():
                    feats[k].append(f(x_adv).float().flatten(1).cpu())
    n = len(y)
    perp = float(min(perplexity, max(2.0, (n - 1) / 3)))
    out: dict[str, Any] = {"labels": y.cpu().tolist(), "n": n, "perplexity": perp, "seed": seed,
                           "attack": "pgd20 (METHODS §15.1)"}
    for k, chunks in feats.items():
        emb = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed % (2**31)).fit_transform(
            torch.cat(chunks).numpy().astype(np.float64))
        out[k] = [[round(float(u), 4), round(float(v), 4)] for u, v in emb]
    return out


def feature_gap(model: nn.Module, features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, *, eps: float = EPS, seed: int = 0, forward: Callable | None = None) -> float:
    """‖φ(x) − φ(x′)‖_∞ averaged over images, one feature map φ on both sides (see :func:`feature_gaps`)."""
    return feature_gaps(model, x, y, {"gap": (features, features)}, eps=eps, seed=seed, forward=forward)["gap"]
