"""The engine: resume reaches bit-identical weights, checkpoints and records, EMA, NaN guard, timing fields."""
import json

import pytest
import torch
from safetensors.torch import load_file

from bench.engine import EMA, Trainer
from bench.errors import BenchError
from bench.records import RunDir, collect_runs
from bench.runner import plan
from helpers import run_request, small_request
from methods.base import METHODS, Method, register_method


def _trainer(cfg, dataset, run):
    return Trainer(cfg, dataset, run, progress=False, echo=lambda s: None)


# the two base methods; the others resume in tests/test_scratch.py, test_aft.py and test_rift.py
@pytest.mark.parametrize("method", ["natural", "pgd-at"])
def test_interrupted_then_resumed_run_reaches_bit_identical_weights(tmp_path, synthetic, method):
    cfg = plan(small_request(tmp_path, methods=[method], epochs=3, subset=10))[0].cfg
    a = RunDir(tmp_path / "a")
    t = _trainer(cfg, synthetic, a)
    t.train()
    straight = {k: v.clone() for k, v in t.method.model.state_dict().items()}

    b = RunDir(tmp_path / "b")
    t1 = _trainer(cfg, synthetic, b)
    t1.train(stop_after=1)  # "killed" after epoch 1
    del t1
    t2 = _trainer(cfg, synthetic, b)
    assert t2.resume() == 1
    t2.train()
    resumed = t2.method.model.state_dict()
    # bit for bit (so on a 2-core AMD EPYC): one process, one thread count, fp32 (the default on every CPU)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["loss"] for r in a.read_metrics()] == [r["loss"] for r in b.read_metrics()]
    assert len(b.read_metrics()) == 3


def test_a_run_writes_its_records_and_a_second_run_is_a_no_op(tmp_path):
    (run,) = run_request(small_request(tmp_path, methods=["natural"]))
    assert run.is_done() and run.name.startswith("synthetic_smallcnn_natural_s0_")
    cfg = run.read_config()
    assert cfg["config"]["hp"]["epochs"] == 2 and cfg["environment"]["torch"] and cfg["device"].startswith("cpu")
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("loss", "train_acc", "lr", "seconds", "images_per_s", "feature_gap"):
        assert key in rows[0]
    ev = run.read_eval()
    assert ev["results"]["clean"]["n"] == 50 and ev["meta"]["dtype"] == "float32"
    weights = load_file(run.final_weights)
    assert "fc.weight" in weights
    mtime = run.done.stat().st_mtime_ns
    messages = []
    run_request(small_request(tmp_path, methods=["natural"]), echo=messages.append)
    assert run.done.stat().st_mtime_ns == mtime and any("already done" in m for m in messages)
    df = collect_runs(tmp_path / "results")
    assert df.loc[0, "method"] == "natural" and df.loc[0, "state"] == "done" and df.loc[0, "clean_n"] == 50
    assert df.loc[0, "hp.epochs"] == 2 and df.loc[0, "sec_per_epoch"] > 0


def test_a_done_run_asked_for_another_attack_is_only_evaluated(tmp_path):
    (run,) = run_request(small_request(tmp_path, methods=["natural"]))
    metrics_before = run.metrics.read_text()
    run_request(small_request(tmp_path, methods=["natural"], attacks="clean,pgd20"))
    assert set(run.read_eval()["results"]) >= {"clean", "pgd20"}
    assert run.metrics.read_text() == metrics_before


def test_run_directory_names_change_with_the_hyper_parameters(tmp_path):
    a = plan(small_request(tmp_path, methods=["pgd-at"]))[0].cfg
    b = plan(small_request(tmp_path, methods=["pgd-at"], sets=["attack_step=0.01"]))[0].cfg
    c = plan(small_request(tmp_path, methods=["pgd-at"], device="cpu", probe_n=3))[0].cfg
    assert a.run_name != b.run_name and a.run_name == c.run_name


def test_ema_follows_the_afd_warmup_and_averages_buffers():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(m, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (0+1)/(0+10)
    with torch.no_grad():
        m[0].weight.add_(1.0)
        m[1].running_mean.add_(10.0)
        m[1].num_batches_tracked.add_(5)
    w0 = ema.module[0].weight.clone()
    ema.update(m)
    assert torch.allclose(ema.module[0].weight, 0.1 * w0 + 0.9 * m[0].weight)
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 9.0))
    assert int(ema.module[1].num_batches_tracked) == 5
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 10**6
    assert ema.current_decay() == 0.999


class _NaNAt(Method):
    name = "test-nan"
    defaults = {"epochs": 3}

    def train_step(self, batch, epoch, step):
        loss = self.net(batch.x).logsumexp(1).mean() * 0
        if epoch == 1 and step == 2:
            loss = loss + float("nan")
        self.ce_step(self.optimizer, loss)
        return {"loss": loss.detach()}


@pytest.fixture
def nan_method():
    register_method(_NaNAt)
    yield
    METHODS.remove("test-nan")


def test_a_nan_loss_stops_the_run_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, nan_method,
                                                                                         synthetic):
    cfg = plan(small_request(tmp_path, methods=["test-nan"], epochs=3, batch_size=32, subset=10))[0].cfg
    run = RunDir(tmp_path / "nan")
    t = _trainer(cfg, synthetic, run)
    with pytest.raises(BenchError, match=r"NaN or inf at epoch 2, step 3; .*after epoch 1\) is kept"):
        t.train()
    t2 = _trainer(cfg, synthetic, run)
    assert t2.resume() == 1 and len(run.read_metrics()) == 1


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Again", (Method,), {"name": "natural"}))


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous(tmp_path, synthetic):
    cfg = plan(small_request(tmp_path, methods=["natural"], epochs=3, subset=10))[0].cfg
    run = RunDir(tmp_path / "c")
    t = _trainer(cfg, synthetic, run)
    t.train(stop_after=2)
    last = run.ckpt_dir / "last.safetensors"
    last.write_bytes(last.read_bytes()[:100])
    t2 = _trainer(cfg, synthetic, run)
    with pytest.warns(UserWarning, match="falling back"):
        assert t2.resume() == 1
    # metrics.jsonl is rewritten to match the checkpoint: the starting probe (epoch 0) and epoch 1
    assert [json.loads(line)["epoch"] for line in run.metrics.read_text().splitlines()] == [0, 1]


def test_bf16_autocast_and_channels_last_train_and_are_recorded(tmp_path):
    fp32 = plan(small_request(tmp_path, methods=["pgd-at"], epochs=1))[0].cfg
    (run,) = run_request(small_request(tmp_path, methods=["pgd-at"], epochs=1, precision="bf16", channels_last=True))
    c = run.read_config()["config"]
    assert c["precision"] == "bf16" and c["channels_last"] is True
    assert run.name != fp32.run_name  # precision changes the weights, so it is part of the run's identity
    assert run.read_eval()["meta"]["dtype"] == "float32"  # evaluation stays fp32
    w = load_file(run.final_weights)
    assert all(v.dtype in (torch.float32, torch.int64) for v in w.values())


@pytest.mark.slow
def test_torch_compile_trains_through_the_attacks_mode_switches(tmp_path):
    (run,) = run_request(small_request(tmp_path, methods=["pgd-at"], epochs=1, subset=10, compile=True))
    assert run.is_done() and run.read_config()["config"]["compile"] is True
    assert run.read_metrics()[0]["loss"] == run.read_metrics()[0]["loss"]  # finite, not NaN


def test_run_directories_cannot_leave_results_runs(tmp_path):
    from bench.config import RunConfig

    cfg = RunConfig(method="../../x", dataset="synthetic", arch="smallcnn", seed=0, hp={}, results_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unsafe run directory name"):
        RunDir.for_config(cfg)
