"""Shared helpers for the training tests: a small request on the synthetic data, run in-process."""
from bench.records import RunDir
from bench.runner import Runner, RunRequest, plan


def small_request(tmp_path, **kw):
    base = dict(preset="smoke", subset=20, epochs=2, attacks="clean", eval_n=50, probe_n=16, device="cpu",
                results_dir=str(tmp_path / "results"))
    base.update(kw)
    return RunRequest(**base)


def run_request(req, echo=lambda s: None):
    runner = Runner(progress=False, echo=echo)
    runs = []
    for p in plan(req):
        runner.execute(p.cfg, p.base, p.grid)
        runs.append(RunDir.for_config(p.cfg))
    return runs


def resumed_equals_straight(cfg, dataset, root, init_weights=None, stop_after=2):
    """Train ``cfg`` straight through in ``root/a``; train it in ``root/b`` for ``stop_after`` epochs, then resume it
    in a fresh Trainer and finish. Asserts equal weights (trained and evaluated module), optimiser momenta, method
    tensors and per-epoch records (timings aside); returns the two trainers."""
    import torch

    from bench.engine import Trainer

    def trainer(d):
        return Trainer(cfg, dataset, RunDir(root / d), init_weights=init_weights, progress=False, echo=lambda s: None)

    a = trainer("a")
    a.train()
    trainer("b").train(stop_after=stop_after)
    b = trainer("b")
    assert b.resume() == stop_after
    b.train()
    for x, y in ((a.method.model, b.method.model), (a.evaluated_module(), b.evaluated_module())):
        sa, sb = x.state_dict(), y.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), cfg.method
    for oa, ob in zip(a.method.optimizers, b.method.optimizers):
        for pa, pb in zip(oa.state.values(), ob.state.values()):
            assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    ma, mb = a.method.state_dict(), b.method.state_dict()
    for key, va in ma.items():
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, mb[key]), key

    def untimed(d):
        return [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds", "images_per_s")}
                for r in RunDir(root / d).read_metrics(start=True)]

    assert untimed("a") == untimed("b")
    return a, b


HOLD_LOCK = """
import sys, time
from pathlib import Path
from bench.fsutil import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(run_dir, seconds=60.0):
    """A separate process that takes the run's lock (the real flock) and holds it for ``seconds`` (or until killed);
    returns its Popen once it holds the lock."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def bench_cli(capsys, monkeypatch, *args):
    """Run ``bench ARGS`` in this process: (exit code, stdout, stderr)."""
    import sys

    from bench.cli import main

    monkeypatch.setattr(sys, "argv", ["bench", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
