"""Faults survived: a `bench run` killed with a real SIGKILL at chosen points (mid-epoch, while a file is being written,
between evaluation attacks, between AutoAttack chunks) and started again ends with the same weights and the same
numbers as a run that was never interrupted; a full or unwritable disk is one clear line and changes nothing."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.errors import BenchError
from bench.fsutil import atomic_write_text

pytestmark = pytest.mark.slow

BASE = ["--preset", "smoke", "--subset", "20", "--epochs", "3", "--batch-size", "64", "--attacks", "clean,pgd20",
        "--eval-n", "24", "--probe-n", "8", "--device", "cpu", "-q"]
# AutoAttack on a model it breaks at once (the smoke natural model: ~0 % under PGD), in two chunks of 8 images;
# a barely trained model keeps AutoAttack's Square attack busy for minutes on a CPU
AA = ["--preset", "smoke", "--methods", "natural", "--subset", "100", "--epochs", "6", "--attacks", "clean,pgd20,aa",
      "--eval-n", "16", "--aa-n", "16", "--aa-chunk", "8", "--probe-n", "8", "--device", "cpu", "-q"]


def _bench(args, results, kill_at=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("AFT_BENCH_KILL_AT", None)
    if kill_at:
        env["AFT_BENCH_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "bench", "run", *args, "--results", str(results)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from bench.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pre") / "natural.safetensors"
    save_file(create_model("smallcnn", 10).state_dict(), path)
    return path


def _args(method, pretrained):
    if method == "natural+aa":
        return AA
    extra = ["--pretrained", str(pretrained), "--set", "afd.attack_steps=3"] if method == "afd" else []
    if method == "atas":  # the stateful one: per-example buffers, warm-up over by epoch 2, a re-draw at epoch 2
        extra = ["--set", "atas.warmup_epochs=1", "--set", "atas.reset_every=2"]
    return BASE + ["--methods", method] + extra


@pytest.fixture(scope="module")
def straight(tmp_path_factory, pretrained):
    """Uninterrupted runs, one per method (computed once)."""
    out = {}
    for method in ("natural", "pgd-at", "afd", "atas", "natural+aa"):
        results = tmp_path_factory.mktemp("straight")
        r = _bench(_args(method, pretrained), results)
        assert r.returncode == 0, r.stderr
        out[method] = _the_run(results, method)
    return out


def _the_run(results, method):
    (run,) = [p for p in (results / "runs").iterdir() if f"_{method.split('+')[0]}_" in p.name]
    return run


def _numbers(run):
    ev = json.loads((run / "eval.json").read_text())
    return {k: (v["correct"], v.get("points")) for k, v in ev["results"].items()}


# (method, point[:nth]): mid-epoch 2; a checkpoint written but not yet renamed into place (the 5th write: epoch 2's);
# after the first evaluation attack; after the first AutoAttack chunk of two. ATAS: its per-example buffers must
# come back exactly from the checkpoint, or the weights differ
CASES = [(m, p) for m in ("natural", "pgd-at", "afd") for p in ("step:5", "write:5", "attack:1")]
CASES += [("atas", "step:5"), ("atas", "write:5")]
CASES += [("natural+aa", "attack:2"), ("natural+aa", "aa_chunk:1")]


@pytest.mark.parametrize("method,kill_at", CASES)
def test_killed_and_restarted_run_ends_like_an_uninterrupted_one(tmp_path, straight, pretrained, method, kill_at):
    args = _args(method, pretrained)
    killed = _bench(args, tmp_path, kill_at=kill_at)
    assert killed.returncode == -9, (kill_at, killed.stderr[-2000:])  # really killed by SIGKILL
    run = _the_run(tmp_path, method)
    assert not (run / "done").exists()
    again = _bench(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    ref = straight[method]
    a, b = load_file(ref / "ckpt" / "model.safetensors"), load_file(run / "ckpt" / "model.safetensors")
    # bit for bit (so on a 2-core AMD EPYC): both processes run on one machine with one thread (OMP_NUM_THREADS=1 in
    # _bench) and fp32 (bench run's default on every CPU), so the kernels and their reduction order are the same
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _numbers(run) == _numbers(ref)
    strip = ("seconds", "cpu_seconds", "images_per_s")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in strip}
             for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (ref, run)]
    assert rows[0] == rows[1]
    assert not list(run.rglob("*.tmp"))  # no half-written file left behind


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_disk_full_or_unwritable_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, err):
    target = tmp_path / "eval.json"
    target.write_text("old and good\n")

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(BenchError) as e:
        atomic_write_text(target, "new")
    assert str(e.value) == f"cannot write {target}: {os.strerror(err)}; nothing was changed"
    assert target.read_text() == "old and good\n" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_disk_full_during_a_run_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from bench.cli import main

    real = os.fsync
    calls = {"n": 0}

    def full(fd):
        calls["n"] += 1
        if calls["n"] > 3:  # the disk fills up a few files into the run
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    monkeypatch.setattr(sys, "argv", ["bench", "run", *BASE, "--methods", "natural", "--results", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "No space left on device; nothing was changed" in err[0]
    assert not list(tmp_path.rglob("*.tmp"))
