"""gradmesh.client: the Python SDK for gradmesh services.

>>> from gradmesh.client import WorkerClient
>>> with WorkerClient("127.0.0.1:50051") as client:            # doctest: +SKIP
...     loss = client.backward(model, loss_fn, x, y)
"""

# The errors and TLS settings are the wire layer's (gradmesh.wire), part of the SDK's API.
from gradmesh.wire.channel import TLS
from gradmesh.wire.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    GradmeshError,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)

from .cluster import LocalCluster
from .coordinator import CoordinatorClient, Job, StepResult
from .training import batches, fit
from .worker import GradientResult, WorkerClient

__all__ = [
    "WorkerClient",
    "GradientResult",
    "TLS",
    "GradmeshError",
    "InvalidArgument",
    "ResourceExhausted",
    "NotFound",
    "Unauthenticated",
    "PermissionDenied",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "Internal",
    "FailedPrecondition",
    "AlreadyExists",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "DataLoss",
    "Unknown",
    "CoordinatorClient",
    "Job",
    "StepResult",
    "LocalCluster",
    "fit",
    "batches",
]
