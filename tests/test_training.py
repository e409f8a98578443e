"""End to end on the synthetic data: the science (PGD-AT beats natural training under PGD), and a run killed with
SIGKILL and started again ends with the same weights as one never interrupted."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_request, small_request


@pytest.mark.slow
def test_pgd_at_beats_natural_training_under_pgd(tmp_path):
    runs = run_request(small_request(tmp_path, methods=["natural", "pgd-at"], subset=200, epochs=5,
                                     attacks="clean,pgd20", eval_n=300, probe_n=0))
    res = {r.read_config()["config"]["method"]: r.read_eval()["results"] for r in runs}
    assert res["natural"]["clean"]["acc"] > 80  # the synthetic task is learnable...
    assert res["natural"]["pgd20"]["acc"] < 10  # ...and PGD breaks a naturally trained model
    assert res["pgd-at"]["pgd20"]["acc"] >= res["natural"]["pgd20"]["acc"] + 5


def _bench(args, results, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "bench", "run", *args, "--results", str(results), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **kw)


ARGS = ["--preset", "smoke", "--methods", "pgd-at", "--subset", "30", "--epochs", "5", "--attacks", "clean",
        "--eval-n", "20", "--probe-n", "8", "--device", "cpu"]


@pytest.mark.slow
def test_sigkill_during_training_then_resume_gives_the_same_weights(tmp_path):
    straight = _bench(ARGS, tmp_path / "a")
    assert straight.wait(timeout=300) == 0, straight.stdout.read().decode()
    victim = _bench(ARGS, tmp_path / "b")
    runs = tmp_path / "b" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline:
        m = list(runs.glob("*/metrics.jsonl")) if runs.exists() else []
        if m and len(m[0].read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    run_dir = next(runs.iterdir())
    assert not (run_dir / "done").exists()
    again = _bench(ARGS, tmp_path / "b")
    out = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, out
    assert "resuming after epoch" in out
    a = load_file(next((tmp_path / "a" / "runs").iterdir()) / "ckpt" / "model.safetensors")
    b = load_file(run_dir / "ckpt" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
