"""Calls to the Worker service (worker.proto): requests, replies and how tensors travel.

The transport policy is written once, in :class:`WorkerTransport`, the base class of
every caller of a worker (the SDK's ``WorkerClient`` and the coordinator's worker
handles): tensors go through shared memory when the worker is on this host and takes them
(:mod:`.sharedmem`), else in one unary message when they fit, else over the streaming RPC
(:mod:`.stream`, :mod:`.frames`). A worker that refuses shared memory (another host,
container or user; no memory for a segment) gets bytes from then on; one that no longer
knows the graph (NOT_FOUND: it restarted or evicted it) gets the graph again, once, by
whichever path the call took.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import grpc
import numpy as np

from gradmesh.core.serialize import PROTO_TO_DTYPE, byte_view, from_proto, to_proto
from gradmesh.core.sharedmem import Segment, SegmentError, locate
from gradmesh.v1 import graph_pb2, tensor_pb2, worker_pb2, worker_pb2_grpc

from .errors import GradmeshError, NotFound
from .frames import (
    chunk_frames,
    decode_stream_frame,
    encode_tensor_field,
    field_number,
    serialize_message,
)
from .sharedmem import Pool, place, same_host_target
from .stream import Assembler, BufferPool, chunk_for

__all__ = [
    "Reply",
    "Request",
    "WorkerTransport",
    "read_reply",
    "shared_request",
    "shared_gradients",
    "decode_reply",
    "data_names",
    "shared_memory_refused",
    "SHARED",
    "UNARY",
    "STREAM",
    "SERVICE_NAME",
]

# Streamed replies are assembled in memory reused once the caller has dropped the arrays
# of earlier replies (fresh pages cost the kernel more than gRPC costs the bytes); shared
# by every caller of a worker in the process, at most this much kept idle.
REPLY_POOL_BYTES = 512 << 20
_reply_buffers = BufferPool(REPLY_POOL_BYTES)
# Bounds of the caches of what repeats call after call (tensor headers of replies, the
# requests of segment pairs): past it a cache is cleared and fills again.
HEADER_CACHE_ENTRIES = 1024
SEGMENT_PAIRS_CACHED = 16
_LITTLE = sys.byteorder == "little"

# How a call's tensors travel (WorkerTransport._transport).
SHARED, UNARY, STREAM = "shared", "unary", "stream"

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
_COMPUTE = f"/{SERVICE_NAME}/ComputeGradients"
_COMPUTE_STREAM = f"/{SERVICE_NAME}/ComputeGradientsStream"
_PARAMETERS = field_number(worker_pb2.ComputeGradientsRequest, "parameters")
_DATA = field_number(worker_pb2.ComputeGradientsRequest, "data")


@dataclass
class Reply:
    """A decoded ComputeGradients reply: arrays by name, the worker's timings, the id
    it knows the graph by, and the new values of the buffers the graph updates."""

    loss: np.ndarray
    outputs: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)
    graph_id: str = ""
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    # Requested parameters the loss does not depend on (their gradients are zeros; torch
    # gives None): ComputeGradientsResponse.unused_parameters.
    unused: tuple[str, ...] = ()
    # A compressed reply (ComputeGradientsRequest.compression): int32 words per parameter
    # in the encoding ``compression`` names (:mod:`.compression`); those parameters are
    # not in ``gradients``.
    compressed: dict[str, np.ndarray] = field(default_factory=dict)
    compression: str = ""

    @property
    def compute_seconds(self) -> float:
        """The worker's forward + backward."""
        return self.timings.get("forward_seconds", 0.0) + self.timings.get("backward_seconds", 0.0)


# ------------------------------------------------------------------ requests -------------


class Request:
    """Everything a ComputeGradients request holds but the tensors' bytes, for one graph,
    signature (names, shapes, dtypes) and set of options: the same from step to step, so
    a caller keeps it instead of building it every call."""

    __slots__ = (
        "head",
        "tail",
        "data_names",
        "wanted",
        "param_bytes",
        "data_bytes",
        "unary",
        "shared",
    )

    def __init__(
        self,
        head: bytes,
        tail: bytes,
        data_names: list[str],
        wanted: list[str],
        param_bytes: int,
        data_bytes: int,
    ):
        self.head = head  # graph id: the tensors go between head and tail
        self.tail = tail  # gradients, outputs, loss scale, seed
        self.data_names = data_names
        self.wanted = wanted  # gradients asked for ([]: all)
        self.param_bytes = param_bytes
        self.data_bytes = data_bytes
        # (bytes before the tensor's data, wire dtype) per tensor: built on first unary use.
        self.unary: list[tuple[bytes, np.dtype]] | None = None
        # (segment, gradient segment) -> the whole request: segments come back from the
        # pool call after call, so the same few names (and offsets) repeat.
        self.shared: dict[tuple, bytes] = {}

    @classmethod
    def build(
        cls,
        graph_id: str,
        wanted: list[str],
        outputs: list[str],
        loss_scale,
        seed,
        data_names: list[str],
        param_bytes: int,
        data_bytes: int,
    ) -> "Request":
        head = worker_pb2.ComputeGradientsRequest(graph_id=graph_id).SerializeToString()
        tail = worker_pb2.ComputeGradientsRequest(
            gradients=wanted, outputs=outputs, loss_scale=loss_scale, seed=seed
        ).SerializeToString()
        return cls(head, tail, data_names, wanted, param_bytes, data_bytes)

    def unary_request(self, params, data) -> bytes:
        """The request with the tensors' bytes in it (the one copy before gRPC's own)."""
        headers = self.unary
        if headers is None:
            headers = [
                (encode_tensor_field(number, a, n)[0], a.dtype.newbyteorder("<"))
                for number, pairs in ((_PARAMETERS, params), (_DATA, data))
                for n, a in pairs
            ]
            self.unary = headers
        pieces: list[bytes | memoryview] = [self.head]
        append = pieces.append
        for (header, wire), (_, a) in zip(headers, itertools.chain(params, data)):
            append(header)
            # No copy for an array already little-endian and C-contiguous.
            a = np.asarray(a, dtype=wire, order="C")
            append(byte_view(a))
        append(self.tail)
        return b"".join(pieces)

    def header(self) -> worker_pb2.ComputeGradientsRequest:
        """The request without tensors, as a message (a stream's header)."""
        return worker_pb2.ComputeGradientsRequest.FromString(self.head + self.tail)


def data_names(graph: graph_pb2.Graph, n: int) -> list[str]:
    """The names of the graph's DATA inputs, checked to be ``n``."""
    names = [i.name for i in graph.inputs if i.role == graph_pb2.Input.DATA]
    if len(names) != n:
        raise TypeError(f"the graph takes {len(names)} data inputs {names}, got {n}")
    return names


def _headers(arrays) -> list[tensor_pb2.NamedTensor]:
    return [
        tensor_pb2.NamedTensor(name=n, tensor=to_proto(a, data=False))
        for n, a in (arrays or {}).items()
    ]


def shared_request(
    params: dict[str, np.ndarray],
    segment: Segment,
    offsets: dict[str, int],
    gradient_segment: Segment,
    gradient_offsets: dict[str, int],
    data: dict[str, np.ndarray] | None = None,
    data_offsets: dict[str, int] | None = None,
    parameter_segment: str = "",
) -> worker_pb2.ComputeGradientsRequest:
    """The tensors' headers (no bytes) and the ``SharedMemory`` of a request whose
    parameters (and ``data``, if given) are in ``segment`` (the parameters in the segment
    named ``parameter_segment`` instead, if given) and whose gradients go to
    ``gradient_segment``."""
    return worker_pb2.ComputeGradientsRequest(
        parameters=_headers(params),
        data=_headers(data),
        shared_memory=worker_pb2.SharedMemory(
            segment=segment.name,
            parameter_offsets=offsets,
            data_offsets=data_offsets,
            gradient_segment=gradient_segment.name,
            gradient_offsets=gradient_offsets,
            parameter_segment=parameter_segment,
        ),
    )


def _located(params: dict[str, np.ndarray]) -> tuple[str, tuple] | None:
    """``(segment name, ((parameter, offset), ...))`` when every parameter lives in the same
    shared-memory segment (``Tensor.share_memory_``), else None."""
    where = [locate(a) for a in params.values()]
    found = [w for w in where if w is not None]
    if not found or len(found) != len(where) or len({name for name, _ in found}) != 1:
        return None
    return found[0][0], tuple((n, offset) for n, (_, offset) in zip(params, found))


# ------------------------------------------------------------------ replies --------------


def read_reply(replies: Iterator, fail: Callable[[str], Exception]) -> tuple:
    """A ``ComputeGradientsStream`` reply: ``(header, arrays, timed)`` with the header's
    response, its tensors in header order (assembled as chunks arrive, so receiving
    overlaps the worker's backward, in memory of earlier replies when it is free), and the
    response holding the timings (an early stream's trailing frame, else the header).
    Protocol errors raise ``fail(message)``."""
    first = next(replies, None)
    if first is None or first.WhichOneof("kind") != "response":
        raise fail("the worker's reply did not start with a response header")
    header = first.response
    assembler = Assembler(
        header,
        1 << 62,
        tensor_fields=("loss", "outputs", "gradients", "buffers", "compressed_gradients"),
        allocate=_reply_buffers.allocate,
    )
    timed = header
    for frame in replies:
        if frame.WhichOneof("kind") == "chunk":
            assembler.add(frame.chunk)
        elif assembler.done and timed is header:
            timed = frame.response  # the trailing timings of an early stream
        else:
            raise fail("the worker sent a second header in its reply")
    return header, assembler.finish(), timed


def shared_gradients(
    resp: worker_pb2.ComputeGradientsResponse, buf: np.ndarray, offsets: dict[str, int]
) -> dict[str, np.ndarray]:
    """The gradients a worker wrote into the segment ``buf`` (uint8) views, as views
    (checked against the response's dtypes and shapes and the segment's bounds)."""
    if not resp.gradients_in_shared_memory:
        raise SegmentError(
            "the worker did not write the gradients to shared memory (a worker that predates it?)"
        )
    out = {}
    size = buf.nbytes
    for nt in resp.gradients:
        # A gradient's header (name, dtype, shape: a few bytes) is the same call after
        # call: parsed and checked once, then looked up by its bytes.
        key = nt.SerializeToString()
        hit = _gradient_headers.get(key)
        if hit is None:
            hit = _gradient_header(nt)
            if len(key) <= 1024:
                if len(_gradient_headers) >= HEADER_CACHE_ENTRIES:
                    _gradient_headers.clear()
                _gradient_headers[key] = hit
        name, dtype, shape, nbytes = hit
        offset = offsets.get(name)
        if offset is None or dtype is None or offset + nbytes > size or nbytes < 0:
            raise SegmentError(f"the worker's gradient {name!r} does not fit what was asked for")
        out[name] = np.ndarray(shape, dtype, buf, offset)
    return out


def _gradient_header(nt: tensor_pb2.NamedTensor) -> tuple:
    """(name, NumPy dtype or None when unknown, shape, byte size) of a gradient's header."""
    dtype = PROTO_TO_DTYPE.get(nt.tensor.dtype)
    shape = tuple(nt.tensor.shape)
    return (
        nt.name,
        dtype.np if dtype else None,
        shape,
        dtype.np.itemsize * math.prod(shape) if dtype else -1,
    )


_gradient_headers: dict[bytes, tuple] = {}


def _timings(resp: worker_pb2.ComputeGradientsResponse) -> dict[str, float]:
    t = resp.timings
    return {
        "decode_seconds": t.decode_seconds,
        "forward_seconds": t.forward_seconds,
        "backward_seconds": t.backward_seconds,
        "encode_seconds": t.encode_seconds,
        "plan_cached": float(t.plan_cached),
    }


def _decode(t: tensor_pb2.Tensor, field: str, name: str | None = None) -> np.ndarray:
    """``from_proto`` (a read-only view of the message's bytes), with the checks of a
    (dtype, shape) that passed them once reduced to the byte count."""
    shape = tuple(t.shape)
    key = (t.dtype, shape)
    hit = _reply_headers.get(key)
    data = t.data
    if hit is None or len(data) != hit[1]:
        # The full checks (and errors naming the field), and bool's 0/1 check every time.
        a = from_proto(t, field=field if name is None else f"{field}[{name}]")
        if _LITTLE and a.dtype != np.bool_:  # else a conversion, or values to check
            if len(_reply_headers) >= HEADER_CACHE_ENTRIES:
                _reply_headers.clear()
            _reply_headers[key] = (a.dtype, len(data))
        return a
    return np.ndarray(shape, hit[0], data)  # what from_proto returns, in one step


_reply_headers: dict[tuple[int, tuple], tuple[np.dtype, int]] = {}


def decode_reply(resp: worker_pb2.ComputeGradientsResponse) -> Reply:
    """A unary reply's arrays (read-only views of its bytes; no gradients when the worker
    wrote them to shared memory)."""
    return Reply(
        _decode(resp.loss, "loss"),
        {nt.name: _decode(nt.tensor, "outputs", nt.name) for nt in resp.outputs},
        {}
        if resp.gradients_in_shared_memory
        else {nt.name: _decode(nt.tensor, "gradients", nt.name) for nt in resp.gradients},
        _timings(resp),
        resp.graph_id,
        {nt.name: _decode(nt.tensor, "buffers", nt.name) for nt in resp.buffers},
        tuple(resp.unused_parameters),
        {
            nt.name: _decode(nt.tensor, "compressed_gradients", nt.name)
            for nt in resp.compressed_gradients
        },
        resp.compression,
    )


_SEGMENT_FIELDS = (
    "shared_memory.segment",
    "shared_memory.parameter_segment",
    "shared_memory.gradient_segment",
)


def shared_memory_refused(e: Exception) -> bool:
    """Whether a failed call says the worker cannot take this caller's segments: a
    FAILED_PRECONDITION about shared memory, or an INVALID_ARGUMENT about a segment's
    name (a worker of an earlier version, which knows only names of files in /dev/shm;
    this client never sends a malformed name)."""
    if isinstance(e, SegmentError):
        return True
    if not isinstance(e, GradmeshError):
        return False
    field = e.field or ""
    return (
        e.code == grpc.StatusCode.FAILED_PRECONDITION and field.startswith("shared_memory")
    ) or (e.code == grpc.StatusCode.INVALID_ARGUMENT and field in _SEGMENT_FIELDS)


# ------------------------------------------------------------------ the transport --------


class WorkerTransport:
    """How ComputeGradients calls reach one worker (``target`` over ``channel``): the base
    class of the SDK's ``WorkerClient`` and of the coordinator's worker handles.

    ``segments``: the caller's shared-memory pool, or None for bytes only (shared memory
    is tried only with a worker on this host); ``chunk_bytes``: chunk size of streamed
    requests. Each ``_send_*`` method makes one call and raises ``grpc.RpcError`` or
    ``SegmentError``; :meth:`_transport` is the policy over them.
    """

    def __init__(
        self, channel: grpc.Channel, target: str, *, segments: Pool | None, chunk_bytes: int
    ):
        self.target = target
        self.chunk_bytes = chunk_bytes
        self.stub = worker_pb2_grpc.WorkerStub(channel)
        # Tensors travel as pre-encoded bytes (encode_tensor_field and the frame codec):
        # protobuf objects would copy every tensor several times.
        self._unary_call = channel.unary_unary(
            _COMPUTE,
            request_serializer=serialize_message,
            response_deserializer=worker_pb2.ComputeGradientsResponse.FromString,
            _registered_method=True,
        )
        self._stream_call = channel.stream_stream(
            _COMPUTE_STREAM,
            request_serializer=serialize_message,
            response_deserializer=decode_stream_frame,
            _registered_method=True,
        )
        self.segments = segments if segments is not None and same_host_target(target) else None
        # None: not known yet (ask Capabilities); then True or False for good.
        self._shared: bool | None = None if self.segments is not None else False

    def fit_limits(self, limits: worker_pb2.Limits) -> None:
        """Fit this transport to the worker's limits (its Capabilities): stream chunks
        whose messages its ``max_message_bytes`` accepts."""
        if limits.max_message_bytes:
            self.chunk_bytes = chunk_for(int(limits.max_message_bytes), self.chunk_bytes)

    def _takes_shared_memory(self, ask: Callable[[], bool]) -> bool:
        """Whether to use shared memory; ``ask()`` (the worker's Capabilities) decides the
        first time it answers (a failing ``ask`` means bytes for this call only)."""
        if self._shared is None:
            try:
                self._shared = bool(ask())
            except (GradmeshError, grpc.RpcError):
                return False
        return self._shared

    def _transport(
        self,
        send: Callable[[str], Reply],
        mode: str,
        fallback: str,
        resend_graph: Callable[[], object] | None = None,
    ) -> tuple[Reply, str]:
        """The policy: ``send(mode)``; when shared memory is refused, ``send(fallback)`` and
        bytes from now on; on NOT_FOUND, ``resend_graph()`` and the call once more.
        ``send`` raises ``GradmeshError`` (or ``SegmentError``). Returns the reply and the
        mode it went by."""
        try:
            try:
                return send(mode), mode
            except (GradmeshError, SegmentError) as e:
                if mode != SHARED or not shared_memory_refused(e):
                    raise
                # The worker cannot use our segments (another host, container or user, or
                # shared memory off there), or no memory for one: bytes from now on.
                self._shared, mode = False, fallback
                return send(mode), mode
        except NotFound:
            if resend_graph is None:
                raise
            # The worker restarted or evicted the graph: send it again, once.
            resend_graph()
            return send(mode), mode

    def _send_unary(self, message, **kw) -> Reply:
        """One unary call (``message``: a request or its pre-encoded bytes)."""
        return decode_reply(self._unary_call(message, **kw))

    def _send_stream(
        self,
        header: worker_pb2.ComputeGradientsRequest,
        params: Iterable,
        data: Iterable,
        fail: Callable[[str], Exception],
        **kw,
    ) -> Reply:
        """One streamed call: ``header`` (no tensors) gets the headers of ``params`` and
        ``data`` ((name, array) pairs), whose bytes follow in chunk frames read straight
        from the arrays. A malformed reply raises ``fail(message)``."""
        params, data = list(params), list(data)
        # Gradients come as soon as backward finishes each (see worker.proto); a worker
        # that predates the flag answers the classic way, which read_reply also reads.
        header.stream_gradients_early = True
        header.parameters.extend(_headers(dict(params)))
        header.data.extend(_headers(dict(data)))
        arrays = [a for _, a in params] + [a for _, a in data]
        chunk_bytes = self.chunk_bytes

        def frames() -> Iterator[worker_pb2.StreamFrame | bytes]:
            yield worker_pb2.StreamFrame(request=header)
            yield from chunk_frames(arrays, chunk_bytes)

        resp, arrays_out, timed = read_reply(iter(self._stream_call(frames(), **kw)), fail)
        k, n_grads = len(resp.outputs), len(resp.gradients)
        outputs = {nt.name: a for nt, a in zip(resp.outputs, arrays_out[1 : 1 + k])}
        received = {
            nt.name: a for nt, a in zip(resp.gradients, arrays_out[1 + k : 1 + k + n_grads])
        }
        after = 1 + k + n_grads + len(resp.buffers)
        new_buffers = {nt.name: a for nt, a in zip(resp.buffers, arrays_out[1 + k + n_grads :])}
        compressed = {nt.name: a for nt, a in zip(resp.compressed_gradients, arrays_out[after:])}
        # In the order requested (the stream has them in the order backward made them).
        order = list(header.gradients) or [n for n, _ in params]
        grads = {n: received[n] for n in order if n in received}
        grads.update(received)
        unused = tuple(resp.unused_parameters) or tuple(timed.unused_parameters)
        return Reply(
            arrays_out[0],
            outputs,
            grads,
            _timings(timed),
            resp.graph_id,
            new_buffers,
            unused,
            compressed,
            resp.compression,
        )

    def _send_shared(
        self, message, gradient_segment: Segment, gradient_offsets: dict[str, int], **kw
    ) -> Reply:
        """One unary call whose gradients come back in ``gradient_segment``: views of it,
        which return it to the pool when the last is freed. A failed call's segment is
        dropped, not reused: a worker past its deadline may still be writing into it."""
        pool = self.segments
        assert pool is not None  # only called with shared memory on
        try:
            resp = self._unary_call(message, **kw)
            reply = decode_reply(resp)
            reply.gradients = shared_gradients(resp, pool.lend(gradient_segment), gradient_offsets)
        except BaseException:
            gradient_segment.close()
            raise
        return reply

    def _send_all_shared(self, request: Request, params, data, **kw) -> Reply:
        """One call with parameters, data and gradients in shared memory (parameters that
        already live there, ``Module.share_memory()``, are read where they are)."""
        pool = self.segments
        assert pool is not None  # only called with shared memory on
        by_name, data = dict(params), dict(data)
        where = _located(by_name)
        pseg, offsets = place(
            pool,
            {
                **({} if where else {("p", n): a for n, a in by_name.items()}),
                **{("d", n): a for n, a in data.items()},
            },
        )
        gseg, goffsets = place(
            pool, {n: by_name[n] for n in (request.wanted or by_name) if n in by_name}, write=False
        )
        done = False
        try:
            # The offsets follow from the signature, which the request is cached under: the
            # segments' names are all that can change.
            segments = (pseg.name, gseg.name, where)
            message = request.shared.get(segments)
            if message is None:
                req = shared_request(
                    by_name,
                    pseg,
                    dict(where[1]) if where else {n: offsets["p", n] for n in by_name},
                    gseg,
                    goffsets,
                    data,
                    {n: offsets["d", n] for n in data},
                    parameter_segment=where[0] if where else "",
                )
                message = request.head + req.SerializeToString() + request.tail
                if len(request.shared) >= SEGMENT_PAIRS_CACHED:
                    request.shared.clear()
                request.shared[segments] = message
            reply = self._send_shared(message, gseg, goffsets, **kw)
            done = True
            return reply
        finally:
            pool.release(pseg) if done else pseg.close()
