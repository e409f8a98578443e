"""Records without their weights (a clone of committed results, or another sitting: weights are never in git):
finished runs stay finished, a starting model is trained again to rebuild its weights only when something must
fine-tune from it and only if the rebuilt weights are the model its record evaluated, and an eval.json that
measured other weights is never merged with a new model's results."""
import json
import shutil

import pytest

from helpers import bench_cli
from bench.records import RunDir
from bench.runner import RunRequest, plan

SMALL = ["--preset", "smoke", "--subset", "10", "--epochs", "1", "--attacks", "clean", "--eval-n", "20",
         "--probe-n", "4", "--device", "cpu", "-q"]


def planned(results, method):
    req = RunRequest(preset="smoke", methods=[method], subset=10, epochs=1, attacks="clean", eval_n=20, probe_n=4,
                     device="cpu", results_dir=str(results), seeds="0")
    return plan(req)[0]


def records(run: RunDir):
    """The committed files of a run (what a rebuild must leave byte for byte)."""
    return {p.name: p.read_bytes() for p in sorted(run.path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished natural run and a vAFT run fine-tuned from it, with their weights."""
    from bench.runner import Runner

    results = tmp_path_factory.mktemp("rebuild") / "results"
    p = planned(results, "vaft")
    Runner(progress=False, echo=lambda s: None).execute(p.cfg, p.base)
    return results


def without_weights(finished, tmp_path):
    """The finished runs as a clone of the results has them: records only."""
    results = tmp_path / "results"
    shutil.copytree(finished, results)
    for ckpt in results.glob("runs/*/ckpt"):
        shutil.rmtree(ckpt)
    return results


def test_finished_runs_need_no_weights_of_their_starting_model(capsys, monkeypatch, tmp_path, finished):
    results = without_weights(finished, tmp_path)
    before = {r.name: records(RunDir(r)) for r in (results / "runs").iterdir()}
    code, out, err = bench_cli(capsys, monkeypatch, "run", *SMALL, "--methods", "vaft", "--results", str(results))
    assert code == 0, err
    assert err.count("already done") == 1 and "vaft" in out, err  # (progress lines go to stderr, the table to stdout)
    assert {r.name: records(RunDir(r)) for r in (results / "runs").iterdir()} == before
    assert not list(results.glob("runs/*/ckpt"))  # nothing was trained


def test_a_missing_starting_model_is_rebuilt_checked_and_its_records_kept(capsys, monkeypatch, tmp_path, finished):
    results = without_weights(finished, tmp_path)
    p = planned(results, "afkd")  # a new run fine-tuning from the natural run
    base = RunDir.for_config(p.base)
    kept = records(base)
    code, out, err = bench_cli(capsys, monkeypatch, "run", *SMALL, "--methods", "afkd", "--results", str(results))
    assert code == 0, err
    assert "training it again" in err and "the model its eval.json evaluated" in err, err
    assert records(base) == kept  # config, metrics, eval, done: byte for byte
    assert base.final_weights.is_file() and base.weights_mismatch() is None
    assert not (base.ckpt_dir / "rebuild").exists()
    assert RunDir.for_config(p.cfg).is_done()
    from safetensors.torch import load_file

    first, again = load_file(str(finished / "runs" / base.name / "ckpt" / "model.safetensors")), \
        load_file(str(base.final_weights))
    assert first.keys() == again.keys() and all(first[k].equal(again[k]) for k in first)


def test_rebuilt_weights_that_are_not_the_evaluated_model_stop_the_run(capsys, monkeypatch, tmp_path, finished):
    results = without_weights(finished, tmp_path)
    p = planned(results, "afkd")
    base = RunDir.for_config(p.base)
    ev = json.loads(base.eval.read_text())
    ev["meta"]["weights_sha256"] = "0" * 16  # as if evaluated on another machine kind
    base.eval.write_text(json.dumps(ev))
    kept = records(base)
    code, _, err = bench_cli(capsys, monkeypatch, "run", *SMALL, "--methods", "afkd", "--results", str(results))
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "gave other weights" in lines[0] and "0" * 16 in lines[0] and "--pretrained" in lines[0]
    assert records(base) == kept and not base.final_weights.exists()
    scratch = RunDir(base.ckpt_dir / "rebuild")
    assert scratch.final_weights.is_file()  # kept, for --pretrained
    assert not RunDir.for_config(p.cfg).path.exists() or not RunDir.for_config(p.cfg).is_done()
    # the user's way out: fine-tune from the rebuilt model, named as a file
    code, _, err = bench_cli(capsys, monkeypatch, "run", *SMALL, "--methods", "afkd", "--results", str(results),
                             "--pretrained", str(scratch.path))
    assert code == 0, err


def test_an_eval_of_other_weights_is_set_aside_not_merged(capsys, monkeypatch, tmp_path, finished):
    results = without_weights(finished, tmp_path)
    base = planned(results, "vaft").base  # (the natural run the fixture trained)
    run = RunDir.for_config(base)
    right = json.loads(run.eval.read_text())["results"]["clean"]["correct"]
    ev = json.loads(run.eval.read_text())
    ev["meta"]["weights_sha256"] = "f" * 16
    ev["results"]["clean"]["correct"] = -1  # what another model measured
    run.eval.write_text(json.dumps(ev))
    run.done.unlink()  # interrupted between training and the end of its evaluation, its checkpoints lost
    from bench.runner import Runner

    said = []
    Runner(progress=False, echo=said.append).execute(base)
    assert any("measured other weights" in s and "eval.json.stale" in s for s in said), said
    assert json.loads(run.eval.with_name("eval.json.stale").read_text())["results"]["clean"]["correct"] == -1
    assert json.loads(run.eval.read_text())["results"]["clean"]["correct"] == right
    assert run.weights_mismatch() is None
