"""``bench perf``: the suite's training engine against a reference loop written the way the papers' code is, on the
same model, data and device, in one process — images/s, seconds per CIFAR-10-sized epoch (50 000 images), peak
memory — for natural, PGD-AT, TRADES and AFD training steps, and for evaluation under PGD-20 and AutoAttack.

* **engine**: the whole split as one uint8 tensor on the device, crop/flip on the device for a whole batch
  (:class:`~bench.loader.DeviceLoader`), ``torch.compile`` of the training forward and of the attacks' forward (with
  the parameters detached, and each eval-mode PGD step — forward, loss, input gradient, sign, projection — one
  compiled graph: :class:`bench.attacks.CompiledAttackForward`), bf16 autocast for training, channels_last, a fused
  SGD on a GPU, the method's own ``train_step`` with no host sync inside the step. The defaults follow the device
  (:func:`engine_settings`): on a GPU all of them; on a CPU ``torch.compile`` where a C++ compiler is installed
  (inductor needs one) and bf16 where the CPU computes it natively (AMX / AVX512-BF16, oneDNN's own check) —
  ``--compile``, ``--precision`` and ``--channels-last`` override them and the settings are recorded.
* **reference**: ``torch.utils.data.DataLoader`` over PIL images with per-image ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip`` and ``ToTensor`` (as in the TRADES / AFD / Wong scripts), fp32, eager, contiguous memory,
  the same ``train_step`` and a ``loss.item()`` after every step (the papers' logging).

Each measurement: ``warmup`` steps of both pipelines excluded, then ``repeats`` timings of ``steps`` steps each,
the reference and the engine *interleaved* (ABBA order), so that a drift of the machine's speed (a shared CPU, a GPU's
clocks) falls on both alike (synchronised on CUDA); the median and the min/max spread are reported, the ratio
engine / reference of the medians, and the median and spread of the per-repeat ratios. Peak memory: on a GPU each
pipeline's own peak (``max_memory_allocated`` during its steps above what was allocated when they began, plus what
the pipeline itself holds: model, optimiser state, data); on a CPU the process's peak RSS (one number for the whole
process, as a CPU gives no per-phase peak). On CUDA the achieved FLOP/s of the PGD-AT step is reported as a
fraction of the device's peak (bf16 dense tensor-core peak from a small table of known GPUs; the FLOPs counted with
``torch.utils.flop_counter`` for one training step: the attack's forward and backward passes and the update's).

``--science`` also trains a short PGD-AT run in fp32 and in bf16 (same seed, data, schedule), and when the engine
compiles a third one in its precision with ``torch.compile``, and records their clean and PGD-20 accuracies side by
side: speed must not change the numbers.

Results: ``results/perf/<device>-<date>[-<label>].json`` and ``.md``. Timings belong to the device named in them;
ratios are only ever taken between two measurements of one run.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import BenchError

PERF_METHODS = ("natural", "pgd-at", "trades", "afd")
CIFAR_EPOCH = 50_000
# dense bf16 tensor-core peaks (FLOP/s) of GPUs we know, for the achieved fraction; others report FLOP/s only
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12,
             "L40S": 362e12, "RTX 4090": 165e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak_mem_mb(device: torch.device, start: int, resident: int) -> float:
    """On a GPU: the peak since ``_reset_mem`` above ``start`` (allocated when the phase began) plus ``resident``
    (what the pipeline holds); on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - start + resident) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _stats(per_step: list[float], batch: int, *, steps: int, warmup: int) -> dict[str, Any]:
    med = statistics.median(per_step)
    return {"sec_per_step": med, "sec_per_step_min": min(per_step), "sec_per_step_max": max(per_step),
            "images_per_s": batch / med, "sec_per_cifar10_epoch": CIFAR_EPOCH / (batch / med),
            "repeats": len(per_step), "steps": steps, "warmup": warmup, "sec_per_step_all": per_step}


def time_interleaved(build: dict[str, Callable[[], Callable[[], Any]]], *, warmup: int, steps: int, repeats: int,
                     device: torch.device, batch: int) -> dict[str, dict[str, Any]]:
    """Time several step functions side by side. ``build`` maps a name to a factory of its step function; the
    factories are called in order, each pipeline warmed up by ``warmup`` steps as it is built (so its resident memory
    is what it allocated meanwhile); then ``repeats`` rounds in which each runs ``steps`` timed steps, in ABBA order
    (the order reverses every round). Returns each one's :func:`_stats` and ``peak_mem_mb``."""
    fns, resident = {}, {}
    for k, f in build.items():
        before = _allocated(device)
        fns[k] = f()
        for _ in range(warmup):
            fns[k]()
        _sync(device)
        resident[k] = _allocated(device) - before
    per: dict[str, list[float]] = {k: [] for k in fns}
    peak: dict[str, float] = {k: 0.0 for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            _sync(device)
            _reset_mem(device)
            start = _allocated(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[k]()
            _sync(device)
            per[k].append((time.perf_counter() - t0) / steps)
            peak[k] = max(peak[k], _peak_mem_mb(device, start, resident[k]))
    out = {}
    for k in fns:
        out[k] = _stats(per[k], batch, steps=steps, warmup=warmup)
        out[k]["peak_mem_mb"] = round(peak[k], 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the two pipelines


def _method(name: str, arch: str, num_classes: int, device: torch.device, *, batch: int, attack_steps: int | None,
            channels_last: bool, seed: int, fused: bool = False):
    """A fresh model and method (AFD from a natural-like start: the same random model as its own teacher)."""
    from methods import get_method

    from .models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cls = get_method(name)
    hp = cls.resolved_defaults()
    hp["batch_size"] = batch
    if attack_steps is not None and "attack_steps" in hp:
        hp["attack_steps"] = attack_steps
    teacher = None
    if cls.starts_from != "scratch":
        import copy

        teacher = copy.deepcopy(model)
    return cls(hp, model, teacher, steps_per_epoch=100, fused=fused)


def _cpp_compiler() -> str | None:
    import os
    import shutil

    for cxx in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def native_bf16(device: torch.device) -> bool:
    """Does the device compute bf16 natively: a CUDA GPU, or a CPU where oneDNN finds AMX / AVX512-BF16 (without
    them oneDNN emulates bf16, slower than fp32)."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a build without oneDNN
        return False


PERF_PRECISIONS = ("fp32", "bf16")


def engine_settings(device: torch.device, *, compile_: bool | None = None, precision: str | None = None,
                    channels_last: bool | None = None) -> dict[str, Any]:
    """The engine's settings on ``device``: what is given, else the fastest the device supports — on a GPU bf16
    autocast, channels_last, ``torch.compile`` and a fused SGD; on a CPU ``torch.compile`` where a C++ compiler is
    installed, bf16 where it is native (:func:`native_bf16`), the contiguous format (channels_last gains a CPU
    nothing, with or without compile) and the for-loop SGD."""
    gpu = device.type == "cuda"
    if precision is not None and precision not in PERF_PRECISIONS:  # (fp64 is a reference, not a speed setting)
        raise BenchError(f"bench perf: precision {precision!r}; accepted: {', '.join(PERF_PRECISIONS)}")
    native = native_bf16(device)
    comp = (gpu or _cpp_compiler() is not None) if compile_ is None else bool(compile_)
    prec = precision or ("bf16" if native else "fp32")
    cl = gpu if channels_last is None else bool(channels_last)
    return {"precision": prec, "bf16": prec == "bf16", "channels_last": cl, "compile": comp,
            "compile_attack": ("parameters detached (ParamsDetached); an eval-mode PGD step is one graph "
                               "(bench.attacks.CompiledAttackForward)") if comp else None,
            "fused_sgd": gpu, "native_bf16": native,
            "data": "device-resident uint8, crop/flip on device"}


def engine_step_fn(method, split, device: torch.device, *, batch: int, settings: dict[str, Any],
                   seed: int, fused_step: bool = True, reset: bool = True) -> Callable[[], None]:
    """The engine's step: ``fused_step=False`` compiles the attack's forward but steps it eagerly (the fused step's
    ablation); ``reset=False`` keeps dynamo's caches of an engine built before (see ``Method.compile``)."""
    from .loader import DeviceLoader

    loader = DeviceLoader(split, batch, device, seed=seed, drop_last=True)
    if settings["compile"]:
        method.compile(reset=reset, fused_step=fused_step)
    state = {"it": iter(()), "epoch": 0}
    bf16, channels_last = settings["bf16"], settings["channels_last"]

    def step():
        try:
            b = next(state["it"])
        except StopIteration:
            state["it"] = loader.epoch(state["epoch"])
            state["epoch"] += 1
            b = next(state["it"])
        if channels_last:
            b.x = b.x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            method.train_step(b, 0, 1)

    return step


class _PILSet(torch.utils.data.Dataset):
    """The papers' pipeline: one PIL image per item, per-image torchvision transforms."""

    def __init__(self, split):
        from PIL import Image
        from torchvision import transforms

        self.images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in split.x]
        self.y = split.y.tolist()
        self.tf = transforms.Compose([transforms.RandomCrop(split.x.shape[-1], padding=4),
                                      transforms.RandomHorizontalFlip(), transforms.ToTensor()])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.tf(self.images[i]), self.y[i]


def reference_step_fn(method, split, device: torch.device, *, batch: int, workers: int) -> Callable[[], None]:
    from .loader import Batch

    loader = torch.utils.data.DataLoader(_PILSet(split), batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    state = {"it": iter(())}

    def step():
        try:
            x, y = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            x, y = next(state["it"])
        x, y = x.to(device), y.to(device)
        out = method.train_step(Batch(x, y, torch.arange(len(y), device=device)), 0, 1)
        out["loss"].item()  # the papers log the loss every step: one host sync

    return step


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def step_flops(model: nn.Module, split, device: torch.device, batch: int, attack_steps: int) -> float | None:
    """FLOPs of one PGD-AT training step: ``attack_steps`` × (forward + backward to the input only) + (forward +
    full backward), each pass counted by ``torch.utils.flop_counter`` on one batch (it cannot count inside
    ``autograd.grad``, so the passes are counted with ``.backward()`` and composed); the SGD update is negligible."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    import torch.nn.functional as F

    x = split.x[:batch].to(device).float().div_(255)
    y = split.y[:batch].to(device)

    def count(params_grad: bool) -> float:
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(params_grad)
        xi = x.clone().requires_grad_(not params_grad)
        try:
            with FlopCounterMode(display=False) as fc:
                F.cross_entropy(model(xi), y).backward()
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
                p.grad = None
        return float(fc.get_total_flops())

    model.train()
    return attack_steps * count(False) + count(True)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None


# ---------------------------------------------------------------------------------------------------------------
# evaluation throughput


def eval_throughput(model: nn.Module, split, device: torch.device, *, n: int, aa_n: int, batch: int,
                    repeats: int) -> dict[str, Any]:
    """PGD-20 (fp32) images/s over ``n`` images, and one AutoAttack standard pass over ``aa_n`` images."""
    from .attacks import autoattack, pgd
    from .evaluate import ATTACKS

    model.eval()
    x = split.x[:n].to(device).float().div_(255)
    y = split.y[:n].to(device)
    spec = ATTACKS["pgd20"]

    def run_pgd():
        for i in range(0, n, batch):
            pgd(model, x[i:i + batch], y[i:i + batch], eps=8 / 255, step=spec.step, steps=spec.steps, bn="eval")

    run_pgd()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run_pgd()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out: dict[str, Any] = {"pgd20": {"images": n, "sec": med, "sec_min": min(times), "sec_max": max(times),
                                     "images_per_s": n / med, "sec_per_10k": 10_000 * med / n}}
    if aa_n:
        t0 = time.perf_counter()
        autoattack(model, x[:aa_n], y[:aa_n], eps=8 / 255, batch_size=batch)
        _sync(device)
        sec = time.perf_counter() - t0
        out["aa"] = {"images": aa_n, "sec": sec, "sec_per_10k": 10_000 * sec / aa_n,
                     "note": "one pass; AutoAttack's time depends on how robust the model is (a random model here)"}
    return out


# ---------------------------------------------------------------------------------------------------------------
# bf16 vs fp32: the science must not change


def precision_check(device: torch.device, out_dir: Path, *, epochs: int, subset: int, eval_n: int,
                    echo: Callable[[str], None], compiled: str | None = None) -> dict[str, Any]:
    """A short PGD-AT run (smoke preset, synthetic data) in fp32 and in bf16: clean and PGD-20 side by side.
    ``compiled`` (a precision): also a third run in that precision with ``torch.compile`` — the engine as
    ``bench perf`` times it, the fused compiled attack step included — compared with fp32 alike.

    ``out_dir`` belongs to one perf record (``runs-precision/<its file stem>``): the runs' identity does not hold the
    device, so a shared directory would hand one device's finished runs to another device's record (nor does it hold
    ``compile``: the compiled run trains under ``out_dir/compiled``). An interrupted check resumes there; each side
    records the device it was evaluated on."""
    from .records import RunDir
    from .runner import Runner, RunRequest, plan

    def train(precision: str, compile_: bool) -> dict[str, Any]:
        req = RunRequest(methods=["pgd-at"], preset="smoke", epochs=epochs, subset=subset, eval_n=eval_n,
                         attacks=["clean", "pgd20"], probe_n=0, device=str(device), precision=precision,
                         compile=compile_, results_dir=str(out_dir / "compiled" if compile_ else out_dir))
        (p,) = plan(req)
        Runner(progress=False, echo=echo).execute(p.cfg)
        record = RunDir.for_config(p.cfg).read_eval()
        ev = record["results"]
        return {"clean": ev["clean"]["acc"], "pgd20": ev["pgd20"]["acc"], "n": ev["clean"]["n"],
                "run": p.cfg.run_name, "device": record.get("meta", {}).get("device")}

    res: dict[str, Any] = {"fp32": train("fp32", False), "bf16": train("bf16", False)}
    # the binomial standard error of an accuracy p on n points, in percentage points: the "noise" of the comparison
    n = res["fp32"]["n"]
    se = {k: 100 * ((res["fp32"][k] / 100) * (1 - res["fp32"][k] / 100) / n) ** 0.5 for k in ("clean", "pgd20")}

    def compare(side: dict[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
        diff = {k: round(side[k] - res["fp32"][k], 2) for k in se}
        return diff, {k: abs(diff[k]) <= 2 * max(se[k], 100 / n) for k in se}

    res["difference"], res["within_2se"] = compare(res["bf16"])
    res["binomial_se_pp"] = {k: round(v, 2) for k, v in se.items()}
    if compiled:
        side = {"precision": compiled, **train(compiled, True)}
        side["difference"], side["within_2se"] = compare(side)
        res["compiled"] = side
    res["setting"] = f"pgd-at, smoke preset (smallcnn, synthetic), {epochs} epochs, {subset} images/class, n={n}"
    return res


# ---------------------------------------------------------------------------------------------------------------
# the command


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "device"


def run_perf(*, device: str = "auto", arch: str | None = None, methods: tuple[str, ...] = PERF_METHODS,
             batch: int | None = None, steps: int | None = None, repeats: int | None = None, warmup: int = 2,
             attack_steps: int | None = None, compile_: bool | None = None, precision: str | None = None,
             channels_last: bool | None = None, workers: int | None = None,
             eval_n: int | None = None, aa_n: int | None = None, science: bool = False, out_dir: str | Path =
             "results/perf", label: str | None = None, ablate_fused_step: bool = False,
             echo: Callable[[str], None] = print) -> Path:
    from methods import METHODS

    from .data import make_synthetic
    from .devices import device_name, resolve_device
    from .fsutil import atomic_write_json, atomic_write_text

    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    for m in methods:
        METHODS.get(m)
    methods = tuple(METHODS.canonical(m) for m in methods)
    arch = arch or ("resnet18" if gpu else "smallcnn")
    batch = batch or (128 if gpu else 64)
    steps = steps or (20 if gpu else 4)
    repeats = repeats or (3 if gpu else 5)
    eng = engine_settings(dev, compile_=compile_, precision=precision, channels_last=channels_last)
    if ablate_fused_step and not eng["compile"]:
        raise BenchError("bench perf: --ablate-fused-step times the compiled engine without its fused attack step; "
                         "accepted only with compile on (--compile, or a device where it is the default)")
    workers = (4 if gpu else 0) if workers is None else workers
    eval_n = eval_n or (1024 if gpu else 128)
    aa_n = (256 if gpu else 16) if aa_n is None else aa_n
    if label is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,39}", label):
        raise BenchError(f"bench perf: label {label!r}; accepted: lower-case letters, digits and '-' (at most 40), "
                         "added to the file name")
    if batch < 2 or steps < 1 or repeats < 1 or warmup < 0:
        raise BenchError(f"bench perf: batch {batch}, steps {steps}, repeats {repeats}, warmup {warmup}; accepted: "
                         "batch ≥ 2, steps ≥ 1, repeats ≥ 1, warmup ≥ 0")
    n_images = max(batch * (steps + warmup + 1), 4 * batch)
    split = make_synthetic(max(n_images // 10, 1) + 1, seed=0)
    name = device_name(dev)
    echo(f"bench perf on {name}: {arch}, batch {batch}, {steps} steps × {repeats} repeats after {warmup} warm-up")
    record: dict[str, Any] = {
        "device": name, "date": _dt.date.today().isoformat(), "label": label, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "settings": {"arch": arch, "batch": batch, "steps": steps, "repeats": repeats, "warmup": warmup,
                     "attack_steps": attack_steps or "method default", "engine": eng,
                     "reference": {"precision": "fp32", "compile": False, "channels_last": False, "fused_sgd": False,
                                   "data": f"DataLoader, PIL + per-image transforms, {workers} workers",
                                   "item_every_step": True},
                     "timing": "reference and engine interleaved, ABBA order; speedup = ratio of the medians",
                     "ablate_fused_step": ablate_fused_step},
        "methods": {}}
    echo(f"  engine: {eng['precision']}, compile {eng['compile']}, channels_last {eng['channels_last']}, "
         f"fused SGD {eng['fused_sgd']}; reference: fp32, eager, DataLoader with {workers} workers")
    for m in methods:
        def reference(m=m):
            method = _method(m, arch, 10, dev, batch=batch, attack_steps=attack_steps, channels_last=False, seed=0)
            return reference_step_fn(method, split, dev, batch=batch, workers=workers)

        def engine(m=m, fused_step=True):
            method = _method(m, arch, 10, dev, batch=batch, attack_steps=attack_steps,
                             channels_last=eng["channels_last"], seed=0, fused=eng["fused_sgd"])
            # the ablation's engine is built second: it keeps the first one's compiled graphs alive
            return engine_step_fn(method, split, dev, batch=batch, settings=eng, seed=0, fused_step=fused_step,
                                  reset=fused_step)

        pipelines = {"reference": reference, "engine": engine}
        if ablate_fused_step:
            pipelines["engine_unfused"] = lambda m=m: engine(m, fused_step=False)
        row: dict[str, Any] = time_interleaved(pipelines, warmup=warmup, steps=steps, repeats=repeats, device=dev,
                                               batch=batch)
        for kind in pipelines:
            t = row[kind]
            echo(f"  {m:<8} {kind:<9} {t['images_per_s']:9.1f} img/s  {t['sec_per_cifar10_epoch']:9.1f} s/epoch "
                 f"(CIFAR-10 size)  [{t['sec_per_step_min'] * 1e3:.1f}–{t['sec_per_step_max'] * 1e3:.1f} ms/step]")
        row["speedup"], row["speedup_per_repeat"] = _speedup(row["reference"], row["engine"])
        echo(f"  {m:<8} engine / reference {row['speedup']:.2f}×{_per_repeat(row['speedup_per_repeat'])}")
        if ablate_fused_step:
            row["fused_step_speedup"], row["fused_step_speedup_per_repeat"] = _speedup(row["engine_unfused"],
                                                                                       row["engine"])
            echo(f"  {m:<8} fused attack step: engine / engine without it {row['fused_step_speedup']:.2f}×"
                 f"{_per_repeat(row['fused_step_speedup_per_repeat'])}")
        if m == "pgd-at":
            method = _method(m, arch, 10, dev, batch=batch, attack_steps=attack_steps, channels_last=False, seed=0)
            flops = step_flops(method.model, split, dev, batch, method.hp["attack_steps"])
            if flops:
                achieved = flops / row["engine"]["sec_per_step"]
                peak = peak_flops(dev)
                row["flops_per_step"] = flops
                row["achieved_flop_s"] = achieved
                row["fraction_of_peak"] = achieved / peak if peak else None
                row["peak_flop_s"] = peak
        record["methods"][m] = row
    from .models import create_model

    torch.manual_seed(0)
    model = create_model(arch, 10).to(dev)
    echo(f"  evaluation: PGD-20 on {eval_n} images, AutoAttack on {aa_n}")
    record["evaluation"] = eval_throughput(model, split, dev, n=min(eval_n, len(split)), aa_n=aa_n,
                                           batch=max(batch, 128 if gpu else batch), repeats=repeats)
    out = Path(out_dir)
    stem = out / f"{device_slug(name)}-{record['date']}{f'-{label}' if label else ''}"
    if science:
        compiled = eng["precision"] if eng["compile"] else None
        echo("  precision check: PGD-AT in fp32 and in bf16" + (f", and {compiled} compiled (the engine)"
                                                               if compiled else ""))
        record["precision_check"] = precision_check(dev, out / "runs-precision" / stem.name,
                                                    epochs=8 if not gpu else 15, subset=200, eval_n=500, echo=echo,
                                                    compiled=compiled)
    atomic_write_json(stem.with_suffix(".json"), record)
    atomic_write_text(stem.with_suffix(".md"), summary_markdown(record))
    echo(f"bench perf: wrote {stem}.json and {stem}.md")
    return stem.with_suffix(".json")


def _speedup(slow: dict[str, Any], fast: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """``slow`` / ``fast`` of two pipelines timed in the same rounds (:func:`time_interleaved`): the ratio of their
    medians, and the median and range of the per-round ratios."""
    per = [a / b for a, b in zip(slow["sec_per_step_all"], fast["sec_per_step_all"])]
    return slow["sec_per_step"] / fast["sec_per_step"], {"median": statistics.median(per), "min": min(per),
                                                         "max": max(per)}


def _per_repeat(pr: dict[str, float] | None, prefix: str = "per repeat ") -> str:
    return f" ({prefix}{pr['min']:.2f}–{pr['max']:.2f}×)" if pr else ""


def summary_markdown(rec: dict[str, Any]) -> str:
    s = rec["settings"]
    label = f", {rec['label']}" if rec.get("label") else ""
    cpu = rec["device"].startswith("cpu")  # a CPU's peak is the process's RSS: one number, not one per pipeline
    lines = [f"# bench perf — {rec['device']} ({rec['date']}{label})", "",
             f"torch {rec['torch']}, Python {rec['python']}, {rec['threads']} threads; {s['arch']}, "
             f"batch {s['batch']}, {s['steps']} steps × {s['repeats']} repeats after {s['warmup']} warm-up; "
             f"median (min–max). {s.get('timing', '')}. "
             f"Engine: {json.dumps(s['engine'])}. Reference: {json.dumps(s['reference'])}.", "",
             "| method | reference img/s | engine img/s | engine / reference (per repeat) | engine s per CIFAR-10 "
             f"epoch | {'peak RSS MB, whole process' if cpu else 'peak memory MB (ref / engine)'} |",
             "|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(PERF_METHODS)}  # the JSON's keys are sorted; the table keeps this order
    rows = sorted(rec["methods"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    for m, r in rows:
        ref, eng = r["reference"], r["engine"]
        lines.append(f"| {m} | {ref['images_per_s']:.1f} ({ref['sec_per_step_min'] * 1e3:.0f}–"
                     f"{ref['sec_per_step_max'] * 1e3:.0f} ms/step) | {eng['images_per_s']:.1f} "
                     f"({eng['sec_per_step_min'] * 1e3:.0f}–{eng['sec_per_step_max'] * 1e3:.0f} ms/step) | "
                     f"{r['speedup']:.2f}×{_per_repeat(r.get('speedup_per_repeat'), '')} | "
                     f"{eng['sec_per_cifar10_epoch']:.1f} | "
                     + (f"{max(ref['peak_mem_mb'], eng['peak_mem_mb'])} |" if cpu else
                        f"{ref['peak_mem_mb']} / {eng['peak_mem_mb']} |"))
    abl = [(m, r) for m, r in rows if "fused_step_speedup" in r]
    if abl:
        lines += ["", "Fused attack step (each eval-mode PGD step one compiled graph), timed in the same interleaved "
                      "rounds against the same compiled engine stepping its attack eagerly: "
                  + "; ".join(f"{m} {r['fused_step_speedup']:.2f}×{_per_repeat(r['fused_step_speedup_per_repeat'])}"
                              for m, r in abl)]
    pa = rec["methods"].get("pgd-at", {})
    if pa.get("achieved_flop_s"):
        frac = pa.get("fraction_of_peak")
        lines += ["", f"PGD-AT step: {pa['flops_per_step'] / 1e9:.1f} GFLOP, {pa['achieved_flop_s'] / 1e12:.3f} "
                      f"TFLOP/s achieved" + (f" = {100 * frac:.1f} % of the bf16 peak" if frac else
                                              " (no peak known for this device)")]
    ev = rec.get("evaluation", {})
    if ev:
        lines += ["", f"Evaluation (fp32): PGD-20 {ev['pgd20']['images_per_s']:.1f} img/s "
                      f"({ev['pgd20']['sec_per_10k']:.0f} s per 10 000 images)"]
        if "aa" in ev:
            lines.append(f"AutoAttack standard: {ev['aa']['sec']:.1f} s for {ev['aa']['images']} images "
                         f"({ev['aa']['sec_per_10k']:.0f} s per 10 000; {ev['aa']['note']})")
    pc = rec.get("precision_check")
    if pc:
        lines += ["", f"Precision check ({pc['setting']}): fp32 clean {pc['fp32']['clean']:.2f} / PGD-20 "
                      f"{pc['fp32']['pgd20']:.2f}; bf16 clean {pc['bf16']['clean']:.2f} / PGD-20 "
                      f"{pc['bf16']['pgd20']:.2f}; difference {pc['difference']} pp, binomial s.e. "
                      f"{pc['binomial_se_pp']} pp, within 2 s.e.: {pc['within_2se']}; trained and evaluated on "
                      f"{pc['fp32'].get('device') or 'an unrecorded device'}"]
        c = pc.get("compiled")
        if c:
            lines.append(f"Compiled ({c['precision']} + torch.compile, the engine's fused attack step): clean "
                         f"{c['clean']:.2f} / PGD-20 {c['pgd20']:.2f}; difference from fp32 {c['difference']} pp, "
                         f"within 2 s.e.: {c['within_2se']}")
    lines.append("")
    return "\n".join(lines)
