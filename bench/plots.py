"""The report's figures (matplotlib, Agg): each as PNG and PDF, written atomically; a figure whose data does not
exist yet is skipped (the report lists what it drew).

* ``fig1a_feature_gap``: the feature gap per epoch (AFD Fig. 1a) of every run that logged it, mean over seeds, one
  panel per dataset/architecture.
* ``scatter_clean_pgd20``: Clean vs PGD-20 of every setting (filled) and of the paper's rows (hollow), one panel per
  dataset/architecture.
* ``time_vs_robustness``: total training time (with the pre-training) vs PGD-20, one panel per device.
* ``fig3_tsne``: t-SNE of PGD-20 features of an AFD model before (g) and after (f₁) disentanglement (AFD Fig. 3),
  from the run's ``tsne.json``.
* ``fig4_afd_hparams``: AFD's Clean and PGD-20 over α, β and γ (AFD Fig. 4), from runs that differ only in one of
  them (the others at their defaults).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .fsutil import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 120, "font.size": 8, "svg.hashsalt": "aft-bench",
                         "pdf.fonttype": 42})
    return plt


def save(fig: Any, path_stem: Path) -> None:
    """PNG and PDF, each written to a temporary name and renamed (no timestamps in the PDF, so reruns diff)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path_stem.with_suffix(".png"), lambda f: fig.savefig(f, format="png", bbox_inches="tight",
                                                                      metadata={"Software": None}))
    atomic_write(path_stem.with_suffix(".pdf"), lambda f: fig.savefig(f, format="pdf", bbox_inches="tight",
                                                                      metadata={"CreationDate": None,
                                                                                "ModDate": None, "Producer": None,
                                                                                "Creator": None}))
    import matplotlib.pyplot as plt

    plt.close(fig)


def _panels(n: int, plt, w: float = 4.2, h: float = 3.2):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat[:n]


def fig1a(groups: dict, out: Path) -> str | None:
    from .report import FIG1A_METHODS, method_order, mean_std

    series: dict[tuple[str, str], list[tuple[str, list[int], list[float]]]] = {}
    for g in groups.values():
        per_epoch: dict[int, list[float]] = {}
        for r in g.runs:
            for m in r.metrics:
                if m.get("feature_gap") is not None:
                    per_epoch.setdefault(int(m["epoch"]), []).append(float(m["feature_gap"]))
        if len(per_epoch) < 2:
            continue
        epochs = sorted(per_epoch)
        means = [mean_std(per_epoch[e])[0] for e in epochs]
        series.setdefault((g.first.dataset, g.first.arch), []).append(
            (f"{g.first.method} [{g.first.label}]", epochs, means))
    if not series:
        return None
    plt = _plt()
    fig, axes = _panels(len(series), plt)
    for ax, ((ds, arch), lines) in zip(axes, sorted(series.items())):
        order = method_order([name.split(" [")[0] for name, _, _ in lines])
        lines.sort(key=lambda t: (order.index(t[0].split(" [")[0]), t[0]))
        for name, epochs, means in lines:
            bold = name.split(" [")[0] in FIG1A_METHODS
            ax.plot(epochs, means, marker="o", ms=2.5, lw=1.6 if bold else 0.8, label=name)
        ax.set_title(f"{ds} / {arch}")
        ax.set_xlabel("epoch (0 = starting model)")
        ax.set_ylabel("feature gap (mean L∞, probe batch)")
        ax.set_yscale("log")
        ax.legend(fontsize=5.5, ncol=1)
    fig.suptitle("Feature gap per epoch (AFD Fig. 1a)")
    save(fig, out / "fig1a_feature_gap")
    return ("Fig. 1a: feature gap per epoch (mean L∞ distance between natural and adversarial features on a fixed "
            "probe batch), mean over seeds; AFD: f1 against the pre-trained features, as the paper defines it")


def scatter(groups: dict, out: Path) -> str | None:
    from .report import _paper

    paper = _paper()

    pts: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for g in groups.values():
        c, p = g.stat("clean")[0], g.stat("pgd20")[0]
        if c is not None and p is not None:
            pts.setdefault((g.first.dataset, g.first.arch), []).append((g.first.method, c, p))
    if not pts:
        return None
    plt = _plt()
    fig, axes = _panels(len(pts), plt)
    for ax, ((ds, arch), items) in zip(axes, sorted(pts.items())):
        for method, c, p in sorted(items):
            ax.scatter([c], [p], s=18)
            ax.annotate(method, (c, p), fontsize=5.5, xytext=(2, 2), textcoords="offset points")
        for method in paper.table12_methods(arch):
            row = paper.table12_row(arch, method, ds)
            if row is None:
                continue
            c, p = paper.metric(row, "clean"), paper.metric(row, "pgd20")
            if c is None or p is None:
                continue
            ax.scatter([c], [p], s=18, facecolors="none", edgecolors="grey")
            ax.annotate(f"{method} (paper)", (c, p), fontsize=5, color="grey", xytext=(2, -6),
                        textcoords="offset points")
        ax.set_title(f"{ds} / {arch}")
        ax.set_xlabel("Clean accuracy (%)")
        ax.set_ylabel("PGD-20 accuracy (%)")
    fig.suptitle("Clean vs PGD-20 (filled: ours, mean over seeds; hollow: the paper)")
    save(fig, out / "scatter_clean_pgd20")
    return "Clean vs PGD-20 accuracy of every setting (filled) beside the paper's numbers (hollow)"


def time_vs_robustness(groups: dict, runs: list, out: Path) -> str | None:
    from .report import _total_seconds, mean_std

    by_name = {r.name: r for r in runs}
    pts: dict[str, list[tuple[str, float, float]]] = {}
    for g in groups.values():
        p = g.stat("pgd20")[0]
        if p is None:
            continue
        for dev in sorted({r.device for r in g.runs}):
            tot = [t for t in (_total_seconds(r, by_name, dev) for r in g.runs) if t is not None]
            t, _ = mean_std(tot)
            if t is not None:
                pts.setdefault(dev, []).append((f"{g.first.method} ({g.first.dataset})", t, p))
    if not pts:
        return None
    plt = _plt()
    fig, axes = _panels(len(pts), plt)
    for ax, (dev, items) in zip(axes, sorted(pts.items())):
        for name, t, p in sorted(items):
            ax.scatter([t], [p], s=18)
            ax.annotate(name, (t, p), fontsize=5.5, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(dev, fontsize=7)
        ax.set_xlabel("total training time (s, with pre-training)")
        ax.set_ylabel("PGD-20 accuracy (%)")
    fig.suptitle("Training time vs robustness (one panel per device)")
    save(fig, out / "time_vs_robustness")
    return "Total training time (including the shared pre-training) vs PGD-20 accuracy, one panel per device"


def tsne(runs: list, out: Path) -> str | None:
    found = [(r, json.loads((r.dir.path / "tsne.json").read_text())) for r in runs
             if r.method == "afd" and (r.dir.path / "tsne.json").is_file()]
    if not found:
        return None
    run, data = sorted(found, key=lambda t: t[0].name)[0]
    plt = _plt()
    fig, axes = _panels(2, plt, w=4.0, h=4.0)
    labels = data["labels"]
    for ax, key, title in zip(axes, ("g", "f1"), ("before disentanglement (g)", "after disentanglement (f1)")):
        xy = data[key]
        sc = ax.scatter([p[0] for p in xy], [p[1] for p in xy], c=labels, cmap="tab10", s=4)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes, label="class")
    fig.suptitle(f"t-SNE of PGD-20 features, {run.name} (AFD Fig. 3), n = {len(labels)}")
    save(fig, out / "fig3_tsne")
    return f"Fig. 3: t-SNE of PGD-20 adversarial features of {run.name} before (g) and after (f1) disentanglement"


AFD_DEFAULTS = {"alpha": 0.05, "beta": 0.25, "gamma": 25.0}


def afd_grid(groups: dict, out: Path) -> str | None:
    """AFD Fig. 4: the settings of AFD that differ from a common base only in one of α, β, γ."""
    curves: dict[str, dict[tuple[str, str, str], list[tuple[float, float | None, float | None]]]] = {}
    for g in groups.values():
        if g.first.method != "afd":
            continue
        hp = g.first.hp
        rest = {k: v for k, v in hp.items() if k not in AFD_DEFAULTS}
        base = (g.first.dataset, g.first.arch, json.dumps(rest, sort_keys=True))
        off = [k for k, d in AFD_DEFAULTS.items() if float(hp.get(k, d)) != d]
        if len(off) > 1:
            continue
        keys = off or list(AFD_DEFAULTS)  # the all-default run is a point of every curve
        for k in keys:
            curves.setdefault(k, {}).setdefault(base, []).append(
                (float(hp.get(k, AFD_DEFAULTS[k])), g.stat("clean")[0], g.stat("pgd20")[0]))
    usable = {k: {b: sorted(v) for b, v in c.items() if len({x for x, _, _ in v}) >= 2} for k, c in curves.items()}
    usable = {k: c for k, c in usable.items() if c}
    if not usable:
        return None
    plt = _plt()
    fig, axes = _panels(3, plt)
    for ax, k in zip(axes, ("alpha", "beta", "gamma")):
        ax.set_title({"alpha": "α", "beta": "β", "gamma": "γ"}[k] + " (others at their defaults)")
        ax.set_xlabel(k)
        ax.set_ylabel("accuracy (%)")
        for (ds, arch, _), pts in sorted(usable.get(k, {}).items()):
            xs = [x for x, _, _ in pts]
            ax.plot(xs, [c for _, c, _ in pts], marker="o", ms=3, label=f"Clean {ds}/{arch}")
            ax.plot(xs, [p for _, _, p in pts], marker="s", ms=3, ls="--", label=f"PGD-20 {ds}/{arch}")
        if usable.get(k):
            ax.legend(fontsize=5.5)
        else:
            ax.text(0.5, 0.5, "no grid runs yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("AFD over its hyper-parameters (AFD Fig. 4)")
    save(fig, out / "fig4_afd_hparams")
    return "Fig. 4: AFD's Clean and PGD-20 accuracy over α, β and γ (the others at 0.05, 0.25, 25)"


def draw_all(runs: list, groups: dict, out: Path) -> dict[str, str]:
    """Draw every figure whose data exists; returns {file stem: caption}."""
    drawn: dict[str, str] = {}
    for stem, make in (("fig1a_feature_gap", lambda: fig1a(groups, out)),
                       ("scatter_clean_pgd20", lambda: scatter(groups, out)),
                       ("time_vs_robustness", lambda: time_vs_robustness(groups, runs, out)),
                       ("fig3_tsne", lambda: tsne(runs, out)),
                       ("fig4_afd_hparams", lambda: afd_grid(groups, out))):
        caption = make()
        if caption:
            drawn[stem] = caption
    return drawn
