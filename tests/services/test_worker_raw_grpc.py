"""The worker driven with hand-built protobuf messages only, as a client in Go or Node would:
no SDK, no tracer, no gradmesh tensor codec. The graph is written out node by node.

Graph: loss = sum(x @ w), w a PARAM [3, 2], x a DATA [-1, 3]. Its gradient is
dloss/dw[i, j] = sum_b x[b, i]. Inputs are small integers so every float32 sum is exact.
"""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gradmesh.v1 import graph_pb2, tensor_pb2, worker_pb2, worker_pb2_grpc


def float32_tensor(values: list[float], shape: list[int]) -> tensor_pb2.Tensor:
    # Little-endian float32, C order: what any language's "pack floats" produces.
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.FLOAT32, shape=shape, data=struct.pack(f"<{len(values)}f", *values)
    )


def floats_of(t: tensor_pb2.Tensor) -> list[float]:
    assert t.dtype == tensor_pb2.FLOAT32
    return list(struct.unpack(f"<{len(t.data) // 4}f", t.data))


def hand_graph() -> graph_pb2.Graph:
    return graph_pb2.Graph(
        version=1,
        inputs=[
            graph_pb2.Input(
                name="w", role=graph_pb2.Input.PARAM, dtype=tensor_pb2.FLOAT32, shape=[3, 2]
            ),  # value 0
            graph_pb2.Input(
                name="x", role=graph_pb2.Input.DATA, dtype=tensor_pb2.FLOAT32, shape=[-1, 3]
            ),
        ],  # value 1
        nodes=[
            graph_pb2.Node(op="mm", inputs=[1, 0]),  # value 2
            graph_pb2.Node(op="sum", inputs=[2]),
        ],  # value 3
        outputs=[graph_pb2.Output(name="loss", value=3), graph_pb2.Output(name="logits", value=2)],
    )


W = [1.0, -2.0, 3.0, 0.5, -1.0, 2.0]  # [3, 2]
X = [1.0, 2.0, 3.0, -4.0, 5.0, 6.0]  # [2, 3]


def expected():
    w = np.array(W, np.float32).reshape(3, 2)
    x = np.array(X, np.float32).reshape(2, 3)
    grad = np.repeat(x.sum(0)[:, None], 2, axis=1)
    return float((x @ w).sum()), (x @ w).ravel().tolist(), grad.ravel().tolist()


@pytest.fixture(scope="module")
def stub(worker):
    with grpc.insecure_channel(worker.address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel), channel


def test_register_then_compute_by_id(stub):
    s, _ = stub
    graph = hand_graph()
    graph_id = s.RegisterGraph(worker_pb2.RegisterGraphRequest(graph=graph)).graph_id
    assert len(graph_id) == 64 and int(graph_id, 16) >= 0
    # The id is the SHA-256 of the deterministic serialization: computable by any client.
    import hashlib

    assert graph_id == hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()

    resp = s.ComputeGradients(
        worker_pb2.ComputeGradientsRequest(
            graph_id=graph_id,
            parameters=[tensor_pb2.NamedTensor(name="w", tensor=float32_tensor(W, [3, 2]))],
            data=[tensor_pb2.NamedTensor(name="x", tensor=float32_tensor(X, [2, 3]))],
            outputs=["logits"],
        )
    )
    loss, logits, grad = expected()
    assert list(resp.loss.shape) == [] and floats_of(resp.loss) == [loss]
    assert [o.name for o in resp.outputs] == ["logits"]
    assert list(resp.outputs[0].tensor.shape) == [2, 2]
    assert floats_of(resp.outputs[0].tensor) == logits
    assert [g.name for g in resp.gradients] == ["w"]
    assert list(resp.gradients[0].tensor.shape) == [3, 2]
    assert floats_of(resp.gradients[0].tensor) == grad
    assert resp.graph_id == graph_id
    assert resp.timings.forward_seconds >= 0 and resp.timings.backward_seconds >= 0


def test_inline_graph_registers_it_and_loss_scale(stub):
    s, _ = stub
    resp = s.ComputeGradients(
        worker_pb2.ComputeGradientsRequest(
            graph=hand_graph(),
            parameters=[tensor_pb2.NamedTensor(name="w", tensor=float32_tensor(W, [3, 2]))],
            data=[tensor_pb2.NamedTensor(name="x", tensor=float32_tensor(X, [2, 3]))],
            loss_scale=0.5,
        )
    )
    loss, _, grad = expected()
    assert floats_of(resp.loss) == [loss * 0.5]
    assert floats_of(resp.gradients[0].tensor) == [g * 0.5 for g in grad]
    # Now known by id: a second call needs no graph and reuses the compiled plan.
    resp2 = s.ComputeGradients(
        worker_pb2.ComputeGradientsRequest(
            graph_id=resp.graph_id,
            parameters=[tensor_pb2.NamedTensor(name="w", tensor=float32_tensor(W, [3, 2]))],
            data=[tensor_pb2.NamedTensor(name="x", tensor=float32_tensor(X, [2, 3]))],
        )
    )
    assert resp2.timings.plan_cached
    assert floats_of(resp2.loss) == [loss]


def test_stream_by_hand(stub):
    """Header frame with dtype/shape only, then Chunk frames; the reply likewise."""
    s, _ = stub
    graph_id = s.RegisterGraph(worker_pb2.RegisterGraphRequest(graph=hand_graph())).graph_id
    header = worker_pb2.ComputeGradientsRequest(
        graph_id=graph_id,
        parameters=[
            tensor_pb2.NamedTensor(
                name="w", tensor=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3, 2])
            )
        ],
        data=[
            tensor_pb2.NamedTensor(
                name="x", tensor=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 3])
            )
        ],
    )
    w_bytes = struct.pack("<6f", *W)
    x_bytes = struct.pack("<6f", *X)
    frames = [
        worker_pb2.StreamFrame(request=header),
        # tensor 0 = parameters[w], sent in two pieces; tensor 1 = data[x]
        worker_pb2.StreamFrame(chunk=tensor_pb2.Chunk(tensor_index=0, offset=0, data=w_bytes[:8])),
        worker_pb2.StreamFrame(chunk=tensor_pb2.Chunk(tensor_index=0, offset=8, data=w_bytes[8:])),
        worker_pb2.StreamFrame(chunk=tensor_pb2.Chunk(tensor_index=1, offset=0, data=x_bytes)),
    ]
    replies = list(s.ComputeGradientsStream(iter(frames)))
    assert replies[0].WhichOneof("kind") == "response"
    resp = replies[0].response
    assert not resp.loss.data and not resp.gradients[0].tensor.data
    # Reply tensors in order: loss (0), outputs (none requested), gradients (1).
    buffers = {0: bytearray(), 1: bytearray()}
    for frame in replies[1:]:
        assert frame.WhichOneof("kind") == "chunk"
        assert frame.chunk.offset == len(buffers[frame.chunk.tensor_index])
        buffers[frame.chunk.tensor_index] += frame.chunk.data
    loss, _, grad = expected()
    assert list(struct.unpack("<f", bytes(buffers[0]))) == [loss]
    assert list(struct.unpack("<6f", bytes(buffers[1]))) == grad


def test_stream_gradients_early_by_hand(stub):
    """With stream_gradients_early: a header known before computing (gradients listed in
    the order backward finishes them), the chunks, then a frame with only the timings."""
    s, _ = stub
    graph = hand_graph()
    # Two parameters: loss = sum((x @ w) * v); backward finishes v's gradient before w's.
    graph.inputs.insert(
        1,
        graph_pb2.Input(name="v", role=graph_pb2.Input.PARAM, dtype=tensor_pb2.FLOAT32, shape=[2]),
    )
    # Values: w 0, v 1, x 2; mm 3, mul 4, sum 5.
    del graph.nodes[:]
    graph.nodes.extend(
        [
            graph_pb2.Node(op="mm", inputs=[2, 0]),
            graph_pb2.Node(op="mul", inputs=[3, 1]),
            graph_pb2.Node(op="sum", inputs=[4]),
        ]
    )
    del graph.outputs[:]
    graph.outputs.extend(
        [graph_pb2.Output(name="loss", value=5), graph_pb2.Output(name="logits", value=3)]
    )
    graph_id = s.RegisterGraph(worker_pb2.RegisterGraphRequest(graph=graph)).graph_id
    V = [2.0, -1.0]

    def header_tensor(shape):
        return tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=shape)

    header = worker_pb2.ComputeGradientsRequest(
        graph_id=graph_id,
        stream_gradients_early=True,
        outputs=["logits"],
        gradients=["w", "v"],
        parameters=[
            tensor_pb2.NamedTensor(name="w", tensor=header_tensor([3, 2])),
            tensor_pb2.NamedTensor(name="v", tensor=header_tensor([2])),
        ],
        data=[tensor_pb2.NamedTensor(name="x", tensor=header_tensor([2, 3]))],
    )
    frames = [worker_pb2.StreamFrame(request=header)] + [
        worker_pb2.StreamFrame(
            chunk=tensor_pb2.Chunk(tensor_index=i, data=struct.pack(f"<{len(vals)}f", *vals))
        )
        for i, vals in enumerate([W, V, X])
    ]
    replies = list(s.ComputeGradientsStream(iter(frames)))
    first, last = replies[0], replies[-1]
    assert first.WhichOneof("kind") == "response" and last.WhichOneof("kind") == "response"
    resp = first.response
    assert resp.graph_id == graph_id and not resp.HasField("timings")
    assert list(resp.loss.shape) == [] and resp.loss.dtype == tensor_pb2.FLOAT32
    assert [(o.name, list(o.tensor.shape)) for o in resp.outputs] == [("logits", [2, 2])]
    # Not the requested order: the order backward completes them.
    assert [(g.name, list(g.tensor.shape)) for g in resp.gradients] == [("v", [2]), ("w", [3, 2])]
    assert last.response.timings.forward_seconds >= 0 and not last.response.gradients
    assert not last.response.HasField("loss")
    buffers = {i: bytearray() for i in range(4)}  # loss, logits, v, w
    for frame in replies[1:-1]:
        assert frame.WhichOneof("kind") == "chunk"
        assert frame.chunk.offset == len(buffers[frame.chunk.tensor_index])
        buffers[frame.chunk.tensor_index] += frame.chunk.data
    w = np.array(W, np.float32).reshape(3, 2)
    x = np.array(X, np.float32).reshape(2, 3)
    v = np.array(V, np.float32)
    logits = x @ w
    assert struct.unpack("<f", bytes(buffers[0]))[0] == float((logits * v).sum())
    assert list(struct.unpack("<4f", bytes(buffers[1]))) == logits.ravel().tolist()
    assert list(struct.unpack("<2f", bytes(buffers[2]))) == logits.sum(0).tolist()
    grad_w = x.sum(0)[:, None] * v[None, :]
    assert list(struct.unpack("<6f", bytes(buffers[3]))) == grad_w.ravel().tolist()


def test_capabilities(stub):
    s, _ = stub
    caps = s.Capabilities(worker_pb2.CapabilitiesRequest())
    assert {"mm", "sum", "relu", "conv2d"} <= set(caps.ops)
    assert tensor_pb2.FLOAT32 in caps.dtypes and tensor_pb2.FLOAT64 in caps.dtypes
    assert caps.backend == "cpu"
    assert caps.limits.max_message_bytes > 0 and caps.limits.max_graph_nodes > 0
    assert 1 << 20 <= caps.limits.chunk_bytes <= 4 << 20
    assert {"gradmesh", "python", "numpy"} <= set(caps.versions)
    assert caps.blas_threads >= 1
    assert len(caps.build_fingerprint) == 64
    # Deterministic: the same worker reports the same fingerprint.
    assert (
        s.Capabilities(worker_pb2.CapabilitiesRequest()).build_fingerprint == caps.build_fingerprint
    )


def test_health_serving(stub):
    _, channel = stub
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "gradmesh.v1.Worker"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_worker(stub):
    _, channel = stub
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        refl.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="gradmesh.v1.Worker"
                    ),
                ]
            )
        )
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"gradmesh.v1.Worker", "grpc.health.v1.Health"} <= names
    files = replies[1].file_descriptor_response.file_descriptor_proto
    assert files, "reflection returned no descriptor for gradmesh.v1.Worker"
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(files[0])
    assert fd.name == "gradmesh/v1/worker.proto"
    assert [m.name for m in fd.service[0].method] == [
        "RegisterGraph",
        "ComputeGradients",
        "ComputeGradientsStream",
        "Capabilities",
    ]
