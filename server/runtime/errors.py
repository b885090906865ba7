"""Errors a servicer raises, and the gRPC statuses they become (``google.rpc.Status`` with
``google.rpc.BadRequest`` details naming the offending field)."""

from __future__ import annotations

import re
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradmesh.wire.channel import REQUEST_ID_KEY, request_id


class ServiceError(Exception):
    """Raise from a servicer (or a function it calls) to fail the call with ``code``.

    ``field`` names the offending request field ("parameters[w1].data"); it is sent as a
    ``google.rpc.BadRequest`` field violation. ``reason``, for an error that is no
    request field's fault ("NO_WORKERS"), is sent as a ``google.rpc.ErrorInfo``.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field: str | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.reason = reason

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


# FieldViolation.reason: a short code a program can switch on, a pure function of the status
# code and the field path (the proto files' header comments list them).
_INVALID_BY_PATH = (
    (re.compile(r"^graph\.nodes\[\d+\]\.op$"), "UNKNOWN_OP"),
    (re.compile(r"^graph\.nodes\[\d+\]\.attrs\."), "BAD_ATTRIBUTE"),
    (re.compile(r"^graph\.nodes\[\d+\]$"), "SHAPE_MISMATCH"),
    (re.compile(r"^data\[[^\]]*\]\.shape$"), "SHAPE_MISMATCH"),
    (re.compile(r"^graph(\.|$)"), "BAD_GRAPH"),
    (re.compile(r"^chunk(\.|$)"), "BAD_CHUNK"),
    (re.compile(r"\.(data|dtype|shape)$"), "BAD_TENSOR"),
)
REASONS = (
    "UNKNOWN_OP",
    "BAD_ATTRIBUTE",
    "SHAPE_MISMATCH",
    "BAD_GRAPH",
    "BAD_CHUNK",
    "BAD_TENSOR",
    "INVALID_VALUE",
    "LIMIT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "ALREADY_EXISTS",
)


def violation_reason(code: grpc.StatusCode, field: str) -> str:
    """The ``reason`` of a field violation: LIMIT for RESOURCE_EXHAUSTED, the code's name
    for NOT_FOUND, FAILED_PRECONDITION and ALREADY_EXISTS, and for INVALID_ARGUMENT the
    kind of field (an unknown op, an attribute, a node's shapes, ...)."""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "LIMIT"
    if code is not grpc.StatusCode.INVALID_ARGUMENT:
        return code.name
    for pattern, reason in _INVALID_BY_PATH:
        if pattern.search(field):
            return reason
    return "INVALID_VALUE"


# ErrorInfo.domain of gradmesh's own reasons (ErrorInfo.reason: "NO_WORKERS").
ERROR_DOMAIN = "gradmesh"


class _Status(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def rich_status(
    code: grpc.StatusCode, message: str, field: str | None = None, reason: str | None = None
) -> grpc.Status:
    """A status carrying a google.rpc.Status (with BadRequest for ``field``, ErrorInfo for
    ``reason``, and RequestInfo with the request id being handled) in trailers, and the
    request id as ``x-request-id`` trailing metadata."""
    details = []
    rid = request_id.get()
    if field is not None:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=field, description=message, reason=violation_reason(code, field)
                )
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad)
        details.append(detail)
    if reason is not None:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
        details.append(detail)
    if rid:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.RequestInfo(request_id=rid))
        details.append(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    plain = rpc_status.to_status(status)
    trailers = tuple(plain.trailing_metadata) + (((REQUEST_ID_KEY, rid),) if rid else ())
    return _Status(plain.code, plain.details, trailers)


def abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    field: str | None = None,
    reason: str | None = None,
) -> None:
    """Fail the call with ``code`` and ``message``; ``field`` becomes a BadRequest violation,
    ``reason`` an ErrorInfo.

    Like ``context.abort`` it raises, so nothing after it runs.
    """
    context.abort_with_status(rich_status(code, message, field, reason))


def is_typed_error(exc: BaseException) -> bool:
    """Whether ``exc`` says its own status: ``code``, ``field`` and ``message`` attributes
    (:class:`ServiceError`, ``WireError``, ``GraphError``)."""
    return hasattr(exc, "code") and hasattr(exc, "field") and not isinstance(exc, grpc.RpcError)


def resource_error(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status of an exception that means the request needs more than the server has:
    RESOURCE_EXHAUSTED for a MemoryError (NumPy's ``_ArrayMemoryError`` included, and
    CuPy's ``OutOfMemoryError``), None for anything else."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        what = str(exc) or "out of memory"
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the request needs more memory than the server has: {what}",
        )
    return None


def message_of(exc: BaseException) -> str:
    msg = getattr(exc, "message", None)
    return msg if isinstance(msg, str) else str(exc)
