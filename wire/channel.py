"""The one place gradmesh opens a gRPC client channel.

Every connection gradmesh makes goes through :func:`channel`: the SDK's ``WorkerClient``
and ``CoordinatorClient``, a worker's registration with its coordinator, and the
coordinator's own connections to workers and shard servers. So plaintext, TLS and mTLS,
message-size limits and keepalive behave the same everywhere.

>>> from gradmesh.wire.channel import TLS, channel, metadata
>>> ch = channel("coordinator:50053", tls=TLS(ca="ca.pem", cert="me.pem", key="me.key"))
>>> stub.Method(request, metadata=metadata("s3cret"))        # doctest: +SKIP

The bearer token is per-call metadata (:func:`metadata`), not part of the channel: gRPC
call credentials need TLS, and plaintext is allowed on loopback (DESIGN §8).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Sequence

import grpc

__all__ = [
    "TLS",
    "channel",
    "channel_options",
    "credentials",
    "metadata",
    "call_metadata",
    "REQUEST_ID_KEY",
    "request_id",
]

# The request id of the call a server is handling (set by its interceptor): every log line
# carries it, and every call the server makes while handling it sends it on
# (:func:`call_metadata`), so one id follows a step from the coordinator to its workers
# and shards.
REQUEST_ID_KEY = "x-request-id"
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gradmesh_request_id", default=None
)

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


@dataclass
class TLS:
    """TLS settings of a client connection (PEM file paths).

    ``ca``: roots to verify the server (None: the system's); ``cert``/``key``: this
    client's certificate for mTLS; ``server_name``: override the name checked in the
    server's certificate (when the address dialled, e.g. a pod IP, is not in it).
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a TLS client certificate needs both cert and key")

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files (read now; OSError if one is missing)."""

        def read(path):
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Message-size and keepalive options shared by servers and clients."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def credentials(tls: Any) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """``(credentials or None for plaintext, extra channel options)`` for a ``tls`` value:
    None/False (plaintext), True (TLS with the system's roots), a :class:`TLS` or
    ``grpc.ChannelCredentials``."""
    if tls is None or tls is False:
        return None, []
    if tls is True:
        return grpc.ssl_channel_credentials(), []
    if isinstance(tls, TLS):
        extra = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        return tls.credentials(), extra
    if isinstance(tls, grpc.ChannelCredentials):
        return tls, []
    raise TypeError(
        f"tls must be None, True, a gradmesh TLS or grpc.ChannelCredentials, "
        f"got {type(tls).__name__}"
    )


def channel(
    target: str,
    *,
    tls: Any = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to ``target`` ("host:port"): plaintext for ``tls=None``, else TLS (see
    :func:`credentials`); gradmesh's size and keepalive options, then ``options``."""
    creds, extra = credentials(tls)
    opts = channel_options(max_message_bytes) + extra + list(options)
    if creds is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, creds, options=opts)


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries bearer ``token`` (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def call_metadata(base: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """``base`` (e.g. :func:`metadata`) plus the request id being handled, if any."""
    rid = request_id.get()
    return tuple(base) + ((REQUEST_ID_KEY, rid),) if rid else tuple(base)
