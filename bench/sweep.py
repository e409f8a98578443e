"""``bench sweep``: grids of runs — methods × datasets × architectures × seeds × ``--set`` grids — launched one after
another here, one per visible GPU (submitit's local executor), or as Slurm job arrays (submitit).

The unit of work is one run, exactly what ``bench run`` plans for it: its directory, its hash, its starting model.
Runs that fine-tune a suite-trained model need that *base* run first; a sweep launches the missing bases first and
the runs after them (Slurm: a second array with ``--dependency=afterok`` on the first; the local launchers wait).

Idempotent: a run that is done (trained and evaluated) is never launched again, nor one that is running — its run
directory is locked by a live process, or it belongs to a job of an earlier launch that the scheduler still lists
as pending or running (``<results>/sweeps/jobs.json`` records every launch: launcher, job id, host, runs). So a sweep
can be launched again at any time: it fills in what is missing. Jobs are submitit ``Checkpointable``: on preemption
or time-out Slurm requeues them and the run resumes from its last checkpoint (every run is resumable).

Several GPUs per run (``--gpus-per-run N``): each job starts N tasks that form one DistributedDataParallel group
(submitit's ``TorchDistributedEnvironment``), exactly like ``bench run --nproc N``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .config import RunConfig
from .errors import BenchError
from .fsutil import RunLock, atomic_write_json, read_json
from .records import RunDir
from .runner import RunRequest, completion, plan

LAUNCHERS = ("local", "slurm")
# submitit executors behind --launcher slurm: the real cluster, or stand-ins that run here (tests, dry rehearsal)
CLUSTERS = ("slurm", "local", "debug")
ACTIVE_SLURM = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN",
                "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}


@dataclass
class Unit:
    """One run of the sweep and the suite-trained base run it starts from (None: from scratch or --pretrained)."""

    cfg: RunConfig
    base: RunConfig | None = None
    grid: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.cfg.run_name

    def payload(self) -> dict[str, Any]:
        """What a job needs to run it (plain data: pickled into the job)."""
        return {"cfg": self.cfg.to_dict(), "base": self.base.to_dict() if self.base else None, "grid": self.grid}


@dataclass
class SweepSpec:
    """``bench sweep``'s request: one :class:`RunRequest` template, expanded over datasets and architectures."""

    request: RunRequest
    datasets: list[str | None] = field(default_factory=lambda: [None])
    archs: list[str | None] = field(default_factory=lambda: [None])
    data_dirs: dict[str, str] = field(default_factory=dict)


def parse_data_dirs(values: Sequence[str], datasets: Sequence[str | None]) -> dict[str, str]:
    """``--data-dir DIR`` (one dataset) or ``--data-dir NAME=DIR`` (repeatable, one per dataset)."""
    out: dict[str, str] = {}
    plain = [v for v in values if "=" not in v]
    for v in values:
        if "=" in v:
            name, path = v.split("=", 1)
            out[name.strip()] = path
    if plain:
        named = [d for d in datasets if d is not None]
        if len(plain) > 1 or len(named) > 1:
            what = f"{len(named)} datasets ({', '.join(named)})" if len(named) > 1 else "one dataset"
            raise BenchError(f"--data-dir {plain[0]!r} without a dataset name, given {len(plain)} time(s) while "
                             f"sweeping {what}; accepted: --data-dir NAME=DIR for each dataset (e.g. --data-dir "
                             "cifar10=/data/cifar10)")
        for d in named or [None]:
            out[d or "*"] = plain[0]
    return out


def expand(spec: SweepSpec) -> list[Unit]:
    """Every run of the sweep (bench run's plan for each dataset × architecture), each once, in launch order."""
    from .data import DATASETS
    from .models import MODELS

    for d in spec.datasets:
        if d is not None:
            DATASETS.get(d)
    for a in spec.archs:
        if a is not None:
            MODELS.get(a)
    units: dict[str, Unit] = {}
    for dataset in spec.datasets:
        for arch in spec.archs:
            data_dir = spec.data_dirs.get(dataset or "*", spec.data_dirs.get("*", spec.request.data_dir))
            req = dataclasses.replace(spec.request, dataset=dataset or spec.request.dataset,
                                      arch=arch or spec.request.arch, data_dir=data_dir)
            for p in plan(req):
                units.setdefault(p.cfg.run_name, Unit(p.cfg, p.base, p.grid))
    return list(units.values())


# ---------------------------------------------------------------------------------------------------------------
# the record of launches


class JobBook:
    """``<results>/sweeps/jobs.json``: every job a sweep launched (launcher, cluster, job id, host, the runs it
    does). A launch plans, submits and records under the book's lock (:meth:`session`), recording each submission
    as soon as it is made, so that two launches cannot interleave (the second is told the first holds the lock) and
    a launch that fails half-way keeps the record of what it did submit."""

    def __init__(self, results_dir: str | Path):
        self.dir = Path(results_dir) / "sweeps"
        self.path = self.dir / "jobs.json"
        self.folder = self.dir / "submitit"
        self.jobs: list[dict[str, Any]] | None = None  # inside a session: the list as read under the lock

    def read(self) -> list[dict[str, Any]]:
        if self.jobs is not None:
            return list(self.jobs)
        return self._from_disk()

    def _from_disk(self) -> list[dict[str, Any]]:
        return list(read_json(self.path).get("jobs", [])) if self.path.is_file() else []

    @contextlib.contextmanager
    def session(self) -> Iterator["JobBook"]:
        """Hold the book's lock; :meth:`add` writes through at once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.dir).hold():
            self.jobs = self._from_disk()
            try:
                yield self
            finally:
                self.jobs = None

    def add(self, records: list[dict[str, Any]]) -> None:
        if self.jobs is None:
            with self.session():
                self.add(records)
            return
        self.jobs.extend(records)
        atomic_write_json(self.path, {"jobs": self.jobs})

    @staticmethod
    def active(job: dict[str, Any]) -> bool:
        """Whether the scheduler still runs (or will run) ``job``."""
        cluster = job.get("cluster")
        if cluster == "slurm":
            try:
                import submitit

                state = submitit.SlurmJob(folder=job["folder"], job_id=str(job["job_id"])).state
            except Exception:  # sacct / squeue unreachable: assume it may still run (never launch twice)
                return True
            return str(state).upper() in ACTIVE_SLURM
        if cluster in ("local", "inline"):
            if job.get("host") != socket.gethostname():
                return True  # another machine's process: cannot tell, assume alive
            return RunLock._alive(int(job["pid"]))
        return False  # debug: ran inside the launching process, which is over

    def active_jobs_by_run(self) -> dict[str, list[dict[str, Any]]]:
        """Run name -> the recorded jobs that are still active and do it (one scheduler query per job)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for job in self.read():
            if self.active(job):
                for r in job.get("runs", []):
                    out.setdefault(r, []).append(job)
        return out

    def running_runs(self) -> set[str]:
        return set(self.active_jobs_by_run())


# ---------------------------------------------------------------------------------------------------------------
# states


def run_state(cfg: RunConfig, running: set[str]) -> str:
    """``done`` (trained and evaluated with every attack asked), ``running`` (its directory is locked by a live
    process, or an active job of an earlier launch holds it), else ``todo`` (new, partial or evaluations missing)."""
    run = RunDir.for_config(cfg)
    if completion(cfg, run) == "complete":
        return "done"
    if cfg.run_name in running or _lock_is_live(run):
        return "running"
    return "todo"


def _lock_is_live(run: RunDir) -> bool:
    """A process holds the run's lock now: the kernel's (or, on NFS, the file server's) flock, which a killed job
    does not keep, on this host or another."""
    return run.lock.is_held_by_other()


@dataclass
class SweepPlan:
    units: list[Unit]
    states: dict[str, str]  # run name -> done / running / todo (units and their bases)
    bases: list[RunConfig]  # the base runs to launch first (todo), a unit of the sweep or not
    todo: list[Unit]  # the units to launch after them (those that are bases are launched as bases)
    waits_on: dict[str, list[str]] = field(default_factory=dict)  # unit -> bases it waits for (launched or running)
    base_payloads: dict[str, dict[str, Any]] = field(default_factory=dict)  # base run -> what its job runs
    active: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run -> earlier jobs still active on it

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "running": 0, "todo": 0}
        for u in self.units:
            out[self.states[u.name]] += 1
        return out


def make_plan(spec: SweepSpec, book: JobBook | None = None) -> SweepPlan:
    units = expand(spec)
    book = book or JobBook(spec.request.results_dir)
    active = book.active_jobs_by_run()
    running = set(active)
    states: dict[str, str] = {}
    bases: dict[str, RunConfig] = {}
    todo: list[Unit] = []
    waits: dict[str, list[str]] = {}
    for u in units:
        states[u.name] = run_state(u.cfg, running)
        if u.base is not None and u.base.run_name not in states:
            states[u.base.run_name] = run_state(u.base, running)
    for u in units:
        if states[u.name] != "todo":
            continue
        todo.append(u)
        if u.base is not None and states[u.base.run_name] != "done":
            waits[u.name] = [u.base.run_name]
            if states[u.base.run_name] == "todo":
                bases.setdefault(u.base.run_name, u.base)
    # a unit that is also a base (natural beside the methods fine-tuning it) is launched once, as a base
    as_unit = {u.name: u for u in todo}
    payloads = {n: (as_unit[n] if n in as_unit else Unit(b)).payload() for n, b in bases.items()}
    todo = [u for u in todo if u.name not in bases]
    return SweepPlan(units, states, list(bases.values()), todo, waits, payloads, active)


# ---------------------------------------------------------------------------------------------------------------
# what a job runs


def run_payloads(payloads: list[dict[str, Any]], quiet: bool = True) -> list[str]:
    """Run each payload (a unit, or a base run alone) in this process — or in the DistributedDataParallel group
    this job's tasks form (submitit's environment, several tasks per job). Returns the run names."""
    from .dist import Dist, launched_distributed
    from .runner import Runner

    if not launched_distributed() and _submitit_tasks() > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    first = RunConfig.from_dict(payloads[0]["cfg"]) if payloads else None
    dist = Dist.from_env(first.device if first else "auto", sync_bn=first.sync_bn if first else True)
    runner = Runner(progress=not quiet, echo=lambda s: print(s, file=sys.stderr, flush=True), dist=dist)
    names = []
    try:
        for p in payloads:
            cfg = RunConfig.from_dict(p["cfg"])
            cfg.world_size = dist.world
            base = RunConfig.from_dict(p["base"]) if p.get("base") else None
            runner.execute(cfg, base, p.get("grid"))
            names.append(cfg.run_name)
    finally:
        dist.close()
    return names


def _submitit_tasks() -> int:
    for key in ("SUBMITIT_LOCAL_NTASKS", "SLURM_NTASKS"):
        if os.environ.get(key):
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 1


class SweepJob:
    """The callable a submitit job runs: its runs, one after another. It is checkpointable (submitit calls
    ``checkpoint`` on preemption or time-out and requeues what it returns: the same runs), and each run resumes
    from its last checkpoint."""

    def __init__(self, payloads: list[dict[str, Any]]):
        self.payloads = payloads

    def __call__(self) -> list[str]:
        return run_payloads(self.payloads)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(SweepJob(self.payloads))


# ---------------------------------------------------------------------------------------------------------------
# launchers


@dataclass
class LaunchOptions:
    launcher: str = "local"
    cluster: str = "slurm"  # submitit executor for --launcher slurm (local / debug run here: tests)
    gpus_per_run: int = 1
    parallel: int | None = None  # local: runs at once (default: visible GPUs // gpus_per_run, at least 1)
    partition: str | None = None
    time_min: int = 24 * 60
    array_parallelism: int = 64
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    slurm_args: dict[str, str] = field(default_factory=dict)
    max_timeouts: int = 10  # slurm: how many time-outs a job is requeued after (preemptions do not count)
    wait: bool = False  # submitit launchers: block until every job has finished


@dataclass
class Launched:
    jobs: list[Any]  # submitit jobs (empty for the in-process launcher)
    records: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)  # run names done in this process (in-process launcher)
    plan: SweepPlan | None = None


def _record(job_id: Any, cluster: str, runs: list[str], book: JobBook, phase: str) -> dict[str, Any]:
    """The jobs.json entry of one job. ``pid``: the process whose life is the job's (this process for the
    in-process launcher, the controller for submitit's local executor)."""
    job_id = str(job_id)
    pid = int(job_id) if cluster in ("local", "inline") and job_id.isdigit() else None
    return {"job_id": job_id, "cluster": cluster, "host": socket.gethostname(), "pid": pid,
            "folder": None if cluster == "inline" else str(book.folder / "%j"), "runs": runs, "phase": phase,
            "submitted": _now()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _chains(sp: SweepPlan, k: int) -> list[list[dict[str, Any]]]:
    """Split the work into ``k`` sequential chains for the local launcher: a base run and the units that start from
    it go together (the base first), groups go to the chain with the fewest epochs so far."""
    groups: dict[str, list[dict[str, Any]]] = {n: [p] for n, p in sp.base_payloads.items()}
    for u in sp.todo:
        groups.setdefault(u.base.run_name if u.base is not None and u.base.run_name in groups else u.name,
                          []).append(u.payload())
    chains: list[list[dict[str, Any]]] = [[] for _ in range(k)]
    load = [0] * k

    def epochs(ps: list[dict[str, Any]]) -> int:
        return sum(int(p["cfg"]["hp"].get("epochs", 1)) for p in ps)

    for ps in sorted(groups.values(), key=lambda ps: -epochs(ps)):
        i = min(range(k), key=lambda j: load[j])
        chains[i].extend(ps)
        load[i] += epochs(ps)
    return [c for c in chains if c]


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


def launch(spec: SweepSpec, opts: LaunchOptions, echo: Callable[[str], None] = print,
           quiet: bool = True) -> Launched:
    """Plan (under the job book's lock, so that the plan sees every earlier launch) and launch what is neither done
    nor running; every job is recorded in ``jobs.json`` as soon as it is submitted."""
    if opts.launcher not in LAUNCHERS:
        raise BenchError(f"unknown --launcher {opts.launcher!r}; accepted: {', '.join(LAUNCHERS)}")
    if opts.cluster not in CLUSTERS:
        raise BenchError(f"unknown --cluster {opts.cluster!r}; accepted: {', '.join(CLUSTERS)}")
    book = JobBook(spec.request.results_dir)
    inline: list[dict[str, Any]] = []
    with book.session():
        sp = make_plan(spec, book)
        if not sp.todo and not sp.bases:
            return Launched([], [], plan=sp)
        if opts.launcher == "local":
            out = _launch_local(sp, opts, book, echo)
            inline = [] if out.jobs else [*sp.base_payloads.values(), *(u.payload() for u in sp.todo)]
        else:
            out = _launch_submitit(sp, opts, book, opts.cluster, echo)
    if inline:  # the in-process launcher runs after the book is released: its record says it is running
        out.ran = run_payloads(inline, quiet=quiet)
    if opts.wait or (opts.launcher == "slurm" and opts.cluster != "slurm"):
        for job in out.jobs:
            job.results()
    return out


def _launch_local(sp: SweepPlan, opts: LaunchOptions, book: JobBook, echo) -> Launched:
    gpus = visible_gpus()
    k = opts.parallel if opts.parallel is not None else max(1, gpus // max(opts.gpus_per_run, 1))
    if gpus and k * opts.gpus_per_run > gpus:
        raise BenchError(f"--parallel {k} × --gpus-per-run {opts.gpus_per_run} needs {k * opts.gpus_per_run} GPUs; "
                         f"{gpus} are visible")
    if k == 1 and opts.gpus_per_run == 1:  # one after another, in this process (launch() runs them)
        runs = [*sp.base_payloads, *(u.name for u in sp.todo)]
        rec = _record(os.getpid(), "inline", runs, book, "all")
        book.add([rec])
        echo(f"sweep: running {len(runs)} run(s) here, one after another")
        return Launched([], [rec], plan=sp)
    import submitit

    ex = submitit.LocalExecutor(folder=str(book.folder / "%j"))
    jobs, recs = [], []
    for i, chain in enumerate(_chains(sp, k)):
        g = opts.gpus_per_run
        ex.update_parameters(timeout_min=opts.time_min, tasks_per_node=g, gpus_per_node=g if gpus else 0,
                             visible_gpus=tuple(range(i * g, (i + 1) * g)) if gpus else ())
        job = ex.submit(SweepJob(chain))
        rec = _record(job.job_id, "local", [RunConfig.from_dict(p["cfg"]).run_name for p in chain], book, "chain")
        book.add([rec])
        jobs.append(job)
        recs.append(rec)
    echo(f"sweep: {len(jobs)} local job(s) ({', '.join(str(j.job_id) for j in jobs)}), logs in {book.folder}")
    return Launched(jobs, recs, plan=sp)


def executor_params(opts: LaunchOptions, cluster: str, after: Sequence[str] = ()) -> dict[str, Any]:
    """submitit (AutoExecutor) parameters of a sweep's jobs; ``after``: Slurm job ids they must wait for
    (``--dependency=afterok:...``, and ``--kill-on-invalid-dep=yes`` so that a job whose base failed is cancelled
    instead of pending for ever)."""
    g = opts.gpus_per_run
    params: dict[str, Any] = {"timeout_min": opts.time_min, "name": "aft-bench", "nodes": 1, "tasks_per_node": g,
                              "slurm_array_parallelism": opts.array_parallelism}
    if cluster != "slurm":
        return params
    params["gpus_per_node"] = g
    params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]  # a failed task stops its DDP group at once
    for key, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                       ("constraint", opts.constraint)):
        if value:
            params[f"slurm_{key}"] = value
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    extra: dict[str, Any] = dict(opts.slurm_args)
    if after:
        extra["dependency"] = "afterok:" + ":".join(after)
        extra["kill-on-invalid-dep"] = "yes"
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def _executor(opts: LaunchOptions, book: JobBook, cluster: str, after: Sequence[str] = ()):
    import submitit

    kw = {"slurm_max_num_timeout": opts.max_timeouts} if cluster == "slurm" else {}
    ex = submitit.AutoExecutor(folder=str(book.folder / "%j"), cluster=cluster, **kw)
    ex.update_parameters(**executor_params(opts, cluster, after))
    return ex


def _launch_submitit(sp: SweepPlan, opts: LaunchOptions, book: JobBook, cluster: str, echo) -> Launched:
    """Phase 1: an array of the missing base runs; phase 2: the runs, one job each, in arrays that share their
    dependencies. On Slurm a run's job waits for its own base (``--dependency=afterok`` on the new base job, or on
    an earlier job still training it); the stand-in executors run here, so the launcher waits for phase 1 itself."""
    jobs, recs = [], []
    base_jobs: dict[str, str] = {}
    if sp.bases:
        ex = _executor(opts, book, cluster)
        names = list(sp.base_payloads)
        with ex.batch():
            submitted = [ex.submit(SweepJob([sp.base_payloads[n]])) for n in names]
        new = [_record(job.job_id, cluster, [n], book, "base") for n, job in zip(names, submitted)]
        book.add(new)
        base_jobs = {n: str(job.job_id) for n, job in zip(names, submitted)}
        jobs += submitted
        recs += new
        echo(f"sweep: {len(submitted)} base run(s) submitted ({cluster}): "
             f"{', '.join(str(j.job_id) for j in submitted)}")
        if cluster != "slurm":
            for job in submitted:
                job.results()
    earlier = {r: {str(j["job_id"]) for j in jobs if j.get("cluster") == "slurm"} for r, jobs in sp.active.items()}
    groups: dict[tuple[str, ...], list[Unit]] = {}
    for u in sp.todo:
        after: set[str] = set()
        if cluster == "slurm":
            for b in sp.waits_on.get(u.name, []):
                after |= {base_jobs[b]} if b in base_jobs else earlier.get(b, set())
        groups.setdefault(tuple(sorted(after)), []).append(u)
    for after_ids, units in groups.items():
        ex = _executor(opts, book, cluster, after_ids)
        with ex.batch():
            submitted = [ex.submit(SweepJob([u.payload()])) for u in units]
        new = [_record(job.job_id, cluster, [u.name], book, "run") for u, job in zip(units, submitted)]
        book.add(new)
        jobs += submitted
        recs += new
    echo(f"sweep: {len(sp.todo)} run(s) submitted ({cluster}), logs in {book.folder}")
    return Launched(jobs, recs, plan=sp)


def describe(sp: SweepPlan) -> list[str]:
    """One line per run: state, run name, what it waits for."""
    lines = []
    for u in sp.units:
        wait = f"  (after {', '.join(sp.waits_on[u.name])})" if u.name in sp.waits_on else ""
        lines.append(f"{sp.states[u.name]:<8} {u.name}{wait}")
    for b in sp.bases:
        lines.append(f"{'base':<8} {b.run_name}  (trained first)")
    return lines


__all__ = ["CLUSTERS", "LAUNCHERS", "JobBook", "LaunchOptions", "Launched", "SweepJob", "SweepPlan", "SweepSpec",
           "Unit", "describe", "executor_params", "expand", "launch", "make_plan", "parse_data_dirs", "run_payloads",
           "run_state"]
