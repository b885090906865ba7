"""core/cost.py: per-plan bytes and FLOPs from shape inference, and row-blocked matrix
products that give the same bits as the whole product."""

from __future__ import annotations

import numpy as np
import pytest
from models import matmul_graph

from gradmesh.core import cost
from gradmesh.core import graph as core_graph
from gradmesh.core import plan as core_plan


def test_cost_of_a_large_matmul_from_shapes_only():
    vg = core_graph.validate(matmul_graph(8192, 8192, 8192), core_graph.Limits())
    plan = core_plan.compile_plan(vg, {"b": (1, 1)})
    c = cost.cost_of(plan)
    mm = 2 * 8192**3
    assert c.flops >= 3 * mm  # forward and the vjp's two products
    assert c.bytes >= 3 * 8192 * 8192 * 4  # the product and both expanded operands
    assert cost.cost_of(plan) is c  # computed once, kept on the plan


def test_default_rule_counts_elements():
    vg = core_graph.validate(matmul_graph(4, 3, 2), core_graph.Limits())
    plan = core_plan.compile_plan(vg, {"b": (1, 1)})
    assert cost.cost_of(plan).flops > 0


def test_an_lstm_layer_costs_its_recurrent_products():
    # The time loop is one op: its FLOPs must count the product of every step, or a long
    # sequence would pass the worker's FLOP budget as a few elementwise passes.
    import gradmesh.core as gm
    from gradmesh.core.graph import trace

    n, length, hidden = 4, 50, 64
    lstm = gm.nn.LSTM(8, hidden, batch_first=True)
    g = trace(lambda m, x: m(x)[0].sum(), lstm, np.zeros((n, length, 8), np.float32))
    assert "lstm_layer" in {node.op for node in g.nodes}
    plan = core_plan.compile_plan(core_graph.validate(g), {"x0": (n, length, 8)})
    assert cost.cost_of(plan).flops >= 3 * 2 * n * length * 4 * hidden * hidden


@pytest.mark.parametrize(
    "m,k,n",
    [
        (1024, 256, 256),
        (1500, 300, 700),
        (2048, 1000, 333),
        (1300, 777, 1025),
        (3000, 256, 2000),
        (1024, 2048, 64),
    ],
)
def test_row_blocks_give_the_same_bits(m, k, n):
    rng = np.random.default_rng(m + k + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    checks = []
    for rhs in (b, np.ascontiguousarray(b.T).T):  # row-major and transposed
        full = a @ rhs
        blocked = cost._blocked_product(a, rhs, lambda: checks.append(1))
        assert np.array_equal(blocked, full)
    w = np.ascontiguousarray(b.T)
    bias = rng.standard_normal(n).astype(np.float32)
    lin = cost.call(
        "linear",
        lambda xp, x, w, b: (lambda o: (o.__iadd__(b), o)[1])(xp.matmul(x, w.T)),
        np,
        [a, w, bias],
        {},
        lambda: None,
    )
    ref = np.matmul(a, w.T)
    ref += bias
    assert np.array_equal(lin, ref)
    assert len(checks) == 2 * len(cost.block_rows(m, cost.rows_per_block(k, n)))


@pytest.mark.parametrize("rows", [64, 128, 256, 512])
def test_every_block_size_gives_the_same_bits(rows):
    rng = np.random.default_rng(rows)
    for m, k, n in [(1300, 777, 1025), (1024, 2048, 512), (2000, 129, 4097)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        full = a @ b
        out = np.empty_like(full)
        for s, e in cost.block_rows(m, rows):
            np.matmul(a[s:e], b, out=out[s:e])
        assert np.array_equal(out, full)


def test_blocking_only_where_equality_was_shown():
    a64 = np.ones((4096, 512))
    assert not cost._blockable(a64, np.ones((512, 512)))  # float64: not blocked
    a32 = np.ones((4096, 512), np.float32)
    assert cost._blockable(a32, np.ones((512, 512), np.float32))
    assert not cost._blockable(a32[:100], np.ones((512, 512), np.float32))  # one block
    assert all(e - s >= cost.BLOCK_ROWS for s, e in cost.block_rows(1500))
    assert cost.rows_per_block(8192, 8192) == cost.MIN_ROWS  # big blocks: fewer rows
    assert cost.rows_per_block(64, 64) == cost.BLOCK_ROWS


def test_plan_stops_inside_a_large_product():
    vg = core_graph.validate(matmul_graph(4096, 1024, 1024), core_graph.Limits())
    plan = core_plan.compile_plan(vg, {"b": (1, 1)})
    params, data = {"a": np.ones((1, 1), np.float32)}, {"b": np.ones((1, 1), np.float32)}
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) > 3:  # the plan's own check, then the first blocks
            raise Stop

    before = cost.block_checks
    with pytest.raises(Stop):
        plan.run(params, data, grads=[], check=check)
    assert (
        1
        <= cost.block_checks - before
        < len(cost.block_rows(4096, cost.rows_per_block(1024, 1024)))
    )
    # And unchecked, the same result as with checks.
    r1 = plan.run(params, data, grads=[])
    r2 = plan.run(params, data, grads=[], check=lambda: None)
    assert np.array_equal(r1.loss, r2.loss)


def test_backward_products_run_in_blocks_with_the_same_bits():
    """The vjps' products of a plan's backward pass are blocked and checked too."""
    vg = core_graph.validate(matmul_graph(2048, 1024, 1024), core_graph.Limits())
    plan = core_plan.compile_plan(vg, {"b": (1, 1)})
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((1, 1)).astype(np.float32)}
    data = {"b": rng.standard_normal((1, 1)).astype(np.float32)}
    whole = plan.run(params, data, grads=["a"])
    before = cost.blocked_calls
    blocked = plan.run(params, data, grads=["a"], check=lambda: None)
    assert cost.blocked_calls - before >= 2  # forward, and backward's g @ b.T
    assert np.array_equal(whole.loss, blocked.loss)
    assert np.array_equal(whole.grads["a"], blocked.grads["a"])
    assert cost.current_check() is None  # not left behind on this thread


def test_transposed_left_operand_gives_the_same_bits():
    rng = np.random.default_rng(5)
    for m, k, n in [(1300, 777, 1025), (2048, 1000, 333)]:
        a = np.ascontiguousarray(rng.standard_normal((k, m)).astype(np.float32)).T
        b = rng.standard_normal((k, n)).astype(np.float32)
        assert np.array_equal(cost._blocked_product(a, b, lambda: None), a @ b)
