"""Gradient stops in traced graphs: ``detach()``, ``.data``, ``detach_()`` and ops run under
``no_grad()`` inside the traced function carry no gradient in the graph either.

Each function is written once over a library ``lib`` (gradmesh.core or torch) and checked
three ways: the compiled plan and the reference executor against local ``backward()``,
bit for bit, and local ``backward()`` against torch in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from tracing import (
    assert_executed_equals_local,
    assert_local_matches_torch,
    assert_plan_equals_local,
    batch,
    local,
    traced,
)

import gradmesh.core as gm
from gradmesh.core.graph import trace, validate
from gradmesh.core.plan import compile_plan
from gradmesh.core.registry import REGISTRY


def _q(p, x):
    """A small two-layer network."""
    return (x @ p["w1"] + p["b1"]).tanh() @ p["w2"]


def detach_product(lib, p, x):
    y = _q(p, x)
    return (y * y.detach()).sum()


def detach_difference(lib, p, x):
    # The loss of the issue, with a weight so that its gradient is not zero.
    y = _q(p, x)
    return ((y - 0.5 * y.detach()) ** 2).sum()


def target_network(lib, p, x):
    # DQN: the target comes from the same parameters under no_grad.
    with lib.no_grad():
        target = _q(p, x * 0.5).max(1).values * 0.9 + 1.0
    return ((_q(p, x).max(1).values - target) ** 2).mean()


def detached_parameter(lib, p, x):
    return (_q(p, x) * p["w2"].detach().sum()).sum()


def data_attribute(lib, p, x):
    h = x @ p["w1"]
    return (h * h.data).sum()


def detach_in_place(lib, p, x):
    h = x @ p["w1"]
    c = h * 2.0
    c.detach_()
    return (h * c).sum()


def no_grad_reads_params_and_live_values(lib, p, x):
    h = (x @ p["w1"]).tanh()
    with lib.no_grad():
        scale = (h * p["b1"]).mean() + p["w2"].sum()
    return (h * scale).sum()


def enable_grad_inside_no_grad(lib, p, x):
    with lib.no_grad():
        t = x @ p["w1"]
        with lib.enable_grad():
            u = (x @ p["w1"] + t).tanh()
    return (u * t).sum()


def set_grad_enabled_false(lib, p, x):
    y = _q(p, x)
    with lib.set_grad_enabled(False):
        norm = (y * y).sum().sqrt()
    return (y / norm).sum() + (y * y).mean()


FUNCTIONS = [
    detach_product,
    detach_difference,
    target_network,
    detached_parameter,
    data_attribute,
    detach_in_place,
    no_grad_reads_params_and_live_values,
    enable_grad_inside_no_grad,
    set_grad_enabled_false,
]


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w1": rng.standard_normal((3, 4)),
        "b1": rng.standard_normal(4),
        "w2": rng.standard_normal((4, 2)),
    }


@pytest.mark.parametrize("fn", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_plan_gradients_equal_local_backward_bitwise(fn):
    vg = assert_plan_equals_local(fn, _params())
    assert any(node.op == "stop_gradient" for node in vg.graph.nodes)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_executed_graph_backward_equals_local_backward_bitwise(fn):
    assert_executed_equals_local(fn, _params(), sizes=(5,))


@pytest.mark.parametrize("fn", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_local_backward_equals_torch(fn):
    assert_local_matches_torch(fn, _params())


def test_a_graph_with_stops_runs_with_other_parameter_values():
    """The stopped value is computed from the parameters sent, not baked in at trace time
    (a detached tensor used to become a CONST input holding its traced value)."""
    params = _params()
    g = traced(detach_product, params)
    assert [i.name for i in g.inputs] == ["w1", "b1", "w2", "x0"]
    other = {n: a * 1.5 for n, a in params.items()}
    x = batch(6)
    result = compile_plan(validate(g), {"x0": x.shape}).run(other, {"x0": x})
    loss, grads = local(detach_product, other, x)
    assert np.array_equal(result.loss, loss)
    assert all(np.array_equal(result.grads[n], grads[n]) for n in grads)


def test_no_stop_where_no_gradient_flows():
    """Detaching data or running data-only ops under no_grad adds nothing; a stop is
    recorded once per value however often it is read."""

    def fn(p, x):
        with gm.no_grad():
            x = (x * 2.0).detach()
        y = x @ p["w1"]
        with gm.no_grad():
            a, b = p["w1"].sum(), p["w1"].mean()
        return (y * a * b).sum()

    g = trace(fn, {k: gm.tensor(v) for k, v in _params().items()}, batch(4))
    ops = [n.op for n in g.nodes]
    assert ops.count("stop_gradient") == 1, ops
    plain = trace(lambda p, x: (x @ p["w1"]).sum(), {"w1": gm.tensor(_params()["w1"])}, batch(4))
    assert "stop_gradient" not in [n.op for n in plain.nodes]


def test_detach_keeps_eager_semantics_while_tracing():
    seen = {}

    def fn(p, x):
        y = x @ p["w1"]
        d = y.detach()
        seen.update(
            shares=np.shares_memory(d._data, y._data), requires=d.requires_grad, leaf=d.is_leaf
        )
        return (y * d).sum()

    trace(fn, {"w1": gm.tensor(_params()["w1"])}, batch(4))
    assert seen == {"shares": True, "requires": False, "leaf": True}


def test_stop_gradient_op_gives_a_result_without_gradient():
    x = gm.tensor([1.0, -2.0], requires_grad=True)
    y = REGISTRY["stop_gradient"](x)
    assert not y.requires_grad and y.grad_fn is None
    assert np.shares_memory(y._data, x._data)
    (x * y).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, -2.0])
    with pytest.raises(ValueError, match="stop_gradient"):
        REGISTRY["stop_gradient"].defvjp(lambda g, out, a: (g,))


def test_module_losses_of_the_issue_equal_local_backward():
    """With an nn.Module: the issue's loss (zero gradient, whose stop must not turn into
    a factor 2 elsewhere) and a target network's, traced at one batch size, run at
    another."""

    def issue(model, x):
        return ((model(x) - model(x).detach()) ** 2).sum() + (model(x) * model(x).detach()).mean()

    def dqn(model, x):
        with gm.no_grad():
            target = model(x * 0.5).max(1).values * 0.9 + 1.0
        return ((model(x).max(1).values - target) ** 2).mean()

    for fn in (issue, dqn):
        gm.manual_seed(0)
        model = gm.nn.Sequential(gm.nn.Linear(3, 8), gm.nn.Tanh(), gm.nn.Linear(8, 2))
        vg = validate(trace(fn, model, batch(4).astype(np.float32)))
        x = batch(9).astype(np.float32)
        params = {n: p.detach().numpy() for n, p in model.named_parameters()}
        result = compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x})
        model.zero_grad()
        loss = fn(model, gm.tensor(x))
        loss.backward()
        assert np.array_equal(result.loss, loss.detach().numpy()), fn.__name__
        for name, p in model.named_parameters():
            assert np.array_equal(result.grads[name], p.grad.numpy()), (fn.__name__, name)
