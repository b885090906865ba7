"""core/cost.py: per-plan bytes and FLOPs from shape inference; the blocks of large
products and of conv2d_weight_grad (the op's own: the same bits checked or not) and the
batch blocks of batched products and convolutions (the same bits as whole)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import matmul_graph

import gradmesh.core as gm
from gradmesh.core import cost
from gradmesh.core import graph as core_graph
from gradmesh.core import plan as core_plan
from gradmesh.core.ops.nn import linear_p
from gradmesh.core.registry import REGISTRY
from gradmesh.v1 import tensor_pb2


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
    # Its kernel keeps the gate activations (L, N, 4H) beside its output for backward.
    output = n * length * 2 * hidden * 4
    kept = length * n * 4 * hidden * 4
    sizes = [int(np.prod(s.shape)) * s.dtype.itemsize for s in plan.specs]
    grads = sum(b for b, r in zip(sizes, plan.requires) if r)
    assert kept == 2 * output
    assert cost.cost_of(plan).bytes == sum(sizes) + kept + grads


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
def test_float32_row_blocks_give_the_bits_of_the_whole_product(m, k, n, monkeypatch):
    """float32: blocks change nothing (so its bits are those of before the blocks)."""
    monkeypatch.setattr(cost, "TARGET_BLOCK_FLOPS", 1 << 26)  # several blocks of these
    monkeypatch.setattr(cost, "MIN_ROWS", 64)
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
    lin = cost.call("linear", linear_p.forward, np, [a, w, bias], {}, lambda: None)
    assert np.array_equal(lin, linear_p.forward(np, a, w, bias))
    assert len(checks) == 2 * len(cost.block_rows(m, cost.rows_per_block(k, n)))


@pytest.mark.parametrize("rows", [64, 128, 256, 512, 1024])
def test_every_block_size_gives_the_same_bits(rows):
    rng = np.random.default_rng(rows)
    for m, k, n in [(1300, 777, 1025), (1024, 2048, 512), (2000, 129, 4097), (2300, 257, 333)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        full = a @ b
        out = np.empty_like(full)
        for s, e in cost.block_rows(m, rows):
            np.matmul(a[s:e], b, out=out[s:e])
        assert np.array_equal(out, full)


def test_which_products_run_in_blocks():
    a64 = np.ones((2 * 4096, 512))
    assert cost.rows_per_block(512, 512) == 8192  # 2^32 FLOPs
    assert not cost._blockable(a64, np.ones((512, 512)))  # one block: whole
    assert cost._blockable(np.ones((2 * 8192, 512)), np.ones((512, 512)))
    for dtype, blocked in ((np.float32, True), (np.int64, False), (np.float16, False)):
        rows, rhs = np.ones((2 * 8192, 512), dtype), np.ones((512, 512), dtype)
        assert cost._blockable(rows, rhs) == blocked, dtype
    assert all(e - s >= 512 for s, e in cost.block_rows(1500, 512))
    assert cost.rows_per_block(8192, 8192) == cost.MIN_ROWS  # big blocks: fewer rows
    assert cost.rows_per_block(4096, 4096) == cost.MIN_ROWS == 1024


def test_plan_stops_inside_a_large_product(monkeypatch):
    monkeypatch.setattr(cost, "TARGET_BLOCK_FLOPS", 1 << 30)  # 8 blocks of 512 rows
    monkeypatch.setattr(cost, "MIN_ROWS", 64)
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


def test_backward_products_run_in_blocks_with_the_same_bits(monkeypatch):
    """The vjps' products of a plan's backward pass are blocked and checked too."""
    monkeypatch.setattr(cost, "TARGET_BLOCK_FLOPS", 1 << 30)
    monkeypatch.setattr(cost, "MIN_ROWS", 64)
    vg = core_graph.validate(matmul_graph(2048, 1024, 1024), core_graph.Limits())
    plan = core_plan.compile_plan(vg, {"b": (1, 1)})
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((1, 1)).astype(np.float32)}
    data = {"b": rng.standard_normal((1, 1)).astype(np.float32)}
    whole = plan.run(params, data, grads=["a"])
    before, checks = cost.blocked_calls, cost.block_checks
    blocked = plan.run(params, data, grads=["a"], check=lambda: None)
    assert cost.blocked_calls - before >= 2  # forward, and backward's g @ b.T
    assert cost.block_checks - checks >= 4
    assert np.array_equal(whole.loss, blocked.loss)
    assert np.array_equal(whole.grads["a"], blocked.grads["a"])
    assert cost.current_check() is None  # not left behind on this thread


def test_transposed_left_operand_gives_the_same_bits():
    rng = np.random.default_rng(5)
    for m, k, n in [(1300, 777, 1025), (2048, 1000, 333)]:
        a = np.ascontiguousarray(rng.standard_normal((k, m)).astype(np.float32)).T
        b = rng.standard_normal((k, n)).astype(np.float32)
        assert np.array_equal(cost._blocked_product(a, b, lambda: None), a @ b)


# Odd shapes of every 2-D product form, float64: the rows blocked are the left operand's
# leading dimensions, flattened (``(..., K) @ (K, N)``).
_PRODUCTS = [
    ("mm", (1500, 300), (300, 700)),
    ("mm", (777, 555), (555, 999)),
    ("mm", (1200, 129), (129, 1500)),
    ("matmul", (3, 511, 257), (257, 333)),  # rows_times_matrix: 1533 rows
    ("linear", (1031, 300), (701, 300)),
    ("linear", (2, 7, 150, 97), (501, 97)),
]


def _eager(op_name, a, b, bias):
    args = [gm.tensor(a), gm.tensor(b)] + ([gm.tensor(bias)] if op_name == "linear" else [])
    return REGISTRY[op_name](*args).numpy()


def _torch(op_name, a, b, bias):
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    if op_name == "linear":
        return torch.nn.functional.linear(ta, tb, torch.from_numpy(bias)).numpy()
    return torch.matmul(ta, tb).numpy()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("op_name,a_shape,b_shape", _PRODUCTS)
def test_float64_products_run_in_the_ops_own_blocks_checked_or_not(
    op_name, a_shape, b_shape, transposed, monkeypatch
):
    """An eager op (no check), ``call`` with a check and with none: the same blocks, the
    same bits; and torch's values to tolerance."""
    monkeypatch.setattr(cost, "TARGET_BLOCK_FLOPS", 1 << 24)  # several blocks of these
    monkeypatch.setattr(cost, "MIN_ROWS", 64)
    rng = np.random.default_rng(sum(a_shape) + sum(b_shape))
    a = rng.standard_normal(a_shape)
    b = rng.standard_normal(b_shape)
    if transposed:  # column-major operands, as ``w.T`` and the vjps' ``a.mT`` are
        b = np.asfortranarray(b)
        a = np.asfortranarray(a) if a.ndim == 2 else a
    bias = rng.standard_normal(b_shape[0])
    args = [a, b] + ([bias] if op_name == "linear" else [])
    forward = REGISTRY[op_name].forward
    rows = int(np.prod(a_shape[:-1]))
    n = b_shape[0] if op_name == "linear" else b_shape[-1]
    blocks = len(cost.block_rows(rows, cost.rows_per_block(a_shape[-1], n)))
    assert blocks >= 2
    before, checks = cost.blocked_calls, []
    checked = cost.call(op_name, forward, np, args, {}, lambda: checks.append(1))
    unchecked = cost.call(op_name, forward, np, args, {}, None)
    eager = _eager(op_name, a, b, bias)
    assert cost.blocked_calls - before == 3
    assert len(checks) == blocks
    assert np.array_equal(checked, unchecked) and np.array_equal(checked, eager)
    np.testing.assert_allclose(checked, _torch(op_name, a, b, bias), rtol=1e-10, atol=1e-10)


def test_a_plans_float64_product_has_the_same_bits_as_the_eager_op(monkeypatch):
    """Plans (checked or not) and the eager engine compute the same blocks: forward and
    the gradient of the left operand."""
    monkeypatch.setattr(cost, "TARGET_BLOCK_FLOPS", 1 << 24)
    monkeypatch.setattr(cost, "MIN_ROWS", 64)
    g = matmul_graph(1337, 301, 419)
    for value in g.inputs:
        value.dtype = tensor_pb2.FLOAT64
    plan = core_plan.compile_plan(core_graph.validate(g, core_graph.Limits()), {"b": (1, 1)})
    params, data = {"a": np.full((1, 1), 0.3)}, {"b": np.full((1, 1), 1.7)}
    checked = plan.run(params, data, grads=["a"], check=lambda: None)
    unchecked = plan.run(params, data, grads=["a"])
    a = gm.tensor(np.full((1, 1), 0.3), requires_grad=True)
    loss = gm.mm(a.expand(1337, 301), gm.tensor(np.full((1, 1), 1.7)).expand(301, 419)).sum()
    loss.backward()
    for run in (checked, unchecked):
        assert np.array_equal(run.loss, loss.detach().numpy())
        assert np.array_equal(run.grads["a"], a.grad.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "x_shape,w_shape,stride,padding,dilation,groups",
    [
        ((12, 16, 30, 30), (32, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1),
        ((7, 32, 33, 31), (64, 16, 5, 3), (2, 1), (2, 0), (1, 2), 2),
        ((6, 8, 24, 24), (8, 1, 7, 7), (1, 1), (3, 3), (1, 1), 8),  # depthwise
    ],
)
def test_conv2d_weight_grad_sums_the_ops_own_batch_blocks(
    dtype, x_shape, w_shape, stride, padding, dilation, groups, monkeypatch
):
    """The weight gradient is the ordered sum of fixed batch blocks, checked or not; the
    eager op the same; torch's values to tolerance."""
    from gradmesh.core.ops.nn import conv2d_p, conv2d_weight_grad_p

    monkeypatch.setattr(cost, "TARGET_BLOCK_FLOPS", 1 << 20)  # 1 to 2 images a block
    rng = np.random.default_rng(sum(x_shape))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    g = rng.standard_normal(conv2d_p.forward(np, x, w, **attrs).shape).astype(dtype)
    attrs["kernel_size"] = list(w_shape[2:])
    per_item = cost._weight_grad_item_flops([x, g], attrs)
    blocks = -(-x_shape[0] // cost._items_per_block(per_item))
    assert per_item and blocks >= 2
    forward = conv2d_weight_grad_p.forward
    before, checks = cost.sum_blocked_calls, []
    checked = cost.call("conv2d_weight_grad", forward, np, [x, g], attrs, lambda: checks.append(1))
    unchecked = cost.call("conv2d_weight_grad", forward, np, [x, g], attrs, None)
    eager = REGISTRY["conv2d_weight_grad"](gm.tensor(x), gm.tensor(g), **attrs).numpy()
    assert cost.sum_blocked_calls - before == 3 and len(checks) == blocks
    assert np.array_equal(checked, unchecked) and np.array_equal(checked, eager)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    tw.requires_grad_(True)
    del attrs["kernel_size"]
    torch.nn.functional.conv2d(tx, tw, **attrs).backward(torch.from_numpy(g))
    tol = 1e-10 if dtype == np.float64 else 2e-3
    np.testing.assert_allclose(checked, tw.grad.numpy(), rtol=tol, atol=tol)


def _checked(op_name, forward, args, attrs):
    checks = []
    before = cost.batch_blocked_calls
    out = cost.call(op_name, forward, np, args, attrs, lambda: checks.append(1))
    return out, cost.batch_blocked_calls - before, len(checks)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "a_shape,b_shape",
    [
        ((12, 300, 350), (12, 350, 333)),
        ((5, 777, 555), (5, 555, 499)),
        ((4, 3, 250, 129), (3, 129, 750)),
        ((3, 1024, 500), (1, 500, 300)),
    ],
)
def test_batched_products_in_batch_blocks_give_the_same_bits(dtype, a_shape, b_shape, monkeypatch):
    from gradmesh.core.ops.linalg import matmul_p

    monkeypatch.setattr(cost, "MIN_BLOCK_FLOPS", 1 << 20)  # several blocks of these shapes
    monkeypatch.setattr(cost, "TARGET_BLOCK_FLOPS", 1 << 28)
    rng = np.random.default_rng(sum(a_shape) + sum(b_shape))
    a = rng.standard_normal(a_shape).astype(dtype)
    b = rng.standard_normal(b_shape).astype(dtype)
    out, blocked, checks = _checked("matmul", matmul_p.forward, [a, b], {})
    assert blocked == 1 and checks >= 2
    assert out.dtype == dtype and np.array_equal(out, np.matmul(a, b))


_CONVS = [
    # x, w, stride, padding, dilation, groups
    ((12, 16, 30, 30), (32, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((6, 32, 33, 31), (64, 16, 5, 3), (2, 1), (2, 0), (1, 2), 2),
    ((8, 64, 20, 20), (128, 64, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((5, 8, 48, 48), (8, 1, 7, 7), (1, 1), (3, 3), (1, 1), 8),  # depthwise
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape,w_shape,stride,padding,dilation,groups", _CONVS)
def test_conv2d_and_its_input_gradient_in_batch_blocks_give_the_same_bits(
    dtype, x_shape, w_shape, stride, padding, dilation, groups, monkeypatch
):
    from gradmesh.core.ops.nn import conv2d_input_grad_p, conv2d_p

    monkeypatch.setattr(cost, "MIN_BLOCK_FLOPS", 1 << 20)  # small shapes, several blocks
    monkeypatch.setattr(cost, "TARGET_BLOCK_FLOPS", 1 << 22)
    rng = np.random.default_rng(sum(x_shape))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    out, blocked, checks = _checked("conv2d", conv2d_p.forward, [x, w], attrs)
    whole = conv2d_p.forward(np, x, w, **attrs)
    assert blocked == 1 and checks >= 2
    assert np.array_equal(out, whole)
    g = rng.standard_normal(whole.shape).astype(dtype)
    attrs["input_size"] = list(x_shape[2:])
    gx, blocked, checks = _checked("conv2d_input_grad", conv2d_input_grad_p.forward, [g, w], attrs)
    assert blocked == 1 and checks >= 2
    assert np.array_equal(gx, conv2d_input_grad_p.forward(np, g, w, **attrs))


def test_batch_blocks_only_where_the_items_are_separate_products():
    big = np.broadcast_to(np.ones((1, 1, 1)), (32, 1024, 1024))
    assert cost._batch_item_flops("matmul", [big, big], {})
    assert not cost._batch_item_flops("matmul", [big, np.ones((4, 1, 1024, 8))], {})
    assert not cost._batch_item_flops("matmul", [big[:1], big[:1]], {})  # one item
    assert not cost._batch_item_flops("matmul", [big[:, :8, :8], big[:, :8, :8]], {})  # small
    assert not cost._batch_item_flops("mm", [big[0], big[0]], {})
    x = np.broadcast_to(np.ones((1, 1, 1, 1)), (64, 64, 128, 128))
    w = np.ones((64, 64, 3, 3))
    attrs = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    assert cost._batch_item_flops("conv2d", [x, w], attrs)
    assert not cost._batch_item_flops("conv2d_weight_grad", [x, x], attrs)  # sums the batch
    assert not cost._batch_item_flops("conv2d", [x.astype(np.float32), w], attrs)  # mixed


def _conv_graph(x_shape, w_shape):
    """loss = sum(conv2d(x, w) ** 2), float64, x and w parameters (both get gradients)."""
    from gradmesh.v1 import graph_pb2, tensor_pb2

    def param(name, shape):
        f64 = tensor_pb2.FLOAT64
        return graph_pb2.Input(name=name, role=graph_pb2.Input.PARAM, dtype=f64, shape=shape)

    ints = [
        graph_pb2.Attribute(name=n, ints=graph_pb2.Ints(values=[1, 1]))
        for n in ("stride", "padding")
    ]
    return graph_pb2.Graph(
        version=1,
        inputs=[param("x", x_shape), param("w", w_shape)],
        nodes=[
            graph_pb2.Node(op="conv2d", inputs=[0, 1], attrs=ints),
            graph_pb2.Node(op="mul", inputs=[2, 2]),
            graph_pb2.Node(op="sum", inputs=[3]),
        ],
        outputs=[graph_pb2.Output(name="loss", value=4)],
    )


def test_a_plans_conv_forward_and_backward_in_batch_blocks_give_the_same_bits(monkeypatch):
    monkeypatch.setattr(cost, "MIN_BLOCK_FLOPS", 1 << 20)
    monkeypatch.setattr(cost, "TARGET_BLOCK_FLOPS", 1 << 22)
    x_shape, w_shape = [8, 8, 24, 24], [16, 8, 3, 3]
    vg = core_graph.validate(_conv_graph(x_shape, w_shape), core_graph.Limits())
    plan = core_plan.compile_plan(vg, {})
    rng = np.random.default_rng(7)
    params = {"x": rng.standard_normal(x_shape), "w": rng.standard_normal(w_shape)}
    sums = cost.sum_blocked_calls
    whole = plan.run(params, {}, grads=["x", "w"])
    before = cost.batch_blocked_calls
    blocked = plan.run(params, {}, grads=["x", "w"], check=lambda: None)
    assert cost.batch_blocked_calls - before == 2  # conv2d, and the vjp's conv2d_input_grad
    assert cost.sum_blocked_calls - sums == 2  # conv2d_weight_grad: in blocks either way
    assert np.array_equal(whole.loss, blocked.loss)
    for name in ("x", "w"):
        assert np.array_equal(whole.grads[name], blocked.grads[name]), name
