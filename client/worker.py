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

import random
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
    from gradmesh.core.tensor import Tensor
    if isinstance(x, Tensor):
        x = x._data
    if not isinstance(x, np.ndarray):
        x = x.get() if type(x).__module__.startswith("cupy") else np.asarray(x)
    return x


def _named_params(params) -> list[tuple[str, Any]]:
    """(name, tensor) pairs of a Module (named_parameters order) or a mapping."""
    if hasattr(params, "named_parameters"):
        return list(params.named_parameters())
    if isinstance(params, Mapping):
        return list(params.items())
    raise TypeError(f"params must be a gradmesh Module or a dict of arrays/Tensors, got "
                    f"{type(params).__name__}")


def _signature(pairs, arrays) -> tuple:
    return tuple((n, a.shape, a.dtype.str) for n, a in pairs) + \
        tuple((a.shape, a.dtype.str) for a in arrays)


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
        return self._traced_graph(fn, params, data, pairs, [_array(d) for d in data])

    def _traced_graph(self, fn, params, data, pairs, arrays) -> tuple[graph_pb2.Graph, str]:
        sig = _signature(pairs, arrays)
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
        if isinstance(fn_or_graph, graph_pb2.Graph):
            from gradmesh.core import graph as core_graph
            graph, graph_id = fn_or_graph, core_graph.graph_id(fn_or_graph)
        elif callable(fn_or_graph):
            graph, graph_id = self._traced_graph(fn_or_graph, params, data, param_arrays,
                                                 arrays)
        else:
            raise TypeError("fn_or_graph must be a function or a graph_pb2.Graph")
        # The worker's id for the graph: ours, unless the graph was not canonical.
        graph_id = self._registered.get(graph_id) or self.register_graph(graph, timeout)

        data_arrays = list(zip(_data_names(graph, len(data)), arrays))
        data_bytes = sum(a.nbytes for _, a in data_arrays)
        total = sum(a.nbytes for _, a in param_arrays) + data_bytes
        shared = (total - data_bytes >= self.shared_memory_min_bytes
                  and data_bytes < self.stream_threshold and self._use_shared_memory(timeout))
        streamed = not shared and total > self.stream_threshold
        # Fields 1 and 5-8 of the request; the tensors (fields 3, 4) go between them.
        head = worker_pb2.ComputeGradientsRequest(graph_id=graph_id).SerializeToString()
        tail = worker_pb2.ComputeGradientsRequest(
            gradients=list(gradients or ()), outputs=list(outputs), loss_scale=loss_scale,
            seed=seed).SerializeToString()

        def attempt(**kw):
            if streamed:
                return self._stream(head, tail, param_arrays, data_arrays, **kw)
            if shared:
                return self._shared_call(head, tail, param_arrays, data_arrays,
                                         list(gradients or ()), **kw)
            pieces = [head]
            for n, a in param_arrays:
                pieces += serialize.encode_tensor_field(3, a, n)
            for n, a in data_arrays:
                pieces += serialize.encode_tensor_field(4, a, n)
            pieces.append(tail)
            # The one copy of the tensors' bytes before gRPC's own.
            return _unary_result(self._unary_call(b"".join(pieces), **kw))

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

    def _use_shared_memory(self, timeout: float | None) -> bool:
        if self._shared is None:
            try:
                self._shared = bool(self.capabilities(timeout).shared_memory)
            except errors.GradmeshError:
                return False        # decided on a later call; this one goes as bytes
        return self._shared

    def _shared_call(self, head: bytes, tail: bytes, params, data, wanted: list[str],
                     **kw) -> GradientResult:
        """One ComputeGradients with parameters, data and gradients in shared memory."""
        by_name, data = dict(params), dict(data)
        pseg, offsets = sharedmem.place(self._segments, {
            **{("p", n): a for n, a in by_name.items()},
            **{("d", n): a for n, a in data.items()}})
        gseg, goffsets = sharedmem.place(
            self._segments, {n: by_name[n] for n in (wanted or by_name) if n in by_name},
            write=False)
        done = False
        try:
            req = shared_request(
                by_name, pseg, {n: offsets["p", n] for n in by_name}, gseg, goffsets,
                data, {n: offsets["d", n] for n in data})
            resp = self._unary_call(head + req.SerializeToString() + tail, **kw)
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
        from gradmesh.core.tensor import Tensor
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


def shared_request(params: dict[str, np.ndarray], segment: sharedmem.Segment,
                   offsets: dict[str, int], gradient_segment: sharedmem.Segment,
                   gradient_offsets: dict[str, int], data: dict[str, np.ndarray] | None = None,
                   data_offsets: dict[str, int] | None = None
                   ) -> worker_pb2.ComputeGradientsRequest:
    """The tensors' headers (no bytes) and the ``SharedMemory`` of a request whose
    parameters (and ``data``, if given) are in ``segment`` and whose gradients go to
    ``gradient_segment``."""
    def headers(arrays):
        return [tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a, data=False))
                for n, a in (arrays or {}).items()]
    return worker_pb2.ComputeGradientsRequest(
        parameters=headers(params), data=headers(data),
        shared_memory=worker_pb2.SharedMemory(
            segment=segment.name, parameter_offsets=offsets, data_offsets=data_offsets,
            gradient_segment=gradient_segment.name, gradient_offsets=gradient_offsets))


def shared_gradients(resp: worker_pb2.ComputeGradientsResponse, buf: np.ndarray,
                     offsets: dict[str, int]) -> dict[str, np.ndarray]:
    """The gradients a worker wrote into the segment ``buf`` (uint8) views, as views
    (checked against the response's dtypes and shapes and the segment's bounds)."""
    if not resp.gradients_in_shared_memory:
        raise sharedmem.SegmentError("the worker did not write the gradients to shared "
                                     "memory (a worker that predates it?)")
    out = {}
    for nt in resp.gradients:
        dtype = serialize.PROTO_TO_DTYPE.get(nt.tensor.dtype)
        offset = offsets.get(nt.name)
        shape = tuple(nt.tensor.shape)
        nbytes = (dtype.np.itemsize * int(np.prod(shape))) if dtype else -1
        if offset is None or dtype is None or offset + nbytes > buf.nbytes or nbytes < 0:
            raise sharedmem.SegmentError(f"the worker's gradient {nt.name!r} does not fit "
                                         f"what was asked for")
        out[nt.name] = buf[offset:offset + nbytes].view(dtype.np).reshape(shape)
    return out


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


def _unary_result(resp: worker_pb2.ComputeGradientsResponse) -> GradientResult:
    def dec(t, name):
        return serialize.from_proto(t, field=name)
    return GradientResult(
        dec(resp.loss, "loss"),
        {nt.name: dec(nt.tensor, f"outputs[{nt.name}]") for nt in resp.outputs},
        {} if resp.gradients_in_shared_memory else
        {nt.name: dec(nt.tensor, f"gradients[{nt.name}]") for nt in resp.gradients},
        _timings(resp), resp.graph_id)


def _to_tensors(result: GradientResult) -> None:
    from gradmesh.core.tensor import Tensor
    result.loss = Tensor(np.array(result.loss))
    result.outputs = {k: Tensor(np.array(v)) for k, v in result.outputs.items()}
    result.gradients = {k: Tensor(np.array(v)) for k, v in result.gradients.items()}


__all__ = ["WorkerClient", "GradientResult", "TLS", "encode_chunk_frame",
           "decode_stream_frame", "serialize_stream_frame"]
