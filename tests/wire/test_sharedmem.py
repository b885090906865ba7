"""Same-host transport: segments (core/sharedmem.py), the worker's SharedMemory requests,
and the SDK's and coordinator's use of them, with their fallbacks to bytes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from models import classification_batch, cross_entropy, mlp

import gradmesh.core as gm
from gradmesh.client import CoordinatorClient, WorkerClient
from gradmesh.core import serialize, sharedmem
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServiceError
from gradmesh.v1 import worker_pb2
from gradmesh.wire import sharedmem as wire_sharedmem
from gradmesh.wire.worker import shared_request

pytestmark = pytest.mark.skipif(
    not wire_sharedmem.available(), reason="no memfd sealing and /proc here"
)


def _mine() -> set[str]:
    """The names of the segments this process created and still holds open (a worker's
    mapping of one, in this process too, holds a descriptor of its own)."""
    import gc

    return {o.name for o in gc.get_objects() if isinstance(o, sharedmem.Segment) and not o.closed}


def _other_name(name: str, secret: str = "0" * 32) -> str:
    """``name`` with another secret."""
    return "-".join(name.split("-")[:3] + [secret])


@pytest.fixture(autouse=True)
def no_segment_is_left_behind():
    before = _mine()
    yield
    import gc

    gc.collect()
    assert _mine() <= before


def _model():
    return mlp(20, 32, 10, seed=3)


_loss = cross_entropy


def _batch(n=16, seed=0):
    return classification_batch(n, 20, 10, seed)


# ------------------------------------------------------------------ segments ------------


def test_layout_aligns_every_tensor():
    offsets, size = sharedmem.layout([("a", 3), ("b", 64), ("c", 65), ("d", 0)])
    assert offsets == {"a": 64, "b": 128, "c": 192, "d": 320} and size == 320
    assert sharedmem.layout([]) == ({}, sharedmem.HEADER)  # the header comes first


def test_a_segment_is_a_sealed_reserved_memory_file_closed_on_close():
    import fcntl

    seg = sharedmem.Segment(1000)
    assert sharedmem.NAME.match(seg.name)
    assert seg.name.startswith(f"gradmesh-{os.getpid()}-{seg.fd}-")
    if os.path.isdir("/dev/shm"):  # nothing anyone can list
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"gradmesh-{os.getpid()}-")]
    st = os.fstat(seg.fd)
    assert st.st_size == 1000 and st.st_blocks * 512 >= 1000  # reserved, not sparse
    seals = fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    for change in (
        lambda: os.ftruncate(seg.fd, 10),
        lambda: os.ftruncate(seg.fd, 1 << 20),
        lambda: fcntl.fcntl(seg.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE),
    ):
        with pytest.raises(PermissionError):  # sealed, for its creator too
            change()
    secret = bytes.fromhex(seg.name.rsplit("-", 1)[1])
    assert bytes(seg.buf[:32]) == sharedmem.MAGIC + secret
    a = seg.view(64, np.float32, (3,))
    a[...] = [1, 2, 3]
    seg.close()
    assert seg.closed and seg.name not in _mine()
    assert a.tolist() == [1, 2, 3]  # views outlive the segment


def test_the_pool_reuses_segments():
    pool = wire_sharedmem.Pool(keep=1)
    a = pool.acquire(100)
    pool.release(a)
    assert pool.acquire(50) is a  # big enough: reused
    b = pool.acquire(10_000)
    pool.release(a)
    pool.release(b)  # over `keep`: the smaller goes
    assert a.closed and not b.closed
    pool.close()
    assert b.closed


def test_a_dead_process_leaves_no_segment_behind():
    """A segment lives only while its creator holds it: a killed client leaves nothing in
    /dev/shm or anywhere (no sweeping needed), and its name opens nothing any more."""
    code = (
        "import os, sys; sys.path[:0] = %r; from gradmesh.core import sharedmem; "
        "s = sharedmem.Segment(4096); print(s.name, flush=True); sys.stdin.read(); "
        "os._exit(0)" % sys.path[:1]
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    name = child.stdout.readline().strip()
    attached = wire_sharedmem.Attached()
    assert len(attached.get(name)) == 4096  # a same-user worker maps it
    child.stdin.close()
    child.wait(10)
    with pytest.raises(sharedmem.SegmentError, match="cannot use this segment"):
        attached.get(name)  # its creator is gone
    assert len(attached) == 0


@pytest.mark.parametrize(
    "name,why",
    [
        ("x", "not a gradmesh segment name"),
        ("gradmesh-1-2-abc", "not a gradmesh segment name"),
        ("../etc/passwd", "not a gradmesh segment name"),
        ("gradmesh-1-2-" + "0" * 32 + "\n", "not a gradmesh segment name"),
        ("gradmesh-1-" + "0" * 32, "not files in /dev/shm"),  # the old names
        ("gradmesh-1-0-" + "0" * 32, "cannot use this segment"),  # pid 1's stdin
        (f"gradmesh-{os.getpid()}-0-" + "0" * 32, "cannot use this segment"),
        ("gradmesh-999999999-3-" + "0" * 32, "cannot use this segment"),
    ],
)
def test_attached_refuses_what_is_not_a_segment(name, why):
    with pytest.raises(sharedmem.SegmentError, match=why) as e:
        wire_sharedmem.Attached().get(name)
    assert "0" * 32 not in str(e.value)  # names are never repeated


def test_attached_refuses_a_wrong_secret_and_files_that_are_no_sealed_segments(tmp_path):
    """The same message whatever failed: a wrong secret, a regular file or an unsealed
    memory file with the right header (a client could truncate it under the worker)."""
    attached = wire_sharedmem.Attached()
    seg = sharedmem.Segment(4096)
    secret = seg.name.rsplit("-", 1)[1]
    messages = set()
    plain = open(tmp_path / "f", "w+b")
    plain.write(sharedmem.MAGIC + bytes.fromhex(secret) + b"\0" * 4096)
    plain.flush()
    unsealed = os.memfd_create("gradmesh", os.MFD_CLOEXEC)
    os.write(unsealed, sharedmem.MAGIC + bytes.fromhex(secret) + b"\0" * 4096)
    partly = os.memfd_create("gradmesh", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(partly, sharedmem.MAGIC + bytes.fromhex(secret) + b"\0" * 4096)
    import fcntl

    fcntl.fcntl(partly, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)  # may still grow
    try:
        for name in (
            _other_name(seg.name),
            _other_name(seg.name, "f" * 32),
            f"gradmesh-{os.getpid()}-{plain.fileno()}-{secret}",
            f"gradmesh-{os.getpid()}-{unsealed}-{secret}",
            f"gradmesh-{os.getpid()}-{partly}-{secret}",
        ):
            with pytest.raises(sharedmem.SegmentError) as e:
                attached.get(name)
            messages.add(str(e.value))
        assert len(messages) == 1 and len(attached) == 0
        assert bytes(attached.get(seg.name)[:16]) == sharedmem.MAGIC  # the right one
    finally:
        plain.close()
        os.close(unsealed)
        os.close(partly)
        seg.close()


def test_attached_maps_once_and_drops_closed_segments():
    attached = wire_sharedmem.Attached()
    seg = sharedmem.Segment(4096)
    first = attached.get(seg.name)
    assert attached.get(seg.name) is first
    other = sharedmem.Segment(4096)
    name = seg.name
    seg.close()
    with pytest.raises(sharedmem.SegmentError):
        attached.get(name)  # closed by its creator
    third = sharedmem.Segment(4096)  # may reuse the descriptor
    with pytest.raises(sharedmem.SegmentError):
        attached.get(name)  # ... but not the secret
    attached.get(other.name)
    assert attached.names() == {other.name}
    attached.get(third.name)
    other.close()
    fourth = sharedmem.Segment(4096)
    attached.get(fourth.name)  # a new mapping prunes
    assert attached.names() == {third.name, fourth.name}
    third.close()
    fourth.close()


@pytest.mark.parametrize(
    "target,same",
    [
        ("127.0.0.1:5", True),
        ("localhost:5", True),
        ("[::1]:5", True),
        ("unix:/tmp/s", True),
        ("ipv4:127.0.0.1:5", True),
        ("10.0.0.2:5", False),
        ("worker-0.gradmesh:50051", False),
    ],
)
def test_same_host_targets(target, same):
    assert wire_sharedmem.same_host_target(target) is same


@pytest.mark.parametrize(
    "peer,same",
    [
        ("ipv4:127.0.0.1:5123", True),
        ("ipv6:[::1]:5123", True),
        ("unix:/tmp/x", True),
        ("ipv6:[::ffff:127.0.0.1]:1", True),
        ("ipv4:10.1.2.3:5123", False),
        ("ipv6:[fe80::1]:1", False),
    ],
)
def test_same_host_peers(peer, same):
    assert worker_mod._same_host(peer) is same


# ------------------------------------------------------------------ the worker ----------


def test_gradients_through_shared_memory_equal_local_backward_bitwise(worker):
    model = _model()
    x, y = _batch(64)
    loss = _loss(model, gm.from_numpy(x), gm.from_numpy(y))
    loss.backward()
    with WorkerClient(worker.address, shared_memory_min_bytes=0) as client:
        assert client.capabilities().shared_memory
        for _ in range(2):  # the second call reuses segments
            r = client.compute_gradients(_loss, model, x, y)
            assert r.timings["shared_memory"] == 1.0 and not r.timings["streamed"]
            assert np.array_equal(r.loss, loss.detach().numpy())
            for name, p in model.named_parameters():
                assert np.array_equal(r.gradients[name], p.grad.numpy()), name
                assert r.gradients[name].flags.writeable  # the user's own copy
        partial = client.compute_gradients(_loss, model, x, y, gradients=["2.bias"])
        assert list(partial.gradients) == ["2.bias"]
        assert np.array_equal(partial.gradients["2.bias"], model[2].bias.grad.numpy())
    with WorkerClient(worker.address) as client:  # 4 KB of parameters: bytes
        assert client.compute_gradients(_loss, model, x, y).timings["shared_memory"] == 0


def test_kept_results_are_never_overwritten_and_dropped_ones_are_reused(worker):
    model = _model()
    x, y = _batch()
    with WorkerClient(worker.address, shared_memory_min_bytes=0) as client:
        first = client.compute_gradients(_loss, model, x, y)
        kept = {n: g.copy() for n, g in first.gradients.items()}
        with gm.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
        second = client.compute_gradients(_loss, model, x, y)  # while `first` is held
        assert not np.array_equal(second.gradients["0.weight"], kept["0.weight"])
        for n in kept:
            assert np.array_equal(first.gradients[n], kept[n]), n
        mine = _mine()
        del first, second
        import gc

        gc.collect()
        for _ in range(3):  # dropped results: segments reused
            client.compute_gradients(_loss, model, x, y)
        assert _mine() <= mine


def test_lent_segments_go_back_to_the_pool_when_their_views_die():
    import gc

    pool = wire_sharedmem.Pool(keep=2)
    seg = pool.acquire(4096)
    view = pool.lend(seg)[64:128].view(np.float32)
    gc.collect()
    assert pool.acquire(4096) is not seg  # still lent
    del view
    gc.collect()
    assert pool.acquire(4096) is seg
    pool.close()


@contextlib.contextmanager
def _hand_built(model, graph_id: str, x, y):
    """A hand-built SharedMemory request for ``model`` on ``(x, y)``, with its parameter
    segment and offsets: ``(request, segment, offsets, gradient segment)``; the segments
    are removed afterwards."""
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    pool = wire_sharedmem.Pool()
    pseg, poff = wire_sharedmem.place(pool, params)
    gseg, goff = wire_sharedmem.place(pool, params, write=False)
    try:
        req = shared_request(params, pseg, poff, gseg, goff)
        req.graph_id = graph_id
        req.data.add(name="x0").tensor.CopyFrom(serialize.to_proto(x))
        req.data.add(name="x1").tensor.CopyFrom(serialize.to_proto(y))
        yield req, pseg, poff, gseg
    finally:
        pseg.close()
        gseg.close()
        pool.close()


def _raw(worker, model, mutate, x=None, y=None):
    """A hand-built SharedMemory request, changed by ``mutate(req, pseg, gseg)``."""
    x, y = _batch() if x is None else (x, y)
    with WorkerClient(worker.address, shared_memory_min_bytes=0) as client:
        graph, graph_id = client.trace(_loss, model, x, y)
        client.register_graph(graph)
        with _hand_built(model, graph_id, x, y) as (req, pseg, _, gseg):
            mutate(req, pseg, gseg)
            return client.stub.ComputeGradients(req, timeout=30)


def _field(e: grpc.RpcError) -> str:
    from gradmesh.wire.errors import bad_request_field

    return bad_request_field(e)


def _set(attr, value):
    def mutate(req, pseg, gseg):
        setattr(req.shared_memory, attr, value)

    return mutate


@pytest.mark.parametrize(
    "mutate,code,field",
    [
        (_set("segment", "not-a-segment"), "INVALID_ARGUMENT", "shared_memory.segment"),
        (
            _set("segment", "gradmesh-1-" + "0" * 32),
            "FAILED_PRECONDITION",  # the old names
            "shared_memory.segment",
        ),
        (
            _set("segment", "gradmesh-1-3-" + "0" * 32),
            "FAILED_PRECONDITION",
            "shared_memory.segment",
        ),
        (
            lambda r, p, g: setattr(r.shared_memory, "segment", _other_name(p.name)),
            "FAILED_PRECONDITION",
            "shared_memory.segment",
        ),  # a wrong secret
        (
            _set("gradient_segment", "gradmesh-1-3-" + "0" * 32),
            "FAILED_PRECONDITION",
            "shared_memory.gradient_segment",
        ),
        (
            lambda r, p, g: setattr(r.shared_memory, "gradient_segment", _other_name(g.name)),
            "FAILED_PRECONDITION",
            "shared_memory.gradient_segment",
        ),
        (
            _set("parameter_segment", "gradmesh-1-3-" + "0" * 32),
            "FAILED_PRECONDITION",
            "shared_memory.parameter_segment",
        ),
        (_set("parameter_segment", "../x"), "INVALID_ARGUMENT", "shared_memory.parameter_segment"),
        (
            lambda r, p, g: r.shared_memory.parameter_offsets.update({"0.weight": 1 << 40}),
            "INVALID_ARGUMENT",
            "shared_memory.parameter_offsets[0.weight]",
        ),
        (
            lambda r, p, g: r.shared_memory.parameter_offsets.update({"0.weight": 8}),
            "INVALID_ARGUMENT",
            "shared_memory.parameter_offsets[0.weight]",
        ),
        (
            lambda r, p, g: r.shared_memory.gradient_offsets.update({"2.bias": 1 << 40}),
            "INVALID_ARGUMENT",
            "shared_memory.gradient_offsets[2.bias]",
        ),
        (
            lambda r, p, g: r.shared_memory.parameter_offsets.update({"nope": 0}),
            "INVALID_ARGUMENT",
            "shared_memory.parameter_offsets[nope]",
        ),
        (
            lambda r, p, g: r.shared_memory.data_offsets.update({"0.weight": 64}),
            "INVALID_ARGUMENT",
            "shared_memory.data_offsets[0.weight]",
        ),
        (
            lambda r, p, g: r.shared_memory.gradient_offsets.update({"2.bias": 0}),
            "INVALID_ARGUMENT",
            "shared_memory.gradient_offsets[2.bias]",
        ),  # the header
        (
            lambda r, p, g: (
                r.shared_memory.data_offsets.update({"x0": 1 << 40}),
                r.data[0].tensor.ClearField("data"),
            ),
            "INVALID_ARGUMENT",
            "shared_memory.data_offsets[x0]",
        ),
        (
            lambda r, p, g: r.shared_memory.data_offsets.update({"x0": 64}),
            "INVALID_ARGUMENT",
            "data[x0].data",
        ),
        (
            lambda r, p, g: r.shared_memory.gradient_offsets.pop("2.bias"),
            "INVALID_ARGUMENT",
            "shared_memory.gradient_offsets",
        ),
        (
            lambda r, p, g: r.parameters[0].tensor.__setattr__("data", b"\0" * 4),
            "INVALID_ARGUMENT",
            "parameters[0.weight].data",
        ),
        (
            lambda r, p, g: r.shared_memory.ClearField("segment"),
            "INVALID_ARGUMENT",
            "shared_memory.segment",
        ),
    ],
)
def test_bad_shared_memory_requests_name_the_field(worker, mutate, code, field):
    with pytest.raises(grpc.RpcError) as e:
        _raw(worker, _model(), mutate)
    assert (e.value.code().name, _field(e.value)) == (code, field), e.value.details()
    r = _raw(worker, _model(), lambda *a: None)  # the worker still serves
    assert r.gradients_in_shared_memory and not r.gradients[0].tensor.data


def test_callers_on_another_host_and_streams_are_refused():
    w = worker_mod.GradientWorker("cpu")
    req = worker_pb2.ComputeGradientsRequest(graph_id="0" * 64)
    req.shared_memory.segment = "gradmesh-1-3-" + "0" * 32
    for kw, code in (
        ({"same_host": False}, grpc.StatusCode.FAILED_PRECONDITION),
        ({"same_host": True, "header_only": True}, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(ServiceError) as e:
            w._check_shared(
                req.shared_memory, kw.get("header_only", False), kw["same_host"], set(), set()
            )
        assert (e.value.code, e.value.field) == (code, "shared_memory.segment")


def test_the_client_falls_back_to_bytes(worker, monkeypatch):
    model = _model()
    x, y = _batch()
    off = worker_mod.start("cpu", shared_memory=False)
    try:
        with WorkerClient(off.address, shared_memory_min_bytes=0) as client:
            assert not client.capabilities().shared_memory
            r = client.compute_gradients(_loss, model, x, y)
            assert r.timings["shared_memory"] == 0.0
    finally:
        off.stop(0)

    # A worker that says yes but cannot open the segments (another container).
    def cannot(name):
        raise sharedmem.SegmentError("cannot open it here")

    monkeypatch.setattr(worker.worker.segments, "get", cannot)
    with WorkerClient(worker.address, shared_memory_min_bytes=0) as client:
        r = client.compute_gradients(_loss, model, x, y)
        assert r.timings["shared_memory"] == 0.0
        again = client.compute_gradients(_loss, model, x, y)
        assert again.timings["shared_memory"] == 0.0  # decided once
    for name in r.gradients:
        assert np.array_equal(r.gradients[name], again.gradients[name])


# ------------------------------------------------------------------ the coordinator -----


def _train(coordinator_kw, workers, steps=4):
    server = coordinator_mod.start(workers=[w.address for w in workers], **coordinator_kw)
    try:
        with CoordinatorClient(server.address) as client:
            model = _model()
            job = client.create_job(
                model,
                _loss,
                gm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                micro_batch_size=8,
                example_batch=_batch(20),
            )
            for s in range(steps):
                job.step(*_batch(20, seed=s))
            return job.parameters()
    finally:
        server.stop(0)


def test_the_coordinator_gives_the_same_bits_with_and_without_shared_memory(worker):
    second = worker_mod.start("cpu")
    try:
        mapped_before = len(worker.worker.segments)
        shared = _train({}, [worker, second])
        assert len(worker.worker.segments) > mapped_before or len(second.worker.segments)
        plain = _train({"shared_memory": False}, [worker, second])
        unable = worker_mod.start("cpu", shared_memory=False)
        try:
            mixed = _train({}, [worker, unable])  # one worker falls back to bytes
        finally:
            unable.stop(0)
    finally:
        second.stop(0)
    for name in plain:
        assert np.array_equal(shared[name], plain[name]), name
        assert np.array_equal(mixed[name], plain[name]), name


def test_a_segment_that_cannot_be_reserved_falls_back_to_bytes(worker, monkeypatch):
    """posix_fallocate fails with ENOSPC (a memory limit): the SDK and the coordinator send
    bytes instead, with the same results."""

    def full(self, size):
        raise sharedmem.SegmentError("cannot reserve bytes of shared memory: No space left")

    model = _model()
    x, y = _batch()
    with WorkerClient(worker.address, shared_memory=False) as client:
        reference = client.compute_gradients(_loss, model, x, y)
    plain = _train({"shared_memory": False}, [worker])
    monkeypatch.setattr(sharedmem.Segment, "__init__", full)
    with WorkerClient(worker.address, shared_memory_min_bytes=0) as client:
        r = client.compute_gradients(_loss, model, x, y)
    assert r.timings["shared_memory"] == 0.0
    for name in reference.gradients:
        assert np.array_equal(r.gradients[name], reference.gradients[name])
    fallen = _train({}, [worker])
    for name in plain:
        assert np.array_equal(fallen[name], plain[name])


def test_concurrent_calls_from_threads_get_their_own_results(worker):
    from concurrent.futures import ThreadPoolExecutor

    models = []
    for k in range(4):
        m = _model()
        with gm.no_grad():
            for p in m.parameters():
                p.mul_(1.0 + k)
        models.append(m)
    x, y = _batch()
    wants = []
    for m in models:
        m.zero_grad()
        _loss(m, gm.from_numpy(x), gm.from_numpy(y)).backward()
        wants.append({n: p.grad.numpy().copy() for n, p in m.named_parameters()})
    with WorkerClient(worker.address, shared_memory_min_bytes=0) as client:

        def run(k):
            return [client.compute_gradients(_loss, models[k], x, y) for _ in range(5)]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, range(4)))
    for k, rs in enumerate(results):
        for r in rs:
            assert r.timings["shared_memory"] == 1.0
            for n, g in wants[k].items():
                assert np.array_equal(r.gradients[n], g), (k, n)


def test_a_repeated_request_is_checked_once_and_reads_the_live_segment():
    """A shared-memory request sent again byte for byte (the client reuses its segments)
    skips the header checks, but computes from what the segment holds now, and is checked
    afresh once its graph is evicted or its segment is gone."""
    from gradmesh.core import graph as core_graph

    w = worker_mod.GradientWorker("cpu", graph_cache_size=1)
    model = _model()
    x, y = _batch()
    graph_id = w.register(core_graph.trace(_loss, model, x, y))
    with _hand_built(model, graph_id, x, y) as (req, pseg, poff, _):
        first = w.unary(req, same_host=True)
        for scale in (1.0, 3.0):
            with gm.no_grad():
                for p in model.parameters():
                    p.mul_(scale)
            for n, p in model.named_parameters():  # the client writes new values
                pseg.view(poff[n], np.float32, p.shape)[...] = p.detach().numpy()
            prepared, ps, ds, views = again = w.unary(req, same_host=True)
            assert again[0] is first[0]  # not checked again
            w.compute(prepared, ps, ds, on_grad=lambda n, a: views[n].__setitem__(..., a))
            model.zero_grad()
            _loss(model, gm.from_numpy(x), gm.from_numpy(y)).backward()
            for n, p in model.named_parameters():
                assert np.array_equal(views[n], p.grad.numpy()), (scale, n)
        w.register(core_graph.trace(lambda m, x, y: _loss(m, x, y) * 2, model, x, y))
        with pytest.raises(ServiceError) as e:
            w.unary(req, same_host=True)
        # (another graph evicted it: the cache holds one)
        assert (e.value.code, e.value.field) == (grpc.StatusCode.NOT_FOUND, "graph_id")
        w.register(core_graph.trace(_loss, model, x, y))
        assert w.unary(req, same_host=True)[0].graph_id == graph_id  # registered again
        pseg.close()
        with pytest.raises(ServiceError) as e:
            w.unary(req, same_host=True)
        assert (e.value.code, e.value.field) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "shared_memory.segment",
        )


def test_a_shared_model_is_read_where_it_is(worker):
    """After ``model.share_memory()`` the parameters are not copied per call: the request
    names their segment, and the gradients equal local backward's bitwise, also after an
    optimizer step changed them in place."""
    from gradmesh.wire import worker as client_mod

    model = _model().share_memory()
    assert all(p.is_shared() for p in model.parameters())
    x, y = _batch(32)
    opt = gm.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with WorkerClient(worker.address, shared_memory_min_bytes=0) as client:
        sent = []
        call = client._unary_call
        client._unary_call = lambda message, **kw: (sent.append(message), call(message, **kw))[1]
        for _ in range(3):
            r = client.compute_gradients(_loss, model, x, y)
            model.zero_grad()
            _loss(model, gm.from_numpy(x), gm.from_numpy(y)).backward()
            for name, p in model.named_parameters():
                assert np.array_equal(r.gradients[name], p.grad.numpy()), name
            opt.step()
            assert all(p.is_shared() for p in model.parameters())
    shm = worker_pb2.ComputeGradientsRequest.FromString(sent[-1]).shared_memory
    segment = sharedmem.locate(model[0].weight.detach().numpy())[0]
    assert shm.parameter_segment == segment != shm.segment
    assert dict(shm.parameter_offsets) == {
        n: sharedmem.locate(p.detach().numpy())[1] for n, p in model.named_parameters()
    }
    assert client_mod._located({"a": np.ones(3, np.float32)}) is None


def test_shared_tensors_keep_their_values_and_their_segment_goes_with_them():
    t = gm.tensor(np.arange(12, dtype=np.float32).reshape(3, 4), requires_grad=True)
    assert not t.is_shared()
    assert t.share_memory_() is t and t.is_shared() and t.requires_grad
    assert np.array_equal(t.detach().numpy(), np.arange(12).reshape(3, 4))
    name = sharedmem.locate(t.detach().numpy())[0]
    assert name in _mine()
    with gm.no_grad():
        t.mul_(2)  # in place: still shared
    assert t.is_shared() and t.detach().numpy()[2, 3] == 22
    del t
    import gc

    gc.collect()
    assert name not in _mine()


def test_remembered_requests_let_go_of_removed_segments():
    """A remembered request's views keep its segments mapped: once the client removed them,
    the next new request forgets it (else removed segments' memory would stay in use)."""
    from gradmesh.core import graph as core_graph

    w = worker_mod.GradientWorker("cpu")
    model = _model()
    x, y = _batch()
    graph_id = w.register(core_graph.trace(_loss, model, x, y))
    with _hand_built(model, graph_id, x, y) as (req, *_):
        w.unary(req, same_host=True)
        assert len(w._shared_calls) == 1
    with _hand_built(model, graph_id, x, y) as (req, *_):  # new segments
        w.unary(req, same_host=True)
        assert len(w._shared_calls) == 1


def test_a_worker_that_knows_only_old_names_makes_the_client_fall_back(worker, monkeypatch):
    """A worker of an earlier version takes only names of files in /dev/shm and answers
    INVALID_ARGUMENT on the segment's field: the SDK sends bytes, with the same results."""
    model = _model()
    x, y = _batch()
    with WorkerClient(worker.address, shared_memory=False) as client:
        reference = client.compute_gradients(_loss, model, x, y)

    def old(shared, *args):
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a segment name (gradmesh-<pid>-<32 hex digits>)",
            "shared_memory.segment",
        )

    monkeypatch.setattr(worker.worker, "_check_shared", old)
    with WorkerClient(worker.address, shared_memory_min_bytes=0) as client:
        r = client.compute_gradients(_loss, model, x, y)
    assert r.timings["shared_memory"] == 0.0
    for name in reference.gradients:
        assert np.array_equal(r.gradients[name], reference.gradients[name])
