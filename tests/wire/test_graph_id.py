"""A client computes a graph's id from graph.proto's published algorithm alone ("The graph
id"): only the ``gradmesh.v1`` messages, hashlib, and the op schemas from a real worker's
Capabilities; nothing of gradmesh's own canonicalisation. The ids must equal the ones the
worker returns from RegisterGraph, whether the graph spells out defaults or not and
whatever the order of its attributes."""

from __future__ import annotations

import hashlib
import math
import struct

import grpc
import pytest

from gradmesh.v1 import graph_pb2, tensor_pb2, worker_pb2, worker_pb2_grpc

F32 = tensor_pb2.FLOAT32


@pytest.fixture(scope="module")
def stub(worker):
    with grpc.insecure_channel(worker.address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


@pytest.fixture(scope="module")
def defaults(stub) -> dict:
    caps = stub.Capabilities(worker_pb2.CapabilitiesRequest(), timeout=30)
    assert caps.op_schemas, "the worker publishes no op schemas"
    return {s.name: {a.name: a.default for a in s.attributes} for s in caps.op_schemas}


# --------------------------------------------------------------- the published algorithm


def _same_double(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or struct.pack("<d", x) == struct.pack("<d", y)


def _equal(a: graph_pb2.Attribute, d: graph_pb2.Attribute) -> bool:
    which = a.WhichOneof("value")
    if which != d.WhichOneof("value"):
        return False
    if which == "f":
        return _same_double(a.f, d.f)
    if which == "floats":
        x, y = a.floats.values, d.floats.values
        return len(x) == len(y) and all(_same_double(p, q) for p, q in zip(x, y))
    if which == "ints":
        return list(a.ints.values) == list(d.ints.values)
    return getattr(a, which) == getattr(d, which)


def client_side_id(graph: graph_pb2.Graph, defaults: dict) -> str:
    g = graph_pb2.Graph()
    g.CopyFrom(graph)  # step 1: the graph as it will be sent
    for node in g.nodes:
        op_defaults = defaults[node.op]
        kept = [a for a in node.attrs if not _equal(a, op_defaults[a.name])]  # step 2
        kept.sort(key=lambda a: a.name.encode())  # step 3
        del node.attrs[:]
        node.attrs.extend(kept)
    return hashlib.sha256(g.SerializeToString(deterministic=True)).hexdigest()  # step 4


# --------------------------------------------------------------------------- the graphs


def _attr(name: str, **value) -> graph_pb2.Attribute:
    a = graph_pb2.Attribute(name=name)
    for field, v in value.items():
        if field in ("ints", "floats"):
            getattr(a, field).SetInParent()
            getattr(a, field).values.extend(v)
        else:
            setattr(a, field, v)
    return a


def _graph(nodes) -> graph_pb2.Graph:
    """w (PARAM 3x2) and x (DATA ?x3), then ``nodes`` as (op, inputs, attrs); the last
    node is the loss."""
    g = graph_pb2.Graph(version=1)
    g.inputs.add(name="w", role=graph_pb2.Input.PARAM, dtype=F32, shape=[3, 2])
    g.inputs.add(name="x", role=graph_pb2.Input.DATA, dtype=F32, shape=[-1, 3])
    for op, inputs, attrs in nodes:
        g.nodes.add(op=op, inputs=inputs, attrs=attrs)
    g.outputs.add(name="loss", value=len(g.inputs) + len(g.nodes) - 1)
    return g


def _mlp(sum_attrs, softmax_attrs=(), slope_attrs=()):
    return _graph(
        [
            ("matmul", [1, 0], []),
            ("leaky_relu", [2], list(slope_attrs)),
            ("log_softmax", [3], list(softmax_attrs)),
            ("sum", [4], list(sum_attrs)),
        ]
    )


GRAPHS = {
    "no attributes": _mlp([]),
    "defaults spelled out": _mlp(
        [_attr("keepdim", b=False), _attr("dim", none=True)],
        [_attr("dim", i=-1)],
        [_attr("negative_slope", f=0.01)],
    ),
    "attributes unsorted": _mlp(
        [_attr("keepdim", b=False), _attr("dim", ints=[0, 1])], [_attr("dim", i=1)]
    ),
    "attributes sorted": _mlp(
        [_attr("dim", ints=[0, 1]), _attr("keepdim", b=False)], [_attr("dim", i=1)]
    ),
    "negative zero is no default": _graph(
        [
            (
                "pad",
                [1],
                [_attr("value", f=-0.0), _attr("mode", s="constant"), _attr("pad", ints=[1, 1])],
            ),
            ("cast", [2], [_attr("dtype", dtype="float32")]),
            ("clamp", [3], [_attr("max", f=1.0), _attr("min", none=True)]),
            ("sum", [4], []),
        ]
    ),
    "empty ints default and an int 0": _graph(
        [
            ("sum", [1], [_attr("dim", ints=[1])]),
            ("cumsum", [2], [_attr("dim", i=0)]),
            ("sum", [3], []),
            ("reshape", [4], [_attr("shape", ints=[])]),
        ]
    ),
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_client_side_id_equals_the_workers(name, stub, defaults) -> None:
    graph = GRAPHS[name]
    got = stub.RegisterGraph(worker_pb2.RegisterGraphRequest(graph=graph), timeout=30).graph_id
    assert client_side_id(graph, defaults) == got


def test_the_normalisation_is_needed(stub, defaults) -> None:
    """Spelled-out defaults and unsorted attributes change the bytes but not the id, so the
    comparison above is not met by hashing the bytes as sent."""
    raw = GRAPHS["defaults spelled out"].SerializeToString(deterministic=True)
    plain = client_side_id(GRAPHS["no attributes"], defaults)
    assert hashlib.sha256(raw).hexdigest() != plain
    assert client_side_id(GRAPHS["defaults spelled out"], defaults) == plain
    assert client_side_id(GRAPHS["attributes unsorted"], defaults) == client_side_id(
        GRAPHS["attributes sorted"], defaults
    )
    # -0.0 is kept (not the default 0.0), while the spelled-out defaults around it are not.
    pad = [a.name for a in GRAPHS["negative zero is no default"].nodes[0].attrs]
    assert len(pad) == 3
    ids = {client_side_id(g, defaults) for g in GRAPHS.values()}
    assert len(ids) == 4  # no attributes == defaults; unsorted == sorted
