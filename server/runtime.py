"""Server plumbing shared by every gradmesh service (worker, shard, coordinator).

One function, :func:`serve`, turns a list of servicers into a running gRPC server with
what every service needs: a bounded thread pool, health checking, server reflection,
bearer-token auth, a concurrency limit, message-size limits, keepalive, TLS/mTLS, one
JSON log line per request, Prometheus metrics and graceful shutdown.

>>> from gradmesh.v1 import worker_pb2_grpc
>>> cfg = ServerConfig(port=0)
>>> running = serve(cfg, [(worker_pb2_grpc.add_WorkerServicer_to_server, servicer,
...                        "gradmesh.v1.Worker")])               # doctest: +SKIP
>>> running.address                                            # doctest: +SKIP
'127.0.0.1:40123'

Errors: servicers either call :func:`abort` or raise any exception that has ``code``
(a :class:`grpc.StatusCode` or its name), ``field`` and ``message`` attributes (such as
:class:`ServiceError`, ``WireError``, ``GraphError``); the interceptor turns it into a
status with ``google.rpc.BadRequest`` field violations. Anything else becomes INTERNAL
with a log line and a traceback, and the server keeps serving. Request bytes that are
not a valid message get INVALID_ARGUMENT (see ``_decode_checked``).
"""
from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

# Servers and clients share the message-size and keepalive options (wire/channel.py).
from gradmesh.wire.channel import TLS, channel_options

log = logging.getLogger("gradmesh.server")

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
DEFAULT_MAX_CONCURRENT_REQUESTS = 8
HEALTH_PREFIX = "/grpc.health.v1.Health/"

# (add_FooServicer_to_server, servicer, "gradmesh.v1.Foo")
ServiceSpec = tuple[Callable[[Any, grpc.Server], None], Any, str]


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------

@dataclass
class ServerConfig:
    """How a gradmesh server listens, authenticates and limits itself."""
    host: str = "127.0.0.1"
    port: int = 0                               # 0: pick a free port (see RunningServer.port)
    max_workers: int | None = None              # gRPC thread pool; None: concurrency + 4
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    token: str | None = None                    # bearer token clients must send
    tls_cert: str | None = None                 # PEM paths; tls_ca turns on client auth (mTLS)
    tls_key: str | None = None
    tls_ca: str | None = None
    insecure: bool = False                      # allow plaintext on a non-loopback address
    metrics_port: int | None = None             # Prometheus HTTP port; 0/None: off
    log_format: str = "json"                    # "json" or "text"
    log_level: str = "INFO"
    grace: float = 10.0                         # seconds in-flight calls get on shutdown

    def pool_size(self) -> int:
        # Room above the request limit so health checks and rejections are never queued.
        return self.max_workers or self.max_concurrent_requests + 4


def _env(name: str, default: Any) -> Any:
    return os.environ.get("GRADMESH_" + name, default)


def _env_bool(name: str) -> bool:
    return str(_env(name, "")).strip().lower() in ("1", "true", "yes", "on")


def env_default(flag: str, default: Any) -> Any:
    """The default of ``--some-flag``: ``$GRADMESH_SOME_FLAG`` if set, else ``default``.

    argparse converts a string default with the argument's ``type``, so an environment
    value is parsed like the flag would be. Services use it for their own flags too.
    """
    return _env(flag.lstrip("-").replace("-", "_").upper(), default)


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Add the common server flags; each can also be set by a ``GRADMESH_*`` variable."""
    g = parser.add_argument_group("server (each flag also reads GRADMESH_<FLAG>, e.g. "
                                  "GRADMESH_PORT)")
    d = env_default
    g.add_argument("--host", default=d("host", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1; others need TLS or --insecure)")
    g.add_argument("--port", type=int, default=d("port", default_port),
                   help=f"port to bind, 0 for any free port (default {default_port})")
    g.add_argument("--max-workers", type=int, default=d("max-workers", None),
                   help="gRPC thread pool size (default: max-concurrent-requests + 4)")
    g.add_argument("--max-concurrent-requests", type=int,
                   default=d("max-concurrent-requests", DEFAULT_MAX_CONCURRENT_REQUESTS),
                   help="requests served at once; more get RESOURCE_EXHAUSTED")
    g.add_argument("--max-message-bytes", type=int,
                   default=d("max-message-bytes", DEFAULT_MAX_MESSAGE_BYTES),
                   help="largest unary message, in bytes")
    g.add_argument("--token", default=d("token", None),
                   help="bearer token clients must send (prefer GRADMESH_TOKEN or --token-file)")
    g.add_argument("--token-file", default=d("token-file", None),
                   help="file holding the bearer token")
    g.add_argument("--tls-cert", default=d("tls-cert", None), help="server certificate (PEM)")
    g.add_argument("--tls-key", default=d("tls-key", None), help="server private key (PEM)")
    g.add_argument("--tls-ca", default=d("tls-ca", None),
                   help="CA bundle (PEM); clients must present a certificate it signed (mTLS)")
    g.add_argument("--insecure", action="store_true", default=_env_bool("INSECURE"),
                   help="allow plaintext on a non-loopback address")
    g.add_argument("--metrics-port", type=int, default=d("metrics-port", None),
                   help="serve Prometheus metrics over HTTP on this port (default off)")
    g.add_argument("--log-format", choices=("json", "text"), default=d("log-format", "json"))
    g.add_argument("--log-level", default=d("log-level", "INFO"))
    g.add_argument("--grace", type=float, default=d("grace", 10.0),
                   help="seconds in-flight calls get to finish on SIGTERM (default 10)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` described by flags added with :func:`add_server_arguments`."""
    token = args.token
    if getattr(args, "token_file", None):
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    return ServerConfig(
        host=args.host, port=args.port, max_workers=args.max_workers,
        max_concurrent_requests=args.max_concurrent_requests,
        max_message_bytes=args.max_message_bytes, token=token or None,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        insecure=args.insecure, metrics_port=args.metrics_port,
        log_format=args.log_format, log_level=args.log_level, grace=args.grace)


class ConfigError(ValueError):
    """A server configuration that must not start (e.g. plaintext on a public address)."""


# ---------------------------------------------------------------------------------------
# Outgoing connections (the coordinator's to workers and shards, a worker's registration)
# ---------------------------------------------------------------------------------------

@dataclass
class PeerConfig:
    """How a service dials the services it depends on: ``tls`` (None: plaintext) and the
    bearer ``token`` it sends them."""
    tls: TLS | None = None
    token: str | None = None


def add_peer_arguments(parser: argparse.ArgumentParser, whom: str) -> None:
    """Add the ``--peer-*`` flags: TLS and token of the connections to ``whom``.

    Defaults follow the server's own flags, for a deployment with one CA and one token:
    with ``--tls-ca`` (mTLS) the peers are dialled with TLS too, verified with that CA and
    presenting this server's ``--tls-cert``/``--tls-key``; the token sent is ``--token``.
    """
    g = parser.add_argument_group(
        f"connections to {whom} (each flag also reads GRADMESH_<FLAG>; defaults follow "
        f"this server's own --tls-*/--token flags)")
    d = env_default
    g.add_argument("--peer-tls-ca", default=d("peer-tls-ca", None),
                   help=f"CA bundle (PEM) to verify {whom} with; turns on TLS to them "
                        f"(default: --tls-ca if given, else plaintext)")
    g.add_argument("--peer-tls-cert", default=d("peer-tls-cert", None),
                   help=f"client certificate (PEM) shown to {whom} for mTLS (default: "
                        f"--tls-cert when TLS to them is on)")
    g.add_argument("--peer-tls-key", default=d("peer-tls-key", None),
                   help="private key (PEM) of --peer-tls-cert (default: --tls-key)")
    g.add_argument("--peer-server-name", default=d("peer-server-name", None),
                   help=f"name to check in the certificates of {whom} instead of the host "
                        f"dialled (e.g. when it is an IP address their certificates lack)")
    g.add_argument("--peer-insecure", action="store_true", default=_env_bool("PEER_INSECURE"),
                   help=f"dial {whom} in plaintext even though --tls-ca is given")
    g.add_argument("--peer-token", default=d("peer-token", None),
                   help=f"bearer token sent to {whom} (default: --token)")
    g.add_argument("--peer-token-file", default=d("peer-token-file", None),
                   help="file holding --peer-token")


def peer_config_from_args(args: argparse.Namespace, config: ServerConfig) -> PeerConfig:
    """The :class:`PeerConfig` of flags added with :func:`add_peer_arguments`; raises
    ConfigError for contradictory flags or certificate files that cannot be read."""
    token = args.peer_token
    if args.peer_token_file:
        try:
            with open(args.peer_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --peer-token-file: {e}") from None
    token = token or config.token
    explicit = [f for f, v in (("--peer-tls-ca", args.peer_tls_ca),
                               ("--peer-tls-cert", args.peer_tls_cert),
                               ("--peer-tls-key", args.peer_tls_key),
                               ("--peer-server-name", args.peer_server_name)) if v]
    if args.peer_insecure:
        if explicit:
            raise ConfigError(f"--peer-insecure contradicts {', '.join(explicit)}")
        return PeerConfig(None, token)
    if bool(args.peer_tls_cert) != bool(args.peer_tls_key):
        raise ConfigError("a client certificate for peers needs both --peer-tls-cert and "
                          "--peer-tls-key")
    if not (args.peer_tls_ca or args.peer_tls_cert or config.tls_ca):
        if args.peer_server_name:
            raise ConfigError("--peer-server-name needs TLS to peers (--peer-tls-ca, or "
                              "--tls-ca)")
        return PeerConfig(None, token)
    cert, key = (args.peer_tls_cert, args.peer_tls_key) if args.peer_tls_cert else \
        (config.tls_cert, config.tls_key)
    if bool(cert) != bool(key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    tls = TLS(ca=args.peer_tls_ca or config.tls_ca, cert=cert, key=key,
              server_name=args.peer_server_name)
    try:
        tls.credentials()           # fail at start-up, not at the first call
    except OSError as e:
        raise ConfigError(f"cannot read a TLS file for connections to peers: {e}") from None
    return PeerConfig(tls, token)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(config: ServerConfig) -> None:
    """Refuse configurations that are unsafe or cannot work, with a message that says why."""
    if config.max_concurrent_requests < 1:
        raise ConfigError("max_concurrent_requests must be at least 1")
    if config.max_workers is not None and config.max_workers < 1:
        raise ConfigError("max_workers must be at least 1")
    if config.max_message_bytes < 1024:
        raise ConfigError("max_message_bytes must be at least 1024")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if config.tls_ca and not config.tls_cert:
        raise ConfigError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    if not config.tls_cert and not config.insecure and not is_loopback(config.host):
        raise ConfigError(
            f"refusing to serve plaintext on non-loopback address {config.host!r}: give "
            f"--tls-cert/--tls-key (and --tls-ca for mTLS), bind 127.0.0.1, or pass "
            f"--insecure if the network is trusted")
    if config.log_format not in ("json", "text"):
        raise ConfigError(f"log_format must be 'json' or 'text', got {config.log_format!r}")


# ---------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""
    _skip = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 6), "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes, not as it was when logging
    was set up: a stream swapped out and closed since (pytest's capture of one test) would
    fail every later record of a server still running."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(config: ServerConfig) -> None:
    """Send gradmesh's logs to stderr in ``config.log_format``; safe to call twice."""
    logger = logging.getLogger("gradmesh")
    for h in list(logger.handlers):
        if getattr(h, "_gradmesh", False):
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler._gradmesh = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(config.log_level.upper())
    logger.propagate = False


# ---------------------------------------------------------------------------------------
# The allocator of a server process
# ---------------------------------------------------------------------------------------

# glibc adapts its mmap threshold to what was last freed and returns free memory at the
# heap's top to the kernel: a server receiving megabyte messages then maps and faults in
# fresh pages (which the kernel zeroes) call after call. A worker receiving the medium
# MLP's 2.7 MB requests spent 4.5x a local step on a call; with a steady heap, 2.9x.
STEADY_MMAP_THRESHOLD = 32 << 20        # glibc's own ceiling for the adaptive threshold
STEADY_TRIM_THRESHOLD = 256 << 20
_ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def steady_heap() -> bool:
    """Keep freed memory in this process for reuse, up to ``STEADY_TRIM_THRESHOLD`` idle
    (glibc's ``mallopt``); for server processes, called by the ``gradmesh`` command. Not
    applied where the allocator is not glibc's or its variables are set in the
    environment (the user's choice wins). Returns whether it was applied."""
    if any(name in os.environ for name in _ALLOCATOR_VARIABLES):
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3        # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, STEADY_MMAP_THRESHOLD)) and \
        bool(mallopt(m_trim_threshold, STEADY_TRIM_THRESHOLD))


# ---------------------------------------------------------------------------------------
# Metrics (module-level: prometheus-client forbids registering a name twice per process)
# ---------------------------------------------------------------------------------------

_metrics_lock = threading.Lock()
_metrics: dict[str, Any] = {}


def _get_metrics() -> dict[str, Any]:
    with _metrics_lock:
        if not _metrics:
            from prometheus_client import Counter, Gauge, Histogram
            _metrics["requests"] = Counter(
                "gradmesh_requests", "RPCs handled, by method and status code",
                ["method", "code"])
            _metrics["latency"] = Histogram(
                "gradmesh_request_seconds", "RPC latency in seconds, by method", ["method"],
                buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5,
                         10, 30, 60, float("inf")))
            _metrics["in_flight"] = Gauge("gradmesh_requests_in_flight",
                                          "RPCs being served now")
            # The worker's: how its gradient calls moved their tensors (unary bytes,
            # stream, shared memory), and whether kept parameters were found.
            _metrics["transport"] = Counter(
                "gradmesh_worker_calls", "Gradient calls by how their tensors traveled",
                ["transport"])
            _metrics["kept"] = Counter(
                "gradmesh_worker_kept_parameters", "Requests naming kept parameters, by "
                "outcome (hit: found; miss: the caller must send them)", ["outcome"])
        return _metrics


def metric(name: str, label: str) -> None:
    """Count one event of a labelled counter of :func:`_get_metrics`."""
    child = _children.get((name, label))
    if child is None:       # found once: labels() takes locks and builds a key every call
        child = _children[name, label] = _get_metrics()[name].labels(label)
    child.inc()


_children: dict[tuple[str, str], Any] = {}


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

class ServiceError(Exception):
    """Raise from a servicer (or a function it calls) to fail the call with ``code``.

    ``field`` names the offending request field ("parameters[w1].data"); it is sent as a
    ``google.rpc.BadRequest`` field violation.
    """

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def status_code(code: Any) -> grpc.StatusCode:
    """A :class:`grpc.StatusCode` from itself, its name ("NOT_FOUND") or its number."""
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, str):
        try:
            return grpc.StatusCode[code.upper()]
        except KeyError:
            pass
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    return grpc.StatusCode.INVALID_ARGUMENT


def rich_status(code: grpc.StatusCode, message: str, field: str | None = None) -> grpc.Status:
    """A status carrying a google.rpc.Status (with BadRequest for ``field``) in trailers."""
    details = []
    if field is not None:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)])
        detail = any_pb2.Any()
        detail.Pack(bad)
        details.append(detail)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(status)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
          field: str | None = None) -> None:
    """Fail the call with ``code`` and ``message``; ``field`` becomes a BadRequest violation.

    Like ``context.abort`` it raises, so nothing after it runs.
    """
    context.abort_with_status(rich_status(code, message, field))


def _is_typed_error(exc: BaseException) -> bool:
    return hasattr(exc, "code") and hasattr(exc, "field") and not isinstance(exc, grpc.RpcError)


def _message_of(exc: BaseException) -> str:
    msg = getattr(exc, "message", None)
    return msg if isinstance(msg, str) else str(exc)


# ---------------------------------------------------------------------------------------
# The interceptor: auth, concurrency limit, error mapping, logs, metrics
# ---------------------------------------------------------------------------------------

class _Interceptor(grpc.ServerInterceptor):
    def __init__(self, config: ServerConfig):
        self._token = config.token.encode() if config.token else None
        self._limit = config.max_concurrent_requests
        self._in_flight = 0
        self._lock = threading.Condition()
        self._metrics = _get_metrics()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        # Health checks bypass everything so load balancers' and Kubernetes' probes work
        # under load and without a token.
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        denied = self._auth_error(handler_call_details.invocation_metadata)
        return _wrap(handler, lambda behavior, streaming_response:
                     self._guard(method, behavior, streaming_response, denied))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def wait_in_flight(self, n: int, timeout: float | None) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == n, timeout)

    def _auth_error(self, metadata) -> str | None:
        if self._token is None:
            return None
        for key, value in metadata or ():
            if key == "authorization":
                value = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(value, b"Bearer " + self._token):
                    return None
                return "the bearer token is wrong"
        return "this server needs a bearer token (metadata 'authorization: Bearer <token>')"

    @contextlib.contextmanager
    def _admitted(self, method: str, context, denied: str | None) -> Iterator[None]:
        start = time.perf_counter()
        outcome = {"code": None}
        try:
            if denied:
                outcome["code"] = grpc.StatusCode.UNAUTHENTICATED
                abort(context, grpc.StatusCode.UNAUTHENTICATED, denied)
            with self._lock:
                full = self._in_flight >= self._limit
                if not full:
                    self._in_flight += 1
                    self._lock.notify_all()
            if full:
                outcome["code"] = grpc.StatusCode.RESOURCE_EXHAUSTED
                abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"server busy: {self._limit} requests in flight "
                      f"(max_concurrent_requests); retry later")
            self._metrics["in_flight"].inc()
            try:
                yield
                outcome["code"] = context.code() or grpc.StatusCode.OK
            except GeneratorExit:
                outcome["code"] = grpc.StatusCode.CANCELLED
                raise
            except BaseException as exc:  # noqa: BLE001  (mapped to a status below)
                self._fail(method, context, exc, outcome)
            finally:
                self._metrics["in_flight"].dec()
                with self._lock:
                    self._in_flight -= 1
                    self._lock.notify_all()
        finally:
            self._record(method, context, outcome["code"], start)

    def _fail(self, method: str, context, exc: BaseException, outcome: dict) -> None:
        """Turn an exception into a status (raising, as context.abort does)."""
        if getattr(context, "_state", None) is not None and context._state.aborted:
            outcome["code"] = context.code()
            raise exc
        if _is_typed_error(exc):
            code = status_code(exc.code)
            outcome["code"] = code
            abort(context, code, _message_of(exc), exc.field)
        if not context.is_active():
            outcome["code"] = grpc.StatusCode.CANCELLED
            raise exc
        outcome["code"] = grpc.StatusCode.INTERNAL
        log.error("internal error in %s", method, exc_info=exc, extra={"method": method})
        abort(context, grpc.StatusCode.INTERNAL,
              f"internal error: {type(exc).__name__}: {exc} (logged on the server)")

    def _record(self, method: str, context, code, start: float) -> None:
        seconds = time.perf_counter() - start
        code = code or grpc.StatusCode.UNKNOWN
        name = code.name
        self._metrics["requests"].labels(method, name).inc()
        self._metrics["latency"].labels(method).observe(seconds)
        if log.isEnabledFor(logging.INFO):
            level = logging.WARNING if code is grpc.StatusCode.INTERNAL else logging.INFO
            log.log(level, "rpc", extra={"method": method, "code": name,
                                         "duration_ms": round(seconds * 1e3, 3),
                                         "peer": context.peer()})

    def _guard(self, method, behavior, streaming_response, denied):
        if streaming_response:
            def guarded_stream(request, context):
                with self._admitted(method, context, denied):
                    yield from behavior(request, context)
            return guarded_stream

        def guarded(request, context):
            with self._admitted(method, context, denied):
                return behavior(request, context)
        return guarded


def _wrap(handler: grpc.RpcMethodHandler, guard) -> grpc.RpcMethodHandler:
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary, False), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream, True), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary, False), **kw)
    return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream, True), **kw)


# ---------------------------------------------------------------------------------------
# Requests that are not valid messages
# ---------------------------------------------------------------------------------------
# gRPC answers INTERNAL when a request deserializer raises, but undecodable bytes are the
# client's fault: serve() registers every handler with a deserializer that never raises,
# and a behavior that answers INVALID_ARGUMENT when it gets what that one returned instead.

class _Undecodable:
    """What a wrapped deserializer returns for bytes that are not a valid message."""
    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "request message"

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001  (protobuf's DecodeError, or a codec's error)
            return _Undecodable(f"the request is not a valid {name}: {e}")
    return tolerant


def _reject_undecodable(request, context: grpc.ServicerContext) -> None:
    if type(request) is _Undecodable:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.message, "request")


def _checked_stream(requests: Iterator, context: grpc.ServicerContext) -> Iterator:
    for request in requests:
        _reject_undecodable(request, context)
        yield request


def _decode_checked(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """``handler`` with a tolerant deserializer and a behavior that rejects what it let by."""
    if handler is None or handler.request_deserializer is None:
        return handler
    kw = dict(request_deserializer=_tolerant(handler.request_deserializer),
              response_serializer=handler.response_serializer)
    if handler.unary_unary:
        unary_unary = handler.unary_unary

        def checked_unary_unary(request, context):
            _reject_undecodable(request, context)
            return unary_unary(request, context)
        return grpc.unary_unary_rpc_method_handler(checked_unary_unary, **kw)
    if handler.unary_stream:
        unary_stream = handler.unary_stream

        def checked_unary_stream(request, context):
            _reject_undecodable(request, context)
            yield from unary_stream(request, context)
        return grpc.unary_stream_rpc_method_handler(checked_unary_stream, **kw)
    if handler.stream_unary:
        stream_unary = handler.stream_unary
        return grpc.stream_unary_rpc_method_handler(
            lambda requests, context: stream_unary(_checked_stream(requests, context), context),
            **kw)
    stream_stream = handler.stream_stream
    return grpc.stream_stream_rpc_method_handler(
        lambda requests, context: stream_stream(_checked_stream(requests, context), context),
        **kw)


class _DecodeCheckedHandler(grpc.GenericRpcHandler):
    def __init__(self, handler: grpc.GenericRpcHandler):
        self._handler = handler

    def service(self, handler_call_details):
        return _decode_checked(self._handler.service(handler_call_details))


class _DecodeCheckingServer:
    """The server that ``add_FooServicer_to_server`` registers its handlers with in
    :func:`serve`: it passes them on with :func:`_decode_checked` applied."""

    def __init__(self, server: grpc.Server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_DecodeCheckedHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service_name, {m: _decode_checked(h) for m, h in method_handlers.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


# ---------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------

def _server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    return channel_options(config.max_message_bytes) + [
        # Accept clients' keepalive pings every 10 s without answering GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class RunningServer:
    """A started server: ``port``/``address`` to dial, ``stop(grace)`` and ``wait()``."""

    def __init__(self, server: grpc.Server, port: int, config: ServerConfig,
                 health_servicer: health.HealthServicer, interceptor: _Interceptor,
                 metrics_server=None):
        self.server = server
        self._interceptor = interceptor
        self.port = port
        self.config = config
        self.health = health_servicer
        host = config.host
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._metrics_server = metrics_server
        self._stopped = threading.Event()

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
        self.health.enter_graceful_shutdown()
        done = self.server.stop(self.config.grace if grace is None else grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        done.wait()

    def wait(self, handle_signals: bool = True) -> None:
        """Block until the server stops; SIGTERM/SIGINT stop it gracefully (main thread)."""
        if handle_signals and threading.current_thread() is threading.main_thread():
            def on_signal(signum, _frame):
                log.info("signal %s: shutting down (grace %.1fs)",
                         signal.Signals(signum).name, self.config.grace)
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


def serve(config: ServerConfig, services: Sequence[ServiceSpec]) -> RunningServer:
    """Start a server for ``services``; see the module docstring for what it adds."""
    check_config(config)
    interceptor = _Interceptor(config)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.pool_size(),
                                   thread_name_prefix="gradmesh-rpc"),
        interceptors=[interceptor],
        options=_server_options(config),
        # A backstop queue bound: the interceptor rejects above max_concurrent_requests,
        # this keeps the pool's queue itself from growing without bound.
        maximum_concurrent_rpcs=config.pool_size() * 4)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for add, servicer, name in services:
        add(servicer, _DecodeCheckingServer(server))
        names.append(name)
    reflection.enable_server_reflection(
        names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME], server)

    bind = f"[{config.host}]:{config.port}" if ":" in config.host else \
        f"{config.host}:{config.port}"
    try:
        if config.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(_read(config.tls_key), _read(config.tls_cert))],
                root_certificates=_read(config.tls_ca) if config.tls_ca else None,
                require_client_auth=bool(config.tls_ca))
            port = server.add_secure_port(bind, creds)
        else:
            port = server.add_insecure_port(bind)
    except RuntimeError as e:
        raise ConfigError(f"cannot bind {bind}: {e}") from None
    if not port:
        raise ConfigError(f"cannot bind {bind} (address in use or not available)")

    metrics_server = None
    if config.metrics_port:
        from prometheus_client import start_http_server
        _get_metrics()
        started = start_http_server(config.metrics_port, addr=config.host)
        metrics_server = started[0] if isinstance(started, tuple) else None

    server.start()
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, port, config, health_servicer, interceptor,
                            metrics_server)
    log.info("serving", extra={"address": running.address, "services": names,
                               "tls": bool(config.tls_cert), "auth": bool(config.token)})
    return running


def serve_forever(config: ServerConfig, services: Sequence[ServiceSpec],
                  banner: str = "gradmesh server") -> int:
    """What a CLI ``run(args)`` does: log setup, serve, print the address, wait, exit code."""
    configure_logging(config)
    try:
        running = serve(config, services)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{banner} listening on {running.address}", flush=True)
    running.wait()
    return 0


__all__ = ["ServerConfig", "ServiceError", "ConfigError", "RunningServer", "PeerConfig", "abort",
           "add_peer_arguments", "add_server_arguments", "channel_options", "config_from_args",
           "configure_logging", "env_default", "peer_config_from_args", "rich_status", "serve",
           "serve_forever", "status_code"]
