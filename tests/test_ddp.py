"""Data parallelism (bench.dist): a run on 2 processes (gloo, CPU) is the run on one process with the same global
batch, up to floating-point rounding.

* piece by piece (spawned 2-process groups, ``ddp_workers``): synchronised BN equals full-batch BN (forward,
  backward, double backward, running statistics) on even and uneven splits; one training step of natural, PGD-AT,
  AFD (its three gradients reduced), ATAS and Free-AT on an uneven split gives the single-process weights, and the
  controls without the reduction do not; evaluation (PGD-20 and AutoAttack, with resumable chunk files) shards the
  test set and gathers the single-process record; ranks whose parameters differ are caught;
* end to end (``bench run --nproc 2``, i.e. torchrun): natural, PGD-AT, AFD, ATAS and Free-AT trained on 2
  processes in fp64 (``--precision fp64``) equal one process to 1e-10 — weights, EMA, optimiser and method state
  (Free-AT's and ATAS's δ) — and per-rank BN (a real difference) does not; the fp32 runs keep their identities and
  records, written once; a DDP run killed mid-run resumes to the uninterrupted result, on 2 processes or on one.

Why fp64 for the equalities: in fp32 a run on 2 processes differs from one process by rounding (gradients summed
over two shards, BN statistics combined from two, by another formula than torch's kernel), and an attack's
``sign(∇δ)`` turns a last-bit difference of a gradient near 0 into a pixel moved by 2ε, so after a few steps the gap
is chance: 4e-4 for Free-AT on a 2-core AMD EPYC, against 4e-6 between 1- and 2-thread runs there, whose kernels
split work over output elements and leave per-example gradients bit-identical (on an AVX-512 Xeon the thread count
changes the kernels' blocking, and that floor was larger). In fp64 the same runs differ by ≤ 4e-14 on that AMD (1- vs
2-thread: ≤ 3e-15): the DDP path is the one-process computation, and any real divergence (a δ row, a replay's lr,
BN statistics of a shard) is ≥ 1e-4, far above the 1e-10 tolerance on either CPU kind (fp64 rounding is ~1e-16
whatever the kernels' order, and no sign flips at that size in a few steps).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddp_workers as W
from bench.dist import SINGLE, Dist, Shard, even_shard, per_example, seed_loss, without_option
from methods import METHODS as REGISTRY

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------------------------
# no process group needed


def test_even_shard_covers_the_batch_in_order():
    for total in (1, 7, 8, 49, 128):
        for world in (1, 2, 3, 8):
            parts = [even_shard(total, r, world) for r in range(world)]
            assert parts[0].lo == 0 and parts[-1].hi == total
            assert all(a.hi == b.lo for a, b in zip(parts, parts[1:]))
            sizes = [p.size for p in parts]
            assert max(sizes) - min(sizes) <= 1
            assert abs(sum(p.share for p in parts) - 1) < 1e-12


def test_per_example_draws_are_the_global_batch_rows():
    """Inside a step on a shard, a per-example draw gives the rows of the draw for the whole global batch."""
    torch.manual_seed(5)
    full = torch.rand(7, 3)
    for rank in range(2):
        s = even_shard(7, rank, 2)
        torch.manual_seed(5)
        with Dist(rank, 2).step(s):
            got = per_example(lambda m: torch.rand(m, 3), s.size)
            with pytest.raises(RuntimeError, match="shard has"):
                per_example(lambda m: torch.rand(m, 3), s.size + 1)
        assert torch.equal(got, full[s.rows])
    torch.manual_seed(5)
    assert torch.equal(per_example(lambda m: torch.rand(m, 3), 7), full)  # outside a step: as drawn


def test_seed_loss_weights_by_share_only_on_a_shard():
    loss = torch.tensor(2.0)
    assert seed_loss(loss) is loss
    with SINGLE.step(Shard(8, 0, 8)):
        assert seed_loss(loss) is loss
    with Dist(1, 2).step(Shard(7, 4, 7)):
        assert float(seed_loss(loss)) == pytest.approx(2.0 * 3 / 7)


def test_sharded_loader_is_the_global_batch_cut_in_rows(synthetic):
    """Every rank's batches are its rows of the one-process batches: same images, same crops and flips, same
    indices; a last batch smaller than the number of ranks is dropped."""
    from bench.loader import DeviceLoader

    split = synthetic.train.per_class(16)  # 160 images
    for bs in (49, 64, 80):
        one = list(DeviceLoader(split, bs, seed=3, pad=4, flip=True).epoch(2))
        ranks = [list(DeviceLoader(split, bs, seed=3, pad=4, flip=True, dist=Dist(r, 2)).epoch(2)) for r in (0, 1)]
        assert [len(r) for r in ranks] == [len(one)] * 2
        for i, b in enumerate(one):
            assert torch.equal(torch.cat([r[i].x for r in ranks]), b.x)
            assert torch.equal(torch.cat([r[i].idx for r in ranks]), b.idx)
            assert all(torch.equal(r[i].all_idx, b.idx) for r in ranks)
    # 160 = 2·79 + 2: one process and two synchronised ranks keep the last 2 images; per-rank BN (2 each) or three
    # ranks (one each) cannot, and drop them
    assert len(DeviceLoader(split, 79)) == 3 and len(DeviceLoader(split, 79, dist=Dist(0, 2))) == 3
    assert len(DeviceLoader(split, 79, dist=Dist(0, 2, sync_bn=False))) == 2
    assert len(DeviceLoader(split, 79, dist=Dist(0, 3))) == 2


def test_without_option():
    assert without_option(["run", "--nproc", "2", "-q"], "--nproc") == ["run", "-q"]
    assert without_option(["run", "--nproc=2", "--nprocx"], "--nproc") == ["run", "--nprocx"]


# ---------------------------------------------------------------------------------------------------------------
# spawned 2-process groups


@pytest.mark.parametrize("total", [8, 7])
def test_sync_bn_equals_full_batch_bn(tmp_path, total):
    ranks = W.spawn(W.bn_worker, 2, tmp_path, total)
    x, bn = W.bn_inputs(total)
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    (g,) = torch.autograd.grad(W.bn_objective(y), xr, create_graph=True)
    g.pow(2).sum().backward()
    cat = {k: torch.cat([r[k] for r in ranks]) for k in ("y", "g", "gg")}
    torch.testing.assert_close(cat["y"], y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cat["g"], g.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cat["gg"], xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[0]["wgrad"] + ranks[1]["wgrad"], bn.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[0]["bgrad"] + ranks[1]["bgrad"], bn.bias.grad, rtol=1e-4, atol=1e-6)
    for r in ranks:  # the global batch's statistics (unbiased variance), on every rank
        torch.testing.assert_close(r["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].dtype.is_floating_point)


# every registered method but RiFT (its training step is natural training of one module: see the fixture)
STEP_METHODS = [m for m in REGISTRY.names() if m != "rift"]


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """One step of every method on 2 ranks (7 images: 4 + 3), with and without the reduction (two process groups).
    RiFT's training step is natural training of one weight; its stages are deterministic and run on every rank."""
    root = tmp_path_factory.mktemp("steps")
    return {"ok": W.spawn(W.step_worker, 2, root / "ok", STEP_METHODS, 7),
            "controls": W.spawn(W.step_worker, 2, root / "ctl", STEP_METHODS, 7, True)}


@pytest.mark.parametrize("name", STEP_METHODS)
def test_one_step_on_an_uneven_split_is_the_single_process_step(steps, name):
    """7 images on 2 ranks (4 + 3): the weights after one step equal one process's — the per-example draws (PGD,
    FGSM and TRADES starts, ATAS's crops) are the global batch's, ATAS's step sizes and buffers, Free-AT's δ,
    ARREST's replay test and GradAlign's mean over the global batch; AFD's G₁, G₂, G₃ are reduced before its three
    optimiser steps. Without the reduction (the controls) they do not."""
    ref = W.single_step(name, 7)
    moved = max(float((ref[k].double() - v.double()).abs().max())
                for k, v in W.step_setup(name, SINGLE, 7)[0].model.state_dict().items() if v.dtype.is_floating_point)
    assert moved > 1e-3  # the step moves the weights
    assert all(v.dtype == torch.float64 for v in ref.values() if v.is_floating_point())  # (the step stayed fp64)
    for r in steps["ok"]:  # fp64: rounding is ~1e-16 (see the module docstring)
        assert _max_diff(r[name], ref) < 1e-10 * max(1.0, moved), name
    assert max(_max_diff(r[name], ref) for r in steps["controls"]) > 1e-3 * moved, f"{name}: the control differs"


def test_evaluation_shards_and_gathers_the_single_process_record(tmp_path):
    """PGD-20 batches and AutoAttack chunks are dealt out over the ranks; the per-point results, the numbers and
    the chunk files (written by rank 0 only) are those of one process."""
    from bench.evaluate import evaluate

    model, test = W.eval_setup()
    one = evaluate(model, test, ["clean", "pgd20", "aa"], n=12, batch_size=8, aa_chunk=4,
                   state_dir=tmp_path / "one", progress=False)
    ranks = W.spawn(W.eval_worker, 2, tmp_path, ["clean", "pgd20", "aa"], 12, str(tmp_path / "two"))
    for r in ranks:
        for a in ("clean", "pgd20", "aa", "worst"):
            assert r["results"][a]["correct"] == one["results"][a]["correct"], a
            assert r["results"][a].get("points") == one["results"][a].get("points"), a
        assert r["meta"]["ranks"] == 2
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir()) == ["aa-0-4.json", "aa-4-8.json",
                                                                              "aa-8-12.json"]
    for f in files:
        assert json.loads((tmp_path / "two" / f).read_text())["robust"] == \
            json.loads((tmp_path / "one" / f).read_text())["robust"]
    # resumed from the chunk files: nothing is attacked again, the same record
    again = W.spawn(W.eval_worker, 2, tmp_path, ["aa"], 12, str(tmp_path / "two"))
    assert again[0]["results"]["aa"]["points"] == one["results"]["aa"]["points"]


@pytest.mark.timeout(300)
def test_a_failed_write_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0's writes go through Dist.main_only: when one fails, rank 0 raises it and every other rank raises at
    once, naming it (before issue 24 the epoch-0 metrics were written outside it: rank 1 waited at the next
    collective until the process group's timeout)."""
    raised = [r["raised"] for r in W.spawn(W.rank0_write_fails_worker, 2, tmp_path)]
    assert raised[0] == "OSError: No space left on device"
    assert raised[1].startswith("BenchError: rank 0 failed in writing metrics.jsonl: OSError: No space left")


def test_ranks_whose_parameters_differ_are_caught(tmp_path):
    assert all(r["raised"] is None for r in W.spawn(W.check_same_worker, 2, tmp_path, False))
    raised = [r["raised"] for r in W.spawn(W.check_same_worker, 2, tmp_path / "p", True)]
    assert all(m and "rank 1 differ from rank 0's" in m and "not reduced" in m for m in raised)


# ---------------------------------------------------------------------------------------------------------------
# end to end: bench run --nproc 2 (torchrun)

# a pick: the base, PGD, AFD (gradients reduced by hand) and the two with per-example state (ATAS, Free-AT)
METHODS = ["natural", "pgd-at", "afd", "atas", "free-at"]
ARGS = ["--preset", "smoke", "--methods", ",".join(METHODS), "--subset", "16", "--epochs", "2", "--batch-size", "80",
        "--attacks", "clean,pgd20", "--eval-n", "64", "--probe-n", "8", "--device", "cpu", "-q",
        "--set", "natural.epochs=2", "--set", "natural.batch_size=80", "--set", "free-at.replays=2",
        "--set", "atas.warmup_epochs=1"]


def _bench(args, results, threads="2", kill_at=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads)
    env.pop("AFT_BENCH_KILL_AT", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if kill_at:
        env["AFT_BENCH_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "bench", "run", *args, "--results", str(results)], env=env,
                          capture_output=True, text=True, timeout=900)


def _weights(results: Path, name: str = "model.safetensors") -> dict[str, dict]:
    return {p.name: load_file(p / "ckpt" / name) for p in sorted((results / "runs").iterdir())}


def _by_method(results: Path, name: str = "last.safetensors") -> dict[str, dict]:
    return {json.loads((p / "config.json").read_text())["config"]["method"]: load_file(p / "ckpt" / name)
            for p in sorted((results / "runs").iterdir())}


FP64 = ["--precision", "fp64"]


def _only(args: list[str], method: str) -> list[str]:
    """``args`` for one method: ``--methods method`` and only the ``--set``s of that method (a --set for a method
    the command does not run is refused)."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--set" and not args[i + 1].startswith(method + "."):
            i += 2
            continue
        out.append(method if i and args[i - 1] == "--methods" else args[i])
        i += 1
    return out
TOL64 = 1e-10  # fp64 DDP vs one process, measured ≤ 4e-14 (2-core AMD EPYC); per-rank BN ≥ 2e-2


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-e2e")
    out = {}
    for name, extra, threads in (("one", [], "2"), ("ddp", ["--nproc", "2"], "1"), ("one64", FP64, "2"),
                                 ("ddp64", FP64 + ["--nproc", "2"], "1"),
                                 ("ddp64-local-bn", FP64 + ["--nproc", "2", "--no-sync-bn"], "1")):
        p = _bench(ARGS + extra, root / name, threads)
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = (root / name, p)
    return out


def test_ddp_run_equals_the_one_process_run(e2e):
    """In fp64 the 2-process run is the one-process run: every floating tensor of the last checkpoint (weights,
    BN statistics, EMA, the optimisers' momenta, Free-AT's and ATAS's δ and ATAS's step sizes) within 1e-10, the
    per-epoch records equal; the control, per-rank BN statistics, differs by far more than that."""
    one, ddp = e2e["one64"][0], e2e["ddp64"][0]
    w1, wd = _weights(one, "last.safetensors"), _weights(ddp, "last.safetensors")
    assert sorted(w1) == sorted(wd)  # the same run identities (hashes): sync BN keeps the run
    assert len(w1) == len(METHODS)  # (AFD starts from the natural run of the list, trained on 2 processes too)
    for name in w1:
        assert all(v.dtype == torch.float64 for v in w1[name].values() if v.is_floating_point()), name
        gap = _max_diff(w1[name], wd[name])
        assert gap <= TOL64, f"{name}: in fp64 the DDP run differs from one process by {gap:.3g}"
        m1 = [json.loads(x) for x in (one / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        md = [json.loads(x) for x in (ddp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [sorted(r) for r in m1] == [sorted(r) for r in md], name
        for a, b in zip(m1[1:], md[1:]):
            assert a["images"] == b["images"] and a["lr"] == b["lr"]
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-9, abs=1e-12), name
        e1, ed = (json.loads((r / "runs" / name / "eval.json").read_text())["results"] for r in (one, ddp))
        for a in ("clean", "pgd20"):  # (fp32 evaluations of weights equal to 1e-10: one example at most may flip)
            assert abs(e1[a]["correct"] - ed[a]["correct"]) <= 1, (name, a)
    local = _by_method(e2e["ddp64-local-bn"][0])
    for method, w in _by_method(one).items():
        gap = _max_diff(w, local[method])
        assert gap > 1e4 * TOL64, f"{method}: per-rank BN differs by only {gap:.3g}: the equality test cannot fail"


def test_ddp_fp32_run_follows_the_one_process_run(e2e):
    """fp32, as users train: the same identities and per-epoch rows, the losses within 2 % (measured ≤ 0.14 %: the
    chance left by PGD's sign, see the module docstring, not a bound on a bug; the fp64 test is that)."""
    one, ddp = e2e["one"][0], e2e["ddp"][0]
    assert sorted(_weights(one)) == sorted(_weights(ddp))
    for run in sorted((one / "runs").iterdir()):
        m1 = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        md = [json.loads(x) for x in (ddp / "runs" / run.name / "metrics.jsonl").read_text().splitlines()]
        assert [sorted(r) for r in m1] == [sorted(r) for r in md], run.name
        for a, b in zip(m1[1:], md[1:]):
            assert a["images"] == b["images"] and a["lr"] == b["lr"]
            assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), run.name


def test_ddp_records_are_written_once_by_rank_0(e2e):
    one, ddp = e2e["one"][0], e2e["ddp"][0]
    for run in sorted((ddp / "runs").iterdir()):
        files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
        ref = sorted(str(p.relative_to(one / "runs" / run.name)) for p in (one / "runs" / run.name).rglob("*")
                     if p.is_file())
        assert files == ref, run.name
        assert not any(".tmp" in f for f in files)
        assert (run / ".lock").read_text() == ""  # the flock's file stays; released, it names nobody
        rec = json.loads((run / "config.json").read_text())
        assert rec["device"].startswith("2× cpu") and rec["device"].endswith("(DDP)")
        assert rec["config"]["world_size"] == 2 and rec["config"]["bn_ranks"] is None
        ev = json.loads((run / "eval.json").read_text())
        ev1 = json.loads((one / "runs" / run.name / "eval.json").read_text())
        for a in ("clean", "pgd20"):
            assert ev["results"][a]["n"] == ev1["results"][a]["n"] == 64
    assert e2e["ddp"][1].stdout.count("method") == 1  # one summary table, from rank 0


def test_ddp_run_resumes_after_a_kill_on_two_processes_or_one(tmp_path, e2e):
    """Killed (SIGKILL, every rank) after the first epoch's checkpoint, then started again: on 2 processes, or on
    one (the same run: sync BN), it ends as the uninterrupted DDP run (fp64: to 1e-10, also on one process)."""
    args = _only(ARGS, "pgd-at") + FP64
    straight = e2e["ddp64"][0]
    for again in (["--nproc", "2"], []):
        res = tmp_path / ("two" if again else "one")
        p = _bench(args + ["--nproc", "2"], res, "1", kill_at="epoch:1")
        assert p.returncode != 0
        (run,) = (res / "runs").iterdir()
        assert (run / "ckpt" / "last.safetensors").is_file() and not (run / "done").exists()
        p = _bench(args + again, res, "1")
        assert p.returncode == 0, p.stderr[-3000:]
        assert "resuming after epoch 1" in p.stderr
        got = load_file(run / "ckpt" / "last.safetensors")
        ref = _weights(straight, "last.safetensors")[run.name]
        assert _max_diff(got, ref) < (1e-13 if again else TOL64), again


def test_per_rank_bn_is_a_different_run(tmp_path):
    from bench.runner import RunRequest, plan

    base = dict(preset="smoke", methods=["pgd-at"], device="cpu", results_dir=str(tmp_path))
    one = plan(RunRequest(**base))[0].cfg
    synced = plan(RunRequest(**base, world_size=4))[0].cfg
    local = plan(RunRequest(**base, world_size=4, sync_bn=False))[0].cfg
    assert one.run_name == synced.run_name != local.run_name and local.bn_ranks == 4


def test_nproc_is_checked_against_the_visible_gpus(monkeypatch):
    from bench.dist import check_nproc
    from bench.errors import BenchError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_nproc(2, "auto") == "nccl" and check_nproc(4, "cpu") == "gloo"
    with pytest.raises(BenchError, match=r"--nproc 4: only 2 GPU\(s\) are visible; accepted: at most 2"):
        check_nproc(4, "auto")


def test_nproc_errors_are_one_line(capsys, monkeypatch):
    from bench.cli import main

    for args, pattern in ((["--nproc", "2", "--device", "cuda:1"], "--device cuda:1 with --nproc 2; accepted"),
                          (["--nproc", "2", "--device", "cuda"], "no CUDA GPU is visible")):
        if torch.cuda.is_available() and "cuda\n" in pattern:
            continue
        monkeypatch.setattr(sys, "argv", ["bench", "run", "--preset", "smoke", *args])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and pattern in err, err


def test_batches_the_ranks_cannot_share_are_refused(tmp_path, synthetic):
    """A batch smaller than the ranks, or a last batch one process trains on but the ranks could not share (it
    would change the run under the same identity): one-line errors before anything trains."""
    from bench.engine import Trainer
    from bench.errors import BenchError
    from bench.records import RunDir
    from bench.runner import RunRequest, plan

    def trainer(batch, world, sync=True):
        req = RunRequest(preset="smoke", methods=["natural"], subset=16, batch_size=batch, device="cpu",
                         results_dir=str(tmp_path), world_size=world, sync_bn=sync)
        cfg = plan(req)[0].cfg
        return Trainer(cfg, synthetic, RunDir(tmp_path / cfg.run_name), progress=False, echo=lambda s: None,
                       dist=Dist(0, world, sync_bn=sync))

    with pytest.raises(BenchError, match=r"the last batch of every epoch has 2 images \(160 training images, batch "
                                         r"79\), fewer than the 3 processes.*accepted: at most 2 processes"):
        trainer(79, 3)
    with pytest.raises(BenchError, match=r"batch size 2 on 3 processes: every process needs at least 1 image"):
        trainer(2, 3)
    with pytest.raises(BenchError, match=r"batch size 5 on 3 processes: every process needs at least 2 image"):
        trainer(5, 3, sync=False)
    assert len(trainer(79, 2).loader) == 3  # 79 + 79 + 2: the last 2 images shared 1 + 1


@pytest.mark.parametrize("zero_rows", [(1,), (0, 1, 2, 3)])
def test_gradalign_mean_runs_over_the_global_batch(tmp_path, zero_rows):
    """GradAlign averages the cosine over the examples whose gradients are non-zero — of the whole global batch, also
    when a rank has none (then it still joins every collective)."""
    from methods.fgsm_ga import gradalign_reg

    g1, g2 = W.gradalign_inputs(zero_rows)
    g2 = g2.clone().requires_grad_(True)
    ref = gradalign_reg(g1, g2)
    ref.backward()
    ranks = W.spawn(W.gradalign_worker, 2, tmp_path, zero_rows)
    assert sum(r["weighted"] for r in ranks) == pytest.approx(float(ref.detach()), abs=1e-6)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), g2.grad, rtol=1e-5, atol=1e-7)
