"""The frame codec of gradmesh's streams: protobuf's own encoding for tensor bytes.

A stream's chunk frames (``encode_chunk_frame``/``chunk_frames``, ``decode_stream_frame``,
``serialize_message``; a frame message whose chunk is another field, like shard.proto's
``ShardFrame``, passes ``field`` to the encoders and gets its deserializer from
``frame_decoder``) are the same bytes as protobuf's, but a chunk's data is copied once from
the source array into the frame on the way out, and once from the received frame into the
tensor's buffer on the way in (Python protobuf copies a bytes field on assignment, on
serialization, on parsing and on access: four times). ``encode_tensor_field`` writes whole
``Tensor``/``NamedTensor`` fields the same way, for unary messages built without copying
arrays into protobuf objects first. Everything else (the small header messages) still goes
through protobuf, so every valid message is read and written exactly as protobuf does
(tests compare bytes with protobuf's serializer).

Field numbers come from the generated descriptors, so the codec follows the .proto files.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from gradmesh.core import dtypes
from gradmesh.core.serialize import (
    DTYPE_TO_PROTO,
    byte_view,
    host_array,
    wire_array,
    wire_dtype,
)
from gradmesh.v1 import shard_pb2, tensor_pb2, worker_pb2

from .stream import MAX_CHUNK_BYTES, BufferPool, tensor_buffer

__all__ = [
    "encode_chunk_frame",
    "chunk_frames",
    "decode_stream_frame",
    "serialize_message",
    "encode_tensor_field",
    "field_number",
    "ChunkFrame",
    "ChunkView",
    "FrameDecoder",
    "frame_decoder",
    "STREAM_FRAME_CHUNK_FIELD",
    "SHARD_FRAME_CHUNK_FIELD",
]

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


_VARINT, _LEN = 0, 2  # protobuf's wire types


def field_number(message_cls, name: str) -> int:
    """The number of field ``name`` of a generated message class."""
    return message_cls.DESCRIPTOR.fields_by_name[name].number


def _key(message_cls, name: str, wire_type: int) -> bytes:
    """The key protobuf writes before field ``name`` of ``message_cls``."""
    return _varint(field_number(message_cls, name) << 3 | wire_type)


# The field number of ``Chunk chunk`` in each frame message.
STREAM_FRAME_CHUNK_FIELD = field_number(worker_pb2.StreamFrame, "chunk")
SHARD_FRAME_CHUNK_FIELD = field_number(shard_pb2.ShardFrame, "chunk")

_CHUNK_INDEX = _key(tensor_pb2.Chunk, "tensor_index", _VARINT)
_CHUNK_OFFSET = _key(tensor_pb2.Chunk, "offset", _VARINT)
_CHUNK_DATA = _key(tensor_pb2.Chunk, "data", _LEN)
_TENSOR_DTYPE = _key(tensor_pb2.Tensor, "dtype", _VARINT)
_TENSOR_SHAPE = _key(tensor_pb2.Tensor, "shape", _LEN)  # packed
_TENSOR_DATA = _key(tensor_pb2.Tensor, "data", _LEN)
_NAMED_NAME = _key(tensor_pb2.NamedTensor, "name", _LEN)
_NAMED_TENSOR = _key(tensor_pb2.NamedTensor, "tensor", _LEN)
# The same keys as ints, as _read_varint returns them.
_INDEX_KEY = field_number(tensor_pb2.Chunk, "tensor_index") << 3 | _VARINT
_OFFSET_KEY = field_number(tensor_pb2.Chunk, "offset") << 3 | _VARINT
_DATA_KEY = field_number(tensor_pb2.Chunk, "data") << 3 | _LEN

# Staging buffers of strided tensors' chunks (``chunk_frames``), reused: a fresh one would
# be fresh pages for the kernel to zero, for every tensor sent.
_STAGES = BufferPool(4 * MAX_CHUNK_BYTES, min_bytes=64 << 10)


def _chunk_tag(field: int) -> bytes:
    """The key of a length-delimited field ``field``: what a chunk frame starts with."""
    if field < 1:
        raise ValueError(f"a field number is >= 1, got {field}")
    return _varint(field << 3 | _LEN)


def encode_chunk_frame(
    index: int, offset: int, data, field: int = STREAM_FRAME_CHUNK_FIELD
) -> bytes:
    """A frame holding only ``chunk: Chunk{tensor_index, offset, data}`` as field number
    ``field`` (``StreamFrame``'s 3 by default; ``ShardFrame``'s is 4), serialized exactly
    as protobuf writes it (default-valued fields omitted), copying ``data`` (any buffer,
    e.g. a memoryview slice of an array) once."""
    n = len(data)
    head = (
        (_CHUNK_INDEX + _varint(index) if index else b"")
        + (_CHUNK_OFFSET + _varint(offset) if offset else b"")
        + (_CHUNK_DATA + _varint(n) if n else b"")
    )
    return b"".join((_chunk_tag(field), _varint(len(head) + n), head, data))


def chunk_frames(
    arrays: Iterable, chunk_bytes: int, start: int = 0, field: int = STREAM_FRAME_CHUNK_FIELD
) -> Iterator[bytes]:
    """Encoded chunk frames of ``arrays`` (header order, see tensor.proto's Chunk): each
    frame reads its piece straight from the array's memory (a strided array's, e.g. a
    broadcast gradient's, through a small staging buffer instead of a contiguous copy of
    the whole array). ``start`` is the header index of the first array (to send a
    message's tensors a few at a time); ``field`` the frame message's chunk field number
    (see :func:`encode_chunk_frame`)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    _chunk_tag(field)  # a bad field number fails here, not mid-stream
    for index, array in enumerate(arrays, start):
        view = array
        if not isinstance(array, memoryview):
            a, dtype = _wire_array_view(array)
            wire = wire_dtype(dtype)
            flat = _flat_view(a, wire) if a.size and chunk_bytes % a.itemsize == 0 else None
            if flat is not None:
                yield from _staged_frames(index, flat, wire, chunk_bytes, field)
                continue
            view = tensor_buffer(a)
        for offset in range(0, view.nbytes, chunk_bytes):
            yield encode_chunk_frame(index, offset, view[offset : offset + chunk_bytes], field)


def _wire_array_view(x) -> tuple[np.ndarray, dtypes.DType]:
    """Like ``_wire_array`` but never copies a NumPy array: the host array as it is."""
    a = host_array(x)
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


def _staged_frames(
    index: int, flat: np.ndarray, wire: np.dtype, chunk_bytes: int, field: int
) -> Iterator[bytes]:
    """Chunk frames of a strided 1-D view, each piece gathered into a small staging buffer
    first: the same frames as materializing the whole array, without allocating (and the
    kernel zeroing) a second array of its size."""
    per_chunk = chunk_bytes // flat.itemsize
    n = min(per_chunk, flat.size)
    stage = _STAGES.allocate(n * flat.itemsize).view(wire)
    raw = byte_view(stage)
    if not flat.strides[0]:
        stage[...] = flat[:n]  # a broadcast scalar: every piece is the same
    for start in range(0, flat.size, per_chunk):
        piece = flat[start : start + per_chunk]
        if flat.strides[0]:
            np.copyto(stage[: piece.size], piece)
        yield encode_chunk_frame(index, start * flat.itemsize, raw[: piece.nbytes], field)


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
    if buf[: len(tag)] != tag:
        return None
    size, pos = _read_varint(buf, len(tag), len(buf))
    end = pos + size
    if end != len(buf):
        return None  # a second field after the chunk: let protobuf merge
    index = offset = 0
    data = memoryview(b"")
    seen = set()
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        if key in seen:
            return None  # repeated field: protobuf's last-wins, leave it to it
        seen.add(key)
        if key == _INDEX_KEY:
            index, pos = _read_varint(buf, pos, end)
        elif key == _OFFSET_KEY:
            offset, pos = _read_varint(buf, pos, end)
        elif key == _DATA_KEY:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise ValueError("truncated data")
            data = memoryview(buf)[pos : pos + n]
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
        return None  # protobuf decides (and names the error)


_STREAM_FRAME_TAG = _chunk_tag(STREAM_FRAME_CHUNK_FIELD)


def decode_stream_frame(buf: bytes):
    """gRPC deserializer for ``StreamFrame``: a chunk frame as a :class:`ChunkFrame` whose
    data is a view of ``buf`` (no copy); any other frame, or an encoding the fast path does
    not expect, by protobuf, so every valid message means what protobuf says it means."""
    frame = _fast_chunk_frame(buf, _STREAM_FRAME_TAG)
    if frame is not None:
        return frame
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
        if (
            fd is None
            or fd.name != "chunk"
            or fd.containing_oneof is None
            or fd.message_type is None
            or fd.message_type.full_name != tensor_pb2.Chunk.DESCRIPTOR.full_name
        ):
            raise ValueError(
                f"field {chunk_field} of {frame_cls.DESCRIPTOR.full_name} is "
                f"not a oneof member `Chunk chunk`"
            )
        self.frame_cls = frame_cls
        self.DESCRIPTOR = frame_cls.DESCRIPTOR  # noqa: N815  (protobuf's spelling)
        self._tag = _chunk_tag(chunk_field)

    def decode(self, buf: bytes):
        """A chunk frame as a :class:`ChunkFrame` whose data is a view of ``buf``; any other
        frame by protobuf (which raises ``DecodeError`` for bytes that are no frame)."""
        frame = _fast_chunk_frame(buf, self._tag)
        if frame is not None:
            return frame
        return self.frame_cls.FromString(buf)


def frame_decoder(
    frame_cls, chunk_field: int = STREAM_FRAME_CHUNK_FIELD
) -> Callable[[bytes], object]:
    """gRPC deserializer for ``frame_cls`` whose chunk is field ``chunk_field`` (e.g.
    ``frame_decoder(shard_pb2.ShardFrame, SHARD_FRAME_CHUNK_FIELD)``); see
    :class:`FrameDecoder`."""
    return FrameDecoder(frame_cls, chunk_field).decode


def _tensor_body(wire_type: int, shape: Sequence[int], nbytes: int) -> bytes:
    """A Tensor message's bytes up to its data's payload (dtype, packed shape, data tag)."""
    head = _TENSOR_DTYPE + _varint(wire_type) if wire_type else b""
    if shape:
        dims = b"".join(_varint(int(s)) for s in shape)
        head += _TENSOR_SHAPE + _varint(len(dims)) + dims
    if nbytes:
        head += _TENSOR_DATA + _varint(nbytes)
    return head


def encode_tensor_field(field: int, x, name: str | None = None) -> list:
    """The pieces (bytes and one memoryview of ``x``'s memory) of one occurrence of a
    ``Tensor`` field, or of a ``NamedTensor`` field when ``name`` is given, numbered
    ``field`` in the enclosing message: ``b"".join`` of the pieces is exactly what
    protobuf writes for ``to_proto(x)`` (wrapped in ``NamedTensor(name=name, tensor=...)``),
    and joining copies the array's bytes once."""
    a, dtype = wire_array(x)
    data = byte_view(a)
    body = _tensor_body(DTYPE_TO_PROTO[dtype], a.shape, len(data))
    tensor_len = len(body) + len(data)
    if name is None:
        return [_varint(field << 3 | _LEN) + _varint(tensor_len) + body, data]
    name_b = name.encode()
    named = (
        (_NAMED_NAME + _varint(len(name_b)) + name_b if name_b else b"")
        + _NAMED_TENSOR
        + _varint(tensor_len)
    )
    return [_varint(field << 3 | _LEN) + _varint(len(named) + tensor_len) + named + body, data]
