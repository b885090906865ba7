"""The size limits of a worker, checked before anything is allocated. Plain numbers: the
worker reports them in ``Capabilities`` (the server maps them onto its message)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Size limits of a worker, checked before anything is allocated."""

    max_graph_nodes: int = 10_000
    max_graph_inputs: int = 10_000
    max_tensor_elements: int = 2**31
    max_const_bytes: int = 64 << 20  # all CONST values of a graph together
    max_attr_values: int = 1 << 16  # entries of one ints/floats attribute
    max_message_bytes: int = 64 << 20  # largest unary message
    max_stream_bytes: int = 8 << 30  # largest total of a streamed request's tensors
    max_concurrent_requests: int = 16
    chunk_bytes: int = 2 << 20
    max_request_bytes: int = 4 << 30  # per-request budgets from shape inference
    max_request_flops: int = 10**12  # (core/cost.py, server/runtime/budget.py)
