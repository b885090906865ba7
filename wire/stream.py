"""Large messages over a streaming RPC: a header, then the tensors' bytes in chunks.

``split_for_stream`` turns a message into a header whose tensors carry dtype and shape but
no data, plus one buffer per tensor in header order; ``chunks`` cuts those buffers into
``Chunk`` messages; on the receiving side an ``Assembler`` preallocates every tensor from
the header (after checking the limits) and fills it in place chunk by chunk. Receivers
that stream large tensors again and again take those buffers from a ``BufferPool``, which
reuses memory once nothing refers to it any more. (The frames themselves have a codec of
their own that copies each chunk once: :mod:`gradmesh.wire.frames`.)
"""

from __future__ import annotations

import collections
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from gradmesh.core import dtypes
from gradmesh.core.serialize import (
    RESOURCE_EXHAUSTED,
    WireError,
    byte_view,
    check_header,
    decode,
    wire_array,
)
from gradmesh.v1 import tensor_pb2

__all__ = [
    "split_for_stream",
    "chunks",
    "tensor_buffer",
    "Assembler",
    "StreamSlot",
    "BufferPool",
    "DEFAULT_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "FRAME_OVERHEAD_BYTES",
    "chunk_for",
]

MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 4 << 20
# Room in a stream message beside its chunk's bytes (frame fields, tags, lengths).
FRAME_OVERHEAD_BYTES = 4096


def chunk_for(max_message_bytes: int, chunk_bytes: int = MAX_CHUNK_BYTES) -> int:
    """The largest chunk up to ``chunk_bytes`` whose stream message fits
    ``max_message_bytes`` (a peer's limit)."""
    return max(1, min(chunk_bytes, max_message_bytes - FRAME_OVERHEAD_BYTES))


DEFAULT_CHUNK_BYTES = 2 << 20


def tensor_buffer(x) -> memoryview:
    """The wire bytes of an array as a memoryview: no copy for a little-endian, C-contiguous
    NumPy array (a CuPy array is copied to the host once)."""
    a, _ = wire_array(x)
    return byte_view(a)


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
        raise TypeError(
            f"{message.DESCRIPTOR.name} has no field(s) {sorted(set(tensor_fields) - known)}"
        )
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


def split_for_stream(
    message, tensor_fields: Sequence[str] | None = None
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
        items = (
            list(getattr(message, fd.name))
            if _is_repeated(fd)
            else ([getattr(message, fd.name)] if message.HasField(fd.name) else [])
        )
        for item in items:
            t = item.tensor if fd.message_type.full_name == named else item
            target = getattr(header, fd.name)
            if fd.message_type.full_name == named:
                dst = target.add() if _is_repeated(fd) else target
                dst.name = item.name
                dst_t = dst.tensor
            else:
                dst_t = target.add() if _is_repeated(fd) else target
            dst_t.dtype = t.dtype
            dst_t.shape.extend(t.shape)
            if fd.message_type.full_name == named and not item.HasField("tensor"):
                dst.ClearField("tensor")
            buffers.append(memoryview(t.data))
    return header, buffers


def chunks(buffers: Iterable, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tensor_pb2.Chunk]:
    """Cut each buffer (bytes, memoryview or array) into ``Chunk`` messages of at most
    ``chunk_bytes``; a buffer of zero bytes yields no chunk."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    for index, buf in enumerate(buffers):
        mv = (
            buf
            if isinstance(buf, memoryview)
            else (
                tensor_buffer(buf) if not isinstance(buf, (bytes, bytearray)) else memoryview(buf)
            )
        )
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        for offset in range(0, mv.nbytes, chunk_bytes):
            # protobuf takes only bytes: one copy of each piece.
            yield tensor_pb2.Chunk(
                tensor_index=index, offset=offset, data=bytes(mv[offset : offset + chunk_bytes])
            )


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
        self._idle: list[np.ndarray] = []  # least recently freed first
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
                    self._idle.clear()  # idle memory first, then try once more
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


@dataclass
class StreamSlot:
    """One streamed tensor: where it sits in the header and what it holds."""

    path: str  # e.g. "parameters[w1]"; errors name f"{path}.data"
    field: str  # the top-level field, e.g. "parameters"
    name: str | None  # the NamedTensor's name, None for a bare Tensor
    dtype: dtypes.DType
    shape: tuple
    nbytes: int


class Assembler:
    """Rebuild a streamed message's tensors from its header and its chunks.

    >>> import numpy as np
    >>> from gradmesh.v1 import worker_pb2
    >>> req = worker_pb2.ComputeGradientsRequest(graph_id="g")
    >>> from gradmesh.core.serialize import to_proto
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

    def __init__(
        self,
        header,
        max_total_bytes: int,
        *,
        tensor_fields: Sequence[str] | None = None,
        max_elements: int | None = None,
        allocate: Callable[[int], np.ndarray] | None = None,
    ):
        """``allocate(nbytes)``, if given, supplies each tensor's uint8 buffer (e.g.
        :meth:`BufferPool.allocate`, to reuse memory across streams); default ``np.empty``."""
        self.header = header
        self._fields = _tensor_fields(header, tensor_fields)
        self.slots: list[StreamSlot] = []
        total = 0
        for path, name, t, _holder in _walk(header, self._fields):
            if len(t.data):
                raise WireError(
                    f"{path}.data", "a streamed header must not carry data; send it in chunks"
                )
            dtype, shape, nbytes = check_header(t, field=path, max_elements=max_elements)
            total += nbytes
            if total > max_total_bytes:
                raise WireError(
                    f"{path}.shape",
                    f"the streamed tensors need more than {max_total_bytes} bytes in all",
                    RESOURCE_EXHAUSTED,
                )
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
                raise WireError(
                    f"{s.path}.shape",
                    f"cannot allocate {s.nbytes} bytes for "
                    f"this tensor now ({total} bytes in all); send less",
                    RESOURCE_EXHAUSTED,
                ) from None
        self._views = [memoryview(b) for b in self._buffers]
        self._filled = [0] * len(self.slots)
        self._current = 0
        self._arrays: list[np.ndarray] | None = None
        self._skip_empty()

    def _skip_empty(self) -> None:
        while (
            self._current < len(self.slots)
            and self._filled[self._current] == self.slots[self._current].nbytes
        ):
            self._current += 1

    def add(self, chunk) -> None:
        """Copy one chunk (a ``Chunk`` message or a :class:`ChunkView`) into its tensor, the
        one copy of its bytes on this side; raises ``WireError`` (field ``chunk``) for an
        unknown tensor index, a chunk out of order or past the tensor's end."""
        i = chunk.tensor_index
        if i >= len(self.slots):
            raise WireError(
                "chunk.tensor_index", f"is {i} but the header has {len(self.slots)} tensors"
            )
        slot = self.slots[i]
        if i != self._current:
            expected = (
                f"tensor {self._current} ({self.slots[self._current].path})"
                if self._current < len(self.slots)
                else "no more chunks"
            )
            raise WireError(
                "chunk.tensor_index",
                f"chunk for tensor {i} ({slot.path}) out of order; expected {expected}",
            )
        data = chunk.data
        if chunk.offset != self._filled[i]:
            raise WireError(
                "chunk.offset",
                f"{slot.path}: got offset {chunk.offset}, expected "
                f"{self._filled[i]} (chunks must be contiguous and in order)",
            )
        end = chunk.offset + len(data)
        if end > slot.nbytes:
            raise WireError(
                "chunk.data",
                f"{slot.path}: chunk ends at byte {end}, past the tensor's {slot.nbytes} bytes",
            )
        if not data:
            raise WireError("chunk.data", f"{slot.path}: empty chunk")
        self._views[i][chunk.offset : end] = data
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
            raise WireError(
                f"{slot.path}.data",
                f"stream ended after {self._filled[self._current]} of {slot.nbytes} bytes",
            )
        if self._arrays is None:
            self._arrays = [
                decode(buf, s.dtype, s.shape, s.path) for buf, s in zip(self._buffers, self.slots)
            ]
            self._buffers, self._views = [], []  # the arrays own the memory now
        return list(self._arrays)

    def finish_message(self):
        """The header with each tensor's data filled in (copies the bytes once more)."""
        arrays = self.finish()
        for (_path, _name, t, _h), a in zip(_walk(self.header, self._fields), arrays):
            if a.size:
                t.data = a.tobytes()
        return self.header
