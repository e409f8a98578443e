"""`bench report`: tables and figures from run records, beside the paper — a golden-file test over a fixed set of
records, aggregation rules, missing cells, the empty case, and index.html in a real headless browser."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from bench.errors import BenchError
from bench.report import build, read_runs

GOLDEN = Path(__file__).parent / "golden" / "report"
CPU, GPU = "cpu (test CPU, 2 threads)", "cuda (NVIDIA H100 80GB HBM3)"
TABLES = ["table1", "table2", "table3", "table4", "table5", "settings"]


def _hp(method, **kw):
    from methods import get_method

    hp = get_method(method).resolved_defaults()
    hp.update(kw)
    return hp


def write_run(root, method, seed, *, dataset="cifar10", arch="resnet18", hp=None, accs=None, n=100, device=CPU,
              seconds=(10.0, 12.0), pretrained=None, heads=None, suspect=(), preset="paper", gaps=None, done=True,
              name=None):
    """A run record as the suite writes it (config.json, metrics.jsonl, eval.json, done), without weights."""
    hp = hp or _hp(method)
    hp["epochs"] = len(seconds)
    if name is None:
        from bench.config import identity_hp  # (a name that options added at their recorded value leave alone)

        ident = identity_hp(method, hp)
        digest = hashlib.sha256(json.dumps([method, seed, ident, dataset, arch], sort_keys=True).encode()).hexdigest()
        name = f"{dataset}_{arch}_{method}_s{seed}_{digest[:10]}"
    d = Path(root) / "runs" / name
    d.mkdir(parents=True)
    cfg = {"method": method, "dataset": dataset, "arch": arch, "seed": seed, "hp": hp, "preset": preset,
           "subset": None, "normalize": False, "precision": "fp32", "pretrained": pretrained, "attacks": ["clean"]}
    (d / "config.json").write_text(json.dumps({"config": cfg, "run_name": name, "device": device}))
    gaps = gaps or [0.1 * (i + 1) for i in range(len(seconds) + 1)]
    rows = [{"epoch": 0, "feature_gap": gaps[0]}] + [
        {"epoch": i + 1, "seconds": s, "loss": 1.0, "feature_gap": gaps[i + 1]} for i, s in enumerate(seconds)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = {"results": {a: {"acc": v, "correct": round(v * n / 100), "n": n} for a, v in (accs or {}).items()},
          "suspect": list(suspect)}
    if heads:
        ev["heads"] = {h: {a: {"acc": v, "n": n} for a, v in r.items()} for h, r in heads.items()}
    (d / "eval.json").write_text(json.dumps(ev))
    if done:
        (d / "done").write_text("done\n")
    return name


def fixed_records(root):
    """The golden set: two seeds of AFD (each from its own natural model), vAFT in two settings, a suspect
    PGD-AT, a WRN run, a CIFAR-100 run, a method without a paper row, times on two devices, a partial run."""
    nat = [write_run(root, "natural", s, accs={"clean": 90.0 + s, "pgd20": 0.0, "aa": 0.0}, seconds=(5.0, 5.0),
                     name=f"cifar10_resnet18_natural_s{s}_000000000{s}") for s in (0, 1)]
    for s, (c, p, a) in enumerate([(84.0, 52.0, 47.0), (85.0, 53.5, 48.0)]):
        write_run(root, "afd", s, accs={"clean": c, "pgd20": p, "aa": a}, pretrained=nat[s], seconds=(20.0, 22.0),
                  heads={"f1": {"clean": c, "pgd20": p}, "f2": {"clean": 40.0 + s, "pgd20": 10.0}},
                  gaps=[0.5, 0.4, 0.3])
    write_run(root, "vaft", 0, accs={"clean": 83.0, "pgd20": 51.0, "aa": 45.0}, pretrained=nat[0],
              gaps=[0.5, 0.6, 0.9])
    write_run(root, "vaft", 0, hp=_hp("vaft", lr=0.0025), accs={"clean": 86.0, "pgd20": 40.0}, pretrained=nat[0])
    write_run(root, "vaft+d", 0, accs={"clean": 84.5, "pgd20": 51.9, "aa": 46.5}, pretrained=nat[0])
    write_run(root, "pgd-at", 0, accs={"clean": 84.0, "pgd20": 60.0, "aa": 70.0}, suspect=["ordering"],
              seconds=(30.0, 30.0), device=GPU)
    write_run(root, "trades", 0, dataset="cifar100", accs={"clean": 55.0, "pgd20": 28.0, "aa": 23.0})
    write_run(root, "fgsm-rs", 0, accs={"clean": 80.0, "pgd20": 45.0, "aa": 41.0}, seconds=(3.0, 3.0), device=GPU)
    write_run(root, "afd", 0, arch="wrn-34-10", accs={"clean": 88.0, "pgd20": 56.0, "aa": 51.5})
    write_run(root, "arrest", 0, accs={"clean": 50.0}, done=False)  # partial: not in any table


def test_the_report_over_fixed_records_matches_the_golden_files(tmp_path):
    fixed_records(tmp_path)
    rep = build(tmp_path, echo=lambda s: None)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for t in TABLES:
            for ext in ("md", "csv"):
                shutil.copy(tmp_path / "tables" / f"{t}.{ext}", GOLDEN / f"{t}.{ext}")
    for t in TABLES:
        for ext in ("md", "csv"):
            got = (tmp_path / "tables" / f"{t}.{ext}").read_text()
            assert got == (GOLDEN / f"{t}.{ext}").read_text(), f"{t}.{ext} differs (UPDATE_GOLDEN=1 to accept)"
        assert (tmp_path / "tables" / f"{t}.tex").read_text().startswith("\\begin{table}")
    assert set(rep.figures) == {"fig1a_feature_gap", "scatter_clean_pgd20", "time_vs_robustness"}
    for f in rep.figures:
        assert (tmp_path / "figures" / f"{f}.png").stat().st_size > 1000
        assert (tmp_path / "figures" / f"{f}.pdf").read_bytes().startswith(b"%PDF")
    # a second build over the same records writes the same tables (stable order)
    again = tmp_path / "again"
    build(tmp_path, again, echo=lambda s: None)
    for t in TABLES:
        assert (again / "tables" / f"{t}.md").read_text() == (tmp_path / "tables" / f"{t}.md").read_text()


def _rows(path, **match):
    import pandas as pd

    df = pd.read_csv(path)
    for k, v in match.items():
        df = df[df[k] == v]
    return df


def test_seeds_aggregate_other_differences_never_do(tmp_path):
    fixed_records(tmp_path)
    build(tmp_path, echo=lambda s: None)
    t1 = tmp_path / "tables" / "table1.csv"
    afd = _rows(t1, method="afd", dataset="cifar10")
    assert len(afd) == 1 and afd.iloc[0]["seeds"] == 2
    assert afd.iloc[0]["clean_mean"] == pytest.approx(84.5)
    assert afd.iloc[0]["clean_std"] == pytest.approx(0.7071, abs=1e-4)
    assert afd.iloc[0]["avg_mean"] == pytest.approx(((84 + 52 + 47) / 3 + (85 + 53.5 + 48) / 3) / 2)
    assert afd.iloc[0]["paper_clean"] == pytest.approx(84.88)
    vaft = _rows(t1, method="vaft", dataset="cifar10")
    assert len(vaft) == 2 and set(vaft["setting"].str.len()) == {10}  # two settings (lr), two rows
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert "84.50 ± 0.71" in md


def test_missing_cells_are_dashes_never_zero_and_marks_are_shown(tmp_path):
    fixed_records(tmp_path)
    build(tmp_path, echo=lambda s: None)
    md = (tmp_path / "tables" / "table1.md").read_text()
    vaft_rows = [ln for ln in md.splitlines() if "| vaft " in ln]
    assert any("| 40.00 " in ln and "| —" in ln for ln in vaft_rows)  # no AA: "—", no Avg
    free = [ln for ln in md.splitlines() if "| free-at " in ln and ln.startswith("| cifar10 ")][0]
    assert "78.37" in free and "† PGD-10" in free and "| 0.00 " not in free
    pgd = [ln for ln in md.splitlines() if "| pgd-at " in ln and ln.startswith("| cifar10 ")][0]
    assert "SUSPECT" in pgd and "ordering" in pgd
    rs = [ln for ln in md.splitlines() if "| fgsm-rs " in ln][0]
    assert "no paper row" in rs
    arrest = [ln for ln in md.splitlines() if "| arrest " in ln and ln.startswith("| cifar10 ")][0]
    assert "| 50.00 " not in arrest and "85.71" in arrest  # the partial run is left out; the paper row stays
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    assert "88.00" in t2 and "88.08" in t2
    t4 = _rows(tmp_path / "tables" / "table4.csv", dataset="cifar10", arch="resnet18")
    assert t4.iloc[0]["delta"] == pytest.approx(84.5 - 40.5)


def test_table5_keeps_devices_apart_and_counts_the_pretraining(tmp_path):
    fixed_records(tmp_path)
    build(tmp_path, echo=lambda s: None)
    t5 = _rows(tmp_path / "tables" / "table5.csv")
    cols = [c for c in t5.columns if c.startswith("total_seconds[")]
    assert sorted(cols) == sorted([f"total_seconds[{CPU}]", f"total_seconds[{GPU}]"])
    afd = t5[(t5["method"] == "afd")]
    cpu = afd[f"total_seconds[{CPU}]"].dropna()
    assert cpu.iloc[0] == pytest.approx(42 + 10)  # AFD's 20 + 22 s plus its natural model's 5 + 5 s
    pgd = t5[t5["method"] == "pgd-at"].iloc[0]
    assert pgd[f"total_seconds[{GPU}]"] == 60 and str(pgd[f"total_seconds[{CPU}]"]) == "nan"


def test_a_report_over_no_runs_is_a_clear_error(tmp_path, capsys, monkeypatch):
    with pytest.raises(BenchError, match="no finished runs under .* to report on"):
        build(tmp_path / "nothing", echo=lambda s: None)
    import sys

    from bench.cli import main

    monkeypatch.setattr(sys, "argv", ["bench", "report", "--results", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: no finished runs")


def test_settings_group_seeds_of_runs_started_from_their_own_natural_models(tmp_path):
    fixed_records(tmp_path)
    runs = read_runs(tmp_path)
    afd = [r for r in runs if r.method == "afd" and r.arch == "resnet18"]
    assert len(afd) == 2 and afd[0].setting == afd[1].setting
    nat = [r for r in runs if r.method == "natural"]
    assert nat[0].setting == nat[1].setting


def _chromium():
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(path).exists():
            return path
    return None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_index_html_loads_in_a_headless_browser_without_console_errors(tmp_path):
    from selenium import webdriver

    fixed_records(tmp_path)
    rep = build(tmp_path, echo=lambda s: None)
    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.get((tmp_path / "index.html").as_uri())
        logs = driver.get_log("browser")
        assert not [m for m in logs if m["level"] in ("SEVERE", "ERROR")], logs
        tables = driver.find_elements("css selector", "section.table")
        assert [t.get_attribute("id") for t in tables] == TABLES
        for t in tables:
            assert t.find_elements("css selector", "table tbody tr")
        imgs = driver.find_elements("css selector", "section.figure img")
        assert len(imgs) == len(rep.figures) >= 3
        for img in imgs:  # every figure really loaded and has a size
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 100
        assert "Table 1" in driver.title or "aft-bench report" in driver.title
    finally:
        driver.quit()


@pytest.mark.slow
def test_an_afd_run_records_the_tsne_of_g_and_f1_and_the_report_draws_fig3(tmp_path):
    from helpers import run_request, small_request

    runs = run_request(small_request(tmp_path, methods=["afd"], epochs=1, subset=5, eval_n=40, batch_size=25,
                                     sets=["afd.attack_steps=1", "natural.epochs=1"]))
    afd = runs[-1]
    data = json.loads((afd.path / "tsne.json").read_text())
    assert data["method"] == "afd" and data["n"] == 40 and len(data["labels"]) == 40
    assert len(data["g"]) == len(data["f1"]) == 40 and all(len(p) == 2 for p in data["g"])
    nat = [p for p in (tmp_path / "results" / "runs").iterdir() if "_natural_" in p.name][0]
    assert (nat / "done").exists() and not (nat / "tsne.json").exists()  # only methods with disentangled features record one
    # a finished run recorded before t-SNEs existed gets one from its last checkpoint when it is run again
    first = (afd.path / "tsne.json").read_text()
    (afd.path / "tsne.json").unlink()
    run_request(small_request(tmp_path, methods=["afd"], epochs=1, subset=5, eval_n=40, batch_size=25,
                              sets=["afd.attack_steps=1", "natural.epochs=1"]))
    assert (afd.path / "tsne.json").read_text() == first
    rep = build(tmp_path / "results", echo=lambda s: None)
    assert "fig3_tsne" in rep.figures and (tmp_path / "results" / "figures" / "fig3_tsne.png").stat().st_size > 1000


def test_tsne_embedding_is_deterministic_and_uses_the_adversarial_examples():
    import torch

    from bench.evaluate import tsne_embedding
    from bench.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn", 10).eval()
    x, y = torch.rand(24, 3, 32, 32), torch.arange(24) % 10
    feats = {"g": model.features}
    a = tsne_embedding(model, x, y, feats, seed=3)
    b = tsne_embedding(model, x, y, feats, seed=3)
    assert a == b and a["n"] == 24 and a["perplexity"] < 24
    clean = tsne_embedding(model, x, y, feats, eps=0.0, seed=3)  # ε = 0: the features of the clean images
    assert clean["g"] != a["g"]


def test_kendall_tau_b_against_hand_counts_and_scipy():
    from bench.report import kendall_tau

    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # 6 pairs: (1,2) (1,3) (2,3) concordant, (1,4) (2,4) (3,4) discordant... by hand: x = 1 2 3 4, y = 1 3 2 0
    # pairs (i<j): 12 c, 13 c, 14 d, 23 d, 24 d, 34 d -> (2 - 4) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 0]) == pytest.approx(-2 / 6)
    # a tie in x: τ-b's denominator sqrt((n0 - n1)(n0 - n2)) with n0 = 6, n1 = 1, n2 = 0
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / (5 * 6) ** 0.5)
    assert kendall_tau([1], [2]) is None and kendall_tau([1, 1], [2, 3]) is None
    scipy_stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(0)
    for _ in range(20):
        xs = [rng.randint(0, 5) for _ in range(7)]
        ys = [rng.randint(0, 5) for _ in range(7)]
        ref = scipy_stats.kendalltau(xs, ys).statistic
        got = kendall_tau(xs, ys)
        assert (got is None and ref != ref) or got == pytest.approx(ref)


def test_the_cpu_tier_gets_its_own_table_with_seeds_times_and_tau(tmp_path):
    """Tier runs (preset cpu, a small CNN) never enter Table 1; the tier table aggregates their seeds, counts the
    pre-training into the total time, and ranks the methods against the paper's Table 1 with Kendall's τ."""
    fixed_records(tmp_path)
    build(tmp_path, echo=lambda s: None)  # no tier run yet: the page has no tier section (its files are written)
    assert 'id="tier"' not in (tmp_path / "index.html").read_text() and (tmp_path / "tables" / "tier.md").exists()
    nat = [write_run(tmp_path, "natural", s, arch="smallvgg", preset="cpu", seconds=(40.0,) * 3,
                     accs={"clean": 82.0 + s, "pgd20": 0.0, "aa": 0.0}) for s in (0, 1, 2)]
    # the paper's CIFAR-10 order: AFD 84.88/52.70/47.40 > ARREST 85.71/51.23/46.23 > vAFT 83.93/51.40/45.48 (AA)
    for s in (0, 1, 2):
        write_run(tmp_path, "afd", s, arch="smallvgg", preset="cpu", pretrained=nat[s], seconds=(100.0,) * 2,
                  accs={"clean": 70.0 + s, "pgd20": 36.0 + s, "aa": 31.0 + s})
        write_run(tmp_path, "vaft", s, arch="smallvgg", preset="cpu", pretrained=nat[s], seconds=(90.0,) * 2,
                  accs={"clean": 69.0, "pgd20": 35.0, "aa": 30.0})
    write_run(tmp_path, "arrest", 0, arch="smallvgg", preset="cpu", pretrained=nat[0], seconds=(95.0,) * 2,
              accs={"clean": 68.0, "pgd20": 34.0, "aa": 32.5})
    build(tmp_path, echo=lambda s: None)
    t1 = (tmp_path / "tables" / "table1.md").read_text()
    assert "smallvgg" not in t1 and "cpu·" not in t1
    page = (tmp_path / "index.html").read_text()
    assert 'id="tier"' in page and 'id="tier_tau"' in page
    tier = _rows(tmp_path / "tables" / "tier.csv")
    assert list(tier["method"]) == ["natural", "vaft", "arrest", "afd"]  # the paper's row order
    afd = tier[tier["method"] == "afd"].iloc[0]
    assert afd["seeds"] == 3 and afd["clean_mean"] == pytest.approx(71.0) and afd["clean_std"] == pytest.approx(1.0)
    assert afd["sec_per_epoch"] == pytest.approx(100.0)
    assert afd["total_seconds"] == pytest.approx(200.0 + 120.0)  # its epochs plus its own natural model's
    assert "epochs=2" in afd["notes"]
    md = (tmp_path / "tables" / "tier.md").read_text()
    assert "71.00 ± 1.00" in md and "10 of 10 runs finished" in md
    tau = _rows(tmp_path / "tables" / "tier_tau.csv").set_index("metric")
    # PGD-20: tier afd 37 > vaft 35 > arrest 34; paper afd 52.70 > vaft 51.40 > arrest 51.23: the same order
    assert tau.loc["pgd20", "methods"] == 3 and tau.loc["pgd20", "tau_b"] == pytest.approx(1.0)
    # AA: tier arrest 32.5 > afd 32 > vaft 30; paper afd > arrest > vaft: one discordant pair of three
    assert tau.loc["aa", "tau_b"] == pytest.approx(1 / 3, abs=1e-4)  # the CSV keeps 4 decimals
    assert tau.loc["aa", "tier"] == "arrest,afd,vaft" and tau.loc["aa", "paper"] == "afd,arrest,vaft"
    assert "Kendall τ-b" in (tmp_path / "tables" / "tier_tau.md").read_text()
    st = (tmp_path / "tables" / "settings.md").read_text()
    assert "≠ method defaults (scaled)" in st


# ---------------------------------------------------------------------------------------------------------------
# the user's runs and the project's shipped reference, kept apart


def _tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_the_shipped_reference_stands_beside_the_users_runs_labelled_and_untouched(tmp_path):
    """A user who re-ran a shipped setting has run directories of the very same names as the reference's: with
    --reference both appear, as settings of their own (never aggregated), the reference's labelled, each AFD run
    linked to the natural model of its own source; the reference root is read, never written."""
    user, ref = tmp_path / "results", tmp_path / "clone" / "results" / "reference"
    for root, c in ((user, 70.0), (ref, 80.0)):
        nat = write_run(root, "natural", 0, accs={"clean": c + 10, "pgd20": 0.0, "aa": 0.0}, seconds=(5.0, 5.0),
                        name="cifar10_resnet18_natural_s0_0000000000", device=CPU)
        write_run(root, "afd", 0, accs={"clean": c, "pgd20": 40.0, "aa": 35.0}, pretrained=nat,
                  name="cifar10_resnet18_afd_s0_1111111111", seconds=(20.0, 20.0) if root == user else (9.0, 9.0))
    before = _tree_digest(ref)
    build(user, echo=lambda s: None, reference=ref)
    assert _tree_digest(ref) == before
    t1 = _rows(user / "tables" / "table1.csv", method="afd", dataset="cifar10")
    assert sorted(t1["clean_mean"]) == [70.0, 80.0] and set(t1["seeds"]) == {1}
    md = (user / "tables" / "table1.md").read_text()
    assert md.count("reference·paper·") == 2 and "| afd " in md  # natural and afd rows of the reference, labelled
    # Table 5's totals add each AFD run's own natural pre-training (5 + 5 s), never the other source's
    totals = sorted(_rows(user / "tables" / "table5.csv", method="afd").filter(like="total").iloc[:, 0])
    assert totals == [28.0, 50.0]
    assert "shipped reference records" in (user / "index.html").read_text()
    # without --reference only the user's runs are reported
    build(user, tmp_path / "mine", echo=lambda s: None)
    assert "reference·" not in (tmp_path / "mine" / "tables" / "table1.md").read_text()


def test_a_fresh_clone_report_points_to_the_reference_and_refuses_it_as_its_own_reference(tmp_path):
    ref = tmp_path / "reference"
    write_run(ref, "natural", 0, accs={"clean": 90.0, "pgd20": 0.0, "aa": 0.0})
    with pytest.raises(BenchError, match="bench report --reference"):
        build(tmp_path / "results", echo=lambda s: None)
    with pytest.raises(BenchError, match="is the results directory itself"):
        build(ref, echo=lambda s: None, reference=ref)
    with pytest.raises(BenchError, match="holds no runs/"):
        build(ref, echo=lambda s: None, reference=tmp_path / "nowhere")
    rep = build(tmp_path / "results", echo=lambda s: None, reference=ref)  # the reference alone, written elsewhere
    assert rep.done == 1 and (tmp_path / "results" / "index.html").is_file()
    assert not (ref / "index.html").exists()


def test_bench_report_reference_option_defaults_to_the_clones_results_reference(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import bench.report
    from bench.cli import cli

    ref = tmp_path / "clone" / "results" / "reference"
    write_run(ref, "natural", 0, accs={"clean": 90.0, "pgd20": 0.0, "aa": 0.0})
    monkeypatch.setattr(bench.report, "shipped_reference", lambda: ref)
    user = tmp_path / "results"
    r = CliRunner().invoke(cli, ["report", "--results", str(user), "--reference"])
    assert r.exit_code == 0, r.output
    assert "reference·" in (user / "tables" / "table1.md").read_text()
    r = CliRunner().invoke(cli, ["report", "--reference", "--results", str(tmp_path / "r2")])  # flag before others
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["report", "--results", str(tmp_path / "r3"), "--reference", str(ref)])
    assert r.exit_code == 0, r.output


def test_what_users_commands_write_is_ignored_by_git_and_the_reference_records_are_not():
    """A user's bench run / report / perf / sweep write under results/ (runs, tables, figures, index.html, perf,
    sweeps): git status stays clean. The shipped reference's records are tracked; its weights never are."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    user = ["results/runs/cifar10_smallcnn_afd_s0_0123456789/config.json", "results/runs/x/ckpt/last.safetensors",
            "results/tables/table1.md", "results/figures/fig1a_feature_gap.png", "results/index.html",
            "results/perf/cpu-x-2026-12-03.json", "results/sweeps/jobs.json", "results/device-check/summary.md",
            "results/reference/runs/x/ckpt/model.safetensors", "results/reference/runs/x/.lock"]
    shipped = ["results/README.md", "results/reference/runs/x/config.json", "results/reference/runs/x/eval.json",
               "results/reference/tables/tier.md", "results/reference/index.html",
               "results/reference/perf/peers-cpu-2026-12-03.md"]
    out = subprocess.run(["git", "-C", str(root), "check-ignore", "--no-index", *user, *shipped],
                         capture_output=True, text=True).stdout.split()
    assert sorted(out) == sorted(user)


def test_a_run_with_a_holdout_is_another_setting_than_one_without(tmp_path):
    """RiFT's PGD-AT base keeps a hold-out out of training (config "holdout"): it is another setting than the plain
    PGD-AT run of the same seed, never a second seed of it."""
    write_run(tmp_path, "pgd-at", 0, accs={"clean": 57.0, "pgd20": 35.0, "aa": 31.0}, name="c_r_pgd-at_s0_aaaaaaaaaa")
    name = write_run(tmp_path, "pgd-at", 0, accs={"clean": 56.5, "pgd20": 34.2, "aa": 30.0},
                     name="c_r_pgd-at_s0_bbbbbbbbbb")
    cfg_path = tmp_path / "runs" / name / "config.json"
    rec = json.loads(cfg_path.read_text())
    rec["config"]["holdout"] = 100
    cfg_path.write_text(json.dumps(rec))
    runs = read_runs(tmp_path)
    assert len({r.setting for r in runs}) == 2
    build(tmp_path, echo=lambda s: None)
    t1 = _rows(tmp_path / "tables" / "table1.csv", method="pgd-at", dataset="cifar10")
    assert sorted(t1["clean_mean"]) == [56.5, 57.0] and set(t1["seeds"]) == {1}


def test_a_record_from_before_an_identity_neutral_option_is_the_same_setting_as_one_after_it():
    """A method's option added after runs were recorded (Method.identity_neutral) leaves their run hash unchanged at
    the value they had: the report, too, counts a record without the key and one with it at that value as one
    setting (two seeds), and one at another value as another setting."""
    import tempfile

    from methods import METHODS

    method = next(m for m in METHODS.names() if METHODS.get(m).identity_neutral)
    key, value = next(iter(METHODS.get(method).identity_neutral.items()))
    with tempfile.TemporaryDirectory() as root:
        old = {k: v for k, v in _hp(method).items() if k != key}
        write_run(root, method, 0, hp=old, accs={"clean": 50.0})
        write_run(root, method, 1, hp={**old, key: value}, accs={"clean": 52.0})
        other = "__another__" if isinstance(value, str) else (not value if isinstance(value, bool) else value + 1)
        write_run(root, method, 2, hp={**old, key: other}, accs={"clean": 54.0})
        runs = {r.seed: r.setting for r in read_runs(root)}
    assert runs[0] == runs[1] != runs[2]
