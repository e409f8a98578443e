"""The report's figures are readable (issue 20): over records of many methods (more than one panel's worth, close
accuracies, two settings of one method), drawn with the Agg renderer, no two text labels overlap, no legend covers
a panel's data area, every axis is labelled, one method has one colour in every figure and panel (and two methods
never share one), and index.html shows the figures large, keeps the "n" cells on one line and counts in the right
number."""
import json
import re

import pytest

from bench import plots
from bench.report import build, groups_of, method_order, read_runs
from methods import METHODS as REGISTRY
from test_report import _hp, write_run

METHODS = method_order(REGISTRY.names())  # every registered method, natural first
ONE_THREAD = "cpu (test CPU, 1 threads)"


def many_records(root):
    """Every method on CIFAR-10/ResNet-18 within a point of each other (the paper's rows lie there too), vAFT in two
    settings (by lr), PGD-AT in two (by its starting model, which no short name tells apart), AFD's γ grid, a t-SNE of AFD, all timed on a one-thread CPU."""
    nat = write_run(root, "natural", 0, accs={"clean": 92.0, "pgd20": 0.0, "aa": 0.0}, seconds=(5.0, 5.0),
                    device=ONE_THREAD, name="cifar10_resnet18_natural_s0_0000000000")
    for i, m in enumerate(METHODS[1:]):
        name = write_run(root, m, 0, accs={"clean": 84.0 + 0.1 * i, "pgd20": 51.0 + 0.1 * i, "aa": 46.0},
                         pretrained=nat, seconds=(20.0 + i, 20.0 + i), device=ONE_THREAD,
                         gaps=[0.5, 0.4 + 0.01 * i, 0.3 + 0.01 * i])
        if m == "afd":
            xy = [[float(k), float(k % 3)] for k in range(20)]
            (root / "runs" / name / "tsne.json").write_text(json.dumps(
                {"method": "afd", "n": 20, "labels": [k % 10 for k in range(20)], "g": xy, "f1": xy}))
    write_run(root, "vaft", 0, hp=_hp("vaft", lr=0.0025), accs={"clean": 84.2, "pgd20": 51.1}, pretrained=nat,
              device=ONE_THREAD)
    write_run(root, "pgd-at", 1, accs={"clean": 83.0, "pgd20": 50.5}, device=ONE_THREAD)  # from scratch
    for gamma, c in ((5.0, 85.0), (50.0, 83.0)):
        write_run(root, "afd", 0, hp=_hp("afd", gamma=gamma), accs={"clean": c, "pgd20": 50.0}, pretrained=nat,
                  device=ONE_THREAD)


@pytest.fixture
def figures(tmp_path, monkeypatch):
    """{file stem: matplotlib Figure} of every figure the report draws over ``many_records``."""
    many_records(tmp_path)
    runs = read_runs(tmp_path)
    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, stem: drawn.__setitem__(stem.name, fig))
    plots.draw_all(runs, groups_of(runs), tmp_path / "figures")
    yield drawn
    import matplotlib.pyplot as plt

    plt.close("all")


def _overlap(a, b, tol=0.5):
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def _labels(fig, renderer):
    """(description, window bbox) of every visible non-empty text of the figure except tick labels and the texts
    inside a legend (a legend is one box)."""
    texts = list(fig.texts) + ([fig._suptitle] if fig._suptitle is not None else [])
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
    texts = list({id(t): t for t in texts}.values())
    out = [(f"text {t.get_text()!r}", t.get_window_extent(renderer)) for t in texts
           if t.get_visible() and t.get_text().strip()]
    return out + [(f"legend {i}", leg.get_window_extent(renderer)) for i, leg in enumerate(_legends(fig))]


def _legends(fig):
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def _data_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and not hasattr(ax, "_colorbar")]


def test_every_figure_is_drawn_from_many_methods(figures):
    assert set(figures) == {"fig1a_feature_gap", "scatter_clean_pgd20", "time_vs_robustness", "fig3_tsne",
                            "fig4_afd_hparams"}


def test_no_two_labels_overlap_and_no_legend_covers_data(figures):
    bad = []
    for stem, fig in figures.items():
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        boxes = _labels(fig, r)
        for i, (da, a) in enumerate(boxes):
            for db, b in boxes[i + 1:]:
                if _overlap(a, b):
                    bad.append(f"{stem}: {da} overlaps {db}")
        for ax in fig.axes:  # tick labels: only those of one axis can meet
            for axis in (ax.xaxis, ax.yaxis):
                ticks = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text().strip()]
                for i, a in enumerate(ticks):
                    for b in ticks[i + 1:]:
                        if _overlap(a.get_window_extent(r), b.get_window_extent(r)):
                            bad.append(f"{stem}: tick labels {a.get_text()!r} and {b.get_text()!r} overlap")
        for leg in _legends(fig):
            for ax in fig.axes:
                if not ax.axison:  # an empty cell of the grid holds no data
                    continue
                if _overlap(leg.get_window_extent(r), ax.get_window_extent(r)):
                    bad.append(f"{stem}: a legend overlaps the data area of {ax.get_title()!r}")
    assert not bad, "\n".join(bad)


def test_every_axis_has_a_label_with_its_unit_and_panels_hold_few_curves(figures):
    for stem, fig in figures.items():
        for ax in _data_axes(fig):
            assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), (stem, ax.get_title())
            assert "(" in ax.get_xlabel() and "(" in ax.get_ylabel(), (stem, ax.get_xlabel(), ax.get_ylabel())
            if stem == "fig1a_feature_gap":
                assert len(ax.get_lines()) <= plots.MAX_CURVES
        # the page shows a figure at its size, at most 1000 px wide: its smallest text (7 pt) stays 9 px or more
        px = 7 / 72 * plots.SAVE_DPI * min(1.0, 1000 / (fig.get_figwidth() * plots.SAVE_DPI))
        assert px >= 9, (stem, fig.get_figwidth(), px)


def _method_colors(figures):
    from matplotlib.colors import to_hex

    seen: dict[str, set] = {}
    per_fig: dict[str, set] = {}
    for stem, fig in figures.items():
        for ax in fig.axes:
            for art in [*ax.get_lines(), *ax.collections]:
                gid = art.get_gid() or ""
                if not gid.startswith("method:"):
                    continue
                m = gid.split(":")[1]
                if hasattr(art, "get_markeredgecolor"):
                    c = art.get_markeredgecolor() if gid.endswith(":paper") else art.get_color()
                else:
                    c = art.get_facecolor()[0] if gid.endswith(":ours") else art.get_edgecolor()[0]
                seen.setdefault(m, set()).add(to_hex(c))
                per_fig.setdefault(stem, set()).add(m)
    return seen, per_fig


def test_one_colour_per_method_in_every_figure_and_panel(figures):
    seen, per_fig = _method_colors(figures)
    for stem in ("fig1a_feature_gap", "scatter_clean_pgd20", "time_vs_robustness"):
        assert set(METHODS) <= per_fig.get(stem, set()), f"{stem}: series not tagged with their method"
    assert all(len(c) == 1 for c in seen.values()), seen
    colours = [next(iter(c)) for c in seen.values()]
    assert len(set(colours)) == len(colours), seen
    for m in plots.METHOD_COLORS:  # every registered method has its own colour
        assert plots.method_style(m)[0] == plots.METHOD_COLORS[m]


def test_names_are_method_and_setting_with_the_hash_only_for_two_settings_of_one_method(figures):
    legends = [leg for fig in figures.values() for leg in _legends(fig)]
    names = {t.get_text() for leg in legends for t in leg.get_texts()}
    assert {"natural", "trades", "arrest", "afd (gamma=25.0)", "afd (gamma=5.0)"} <= names, names
    assert {"vaft (lr=0.0025)", "vaft (lr=0.025)"} <= names, names  # two settings told apart by what differs
    hashed = {n for n in names if re.search(r"\[[a-z0-9-]+·[0-9a-f]{6}\]", n)}
    assert hashed and {n.split(" [")[0] for n in hashed} == {"pgd-at"}, names  # only where nothing else tells
    for leg in legends:  # and explained where it is used
        if any(t.get_text() in hashed for t in leg.get_texts()):
            assert "setting label" in leg.get_title().get_text()


def test_index_html_shows_figures_large_nowrap_n_and_singular_thread(tmp_path):
    many_records(tmp_path)
    build(tmp_path, echo=lambda s: None)
    page = (tmp_path / "index.html").read_text()
    assert "1 threads" not in page and "1 thread)" in page
    assert re.search(r"max-width:min\(100%,\s*1000px\)", page)
    for stem in ("fig1a_feature_gap", "scatter_clean_pgd20"):
        assert f'<a href="figures/{stem}.png"><img src="figures/{stem}.png"' in page
    # the "n" column of Table 1 keeps its cells on one line
    head = re.search(r'<section id="table1".*?<thead>(.*?)</thead>', page, re.S).group(1)
    cols = re.findall(r"<th>(.*?)</th>", head)
    assert f"#table1 td:nth-child({cols.index('n') + 1})" in page.split("</style>")[0]
    assert "white-space:nowrap" in page
