import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's data or cache directories."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("AFT_BENCH_CACHE", str(base / "cache"))
    monkeypatch.setenv("AFT_BENCH_DATA", str(base / "no-data-here"))


@pytest.fixture
def tiny_model():
    from bench.models import create_model

    torch.manual_seed(0)
    return create_model("smallcnn", 10)


@pytest.fixture(scope="session")
def synthetic():
    from bench.data import load_dataset

    return load_dataset("synthetic")
