"""Request bytes that are not a valid protobuf message get INVALID_ARGUMENT, not INTERNAL.

gRPC answers INTERNAL when a request deserializer raises; ``runtime.serve`` registers
every handler with a deserializer that does not, so that the fault is put on the client.
Real servers on 127.0.0.1 get garbage bytes (through raw-bytes multi-callables, no
serializer) on every method of the Worker, ParameterShard and Coordinator services, unary
and streaming requests alike, and keep serving afterwards.
"""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServerConfig
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardStore
from gradmesh.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
    tensor_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

DEADLINE = 10.0
GARBAGE = b"\xff\xff\xff"  # a field tag with a varint that never ends


@pytest.fixture(scope="module")
def servers():
    worker = worker_mod.start("cpu")
    shard = serve_shard(ServerConfig(port=0), ShardStore())
    coordinator = coordinator_mod.start()
    yield {"Worker": worker, "ParameterShard": shard, "Coordinator": coordinator}
    coordinator.stop(0)
    coordinator.coordinator.close()
    shard.stop(0)
    worker.stop(0)


# service -> (its descriptor, a known-good call on a stub)
SERVICES = {
    "Worker": (
        worker_pb2.DESCRIPTOR.services_by_name["Worker"],
        lambda ch: worker_pb2_grpc.WorkerStub(ch).Capabilities(
            worker_pb2.CapabilitiesRequest(), timeout=DEADLINE
        ),
    ),
    "ParameterShard": (
        shard_pb2.DESCRIPTOR.services_by_name["ParameterShard"],
        lambda ch: shard_pb2_grpc.ParameterShardStub(ch).Status(
            shard_pb2.ShardStatusRequest(), timeout=DEADLINE
        ),
    ),
    "Coordinator": (
        coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
        lambda ch: coordinator_pb2_grpc.CoordinatorStub(ch).ListWorkers(
            coordinator_pb2.ListWorkersRequest(), timeout=DEADLINE
        ),
    ),
}
METHODS = [
    pytest.param(service, method, id=f"{service}.{method.name}")
    for service, (descriptor, _) in SERVICES.items()
    for method in descriptor.methods
]


def _call_raw(channel: grpc.Channel, method, *payloads: bytes) -> None:
    """Send ``payloads`` as the request (or the request stream's messages), unencoded."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    payload = payloads[0]
    if method.client_streaming:
        kind, request = (
            "stream_stream" if method.server_streaming else "stream_unary",
            iter(payloads),
        )
    else:
        kind, request = ("unary_stream" if method.server_streaming else "unary_unary", payload)
    call = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
    reply = call(request, timeout=DEADLINE)
    if method.server_streaming:
        list(reply)


@pytest.mark.parametrize("service, method", METHODS)
def test_undecodable_request_is_invalid_argument(servers, service, method) -> None:
    descriptor, good_call = SERVICES[service]
    with grpc.insecure_channel(servers[service].address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _call_raw(channel, method, GARBAGE)
        error = info.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "not a valid" in error.details() and method.input_type.name in error.details()
        assert _bad_request_field(error), "INVALID_ARGUMENT without a BadRequest field"
        # The server keeps serving: health, and a normal call of the same service.
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=DEADLINE
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        good_call(channel)


def _bad_request_field(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return bad.field_violations[0].field
    return None


def test_undecodable_message_after_a_valid_one(servers) -> None:
    """A stream is checked message by message: garbage after a valid header is rejected."""
    method = SERVICES["ParameterShard"][0].methods_by_name["Load"]
    header = shard_pb2.ShardFrame(
        load=shard_pb2.LoadRequest(
            job_id="malformed",
            optimizer=shard_pb2.Optimizer(name="sgd", lr=0.1),
            parameters=[
                tensor_pb2.NamedTensor(
                    name="w", tensor=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2])
                )
            ],
        )
    )
    with grpc.insecure_channel(servers["ParameterShard"].address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _call_raw(channel, method, header.SerializeToString(), GARBAGE)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "not a valid gradmesh.v1.ShardFrame" in info.value.details()
        status = SERVICES["ParameterShard"][1](channel)
        assert "malformed" not in [job.job_id for job in status.jobs]


def test_message_names_the_request_type(servers) -> None:
    method = SERVICES["Worker"][0].methods_by_name["ComputeGradients"]
    with grpc.insecure_channel(servers["Worker"].address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _call_raw(channel, method, GARBAGE)
    assert "the request is not a valid gradmesh.v1.ComputeGradientsRequest" in info.value.details()
