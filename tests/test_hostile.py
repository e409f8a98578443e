"""What hostile use must not break (docs/errors.md #58-#80): nothing is written or deleted outside the results
root; damaged records are listed and repaired, never a traceback; a final weights file that is not the evaluated
model is caught; unwritable or wrong places and everything a plan can check are one line before anything is
written."""
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import bench_cli
from bench.records import RunDir
from bench.runner import RunRequest, plan

SMALL = ["--preset", "smoke", "--subset", "10", "--epochs", "1", "--attacks", "clean", "--eval-n", "20",
         "--probe-n", "4", "--device", "cpu", "-q"]


bench = bench_cli


def one_line(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def tree(path):
    """Every file and link under ``path`` with its content (what must not change)."""
    return {str(p.relative_to(path)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
            for p in sorted(Path(path).rglob("*"))}


def run_name(results, method="natural", seed=0):
    req = RunRequest(preset="smoke", methods=[method], subset=10, epochs=1, attacks="clean", eval_n=20, probe_n=4,
                     device="cpu", results_dir=str(results), seeds=str(seed))
    return plan(req)[0].cfg.run_name


# ---------------------------------------------------------------------------------------------------------------
# 1. nothing outside the results root


@pytest.mark.parametrize("where", ["run", "runs", "ckpt"])
def test_a_symlink_on_the_way_is_refused_and_nothing_outside_is_touched(capsys, monkeypatch, tmp_path, where):
    results, outside = tmp_path / "results", tmp_path / "users-own"
    outside.mkdir()
    (outside / ".notes.txt.tmp").write_text("a user's temporary file\n")
    (outside / "keep.txt").write_text("mine\n")
    name = run_name(results)
    (results / "runs").mkdir(parents=True)
    if where == "runs":
        (results / "runs").rmdir()
        (results / "runs").symlink_to(outside)
    elif where == "run":
        (results / "runs" / name).symlink_to(outside)
    else:
        (results / "runs" / name).mkdir()
        (results / "runs" / name / "ckpt").symlink_to(outside)
    before = tree(outside)
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--results", str(results))
    one_line(code, err, "is a symbolic link", "the suite writes only inside the results root")
    assert tree(outside) == before


def test_a_results_root_that_is_itself_a_link_is_the_users_choice(capsys, monkeypatch, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "results").symlink_to(real)
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--results",
                         str(tmp_path / "results"))
    assert code == 0, err
    assert (real / "runs" / run_name(real) / "done").is_file()


# ---------------------------------------------------------------------------------------------------------------
# 3 and 4. damaged records, edited weights


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two finished natural runs (seeds 0 and 1) under one results root, copied by each test."""
    results = tmp_path_factory.mktemp("finished") / "results"
    from bench.runner import Runner

    req = RunRequest(preset="smoke", methods=["natural"], subset=10, epochs=1, attacks="clean", eval_n=20,
                     probe_n=4, device="cpu", results_dir=str(results), seeds="0,1")
    for p in plan(req):
        Runner(progress=False, echo=lambda s: None).execute(p.cfg)
    return results


DAMAGE = {"empty": lambda t: "", "truncated": lambda t: t[: len(t) // 2], "braces": lambda t: "{}\n"}


@pytest.mark.parametrize("record", ["config.json", "metrics.jsonl", "eval.json"])
@pytest.mark.parametrize("how", list(DAMAGE))
def test_one_damaged_record_is_listed_repaired_and_never_a_traceback(capsys, monkeypatch, tmp_path, finished,
                                                                      record, how):
    results = tmp_path / "results"
    shutil.copytree(finished, results)
    bad = results / "runs" / run_name(results, seed=1)
    good = results / "runs" / run_name(results, seed=0)
    path = bad / record
    original = path.read_text()
    path.write_text(DAMAGE[how](original))
    code, out, err = bench(capsys, monkeypatch, "status", "--results", str(results))
    assert code == 0 and err == "", err
    lines = out.strip().splitlines()[2:]  # (under the header and its rule)
    assert len(lines) == 2
    (dline,) = [ln for ln in lines if bad.name in ln]
    assert dline.startswith("damaged") and str(path) in dline and "bench run of this run repairs it" in dline
    assert any(ln.startswith("done") and good.name in ln for ln in lines)
    code, out, err = bench(capsys, monkeypatch, "report", "--results", str(results), "--out", str(tmp_path / "rep"))
    assert code == 0 and err == "", err
    assert f"damaged (left out of the report): {bad.name}: {path} is damaged" in out
    assert "1 setting from 1 finished run " in out
    # bench run of it repairs it: the damaged file kept beside, the record whole again, the numbers as before
    code, out, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--seeds", "1", "--results",
                           str(results))
    assert code == 0, err
    assert (bad / (record + ".damaged")).read_text() == DAMAGE[how](original)
    assert RunDir(bad).damage() == [] and RunDir(bad).status()["state"] == "done"
    if record == "metrics.jsonl":
        assert [r["epoch"] for r in RunDir(bad).read_metrics(start=True)] == [0, 1]
    assert json.loads((bad / "eval.json").read_text())["results"]["clean"]["correct"] == \
        json.loads((finished / "runs" / bad.name / "eval.json").read_text())["results"]["clean"]["correct"]


def test_final_weights_that_are_not_the_evaluated_model_are_caught(capsys, monkeypatch, tmp_path, finished):
    import torch
    from safetensors.torch import load_file, save_file

    results = tmp_path / "results"
    shutil.copytree(finished, results)
    run = RunDir(results / "runs" / run_name(results, seed=1))
    sd = load_file(str(run.final_weights))
    sd["fc.bias"] = sd["fc.bias"] + torch.tensor(1e-3)
    save_file(sd, str(run.final_weights))
    code, out, _ = bench(capsys, monkeypatch, "status", "--results", str(results))
    (line,) = [ln for ln in out.splitlines() if run.name in ln]
    assert line.startswith("damaged") and "are not the model eval.json evaluated" in line
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--seeds", "1", "--results",
                         str(results))
    one_line(code, err, run.name, "modified or replaced since", "delete")
    code, _, err = bench(capsys, monkeypatch, "eval", str(run.path), "--attacks", "clean", "--n", "10")
    one_line(code, err, "are not the model eval.json evaluated")


# ---------------------------------------------------------------------------------------------------------------
# 5. unwritable or wrong places


def test_wrong_places_are_one_line_and_nothing_is_written(capsys, monkeypatch, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    for args, frag in ((["--results", ""], "--results is empty; accepted: a directory path"),
                       (["--results", str(afile / "res")], f"lies under {afile}, which is a file"),
                       (["--results", str(afile)], "is a file; accepted: a directory")):
        code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", *args)
        one_line(code, err, frag)
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / run_name(results)).write_text("not a directory\n")
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--results", str(results))
    one_line(code, err, "is a file; accepted: a directory (move the file away)")
    assert sorted(os.listdir(tmp_path)) == ["afile", "results"] and os.listdir(results / "runs") == [run_name(results)]
    code, _, err = bench(capsys, monkeypatch, "report", "--results", str(results), "--out", str(afile))
    one_line(code, err, f"--out {afile} is a file")
    code, _, err = bench(capsys, monkeypatch, "eval", "missing-run", "--output", str(tmp_path))
    one_line(code, err, f"--output {str(tmp_path)!r} is a folder; accepted: a file path")


def test_a_read_only_results_dir_is_one_line_before_anything_is_written(capsys, monkeypatch, tmp_path):
    """The suite runs as root here, where permissions do not stop a write: the check is os.access, faked."""
    results = tmp_path / "ro"
    results.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == results else real(p, mode, **kw))
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--results", str(results))
    one_line(code, err, f"{results} is not writable (read-only or no permission)")
    assert os.listdir(results) == []


def _fashion(root):
    from test_sweep import _fashion_mnist_files

    return _fashion_mnist_files(root)


@pytest.mark.parametrize("cache", ["file", "under-a-file"])
def test_a_cache_that_is_a_file_is_one_line(capsys, monkeypatch, tmp_path, cache):
    data = _fashion(tmp_path / "fm")
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    monkeypatch.setenv("AFT_BENCH_CACHE", str(afile if cache == "file" else afile / "sub"))
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--dataset", "fashion-mnist",
                         "--data-dir", data, "--results", str(tmp_path / "results"))
    one_line(code, err, "the decoded-data cache", "accepted: a directory (set AFT_BENCH_CACHE to one)")
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------------------------
# 6. validated when planned, before anything is written


PRESETS = {
    "[method.natral]\nepochs = 1\n": "unknown method table [method.natral] in preset",
    '[run]\nmethods = "natural"\n': "methods = 'natural'; accepted: a list of method names",
    "[run]\nmethods = [\"natural\"]\nseeds = [-1]\n": "seeds = [-1]; accepted: a list of non-negative integers",
    "[method]\nnatural = 5\n": "[method] natural = 5; accepted: a table [method.natural]",
    '[method.natural]\nschedule = { name = "multistep", milestones = [5], gamma = "fast" }\n':
        "natural.schedule: gamma = 'fast'; accepted: a non-negative number",
    '[method.natural]\nschedule = { name = "multistep", milestones = "5" }\n': "milestones = '5'",
    '[method.natural]\nschedule = { name = "warp" }\n': "unknown schedule 'warp'",
}


@pytest.mark.parametrize("text", list(PRESETS))
def test_preset_typos_are_one_line_before_anything_is_written(capsys, monkeypatch, tmp_path, text):
    preset = tmp_path / "p.toml"
    preset.write_text(text)
    results = tmp_path / "results"
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL[2:], "--methods", "natural", "--preset", str(preset),
                         "--results", str(results))
    one_line(code, err, PRESETS[text])
    assert not results.exists()


def test_plan_time_refusals_leave_nothing_behind(capsys, monkeypatch, tmp_path):
    import torch

    results = tmp_path / "results"

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(3, 3)}, str(wrong))
    cases = [
        (["--methods", "vaft", "--pretrained", str(evil)], "names the global posix.system"),
        (["--methods", "vaft", "--pretrained", str(wrong)], f"--pretrained {wrong}:"),
        (["--methods", "natural", "--pretrained", str(wrong)], "natural trains from scratch and would ignore it"),
        (["--methods", "vaft", "--set", "afd.gamma=5"], "--set afd.gamma: afd is not run by this command"),
        (["--methods", "natural", "--seeds", "٣"], "malformed --seeds '٣'"),
        (["--methods", "natural", "--seeds", "0-99999999"], "accepted: at most 1000"),
    ]
    for args, frag in cases:
        code, _, err = bench(capsys, monkeypatch, "run", *SMALL, *args, "--results", str(results))
        one_line(code, err, frag)
        assert not results.exists(), args


def test_a_sweep_of_very_many_runs_asks_for_yes(capsys, monkeypatch, tmp_path):
    results = tmp_path / "results"
    code, _, err = bench(capsys, monkeypatch, "sweep", *SMALL, "--methods", "natural,pgd-at", "--seeds", "0-59",
                         "--launcher", "local", "--results", str(results))
    one_line(code, err, "the sweep would launch 120 runs, more than 100; accepted: --yes")
    assert not (results / "runs").exists()
    code, out, err = bench(capsys, monkeypatch, "sweep", *SMALL, "--methods", "natural,pgd-at", "--seeds", "0-59",
                           "--launcher", "local", "--results", str(results), "--dry-run")
    assert code == 0 and "120 run(s)" in out
