"""The run lock is the OS's advisory lock (flock): at most one holder, ever — also when many processes ask in the
same instant, on a lock file that does not exist yet or that a killed process left behind; a killed (even unreaped,
zombie) holder holds nothing; two commands that need the same starting model, started together, train it once."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.errors import BenchError
from bench.fsutil import RunLock
from bench.records import RunDir
from helpers import hold_lock

RACE = r"""
import json, os, sys, time
from pathlib import Path
from bench.errors import BenchError
from bench.fsutil import RunLock
root, t0, trials, gap = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
out = []
for k in range(trials):
    d = root / f"trial{k}"
    while time.time() < t0 + k * gap:  # every process asks at the same instant
        pass
    lock = RunLock(d)
    try:
        lock.acquire()
    except BenchError:
        continue
    a = time.monotonic()  # one clock for every process of the machine
    time.sleep(gap / 6)
    out.append([k, a, time.monotonic()])
    lock.release()
print(json.dumps(out))
"""


def test_many_processes_asking_at_once_get_one_holder_every_time(tmp_path):
    n, trials, gap = 6, 25, 0.3
    for k in range(0, trials, 2):  # half the trials race on a file a killed holder left, half on none at all
        (tmp_path / f"trial{k}").mkdir()
        (tmp_path / f"trial{k}" / ".lock").write_text("gone-host 4242\n")
    t0 = time.time() + 3.0  # after every process has started
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(t0), str(trials), str(gap)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    got = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    per_trial = {k: sorted(h[1:] for g in got for h in g if h[0] == k) for k in range(trials)}
    overlaps = [k for k, hs in per_trial.items() if any(b[0] < a[1] for a, b in zip(hs, hs[1:]))]
    assert overlaps == [], f"two processes held one lock at once in trials {overlaps}"
    assert all(per_trial.values()), "a trial where nobody got the lock"


def test_one_process_holds_and_others_are_refused_with_the_holder_named(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        lock = RunLock(tmp_path / "run")
        assert lock.is_held_by_other()
        with pytest.raises(BenchError, match=rf"is in use by process {holder.pid} on .*; wait for it to finish "
                                             r"or stop it \(the lock is released when that process ends"):
            lock.acquire()
    finally:
        holder.kill()
        holder.wait()
    lock.acquire()  # the kernel released it with the process
    assert lock.held
    with pytest.raises(BenchError, match="already in use by this process"):
        RunLock(tmp_path / "run").acquire()
    lock.release()
    assert not RunLock(tmp_path / "run").is_held_by_other()


def test_a_killed_holder_that_is_not_yet_reaped_holds_nothing(tmp_path):
    """SIGKILL leaves a zombie until its parent waits: its pid is still 'alive' to os.kill(pid, 0), but its
    files are closed, so bench status must not call the run running."""
    run = RunDir(tmp_path / "runs" / "synthetic_smallcnn_natural_s0_0123456789")
    run.path.mkdir(parents=True)
    run.config.write_text(json.dumps({"config": {"method": "natural", "hp": {"epochs": 3}}}))
    holder = hold_lock(run.path)
    assert run.status()["state"] == "running"
    os.kill(holder.pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and run.status()["state"] == "running":
        time.sleep(0.05)
    try:
        with open(f"/proc/{holder.pid}/stat") as f:
            assert f.read().split()[2] == "Z"  # really a zombie: killed, not reaped
        RunLock._alive(holder.pid)  # and os.kill(pid, 0) still finds it
        assert run.status()["state"] == "partial"
    finally:
        holder.wait()


def test_a_lock_file_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").write_text("a user's file\n")
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BenchError, match=r"\.lock is a symbolic link"):
        RunLock(tmp_path / "run").acquire()
    assert (tmp_path / "elsewhere").read_text() == "a user's file\n"


@pytest.mark.slow
def test_two_commands_needing_one_starting_model_started_together_train_it_once(tmp_path):
    results = tmp_path / "results"
    args = ["--preset", "smoke", "--subset", "10", "--attacks", "clean", "--eval-n", "20", "--probe-n", "4",
            "--device", "cpu", "--set", "natural.epochs=2", "--epochs", "1", "--results", str(results), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "bench", "run", "--methods", m, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in ("vaft", "afkd")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    nat = [d for d in (results / "runs").iterdir() if "_natural_" in d.name]
    assert len(nat) == 1 and RunDir(nat[0]).is_done()
    assert [r["epoch"] for r in RunDir(nat[0]).read_metrics()] == [1, 2]  # trained once, by one of them
    both = "".join(o[0] + o[1] for o in outs)
    assert "training it first" in both
