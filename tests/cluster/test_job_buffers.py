"""BatchNorm running statistics as coordinator job state (docs/training.md, "Buffers"):
each micro-batch normalises with its own statistics, the step's new buffers are the
micro-batches' updates combined in micro-batch order, and parameters AND buffers after
N steps are bitwise identical with 1 and 3 workers, equal to a single-process reference
run of the same micro-batching, and survive coordinator restarts.

Workers and coordinators run in this process (real gRPC servers on 127.0.0.1), so every
configuration uses one BLAS build and thread count.
"""

from __future__ import annotations

from collections import OrderedDict

import grpc
import numpy as np
import pytest
from models import bn_cnn, cross_entropy

import gradmesh.core as gm
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.core import graph as core_graph
from gradmesh.core import optim
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import workers as workers_mod
from gradmesh.server.aggregate import loss_scales, micro_batches, tree_sum
from gradmesh.v1 import coordinator_pb2
from gradmesh.wire.errors import GradmeshError
from gradmesh.wire.shard import optimizer_to_proto

STEPS = 4
BATCH, MICRO = 10, 4  # micro-batches of 4, 4 and 2 rows
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
JOB = "bn"


def _data():
    rng = np.random.default_rng(21)
    return [
        (
            rng.standard_normal((BATCH, 1, 6, 6)).astype(np.float32),
            rng.integers(0, 3, BATCH).astype(np.int64),
        )
        for _ in range(STEPS)
    ]


def _loss(model, x, y):
    return cross_entropy(model, x, y)


def reference_training(model, data, micro_batch_size: int, optimizer: dict) -> dict:
    """A single-process run of the coordinator's micro-batching, eagerly: per step, each
    micro-batch runs forward and backward in train mode from the step's starting buffers
    (its loss weighted by its share of the rows); the gradients are tree-summed and the
    optimizer applied as the shards do; the new floating buffers are the micro-batches'
    updates averaged with the same weights (float64, in micro-batch order, rounded once),
    the integer ones (num_batches_tracked) advance once per step. Returns the state dict
    as arrays."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = {n: {} for n in params}
    hyper = optim.validate(optimizer)
    update = optim.UPDATE_RULES[hyper.pop("name")]
    for x, y in data:
        start_buffers = {n: b.numpy().copy() for n, b in buffers.items()}
        grads, updates = [], []
        ranges, weights = (
            micro_batches(len(x), micro_batch_size),
            loss_scales(len(x), micro_batch_size),
        )
        for (lo, hi), weight in zip(ranges, weights):
            for n, b in buffers.items():
                b._data[...] = start_buffers[n]
            model.zero_grad()
            loss = _loss(model, gm.from_numpy(x[lo:hi]), gm.from_numpy(y[lo:hi]))
            loss.backward(gm.tensor(np.float32(weight)))
            grads.append({n: p.grad.numpy().copy() for n, p in params.items()})
            updates.append({n: b.numpy().copy() for n, b in buffers.items()})
        for n, b in buffers.items():
            if np.issubdtype(b.numpy().dtype, np.floating):
                mean = sum(
                    (np.float64(w) * u[n].astype(np.float64) for u, w in zip(updates, weights)),
                    np.zeros(b.shape, np.float64),
                )
                b._data[...] = mean.astype(b.numpy().dtype)
            else:
                b._data[...] = start_buffers[n] + 1
        for n, p in params.items():
            update(np, p._data, tree_sum([g[n] for g in grads]), state[n], **hyper)
    model.zero_grad()
    return {n: t.numpy().copy() for n, t in model.state_dict().items()}


WORKERS = 3  # conftest's ``workers`` fixture starts so many


@pytest.fixture(scope="module")
def reference():
    return reference_training(bn_cnn(seed=1), _data(), MICRO, SGD)


def _run(addresses, steps, **kw) -> tuple[dict, list]:
    server = coordinator_mod.start(workers=addresses, **kw)
    try:
        with CoordinatorClient(server.address) as client:
            data = _data()
            job = client.create_job(
                bn_cnn(seed=1), _loss, SGD, MICRO, data[0], job_id=JOB, data_names=["x", "y"]
            )
            losses = [job.step(x, y).loss for x, y in data[:steps]]
            return {n: t.numpy() for n, t in job.parameters().items()}, losses
    finally:
        server.stop(0)
        server.coordinator.close()


def test_parameters_and_buffers_bitwise_equal_with_1_and_3_workers_and_the_reference(
    workers, reference, monkeypatch
):
    one, losses_one = _run(workers[:1], STEPS)  # through shared memory
    three, losses_three = _run(workers, STEPS, embedded_shards=2, shared_memory=False)
    monkeypatch.setattr(workers_mod, "UNARY_MAX_BYTES", 1024)  # every call streamed
    streamed, losses_streamed = _run(workers[1:], STEPS, shared_memory=False)
    assert losses_one == losses_three == losses_streamed
    model = bn_cnn(seed=1)
    assert set(one) == set(model.state_dict())  # a complete state dict, buffers too
    assert int(one["1.num_batches_tracked"]) == STEPS  # once per step, not per micro-batch
    for name, want in reference.items():
        assert one[name].dtype == want.dtype, name
        for got in (one, three, streamed):
            assert np.array_equal(got[name], want), name
    # Not vacuous: training moved the statistics.
    assert not np.array_equal(reference["1.running_var"], model[1].running_var.numpy())


def test_the_trained_state_loads_into_the_model(workers, reference):
    state, _ = _run(workers[:2], STEPS)
    model = bn_cnn(seed=1)
    model.load_state_dict({n: gm.from_numpy(a.copy()) for n, a in state.items()})
    for name, b in model.named_buffers():
        assert np.array_equal(b.numpy(), reference[name]), name


def _steps_with_a_restart(workers, tmp_path, graceful: bool) -> dict:
    kw = dict(workers=workers[:2], state_dir=str(tmp_path), checkpoint_every=100)
    data = _data()
    server = coordinator_mod.start(**kw)
    with CoordinatorClient(server.address) as client:
        job = client.create_job(
            bn_cnn(seed=1), _loss, SGD, MICRO, data[0], job_id=JOB, data_names=["x", "y"]
        )
        for x, y in data[:2]:
            job.step(x, y)
    server.stop(0)
    if graceful:
        server.coordinator.close()  # checkpoints the buffers; else the step log has them
    server = coordinator_mod.start(**kw)
    try:
        with CoordinatorClient(server.address) as client:
            job = client.job(JOB)
            assert job.next_step_id == 3
            for x, y in data[2:]:
                job.step(x, y)
            return {n: t.numpy() for n, t in job.parameters().items()}
    finally:
        server.stop(0)
        server.coordinator.close()


@pytest.mark.parametrize("graceful", [True, False], ids=["checkpoint", "crash"])
def test_buffers_survive_a_coordinator_restart(workers, reference, tmp_path, graceful):
    state = _steps_with_a_restart(workers, tmp_path, graceful)
    for name, want in reference.items():
        assert np.array_equal(state[name], want), name


def _create_request(model, data):
    graph = core_graph.trace(_loss, model, *data[0], data_names=["x", "y"])
    header = coordinator_pb2.CreateJobRequest(
        job_id="bad", graph=graph, optimizer=optimizer_to_proto(SGD), micro_batch_size=MICRO
    )
    params = OrderedDict((n, p.detach().numpy()) for n, p in model.named_parameters())
    buffers = OrderedDict((n, b.numpy()) for n, b in model.named_buffers())
    return header, params, buffers


@pytest.mark.parametrize(
    "change, field, words",
    [
        (lambda b: b.pop("1.running_var"), "parameters[1.running_var]", "no initial value"),
        (
            lambda b: b.update({"4.running_mean": np.zeros(3, np.float32)}),
            "parameters[4.running_mean]",
            "shape",
        ),
    ],
    ids=["missing", "wrong-shape"],
)
def test_create_job_checks_the_buffers_naming_the_field(workers, change, field, words):
    server = coordinator_mod.start(workers=workers[:1])
    try:
        with CoordinatorClient(server.address, retry_seconds=0.0) as client:
            header, params, buffers = _create_request(bn_cnn(seed=1), _data())
            change(buffers)
            with pytest.raises(GradmeshError) as err:
                client.create(header, OrderedDict({**params, **buffers}))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.field == field
            assert words in err.value.message
    finally:
        server.stop(0)
        server.coordinator.close()


def test_get_parameters_by_name_returns_a_buffer(workers):
    server = coordinator_mod.start(workers=workers[:1])
    try:
        with CoordinatorClient(server.address) as client:
            data = _data()
            job = client.create_job(bn_cnn(seed=1), _loss, SGD, MICRO, data[0], job_id=JOB)
            job.step(*data[0])
            version, got = client.get_parameters(JOB, ["1.num_batches_tracked", "0.bias"])
            assert version == 1 and list(got) == ["1.num_batches_tracked", "0.bias"]
            assert got["1.num_batches_tracked"].dtype == np.int64
            assert (
                got["1.num_batches_tracked"].shape == () and int(got["1.num_batches_tracked"]) == 1
            )
    finally:
        server.stop(0)
        server.coordinator.close()
