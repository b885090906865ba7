"""Prometheus metrics of a server process.

Served by :func:`start_metrics_server` on ``--metrics-host`` (default 127.0.0.1) and
``--metrics-port``: over HTTPS with the server's own certificate when it has one, and
only to requests bearing its token (``Authorization: Bearer <token>``) when it has one.

Module-level: prometheus-client forbids registering a name twice per process, and every
server in a process (tests start many) counts into the same ones.
"""

from __future__ import annotations

import errno
import hmac
import ssl
import threading
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler

from gradmesh.server.runtime.config import ConfigError, ServerConfig

_metrics_lock = threading.Lock()
_metrics: dict[str, Any] = {}
_children: dict[tuple[str, str], Any] = {}


def get_metrics() -> dict[str, Any]:
    """The process's metrics by short name, registered on first use."""
    with _metrics_lock:
        if not _metrics:
            _metrics["requests"] = Counter(
                "gradmesh_requests", "RPCs handled, by method and status code", ["method", "code"]
            )
            _metrics["latency"] = Histogram(
                "gradmesh_request_seconds",
                "RPC latency in seconds, by method",
                ["method"],
                buckets=(
                    0.0005,
                    0.001,
                    0.0025,
                    0.005,
                    0.01,
                    0.025,
                    0.05,
                    0.1,
                    0.25,
                    0.5,
                    1,
                    2.5,
                    5,
                    10,
                    30,
                    60,
                    float("inf"),
                ),
            )
            _metrics["in_flight"] = Gauge("gradmesh_requests_in_flight", "RPCs being served now")
            # The worker's: how its gradient calls moved their tensors (unary bytes,
            # stream, shared memory), and whether kept parameters were found.
            _metrics["transport"] = Counter(
                "gradmesh_worker_calls",
                "Gradient calls by how their tensors traveled",
                ["transport"],
            )
            _metrics["kept"] = Counter(
                "gradmesh_worker_kept_parameters",
                "Requests naming kept parameters, by "
                "outcome (hit: found; miss: the caller must send them)",
                ["outcome"],
            )
        return _metrics


def metric(name: str, label: str) -> None:
    """Count one event of a labelled counter of :func:`get_metrics`."""
    child = _children.get((name, label))
    if child is None:  # found once: labels() takes locks and builds a key every call
        child = _children[name, label] = get_metrics()[name].labels(label)
    child.inc()


def _bearer_only(app, token: str | None):
    """``app`` answering 401 to requests without ``Authorization: Bearer <token>``."""
    if not token:
        return app
    want = f"Bearer {token}".encode()

    def guarded(environ, start_response):
        got = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if hmac.compare_digest(got, want):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")]
        )
        return [b"the metrics need the server's bearer token\n"]

    return guarded


def start_metrics_server(config: ServerConfig):
    """Serve the metrics as ``config`` says (see the module's docstring); returns the HTTP
    server (``.shutdown()`` stops it), or None when ``metrics_port`` is off."""
    if not config.metrics_port:
        return None
    get_metrics()

    class Server(ThreadingWSGIServer):
        pass

    Server.address_family, addr = _get_best_family(config.metrics_host, config.metrics_port)
    app = _bearer_only(make_wsgi_app(REGISTRY), config.token)
    where = f"{config.metrics_host}:{config.metrics_port}"
    try:
        httpd = make_server(addr, config.metrics_port, app, Server, handler_class=_SilentHandler)
    except OSError as e:
        why = (
            f"port {config.metrics_port} is in use"
            if e.errno == errno.EADDRINUSE
            else e.strerror or str(e)
        )
        raise ConfigError(
            f"cannot serve metrics on {where} (--metrics-host/--metrics-port): {why}"
        ) from None
    if config.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as e:
            httpd.server_close()
            raise ConfigError(f"--tls-cert/--tls-key cannot serve metrics: {e}") from None
        # The handshake happens in the request's thread, not in the accepting one.
        httpd.socket = context.wrap_socket(
            httpd.socket, server_side=True, do_handshake_on_connect=False
        )
    threading.Thread(target=httpd.serve_forever, daemon=True, name="gradmesh-metrics").start()
    return httpd
