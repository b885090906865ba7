"""Per-request budgets: a call whose plan would hold more bytes or do more FLOPs than the
worker allows (``--max-request-bytes``, ``--max-request-flops``) is refused with
RESOURCE_EXHAUSTED before anything runs. The cost comes from shape inference
(:mod:`gradmesh.core.cost`) and is kept with the plan."""

from __future__ import annotations

import grpc

from gradmesh.core import cost as core_cost
from gradmesh.server.runtime.errors import ServiceError

GiB = 1 << 30
DEFAULT_MAX_REQUEST_BYTES = 4 * GiB
DEFAULT_MAX_REQUEST_FLOPS = 10**12


def check(plan, limits) -> core_cost.Cost:
    """Raise RESOURCE_EXHAUSTED (field: the limit) if ``plan`` is over ``limits``' budgets."""
    cost = core_cost.cost_of(plan)
    max_bytes = getattr(limits, "max_request_bytes", None)
    max_flops = getattr(limits, "max_request_flops", None)
    if max_bytes and cost.bytes > max_bytes:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request over the memory budget: it needs up to {cost.bytes} bytes "
            f"({cost.bytes / GiB:.2f} GiB) by shape inference, the limit max_request_bytes "
            f"is {max_bytes}; send smaller batches or raise the worker's "
            f"--max-request-bytes (GRADMESH_MAX_REQUEST_BYTES)",
            "max_request_bytes",
        )
    if max_flops and cost.flops > max_flops:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request over the compute budget: it needs {cost.flops:.3g} FLOPs by shape "
            f"inference, the limit max_request_flops is {max_flops:.3g}; send smaller "
            f"batches or raise the worker's --max-request-flops (GRADMESH_MAX_REQUEST_FLOPS)",
            "max_request_flops",
        )
    return cost
