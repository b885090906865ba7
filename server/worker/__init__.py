"""The gradient worker: take a graph, parameters and a batch; return loss and gradients.

``gradmesh worker --port 50051 --backend cpu`` serves it. One module per job:

- ``calls``: a gradient call as plain values (:class:`GradientRequest`, ``Prepared``,
  ``Computed``, ``Capabilities``)
- ``logic``: :class:`GradientWorker`, the work without gRPC (validate and cache graphs,
  check request tensors against the graph before anything is allocated, cache compiled
  plans, run them), testable without a server
- ``checks``: the checks of a request's header against its graph
- ``caches``: the LRU caches and the kept parameter sets
- ``residuals``: compressed replies with error feedback, the residuals kept per key
- ``decoding``: requests from messages to plain values (and a stream's frames to arrays)
- ``replies``: replies from plain values to messages: unary (sized), into shared memory,
  streamed, streamed early
- ``service``: :class:`WorkerService`, the thin gRPC servicer, and :func:`add_to_server`
- ``build``: library versions, BLAS threads, the build fingerprint
- ``command``: :func:`start` a worker in this process; ``gradmesh worker``

Errors are raised as exceptions with ``code``, ``field`` and ``message``
(:class:`~gradmesh.server.runtime.ServiceError`, ``WireError``, ``GraphError``); the
server's interceptor sends them as gRPC statuses with ``google.rpc.BadRequest`` details.
"""

from gradmesh.server.worker.build import blas_threads, build_fingerprint, library_versions
from gradmesh.server.worker.caches import ParameterCache
from gradmesh.server.worker.calls import (
    Capabilities,
    Computed,
    GradientRequest,
    Prepared,
    SharedMemoryRef,
    TensorRef,
    TensorSlot,
    WorkerLimits,
)
from gradmesh.server.worker.command import DEFAULT_PORT, add_arguments, run, start
from gradmesh.server.worker.logic import BACKENDS, GradientWorker, check_limits
from gradmesh.server.worker.replies import build_response, response_pieces
from gradmesh.server.worker.service import (
    RECEIVE_POOL_BYTES,
    SERVICE_NAME,
    WorkerService,
    add_to_server,
    same_host,
)

# The name tests used before the split into modules.
_same_host = same_host

__all__ = [
    "BACKENDS",
    "Capabilities",
    "Computed",
    "DEFAULT_PORT",
    "GradientRequest",
    "GradientWorker",
    "ParameterCache",
    "Prepared",
    "RECEIVE_POOL_BYTES",
    "SERVICE_NAME",
    "SharedMemoryRef",
    "TensorRef",
    "TensorSlot",
    "WorkerLimits",
    "WorkerService",
    "add_arguments",
    "add_to_server",
    "blas_threads",
    "build_fingerprint",
    "build_response",
    "check_limits",
    "library_versions",
    "response_pieces",
    "run",
    "same_host",
    "start",
]
