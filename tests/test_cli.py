"""The command line: bad input gives one line naming the value and what is accepted, exit code 2, nothing written;
good input runs, records, reports status and evaluates."""
import json
import re

import pytest

from helpers import bench_cli


bench = bench_cli


SMALL = ["--preset", "smoke", "--subset", "10", "--epochs", "1", "--attacks", "clean", "--eval-n", "20",
         "--probe-n", "4", "--device", "cpu", "-q"]


@pytest.mark.parametrize("args,pattern", [
    (["--methods", "natral"], r"unknown method 'natral'; accepted: afd, afd-literal, afkd, arrest, atas, fgsm-ga, fgsm-rs, "
                                  r"free-at, natural, pgd-at, rift, trades, vaft"),
    (["--dataset", "cifar11"], r"unknown dataset 'cifar11'; accepted: cifar10, cifar100"),
    (["--arch", "resnet19"], r"unknown architecture 'resnet19'; accepted: preactresnet18, resnet18, resnet50"),
    (["--preset", "fast"], r"unknown preset 'fast'; accepted: .*paper, smoke"),
    (["--attacks", "clean,cw"], r"unknown attack 'cw'; accepted: clean, pgd20, aa"),
    (["--seeds", "0,a"], r"malformed --seeds '0,a'; accepted: non-negative integers"),
    (["--seeds", "3-1"], r"malformed --seeds '3-1': range 3-1 is empty"),
    (["--set", "lr=fast"], r"natural.lr = 'fast'; accepted: a finite number"),
    (["--set", "eps"], r"malformed --set 'eps'; accepted: key=value or method.key=value"),
    (["--set", "gamma=5"], r"unknown hyper-parameter 'gamma' in --set; accepted for natural, pgd-at: "),
    (["--set", "pgd-at.eps=2"], r"pgd-at.eps = 2.0? ?; accepted: a number in \[0, 1\]|pgd-at.eps = 2; accepted"),
    (["--set", "attack_step=-0.1"], r"pgd-at.attack_step = -0.1; accepted: a number in \[0, 1\]"),
    (["--set", "natural.epochs=0"], r"natural.epochs = 0; accepted: a positive integer"),
    (["--epochs", "0"], r"Invalid value for '--epochs': 0; accepted: a positive integer \(see bench run --help\)"),
    (["--epochs", "-3"], r"Invalid value for '--epochs': -3; accepted: a positive integer"),
    (["--eval-n", "x"], r"Invalid value for '--eval-n': 'x' is not a valid integer"),
    (["--bogus"], r"No such option '--bogus'"),
    (["--device", "cuda"], r"--device cuda: no CUDA GPU is visible here; accepted: cpu or auto"),
    (["--device", "tpu"], r"unknown --device 'tpu'; accepted: auto, cpu, cuda, cuda:N"),
    (["--precision", "fp8"], r"unknown precision 'fp8'; accepted: bf16, fp32, fp64"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/dir"], r"--data-dir /nonexistent/dir does not exist"),
    (["--set", "foo.eps=1"], r"unknown method in --set 'foo'"),
    # a method's own constraints are checked when the run is planned, before its starting model trains
    (["--methods", "fgsm-ga", "--set", "fgsm-ga.lam=big"], r"fgsm-ga.lam = 'big'; accepted: \"auto\""),
    (["--methods", "free-at", "--set", "free-at.replays=0"], r"free-at.replays = 0; accepted: an integer ≥ 1"),
    (["--methods", "atas", "--set", "atas.min_step=0.1"],
     r"atas.min_step = 0.1, atas.max_step = 0.05\d+; accepted: 0 < min_step ≤ max_step ≤ 1"),
    (["--methods", "rift", "--set", "rift.holdout_per_class=1"],
     r"rift.holdout_per_class = 1; accepted: an integer ≥ 2"),
    (["--methods", "rift", "--set", "rift.alpha_tolerance=-1"], r"rift.alpha_tolerance = -1(\.0)?; accepted: a number ≥ 0"),
])
def test_bad_run_input_is_one_line_exit_2_and_writes_nothing(capsys, monkeypatch, tmp_path, args, pattern):
    import re

    if args[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
    results = tmp_path / "results"
    code, out, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural,pgd-at", *args,
                           "--results", str(results))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, err), err
    assert not results.exists()


def test_a_results_path_that_is_a_file(capsys, monkeypatch, tmp_path):
    f = tmp_path / "results"
    f.write_text("keep me")
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--results", str(f))
    assert code == 2 and "is a file; accepted: a directory" in err and f.read_text() == "keep me"


def test_eval_input_errors(capsys, monkeypatch, tmp_path):
    code, _, err = bench(capsys, monkeypatch, "eval", str(tmp_path / "nope.pt"), "--arch", "resnet18",
                         "--dataset", "cifar10")
    assert code == 2 and "does not exist; accepted: a run directory, a checkpoint file, or robustbench:<name>" in err
    ck = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"a": torch.zeros(1)}, ck)
    code, _, err = bench(capsys, monkeypatch, "eval", str(ck))
    assert code == 2 and "needs --arch and --dataset" in err
    code, _, err = bench(capsys, monkeypatch, "eval", str(ck), "--arch", "smallcnn", "--dataset", "synthetic",
                         "--eps", "9")
    assert code == 2 and "--eps '9'; accepted: a number in [0, 1]" in err
    code, _, err = bench(capsys, monkeypatch, "eval", str(ck), "--arch", "smallcnn", "--dataset", "synthetic")
    assert code == 2 and "does not fit architecture smallcnn: missing" in err
    from bench.models import create_model

    c100 = tmp_path / "c100.safetensors"
    save_file(create_model("smallcnn", 100).state_dict(), c100)
    code, _, err = bench(capsys, monkeypatch, "eval", str(c100), "--arch", "smallcnn", "--dataset", "synthetic")
    assert code == 2 and f"error: {c100} has 100 classes; the model for this dataset has 10" in err


def test_run_then_status_eval_and_list(capsys, monkeypatch, tmp_path):
    results = tmp_path / "results"
    code, out, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--results", str(results))
    assert code == 0, err
    assert "Clean" in out and "PGD-20" in out and "AA" in out and "s/epoch" in out and "natural" in out
    assert "[natural s0] epoch 1/1" in err
    run_dir = next((results / "runs").iterdir())
    code, out, _ = bench(capsys, monkeypatch, "status", "--results", str(results))
    assert code == 0 and out.startswith("done") and run_dir.name in out
    code, out, _ = bench(capsys, monkeypatch, "status", "--results", str(results), "--json")
    assert json.loads(out.splitlines()[0])["state"] == "done"
    code, out, err = bench(capsys, monkeypatch, "eval", str(run_dir), "--attacks", "clean,pgd20", "--n", "10", "-q")
    assert code == 0, err
    assert "pgd20" in out and "(" in out
    assert re.search(r"pgd20 +[0-9.]+%  \([0-9]+/10, [0-9.]+ s\)", out)  # the attack's time: AutoAttack's target
    assert "pgd20" in json.loads((run_dir / "eval.json").read_text())["results"]
    # the run's final weights evaluated as a plain checkpoint file give the same clean number
    code, out2, err = bench(capsys, monkeypatch, "eval", str(run_dir / "ckpt" / "model.safetensors"), "--arch",
                            "smallcnn", "--dataset", "synthetic", "--attacks", "clean", "--n", "10", "-q",
                            "--output", str(tmp_path / "e.json"))
    assert code == 0, err
    clean_dir = [line for line in out.splitlines() if "clean" in line][0].split()[1]
    assert clean_dir in out2 and json.loads((tmp_path / "e.json").read_text())["results"]["clean"]["n"] == 10
    code, out, _ = bench(capsys, monkeypatch, "list")
    assert code == 0 and "pgd-at" in out and "starts from" in out and "tinyimagenet" in out and "smoke" in out
    listed = {line.split()[0]: line for line in out.splitlines() if "starts from" in line}
    for m in ("trades", "free-at", "fgsm-rs", "fgsm-ga", "atas"):
        assert "starts from scratch" in listed[m], m
    assert "starts from adversarial" in listed["rift"] and "§13" in listed["rift"]
    # a failed sanity check marks the run in every table that shows it
    from bench.records import RunDir
    from bench.runner import format_table, summary_rows

    assert "  ok  " in format_table(summary_rows([RunDir(run_dir)]))
    ev = json.loads((run_dir / "eval.json").read_text())
    ev["checks"]["large_eps_breaks"]["passed"] = False
    from bench.evaluate import finalize_checks

    (run_dir / "eval.json").write_text(json.dumps(finalize_checks(ev)))
    assert "SUSPECT: large_eps_breaks" in format_table(summary_rows([RunDir(run_dir)]))
    code, out, _ = bench(capsys, monkeypatch, "status", "--results", str(results))
    assert "SUSPECT: large_eps_breaks" in out


def test_a_second_process_on_the_same_run_is_told_who_holds_it(capsys, monkeypatch, tmp_path):
    import socket
    import subprocess

    from bench.runner import RunRequest, plan
    from bench.records import RunDir

    results = tmp_path / "results"
    req = RunRequest(preset="smoke", methods=["natural"], subset=10, epochs=1, attacks="clean", eval_n=20,
                     probe_n=4, device="cpu", results_dir=str(results))
    run = RunDir.for_config(plan(req)[0].cfg)
    from helpers import hold_lock

    holder = hold_lock(run.path)
    try:
        code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--results", str(results))
        assert code == 2 and f"is in use by process {holder.pid} on {socket.gethostname()}" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: the kernel released its lock (the file, naming it, is still there)
    assert (run.path / ".lock").read_text().split()[1] == str(holder.pid)
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--results", str(results))
    assert code == 0, err
    assert run.is_done() and (run.path / ".lock").read_text() == ""  # released: it names nobody
