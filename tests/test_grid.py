"""Grids of runs: ``--set key=a,b,c`` expands a request into one ordinary run per grid point (× seeds × methods),
each recording the grid it belongs to; malformed grids are one-line errors; the report draws AFD's Fig. 4 from
whatever part of an α/β/γ grid exists."""
import json

import pytest

from bench.config import MAX_GRID, Grid, expand_grid, parse_sets
from bench.errors import BenchError
from bench.runner import plan
from helpers import run_request, small_request


def test_a_bare_comma_list_is_a_grid_axis_brackets_and_quotes_are_not():
    (m, k, v), = parse_sets(["afd.gamma=5,25,50"])
    assert (m, k, v) == ("afd", "gamma", Grid((5, 25, 50)))
    assert parse_sets(["lr=0.1, 8/255"])[0][2] == Grid((0.1, 8 / 255))
    assert parse_sets(["schedule.milestones=[75, 90]"])[0][2] == [75, 90]
    assert parse_sets(['tag="a,b"'])[0][2] == "a,b"
    assert parse_sets(["gamma=5"])[0][2] == 5


@pytest.mark.parametrize("item,message", [
    ("afd.gamma=5,,50", r"malformed grid in --set 'afd.gamma=5,,50': an empty value; accepted: comma-separated"),
    ("afd.gamma=5,25,", r"malformed grid in --set 'afd.gamma=5,25,': an empty value"),
    ("afd.gamma=5,5", r"malformed grid in --set 'afd.gamma=5,5': '5' appears twice; accepted: distinct values"),
])
def test_malformed_grids_are_one_line_errors(item, message):
    with pytest.raises(BenchError, match=message):
        parse_sets([item])


def test_grid_points_are_the_cartesian_product_in_the_given_order():
    sets = parse_sets(["afd.alpha=0.01,0.1", "afd.gamma=5,25,50", "afd.beta=0.25"])
    points = expand_grid(sets)
    assert [p for _, p in points] == [{"afd.alpha": a, "afd.gamma": g} for a in (0.01, 0.1) for g in (5, 25, 50)]
    assert all(s[2][2] == 0.25 and not any(isinstance(v, Grid) for _, _, v in s) for s, _ in points)
    too_big = parse_sets([f"afd.alpha={','.join(str(i) for i in range(MAX_GRID))}", "afd.gamma=1,2"])
    with pytest.raises(BenchError, match=rf"has {2 * MAX_GRID} points; accepted: at most {MAX_GRID}"):
        expand_grid(too_big)


def test_a_grid_request_plans_one_run_per_point_and_seed_sharing_the_starting_model(tmp_path):
    planned = plan(small_request(tmp_path, methods=["afd"], seeds="0,1", sets=["afd.gamma=5,25"]))
    assert [(p.cfg.seed, p.cfg.hp["gamma"]) for p in planned] == [(0, 5), (1, 5), (0, 25), (1, 25)]
    assert len({p.cfg.run_hash for p in planned}) == 4
    assert {p.base.run_name for p in planned if p.cfg.seed == 0} == {planned[0].base.run_name}  # one natural model
    grids = [p.grid for p in planned]
    assert len({g["id"] for g in grids}) == 1 and grids[0]["axes"] == {"afd.gamma": [5, 25]}
    assert [g["point"] for g in grids] == [{"afd.gamma": 5}] * 2 + [{"afd.gamma": 25}] * 2
    assert plan(small_request(tmp_path, methods=["afd"]))[0].grid is None


def test_a_bad_value_inside_a_grid_is_caught_before_anything_runs(tmp_path):
    with pytest.raises(BenchError, match=r"afd.gamma = 'x'; accepted: a finite number"):
        plan(small_request(tmp_path, methods=["afd"], sets=["afd.gamma=5,x"]))
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_grid_runs_record_their_grid_and_a_rerun_skips_them(tmp_path):
    req = small_request(tmp_path, methods=["natural"], epochs=1, subset=5, sets=["natural.lr=0.1,0.05"])
    runs = run_request(req)
    assert len(runs) == 2
    grids = [json.loads((r.path / "grids.json").read_text()) for r in runs]
    assert [g[0]["point"] for g in grids] == [{"natural.lr": 0.1}, {"natural.lr": 0.05}]
    assert grids[0][0]["id"] == grids[1][0]["id"]
    said = []
    run_request(req, echo=said.append)
    assert sum("already done" in s for s in said) == 2
    assert [json.loads((r.path / "grids.json").read_text()) for r in runs] == grids  # not recorded twice
    # the same run in a second grid: both memberships kept
    run_request(small_request(tmp_path, methods=["natural"], epochs=1, subset=5, sets=["natural.lr=0.1,0.2"]),
                echo=said.append)
    assert len(json.loads((runs[0].path / "grids.json").read_text())) == 2


def test_the_report_draws_fig4_from_the_part_of_an_afd_grid_that_exists(tmp_path):
    from bench.report import build
    from test_report import _hp, write_run

    for gamma, (c, p) in {5.0: (86.0, 48.0), 25.0: (85.0, 52.0), 50.0: (83.0, 53.0)}.items():
        write_run(tmp_path, "afd", 0, hp=_hp("afd", gamma=gamma), accs={"clean": c, "pgd20": p})
    write_run(tmp_path, "afd", 0, hp=_hp("afd", alpha=0.1), accs={"clean": 84.0, "pgd20": 51.0})
    rep = build(tmp_path, echo=lambda s: None)
    assert "fig4_afd_hparams" in rep.figures
    assert (tmp_path / "figures" / "fig4_afd_hparams.png").stat().st_size > 1000


def test_an_integer_for_a_float_hyper_parameter_is_the_same_run(tmp_path):
    default = plan(small_request(tmp_path, methods=["afd"]))[0].cfg
    given = plan(small_request(tmp_path, methods=["afd"], sets=["afd.gamma=25"]))[0].cfg
    assert given.hp["gamma"] == 25.0 and isinstance(given.hp["gamma"], float)
    assert given.run_hash == default.run_hash
    grid = plan(small_request(tmp_path, methods=["afd"], sets=["afd.gamma=5,25"]))
    assert grid[1].cfg.run_hash == default.run_hash
