"""The interceptor every gradmesh server runs: bearer-token auth, the concurrency limit,
exceptions mapped to statuses, one log line and the metrics of each call. Health checks
bypass it."""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import threading
import time
import uuid
from typing import Any, Iterator

import grpc

from gradmesh.server.runtime import streams
from gradmesh.server.runtime.config import ServerConfig
from gradmesh.server.runtime.errors import (
    ServiceError,
    abort,
    is_typed_error,
    message_of,
    resource_error,
    status_code,
)
from gradmesh.server.runtime.metrics import get_metrics
from gradmesh.wire.channel import REQUEST_ID_KEY, request_id

log = logging.getLogger("gradmesh.server")

HEALTH_PREFIX = "/grpc.health.v1.Health/"

# A caller's x-request-id is kept when it looks like an id; otherwise the server makes one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def call_request_id(metadata) -> str:
    """The caller's ``x-request-id`` when it is a sane id, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            value = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            if _REQUEST_ID.fullmatch(value):
                return value
            break
    return uuid.uuid4().hex


class _Outcome:
    """How a call ended, for its log line and metrics."""

    __slots__ = ("code", "error")

    def __init__(self):
        self.code: grpc.StatusCode | None = None
        self.error: str | None = None

    def fail(self, code: grpc.StatusCode, error: str) -> None:
        self.code, self.error = code, error


class Interceptor(grpc.ServerInterceptor):
    def __init__(self, config: ServerConfig):
        self._token = config.token.encode() if config.token else None
        self._limit = config.max_concurrent_requests
        # Fair slots and idle streams (streams.py).
        self._peers = streams.PeerSlots(
            streams.per_peer_limit(self._limit, getattr(config, "max_requests_per_peer", None))
        )
        self._idle = getattr(config, "stream_idle_timeout", streams.DEFAULT_STREAM_IDLE_TIMEOUT)
        self._max_message = config.max_message_bytes
        self._in_flight = 0
        self._lock = threading.Condition()
        self._metrics = get_metrics()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        # Health checks bypass everything so load balancers' and Kubernetes' probes work
        # under load and without a token.
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        metadata = handler_call_details.invocation_metadata
        denied = self._auth_error(metadata)
        rid = call_request_id(metadata)
        return _wrap(
            handler,
            lambda behavior, streaming_response: self._guard(
                method, behavior, streaming_response, denied, rid
            ),
            self._idle,
            self._max_message,
        )

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

    def _admit(self, context, denied: str | None, outcome: _Outcome, peer: str) -> None:
        """Refuse a call without the token or over the concurrency limit (raising)."""
        if denied:
            outcome.fail(grpc.StatusCode.UNAUTHENTICATED, denied)
            abort(context, grpc.StatusCode.UNAUTHENTICATED, denied)
        with self._lock:
            full = self._in_flight >= self._limit
            mine = not full and not self._peers.try_take(peer)
            if not full and not mine:
                self._in_flight += 1
                self._lock.notify_all()
        if full or mine:
            busy = (
                (
                    f"server busy: {self._limit} requests in flight "
                    f"(max_concurrent_requests); retry later"
                )
                if full
                else (
                    f"server busy: this peer ({peer}) already has {self._peers.limit} of the "
                    f"{self._limit} request slots in flight (max_requests_per_peer); retry "
                    f"later"
                )
            )
            outcome.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, busy)

    @contextlib.contextmanager
    def _admitted(self, method: str, context, denied: str | None, rid: str) -> Iterator[None]:
        start = time.perf_counter()
        outcome = _Outcome()
        address = context.peer()  # read once: each read is a call into gRPC's core
        peer = streams.peer_identity(address)
        # Every log line while handling this call carries the id (logs.RequestIdFilter),
        # and every call made while handling it sends it on (wire.channel.call_metadata).
        token = request_id.set(rid)
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        try:
            self._admit(context, denied, outcome, peer)
            self._metrics["in_flight"].inc()
            try:
                yield
                outcome.code = context.code() or grpc.StatusCode.OK
            except GeneratorExit:
                outcome.fail(grpc.StatusCode.CANCELLED, "the client went away")
                raise
            except BaseException as exc:  # noqa: BLE001  (mapped to a status below)
                self._fail(method, context, exc, outcome)
            finally:
                self._metrics["in_flight"].dec()
                with self._lock:
                    self._in_flight -= 1
                    self._peers.release(peer)
                    self._lock.notify_all()
        finally:
            try:
                self._record(method, context, outcome, start, address)
            finally:
                try:
                    request_id.reset(token)
                except ValueError:  # a stream's generator closed from another thread
                    request_id.set(None)

    def _fail(self, method: str, context, exc: BaseException, outcome: _Outcome) -> None:
        """Turn an exception into a status (raising, as context.abort does)."""
        if getattr(context, "_state", None) is not None and context._state.aborted:
            outcome.fail(context.code(), _details(context) or message_of(exc))
            raise exc
        if is_typed_error(exc):
            typed: Any = exc  # it has code and field (is_typed_error)
            code, message = status_code(typed.code), message_of(exc)
            outcome.fail(code, message)
            abort(context, code, message, typed.field, getattr(exc, "reason", None))
        if not context.is_active():
            outcome.fail(grpc.StatusCode.CANCELLED, message_of(exc))
            raise exc
        exhausted = resource_error(exc)
        if exhausted is not None:
            outcome.fail(*exhausted)
            log.warning("out of memory in %s", method, exc_info=exc, extra={"method": method})
            abort(context, *exhausted)
        message = f"internal error: {type(exc).__name__}: {exc} (logged on the server)"
        outcome.fail(grpc.StatusCode.INTERNAL, message)
        log.error("internal error in %s", method, exc_info=exc, extra={"method": method})
        abort(context, grpc.StatusCode.INTERNAL, message)

    def _record(self, method: str, context, outcome: _Outcome, start: float, address: str) -> None:
        seconds = time.perf_counter() - start
        code = outcome.code or grpc.StatusCode.UNKNOWN
        name = code.name
        self._metrics["requests"].labels(method, name).inc()
        self._metrics["latency"].labels(method).observe(seconds)
        if log.isEnabledFor(logging.INFO):
            level = logging.WARNING if code is grpc.StatusCode.INTERNAL else logging.INFO
            fields = {
                "method": method,
                "code": name,
                "duration_ms": round(seconds * 1e3, 3),
                "peer": address,
            }
            if code is not grpc.StatusCode.OK:
                fields["error"] = outcome.error or _details(context) or ""
            log.log(level, "rpc", extra=fields)

    def _guard(self, method, behavior, streaming_response, denied, rid):
        if streaming_response:

            def guarded_stream(request, context):
                with self._admitted(method, context, denied, rid):
                    yield from behavior(self._sized(method, request), context)

            return guarded_stream

        def guarded(request, context):
            with self._admitted(method, context, denied, rid):
                return behavior(self._sized(method, request), context)

        return guarded

    def _sized(self, method: str, request):
        """The request (a message, or a stream of them) with every message that was over
        the advertised limit (an ``_Oversize`` from the deserializer) refused."""
        if isinstance(request, _Oversize):
            self._refuse_size(method, request.size)
        if hasattr(request, "__next__"):
            return self._sized_stream(method, request)
        return request

    def _sized_stream(self, method: str, requests):
        for message in requests:
            if isinstance(message, _Oversize):
                self._refuse_size(method, message.size)
            yield message

    def _refuse_size(self, method: str, size: int) -> None:
        """A message over the advertised limit, let in by the transport's higher one
        (serving.transport_receive_limit): RESOURCE_EXHAUSTED with the limit and the way
        out, where gRPC would have refused it without details."""
        way_out = (
            "send it with ComputeGradientsStream, in chunks"
            if method.endswith("/ComputeGradients")
            else "send smaller chunks (Capabilities.limits.chunk_bytes)"
            if method.endswith("Stream") or "Push" in method or "Create" in method
            else "send less in one call"
        )
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"a request message of {size} bytes is over this server's limit of "
            f"{self._max_message} bytes (max_message_bytes, Capabilities.limits); "
            f"{way_out}",
            "request",
        )


def _details(context) -> str | None:
    """The status message a handler set itself (``context.abort``), if any."""
    details = context.details()
    return details.decode("utf-8", "replace") if isinstance(details, bytes) else details


class _Oversize:
    """What the deserializer gives for a message over the advertised limit: its size
    only (it is not parsed), for the guard to refuse with the limit."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


def _size_checked(deserialize, limit: int):
    def checked(raw: bytes):
        return _Oversize(len(raw)) if len(raw) > limit else deserialize(raw)

    return checked


def _wrap(
    handler: grpc.RpcMethodHandler,
    guard,
    idle: float | None = None,
    max_message: int | None = None,
) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    if deserialize is not None and max_message:
        deserialize = _size_checked(deserialize, max_message)
    kw = dict(
        request_deserializer=deserialize,
        response_serializer=handler.response_serializer,
    )
    if idle and (handler.stream_unary or handler.stream_stream):
        handler = _with_idle_timeout(handler, idle)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary, False), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream, True), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary, False), **kw)
    return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream, True), **kw)


def _with_idle_timeout(handler, idle: float):
    """The handler with its request stream under the idle timeout (streams.py)."""

    def wrap(behavior):
        if behavior is None:
            return None
        return lambda requests, context: behavior(
            streams.idle_timeout(requests, idle, context), context
        )

    return handler._replace(
        stream_unary=wrap(handler.stream_unary), stream_stream=wrap(handler.stream_stream)
    )
