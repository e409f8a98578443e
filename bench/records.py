"""Run records: one directory per run under ``results/runs/``, named ``<dataset>_<arch>_<method>_s<seed>_<hash>``
(the hash covers every setting that changes the trained weights), holding

* ``config.json``  — the resolved config, git commit, package versions, device;
* ``metrics.jsonl`` — one line per finished epoch (loss, train accuracy, lr, seconds, images/s, memory, feature gaps),
  after a line for epoch 0 with the feature gaps of the starting model;
* ``eval.json``    — clean / PGD-20 / AutoAttack numbers, each with n, seed, device, dtype and versions;
* ``done``         — written last, when training and evaluation are complete;
* ``ckpt/``        — checkpoints and the final weights (git-ignored; safetensors only).

Every file is written atomically. :func:`collect_runs` gathers all runs into a pandas DataFrame.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsutil import RunLock, atomic_write_json, atomic_write_text, read_json

REPO_ROOT = Path(__file__).resolve().parent.parent
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    from importlib import metadata

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchvision", "pyautoattack", "robustbench", "timm", "safetensors", "numpy", "aft-bench"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["cuda"] = torch.version.cuda
    versions["git_commit"] = git_commit()
    return versions


@dataclass
class RunDir:
    path: Path

    @classmethod
    def for_config(cls, cfg) -> "RunDir":
        name = cfg.run_name
        # names come from registry names, an integer seed and a hash; refuse anything that could leave runs/
        if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"unsafe run directory name {name!r}")
        return cls(Path(cfg.results_dir) / "runs" / name)

    @property
    def name(self) -> str:
        return self.path.name

    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    eval = property(lambda self: self.path / "eval.json")
    method_record = property(lambda self: self.path / "method.json")
    grids = property(lambda self: self.path / "grids.json")  # the --set grids this run is a point of  # what a method's stages found (RiFT)
    done = property(lambda self: self.path / "done")
    ckpt_dir = property(lambda self: self.path / "ckpt")
    final_weights = property(lambda self: self.path / "ckpt" / "model.safetensors")
    lock = property(lambda self: RunLock(self.path))

    def is_done(self) -> bool:
        return self.done.is_file()

    def write_config(self, cfg, device_name: str) -> None:
        record = {"config": cfg.to_dict(), "run_name": cfg.run_name, "run_hash": cfg.run_hash,
                  "environment": environment(), "device": device_name, "argv": sys.argv}
        atomic_write_json(self.config, record)

    def read_config(self) -> dict[str, Any]:
        return read_json(self.config)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def read_metrics(self, start: bool = False) -> list[dict[str, Any]]:
        """The per-epoch rows (epoch ≥ 1); with ``start``, also the epoch-0 row (the feature-gap probe of the
        starting model, before any training)."""
        if not self.metrics.is_file():
            return []
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
        return rows if start else [r for r in rows if r.get("epoch", 1) >= 1]

    def read_eval(self) -> dict[str, Any] | None:
        return read_json(self.eval) if self.eval.is_file() else None

    def add_grid(self, grid: dict[str, Any]) -> None:
        """Record that this run is a point of ``grid`` ({"id", "axes", "point"}) in ``grids.json``."""
        self.path.mkdir(parents=True, exist_ok=True)
        grids = self.read_grids()
        if all(g.get("id") != grid.get("id") for g in grids):
            atomic_write_json(self.grids, grids + [grid])

    def read_grids(self) -> list[dict[str, Any]]:
        return list(read_json(self.grids)) if self.grids.is_file() else []

    def read_method_record(self) -> dict[str, Any] | None:
        return read_json(self.method_record) if self.method_record.is_file() else None

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files (``.<name>.<random>.tmp``) a killed writer left behind. Call only while holding
        the run's lock: then no other process is writing here."""
        stale = [p for p in self.path.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def mark_done(self) -> None:
        atomic_write_text(self.done, "done\n")

    def status(self) -> dict[str, Any]:
        cfg = self.read_config() if self.config.is_file() else {}
        c = cfg.get("config", {})
        rows = self.read_metrics()
        epochs = c.get("hp", {}).get("epochs")
        if self.is_done():
            state = "done"
        elif self.lock.is_held_by_other():
            state = "running"
        elif rows or self.config.is_file():
            state = "partial"
        else:
            state = "empty"
        return {"run": self.name, "state": state, "method": c.get("method"), "dataset": c.get("dataset"),
                "arch": c.get("arch"), "seed": c.get("seed"), "epoch": len(rows), "epochs": epochs}


def list_runs(results_dir: str | os.PathLike = "results") -> list[RunDir]:
    root = Path(results_dir) / "runs"
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "config.json").is_file()]


def collect_runs(results_dir: str | os.PathLike = "results", done_only: bool = False):
    """All runs as a pandas DataFrame: one row per run with its config, timing and evaluation numbers.

    Columns: run, method, dataset, arch, seed, preset, precision, state, epochs, epochs_done, sec_per_epoch
    (mean over epochs), train_seconds (sum), device, final_loss, final_feature_gap, and for every evaluated attack
    ``<attack>`` (accuracy in %) and ``<attack>_n``; ``<head>_<attack>`` for extra heads (AFD's f1 / f2);
    ``feature_gap_start`` (epoch 0); ``hp.<key>`` for every hyper-parameter.
    """
    import pandas as pd

    rows = []
    for run in list_runs(results_dir):
        st = run.status()
        if done_only and st["state"] != "done":
            continue
        rec = run.read_config()
        c = rec.get("config", {})
        metrics = run.read_metrics()
        row = {"run": run.name, "path": str(run.path), "method": c.get("method"), "dataset": c.get("dataset"),
               "arch": c.get("arch"), "seed": c.get("seed"), "preset": c.get("preset"),
               "precision": c.get("precision"), "state": st["state"], "epochs": c.get("hp", {}).get("epochs"),
               "epochs_done": len(metrics), "device": rec.get("device"), "pretrained": c.get("pretrained")}
        start = [m for m in run.read_metrics(start=True) if m.get("epoch") == 0]
        if start:
            row["feature_gap_start"] = start[0].get("feature_gap")
        if metrics:
            secs = [m["seconds"] for m in metrics if "seconds" in m]
            row["sec_per_epoch"] = sum(secs) / len(secs) if secs else None
            row["train_seconds"] = sum(secs)
            row["final_loss"] = metrics[-1].get("loss")
            row["final_feature_gap"] = metrics[-1].get("feature_gap")
        for k, v in c.get("hp", {}).items():
            row[f"hp.{k}"] = json.dumps(v) if isinstance(v, (dict, list)) else v
        ev = run.read_eval()
        if ev:
            row["suspect"] = ",".join(ev.get("suspect", [])) or None
            for name, r in ev.get("results", {}).items():
                row[name] = r.get("acc")
                row[f"{name}_n"] = r.get("n")
            for head, res in ev.get("heads", {}).items():  # AFD's f1 / f2 heads (Table 4): f1_clean, f2_pgd20, ...
                for name, r in res.items():
                    row[f"{head}_{name}"] = r.get("acc")
        rows.append(row)
    return pd.DataFrame(rows)
