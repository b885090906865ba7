"""mTLS between services and bearer tokens (DESIGN §8), end to end.

A coordinator, a shard and a worker, each its own ``gradmesh`` process on 127.0.0.1,
serving mTLS with one CA and requiring one token: the coordinator dials the shard and
the worker with TLS, the worker registers with the coordinator over TLS, and a
``CoordinatorClient`` with a client certificate trains through it. Clients in plaintext,
with a certificate of another CA, or without the token are refused; a coordinator that
verifies its peers with the wrong CA fails fast with UNAVAILABLE naming the peer.
Certificates are made with the ``openssl`` CLI (tests/conftest.py ``make_certs``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import pytest
from conftest import make_certs, needs_openssl
from models import cross_entropy, mlp

from gradmesh.client import TLS, CoordinatorClient, GradmeshError, Unauthenticated, Unavailable
from gradmesh.client.cluster import ServerProcess
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import runtime
from gradmesh.server import shard as shard_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import PeerConfig, ServerConfig
from gradmesh.wire.channel import channel
from gradmesh.wire.coordinator import WorkerRegistration

pytestmark = needs_openssl

TOKEN = "tls-test-token"
SGD = {"name": "sgd", "lr": 0.1}


def _model():
    return mlp(4, 8, 2, seed=3)


_loss = cross_entropy


def _batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """One CA for the cluster's services and clients, and a second ("rogue") CA."""
    d = tmp_path_factory.mktemp("pki")
    p = make_certs(d, ("coordinator", "shard", "worker", "client"))
    make_certs(d, ("rogue-client", "rogue-server"), ca="rogue-ca")
    return p


def _mtls_flags(p, name):
    return ["--tls-cert", p(f"{name}.pem"), "--tls-key", p(f"{name}.key")]


@pytest.fixture(scope="module")
def cluster(pki, tmp_path_factory):
    """The three services as processes, each serving mTLS with the token; yields the
    coordinator's address once the worker has registered."""
    p = pki
    logs = tmp_path_factory.mktemp("logs")
    env = dict(
        os.environ,
        GRADMESH_TOKEN=TOKEN,
        GRADMESH_TLS_CA=p("ca.pem"),
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
    )
    procs = []

    def start(role, *args, **extra_env):
        proc = ServerProcess(role, list(args), str(logs / f"{role}.log"))
        proc.start(dict(env, **extra_env))
        procs.append(proc)
        return proc.wait_address(120)

    try:
        shard = start("shard", *_mtls_flags(p, "shard"))
        # --tls-ca (from GRADMESH_TLS_CA) also turns on TLS to the shard and the worker,
        # with the coordinator's own certificate as its client certificate; the name
        # override comes from the environment like any flag.
        coordinator = start(
            "coordinator",
            *_mtls_flags(p, "coordinator"),
            "--shards",
            shard,
            GRADMESH_PEER_SERVER_NAME="localhost",
        )
        start("worker", *_mtls_flags(p, "worker"), "--coordinator", coordinator)
        with _client(p, coordinator) as client:
            deadline = time.monotonic() + 120
            while not any(w.state == "ready" for w in client.list_workers()):
                if time.monotonic() > deadline or not all(x.alive() for x in procs):
                    raise AssertionError(
                        "the worker did not register:\n"
                        + "\n".join(f"--- {x.role}\n{x.log_tail()}" for x in procs)
                    )
                time.sleep(0.1)
        yield coordinator
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            if not proc.wait_exit(30):
                proc.kill()


def _client(p, target, cert="client", ca="ca.pem", **kw):
    kw.setdefault("token", TOKEN)
    kw.setdefault("timeout", 60)
    return CoordinatorClient(
        target, tls=TLS(ca=p(ca), cert=p(f"{cert}.pem"), key=p(f"{cert}.key")), **kw
    )


def test_trains_over_mtls_with_a_token(pki, cluster):
    x, y = _batch()
    with _client(pki, cluster) as client:
        [worker] = client.list_workers()
        assert (worker.state, worker.source) == ("ready", "registered")
        job = client.create_job(_model(), _loss, SGD, 8, (x, y), data_names=["x", "y"])
        losses = [job.step(x, y) for _ in range(3)]
        assert [r.version for r in losses] == [1, 2, 3]
        assert all(r.micro_batches == 2 for r in losses)
        assert losses[2].loss < losses[0].loss
        params = job.parameters()
        assert set(params) == {n for n, _ in _model().named_parameters()}


def test_plaintext_client_is_refused(cluster):
    with CoordinatorClient(cluster, token=TOKEN, timeout=10, retry_seconds=0) as client:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            client.list_workers()
        assert time.monotonic() - start < 10


def test_certificate_of_another_ca_is_refused(pki, cluster):
    with _client(pki, cluster, cert="rogue-client", timeout=10, retry_seconds=0) as client:
        with pytest.raises(Unavailable):
            client.list_workers()
    # Without a client certificate at all, too.
    with CoordinatorClient(
        cluster, token=TOKEN, tls=TLS(ca=pki("ca.pem")), timeout=10, retry_seconds=0
    ) as client:
        with pytest.raises(Unavailable):
            client.list_workers()


def test_a_server_certificate_of_another_ca_is_not_trusted(pki, cluster):
    # The client verifies the coordinator: with the rogue CA as its roots it refuses it.
    with _client(pki, cluster, ca="rogue-ca.pem", timeout=10, retry_seconds=0) as client:
        with pytest.raises(Unavailable):
            client.list_workers()


def test_mtls_still_needs_the_token(pki, cluster):
    with _client(pki, cluster, token=None, retry_seconds=0) as client:
        with pytest.raises(Unauthenticated):
            client.list_workers()
    with _client(pki, cluster, token="wrong", retry_seconds=0) as client:
        with pytest.raises(Unauthenticated, match="wrong"):
            client.list_workers()


# ------------------------------------------------- a coordinator with the wrong peer CA --


@pytest.fixture
def mtls_worker(pki):
    running = worker_mod.start(
        tls_cert=pki("worker.pem"), tls_key=pki("worker.key"), tls_ca=pki("ca.pem"), token=TOKEN
    )
    yield running
    running.stop(0)


def _coordinator(pki, peer_ca, mtls=False, **kw):
    """An in-process coordinator dialling its peers with TLS verified by ``peer_ca``;
    serving plaintext on loopback, or with ``mtls`` mTLS like the peers."""
    peer = PeerConfig(
        TLS(ca=pki(peer_ca), cert=pki("coordinator.pem"), key=pki("coordinator.key")), TOKEN
    )
    config = ServerConfig(token=TOKEN)
    if mtls:
        config = ServerConfig(
            token=TOKEN,
            tls_cert=pki("coordinator.pem"),
            tls_key=pki("coordinator.key"),
            tls_ca=pki("ca.pem"),
        )
    return coordinator_mod.start(config=config, peer=peer, **kw)


def test_wrong_peer_ca_cannot_reach_the_worker(pki, mtls_worker):
    running = _coordinator(pki, "rogue-ca.pem", workers=[mtls_worker.address])
    x, y = _batch()
    try:
        # The coordinator itself serves plaintext on loopback.
        with CoordinatorClient(running.address, token=TOKEN, timeout=30, retry_seconds=0) as client:
            job = client.create_job(_model(), _loss, SGD, 8, (x, y), data_names=["x", "y"])
            start = time.monotonic()
            with pytest.raises(Unavailable) as e:
                job.step(x, y)
            assert time.monotonic() - start < 20
            message = str(e.value)
            assert mtls_worker.address in message and "unreachable" in message, message
            assert "CERTIFICATE_VERIFY_FAILED" in message or "andshake" in message, message
            [w] = client.list_workers()
            assert w.state == "unreachable"
    finally:
        running.stop(0)
        running.coordinator.close()


def test_right_peer_ca_reaches_the_worker_and_registration_over_tls(pki, mtls_worker):
    """The same in-process setup with the right CA works; a worker registers over TLS."""
    running = _coordinator(pki, "ca.pem", mtls=True)
    tls = TLS(ca=pki("ca.pem"), cert=pki("worker.pem"), key=pki("worker.key"))
    reg = WorkerRegistration(running.address, mtls_worker.address, token=TOKEN, tls=tls)
    try:
        assert reg.register()
        with _client(pki, running.address, retry_seconds=0) as client:
            [w] = client.list_workers()
            assert w.state == "ready", w
    finally:
        reg.stop()
        running.stop(0)
        running.coordinator.close()


def test_registration_with_a_rogue_certificate_is_refused_and_logged(pki, caplog):
    running = coordinator_mod.start(
        tls_cert=pki("coordinator.pem"),
        tls_key=pki("coordinator.key"),
        tls_ca=pki("ca.pem"),
        token=TOKEN,
    )
    tls = TLS(ca=pki("ca.pem"), cert=pki("rogue-client.pem"), key=pki("rogue-client.key"))
    reg = WorkerRegistration(running.address, "127.0.0.1:1", token=TOKEN, tls=tls)
    # Attached directly: an in-process server may have set "gradmesh" not to propagate.
    logger = logging.getLogger("gradmesh.worker")
    logger.addHandler(caplog.handler)
    try:
        with pytest.raises(GradmeshError):
            reg.register()
        assert reg.last_error and "UNAVAILABLE" in reg.last_error
        assert any("cannot register" in r.getMessage() for r in caplog.records)
    finally:
        logger.removeHandler(caplog.handler)
        reg.stop()
        running.stop(0)
        running.coordinator.close()


def test_wrong_peer_ca_cannot_reach_a_shard(pki):
    shard = shard_mod.serve_shard(
        ServerConfig(
            tls_cert=pki("shard.pem"), tls_key=pki("shard.key"), tls_ca=pki("ca.pem"), token=TOKEN
        ),
        shard_mod.ShardStore(),
    )
    running = _coordinator(pki, "rogue-ca.pem", shards=[shard.address])
    x, y = _batch()
    try:
        with CoordinatorClient(running.address, token=TOKEN, timeout=30, retry_seconds=0) as client:
            start = time.monotonic()
            with pytest.raises(Unavailable, match=f"shard {shard.address}"):
                client.create_job(_model(), _loss, SGD, 8, (x, y), data_names=["x", "y"])
            assert time.monotonic() - start < 20
    finally:
        running.stop(0)
        running.coordinator.close()
        shard.stop(0)


# ------------------------------------------------------------------ flags ----------------


def _peer(argv, env=None, monkeypatch=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    parser = argparse.ArgumentParser()
    coordinator_mod.add_arguments(parser)
    args = parser.parse_args(argv)
    return runtime.peer_config_from_args(args, runtime.config_from_args(args))


def test_peer_flags_default_to_the_servers_own(pki, monkeypatch):
    p = pki
    # Plaintext server, or TLS without client certificates: peers in plaintext.
    assert _peer([]) == PeerConfig(None, None)
    assert _peer(["--token", "t", *_mtls_flags(p, "coordinator")]) == PeerConfig(None, "t")
    # mTLS server: the same CA and its own certificate towards the peers.
    peer = _peer([*_mtls_flags(p, "coordinator"), "--tls-ca", p("ca.pem"), "--token", "t"])
    assert peer == PeerConfig(TLS(p("ca.pem"), p("coordinator.pem"), p("coordinator.key")), "t")
    assert (
        _peer(["--tls-ca", p("ca.pem"), *_mtls_flags(p, "coordinator"), "--peer-insecure"]).tls
        is None
    )
    # Explicit flags win; each is also an environment variable.
    peer = _peer(
        ["--token", "t", "--peer-tls-cert", p("client.pem"), "--peer-tls-key", p("client.key")],
        {
            "GRADMESH_PEER_TLS_CA": p("rogue-ca.pem"),
            "GRADMESH_PEER_TOKEN": "peer-t",
            "GRADMESH_PEER_SERVER_NAME": "gradmesh-worker",
        },
        monkeypatch,
    )
    assert peer == PeerConfig(
        TLS(p("rogue-ca.pem"), p("client.pem"), p("client.key"), "gradmesh-worker"), "peer-t"
    )


def test_contradictory_or_unreadable_peer_flags_are_refused(pki, tmp_path):
    with pytest.raises(runtime.ConfigError, match="--peer-insecure contradicts --peer-tls-ca"):
        _peer(["--peer-insecure", "--peer-tls-ca", pki("ca.pem")])
    with pytest.raises(runtime.ConfigError, match="--peer-tls-key"):
        _peer(["--peer-tls-cert", pki("client.pem")])
    with pytest.raises(runtime.ConfigError, match="--peer-server-name needs TLS"):
        _peer(["--peer-server-name", "x"])
    with pytest.raises(runtime.ConfigError, match="cannot read"):
        _peer(["--peer-tls-ca", str(tmp_path / "missing.pem")])
    with pytest.raises(runtime.ConfigError, match="--tls-key"):
        _peer(["--tls-ca", pki("ca.pem"), "--tls-cert", pki("coordinator.pem")])


def test_worker_has_the_peer_flags_for_its_registration():
    parser = argparse.ArgumentParser()
    worker_mod.add_arguments(parser)
    args = parser.parse_args(["--coordinator", "c:50053", "--peer-token", "x"])
    assert runtime.peer_config_from_args(args, runtime.config_from_args(args)) == PeerConfig(
        None, "x"
    )


def test_channel_helper_rejects_unknown_tls_values():
    with pytest.raises(TypeError, match="tls must be"):
        channel("127.0.0.1:1", tls="yes")
    with pytest.raises(ValueError, match="cert and key"):
        TLS(cert="a.pem")


# ====================================================== the metrics port (item 8) ======


def _get(url, token=None, ca=None):
    import ssl
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


@needs_openssl
def test_metrics_use_the_servers_tls_and_token(pki):
    """With TLS and a token, the metrics port serves HTTPS with the same certificate and
    answers only requests bearing the token; it binds --metrics-host (127.0.0.1)."""
    from conftest import free_port

    p = pki
    port = free_port()
    with worker_mod.start(
        "cpu", tls_cert=p("worker.pem"), tls_key=p("worker.key"), token=TOKEN, metrics_port=port
    ):
        url = f"https://127.0.0.1:{port}/metrics"
        assert _get(url, ca=p("ca.pem"))[0] == 401
        assert _get(url, token="wrong", ca=p("ca.pem"))[0] == 401
        status, body = _get(url, token=TOKEN, ca=p("ca.pem"))
        assert status == 200 and "gradmesh_requests_in_flight" in body
        with pytest.raises(OSError):  # no plaintext
            _get(f"http://127.0.0.1:{port}/metrics", token=TOKEN)


def test_metrics_host_is_its_own_and_loopback_by_default():
    parser = argparse.ArgumentParser()
    worker_mod.add_arguments(parser)
    cfg = runtime.config_from_args(
        parser.parse_args(["--host", "0.0.0.0", "--insecure", "--metrics-port", "9464"])
    )
    assert (cfg.host, cfg.metrics_host) == ("0.0.0.0", "127.0.0.1")
    # A public metrics address needs TLS or --insecure, as --host does.
    cfg = runtime.config_from_args(
        parser.parse_args(["--metrics-port", "9464", "--metrics-host", "0.0.0.0"])
    )
    with pytest.raises(runtime.ConfigError, match="--metrics-host"):
        runtime.check_config(cfg)


def test_metrics_token_without_tls_on_loopback():
    from conftest import free_port

    port = free_port()
    with worker_mod.start("cpu", token=TOKEN, metrics_port=port):
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 401
        assert _get(f"http://127.0.0.1:{port}/metrics", token=TOKEN)[0] == 200
