"""The worker client: gradients of a local model computed by a remote gradmesh worker.

>>> import gradmesh.core as gm
>>> from gradmesh.client import WorkerClient
>>> model = gm.nn.Sequential(gm.nn.Linear(4, 8), gm.nn.ReLU(), gm.nn.Linear(8, 2))
>>> def loss_fn(model, x, y):
...     return gm.nn.functional.cross_entropy(model(x), y)
>>> with WorkerClient("127.0.0.1:50051") as client:                # doctest: +SKIP
...     loss = client.backward(model, loss_fn, x, y)   # fills p.grad like loss.backward()
...     result = client.compute_gradients(loss_fn, model, x, y)
...     result.gradients["0.weight"]

The first call with a function traces it into a graph (for those parameter and data
shapes), registers it once, and from then on sends only the graph id and the tensors.
Requests over ``stream_threshold`` bytes go over the streaming RPC, transparently. A
worker on this host (127.0.0.1, localhost, a Unix socket) gets the parameters and writes
the gradients through shared memory instead (core/sharedmem.py), when it says it can.
"""
from __future__ import annotations

import itertools
import math
import random
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import grpc
import numpy as np

from gradmesh.client import errors
from gradmesh.client.channel import TLS, channel, metadata
from gradmesh.core import serialize, sharedmem
from gradmesh.core.tensor import Tensor
from gradmesh.v1 import graph_pb2, tensor_pb2, worker_pb2, worker_pb2_grpc

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
DEFAULT_STREAM_THRESHOLD = 32 * MiB
DEFAULT_CHUNK_BYTES = 1 * MiB
# Below this many parameter bytes, bytes in the message cost less than shared memory's
# extra bookkeeping (benchmarks/worker.py, the small model).
SHARED_MEMORY_MIN_BYTES = 256 << 10
# Streamed replies are assembled in memory reused once the caller has dropped the arrays
# of earlier replies (fresh pages cost the kernel more than gRPC costs the bytes); shared
# by every client of the process, the coordinator's worker calls included, at most this
# much kept idle.
REPLY_POOL_BYTES = 512 << 20
_reply_buffers = serialize.BufferPool(REPLY_POOL_BYTES)
# Bounds of the caches of what repeats call after call (request bytes per graph, shapes
# and options; tensor headers of replies): past it a cache is cleared and fills again.
REQUEST_CACHE_ENTRIES = 64
HEADER_CACHE_ENTRIES = 1024
SEGMENT_PAIRS_CACHED = 16
_LITTLE = sys.byteorder == "little"


@dataclass
class GradientResult:
    """What :meth:`WorkerClient.compute_gradients` returns.

    ``loss``: 0-d array (or Tensor with ``as_tensors=True``) after loss_scale;
    ``outputs``/``gradients``: name -> array, in the order requested; ``timings``:
    the worker's decode/forward/backward/encode seconds, ``plan_cached``, and the client's
    ``round_trip_seconds``.
    """
    loss: Any
    outputs: dict[str, Any]
    gradients: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    graph_id: str = ""


def _array(x) -> np.ndarray:
    """A host NumPy array for a NumPy array, gradmesh Tensor/Parameter or CuPy array."""
    if isinstance(x, Tensor):
        x = x._data
    if type(x) is np.ndarray:
        return x
    if not isinstance(x, np.ndarray):
        x = x.get() if type(x).__module__.startswith("cupy") else np.asarray(x)
    return x


def _named_params(params) -> list[tuple[str, Any]]:
    """(name, tensor) pairs of a Module (named_parameters order) or a mapping."""
    if type(params) is dict:        # the common case, before the slower checks
        return list(params.items())
    if hasattr(params, "named_parameters"):
        return list(params.named_parameters())
    if isinstance(params, Mapping):
        return list(params.items())
    raise TypeError(f"params must be a gradmesh Module or a dict of arrays/Tensors, got "
                    f"{type(params).__name__}")


def _signature(pairs, arrays) -> tuple:
    # dtype objects, not their .str (which builds a string each time): equal and hashed
    # alike exactly when the strings are.
    return (tuple([(n, a.shape, a.dtype) for n, a in pairs]),
            tuple([(a.shape, a.dtype) for a in arrays]))


class _Request:
    """Everything a ComputeGradients request holds but the tensors' bytes, for one graph,
    signature (names, shapes, dtypes) and set of options: the same from step to step, so
    each client keeps it (``WorkerClient._request``) instead of building it every call."""
    __slots__ = ("head", "tail", "data_names", "wanted", "param_bytes", "data_bytes",
                 "unary", "shared")

    def __init__(self, head: bytes, tail: bytes, data_names: list[str], wanted: list[str],
                 param_bytes: int, data_bytes: int):
        self.head = head                # field 1 (graph id): the tensors go between the two
        self.tail = tail                # fields 5-8
        self.data_names = data_names
        self.wanted = wanted            # gradients asked for ([]: all)
        self.param_bytes = param_bytes
        self.data_bytes = data_bytes
        # (bytes before the tensor's data, wire dtype) per tensor: built on first unary use.
        self.unary: list[tuple[bytes, np.dtype]] | None = None
        # (segment, gradient segment) -> the whole request: segments come back from the
        # pool call after call, so the same few names (and offsets) repeat.
        self.shared: dict[tuple[str, str], bytes] = {}

    def unary_request(self, params, data) -> bytes:
        """The request with the tensors' bytes in it (the one copy before gRPC's own)."""
        headers = self.unary
        if headers is None:
            headers = [(serialize.encode_tensor_field(field, a, n)[0],
                        a.dtype.newbyteorder("<"))
                       for field, pairs in ((3, params), (4, data)) for n, a in pairs]
            self.unary = headers
        pieces = [self.head]
        append = pieces.append
        for (header, wire), (_, a) in zip(headers, itertools.chain(params, data)):
            append(header)
            # No copy for an array already little-endian and C-contiguous.
            a = np.asarray(a, dtype=wire, order="C")
            append(memoryview(a).cast("B") if a.size else b"")
        append(self.tail)
        return b"".join(pieces)


class WorkerClient:
    """A connection to one gradmesh worker (a context manager; thread-safe).

    ``target``: "host:port"; ``token``: bearer token; ``tls``: None (plaintext), True
    (system roots), a :class:`TLS` or ``grpc.ChannelCredentials``; ``timeout``: deadline
    of each call in seconds; ``chunk_bytes``: chunk size of streamed requests (1-4 MiB);
    ``stream_threshold``: requests with more tensor bytes than this use the streaming
    RPC; ``retries``: attempts after UNAVAILABLE, with exponential backoff (every worker
    call is idempotent: the same inputs give the same outputs); ``shared_memory``: pass
    tensors through shared memory when the worker is on this host and takes it (checked
    once with Capabilities; any refusal falls back to bytes for good); parameter sets under
    ``shared_memory_min_bytes`` go as bytes even then.
    """

    def __init__(self, target: str, *, token: str | None = None, tls: Any = None,
                 timeout: float | None = 60.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 stream_threshold: int = DEFAULT_STREAM_THRESHOLD, retries: int = 4,
                 shared_memory: bool = True,
                 shared_memory_min_bytes: int = SHARED_MEMORY_MIN_BYTES,
                 options: Sequence[tuple[str, Any]] = ()):
        if not serialize.MIN_CHUNK_BYTES <= chunk_bytes <= serialize.MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be between {serialize.MIN_CHUNK_BYTES} and "
                             f"{serialize.MAX_CHUNK_BYTES}, got {chunk_bytes}")
        self.target = target
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.stream_threshold = min(stream_threshold, max_message_bytes - MiB)
        self.retries = retries
        self.channel = channel(target, tls=tls, max_message_bytes=max_message_bytes,
                               options=options)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        # Tensors travel as pre-encoded bytes (serialize.encode_tensor_field and the chunk
        # codec): protobuf objects would copy every tensor several times.
        self._unary_call = self.channel.unary_unary(
            "/gradmesh.v1.Worker/ComputeGradients",
            request_serializer=serialize.serialize_message,
            response_deserializer=worker_pb2.ComputeGradientsResponse.FromString,
            _registered_method=True)
        self._stream_call = self.channel.stream_stream(
            "/gradmesh.v1.Worker/ComputeGradientsStream",
            request_serializer=serialize_stream_frame,
            response_deserializer=decode_stream_frame, _registered_method=True)
        self._metadata = metadata(token)
        self._lock = threading.Lock()
        # fn -> {shapes signature: (graph, graph id)}; weak so that lambdas can be freed.
        self._traced: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()
        self._traced_strong: dict[Any, dict] = {}
        # (graph ids, signature, options) -> _Request.
        self._requests: dict[tuple, _Request] = {}
        # Graph id as computed here -> the worker's id (that of the canonical form).
        self._registered: dict[str, str] = {}
        # None: not decided yet (the first call asks Capabilities); then True or False.
        self._shared: bool | None = (None if shared_memory and sharedmem.available()
                                     and sharedmem.same_host_target(target) else False)
        self._segments = sharedmem.Pool()
        self.shared_memory_min_bytes = shared_memory_min_bytes

    # ------------------------------------------------------------------ lifecycle ----

    def close(self) -> None:
        self.channel.close()
        self._segments.close()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ calls --------

    def _call(self, method: str, fn: Callable[..., Any], timeout: float | None):
        """Run ``fn(timeout=, metadata=)``, retrying UNAVAILABLE; raise GradmeshError."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        for attempt in range(self.retries + 1):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return fn(timeout=left, metadata=self._metadata)
            except grpc.RpcError as e:
                retry = (e.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries
                         and (deadline is None or time.monotonic() + delay < deadline))
                if not retry:
                    raise errors.from_rpc_error(e, method) from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def capabilities(self, timeout: float | None = None) -> worker_pb2.CapabilitiesResponse:
        """The worker's ops, dtypes, backend, limits, versions and build fingerprint."""
        return self._call("Capabilities", lambda **kw: self.stub.Capabilities(
            worker_pb2.CapabilitiesRequest(), **kw), timeout)

    def register_graph(self, graph: graph_pb2.Graph, timeout: float | None = None) -> str:
        """Register ``graph`` with the worker; returns its id."""
        resp = self._call("RegisterGraph", lambda **kw: self.stub.RegisterGraph(
            worker_pb2.RegisterGraphRequest(graph=graph), **kw), timeout)
        from gradmesh.core import graph as core_graph
        with self._lock:
            self._registered[core_graph.graph_id(graph)] = resp.graph_id
        return resp.graph_id

    def trace(self, fn: Callable, params, *data) -> tuple[graph_pb2.Graph, str]:
        """The graph of ``fn(params, *data)`` for these shapes and dtypes (cached) and its id."""
        pairs = [(n, _array(p)) for n, p in _named_params(params)]
        return self._traced_graph(fn, params, data,
                                  _signature(pairs, [_array(d) for d in data]))

    def _traced_graph(self, fn, params, data, sig: tuple) -> tuple[graph_pb2.Graph, str]:
        try:
            cache = self._traced.setdefault(fn, {})
        except TypeError:       # not weak-referenceable (e.g. a functools.partial)
            cache = self._traced_strong.setdefault(fn, {})
        hit = cache.get(sig)
        if hit is None:
            from gradmesh.core import graph as core_graph
            try:
                graph = core_graph.trace(fn, params, *data)
            except core_graph.TraceError:
                # E.g. a flatten traced at batch size 1 cannot tell the batch from a 1:
                # a graph for exactly these shapes is still right (the cache is per shape).
                graph = core_graph.trace(fn, params, *data, batch_dim=False)
            hit = (graph, core_graph.graph_id(graph))
            cache[sig] = hit
        return hit

    def compute_gradients(self, fn_or_graph: Callable | graph_pb2.Graph, params,
                          *data, outputs: Sequence[str] = (),
                          gradients: Sequence[str] | None = None, loss_scale: float = 1.0,
                          seed: int = 0, as_tensors: bool = False,
                          timeout: float | None = None) -> GradientResult:
        """Loss, extra ``outputs`` and ``gradients`` of ``fn(params, *data)`` on the worker.

        ``fn_or_graph``: a Python function ``fn(model_or_params, *data)`` returning the
        scalar loss (traced on first use per parameter/data shapes, registered once) or a
        ``graph_pb2.Graph`` (registered once). ``params``: a Module
        or a dict name -> array/Tensor. ``data``: arrays/Tensors for the graph's DATA
        inputs, in order. ``gradients``: parameter names (default all).
        """
        param_arrays = [(n, _array(p)) for n, p in _named_params(params)]
        arrays = [_array(d) for d in data]
        sig = _signature(param_arrays, arrays)
        if isinstance(fn_or_graph, graph_pb2.Graph):
            from gradmesh.core import graph as core_graph
            graph, graph_id = fn_or_graph, core_graph.graph_id(fn_or_graph)
        elif callable(fn_or_graph):
            graph, graph_id = self._traced_graph(fn_or_graph, params, data, sig)
        else:
            raise TypeError("fn_or_graph must be a function or a graph_pb2.Graph")
        # The worker's id for the graph: ours, unless the graph was not canonical.
        worker_id = self._registered.get(graph_id) or self.register_graph(graph, timeout)

        request = self._request(graph, graph_id, worker_id, sig, gradients, outputs,
                                loss_scale, seed)
        data_arrays = list(zip(request.data_names, arrays))
        data_bytes = request.data_bytes
        total = request.param_bytes + data_bytes
        shared = (total - data_bytes >= self.shared_memory_min_bytes
                  and data_bytes < self.stream_threshold and self._use_shared_memory(timeout))
        streamed = not shared and total > self.stream_threshold

        def attempt(**kw):
            if streamed:
                return self._stream(request.head, request.tail, param_arrays, data_arrays,
                                    **kw)
            if shared:
                return self._shared_call(request, param_arrays, data_arrays, **kw)
            return _unary_result(self._unary_call(
                request.unary_request(param_arrays, data_arrays), **kw))

        start = time.perf_counter()
        try:
            try:
                result = self._call("ComputeGradients", attempt, timeout)
            except (errors.GradmeshError, sharedmem.SegmentError) as e:
                if not shared or not _shared_memory_refused(e):
                    raise
                # The worker cannot see our segments (another host or container, or
                # shared memory off there), or /dev/shm is full: bytes from now on.
                self._shared = shared = False
                streamed = total > self.stream_threshold
                result = self._call("ComputeGradients", attempt, timeout)
        except errors.NotFound:
            # The worker restarted or evicted the graph: register it again, once.
            self.register_graph(graph, timeout)
            result = self._call("ComputeGradients", attempt, timeout)
        result.timings["round_trip_seconds"] = time.perf_counter() - start
        result.timings["streamed"] = float(streamed)
        result.timings["shared_memory"] = float(shared)
        if as_tensors:
            _to_tensors(result)
        return result

    def _request(self, graph, graph_id: str, worker_id: str, sig: tuple, gradients,
                 outputs, loss_scale, seed) -> _Request:
        """The request's parts but the tensors, from the client's cache when this graph,
        signature and options were sent before."""
        wanted, outputs = list(gradients or ()), list(outputs)
        # The types too: equal values of another type may serialize differently or not at
        # all (True == 1, but protobuf refuses a bool seed).
        key = (graph_id, worker_id, sig, tuple(wanted), tuple(outputs), type(loss_scale),
               loss_scale, type(seed), seed)
        try:
            hit = self._requests.get(key)
        except TypeError:           # an unhashable option (a 0-d array): not cached
            hit = key = None
        if hit is not None:
            return hit
        data_names = _data_names(graph, len(sig[1]))
        # Fields 1 and 5-8 of the request; the tensors (fields 3, 4) go between them.
        head = worker_pb2.ComputeGradientsRequest(graph_id=worker_id).SerializeToString()
        tail = worker_pb2.ComputeGradientsRequest(
            gradients=wanted, outputs=outputs, loss_scale=loss_scale,
            seed=seed).SerializeToString()
        nbytes = [math.prod(shape) * dtype.itemsize for _, shape, dtype in sig[0]]
        request = _Request(head, tail, data_names, wanted, sum(nbytes),
                           sum(math.prod(shape) * dtype.itemsize for shape, dtype in sig[1]))
        # -0.0 == 0.0, but they serialize differently.
        if key is not None and loss_scale != 0:
            requests = self._requests
            if len(requests) >= REQUEST_CACHE_ENTRIES:
                requests.clear()
            requests[key] = request
        return request

    def _use_shared_memory(self, timeout: float | None) -> bool:
        if self._shared is None:
            try:
                self._shared = bool(self.capabilities(timeout).shared_memory)
            except errors.GradmeshError:
                return False        # decided on a later call; this one goes as bytes
        return self._shared

    def _shared_call(self, request: _Request, params, data, **kw) -> GradientResult:
        """One ComputeGradients with parameters, data and gradients in shared memory."""
        by_name, data = dict(params), dict(data)
        # Parameters already in shared memory (Module.share_memory()) are read where they
        # are; the others and the data are copied into a segment of the pool.
        located = _located(by_name)
        pseg, offsets = sharedmem.place(self._segments, {
            **({} if located else {("p", n): a for n, a in by_name.items()}),
            **{("d", n): a for n, a in data.items()}})
        gseg, goffsets = sharedmem.place(
            self._segments,
            {n: by_name[n] for n in (request.wanted or by_name) if n in by_name},
            write=False)
        done = False
        try:
            # The offsets follow from the signature, which the request is cached under: the
            # segments' names are all that can change.
            segments = (pseg.name, gseg.name, located)
            message = request.shared.get(segments)
            if message is None:
                req = shared_request(
                    by_name, pseg, dict(located[1]) if located else
                    {n: offsets["p", n] for n in by_name}, gseg, goffsets,
                    data, {n: offsets["d", n] for n in data},
                    parameter_segment=located[0] if located else "")
                message = request.head + req.SerializeToString() + request.tail
                if len(request.shared) >= SEGMENT_PAIRS_CACHED:
                    request.shared.clear()
                request.shared[segments] = message
            resp = self._unary_call(message, **kw)
            result = _unary_result(resp)
            # Views, no copy: the segment is reused once the caller has dropped them.
            result.gradients = shared_gradients(resp, self._segments.lend(gseg), goffsets)
            done = True
            return result
        finally:
            # A failed call's segments are dropped, not reused: a worker past its deadline
            # may still be writing into them.
            self._segments.release(pseg) if done else pseg.close()
            if not done:
                gseg.close()

    def _stream(self, head: bytes, tail: bytes, params, data, **kw) -> GradientResult:
        header = worker_pb2.ComputeGradientsRequest.FromString(head + tail)
        # Gradients come as soon as backward finishes each (see worker.proto); a worker
        # that predates the flag answers the classic way, which the loop below also reads.
        header.stream_gradients_early = True
        for n, a in params:
            header.parameters.add(name=n).tensor.CopyFrom(serialize.to_proto(a, data=False))
        for n, a in data:
            header.data.add(name=n).tensor.CopyFrom(serialize.to_proto(a, data=False))
        arrays = [a for _, a in params] + [a for _, a in data]
        chunk_bytes = self.chunk_bytes

        def frames() -> Iterator[worker_pb2.StreamFrame | bytes]:
            yield worker_pb2.StreamFrame(request=header)
            yield from serialize.chunk_frames(arrays, chunk_bytes)

        resp, arrays_out, timed = read_reply(
            self._stream_call(frames(), **kw), lambda message: errors.GradmeshError(
                grpc.StatusCode.INTERNAL, message, None, "ComputeGradientsStream"))
        loss = arrays_out[0]
        k = len(resp.outputs)
        outputs = {nt.name: a for nt, a in zip(resp.outputs, arrays_out[1:1 + k])}
        received = {nt.name: a for nt, a in zip(resp.gradients, arrays_out[1 + k:])}
        # In the order requested (the stream has them in the order backward made them).
        order = list(header.gradients) or [n for n, _ in params]
        grads = {n: received[n] for n in order if n in received}
        grads.update(received)
        return GradientResult(loss, outputs, grads, _timings(timed), resp.graph_id)

    def backward(self, model, fn: Callable, *data, loss_scale: float = 1.0, seed: int = 0,
                 timeout: float | None = None):
        """Like ``fn(model, *data).backward()``, computed remotely: adds each gradient into
        ``p.grad`` of the model's parameters that require grad; returns the loss Tensor."""
        pairs = _named_params(model)
        wanted = [n for n, p in pairs if getattr(p, "requires_grad", True)]
        result = self.compute_gradients(fn, model, *data, gradients=wanted,
                                        loss_scale=loss_scale, seed=seed, timeout=timeout)
        for name, p in pairs:
            if name not in result.gradients or not isinstance(p, Tensor):
                continue
            # The bytes of a unary reply are read-only views: copy into a writable array.
            g = Tensor(np.array(result.gradients[name]))
            p.grad = g if p.grad is None else p.grad + g
        return Tensor(np.array(result.loss))


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
    assembler = serialize.Assembler(header, 1 << 62,
                                    tensor_fields=("loss", "outputs", "gradients"),
                                    allocate=_reply_buffers.allocate)
    timed = header
    for frame in replies:
        if frame.WhichOneof("kind") == "chunk":
            assembler.add(frame.chunk)
        elif assembler.done and timed is header:
            timed = frame.response          # the trailing timings of an early stream
        else:
            raise fail("the worker sent a second header in its reply")
    return header, assembler.finish(), timed


def _located(params: dict[str, np.ndarray]) -> tuple[str, tuple] | None:
    """``(segment name, ((parameter, offset), ...))`` when every parameter lives in the same
    shared-memory segment (``Tensor.share_memory_``), else None."""
    where = [sharedmem.locate(a) for a in params.values()]
    if not where or None in where or len({name for name, _ in where}) != 1:
        return None
    return where[0][0], tuple((n, offset) for n, (_, offset) in zip(params, where))


def shared_request(params: dict[str, np.ndarray], segment: sharedmem.Segment,
                   offsets: dict[str, int], gradient_segment: sharedmem.Segment,
                   gradient_offsets: dict[str, int], data: dict[str, np.ndarray] | None = None,
                   data_offsets: dict[str, int] | None = None, parameter_segment: str = ""
                   ) -> worker_pb2.ComputeGradientsRequest:
    """The tensors' headers (no bytes) and the ``SharedMemory`` of a request whose
    parameters (and ``data``, if given) are in ``segment`` (the parameters in the segment
    named ``parameter_segment`` instead, if given) and whose gradients go to
    ``gradient_segment``."""
    def headers(arrays):
        return [tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a, data=False))
                for n, a in (arrays or {}).items()]
    return worker_pb2.ComputeGradientsRequest(
        parameters=headers(params), data=headers(data),
        shared_memory=worker_pb2.SharedMemory(
            segment=segment.name, parameter_offsets=offsets, data_offsets=data_offsets,
            gradient_segment=gradient_segment.name, gradient_offsets=gradient_offsets,
            parameter_segment=parameter_segment))


def shared_gradients(resp: worker_pb2.ComputeGradientsResponse, buf: np.ndarray,
                     offsets: dict[str, int]) -> dict[str, np.ndarray]:
    """The gradients a worker wrote into the segment ``buf`` (uint8) views, as views
    (checked against the response's dtypes and shapes and the segment's bounds)."""
    if not resp.gradients_in_shared_memory:
        raise sharedmem.SegmentError("the worker did not write the gradients to shared "
                                     "memory (a worker that predates it?)")
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
            raise sharedmem.SegmentError(f"the worker's gradient {name!r} does not fit "
                                         f"what was asked for")
        out[name] = np.ndarray(shape, dtype, buf, offset)
    return out


def _gradient_header(nt: tensor_pb2.NamedTensor) -> tuple:
    """(name, NumPy dtype or None when unknown, shape, byte size) of a gradient's header."""
    dtype = serialize.PROTO_TO_DTYPE.get(nt.tensor.dtype)
    shape = tuple(nt.tensor.shape)
    return (nt.name, dtype.np if dtype else None, shape,
            dtype.np.itemsize * math.prod(shape) if dtype else -1)


_gradient_headers: dict[bytes, tuple] = {}


def _shared_memory_refused(e: Exception) -> bool:
    return isinstance(e, sharedmem.SegmentError) or (
        e.code == grpc.StatusCode.FAILED_PRECONDITION
        and (e.field or "").startswith("shared_memory"))


def _data_names(graph: graph_pb2.Graph, n: int) -> list[str]:
    names = [i.name for i in graph.inputs if i.role == graph_pb2.Input.DATA]
    if len(names) != n:
        raise TypeError(f"the graph takes {len(names)} data inputs {names}, got {n}")
    return names


# The stream's frame codec lives with the rest of the wire format in core/serialize.py;
# these names stay importable from here.
encode_chunk_frame = serialize.encode_chunk_frame
decode_stream_frame = serialize.decode_stream_frame
serialize_stream_frame = serialize.serialize_message


def _timings(resp: worker_pb2.ComputeGradientsResponse) -> dict[str, float]:
    t = resp.timings
    return {"decode_seconds": t.decode_seconds, "forward_seconds": t.forward_seconds,
            "backward_seconds": t.backward_seconds, "encode_seconds": t.encode_seconds,
            "plan_cached": float(t.plan_cached)}


def _decode(t: tensor_pb2.Tensor, field: str, name: str | None = None) -> np.ndarray:
    """``serialize.from_proto`` (a read-only view of the message's bytes), with the checks
    of a (dtype, shape) that passed them once reduced to the byte count."""
    shape = tuple(t.shape)
    key = (t.dtype, shape)
    hit = _reply_headers.get(key)
    data = t.data
    if hit is None or len(data) != hit[1]:
        # The full checks (and errors naming the field), and bool's 0/1 check every time.
        a = serialize.from_proto(t, field=field if name is None else f"{field}[{name}]")
        if _LITTLE and a.dtype != np.bool_:     # else a conversion, or values to check
            if len(_reply_headers) >= HEADER_CACHE_ENTRIES:
                _reply_headers.clear()
            _reply_headers[key] = (a.dtype, len(data))
        return a
    return np.ndarray(shape, hit[0], data)     # what from_proto returns, in one step


_reply_headers: dict[tuple[int, tuple], tuple[np.dtype, int]] = {}


def _unary_result(resp: worker_pb2.ComputeGradientsResponse) -> GradientResult:
    return GradientResult(
        _decode(resp.loss, "loss"),
        {nt.name: _decode(nt.tensor, "outputs", nt.name) for nt in resp.outputs},
        {} if resp.gradients_in_shared_memory else
        {nt.name: _decode(nt.tensor, "gradients", nt.name) for nt in resp.gradients},
        _timings(resp), resp.graph_id)


def _to_tensors(result: GradientResult) -> None:
    result.loss = Tensor(np.array(result.loss))
    result.outputs = {k: Tensor(np.array(v)) for k, v in result.outputs.items()}
    result.gradients = {k: Tensor(np.array(v)) for k, v in result.gradients.items()}


__all__ = ["WorkerClient", "GradientResult", "TLS", "encode_chunk_frame",
           "decode_stream_frame", "serialize_stream_frame"]
