"""The worker's logic without gRPC: graphs, plans, request checks and computation, on
plain values (:mod:`.calls`), testable without a server."""

from __future__ import annotations

import threading
from typing import Any, Callable

import grpc
import numpy as np

from gradmesh.core import backend as core_backend
from gradmesh.core import graph as core_graph
from gradmesh.core import plan as core_plan
from gradmesh.core import serialize, sharedmem
from gradmesh.core.registry import REGISTRY, OpError
from gradmesh.server import compression as compression_mod
from gradmesh.server import runtime
from gradmesh.server.runtime import ServiceError, budget
from gradmesh.server.worker import build, checks
from gradmesh.server.worker.caches import LRU, ParameterCache
from gradmesh.server.worker.calls import (
    Capabilities,
    Computed,
    GradientRequest,
    Prepared,
    SharedMemoryRef,
    WorkerLimits,
)
from gradmesh.server.worker.checks import FAILED, INVALID, RegisteredGraph
from gradmesh.server.worker.decoding import gradient_request
from gradmesh.server.worker.residuals import ResidualStore
from gradmesh.v1 import graph_pb2
from gradmesh.wire import sharedmem as wire_shm
from gradmesh.wire import stream

BACKENDS = ("cpu", "cuda")


def check_limits(limits: WorkerLimits) -> None:
    if not 1 <= limits.chunk_bytes <= stream.MAX_CHUNK_BYTES:
        raise runtime.ConfigError(
            f"--chunk-bytes must be between {stream.MIN_CHUNK_BYTES} "
            f"and {stream.MAX_CHUNK_BYTES}, got {limits.chunk_bytes}"
        )
    if limits.chunk_bytes + stream.FRAME_OVERHEAD_BYTES > limits.max_message_bytes:
        raise runtime.ConfigError(
            f"--chunk-bytes {limits.chunk_bytes} does not fit --max-message-bytes "
            f"{limits.max_message_bytes}: a streamed reply's messages are a chunk plus "
            f"{stream.FRAME_OVERHEAD_BYTES} bytes; lower --chunk-bytes to at most "
            f"{limits.max_message_bytes - stream.FRAME_OVERHEAD_BYTES} or leave it unset "
            f"(derived from --max-message-bytes)"
        )
    for name in (
        "max_graph_nodes",
        "max_tensor_elements",
        "max_message_bytes",
        "max_stream_bytes",
        "max_concurrent_requests",
    ):
        if getattr(limits, name) < 1:
            raise runtime.ConfigError(f"{name} must be positive")


def _never_stop() -> None:
    return None


def _as_request(request) -> GradientRequest:
    # A caller holding a ComputeGradientsRequest message (tests, embedding) may pass it.
    return request if type(request) is GradientRequest else gradient_request(request)


class GradientWorker:
    """The worker's logic without gRPC: graphs, plans, request checks and computation.

    >>> w = GradientWorker("cpu")
    >>> gid = w.register(graph)                                   # doctest: +SKIP
    >>> prepared = w.prepare(GradientRequest(graph_id=gid, ...))  # doctest: +SKIP
    >>> result = w.compute(prepared, params, data)                # doctest: +SKIP
    """

    def __init__(
        self,
        backend: str = "cpu",
        limits: WorkerLimits | None = None,
        graph_cache_size: int = 256,
        plan_cache_size: int = 64,
        shared_memory: bool = True,
        parameter_cache_bytes: int = 1 << 30,
        residual_bytes: int = 1 << 30,
    ):
        if backend not in BACKENDS:
            raise runtime.ConfigError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend == "cuda" and not core_backend.cuda_available():
            raise runtime.ConfigError(
                "backend 'cuda' needs CuPy and a CUDA device; none found (install "
                "'gradmesh[cuda]' on a GPU machine, or use --backend cpu)"
            )
        self.backend = backend
        self.limits = limits or WorkerLimits()
        check_limits(self.limits)
        self._graphs = LRU(graph_cache_size)
        self._plans = LRU(plan_cache_size)
        # Compiling the same plan twice at once is harmless but wasteful.
        self._compile_lock = threading.Lock()
        self.abandoned = 0  # computations stopped by a deadline or cancellation
        # Segments named by same-host clients, kept mapped (wire/sharedmem.py).
        self.segments = wire_shm.Attached() if shared_memory and wire_shm.available() else None
        self.kept = ParameterCache(parameter_cache_bytes)
        # Error-feedback residuals of compressed replies (worker.proto, WorkerCompression).
        self.residuals = ResidualStore(residual_bytes)
        # Shared-memory requests repeat byte for byte while the client reuses its segments:
        # their checked headers and array views, by request bytes (see unary()).
        self._shared_calls = LRU(wire_shm.MAPPED_SEGMENTS)

    # ------------------------------------------------------------------ graphs -------

    def register(self, graph: graph_pb2.Graph, field: str = "graph") -> str:
        """Validate ``graph`` and remember it; returns its id (that of its canonical form,
        see graph.proto). Idempotent."""
        return self._register(graph, field).validated.id

    def _register(self, graph: graph_pb2.Graph, field: str) -> RegisteredGraph:
        given_id = core_graph.graph_id(graph)
        registered = self._graphs.get(given_id)
        if registered is None:
            try:
                validated = core_graph.validate(graph, self.limits)
            except core_graph.GraphError as e:
                # Name the field as the request has it: "graph.nodes[3].op".
                raise ServiceError(
                    runtime.status_code(e.code),
                    e.message,
                    f"{field}.{e.field}" if e.field else field,
                ) from None
            self._check_devices(graph, field)
            registered = RegisteredGraph.of(validated)
            self._graphs.put(validated.id, registered)
            if given_id != validated.id:  # sent again as it was: found without work
                self._graphs.put(given_id, registered)
        return registered

    def _check_devices(self, graph: graph_pb2.Graph, field: str) -> None:
        """FAILED_PRECONDITION for a ``to_device`` to a device this worker lacks (a CPU
        worker has no CUDA), naming the node, before anything runs."""
        if self.backend == "cuda":
            return
        for i, node in enumerate(graph.nodes):
            if node.op != "to_device":
                continue
            for attr in node.attrs:
                if (
                    attr.name == "device"
                    and attr.WhichOneof("value") == "s"
                    and attr.s != self.backend
                ):
                    raise ServiceError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"node {i} moves a tensor to {attr.s!r}, and this worker's backend "
                        f"is {self.backend!r}: send the graph to a {attr.s} worker",
                        f"{field}.nodes[{i}].attrs.device",
                    )

    def lookup(self, graph_id: str, field: str = "graph_id"):
        """The validated graph of a registered id (NOT_FOUND if unknown or evicted)."""
        return self._lookup(graph_id, field).validated

    def _lookup(self, graph_id: str, field: str = "graph_id") -> RegisteredGraph:
        registered = self._graphs.get(graph_id)
        if registered is None:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown graph id {graph_id!r}: register the graph first "
                f"(RegisterGraph) or send it inline",
                field,
            )
        return registered

    def _graph_of(self, request: GradientRequest) -> RegisteredGraph:
        if request.graph is not None:
            return self._register(request.graph, "graph")
        if request.graph_id is not None:
            return self._lookup(request.graph_id)
        raise ServiceError(
            INVALID,
            "the request names no graph: set graph_id (after RegisterGraph) or graph",
            "graph_ref",
        )

    # ------------------------------------------------------------------ requests -----

    def prepare(
        self, request: GradientRequest, header_only: bool = False, same_host: bool = False
    ) -> Prepared:
        """Check a request against its graph before any tensor is decoded.

        Names, dtypes, shapes, batch sizes, element counts and (for unary requests) byte
        lengths are all checked here, so a bad or oversized request costs nothing.
        ``same_host``: the caller is on this host, so it may name shared-memory segments.
        """
        request = _as_request(request)
        registered = self._graph_of(request)
        param_inputs, data_inputs = registered.params, registered.data
        shared = request.shared_memory
        if request.compression is not None and shared is not None and shared.gradient_segment:
            raise ServiceError(
                INVALID,
                "compressed gradients come back as bytes: leave "
                "shared_memory.gradient_segment empty or drop compression",
                "compression",
            )
        if shared is not None:
            self._check_shared(
                shared,
                header_only,
                same_host,
                {i.name for i in param_inputs},
                {i.name for i in data_inputs},
            )
        limit = self.limits.max_tensor_elements
        kept = None
        if request.parameter_set and not request.parameters:
            kept = self._kept(request)
            params = checks.kept_slots(kept, param_inputs)
        else:
            params = checks.tensor_slots(
                "parameters",
                request.parameters,
                param_inputs,
                header_only,
                shared.parameter_offsets if shared else {},
                limit,
            )
        data = checks.tensor_slots(
            "data",
            request.data,
            data_inputs,
            header_only,
            shared.data_offsets if shared else {},
            limit,
        )
        checks.check_batch(data, data_inputs)
        gradients = self._requested(request, registered)
        if shared is not None and shared.gradient_segment:
            checks.check_gradient_offsets(shared, gradients)
        scale = checks.check_loss_scale(request.loss_scale)
        prepared = Prepared(
            registered.validated.id,
            registered.validated,
            params,
            data,
            gradients,
            list(request.outputs),
            scale,
            request.seed,
            shared,
            kept,
            request.compression,
        )
        budget.check(self.plan_for(prepared, None)[0], self.limits)  # before any decoding
        return prepared

    def _kept(self, request: GradientRequest) -> dict:
        """The parameters kept for the set a request names (FAILED_PRECONDITION if none)."""
        kept = self.kept.get((request.parameter_set, request.parameter_version))
        runtime.metric("kept", "miss" if kept is None else "hit")
        if kept is None:
            raise ServiceError(
                FAILED,
                f"no parameters are kept for set "
                f"{request.parameter_set!r} version "
                f"{request.parameter_version} (evicted, or the "
                f"worker restarted): send them",
                "parameters",
            )
        return kept

    @staticmethod
    def _requested(request: GradientRequest, registered: RegisteredGraph) -> list[str]:
        """The gradients to return (default: every parameter's), outputs checked too."""
        param_names = registered.param_names
        checks.check_requested(
            "gradients",
            request.gradients,
            param_names,
            "no parameter named {!r} to take a gradient for; the graph's parameters are {}",
        )
        checks.check_requested(
            "outputs",
            request.outputs,
            registered.output_names,
            "no output named {!r}; the graph's outputs are {}",
        )
        return list(request.gradients) or param_names

    def keep(self, prepared: Prepared, request: GradientRequest, params: dict) -> None:
        """Keep a request's parameters when it asks for it (``parameter_set``)."""
        if (
            request.parameter_set
            and prepared.kept is None
            and all(s.shared_offset is None for s in prepared.params)
        ):
            for a in params.values():
                a.flags.writeable = False  # shared by later calls
            self.kept.put((request.parameter_set, request.parameter_version), dict(params))

    def _check_shared(
        self,
        shared: SharedMemoryRef,
        header_only: bool,
        same_host: bool,
        param_names: set[str],
        data_names: set[str],
    ) -> None:
        checks.check_shared_memory(
            shared, header_only, same_host, self.segments is not None, param_names, data_names
        )

    def _segment(self, name: str, field: str):
        assert self.segments is not None  # shared-memory requests are refused without
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
            views[name] = checks.segment_view(
                buf, offset, slot, f"shared_memory.gradient_offsets[{name}]"
            )
        return views

    def decode(self, prepared: Prepared) -> tuple[dict, dict]:
        """A unary request's tensors as arrays: views of its bytes, of the client's shared
        memory, or the kept parameters."""

        # prepare() checked every header and byte length and kept each tensor's bytes.
        def arrays(slots):
            return {
                s.name: serialize.decode_data(s.data or b"", s.dtype, s.shape, s.field)
                for s in slots
                if s.shared_offset is None
            }

        if prepared.kept is not None:
            params = {s.name: prepared.kept[s.name] for s in prepared.params}
        else:
            params = arrays(prepared.params)
        data = arrays(prepared.data)
        shared = prepared.shared
        for slots, out, key, seg_key in (
            (
                prepared.params,
                params,
                "parameter_offsets",
                "parameter_segment" if shared and shared.parameter_segment else "segment",
            ),
            (prepared.data, data, "data_offsets", "segment"),
        ):
            if len(out) == len(slots):
                continue
            buf = self._segment(getattr(shared, seg_key), f"shared_memory.{seg_key}")
            for s in slots:
                if s.shared_offset is not None:
                    a = checks.segment_view(
                        buf, s.shared_offset, s, f"shared_memory.{key}[{s.name}]"
                    )
                    a.flags.writeable = False  # the client's memory: read, never write
                    out[s.name] = a
        return params, data

    def unary(
        self, request: GradientRequest, same_host: bool
    ) -> tuple[Prepared, dict, dict, dict | None]:
        """A unary request checked and decoded: ``(prepared, params, data, gradient
        views)``, the views None unless the gradients go to shared memory."""
        request = _as_request(request)
        key = None
        if request.repeat_key is not None and same_host and self.segments is not None:
            key = request.repeat_key
            hit = self._shared_calls.get(key)
            if hit is not None and self._still_valid(*hit):
                return hit[:4]
        prepared = self.prepare(request, same_host=same_host)
        params, data = self.decode(prepared)
        self.keep(prepared, request, params)
        views = self.gradient_views(prepared)
        if key is not None and prepared.shared is not None and prepared.kept is None:
            self._remember(key, prepared, params, data, views)
        return prepared, params, data, views

    def _remember(
        self, key: bytes, prepared: Prepared, params: dict, data: dict, views: dict | None
    ) -> None:
        """Remember a shared-memory request's checked header and views, for its repeats."""
        shared = prepared.shared
        assert shared is not None and self.segments is not None  # a shared-memory request
        names = {shared.segment, shared.parameter_segment, shared.gradient_segment} - {""}
        # Requests over segments no longer mapped (removed by their creator, or evicted)
        # go: their views would keep that memory mapped.
        mapped = self.segments.names()
        self._shared_calls.drop(lambda hit: any(n not in mapped for n, _ in hit[4]))
        self._shared_calls.put(
            key, (prepared, params, data, views, [(n, self.segments.get(n)) for n in names])
        )

    def _still_valid(self, prepared: Prepared, params, data, views, mapped) -> bool:
        """Whether a remembered shared-memory request still holds: its graph is registered
        and each segment is still the file that was mapped (else it is checked afresh)."""
        segments = self.segments
        if segments is None or self._graphs.get(prepared.graph_id) is None:
            return False
        try:
            return all(segments.get(name) is buf for name, buf in mapped)
        except sharedmem.SegmentError:
            return False

    # ------------------------------------------------------------------ compute ------

    def plan_for(self, prepared: Prepared, data: dict | None) -> tuple[Any, bool]:
        key = (prepared.graph_id, tuple((s.name, s.shape) for s in prepared.data), self.backend)
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

    def compute(
        self,
        prepared: Prepared,
        params: dict,
        data: dict,
        check: Callable[[], None] = _never_stop,
        *,
        on_forward: Callable | None = None,
        on_grad: Callable | None = None,
    ) -> Computed:
        """Run the graph. ``check()`` raises to abandon the call (deadline, cancellation);
        it is called before the forward pass, between forward and backward, and after.
        ``on_forward``/``on_grad`` are ``Plan.run``'s: the loss and outputs when forward
        ends, each gradient the moment backward has finished it."""
        plan, cached = self.plan_for(prepared, data)
        try:
            check()
            # plan.run calls check between kernels and between the passes.
            result = plan.run(
                params,
                data,
                grads=prepared.gradients,
                outputs=tuple(prepared.outputs),
                loss_scale=prepared.loss_scale,
                seed=prepared.seed,
                check=check,
                on_forward=on_forward,
                on_grad=on_grad,
            )
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
        unused = plan.unused_gradients(prepared.gradients, tuple(prepared.outputs))
        computed = Computed(
            result.loss,
            outputs,
            grads,
            result.forward_seconds,
            result.backward_seconds,
            cached,
            list(result.buffers.items()),
            unused,
        )
        return self._compress(prepared, computed)

    def _compress(self, prepared: Prepared, computed: Computed) -> Computed:
        """With the request's compression, the used gradients compressed with error
        feedback (the unused ones stay dense zeros, as the coordinator leaves them)."""
        call = prepared.compression
        if call is None:
            return computed
        unused = set(computed.unused)
        used = [(n, g) for n, g in computed.gradients if n not in unused]
        computed.compressed = self.residuals.compress(call, used)
        computed.compression = call.spec["kind"]
        computed.gradients = [(n, g) for n, g in computed.gradients if n in unused]
        return computed

    # ------------------------------------------------------------------ capabilities -

    def capabilities(self) -> Capabilities:
        versions = build.library_versions(self.backend)
        threads = build.blas_threads()
        return Capabilities(
            ops=sorted(REGISTRY),
            dtypes=sorted(checks.NP_OF_WIRE),
            backend=self.backend,
            limits=self.limits,
            parameter_cache_bytes=self.kept.capacity,
            versions=versions,
            blas_threads=threads,
            build_fingerprint=build.build_fingerprint(self.backend, versions, threads),
            shared_memory=self.segments is not None,
            residual_bytes=self.residuals.capacity,
            compression_kinds=compression_mod.KINDS,
        )
