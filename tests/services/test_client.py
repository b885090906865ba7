"""The client SDK: errors as Python exceptions naming the field, retries, re-registration,
tokens, TLS/mTLS, and the server plumbing it relies on (config, metrics, shutdown)."""

from __future__ import annotations

import argparse
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import free_port, make_certs, needs_openssl
from test_worker_raw_grpc import W, X, expected, hand_graph

from gradmesh.client import (
    TLS,
    DeadlineExceeded,
    GradmeshError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    WorkerClient,
)
from gradmesh.server import runtime
from gradmesh.server import worker as worker_mod
from gradmesh.v1 import graph_pb2
from gradmesh.wire import errors


def w_and_x():
    return ({"w": np.array(W, np.float32).reshape(3, 2)}, np.array(X, np.float32).reshape(2, 3))


def test_graph_message_roundtrip(worker):
    params, x = w_and_x()
    with WorkerClient(worker.address) as client:
        r = client.compute_gradients(hand_graph(), params, x, outputs=["logits"])
    loss, logits, grad = expected()
    assert float(r.loss) == loss
    assert r.outputs["logits"].ravel().tolist() == logits
    assert r.gradients["w"].ravel().tolist() == grad


def test_a_non_canonical_graph_is_registered_once_under_its_canonical_id(worker):
    from gradmesh.core.graph import graph_id

    messy = hand_graph()
    messy.nodes[1].attrs.add(name="keepdim", b=False)  # sum's default, spelled out
    params, x = w_and_x()
    with WorkerClient(worker.address) as client:
        first = client.compute_gradients(messy, params, x)
        calls = []
        real = client.register_graph
        client.register_graph = lambda *a, **k: calls.append(a) or real(*a, **k)
        second = client.compute_gradients(messy, params, x)
    assert first.graph_id == second.graph_id == graph_id(hand_graph()) != graph_id(messy)
    assert not calls and float(second.loss) == expected()[0]


def test_invalid_argument_names_the_field(worker):
    params, x = w_and_x()
    params["w"] = params["w"].astype(np.float64)
    with WorkerClient(worker.address) as client:
        with pytest.raises(InvalidArgument) as e:
            client.compute_gradients(hand_graph(), params, x)
    err = e.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.field == "parameters[w].dtype"
    assert "FLOAT64" in err.message
    text = str(err)
    assert "INVALID_ARGUMENT" in text and "parameters[w].dtype" in text
    assert isinstance(err, GradmeshError)


def test_resource_exhausted(start_worker):
    running = start_worker(limits=worker_mod.WorkerLimits(max_tensor_elements=4))
    params, x = w_and_x()
    with WorkerClient(running.address) as client:
        with pytest.raises(ResourceExhausted) as e:
            client.compute_gradients(hand_graph(), params, x)
    assert e.value.field and "limit" in str(e.value)


def test_token(start_worker):
    running = start_worker(token="t0ken")
    params, x = w_and_x()
    with WorkerClient(running.address, token="t0ken") as client:
        assert float(client.compute_gradients(hand_graph(), params, x).loss) == expected()[0]
    with WorkerClient(running.address, token="nope") as client:
        with pytest.raises(Unauthenticated) as e:
            client.capabilities()
    assert "UNAUTHENTICATED" in str(e.value) and "Capabilities" in str(e.value)


def test_unavailable_after_retries():
    port = free_port()  # nothing listens there
    with WorkerClient(f"127.0.0.1:{port}", retries=2, timeout=10) as client:
        with pytest.raises(Unavailable):
            client.capabilities()


def test_retries_unavailable_then_succeeds(worker):
    with WorkerClient(worker.address, retries=3) as client:
        attempts = []

        class Flaky(grpc.RpcError):
            def code(self):
                return grpc.StatusCode.UNAVAILABLE

            def details(self):
                return "connection refused"

        def call(**kw):
            attempts.append(kw)
            if len(attempts) < 3:
                raise Flaky()
            return "ok"

        assert client._call("Test", call, None) == "ok"
        assert len(attempts) == 3
        # Other codes are not retried.
        with pytest.raises(InvalidArgument):
            client._call("Test", lambda **kw: _raise(grpc.StatusCode.INVALID_ARGUMENT), None)


def _raise(code):
    class E(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return "bad"

    raise E()


def test_deadline_exceeded_is_raised(worker):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((2000, 2000), dtype=np.float32)}
    x = rng.standard_normal((512, 2000), dtype=np.float32)

    def fn(p, x):
        h = (x @ p["w"]).relu() @ p["w"]
        return (h * h).mean()

    with WorkerClient(worker.address, timeout=1e-4) as client:
        with pytest.raises(DeadlineExceeded):
            client.compute_gradients(fn, params, x)
    with WorkerClient(worker.address) as client:
        assert client.capabilities().backend == "cpu"


def test_evicted_graph_is_registered_again(start_worker):
    running = start_worker(graph_cache_size=1)
    params, x = w_and_x()
    other = hand_graph()
    other.nodes.add(op="mul", inputs=[1, 1])
    other.outputs.add(name="sq", value=4)
    with WorkerClient(running.address) as client, WorkerClient(running.address) as evictor:
        client.compute_gradients(hand_graph(), params, x)
        evictor.register_graph(other)  # evicts the first graph
        r = client.compute_gradients(hand_graph(), params, x)
    assert float(r.loss) == expected()[0]


def test_from_rpc_error_without_details():
    class E(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.NOT_FOUND

        def details(self):
            return "gone"

        def trailing_metadata(self):
            return ()

    err = errors.from_rpc_error(E(), "ComputeGradients")
    assert isinstance(err, NotFound) and err.field is None
    assert str(err) == "NOT_FOUND in ComputeGradients: gone"


@needs_openssl
def test_mtls(tmp_path):
    p = make_certs(tmp_path)
    running = worker_mod.start(
        tls_cert=p("server.pem"), tls_key=p("server.key"), tls_ca=p("ca.pem")
    )
    try:
        tls = TLS(ca=p("ca.pem"), cert=p("client.pem"), key=p("client.key"))
        with WorkerClient(running.address, tls=tls) as client:
            assert client.capabilities().backend == "cpu"
        # Without a client certificate the handshake fails.
        with WorkerClient(running.address, tls=TLS(ca=p("ca.pem")), retries=0, timeout=5) as client:
            with pytest.raises(GradmeshError):
                client.capabilities()
    finally:
        running.stop(0)


def test_refuses_plaintext_on_public_address():
    with pytest.raises(runtime.ConfigError, match="--insecure"):
        runtime.serve(runtime.ServerConfig(host="0.0.0.0", port=0), [])
    with pytest.raises(runtime.ConfigError, match="tls-key"):
        runtime.check_config(runtime.ServerConfig(tls_cert="x.pem"))
    runtime.check_config(runtime.ServerConfig(host="0.0.0.0", insecure=True))


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("GRADMESH_PORT", "12345")
    monkeypatch.setenv("GRADMESH_TOKEN", "from-env")
    monkeypatch.setenv("GRADMESH_MAX_CONCURRENT_REQUESTS", "3")
    monkeypatch.setenv("GRADMESH_INSECURE", "true")
    parser = argparse.ArgumentParser()
    worker_mod.add_arguments(parser)
    cfg = runtime.config_from_args(parser.parse_args([]))
    assert (cfg.port, cfg.token, cfg.max_concurrent_requests, cfg.insecure) == (
        12345,
        "from-env",
        3,
        True,
    )
    cfg = runtime.config_from_args(parser.parse_args(["--port", "7", "--log-format", "text"]))
    assert cfg.port == 7 and cfg.log_format == "text"


def test_metrics_endpoint(start_worker):
    port = free_port()
    running = start_worker(metrics_port=port)
    with WorkerClient(running.address) as client:
        client.capabilities()
        client.compute_gradients(hand_graph(), *w_and_x())
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'gradmesh_requests_total{code="OK",method="/gradmesh.v1.Worker/Capabilities"}' in body
    assert "gradmesh_request_seconds_bucket" in body
    assert 'gradmesh_worker_calls_total{transport="unary"}' in body


def test_cli_worker_prints_address_and_stops_on_sigterm():
    import os
    import signal
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "gradmesh.cli", "worker", "--port", "0", "--log-format", "text"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, line + proc.stderr.read()
        address = line.split()[-1]
        with WorkerClient(address) as client:
            assert client.capabilities().backend == "cpu"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------- cached request bytes --
# The client keeps the bytes of a request but the tensors' (per graph, shapes, dtypes and
# options) and the SharedMemory part per pair of segments: what it sends must stay exactly
# what protobuf writes for the same request.

from gradmesh.core import sharedmem  # noqa: E402
from gradmesh.wire import sharedmem as wire_sharedmem  # noqa: E402

needs_shared_memory = pytest.mark.skipif(
    not wire_sharedmem.available(), reason="no shared memory here"
)


def _cases():
    rng = np.random.default_rng(0)
    big_endian = rng.standard_normal((3, 2)).astype(">f8")
    strided = rng.standard_normal((4, 6)).astype(np.float32)[:, ::2]
    return [
        # params, data, gradients, outputs, loss_scale, seed
        (
            {"w": rng.standard_normal(4).astype(np.float32)},
            [rng.standard_normal((2, 4)).astype(np.float32)],
            None,
            (),
            1.0,
            0,
        ),
        (
            {
                "a": rng.standard_normal((3, 5)),
                "b": np.float32(2.5) * np.ones((), np.float32),
                "c": rng.integers(0, 9, (2, 2)).astype(np.int32),
            },
            [rng.integers(0, 5, 7), np.zeros((0, 3), np.float16)],
            ["c", "a"],
            ["h"],
            0.5,
            7,
        ),
        (
            {"p": big_endian, "q": strided},
            [np.array([True, False])],
            ["q"],
            ["o1", "o2"],
            -0.0,
            2**63,
        ),
        ({"only": rng.standard_normal((2, 3)).astype(np.float16)}, [], [], (), 3, 1),
    ]


def _data_graph(n: int) -> graph_pb2.Graph:
    return graph_pb2.Graph(
        version=1,
        inputs=[graph_pb2.Input(name=f"x{i}", role=graph_pb2.Input.DATA) for i in range(n)],
    )


def _protobuf_request(
    graph_id, params, data_names, data, gradients, outputs, loss_scale, seed
) -> bytes:
    from gradmesh.core import serialize
    from gradmesh.v1 import tensor_pb2, worker_pb2

    return worker_pb2.ComputeGradientsRequest(
        graph_id=graph_id,
        parameters=[
            tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a)) for n, a in params.items()
        ],
        data=[
            tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a))
            for n, a in zip(data_names, data)
        ],
        gradients=list(gradients or ()),
        outputs=list(outputs),
        loss_scale=loss_scale,
        seed=seed,
    ).SerializeToString()


def _mocked_client(reply, **kw):
    """A client whose ComputeGradients records the request bytes and answers ``reply``."""
    client = WorkerClient("127.0.0.1:1", **kw)
    sent = []
    client._unary_call = lambda request, **_: sent.append(request) or reply(request)
    return client, sent


def _unary_reply(request):
    from gradmesh.core import serialize
    from gradmesh.v1 import worker_pb2

    return worker_pb2.ComputeGradientsResponse(loss=serialize.to_proto(np.float32(1.5)))


@pytest.mark.parametrize("case", range(len(_cases())))
def test_unary_request_bytes_equal_protobufs(case):
    from gradmesh.core.graph import graph_id

    params, data, gradients, outputs, loss_scale, seed = _cases()[case]
    graph = _data_graph(len(data))
    client, sent = _mocked_client(_unary_reply, shared_memory=False)
    with client:
        client._registered[graph_id(graph)] = "the-workers-id"
        for step in range(3):  # the first call builds the cached parts, the rest reuse
            params = {
                n: (a + step).astype(a.dtype) if a.dtype != np.bool_ else a
                for n, a in params.items()
            }
            client.compute_gradients(
                graph,
                params,
                *data,
                gradients=gradients,
                outputs=outputs,
                loss_scale=loss_scale,
                seed=seed,
            )
            assert sent[-1] == _protobuf_request(
                "the-workers-id",
                params,
                [f"x{i}" for i in range(len(data))],
                data,
                gradients,
                outputs,
                loss_scale,
                seed,
            )
        # Equal options of another type, or the other sign of zero, are not mixed up.
        for other in (0.0 if loss_scale == 0 else float(loss_scale), loss_scale):
            client.compute_gradients(
                graph,
                params,
                *data,
                gradients=gradients,
                outputs=outputs,
                loss_scale=other,
                seed=seed,
            )
            assert sent[-1] == _protobuf_request(
                "the-workers-id",
                params,
                [f"x{i}" for i in range(len(data))],
                data,
                gradients,
                outputs,
                other,
                seed,
            )
        with pytest.raises(TypeError):
            client.compute_gradients(
                graph,
                params,
                *data,
                gradients=gradients,
                outputs=outputs,
                loss_scale=loss_scale,
                seed=True,
            )


@needs_shared_memory
@pytest.mark.parametrize("case", range(len(_cases())))
def test_shared_memory_request_bytes_equal_protobufs(case):
    from types import SimpleNamespace

    from gradmesh.core import serialize
    from gradmesh.core.graph import graph_id
    from gradmesh.v1 import worker_pb2
    from gradmesh.wire.worker import shared_request

    params, data, gradients, outputs, loss_scale, seed = _cases()[case]
    graph = _data_graph(len(data))
    names = [f"x{i}" for i in range(len(data))]
    wanted = [n for n in (gradients or params) if n in params]

    def reply(request):
        resp = worker_pb2.ComputeGradientsResponse(
            loss=serialize.to_proto(np.float32(1.5)), gradients_in_shared_memory=True
        )
        for n in wanted:
            resp.gradients.add(name=n, tensor=serialize.to_proto(params[n], data=False))
        return resp

    client, sent = _mocked_client(reply, shared_memory_min_bytes=0)
    with client:
        client._shared = True
        client._registered[graph_id(graph)] = "the-workers-id"
        kept = []
        for step in range(4):
            result = client.compute_gradients(
                graph,
                params,
                *data,
                gradients=gradients,
                outputs=outputs,
                loss_scale=loss_scale,
                seed=seed,
            )
            assert result.timings["shared_memory"] == 1.0
            assert list(result.gradients) == wanted
            if step == 1:
                kept.append(result)  # its gradient segment is not reused: a new one
            del result
            sm = worker_pb2.ComputeGradientsRequest.FromString(sent[-1]).shared_memory
            offsets, _ = sharedmem.layout(
                [(("p", n), a.nbytes) for n, a in params.items()]
                + [(("d", n), a.nbytes) for n, a in zip(names, data)]
            )
            goffsets, _ = sharedmem.layout([(n, params[n].nbytes) for n in wanted])
            head = worker_pb2.ComputeGradientsRequest(graph_id="the-workers-id")
            tail = worker_pb2.ComputeGradientsRequest(
                gradients=list(gradients or ()),
                outputs=list(outputs),
                loss_scale=loss_scale,
                seed=seed,
            )
            req = shared_request(
                params,
                SimpleNamespace(name=sm.segment),
                {n: offsets["p", n] for n in params},
                SimpleNamespace(name=sm.gradient_segment),
                goffsets,
                dict(zip(names, data)),
                {n: offsets["d", n] for n in names},
            )
            assert sent[-1] == (
                head.SerializeToString() + req.SerializeToString() + tail.SerializeToString()
            )
        assert (
            len(
                {
                    worker_pb2.ComputeGradientsRequest.FromString(s).shared_memory.gradient_segment
                    for s in sent
                }
            )
            == 2
        )
        del kept


def test_cached_reply_headers_keep_every_check():
    from gradmesh.core import serialize
    from gradmesh.v1 import worker_pb2
    from gradmesh.wire.worker import decode_reply as _unary_result
    from gradmesh.wire.worker import shared_gradients

    arrays = [
        np.float32(2.0) * np.ones(()),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.zeros((0, 3), np.float16),
        np.array([True, False]),
    ]
    resp = worker_pb2.ComputeGradientsResponse(loss=serialize.to_proto(np.float32(0.25)))
    for i, a in enumerate(arrays):
        resp.gradients.add(name=f"g{i}", tensor=serialize.to_proto(a))
    for _ in range(2):  # decoded once fully, then through the cached header
        result = _unary_result(resp)
        assert result.loss.shape == () and result.loss == np.float32(0.25)
        for i, a in enumerate(arrays):
            g = result.gradients[f"g{i}"]
            assert g.dtype == a.dtype and g.shape == a.shape and not g.flags.writeable
            np.testing.assert_array_equal(g, a)
    resp.gradients[1].tensor.data = resp.gradients[1].tensor.data[:-8]
    with pytest.raises(serialize.WireError, match=r"gradients\[g1\]"):
        _unary_result(resp)
    del resp.gradients[:]
    resp.gradients.add(name="b", tensor=serialize.to_proto(np.array([True, True])))
    _unary_result(resp)
    resp.gradients[0].tensor.data = b"\x01\x02"
    with pytest.raises(serialize.WireError, match="0 or 1"):
        _unary_result(resp)

    buf = np.zeros(256, np.uint8)
    shared = worker_pb2.ComputeGradientsResponse(gradients_in_shared_memory=True)
    shared.gradients.add(
        name="w", tensor=serialize.to_proto(np.zeros((4, 8), np.float32), data=False)
    )
    for _ in range(2):
        assert shared_gradients(shared, buf, {"w": 64})["w"].shape == (4, 8)
    for offsets in ({"w": 160}, {"v": 0}):
        with pytest.raises(sharedmem.SegmentError, match="'w' does not fit"):
            shared_gradients(shared, buf, offsets)
    shared.gradients[0].tensor.dtype = 99
    with pytest.raises(sharedmem.SegmentError, match="'w' does not fit"):
        shared_gradients(shared, buf, {"w": 0})


@needs_shared_memory
def test_place_writes_wire_bytes_whatever_the_layout_of_the_arrays():
    rng = np.random.default_rng(1)
    arrays = {
        "c": rng.standard_normal((3, 5)).astype(np.float32),
        "big_endian": rng.standard_normal((2, 3)).astype(">f8"),
        "strided": rng.standard_normal((4, 6)).astype(np.float32)[:, ::2],
        "fortran": np.asfortranarray(rng.integers(0, 9, (3, 4))),
        "scalar": np.float16(1.5) * np.ones((), np.float16),
        "empty": np.zeros((0, 3), np.int32),
        "bool": np.array([True, False, True]),
    }
    pool = wire_sharedmem.Pool()
    try:
        seg, offsets = wire_sharedmem.place(pool, arrays)
        for name, a in arrays.items():
            got = seg.view(offsets[name], a.dtype.newbyteorder("<"), a.shape)
            np.testing.assert_array_equal(got, a)
        pool.release(seg)
    finally:
        pool.close()
