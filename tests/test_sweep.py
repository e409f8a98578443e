"""bench sweep: the grid expands into exactly the runs `bench run` plans; the local launcher runs them here; the
slurm launcher, exercised through submitit's local executor (processes on this machine) so that no cluster is
needed, launches the base runs first and one job per run; launching again launches only what is neither done nor
running; a preempted job is requeued and its run resumes from its last checkpoint to the uninterrupted result."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from bench.errors import BenchError
from bench.records import RunDir
from bench.runner import RunRequest, plan
from bench.sweep import (JobBook, LaunchOptions, SweepJob, SweepSpec, executor_params, expand, launch, make_plan,
                         parse_data_dirs)

pytestmark = pytest.mark.slow

SMALL = dict(preset="smoke", subset=10, epochs=1, attacks="clean", eval_n=20, probe_n=4, device="cpu",
             sets=["natural.epochs=1"])


def _req(tmp_path, **kw):
    kw = {**SMALL, "results_dir": str(tmp_path / "results"), **kw}
    if kw.get("methods") == ["pgd-at"]:  # no natural model to set epochs for: --set natural.* would be refused
        kw["sets"] = [s for s in kw["sets"] if not s.startswith("natural.")]
    return RunRequest(**kw)


def _fashion_mnist_files(root):
    """A tiny Fashion-MNIST on disk (the IDX layout): planning reads the data, whose fingerprint is in the runs'
    identity, and a test machine need not have Debian's copy."""
    import gzip
    import struct

    import numpy as np
    rng = np.random.default_rng(0)
    root.mkdir()
    for name, shape in (("train-images-idx3-ubyte", (20, 28, 28)), ("train-labels-idx1-ubyte", (20,)),
                        ("t10k-images-idx3-ubyte", (10, 28, 28)), ("t10k-labels-idx1-ubyte", (10,))):
        a = rng.integers(0, 10 if len(shape) == 1 else 256, shape).astype(np.uint8)
        head = struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(">" + "I" * a.ndim, *a.shape)
        with gzip.open(root / (name + ".gz"), "wb") as f:
            f.write(head + a.tobytes())
    return str(root)


def test_the_grid_is_the_runs_bench_run_plans(tmp_path):
    req = _req(tmp_path, methods=["pgd-at", "afd"], seeds="0-2", sets=["natural.epochs=1", "afd.gamma=5,25"])
    fmnist = _fashion_mnist_files(tmp_path / "fmnist")
    units = expand(SweepSpec(req, ["synthetic", "fashion-mnist"], ["smallcnn", "resnet18"],
                             data_dirs={"fashion-mnist": fmnist}))
    # (pgd-at + afd × 2 gamma) × 3 seeds × 2 datasets × 2 archs
    assert len(units) == (1 + 2) * 3 * 2 * 2 == len({u.name for u in units})
    for dataset in ("synthetic", "fashion-mnist"):
        for arch in ("smallcnn", "resnet18"):
            data_dir = fmnist if dataset == "fashion-mnist" else None
            names = {p.cfg.run_name for p in plan(RunRequest(**{**req.__dict__, "dataset": dataset, "arch": arch,
                                                                 "data_dir": data_dir}))}
            assert names <= {u.name for u in units}
    afd = [u for u in units if u.cfg.method == "afd"]
    assert all(u.base is not None and u.base.method == "natural" for u in afd)
    assert len({u.base.run_name for u in afd}) == 3 * 2 * 2  # one natural base per seed × dataset × arch
    with pytest.raises(BenchError, match="unknown dataset 'cifar11'"):
        expand(SweepSpec(req, ["cifar11"]))


def test_data_dirs():
    assert parse_data_dirs(["/d"], ["cifar10"]) == {"cifar10": "/d"}
    assert parse_data_dirs(["cifar10=/a", "cifar100=/b"], ["cifar10", "cifar100"]) == {"cifar10": "/a",
                                                                                      "cifar100": "/b"}
    with pytest.raises(BenchError, match="--data-dir '/d' without a dataset name.*accepted: --data-dir NAME=DIR"):
        parse_data_dirs(["/d"], ["cifar10", "cifar100"])


def test_local_launcher_runs_here_and_launching_again_launches_nothing(tmp_path):
    req = _req(tmp_path, methods=["pgd-at", "vaft"], seeds="0,1")
    spec = SweepSpec(req)
    sp = make_plan(spec)
    assert sp.counts() == {"done": 0, "running": 0, "todo": 4} and len(sp.bases) == 2
    out = launch(spec, LaunchOptions(launcher="local"), echo=lambda s: None)
    assert out.ran == [b.run_name for b in sp.bases] + [u.name for u in sp.todo]  # the bases first
    again = make_plan(spec)
    assert again.counts() == {"done": 4, "running": 0, "todo": 0} and not again.bases
    assert launch(spec, LaunchOptions(launcher="local")).records == []


def _wait_for(pred, timeout=300.0, every=0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(every)
    return False


def test_slurm_launcher_on_submitits_local_executor(tmp_path):
    """Base runs first (their own array), then one job per run; every job recorded; a second launch launches
    nothing; what the jobs trained is what `bench run` would have (the same run directories, done)."""
    req = _req(tmp_path, methods=["pgd-at", "vaft"], seeds="0")
    spec = SweepSpec(req)
    out = launch(spec, LaunchOptions(launcher="slurm", cluster="local", time_min=10), echo=lambda s: None)
    phases = [r["phase"] for r in out.records]
    assert phases == ["base", "run", "run"]
    assert all(j.state in ("FINISHED", "DONE", "COMPLETED") or j.done() for j in out.jobs)
    for p in plan(req):
        assert RunDir.for_config(p.cfg).is_done() and RunDir.for_config(p.base or p.cfg).is_done()
    book = JobBook(req.results_dir)
    assert [j["job_id"] for j in book.read()] == [r["job_id"] for r in out.records]
    assert not book.running_runs()  # the job processes are over
    assert make_plan(spec).counts()["todo"] == 0
    assert launch(spec, LaunchOptions(launcher="slurm", cluster="local")).jobs == []


def test_runs_held_by_a_live_job_or_process_are_not_launched(tmp_path):
    req = _req(tmp_path, methods=["pgd-at"], seeds="0,1,2")
    spec = SweepSpec(req)
    names = [u.name for u in make_plan(spec).units]
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        book = JobBook(req.results_dir)
        book.add([  # an earlier launch whose job (a live process here) holds the first run
            {"job_id": str(sleeper.pid), "cluster": "local", "host": socket.gethostname(), "pid": sleeper.pid,
             "folder": None, "runs": [names[0]], "phase": "run"},
            {"job_id": "1", "cluster": "local", "host": socket.gethostname(), "pid": 2 ** 22 + 7, "folder": None,
             "runs": [names[1]], "phase": "run"}])  # a dead process: not running
        from helpers import hold_lock

        holder = hold_lock(tmp_path / "results" / "runs" / names[2])  # a live process trains the third run
        sp = make_plan(spec)
        assert [sp.states[n] for n in names] == ["running", "todo", "running"]
        assert [u.name for u in sp.todo] == [names[1]]
        holder.kill()
        holder.wait()
        assert make_plan(spec).states[names[2]] == "todo"  # its lock died with it
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [u.name for u in make_plan(spec).todo] == names  # the job and the lock holder are gone


def test_slurm_options_reach_sbatch(tmp_path, monkeypatch):
    """The options become submitit's Slurm parameters and the sbatch script it would submit (rendered here, with
    srun's presence faked: nothing is submitted)."""
    import submitit
    from submitit.slurm import slurm

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))
    opts = LaunchOptions(launcher="slurm", gpus_per_run=4, partition="gpu", time_min=480, array_parallelism=16,
                         account="lab", qos="high", constraint="h100", cpus_per_task=8, mem_gb=64,
                         slurm_args={"exclude": "node12"})
    params = executor_params(opts, "slurm", after=["101", "102"])
    ex = submitit.AutoExecutor(folder=str(tmp_path / "%j"), cluster="slurm")
    ex.update_parameters(**params)
    text = ex._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--time=480", "--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=1",
                 "--account=lab", "--qos=high", "--constraint=h100", "--cpus-per-task=8", "--mem=64GB",
                 "--exclude=node12", "--dependency=afterok:101:102", "--job-name=aft-bench", "--signal=USR2@"):
        assert line in text, line
    assert ex._executor.parameters.get("array_parallelism") == 16
    assert "slurm_partition" not in executor_params(opts, "local")  # the stand-ins get the generic ones only


def _task_pid(controller: int) -> int:
    """The task process that submitit's local controller started (Linux: /proc)."""
    path = f"/proc/{controller}/task/{controller}/children"
    assert _wait_for(lambda: os.path.exists(path) and open(path).read().split())
    return int(open(path).read().split()[0])


def test_preempted_job_is_requeued_and_resumes(tmp_path):
    """A job of the local executor gets the preemption signal after its run's first epoch: submitit checkpoints
    the SweepJob and requeues it; the run resumes after that epoch and ends with the weights of a run that was
    never interrupted."""
    import submitit

    args = dict(SMALL, methods=["pgd-at"], epochs=4, subset=30, sets=[])
    req = _req(tmp_path, **args)
    (p,) = plan(req)
    run = RunDir.for_config(p.cfg)
    os.environ["OMP_NUM_THREADS"] = "1"  # the job's processes inherit it (and the straight run below)
    try:
        ex = submitit.AutoExecutor(folder=str(tmp_path / "submitit" / "%j"), cluster="local")
        ex.update_parameters(timeout_min=10)
        job = ex.submit(SweepJob([{"cfg": p.cfg.to_dict(), "base": None, "grid": None}]))
        assert _wait_for(lambda: len(run.read_metrics()) >= 1), job.stderr()
        # what Slurm does on preemption or time-out: the signal submitit listens for, to the job's task process
        os.kill(_task_pid(int(job.job_id)), submitit.JobEnvironment._usr_sig())
        job.result()
        log = job.stderr() or ""
        assert "resuming after epoch" in log, log[-3000:]
        straight = tmp_path / "straight"
        cmd = [sys.executable, "-m", "bench", "run", "--preset", "smoke", "--methods", "pgd-at", "--subset", "30",
               "--epochs", "4", "--attacks", "clean", "--eval-n", "20", "--probe-n", "4", "--device", "cpu", "-q",
               "--results", str(straight)]
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        del os.environ["OMP_NUM_THREADS"]
    a = load_file(run.final_weights)
    b = load_file(straight / "runs" / run.name / "ckpt" / "model.safetensors")
    # bit for bit (so on a 2-core AMD EPYC): the job and the straight run are processes of one machine, both with
    # OMP_NUM_THREADS=1 and fp32, so the same kernels in the same reduction order on any CPU
    assert all((a[k] == b[k]).all() for k in a)
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((straight / "runs" / run.name / "eval.json").read_text())["results"]["clean"]["points"] == \
        run.read_eval()["results"]["clean"]["points"]


def test_sweep_cli(tmp_path, capsys, monkeypatch):
    from bench.cli import main

    res = str(tmp_path / "results")
    base = ["bench", "sweep", "--preset", "smoke", "--methods", "pgd-at", "--seeds", "0,1", "--subset", "10",
            "--epochs", "1", "--attacks", "clean", "--eval-n", "20", "--probe-n", "4", "--device", "cpu", "-q",
            "--results", res]
    monkeypatch.setattr(sys, "argv", base + ["--dry-run"])
    main()
    out = capsys.readouterr().out
    assert "sweep: 2 run(s): 0 done, 0 running, 2 to launch" in out and out.count("todo") == 2
    monkeypatch.setattr(sys, "argv", base)
    main()
    assert "pgd-at  1" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", base + ["--dry-run"])
    main()
    assert "2 done, 0 running, 0 to launch" in capsys.readouterr().out
    for bad, pattern in ((["--time", "soon"], "Invalid value for '--time'"),
                         (["--slurm-arg", "exclude"], "malformed --slurm-arg 'exclude'; accepted: KEY=VALUE"),
                         (["--launcher", "pbs"], "Invalid value for '--launcher'")):
        monkeypatch.setattr(sys, "argv", base + bad)
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and pattern in err, err


def test_a_run_waits_for_the_base_run_another_process_is_training(tmp_path):
    """Two jobs needing the same base: the second waits while the first holds the base's lock, then goes on."""
    import threading

    from bench.runner import Runner
    from helpers import hold_lock

    (p,) = plan(_req(tmp_path, methods=["vaft"]))
    base_run = RunDir.for_config(p.base)
    holder = hold_lock(base_run.path)
    threading.Timer(1.5, lambda: (holder.kill(), holder.wait())).start()
    said, t0 = [], time.time()
    Runner(progress=False, echo=said.append)._wait_while_locked(base_run, "[vaft s0] needs the natural model",
                                                                poll_s=0.1)
    assert time.time() - t0 >= 1.4
    assert said and f"process {holder.pid}" in said[0] and "is training: waiting for it" in said[0]


def test_a_job_with_two_tasks_is_one_ddp_run(tmp_path):
    """--gpus-per-run 2: the job's two tasks form one DDP group (submitit's TorchDistributedEnvironment), here two
    CPU processes under submitit's local executor; the run is the one `bench run` plans, done, recorded as DDP."""
    req = _req(tmp_path, methods=["pgd-at"], seeds="0", world_size=2)
    out = launch(SweepSpec(req), LaunchOptions(launcher="slurm", cluster="local", gpus_per_run=2, time_min=10),
                 echo=lambda s: None)
    assert [r["phase"] for r in out.records] == ["run"]
    (p,) = plan(req)
    run = RunDir.for_config(p.cfg)
    assert run.is_done()
    rec = run.read_config()
    assert rec["device"].startswith("2× cpu") and rec["config"]["world_size"] == 2
    assert (run.path / "eval.json").is_file() and not list(run.path.rglob("*.tmp"))


def test_a_run_that_is_also_a_base_is_launched_once_as_a_base(tmp_path):
    req = _req(tmp_path, methods=["natural", "vaft", "pgd-at"], seeds="0")
    sp = make_plan(SweepSpec(req))
    (nat,) = [u for u in sp.units if u.cfg.method == "natural"]
    assert [b.run_name for b in sp.bases] == [nat.name] and nat.name not in [u.name for u in sp.todo]
    assert sp.base_payloads[nat.name] == nat.payload()
    assert sorted(u.cfg.method for u in sp.todo) == ["pgd-at", "vaft"]


class _FakeJob:
    def __init__(self, n):
        self.job_id = str(n)

    def results(self):
        return []


class _FakeExecutor:
    """Stands in for submitit's Slurm executor: records what would be submitted with which dependency."""

    counter = [1000]
    submitted: list = []

    def __init__(self, after):
        self.after = tuple(after)

    def batch(self):
        import contextlib

        return contextlib.nullcontext()

    def submit(self, job):
        self.counter[0] += 1
        self.submitted.append((self.after, [p["cfg"]["method"] for p in job.payloads], str(self.counter[0])))
        return _FakeJob(self.counter[0])


def test_each_slurm_job_waits_only_for_its_own_base(tmp_path, monkeypatch):
    """Bases in the first array; each run's job depends on its own base's job only (a failed base cancels just its
    own runs, --kill-on-invalid-dep); a relaunch while an earlier job still trains a base makes the new runs wait
    for that job."""
    import bench.sweep as sweep

    _FakeExecutor.submitted = []
    monkeypatch.setattr(sweep, "_executor", lambda opts, book, cluster, after=(): _FakeExecutor(after))
    req = _req(tmp_path, methods=["pgd-at", "vaft", "afkd"], seeds="0,1")
    spec = SweepSpec(req)
    launch(spec, LaunchOptions(launcher="slurm", cluster="slurm"), echo=lambda s: None)
    subs = _FakeExecutor.submitted
    assert len([s for s in subs if s[1] == ["natural"]]) == 2 and all(s[0] == () for s in subs[:2])
    base_ids = [jid for _, m, jid in subs if m == ["natural"]]
    runs = [(after, m[0]) for after, m, _ in subs if m != ["natural"]]
    assert sorted(a for a, m in runs if m == "pgd-at") == [(), ()]  # from scratch: no dependency
    ft = [a for a, m in runs if m in ("vaft", "afkd")]
    assert sorted(ft) == sorted([(base_ids[0],)] * 2 + [(base_ids[1],)] * 2)  # each on its own seed's base
    # relaunch: the earlier jobs count as active (pending on the cluster) -> nothing new is launched
    monkeypatch.setattr(sweep.JobBook, "active", staticmethod(lambda job: True))
    _FakeExecutor.submitted = []
    assert launch(spec, LaunchOptions(launcher="slurm", cluster="slurm")).jobs == [] and not _FakeExecutor.submitted
    # a new method on the same bases while they still train: it waits for the earlier base jobs
    spec2 = SweepSpec(_req(tmp_path, methods=["arrest"], seeds="0,1"))
    launch(spec2, LaunchOptions(launcher="slurm", cluster="slurm"), echo=lambda s: None)
    assert sorted(a for a, m, _ in _FakeExecutor.submitted) == sorted([(base_ids[0],), (base_ids[1],)])
    params = sweep.executor_params(LaunchOptions(launcher="slurm"), "slurm", after=["7"])
    assert params["slurm_additional_parameters"] == {"dependency": "afterok:7", "kill-on-invalid-dep": "yes"}
    assert params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]


def test_a_killed_jobs_lock_is_free_on_any_node(tmp_path, monkeypatch):
    """A job killed hard leaves its lock file (naming it) but not the lock: the kernel released it, so the
    requeued job takes it on any node, and a sweep does not count the run as running."""
    import bench.sweep as sweep
    from bench.fsutil import RunLock

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / ".lock").write_text("node07 4242 777\n")  # what a job killed on node07 leaves
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the requeued job itself, here
    assert not RunLock(run.path).is_held_by_other() and not sweep._lock_is_live(run)
    lock = RunLock(run.path)
    lock.acquire()
    assert (run.path / ".lock").read_text().split()[1:] == [str(os.getpid()), "777"]
    lock.release()


def test_local_launcher_runs_in_parallel_jobs_each_base_with_its_runs(tmp_path):
    """--launcher local --parallel 2: two submitit local jobs (one per GPU where there are GPUs; CPU processes here),
    every base run in the same job as the runs that start from it, before them; all done, nothing launched again."""
    import bench.sweep as sweep

    req = _req(tmp_path, methods=["vaft", "afkd", "pgd-at"], seeds="0,1")
    spec = SweepSpec(req)
    sp = make_plan(spec)
    chains = sweep._chains(sp, 2)
    assert len(chains) == 2 and sum(len(c) for c in chains) == len(sp.todo) + len(sp.bases)
    for chain in chains:
        methods = [p["cfg"]["method"] for p in chain]
        for i, p in enumerate(chain):
            if p.get("base"):  # its base (trained by this job, first) comes earlier in the same chain
                names = [RunDir.for_config(sweep.RunConfig.from_dict(q["cfg"])).name for q in chain[:i]]
                assert sweep.RunConfig.from_dict(p["base"]).run_name in names, methods
    out = launch(spec, LaunchOptions(launcher="local", parallel=2, time_min=10, wait=True), echo=lambda s: None)
    assert [r["phase"] for r in out.records] == ["chain", "chain"]
    assert make_plan(spec).counts() == {"done": 6, "running": 0, "todo": 0}
