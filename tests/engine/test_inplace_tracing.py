"""In-place ops inside a traced function: recorded functionally, or refused by name.

While a graph tracer is active, an in-place op (``add_``, ``+=``, ``clamp_``, ``zero_``,
``fill_``, ``copy_``, ``t[index] = value``, ``t.data = value`` ...) records its out-of-place
form and rebinds the changed tensor to the result, writing through views into the tensor
they view. Each function below is written once over a library ``lib`` (gradmesh.core or
torch) and checked three ways: the compiled plan and the reference executor against local
``backward()`` bit for bit, at two batch sizes, and local ``backward()`` against torch in
float64. What a graph cannot do as eager code does raises ``TraceError`` naming the op.
"""

from __future__ import annotations

import re

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
from gradmesh.core.graph import TraceError, trace, validate
from gradmesh.core.graph import tracer as graph
from gradmesh.core.plan import compile_plan

# ------------------------------------------------------------------ traced forms ------


def the_issue(lib, p, x):
    # A value that carries a gradient, changed under no_grad: eager keeps its gradient
    # path and the new value, as t + stop_gradient(1) does.
    t = x @ p["w1"]
    with lib.no_grad():
        t += 1
    return (t * t).sum()


def the_issue_with_views(lib, p, x):
    # Tensors sharing the changed value's memory read its new value, without gradient.
    t = x @ p["w1"]
    d = t.detach()
    v = d.reshape(-1)
    with lib.no_grad():
        t += 1
    return (t * t).sum() + (v * v).sum() * p["b1"].sum() + (d * t).sum()


def sub_with_a_parameter(lib, p, x):
    t = x @ p["w1"] + p["b1"]
    with lib.no_grad():
        t.sub_(p["b1"], alpha=0.5)
        t -= 0.25
        t.add_(p["b1"])
    return (t * t).sum()


def target_network_chain(lib, p, x):
    with lib.no_grad():
        target = x @ p["w1"]
        target += 1
        target *= 0.5
        target.clamp_(-1, 1)
        target.div_(2)
        target /= 3
        target.sub_(0.1, alpha=2)
        target -= p["b1"]
        target.mul_(p["b1"])
    return ((x @ p["w1"] - target) ** 2).mean()


def mask_built_in_place(lib, p, x):
    m = (x > 0).double()
    m.mul_(2)
    m[:, 0] = 1
    m[:, [1, 2]] = 0.5
    m.clamp_(max=1.5)
    return ((x * m) @ p["w1"]).sum()


def augmented_index_assignment(lib, p, x):
    h = x * 1.0
    h[:, 1] += 1
    h[:, 0:2] *= 3
    col = h[:, 2]  # a view read after its base changes
    h.add_(1)
    h[:, [0, 2]] -= 0.5
    h[0:2, 1] += 1
    return (h @ p["w1"]).sum() + (col * 2).sum() * p["b1"].sum()


def writes_through_views(lib, p, x):
    h = x.clone()
    v = h.reshape(-1)
    v.mul_(2)
    r = h[1:3]
    r.add_(1)
    h.T.mul_(2)
    u = h.reshape(-1, 3, 1)
    u.transpose(1, 2)[:, 0] = 5.0
    u.transpose(1, 2)[:, 0, 1:] += 1.0
    d = h.detach()
    d[:, 2].clamp_(-0.5, 0.5)
    return (h @ p["w1"]).sum() + (v * v).sum()


def zero_fill_copy(lib, p, x):
    with lib.no_grad():
        buf = (x @ p["w1"]).clone()
        s = buf.sum()
        buf.zero_()
        buf.fill_(3.0)
        buf.copy_(x @ p["w1"] * 2)
        buf[0].copy_(p["b1"])
        buf[1] = p["b1"] * 2
        buf[:, 1].fill_(p["b1"][0])
    return (x @ p["w1"] * buf).sum() + s


def constant_accumulator(lib, p, x):
    acc = lib.zeros(4, dtype=lib.float64)
    for i in range(3):
        acc += p["w1"][i].detach()
    acc[1] = 7.0
    acc.clamp_(p["b1"].detach(), None)
    return (x @ p["w1"] * acc).sum()


def detached_copies(lib, p, x):
    d = (x @ p["w1"]).detach().clone()
    d.clamp_(0, 1)
    c = (x @ p["w1"]) * 2
    c.detach_()
    c += 1
    return ((x @ p["w1"]) * d * c).sum()


def integer_tensor(lib, p, x):
    k = (x > 0).long()
    k[:, 0] = 2
    k += 1
    k *= 3
    return ((x * k) @ p["w1"]).sum()


def data_assignment(lib, p, x):
    with lib.no_grad():
        t = x @ p["w1"]
    t.data = t * 0.5 + 1
    return (x @ p["w1"] * t).sum()


FUNCTIONS = [
    the_issue,
    the_issue_with_views,
    sub_with_a_parameter,
    target_network_chain,
    mask_built_in_place,
    augmented_index_assignment,
    writes_through_views,
    zero_fill_copy,
    constant_accumulator,
    detached_copies,
    integer_tensor,
    data_assignment,
]


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w1": rng.standard_normal((3, 4)), "b1": rng.standard_normal(4)}


@pytest.mark.parametrize("fn", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_plan_equals_local_backward_bitwise(fn):
    assert_plan_equals_local(fn, _params())


@pytest.mark.parametrize("fn", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_executed_graph_equals_local_backward_bitwise(fn):
    assert_executed_equals_local(fn, _params())


@pytest.mark.parametrize("fn", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_local_backward_equals_torch(fn):
    assert_local_matches_torch(fn, _params())


def test_the_issue_records_the_change():
    """The graph of the issue holds the ``+= 1``: a loss of sum((2x + 1)^2), not sum(4x^2)."""

    def fn(p, x):
        t = p["w"] * 2
        with gm.no_grad():
            t += 1
        return (t * t).sum() + (x * 0).sum()

    params = {"w": gm.tensor([1.0, 2.0, 3.0])}
    g = trace(fn, params, np.zeros((2, 1), np.float32))
    result = compile_plan(validate(g), {"x0": (2, 1)}).run(
        {"w": np.array([1.0, 2.0, 3.0], np.float32)}, {"x0": np.zeros((2, 1), np.float32)}
    )
    assert result.loss == 83.0
    np.testing.assert_array_equal(result.grads["w"], [12.0, 20.0, 28.0])


def test_a_view_taken_under_no_grad_reads_the_new_value_without_gradient():
    """Eager gradmesh lets a view taken under no_grad() be read after its base changed (torch
    refuses that): it has the new value and no gradient, in the graph as well."""

    def fn(lib, p, x):
        t = x @ p["w1"]
        with lib.no_grad():
            v = t.reshape(-1)
            t += 1
        return (t * t).sum() + (v * v).sum() * p["b1"].sum()

    params = _params()
    vg = validate(traced(fn, params))
    for n in (4, 7):
        x = batch(n)
        result = compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x})
        loss, grads = local(fn, params, x)
        assert np.array_equal(result.loss, loss)
        assert all(np.array_equal(result.grads[k], grads[k]) for k in grads)


def test_module_float32_matches_local_backward():
    """With an nn.Module in float32: a target changed in place under no_grad, and a mask
    written by index, traced at one batch size and run at another."""

    def fn(model, x):
        with gm.no_grad():
            target = model(x * 0.5)
            target[:, 0] = 0.0
            target.clamp_(-0.5, 0.5)
            target += 0.1
        mask = (x > 0).float()
        mask[:, 1] *= 2.0
        return ((model(x * mask) - target) ** 2).mean()

    gm.manual_seed(0)
    model = gm.nn.Sequential(gm.nn.Linear(3, 8), gm.nn.Tanh(), gm.nn.Linear(8, 2))
    vg = validate(trace(fn, model, batch(4).astype(np.float32)))
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    for n in (4, 9):
        x = batch(n).astype(np.float32)
        result = compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x})
        model.zero_grad()
        loss = fn(model, gm.tensor(x))
        loss.backward()
        assert np.array_equal(result.loss, loss.detach().numpy())
        for name, p in model.named_parameters():
            assert np.array_equal(result.grads[name], p.grad.numpy()), (name, n)


# ---------------------------------------------------------------- refused forms ------


def data_changed(p, x):
    x += 1
    return (x @ p["w1"]).sum()


def data_written_by_index(p, x):
    x[:, 0] = 0
    return (x @ p["w1"]).sum()


def data_changed_through_a_view(p, x):
    v = x[0]
    v.add_(1)
    return (x @ p["w1"]).sum()


def parameter_changed(p, x):
    with gm.no_grad():
        p["w1"].mul_(0.5)
    return (x @ p["w1"]).sum()


def parameter_zeroed(p, x):
    with gm.no_grad():
        p["b1"].zero_()
    return (x @ p["w1"] + p["b1"]).sum()


def differentiated_value_scaled(p, x):
    t = x @ p["w1"]
    with gm.no_grad():
        t *= 2
    return (t * t).sum()


def differentiated_value_filled(p, x):
    t = x @ p["w1"]
    with gm.no_grad():
        t.fill_(0.5)
    return (t * t).sum()


def differentiated_value_clamped(p, x):
    t = x @ p["w1"]
    with gm.no_grad():
        t.clamp_(0, 1)
    return (t * t).sum()


def differentiated_value_written_by_index(p, x):
    t = x @ p["w1"]
    with gm.no_grad():
        t[:, 0] += 1
    return (t * t).sum()


def detached_alias_changed(p, x):
    y = x @ p["w1"]
    d = y.detach()
    d += 1
    return (y * d).sum()


def saved_for_backward_changed(p, x):
    m = (x > 0).double()
    z = (x @ p["w1"]) * m[:, :1]
    m.mul_(2)
    return z.sum()


def saved_result_changed(p, x):
    t = (x @ p["w1"]).tanh()  # tanh's gradient reads its result
    with gm.no_grad():
        t.sub_(0.5)
    return (t * t).sum()


def broadcast_view_written(p, x):
    e = gm.zeros(3, dtype=gm.float64).expand(4, 3)
    e.add_(1)
    return (x @ p["w1"]).sum()


def captured_tensor_changed(p, x):
    STATE.add_(1)  # a global: eager code changes it on every call
    return (x @ p["w1"] * STATE).sum()


STATE = gm.zeros(4, dtype=gm.float64)


def alias_from_numpy_changed(p, x):
    h = x * 2
    a = gm.from_numpy(h.numpy())  # shares h's memory outside the dispatcher
    s = a.sum()
    h += 1
    return (a @ p["w1"]).sum() + s


def differentiated_value_rebound(p, x):
    t = x @ p["w1"]
    t.data = gm.zeros(4, 4, dtype=gm.float64)
    return (t * t).sum()


REFUSED = [
    (data_changed, "+=", "DATA input 'x0'"),
    (data_written_by_index, "t[index] = value", "DATA input 'x0'"),
    (data_changed_through_a_view, "add_", "DATA input 'x0'"),
    (parameter_changed, "mul_", "PARAM input 'w1'"),
    (parameter_zeroed, "zero_", "PARAM input 'b1'"),
    (differentiated_value_scaled, "*=", "depends on the parameters"),
    (differentiated_value_filled, "fill_", "depends on the parameters"),
    (differentiated_value_clamped, "clamp_", "depends on the parameters"),
    (differentiated_value_written_by_index, "+=", "depending on the parameters"),
    (detached_alias_changed, "+=", "y.detach()"),
    (saved_for_backward_changed, "mul_", "modified by an inplace operation"),
    (saved_result_changed, "sub_", "tanh"),
    (broadcast_view_written, "add_", "expand"),
    (captured_tensor_changed, "add_", "did not make"),
    (
        alias_from_numpy_changed,
        "+=",
        "through a tensor sharing its memory, in place a tensor "
        "that the traced function did not make",
    ),
    (differentiated_value_rebound, "t.data = value", "depends on the parameters"),
]


@pytest.mark.parametrize("fn, op, why", REFUSED, ids=[f.__name__ for f, _, _ in REFUSED])
def test_refused_forms_raise_trace_error_naming_the_op(fn, op, why):
    params = _params()
    x = batch(4)
    before = x.copy()
    with pytest.raises(TraceError, match=re.escape(f"`{op}`")) as err:
        trace(fn, {k: gm.tensor(v) for k, v in params.items()}, x)
    assert why in str(err.value)
    assert "out of place" in str(err.value)
    np.testing.assert_array_equal(x, before)  # the caller's data is left alone


def test_changing_a_module_buffer_makes_it_graph_state_and_leaves_it_alone():
    class Counted(gm.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = gm.nn.Linear(3, 2)
            self.register_buffer("calls", gm.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.lin(x)

    model = Counted()
    g = trace(lambda m, x: m(x).sum(), model, batch(4).astype(np.float32))
    assert model.calls.item() == 0.0  # tracing ran forward twice, and put it back
    calls = next(i for i in g.inputs if i.name == "calls")
    assert calls.role == calls.BUFFER
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    plan = compile_plan(validate(g), {"x0": (3, 3)})
    result = plan.run({**params, "calls": np.float32(4.0)}, {"x0": batch(3).astype(np.float32)})
    assert result.buffers == {"calls": np.float32(5.0)}


def test_replacing_a_module_buffer_is_refused_and_leaves_it_alone():
    class Replaced(gm.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = gm.nn.Linear(3, 2)
            self.register_buffer("calls", gm.zeros(()))

        def forward(self, x):
            self.calls.data = self.calls + 1
            return self.lin(x)

    model = Replaced()
    with pytest.raises(TraceError, match=r"would change the module's buffer 'calls'"):
        trace(lambda m, x: m(x).sum(), model, batch(4).astype(np.float32))
    assert model.calls.item() == 0.0


def test_a_global_changed_in_place_is_left_alone():
    with pytest.raises(TraceError):
        trace(captured_tensor_changed, {k: gm.tensor(v) for k, v in _params().items()}, batch(4))
    assert STATE.tolist() == [0.0] * 4


def test_a_view_the_tracer_cannot_replay_is_refused_when_read(monkeypatch):
    """A tensor sharing memory with a changed one through an op the tracer does not know
    as a view cannot get its new value: reading it raises."""
    monkeypatch.setattr(graph, "_VIEW_OPS", graph._VIEW_OPS - {"reshape"})

    def fn(p, x):
        h = x * 2
        flat = h.reshape(-1)
        h += 1
        return (flat.sum() * p["w1"]).sum()

    with pytest.raises(TraceError, match=r"a tensor read after `\+=` shares memory"):
        trace(fn, {k: gm.tensor(v) for k, v in _params().items()}, batch(4))


# ------------------------------------------------------------------ eager mode ------


def test_eager_in_place_ops_are_unchanged_outside_tracing():
    t = gm.tensor([[1.0, -2.0], [3.0, 4.0]])
    data = t._data
    t.add_(1).sub_(gm.tensor(0.5), alpha=2).mul_(2).div_(4)
    t.clamp_(-1, 1)
    t[0, 1] = 7.0
    t[:, 0] += 1
    np.testing.assert_array_equal(t.numpy(), [[1.5, 7.0], [2.0, 1.0]])
    v = t[1]
    v.zero_()  # through the view, into t
    np.testing.assert_array_equal(t.numpy(), [[1.5, 7.0], [0.0, 0.0]])
    t.fill_(2.0)
    t.copy_(np.ones((2, 2)))
    t.data = t * 3
    np.testing.assert_array_equal(t.numpy(), 3 * np.ones((2, 2)))
    assert t._data is not data and np.array_equal(data, np.ones((2, 2)))
    w = gm.tensor([1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="in-place"):
        w.add_(1)
