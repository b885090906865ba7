"""Compressed replies on the worker-to-coordinator hop (worker.proto, ``WorkerCompression``):
the worker's blobs against compressing its dense gradient with the same residual, error
feedback across calls and rounds, the bounded residual store, and bad options."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from models import classification_batch, cross_entropy, mlp

from gradmesh.cli import main
from gradmesh.client import WorkerClient
from gradmesh.core import graph as core_graph
from gradmesh.core import serialize
from gradmesh.server import compression
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServiceError
from gradmesh.server.worker import GradientRequest, GradientWorker, SharedMemoryRef
from gradmesh.server.worker.residuals import (
    CompressionRequest,
    ResidualStore,
    check_compression,
)
from gradmesh.server.workers import ParamSet, WorkerHandle
from gradmesh.v1 import worker_pb2
from gradmesh.wire import compression as wire_compression
from gradmesh.wire.errors import bad_request_field

TOPK = {"kind": "topk", "ratio": 0.1}
SIGN = {"kind": "sign"}


@pytest.fixture(scope="module")
def worker():
    w = worker_mod.start("cpu")
    yield w
    w.stop(0)


@pytest.fixture(scope="module")
def problem():
    model = mlp(6, 16, 3, seed=2)
    x, y = classification_batch(24, 6, 3, seed=0)
    graph = core_graph.trace(cross_entropy, model, x, y, data_names=["x", "y"])
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    return graph, core_graph.graph_id(graph), params, {"x": x, "y": y}


def _handle(address: str, transport: str) -> WorkerHandle:
    # A message limit of 1 MiB makes every call of this handle a stream (WorkerHandle
    # streams what is within 1 MiB of half the limit).
    limit = (64 << 20) if transport == "unary" else (1 << 20)
    handle = WorkerHandle(address, "static", 30.0, None, limit)
    handle.probe()
    return handle


def _call(handle, problem, spec=None, *, index=0, round_=1, residual_set="job"):
    graph, graph_id, params, data = problem
    message = None
    if spec is not None:
        message = worker_pb2.WorkerCompression(
            kind=spec["kind"],
            ratio=spec.get("ratio", 0.0),
            residual_set=residual_set,
            residual_index=index,
            residual_round=round_,
        )
    return handle.compute(
        graph, graph_id, ParamSet(1, params, "job"), data, 1.0, 7, [], compression=message
    )


def _expected(spec, g, e):
    """What the coordinator mode computes from gradient ``g`` and residual ``e``: the
    blob and the next residual."""
    p = g + e
    c = compression.compress(spec, p)
    return wire_compression.encode(spec["kind"], c), p - c


@pytest.mark.parametrize("transport", ["unary", "stream"])
@pytest.mark.parametrize("spec", [TOPK, SIGN], ids=["topk", "sign"])
def test_a_compressed_reply_is_the_dense_gradient_compressed_with_error_feedback(
    worker, problem, transport, spec
):
    handle = _handle(worker.address, transport)
    try:
        dense = _call(handle, problem)
        assert dense.compressed == {} and dense.compression == ""
        residual = {n: np.zeros_like(g) for n, g in dense.gradients.items()}
        for round_ in (1, 2, 3):  # the same batch each round: the residual makes the difference
            key = f"{transport}-{spec['kind']}"
            r = _call(handle, problem, spec, index=5, round_=round_, residual_set=key)
            assert r.compression == spec["kind"] and r.gradients == {}
            assert set(r.compressed) == set(dense.gradients)
            assert np.array_equal(r.loss, dense.loss)
            for name, g in dense.gradients.items():
                words, residual[name] = _expected(spec, g, residual[name])
                assert r.compressed[name].dtype == np.int32
                assert np.array_equal(r.compressed[name], words), (round_, name)
            assert any(np.any(e != 0) for e in residual.values())
    finally:
        handle.close()


def test_a_retried_round_starts_from_the_same_residual(worker, problem):
    handle = _handle(worker.address, "unary")
    try:
        g = _call(handle, problem).gradients
        first = _call(handle, problem, TOPK, round_=1, residual_set="retry").compressed
        second = _call(handle, problem, TOPK, round_=2, residual_set="retry").compressed
        again = _call(handle, problem, TOPK, round_=2, residual_set="retry").compressed
        third = _call(handle, problem, TOPK, round_=3, residual_set="retry").compressed
        other = _call(handle, problem, TOPK, index=1, round_=3, residual_set="retry").compressed
    finally:
        handle.close()
    for name in g:
        words1, e1 = _expected(TOPK, g[name], 0 * g[name])
        words2, e2 = _expected(TOPK, g[name], e1)
        words3, _ = _expected(TOPK, g[name], e2)
        assert np.array_equal(first[name], words1)
        assert np.array_equal(second[name], words2) and np.array_equal(again[name], words2)
        assert np.array_equal(third[name], words3)
        assert np.array_equal(other[name], words1)  # another index: its own residual
    assert worker.worker.residuals.evicted == 0


def test_the_residuals_are_evicted_least_recently_used_within_their_bytes():
    g = {"w": np.random.default_rng(0).standard_normal(10).astype(np.float32)}  # 40 bytes
    # A key holds its residual after its last round (40 bytes) and, from its second round
    # on, the one before it (80 bytes in all).
    store = ResidualStore(150)

    def call(index, round_=1, into=store):
        return into.compress(CompressionRequest(TOPK, ("job", index), round_), list(g.items()))

    fresh = call(0)
    call(1)
    call(0, 2)  # key 0 is now the most recent
    call(2)  # 80 + 40 + 40 > 150: key 1 goes
    assert store.evicted == 1 and len(store) == 2
    unbounded = ResidualStore(1 << 20)
    kept = [call(0, r, unbounded)[0][1] for r in (1, 2, 3)]
    assert np.array_equal(call(0, 3)[0][1], kept[2])  # kept: its error fed back
    assert not np.array_equal(kept[2], fresh[0][1])
    assert np.array_equal(call(1, 2)[0][1], fresh[0][1])  # evicted: starts from zeros again
    none = ResidualStore(0)  # keeps nothing: compression without error feedback
    for round_ in (1, 2):
        out = none.compress(CompressionRequest(TOPK, ("job", 0), round_), list(g.items()))
        assert np.array_equal(out[0][1], fresh[0][1])
    assert len(none) == 0


def test_capabilities_announce_the_kinds_and_the_residual_bytes(worker):
    with WorkerClient(worker.address, shared_memory=False) as client:
        caps = client.capabilities()
    assert list(caps.compression_kinds) == ["topk", "sign"]
    assert caps.limits.residual_bytes == 1 << 30


@pytest.mark.parametrize(
    "values, field",
    [
        ({"kind": "gzip", "residual_set": "j"}, "compression.kind"),
        ({"kind": "topk", "ratio": 0.0, "residual_set": "j"}, "compression.ratio"),
        ({"kind": "topk", "ratio": 1.5, "residual_set": "j"}, "compression.ratio"),
        ({"kind": "sign", "ratio": 0.5, "residual_set": "j"}, "compression.ratio"),
        ({"kind": "sign"}, "compression.residual_set"),
    ],
)
def test_bad_compression_options_are_invalid_argument_naming_the_field(
    worker, problem, values, field
):
    graph, _, params, data = problem
    req = worker_pb2.ComputeGradientsRequest(
        graph=graph, compression=worker_pb2.WorkerCompression(**values)
    )
    for n, a in params.items():
        req.parameters.add(name=n).tensor.CopyFrom(serialize.to_proto(a))
    for n, a in data.items():
        req.data.add(name=n).tensor.CopyFrom(serialize.to_proto(a))
    with WorkerClient(worker.address, shared_memory=False) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.stub.ComputeGradients(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_field(e.value) == field
        assert client.capabilities().backend == "cpu"  # still serving


def test_compression_with_gradients_in_shared_memory_is_refused(problem):
    graph, _, _, _ = problem
    worker = GradientWorker("cpu")
    request = GradientRequest(
        graph=graph,
        shared_memory=SharedMemoryRef(segment="s", gradient_segment="g"),
        compression=check_compression("sign", 0.0, "job", 0, 1),
    )
    with pytest.raises(ServiceError) as e:
        worker.prepare(request, same_host=True)
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "compression")


def test_a_negative_residual_budget_is_refused(capsys):
    assert main(["worker", "--port", "0", "--residual-bytes", "-1"]) == 2
    assert "--residual-bytes" in capsys.readouterr().err
