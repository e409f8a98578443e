"""``--precision fp64``: the reference precision of the reproducibility checks (tests/test_ddp.py). Every registered
method trains in float64 end to end — parameters, optimiser state and per-example state (Free-AT's and ATAS's δ)
in float64, RiFT's stages on float64 inputs, AFD's D₁ / D₂ — and is evaluated in fp32 as every run; fp64 is a run
of its own (its identity differs from fp32's)."""
import torch
from safetensors.torch import load_file

from bench.precision import wide
from bench.runner import plan
from helpers import run_request, small_request
from methods import METHODS

SETS = ["rift.holdout_per_class=4", "rift.mrc_epochs=1", "rift.attack_steps=1", "rift.mrc_batch=8",
        "pgd-at.epochs=1", "natural.epochs=1", "pgd-at.attack_steps=1"]


def test_every_method_trains_in_float64_and_is_evaluated_in_fp32(tmp_path):
    names = sorted(METHODS.names())
    req = small_request(tmp_path, methods=names, epochs=1, subset=8, batch_size=20, precision="fp64",
                        eval_n=16, probe_n=4, sets=SETS)
    runs = run_request(req)
    assert len(runs) == len(names)
    for run in runs:
        assert run.is_done(), run.name
        state = load_file(run.ckpt_dir / "last.safetensors")
        floats = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
        assert floats and set(floats.values()) == {torch.float64}, (run.name, set(floats.values()))
        final = load_file(run.final_weights)
        assert {v.dtype for v in final.values() if v.is_floating_point()} == {torch.float32}, run.name
        ev = run.read_eval()
        assert ev["results"]["clean"]["n"] == 16 and ev["meta"]["dtype"] == "float32", run.name


def test_fp64_is_a_run_of_its_own(tmp_path):
    fp32 = plan(small_request(tmp_path, methods=["pgd-at"]))[0].cfg
    fp64 = plan(small_request(tmp_path, methods=["pgd-at"], precision="fp64"))[0].cfg
    assert fp64.run_name != fp32.run_name and fp64.precision == "fp64"


def test_wide_upcasts_only_below_fp32():
    assert wide(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert wide(torch.ones(2, dtype=torch.float16)).dtype == torch.float32
    for dt in (torch.float32, torch.float64):
        t = torch.ones(2, dtype=dt)
        assert wide(t) is t
