"""Bad requests get the status of their fault, never INTERNAL (issue "Reliability and
security 2", item 5): a shape with a zero dimension beside a huge one on every service
that takes tensors, a graph moving a tensor to a device the worker lacks, and a request
that needs more memory than the worker has."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServerConfig
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardStore
from gradmesh.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    graph_pb2,
    shard_pb2,
    shard_pb2_grpc,
    tensor_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

DEADLINE = 10.0
F32 = tensor_pb2.FLOAT32
PARAM, DATA, CONST = graph_pb2.Input.PARAM, graph_pb2.Input.DATA, graph_pb2.Input.CONST
HUGE = [0, 2**62]  # no element, and no array NumPy can build
W = np.arange(6, dtype=np.float32).reshape(3, 2)
X = np.ones((2, 3), np.float32)


def tensor(shape, data: bytes = b"") -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=F32, shape=shape, data=data)


def named(name, shape, data=b"") -> tensor_pb2.NamedTensor:
    return tensor_pb2.NamedTensor(name=name, tensor=tensor(shape, data))


def hand_graph(x_shape=(-1, 3)) -> graph_pb2.Graph:
    """loss = sum(x @ w)."""
    return graph_pb2.Graph(
        version=1,
        inputs=[
            graph_pb2.Input(name="w", role=PARAM, dtype=F32, shape=[3, 2]),
            graph_pb2.Input(name="x", role=DATA, dtype=F32, shape=list(x_shape)),
        ],
        nodes=[graph_pb2.Node(op="mm", inputs=[1, 0]), graph_pb2.Node(op="sum", inputs=[2])],
        outputs=[graph_pb2.Output(name="loss", value=3)],
    )


def gradient_request(graph=None, x=None) -> worker_pb2.ComputeGradientsRequest:
    return worker_pb2.ComputeGradientsRequest(
        graph=graph or hand_graph(),
        parameters=[named("w", [3, 2], W.tobytes())],
        data=[x or named("x", [2, 3], X.tobytes())],
    )


def error_of(call, *args):
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=DEADLINE)
    status = rpc_status.from_call(e.value)
    field = None
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            field = bad.field_violations[0].field
    return e.value.code(), field, e.value.details()


@pytest.fixture(scope="module")
def servers():
    worker = worker_mod.start("cpu")
    shard = serve_shard(ServerConfig(port=0), ShardStore())
    coordinator = coordinator_mod.start(workers=[worker.address])
    channels = {
        name: grpc.insecure_channel(s.address)
        for name, s in (("worker", worker), ("shard", shard), ("coordinator", coordinator))
    }
    yield worker, channels
    for ch in channels.values():
        ch.close()
    coordinator.stop(0)
    coordinator.coordinator.close()
    shard.stop(0)
    worker.stop(0)


def _frames(frame_cls, kind, header, buffers):
    yield frame_cls(**{kind: header})
    for i, buf in enumerate(buffers):
        if buf:
            yield frame_cls(chunk=tensor_pb2.Chunk(tensor_index=i, offset=0, data=buf))


def _create_job(stub, job_id, params):
    header = coordinator_pb2.CreateJobRequest(
        job_id=job_id,
        graph=hand_graph(),
        micro_batch_size=2,
        optimizer=shard_pb2.Optimizer(name="sgd", lr=0.1),
        parameters=[named(p.name, p.tensor.shape) for p in params],
    )
    buffers = [p.tensor.data for p in params]
    return stub.CreateJob(
        _frames(coordinator_pb2.CoordinatorFrame, "create_job", header, buffers), timeout=DEADLINE
    )


def test_zero_beside_huge_dimension_is_refused_everywhere(servers):
    """[0, 2**62] holds no element, but NumPy cannot describe it: every service refuses
    it in the tensor header check, naming the field, instead of answering INTERNAL."""
    _, ch = servers
    worker = worker_pb2_grpc.WorkerStub(ch["worker"])
    shard = shard_pb2_grpc.ParameterShardStub(ch["shard"])
    coordinator = coordinator_pb2_grpc.CoordinatorStub(ch["coordinator"])
    const_graph = hand_graph()
    const_graph.inputs.add(name="c", role=CONST, dtype=F32, shape=HUGE, value=tensor(HUGE))
    load = shard_pb2.LoadRequest(
        job_id="j", parameters=[named("w", HUGE)], optimizer=shard_pb2.Optimizer(name="sgd", lr=0.1)
    )
    calls = {
        "ComputeGradients": lambda **kw: worker.ComputeGradients(
            gradient_request(x=named("x", HUGE)), **kw
        ),
        "RegisterGraph": lambda **kw: worker.RegisterGraph(
            worker_pb2.RegisterGraphRequest(graph=const_graph), **kw
        ),
        "Load": lambda **kw: shard.Load(
            iter(_frames(shard_pb2.ShardFrame, "load", load, [b""])), **kw
        ),
        "CreateJob": lambda **kw: _create_job(coordinator, "huge", [named("w", HUGE)]),
        "Step": lambda **kw: coordinator.Step(
            coordinator_pb2.StepRequest(job_id="ok", step_id=1, batch=[named("x", HUGE)]), **kw
        ),
    }
    _create_job(coordinator, "ok", [named("w", [3, 2], W.tobytes())])
    for name, call in calls.items():
        code, field, message = error_of(call)
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
            f"{name}: {code.name}: {message}"
        )
        assert field and "shape" in field or "shape" in message, (name, field, message)


def test_to_device_cuda_on_a_cpu_worker_names_the_node(servers):
    _, ch = servers
    g = hand_graph()
    # loss = sum(to_device(x @ w, "cuda"))
    g.nodes.insert(
        1,
        graph_pb2.Node(
            op="to_device", inputs=[2], attrs=[graph_pb2.Attribute(name="device", s="cuda")]
        ),
    )
    g.nodes[2].inputs[:] = [3]
    g.outputs[0].value = 4
    worker = worker_pb2_grpc.WorkerStub(ch["worker"])
    for call in (
        lambda **kw: worker.RegisterGraph(worker_pb2.RegisterGraphRequest(graph=g), **kw),
        lambda **kw: worker.ComputeGradients(gradient_request(graph=g), **kw),
    ):
        code, field, message = error_of(call)
        assert code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT), (
            message
        )
        assert field and field.endswith("nodes[1].attrs.device"), (field, message)
        assert "cuda" in message


def test_memory_error_is_resource_exhausted(servers, monkeypatch):
    """A request that needs more memory than the worker has (an intermediate of gigabytes
    from a small request) is the request's size problem, not a server bug."""
    running, ch = servers

    def no_memory(*args, **kw):
        raise MemoryError(
            "Unable to allocate 8.00 GiB for an array with shape "
            "(1073741824, 2) and data type float32"
        )

    monkeypatch.setattr(running.worker, "compute", no_memory)
    worker = worker_pb2_grpc.WorkerStub(ch["worker"])
    code, _, message = error_of(lambda **kw: worker.ComputeGradients(gradient_request(), **kw))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert "memory" in message
    monkeypatch.undo()
    worker.ComputeGradients(gradient_request(), timeout=DEADLINE)  # still serving
