"""Parameters kept on a worker between calls (``parameter_set`` in worker.proto): the
worker's cache, its refusals, and the coordinator sending a step's parameters once per
worker instead of once per micro-batch, with the same bits."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from models import classification_batch, cross_entropy, mlp

import gradmesh.core as gm
from gradmesh.client import CoordinatorClient, WorkerClient
from gradmesh.core import serialize
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.worker import ParameterCache
from gradmesh.v1 import tensor_pb2, worker_pb2
from gradmesh.wire.errors import bad_request_field


def _model():
    return mlp(6, 16, 3, seed=2)


_loss = cross_entropy


def _batch(n=24, seed=0):
    return classification_batch(n, 6, 3, seed)


def test_the_cache_evicts_least_recently_used_within_its_bytes():
    cache = ParameterCache(100)
    a, b, c = (np.zeros(10, np.float32) for _ in range(3))  # 40 bytes each
    cache.put(("j", 1), {"w": a})
    cache.put(("j", 2), {"w": b})
    assert cache.get(("j", 1))["w"] is a  # now the most recent
    cache.put(("j", 3), {"w": c})  # 120 > 100: ("j", 2) goes
    assert cache.get(("j", 2)) is None and cache.get(("j", 1)) is not None
    cache.put(("big", 1), {"w": np.zeros(30, np.float32)})  # over capacity: not kept
    assert cache.get(("big", 1)) is None and len(cache) == 2


def _request(client, model, x, y, *, with_params=True, version=1, parameter_set="job"):
    graph, graph_id = client.trace(_loss, model, x, y)
    client.register_graph(graph)
    req = worker_pb2.ComputeGradientsRequest(
        graph_id=graph_id, parameter_set=parameter_set, parameter_version=version
    )
    if with_params:
        for n, p in model.named_parameters():
            req.parameters.add(name=n).tensor.CopyFrom(serialize.to_proto(p.detach().numpy()))
    for n, a in (("x0", x), ("x1", y)):
        req.data.add(name=n).tensor.CopyFrom(serialize.to_proto(a))
    return req


def test_a_kept_parameter_set_gives_the_same_gradients(worker):
    model = _model()
    x, y = _batch()
    with WorkerClient(worker.address, shared_memory=False) as client:
        caps = client.capabilities()
        assert caps.limits.parameter_cache_bytes == 1 << 30
        full = client.stub.ComputeGradients(_request(client, model, x, y))
        hits = worker.worker.kept.hits
        again = client.stub.ComputeGradients(_request(client, model, x, y, with_params=False))
        assert worker.worker.kept.hits == hits + 1
        for a, b in zip(full.gradients, again.gradients):
            assert a.name == b.name and a.tensor.data == b.tensor.data
        assert full.loss.data == again.loss.data


@pytest.mark.parametrize("change", ["version", "set", "graph"])
def test_missing_or_unfit_kept_parameters_are_refused_with_the_field(worker, change):
    model = _model()
    x, y = _batch()
    with WorkerClient(worker.address, shared_memory=False) as client:
        client.stub.ComputeGradients(_request(client, model, x, y, version=7))
        kw = (
            {"version": 8}
            if change == "version"
            else {"parameter_set": "other"}
            if change == "set"
            else {}
        )
        other = model
        if change == "graph":
            gm.manual_seed(0)
            other = gm.nn.Sequential(gm.nn.Linear(6, 4), gm.nn.ReLU(), gm.nn.Linear(4, 3))
            kw = {"version": 7}
        with pytest.raises(grpc.RpcError) as e:
            client.stub.ComputeGradients(_request(client, other, x, y, with_params=False, **kw))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert bad_request_field(e.value) == "parameters"
        assert client.capabilities().backend == "cpu"  # still serving


def _train(workers, steps=3, **kw):
    server = coordinator_mod.start(workers=[w.address for w in workers], **kw)
    try:
        with CoordinatorClient(server.address) as client:
            model = _model()
            job = client.create_job(
                model,
                _loss,
                gm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                micro_batch_size=6,
                example_batch=_batch(),
                job_id="cache",
            )
            for s in range(steps):
                job.step(*_batch(seed=s))  # 4 micro-batches a step
            return {n: t.numpy() for n, t in job.parameters().items()}
    finally:
        server.stop(0)
        server.coordinator.close()


def _kept_against_plain(**kw):
    """Train on a worker that keeps parameters and on one that keeps none, check that both
    end with the same bits, and return the two (stopped) workers."""
    keeping = worker_mod.start("cpu")
    plain = worker_mod.start("cpu", parameter_cache_bytes=0)
    try:
        kept = _train([keeping], shared_memory=False, **kw)
        reference = _train([plain], shared_memory=False)
    finally:
        keeping.stop(0)
        plain.stop(0)
    for name in reference:
        assert np.array_equal(kept[name], reference[name]), name
    return keeping, plain


@pytest.mark.parametrize("max_message_bytes", [64 << 20, 1 << 20], ids=["unary", "stream"])
def test_the_coordinator_sends_a_step_s_parameters_once_per_worker(max_message_bytes):
    keeping, plain = _kept_against_plain(max_message_bytes=max_message_bytes)
    assert keeping.worker.kept.hits == 3 * 3  # 3 of 4 micro-batches, 3 steps
    assert plain.worker.kept.hits == 0


def test_a_worker_that_lost_the_kept_parameters_is_sent_them_again(monkeypatch):
    real_get = ParameterCache.get
    calls = {"n": 0}

    def forgetful(self, key):
        calls["n"] += 1
        return None if calls["n"] % 2 else real_get(self, key)  # every other lookup

    monkeypatch.setattr(ParameterCache, "get", forgetful)
    _kept_against_plain()
    assert calls["n"] >= 4


def test_parameters_in_shared_memory_are_not_kept(worker):
    from gradmesh.wire import sharedmem
    from gradmesh.wire.worker import shared_request

    if not sharedmem.available():
        pytest.skip("no shared memory here")
    model = _model()
    x, y = _batch()
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    pool = sharedmem.Pool()
    pseg, poff = sharedmem.place(pool, params)
    gseg, goff = sharedmem.place(pool, params, write=False)
    try:
        with WorkerClient(worker.address) as client:
            req = _request(client, model, x, y, with_params=False, parameter_set="shm")
            req.MergeFrom(shared_request(params, pseg, poff, gseg, goff))
            assert client.stub.ComputeGradients(req).gradients_in_shared_memory
            with pytest.raises(grpc.RpcError) as e:  # the segment's values were not kept
                client.stub.ComputeGradients(
                    _request(client, model, x, y, with_params=False, parameter_set="shm")
                )
            assert bad_request_field(e.value) == "parameters"
    finally:
        pool.close()
        pseg.close()
        gseg.close()


def test_parameters_encoded_once_per_version_are_what_protobuf_writes():
    # The coordinator joins these bytes to every worker's request (server/workers.py).
    from gradmesh.server.workers import ParamSet

    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "t": rng.standard_normal((4, 3)).astype(np.float32).T,  # not C-contiguous
        "d": rng.standard_normal(5),  # float64
        "n": np.array([1, -2], np.int64),
        "s": np.float32(2.5),  # 0-d
        "e": np.zeros((0, 3), np.float32),
    }
    params = ParamSet(7, arrays, "job")
    encoded = params.unary_bytes()
    assert params.unary_bytes() is encoded  # made once per version
    expected = worker_pb2.ComputeGradientsRequest(
        parameters=[
            tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a)) for n, a in arrays.items()
        ]
    )
    assert encoded == expected.SerializeToString()
    head = worker_pb2.ComputeGradientsRequest(graph_id="g", seed=3).SerializeToString()
    joined = worker_pb2.ComputeGradientsRequest.FromString(head + encoded)
    assert joined.graph_id == "g" and joined.seed == 3
    for name, nt in zip(arrays, joined.parameters):
        assert nt.name == name
        np.testing.assert_array_equal(serialize.from_proto(nt.tensor), arrays[name])
