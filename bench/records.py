"""Run records: one directory per run under ``results/runs/``, named ``<dataset>_<arch>_<method>_s<seed>_<hash>``
(the hash covers every setting that changes the trained weights), holding

* ``config.json``  — the resolved config, git commit, package versions, device;
* ``metrics.jsonl`` — one line per finished epoch (loss, train accuracy, lr, seconds, images/s, memory, feature gaps),
  after a line for epoch 0 with the feature gaps of the starting model;
* ``eval.json``    — clean / PGD-20 / AutoAttack numbers, each with n, seed, device, dtype and versions (and a
  method's extra heads: AFD's f1 / f2);
* ``tsne.json``    — a method's t-SNE of its features (AFD's Fig. 3), where it has one;
* ``done``         — written last, when training and evaluation are complete;
* ``ckpt/``        — checkpoints and the final weights (git-ignored; safetensors only).

Every file is written atomically. :func:`collect_runs` is the one reader of all runs: a pandas DataFrame with a row
per run, which ``bench report`` builds on.
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

from .errors import BenchError
from .fsutil import RunLock, atomic_write_json, atomic_write_text, check_inside, read_json

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


class DamagedRecord(BenchError):
    """A run record (config.json, metrics.jsonl, eval.json) that cannot be read as one: empty, truncated, not
    JSON, or JSON of the wrong shape. Commands that read many runs list it and go on; ``bench run`` repairs it."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is damaged ({reason})")
        self.path, self.reason = path, reason


def _load_record(path: Path, need: str | None) -> dict[str, Any]:
    """A JSON object from ``path`` that has the object ``need`` (e.g. ``config``), else :class:`DamagedRecord`."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DamagedRecord(path, "not text") from None
    if not text.strip():
        raise DamagedRecord(path, "empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedRecord(path, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(obj, dict):
        raise DamagedRecord(path, f"a JSON {type(obj).__name__}, not an object")
    if need is not None and not isinstance(obj.get(need), dict):
        raise DamagedRecord(path, f"no {need!r} object in it")
    return obj


@dataclass
class RunDir:
    path: Path

    @classmethod
    def for_config(cls, cfg) -> "RunDir":
        name = cfg.run_name
        # names come from registry names, an integer seed and a hash; refuse anything that could leave runs/
        if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"unsafe run directory name {name!r}")
        run = cls(Path(cfg.results_dir) / "runs" / name)
        run.check_place()
        return run

    @property
    def root(self) -> Path:
        """The results root this run directory lies in (``<root>/runs/<name>``)."""
        return self.path.parent.parent

    def check_place(self) -> None:
        """A one-line error unless this run directory can be written where it is: inside the results root (no
        symbolic link on the way or inside it) and a directory, if it exists."""
        check_inside(self.root, self.path, "run directory")
        if self.path.exists() and not self.path.is_dir():
            raise BenchError(f"run directory {self.path} is a file; accepted: a directory (move the file away)")
        if (self.path.parent.exists() and not self.path.parent.is_dir()):
            raise BenchError(f"{self.path.parent} is a file; accepted: a directory holding the run directories")

    @property
    def name(self) -> str:
        return self.path.name

    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    eval = property(lambda self: self.path / "eval.json")
    method_record = property(lambda self: self.path / "method.json")  # what a method's stages found (RiFT)
    tsne = property(lambda self: self.path / "tsne.json")  # a method's t-SNE of its features (AFD Fig. 3)
    grids = property(lambda self: self.path / "grids.json")  # the --set grids this run is a point of
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
        return _load_record(self.config, "config")

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def read_metrics(self, start: bool = False) -> list[dict[str, Any]]:
        """The per-epoch rows (epoch ≥ 1); with ``start``, also the epoch-0 row (the feature-gap probe of the
        starting model, before any training)."""
        if not self.metrics.is_file():
            return []
        rows = []
        try:
            lines = self.metrics.read_text().splitlines()
        except UnicodeDecodeError:
            raise DamagedRecord(self.metrics, "not text") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DamagedRecord(self.metrics, f"line {i} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict) or isinstance(row.get("epoch"), bool) or not isinstance(row.get("epoch"),
                                                                                                  int):
                raise DamagedRecord(self.metrics, f"line {i} is not an epoch's row")
            rows.append(row)
        return rows if start else [r for r in rows if r.get("epoch", 1) >= 1]

    def read_eval(self) -> dict[str, Any] | None:
        return _load_record(self.eval, "results") if self.eval.is_file() else None

    def damage(self) -> list[DamagedRecord]:
        """The run's records that cannot be read (none for a healthy run)."""
        return self._read_all()[3]

    def _read_all(self) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None, list[DamagedRecord]]:
        """(config record or {}, every metrics row (epoch 0 first), eval record or None, what of them is damaged),
        each read once."""
        cfg: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        ev: dict[str, Any] | None = None
        out: list[DamagedRecord] = []
        try:
            cfg = self.read_config() if self.config.is_file() else {}
        except DamagedRecord as e:
            out.append(e)
        try:
            rows = self.read_metrics(start=True)
            if not any(r["epoch"] >= 1 for r in rows) and self.is_done():
                out.append(DamagedRecord(self.metrics, "no epoch's row, in a finished run"))
        except DamagedRecord as e:
            out.append(e)
        try:
            ev = self.read_eval()
        except DamagedRecord as e:
            out.append(e)
        return cfg, rows, ev, out

    def weights_mismatch(self, ev: dict[str, Any] | None = None) -> str | None:
        """A one-line reason when the final weights file is not the model ``eval.json`` evaluated (its digest,
        ``meta.weights_sha256``, differs: the file was modified or replaced since); None when they agree or when
        there is nothing to compare (no weights here, or no digest recorded). ``ev``: eval.json, if already read."""
        if not self.final_weights.is_file():
            return None
        try:
            want = ((ev if ev is not None else self.read_eval() or {}).get("meta") or {}).get("weights_sha256")
        except DamagedRecord:
            return None
        if not want:
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .checkpoint import tensor_digest

        try:
            got = tensor_digest(load_file(str(self.final_weights)))[:16]
        except (SafetensorError, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return f"its final weights {self.final_weights} are unreadable ({first})"
        if got != want:
            return (f"its final weights {self.final_weights} (digest {got}) are not the model eval.json evaluated "
                    f"({want}): modified or replaced since")
        return None

    def set_aside(self, path: Path) -> Path:
        """Rename a damaged record out of the way (``<name>.damaged``, kept for inspection) so that it is rebuilt."""
        dest = path.with_name(path.name + ".damaged")
        os.replace(path, dest)
        return dest

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
        self.check_place()  # never inside a link to elsewhere
        stale = []
        for dirpath, _, filenames in os.walk(self.path):  # (os.walk does not follow links)
            for n in filenames:
                p = Path(dirpath) / n
                if n.startswith(".") and n.endswith(".tmp") and p.is_file() and not p.is_symlink():
                    stale.append(p)
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def mark_done(self) -> None:
        atomic_write_text(self.done, "done\n")

    def status(self, check_weights: bool = True) -> dict[str, Any]:
        """The run's state: done, running (another process holds its lock), partial, empty, or damaged (a record
        cannot be read, or with ``check_weights`` a finished run's final weights are not the model ``eval.json``
        evaluated: ``damage`` says which and why; ``bench run`` of the run repairs it)."""
        return self._status(*self._read_all(), check_weights=check_weights)

    def _status(self, cfg: dict[str, Any], rows: list[dict[str, Any]], ev: dict[str, Any] | None,
                found: list[DamagedRecord], check_weights: bool = True) -> dict[str, Any]:
        """:meth:`status` from the records :meth:`_read_all` read."""
        rows = [r for r in rows if r["epoch"] >= 1]
        damage: list[Any] = list(found)
        if check_weights and self.is_done() and not damage:
            bad = self.weights_mismatch(ev)
            if bad:
                damage.append(bad)
        c = cfg.get("config", {}) if isinstance(cfg, dict) else {}
        hp = c.get("hp") if isinstance(c.get("hp"), dict) else {}
        epochs = hp.get("epochs")
        if self.lock.is_held_by_other():
            state = "running"
        elif damage:
            state = "damaged"
        elif self.is_done():
            state = "done"
        elif rows or self.config.is_file():
            state = "partial"
        else:
            state = "empty"
        out = {"run": self.name, "state": state, "method": c.get("method"), "dataset": c.get("dataset"),
               "arch": c.get("arch"), "seed": c.get("seed"), "epoch": len(rows), "epochs": epochs}
        if damage:
            out["damage"] = "; ".join(str(d) for d in damage)
        return out


def list_runs(results_dir: str | os.PathLike = "results") -> list[RunDir]:
    root = Path(results_dir) / "runs"
    if not root.is_dir():
        return []
    # a run directory that is a link to elsewhere is not one of these results' runs (the suite never writes there)
    return [RunDir(p) for p in sorted(root.iterdir())
            if p.is_dir() and not p.is_symlink() and (p / "config.json").is_file()]


def collect_runs(results_dir: str | os.PathLike = "results", done_only: bool = False, *,
                 damaged: list[str] | None = None, check_weights: bool = True):
    """All runs under ``results_dir/runs`` as a pandas DataFrame, one row per run, each record file read once: the
    one reader of run records (``bench report`` builds on it).

    Columns: run, path, method, dataset, arch, seed, preset, precision, state (:meth:`RunDir.status`), done (the
    ``done`` marker is there), epochs, epochs_done, sec_per_epoch (mean over epochs), train_seconds (sum), device
    (``config.json``'s: where the run started), pretrained, final_loss, final_feature_gap, suspect, and for every
    evaluated attack ``<attack>`` (accuracy in %) and ``<attack>_n``; ``<head>_<attack>`` for extra heads (AFD's f1
    / f2); ``feature_gap_start`` (epoch 0); ``hp.<key>`` for every hyper-parameter. The records themselves, for
    what needs more than a number: ``config`` (the resolved config), ``metrics`` (every row of ``metrics.jsonl``,
    epoch 0 first), ``eval_record`` (``eval.json``, heads included, or None), ``tsne`` (``tsne.json``, or None), and
    ``base``: the run among these rows that the run started from (its ``pretrained`` names it), or None.

    A damaged run (a record that cannot be read; with ``check_weights``, also final weights that are not the
    model ``eval.json`` evaluated) is left out and described in ``damaged`` (a line each, with its name and
    why), so that one bad record never stops a reader of many runs. ``done_only``: finished runs only.
    """
    import pandas as pd

    rows = []
    for run in list_runs(results_dir):
        try:
            rec, metrics_all, ev, found = run._read_all()
        except OSError as e:  # (a record that cannot be opened at all)
            if damaged is not None:
                damaged.append(f"{run.name}: {e}")
            continue
        st = run._status(rec, metrics_all, ev, found, check_weights=check_weights)
        if "damage" in st:  # (also of a run another process holds: what cannot be read is not reported)
            if damaged is not None:
                damaged.append(f"{run.name}: {st['damage']}")
            continue
        if done_only and st["state"] != "done":
            continue
        c = rec.get("config", {})
        metrics = [m for m in metrics_all if m["epoch"] >= 1]
        row = {"run": run.name, "path": str(run.path), "method": c.get("method"), "dataset": c.get("dataset"),
               "arch": c.get("arch"), "seed": c.get("seed"), "preset": c.get("preset"),
               "precision": c.get("precision"), "state": st["state"], "done": run.is_done(),
               "epochs": c.get("hp", {}).get("epochs"), "epochs_done": len(metrics), "device": rec.get("device"),
               "pretrained": c.get("pretrained")}
        start = [m for m in metrics_all if m["epoch"] == 0]
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
        if ev:
            row["suspect"] = ",".join(ev.get("suspect", [])) or None
            for name, r in ev.get("results", {}).items():
                row[name] = r.get("acc")
                row[f"{name}_n"] = r.get("n")
            for head, res in ev.get("heads", {}).items():  # AFD's f1 / f2 heads (Table 4): f1_clean, f2_pgd20, ...
                for name, r in res.items():
                    row[f"{head}_{name}"] = r.get("acc")
        row.update(config=c, metrics=metrics_all, eval_record=ev, tsne=_read_tsne(run))
        rows.append(row)
    names = {r["run"] for r in rows}
    for r in rows:
        r["base"] = r["pretrained"] if r["pretrained"] in names else None
    return pd.DataFrame(rows)


def _read_tsne(run: RunDir) -> dict[str, Any] | None:
    """``tsne.json`` of ``run``, or None where there is none or it cannot be read as a record (a figure's data: the
    run's numbers do not depend on it, so it never makes the run damaged)."""
    if not run.tsne.is_file():
        return None
    try:
        return _load_record(run.tsne, None)
    except (DamagedRecord, OSError):
        return None
