"""Evaluation exactly as docs/methods.md §15.1 (the AFD paper's protocol).

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

A run's evaluation (:func:`evaluate_run`, :func:`evaluate_heads`, :func:`record_tsne`) lives here too, apart from
the training loop: ``eval.json`` holds the protocol's numbers of the run's final model, and every write to it goes
through :func:`merge_eval`, whether ``bench run`` evaluates the run after training or ``bench eval`` evaluates its
directory later.
"""
from __future__ import annotations

import copy
import math
import os
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
from .devices import canonical, device_name, resolve_device
from .dist import SINGLE, Dist
from .errors import BenchError
from .loader import hash_seed
from .precision import fp32_math, full_fp32

EPS = 8 / 255
PROTOCOL = "METHODS.md §15.1: clean, PGD-20 (step 0.003, 1 random start), AutoAttack standard"


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


# ---------------------------------------------------------------------------------------------------------------
# a run's evaluation: eval.json, the extra heads, the t-SNE


def eval_conflict(existing: dict | None, record: dict) -> str | None:
    """Why the evaluation ``record`` (of :func:`evaluate`) cannot join the run's ``eval.json`` record ``existing``;
    None when it can. ``eval.json`` holds the protocol's numbers (ε = 8/255) of one model: a record at another ε,
    or of other weights than those ``existing`` measured (``meta.weights_sha256``), does not belong in it."""
    meta = record.get("meta") or {}
    eps = meta.get("eps")
    if not isinstance(eps, (int, float)) or not math.isclose(eps, EPS, rel_tol=1e-9, abs_tol=0.0):
        shown = f"{eps * 255:g}/255" if isinstance(eps, (int, float)) else repr(eps)
        return f"it was measured at ε = {shown}, and a run's eval.json holds the protocol's ε = 8/255"
    was = ((existing or {}).get("meta") or {}).get("weights_sha256")
    if (existing or {}).get("results") and was and was != meta.get("weights_sha256"):
        return (f"it measured other weights (digest {meta.get('weights_sha256')}) than those eval.json's numbers "
                f"are of ({was})")
    return None


def merge_eval(existing: dict | None, record: dict, *, head: str | None = None) -> tuple[dict, list[str]]:
    """``existing`` (a run's ``eval.json`` record, or None) with the evaluation ``record`` of :func:`evaluate` merged
    in, and the attacks it added; ``existing`` itself is left as it was.

    What ``existing`` holds stands: its results and its checks of the model were measured together, so an attack
    it has is never measured into it again and a model check it has is never replaced. The record adds the attacks
    ``existing`` lacks, the model checks it lacks, and its ``worst`` when every attack that one covers is added
    here and ``existing`` has none (a ``worst`` over attacks another evaluation measured would mix two
    measurements). ``meta`` becomes the record's (the evaluation that added the latest numbers: its n, device,
    versions), with the protocol named; the checks across attacks (ordering, AutoAttack's flags) and ``suspect``
    are computed again over the merged results (:func:`finalize_checks`). Keys it does not know (``heads``) are
    kept. A record that adds nothing changes nothing.

    With ``head``, the record's results are those of the method's extra head ``head`` (AFD's f₁, f₂): they become
    ``heads[head]`` unless that is there already, and nothing else changes.

    A record :func:`eval_conflict` refuses is a :class:`BenchError` (for a head: one at another ε)."""
    why = eval_conflict(existing if head is None else None, record)  # (a head is other weights: ε alone counts)
    if why:
        raise BenchError(f"the evaluation cannot join eval.json: {why}")
    merged = copy.deepcopy(existing) if existing else {"results": {}, "meta": {}}
    new = record.get("results") or {}
    if head is not None:
        heads = merged.setdefault("heads", {})
        if head in heads:
            return merged, []
        heads[head] = copy.deepcopy(new)
        return merged, [a for a in new if a != "worst"]
    results = merged.setdefault("results", {})
    added = [a for a in new if a != "worst" and a not in results]
    if not added:
        return merged, []
    for a in added:
        results[a] = copy.deepcopy(new[a])
    worst = new.get("worst")
    if worst is not None and "worst" not in results and set(worst.get("over", ())) <= set(added):
        results["worst"] = copy.deepcopy(worst)
    merged["checks"] = {**copy.deepcopy(record.get("checks") or {}), **(merged.get("checks") or {})}
    merged["meta"] = {**copy.deepcopy(record.get("meta") or {}), "protocol": PROTOCOL}
    return finalize_checks(merged), added


def evaluate_run(cfg, dataset, run, model: nn.Module | None = None, progress: bool = True,
                 echo: Callable[[str], None] = print, dist: Dist = SINGLE) -> dict:
    """Evaluate the final model of run ``cfg`` (a :class:`~bench.config.RunConfig`; ``model``, or the weights in
    ``run``, a :class:`~bench.records.RunDir`) with the attacks ``eval.json`` lacks, and return the record. It merges
    (:func:`merge_eval`) into ``eval.json`` after each group of attacks (clean and PGD-20 on ``eval_n`` images,
    AutoAttack on ``aa_n``), so an interrupted evaluation keeps what it finished; the model checks run with the
    first group that finds none. An ``eval.json`` of other weights (the run was trained again from scratch after
    its checkpoints were lost) describes nothing of this model: it is kept as ``eval.json.stale`` and the model is
    evaluated afresh. Under data parallelism the ranks share the test set; rank 0 writes."""
    from .fsutil import atomic_write_json
    from .models import build_model
    from .models.loading import load_weights

    if model is None:
        model = build_model(cfg, dataset)
        load_weights(model, run.final_weights)
    device = resolve_device(cfg.device, dist)
    if not dist.is_main:
        progress, echo = False, (lambda s: None)
    existing = dist.agree(run.read_eval()) or {"results": {}, "meta": {}}
    was = (existing.get("meta") or {}).get("weights_sha256")
    if was and existing["results"] and was != weights_digest(model.float()):
        dist.main_only(lambda: os.replace(run.eval, run.eval.with_name("eval.json.stale")),
                       "setting eval.json aside")
        echo(f"[{cfg.method} s{cfg.seed}] eval.json measured other weights (digest {was}, these: "
             f"{weights_digest(model)}): kept as eval.json.stale, evaluating this model afresh")
        existing = {"results": {}, "meta": {}}
    groups: dict[int | None, list[str]] = {}
    for a in cfg.attacks:
        if a not in existing["results"]:
            groups.setdefault(cfg.aa_n if a == "aa" else cfg.eval_n, []).append(a)
    for n, attacks in groups.items():
        res = evaluate(model, dataset.test, attacks, n=n, device=device, seed=cfg.seed,
                       batch_size=cfg.eval_batch_size, state_dir=run.ckpt_dir / "eval-state", progress=progress,
                       checks="deterministic" not in existing.get("checks", {}), aa_chunk=cfg.aa_chunk, dist=dist)
        existing, _ = merge_eval(existing, res)
        dist.main_only(lambda: atomic_write_json(run.eval, existing), "writing eval.json")
        for a in attacks:
            r = res["results"][a]
            echo(f"[{cfg.method} s{cfg.seed}] {a}: {r['acc']:.2f}% ({r['correct']}/{r['n']}, {r['seconds']:.1f}s)")
    if existing.get("suspect"):
        echo(f"[{cfg.method} s{cfg.seed}] SUSPECT: failed checks {', '.join(existing['suspect'])} (see eval.json)")
    return existing


def evaluate_heads(cfg, dataset, run, heads: dict[str, nn.Module], *, device: torch.device | str,
                   progress: bool = True, echo: Callable[[str], None] = print, dist: Dist = SINGLE) -> None:
    """Clean and PGD-20 accuracy of a method's extra heads (``Method.eval_heads`` of the evaluated model: AFD's
    f₁ = ω·D₁·g and f₂ = ω·D₂·g, the paper's Table 4), merged into ``heads`` of ``eval.json``; a head that is there
    already is not evaluated again. AutoAttack is not run on heads."""
    from .fsutil import atomic_write_json

    if not heads:
        return
    ev = dist.agree(run.read_eval()) or {"results": {}, "meta": {}}
    attacks = [a for a in cfg.attacks if a != "aa"]
    for name, head in heads.items():
        if name in ev.get("heads", {}) or not attacks:
            continue
        res = evaluate(head, dataset.test, attacks, n=cfg.eval_n, device=device, seed=cfg.seed,
                       batch_size=cfg.eval_batch_size, progress=progress and dist.is_main, checks=False, dist=dist)
        ev, _ = merge_eval(ev, res, head=name)
        dist.main_only(lambda: atomic_write_json(run.eval, ev), "writing eval.json (heads)")
        if not dist.is_main:
            continue
        echo(f"[{cfg.method} s{cfg.seed}] head {name}: " + ", ".join(
            f"{a} {r['acc']:.2f}%" for a, r in res["results"].items() if a != "worst"))


def record_tsne(cfg, dataset, run, method, module: nn.Module, *, device: torch.device | str,
                echo: Callable[[str], None] = print, n: int | None = None) -> None:
    """``tsne.json``: the t-SNE (:func:`tsne_embedding`) of the feature maps ``method.tsne_features`` names (AFD: g
    and f₁) of the evaluated ``module``, on PGD-20 examples of the first ``n`` test images (default:
    min(eval_n, 1000)): the data of the AFD paper's Fig. 3. Skipped when the method has none or the file exists.
    Computed in fp32, as every evaluation (on a copy when the run trains in another dtype: training may go on).
    The main process alone calls it."""
    from .fsutil import atomic_write_json
    from .precision import param_dtype

    if param_dtype(cfg.precision) != torch.float32:
        module = copy.deepcopy(module).float()
    feats = method.tsne_features(module)
    path = run.path / "tsne.json"
    if not feats or path.exists():
        return
    n = n or min(cfg.eval_n or 1000, 1000)
    split = dataset.test.head(n)
    x = split.x.to(device).float().div_(255)
    y = split.y.to(device)
    data = tsne_embedding(module, x, y, feats, eps=cfg.hp["eps"], seed=cfg.seed, batch_size=cfg.eval_batch_size)
    atomic_write_json(path, {"method": cfg.method, "run": cfg.run_name, **data})
    echo(f"[{cfg.method} s{cfg.seed}] t-SNE of {', '.join(feats)} on {len(y)} PGD-20 test examples → tsne.json")
