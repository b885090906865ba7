"""Per-request budgets, cancellation inside a large op, idle streams and fair slots, on
real servers on 127.0.0.1."""

from __future__ import annotations

import struct
import threading
import time

import grpc
import numpy as np
import pytest
from models import matmul_graph
from test_worker_errors import assert_still_serving, call_error, request
from test_worker_raw_grpc import W, X, float32_tensor

from gradmesh.core import cost
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import streams
from gradmesh.v1 import graph_pb2, tensor_pb2, worker_pb2, worker_pb2_grpc


def _matmul_request(m, k, n) -> worker_pb2.ComputeGradientsRequest:
    """Two 1x1 tensors expanded into an m x k by k x n product: a request of ~100 bytes."""
    one = float32_tensor([1.0], [1, 1])
    return worker_pb2.ComputeGradientsRequest(
        graph=matmul_graph(m, k, n),
        parameters=[tensor_pb2.NamedTensor(name="a", tensor=one)],
        data=[tensor_pb2.NamedTensor(name="b", tensor=one)],
    )


def test_large_matmul_refused_up_front(start_worker):
    running = start_worker(limits=worker_mod.WorkerLimits(max_request_flops=10**9))
    req = _matmul_request(8192, 8192, 8192)
    assert req.ByteSize() < 200
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        t0 = time.monotonic()
        code, field, msg = call_error(stub.ComputeGradients, req, timeout=60)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert field == "max_request_flops"
        assert "--max-request-flops" in msg and "FLOPs" in msg
        assert time.monotonic() - t0 < 30  # refused, not run (it takes minutes)
        assert running.worker.abandoned == 0
        # The default budget (1e12) refuses it too: 3 * 2 * 8192^3 FLOPs.
        assert_still_serving(stub)


def test_memory_budget(start_worker):
    running = start_worker(limits=worker_mod.WorkerLimits(max_request_bytes=1 << 20))
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        code, field, msg = call_error(stub.ComputeGradients, _matmul_request(1024, 1024, 16))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert field == "max_request_bytes"
        assert "--max-request-bytes" in msg
        assert_still_serving(stub)  # small requests fit


def test_default_budgets_refuse_the_8192_matmul(worker):
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        code, field, _ = call_error(
            stub.ComputeGradients, _matmul_request(8192, 8192, 8192), timeout=60
        )
        assert (code, field) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "max_request_flops")


def test_deadline_stops_a_large_op_midway(start_worker):
    running = start_worker()
    m = 8192
    req = _matmul_request(m, 4096, 4096)  # ~2.7e11 FLOPs forward: seconds even on a quiet CPU
    blocks = len(cost.block_rows(m, cost.rows_per_block(4096, 4096)))
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        before_calls, before_checks = cost.blocked_calls, cost.block_checks
        code, _, _ = call_error(stub.ComputeGradients, req, timeout=1.0)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        # The worker gave up inside the products: they were split, and it stopped before
        # the end of the last one. A quiet machine may finish the forward product within
        # the deadline and stop in a backward one (the plan has three of this size).
        assert running.wait_in_flight(0, timeout=60)
        assert running.worker.abandoned == 1
        assert 1 <= cost.blocked_calls - before_calls <= 3
        assert 1 <= cost.block_checks - before_checks < 3 * blocks
        assert_still_serving(stub)


def _idle_stream(stub, release: threading.Event, **kw):
    """A stream that sends its header, then nothing until ``release`` is set."""
    header = request(
        x=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 3]),
        w=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3, 2]),
    )

    def frames():
        yield worker_pb2.StreamFrame(request=header)
        release.wait()
        yield worker_pb2.StreamFrame(
            chunk=tensor_pb2.Chunk(tensor_index=0, data=struct.pack("<6f", *W))
        )
        yield worker_pb2.StreamFrame(
            chunk=tensor_pb2.Chunk(tensor_index=1, data=struct.pack("<6f", *X))
        )

    return stub.ComputeGradientsStream(frames(), **kw)


def test_idle_stream_released(start_worker):
    running = start_worker(stream_idle_timeout=1.0, max_concurrent_requests=2)
    release = threading.Event()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            t0 = time.monotonic()
            responses = _idle_stream(stub, release)  # no deadline, never finished
            code, _, msg = call_error(lambda: list(responses))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "stream_idle_timeout" in msg
            assert time.monotonic() - t0 < 30
            assert running.wait_in_flight(0, timeout=30)
            assert_still_serving(stub)
    finally:
        release.set()


def test_idle_timeout_leaves_active_streams_alone(start_worker):
    running = start_worker(stream_idle_timeout=5.0)
    release = threading.Event()
    release.set()
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        replies = list(_idle_stream(stub, release))
        assert replies[0].response.graph_id


def test_one_peer_holds_at_most_its_share(start_worker, monkeypatch):
    """A peer holding max(1, slots // 2) slots gets RESOURCE_EXHAUSTED for more, and other
    peers are still served. On 127.0.0.1 every client has the same address, so the test
    tells peers apart by their port (each channel is one connection)."""
    monkeypatch.setattr(streams, "peer_identity", lambda peer: peer)
    running = start_worker(max_concurrent_requests=4)
    release = threading.Event()
    with (
        grpc.insecure_channel(running.address) as greedy,
        grpc.insecure_channel(
            running.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as other,
    ):  # its own connection
        greedy_stub = worker_pb2_grpc.WorkerStub(greedy)
        held = [_idle_stream(greedy_stub, release) for _ in range(2)]
        try:
            assert running.wait_in_flight(2, timeout=30)
            code, _, msg = call_error(greedy_stub.Capabilities, worker_pb2.CapabilitiesRequest())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_requests_per_peer" in msg
            other_stub = worker_pb2_grpc.WorkerStub(other)
            assert other_stub.Capabilities(worker_pb2.CapabilitiesRequest()).backend == "cpu"
            assert_still_serving(other_stub)
        finally:
            release.set()
        for responses in held:
            assert list(responses)[0].response.graph_id
        assert_still_serving(greedy_stub)


def test_peer_identity_drops_the_port():
    assert streams.peer_identity("ipv4:10.1.2.3:5555") == "ipv4:10.1.2.3"
    assert streams.peer_identity("ipv6:[::1]:5555") == "ipv6:[::1]"
    assert streams.per_peer_limit(8, None) == 4
    assert streams.per_peer_limit(1, None) == 1
    assert streams.per_peer_limit(8, 20) == 8


def _silent(release: threading.Event):
    """A client stream that sends nothing until ``release`` is set."""
    release.wait()
    return
    yield


def test_idle_streams_released_on_shards_and_coordinators():
    """Eight streams with no deadline that never send held every slot of a shard or a
    coordinator; now each ends after the idle timeout and other calls are served."""
    from gradmesh.server import coordinator as coordinator_mod
    from gradmesh.server.runtime import ServerConfig
    from gradmesh.server.shard import serve_shard
    from gradmesh.server.shard_store import ShardStore
    from gradmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, shard_pb2, shard_pb2_grpc

    shard = serve_shard(
        ServerConfig(port=0, stream_idle_timeout=1.0, max_requests_per_peer=8), ShardStore()
    )
    coordinator = coordinator_mod.start(stream_idle_timeout=1.0, max_requests_per_peer=8)
    release = threading.Event()
    try:
        for running, open_stream, other in (
            (
                shard,
                lambda ch: shard_pb2_grpc.ParameterShardStub(ch).Load.future(_silent(release)),
                lambda ch: shard_pb2_grpc.ParameterShardStub(ch).Status(
                    shard_pb2.ShardStatusRequest(), timeout=30
                ),
            ),
            (
                coordinator,
                lambda ch: coordinator_pb2_grpc.CoordinatorStub(ch).CreateJob.future(
                    _silent(release)
                ),
                lambda ch: coordinator_pb2_grpc.CoordinatorStub(ch).ListWorkers(
                    coordinator_pb2.ListWorkersRequest(), timeout=30
                ),
            ),
        ):
            with grpc.insecure_channel(running.address) as channel:
                held = [open_stream(channel) for _ in range(8)]
                for f in held:
                    assert f.exception(timeout=30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
                other(channel)  # the slots are free again
    finally:
        release.set()
        shard.stop(0)
        coordinator.stop(0)


def _ints(name, values):
    return graph_pb2.Attribute(name=name, ints=graph_pb2.Ints(values=values))


def _float64_graph(op: str, a_shape, b_shape, attrs=()) -> graph_pb2.Graph:
    """loss = sum(op(expand(a, a_shape), expand(b, b_shape))) in float64: 1-element
    inputs (a ~100 byte request), one large op."""
    ones_a, ones_b = [1] * len(a_shape), [1] * len(b_shape)
    return graph_pb2.Graph(
        version=1,
        inputs=[
            graph_pb2.Input(name="a", role=graph_pb2.Input.PARAM, dtype=F64, shape=ones_a),
            graph_pb2.Input(name="b", role=graph_pb2.Input.DATA, dtype=F64, shape=ones_b),
        ],
        nodes=[
            graph_pb2.Node(op="expand", inputs=[0], attrs=[_ints("shape", a_shape)]),
            graph_pb2.Node(op="expand", inputs=[1], attrs=[_ints("shape", b_shape)]),
            graph_pb2.Node(op=op, inputs=[2, 3], attrs=list(attrs)),
            graph_pb2.Node(op="sum", inputs=[4]),
        ],
        outputs=[graph_pb2.Output(name="loss", value=5)],
    )


def _float64_request(g: graph_pb2.Graph) -> worker_pb2.ComputeGradientsRequest:
    def one(name, i):
        n = len(g.inputs[i].shape)
        t = tensor_pb2.Tensor(dtype=F64, shape=[1] * n, data=struct.pack("<d", 1.0))
        return tensor_pb2.NamedTensor(name=name, tensor=t)

    return worker_pb2.ComputeGradientsRequest(graph=g, parameters=[one("a", 0)], data=[one("b", 1)])


F64 = tensor_pb2.FLOAT64
_CONV = [_ints("stride", [1, 1]), _ints("padding", [1, 1])]


@pytest.mark.parametrize(
    "op,a_shape,b_shape,attrs",
    [
        # ~6e10 FLOPs forward (x 3 with the gradient): seconds of float64 BLAS.
        ("conv2d", [96, 64, 96, 96], [64, 64, 3, 3], _CONV),
        ("matmul", [64, 1024, 1024], [1024, 512], []),  # 65536 rows of a 2-D product
        ("mm", [4096, 4096], [4096, 4096], []),  # ~1.4e11 FLOPs forward
    ],
)
def test_deadline_stops_a_large_float64_op_midway(start_worker, op, a_shape, b_shape, attrs):
    """A float64 conv2d runs image by image when checked, and a float64 2-D product always
    in its own row blocks: a deadline stops either between blocks, long before the end."""
    running = start_worker()
    req = _float64_request(_float64_graph(op, a_shape, b_shape, attrs))
    assert req.ByteSize() < 400
    counter = "batch_blocked_calls" if op == "conv2d" else "blocked_calls"
    with grpc.insecure_channel(running.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        before_calls, before_checks = getattr(cost, counter), cost.block_checks
        code, _, _ = call_error(stub.ComputeGradients, req, timeout=1.0)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert running.wait_in_flight(0, timeout=60)
        assert running.worker.abandoned == 1
        # Stopped inside the forward op (or, on a fast machine, the backward one, the
        # input's gradient of the same size): fewer checks than the blocks of both.
        assert getattr(cost, counter) - before_calls >= 1
        assert 1 <= cost.block_checks - before_checks < 2 * _blocks(op, a_shape, b_shape)
        assert_still_serving(stub)


def _blocks(op, a_shape, b_shape) -> int:
    a, b = (np.broadcast_to(np.ones(1), s) for s in (a_shape, b_shape))
    if op != "conv2d":
        rows = int(np.prod(a_shape[:-1]))
        return len(cost.block_rows(rows, cost.rows_per_block(a_shape[-1], b_shape[-1])))
    per_item = cost._batch_item_flops(op, [a, b], {"stride": (1, 1)})
    return -(-a_shape[0] // cost._items_per_block(per_item))
