"""A run's identity includes the data it learns from, by content (Reliability, round two, class 9): a run planned on
other images is another run; the same images from another place are the same run; a --data-dir that does not
exist is refused before anything else, also when the run is done; data that changed between planning and training,
or a finished run evaluated on other data, is one line; records older than the fingerprint keep their hashes."""
import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from bench.config import RunConfig
from bench.data import data_fingerprint, load_dataset
from bench.errors import BenchError
from bench.runner import Runner, plan
from helpers import run_request, small_request

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar(root, seed, n_train=4, n_test=2):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in CLASSES:
            d = root / "cifar10" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _req(tmp_path, data_dir, **kw):
    return small_request(tmp_path, methods=["natural"], dataset="cifar10", arch="smallcnn", data_dir=str(data_dir),
                         subset=None, epochs=1, batch_size=20, eval_n=10, probe_n=4, **kw)


def test_the_hash_follows_the_content_not_the_path(tmp_path):
    a = _cifar(tmp_path / "a", seed=0)
    b = _cifar(tmp_path / "b", seed=1)
    shutil.copytree(a, tmp_path / "a-copy")
    ha, hb, hc = (plan(_req(tmp_path, d))[0].cfg for d in (a, b, tmp_path / "a-copy"))
    assert ha.data == load_dataset("cifar10", a).fingerprint and len(ha.data) == 16
    assert ha.run_name != hb.run_name  # other images: another run
    assert ha.run_name == hc.run_name  # the same images elsewhere: the same run
    # one pixel changed: another run
    img = next((a / "cifar10" / "train" / "cat").glob("*.png"))
    px = np.array(Image.open(img))
    px[0, 0, 0] ^= 1
    Image.fromarray(px).save(img)
    assert plan(_req(tmp_path, a))[0].cfg.run_name != ha.run_name


def test_a_missing_data_dir_is_refused_even_when_the_run_is_done(tmp_path, capsys, monkeypatch):
    from bench.cli import main

    data = _cifar(tmp_path / "d", seed=0)
    (run,) = run_request(_req(tmp_path, data))
    assert run.is_done()
    before = sorted(p.name for p in (tmp_path / "results" / "runs").iterdir())
    for args in (["--dataset", "cifar10", "--data-dir", str(tmp_path / "does-not-exist")],
                 ["--dataset", "tinyimagenet", "--data-dir", "/does/not/exist"]):
        monkeypatch.setattr(sys, "argv", ["bench", "run", "--preset", "smoke", "--methods", "natural", "--arch",
                                          "smallcnn", "--results", str(tmp_path / "results"), *args])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "does not exist" in err, err
    assert sorted(p.name for p in (tmp_path / "results" / "runs").iterdir()) == before


def test_other_data_after_a_finished_run_is_another_run_not_its_table(tmp_path):
    a, b = _cifar(tmp_path / "a", seed=0), _cifar(tmp_path / "b", seed=1)
    (ra,) = run_request(_req(tmp_path, a))
    (rb,) = run_request(_req(tmp_path, b))
    assert ra.name != rb.name and ra.is_done() and rb.is_done()
    assert ra.read_config()["config"]["data"] != rb.read_config()["config"]["data"]


def test_data_changed_between_planning_and_training_is_one_line(tmp_path):
    a, b = _cifar(tmp_path / "a", seed=0), _cifar(tmp_path / "b", seed=1)
    (p,) = plan(_req(tmp_path, a))
    p.cfg.data_dir = str(b)  # (what a Slurm job finds when the files changed after `bench sweep` planned it)
    with pytest.raises(BenchError, match=r"is not the data run .* was planned with .*: it changed since; plan"):
        Runner(progress=False, echo=lambda s: None).execute(p.cfg)
    assert not (tmp_path / "results" / "runs" / p.cfg.run_name).exists()


def test_bench_eval_of_a_run_on_other_data_is_refused(tmp_path, capsys, monkeypatch):
    from bench.cli import main

    a, b = _cifar(tmp_path / "a", seed=0), _cifar(tmp_path / "b", seed=1)
    (run,) = run_request(_req(tmp_path, a))
    before = run.eval.read_bytes()
    monkeypatch.setattr(sys, "argv", ["bench", "eval", str(run.path), "--data-dir", str(b), "--attacks", "clean"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "is not the data run" in err, err
    assert run.eval.read_bytes() == before


def test_records_older_than_the_fingerprint_keep_their_hashes(tmp_path):
    from bench.runner import RunRequest

    new = plan(RunRequest(preset="smoke", methods=["pgd-at"], results_dir=str(tmp_path)))[0].cfg
    assert new.data == data_fingerprint("synthetic") and "data" in new.identity()
    old = json.loads(json.dumps(new.to_dict()))
    old.pop("data")  # a config.json written before the data entered the identity
    cfg = RunConfig.from_dict(old)
    assert cfg.data is None and "data" not in cfg.identity()
    # the main job's PGD-AT run as named before (README until 2026-12-02): old records keep their names
    assert cfg.run_name == "synthetic_smallcnn_pgd-at_s0_2dc0a698e8" != new.run_name
