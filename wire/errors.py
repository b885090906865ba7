"""Python exceptions for gradmesh's gRPC errors.

Every failed call raises the :class:`GradmeshError` subclass of its status code (one
class per code: ``InvalidArgument``, ``FailedPrecondition``, ``ResourceExhausted``...).
It carries the ``code``, the server's ``message``, the offending request ``field`` (from
the ``google.rpc.BadRequest`` detail) and the ``request_id`` the server logged the call
under (from the ``google.rpc.RequestInfo`` detail):

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

from .channel import REQUEST_ID_KEY


class GradmeshError(Exception):
    """A gradmesh call failed: ``code`` (grpc.StatusCode), the server's ``message``, the
    offending request ``field``, the ``reason`` (a field violation's, ``"BAD_ATTRIBUTE"``,
    the proto files list them; or an error's own, ``"NO_WORKERS"``) and the server's
    ``request_id`` (to find its log lines)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str | None = None

    def __init__(
        self,
        code: grpc.StatusCode | str | None = None,
        message: str = "",
        field: str | None = None,
        method: str | None = None,
        request_id: str | None = None,
    ):
        if isinstance(code, str) and not message:  # InvalidArgument("message")
            message = code
        super().__init__(message)
        self.code = code if isinstance(code, grpc.StatusCode) else type(self).code
        self.message = message
        self.field = field
        self.method = method
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        call = f" in {self.method}" if self.method else ""
        rid = f" [request {self.request_id}]" if self.request_id else ""
        return f"{self.code.name}{call}: {self.message}{where}{rid}"


def _error_class(name: str, code: grpc.StatusCode, doc: str) -> type[GradmeshError]:
    return type(name, (GradmeshError,), {"__doc__": doc, "code": code, "__module__": __name__})


C = grpc.StatusCode
Cancelled = _error_class("Cancelled", C.CANCELLED, "The call was cancelled.")
Unknown = _error_class("Unknown", C.UNKNOWN, "The server gave no known status.")
InvalidArgument = _error_class(
    "InvalidArgument",
    C.INVALID_ARGUMENT,
    "The request is malformed: bad graph, unknown op, wrong shape, dtype or length.",
)
DeadlineExceeded = _error_class(
    "DeadlineExceeded",
    C.DEADLINE_EXCEEDED,
    "The call's deadline passed; the server abandoned the computation.",
)
NotFound = _error_class(
    "NotFound",
    C.NOT_FOUND,
    "The server does not know the graph, job or parameter set (register it again).",
)
AlreadyExists = _error_class(
    "AlreadyExists", C.ALREADY_EXISTS, "What the request creates exists already (a job id)."
)
PermissionDenied = _error_class(
    "PermissionDenied", C.PERMISSION_DENIED, "The caller is known but not allowed to do this."
)
ResourceExhausted = _error_class(
    "ResourceExhausted",
    C.RESOURCE_EXHAUSTED,
    "Over a limit (graph size, tensor elements, message bytes, memory) or server busy.",
)
FailedPrecondition = _error_class(
    "FailedPrecondition",
    C.FAILED_PRECONDITION,
    "The request is well formed but the server's state does not allow it (a step out "
    "of order, a parameter set not kept, a device this worker lacks).",
)
Aborted = _error_class("Aborted", C.ABORTED, "The call was aborted (a conflict); retry.")
OutOfRange = _error_class("OutOfRange", C.OUT_OF_RANGE, "A value is out of its range.")
Unimplemented = _error_class(
    "Unimplemented", C.UNIMPLEMENTED, "The server does not implement this method."
)
Internal = _error_class(
    "Internal", C.INTERNAL, "A bug on the server; the server logged it and keeps serving."
)
Unavailable = _error_class(
    "Unavailable", C.UNAVAILABLE, "The server cannot be reached (down, restarting, wrong address)."
)
DataLoss = _error_class("DataLoss", C.DATA_LOSS, "Unrecoverable data loss or corruption.")
Unauthenticated = _error_class(
    "Unauthenticated",
    C.UNAUTHENTICATED,
    "The server needs a bearer token and it was missing or wrong.",
)
del C

# One class per status code (OK has none).
_BY_CODE: dict[grpc.StatusCode, type[GradmeshError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_class(code: grpc.StatusCode) -> type[GradmeshError]:
    """The :class:`GradmeshError` subclass of status ``code``."""
    return _BY_CODE.get(code, GradmeshError)


def _status(error: grpc.RpcError):
    try:
        return rpc_status.from_call(error)
    except Exception:  # noqa: BLE001  (malformed trailers: no details rather than a crash)
        return None


def _detail(error: grpc.RpcError, kind):
    status = _status(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            out = kind()
            detail.Unpack(out)
            return out
    return None


def bad_request_field(error: grpc.RpcError) -> str | None:
    """The first field named in a google.rpc.BadRequest detail of ``error``, if any."""
    bad = _detail(error, error_details_pb2.BadRequest)
    if bad is not None and bad.field_violations:
        return bad.field_violations[0].field
    return None


def bad_request_reason(error: grpc.RpcError) -> str | None:
    """The reason of the first field violation of ``error``, if any."""
    bad = _detail(error, error_details_pb2.BadRequest)
    if bad is not None and bad.field_violations:
        return bad.field_violations[0].reason or None
    return None


def error_info_reason(error: grpc.RpcError) -> str | None:
    """The reason of a google.rpc.ErrorInfo detail of ``error`` ("NO_WORKERS"), if any."""
    info = _detail(error, error_details_pb2.ErrorInfo)
    return (info.reason or None) if info is not None else None


# ErrorInfo reasons (a program may switch on them): a Step refused for want of workers,
# none known to the coordinator (none configured, none registered) or none of the known
# ones ready now. Both come with UNAVAILABLE.
NO_WORKERS = "NO_WORKERS"
NO_USABLE_WORKERS = "NO_USABLE_WORKERS"


def request_id_of(error: grpc.RpcError) -> str | None:
    """The server's request id of a failed call: its google.rpc.RequestInfo detail, else
    its ``x-request-id`` trailing metadata."""
    info = _detail(error, error_details_pb2.RequestInfo)
    if info is not None and info.request_id:
        return info.request_id
    try:
        trailers = error.trailing_metadata() or ()
    except Exception:  # noqa: BLE001  (an RpcError that is no call)
        return None
    for key, value in trailers:
        if key == REQUEST_ID_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None


def from_rpc_error(error: grpc.RpcError, method: str | None = None) -> GradmeshError:
    """The :class:`GradmeshError` subclass for a failed gRPC call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    exc = error_class(code)(code, message, bad_request_field(error), method, request_id_of(error))
    exc.reason = bad_request_reason(error) or error_info_reason(error)
    return exc


__all__ = [
    "GradmeshError",
    "NO_WORKERS",
    "NO_USABLE_WORKERS",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
    "REQUEST_ID_KEY",
    "error_class",
    "from_rpc_error",
    "bad_request_field",
    "bad_request_reason",
    "request_id_of",
]
