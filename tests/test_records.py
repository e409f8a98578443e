"""Run records as their one reader, :func:`bench.records.collect_runs`, gives them: the numbers as columns, the
records themselves (config, every epoch's row, eval.json, tsne.json) for what needs more, the link to a run's
starting model, and damaged runs described, never a traceback."""
import json

import pandas as pd

from bench.records import collect_runs
from test_report import write_run


def test_collect_runs_gives_each_runs_records_and_its_base_run(tmp_path):
    nat = write_run(tmp_path, "natural", 0, accs={"clean": 90.0}, seconds=(5.0, 6.0),
                    name="cifar10_resnet18_natural_s0_0000000000")
    afd = write_run(tmp_path, "afd", 0, accs={"clean": 80.0, "pgd20": 50.0}, pretrained=nat, gaps=[0.5, 0.4, 0.3],
                    heads={"f1": {"clean": 80.0}, "f2": {"clean": 41.0}})
    part = write_run(tmp_path, "vaft", 0, accs={}, pretrained="elsewhere_natural_s0_1234567890", done=False)
    (tmp_path / "runs" / afd / "tsne.json").write_text(json.dumps({"g": [[0.0, 1.0]], "labels": [3]}))
    (tmp_path / "runs" / nat / "tsne.json").write_text("{not json")
    df = collect_runs(tmp_path).set_index("run")
    a, n, p = df.loc[afd], df.loc[nat], df.loc[part]
    assert a["config"]["method"] == "afd" and a["config"]["hp"]["epochs"] == 2
    assert [m["epoch"] for m in a["metrics"]] == [0, 1, 2] and a["feature_gap_start"] == 0.5
    assert a["final_feature_gap"] == 0.3 and a["epochs_done"] == 2
    assert a["eval_record"]["heads"]["f2"]["clean"]["acc"] == 41.0 and a["f2_clean"] == 41.0
    assert a["base"] == nat and a["pretrained"] == nat and pd.isna(n["base"])  # (pandas: NaN for a missing text)
    assert pd.isna(p["base"]) and p["pretrained"] == "elsewhere_natural_s0_1234567890"  # not one of these runs
    assert bool(a["done"]) and not bool(p["done"]) and p["state"] == "partial"
    assert a["tsne"] == {"g": [[0.0, 1.0]], "labels": [3]} and pd.isna(n["tsne"])  # (a figure's data: never damage)
    assert list(collect_runs(tmp_path, done_only=True)["run"]) == sorted([afd, nat])


def test_collect_runs_describes_damaged_runs_and_checks_weights_when_asked(tmp_path):
    from safetensors.torch import save_file
    import torch

    good = write_run(tmp_path, "natural", 0, accs={"clean": 90.0})
    bad = write_run(tmp_path, "natural", 1, accs={"clean": 91.0})
    (tmp_path / "runs" / bad / "eval.json").write_text("{")
    moved = write_run(tmp_path, "natural", 2, accs={"clean": 92.0})
    ev_path = tmp_path / "runs" / moved / "eval.json"
    ev = json.loads(ev_path.read_text())
    ev["meta"] = {"weights_sha256": "0123456789abcdef"}
    ev_path.write_text(json.dumps(ev))
    (tmp_path / "runs" / moved / "ckpt").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "runs" / moved / "ckpt" / "model.safetensors")
    damaged = []
    df = collect_runs(tmp_path, damaged=damaged)
    assert list(df["run"]) == [good]
    assert len(damaged) == 2 and damaged[0].startswith(f"{bad}: ") and "eval.json is damaged" in damaged[0]
    assert damaged[1].startswith(f"{moved}: ") and "not the model eval.json evaluated" in damaged[1]
    damaged = []
    df = collect_runs(tmp_path, damaged=damaged, check_weights=False)  # the report's reading: eval.json's numbers
    assert sorted(df["run"]) == sorted([good, moved]) and len(damaged) == 1
