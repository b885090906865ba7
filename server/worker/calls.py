"""A gradient call as plain values: what :class:`~.logic.GradientWorker` takes and gives.

``decoding`` makes a :class:`GradientRequest` of a ``ComputeGradientsRequest`` (no tensor
bytes are copied beyond the one read protobuf makes of each); ``replies`` makes messages
of :class:`Computed` and :class:`Capabilities`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from gradmesh.core import graph as core_graph
from gradmesh.v1 import graph_pb2

# The worker's limits (graph size, tensor elements, message and stream bytes, concurrency,
# chunk size) are core.graph.Limits, which validation reads and Capabilities reports.
WorkerLimits = core_graph.Limits


@dataclass(slots=True)
class TensorRef:
    """A request tensor as sent: its name, wire dtype (the tensor.proto enum), shape, and
    bytes (empty when they come in chunks or lie in shared memory)."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    data: bytes = b""


@dataclass(slots=True)
class SharedMemoryRef:
    """Where a same-host caller put a request's tensors and wants the gradients (the
    segments' names and each tensor's byte offset; worker.proto's ``SharedMemory``)."""

    segment: str = ""
    parameter_segment: str = ""
    gradient_segment: str = ""
    parameter_offsets: Mapping[str, int] = field(default_factory=dict)
    data_offsets: Mapping[str, int] = field(default_factory=dict)
    gradient_offsets: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class GradientRequest:
    """A ``ComputeGradients`` request: the graph (by id, or inline), the tensors, what to
    return. Field meanings as in worker.proto's ``ComputeGradientsRequest``."""

    graph_id: str | None = None  # None: not given (the graph may be)
    graph: graph_pb2.Graph | None = None
    parameters: list[TensorRef] = field(default_factory=list)
    data: list[TensorRef] = field(default_factory=list)
    gradients: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    loss_scale: float = 0.0  # 0 means 1
    seed: int = 0
    shared_memory: SharedMemoryRef | None = None
    parameter_set: str = ""
    parameter_version: int = 0
    stream_gradients_early: bool = False
    # Identifies a request sent again byte for byte (a client reusing its segments), so its
    # checked header can be reused; None: never reused.
    repeat_key: bytes | None = None
    # The reply's gradients compressed with error feedback (residuals.CompressionRequest);
    # None: dense.
    compression: Any = None


@dataclass
class TensorSlot:
    """A request tensor checked against the graph: where its bytes go and what they are."""

    field: str  # "parameters[w1]"
    name: str
    dtype: np.dtype
    shape: tuple
    nbytes: int
    shared_offset: int | None = None  # where its bytes are in the shared segment
    data: bytes | None = None  # a unary request's bytes for it, read once


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
    # The request's shared memory, when it has one (see worker.proto).
    shared: SharedMemoryRef | None = None
    # The parameters kept from an earlier call, when the request names them instead.
    kept: dict | None = None
    # The request's compression (residuals.CompressionRequest), when it has one.
    compression: Any = None

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
    # The new values of the buffers the graph updates (worker.proto, buffers).
    buffers: list[tuple[str, np.ndarray]] = field(default_factory=list)
    # Requested parameters the loss does not depend on (their gradients are zeros).
    unused: tuple[str, ...] = ()
    # With compression: (name, int32 words) of the compressed gradients (not in
    # ``gradients`` then), and their encoding ("topk" or "sign").
    compressed: list[tuple[str, np.ndarray]] = field(default_factory=list)
    compression: str = ""

    def arrays(self) -> list[np.ndarray]:
        """The loss, the outputs, the gradients, the buffers and the compressed gradients,
        in a reply's order."""
        return (
            [self.loss]
            + [a for _, a in self.outputs]
            + [a for _, a in self.gradients]
            + [a for _, a in self.buffers]
            + [a for _, a in self.compressed]
        )


@dataclass
class Capabilities:
    """What a worker can do and what it is built from (``Capabilities``' reply)."""

    ops: list[str]
    dtypes: list[int]  # tensor.proto DType values
    backend: str
    limits: WorkerLimits
    parameter_cache_bytes: int
    versions: dict[str, str]
    blas_threads: int
    build_fingerprint: str
    shared_memory: bool
    residual_bytes: int = 0
    compression_kinds: tuple[str, ...] = ()
