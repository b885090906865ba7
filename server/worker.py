"""The gradient worker: take a graph, parameters and a batch; return loss and gradients.

``gradmesh worker --port 50051 --backend cpu`` serves it. The servicer (:class:`WorkerService`)
is thin: it moves bytes between gRPC and :class:`GradientWorker`, whose plain methods do
the work (validate and cache graphs, check request tensors against the graph before
anything is allocated, cache compiled plans, run them) and can be tested without a server.

Errors are raised as exceptions with ``code``, ``field`` and ``message``
(:class:`~gradmesh.server.runtime.ServiceError`, ``WireError``, ``GraphError``); the
server's interceptor sends them as gRPC statuses with ``google.rpc.BadRequest`` details.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import platform
import queue
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc
import numpy as np

import gradmesh
from gradmesh.core import backend as core_backend
from gradmesh.core import graph as core_graph
from gradmesh.core import plan as core_plan
from gradmesh.core import serialize, sharedmem
from gradmesh.core.registry import REGISTRY, OpError
from gradmesh.server import runtime
from gradmesh.server.runtime import ServiceError
from gradmesh.v1 import graph_pb2, tensor_pb2, worker_pb2, worker_pb2_grpc

MiB = 1 << 20
DEFAULT_PORT = 50051
# Idle receive buffers a worker keeps for the next streamed request: filling fresh pages
# costs the kernel more than the bytes cost gRPC (serialize.BufferPool).
RECEIVE_POOL_BYTES = 1 << 30
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
BACKENDS = ("cpu", "cuda")

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FAILED = grpc.StatusCode.FAILED_PRECONDITION

# Wire dtype enum -> NumPy dtype (little-endian on the wire, see tensor.proto).
_NP_OF_WIRE = {wire: d.np.newbyteorder("<") for wire, d in serialize.PROTO_TO_DTYPE.items()}


# The worker's limits (graph size, tensor elements, message and stream bytes, concurrency,
# chunk size) are core.graph.Limits, which validation reads and Capabilities reports.
WorkerLimits = core_graph.Limits


def limits_message(limits: WorkerLimits) -> worker_pb2.Limits:
    """The ``worker_pb2.Limits`` that ``Capabilities`` reports (core knows no messages)."""
    return worker_pb2.Limits(
        max_graph_nodes=limits.max_graph_nodes, max_tensor_elements=limits.max_tensor_elements,
        max_message_bytes=limits.max_message_bytes, max_stream_bytes=limits.max_stream_bytes,
        max_concurrent_requests=limits.max_concurrent_requests, chunk_bytes=limits.chunk_bytes)


def check_limits(limits: WorkerLimits) -> None:
    if not serialize.MIN_CHUNK_BYTES <= limits.chunk_bytes <= serialize.MAX_CHUNK_BYTES:
        raise runtime.ConfigError(f"chunk_bytes must be between {serialize.MIN_CHUNK_BYTES} "
                                  f"and {serialize.MAX_CHUNK_BYTES}, got {limits.chunk_bytes}")
    for name in ("max_graph_nodes", "max_tensor_elements", "max_message_bytes",
                 "max_stream_bytes", "max_concurrent_requests"):
        if getattr(limits, name) < 1:
            raise runtime.ConfigError(f"{name} must be positive")


@dataclass
class TensorSlot:
    """A request tensor checked against the graph: where its bytes go and what they are."""
    field: str                  # "parameters[w1]"
    name: str
    dtype: np.dtype
    shape: tuple
    nbytes: int
    shared_offset: int | None = None    # where its bytes are in the shared segment
    data: bytes | None = None           # a unary request's bytes for it, read once


@dataclass(frozen=True)
class _Input:
    """A PARAM or DATA input of a graph, as requests are checked against it."""
    name: str
    wire: int                   # the tensor.proto dtype enum
    dtype: np.dtype             # little-endian, as on the wire
    shape: tuple                # -1 first: any batch size
    field: str                  # "parameters[w1]"


@dataclass(frozen=True)
class _Registered:
    """A validated graph and what every request against it reads (made once)."""
    validated: Any
    params: tuple[_Input, ...]
    data: tuple[_Input, ...]
    output_names: tuple[str, ...]

    @classmethod
    def of(cls, validated) -> "_Registered":
        graph = validated.graph

        def inputs(role, kind):
            return tuple(_Input(i.name, i.dtype, _NP_OF_WIRE[i.dtype], tuple(i.shape),
                                f"{kind}[{i.name}]") for i in graph.inputs if i.role == role)
        return cls(validated, inputs(graph_pb2.Input.PARAM, "parameters"),
                   inputs(graph_pb2.Input.DATA, "data"), tuple(o.name for o in graph.outputs))

    @property
    def param_names(self) -> list[str]:
        return [i.name for i in self.params]


@dataclass
class Prepared:
    """A request whose header passed every check; only its tensors' bytes are missing."""
    graph_id: str
    validated: Any
    params: list[TensorSlot]
    data: list[TensorSlot]
    gradients: list[str]
    outputs: list[str]
    loss_scale: float
    seed: int
    # The request's SharedMemory, when it has one (see worker.proto).
    shared: worker_pb2.SharedMemory | None = None
    # The parameters kept from an earlier call, when the request names them instead.
    kept: dict | None = None

    @property
    def slots(self) -> list[TensorSlot]:
        return self.params + self.data

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)


@dataclass
class Computed:
    """What :meth:`GradientWorker.compute` returns."""
    loss: np.ndarray
    outputs: list[tuple[str, np.ndarray]]
    gradients: list[tuple[str, np.ndarray]]
    forward_seconds: float
    backward_seconds: float
    plan_cached: bool


class _LRU:
    """A small thread-safe LRU map."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, unwanted: Callable[[Any], bool]) -> None:
        """Remove the entries whose value is ``unwanted``."""
        with self._lock:
            for key in [k for k, v in self._items.items() if unwanted(v)]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class ParameterCache:
    """Parameter sets kept for ``parameter_set`` requests (worker.proto): least recently
    used out first, within ``capacity`` bytes. Thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._sets: OrderedDict[tuple, tuple[int, dict]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: tuple) -> dict | None:
        with self._lock:
            entry = self._sets.get(key)
            if entry is None:
                return None
            self._sets.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: tuple, arrays: dict) -> None:
        size = sum(a.nbytes for a in arrays.values())
        with self._lock:
            self._sets.pop(key, None)
            if size > self.capacity:
                return
            while self._sets and size + sum(n for n, _ in self._sets.values()) > self.capacity:
                self._sets.popitem(last=False)
            self._sets[key] = (size, arrays)

    def __len__(self) -> int:
        return len(self._sets)


def _never_stop() -> None:
    return None


class GradientWorker:
    """The worker's logic without gRPC: graphs, plans, request checks and computation.

    >>> w = GradientWorker("cpu")
    >>> gid = w.register(graph)                                   # doctest: +SKIP
    >>> prepared = w.prepare(request)                             # doctest: +SKIP
    >>> result = w.compute(prepared, params, data)                # doctest: +SKIP
    """

    def __init__(self, backend: str = "cpu", limits: WorkerLimits | None = None,
                 graph_cache_size: int = 256, plan_cache_size: int = 64,
                 shared_memory: bool = True, parameter_cache_bytes: int = 1 << 30):
        if backend not in BACKENDS:
            raise runtime.ConfigError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend == "cuda" and not core_backend.cuda_available():
            raise runtime.ConfigError(
                "backend 'cuda' needs CuPy and a CUDA device; none found (install "
                "'gradmesh[cuda]' on a GPU machine, or use --backend cpu)")
        self.backend = backend
        self.limits = limits or WorkerLimits()
        check_limits(self.limits)
        self._graphs = _LRU(graph_cache_size)
        self._plans = _LRU(plan_cache_size)
        # Compiling the same plan twice at once is harmless but wasteful.
        self._compile_lock = threading.Lock()
        self.abandoned = 0          # computations stopped by a deadline or cancellation
        # Segments named by same-host clients, kept mapped (core/sharedmem.py).
        self.segments = (sharedmem.Attached() if shared_memory and sharedmem.available()
                         else None)
        self.kept = ParameterCache(parameter_cache_bytes)
        # Shared-memory requests repeat byte for byte while the client reuses its segments:
        # their checked headers and array views, by request bytes (see unary()).
        self._shared_calls = _LRU(sharedmem.MAPPED_SEGMENTS)

    # ------------------------------------------------------------------ graphs -------

    def register(self, graph: graph_pb2.Graph, field: str = "graph") -> str:
        """Validate ``graph`` and remember it; returns its id (that of its canonical form,
        see graph.proto). Idempotent."""
        return self._register(graph, field).validated.id

    def _register(self, graph: graph_pb2.Graph, field: str) -> _Registered:
        given_id = core_graph.graph_id(graph)
        registered = self._graphs.get(given_id)
        if registered is None:
            try:
                validated = core_graph.validate(graph, self.limits)
            except core_graph.GraphError as e:
                # Name the field as the request has it: "graph.nodes[3].op".
                raise ServiceError(runtime.status_code(e.code), e.message,
                                   f"{field}.{e.field}" if e.field else field) from None
            registered = _Registered.of(validated)
            self._graphs.put(validated.id, registered)
            if given_id != validated.id:        # sent again as it was: found without work
                self._graphs.put(given_id, registered)
        return registered

    def lookup(self, graph_id: str, field: str = "graph_id"):
        """The validated graph of a registered id (NOT_FOUND if unknown or evicted)."""
        return self._lookup(graph_id, field).validated

    def _lookup(self, graph_id: str, field: str = "graph_id") -> _Registered:
        registered = self._graphs.get(graph_id)
        if registered is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND,
                               f"unknown graph id {graph_id!r}: register the graph first "
                               f"(RegisterGraph) or send it inline", field)
        return registered

    # ------------------------------------------------------------------ requests -----

    def prepare(self, request: worker_pb2.ComputeGradientsRequest,
                header_only: bool = False, same_host: bool = False) -> Prepared:
        """Check a request against its graph before any tensor is decoded.

        Names, dtypes, shapes, batch sizes, element counts and (for unary requests) byte
        lengths are all checked here, so a bad or oversized request costs nothing.
        ``same_host``: the caller is on this host, so it may name shared-memory segments.
        """
        which = request.WhichOneof("graph_ref")
        if which == "graph":
            registered = self._register(request.graph, "graph")
        elif which == "graph_id":
            registered = self._lookup(request.graph_id)
        else:
            raise ServiceError(INVALID, "the request names no graph: set graph_id (after "
                                        "RegisterGraph) or graph", "graph_ref")
        graph_id = registered.validated.id
        param_inputs, data_inputs = registered.params, registered.data
        shared = None
        if request.HasField("shared_memory"):
            shared = request.shared_memory
            self._check_shared(shared, header_only, same_host,
                               {i.name for i in param_inputs}, {i.name for i in data_inputs})
        kept = None
        if request.parameter_set and not request.parameters:
            kept = self.kept.get((request.parameter_set, request.parameter_version))
            runtime.metric("kept", "miss" if kept is None else "hit")
            if kept is None:
                raise ServiceError(FAILED, f"no parameters are kept for set "
                                           f"{request.parameter_set!r} version "
                                           f"{request.parameter_version} (evicted, or the "
                                           f"worker restarted): send them", "parameters")
            params = self._kept_slots(kept, param_inputs)
        else:
            params = self._slots("parameters", request.parameters, param_inputs, header_only,
                                 shared.parameter_offsets if shared else {})
        data = self._slots("data", request.data, data_inputs, header_only,
                           shared.data_offsets if shared else {})
        self._check_batch(data, data_inputs)

        param_names = registered.param_names
        gradients = list(request.gradients) or param_names
        _check_requested("gradients", request.gradients, param_names,
                         "no parameter named {!r} to take a gradient for; the graph's "
                         "parameters are {}")
        _check_requested("outputs", request.outputs, registered.output_names,
                         "no output named {!r}; the graph's outputs are {}")
        if shared is not None and shared.gradient_segment:
            wanted, got = set(gradients), set(shared.gradient_offsets)
            if wanted != got:
                raise ServiceError(INVALID, f"gradient_offsets must name exactly the "
                                            f"requested gradients; missing "
                                            f"{_short(sorted(wanted - got))}, not requested "
                                            f"{_short(sorted(got - wanted))}",
                                   "shared_memory.gradient_offsets")
        scale = request.loss_scale or 1.0
        if not math.isfinite(scale):
            raise ServiceError(INVALID, f"loss_scale must be finite, got {scale}", "loss_scale")
        return Prepared(graph_id, registered.validated, params, data, gradients,
                        list(request.outputs), scale, request.seed, shared, kept)

    @staticmethod
    def _kept_slots(kept: dict, inputs: Sequence[_Input]) -> list[TensorSlot]:
        slots = []
        for inp in inputs:
            a = kept.get(inp.name)
            if a is None or a.dtype != inp.dtype or a.shape != inp.shape:
                raise ServiceError(FAILED, f"the kept parameters do not fit this graph "
                                           f"(parameter {inp.name!r}): send them", "parameters")
            slots.append(TensorSlot(inp.field, inp.name, inp.dtype, a.shape, a.nbytes))
        return slots

    def keep(self, prepared: Prepared, request: worker_pb2.ComputeGradientsRequest,
             params: dict) -> None:
        """Keep a request's parameters when it asks for it (``parameter_set``)."""
        if (request.parameter_set and prepared.kept is None
                and all(s.shared_offset is None for s in prepared.params)):
            for a in params.values():
                a.flags.writeable = False       # shared by later calls
            self.kept.put((request.parameter_set, request.parameter_version), dict(params))

    def _check_shared(self, shared: worker_pb2.SharedMemory, header_only: bool,
                      same_host: bool, param_names: set[str], data_names: set[str]) -> None:
        """The parts of a request's SharedMemory that need no segment opened."""
        field = "shared_memory.segment"
        if header_only:
            raise ServiceError(INVALID, "shared_memory is for ComputeGradients; a stream "
                                        "carries its tensors' bytes in chunks", field)
        if self.segments is None:
            raise ServiceError(FAILED, "this worker does not take shared memory (started "
                                       "with --shared-memory off, or no /dev/shm); send "
                                       "the bytes in the request", field)
        if not same_host:
            raise ServiceError(FAILED, "shared memory is only for callers on the worker's "
                                       "host (a loopback address or a Unix socket); send "
                                       "the bytes in the request", field)
        param_key = "parameter_segment" if shared.parameter_segment else "segment"
        for key, names, seg_key, known in (
                ("parameter_offsets", shared.parameter_offsets, param_key, param_names),
                ("data_offsets", shared.data_offsets, "segment", data_names),
                ("gradient_offsets", shared.gradient_offsets, "gradient_segment",
                 param_names)):
            segment, seg_field = getattr(shared, seg_key), f"shared_memory.{seg_key}"
            if segment and not sharedmem.NAME.match(segment):
                raise ServiceError(INVALID, f"{segment!r} is not a segment name "
                                            f"(gradmesh-<pid>-<32 hex digits>)", seg_field)
            if names and not segment:
                raise ServiceError(INVALID, f"{key} are given but no segment", seg_field)
            for name in sorted(names):
                f = f"shared_memory.{key}[{name}]"
                if name not in known:
                    raise ServiceError(INVALID, f"the graph has no "
                                                f"{'data' if known is data_names else 'parameter'}"
                                                f" input {name!r}", f)
                if names[name] % sharedmem.ALIGN:
                    raise ServiceError(INVALID, f"offset {names[name]} is not a multiple "
                                                f"of {sharedmem.ALIGN}", f)

    def _segment(self, name: str, field: str):
        try:
            return self.segments.get(name)
        except sharedmem.SegmentError as e:
            raise ServiceError(FAILED, f"{e}; send the bytes in the request", field) from None

    def gradient_views(self, prepared: Prepared) -> dict[str, np.ndarray] | None:
        """Where the gradients go when the request gave a segment for them (else None)."""
        shared = prepared.shared
        if shared is None or not shared.gradient_segment:
            return None
        buf = self._segment(shared.gradient_segment, "shared_memory.gradient_segment")
        by_name = {s.name: s for s in prepared.params}
        views = {}
        for name in prepared.gradients:
            slot, offset = by_name[name], shared.gradient_offsets[name]
            views[name] = self._view(buf, offset, slot,
                                     f"shared_memory.gradient_offsets[{name}]")
        return views

    @staticmethod
    def _view(buf, offset: int, slot: TensorSlot, field: str) -> np.ndarray:
        if offset + slot.nbytes > len(buf):
            raise ServiceError(INVALID, f"{slot.nbytes} bytes at offset {offset} run past "
                                        f"the segment's {len(buf)} bytes", field)
        return sharedmem.view(buf, offset, slot.dtype, slot.shape)

    def _slots(self, kind: str, given: Sequence[tensor_pb2.NamedTensor],
               inputs: Sequence[_Input], header_only: bool, shared: Any = None
               ) -> list[TensorSlot]:
        by_name = {}
        for k, nt in enumerate(given):
            name = nt.name
            if name in by_name:
                raise ServiceError(INVALID, f"{kind} {name!r} is given twice", f"{kind}[{k}]")
            by_name[name] = nt
        if len(by_name) != len(inputs) or any(i.name not in by_name for i in inputs):
            expected = {i.name for i in inputs}
            for k, nt in enumerate(given):
                if nt.name not in expected:
                    raise ServiceError(INVALID, f"the graph has no {_singular(kind)} input "
                                                f"named {nt.name!r}; it takes "
                                                f"{_short(sorted(expected))}", f"{kind}[{k}].name")
        limit = self.limits.max_tensor_elements
        slots = []
        for inp in inputs:
            field = inp.field
            nt = by_name.get(inp.name)
            if nt is None:
                raise ServiceError(INVALID, f"missing {_singular(kind)} {inp.name!r} "
                                            f"(a {_singular(kind).upper()} input of the graph)",
                                   field)
            t = nt.tensor
            if t.dtype != inp.wire:
                raise ServiceError(INVALID, f"dtype {serialize.dtype_name(t.dtype)} does not "
                                            f"match the graph's "
                                            f"{serialize.dtype_name(inp.wire)}", field + ".dtype")
            shape = tuple(t.shape)
            want = inp.shape
            # Only a DATA input's first dimension may be -1 (any batch size, at least 0).
            if shape != want and not (
                    kind == "data" and want[:1] == (-1,) and shape[1:] == want[1:]
                    and len(shape) == len(want) and shape[0] >= 0):
                raise ServiceError(INVALID, f"shape {list(shape)} does not match the graph's "
                                            f"{list(want)}", field + ".shape")
            n = math.prod(shape)
            if n > limit:
                raise ServiceError(EXHAUSTED, f"{n} elements is over the limit of {limit}", field)
            nbytes = n * inp.dtype.itemsize
            offset = shared.get(inp.name) if shared else None
            # Every read of a bytes field copies it: read once, decode() uses this one.
            data = t.data
            if offset is not None:
                if data:
                    key = "parameter_offsets" if kind == "parameters" else "data_offsets"
                    raise ServiceError(INVALID, f"its bytes are in shared memory "
                                                f"(shared_memory.{key}): leave data empty",
                                       field + ".data")
            elif header_only:
                if data:
                    raise ServiceError(INVALID, "a streamed request's header carries no tensor "
                                                "bytes; send them as chunk frames",
                                       field + ".data")
            elif len(data) != nbytes:
                raise ServiceError(INVALID, f"{len(data)} bytes for shape {list(shape)} of "
                                            f"{serialize.dtype_name(t.dtype)}: expected {nbytes}",
                                   field + ".data")
            slots.append(TensorSlot(field, inp.name, inp.dtype, shape, nbytes, offset,
                                    data if data else None))
        return slots

    @staticmethod
    def _check_batch(data: list[TensorSlot], inputs: Sequence[_Input]) -> None:
        batch = None
        for slot, inp in zip(data, inputs):
            if inp.shape[:1] != (-1,):
                continue
            if batch is None:
                batch = (slot.shape[0], slot.name)
            elif slot.shape[0] != batch[0]:
                raise ServiceError(INVALID, f"batch size {slot.shape[0]} does not match "
                                            f"{batch[0]} of data {batch[1]!r}",
                                   slot.field + ".shape")

    def decode(self, prepared: Prepared) -> tuple[dict, dict]:
        """A unary request's tensors as arrays: views of its bytes, of the client's shared
        memory, or the kept parameters."""
        # prepare() checked every header and byte length and kept each tensor's bytes.
        def arrays(slots):
            return {s.name: serialize.decode_data(s.data or b"", s.dtype, s.shape, s.field)
                    for s in slots if s.shared_offset is None}
        if prepared.kept is not None:
            params = {s.name: prepared.kept[s.name] for s in prepared.params}
        else:
            params = arrays(prepared.params)
        data = arrays(prepared.data)
        shared = prepared.shared
        for slots, out, key, seg_key in (
                (prepared.params, params, "parameter_offsets",
                 "parameter_segment" if shared and shared.parameter_segment else "segment"),
                (prepared.data, data, "data_offsets", "segment")):
            if len(out) == len(slots):
                continue
            buf = self._segment(getattr(shared, seg_key), f"shared_memory.{seg_key}")
            for s in slots:
                if s.shared_offset is not None:
                    a = self._view(buf, s.shared_offset, s, f"shared_memory.{key}[{s.name}]")
                    a.flags.writeable = False   # the client's memory: read, never write
                    out[s.name] = a
        return params, data

    def unary(self, request: worker_pb2.ComputeGradientsRequest, same_host: bool
              ) -> tuple[Prepared, dict, dict, dict | None]:
        """A unary request checked and decoded: ``(prepared, params, data, gradient
        views)``, the views None unless the gradients go to shared memory."""
        key = None
        if request.HasField("shared_memory") and same_host and self.segments is not None:
            key = request.SerializeToString(deterministic=True)
            hit = self._shared_calls.get(key)
            if hit is not None and self._still_valid(*hit):
                return hit[:4]
        prepared = self.prepare(request, same_host=same_host)
        params, data = self.decode(prepared)
        self.keep(prepared, request, params)
        views = self.gradient_views(prepared)
        shared = prepared.shared
        if key is not None and shared is not None and prepared.kept is None:
            names = {shared.segment, shared.parameter_segment, shared.gradient_segment} - {""}
            # Requests over segments no longer mapped (removed by their creator, or evicted)
            # go: their views would keep that memory mapped.
            mapped = self.segments.names()
            self._shared_calls.drop(lambda hit: any(n not in mapped for n, _ in hit[4]))
            self._shared_calls.put(key, (prepared, params, data, views,
                                         [(n, self.segments.get(n)) for n in names]))
        return prepared, params, data, views

    def _still_valid(self, prepared: Prepared, params, data, views, mapped) -> bool:
        """Whether a remembered shared-memory request still holds: its graph is registered
        and each segment is still the file that was mapped (else it is checked afresh)."""
        if self._graphs.get(prepared.graph_id) is None:
            return False
        try:
            return all(self.segments.get(name) is buf for name, buf in mapped)
        except sharedmem.SegmentError:
            return False

    # ------------------------------------------------------------------ compute ------

    def plan_for(self, prepared: Prepared, data: dict) -> tuple[Any, bool]:
        shapes = tuple((s.name, s.shape) for s in prepared.data)
        key = (prepared.graph_id, shapes, self.backend)
        plan = self._plans.get(key)
        if plan is not None:
            return plan, True
        with self._compile_lock:
            plan = self._plans.get(key)
            if plan is not None:
                return plan, True
            shapes = {s.name: s.shape for s in prepared.data}
            plan = core_plan.compile_plan(prepared.validated, shapes, self.backend)
            self._plans.put(key, plan)
        return plan, False

    def compute(self, prepared: Prepared, params: dict, data: dict,
                check: Callable[[], None] = _never_stop, *,
                on_forward: Callable | None = None,
                on_grad: Callable | None = None) -> Computed:
        """Run the graph. ``check()`` raises to abandon the call (deadline, cancellation);
        it is called before the forward pass, between forward and backward, and after.
        ``on_forward``/``on_grad`` are ``Plan.run``'s: the loss and outputs when forward
        ends, each gradient the moment backward has finished it."""
        plan, cached = self.plan_for(prepared, data)
        try:
            check()
            # plan.run calls check between kernels and between the passes.
            result = plan.run(params, data, grads=prepared.gradients,
                              outputs=tuple(prepared.outputs), loss_scale=prepared.loss_scale,
                              seed=prepared.seed, check=check, on_forward=on_forward,
                              on_grad=on_grad)
            check()
        except ServiceError as e:
            if e.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                self.abandoned += 1
            raise
        except (IndexError, OpError) as e:
            # What validation cannot see: values out of range for their op (an embedding
            # index, a class label, an integer power). The ops raise these on purpose with
            # a message naming the op; it is the request's fault, not the worker's.
            raise ServiceError(INVALID, f"{e}", "data" if prepared.data else "graph") from None
        outputs = [(name, result.outputs[name]) for name in prepared.outputs]
        grads = [(name, result.grads[name]) for name in prepared.gradients]
        return Computed(result.loss, outputs, grads, result.forward_seconds,
                        result.backward_seconds, cached)

    # ------------------------------------------------------------------ capabilities -

    def capabilities(self) -> worker_pb2.CapabilitiesResponse:
        versions = library_versions(self.backend)
        threads = blas_threads()
        caps = worker_pb2.CapabilitiesResponse(
            ops=sorted(REGISTRY), dtypes=sorted(_NP_OF_WIRE), backend=self.backend,
            limits=limits_message(self.limits), versions=versions, blas_threads=threads,
            build_fingerprint=build_fingerprint(self.backend, versions, threads),
            shared_memory=self.segments is not None)
        caps.limits.parameter_cache_bytes = self.kept.capacity
        return caps


# ---------------------------------------------------------------------------------------
# Build identity (for the coordinator's bitwise-determinism check)
# ---------------------------------------------------------------------------------------

def library_versions(backend: str) -> dict[str, str]:
    versions = {"gradmesh": gradmesh.__version__, "python": platform.python_version(),
                "numpy": np.__version__, "grpcio": grpc.__version__}
    if backend == "cuda":
        cp = core_backend.cupy()
        versions["cupy"] = cp.__version__
        try:
            versions["cuda_runtime"] = str(cp.cuda.runtime.runtimeGetVersion())
            versions["gpu"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception:  # noqa: BLE001  (informational only)
            pass
    return versions


def _blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [i for i in threadpool_info() if i.get("user_api") == "blas"]


def blas_threads() -> int:
    """Threads of NumPy's BLAS (threadpoolctl if installed, else the usual env vars)."""
    info = _blas_info()
    if info:
        return int(info[0].get("num_threads") or 0)
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1


def build_fingerprint(backend: str, versions: dict[str, str], threads: int) -> str:
    """SHA-256 over everything that can change results bit for bit."""
    blas = [(i.get("internal_api"), i.get("version"), i.get("architecture"))
            for i in _blas_info()]
    parts = [backend, sorted(versions.items()), blas, threads, platform.machine(),
             sys.byteorder]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Encoding responses
# ---------------------------------------------------------------------------------------

def build_response(prepared: Prepared, computed: Computed, *, with_data: bool = True
                   ) -> tuple[worker_pb2.ComputeGradientsResponse, list[np.ndarray]]:
    """The response message, and its tensors in the header's order (for streaming)."""
    def enc(array) -> tensor_pb2.Tensor:
        return serialize.to_proto(array, data=with_data)
    arrays = [computed.loss] + [a for _, a in computed.outputs] + \
             [a for _, a in computed.gradients]
    resp = worker_pb2.ComputeGradientsResponse(
        loss=enc(computed.loss),
        outputs=[tensor_pb2.NamedTensor(name=n, tensor=enc(a)) for n, a in computed.outputs],
        gradients=[tensor_pb2.NamedTensor(name=n, tensor=enc(a))
                   for n, a in computed.gradients],
        graph_id=prepared.graph_id)
    return resp, arrays


def _response_arrays(computed: Computed) -> list[np.ndarray]:
    return [computed.loss] + [a for _, a in computed.outputs] + \
        [a for _, a in computed.gradients]


def response_pieces(computed: Computed) -> list:
    """Fields 1-3 (loss, outputs, gradients) of the ``ComputeGradientsResponse`` as pieces
    whose ``b"".join`` is what protobuf writes; the arrays' bytes are not copied yet."""
    pieces = serialize.encode_tensor_field(1, computed.loss)
    for name, a in computed.outputs:
        pieces += serialize.encode_tensor_field(2, a, name)
    for name, a in computed.gradients:
        pieces += serialize.encode_tensor_field(3, a, name)
    return pieces


# ---------------------------------------------------------------------------------------
# The gRPC servicer
# ---------------------------------------------------------------------------------------

def _same_host(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5123", "unix:...") is on this host."""
    return peer.startswith(("ipv4:127.", "ipv6:[::1]:", "ipv6:[::ffff:127.", "unix:"))


def _deadline_check(context: grpc.ServicerContext) -> Callable[[], None]:
    def check() -> None:
        if not context.is_active():
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "the call's deadline passed; computation abandoned")
            raise ServiceError(grpc.StatusCode.CANCELLED,
                               "the call was cancelled; computation abandoned")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "the call's deadline passed; computation abandoned")
    return check


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """gRPC adapter over a :class:`GradientWorker`."""

    def __init__(self, worker: GradientWorker):
        self.worker = worker
        # Streamed requests' tensors land in memory reused from call to call.
        self.receive_buffers = serialize.BufferPool(RECEIVE_POOL_BYTES)

    def RegisterGraph(self, request, context):
        if not request.HasField("graph"):
            raise ServiceError(INVALID, "graph is missing", "graph")
        return worker_pb2.RegisterGraphResponse(graph_id=self.worker.register(request.graph))

    def Capabilities(self, request, context):
        return self.worker.capabilities()

    def ComputeGradients(self, request, context):
        check = _deadline_check(context)
        t0 = time.perf_counter()
        prepared, params, data, views = self.worker.unary(
            request, same_host=request.HasField("shared_memory")
            and _same_host(context.peer()))
        runtime.metric("transport", "unary" if prepared.shared is None else "shared_memory")
        t1 = time.perf_counter()
        if views is not None:
            return self._compute_into(prepared, params, data, views, check, t1 - t0)
        computed = self.worker.compute(prepared, params, data, check)
        t2 = time.perf_counter()
        # An upper bound of the encoded size, known before anything is encoded: per
        # tensor its bytes, its name and shape, and at most 32 bytes of tags and lengths;
        # 256 for the graph id and timings.
        size = 256 + sum(a.nbytes + 10 * a.ndim + 32 for a in _response_arrays(computed)) + \
            sum(len(n.encode()) for n, _ in computed.outputs + computed.gradients)
        if size > self.worker.limits.max_message_bytes:
            # Name what made it big: the extra outputs if any were asked for.
            field = "outputs" if sum(a.nbytes for _, a in computed.outputs) > \
                sum(a.nbytes for _, a in computed.gradients) else "gradients"
            raise ServiceError(EXHAUSTED, f"the response is about {size} bytes, over the unary "
                                          f"limit of {self.worker.limits.max_message_bytes}; "
                                          f"use ComputeGradientsStream", field)
        pieces = response_pieces(computed)
        tail = worker_pb2.ComputeGradientsResponse(graph_id=prepared.graph_id)
        _timings(tail, computed, t1 - t0, time.perf_counter() - t2)
        # Timings and graph id (fields 4, 5) after the tensors (fields 1-3), as protobuf
        # orders them; the join is the one copy of the tensors' bytes before gRPC's.
        pieces.append(tail.SerializeToString())
        return b"".join(pieces)

    def _compute_into(self, prepared: Prepared, params: dict, data: dict,
                      views: dict[str, np.ndarray], check: Callable[[], None],
                      decode_seconds: float) -> worker_pb2.ComputeGradientsResponse:
        """Run the plan writing each gradient into the client's segment the moment backward
        has finished it (the copy overlaps the rest of backward)."""
        def on_grad(name, array) -> None:
            view = views[name]
            if (array.dtype, array.shape) != (view.dtype, view.shape):
                raise ServiceError(grpc.StatusCode.INTERNAL, f"gradient {name!r} came out "
                                   f"as {array.dtype} {list(array.shape)}, the parameter "
                                   f"is {view.dtype} {list(view.shape)}")
            view[...] = array if isinstance(array, np.ndarray) else array.get()

        computed = self.worker.compute(prepared, params, data, check, on_grad=on_grad)
        resp = worker_pb2.ComputeGradientsResponse(
            loss=serialize.to_proto(computed.loss),
            outputs=[tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a))
                     for n, a in computed.outputs],
            gradients=[tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a, data=False))
                       for n, a in computed.gradients],
            graph_id=prepared.graph_id, gradients_in_shared_memory=True)
        _timings(resp, computed, decode_seconds, 0.0)
        return resp

    def ComputeGradientsStream(self, request_iterator, context):
        check = _deadline_check(context)
        limits = self.worker.limits
        t0 = time.perf_counter()
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "request":
            raise ServiceError(INVALID, "the first frame of a stream must be the request "
                                        "header" + _undecodable(first), "request")
        request = first.request
        prepared = self.worker.prepare(request, header_only=True)
        runtime.metric("transport", "stream")
        # Checks every limit from the header, then allocates each tensor once, in memory
        # that earlier streams used when it is free (nothing refers to it any more).
        assembler = serialize.Assembler(request, limits.max_stream_bytes,
                                        tensor_fields=("parameters", "data"),
                                        max_elements=limits.max_tensor_elements,
                                        allocate=self.receive_buffers.allocate)
        add = assembler.add
        for frame in request_iterator:
            if frame.WhichOneof("kind") != "chunk":
                raise ServiceError(INVALID, "after the header only chunk frames may follow"
                                   + _undecodable(frame), "chunk")
            add(frame.chunk)
        arrays = {slot.path: a for slot, a in zip(assembler.slots, assembler.finish())}
        params = {s.name: arrays[s.field] if prepared.kept is None else prepared.kept[s.name]
                  for s in prepared.params}
        data = {s.name: arrays[s.field] for s in prepared.data}
        self.worker.keep(prepared, request, params)
        t1 = time.perf_counter()
        if request.stream_gradients_early:
            yield from self._stream_early(prepared, params, data, check, t1 - t0)
            return
        computed = self.worker.compute(prepared, params, data, check)
        t2 = time.perf_counter()
        resp, out_arrays = build_response(prepared, computed, with_data=False)
        _timings(resp, computed, t1 - t0, 0.0)
        yield worker_pb2.StreamFrame(response=resp)
        yield from serialize.chunk_frames(out_arrays, limits.chunk_bytes)


    def _stream_early(self, prepared: Prepared, params: dict, data: dict,
                      check: Callable[[], None], decode_seconds: float):
        """The reply of a ``stream_gradients_early`` request (see worker.proto): the header
        from the plan (gradients in the order backward finishes them), then the chunks of
        the loss and outputs when forward ends and of each gradient as soon as it is final,
        then a frame with the timings.

        The plan runs on a thread of its own and hands arrays over through a queue, while
        this generator (gRPC's thread for the call) encodes and sends them: sending a
        gradient overlaps the backward of the layers before it.
        """
        worker = self.worker
        chunk_bytes = worker.limits.chunk_bytes
        plan, _ = worker.plan_for(prepared, data)
        order = plan.grad_order(prepared.gradients, tuple(prepared.outputs))
        header = _early_header(plan, prepared, order)
        yield worker_pb2.StreamFrame(response=header)

        items: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def stoppable_check() -> None:
            if stop.is_set():
                raise ServiceError(grpc.StatusCode.CANCELLED,
                                   "the reply stream was closed; computation abandoned")
            check()

        def on_forward(loss, outputs) -> None:
            items.put([loss] + [outputs[n] for n in prepared.outputs])

        expected = {nt.name: (serialize.PROTO_TO_DTYPE[nt.tensor.dtype].np,
                              tuple(nt.tensor.shape)) for nt in header.gradients}

        def on_grad(name, array) -> None:
            if (array.dtype, array.shape) != expected[name]:
                # The header promised these bytes; never send others under its name.
                raise ServiceError(grpc.StatusCode.INTERNAL, f"gradient {name!r} came out "
                                   f"as {array.dtype} {list(array.shape)}, the header said "
                                   f"{expected[name][0]} {list(expected[name][1])}")
            items.put([array])

        def run() -> None:
            try:
                items.put(worker.compute(prepared, params, data, stoppable_check,
                                         on_forward=on_forward, on_grad=on_grad))
            except BaseException as e:  # noqa: BLE001  (re-raised on the gRPC thread)
                items.put(e)

        thread = threading.Thread(target=run, daemon=True, name="gradmesh-plan")
        thread.start()
        index = 0           # header index of the next tensor
        try:
            while True:
                item = items.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Computed):
                    computed = item
                    break
                yield from serialize.chunk_frames(item, chunk_bytes, index)
                index += len(item)
            t2 = time.perf_counter()
            tail = worker_pb2.ComputeGradientsResponse(graph_id=prepared.graph_id)
            _timings(tail, computed, decode_seconds, 0.0)
            tail.timings.encode_seconds = time.perf_counter() - t2  # only what is not overlapped
            yield worker_pb2.StreamFrame(response=tail)
        finally:
            stop.set()      # the client went away or an error: the plan stops at its next check


def _early_header(plan, prepared: Prepared, order: Sequence[str]
                  ) -> worker_pb2.ComputeGradientsResponse:
    """The header of an early-streamed reply: every tensor's dtype and shape, from the
    compiled plan, before anything is computed; gradients in ``order``."""
    vg = plan.graph
    loss_name = vg.graph.outputs[0].name

    def header(spec) -> tensor_pb2.Tensor:
        return tensor_pb2.Tensor(dtype=serialize.DTYPE_TO_PROTO[spec.dtype],
                                 shape=[int(d) for d in spec.shape])
    return worker_pb2.ComputeGradientsResponse(
        loss=header(plan.specs[vg.outputs[loss_name]]),
        outputs=[tensor_pb2.NamedTensor(name=n, tensor=header(plan.specs[vg.outputs[n]]))
                 for n in prepared.outputs],
        gradients=[tensor_pb2.NamedTensor(name=n, tensor=header(
            plan.specs[vg.input_index[n]])) for n in order],
        graph_id=prepared.graph_id)


def _timings(resp, computed: Computed, decode: float, encode: float) -> None:
    resp.timings.decode_seconds = decode
    resp.timings.forward_seconds = computed.forward_seconds
    resp.timings.backward_seconds = computed.backward_seconds
    resp.timings.encode_seconds = encode
    resp.timings.plan_cached = computed.plan_cached


class _UndecodableFrame:
    """What the stream's deserializer gives for bytes that are no ``StreamFrame``: gRPC
    answers INTERNAL when a deserializer raises, but a malformed frame is the client's
    fault, so the servicer answers INVALID_ARGUMENT instead (``WhichOneof`` is None)."""
    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error

    def WhichOneof(self, _name: str) -> None:  # noqa: N802  (protobuf's spelling)
        return None


def _decode_request_frame(buf: bytes):
    try:
        return serialize.decode_stream_frame(buf)
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError, or a fast-path error)
        return _UndecodableFrame(f"{type(e).__name__}: {e}")


def _undecodable(frame) -> str:
    """The error text for a frame that could not be decoded ("" for any other frame)."""
    if isinstance(frame, _UndecodableFrame):
        return f" (a frame was not a valid StreamFrame: {frame.error})"
    return ""


def add_to_server(servicer: WorkerService, server: grpc.Server) -> None:
    """``add_WorkerServicer_to_server`` with gradmesh's codec for tensor bytes: the same
    bytes on the wire, fewer copies (see the wire codec in ``gradmesh.core.serialize``)."""
    handlers = {
        "RegisterGraph": grpc.unary_unary_rpc_method_handler(
            servicer.RegisterGraph,
            request_deserializer=worker_pb2.RegisterGraphRequest.FromString,
            response_serializer=worker_pb2.RegisterGraphResponse.SerializeToString),
        "ComputeGradients": grpc.unary_unary_rpc_method_handler(
            servicer.ComputeGradients,
            request_deserializer=worker_pb2.ComputeGradientsRequest.FromString,
            response_serializer=serialize.serialize_message),
        "ComputeGradientsStream": grpc.stream_stream_rpc_method_handler(
            servicer.ComputeGradientsStream,
            request_deserializer=_decode_request_frame,
            response_serializer=serialize.serialize_message),
        "Capabilities": grpc.unary_unary_rpc_method_handler(
            servicer.Capabilities,
            request_deserializer=worker_pb2.CapabilitiesRequest.FromString,
            response_serializer=worker_pb2.CapabilitiesResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


# ---------------------------------------------------------------------------------------
# Starting a worker (tests, embedding) and the CLI
# ---------------------------------------------------------------------------------------

_WORKER_KEYS = {"limits", "graph_cache_size", "plan_cache_size", "shared_memory",
                "parameter_cache_bytes"}


def start(backend: str = "cpu", *, config: runtime.ServerConfig | None = None,
          **kw) -> runtime.RunningServer:
    """Start a worker in this process (default 127.0.0.1, a free port).

    Keyword arguments set :class:`~gradmesh.server.runtime.ServerConfig` fields, or the
    worker's ``limits`` (:class:`WorkerLimits`), ``graph_cache_size``, ``plan_cache_size``,
    ``shared_memory``, ``parameter_cache_bytes``.
    The returned server has ``.address`` and ``.worker`` (the :class:`GradientWorker`).
    """
    worker_kw = {k: kw.pop(k) for k in list(kw) if k in _WORKER_KEYS}
    config = config or runtime.ServerConfig(**kw)
    limits = dataclasses.replace(worker_kw.pop("limits", None) or WorkerLimits(),
                                 max_message_bytes=config.max_message_bytes,
                                 max_concurrent_requests=config.max_concurrent_requests)
    worker = GradientWorker(backend, limits, **worker_kw)
    running = runtime.serve(config, [(add_to_server, WorkerService(worker), SERVICE_NAME)])
    running.worker = worker
    return running


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradmesh worker`` (each also settable as GRADMESH_<FLAG>)."""
    runtime.add_server_arguments(parser, DEFAULT_PORT)
    d = runtime.env_default
    dl = WorkerLimits()
    g = parser.add_argument_group("worker")
    g.add_argument("--backend", choices=BACKENDS, default=d("backend", "cpu"),
                   help="cpu (NumPy) or cuda (CuPy)")
    g.add_argument("--max-graph-nodes", type=int, default=d("max-graph-nodes",
                                                            dl.max_graph_nodes))
    g.add_argument("--max-tensor-elements", type=int,
                   default=d("max-tensor-elements", dl.max_tensor_elements))
    g.add_argument("--max-stream-bytes", type=int,
                   default=d("max-stream-bytes", dl.max_stream_bytes))
    g.add_argument("--chunk-bytes", type=int, default=d("chunk-bytes", dl.chunk_bytes),
                   help="chunk size of streamed responses, 1-4 MiB")
    g.add_argument("--graph-cache-size", type=int, default=d("graph-cache-size", 256))
    g.add_argument("--plan-cache-size", type=int, default=d("plan-cache-size", 64))
    g.add_argument("--shared-memory", choices=("on", "off"),
                   default=d("shared-memory", "on"),
                   help="take tensors in shared memory (/dev/shm) from callers on this "
                        "host; off: bytes in messages only (docs/worker.md)")
    g.add_argument("--parameter-cache-bytes", type=int,
                   default=d("parameter-cache-bytes", 1 << 30),
                   help="bytes of parameters kept for requests that name a parameter_set "
                        "(a coordinator sending several micro-batches; default 1 GiB)")
    g.add_argument("--blas-threads", type=int, default=d("blas-threads", None),
                   help="fix NumPy's BLAS thread count (workers of a job must agree)")
    g.add_argument("--coordinator", default=d("coordinator", None),
                   help="register with this coordinator (host:port) and send heartbeats, "
                        "instead of being named in its --workers list")
    g.add_argument("--advertise", default=d("advertise", None),
                   help="the address the coordinator should dial (default: the bound "
                        "address; in Kubernetes, $(POD_IP):PORT)")
    runtime.add_peer_arguments(parser, "the coordinator (--coordinator)")


def run(args: argparse.Namespace) -> int:
    """``gradmesh worker``: serve until SIGTERM/SIGINT."""
    config = runtime.config_from_args(args)
    runtime.configure_logging(config)
    if args.blas_threads:
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.blas_threads, user_api="blas")
        except ImportError:
            print("warning: --blas-threads needs threadpoolctl; set OPENBLAS_NUM_THREADS "
                  "instead", file=sys.stderr)
    if args.parameter_cache_bytes < 0:
        print("error: --parameter-cache-bytes must be >= 0 (0 keeps no parameters)",
              file=sys.stderr)
        return 2
    limits = WorkerLimits(max_graph_nodes=args.max_graph_nodes,
                          max_tensor_elements=args.max_tensor_elements,
                          max_stream_bytes=args.max_stream_bytes, chunk_bytes=args.chunk_bytes)
    try:
        peer = runtime.peer_config_from_args(args, config)
        running = start(args.backend, config=config, limits=limits,
                        graph_cache_size=args.graph_cache_size,
                        plan_cache_size=args.plan_cache_size,
                        shared_memory=args.shared_memory == "on",
                        parameter_cache_bytes=args.parameter_cache_bytes)
    except runtime.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"gradmesh worker ({args.backend}) listening on {running.address}", flush=True)
    registration = None
    if args.coordinator:
        from gradmesh.client.coordinator import WorkerRegistration
        registration = WorkerRegistration(args.coordinator, args.advertise or running.address,
                                          token=peer.token, tls=peer.tls).start()
    try:
        running.wait()
    finally:
        if registration is not None:
            registration.stop()
    return 0


def _check_requested(field: str, requested: Sequence[str], known: list[str],
                     unknown: str) -> None:
    """Each requested name (a gradient, an output) is known and asked for once."""
    seen: set[str] = set()
    for k, name in enumerate(requested):
        if name in seen:
            raise ServiceError(INVALID, f"{field[:-1]} {name!r} is requested twice",
                               f"{field}[{k}]")
        if name not in known:
            raise ServiceError(INVALID, unknown.format(name, _short(known)), f"{field}[{k}]")
        seen.add(name)


def _short(names: Sequence[str], n: int = 8) -> str:
    names = list(names)
    return str(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


def _singular(kind: str) -> str:
    return {"parameters": "param", "data": "data"}[kind]

