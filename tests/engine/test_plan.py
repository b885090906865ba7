"""The compiled execution plan (gradmesh.core.plan): bitwise equality with eager backward,
freeing of intermediates, batch-size independence and seeded randomness."""

from __future__ import annotations

import numpy as np
import pytest

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core import nn
from gradmesh.core.graph import GraphError, execute, trace, validate
from gradmesh.core.plan import compile_plan


def mlp():
    gm.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    )


def cnn():
    gm.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )


def classify(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y), {"logits": logits}


def data(n, shape, classes=5, seed=0):
    rng = np.random.default_rng(seed + n)
    return rng.standard_normal((n,) + shape).astype(np.float32), rng.integers(0, classes, n)


def eager(model, fn, *inputs, scale=None):
    """Loss, extra outputs and gradients of eager ``backward()``."""
    model.zero_grad() if hasattr(model, "zero_grad") else None
    for p in model.parameters():
        p.grad = None
    loss, extra = fn(model, *[gm.tensor(a) for a in inputs])
    (loss if scale is None else loss * scale).backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    return loss.detach().numpy(), {k: v.detach().numpy() for k, v in extra.items()}, grads


def params_of(model):
    return {n: p.detach().numpy() for n, p in model.named_parameters()}


def assert_bitwise(result, loss, grads, outputs=None):
    assert np.array_equal(result.loss, loss), (result.loss, loss)
    assert result.loss.dtype == loss.dtype
    assert set(result.grads) == set(grads)
    for name, g in grads.items():
        assert result.grads[name].dtype == g.dtype, name
        assert np.array_equal(result.grads[name], g), (
            f"{name}: max diff {np.abs(result.grads[name] - g).max()}"
        )
    for name, v in (outputs or {}).items():
        assert np.array_equal(result.outputs[name], v), name


@pytest.mark.parametrize("n", [1, 512])
@pytest.mark.parametrize("make, shape", [(mlp, (3, 4)), (cnn, (2, 10, 10))], ids=["mlp", "cnn"])
def test_bitwise_equal_to_eager_backward(make, shape, n):
    model = make()
    x, y = data(8, shape)
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    x, y = data(n, shape)  # traced at 8, run at n
    plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
    result = plan.run(params_of(model), {"x": x, "y": y}, outputs=["logits"])
    loss, extra, grads = eager(model, classify, x, y)
    assert_bitwise(result, loss, grads, extra)
    assert result.forward_seconds >= 0 and result.backward_seconds >= 0


def test_one_validated_graph_serves_several_batch_sizes():
    model = mlp()
    x, y = data(8, (3, 4))
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    plans = {n: compile_plan(vg, {"x": (n, 3, 4), "y": (n,)}) for n in (1, 512)}
    for n, plan in plans.items():
        x, y = data(n, (3, 4), seed=1)
        loss, _, grads = eager(model, classify, x, y)
        assert_bitwise(plan.run(params_of(model), {"x": x, "y": y}), loss, grads)
    with pytest.raises(GraphError) as e:
        plans[1].run(params_of(model), {"x": x, "y": y})  # batch 512 into plan for 1
    assert e.value.field == "data[x].shape"


def many_ops(p, x, tokens):
    """A model that uses a wide range of registry ops (shapes, reductions, nn ops)."""
    e = F.embedding(tokens, p["emb"])  # (B, 4, 6)
    h = F.layer_norm(e, (6,), p["ln_w"], p["ln_b"])
    h = F.gelu(h) + F.gelu(h, approximate="tanh") * 0.5
    att = F.softmax(h @ h.transpose(1, 2) / 6**0.5, -1)
    h = att @ h  # (B, 4, 6)
    z = x @ p["w"]  # (B, 6)
    z = gm.cat([z, z.sigmoid(), z.tanh(), -z], 1)  # (B, 24)
    z = z.reshape(z.shape[0], 4, 6) + h
    z = gm.where(z > 0, z, z.exp() - 1)  # elu by hand
    z = gm.maximum(z, p["floor"]) + gm.minimum(z, -p["floor"]).abs().sqrt()
    s = gm.stack([z.sum(1), z.mean(1), z.amax(1), z.var(1)], 1)  # (B, 4, 6)
    s = s.permute(0, 2, 1).flatten(1)  # (B, 24)
    s = s + F.softplus(s) - F.log_softmax(s, -1).clamp(min=-20) + s.pow(2).cumsum(1) * 1e-3
    out = (s * p["v"]).sum(1)
    loss = F.mse_loss(out, x.sum(1)) + (p["w"] ** 2).sum() * 1e-4 + gm.logsumexp(s, 1).mean()
    return loss, {"out": out}


def many_params():
    gm.manual_seed(3)
    return {
        "emb": gm.randn(10, 6),
        "ln_w": gm.randn(6),
        "ln_b": gm.randn(6),
        "w": gm.randn(5, 6),
        "floor": gm.randn(4, 6) * 0.1,
        "v": gm.randn(24),
    }


def test_bitwise_equal_to_eager_for_a_model_using_many_ops():
    rng = np.random.default_rng(0)
    x, tokens = rng.standard_normal((8, 5)).astype(np.float32), rng.integers(0, 10, (8, 4))
    params = many_params()
    g = trace(many_ops, params, x, tokens, data_names=["x", "tokens"])
    vg = validate(g)
    for n in (1, 16):
        x, tokens = rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 10, (n, 4))
        plan = compile_plan(vg, {"x": x.shape, "tokens": tokens.shape})
        result = plan.run(
            {k: v.numpy() for k, v in params.items()}, {"x": x, "tokens": tokens}, outputs=["out"]
        )
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss, extra = many_ops(leaves, gm.tensor(x), gm.tensor(tokens))
        loss.backward()
        assert_bitwise(
            result,
            loss.detach().numpy(),
            {k: t.grad.numpy() for k, t in leaves.items()},
            {"out": extra["out"].detach().numpy()},
        )


# ---------------------------------------------------------------------------------------
# Every op spec: plan == eager, bit for bit
# ---------------------------------------------------------------------------------------


def _spec_cases():
    import test_ops

    return [
        pytest.param(spec, i, id=test_ops._case_id(spec, i))
        for spec in test_ops.SPECS
        for i in range(len(spec.shapes))
    ]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("spec, case", _spec_cases())
def test_every_op_spec_runs_bitwise_like_eager(spec, case, dtype):
    import test_ops

    arrays, diff = test_ops._inputs(spec, case)
    arrays = [a.astype(dtype) if a.dtype.kind == "f" else a for a in arrays]
    w = test_ops._weight(spec, case, ())  # a fixed scalar weight per case

    def fn(p, *d):
        it = iter(d)
        xs = [p[f"p{i}"] if i in diff else next(it) for i in range(len(arrays))]
        out = spec.gm(gm, *xs)
        return out.to(gm.float64).sum() * float(w)

    params = {f"p{i}": gm.tensor(arrays[i]) for i in diff}
    data = {f"x{j}": a for j, a in enumerate(a for i, a in enumerate(arrays) if i not in diff)}
    g = trace(fn, params, *data.values(), batch_dim=False)
    try:
        vg = validate(g)
    except GraphError:
        if any(n.op == "nonzero" for n in g.nodes):
            return  # boolean masks: shapes that depend on the data are refused
        raise
    plan = compile_plan(vg, {n: a.shape for n, a in data.items()})
    result = plan.run({n: t.numpy() for n, t in params.items()}, data)

    leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
    loss = fn(leaves, *[gm.tensor(a) for a in data.values()])
    if loss.requires_grad:
        loss.backward()
    grads = {
        n: (t.grad.numpy() if t.grad is not None else np.zeros_like(t.detach().numpy()))
        for n, t in leaves.items()
    }
    assert_bitwise(result, loss.detach().numpy(), grads)


# ---------------------------------------------------------------------------------------
# Memory, requested gradients, loss scale
# ---------------------------------------------------------------------------------------


def test_forward_only_frees_every_intermediate_after_its_last_use():
    model = mlp()
    x, y = data(16, (3, 4))
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
    live = []
    result = plan.run(params_of(model), {"x": x, "y": y}, grads=[], record_live=live)
    assert result.grads == {}
    n_in = len(vg.graph.inputs)
    # A chain: at most the remaining inputs, the value just made and the one it reads.
    assert max(live) <= n_in + 1
    assert live[-1] == 1  # only the loss is left
    assert len(live) == len(vg.graph.nodes)


def test_backward_keeps_only_what_vjps_need_and_frees_it_all():
    model = mlp()
    x, y = data(16, (3, 4))
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
    live = []
    plan.run(params_of(model), {"x": x, "y": y}, record_live=live)
    n_fwd = len(vg.graph.nodes)
    # x is only read by flatten, whose input needs no gradient: freed after the first kernel.
    assert live[0] == len(vg.graph.inputs)
    # Backward frees as it goes: strictly fewer slots at the end than at its start.
    assert live[-1] == 1 and live[n_fwd] < live[n_fwd - 1]
    assert all(b <= a for a, b in zip(live[n_fwd:], live[n_fwd + 1 :]))


def test_values_that_need_no_gradient_are_freed_during_forward():
    def fn(p, x):
        t = x.exp().log().sin().cos()  # a chain on data only
        return (t * p["w"]).sum()

    vg = validate(trace(fn, {"w": gm.ones(3)}, np.ones((4, 3), np.float32)))
    plan = compile_plan(vg, {"x0": (4, 3)})
    live = []
    plan.run({"w": np.ones(3, np.float32)}, {"x0": np.ones((4, 3), np.float32)}, record_live=live)
    assert live[:4] == [2, 2, 2, 2]  # w and one value of the chain


def test_integer_values_and_gradient_stops_get_no_backward_kernel():
    """As in eager: argmax's int64 result, comparisons and a stop_gradient carry no
    gradient, so backward visits neither them nor what is computed from them alone, and
    a parameter read only through a stop gets zeros."""

    def fn(p, x):
        h = x @ p["w"]
        picked = h.gather(1, h.argmax(1, keepdim=True))  # max(dim) as composed
        mask = (h > 0).float()
        return (picked * h.detach()).sum() + (mask * h).sum() + p["v"].detach().sum()

    params = {"w": np.arange(6, dtype=np.float32).reshape(3, 2) - 2.5, "v": np.ones(2, np.float32)}
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    vg = validate(trace(fn, {n: gm.tensor(a) for n, a in params.items()}, x))
    plan = compile_plan(vg, {"x0": x.shape})
    n_in = vg.num_inputs
    no_grad_ops = {"argmax", "gt", "cast", "stop_gradient"}
    assert no_grad_ops <= set(op.name for op in vg.ops)
    for k, op in enumerate(vg.ops):
        assert plan.requires[n_in + k] == (
            op.name not in no_grad_ops and any(plan.requires[i] for i in vg.node_inputs[k])
        )
    backward_ops = {kern.op.name for kern in plan.schedule().backward}
    assert not backward_ops & no_grad_ops, backward_ops
    result = plan.run(params, {"x0": x})
    leaves = {n: gm.tensor(a, requires_grad=True) for n, a in params.items()}
    loss = fn(leaves, gm.tensor(x))
    loss.backward()
    assert np.array_equal(result.loss, loss.detach().numpy())
    assert np.array_equal(result.grads["w"], leaves["w"].grad.numpy())
    assert leaves["v"].grad is None and np.array_equal(result.grads["v"], np.zeros(2))
    assert plan.grad_order() == ("v", "w")  # "v" is final before backward starts


def test_requested_gradients_only_and_unused_params_get_zeros():
    model = mlp()
    x, y = data(8, (3, 4))
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
    _, _, grads = eager(model, classify, x, y)
    r = plan.run(params_of(model), {"x": x, "y": y}, grads=["5.bias", "1.weight"])
    assert list(r.grads) == ["5.bias", "1.weight"]
    for n in r.grads:
        assert np.array_equal(r.grads[n], grads[n])
    # A parameter the loss does not depend on gets zeros.
    g = trace(
        lambda p, x: (p["a"] * x).sum(),
        {"a": gm.ones(3), "b": gm.ones(2)},
        np.ones((2, 3), np.float32),
    )
    plan = compile_plan(validate(g), {"x0": (2, 3)})
    r = plan.run(
        {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)},
        {"x0": np.ones((2, 3), np.float32)},
    )
    assert np.array_equal(r.grads["b"], np.zeros(2, np.float32))
    assert np.array_equal(r.grads["a"], np.full(3, 2.0, np.float32))


def test_loss_scale_equals_eager_backward_of_the_scaled_loss():
    model = mlp()
    x, y = data(8, (3, 4))
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
    r = plan.run(params_of(model), {"x": x, "y": y}, loss_scale=0.375)
    loss, _, grads = eager(model, classify, x, y, scale=0.375)
    assert_bitwise(r, (loss * np.float32(0.375)).astype(np.float32), grads)


def test_run_errors_name_the_field():
    model = mlp()
    x, y = data(8, (3, 4))
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
    params = params_of(model)
    cases = [
        (dict(params={k: v for k, v in params.items() if k != "1.bias"}), "parameters[1.bias]"),
        (
            dict(params={**params, "1.bias": params["1.bias"].astype(np.float64)}),
            "parameters[1.bias].dtype",
        ),
        (dict(data={"x": x[:, :2], "y": y}), "data[x].shape"),
        (dict(grads=["nope"]), "gradients[nope]"),
        (dict(outputs=["nope"]), "outputs[nope]"),
    ]
    for kw, field in cases:
        args = {"params": params, "data": {"x": x, "y": y}, **kw}
        with pytest.raises(GraphError) as e:
            plan.run(args.pop("params"), args.pop("data"), **args)
        assert e.value.field == field
    with pytest.raises(ValueError, match="backend"):
        compile_plan(vg, {"x": x.shape, "y": y.shape}, backend="tpu")


# ---------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------


def dropout_net(p, x):
    h = F.dropout(x @ p["w"], 0.5)
    return F.dropout(h.relu(), 0.25).sum()


def test_dropout_is_a_function_of_the_call_seed():
    w = {"w": gm.randn(6, 8)}
    x = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
    vg = validate(trace(dropout_net, w, x))
    params = {"w": w["w"].numpy()}
    a = compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x}, seed=11)
    b = compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x}, seed=11)  # "another worker"
    c = compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x}, seed=12)
    assert np.array_equal(a.loss, b.loss) and np.array_equal(a.grads["w"], b.grads["w"])
    assert not np.array_equal(a.grads["w"], c.grads["w"])
    # The reference executor derives the same seeds.
    ref = execute(vg, {"w": gm.tensor(params["w"], requires_grad=True)}, {"x0": x}, seed=11)
    assert np.array_equal(ref["loss"].detach().numpy(), a.loss)


def test_without_a_call_seed_the_recorded_seeds_reproduce_the_traced_run():
    w = {"w": gm.randn(6, 8, requires_grad=True)}
    x = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
    gm.manual_seed(99)
    vg = validate(trace(dropout_net, w, x))
    gm.manual_seed(99)
    loss = dropout_net(w, gm.tensor(x))
    loss.backward()
    r = compile_plan(vg, {"x0": x.shape}).run({"w": w["w"].detach().numpy()}, {"x0": x})
    assert_bitwise(r, loss.detach().numpy(), {"w": w["w"].grad.numpy()})


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------


def _cuda_or_skip():
    try:
        import cupy  # noqa: F401
    except ImportError:
        pytest.skip("CuPy is not installed")
    if not gm.cuda_available():
        pytest.skip("no CUDA device")


@pytest.mark.gpu
def test_cuda_plan_matches_cpu_plan():
    _cuda_or_skip()
    model = mlp()
    x, y = data(64, (3, 4))
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    shapes = {"x": x.shape, "y": y.shape}
    cpu = compile_plan(vg, shapes).run(params_of(model), {"x": x, "y": y}, outputs=["logits"])
    gpu = compile_plan(vg, shapes, backend="cuda").run(
        params_of(model), {"x": x, "y": y}, outputs=["logits"]
    )
    assert isinstance(gpu.loss, np.ndarray) and isinstance(gpu.grads["1.weight"], np.ndarray)
    np.testing.assert_allclose(gpu.loss, cpu.loss, rtol=1e-5)
    for n in cpu.grads:
        np.testing.assert_allclose(gpu.grads[n], cpu.grads[n], rtol=1e-4, atol=1e-6)
    # Deterministic on the device, too: the same call twice gives the same bits.
    again = compile_plan(vg, shapes, backend="cuda").run(params_of(model), {"x": x, "y": y})
    for n in cpu.grads:
        assert np.array_equal(gpu.grads[n], again.grads[n])


def test_check_is_called_and_can_abandon_the_run():
    model = mlp()
    x, y = data(8, (3, 4))
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
    calls = []
    plan.run(params_of(model), {"x": x, "y": y}, check=lambda: calls.append(1))
    assert len(calls) >= 2  # at least at the start and between the passes

    class Abandon(Exception):
        pass

    def stop():
        raise Abandon

    with pytest.raises(Abandon):
        plan.run(params_of(model), {"x": x, "y": y}, check=stop)


def test_on_grad_hands_each_gradient_over_as_soon_as_backward_has_finished_it():
    model = mlp()
    x, y = data(16, (3, 4))
    vg = validate(trace(classify, model, x, y, data_names=["x", "y"]))
    plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
    live, events = [], []
    result = plan.run(
        params_of(model),
        {"x": x, "y": y},
        outputs=["logits"],
        record_live=live,
        on_forward=lambda loss, outs: events.append(("forward", loss, outs, len(live))),
        on_grad=lambda name, a: events.append(("grad", name, a, len(live))),
    )
    loss, extra, grads = eager(model, classify, x, y)
    assert_bitwise(result, loss, grads, extra)
    n_fwd = len(vg.graph.nodes)
    # The loss and outputs when forward ends, before any gradient.
    assert events[0][0] == "forward" and events[0][3] == n_fwd
    assert np.array_equal(events[0][1], loss) and list(events[0][2]) == ["logits"]
    # Every gradient once, in grad_order: the last layer's first, each the array the
    # result holds, bitwise equal to eager's.
    got = [(name, a, at) for kind, name, a, at in events[1:]]
    order = plan.grad_order()
    assert [n for n, _, _ in got] == list(order)
    assert set(order) == set(grads) and order[:2] == ("5.weight", "5.bias")
    assert order[-2:] == ("1.weight", "1.bias")
    for name, a, _ in got:
        assert a is result.grads[name] and np.array_equal(a, grads[name])
    # While backward runs: the last layer's gradients long before the last kernel.
    n_bwd = len(live) - n_fwd
    assert got[0][2] < n_fwd + n_bwd // 2 and got[-1][2] <= len(live)
    # Gradients arrive strictly kernel by kernel: never before the kernel that ends them.
    assert [at for _, _, at in got] == sorted(at for _, _, at in got)


def test_on_grad_with_requested_subset_unreachable_params_and_forward_only():
    g = trace(
        lambda p, x: (p["a"] * x).sum(),
        {"a": gm.ones(3), "b": gm.ones(2)},
        np.ones((2, 3), np.float32),
    )
    plan = compile_plan(validate(g), {"x0": (2, 3)})
    seen = []
    p = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    r = plan.run(
        p, {"x0": np.ones((2, 3), np.float32)}, on_grad=lambda n, a: seen.append((n, a.copy()))
    )
    # "b" is final before backward starts (zeros): it comes first.
    assert plan.grad_order() == ("b", "a") and [n for n, _ in seen] == ["b", "a"]
    assert np.array_equal(seen[0][1], np.zeros(2, np.float32))
    assert list(r.grads) == ["a", "b"]  # the result keeps the requested order
    seen.clear()
    r = plan.run(
        p, {"x0": np.ones((2, 3), np.float32)}, grads=["a"], on_grad=lambda n, a: seen.append(n)
    )
    assert seen == ["a"] and list(r.grads) == ["a"]
    seen.clear()
    plan.run(p, {"x0": np.ones((2, 3), np.float32)}, grads=[], on_grad=lambda n, a: seen.append(n))
    assert seen == []
    # The loss is a parameter itself: its gradient is the seed.
    g = trace(lambda p, x: p["s"], {"s": gm.ones(())}, np.ones((2, 3), np.float32))
    plan = compile_plan(validate(g), {"x0": (2, 3)})
    r = plan.run(
        {"s": np.float32(2.0).reshape(())},
        {"x0": np.ones((2, 3), np.float32)},
        loss_scale=0.5,
        on_grad=lambda n, a: seen.append((n, a)),
    )
    assert [n for n, _ in seen] == ["s"] and float(seen[0][1]) == 0.5
