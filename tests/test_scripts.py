"""The GPU-session helpers in scripts/: the wheel rewrite of make-carry.sh and device-check.sh's refusal of a bad
stage (the stages themselves need the GPU image; a CPU dry run of each is in the script's header)."""
import base64
import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _strip_wheel():
    spec = importlib.util.spec_from_file_location("strip_wheel", ROOT / "scripts" / "strip_wheel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.strip_wheel


def _wheel(path: Path) -> Path:
    files = {"toypkg/__init__.py": b"VALUE = 42\n", "toypkg/examples/model.pt": b"\0" * 4096,
             "toypkg/examples/run.py": b"print('x')\n", "toypkg/sub/examples_not.py": b"X = 1\n",
             "toypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: toypkg\nVersion: 1.0\n",
             "toypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                           b"Tag: py3-none-any\n"}
    whl = path / "toypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        record = "".join(f"{n},,\n" for n in files) + "toypkg-1.0.dist-info/RECORD,,\n"
        z.writestr("toypkg-1.0.dist-info/RECORD", record)
    return whl


def test_strip_wheel_drops_the_folder_and_rewrites_the_record(tmp_path):
    whl = _wheel(tmp_path)
    out = _strip_wheel()(whl, tmp_path / "out", ["examples"])
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert not any("/examples/" in n for n in names)
        assert "toypkg/sub/examples_not.py" in names and "toypkg/__init__.py" in names  # only that folder goes
        rows = [r.split(",") for r in z.read("toypkg-1.0.dist-info/RECORD").decode().splitlines()]
        listed = {r[0] for r in rows}
        assert listed == names  # every member once, RECORD itself included
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = z.read(name)
            assert int(size) == len(data)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    # pip installs it offline, as make-carry.sh's wheels are installed on the GPU machine
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(out)], check=True, capture_output=True)
    assert (site / "toypkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert not (site / "toypkg" / "examples").exists()


def test_strip_wheel_refuses_to_overwrite_its_source(tmp_path):
    whl = _wheel(tmp_path)
    with pytest.raises(SystemExit, match="overwrite its source"):
        _strip_wheel()(whl, tmp_path, ["examples"])
    assert zipfile.ZipFile(whl).read("toypkg/examples/model.pt") == b"\0" * 4096  # untouched


def test_device_check_names_a_bad_stage():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "device-check.sh"), "benchmark"], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert "got 'benchmark'" in r.stderr and "all|perf|aa" in r.stderr


def test_device_check_writes_its_summary_after_every_stage_and_skips_what_the_budget_cannot_hold(tmp_path):
    """The one call of a lent GPU window: each stage runs under what is left of BUDGET_S, and summary.md says after
    every stage what ran (here a budget too small for any stage: each is listed as skipped, and the call succeeds)."""
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "BUDGET_S": "20", "DEVICE": "cpu", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "device-check.sh")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in (out / "summary.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    assert [ln.split("|")[1].strip() for ln in rows[1:]] == ["env", "perf natural,pgd-at", "perf trades,afd",
                                                             "aa (pgd-at resnet18, 3 epochs)"]
    assert [ln.split("|")[2].strip() for ln in rows[1:]] == ["0", "skipped", "skipped", "skipped"]
    assert (out / "device.txt").read_text().strip()
