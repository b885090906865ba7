"""Serving: :func:`serve` turns a list of servicers into a running gRPC server with what
every gradmesh service needs (see the package's docstring); :class:`RunningServer` is the
handle to it."""

from __future__ import annotations

import errno
import json
import logging
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from typing import Any, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradmesh.server.runtime.config import ConfigError, ServerConfig, check_config
from gradmesh.server.runtime.decode_check import DecodeCheckingServer
from gradmesh.server.runtime.interceptor import Interceptor
from gradmesh.server.runtime.logs import configure_logging
from gradmesh.server.runtime.metrics import start_metrics_server
from gradmesh.server.runtime.tls import server_credentials

# Servers and clients share the message-size and keepalive options (client/channel.py).
from gradmesh.wire.channel import channel_options

log = logging.getLogger("gradmesh.server")

# (add_FooServicer_to_server, servicer, "gradmesh.v1.Foo")
ServiceSpec = tuple[Callable[[Any, grpc.Server], None], Any, str]


def transport_receive_limit(max_message_bytes: int) -> int:
    """What gRPC itself lets in: a quarter above the advertised limit, so that a unary
    request over the limit (but not far over) reaches the interceptor, which answers it
    with details (the limit, the streaming RPC) instead of gRPC's bare refusal."""
    return min(max_message_bytes + max_message_bytes // 4 + (1 << 20), 2**31 - 1)


def _server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    options = [
        (key, transport_receive_limit(value) if key == "grpc.max_receive_message_length" else value)
        for key, value in channel_options(config.max_message_bytes)
    ]
    return options + [
        # Accept clients' keepalive pings every 10 s without answering GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]


class RunningServer:
    """A started server: ``port``/``address`` to dial, ``stop(grace)`` and ``wait()``.
    A role's ``start()`` sets its logic object on it: ``worker`` (a ``GradientWorker``)
    or ``coordinator`` (a ``Coordinator``)."""

    worker: Any
    coordinator: Any

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        config: ServerConfig,
        health_servicer: health.HealthServicer,
        interceptor: Interceptor,
        metrics_server=None,
    ):
        self.server = server
        self._interceptor = interceptor
        self.port = port
        self.config = config
        self.health = health_servicer
        host = config.host
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._metrics_server = metrics_server
        self._stopped = threading.Event()
        # Run first when the server stops, before it drains (a worker leaving its
        # coordinator's pool); each one's errors are logged, not raised.
        self.before_stop: list[Callable[[], None]] = []

    @property
    def in_flight(self) -> int:
        """Requests being served now (health checks not counted)."""
        return self._interceptor.in_flight

    def wait_in_flight(self, n: int, timeout: float | None = None) -> bool:
        """Block until exactly ``n`` requests are in flight; False on timeout (for tests)."""
        return self._interceptor.wait_in_flight(n, timeout)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, give in-flight calls ``grace`` seconds, then end them."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for hook in self.before_stop:
            try:
                hook()
            except Exception:  # noqa: BLE001 - stopping goes on
                log.exception("while stopping")
        self.health.enter_graceful_shutdown()
        done = self.server.stop(self.config.grace if grace is None else grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        done.wait()

    def wait(self, handle_signals: bool = True) -> None:
        """Block until the server stops; SIGTERM/SIGINT stop it gracefully (main thread)."""
        if handle_signals and threading.current_thread() is threading.main_thread():

            def on_signal(signum, _frame):
                log.info(
                    "signal %s: shutting down (grace %.1fs)",
                    signal.Signals(signum).name,
                    self.config.grace,
                )
                # stop() blocks for the grace period: not inside a signal handler.
                threading.Thread(target=self.stop, daemon=True).start()

            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, on_signal)
        self.server.wait_for_termination()
        self._stopped.wait()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(0)


def _add_services(
    server: grpc.Server, services: Sequence[ServiceSpec], health_servicer: health.HealthServicer
) -> list[str]:
    """Register ``services``, health checking and reflection; returns the services' names."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for add, servicer, name in services:
        add(servicer, DecodeCheckingServer(server))
        names.append(name)
    reflection.enable_server_reflection(
        names
        + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return names


def _bind(server: grpc.Server, config: ServerConfig) -> int:
    """Add the server's port (TLS when configured); returns the port bound."""
    bind = (
        f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    )
    try:
        if config.tls_cert:
            port = server.add_secure_port(bind, server_credentials(config))
        else:
            port = server.add_insecure_port(bind)
    except RuntimeError as e:
        raise ConfigError(f"cannot bind {bind}: {_bind_reason(config)} ({e})") from None
    if not port:
        raise ConfigError(f"cannot bind {bind}: {_bind_reason(config)}")
    return port


def _bind_reason(config: ServerConfig) -> str:
    """Why gRPC could not bind (it does not say): the port in use, or the address."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((config.host.strip("[]"), config.port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return (
                f"port {config.port} is in use on {config.host} (another server "
                f"runs there: stop it or pick another --port)"
            )
        return f"{e.strerror or e} (--host {config.host})"
    return "address in use or not available"


def serve(config: ServerConfig, services: Sequence[ServiceSpec]) -> RunningServer:
    """Start a server for ``services``; see the package's docstring for what it adds."""
    check_config(config)
    interceptor = Interceptor(config)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.pool_size(), thread_name_prefix="gradmesh-rpc"
        ),
        interceptors=[interceptor],
        options=_server_options(config),
        # A backstop queue bound: the interceptor rejects above max_concurrent_requests,
        # this keeps the pool's queue itself from growing without bound.
        maximum_concurrent_rpcs=config.pool_size() * 4,
    )
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2),
    )
    names = _add_services(server, services, health_servicer)
    port = _bind(server, config)
    try:
        metrics_server = start_metrics_server(config)
    except BaseException:
        server.stop(None)
        raise

    server.start()
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, port, config, health_servicer, interceptor, metrics_server)
    log.info(
        "serving",
        extra={
            "address": running.address,
            "services": names,
            "tls": bool(config.tls_cert),
            "auth": bool(config.token),
        },
    )
    return running


def announce(config: ServerConfig, banner: str, address: str) -> None:
    """The start-up line on stdout, "<banner> listening on <address>", which scripts and
    LocalCluster wait for (the port chosen for --port 0 is only there). With --log-format
    json it is one JSON object like every log line, its msg the same words and the
    address also in a field of its own."""
    line = f"{banner} listening on {address}"
    if config.log_format == "json":
        line = json.dumps(
            {
                "time": round(time.time(), 6),
                "level": "INFO",
                "logger": "gradmesh.server",
                "msg": line,
                "address": address,
            }
        )
    print(line, flush=True)


def serve_forever(
    config: ServerConfig, services: Sequence[ServiceSpec], banner: str = "gradmesh server"
) -> int:
    """What a CLI ``run(args)`` does: log setup, serve, print the address, wait, exit code."""
    configure_logging(config)
    try:
        running = serve(config, services)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    announce(config, banner, running.address)
    running.wait()
    return 0
