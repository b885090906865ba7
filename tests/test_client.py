"""The client SDK: errors as Python exceptions naming the field, retries, re-registration,
tokens, TLS/mTLS, and the server plumbing it relies on (config, metrics, shutdown)."""
from __future__ import annotations

import argparse
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest

import gradmesh.core as gm
from gradmesh.client import (DeadlineExceeded, GradmeshError, InvalidArgument, NotFound,
                             ResourceExhausted, TLS, Unauthenticated, Unavailable,
                             WorkerClient)
from gradmesh.client import errors
from gradmesh.server import runtime
from gradmesh.server import worker as worker_mod

from conftest import free_port, make_certs, needs_openssl
from test_worker_raw_grpc import W, X, expected, hand_graph


def w_and_x():
    return ({"w": np.array(W, np.float32).reshape(3, 2)},
            np.array(X, np.float32).reshape(2, 3))


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
    messy.nodes[1].attrs.add(name="keepdim", b=False)      # sum's default, spelled out
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
    port = free_port()              # nothing listens there
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
        evictor.register_graph(other)                   # evicts the first graph
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
    running = worker_mod.start(tls_cert=p("server.pem"), tls_key=p("server.key"),
                               tls_ca=p("ca.pem"))
    try:
        tls = TLS(ca=p("ca.pem"), cert=p("client.pem"), key=p("client.key"))
        with WorkerClient(running.address, tls=tls) as client:
            assert client.capabilities().backend == "cpu"
        # Without a client certificate the handshake fails.
        with WorkerClient(running.address, tls=TLS(ca=p("ca.pem")), retries=0,
                          timeout=5) as client:
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
    assert (cfg.port, cfg.token, cfg.max_concurrent_requests, cfg.insecure) == \
        (12345, "from-env", 3, True)
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
    proc = subprocess.Popen([sys.executable, "-m", "gradmesh.server.cli", "worker", "--port",
                             "0", "--log-format", "text"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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


def test_stream_codec_names_stay_importable_from_the_client():
    """The codec moved to gradmesh.core.serialize; older imports keep working."""
    from gradmesh.client import worker as client_worker
    from gradmesh.core import serialize
    assert client_worker.encode_chunk_frame is serialize.encode_chunk_frame
    assert client_worker.decode_stream_frame is serialize.decode_stream_frame
