"""Orchestration of ``bench run``: resolve configs for methods × seeds, train the shared starting models a method
needs (once per dataset / architecture / seed / preset), train and evaluate each run, and summarise.

A finished run (``done`` marker) is not trained again; an unfinished one resumes from its checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import (PRECISIONS, STARTING_METHOD, Grid, RunConfig, check_sets, expand_grid, load_preset,
                     method_run_setting, parse_seeds, parse_sets, resolve_hp)
from .data import DATASETS, Dataset, data_fingerprint, load_dataset
from .errors import BenchError, choice_error
from .evaluate import parse_attacks
from .models import MODELS
from .records import RunDir

if TYPE_CHECKING:
    from .dist import Dist


@dataclass
class RunRequest:
    """What ``bench run`` was asked, before resolution (None = take it from the preset, else the default)."""

    methods: list[str] | None = None
    dataset: str | None = None
    arch: str | None = None
    seeds: str | list[int] | None = None
    preset: str | None = None
    data_dir: str | None = None
    subset: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    sets: list[str] = field(default_factory=list)
    attacks: str | list[str] | None = None
    eval_n: int | None = None
    aa_n: int | None = None
    aa_chunk: int | None = None
    probe_n: int | None = None
    device: str = "auto"
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    normalize: bool | None = None
    pretrained: str | None = None
    results_dir: str = "results"
    download: bool = False
    world_size: int = 1  # processes of a data-parallel run (torchrun / --nproc)
    sync_bn: bool = True  # under data parallelism: BatchNorm over the global batch


def _pick(flag, preset_run: dict, key: str, default):
    if flag is not None:
        return flag
    return preset_run.get(key, default)


def check_pretrained(path: Path, given: str, arch: str, dataset: str, data_dir: str | None, download: bool) -> None:
    """A one-line error unless the ``--pretrained`` weights can be read (weights only) and loaded into ``arch``
    for ``dataset`` (its classes and channels)."""
    from .data import planned_dataset
    from .models import create_model
    from .models.loading import load_weights

    ds = planned_dataset(dataset, data_dir, download)
    try:
        load_weights(create_model(arch, ds.num_classes, ds.channels), path)
    except BenchError as e:
        raise BenchError(f"--pretrained {given}: {e}") from None


def resolve_pretrained(path: str) -> tuple[Path, str | None]:
    """``--pretrained``: a run directory (its final weights) or a checkpoint file. Returns the weights file and the
    method that trained it when the suite knows (its own runs and exported weights), else None."""
    p = Path(path)
    if p.is_dir():
        run = RunDir(p)
        if not run.config.is_file() or not run.final_weights.is_file():
            raise BenchError(f"--pretrained {path} is a directory but not a finished run (no config.json or "
                             "ckpt/model.safetensors); accepted: a run directory or a checkpoint file")
        return run.final_weights, run.read_config()["config"]["method"]
    if not p.is_file():
        raise BenchError(f"--pretrained {path} does not exist; accepted: a run directory or a checkpoint file "
                         "(.safetensors, .pt, .pth)")
    method = None
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                method = (f.metadata() or {}).get("method")
        except Exception:
            pass  # not readable as safetensors: loading it later gives the one-line error
    return p, method


def _timm_backbone(req: RunRequest, arch: str, dataset: str) -> Path | None:
    """``--pretrained`` of a ``timm:`` arch when it is a pre-trained backbone (a file in timm's key names without a
    head of the dataset's classes: ImageNet's): then None of the methods starts from it directly; every model of the
    command starts from it with a new classifier, the fine-tuning methods through their natural (or PGD-AT) base run,
    which fine-tunes it on the dataset. None otherwise (a starting model, as for the suite's own archs)."""
    from .models.timm_backbone import is_timm, pretrained_role

    if req.pretrained is None or not is_timm(arch) or not Path(req.pretrained).is_file():
        return None
    from .data import planned_dataset
    from .models import create_model

    ds = planned_dataset(dataset, req.data_dir, req.download)
    try:
        role = pretrained_role(create_model(arch, ds.num_classes, ds.channels), req.pretrained)
    except BenchError as e:
        raise BenchError(f"--pretrained {req.pretrained}: {e}") from None
    return Path(req.pretrained) if role == "backbone" else None


def _check_timm(req: RunRequest, arch: str, dataset: str, backbone: Path | None) -> None:
    """A ``timm:`` arch: it takes the dataset's images, under ``--sync-bn`` its BN layers are plain, and the
    pre-trained backbone fits it (one line each, before any run directory is made)."""
    from .models.timm_backbone import check_input, check_sync_bn, is_timm, load_backbone

    if not is_timm(arch):
        return
    from .data import planned_dataset
    from .models import create_model

    ds = planned_dataset(dataset, req.data_dir, req.download)
    model = create_model(arch, ds.num_classes, ds.channels)
    check_input(model, ds.channels, ds.image_size, arch)
    if req.world_size > 1 and req.sync_bn:
        check_sync_bn(model, arch)
    if backbone is not None:
        try:
            load_backbone(model, backbone)
        except BenchError as e:
            raise BenchError(f"--pretrained {req.pretrained}: {e}") from None


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Planned:
    """One run to do, and the run of the shared starting model it needs first (if the suite trains it)."""

    cfg: RunConfig
    base: RunConfig | None = None
    grid: dict[str, Any] | None = None  # {"id", "axes", "point"} when the request spans a grid of --set values


def plan(req: RunRequest) -> list[Planned]:
    """Resolve a request into one run per (method, seed); validates every value first."""
    from methods import METHODS

    preset = load_preset(req.preset)
    run = preset["run"]
    methods = req.methods if req.methods is not None else run.get("methods")
    if not methods:
        raise BenchError("no methods given; pass --methods (e.g. natural,pgd-at) or a --preset that names them")
    for m in methods:
        METHODS.get(m)
    methods = [METHODS.canonical(m) for m in methods]  # vaft-d is vaft+d: the same runs, hashes and directories
    dataset = _pick(req.dataset, run, "dataset", "synthetic")
    DATASETS.get(dataset)
    arch = _pick(req.arch, run, "arch", "resnet18")
    MODELS.get(arch)
    seeds = parse_seeds(req.seeds if req.seeds is not None else run.get("seeds", [0]))
    precision = _pick(req.precision, run, "precision", "fp32")
    if precision not in PRECISIONS:
        raise choice_error("precision", precision, PRECISIONS)
    attacks = parse_attacks(_pick(req.attacks, run, "attacks", ["clean", "pgd20", "aa"]))
    ints = {"subset": _pick(req.subset, run, "subset", None), "eval_n": _pick(req.eval_n, run, "eval_n", None),
            "aa_n": _pick(req.aa_n, run, "aa_n", None), "probe_n": _pick(req.probe_n, run, "probe_n", 256),
            "eval_batch_size": run.get("eval_batch_size", 256),
            "aa_chunk": _pick(req.aa_chunk, run, "aa_chunk", 1000)}
    for k, v in ints.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "probe_n" else 1)):
            raise BenchError(f"--{k.replace('_', '-')} {v!r}; accepted: a positive integer")
    if ints["aa_n"] is None:
        ints["aa_n"] = ints["eval_n"]
    all_sets = parse_sets(req.sets)
    check_sets(all_sets, methods)
    points = expand_grid(all_sets)
    axes = {(f"{m}.{k}" if m else k): list(v.values) for m, k, v in all_sets if isinstance(v, Grid)}
    grid_id = hashlib.sha256(json.dumps({"axes": axes, "methods": methods, "preset": preset["name"]},
                                        sort_keys=True, default=str).encode()).hexdigest()[:10] if axes else None
    overrides = {"epochs": req.epochs, "batch_size": req.batch_size, "lr": req.lr}
    pretrained_id, pretrained_path = None, None
    backbone = _timm_backbone(req, arch, dataset)  # an ImageNet-pretrained timm file: every model starts from it
    init = {"init": f"file:{file_digest(backbone)}", "init_path": str(backbone)} if backbone else {}
    if req.pretrained is not None and backbone is None:
        scratch = [m for m in methods if METHODS.get(m).starts_from == "scratch"]
        if scratch:
            raise BenchError(f"--pretrained {req.pretrained} is for methods that start from a trained model; "
                             f"{', '.join(scratch)} train{'s' if len(scratch) == 1 else ''} from scratch and would "
                             "ignore it; accepted: drop --pretrained, or run only fine-tuning methods with it "
                             "(bench list shows what each starts from)")
        pretrained_path, pretrained_method = resolve_pretrained(req.pretrained)
        pretrained_id = f"file:{file_digest(pretrained_path)}"
        for m in methods:
            starts = METHODS.get(m).starts_from
            if starts != "scratch" and pretrained_method not in (None, STARTING_METHOD[starts]):
                raise BenchError(f"--pretrained {req.pretrained} is a {pretrained_method} model; {m} starts from a "
                                 f"{starts} model (accepted: a {STARTING_METHOD[starts]} run or its weights, or a "
                                 "checkpoint from elsewhere)")
    # the data by content, in every run's identity: loads (decodes once into the cache) and refuses a --data-dir
    # that does not exist, before anything is written, also when the runs are done
    data = data_fingerprint(dataset, req.data_dir, req.download)
    if pretrained_path is not None:  # readable, and fits the architecture: before any run directory is made
        check_pretrained(pretrained_path, req.pretrained, arch, dataset, req.data_dir, req.download)
    _check_timm(req, arch, dataset, backbone)
    common = dict(dataset=dataset, arch=arch, preset=preset["name"], precision=precision, attacks=attacks, data=data,
                  normalize=bool(_pick(req.normalize, run, "normalize", False)),
                  channels_last=bool(_pick(req.channels_last, run, "channels_last", False)),
                  compile=bool(_pick(req.compile, run, "compile", False)), device=req.device,
                  data_dir=req.data_dir, results_dir=req.results_dir, download=req.download,
                  world_size=req.world_size, sync_bn=req.sync_bn,
                  bn_ranks=req.world_size if req.world_size > 1 and not req.sync_bn else None, **init, **ints)
    def settings(method: str) -> dict:
        """``common`` with the method's own subset: --subset, else the preset's [method.<name>] / [method."*"] /
        [run] value."""
        subset = req.subset if req.subset is not None else method_run_setting(preset, method, "subset",
                                                                                 common["subset"])
        if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
            raise BenchError(f"preset {preset['name']}: {method}.subset = {subset!r}; accepted: a positive integer")
        return {**common, "subset": subset}

    def _plan_one(m: str, seed: int, sets: list, grid: dict | None) -> Planned:
        hp = resolve_hp(m, preset, overrides, sets)
        cfg = RunConfig(method=m, seed=seed, hp=hp, **settings(m))
        base_cfg = None
        starts = METHODS.get(m).starts_from
        if starts != "scratch":
            cfg.init = cfg.init_path = None  # (its starting model starts from the backbone)
            if pretrained_id is not None:
                cfg.pretrained, cfg.pretrained_path = pretrained_id, str(pretrained_path)
            else:
                base = STARTING_METHOD[starts]
                base_settings = settings(base)
                held = hp.get("holdout_per_class") if METHODS.get(m).base_holdout else None
                if held:  # the base trains on the same images minus the same held-out slice (RiFT)
                    base_settings.update(subset=cfg.subset, holdout=int(held))
                base_cfg = RunConfig(method=base, seed=seed, hp=resolve_hp(base, preset, {}, sets,
                                                                             qualified_only=True), **base_settings)
                cfg.pretrained = base_cfg.run_name
                cfg.pretrained_path = str(RunDir.for_config(base_cfg).final_weights)
        return Planned(cfg, base_cfg, grid)

    configs = []
    for sets, point in points:
        grid = {"id": grid_id, "axes": axes, "point": point} if point else None
        for seed in seeds:
            for m in methods:
                configs.append(_plan_one(m, seed, sets, grid))
    return configs


def completion(cfg: RunConfig, run: RunDir) -> str:
    """``complete`` (done, every evaluation asked for is there), ``evaluate`` (done, evaluations missing) or
    ``train`` (new or partial)."""
    if not run.is_done():
        return "train"
    ev = run.read_eval() or {"results": {}}
    if all(a in ev["results"] for a in cfg.attacks) and not Runner._tsne_missing(cfg, run):
        return "complete"
    return "evaluate"


class Runner:
    """Executes planned runs in this process — or, under data parallelism (``dist``), in every process of the group
    together: all ranks train and evaluate each run, rank 0 alone writes its records, and every decision that
    depends on what is on disk is rank 0's (:meth:`bench.dist.Dist.agree`)."""

    def __init__(self, progress: bool = True, echo: Callable[[str], None] = print, dist: "Dist | None" = None):
        from .dist import SINGLE

        self.dist = dist if dist is not None else SINGLE
        self.progress = progress and self.dist.is_main
        self.echo = echo if self.dist.is_main else (lambda s: None)
        self._data: dict[tuple, Dataset] = {}

    def dataset(self, cfg: RunConfig) -> Dataset:
        key = (cfg.dataset, cfg.data_dir)
        if key not in self._data:
            self._data[key] = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
        ds = self._data[key]
        if cfg.data is not None and ds.fingerprint != cfg.data:
            raise BenchError(f"the {cfg.dataset} data at {ds.source} (fingerprint {ds.fingerprint}) is not the data "
                             f"run {cfg.run_name} was planned with ({cfg.data}): it changed since; plan the run "
                             "again (bench run / bench sweep) to train on the data as it is now")
        return ds

    def execute(self, cfg: RunConfig, base: RunConfig | None = None, grid: dict[str, Any] | None = None,
                needed_by: RunConfig | None = None) -> RunDir | None:
        """Train (or resume) and evaluate one run, after its starting model ``base``; a finished run only gets
        the evaluations it lacks. ``grid``: the grid of ``--set`` values the run is a point of (recorded in its
        ``grids.json``; a run may belong to several grids). A run that another process holds is a one-line error,
        unless it is the starting model of ``needed_by``: then None (the caller waits for it)."""
        from .devices import device_label, resolve_device
        from .engine import Trainer
        from .evaluate import evaluate_heads, evaluate_run, record_tsne

        d = self.dist
        if base is not None and d.agree(completion(cfg, RunDir.for_config(cfg)) != "train"):
            base = None  # trained already: evaluating or completing it needs its own weights, not its starting model's
        if base is not None:
            base_run = RunDir.for_config(base)
            self._wait_while_locked(base_run, f"[{cfg.method} s{cfg.seed}] needs the {base.method} model")
            # (the base's own execute says it trains it for this run, once its training is set up: a bad value
            # it meets is the command's one line of output)
            # another process may take the base's lock in the same instant: then wait for it, as for one that
            # started earlier, and go on with the model it made
            while not self.execute(base, needed_by=cfg):
                self._wait_while_locked(base_run, f"[{cfg.method} s{cfg.seed}] needs the {base.method} model")
            if d.agree(not base_run.final_weights.is_file()):
                self._rebuild_weights(base, base_run, cfg)
        run = RunDir.for_config(cfg)
        device = device_label(resolve_device(cfg.device, d), d)
        if d.agree(bool(run.damage())):
            if d.agree(d.main_only(lambda: self._repair(cfg, run, device, needed_by), f"repairing {run.name}")
                       ) is False:
                return None  # another process holds it (a starting model): the caller waits
        if run.is_done():
            bad = d.agree(run.weights_mismatch())
            if bad:
                raise BenchError(f"run {run.name}: {bad}; accepted: restore that file, or delete {run.ckpt_dir} and "
                                 f"{run.done} to train the run again")
        if grid:
            d.main_only(lambda: run.add_grid(grid), f"recording the grid of {run.name}")
        if d.agree(completion(cfg, run)) == "complete":
            self.echo(f"[{cfg.method} s{cfg.seed}] already done: {run.path}")
            return run
        dataset = self.dataset(cfg)
        lock = run.lock

        def take() -> bool:
            if not lock.try_acquire():
                if needed_by is not None:
                    return False
                raise lock._busy()
            run.remove_stale_temporaries()
            if not run.config.is_file():
                run.write_config(cfg, device)
            return True

        # a run in use elsewhere stops every rank (or, for a starting model, sends every rank back to waiting)
        if not d.agree(d.main_only(take, f"taking the lock of {run.name}")):
            return None
        try:
            if d.agree(run.is_done()):  # (finished by another process while this one waited)
                evaluate_run(cfg, dataset, run, progress=self.progress, echo=self.echo, dist=d)
                d.main_only(lambda: self._backfill_tsne(cfg, dataset, run), f"the t-SNE of {run.name}")
                return run
            trainer = Trainer(cfg, dataset, run, init_weights=cfg.pretrained_path, progress=self.progress,
                              echo=self.echo, dist=d)
            trainer.resume()
            if needed_by is not None:
                self.echo(f"[{needed_by.method} s{needed_by.seed}] needs the {cfg.method} model {cfg.run_name}: "
                          "training it first")
            trainer.train()
            model = trainer.export()
            self.echo(f"[{cfg.method} s{cfg.seed}] evaluating: {', '.join(cfg.attacks)}")
            evaluate_run(cfg, dataset, run, model, progress=self.progress, echo=self.echo, dist=d)
            evaluate_heads(cfg, dataset, run, trainer.method.eval_heads(trainer.evaluated_module()),
                           device=trainer.device, progress=self.progress, echo=self.echo, dist=d)
            d.main_only(lambda: record_tsne(cfg, dataset, run, trainer.method, trainer.evaluated_module(),
                                            device=trainer.device, echo=self.echo), f"the t-SNE of {run.name}")
            # the other ranks go on only once rank 0 has written everything (a later run loads it)
            d.main_only(run.mark_done, f"finishing {run.name}")
        finally:
            lock.release()
        return run

    def _rebuild_weights(self, base: RunConfig, base_run: RunDir, cfg: RunConfig) -> None:
        """The starting model ``base`` is recorded as done but its weights are not here (they are never in git: a
        clone of the results, or another sitting): train it again in ``ckpt/rebuild/`` of its run directory, under
        its lock, leaving its records untouched. When the rebuilt weights are the model its ``eval.json`` evaluated
        (same digest: the same machine kind and torch), they become its final weights; otherwise they are kept
        there and the run stops with a one-line error (fine-tuning from a model the record does not describe would
        make a run whose hash promises what it does not hold)."""
        import shutil

        from .checkpoint import tensor_digest
        from .devices import device_label, resolve_device
        from .engine import Trainer
        from .fsutil import check_inside

        d = self.dist
        device = device_label(resolve_device(base.device, d), d)
        scratch = RunDir(base_run.ckpt_dir / "rebuild")
        check_inside(base_run.root, scratch.path, "rebuild directory")
        want = d.agree(((base_run.read_eval() or {}).get("meta") or {}).get("weights_sha256"))
        self._wait_while_locked(base_run, f"[{cfg.method} s{cfg.seed}] needs the {base.method} model")
        lock = base_run.lock
        if not d.agree(d.main_only(lock.try_acquire, f"taking the lock of {base_run.name}")):
            raise lock._busy()
        try:
            if d.agree(base_run.final_weights.is_file()):  # (rebuilt by another process while this one waited)
                return
            d.main_only(lambda: (scratch.path.mkdir(parents=True, exist_ok=True), scratch.remove_stale_temporaries(),
                                 scratch.config.is_file() or scratch.write_config(base, device)),
                        f"preparing {scratch.path}")
            trainer = Trainer(base, self.dataset(base), scratch, init_weights=base.pretrained_path,
                              progress=self.progress, echo=self.echo, dist=d)
            trainer.resume()
            self.echo(f"[{cfg.method} s{cfg.seed}] the {base.method} run {base_run.name} is done but its weights "
                      f"(never in git) are not here: training it again in {scratch.path} to rebuild them")
            trainer.train()
            got = tensor_digest(trainer.export().state_dict())[:16]
            if want and got != want:
                raise BenchError(
                    f"the {base.method} run {base_run.path} is done but its weights are not here, and training it "
                    f"again gave other weights (digest {got}, evaluated: {want}; another machine kind or torch: see "
                    f"the README on what a run hash promises), kept in {scratch.path}; accepted: --pretrained "
                    f"{scratch.path} to fine-tune from them, or delete {base_run.path} to train and evaluate it again")

            def install() -> None:
                os.replace(scratch.final_weights, base_run.final_weights)
                shutil.rmtree(scratch.path)

            d.main_only(install, f"installing the rebuilt weights of {base_run.name}")
            self.echo(f"[{cfg.method} s{cfg.seed}] rebuilt the weights of {base_run.name}"
                      + (f": digest {got}, the model its eval.json evaluated" if want else
                         " (its eval.json records no digest to check them against)"))
        finally:
            d.main_only(lock.release, f"releasing the lock of {base_run.name}")

    def _repair(self, cfg: RunConfig, run: RunDir, device: str, needed_by: RunConfig | None) -> bool:
        """Repair the damaged records of ``run`` under its lock (False: another process holds it and this is a
        starting model to wait for): a damaged config.json is rewritten from the plan, a damaged eval.json is
        evaluated again, a damaged metrics.jsonl is rebuilt from the last checkpoint (which holds every row) or, for a
        run not yet done, by its resumed training. Each damaged file is kept beside as ``<name>.damaged``. A done run
        whose rows no checkpoint holds is refused."""
        from .checkpoint import CorruptCheckpoint, load_state

        lock = run.lock
        if not lock.try_acquire():
            if needed_by is not None:
                return False
            raise lock._busy()
        try:
            for err in run.damage():
                kept = run.set_aside(err.path)
                if err.path == run.config:
                    run.write_config(cfg, device)
                elif err.path == run.metrics and run.is_done():
                    last = run.ckpt_dir / "last.safetensors"
                    try:
                        state = load_state(last) if last.is_file() else None
                    except CorruptCheckpoint:
                        state = None
                    if state is None or state.get("run_hash") != cfg.run_hash:
                        os.replace(kept, err.path)  # nothing better to offer: leave it as it was
                        raise BenchError(f"run {run.name}: {err}, and no checkpoint holds its rows ({last}); "
                                         f"accepted: delete {run.path} to train the run again")
                    run.write_metrics(list(state["metrics"]))
                self.echo(f"[{cfg.method} s{cfg.seed}] {err}: kept as {kept.name}, "
                          + ("rewritten from the plan" if err.path == run.config else
                             "evaluated again" if err.path == run.eval else
                             "rebuilt from the last checkpoint" if run.is_done() else "rebuilt by the resumed training"))
        finally:
            lock.release()
        return True

    def _wait_while_locked(self, run: RunDir, what: str, poll_s: float = 10.0) -> None:
        """Wait while another live process holds ``run`` (e.g. a sweep job training a base run several runs need),
        then go on: it is done, or this process takes it over."""
        import time

        d = self.dist
        said = False
        while d.agree(run.lock.is_held_by_other()):  # every rank polls rank 0's view: no rank waits in a collective
            if not said:
                holder = run.lock.holder()
                self.echo(f"{what} {run.name}, which process {holder[1] if holder else '?'} on "
                          f"{holder[0] if holder else '?'} is training: waiting for it")
                said = True
            time.sleep(poll_s)

    @staticmethod
    def _tsne_missing(cfg: RunConfig, run: RunDir) -> bool:
        """A finished run of a method with t-SNE features whose ``tsne.json`` is missing but whose last checkpoint
        is here (runs recorded before the suite made t-SNEs)."""
        from methods import Method, get_method

        cls = get_method(cfg.method)
        return (cls.tsne_features is not Method.tsne_features and not (run.path / "tsne.json").exists()
                and (run.ckpt_dir / "last.safetensors").is_file())

    def _backfill_tsne(self, cfg: RunConfig, dataset: Dataset, run: RunDir) -> None:
        from .engine import Trainer
        from .evaluate import record_tsne

        if not self._tsne_missing(cfg, run):
            return
        trainer = Trainer(cfg, dataset, run, init_weights=cfg.pretrained_path, progress=False, echo=self.echo)
        trainer.resume()
        record_tsne(cfg, dataset, run, trainer.method, trainer.evaluated_module(), device=trainer.device,
                    echo=self.echo)


def execute_planned(planned: list[Planned], *, dist: "Dist | None" = None, progress: bool = True,
                    echo: Callable[[str], None] = print) -> list[RunDir]:
    """Execute planned runs in order (each after its starting model) in this process or process group."""
    runner = Runner(progress=progress, echo=echo, dist=dist)
    done = []
    for p in planned:
        runner.execute(p.cfg, p.base, p.grid)
        done.append(RunDir.for_config(p.cfg))
    return done


def summary_rows(runs: list[RunDir]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        rec = run.read_config()
        c = rec["config"]
        metrics = run.read_metrics()
        record = run.read_eval() or {}
        ev = record.get("results", {})
        secs = [m["seconds"] for m in metrics]
        rows.append({"method": c["method"], "seed": c["seed"], "dataset": c["dataset"], "arch": c["arch"],
                     **{a: ev.get(a, {}).get("acc") for a in ("clean", "pgd20", "aa")},
                     **{f"{a}_n": ev.get(a, {}).get("n") for a in ("clean", "pgd20", "aa")},
                     "s_per_epoch": sum(secs) / len(secs) if secs else None, "epochs": len(metrics),
                     "device": rec.get("device"), "suspect": record.get("suspect", []), "run": run.name})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Clean / PGD-20 / AutoAttack (accuracy %, with n), seconds per epoch and the sanity checks, one line per run;
    a run with a failed check is marked SUSPECT with the checks' names."""
    head = ["method", "seed", "Clean", "PGD-20", "AA", "s/epoch", "epochs", "checks", "run"]
    lines = []

    def acc(r, a):
        return "—" if r[a] is None else f"{r[a]:.2f} (n={r[a + '_n']})"

    for r in rows:
        lines.append([r["method"], str(r["seed"]), acc(r, "clean"), acc(r, "pgd20"), acc(r, "aa"),
                      "—" if r["s_per_epoch"] is None else f"{r['s_per_epoch']:.2f}", str(r["epochs"]),
                      "SUSPECT: " + ",".join(r["suspect"]) if r["suspect"] else "ok", r["run"]])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    devices = sorted({r["device"] for r in rows if r["device"]})
    if devices:
        out.append(f"device: {'; '.join(devices)}")
    return "\n".join(out)
