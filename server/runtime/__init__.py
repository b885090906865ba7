"""Server plumbing shared by every gradmesh service (worker, shard, coordinator).

One function, :func:`serve`, turns a list of servicers into a running gRPC server with
what every service needs: a bounded thread pool, health checking, server reflection,
bearer-token auth, a concurrency limit, message-size limits, keepalive, TLS/mTLS, one
log line per request, Prometheus metrics and graceful shutdown.

>>> from gradmesh.v1 import worker_pb2_grpc
>>> cfg = ServerConfig(port=0)
>>> running = serve(cfg, [(worker_pb2_grpc.add_WorkerServicer_to_server, servicer,
...                        "gradmesh.v1.Worker")])               # doctest: +SKIP
>>> running.address                                            # doctest: +SKIP
'127.0.0.1:40123'

Errors: servicers either call :func:`abort` or raise any exception that has ``code``
(a :class:`grpc.StatusCode` or its name), ``field`` and ``message`` attributes (such as
:class:`ServiceError`, ``WireError``, ``GraphError``); the interceptor turns it into a
status with ``google.rpc.BadRequest`` field violations. A MemoryError becomes
RESOURCE_EXHAUSTED; anything else INTERNAL with a log line and a traceback, and the server
keeps serving. Every call has a request id (the caller's ``x-request-id``, or a new one):
on each log line while it is handled, in the trailing metadata, in error details
(``google.rpc.RequestInfo``), and sent on with the calls made while handling it.
Request bytes that are not a valid message get INVALID_ARGUMENT (``decode_check``).

One module per job:

- ``config``: :class:`ServerConfig`, its flags and ``GRADMESH_*`` variables, the start-up check
- ``tls``: a server's TLS credentials, and :class:`PeerConfig` (how it dials other services)
- ``logs``: one JSON or text line per record, with the same fields
- :func:`steady_heap` (from ``gradmesh.core.allocator``, which importing the engine applies)
- ``metrics``: the Prometheus metrics
- ``errors``: :class:`ServiceError`, :func:`rich_status`, :func:`abort`
- ``interceptor``: auth, the concurrency limit, statuses, a log line and metrics per call
- ``decode_check``: INVALID_ARGUMENT for request bytes that are no valid message
- ``serving``: :func:`serve`, :class:`RunningServer`
"""

from gradmesh.core.allocator import ALLOCATOR_VARIABLES, steady_heap
from gradmesh.server.runtime.config import (
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_MESSAGE_BYTES,
    ConfigError,
    MiB,
    ServerConfig,
    add_server_arguments,
    check_address,
    check_config,
    config_from_args,
    env_default,
    env_flag,
    is_loopback,
)
from gradmesh.server.runtime.errors import ServiceError, abort, rich_status, status_code
from gradmesh.server.runtime.interceptor import HEALTH_PREFIX
from gradmesh.server.runtime.logs import JsonFormatter, TextFormatter, configure_logging
from gradmesh.server.runtime.metrics import get_metrics, metric
from gradmesh.server.runtime.serving import (
    RunningServer,
    ServiceSpec,
    announce,
    serve,
    serve_forever,
)
from gradmesh.server.runtime.tls import PeerConfig, add_peer_arguments, peer_config_from_args
from gradmesh.wire.channel import channel_options

# The names tests used before the split into modules.
_get_metrics = get_metrics
_ALLOCATOR_VARIABLES = ALLOCATOR_VARIABLES

__all__ = [
    "ServerConfig",
    "ServiceError",
    "ConfigError",
    "RunningServer",
    "PeerConfig",
    "abort",
    "add_peer_arguments",
    "add_server_arguments",
    "channel_options",
    "config_from_args",
    "configure_logging",
    "env_default",
    "peer_config_from_args",
    "rich_status",
    "serve",
    "serve_forever",
    "announce",
    "status_code",
    # and what the other modules of gradmesh.server and its tests read from here
    "ALLOCATOR_VARIABLES",
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEALTH_PREFIX",
    "JsonFormatter",
    "MiB",
    "ServiceSpec",
    "TextFormatter",
    "check_address",
    "check_config",
    "env_flag",
    "get_metrics",
    "is_loopback",
    "metric",
    "steady_heap",
]
