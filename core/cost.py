"""What a compiled plan costs, from shape inference alone, before anything runs: an upper
bound of the bytes it holds at once and the FLOPs it does (``cost_of``); and row blocks for
large matrix products, so that a deadline or cancellation stops a call inside one big op
(``call``; forward kernels of a plan, and its backward pass's products through the
dispatcher, see ``checking``).

Bytes: the sum of every value's bytes (inputs, constants, each node's output) plus, when
gradients are taken, the bytes of every value that requires grad again (its gradient).
The plan frees slots after their last use, so the real peak is lower: this is a safe upper
bound, cheap to compute (one pass over the specs).

FLOPs, per op (``RULES``): matrix products ``2*M*N*K`` (batch included), ``linear``
``2*rows*in*out`` plus the bias, ``conv2d`` ``2*N*C_out*H_out*W_out*C_in/groups*kh*kw``,
``lstm_layer`` its recurrent product per step ``2*N*L*4H*H`` plus ``10*N*L*4H``,
reductions and everything else the number of elements read or written, whichever is larger
(``DEFAULT``). Backward is counted as twice the forward FLOPs of the nodes that require
grad (a matrix product's vjp is two products of the same size).

Both are computed once per plan (graph, data shapes, backend) and kept on it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "Cost",
    "cost_of",
    "RULES",
    "call",
    "block_rows",
    "BLOCK_ROWS",
    "checking",
    "current_check",
]


@dataclass(frozen=True)
class Cost:
    bytes: int  # upper bound of the bytes held at once
    flops: int  # forward and backward


def _elements(shape) -> int:
    return math.prod(int(s) for s in shape)


def _matmul(ins, out, attrs) -> int:
    a = ins[0].shape
    k = a[-1] if a else 1
    return 2 * _elements(out.shape) * int(k)


def _linear(ins, out, attrs) -> int:
    k = ins[1].shape[1] if len(ins[1].shape) == 2 else 1
    return 2 * _elements(out.shape) * int(k) + _elements(out.shape)


def _conv2d(ins, out, attrs) -> int:
    w = ins[1].shape  # (C_out, C_in / groups, kh, kw)
    per_output = _elements(w[1:]) if len(w) == 4 else 1
    return 2 * _elements(out.shape) * per_output


def _lstm_layer(ins, out, attrs) -> int:
    # a (N, H) @ (H, 4H) product per step, and the cell's few passes over the gates
    n, length, four_h = ins[0].shape
    hidden = ins[3].shape[1]
    return (2 * int(hidden) + 10) * int(n) * int(length) * int(four_h)


def _default(ins, out, attrs) -> int:
    read = sum(_elements(s.shape) for s in ins)
    return max(read, _elements(out.shape), 1)


RULES: dict[str, Callable] = {
    "matmul": _matmul,
    "mm": _matmul,
    "linear": _linear,
    "conv2d": _conv2d,
    "conv2d_input_grad": _conv2d,
    "conv2d_weight_grad": _conv2d,
    "lstm_layer": _lstm_layer,
}
DEFAULT = _default


def _nbytes(spec) -> int:
    return _elements(spec.shape) * spec.dtype.itemsize


def estimate(plan) -> Cost:
    """The cost of one call of ``plan`` (see the module docstring)."""
    vg = plan.graph
    specs = plan.specs
    n_in = vg.num_inputs
    total = sum(_nbytes(s) for s in specs)
    grads = sum(_nbytes(s) for s, r in zip(specs, plan.requires) if r)
    flops = backward = 0
    for k, (op, ins) in enumerate(zip(vg.ops, vg.node_inputs)):
        rule = RULES.get(op.name, DEFAULT)
        try:
            f = int(rule([specs[i] for i in ins], specs[n_in + k], None))
        except (IndexError, TypeError, ValueError):
            f = DEFAULT([specs[i] for i in ins], specs[n_in + k], None)
        flops += f
        if plan.requires[n_in + k]:
            backward += 2 * f
    return Cost(bytes=total + grads, flops=flops + backward)


def cost_of(plan) -> Cost:
    """``estimate(plan)``, computed once and kept on the plan."""
    cost = plan.__dict__.get("_gradmesh_cost")
    if cost is None:
        cost = plan.__dict__["_gradmesh_cost"] = estimate(plan)
    return cost


# -- row blocks -------------------------------------------------------------------------
#
# A large 2-D matrix product runs as row blocks of its output with ``check()`` between
# them. Bitwise: each block is the same BLAS call on a row slice, writing into the
# result's rows (``out=``). Measured with OpenBLAS 0.3.31 (threads 1 and 2) over many
# shapes: float32 blocks of >= BLOCK_ROWS rows gave the same bits as the whole product
# every time (blocks of 32 to 512 rows); float64 did NOT for several shapes (1500x300x700,
# 2048x1000x333, ...), and small products (OpenBLAS's small-matrix kernels) did not either.
# So only float32, only products of at least MIN_BLOCK_FLOPS with >= 2 blocks, blocks of
# MIN_ROWS to BLOCK_ROWS rows (a multiple of MIN_ROWS, about TARGET_BLOCK_FLOPS each; the
# last one takes the remainder); anything else runs whole, checked between kernels as
# before, and the FLOP budget bounds how long one such op can take.
BLOCK_ROWS = 512
MIN_ROWS = 64
TARGET_BLOCK_FLOPS = 1 << 32  # a block: ~0.05-0.2 s of one core's BLAS
MIN_BLOCK_FLOPS = 1 << 28  # products smaller than this run whole
BLOCKED_DTYPES = (np.dtype(np.float32),)
blocked_calls = 0  # products run in blocks (for tests, metrics)
block_checks = 0  # checks made between blocks


def block_rows(m: int, rows: int = BLOCK_ROWS) -> list[tuple[int, int]]:
    """Row ranges of ``m`` rows, each ``rows`` long except the last (``rows`` to
    ``2*rows - 1``)."""
    n = max(1, m // rows)
    edges = [i * rows for i in range(n)] + [m]
    return list(zip(edges[:-1], edges[1:]))


def rows_per_block(k: int, n: int) -> int:
    """Rows of one block of an (m x k) @ (k x n) product: about TARGET_BLOCK_FLOPS."""
    rows = TARGET_BLOCK_FLOPS // max(1, 2 * k * n) // MIN_ROWS * MIN_ROWS
    return max(MIN_ROWS, min(BLOCK_ROWS, rows))


def _blockable(a, b) -> bool:
    return (
        type(a) is np.ndarray
        and type(b) is np.ndarray
        and a.ndim == 2
        and b.ndim == 2
        and a.dtype in BLOCKED_DTYPES
        and b.dtype == a.dtype
        and a.shape[0] >= 2 * rows_per_block(a.shape[1], b.shape[1])
        and 2 * a.shape[0] * a.shape[1] * b.shape[1] >= MIN_BLOCK_FLOPS
    )


def _blocked_product(a, b, check) -> np.ndarray:
    global blocked_calls, block_checks
    blocked_calls += 1
    out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    for s, e in block_rows(a.shape[0], rows_per_block(a.shape[1], b.shape[1])):
        block_checks += 1
        check()
        np.matmul(a[s:e], b, out=out[s:e])
    return out


def call(
    op_name: str, forward: Callable, xp, args: list, attrs: dict, check: Callable[[], None] | None
):
    """``forward(xp, *args, **attrs)``; a large float32 ``matmul``/``mm``/``linear`` on
    the CPU runs in row blocks with ``check()`` between them (same bits, see above)."""
    if check is not None and xp is np and op_name in _BLOCKED_OPS and len(args) >= 2:
        a, b = args[0], args[1]
        if op_name == "linear":
            if _blockable(a, b.T) and type(args[2]) is np.ndarray:
                out = _blocked_product(a, b.T, check)
                out += args[2]
                return out
        elif _blockable(a, b):
            return _blocked_product(a, b, check)
    return forward(xp, *args, **attrs)


_BLOCKED_OPS = frozenset(("matmul", "mm", "linear"))


# The backward pass of a plan runs the registry's vjps, whose products go through the op
# dispatcher (core/dispatch.py): the plan names its check here for the thread running
# them, and the dispatcher runs the large products of that thread through ``call``.
_local = threading.local()


def current_check() -> Callable[[], None] | None:
    """The check of the plan whose backward pass this thread runs (None: none)."""
    return getattr(_local, "check", None)


@contextlib.contextmanager
def checking(check: Callable[[], None] | None):
    """Within: products dispatched on this thread run in blocks checked by ``check``."""
    prev = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = prev
