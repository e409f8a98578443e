"""The report's figures (matplotlib, Agg): each as PNG and PDF, written atomically; a figure whose data does not
exist yet is skipped (the report lists what it drew).

* ``fig1a_feature_gap``: the feature gap per epoch (AFD Fig. 1a) of every run that logged it, mean over seeds, one
  panel per dataset/architecture (split into several panels of at most ``MAX_CURVES`` curves).
* ``scatter_clean_pgd20``: Clean vs PGD-20 of every setting (filled) and of the paper's rows (hollow, joined to
  ours by a thin line), one panel per dataset/architecture.
* ``time_vs_robustness``: total training time (with the pre-training) vs PGD-20, one panel per device.
* ``fig3_tsne``: t-SNE of PGD-20 features of an AFD model before (g) and after (f₁) disentanglement (AFD Fig. 3),
  from the run's ``tsne.json``.
* ``fig4_afd_hparams``: AFD's Clean and PGD-20 over α, β and γ (AFD Fig. 4), from runs that differ only in one of
  them (the others at their defaults), one row per dataset/architecture.

Readability rules every figure keeps (``tests/test_figures.py`` checks them): one colour and one marker per method,
the same in every figure and panel (``method_style``); series are named in a legend outside the data area, never by
annotations beside the points; a series is named by its method, plus the dataset/architecture/preset where those
differ between the series of one figure, plus the setting label ``[preset·hash]`` (as in the tables and
``settings.md``) only where two settings of one method would otherwise carry one name; every axis says its unit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from .fsutil import atomic_write

# one colour and one marker per registered method, in the report's row order (bench.report.method_order); a method
# without a colour here gets one from FALLBACK, chosen by its name (stable across figures and runs)
METHOD_COLORS = {
    "natural": "#7f7f7f", "pgd-at": "#1f77b4", "trades": "#ff7f0e", "free-at": "#2ca02c", "fgsm-rs": "#9467bd",
    "fgsm-ga": "#8c564b", "atas": "#e377c2", "vaft": "#17becf", "rift": "#bcbd22", "afkd": "#000080",
    "arrest": "#006400", "afd": "#d62728", "afd-literal": "#ff9896", "vaft+d": "#000000", "vaft+a": "#c000c0",
}
FALLBACK = ["#800000", "#808000", "#008080", "#f0a000", "#4b0082", "#a0522d", "#2f4f4f", "#ff1493"]
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "p", "h", "*", "d", "8", "H"]
LINESTYLES = ["-", "--", ":", "-."]
FILLSTYLES = ["full", "left", "bottom", "right", "top"]
MAX_CURVES = 8  # a panel with more curves is split
PANEL_W, PANEL_H = 3.6, 2.9  # inches: two panels and a legend stay under 10 in wide
SAVE_DPI = 150  # a one-panel figure is ~800 px wide; index.html shows figures at their size, at most 1000 px
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": SAVE_DPI, "font.size": 8, "svg.hashsalt": "aft-bench",
                         "pdf.fonttype": 42, "legend.fontsize": 7, "axes.titlesize": 8,
                         "figure.titlesize": 9})
    return plt


def method_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method: fixed per method name, the same in every figure."""
    from .report import method_order

    if method in METHOD_COLORS:
        color = METHOD_COLORS[method]
    else:
        color = FALLBACK[sum(method.encode()) % len(FALLBACK)]
    registered = _registered()
    order = method_order(registered) if registered else []
    idx = order.index(method) if method in order else sum(method.encode())
    return color, MARKERS[idx % len(MARKERS)]


def _registered() -> list[str]:
    try:
        from methods import METHODS

        return METHODS.names()
    except Exception:  # noqa: BLE001 — the figures never depend on the registry importing
        return []


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


def _panels(n: int, plt, w: float = PANEL_W, h: float = PANEL_H, cols: int = 2, **kw):
    cols = max(1, min(n, cols))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, layout="constrained", **kw)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:  # empty cells of the grid: the legend may go there
        a.axis("off")
    fig.spare_cells = flat[n:]
    return fig, flat[:n]


# ---------------------------------------------------------------------------------------------------------------
# naming series


def series_names(groups: list, fixed: tuple[str, ...] = ()) -> tuple[dict[str, str], dict[str, int], bool]:
    """({setting: name}, {setting: variant}, whether a name carries a setting label) for the groups of one figure.

    A name is the method, plus those of dataset/architecture/preset that differ between the figure's groups (and
    are not ``fixed`` by the panel), plus — only where two settings of one method still share a name — the hyper-
    parameters in which they differ (when short) or else the setting label ``[preset·hash]`` of the tables. The
    variant numbers the names of one method (its line style or marker fill)."""
    def cfg(g, k):
        return g.first.config.get(k)

    varying = [k for k in ("dataset", "arch", "preset") if k not in fixed and len({cfg(g, k) for g in groups}) > 1]
    base = {}
    for g in groups:
        parts = [str(cfg(g, k)) for k in varying]
        if g.first.source:  # the shipped reference's settings, beside the user's own
            parts.append(g.first.source)
        base[g.first.setting] = g.first.method + (f" ({'/'.join(parts)})" if parts else "")
    # two settings collide when they share a name within one panel
    by_name: dict[tuple, list] = {}
    for g in groups:
        by_name.setdefault((tuple(cfg(g, k) for k in fixed), base[g.first.setting]), []).append(g)
    names, hashed = dict(base), False
    for (_, name), gs in by_name.items():
        if len({g.first.setting for g in gs}) < 2:
            continue
        hps = [g.first.hp for g in gs]
        keys = sorted(k for k in set().union(*hps) if len({json.dumps(h.get(k), sort_keys=True) for h in hps}) > 1)
        for g in gs:
            diff = ", ".join(f"{k}={g.first.hp.get(k)}" for k in keys)
            if keys and len(diff) <= 28 and len({", ".join(f"{k}={h.get(k)}" for k in keys) for h in hps}) == len(gs):
                names[g.first.setting] = f"{name} ({diff})"
            else:
                names[g.first.setting] = f"{name} [{g.first.label}]"
                hashed = True
    variants: dict[str, int] = {}
    for method in sorted({g.first.method for g in groups}):
        labels = sorted({names[g.first.setting] for g in groups if g.first.method == method})
        for g in groups:
            if g.first.method == method:
                variants[g.first.setting] = labels.index(names[g.first.setting])
    return names, variants, hashed


HASH_NOTE = "[preset·hash]: setting label,\nas in the tables (settings.md)"


def _legend(fig, axes: list, handles: dict[str, Any], title: str | None = None, hashed: bool = False,
            cols: int = 2) -> Any:
    """One legend for the whole figure, outside every panel: in an empty cell of the grid of panels where one is
    left and the legend fits it, else right of the top-right panel (constrained layout keeps it clear of the panels
    and the figure title), the figure widened by the legend's width; in as many columns as its entries need to fit
    one row of panels."""
    if not handles:
        return None
    if hashed:
        title = f"{title}\n{HASH_NOTE}" if title else HASH_NOTE
    title_lines = title.count("\n") + 1 if title else 0
    anchor = axes[min(len(axes), cols) - 1]
    rows = anchor.get_subplotspec().get_gridspec().nrows
    fits = max(4, int(fig.get_figheight() / rows * 72 / (7 * 1.75)) - title_lines - 1)
    ncols = math.ceil(len(handles) / fits)
    longest = max(len(k) for k in handles)
    width = ncols * (0.55 + 0.056 * longest)
    if title:
        width = max(width, 0.3 + 0.056 * max(len(t) for t in title.split("\n")))
    spare = getattr(fig, "spare_cells", [])
    if spare and width <= fig.get_figwidth() / anchor.get_subplotspec().get_gridspec().ncols:
        return spare[0].legend(list(handles.values()), list(handles), title=title, loc="upper left",
                               bbox_to_anchor=(0.0, 1.0), borderaxespad=0.0, frameon=False, ncols=ncols,
                               alignment="left")
    for cell in spare:
        cell.remove()
    fig.set_figwidth(fig.get_figwidth() + width)
    return anchor.legend(list(handles.values()), list(handles), title=title, loc="upper left",
                         bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0, frameon=False, ncols=ncols,
                         alignment="left")


def _point(ax, method: str, x: float, y: float, *, variant: int = 0, paper: bool = False, label: str = ""):
    color, marker = method_style(method)
    kw: dict[str, Any] = {"ls": "none", "marker": marker, "ms": 6, "color": color, "mec": color,
                          "alpha": 0.85}
    if paper:
        kw.update(mfc="none", mew=1.2)
    else:
        kw.update(fillstyle=FILLSTYLES[variant % len(FILLSTYLES)], mfc=color, mfcalt="white", mew=0.8)
    (line,) = ax.plot([x], [y], label=label, **kw)
    line.set_gid(f"method:{method}:{'paper' if paper else 'ours'}")
    return line


def _key_handles(plt) -> dict[str, Any]:
    """The legend's key to the marker fill: ours filled, the paper hollow."""
    from matplotlib.lines import Line2D

    return {"ours (filled; mean over seeds)": Line2D([], [], ls="none", marker="o", color="#444444", ms=6),
            "the paper (hollow)": Line2D([], [], ls="none", marker="o", mfc="none", color="#444444", ms=6)}


# ---------------------------------------------------------------------------------------------------------------
# the figures: each builder returns (Figure, caption) or None; ``draw_all`` saves them


def make_fig1a(groups: dict) -> tuple[Any, str] | None:
    from .report import FIG1A_METHODS, mean_std, method_order

    curves = []  # (group, epochs, means)
    for g in groups.values():
        per_epoch: dict[int, list[float]] = {}
        for r in g.runs:
            for m in r.metrics:
                if m.get("feature_gap") is not None:
                    per_epoch.setdefault(int(m["epoch"]), []).append(float(m["feature_gap"]))
        if len(per_epoch) < 2:
            continue
        epochs = sorted(per_epoch)
        curves.append((g, epochs, [mean_std(per_epoch[e])[0] for e in epochs]))
    if not curves:
        return None
    names, variants, hashed = series_names([c[0] for c in curves], fixed=("dataset", "arch"))
    order = method_order(sorted({c[0].first.method for c in curves}))
    # panels: per dataset/architecture, the paper's Fig. 1a methods first, at most MAX_CURVES curves each
    panels: list[tuple[str, list]] = []
    for key in sorted({(c[0].first.dataset, c[0].first.arch) for c in curves}):
        mine = [c for c in curves if (c[0].first.dataset, c[0].first.arch) == key]
        mine.sort(key=lambda c: (c[0].first.method not in FIG1A_METHODS, order.index(c[0].first.method),
                                 names[c[0].first.setting]))
        size = math.ceil(len(mine) / math.ceil(len(mine) / MAX_CURVES))  # balanced: 18 curves are 6 + 6 + 6
        chunks = [mine[i:i + size] for i in range(0, len(mine), size)]
        for i, chunk in enumerate(chunks):
            part = f" ({i + 1} of {len(chunks)})" if len(chunks) > 1 else ""
            panels.append((f"{key[0]} / {key[1]}{part}", chunk))
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = _panels(len(panels), plt, sharey=True)
    handles: dict[str, Any] = {}
    for ax, (title, chunk) in zip(axes, panels):
        for g, epochs, means in chunk:
            m = g.first.method
            color, marker = method_style(m)
            (line,) = ax.plot(epochs, means, color=color, marker=marker, ms=3,
                              ls=LINESTYLES[variants[g.first.setting] % len(LINESTYLES)],
                              lw=1.7 if m in FIG1A_METHODS else 0.9, label=names[g.first.setting])
            line.set_gid(f"method:{m}:ours")
            handles.setdefault(names[g.first.setting], line)
        ax.set_title(title)
        ax.set_xlabel("epoch (0 = starting model)")
        ax.set_ylabel("feature gap (L∞, feature units)")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25, lw=0.5)
    fig.suptitle("Feature gap per epoch (AFD Fig. 1a)")
    _legend(fig, axes, handles, "method (thick: in the\npaper's Fig. 1a)", hashed)
    return fig, ("Fig. 1a: feature gap per epoch (mean L∞ distance between natural and adversarial features on a "
                 "fixed probe batch; log scale), mean over seeds; AFD: f1 against the pre-trained features, as the "
                 "paper defines it. One colour per method in every figure; thick lines: the methods of the "
                 "paper's Fig. 1a" + ("; [preset·hash]: the setting label of the tables, where one method has "
                                      "several settings" if hashed else ""))


def make_scatter(groups: dict) -> tuple[Any, str] | None:
    from .report import _paper, method_order

    paper = _paper()
    gs = [g for g in groups.values() if g.stat("clean")[0] is not None and g.stat("pgd20")[0] is not None]
    if not gs:
        return None
    names, variants, hashed = series_names(gs, fixed=("dataset", "arch"))
    keys = sorted({(g.first.dataset, g.first.arch) for g in gs})
    plt = _plt()
    fig, axes = _panels(len(keys), plt)
    handles: dict[str, Any] = dict(_key_handles(plt))
    entries: dict[str, tuple[int, str, Any]] = {}
    paper_any = False
    for ax, (ds, arch) in zip(axes, keys):
        mine = [g for g in gs if (g.first.dataset, g.first.arch) == (ds, arch)]
        theirs = {}
        for method in paper.table12_methods(arch):
            row = paper.table12_row(arch, method, ds)
            c, p = paper.metric(row, "clean"), paper.metric(row, "pgd20")
            if c is not None and p is not None:
                theirs[method] = (c, p)
        for g in mine:
            m = g.first.method
            c, p = g.stat("clean")[0], g.stat("pgd20")[0]
            if m in theirs:  # ours joined to the paper's number of the same method
                ax.plot([c, theirs[m][0]], [p, theirs[m][1]], color=method_style(m)[0], lw=0.6, alpha=0.5,
                        zorder=1)
            line = _point(ax, m, c, p, variant=variants[g.first.setting], label=names[g.first.setting])
            entries.setdefault(names[g.first.setting], (0, m, line))
        for m, (c, p) in theirs.items():
            paper_any = True
            line = _point(ax, m, c, p, paper=True, label=f"{m} (paper only)")
            if not any(g.first.method == m for g in mine):
                entries.setdefault(f"{m} (paper only)", (1, m, line))
        ax.set_title(f"{ds} / {arch}")
        ax.set_xlabel("Clean accuracy (%)")
        ax.set_ylabel("PGD-20 accuracy (%)")
        ax.grid(alpha=0.25, lw=0.5)
    order = method_order(sorted({m for _, m, _ in entries.values()}))
    if not paper_any:
        handles = {}
    for name, (_, m, line) in sorted(entries.items(), key=lambda kv: (kv[1][0], order.index(kv[1][1]), kv[0])):
        handles[name] = line
    fig.suptitle("Clean vs PGD-20 accuracy, ours and the paper's (AFD Tables 1, 2)" if paper_any else
                 "Clean vs PGD-20 accuracy (mean over seeds)")
    _legend(fig, axes, handles, "method", hashed)
    return fig, ("Clean vs PGD-20 accuracy of every setting (filled markers, mean over seeds) beside the paper's "
                 "numbers (hollow markers of the same colour, joined to ours by a thin line); one colour and "
                 "marker per method in every figure" + ("; [preset·hash]: the setting label of the tables" if
                                                         hashed else ""))


def _time_unit(seconds: list[float]) -> tuple[float, str]:
    top = max(seconds)
    if top >= 2 * 3600:
        return 3600.0, "h"
    if top >= 120:
        return 60.0, "min"
    return 1.0, "s"


def make_time_vs_robustness(groups: dict, runs: list) -> tuple[Any, str] | None:
    from .report import _total_seconds, device_name, mean_std, method_order

    by_name = {r.name: r for r in runs}
    pts: dict[str, list[tuple[Any, float, float]]] = {}
    for g in groups.values():
        p = g.stat("pgd20")[0]
        if p is None:
            continue
        for dev in sorted({r.device for r in g.runs}):
            t, _ = mean_std([t for t in (_total_seconds(r, by_name, dev) for r in g.runs) if t is not None])
            if t is not None:
                pts.setdefault(dev, []).append((g, t, p))
    if not pts:
        return None
    gs = list({g.first.setting: g for items in pts.values() for g, _, _ in items}.values())
    names, variants, hashed = series_names(gs)
    order = method_order(sorted({g.first.method for g in gs}))
    plt = _plt()
    fig, axes = _panels(len(pts), plt)
    handles: dict[str, Any] = {}
    for ax, (dev, items) in zip(axes, sorted(pts.items())):
        scale, unit = _time_unit([t for _, t, _ in items])
        for g, t, p in sorted(items, key=lambda i: (order.index(i[0].first.method), names[i[0].first.setting])):
            line = _point(ax, g.first.method, t / scale, p, variant=variants[g.first.setting],
                          label=names[g.first.setting])
            handles.setdefault(names[g.first.setting], line)
        ts = [t / scale for _, t, _ in items]
        if max(ts) / max(min(ts), 1e-9) > 20:
            ax.set_xscale("log")
        ax.set_title(device_name(dev))
        ax.set_xlabel(f"total training time ({unit}, with pre-training)")
        ax.set_ylabel("PGD-20 accuracy (%)")
        ax.grid(alpha=0.25, lw=0.5)
    fig.suptitle("Training time vs robustness (one panel per device)")
    ordered = dict(sorted(handles.items(), key=lambda kv: (order.index(kv[1].get_gid().split(":")[1]), kv[0])))
    _legend(fig, axes, ordered, "method", hashed)
    return fig, ("Total training time (including the shared pre-training) vs PGD-20 accuracy, one panel per device; "
                 "one colour and marker per method in every figure" +
                 ("; [preset·hash]: the setting label of the tables" if hashed else ""))


def make_tsne(runs: list) -> tuple[Any, str] | None:
    found = [(r, r.tsne) for r in runs if r.method == "afd" and r.tsne]
    if not found:
        return None
    run, data = sorted(found, key=lambda t: (bool(t[0].source), t[0].name))[0]  # the user's own run first
    plt = _plt()
    fig, axes = _panels(2, plt, w=3.4, h=3.4)
    labels = [int(v) for v in data["labels"]]
    classes = sorted(set(labels))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "viridis")
    names = CIFAR10_CLASSES if run.dataset == "cifar10" else None
    handles: dict[str, Any] = {}
    for ax, key, title in zip(axes, ("g", "f1"), ("before disentanglement (g)", "after disentanglement (f1)")):
        xy = data[key]
        if len(classes) <= 10:
            for k in classes:
                sel = [p for p, lab in zip(xy, labels) if lab == k]
                sc = ax.scatter([p[0] for p in sel], [p[1] for p in sel], color=cmap(k % 10), s=4, lw=0)
                handles.setdefault(names[k] if names and k < len(names) else f"class {k}", sc)
        else:
            sc = ax.scatter([p[0] for p in xy], [p[1] for p in xy], c=labels, cmap=cmap, s=4, lw=0)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1 (arbitrary units)")
        ax.set_ylabel("t-SNE 2 (arbitrary units)")
    if len(classes) > 10:
        fig.colorbar(sc, ax=axes, label="class")
    else:
        leg = _legend(fig, axes, handles, "class")
        for h in leg.legend_handles:
            h.set_sizes([20])
    seed = run.config.get("seed")
    fig.suptitle(f"t-SNE of PGD-20 features (AFD Fig. 3): AFD, {run.dataset} / {run.arch}, seed {seed}, "
                 f"n = {len(labels)}")
    return fig, (f"Fig. 3: t-SNE of PGD-20 adversarial features of {run.name} before (g) and after (f1) "
                 "disentanglement")


AFD_DEFAULTS = {"alpha": 0.05, "beta": 0.25, "gamma": 25.0}
_GREEK = {"alpha": "α", "beta": "β", "gamma": "γ"}


def make_afd_grid(groups: dict) -> tuple[Any, str] | None:
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
    bases = sorted({b for c in usable.values() for b in c})
    plt = _plt()
    fig, axes = _panels(3 * len(bases), plt, w=2.9, h=2.5, cols=3)
    color, _ = method_style("afd")
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    handles = {"Clean": Line2D([], [], color=color, marker="o", ms=3),
               "PGD-20": Line2D([], [], color=color, marker="s", ms=3, ls="--")}
    for i, base in enumerate(bases):
        for ax, k in zip(axes[3 * i:3 * i + 3], ("alpha", "beta", "gamma")):
            where = f"{base[0]} / {base[1]}" + (f" (base {bases.index(base) + 1})" if
                                                 sum(b[:2] == base[:2] for b in bases) > 1 else "")
            ax.set_title(f"{where}: {_GREEK[k]} (others at defaults)")
            ax.set_xlabel(f"{_GREEK[k]} (loss weight, no unit; log scale)")
            ax.set_ylabel("accuracy (%)")
            pts = usable.get(k, {}).get(base)
            if pts:
                xs = [x for x, _, _ in pts]
                for j, (name, mk, ls) in enumerate((("Clean", "o", "-"), ("PGD-20", "s", "--"))):
                    (line,) = ax.plot(xs, [t[1 + j] for t in pts], color=color, marker=mk, ms=3, ls=ls, label=name)
                    line.set_gid("method:afd:ours")
                ax.set_xscale("log")
                ax.set_xticks(xs, [f"{x:g}" for x in xs])
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.axvline(AFD_DEFAULTS[k], color="#999999", lw=0.6, ls=":")
            else:
                ax.text(0.5, 0.5, "no grid runs yet", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            ax.grid(alpha=0.25, lw=0.5)
    fig.suptitle("AFD over its hyper-parameters (AFD Fig. 4; dotted: the default)")
    _legend(fig, axes, handles, "accuracy", cols=3)
    return fig, "Fig. 4: AFD's Clean and PGD-20 accuracy over α, β and γ (the others at 0.05, 0.25, 25)"


def builders(runs: list, groups: dict) -> dict[str, Callable[[], tuple[Any, str] | None]]:
    """{file stem: builder} of every figure, in the order the report shows them."""
    return {"fig1a_feature_gap": lambda: make_fig1a(groups),
            "scatter_clean_pgd20": lambda: make_scatter(groups),
            "time_vs_robustness": lambda: make_time_vs_robustness(groups, runs),
            "fig3_tsne": lambda: make_tsne(runs),
            "fig4_afd_hparams": lambda: make_afd_grid(groups)}


def draw_all(runs: list, groups: dict, out: Path) -> dict[str, str]:
    """Draw every figure whose data exists; returns {file stem: caption}."""
    drawn: dict[str, str] = {}
    for stem, make in builders(runs, groups).items():
        made = make()
        if made:
            fig, caption = made
            save(fig, out / stem)
            drawn[stem] = caption
    return drawn
