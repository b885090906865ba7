"""BatchNorm in train mode as graph state: module buffers changed in place trace into
BUFFER inputs and buffer-update outputs (graph.proto), which the executor and the plan run:
loss, gradients and new running statistics equal eager gradmesh bit for bit and PyTorch to
float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradmesh.core as gm
from gradmesh.core import graph as core_graph
from gradmesh.core.graph import BUFFER, GraphError, execute, trace, validate
from gradmesh.core.plan import compile_plan
from gradmesh.v1 import graph_pb2

CASES = [
    ("1d", {}),
    ("1d", {"affine": False}),
    ("1d", {"momentum": None}),
    ("2d", {}),
    ("2d", {"affine": False, "momentum": None}),
    ("2d", {"momentum": 0.3, "eps": 1e-3}),
    ("2d", {"track_running_stats": False}),
]


def _pair(kind: str, kw: dict, seed: int = 0):
    """The same model in gradmesh and torch: (conv or linear), BatchNorm, ReLU, linear."""
    lib_models = []
    for lib in (gm, torch):
        nn = lib.nn
        if kind == "1d":
            layers = [nn.Linear(5, 4), nn.BatchNorm1d(4, **kw), nn.ReLU(), nn.Linear(4, 3)]
        else:
            layers = [
                nn.Conv2d(2, 4, 3),
                nn.BatchNorm2d(4, **kw),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 3 * 3, 3),
            ]
        lib_models.append(nn.Sequential(*layers))
    ours, theirs = lib_models
    rng = np.random.default_rng(seed)
    for p in ours.parameters():
        p._data[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.5
    theirs.load_state_dict(
        {n: torch.from_numpy(t.numpy().copy()) for n, t in ours.state_dict().items()}
    )
    return ours, theirs


def _batch(kind: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    shape = (n, 5) if kind == "1d" else (n, 2, 5, 5)
    return rng.standard_normal(shape).astype(np.float32) * 2 + 1, rng.integers(0, 3, n)


def _loss(model, x, y):
    return gm.nn.functional.cross_entropy(model(x), y)


def _arrays(named) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().copy() for n, t in named}


@pytest.mark.parametrize("kind, kw", CASES, ids=[f"{k}-{kw}" for k, kw in CASES])
def test_three_plan_steps_equal_eager_bitwise_and_torch_closely(kind, kw):
    ours, theirs = _pair(kind, kw)
    graph = trace(_loss, ours, *_batch(kind, 4, seed=0), data_names=["x", "y"])
    tracked = kw.get("track_running_stats", True)
    buffers = [i.name for i in graph.inputs if i.role == BUFFER]
    assert buffers == (
        ["1.running_mean", "1.running_var", "1.num_batches_tracked"] if tracked else []
    )
    assert [o.buffer for o in graph.outputs[1:]] == buffers
    state = _arrays(ours.named_buffers())  # the plan's buffers, carried from call to call
    vg = validate(graph)
    for step in range(3):
        x, y = _batch(kind, 6 + step, seed=step + 1)
        plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
        result = plan.run({**_arrays(ours.named_parameters()), **state}, {"x": x, "y": y})
        state.update(result.buffers)

        ours.zero_grad()
        loss = _loss(ours, gm.from_numpy(x), gm.from_numpy(y))
        loss.backward()
        assert np.array_equal(result.loss, loss.detach().numpy())
        for name, p in ours.named_parameters():
            assert np.array_equal(result.grads[name], p.grad.numpy()), name
        assert set(result.buffers) == set(buffers)
        for name, b in ours.named_buffers():
            if b is not None:
                assert np.array_equal(state[name], b.numpy()), name

        theirs.zero_grad()
        tloss = torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        np.testing.assert_allclose(result.loss, tloss.item(), rtol=1e-5, atol=1e-6)
        for name, p in theirs.named_parameters():
            np.testing.assert_allclose(result.grads[name], p.grad.numpy(), rtol=1e-4, atol=1e-5)
        for name, b in theirs.named_buffers():
            np.testing.assert_allclose(state[name], b.numpy(), rtol=1e-5, atol=1e-6)


def test_execute_returns_the_new_buffers_as_outputs_and_leaves_inputs_alone():
    ours, _ = _pair("2d", {"momentum": None})
    x, y = _batch("2d", 4, seed=3)
    graph = trace(_loss, ours, x, y)
    before = _arrays(ours.named_buffers())
    params = dict(ours.named_parameters())
    out = execute(graph, params, {"x0": x, "x1": y}, buffers=before)
    ours(gm.from_numpy(x))
    for name, b in ours.named_buffers():
        assert np.array_equal(out[name].numpy(), b.numpy()), name
    assert before["1.num_batches_tracked"] == 0
    with pytest.raises(GraphError, match=r"buffers\[1.running_mean\]"):
        execute(graph, params, {"x0": x, "x1": y})


def test_tracing_leaves_the_module_buffers_alone_and_eval_graphs_have_none():
    ours, _ = _pair("1d", {})
    before = _arrays(ours.named_buffers())
    train_graph = trace(_loss, ours, *_batch("1d", 4, seed=0))
    for name, b in ours.named_buffers():
        assert np.array_equal(b.numpy(), before[name]), name
    ours.eval()
    eval_graph = trace(_loss, ours, *_batch("1d", 4, seed=0))
    assert not any(i.role == BUFFER for i in eval_graph.inputs)
    assert not any(o.buffer for o in eval_graph.outputs)
    assert core_graph.graph_id(eval_graph) != core_graph.graph_id(train_graph)


def test_outputs_without_a_buffer_serialize_as_before():
    # proto3 leaves an empty string out: graphs without buffers keep their bytes and ids.
    assert graph_pb2.Output(name="loss", value=5).SerializeToString() == b"\n\x04loss\x10\x05"
    model = gm.nn.Sequential(gm.nn.Linear(3, 2))
    graph = trace(lambda m, x: m(x).sum(), model, np.ones((2, 3), np.float32))
    assert all(not o.buffer for o in graph.outputs)
    stripped = graph_pb2.Graph()
    stripped.CopyFrom(graph)
    assert stripped.SerializeToString(deterministic=True) == graph.SerializeToString(
        deterministic=True
    )


def test_gradients_match_float64_finite_differences():
    ours, _ = _pair("1d", {"momentum": None})
    ours.double()
    x, y = _batch("1d", 5, seed=4)
    x = x.astype(np.float64)
    graph = trace(_loss, ours, x, y, data_names=["x", "y"])
    vg = validate(graph)
    plan = compile_plan(vg, {"x": x.shape, "y": y.shape})
    params = _arrays(ours.named_parameters())
    buffers = _arrays(ours.named_buffers())
    grads = plan.run({**params, **buffers}, {"x": x, "y": y}).grads
    eps = 1e-6
    for name in ("0.weight", "1.weight", "1.bias"):
        flat = params[name].reshape(-1)
        for k in range(0, flat.size, 3):
            old = flat[k]
            losses = []
            for h in (eps, -eps):
                flat[k] = old + h
                losses.append(
                    float(plan.run({**params, **buffers}, {"x": x, "y": y}, grads=[]).loss)
                )
            flat[k] = old
            numeric = (losses[0] - losses[1]) / (2 * eps)
            np.testing.assert_allclose(grads[name].reshape(-1)[k], numeric, rtol=1e-5, atol=1e-7)


def _bn_graph():
    ours, _ = _pair("1d", {})
    return trace(_loss, ours, *_batch("1d", 4, seed=0))


def _output(graph, name):
    return next(o for o in graph.outputs if o.name == name)


@pytest.mark.parametrize(
    "break_it, field, words",
    [
        (
            lambda g: setattr(_output(g, "1.running_var"), "buffer", "0.weight"),
            "outputs[2].buffer",
            "not a BUFFER input",
        ),
        (
            lambda g: setattr(_output(g, "1.running_var"), "buffer", "1.running_mean"),
            "outputs[2].buffer",
            "two outputs",
        ),
        (
            lambda g: setattr(g.outputs[0], "buffer", "1.running_mean"),
            "outputs[0].buffer",
            "the loss",
        ),
        (
            lambda g: setattr(
                _output(g, "1.running_var"), "value", _output(g, "1.num_batches_tracked").value
            ),
            "outputs[2].value",
            "has dtype int64",
        ),
    ],
    ids=["not-a-buffer", "twice", "loss", "wrong-dtype"],
)
def test_invalid_buffer_outputs_are_refused_naming_the_field(break_it, field, words):
    graph = _bn_graph()
    break_it(graph)
    with pytest.raises(GraphError) as err:
        validate(graph)
    assert err.value.field == field
    assert words in err.value.message


def test_a_buffer_input_needs_a_static_shape():
    graph = _bn_graph()
    buffer = next(i for i in graph.inputs if i.role == BUFFER)
    buffer.shape[0] = -1
    with pytest.raises(GraphError, match="only the first dimension of a DATA input"):
        validate(graph)


@pytest.mark.gpu
def test_cuda_plan_updates_the_buffers_as_the_cpu_plan():
    try:
        import cupy  # noqa: F401
    except ImportError:
        pytest.skip("CuPy is not installed")
    if not gm.cuda_available():
        pytest.skip("no CUDA device")
    ours, _ = _pair("2d", {"momentum": None})
    x, y = _batch("2d", 6, seed=5)
    vg = validate(trace(_loss, ours, x, y, data_names=["x", "y"]))
    inputs = {**_arrays(ours.named_parameters()), **_arrays(ours.named_buffers())}
    shapes = {"x": x.shape, "y": y.shape}
    cpu = compile_plan(vg, shapes).run(inputs, {"x": x, "y": y})
    gpu = compile_plan(vg, shapes, backend="cuda").run(inputs, {"x": x, "y": y})
    again = compile_plan(vg, shapes, backend="cuda").run(inputs, {"x": x, "y": y})
    assert set(gpu.buffers) == set(cpu.buffers)
    for name, b in cpu.buffers.items():
        assert isinstance(gpu.buffers[name], np.ndarray) and gpu.buffers[name].dtype == b.dtype
        np.testing.assert_allclose(gpu.buffers[name], b, rtol=1e-5, atol=1e-6)
        assert np.array_equal(gpu.buffers[name], again.buffers[name])


def test_a_write_through_a_view_of_a_buffer_updates_it():
    class Histogram(gm.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = gm.nn.Linear(3, 2)
            self.register_buffer("hist", gm.zeros(4))

        def forward(self, x):
            with gm.no_grad():
                self.hist[1:3] += x.mean()
            return self.lin(x)

    model = Histogram()
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    graph = trace(lambda m, x: m(x).sum(), model, x)
    assert [o.buffer for o in graph.outputs] == ["", "hist"]
    start = np.float32([1, 2, 3, 4])
    result = compile_plan(validate(graph), {"x0": (4, 3)}).run(
        {**_arrays(model.named_parameters()), "hist": start}, {"x0": x[:4]}
    )
    model.hist._data[...] = start
    model(gm.from_numpy(x[:4]))
    assert np.array_equal(result.buffers["hist"], model.hist.numpy())
    assert result.buffers["hist"][0] == 1 and result.buffers["hist"][1] != 2
