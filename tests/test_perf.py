"""`bench perf` in CI size: it writes a well-formed result (no timing assertions: timings are measured by the
benchmark, never asserted in unit tests)."""
import json

import pytest

from bench.perf import precision_check, run_perf, summary_markdown


@pytest.mark.slow
def test_bench_perf_writes_a_well_formed_result(tmp_path):
    path = run_perf(device="cpu", arch="smallcnn", methods=("natural", "pgd-at", "trades", "afd"), batch=8, steps=1,
                    repeats=2, warmup=1, attack_steps=1, eval_n=8, aa_n=2, compile_=False, precision="fp32",
                    label="ci-size", out_dir=tmp_path, echo=lambda s: None)
    rec = json.loads(path.read_text())
    assert path.name.startswith("cpu-") and path.name.endswith("-ci-size.json") and path.with_suffix(".md").is_file()
    assert rec["label"] == "ci-size"
    assert rec["device"].startswith("cpu") and rec["torch"] and rec["settings"]["arch"] == "smallcnn"
    assert set(rec["methods"]) == {"natural", "pgd-at", "trades", "afd"}
    for m, r in rec["methods"].items():
        for kind in ("reference", "engine"):
            t = r[kind]
            assert t["repeats"] == 2 and t["sec_per_step_min"] <= t["sec_per_step"] <= t["sec_per_step_max"]
            assert t["images_per_s"] > 0 and t["sec_per_cifar10_epoch"] == pytest.approx(50_000 / t["images_per_s"])
            assert t["peak_mem_mb"] > 0
        assert r["speedup"] == pytest.approx(r["reference"]["sec_per_step"] / r["engine"]["sec_per_step"])
        pr = r["speedup_per_repeat"]
        assert pr["min"] <= pr["median"] <= pr["max"] and pr["median"] == pytest.approx(
            __import__("statistics").median(a / b for a, b in zip(r["reference"]["sec_per_step_all"],
                                                                    r["engine"]["sec_per_step_all"])))
    eng = rec["settings"]["engine"]
    assert (eng["precision"], eng["compile"], eng["fused_sgd"]) == ("fp32", False, False)
    assert rec["settings"]["reference"]["precision"] == "fp32" and "interleaved" in rec["settings"]["timing"]
    pa = rec["methods"]["pgd-at"]
    # one attack step (fwd + input backward) and the update (fwd + full backward): more than one fwd+bwd
    assert pa["flops_per_step"] > 0 and pa["fraction_of_peak"] is None  # no peak for a CPU
    assert rec["evaluation"]["pgd20"]["images"] == 8 and rec["evaluation"]["aa"]["images"] == 2
    md = path.with_suffix(".md").read_text()
    assert "| pgd-at |" in md and "engine / reference" in md and rec["device"] in md


@pytest.mark.slow
def test_the_precision_check_trains_fp32_and_bf16_side_by_side(tmp_path):
    """fp32 and bf16 eager, and the engine's compiled run (its own directory: compile is not in a run's identity,
    so it would otherwise reuse the eager bf16 run)."""
    import json

    res = precision_check(__import__("torch").device("cpu"), tmp_path, epochs=1, subset=5, eval_n=20,
                          echo=lambda s: None, compiled="bf16")
    assert set(res["fp32"]) == set(res["bf16"]) == {"clean", "pgd20", "n", "run", "device"}
    c = res["compiled"]
    assert c["precision"] == "bf16" and c["run"] == res["bf16"]["run"]  # the same run identity...
    cfg = json.loads((tmp_path / "compiled" / "runs" / c["run"] / "config.json").read_text())
    eager = json.loads((tmp_path / "runs" / c["run"] / "config.json").read_text())
    assert cfg["config"]["compile"] is True and eager["config"]["compile"] is False  # ...trained twice
    assert c["difference"]["pgd20"] == pytest.approx(c["pgd20"] - res["fp32"]["pgd20"], abs=0.01)
    assert set(c["within_2se"]) == {"clean", "pgd20"}
    assert res["fp32"]["device"].startswith("cpu")
    assert res["fp32"]["run"] != res["bf16"]["run"]  # two runs: precision is part of the identity
    assert res["difference"]["clean"] == pytest.approx(res["bf16"]["clean"] - res["fp32"]["clean"], abs=0.01)
    assert set(res["within_2se"]) == {"clean", "pgd20"}
    rec = {"device": "cpu", "date": "d", "torch": "t", "python": "p", "threads": 1,
           "settings": {"arch": "a", "batch": 1, "steps": 1, "repeats": 1, "warmup": 0, "engine": {},
                        "reference": {}}, "methods": {}, "precision_check": res}
    md = summary_markdown(rec)
    assert "Precision check" in md and "Compiled (bf16 + torch.compile" in md


@pytest.mark.slow
def test_the_fused_step_ablation_times_a_third_pipeline_side_by_side(tmp_path, monkeypatch):
    """--ablate-fused-step: the compiled engine without its fused PGD step, in the same interleaved rounds; the
    ratio unfused / fused per method and in the summary; the ablation's engine really steps unfused, and the engine
    fused."""
    from bench.attacks import CompiledAttackForward

    calls = []
    orig = CompiledAttackForward.fused_sign_step

    def spy(self, *a):
        out = orig(self, *a)
        calls.append((self.fused, out is not None))
        return out

    monkeypatch.setattr(CompiledAttackForward, "fused_sign_step", spy)
    path = run_perf(device="cpu", arch="smallcnn", methods=("pgd-at",), batch=8, steps=1, repeats=2, warmup=1,
                    attack_steps=2, eval_n=8, aa_n=0, compile_=True, precision="fp32", out_dir=tmp_path,
                    ablate_fused_step=True, echo=lambda s: None)
    rec = json.loads(path.read_text())
    r = rec["methods"]["pgd-at"]
    assert rec["settings"]["ablate_fused_step"] is True
    assert r["engine_unfused"]["repeats"] == 2 and len(r["engine_unfused"]["sec_per_step_all"]) == 2
    assert r["fused_step_speedup"] == pytest.approx(r["engine_unfused"]["sec_per_step"] / r["engine"]["sec_per_step"])
    pr = r["fused_step_speedup_per_repeat"]
    assert pr["min"] <= pr["median"] <= pr["max"]
    assert "Fused attack step" in path.with_suffix(".md").read_text()
    assert set(calls) == {(True, True), (False, False)}  # the engine fused every step; the ablation none


def test_the_fused_step_ablation_needs_the_compiled_engine(tmp_path):
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="ablate-fused-step.*compile"):
        run_perf(device="cpu", methods=("natural",), compile_=False, ablate_fused_step=True, out_dir=tmp_path,
                 echo=lambda s: None)
    assert not list(tmp_path.iterdir())  # refused before anything was timed or written
