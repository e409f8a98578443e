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
        runner.execute(p.cfg, p.base)
        runs.append(RunDir.for_config(p.cfg))
    return runs
