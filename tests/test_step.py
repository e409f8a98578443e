"""The step context (bench.step): on one process every operation is the one-process operation itself; methods reach
the context only through it (tests/test_ddp.py checks that it makes N processes the one-process step)."""
import ast
from pathlib import Path

import pytest
import torch

from bench.dist import Dist, even_shard
from bench.step import ONE, StepContext, current

ROOT = Path(__file__).resolve().parents[1]


def test_one_process_operations_are_the_plain_ones():
    t = torch.randn(5, 3)
    loss = t.sum()
    for ctx in (ONE, StepContext(Dist(), even_shard(5, 0, 1))):
        assert ctx.seed(loss) is loss and ctx.gather(t) is t and ctx.sum(t) is t and ctx.mean(t) is t
        assert ctx.share == 1.0 and ctx.total(5) == 5 and ctx.rows(5) == slice(0, 5)
        assert ctx.local(t) is t if ctx.shard is None else torch.equal(ctx.local(t), t)
        torch.manual_seed(0)
        drawn = ctx.draw(lambda m: torch.rand(m, 2), 5)
        torch.manual_seed(0)
        assert torch.equal(drawn, torch.rand(5, 2))
        buf = torch.zeros(8, 3)
        ctx.scatter_(buf, torch.tensor([7, 1, 2, 3, 4]), t)
        assert torch.equal(buf[[7, 1, 2, 3, 4]], t) and not buf[[0, 5, 6]].any()


def test_param_grads_are_autograd_grads_with_the_unused_as_none():
    w, v = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    a, b = (w * 2).sum(), (w * v).sum()
    (ga,), (gw, gv) = ONE.param_grads((a, [w]), (b, [w, v]))
    assert torch.equal(ga, torch.full((3,), 2.0)) and torch.equal(gw, v) and torch.equal(gv, w)
    ((none,),) = ONE.param_grads(((w * 3).sum(), [v]))
    assert none is None


def test_a_shard_draws_its_rows_of_the_global_batch_and_seeds_by_its_share():
    s = even_shard(7, 1, 2)
    ctx = StepContext(Dist(1, 2), s)
    torch.manual_seed(3)
    full = torch.rand(7, 2)
    torch.manual_seed(3)
    assert torch.equal(ctx.draw(lambda m: torch.rand(m, 2), s.size), full[s.rows])
    assert ctx.total(s.size) == 7 and ctx.rows(s.size) == s.rows and torch.equal(ctx.local(full), full[s.rows])
    assert float(ctx.seed(torch.tensor(7.0))) == pytest.approx(7.0 * 3 / 7)


def test_the_step_being_run_is_the_methods_context():
    from methods import get_method
    from bench.models import create_model

    cls = get_method("natural")
    m = cls(cls.resolved_defaults(), create_model("smallcnn", 10))
    assert m.ctx is ONE and current() is ONE
    ctx = Dist(0, 2).step(even_shard(4, 0, 2))
    with ctx:
        assert m.ctx is ctx
        with ONE:
            assert m.ctx is ONE
        assert m.ctx is ctx
    assert m.ctx is ONE


def test_no_method_module_uses_the_process_group_directly():
    """Methods reach everything distributed through the step context and prepare_distributed: none imports
    bench.dist or calls the process group."""
    for path in sorted((ROOT / "methods").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
                assert node.module != "bench.dist" and not (node.module == "bench" and "dist" in names), path.name
            elif isinstance(node, ast.Import):
                assert all(a.name != "bench.dist" for a in node.names), path.name
            elif isinstance(node, ast.Attribute) and node.attr == "dist":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "self"), f"{path.name}: self.dist"
