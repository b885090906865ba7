"""Python exceptions for gradmesh's gRPC errors.

Every failed call raises a :class:`GradmeshError` subclass chosen by the status code. It
carries the ``code``, the server's ``message`` and the offending request ``field`` taken
from the ``google.rpc.BadRequest`` details the server attaches:

>>> try:
...     client.compute_gradients(graph_id, params, x)          # doctest: +SKIP
... except InvalidArgument as e:
...     print(e.field)                                          # doctest: +SKIP
parameters[0.weight].data
"""
from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class GradmeshError(Exception):
    """A gradmesh call failed. ``code`` (grpc.StatusCode), ``message``, ``field``."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None,
                 method: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.method = method

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        call = f" in {self.method}" if self.method else ""
        return f"{self.code.name}{call}: {self.message}{where}"


class InvalidArgument(GradmeshError):
    """The request is malformed: bad graph, unknown op, wrong shape, dtype or length."""


class ResourceExhausted(GradmeshError):
    """Over a limit (graph size, tensor elements, message bytes) or the server is busy."""


class NotFound(GradmeshError):
    """The server does not know the graph id (register it again, or send it inline)."""


class Unauthenticated(GradmeshError):
    """The server needs a bearer token and it was missing or wrong."""


class PermissionDenied(GradmeshError):
    """The caller is known but not allowed to do this."""


class Unavailable(GradmeshError):
    """The server cannot be reached (down, restarting, wrong address)."""


class DeadlineExceeded(GradmeshError):
    """The call's deadline passed; the server abandoned the computation."""


class Cancelled(GradmeshError):
    """The call was cancelled."""


class Internal(GradmeshError):
    """A bug on the server; the server logged it and keeps serving."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}


def bad_request_field(error: grpc.RpcError) -> str | None:
    """The first field named in a google.rpc.BadRequest detail of ``error``, if any."""
    try:
        status = rpc_status.from_call(error)
    except Exception:  # noqa: BLE001  (malformed trailers: no field rather than a crash)
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                return bad.field_violations[0].field
    return None


def from_rpc_error(error: grpc.RpcError, method: str | None = None) -> GradmeshError:
    """The :class:`GradmeshError` subclass for a failed gRPC call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, GradmeshError)
    return cls(code, message, bad_request_field(error), method)


__all__ = ["GradmeshError", "InvalidArgument", "ResourceExhausted", "NotFound",
           "Unauthenticated", "PermissionDenied", "Unavailable", "DeadlineExceeded",
           "Cancelled", "Internal", "from_rpc_error", "bad_request_field"]
