"""Request ids (issue "Reliability and security 2", item 12): taken from the caller's
``x-request-id`` or made by the server, sent on by the coordinator to its workers and
shards, returned in error details (google.rpc.RequestInfo) and trailing metadata, and on
every log line of every server while it handles the call."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest

from gradmesh.client import CoordinatorClient, FailedPrecondition, GradmeshError, NotFound
from gradmesh.core import nn
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServerConfig
from gradmesh.server.runtime.logs import RequestIdFilter
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardStore
from gradmesh.server.worker import replies as worker_replies
from gradmesh.v1 import coordinator_pb2, coordinator_pb2_grpc
from gradmesh.wire import channel as wire_channel
from gradmesh.wire.errors import from_rpc_error


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestIdFilter())

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def records():
    handler = _Records()
    logger = logging.getLogger("gradmesh")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def cluster():
    worker = worker_mod.start("cpu")
    shard = serve_shard(ServerConfig(port=0), ShardStore())
    coordinator = coordinator_mod.start(
        workers=[worker.address], shards=[shard.address], shared_memory=False
    )
    yield coordinator
    coordinator.stop(0)
    coordinator.coordinator.close()
    shard.stop(0)
    worker.stop(0)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def test_the_callers_request_id_follows_a_step_to_workers_and_shards(cluster, records):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 3), np.float32), rng.standard_normal((8, 1), np.float32)
    with CoordinatorClient(cluster.address, retry_seconds=0.0) as client:
        job = client.create_job(
            nn.Linear(3, 1),
            _loss,
            {"name": "sgd", "lr": 0.1},
            4,
            (x, y),
            job_id="rid",
            data_names=["x", "y"],
        )
        records.clear()
        token = wire_channel.request_id.set("step-42.abc")
        try:
            job.step(x, y)  # the SDK sends the id of the context it runs in
        finally:
            wire_channel.request_id.reset(token)
    rpcs = [r for r in records if r.getMessage() == "rpc"]
    methods = {r.method for r in rpcs}
    assert "/gradmesh.v1.Coordinator/Step" in methods
    assert any(m.startswith("/gradmesh.v1.Worker/ComputeGradients") for m in methods), methods
    assert any(m.startswith("/gradmesh.v1.ParameterShard/") for m in methods), methods
    assert {r.request_id for r in rpcs} == {"step-42.abc"}, [(r.method, r.request_id) for r in rpcs]
    # Every line logged while handling the step carries it, not only the rpc lines.
    assert all(getattr(r, "request_id", None) == "step-42.abc" for r in records)


def test_errors_and_trailers_carry_the_request_id(cluster, records):
    with grpc.insecure_channel(cluster.address) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.JobStatus(
                coordinator_pb2.JobStatusRequest(job_id="nope"),
                timeout=10,
                metadata=(("x-request-id", "mine-1"),),
            )
        err = from_rpc_error(e.value)
        assert isinstance(err, NotFound) and err.request_id == "mine-1"
        assert "mine-1" in str(err)
        # Without one (or with one that is no id), the server makes one and says it.
        for md in ((), (("x-request-id", "not an id"),), (("x-request-id", "x" * 200),)):
            _, call = stub.ListWorkers.with_call(
                coordinator_pb2.ListWorkersRequest(), timeout=10, metadata=md
            )
            rid = dict(call.trailing_metadata())["x-request-id"]
            assert len(rid) == 32 and rid.isalnum()
    failed = [r for r in records if r.getMessage() == "rpc" and r.code == "NOT_FOUND"]
    assert failed and failed[0].request_id == "mine-1" and failed[0].error


def test_one_exception_class_per_status_code():
    import gradmesh.client as sdk
    from gradmesh.wire import errors

    classes = {errors.error_class(c) for c in grpc.StatusCode if c is not grpc.StatusCode.OK}
    assert len(classes) == len(grpc.StatusCode) - 1
    for cls in classes:
        assert issubclass(cls, GradmeshError) and getattr(sdk, cls.__name__) is cls
        assert errors.error_class(cls.code) is cls
    # FAILED_PRECONDITION is its own class, no longer an InvalidArgument.
    assert errors.error_class(grpc.StatusCode.FAILED_PRECONDITION) is FailedPrecondition
    assert not issubclass(FailedPrecondition, sdk.InvalidArgument)
    e = FailedPrecondition("step 3 expected")
    assert (e.code, e.message, e.field, e.request_id) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "step 3 expected",
        None,
        None,
    )


def test_worker_failed_precondition_reaches_python_as_failed_precondition():
    """FAILED_PRECONDITION used to come back as InvalidArgument: a graph moving a tensor
    to CUDA, sent to a CPU worker, raises FailedPrecondition naming the node."""
    from test_bad_requests import W, X, hand_graph

    from gradmesh.client import InvalidArgument, WorkerClient
    from gradmesh.v1 import graph_pb2

    g = hand_graph()
    g.nodes.insert(
        1,
        graph_pb2.Node(
            op="to_device", inputs=[2], attrs=[graph_pb2.Attribute(name="device", s="cuda")]
        ),
    )
    g.nodes[2].inputs[:] = [3]
    g.outputs[0].value = 4
    with (
        worker_mod.start("cpu") as running,
        WorkerClient(running.address, shared_memory=False) as client,
    ):
        with pytest.raises(FailedPrecondition) as e:
            client.compute_gradients(g, {"w": W}, X)
    assert not isinstance(e.value, InvalidArgument)
    assert e.value.field.endswith("nodes[1].attrs.device") and e.value.request_id


def test_the_plan_thread_of_an_early_stream_runs_in_the_calls_context():
    """What the plan logs while it streams gradients early carries the call's request id."""
    handover = worker_replies._Handover([], {})
    token = wire_channel.request_id.set("req-plan-thread")
    try:
        handover.run(wire_channel.request_id.get).join(timeout=30)
    finally:
        wire_channel.request_id.reset(token)
    assert handover.items.get(timeout=30) == "req-plan-thread"
