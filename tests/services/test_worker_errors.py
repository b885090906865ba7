"""One test per error class: the right status code, the offending field in the
google.rpc.BadRequest details, and a worker that still answers afterwards."""

from __future__ import annotations

import struct
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_worker_raw_grpc import W, X, expected, float32_tensor, floats_of, hand_graph

from gradmesh.server import runtime
from gradmesh.server import worker as worker_mod
from gradmesh.v1 import graph_pb2, tensor_pb2, worker_pb2, worker_pb2_grpc


def call_error(fn, *args, **kw) -> tuple[grpc.StatusCode, str | None, str]:
    """Run a call that must fail; return (code, BadRequest field or None, message)."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    err = info.value
    field = None
    status = rpc_status.from_call(err)
    if status is not None:
        assert status.code == err.code().value[0]
        for detail in status.details:
            info = error_details_pb2.RequestInfo()
            if detail.Unpack(info):  # every error says which request it was
                assert info.request_id == dict(err.trailing_metadata())["x-request-id"]
                continue
            bad = error_details_pb2.BadRequest()
            assert detail.Unpack(bad)
            field = bad.field_violations[0].field
            assert bad.field_violations[0].description
    return err.code(), field, err.details()


def request(graph_id=None, graph=None, w=None, x=None, **kw):
    w = w if w is not None else float32_tensor(W, [3, 2])
    x = x if x is not None else float32_tensor(X, [2, 3])
    ref = {"graph_id": graph_id} if graph_id else {"graph": graph or hand_graph()}
    return worker_pb2.ComputeGradientsRequest(
        parameters=[tensor_pb2.NamedTensor(name="w", tensor=w)] if w is not False else [],
        data=[tensor_pb2.NamedTensor(name="x", tensor=x)] if x is not False else [],
        **ref,
        **kw,
    )


def assert_still_serving(stub, metadata=()):
    resp = stub.ComputeGradients(request(), metadata=metadata)
    assert floats_of(resp.loss) == [expected()[0]]


@pytest.fixture(scope="module")
def stub(worker):
    with grpc.insecure_channel(worker.address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


def test_malformed_graph(stub):
    g = hand_graph()
    g.nodes[0].inputs[0] = 3  # reads a value defined later: a cycle
    code, field, msg = call_error(stub.RegisterGraph, worker_pb2.RegisterGraphRequest(graph=g))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field == "graph.nodes[0].inputs[0]"
    assert "topological" in msg
    assert_still_serving(stub)


def test_unknown_op(stub):
    g = hand_graph()
    g.nodes[0].op = "os_system"
    code, field, msg = call_error(stub.ComputeGradients, request(graph=g))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field == "graph.nodes[0].op"
    assert "os_system" in msg
    assert_still_serving(stub)


def test_wrong_byte_length_for_shape(stub):
    short = tensor_pb2.Tensor(
        dtype=tensor_pb2.FLOAT32, shape=[3, 2], data=struct.pack("<5f", *W[:5])
    )
    code, field, msg = call_error(stub.ComputeGradients, request(w=short))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field == "parameters[w].data"
    assert "20 bytes" in msg and "24" in msg
    assert_still_serving(stub)


def test_dtype_mismatch(stub):
    as_f64 = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT64, shape=[3, 2], data=struct.pack("<6d", *W))
    code, field, msg = call_error(stub.ComputeGradients, request(w=as_f64))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field == "parameters[w].dtype"
    assert "FLOAT64" in msg and "FLOAT32" in msg
    assert_still_serving(stub)


def test_shape_mismatch(stub):
    code, field, _ = call_error(stub.ComputeGradients, request(x=float32_tensor([1.0] * 8, [2, 4])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field == "data[x].shape"
    assert_still_serving(stub)


def test_missing_input(stub):
    code, field, msg = call_error(stub.ComputeGradients, request(x=False))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field == "data[x]"
    assert "missing" in msg
    assert_still_serving(stub)


def test_unknown_gradient_name(stub):
    code, field, _ = call_error(stub.ComputeGradients, request(gradients=["w", "nope"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field == "gradients[1]"
    assert_still_serving(stub)


def test_unknown_graph_id(stub):
    code, field, msg = call_error(stub.ComputeGradients, request(graph_id="ab" * 32))
    assert code == grpc.StatusCode.NOT_FOUND
    assert field == "graph_id"
    assert "RegisterGraph" in msg
    assert_still_serving(stub)


def test_no_graph_at_all(stub):
    req = request()
    req.ClearField("graph")
    code, field, _ = call_error(stub.ComputeGradients, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field == "graph_ref"


def test_graph_over_limits(start_worker):
    running = start_worker(limits=worker_mod.WorkerLimits(max_graph_nodes=1))
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        code, field, msg = call_error(
            stub.RegisterGraph, worker_pb2.RegisterGraphRequest(graph=hand_graph())
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert field == "graph.nodes"
        assert "limit" in msg
        assert stub.Capabilities(worker_pb2.CapabilitiesRequest()).limits.max_graph_nodes == 1


def test_tensor_over_element_limit(start_worker):
    running = start_worker(limits=worker_mod.WorkerLimits(max_tensor_elements=4))
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        code, field, _ = call_error(stub.ComputeGradients, request())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert field is not None and field.startswith("graph.")


def test_message_over_limit(start_worker):
    """A unary request over max_message_bytes is refused by the transport before it is
    read (no allocation, so no field: the whole message is the problem); a response that
    would be over the limit is refused naming the field and pointing to the stream RPC."""
    running = start_worker(max_message_bytes=64 * 1024)
    with grpc.insecure_channel(
        running.address, options=[("grpc.max_send_message_length", 1 << 22)]
    ) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        big = 20_000  # 20000*3*4 bytes = 240 KB > 64 KiB
        x = float32_tensor([1.0] * (big * 3), [big, 3])
        code, field, msg = call_error(stub.ComputeGradients, request(x=x))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in msg.lower() or "message" in msg.lower()
        assert_still_serving(stub)

    # A graph with outputs bigger than its inputs: logits [B, 2] and x * x [B, 3].
    g = hand_graph()
    g.nodes.add(op="mul", inputs=[1, 1])  # value 4
    g.outputs.add(name="x_squared", value=4)
    b = 4000  # request 48 KB; response 80 KB > 64 KiB
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        x = float32_tensor([1.0] * (b * 3), [b, 3])
        req = request(graph=g, x=x, outputs=["logits", "x_squared"])
        code, field, msg = call_error(stub.ComputeGradients, req)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert field == "outputs"
        assert "ComputeGradientsStream" in msg
        assert_still_serving(stub)


def test_stream_over_limit(start_worker):
    running = start_worker(limits=worker_mod.WorkerLimits(max_stream_bytes=100))
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        header = request(
            x=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[100, 3]),
            w=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3, 2]),
        )
        frames = iter([worker_pb2.StreamFrame(request=header)])
        code, field, msg = call_error(lambda: list(stub.ComputeGradientsStream(frames)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert field == "data[x].shape"
        assert_still_serving(stub)


def test_stream_chunk_out_of_order(stub):
    header = request(
        x=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 3]),
        w=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3, 2]),
    )
    frames = iter(
        [
            worker_pb2.StreamFrame(request=header),
            worker_pb2.StreamFrame(
                chunk=tensor_pb2.Chunk(tensor_index=0, offset=8, data=b"\0" * 8)
            ),
        ]
    )
    code, field, _ = call_error(lambda: list(stub.ComputeGradientsStream(frames)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field == "chunk.offset"
    assert_still_serving(stub)


def test_bad_token(start_worker):
    running = start_worker(token="s3cret")
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        code, field, msg = call_error(stub.Capabilities, worker_pb2.CapabilitiesRequest())
        assert code == grpc.StatusCode.UNAUTHENTICATED and field is None
        assert "token" in msg
        code, _, msg = call_error(
            stub.Capabilities,
            worker_pb2.CapabilitiesRequest(),
            metadata=[("authorization", "Bearer wrong")],
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong" in msg
        # Health checks need no token (probes); the right token works.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        assert_still_serving(stub, metadata=[("authorization", "Bearer s3cret")])


def test_unexpected_error_is_internal_and_worker_survives(start_worker, monkeypatch):
    running = start_worker()

    def explode(*a, **kw):
        raise ZeroDivisionError("simulated bug")

    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        monkeypatch.setattr(running.worker, "compute", explode)
        code, field, msg = call_error(stub.ComputeGradients, request())
        assert code == grpc.StatusCode.INTERNAL and "ZeroDivisionError" in msg
        monkeypatch.undo()
        assert_still_serving(stub)


def test_deadline_exceeded(start_worker):
    """A call whose deadline passes gets DEADLINE_EXCEEDED; the worker keeps serving."""
    running = start_worker()
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        # The header promises bytes that never come: only the deadline can end the call.
        header = request(
            x=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 3]),
            w=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3, 2]),
        )
        release = threading.Event()

        def frames():
            yield worker_pb2.StreamFrame(request=header)
            release.wait()

        try:
            code, _, _ = call_error(
                lambda: list(stub.ComputeGradientsStream(frames(), timeout=0.5))
            )
        finally:
            release.set()
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert_still_serving(stub)


def test_deadline_checked_between_passes():
    """The worker's own check stops a computation whose deadline passed (no server)."""
    w = worker_mod.GradientWorker("cpu")
    prepared = w.prepare(request())
    params, data = w.decode(prepared)
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 1:
            raise runtime.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")

    with pytest.raises(runtime.ServiceError) as e:
        w.compute(prepared, params, data, check)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert w.abandoned == 1
    # And a later call runs normally.
    assert float(w.compute(prepared, params, data).loss) == expected()[0]


def test_concurrency_limit(start_worker):
    running = start_worker(max_concurrent_requests=1)
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        header = request(
            x=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 3]),
            w=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3, 2]),
        )
        release = threading.Event()

        def frames():
            yield worker_pb2.StreamFrame(request=header)
            release.wait()
            yield worker_pb2.StreamFrame(
                chunk=tensor_pb2.Chunk(tensor_index=0, data=struct.pack("<6f", *W))
            )
            yield worker_pb2.StreamFrame(
                chunk=tensor_pb2.Chunk(tensor_index=1, data=struct.pack("<6f", *X))
            )

        # The first call holds the only slot until its frames are released.
        responses = stub.ComputeGradientsStream(frames())
        try:
            assert running.wait_in_flight(1, timeout=30)
            code, _, msg = call_error(stub.Capabilities, worker_pb2.CapabilitiesRequest())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_requests" in msg
        finally:
            release.set()
        replies = list(responses)
        assert replies[0].response.graph_id
        assert_still_serving(stub)


def _embedding_request(indices) -> worker_pb2.ComputeGradientsRequest:
    """loss = sum(emb[idx]): emb PARAM float32 [4, 3], idx DATA int64 [-1]."""
    g = graph_pb2.Graph(
        version=1,
        inputs=[
            graph_pb2.Input(
                name="emb", role=graph_pb2.Input.PARAM, dtype=tensor_pb2.FLOAT32, shape=[4, 3]
            ),
            graph_pb2.Input(
                name="idx", role=graph_pb2.Input.DATA, dtype=tensor_pb2.INT64, shape=[-1]
            ),
        ],
        nodes=[graph_pb2.Node(op="embedding", inputs=[1, 0]), graph_pb2.Node(op="sum", inputs=[2])],
        outputs=[graph_pb2.Output(name="loss", value=3)],
    )
    idx = tensor_pb2.Tensor(
        dtype=tensor_pb2.INT64,
        shape=[len(indices)],
        data=struct.pack(f"<{len(indices)}q", *indices),
    )
    return worker_pb2.ComputeGradientsRequest(
        graph=g,
        parameters=[tensor_pb2.NamedTensor(name="emb", tensor=float32_tensor([0.5] * 12, [4, 3]))],
        data=[tensor_pb2.NamedTensor(name="idx", tensor=idx)],
    )


def test_index_out_of_range_is_invalid_argument_not_internal(stub):
    """Values that validation cannot see (an embedding index past the table, a class label
    out of range) are the request's fault: INVALID_ARGUMENT naming the data, unary and
    streamed (also when gradients stream early, from the plan's thread). Found by
    tests/services/test_fuzz.py: it was INTERNAL."""
    assert floats_of(stub.ComputeGradients(_embedding_request([3, 0])).loss) == [3.0]
    code, field, msg = call_error(stub.ComputeGradients, _embedding_request([1, 4]))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "data")
    assert "embedding" in msg and "index 4" in msg
    for early in (False, True):
        req = _embedding_request([-1])
        req.stream_gradients_early = early
        header = worker_pb2.ComputeGradientsRequest()
        header.CopyFrom(req)
        for nt in list(header.parameters) + list(header.data):
            nt.tensor.data = b""
        frames = [worker_pb2.StreamFrame(request=header)] + [
            worker_pb2.StreamFrame(chunk=tensor_pb2.Chunk(tensor_index=i, data=nt.tensor.data))
            for i, nt in enumerate(list(req.parameters) + list(req.data))
        ]
        code, field, _ = call_error(lambda: list(stub.ComputeGradientsStream(iter(frames))))
        assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "data")
    assert_still_serving(stub)


def test_undecodable_stream_frame_is_invalid_argument(worker, stub):
    """Bytes that are no StreamFrame, first or after the header, get INVALID_ARGUMENT
    (gRPC answers INTERNAL when a deserializer raises). Found by tests/services/test_fuzz.py."""
    header = request(
        x=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 3]),
        w=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3, 2]),
    )
    header_bytes = worker_pb2.StreamFrame(request=header).SerializeToString()
    with grpc.insecure_channel(worker.address) as channel:
        raw = channel.stream_stream(
            "/gradmesh.v1.Worker/ComputeGradientsStream",
            request_serializer=lambda b: b,
            response_deserializer=worker_pb2.StreamFrame.FromString,
        )
        for frames, want in (
            ([b"\xff\xff\xff"], "request"),
            ([header_bytes, b"\x0a\x7f"], "chunk"),
        ):
            code, field, msg = call_error(lambda: list(raw(iter(frames), timeout=10)))
            assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, want)
            assert "not a valid StreamFrame" in msg
    assert_still_serving(stub)
