"""Tensor values on the wire: the ``Tensor`` message codec.

A tensor travels as ``Tensor {dtype, shape, data}``: little-endian, C-order raw bytes (see
``protos/gradmesh/v1/tensor.proto``). Decoding checks everything a hostile peer controls
(dtype enum, shape, element count against a limit *before* anything is allocated, exact
byte length) and raises ``WireError`` naming the offending field, with the gRPC status
code the server should answer with.

>>> import numpy as np
>>> t = to_proto(np.arange(6, dtype=np.float32).reshape(2, 3))
>>> from_proto(t, field="x").tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]

This is the part of the wire format the engine needs itself (a graph's constants are
``Tensor`` values). How messages travel (streams of chunks, frames, shared memory) is
the transport's business: ``gradmesh.wire``.
"""

from __future__ import annotations

import math
import sys
from typing import Mapping

import numpy as np

from gradmesh.v1 import tensor_pb2

from . import dtypes
from .tensor import Tensor

__all__ = [
    "WireError",
    "DTYPE_TO_PROTO",
    "byte_view",
    "PROTO_TO_DTYPE",
    "to_proto",
    "from_proto",
    "check_header",
    "check_headers",
    "dtype_name",
    "decode",
    "decode_data",
    "host_array",
    "wire_array",
    "wire_dtype",
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
]

INVALID_ARGUMENT = "INVALID_ARGUMENT"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"


class WireError(ValueError):
    """A malformed or over-limit message. ``field`` names the offending field (e.g.
    ``"parameters[w1].data"``); ``code`` is the gRPC status code name to answer with:
    ``"INVALID_ARGUMENT"`` or ``"RESOURCE_EXHAUSTED"``."""

    def __init__(self, field: str, message: str, code: str = INVALID_ARGUMENT):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code


DTYPE_TO_PROTO: dict[dtypes.DType, int] = {
    dtypes.float32: tensor_pb2.FLOAT32,
    dtypes.float64: tensor_pb2.FLOAT64,
    dtypes.int64: tensor_pb2.INT64,
    dtypes.int32: tensor_pb2.INT32,
    dtypes.bool_: tensor_pb2.BOOL,
    dtypes.float16: tensor_pb2.FLOAT16,
    dtypes.bfloat16: tensor_pb2.BFLOAT16,
}
_BFLOAT16 = dtypes.bfloat16.np
PROTO_TO_DTYPE: dict[int, dtypes.DType] = {v: k for k, v in DTYPE_TO_PROTO.items()}

_LITTLE = sys.byteorder == "little"
_MAX_BYTES = int(np.iinfo(np.intp).max)  # the largest array NumPy can describe


def wire_dtype(dtype: dtypes.DType) -> np.dtype:
    """The NumPy dtype of the wire format: explicitly little-endian."""
    return dtype.np.newbyteorder("<")


def host_array(x) -> np.ndarray:
    """``x`` (NumPy, CuPy or gradmesh Tensor) as a host NumPy array, without copying a
    NumPy array."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, Tensor):
        x = x._data
    if not isinstance(x, np.ndarray):
        # CuPy arrays copy to the host with .get(), even before gradmesh imported CuPy.
        x = x.get() if type(x).__module__.startswith("cupy") else np.asarray(x)
    return x


def byte_view(a: np.ndarray) -> memoryview:
    """A C-contiguous array's bytes as a flat memoryview, without a copy. NumPy's buffer
    protocol refuses ml_dtypes' bfloat16, so its bytes are viewed as uint16 first."""
    if not a.size:
        return memoryview(b"")  # memoryview.cast refuses a shape with a zero in it
    if a.dtype == _BFLOAT16:
        a = a.view(np.uint16)
    return memoryview(a).cast("B")


def wire_array(x) -> tuple[np.ndarray, dtypes.DType]:
    """``x`` as a host array in the wire's byte order and C order, and its dtype."""
    a = host_array(x)
    dtype = dtypes.from_numpy(a.dtype.newbyteorder("="))
    # One copy at most: only when the array is not already little-endian and C-contiguous.
    # (np.ascontiguousarray would turn a 0-d array into a 1-d one.)
    a = np.asarray(a, dtype=wire_dtype(dtype), order="C")
    return a, dtype


def to_proto(x, *, data: bool = True) -> tensor_pb2.Tensor:
    """Encode a NumPy array, CuPy array or gradmesh Tensor as a ``Tensor`` message.

    With ``data=False`` only dtype and shape are set (a streaming header).
    """
    a, dtype = wire_array(x)
    t = tensor_pb2.Tensor(dtype=DTYPE_TO_PROTO[dtype], shape=a.shape)
    if data and a.size:
        t.data = a.tobytes()  # protobuf only takes bytes: this is the one copy
    return t


def check_header(
    t: tensor_pb2.Tensor, *, field: str = "tensor", max_elements: int | None = None
) -> tuple[dtypes.DType, tuple, int]:
    """Validate a tensor's dtype and shape; returns (dtype, shape, byte size).

    Nothing is allocated: the element count is checked against ``max_elements`` first.
    """
    dtype = PROTO_TO_DTYPE.get(t.dtype)
    if dtype is None:
        raise WireError(
            f"{field}.dtype",
            f"unknown or unspecified dtype {t.dtype}; expected one "
            f"of {sorted(tensor_pb2.DType.Name(v) for v in PROTO_TO_DTYPE)}",
        )
    shape = tuple(int(s) for s in t.shape)
    for i, s in enumerate(shape):
        if s < 0:
            raise WireError(f"{field}.shape", f"dimension {i} is {s}; sizes must be >= 0")
    count = math.prod(shape)  # Python ints: no overflow
    if max_elements is not None and count > max_elements:
        raise WireError(
            f"{field}.shape",
            f"{count} elements (shape {list(shape)}) exceed the limit of {max_elements}",
            RESOURCE_EXHAUSTED,
        )
    # NumPy refuses a shape whose non-zero dimensions multiply (in bytes) past its index
    # type even when another dimension is 0 and the array would hold nothing ([0, 2**62]):
    # refused here, before anything is built from it.
    nonzero = math.prod(s for s in shape if s)
    if nonzero * dtype.itemsize > _MAX_BYTES:
        raise WireError(
            f"{field}.shape",
            f"shape {list(shape)} is too large for any "
            f"array: its non-zero dimensions need {nonzero * dtype.itemsize} "
            f"bytes, over the limit of {_MAX_BYTES}",
            RESOURCE_EXHAUSTED,
        )
    return dtype, shape, count * dtype.itemsize


def dtype_name(wire: int) -> str:
    """A wire dtype's name ("FLOAT32"), or its number when it is no known dtype."""
    return tensor_pb2.DType.Name(wire) if wire in tensor_pb2.DType.values() else str(wire)


def check_headers(
    headers, expected: Mapping[str, tuple[int, tuple]], field: str, what: str
) -> None:
    """Check ``NamedTensor`` headers against ``expected`` (name -> (wire dtype, shape))
    before anything is allocated for their bytes: each names an expected tensor, once,
    with its dtype and shape (a header promising gigabytes for a small tensor is refused
    unread). Raises ``WireError`` for ``f"{field}[{name}]"``; ``what`` says what the
    names must be ("PARAM input of the graph")."""
    seen = set()
    for nt in headers:
        f = f"{field}[{nt.name}]"
        want = expected.get(nt.name)
        if want is None:
            raise WireError(
                f, f"{nt.name!r} is not a {what} (expected one of {sorted(expected)[:8]})"
            )
        if nt.name in seen:
            raise WireError(f, f"{nt.name!r} is given twice")
        seen.add(nt.name)
        if nt.tensor.dtype != want[0] or tuple(nt.tensor.shape) != tuple(want[1]):
            raise WireError(
                f,
                f"{nt.name!r} has dtype {dtype_name(nt.tensor.dtype)} and "
                f"shape {list(nt.tensor.shape)}; expected "
                f"{dtype_name(want[0])} {list(want[1])}",
            )


def from_proto(
    t: tensor_pb2.Tensor, *, field: str = "tensor", max_elements: int | None = None
) -> np.ndarray:
    """Decode a ``Tensor`` message into a NumPy array without copying its bytes.

    The array is a read-only view of the message's ``data`` (``np.frombuffer``); copy it
    (``.copy()``) before writing to it. Raises ``WireError`` for an unknown dtype, a negative
    dimension, more than ``max_elements`` elements (RESOURCE_EXHAUSTED, checked before any
    allocation) or a byte length other than ``product(shape) * itemsize``.
    """
    dtype, shape, nbytes = check_header(t, field=field, max_elements=max_elements)
    data = t.data
    if len(data) != nbytes:
        raise WireError(
            f"{field}.data",
            f"has {len(data)} bytes; dtype "
            f"{dtype.name} and shape {list(shape)} need exactly {nbytes}",
        )
    return decode(data, dtype, shape, field)


def decode_data(buf, dtype: np.dtype, shape: tuple, field: str) -> np.ndarray:
    """A tensor's bytes (of checked length) as a read-only array of ``dtype``, no copy."""
    return decode(buf, dtypes.from_numpy(dtype), shape, field)


def decode(buf, dtype: dtypes.DType, shape: tuple, field: str) -> np.ndarray:
    """Bytes of checked length as an array of ``dtype`` (a view where the host is
    little-endian); ``WireError`` for a bool that is neither 0 nor 1."""
    a = np.frombuffer(buf, dtype=wire_dtype(dtype)).reshape(shape)
    if dtype is dtypes.bool_ and a.size and a.view(np.uint8).max() > 1:
        raise WireError(f"{field}.data", "bool elements must be 0 or 1")
    if not _LITTLE:
        a = a.astype(dtype.np)  # big-endian hosts: one conversion to native order
    return a
