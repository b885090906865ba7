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

Buffers: a model whose forward changes its buffers in place (BatchNorm in train mode)
traces into a graph with BUFFER inputs; each call sends the module's buffers with the
parameters, and the worker returns their new values, which ``compute_gradients`` and
``backward`` write into the module's buffers, in place, as running the model locally
would (``update_buffers=False`` leaves the module alone; ``GradientResult.buffers`` has
the values either way).
Requests over ``stream_threshold`` bytes go over the streaming RPC, transparently. A
worker on this host (127.0.0.1, localhost, a Unix socket) gets the parameters and writes
the gradients through shared memory instead, when it says it can (the transport policy
is :class:`gradmesh.wire.worker.Transport`, the coordinator's too).
"""

from __future__ import annotations

import math
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import grpc
import numpy as np

from gradmesh.core import backend
from gradmesh.core import graph as core_graph
from gradmesh.core.tensor import Tensor
from gradmesh.v1 import graph_pb2, worker_pb2
from gradmesh.wire import errors, sharedmem
from gradmesh.wire.channel import call_metadata, channel, metadata
from gradmesh.wire.stream import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from gradmesh.wire.worker import SHARED, STREAM, UNARY, Reply, Request, WorkerTransport, data_names

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
DEFAULT_STREAM_THRESHOLD = 32 * MiB
DEFAULT_CHUNK_BYTES = 1 * MiB
# Below this many parameter bytes, bytes in the message cost less than shared memory's
# extra bookkeeping (benchmarks/worker.py, the small model).
SHARED_MEMORY_MIN_BYTES = 256 << 10
# Bound of the cache of request bytes per graph, shapes and options: past it the cache is
# cleared and fills again.
REQUEST_CACHE_ENTRIES = 64


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
    # The new values of the buffers the graph updates (BatchNorm running statistics).
    buffers: dict[str, Any] = field(default_factory=dict)
    # Requested parameters the loss does not depend on: their ``gradients`` are zeros,
    # where torch.autograd.grad gives None (``backward`` leaves their ``.grad`` alone).
    unused_parameters: tuple[str, ...] = ()


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
    if type(params) is dict:  # the common case, before the slower checks
        return list(params.items())
    if hasattr(params, "named_parameters"):
        return list(params.named_parameters())
    if isinstance(params, Mapping):
        return list(params.items())
    raise TypeError(
        f"params must be a gradmesh Module or a dict of arrays/Tensors, got {type(params).__name__}"
    )


def _signature(pairs, arrays) -> tuple:
    # dtype objects, not their .str (which builds a string each time): equal and hashed
    # alike exactly when the strings are.
    return (
        tuple([(n, a.shape, a.dtype) for n, a in pairs]),
        tuple([(a.shape, a.dtype) for a in arrays]),
    )


def _modes(params) -> tuple:
    """The ``training`` flag of a Module and each of its submodules (() for a dict)."""
    modules = getattr(params, "modules", None)
    return tuple(m.training for m in modules()) if callable(modules) else ()


def _ref(params) -> Callable[[], Any]:
    """A weak reference to a Module (the graph of a dict of tensors depends on its shapes
    alone: nothing to check)."""
    try:
        return weakref.ref(params)
    except TypeError:  # a dict
        return lambda: None


class WorkerClient(WorkerTransport):
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

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: Any = None,
        timeout: float | None = 60.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        stream_threshold: int = DEFAULT_STREAM_THRESHOLD,
        retries: int = 4,
        shared_memory: bool = True,
        shared_memory_min_bytes: int = SHARED_MEMORY_MIN_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ):
        if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be between {MIN_CHUNK_BYTES} and "
                f"{MAX_CHUNK_BYTES}, got {chunk_bytes}"
            )
        self.target = target
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.stream_threshold = min(stream_threshold, max_message_bytes - MiB)
        self.retries = retries
        self.channel = channel(
            target, tls=tls, max_message_bytes=max_message_bytes, options=options
        )
        self._segments = sharedmem.Pool()
        super().__init__(
            self.channel,
            target,
            chunk_bytes=chunk_bytes,
            segments=self._segments if shared_memory and sharedmem.available() else None,
        )
        self._metadata = metadata(token)
        self._lock = threading.Lock()
        # fn -> {shapes signature: (graph, graph id)}; weak so that lambdas can be freed.
        self._traced: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()
        self._traced_strong: dict[Any, dict] = {}
        # (graph ids, signature, options) -> Request.
        self._requests: dict[tuple, Request] = {}
        # Graph id as computed here -> the worker's id (that of the canonical form).
        self._registered: dict[str, str] = {}
        self.shared_memory_min_bytes = shared_memory_min_bytes
        self._fitted = False  # to the worker's limits (Capabilities), once

    def _fit_to_worker(self, timeout: float | None) -> None:
        """Learn the worker's message limit (Capabilities, once): requests over it go
        over the stream in chunks it accepts, instead of failing RESOURCE_EXHAUSTED."""
        if self._fitted:
            return
        try:
            caps = self.capabilities(timeout)
        except errors.GradmeshError:
            return  # asked again on the next call
        self._fitted = True
        self.fit_limits(caps.limits)
        peer = int(caps.limits.max_message_bytes)
        if peer:
            self.stream_threshold = min(self.stream_threshold, peer - min(MiB, peer // 2))
        if self._shared is None:
            self._shared = bool(caps.shared_memory)

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
                return fn(timeout=left, metadata=call_metadata(self._metadata))
            except grpc.RpcError as e:
                retry = (
                    e.code() == grpc.StatusCode.UNAVAILABLE
                    and attempt < self.retries
                    and (deadline is None or time.monotonic() + delay < deadline)
                )
                if not retry:
                    raise errors.from_rpc_error(e, method) from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def capabilities(self, timeout: float | None = None) -> worker_pb2.CapabilitiesResponse:
        """The worker's ops, dtypes, backend, limits, versions and build fingerprint."""
        return self._call(
            "Capabilities",
            lambda **kw: self.stub.Capabilities(worker_pb2.CapabilitiesRequest(), **kw),
            timeout,
        )

    def register_graph(self, graph: graph_pb2.Graph, timeout: float | None = None) -> str:
        """Register ``graph`` with the worker; returns its id."""
        resp = self._call(
            "RegisterGraph",
            lambda **kw: self.stub.RegisterGraph(
                worker_pb2.RegisterGraphRequest(graph=graph), **kw
            ),
            timeout,
        )
        with self._lock:
            self._registered[core_graph.graph_id(graph)] = resp.graph_id
        return resp.graph_id

    def trace(self, fn: Callable, params, *data) -> tuple[graph_pb2.Graph, str]:
        """The graph of ``fn(params, *data)`` for these shapes and dtypes (cached) and its id."""
        pairs = [(n, _array(p)) for n, p in _named_params(params)]
        return self._traced_graph(fn, params, data, _signature(pairs, [_array(d) for d in data]))

    def _traced_graph(self, fn, params, data, sig: tuple) -> tuple[graph_pb2.Graph, str]:
        try:
            cache = self._traced.setdefault(fn, {})
        except TypeError:  # not weak-referenceable (e.g. a functools.partial)
            cache = self._traced_strong.setdefault(fn, {})
        # Per module and its submodules' train/eval modes too: another model of the same
        # shapes (other layers, another mode) traces to another graph.
        module = callable(getattr(params, "modules", None))
        key = (sig, id(params) if module else None, _modes(params))
        hit = cache.get(key)
        if hit is not None and module and hit[2]() is not params:
            hit = None  # the id of a module that is gone, reused by another object
        if hit is None:
            try:
                graph = core_graph.trace(fn, params, *data)
            except core_graph.TraceError:
                # E.g. a flatten traced at batch size 1 cannot tell the batch from a 1:
                # a graph for exactly these shapes is still right (the cache is per shape).
                graph = core_graph.trace(fn, params, *data, batch_dim=False)
            hit = (graph, core_graph.graph_id(graph), _ref(params))
            cache[key] = hit
        return hit[0], hit[1]

    def compute_gradients(
        self,
        fn_or_graph: Callable | graph_pb2.Graph,
        params,
        *data,
        outputs: Sequence[str] = (),
        gradients: Sequence[str] | None = None,
        loss_scale: float = 1.0,
        seed: int = 0,
        as_tensors: bool = False,
        timeout: float | None = None,
        update_buffers: bool = True,
    ) -> GradientResult:
        """Loss, extra ``outputs`` and ``gradients`` of ``fn(params, *data)`` on the worker.

        ``fn_or_graph``: a Python function ``fn(model_or_params, *data)`` returning the
        scalar loss (traced on first use per parameter/data shapes, registered once) or a
        ``graph_pb2.Graph`` (registered once). ``params``: a Module
        or a dict name -> array/Tensor. ``data``: arrays/Tensors for the graph's DATA
        inputs, in order. ``gradients``: parameter names (default all).

        A graph with BUFFER inputs gets the Module's buffers (or the dict's entries of
        those names) with the parameters; their new values are ``result.buffers`` and,
        with ``update_buffers`` and a Module, are written into its buffers in place.
        """
        param_arrays = [(n, _array(p)) for n, p in _named_params(params)]
        arrays = [_array(d) for d in data]
        graph, graph_id, worker_id, param_arrays, gradients = self._prepare(
            fn_or_graph, params, data, param_arrays, arrays, gradients, timeout
        )
        sig = _signature(param_arrays, arrays)  # requests are cached by what they carry
        request = self._request(
            graph, graph_id, worker_id, sig, gradients, outputs, loss_scale, seed
        )
        data_arrays = list(zip(request.data_names, arrays))
        self._fit_to_worker(timeout)
        preferred, by_bytes = self._modes(request, timeout)

        def send(mode: str) -> Reply:
            return self._call(
                "ComputeGradients",
                lambda **kw: self._send(mode, request, param_arrays, data_arrays, **kw),
                timeout,
            )

        start = time.perf_counter()
        reply, mode = self._transport(
            send, preferred, by_bytes, lambda: self.register_graph(graph, timeout)
        )
        result = GradientResult(
            reply.loss,
            reply.outputs,
            reply.gradients,
            reply.timings,
            reply.graph_id,
            reply.buffers,
            reply.unused,
        )
        if update_buffers and reply.buffers:
            _write_buffers(params, reply.buffers)
        result.timings["round_trip_seconds"] = time.perf_counter() - start
        result.timings["streamed"] = float(mode == STREAM)
        result.timings["shared_memory"] = float(mode == SHARED)
        if as_tensors:
            _to_tensors(result)
        return result

    def _prepare(self, fn_or_graph, params, data, param_arrays, arrays, gradients, timeout):
        """The graph (traced or given), its canonical id, the worker's id for it (registered
        once), the parameter arrays with the graph's BUFFER inputs added, and the gradients
        to ask for (never a buffer's)."""
        if isinstance(fn_or_graph, graph_pb2.Graph):
            graph, graph_id = fn_or_graph, core_graph.graph_id(fn_or_graph)
        elif callable(fn_or_graph):
            sig = _signature(param_arrays, arrays)
            graph, graph_id = self._traced_graph(fn_or_graph, params, data, sig)
        else:
            raise TypeError("fn_or_graph must be a function or a graph_pb2.Graph")
        # The worker's id for the graph: ours, unless the graph was not canonical.
        worker_id = self._registered.get(graph_id) or self.register_graph(graph, timeout)
        buffer_names = _buffer_names(graph)
        if buffer_names:
            param_arrays = param_arrays + _buffer_arrays(params, param_arrays, buffer_names)
            if gradients is None:
                gradients = [i.name for i in graph.inputs if i.role == graph_pb2.Input.PARAM]
        return graph, graph_id, worker_id, param_arrays, gradients

    def _modes(self, request: Request, timeout: float | None) -> tuple[str, str]:
        """The transport to try first, and the one by size alone (the fallback when shared
        memory is refused): shared memory for large parameters with small data on a
        same-host worker, else a stream above ``stream_threshold`` bytes, else unary."""
        data_bytes = request.data_bytes
        total = request.param_bytes + data_bytes
        by_bytes = STREAM if total > self.stream_threshold else UNARY
        shared = (
            total - data_bytes >= self.shared_memory_min_bytes
            and data_bytes < self.stream_threshold
            and self._takes_shared_memory(lambda: self.capabilities(timeout).shared_memory)
        )
        return (SHARED if shared else by_bytes), by_bytes

    def _send(self, mode: str, request: Request, param_arrays, data_arrays, **kw) -> Reply:
        if mode == STREAM:
            return self._send_stream(
                request.header(),
                param_arrays,
                data_arrays,
                lambda message: errors.GradmeshError(
                    grpc.StatusCode.INTERNAL, message, None, "ComputeGradientsStream"
                ),
                **kw,
            )
        if mode == SHARED:
            return self._send_all_shared(request, param_arrays, data_arrays, **kw)
        return self._send_unary(request.unary_request(param_arrays, data_arrays), **kw)

    def _request(
        self, graph, graph_id: str, worker_id: str, sig: tuple, gradients, outputs, loss_scale, seed
    ) -> Request:
        """The request's parts but the tensors, from the client's cache when this graph,
        signature and options were sent before."""
        wanted, outputs = list(gradients or ()), list(outputs)
        # The types too: equal values of another type may serialize differently or not at
        # all (True == 1, but protobuf refuses a bool seed).
        key = (
            graph_id,
            worker_id,
            sig,
            tuple(wanted),
            tuple(outputs),
            type(loss_scale),
            loss_scale,
            type(seed),
            seed,
        )
        try:
            hit = self._requests.get(key)
            cacheable = True
        except TypeError:  # an unhashable option (a 0-d array): not cached
            hit, cacheable = None, False
        if hit is not None:
            return hit
        request = Request.build(
            worker_id,
            wanted,
            outputs,
            loss_scale,
            seed,
            data_names(graph, len(sig[1])),
            sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in sig[0]),
            sum(math.prod(shape) * dtype.itemsize for shape, dtype in sig[1]),
        )
        # -0.0 == 0.0, but they serialize differently.
        if cacheable and loss_scale != 0:
            requests = self._requests
            if len(requests) >= REQUEST_CACHE_ENTRIES:
                requests.clear()
            requests[key] = request
        return request

    def backward(
        self,
        model,
        fn: Callable,
        *data,
        loss_scale: float = 1.0,
        seed: int = 0,
        timeout: float | None = None,
    ):
        """Like ``fn(model, *data).backward()``, computed remotely: adds each gradient into
        ``p.grad`` of the model's parameters that require grad; returns the loss Tensor."""
        pairs = _named_params(model)
        wanted = [n for n, p in pairs if getattr(p, "requires_grad", True)]
        result = self.compute_gradients(
            fn, model, *data, gradients=wanted, loss_scale=loss_scale, seed=seed, timeout=timeout
        )
        for name, p in pairs:
            if name not in result.gradients or not isinstance(p, Tensor):
                continue
            if name in result.unused_parameters:
                continue  # the loss does not use it: .grad stays as it is (None), as in torch
            # The bytes of a unary reply are read-only views: copy into a writable array.
            g = Tensor(np.array(result.gradients[name]))
            p.grad = g if p.grad is None else p.grad + g
        return Tensor(np.array(result.loss))


def _to_tensors(result: GradientResult) -> None:
    result.loss = Tensor(np.array(result.loss))
    result.outputs = {k: Tensor(np.array(v)) for k, v in result.outputs.items()}
    result.gradients = {k: Tensor(np.array(v)) for k, v in result.gradients.items()}
    result.buffers = {k: Tensor(np.array(v)) for k, v in result.buffers.items()}


def _buffer_names(graph: graph_pb2.Graph) -> list[str]:
    return [i.name for i in graph.inputs if i.role == graph_pb2.Input.BUFFER]


def _buffer_arrays(params, param_arrays: list, names: list[str]) -> list[tuple[str, Any]]:
    """(name, array) of the graph's BUFFER inputs not among ``param_arrays``: the
    Module's buffers of those names (a missing one is the worker's INVALID_ARGUMENT)."""
    have = {n for n, _ in param_arrays}
    owned = dict(params.named_buffers()) if hasattr(params, "named_buffers") else {}
    return [(n, _array(owned[n])) for n in names if n not in have and owned.get(n) is not None]


def _write_buffers(params, new: Mapping[str, Any]) -> None:
    """Write a reply's new buffer values into the Module's buffers, in place (as its
    forward pass would have, run locally)."""
    if not hasattr(params, "named_buffers"):
        return
    owned = dict(params.named_buffers())
    for name, value in new.items():
        buffer = owned.get(name)
        if isinstance(buffer, Tensor):
            buffer._data[...] = backend.xp_of(buffer._data).asarray(value)


__all__ = ["WorkerClient", "GradientResult"]
