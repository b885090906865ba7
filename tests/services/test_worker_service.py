"""Remote gradients equal local ``loss.backward()`` bit for bit (CPU backend), over the unary
and the streaming RPC, for an MLP and a small CNN at batch sizes 1 and 512."""

from __future__ import annotations

import numpy as np
import pytest
from test_worker_raw_grpc import W, X, float32_tensor, hand_graph
from test_worker_raw_grpc import expected as hand_expected

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.client import WorkerClient
from gradmesh.core import nn
from gradmesh.core.backend import cuda_available
from gradmesh.server import runtime
from gradmesh.server import worker as worker_mod
from gradmesh.server.worker.calls import WorkerLimits
from gradmesh.server.worker.replies import limits_message
from gradmesh.v1 import tensor_pb2, worker_pb2


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 10),
    )


def ce_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def batch(kind: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    shape = (n, 20) if kind == "mlp" else (n, 1, 8, 8)
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, n)


def local_grads(model, x, y):
    model.zero_grad()
    loss = ce_loss(model, gm.from_numpy(x), gm.from_numpy(y))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss.detach().numpy().copy(), grads


@pytest.fixture(scope="module")
def clients(worker):
    with (
        WorkerClient(worker.address, shared_memory=False) as unary,
        WorkerClient(worker.address, stream_threshold=0, shared_memory=False) as streaming,
        WorkerClient(worker.address, shared_memory_min_bytes=0) as shared,
    ):
        yield {"unary": unary, "stream": streaming, "shared": shared}


@pytest.mark.parametrize("path", ["unary", "stream", "shared"])
@pytest.mark.parametrize("n", [1, 512])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_bitwise_equal_to_local_backward(clients, kind, n, path):
    gm.manual_seed(0)
    model = mlp() if kind == "mlp" else cnn()
    x, y = batch(kind, n, seed=n)
    loss, grads = local_grads(model, x, y)

    result = clients[path].compute_gradients(ce_loss, model, x, y)
    assert result.timings["streamed"] == (path == "stream")
    assert result.timings["shared_memory"] == (path == "shared")
    assert np.array_equal(result.loss, loss)
    assert list(result.gradients) == [name for name, _ in model.named_parameters()]
    for name, g in grads.items():
        assert result.gradients[name].dtype == g.dtype
        assert np.array_equal(result.gradients[name], g), name


def test_backward_accumulates_like_local(clients):
    gm.manual_seed(1)
    model = mlp()
    x, y = batch("mlp", 32, seed=3)
    _, grads = local_grads(model, x, y)
    # Two local backward() calls accumulate: g + g.
    model.zero_grad()
    for _ in range(2):
        ce_loss(model, gm.from_numpy(x), gm.from_numpy(y)).backward()
    twice = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    model.zero_grad()

    client = clients["unary"]
    loss = client.backward(model, ce_loss, x, y)
    assert isinstance(loss, gm.Tensor) and loss.ndim == 0
    for name, p in model.named_parameters():
        assert np.array_equal(p.grad.numpy(), grads[name])
    client.backward(model, ce_loss, x, y)
    for name, p in model.named_parameters():
        assert np.array_equal(p.grad.numpy(), twice[name])


def test_frozen_parameters_get_no_grad(clients):
    gm.manual_seed(2)
    model = mlp()
    model[0].weight.requires_grad = False
    x, y = batch("mlp", 8, seed=4)
    clients["unary"].backward(model, ce_loss, x, y)
    assert model[0].weight.grad is None
    assert model[0].bias.grad is not None


def test_graph_registered_once_then_sent_by_id(worker):
    gm.manual_seed(3)
    model = mlp()
    x, y = batch("mlp", 16, seed=5)
    with WorkerClient(worker.address) as client:
        first = client.compute_gradients(ce_loss, model, x, y)
        second = client.compute_gradients(ce_loss, model, x, y)
        assert first.graph_id == second.graph_id
        assert second.timings["plan_cached"]
        assert client._registered == {first.graph_id: first.graph_id}
        # Another batch size reuses the graph (batch dimension free) if the tracer made it
        # so; either way the result is right.
        x2, y2 = batch("mlp", 24, seed=6)
        loss, grads = local_grads(model, x2, y2)
        third = client.compute_gradients(ce_loss, model, x2, y2)
        assert all(np.array_equal(third.gradients[n], g) for n, g in grads.items())


def test_dict_params_outputs_and_selected_gradients(worker):
    rng = np.random.default_rng(7)
    params = {
        "w": rng.standard_normal((5, 3)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
    }

    def fn(p, x):
        out = x @ p["w"] + p["b"]
        return (out * out).mean(), {"out": out}

    x = rng.standard_normal((4, 5)).astype(np.float32)
    with WorkerClient(worker.address) as client:
        r = client.compute_gradients(
            fn, params, x, outputs=["out"], gradients=["b"], as_tensors=True
        )
    w = gm.tensor(params["w"], requires_grad=True)
    b = gm.tensor(params["b"], requires_grad=True)
    out = gm.from_numpy(x) @ w + b
    loss = (out * out).mean()
    loss.backward()
    assert isinstance(r.loss, gm.Tensor)
    assert np.array_equal(r.outputs["out"].numpy(), out.detach().numpy())
    assert list(r.gradients) == ["b"]
    assert np.array_equal(r.gradients["b"].numpy(), b.grad.numpy())


def test_loss_scale_and_seed(worker):
    gm.manual_seed(4)
    model = mlp()
    x, y = batch("mlp", 8, seed=8)
    with WorkerClient(worker.address) as client:
        a = client.compute_gradients(ce_loss, model, x, y, loss_scale=0.25, seed=1)
        b = client.compute_gradients(ce_loss, model, x, y, loss_scale=1.0, seed=1)
    # A power of two scales exactly.
    assert np.array_equal(a.loss, b.loss * np.float32(0.25))
    for n in b.gradients:
        assert np.array_equal(a.gradients[n], b.gradients[n] * np.float32(0.25))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["stream", "shared"])
def test_300mb_parameters(worker, path):
    """300 MB of float32 parameters in, 300 MB of gradients out, bitwise equal, over the
    stream and through shared memory."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((7_500, 10_000), dtype=np.float32)  # 300 MB
    x = rng.standard_normal((2, 10_000), dtype=np.float32)

    def fn(p, x):
        return (x @ p["w"].T).sum()

    with WorkerClient(worker.address, timeout=120, shared_memory=path == "shared") as client:
        r = client.compute_gradients(fn, {"w": w}, x)
    assert r.timings["streamed"] == (path == "stream")
    assert r.timings["shared_memory"] == (path == "shared")
    wt = gm.tensor(w, requires_grad=True)
    fn({"w": wt}, gm.from_numpy(x)).backward()
    assert r.gradients["w"].shape == w.shape
    assert np.array_equal(r.gradients["w"], wt.grad.numpy())


def test_cuda_backend_refused_without_gpu():
    if cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(runtime.ConfigError, match="CuPy and a CUDA device"):
        worker_mod.GradientWorker("cuda")


@pytest.mark.gpu
def test_cuda_backend_matches_cpu(start_worker):
    if not cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    running = start_worker(backend="cuda")
    gm.manual_seed(5)
    model = cnn()
    x, y = batch("cnn", 64, seed=11)
    loss, grads = local_grads(model, x, y)
    # unary, stream, and shared memory (gradients copied from the device into the segment)
    for path in ("unary", "stream", "shared"):
        with WorkerClient(
            running.address, shared_memory=path == "shared", shared_memory_min_bytes=0
        ) as client:
            caps = client.capabilities()
            assert caps.backend == "cuda" and "cupy" in caps.versions
            if path == "stream":
                client.stream_threshold = 0
            r = client.compute_gradients(ce_loss, model, x, y)
            assert r.timings["shared_memory"] == (path == "shared"), path
            assert r.timings["streamed"] == (path == "stream"), path
            assert np.allclose(r.loss, loss, rtol=1e-5, atol=1e-6)
            for name, g in grads.items():
                assert isinstance(r.gradients[name], np.ndarray)
                assert np.allclose(r.gradients[name], g, rtol=1e-4, atol=1e-5), (path, name)


def test_unary_reply_bytes_are_protobufs():
    """The worker writes its unary reply's tensors by hand: the bytes must be exactly what
    protobuf writes for the same message."""
    w = worker_mod.GradientWorker("cpu")
    req = worker_pb2.ComputeGradientsRequest(
        graph=hand_graph(),
        outputs=["logits"],
        parameters=[tensor_pb2.NamedTensor(name="w", tensor=float32_tensor(W, [3, 2]))],
        data=[tensor_pb2.NamedTensor(name="x", tensor=float32_tensor(X, [2, 3]))],
    )
    prepared = w.prepare(req)
    computed = w.compute(prepared, *w.decode(prepared))
    expected, _ = worker_mod.build_response(prepared, computed)
    expected.ClearField("graph_id")
    assert b"".join(worker_mod.response_pieces(computed)) == expected.SerializeToString()


def test_the_worker_logic_takes_plain_values():
    """GradientWorker works on plain values (no gRPC, no request message): a
    GradientRequest of named bytes, arrays back; the arrays are views of those bytes."""
    w = worker_mod.GradientWorker("cpu")
    graph_id = w.register(hand_graph())
    w_bytes = np.array(W, "<f4").tobytes()
    call = worker_mod.GradientRequest(
        graph_id=graph_id,
        outputs=["logits"],
        parameters=[worker_mod.TensorRef("w", tensor_pb2.FLOAT32, (3, 2), w_bytes)],
        data=[worker_mod.TensorRef("x", tensor_pb2.FLOAT32, (2, 3), np.array(X, "<f4").tobytes())],
    )
    prepared, params, data, views = w.unary(call, same_host=False)
    assert views is None and params["w"].base is not None  # no copy of the bytes
    computed = w.compute(prepared, params, data)
    loss, logits, grad = hand_expected()
    assert float(computed.loss) == loss
    assert computed.outputs[0][1].ravel().tolist() == logits
    assert [n for n, _ in computed.gradients] == ["w"]
    assert computed.gradients[0][1].ravel().tolist() == grad
    with pytest.raises(runtime.ServiceError) as e:
        w.prepare(worker_mod.GradientRequest(graph_id=graph_id, parameters=call.parameters))
    assert (e.value.code.name, e.value.field) == ("INVALID_ARGUMENT", "data[x]")


def test_limits_message_carries_the_worker_limits():
    limits = WorkerLimits(max_graph_nodes=7, chunk_bytes=1 << 20)
    msg = limits_message(limits)
    assert isinstance(msg, worker_pb2.Limits)
    assert msg.max_graph_nodes == 7 and msg.chunk_bytes == 1 << 20
