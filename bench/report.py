"""``bench report``: the seed paper's tables and figures regenerated from the run records under ``results/runs/``,
beside the paper's own numbers (``bench.paper``).

Runs are grouped by their *setting*: everything in the run's identity (method, dataset, architecture, every
hyper-parameter, subset, normalisation, precision, starting model) except the seed. Runs of one setting aggregate
over seeds (mean ± sample std, the number of seeds and the evaluated n are shown); two settings of one method never
aggregate — each gets its own row, labelled ``<preset>·<setting hash>``, and ``settings.csv`` lists what each
setting is. Missing cells are "—", never 0. A run whose evaluation failed a sanity check is marked SUSPECT in every
row it enters.

Written under ``<results>/tables/`` (Markdown, CSV, LaTeX), ``<results>/figures/`` (PNG, PDF) and
``<results>/index.html``. Rows and columns come in a fixed order, so a committed report diffs cleanly when a run is
added.

The user's runs and the project's shipped ones are kept apart: ``results/`` is the user's (git-ignored), the clone's
``results/reference/`` is what the project ships (its run records and their report). ``bench report --reference``
adds the shipped runs as settings of their own, labelled ``reference·<preset>·<hash>``, beside the user's; a
maintainer regenerates the shipped report with ``bench report --results results/reference``.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import BenchError
from .config import RunConfig, identity_hp
from .records import RunDir, collect_runs

OPTIONAL_IDENTITY = RunConfig.OPTIONAL_IDENTITY

ATTACKS = ("clean", "pgd20", "aa")
LABEL = {"clean": "Clean", "pgd20": "PGD-20", "aa": "AA", "avg": "Avg"}
DASH = "—"
PAPER_DATASETS = ["cifar10", "cifar100", "tinyimagenet"]
ABLATION = ["vaft", "vaft+d", "vaft+a", "afd"]
# the CPU tier (bench/configs/cpu.toml): its runs get a table of their own, never beside the paper's ResNet-18 rows
TIER = "cpu"
FIG1A_METHODS = ["vaft", "afkd", "arrest", "afd"]


# ---------------------------------------------------------------------------------------------------------------
# reading the records


@dataclass
class Run:
    """One finished or partial run, from its row of :func:`~bench.records.collect_runs`."""

    dir: RunDir
    config: dict[str, Any]
    device: str
    metrics: list[dict[str, Any]]  # every row of metrics.jsonl, epoch 0 first
    eval: dict[str, Any] | None
    done: bool = False
    tsne: dict[str, Any] | None = None
    setting: str = ""
    label: str = ""
    source: str = ""  # "" for the user's own runs; "reference" for the project's shipped records beside them

    @property
    def name(self) -> str:
        """The run's directory name; a shipped reference run's is prefixed (``reference:<dir>``), so that a user's
        run of the very same setting (the same directory name) never stands in for it, nor it for the user's."""
        return f"{self.source}:{self.dir.name}" if self.source else self.dir.name

    def __getattr__(self, key: str) -> Any:  # method, dataset, arch, seed, preset, hp, ...
        cfg = self.__dict__.get("config", {})
        if key in cfg:
            return cfg[key]
        raise AttributeError(key)

    @property
    def suspect(self) -> list[str]:
        return list((self.eval or {}).get("suspect", []))

    def acc(self, attack: str) -> float | None:
        r = ((self.eval or {}).get("results") or {}).get(attack)
        return None if r is None else float(r["acc"])

    def n(self, attack: str) -> int | None:
        r = ((self.eval or {}).get("results") or {}).get(attack)
        return None if r is None else int(r["n"])

    def head_acc(self, head: str, attack: str) -> float | None:
        r = ((self.eval or {}).get("heads") or {}).get(head, {}).get(attack)
        return None if r is None else float(r["acc"])

    @property
    def seconds(self) -> list[float]:
        return [float(m["seconds"]) for m in self.metrics if m.get("epoch", 0) >= 1 and "seconds" in m]


def epochs_device(metrics: list[dict[str, Any]], config_device: str) -> str:
    """The device a run's epochs ran on: each epoch's row names it (older records do not: then ``config.json``'s
    device, where the run started). A run resumed on another device is ``mixed (A; B)``, which is no device's
    column in Table 5: its times are never credited to one device."""
    devs = list(dict.fromkeys(m.get("device") or config_device for m in metrics if m.get("epoch", 0) >= 1))
    if len(devs) > 1:
        return "mixed (" + "; ".join(devs) + ")"
    return devs[0] if devs else config_device


def read_runs(results_dir: str | Path, damaged: list[str] | None = None, source: str = "") -> list[Run]:
    """Every run with records under ``results_dir/runs``, as :func:`~bench.records.collect_runs` reads them; a run
    whose records cannot be read is left out and described in ``damaged`` (one line each, with the path), so that
    one bad record never stops a report. The report trusts ``eval.json`` for its numbers: final weights changed
    since do not leave a run out. ``source`` (e.g. "reference") marks runs that are not the user's own: their
    names, setting keys and labels carry it, so that they form settings of their own, labelled as such, and link
    only to starting models of the same source."""
    table = collect_runs(results_dir, damaged=damaged, check_weights=False)
    runs = []
    for row in table.to_dict("records"):
        row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}  # (pandas: NaN)
        config = row["config"]
        if source and row["base"]:  # the starting model is a run of the same results root: of the same source
            config = {**config, "pretrained": f"{source}:{row['base']}"}
        runs.append(Run(RunDir(Path(row["path"])), config, epochs_device(row["metrics"], row["device"] or
                                                                         "unknown device"),
                        row["metrics"], row["eval_record"], done=bool(row["done"]), tsne=row["tsne"],
                        source=source))
    by_name = {r.name: r for r in runs}
    for r in runs:
        r.setting = setting_key(r, by_name)
        r.label = (f"{source}·" if source else "") + f"{r.config.get('preset') or 'custom'}·{r.setting[:6]}"
    return runs


_SEEDED_NAME = re.compile(r"_s\d+_[0-9a-f]{10}$")


def setting_key(run: Run, by_name: dict[str, Run], _depth: int = 0) -> str:
    """A hash of the run's identity without its seed; a suite-trained starting model enters by *its* setting (so
    seeds 0, 1, 2 of AFD, each from the natural model of its own seed, are one setting)."""
    c = run.config
    ident = {k: c.get(k) for k in ("method", "dataset", "arch", "hp", "subset", "normalize", "precision")}
    ident["hp"] = identity_hp(c.get("method"), c.get("hp"))
    # the parts of the run's identity that records carry only where set (bench.config.OPTIONAL_IDENTITY: a hold-out
    # such as RiFT's PGD-AT base has, the data's digest, ...): a run with one is another setting than one without
    ident.update({k: c[k] for k in OPTIONAL_IDENTITY if c.get(k) is not None})
    if run.source:  # (the user's own runs keep the keys they always had)
        ident["source"] = run.source
    pre = c.get("pretrained")
    if pre and pre in by_name and _depth < 8:
        ident["pretrained"] = "setting:" + setting_key(by_name[pre], by_name, _depth + 1)
    elif pre:
        ident["pretrained"] = _SEEDED_NAME.sub("_s*", str(pre))
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------------------------
# aggregation


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


@dataclass
class Group:
    """The runs of one setting (they differ only by seed)."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def seeds(self) -> list[int]:
        return sorted(int(r.seed) for r in self.runs)

    def stat(self, attack: str) -> tuple[float | None, float | None, int]:
        """(mean, std, number of seeds with the number) of the accuracy under ``attack`` (``avg``: of the per-run
        mean of Clean, PGD-20 and AA; only runs that have all three)."""
        if attack == "avg":
            vals = []
            for r in self.runs:
                three = [r.acc(a) for a in ATTACKS]
                if all(v is not None for v in three):
                    vals.append(sum(three) / 3)
        else:
            vals = [r.acc(attack) for r in self.runs if r.acc(attack) is not None]
        m, s = mean_std(vals)
        return m, s, len(vals)

    def n(self, attack: str) -> str:
        ns = sorted({r.n(attack) for r in self.runs if r.n(attack) is not None})
        return "/".join(str(n) for n in ns) if ns else DASH

    @property
    def suspect(self) -> list[str]:
        return sorted({f"{r.name}: {c}" for r in self.runs for c in r.suspect})


def groups_of(runs: list[Run], done_only: bool = True) -> dict[str, Group]:
    out: dict[str, Group] = {}
    for r in runs:
        if done_only and not (r.done and r.eval):
            continue
        out.setdefault(r.setting, Group([])).runs.append(r)
    return out


def method_order(methods: list[str]) -> list[str]:
    """``methods`` in the order of the report's rows: by each method's ``report_row`` (the paper's row order), then
    those without one and names no method is registered under (records of a retired method), by name."""
    from methods import METHODS

    def key(m: str) -> tuple[bool, int, str]:
        row = METHODS.get(m).report_row if m in METHODS else None
        return row is None, row or 0, m

    return sorted(dict.fromkeys(methods), key=key)


def hp_changes(g: "Group") -> str:
    """The hyper-parameters of a setting that differ from its method's defaults (what a reader must know before
    comparing a row with the paper's), e.g. ``epochs=3, gamma=5.0``; "" when none does."""
    from methods import METHODS

    try:
        defaults = METHODS.get(g.first.method).resolved_defaults()
    except Exception:  # noqa: BLE001 — a record of a method this version no longer has
        return ""
    hp = g.first.hp
    diff = [f"{k}={json.dumps(hp[k], sort_keys=True) if isinstance(hp[k], (dict, list)) else hp[k]}"
            for k in sorted(hp) if k in defaults and hp[k] != defaults[k]]
    if g.first.config.get("holdout") is not None:  # (a starting model that keeps RiFT's hold-out out of training)
        diff.append(f"holdout={g.first.config['holdout']} per class")
    return ", ".join(diff)


def fmt(v: float | None, std: float | None = None, k: int = 0) -> str:
    if v is None:
        return DASH
    s = f"{v:.2f}"
    if std is not None and k > 1:
        s += f" ± {std:.2f}"
    return s


def fmt_diff(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None:
        return DASH
    return f"{ours - paper:+.2f}"


# ---------------------------------------------------------------------------------------------------------------
# tables


class PaperView:
    """The report's questions to :mod:`bench.paper` (the numbers live there, as data with their sources): ``None``
    wherever the paper printed nothing, including methods, datasets and architectures it does not have."""

    METRIC = {"clean": "clean", "pgd20": "pgd", "aa": "aa", "avg": "avg"}

    def __init__(self):
        from . import paper

        self.p = paper
        self.SOURCE = paper.SOURCE

    def table12_methods(self, arch: str) -> list[str]:
        if arch not in self.p.ARCHS:
            return []
        return list(dict.fromkeys(r.method for r in self.p.table12(arch)))

    def table12_row(self, arch: str, method: str, dataset: str) -> dict[str, Any] | None:
        if arch not in self.p.ARCHS or method not in self.p.LABELS or dataset not in self.p.DATASETS:
            return None
        r = self.p.main_result(method, dataset, arch)
        if r is None or all(r.get(m) is None for m in self.p.MAIN_METRICS):
            return None
        return {"row": r, "dagger": r.dagger, "suspect": r.note if r.suspect else ""}

    def metric(self, row: dict[str, Any] | None, attack: str) -> float | None:
        return None if row is None else row["row"].get(self.METRIC[attack])

    def table3_row(self, method: str) -> dict[str, Any] | None:
        r = next((r for r in self.p.TABLE3 if r.method == method), None)
        return None if r is None else {"row": r, "dagger": False, "suspect": ""}

    def table4_keys(self) -> list[tuple[str, str]]:
        return [(r.dataset, r.arch) for r in self.p.TABLE4]

    def table4_row(self, dataset: str, arch: str) -> dict[str, Any] | None:
        r = next((r for r in self.p.TABLE4 if (r.dataset, r.arch) == (dataset, arch)), None)
        return None if r is None else {"f1": r.f1, "f2": r.f2, "delta": r.delta}

    def table5_methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.p.TABLE5))

    def table5_row(self, method: str) -> dict[str, Any] | None:
        if method not in self.p.LABELS:
            return None
        r = self.p.table5_row(method)
        if r is None:
            return None
        return {"epochs": r.epochs, "time_one": r.time_one, "time_total": r.time_total,
                "device": self.p.TABLE5_DEVICE or "not stated",
                "note": self.p.DAGGER_TIME_NOTE if r.dagger else ""}


_PAPER: PaperView | None = None


def _paper() -> PaperView:
    global _PAPER
    if _PAPER is None:
        _PAPER = PaperView()
    return _PAPER


def table12(groups: dict[str, Group], arch: str) -> tuple[Any, Any]:
    """Table 1 (resnet18) / 2 (wrn-34-10): (display DataFrame, numeric DataFrame)."""
    import pandas as pd

    paper = _paper()
    gs = [g for g in groups.values() if g.first.arch == arch]
    datasets = PAPER_DATASETS + sorted({g.first.dataset for g in gs} - set(PAPER_DATASETS))
    methods = method_order(sorted({g.first.method for g in gs} | set(paper.table12_methods(arch))))
    rows, nums = [], []
    for ds in datasets:
        for m in methods:
            mine = sorted((g for g in gs if g.first.dataset == ds and g.first.method == m),
                          key=lambda g: g.first.label)
            prow = paper.table12_row(arch, m, ds)
            if not mine and prow is None:
                continue
            for g in mine or [None]:
                row: dict[str, Any] = {"dataset": ds, "method": m, "setting": g.first.label if g else DASH,
                                       "seeds": len(g.runs) if g else 0,
                                       "n": f"{g.n('clean')} / AA {g.n('aa')}" if g else DASH}
                num: dict[str, Any] = {"dataset": ds, "method": m, "setting": g.first.setting if g else None,
                                       "seeds": len(g.runs) if g else 0}
                for a in (*ATTACKS, "avg"):
                    mean, std, k = g.stat(a) if g else (None, None, 0)
                    p = paper.metric(prow, a) if prow else None
                    row[LABEL[a]] = fmt(mean, std, k)
                    row[f"paper {LABEL[a]}"] = fmt(p)
                    row[f"Δ {LABEL[a]}"] = fmt_diff(mean, p)
                    num.update({f"{a}_mean": mean, f"{a}_std": std, f"{a}_seeds": k, f"paper_{a}": p})
                notes = []
                if prow is not None and prow.get("dagger"):
                    notes.append("paper: † PGD-10, PreAct-ResNet-18, copied from the ATAS paper")
                if prow is not None and prow.get("suspect"):
                    notes.append(f"paper row suspect: {prow['suspect']}")
                if prow is None and g is not None:
                    notes.append("no paper row")
                if g and g.suspect:
                    notes.append("SUSPECT: " + "; ".join(g.suspect))
                changed = hp_changes(g) if g else ""
                if changed:
                    notes.append("hp ≠ defaults: " + changed)
                row["notes"] = " · ".join(notes)
                num["notes"] = row["notes"]
                rows.append(row)
                nums.append(num)
    return pd.DataFrame(rows), pd.DataFrame(nums)


def table3(groups: dict[str, Group]) -> tuple[Any, Any]:
    """Table 3: the ablation (vAFT, vAFT+D, vAFT+A, AFD) on CIFAR-10 ResNet-18."""
    import pandas as pd

    paper = _paper()
    rows, nums = [], []
    for m in ABLATION:
        mine = sorted((g for g in groups.values() if (g.first.method, g.first.dataset, g.first.arch) ==
                       (m, "cifar10", "resnet18")), key=lambda g: g.first.label)
        prow = paper.table3_row(m)
        for g in mine or [None]:
            row: dict[str, Any] = {"method": m, "setting": g.first.label if g else DASH,
                                   "seeds": len(g.runs) if g else 0}
            num: dict[str, Any] = {"method": m, "setting": g.first.setting if g else None}
            for a in ATTACKS:
                mean, std, k = g.stat(a) if g else (None, None, 0)
                p = paper.metric(prow, a) if prow else None
                row[LABEL[a]] = fmt(mean, std, k)
                row[f"paper {LABEL[a]}"] = fmt(p)
                row[f"Δ {LABEL[a]}"] = fmt_diff(mean, p)
                num.update({f"{a}_mean": mean, f"{a}_std": std, f"paper_{a}": p})
            changed = hp_changes(g) if g else ""
            notes = (["SUSPECT: " + "; ".join(g.suspect)] if g and g.suspect else []) + (
                ["hp ≠ defaults: " + changed] if changed else [])
            row["notes"] = " · ".join(notes)
            rows.append(row)
            nums.append(num)
    return pd.DataFrame(rows), pd.DataFrame(nums)


def table4(groups: dict[str, Group]) -> tuple[Any, Any]:
    """Table 4: clean accuracy of AFD's f₁ and f₂ heads and Δ = f₁ − f₂ (with PGD-20 of both heads)."""
    import pandas as pd

    paper = _paper()
    gs = [g for g in groups.values() if g.first.method == "afd"]
    keys = sorted({(g.first.dataset, g.first.arch) for g in gs} | set(paper.table4_keys()))
    rows, nums = [], []
    for ds, arch in keys:
        mine = sorted((g for g in gs if (g.first.dataset, g.first.arch) == (ds, arch)), key=lambda g: g.first.label)
        prow = paper.table4_row(ds, arch)
        for g in mine or [None]:
            def head(h, a):
                vals = [r.head_acc(h, a) for r in g.runs] if g else []
                return mean_std([v for v in vals if v is not None])

            f1, f1s = head("f1", "clean")
            f2, f2s = head("f2", "clean")
            k = len(g.runs) if g else 0
            d = None if f1 is None or f2 is None else f1 - f2
            p1, p2 = (prow or {}).get("f1"), (prow or {}).get("f2")
            pd_ = (prow or {}).get("delta")
            r1, _ = head("f1", "pgd20")
            r2, _ = head("f2", "pgd20")
            rows.append({"dataset": ds, "arch": arch, "setting": g.first.label if g else DASH, "seeds": k,
                         "f1 clean": fmt(f1, f1s, k), "f2 clean": fmt(f2, f2s, k), "Δ": fmt(d),
                         "paper f1": fmt(p1), "paper f2": fmt(p2), "paper Δ": fmt(pd_),
                         "f1 PGD-20": fmt(r1), "f2 PGD-20": fmt(r2),
                         "notes": "SUSPECT: " + "; ".join(g.suspect) if g and g.suspect else ""})
            nums.append({"dataset": ds, "arch": arch, "setting": g.first.setting if g else None, "f1": f1, "f2": f2,
                         "delta": d, "paper_f1": p1, "paper_f2": p2, "paper_delta": pd_, "f1_pgd20": r1,
                         "f2_pgd20": r2})
    return pd.DataFrame(rows), pd.DataFrame(nums)


def _total_seconds(run: Run, by_name: dict[str, Run], device: str, _depth: int = 0) -> float | None:
    """Training time of ``run`` plus that of the suite-trained model it started from (the paper's Time_total
    counts the pre-training), only when every part was measured on ``device``; else None."""
    if run.device != device or not run.seconds or len(run.seconds) < int(run.hp.get("epochs", 0)):
        return None
    total = sum(run.seconds)
    pre = run.config.get("pretrained")
    if pre and _depth < 8:
        base = by_name.get(pre)
        if base is None:
            return None
        sub = _total_seconds(base, by_name, device, _depth + 1)
        if sub is None:
            return None
        total += sub
    return total


def table5(groups: dict[str, Group], runs: list[Run]) -> tuple[Any, Any]:
    """Table 5: seconds per epoch and total training time per method (total includes the shared pre-training, as
    the paper counts it), one pair of columns per device — times from different devices are never in one column."""
    import pandas as pd

    paper = _paper()
    by_name = {r.name: r for r in runs}
    devices = sorted({r.device for g in groups.values() for r in g.runs})
    gs = sorted(groups.values(), key=lambda g: (g.first.dataset, g.first.arch, g.first.label))
    methods = method_order(sorted({g.first.method for g in gs} | set(paper.table5_methods())))
    rows, nums = [], []
    for m in methods:
        mine = [g for g in gs if g.first.method == m] or [None]
        for g in mine:
            # the paper's Table 5 is CIFAR-10 / ResNet-18 only: no paper number beside runs of anything else
            comparable = g is None or (g.first.dataset, g.first.arch) == ("cifar10", "resnet18")
            prow = paper.table5_row(m) if comparable else None
            row: dict[str, Any] = {"method": m, "dataset": g.first.dataset if g else DASH,
                                   "arch": g.first.arch if g else DASH, "setting": g.first.label if g else DASH,
                                   "epochs": g.first.hp.get("epochs") if g else DASH}
            num: dict[str, Any] = {"method": m, "setting": g.first.setting if g else None}
            for dev in devices:
                per = [sum(r.seconds) / len(r.seconds) for r in (g.runs if g else []) if r.device == dev and r.seconds]
                tot = [t for t in (_total_seconds(r, by_name, dev) for r in (g.runs if g else [])) if t is not None]
                pm, _ = mean_std(per)
                tm, _ = mean_std(tot)
                row[f"s/epoch [{dev}]"] = DASH if pm is None else f"{pm:.1f}"
                row[f"total s [{dev}]"] = DASH if tm is None else f"{tm:.0f}"
                num[f"sec_per_epoch[{dev}]"] = pm
                num[f"total_seconds[{dev}]"] = tm
            row["paper epochs"] = DASH if prow is None else prow.get("epochs", DASH)
            row["paper s/epoch"] = fmt(prow.get("time_one") if prow else None)
            row["paper total s"] = fmt(prow.get("time_total") if prow else None)
            row["paper device"] = (prow or {}).get("device") or DASH
            row["notes"] = (prow or {}).get("note") or ""
            num.update({"paper_epochs": (prow or {}).get("epochs"), "paper_time_one": (prow or {}).get("time_one"),
                        "paper_time_total": (prow or {}).get("time_total")})
            rows.append(row)
            nums.append(num)
    return pd.DataFrame(rows), pd.DataFrame(nums)


def kendall_tau(xs: list[float], ys: list[float]) -> float | None:
    """Kendall's τ-b of two equally long lists (ties in either count as neither concordant nor discordant, and
    the denominator is corrected for them); None for fewer than two pairs that are untied in both."""
    if len(xs) != len(ys):
        raise ValueError("kendall_tau: lists of different lengths")
    conc = disc = tx = ty = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return None if denom == 0 else (conc - disc) / denom


def _run_seconds(run: Run, key: str = "seconds") -> float | None:
    """Training plus evaluation seconds of one run (its records' own timings): wall clock (``seconds``) or this
    process's CPU time over all its threads (``cpu_seconds``; None for records older than it)."""
    ev = [r for r in ((run.eval or {}).get("results") or {}).values() if isinstance(r, dict) and "seconds" in r]
    rows = [m for m in run.metrics if m.get("epoch", 0) >= 1 and "seconds" in m]
    if any(key not in x for x in rows + ev):
        return None
    return sum(float(x[key]) for x in rows + ev)


def tier_table(groups: dict[str, Group], runs: list[Run], preset: str = TIER) -> tuple[Any, Any, Any, Any]:
    """The CPU tier: (display, numeric, τ display, τ numeric). One row per setting of the tier's runs (mean ±
    sample std over seeds and their number), seconds per epoch and in total (with the pre-training, as Table 5
    counts it) on the tier's device; then, per metric, Kendall's τ-b between the tier's ranking of the methods and
    the paper's Table 1 (CIFAR-10, ResNet-18) ranking, over the methods both have."""
    import pandas as pd

    paper = _paper()
    by_name = {r.name: r for r in runs}
    gs = [g for g in groups.values() if g.first.config.get("preset") == preset]
    order = method_order(sorted({g.first.method for g in gs}))
    gs.sort(key=lambda g: (order.index(g.first.method), g.first.label))
    rows, nums = [], []
    for g in gs:
        devices = sorted({r.device for r in g.runs})
        per = [sum(r.seconds) / len(r.seconds) for r in g.runs if r.seconds]
        tot = [t for t in (_total_seconds(r, by_name, r.device) for r in g.runs) if t is not None]
        pm, tm = mean_std(per)[0], mean_std(tot)[0]
        row: dict[str, Any] = {"method": g.first.method, "arch": g.first.arch, "setting": g.first.label,
                               "seeds": len(g.runs), "n": f"{g.n('clean')} / AA {g.n('aa')}"}
        num: dict[str, Any] = {"method": g.first.method, "arch": g.first.arch, "setting": g.first.setting,
                               "seeds": len(g.runs)}
        for a in (*ATTACKS, "avg"):
            mean, std, k = g.stat(a)
            row[LABEL[a]] = fmt(mean, std, k)
            num.update({f"{a}_mean": mean, f"{a}_std": std, f"{a}_seeds": k})
        row["epochs"] = g.first.hp.get("epochs")
        row["s/epoch"] = DASH if pm is None else f"{pm:.1f}"
        row["total h"] = DASH if tm is None else f"{tm / 3600:.2f}"
        row["device"] = "; ".join(devices)
        num.update({"epochs": row["epochs"], "sec_per_epoch": pm, "total_seconds": tm, "device": row["device"]})
        notes = []
        if g.suspect:
            notes.append("SUSPECT: " + "; ".join(g.suspect))
        changed = hp_changes(g)
        if changed:
            notes.append("scaled / ≠ defaults: " + changed)
        row["notes"] = num["notes"] = " · ".join(notes)
        rows.append(row)
        nums.append(num)
    # Kendall's τ against the paper's Table 1, per metric, over the methods both have (one setting per method:
    # the one with the most seeds, then the label order)
    # (the user's own settings before the shipped reference's, where both are in the report)
    best: dict[str, Group] = {}
    # (and a method's own setting before a starting model made for another method, e.g. RiFT's PGD-AT base)
    prefer = lambda g: (not g.first.source, len(g.runs), g.first.config.get("holdout") is None)  # noqa: E731
    for g in gs:
        m = g.first.method
        if m not in best or prefer(g) > prefer(best[m]):
            best[m] = g
    trows, tnums = [], []
    for a in (*ATTACKS, "avg"):
        pairs = []
        for m, g in best.items():
            ours = g.stat(a)[0]
            theirs = paper.metric(paper.table12_row("resnet18", m, "cifar10"), a)
            if ours is not None and theirs is not None:
                pairs.append((m, ours, theirs))
        tau = kendall_tau([p[1] for p in pairs], [p[2] for p in pairs]) if len(pairs) >= 2 else None
        rank = lambda i: " > ".join(m for m, *_ in sorted(pairs, key=lambda p: -p[i]))  # noqa: E731
        trows.append({"metric": LABEL[a], "methods": len(pairs), "Kendall τ-b": DASH if tau is None else f"{tau:+.2f}",
                      "tier ranking": rank(1) or DASH, "paper Table 1 ranking": rank(2) or DASH})
        tnums.append({"metric": a, "methods": len(pairs), "tau_b": tau,
                      "tier": ",".join(m for m, *_ in sorted(pairs, key=lambda p: -p[1])),
                      "paper": ",".join(m for m, *_ in sorted(pairs, key=lambda p: -p[2]))})
    return pd.DataFrame(rows), pd.DataFrame(nums), pd.DataFrame(trows), pd.DataFrame(tnums)


def tier_cost(runs: list[Run], preset: str = TIER) -> tuple[int, int, float, float | None]:
    """(finished tier runs, tier runs, wall-clock seconds of their training and evaluation, their CPU seconds —
    None while some record predates ``cpu_seconds``): of the user's own tier runs, or of the shipped reference's
    where the user has none."""
    tier = [r for r in runs if r.config.get("preset") == preset]
    own = [r for r in tier if not r.source]
    tier = own or tier
    cpu = [_run_seconds(r, "cpu_seconds") for r in tier]
    return (sum(1 for r in tier if r.done), len(tier), sum(_run_seconds(r) or 0.0 for r in tier),
            None if any(c is None for c in cpu) else sum(cpu))


def settings_table(groups: dict[str, Group]) -> Any:
    """What each setting label stands for: the identity of its runs without the seed."""
    import pandas as pd

    rows = []
    for key, g in sorted(groups.items(), key=lambda kv: (kv[1].first.method, kv[1].first.label)):
        c = g.first.config
        rows.append({"setting": g.first.label, "key": key, "method": c.get("method"), "dataset": c.get("dataset"),
                     "arch": c.get("arch"), "preset": c.get("preset"), "subset": c.get("subset"),
                     "seeds": ",".join(str(s) for s in g.seeds), "precision": c.get("precision"),
                     "pretrained": (_SEEDED_NAME.sub("_s*", str(c.get("pretrained"))) if c.get("pretrained") else
                                    f"backbone {c['init'][:17]}" if c.get("init") else ""),  # (a timm backbone file)
                     "≠ method defaults (scaled)": hp_changes(g),
                     "hp": json.dumps(identity_hp(c.get("method"), c.get("hp", {})), sort_keys=True)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# writing tables


def write_table(display: Any, numeric: Any, out: Path, name: str, title: str) -> list[Path]:
    """``name``.md (title + Markdown table), ``name``.csv (the numbers, unformatted) and ``name``.tex."""
    from .fsutil import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    if display.empty:
        md = f"# {title}\n\nNo runs and no paper numbers for this table.\n"
        tex = f"% {title}: no rows\n"
    else:
        md = f"# {title}\n\n" + display.to_markdown(index=False) + "\n"
        tex = display.to_latex(index=False, caption=title, label=f"tab:{name}", escape=True)
    atomic_write_text(out / f"{name}.md", md)
    atomic_write_text(out / f"{name}.csv", numeric.to_csv(index=False, float_format="%.4f"))
    atomic_write_text(out / f"{name}.tex", tex)
    return [out / f"{name}.md", out / f"{name}.csv", out / f"{name}.tex"]


# ---------------------------------------------------------------------------------------------------------------
# the report


@dataclass
class Report:
    tables: dict[str, tuple[str, Any]]  # name -> (title, display DataFrame)
    figures: dict[str, str]  # name -> caption
    files: list[Path]
    runs: int
    done: int


TITLES = {
    "table1": "Table 1: Clean / PGD-20 / AA / Avg on ResNet-18 (ours: mean ± std over seeds; paper: AFD Table 1)",
    "table2": "Table 2: Clean / PGD-20 / AA / Avg on WideResNet-34-10 (ours vs AFD Table 2)",
    "table3": "Table 3: ablation on CIFAR-10, ResNet-18 — vAFT, vAFT+D, vAFT+A, AFD (ours vs AFD Table 3)",
    "table4": "Table 4: clean accuracy of AFD's f1 (intrinsic) and f2 (confused) heads, Δ = f1 − f2 (ours vs AFD "
              "Table 4)",
    "table5": "Table 5: training time — seconds per epoch and total (with the shared pre-training), per device "
              "(ours vs AFD Table 5)",
    "settings": "Settings: what each setting label in the tables stands for",
    "tier": "The CPU tier (preset cpu): Clean / PGD-20 / AA / Avg on the full CIFAR-10 with a small CNN, mean ± std "
            "over seeds, time per epoch and in total (not comparable with the paper's ResNet-18 numbers)",
    "tier_tau": "The CPU tier's ranking of the methods against the paper's Table 1 (CIFAR-10, ResNet-18): Kendall's "
                "τ-b per metric over the methods both have (a small model may rank differently; the paper's † rows "
                "are PGD-10 numbers of PreAct-ResNet-18)",
}


def shipped_reference() -> Path:
    """The project's shipped reference records: ``results/reference/`` of the checkout this package runs from."""
    return Path(__file__).resolve().parents[1] / "results" / "reference"


def build(results_dir: str | Path = "results", out_dir: str | Path | None = None,
          echo: Callable[[str], None] = print, reference: str | Path | None = None) -> Report:
    """Read every run under ``results_dir/runs`` and write the tables, figures and ``index.html`` under
    ``out_dir`` (default ``results_dir``). With ``reference`` (a results root, e.g. :func:`shipped_reference`),
    its runs are read too, as settings of their own labelled ``reference·…`` beside the user's: never merged with
    them, never written to (only ``out_dir`` is)."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir
    if results_dir.exists() and not results_dir.is_dir():
        raise BenchError(f"--results {results_dir} is a file; accepted: a results directory holding runs/")
    if reference is not None:
        reference = Path(reference)
        if not (reference / "runs").is_dir():
            raise BenchError(f"--reference {reference} holds no runs/ directory; accepted: a results root with "
                             "run records, such as the clone's results/reference")
        if results_dir.resolve() == reference.resolve():
            raise BenchError(f"--reference {reference} is the results directory itself; accepted: another results "
                             "root (to report on the reference alone: bench report --results "
                             f"{reference})")
    damaged: list[str] = []
    runs = read_runs(results_dir, damaged)
    if reference is not None:
        runs += read_runs(reference, damaged, source="reference")
    for line in damaged:
        echo(f"damaged (left out of the report): {line}")
    groups = groups_of(runs)
    if not groups:
        hint = "" if reference is not None else (
            "; to see the project's shipped reference records instead: bench report --reference")
        raise BenchError(f"no finished runs under {results_dir / 'runs'} to report on; run `bench run` first "
                         f"(e.g. bench run --preset smoke) or pass --results DIR{hint}")
    tables_dir, fig_dir = out / "tables", out / "figures"
    tables: dict[str, tuple[str, Any]] = {}
    files: list[Path] = []
    for name, (display, numeric) in {
        "table1": table12(groups, "resnet18"),
        "table2": table12(groups, "wrn-34-10"),
        "table3": table3(groups),
        "table4": table4(groups),
        "table5": table5(groups, runs),
    }.items():
        files += write_table(display, numeric, tables_dir, name, TITLES[name])
        tables[name] = (TITLES[name], display)
    tdisp, tnum, taudisp, taunum = tier_table(groups, runs)
    done_tier, all_tier, tier_s, tier_cpu = tier_cost(runs)
    cpu_h = "" if tier_cpu is None else f", {tier_cpu / 3600:.2f} CPU-hours (process time, all threads)"
    tier_title = TITLES["tier"] + (f"; {done_tier} of {all_tier} runs finished, {tier_s / 3600:.2f} h of training "
                                   f"and evaluation so far (wall clock{cpu_h})" if all_tier else "")
    files += write_table(tdisp, tnum, tables_dir, "tier", tier_title)
    files += write_table(taudisp, taunum, tables_dir, "tier_tau", TITLES["tier_tau"])
    if all_tier:  # the page shows the tier only where there are tier runs (the files are always written)
        tables["tier"] = (tier_title, tdisp)
        tables["tier_tau"] = (TITLES["tier_tau"], taudisp)
    st = settings_table(groups)
    files += write_table(st, st, tables_dir, "settings", TITLES["settings"])
    tables["settings"] = (TITLES["settings"], st)
    from . import plots

    figures = plots.draw_all(runs, groups, fig_dir)
    for name in figures:
        files += [fig_dir / f"{name}.png", fig_dir / f"{name}.pdf"]
    files.append(write_index(out, tables, figures, runs, groups))
    done = sum(1 for r in runs if r.done)
    echo(f"report: {plural(len(groups), 'setting')} from {plural(done, 'finished run')} ({len(runs)} in all) → "
         f"{out}/index.html, "
         f"{tables_dir}/, {fig_dir}/")
    return Report(tables, figures, files, len(runs), done)


def plural(k: int, word: str, many: str | None = None) -> str:
    """``1 run``, ``2 runs``: a count with its noun in the right number."""
    return f"{k} {word if k == 1 else (many or word + 's')}"


def device_name(device: str) -> str:
    """A device as its records name it, with the thread count in the right number (``cpu (…, 1 thread)``; records
    say ``1 threads``)."""
    return re.sub(r"\b1 threads\b", "1 thread", str(device))


# columns of the page's tables that wrap (long text); every other cell keeps to one line ("10000 / AA 1000")
WRAPPING = {"notes", "hp", "pretrained", "tier ranking", "paper Table 1 ranking", "≠ method defaults (scaled)",
            "device", "paper device"}
FIGURE_MAX_PX = 1000


def _html_table(name: str, df: Any) -> tuple[str, str]:
    """(the table's HTML, its CSS rule keeping the cells of every column but ``WRAPPING`` on one line)."""
    df = df.rename(columns=device_name)
    df = df.apply(lambda col: col.map(lambda v: device_name(v) if isinstance(v, str) else v))
    keep = [i + 1 for i, c in enumerate(df.columns) if c not in WRAPPING]
    css = ",".join(f"#{name} td:nth-child({i})" for i in keep)
    return df.to_html(index=False, escape=True, border=0), (css + "{white-space:nowrap}" if keep else "")


def write_index(out: Path, tables: dict[str, tuple[str, Any]], figures: dict[str, str], runs: list[Run],
                groups: dict[str, Group]) -> Path:
    """One static page with every table and figure (no scripts, no external resources). Figures are shown at their
    own size up to the page width (at most ``FIGURE_MAX_PX``), each a link to its full-size PNG."""
    from .fsutil import atomic_write_text

    rendered = {name: _html_table(name, df) for name, (_, df) in tables.items() if not df.empty}
    done = sum(1 for r in runs if r.done)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>aft-bench report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:110em}table{border-collapse:collapse;"
             "font-size:0.85em;margin-bottom:1em}th,td{border:1px solid #bbb;padding:2px 6px;text-align:right}"
             "th{background:#eee}td:nth-child(-n+3){text-align:left}.scroll{overflow-x:auto}"
             f"figure{{display:block;margin:1.5em 0}}figure img{{display:block;max-width:min(100%,{FIGURE_MAX_PX}px);"
             "height:auto;border:1px solid #ddd}figcaption{max-width:" + f"{FIGURE_MAX_PX}px;margin-top:0.4em}}"
             + "".join(css for _, css in rendered.values()) + "</style></head><body>",
             "<h1>aft-bench report</h1>",
             f"<p>{plural(len(groups), 'setting')} from {plural(done, 'finished run')}. Ours: mean ± sample "
             "std over seeds, with the number of seeds and the evaluated n; the paper's numbers are from "
             f"{html.escape(_paper().SOURCE)}. “—” marks a missing number, never a zero. † rows of the paper are "
             "PGD-10 numbers of PreAct-ResNet-18 copied from the ATAS paper."
             + (" Settings labelled <code>reference·…</code> are the project's shipped reference records "
                "(results/reference/ of the clone), shown beside your own runs, never merged with them."
                if any(r.source == "reference" for r in runs) else "") + "</p>",
             "<nav><ul>"]
    for name, (title, _) in tables.items():
        parts.append(f'<li><a href="#{name}">{html.escape(title.split(":")[0])}</a></li>')
    for name in figures:
        parts.append(f'<li><a href="#fig-{name}">{html.escape(name)}</a></li>')
    parts.append("</ul></nav>")
    for name, (title, df) in tables.items():
        parts.append(f'<section id="{name}" class="table"><h2>{html.escape(device_name(title))}</h2>')
        parts.append(f'<p>Files: <a href="tables/{name}.md">Markdown</a>, <a href="tables/{name}.csv">CSV</a>, '
                     f'<a href="tables/{name}.tex">LaTeX</a></p>')
        parts.append(f'<div class="scroll">{rendered[name][0]}</div>' if name in rendered else "<p>No rows.</p>")
        parts.append("</section>")
    for name, caption in figures.items():
        parts.append(f'<section id="fig-{name}" class="figure"><figure><a href="figures/{name}.png">'
                     f'<img src="figures/{name}.png" alt="{html.escape(caption)}"></a>'
                     f'<figcaption>{html.escape(caption)} (<a href="figures/{name}.png">full-size PNG</a>, '
                     f'<a href="figures/{name}.pdf">PDF</a>)</figcaption></figure></section>')
    parts.append("</body></html>\n")
    path = out / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path
