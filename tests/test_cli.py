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
    # a hyper-parameter given as a flag: the hint names --set
    (["--gamma", "5"], r"No such option '--gamma'.* \(a hyper-parameter is set with --set gamma=VALUE or --set "
                       r"METHOD.gamma=VALUE; see bench run --help\)$"),
    (["--eps", "9"], r"--eps '9'; accepted: a positive number ≤ 1 in pixel units, e.g. 8/255$"),
    (["--eps", "0"], r"--eps '0'; accepted: a positive number ≤ 1"),
    (["--eps", "8/255,4/255"], r"--eps '8/255,4/255'; accepted: a positive number ≤ 1"),
    (["--eps", "1/0"], r"value '1/0' divides by zero"),
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
    assert code == 0 and out.splitlines()[2].startswith("done") and run_dir.name in out
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
    from methods import METHODS

    for m in METHODS.names():  # every method, with the model it starts from
        assert f"starts from {METHODS.get(m).starts_from}" in listed[m], m
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


def test_bench_eval_of_a_run_merges_as_bench_run_does(capsys, monkeypatch, tmp_path):
    """bench eval of a run directory merges into its eval.json through the function bench run uses: the attacks it
    lacks join (what it has stands, a worst over re-measured attacks does not), meta becomes the evaluation's; an
    evaluation at another ε leaves eval.json as it was, and says so."""
    results = tmp_path / "results"
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--results", str(results))
    assert code == 0, err
    run_dir = next((results / "runs").iterdir())
    before = (run_dir / "eval.json").read_text()
    code, out, err = bench(capsys, monkeypatch, "eval", str(run_dir), "--attacks", "clean,pgd20", "--n", "10",
                           "--eps", "4/255", "-q")
    assert code == 0 and "pgd20" in out, err
    assert f"note: {run_dir / 'eval.json'} is left as it was: it was measured at ε = 4/255" in err
    assert (run_dir / "eval.json").read_text() == before
    code, out, err = bench(capsys, monkeypatch, "eval", str(run_dir), "--attacks", "clean,pgd20", "--n", "10", "-q")
    assert code == 0 and err == "", err
    was, ev = json.loads(before), json.loads((run_dir / "eval.json").read_text())
    assert ev["results"]["clean"] == was["results"]["clean"] and ev["results"]["clean"]["n"] == 20
    assert ev["results"]["pgd20"]["n"] == 10 and "worst" not in ev["results"]
    assert ev["meta"]["n"] == 10 and ev["meta"]["protocol"] == was["meta"]["protocol"] and "target" not in ev["meta"]
    assert ev["meta"]["weights_sha256"] == was["meta"]["weights_sha256"]
    assert {k: ev["checks"][k] for k in was["checks"]} == was["checks"] and "ordering" in ev["checks"]
    code, out, _ = bench(capsys, monkeypatch, "status", "--results", str(results))
    assert code == 0 and out.splitlines()[2].startswith("done")


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


def test_run_eps_is_set_eps_in_the_config_and_the_hash(capsys, monkeypatch, tmp_path):
    from bench.runner import RunRequest, plan

    results = tmp_path / "results"
    code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--eps", "4/255", "--results",
                         str(results))
    assert code == 0, err
    (run_dir,) = (results / "runs").iterdir()
    assert json.loads((run_dir / "config.json").read_text())["config"]["hp"]["eps"] == 4 / 255  # resolved
    same = RunRequest(preset="smoke", methods=["natural"], subset=10, epochs=1, attacks="clean", eval_n=20,
                      probe_n=4, device="cpu", results_dir=str(results), sets=["eps=4/255"])
    assert plan(same)[0].cfg.run_name == run_dir.name  # the run --set eps=4/255 makes
    other = RunRequest(**{**same.__dict__, "sets": []})
    assert plan(other)[0].cfg.run_name != run_dir.name


def test_a_file_that_is_not_a_checkpoint_is_named_so(capsys, monkeypatch, tmp_path):
    for name, text, kind in (("notes.md", "# results\n\nconvert me\n", "a text file"),
                             ("eval.json", '{"results": {}}', "a text file (JSON)")):
        f = tmp_path / name
        f.write_text(text)
        for args in (["eval", str(f), "--arch", "smallcnn", "--dataset", "synthetic"],
                     ["run", *SMALL, "--methods", "vaft", "--pretrained", str(f), "--results", str(tmp_path / "r")]):
            code, _, err = bench(capsys, monkeypatch, *args)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, err
            assert f"{f} is not a checkpoint: it is {kind}; accepted: .safetensors " in lines[0], err
            assert lines[0].endswith("model_state_dict)"), err  # whole, never cut
    assert not (tmp_path / "r").exists()


def test_a_starting_model_that_fails_to_start_is_one_line(capsys, monkeypatch, tmp_path):
    """The planning message ("needs the natural model …: training it first") comes once the starting model's
    training is set up: an error there is the only line."""
    from bench import engine
    from bench.errors import BenchError

    real = engine.Trainer.__init__

    def failing(self, cfg, *a, **k):
        if cfg.method == "natural":
            raise BenchError("the training split has 1 images, fewer than one batch of 128")
        real(self, cfg, *a, **k)

    monkeypatch.setattr(engine.Trainer, "__init__", failing)
    code, out, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "vaft", "--results",
                           str(tmp_path / "results"))
    assert code == 2 and err.strip().splitlines() == ["error: the training split has 1 images, fewer than one batch "
                                                      "of 128"], err


def test_help_shows_presets_effective_defaults_and_whole_descriptions(capsys, monkeypatch):
    from bench.config import load_preset, preset_names

    code, out, _ = bench(capsys, monkeypatch, "--help")
    commands = out.split("Commands:")[1]
    assert code == 0 and "..." not in commands
    for name in ("eval", "list", "perf", "report", "run", "status", "sweep"):
        assert re.search(rf"^  {name} +\S", commands, re.M), name
    code, out, _ = bench(capsys, monkeypatch, "run", "--help")
    text = " ".join(out.split())  # unwrapped
    for name in preset_names():  # every preset of bench/configs, with what it switches
        assert f"{name} sets " in text, name
    smoke = load_preset("smoke")["run"]
    assert f"smoke sets methods natural,pgd-at, dataset synthetic, arch {smoke['arch']}, subset {smoke['subset']}" \
        in text
    assert f"(default: all test images; smoke: {smoke['eval_n']})" in text
    assert "Training images per class (default: all; smoke: " in text
    assert "Architecture (default: resnet18; cpu: smallvgg, smoke: smallcnn)." in text  # (paper's is the default)
    assert "--eps TEXT L∞ budget ε of every listed method" in text


def test_status_is_a_table_with_a_header_and_the_n_of_each_number(capsys, monkeypatch, tmp_path):
    results = tmp_path / "results"
    for seed in ("0", "1"):
        code, _, err = bench(capsys, monkeypatch, "run", *SMALL, "--methods", "natural", "--seeds", seed,
                             "--attacks", "clean,pgd20", "--results", str(results))
        assert code == 0, err
    code, out, _ = bench(capsys, monkeypatch, "status", "--results", str(results))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["state", "epochs", "Clean", "PGD-20", "AA", "run"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = lines[2:]
    assert len(rows) == 2 and all(r.startswith("done") for r in rows)
    for r in rows:
        assert re.search(r"done +1/1 +[0-9.]+ \(n=20\) +[0-9.]+ \(n=20\) +— +synthetic_smallcnn_natural_s[01]_", r), r
    # aligned: every column starts at the header's position
    for h in ("epochs", "Clean", "PGD-20", "AA", "run"):
        col = lines[0].index(h)
        assert all(r[col - 2:col] == "  " and r[col] != " " for r in rows), (h, rows)


def test_ci_runs_the_readmes_test_command_and_names_its_sections():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0].splitlines()
    last = [ln for ln in ci.splitlines() if ln.strip()][-1]
    assert last in quick and last.startswith(".venv/bin/python ")  # runs without an activated venv
    headings = {ln.lstrip("#").strip() for ln in readme.splitlines() if ln.startswith("#")}
    for name in re.findall(r'README "([^"]+)"', ci):
        assert name in headings, name


def test_the_readme_main_job_table_is_the_smoke_presets():
    """The main job's AutoAttack share stays small (100 images: minutes of AA on a busy 2-core machine, not a quarter
    of an hour) and the README's table shows what the preset evaluates."""
    from pathlib import Path

    from bench.config import load_preset

    run = load_preset("smoke")["run"]
    assert run["aa_n"] <= 100 and run["eval_n"] == 500
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Quick start", 1)[1].split("method   seed", 1)[1].split("```", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith(("natural", "pgd-at"))]
    assert len(rows) == 2 and all(f"(n={run['aa_n']})" in r and f"(n={run['eval_n']})" in r for r in rows)


def test_the_ablations_names_without_plus_are_the_same_runs(capsys, monkeypatch, tmp_path):
    """``vaft-d`` / ``vaft-a`` (for TOML bare keys, regular expressions, URLs) name ``vaft+d`` / ``vaft+a`` wherever
    a method is named: --methods, --set, a preset's methods and [method.<name>] tables (cpu.toml's too), the paper's
    tables. They are the same runs: the registered name, hash and directory."""
    from pathlib import Path

    from bench import paper
    from bench.config import RunConfig, load_preset
    from bench.runner import RunRequest, plan

    def dry(methods, sets):
        code, out, err = bench(capsys, monkeypatch, "sweep", "--preset", "smoke", "--methods", methods, "--set", sets,
                               "--results", str(tmp_path / "results"), "--dry-run")
        assert code == 0, err
        return out

    plus = dry("vaft+d,vaft+a", "vaft+d.gamma=5")
    assert "_vaft+d_s0_" in plus and "_vaft+a_s0_" in plus
    assert dry("vaft-d,vaft-a", "vaft-d.gamma=5") == plus

    def preset(text):
        (tmp_path / "p.toml").write_text(f'[run]\nmethods = ["natural", "{text[0]}"]\n[method.{text[1]}]\nepochs = 3\n')
        return [p.cfg for p in plan(RunRequest(preset=str(tmp_path / "p.toml"), results_dir=str(tmp_path / "r")))]

    (nat, plain), (nat2, alias) = preset(("vaft+d", '"vaft+d"')), preset(("vaft-d", "vaft-d"))
    assert plain.hp["epochs"] == 3 and (plain.run_name, nat.run_name) == (alias.run_name, nat2.run_name)
    assert plain.method == alias.method == "vaft+d"
    assert RunConfig(**{**plain.to_dict(), "method": "vaft-d"}).run_hash == plain.run_hash
    (tmp_path / "two.toml").write_text('[method.vaft-d]\nepochs = 3\n[method."vaft+d"]\nepochs = 4\n')
    code, _, err = bench(capsys, monkeypatch, "run", "--preset", str(tmp_path / "two.toml"), "--methods", "vaft+d",
                         "--results", str(tmp_path / "r"))
    assert code == 2 and "both name vaft+d" in err

    cpu = (Path(__file__).resolve().parent.parent / "bench" / "configs" / "cpu.toml").read_text()
    alias_cpu = cpu.replace('[method."vaft+d"]', "[method.vaft-d]").replace('"vaft+a"', '"vaft-a"')
    assert "[method.vaft-d]" in alias_cpu and alias_cpu.count("vaft-a") == 2  # its methods and its table
    (tmp_path / "cpu-alias.toml").write_text(alias_cpu)
    mine, shipped = load_preset(str(tmp_path / "cpu-alias.toml")), load_preset("cpu")
    assert (mine["run"], mine["method"]) == (shipped["run"], shipped["method"])

    assert paper.paper_number("AFD Table 3", "vaft-a", metric="aa") == 46.81
    assert paper.table5_row("vaft-d") == paper.table5_row("vaft+d")
    code, out, _ = bench(capsys, monkeypatch, "list")
    assert "(also vaft-d)" in next(ln for ln in out.splitlines() if ln.split()[:1] == ["vaft+d"])
