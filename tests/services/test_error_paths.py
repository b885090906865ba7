"""The errors worker.proto documents are the errors a worker gives.

Each `example:` line of worker.proto's header comment (the RPC, what is wrong, the code,
the field path and the FieldViolation reason) is parsed and provoked on a real worker, so
the documentation cannot drift from the server. The details travel as google.rpc.Status in
the `grpc-status-details-bin` trailer, with BadRequest and RequestInfo, as documented.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gradmesh.core.serialize import to_proto
from gradmesh.server.runtime.errors import REASONS
from gradmesh.v1 import worker_pb2, worker_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "wire"))
from test_graph_id import _attr, _graph  # noqa: E402

PROTO = Path(__file__).resolve().parents[2] / "protos" / "gradmesh" / "v1" / "worker.proto"
_EXAMPLE = re.compile(r"//\s+example: (\w+)\s+(.+?)\s{2,}(\w+) (\S+) (\w+)\s*$")
LIMIT = 256 * 1024


def documented_examples() -> list[tuple]:
    rows = [_EXAMPLE.match(line) for line in PROTO.read_text().splitlines()]
    return [m.groups() for m in rows if m]


W = np.ones((3, 2), np.float32)
X = np.ones((4, 3), np.float32)
GOOD = _graph([("matmul", [1, 0], []), ("sum", [2], [])])


def _register(nodes):
    return lambda stub: stub.RegisterGraph(worker_pb2.RegisterGraphRequest(graph=_graph(nodes)))


def _compute(params=None, data=None, graph_id=None):
    def call(stub):
        gid = graph_id or stub.RegisterGraph(worker_pb2.RegisterGraphRequest(graph=GOOD)).graph_id
        r = worker_pb2.ComputeGradientsRequest(graph_id=gid)
        for name, t in (params if params is not None else {"w": W}).items():
            r.parameters.add(name=name).tensor.CopyFrom(
                t if hasattr(t, "data") and not isinstance(t, np.ndarray) else to_proto(t)
            )
        for name, t in (data if data is not None else {"x": X}).items():
            r.data.add(name=name).tensor.CopyFrom(to_proto(t))
        return stub.ComputeGradients(r, timeout=30)

    return call


def _short_w():
    t = to_proto(W)
    t.data = t.data[:20]
    return t


SCENARIOS = {
    'unknown op "nope" at node 1': _register([("matmul", [1, 0], []), ("nope", [2], [])]),
    "log_softmax dim 5 on 2-D": _register(
        [("matmul", [1, 0], []), ("log_softmax", [2], [_attr("dim", i=5)]), ("sum", [3], [])]
    ),
    'mse_loss reduction "avg"': _register(
        [("matmul", [1, 0], []), ("mse_loss", [2, 2], [_attr("reduction", s="avg")])]
    ),
    "reshape of x (?,3) to [7]": _register(
        [("reshape", [1], [_attr("shape", ints=[7])]), ("sum", [2], [])]
    ),
    "matmul of (3,2) and (?,3)": _register([("matmul", [0, 1], []), ("sum", [2], [])]),
    "matmul with one input": _register([("matmul", [1], []), ("sum", [2], [])]),
    "w with 20 bytes for [3,2]": _compute(params={"w": _short_w()}),
    "parameter v, not in graph": _compute(params={"w": W, "v": W}),
    "x of shape [4,5] for [-1,3]": _compute(data={"x": np.ones((4, 5), np.float32)}),
    "an unknown graph_id": _compute(graph_id="ab" * 32),
    "over max_message_bytes": _compute(data={"x": np.ones((LIMIT // 12 + 1000, 3), np.float32)}),
}


@pytest.fixture(scope="module")
def stub():
    from gradmesh.server import worker as worker_mod

    running = worker_mod.start(backend="cpu", max_message_bytes=LIMIT)
    with grpc.insecure_channel(running.address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)
    running.stop(0)


def _violation(error: grpc.RpcError):
    status = rpc_status.from_call(error)  # the grpc-status-details-bin trailer
    assert status is not None, "no google.rpc.Status in the trailers"
    kinds = {}
    for detail in status.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.RequestInfo):
            if detail.Is(kind.DESCRIPTOR):
                kinds[kind] = kind()
                detail.Unpack(kinds[kind])
    assert kinds[error_details_pb2.RequestInfo].request_id
    (violation,) = kinds[error_details_pb2.BadRequest].field_violations
    return violation


def test_every_example_has_a_scenario() -> None:
    described = {row[1] for row in documented_examples()}
    assert len(described) >= 8 and described == set(SCENARIOS)


@pytest.mark.parametrize("rpc, what, code, field, reason", documented_examples())
def test_documented_error(stub, rpc, what, code, field, reason) -> None:
    with pytest.raises(grpc.RpcError) as e:
        SCENARIOS[what](stub)
    violation = _violation(e.value)
    assert (e.value.code().name, violation.field, violation.reason) == (code, field, reason)
    assert reason in REASONS and violation.description


def test_over_the_limit_says_the_limit_and_the_way_out(stub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        SCENARIOS["over max_message_bytes"](stub)
    assert str(LIMIT) in e.value.details() and "ComputeGradientsStream" in e.value.details()


def test_a_stream_message_over_the_limit_is_answered_too(stub) -> None:
    """Each message of a stream is held to the same limit as a unary one."""
    from gradmesh.v1 import tensor_pb2

    gid = stub.RegisterGraph(worker_pb2.RegisterGraphRequest(graph=GOOD)).graph_id
    rows = LIMIT // 12 + 100
    header = worker_pb2.ComputeGradientsRequest(graph_id=gid)
    header.parameters.add(name="w").tensor.CopyFrom(to_proto(W, data=False))
    header.data.add(name="x").tensor.CopyFrom(to_proto(np.ones((rows, 3), np.float32), data=False))
    frames = [
        worker_pb2.StreamFrame(request=header),
        worker_pb2.StreamFrame(chunk=tensor_pb2.Chunk(tensor_index=0, data=to_proto(W).data)),
        worker_pb2.StreamFrame(chunk=tensor_pb2.Chunk(tensor_index=1, data=bytes(rows * 12))),
    ]
    with pytest.raises(grpc.RpcError) as e:
        list(stub.ComputeGradientsStream(iter(frames), timeout=30))
    violation = _violation(e.value)
    assert (e.value.code(), violation.field, violation.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "request",
        "LIMIT",
    )
    assert str(LIMIT) in e.value.details()
