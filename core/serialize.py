"""Tensors on the wire: the ``Tensor`` message codec and the chunked streaming protocol.

A tensor travels as ``Tensor {dtype, shape, data}``: little-endian, C-order raw bytes (see
``protos/gradmesh/v1/tensor.proto``). Decoding checks everything a hostile peer controls
(dtype enum, shape, element count against a limit *before* anything is allocated, exact
byte length) and raises ``WireError`` naming the offending field, with the gRPC status
code the server should answer with.

>>> import numpy as np
>>> t = to_proto(np.arange(6, dtype=np.float32).reshape(2, 3))
>>> from_proto(t, field="x").tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]

Large messages go over a streaming RPC: ``split_for_stream`` turns a message into a header
whose tensors carry dtype and shape but no data, plus one buffer per tensor in header
order; ``chunks`` cuts those buffers into ``Chunk`` messages; on the receiving side an
``Assembler`` preallocates every tensor from the header (after checking the limits) and
fills it in place chunk by chunk.

The stream's frames have a codec of their own (``encode_chunk_frame``/``chunk_frames``,
``decode_stream_frame``, ``serialize_message``; a frame message whose chunk is another
field number, like shard.proto's ``ShardFrame``, passes ``field`` to the encoders and gets
its deserializer from ``frame_decoder``): the same bytes as protobuf, but a chunk's
data is copied once from the source array into the frame on the way out, and once from the
received frame into the tensor's buffer on the way in (protobuf would copy it four times).
Receivers that stream large tensors again and again take those buffers from a
``BufferPool``, which reuses memory once nothing refers to it any more.
``encode_tensor_field`` writes whole ``Tensor``/``NamedTensor`` fields the same way, for
unary messages built without copying arrays into protobuf objects first.
"""
from __future__ import annotations

import collections
import math
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from gradmesh.v1 import tensor_pb2

from . import dtypes

__all__ = ["WireError", "DTYPE_TO_PROTO", "PROTO_TO_DTYPE", "to_proto", "from_proto",
           "tensor_buffer", "split_for_stream", "chunks", "Assembler", "StreamSlot",
           "DEFAULT_CHUNK_BYTES", "MIN_CHUNK_BYTES", "MAX_CHUNK_BYTES",
           "encode_chunk_frame", "chunk_frames", "decode_stream_frame", "serialize_message",
           "encode_tensor_field", "ChunkFrame", "ChunkView", "BufferPool", "FrameDecoder",
           "frame_decoder", "STREAM_FRAME_CHUNK_FIELD", "SHARD_FRAME_CHUNK_FIELD"]

MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 4 << 20
DEFAULT_CHUNK_BYTES = 2 << 20

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
}
PROTO_TO_DTYPE: dict[int, dtypes.DType] = {v: k for k, v in DTYPE_TO_PROTO.items()}

_LITTLE = sys.byteorder == "little"


def _wire_np(dtype: dtypes.DType) -> np.dtype:
    """The NumPy dtype of the wire format: explicitly little-endian."""
    return dtype.np.newbyteorder("<")


def _host_array(x) -> np.ndarray:
    """``x`` (NumPy, CuPy or gradmesh Tensor) as a host NumPy array, without copying a
    NumPy array."""
    if isinstance(x, np.ndarray):
        return x
    from .tensor import Tensor
    if isinstance(x, Tensor):
        x = x._data
    if not isinstance(x, np.ndarray):
        # CuPy arrays copy to the host with .get(), even before gradmesh imported CuPy.
        x = x.get() if type(x).__module__.startswith("cupy") else np.asarray(x)
    return x


def _wire_array(x) -> tuple[np.ndarray, dtypes.DType]:
    a = _host_array(x)
    dtype = dtypes.from_numpy(a.dtype.newbyteorder("="))
    # One copy at most: only when the array is not already little-endian and C-contiguous.
    # (np.ascontiguousarray would turn a 0-d array into a 1-d one.)
    a = np.asarray(a, dtype=_wire_np(dtype), order="C")
    return a, dtype


def tensor_buffer(x) -> memoryview:
    """The wire bytes of an array as a memoryview: no copy for a little-endian, C-contiguous
    NumPy array (a CuPy array is copied to the host once)."""
    a, _ = _wire_array(x)
    if not a.size:
        # memoryview.cast refuses a shape with a zero in it, e.g. (0, 3).
        return memoryview(b"")
    return memoryview(a).cast("B")


def to_proto(x, *, data: bool = True) -> tensor_pb2.Tensor:
    """Encode a NumPy array, CuPy array or gradmesh Tensor as a ``Tensor`` message.

    With ``data=False`` only dtype and shape are set (a streaming header).
    """
    a, dtype = _wire_array(x)
    t = tensor_pb2.Tensor(dtype=DTYPE_TO_PROTO[dtype], shape=a.shape)
    if data and a.size:
        t.data = a.tobytes()        # protobuf only takes bytes: this is the one copy
    return t


def check_header(t: tensor_pb2.Tensor, *, field: str = "tensor",
                 max_elements: int | None = None) -> tuple[dtypes.DType, tuple, int]:
    """Validate a tensor's dtype and shape; returns (dtype, shape, byte size).

    Nothing is allocated: the element count is checked against ``max_elements`` first.
    """
    dtype = PROTO_TO_DTYPE.get(t.dtype)
    if dtype is None:
        raise WireError(f"{field}.dtype", f"unknown or unspecified dtype {t.dtype}; expected one "
                        f"of {sorted(tensor_pb2.DType.Name(v) for v in PROTO_TO_DTYPE)}")
    shape = tuple(int(s) for s in t.shape)
    for i, s in enumerate(shape):
        if s < 0:
            raise WireError(f"{field}.shape", f"dimension {i} is {s}; sizes must be >= 0")
    count = math.prod(shape)                        # Python ints: no overflow
    if max_elements is not None and count > max_elements:
        raise WireError(f"{field}.shape", f"{count} elements (shape {list(shape)}) exceed the "
                        f"limit of {max_elements}", RESOURCE_EXHAUSTED)
    return dtype, shape, count * dtype.itemsize


def dtype_name(wire: int) -> str:
    """A wire dtype's name ("FLOAT32"), or its number when it is no known dtype."""
    return tensor_pb2.DType.Name(wire) if wire in tensor_pb2.DType.values() else str(wire)


def check_headers(headers, expected: Mapping[str, tuple[int, tuple]], field: str,
                  what: str) -> None:
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
            raise WireError(f, f"{nt.name!r} is not a {what} (expected one of "
                               f"{sorted(expected)[:8]})")
        if nt.name in seen:
            raise WireError(f, f"{nt.name!r} is given twice")
        seen.add(nt.name)
        if nt.tensor.dtype != want[0] or tuple(nt.tensor.shape) != tuple(want[1]):
            raise WireError(f, f"{nt.name!r} has dtype {dtype_name(nt.tensor.dtype)} and "
                               f"shape {list(nt.tensor.shape)}; expected "
                               f"{dtype_name(want[0])} {list(want[1])}")


def from_proto(t: tensor_pb2.Tensor, *, field: str = "tensor",
               max_elements: int | None = None) -> np.ndarray:
    """Decode a ``Tensor`` message into a NumPy array without copying its bytes.

    The array is a read-only view of the message's ``data`` (``np.frombuffer``); copy it
    (``.copy()``) before writing to it. Raises ``WireError`` for an unknown dtype, a negative
    dimension, more than ``max_elements`` elements (RESOURCE_EXHAUSTED, checked before any
    allocation) or a byte length other than ``product(shape) * itemsize``.
    """
    dtype, shape, nbytes = check_header(t, field=field, max_elements=max_elements)
    data = t.data
    if len(data) != nbytes:
        raise WireError(f"{field}.data", f"has {len(data)} bytes; dtype "
                        f"{dtype.name} and shape {list(shape)} need exactly {nbytes}")
    return _decode(data, dtype, shape, field)


def decode_data(buf, dtype: np.dtype, shape: tuple, field: str) -> np.ndarray:
    """A tensor's bytes (of checked length) as a read-only array of ``dtype``, no copy."""
    return _decode(buf, dtypes.from_numpy(dtype), shape, field)


def _decode(buf, dtype: dtypes.DType, shape: tuple, field: str) -> np.ndarray:
    a = np.frombuffer(buf, dtype=_wire_np(dtype)).reshape(shape)
    if dtype is dtypes.bool_ and a.size and a.view(np.uint8).max() > 1:
        raise WireError(f"{field}.data", "bool elements must be 0 or 1")
    if not _LITTLE:
        a = a.astype(dtype.np)      # big-endian hosts: one conversion to native order
    return a


# ---------------------------------------------------------------------------------------
# Streaming: header + chunks
# ---------------------------------------------------------------------------------------

def _tensor_fields(message, tensor_fields: Sequence[str] | None) -> list:
    """The message's fields holding tensors, in field-number order (the protocol's order).

    By default every top-level field of type ``Tensor`` or ``NamedTensor`` (singular or
    repeated); a graph's CONST values are not streamed.
    """
    kinds = (tensor_pb2.Tensor.DESCRIPTOR.full_name, tensor_pb2.NamedTensor.DESCRIPTOR.full_name)
    fields = []
    for fd in message.DESCRIPTOR.fields:
        if tensor_fields is None:
            if fd.message_type is not None and fd.message_type.full_name in kinds:
                fields.append(fd)
        elif fd.name in tensor_fields:
            if fd.message_type is None or fd.message_type.full_name not in kinds:
                raise TypeError(f"field {fd.name} of {message.DESCRIPTOR.name} holds no tensors")
            fields.append(fd)
    if tensor_fields is not None and len(fields) != len(set(tensor_fields)):
        known = {fd.name for fd in message.DESCRIPTOR.fields}
        raise TypeError(f"{message.DESCRIPTOR.name} has no field(s) "
                        f"{sorted(set(tensor_fields) - known)}")
    return sorted(fields, key=lambda fd: fd.number)


def _is_repeated(fd) -> bool:
    return fd.is_repeated


def _walk(message, fields) -> Iterator[tuple[str, str | None, tensor_pb2.Tensor, object]]:
    """(field path, name, Tensor message, holder) for each tensor, in header order."""
    named = tensor_pb2.NamedTensor.DESCRIPTOR.full_name
    for fd in fields:
        is_named = fd.message_type.full_name == named
        if _is_repeated(fd):
            items = list(getattr(message, fd.name))
        elif message.HasField(fd.name):
            items = [getattr(message, fd.name)]
        else:
            continue
        for i, item in enumerate(items):
            if is_named:
                key = item.name or str(i)
                yield f"{fd.name}[{key}]", item.name, item.tensor, item
            else:
                path = f"{fd.name}[{i}]" if _is_repeated(fd) else fd.name
                yield path, None, item, item


def _copy_field(dst, fd, value) -> None:
    if _is_repeated(fd):
        target = getattr(dst, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if isinstance(target[k], (int, float, str, bytes, bool)):
                    target[k] = v
                else:
                    target[k].CopyFrom(v)
        else:
            target.extend(value)
    elif fd.message_type is not None:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)


def split_for_stream(message, tensor_fields: Sequence[str] | None = None
                     ) -> tuple[object, list[memoryview]]:
    """A streaming header (the message with its tensors' data left empty) and the data of
    each tensor as a memoryview, in header order.

    ``tensor_fields`` names the top-level fields whose tensors are streamed (default: all
    ``Tensor``/``NamedTensor`` fields, e.g. ``parameters`` and ``data`` of a
    ``ComputeGradientsRequest``). The message itself is left unchanged. Reading a bytes
    field out of a protobuf message copies it once; to stream arrays you already hold,
    build the header with ``to_proto(a, data=False)`` and pass ``tensor_buffer(a)``.
    """
    fields = _tensor_fields(message, tensor_fields)
    header = type(message)()
    tensor_names = {fd.name for fd in fields}
    for fd, value in message.ListFields():
        if fd.name not in tensor_names:
            _copy_field(header, fd, value)
    buffers = []
    named = tensor_pb2.NamedTensor.DESCRIPTOR.full_name
    for fd in fields:
        items = list(getattr(message, fd.name)) if _is_repeated(fd) else (
            [getattr(message, fd.name)] if message.HasField(fd.name) else [])
        for item in items:
            t = item.tensor if fd.message_type.full_name == named else item
            if fd.message_type.full_name == named:
                dst = getattr(header, fd.name).add() if _is_repeated(fd) else getattr(header, fd.name)
                dst.name = item.name
                dst_t = dst.tensor
            else:
                dst_t = getattr(header, fd.name).add() if _is_repeated(fd) else getattr(header, fd.name)
            dst_t.dtype = t.dtype
            dst_t.shape.extend(t.shape)
            if fd.message_type.full_name == named and not item.HasField("tensor"):
                dst.ClearField("tensor")
            buffers.append(memoryview(t.data))
    return header, buffers


def chunks(buffers: Iterable, chunk_bytes: int = DEFAULT_CHUNK_BYTES
           ) -> Iterator[tensor_pb2.Chunk]:
    """Cut each buffer (bytes, memoryview or array) into ``Chunk`` messages of at most
    ``chunk_bytes``; a buffer of zero bytes yields no chunk."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    for index, buf in enumerate(buffers):
        mv = buf if isinstance(buf, memoryview) else (
            tensor_buffer(buf) if not isinstance(buf, (bytes, bytearray)) else memoryview(buf))
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        for offset in range(0, mv.nbytes, chunk_bytes):
            # protobuf takes only bytes: one copy of each piece.
            yield tensor_pb2.Chunk(tensor_index=index, offset=offset,
                                   data=bytes(mv[offset:offset + chunk_bytes]))


def _empty_bytes(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, np.uint8)


class BufferPool:
    """Buffers for received tensors, reused once nothing refers to them any more.

    A fresh buffer costs more than the bytes it receives: the kernel zeroes every new
    page on first touch, and fresh 256 MiB buffers took 45-470 ms to fill here where a
    reused one took 27 ms. :meth:`allocate` hands out an array over pooled memory; when
    the last array or view over it is gone (the garbage collector says so, so nothing can
    read it any more), the memory goes back to the pool. Idle buffers are kept up to
    ``max_idle_bytes`` in all (the least recently freed go first) and handed out again for
    requests of up to a quarter less than their size; requests under ``min_bytes`` get
    plain ``np.empty`` (small allocations are cheap).

    >>> pool = BufferPool(1 << 30)
    >>> a = pool.allocate(4 << 20)
    >>> del a                                   # nothing refers to it: back to the pool
    >>> pool.idle_bytes
    4194304
    """

    def __init__(self, max_idle_bytes: int, min_bytes: int = MIN_CHUNK_BYTES):
        self.max_idle_bytes = max_idle_bytes
        self.min_bytes = min_bytes
        self._idle: list[np.ndarray] = []       # least recently freed first
        # Filled by finalizers, which run on any thread, even inside the collector while
        # this thread holds the lock: they append here and take the lock only if it is free.
        self._freed: collections.deque = collections.deque()
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            self._collect()
            return sum(b.nbytes for b in self._idle)

    def allocate(self, nbytes: int) -> np.ndarray:
        """An uninitialised, writable uint8 array of ``nbytes`` (pooled memory when an idle
        buffer that fits is free)."""
        if nbytes < self.min_bytes:
            return _empty_bytes(nbytes)
        with self._lock:
            self._collect()
            fits = [b for b in self._idle if nbytes <= b.nbytes <= nbytes + nbytes // 4]
            base = min(fits, key=lambda b: b.nbytes) if fits else None
            if base is not None:
                self._idle = [b for b in self._idle if b is not base]
        if base is None:
            try:
                base = _empty_bytes(nbytes)
            except MemoryError:
                with self._lock:
                    self._idle.clear()          # idle memory first, then try once more
                base = _empty_bytes(nbytes)
        # The array's views all lead to this memoryview (NumPy collapses view chains onto
        # the first non-array base), so it dies exactly when the last of them does.
        out = np.frombuffer(memoryview(base)[:nbytes], np.uint8)
        weakref.finalize(out.base, self._free, base).atexit = False
        return out

    def _free(self, base: np.ndarray) -> None:
        self._freed.append(base)
        if self._lock.acquire(blocking=False):
            try:
                self._collect()
            finally:
                self._lock.release()

    def _collect(self) -> None:
        """Move freed buffers to the idle list and drop the oldest above the limit (with
        the lock held)."""
        while self._freed:
            self._idle.append(self._freed.popleft())
        total = sum(b.nbytes for b in self._idle)
        while total > self.max_idle_bytes:
            total -= self._idle.pop(0).nbytes


# Staging buffers of strided tensors' chunks (``chunk_frames``), reused: a fresh one would
# be fresh pages for the kernel to zero, for every tensor sent.
_STAGES = BufferPool(4 * MAX_CHUNK_BYTES, min_bytes=64 << 10)


@dataclass
class StreamSlot:
    """One streamed tensor: where it sits in the header and what it holds."""
    path: str                  # e.g. "parameters[w1]"; errors name f"{path}.data"
    field: str                 # the top-level field, e.g. "parameters"
    name: str | None           # the NamedTensor's name, None for a bare Tensor
    dtype: dtypes.DType
    shape: tuple
    nbytes: int


class Assembler:
    """Rebuild a streamed message's tensors from its header and its chunks.

    >>> import numpy as np
    >>> from gradmesh.v1 import worker_pb2
    >>> req = worker_pb2.ComputeGradientsRequest(graph_id="g")
    >>> req.data.add(name="x").tensor.CopyFrom(to_proto(np.ones(3, np.float32)))
    >>> header, bufs = split_for_stream(req)
    >>> asm = Assembler(header, max_total_bytes=1 << 20)
    >>> for c in chunks(bufs, 1 << 20):
    ...     asm.add(c)
    >>> [a.tolist() for a in asm.finish()]
    [[1.0, 1.0, 1.0]]

    All limits are checked from the header before anything is allocated; then each tensor
    gets one buffer that chunks are copied into in place. Chunks must arrive in order:
    tensor by tensor, each tensor's bytes contiguous from offset 0.
    """

    def __init__(self, header, max_total_bytes: int, *, tensor_fields: Sequence[str] | None = None,
                 max_elements: int | None = None,
                 allocate: Callable[[int], np.ndarray] | None = None):
        """``allocate(nbytes)``, if given, supplies each tensor's uint8 buffer (e.g.
        :meth:`BufferPool.allocate`, to reuse memory across streams); default ``np.empty``."""
        self.header = header
        self._fields = _tensor_fields(header, tensor_fields)
        self.slots: list[StreamSlot] = []
        total = 0
        for path, name, t, _holder in _walk(header, self._fields):
            if len(t.data):
                raise WireError(f"{path}.data", "a streamed header must not carry data; send "
                                "it in chunks")
            dtype, shape, nbytes = check_header(t, field=path, max_elements=max_elements)
            total += nbytes
            if total > max_total_bytes:
                raise WireError(f"{path}.shape", f"the streamed tensors need more than "
                                f"{max_total_bytes} bytes in all", RESOURCE_EXHAUSTED)
            self.slots.append(StreamSlot(path, path.split("[")[0], name, dtype, shape, nbytes))
        self.total_bytes = total
        # Uninitialised: every byte is overwritten by a chunk, and finish() refuses a
        # tensor that is not complete (zero-filling 64 MiB costs ~60 ms here).
        allocate = allocate or _empty_bytes
        self._buffers = []
        for s in self.slots:
            try:
                self._buffers.append(allocate(s.nbytes))
            except MemoryError:
                # Within the limits but more than this process can get now: a limit too.
                self._buffers = []
                raise WireError(f"{s.path}.shape", f"cannot allocate {s.nbytes} bytes for "
                                f"this tensor now ({total} bytes in all); send less",
                                RESOURCE_EXHAUSTED) from None
        self._views = [memoryview(b) for b in self._buffers]
        self._filled = [0] * len(self.slots)
        self._current = 0
        self._arrays = None
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._current < len(self.slots) and \
                self._filled[self._current] == self.slots[self._current].nbytes:
            self._current += 1

    def add(self, chunk) -> None:
        """Copy one chunk (a ``Chunk`` message or a :class:`ChunkView`) into its tensor, the
        one copy of its bytes on this side; raises ``WireError`` (field ``chunk``) for an
        unknown tensor index, a chunk out of order or past the tensor's end."""
        i = chunk.tensor_index
        if i >= len(self.slots):
            raise WireError("chunk.tensor_index", f"is {i} but the header has "
                            f"{len(self.slots)} tensors")
        slot = self.slots[i]
        if i != self._current:
            expected = (f"tensor {self._current} ({self.slots[self._current].path})"
                        if self._current < len(self.slots) else "no more chunks")
            raise WireError("chunk.tensor_index", f"chunk for tensor {i} ({slot.path}) out of "
                            f"order; expected {expected}")
        data = chunk.data
        if chunk.offset != self._filled[i]:
            raise WireError("chunk.offset", f"{slot.path}: got offset {chunk.offset}, expected "
                            f"{self._filled[i]} (chunks must be contiguous and in order)")
        end = chunk.offset + len(data)
        if end > slot.nbytes:
            raise WireError("chunk.data", f"{slot.path}: chunk ends at byte {end}, past the "
                            f"tensor's {slot.nbytes} bytes")
        if not data:
            raise WireError("chunk.data", f"{slot.path}: empty chunk")
        self._views[i][chunk.offset:end] = data
        self._filled[i] = end
        self._skip_empty()

    @property
    def done(self) -> bool:
        return self._current >= len(self.slots)

    def finish(self) -> list[np.ndarray]:
        """The tensors in header order (writable arrays over the received bytes); raises
        ``WireError`` if any tensor is incomplete."""
        if not self.done:
            slot = self.slots[self._current]
            raise WireError(f"{slot.path}.data", f"stream ended after "
                            f"{self._filled[self._current]} of {slot.nbytes} bytes")
        if self._arrays is None:
            self._arrays = [_decode(buf, s.dtype, s.shape, s.path)
                            for buf, s in zip(self._buffers, self.slots)]
            self._buffers, self._views = [], []     # the arrays own the memory now
        return list(self._arrays)

    def finish_message(self):
        """The header with each tensor's data filled in (copies the bytes once more)."""
        arrays = self.finish()
        for (_path, _name, t, _h), a in zip(_walk(self.header, self._fields), arrays):
            if a.size:
                t.data = a.tobytes()
        return self.header


# ---------------------------------------------------------------------------------------
# Wire codec: protobuf's own encoding, written without protobuf objects for tensor bytes.
# Python protobuf copies a bytes field on assignment, on serialization, on parsing and on
# access; these functions copy tensor bytes once per side instead. Everything else (the
# small header messages) still goes through protobuf, so every valid message is read and
# written exactly as protobuf does (tests compare bytes with protobuf's serializer).
# ---------------------------------------------------------------------------------------

_SMALL_VARINTS = [bytes([n]) for n in range(128)]


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int (negative int64: two's complement)."""
    if 0 <= n < 128:
        return _SMALL_VARINTS[n]
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n > 127:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 64:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise ValueError("truncated varint")


# The field number of ``Chunk chunk`` in each frame message (worker.proto's StreamFrame and
# coordinator.proto's CoordinatorFrame: 3; shard.proto's ShardFrame: 4).
STREAM_FRAME_CHUNK_FIELD = 3
SHARD_FRAME_CHUNK_FIELD = 4


def _chunk_tag(field: int) -> bytes:
    """The key of a length-delimited field ``field``: what a chunk frame starts with."""
    if field < 1:
        raise ValueError(f"a field number is >= 1, got {field}")
    return _varint(field << 3 | 2)


def encode_chunk_frame(index: int, offset: int, data,
                       field: int = STREAM_FRAME_CHUNK_FIELD) -> bytes:
    """A frame holding only ``chunk: Chunk{tensor_index, offset, data}`` as field number
    ``field`` (``StreamFrame``'s 3 by default; ``ShardFrame``'s is 4), serialized exactly
    as protobuf writes it (default-valued fields omitted), copying ``data`` (any buffer,
    e.g. a memoryview slice of an array) once."""
    n = len(data)
    head = (b"\x08" + _varint(index) if index else b"") + \
        (b"\x10" + _varint(offset) if offset else b"") + \
        (b"\x1a" + _varint(n) if n else b"")
    return b"".join((_chunk_tag(field), _varint(len(head) + n), head, data))


def chunk_frames(arrays: Iterable, chunk_bytes: int, start: int = 0,
                 field: int = STREAM_FRAME_CHUNK_FIELD) -> Iterator[bytes]:
    """Encoded chunk frames of ``arrays`` (header order, see tensor.proto's Chunk): each
    frame reads its piece straight from the array's memory (a strided array's, e.g. a
    broadcast gradient's, through a small staging buffer instead of a contiguous copy of
    the whole array). ``start`` is the header index of the first array (to send a
    message's tensors a few at a time); ``field`` the frame message's chunk field number
    (see :func:`encode_chunk_frame`)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    _chunk_tag(field)                   # a bad field number fails here, not mid-stream
    for index, array in enumerate(arrays, start):
        view = array
        if not isinstance(array, memoryview):
            a, dtype = _wire_array_view(array)
            wire = _wire_np(dtype)
            flat = _flat_view(a, wire) if a.size and chunk_bytes % a.itemsize == 0 else None
            if flat is not None:
                yield from _staged_frames(index, flat, wire, chunk_bytes, field)
                continue
            view = tensor_buffer(a)
        for offset in range(0, view.nbytes, chunk_bytes):
            yield encode_chunk_frame(index, offset, view[offset:offset + chunk_bytes], field)


def _wire_array_view(x) -> tuple[np.ndarray, dtypes.DType]:
    """Like ``_wire_array`` but never copies a NumPy array: the host array as it is."""
    a = _host_array(x)
    return a, dtypes.from_numpy(a.dtype.newbyteorder("="))


def _flat_view(a: np.ndarray, wire: np.dtype) -> np.ndarray | None:
    """A 1-D view of ``a``'s elements in C order, when ``a`` cannot be read in place as
    wire bytes (strided, or big-endian) but such a view exists without a copy: e.g. a
    gradient broadcast from a scalar (stride 0). None otherwise."""
    if a.flags.c_contiguous and a.dtype == wire:
        return None
    dims = [(n, st) for n, st in zip(a.shape, a.strides) if n != 1]
    if not dims:
        return None
    for (_, outer), (n, inner) in zip(dims, dims[1:]):
        if outer != n * inner:
            return None
    return np.lib.stride_tricks.as_strided(a, (a.size,), (dims[-1][1],), writeable=False)


def _staged_frames(index: int, flat: np.ndarray, wire: np.dtype, chunk_bytes: int,
                   field: int) -> Iterator[bytes]:
    """Chunk frames of a strided 1-D view, each piece gathered into a small staging buffer
    first: the same frames as materializing the whole array, without allocating (and the
    kernel zeroing) a second array of its size."""
    per_chunk = chunk_bytes // flat.itemsize
    n = min(per_chunk, flat.size)
    stage = _STAGES.allocate(n * flat.itemsize).view(wire)
    raw = memoryview(stage).cast("B")
    if not flat.strides[0]:
        stage[...] = flat[:n]       # a broadcast scalar: every piece is the same
    for start in range(0, flat.size, per_chunk):
        piece = flat[start:start + per_chunk]
        if flat.strides[0]:
            np.copyto(stage[:piece.size], piece)
        yield encode_chunk_frame(index, start * flat.itemsize, raw[:piece.nbytes], field)


def serialize_message(message) -> bytes:
    """gRPC serializer that passes pre-encoded bytes through and serializes messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class ChunkView:
    """A parsed Chunk whose ``data`` is a memoryview into the received frame (no copy)."""
    __slots__ = ("tensor_index", "offset", "data")

    def __init__(self, tensor_index: int, offset: int, data: memoryview):
        self.tensor_index = tensor_index
        self.offset = offset
        self.data = data


class ChunkFrame:
    """A parsed chunk frame; reads like ``worker_pb2.StreamFrame`` (or ``ShardFrame``)
    holding a chunk for its users."""
    __slots__ = ("chunk",)

    def __init__(self, chunk: ChunkView):
        self.chunk = chunk

    def WhichOneof(self, _name: str) -> str:  # noqa: N802  (protobuf's spelling)
        return "chunk"


def _parse_chunk_frame(buf, tag: bytes) -> ChunkFrame | None:
    """The chunk of a frame in the encoding ``encode_chunk_frame`` writes, ``tag`` being the
    chunk field's key (any field order, default fields omitted or not); None for anything
    else."""
    if buf[:len(tag)] != tag:
        return None
    size, pos = _read_varint(buf, len(tag), len(buf))
    end = pos + size
    if end != len(buf):
        return None                  # a second field after the chunk: let protobuf merge
    index = offset = 0
    data = memoryview(b"")
    seen = set()
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        if key in seen:
            return None              # repeated field: protobuf's last-wins, leave it to it
        seen.add(key)
        if key == 0x08:
            index, pos = _read_varint(buf, pos, end)
        elif key == 0x10:
            offset, pos = _read_varint(buf, pos, end)
        elif key == 0x1a:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise ValueError("truncated data")
            data = memoryview(buf)[pos:pos + n]
            pos += n
        else:
            return None
    if index >= 1 << 32 or offset >= 1 << 64:
        return None
    return ChunkFrame(ChunkView(index, offset, data))


def _fast_chunk_frame(buf, tag: bytes) -> ChunkFrame | None:
    try:
        return _parse_chunk_frame(buf, tag)
    except ValueError:
        return None                  # protobuf decides (and names the error)


_STREAM_FRAME_TAG = _chunk_tag(STREAM_FRAME_CHUNK_FIELD)


def decode_stream_frame(buf: bytes):
    """gRPC deserializer for ``StreamFrame``: a chunk frame as a :class:`ChunkFrame` whose
    data is a view of ``buf`` (no copy); any other frame, or an encoding the fast path does
    not expect, by protobuf, so every valid message means what protobuf says it means."""
    frame = _fast_chunk_frame(buf, _STREAM_FRAME_TAG)
    if frame is not None:
        return frame
    from gradmesh.v1 import worker_pb2
    return worker_pb2.StreamFrame.FromString(buf)


class FrameDecoder:
    """The deserializer of another frame message whose ``kind`` oneof holds ``Chunk chunk``
    (numbered ``chunk_field``): what :func:`decode_stream_frame` is for ``StreamFrame``.

    Give gRPC the bound method :meth:`decode` (see :func:`frame_decoder`): like protobuf's
    ``Frame.FromString`` its ``__self__`` carries the message's ``DESCRIPTOR``, so that
    the server's answer to undecodable bytes names the message type (server/runtime.py).

    >>> from gradmesh.v1 import shard_pb2
    >>> decode = frame_decoder(shard_pb2.ShardFrame, SHARD_FRAME_CHUNK_FIELD)
    >>> frame = decode(encode_chunk_frame(1, 0, b"abc", SHARD_FRAME_CHUNK_FIELD))
    >>> frame.WhichOneof("kind"), frame.chunk.tensor_index, bytes(frame.chunk.data)
    ('chunk', 1, b'abc')
    """

    def __init__(self, frame_cls, chunk_field: int):
        fd = frame_cls.DESCRIPTOR.fields_by_number.get(chunk_field)
        if fd is None or fd.name != "chunk" or fd.containing_oneof is None or \
                fd.message_type is None or \
                fd.message_type.full_name != tensor_pb2.Chunk.DESCRIPTOR.full_name:
            raise ValueError(f"field {chunk_field} of {frame_cls.DESCRIPTOR.full_name} is "
                             f"not a oneof member `Chunk chunk`")
        self.frame_cls = frame_cls
        self.DESCRIPTOR = frame_cls.DESCRIPTOR      # noqa: N815  (protobuf's spelling)
        self._tag = _chunk_tag(chunk_field)

    def decode(self, buf: bytes):
        """A chunk frame as a :class:`ChunkFrame` whose data is a view of ``buf``; any other
        frame by protobuf (which raises ``DecodeError`` for bytes that are no frame)."""
        frame = _fast_chunk_frame(buf, self._tag)
        if frame is not None:
            return frame
        return self.frame_cls.FromString(buf)


def frame_decoder(frame_cls, chunk_field: int = STREAM_FRAME_CHUNK_FIELD
                  ) -> Callable[[bytes], object]:
    """gRPC deserializer for ``frame_cls`` whose chunk is field ``chunk_field`` (e.g.
    ``frame_decoder(shard_pb2.ShardFrame, SHARD_FRAME_CHUNK_FIELD)``); see
    :class:`FrameDecoder`."""
    return FrameDecoder(frame_cls, chunk_field).decode


def _tensor_body(wire_dtype: int, shape: Sequence[int], nbytes: int) -> bytes:
    """A Tensor message's bytes up to its data's payload (dtype, packed shape, data tag)."""
    head = b"\x08" + _varint(wire_dtype) if wire_dtype else b""
    if shape:
        dims = b"".join(_varint(int(s)) for s in shape)
        head += b"\x12" + _varint(len(dims)) + dims
    if nbytes:
        head += b"\x1a" + _varint(nbytes)
    return head


def encode_tensor_field(field_number: int, x, name: str | None = None) -> list:
    """The pieces (bytes and one memoryview of ``x``'s memory) of one occurrence of a
    ``Tensor`` field, or of a ``NamedTensor`` field when ``name`` is given, numbered
    ``field_number`` in the enclosing message: ``b"".join`` of the pieces is exactly what
    protobuf writes for ``to_proto(x)`` (wrapped in ``NamedTensor(name=name, tensor=...)``),
    and joining copies the array's bytes once."""
    a, dtype = _wire_array(x)
    data = memoryview(a).cast("B") if a.size else b""
    body = _tensor_body(DTYPE_TO_PROTO[dtype], a.shape, len(data))
    tensor_len = len(body) + len(data)
    if name is None:
        return [_varint(field_number << 3 | 2) + _varint(tensor_len) + body, data]
    name_b = name.encode()
    named = (b"\x0a" + _varint(len(name_b)) + name_b if name_b else b"") + \
        b"\x12" + _varint(tensor_len)
    return [_varint(field_number << 3 | 2) + _varint(len(named) + tensor_len) + named + body,
            data]
