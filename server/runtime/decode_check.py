"""Requests that are not valid messages get INVALID_ARGUMENT, not INTERNAL.

gRPC answers INTERNAL when a request deserializer raises, but undecodable bytes are the
client's fault: :func:`~gradmesh.server.runtime.serving.serve` registers every handler
with a deserializer that never raises, and a behavior that answers INVALID_ARGUMENT when
it gets what that one returned instead.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import grpc

from gradmesh.server.runtime.errors import abort


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


def decode_checked(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """``handler`` with a tolerant deserializer and a behavior that rejects what it let by."""
    if handler is None or handler.request_deserializer is None:
        return handler
    kw = dict(
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )
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
            **kw,
        )
    stream_stream = handler.stream_stream
    return grpc.stream_stream_rpc_method_handler(
        lambda requests, context: stream_stream(_checked_stream(requests, context), context), **kw
    )


class _DecodeCheckedHandler(grpc.GenericRpcHandler):
    def __init__(self, handler: grpc.GenericRpcHandler):
        self._handler = handler

    def service(self, handler_call_details):
        return decode_checked(self._handler.service(handler_call_details))


class DecodeCheckingServer:
    """The server that ``add_FooServicer_to_server`` registers its handlers with in
    ``serve``: it passes them on with :func:`decode_checked` applied."""

    def __init__(self, server: grpc.Server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_DecodeCheckedHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service_name, {m: decode_checked(h) for m, h in method_handlers.items()}
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
