"""BatchNorm running statistics through a worker: the buffers travel with the parameters
and come back updated, over unary messages, the stream and shared memory, bitwise equal to
running the model locally in train mode (worker.proto, buffers)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from models import bn_cnn, cross_entropy

import gradmesh.core as gm
from gradmesh.client import WorkerClient
from gradmesh.core import graph as core_graph
from gradmesh.wire.errors import GradmeshError


def _batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, n)


def _buffers(model) -> dict[str, np.ndarray]:
    return {n: b.numpy().copy() for n, b in model.named_buffers()}


def _local_step(model, x, y):
    """Loss, gradients and new buffers of one local train-mode forward and backward."""
    model.zero_grad()
    loss = cross_entropy(model, gm.from_numpy(x), gm.from_numpy(y))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss.detach().numpy().copy(), grads, _buffers(model)


@pytest.fixture(scope="module")
def clients(worker):
    with (
        WorkerClient(worker.address, shared_memory=False) as unary,
        WorkerClient(worker.address, stream_threshold=0, shared_memory=False) as streaming,
        WorkerClient(worker.address, shared_memory_min_bytes=0) as shared,
    ):
        yield {"unary": unary, "stream": streaming, "shared": shared}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("path", ["unary", "stream", "shared"])
def test_two_calls_move_the_buffers_as_two_local_steps(clients, path, momentum):
    local, remote = bn_cnn(seed=2, momentum=momentum), bn_cnn(seed=2, momentum=momentum)

    def loss_fn(model, x, y):  # a function per model: clients cache graphs per function
        return cross_entropy(model, x, y)

    for call in range(2):
        x, y = _batch(6 + call, seed=call)
        loss, grads, buffers = _local_step(local, x, y)
        result = clients[path].compute_gradients(loss_fn, remote, x, y)
        assert result.timings["streamed"] == (path == "stream")
        assert result.timings["shared_memory"] == (path == "shared")
        assert np.array_equal(result.loss, loss)
        assert list(result.gradients) == [n for n, _ in remote.named_parameters()]
        for name, g in grads.items():
            assert np.array_equal(result.gradients[name], g), name
        assert set(result.buffers) == set(buffers)
        for name, b in buffers.items():
            assert result.buffers[name].dtype == b.dtype
            assert np.array_equal(result.buffers[name], b), name
            # Written back into the module, as the local forward did.
            assert np.array_equal(dict(remote.named_buffers())[name].numpy(), b), name
    assert int(remote[1].num_batches_tracked.item()) == 2


def test_backward_fills_grads_and_moves_the_buffers(clients):
    local, remote = bn_cnn(seed=3), bn_cnn(seed=3)
    x, y = _batch(5, seed=7)
    loss, grads, buffers = _local_step(local, x, y)
    got = clients["unary"].backward(remote, cross_entropy, x, y)
    assert np.array_equal(got.numpy(), loss)
    for name, p in remote.named_parameters():
        assert np.array_equal(p.grad.numpy(), grads[name]), name
    for name, b in remote.named_buffers():
        assert np.array_equal(b.numpy(), buffers[name]), name


def test_update_buffers_false_leaves_the_module_alone(clients):
    model = bn_cnn(seed=4)
    before = _buffers(model)
    result = clients["unary"].compute_gradients(
        cross_entropy, model, *_batch(4, seed=1), update_buffers=False
    )
    for name, b in before.items():
        assert np.array_equal(_buffers(model)[name], b), name
    assert not np.array_equal(result.buffers["1.running_mean"], before["1.running_mean"])


def test_eval_mode_has_no_buffer_state(clients):
    model = bn_cnn(seed=5)
    model.eval()
    x, y = _batch(4, seed=2)
    graph = core_graph.trace(cross_entropy, model, x, y)
    assert not [i for i in graph.inputs if i.role == i.BUFFER]
    result = clients["unary"].compute_gradients(graph, model, x, y)
    assert result.buffers == {}
    want = cross_entropy(model, gm.from_numpy(x), gm.from_numpy(y))
    assert np.array_equal(result.loss, want.detach().numpy())


def _graph_and_params(model, x, y):
    graph = core_graph.trace(cross_entropy, model, x, y)
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    return graph, params


def test_a_missing_buffer_is_invalid_argument_naming_it(clients):
    model = bn_cnn(seed=6)
    x, y = _batch(4, seed=3)
    graph, params = _graph_and_params(model, x, y)
    with pytest.raises(GradmeshError) as err:
        clients["unary"].compute_gradients(graph, params, x, y)  # a dict: no buffers
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field == "parameters[1.running_mean]"
    assert "missing buffer" in err.value.message


def test_a_buffer_of_the_wrong_shape_or_dtype_is_invalid_argument(clients):
    model = bn_cnn(seed=6)
    x, y = _batch(4, seed=3)
    graph, params = _graph_and_params(model, x, y)
    buffers = _buffers(model)
    for name, bad, what in (
        ("1.running_var", np.ones(5, np.float32), "shape"),
        ("1.num_batches_tracked", np.zeros((), np.int32), "dtype"),
    ):
        given = {**params, **buffers, name: bad}
        with pytest.raises(GradmeshError) as err:
            clients["unary"].compute_gradients(graph, given, x, y)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.field == f"parameters[{name}].{what}"


def test_a_gradient_of_a_buffer_is_refused(clients):
    model = bn_cnn(seed=6)
    x, y = _batch(4, seed=3)
    with pytest.raises(GradmeshError) as err:
        clients["unary"].compute_gradients(cross_entropy, model, x, y, gradients=["1.running_mean"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field.startswith("gradients")
