"""What a compiled plan costs, from shape inference alone, before anything runs: an upper
bound of the bytes it holds at once and the FLOPs it does (``cost_of``); and the blocks a
deadline or cancellation stops a call between, inside one big op (``call``): large 2-D
products and ``conv2d_weight_grad`` always run in the same blocks, checked or not (the
blocks are part of the op), batched products and convolutions in batch blocks when
checked (same bits as whole). Forward kernels of a plan, and through the dispatcher eager
ops and a plan's backward products, come through ``call`` (see ``checking``).

Bytes: the sum of every value's bytes (inputs, constants, each node's output, and what an
op keeps beside its output for backward: ``KEPT``) plus, when gradients are taken, the
bytes of every value that requires grad again (its gradient).
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

# Bytes an op's kernel holds beside its output, as a multiple of the output's bytes:
# lstm_layer keeps its gate activations (twice its output) in the same allocation.
KEPT: dict[str, int] = {"lstm_layer": 2}


def _nbytes(spec) -> int:
    return _elements(spec.shape) * spec.dtype.itemsize


def estimate(plan) -> Cost:
    """The cost of one call of ``plan`` (see the module docstring)."""
    vg = plan.graph
    specs = plan.specs
    n_in = vg.num_inputs
    total = sum(_nbytes(s) for s in specs)
    total += sum(KEPT.get(op.name, 0) * _nbytes(specs[n_in + k]) for k, op in enumerate(vg.ops))
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


# -- blocks that are part of the op ---------------------------------------------------
#
# A large matrix product (``mm``, ``matmul`` or ``linear`` whose right-hand side is a
# matrix, the left one's leading dimensions taken as rows) and a large
# ``conv2d_weight_grad`` (a sum over the batch) ALWAYS run in the same blocks on the CPU,
# checked or not: eager runs, plans and workers alike (the dispatcher and the plan both
# come through ``call``). A check only decides whether something runs between blocks, so
# a deadline never changes the bits. Whole-op bits would not do: row or column blocks of a
# float64 product did NOT give the same bits as the whole product with OpenBLAS 0.3.31
# (1500x300x700, 2048x1000x333, 777x555x999, 1200x129x1500 differ), so its blocks have to
# be the op's own. A product runs in row blocks of about TARGET_BLOCK_FLOPS but at least
# MIN_ROWS rows (a multiple of ROW_STEP; the last block takes the remainder) when it has
# at least two: smaller products run whole. MIN_ROWS because each BLAS call packs the
# whole right-hand matrix again: a 4096x4096 float64 product in blocks of 128 rows took
# 18% more CPU than whole, of 512 rows 7%, of 1024 rows 2% (within the noise; see
# docs/worker.md). ``conv2d_weight_grad`` sums fixed batch blocks of about
# TARGET_BLOCK_FLOPS in order, each block's own sum being the op's.
MIN_ROWS = 1024
ROW_STEP = 64
TARGET_BLOCK_FLOPS = 1 << 32  # a block: ~0.05-0.2 s of one core's BLAS
MIN_BLOCK_FLOPS = 1 << 28  # batched products smaller than this run whole
BLOCKED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
OP_BLOCKED = frozenset(("matmul", "mm", "linear", "conv2d_weight_grad"))  # always blocked
blocked_calls = 0  # products run in row blocks (for tests, metrics)
sum_blocked_calls = 0  # conv2d_weight_grad run in batch blocks
block_checks = 0  # checks made between blocks


def block_rows(m: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges of ``m`` rows, each ``rows`` long except the last (``rows`` to
    ``2*rows - 1``)."""
    n = max(1, m // rows)
    edges = [i * rows for i in range(n)] + [m]
    return list(zip(edges[:-1], edges[1:]))


def rows_per_block(k: int, n: int) -> int:
    """Rows of one block of an (m x k) @ (k x n) product: about TARGET_BLOCK_FLOPS."""
    rows = TARGET_BLOCK_FLOPS // max(1, 2 * k * n) // ROW_STEP * ROW_STEP
    return max(MIN_ROWS, rows)


def _blockable(a, b) -> bool:
    """Whether ``a @ b`` (both 2-D) runs in row blocks: at least two of them."""
    return (
        type(a) is np.ndarray
        and type(b) is np.ndarray
        and a.ndim == 2
        and b.ndim == 2
        and a.dtype in BLOCKED_DTYPES
        and b.dtype == a.dtype
        and a.shape[0] >= 2 * rows_per_block(a.shape[1], b.shape[1])
    )


def _blocked_product(a, b, check) -> np.ndarray:
    global blocked_calls, block_checks
    blocked_calls += 1
    out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    for s, e in block_rows(a.shape[0], rows_per_block(a.shape[1], b.shape[1])):
        if check is not None:
            block_checks += 1
            check()
        np.matmul(a[s:e], b, out=out[s:e])
    return out


def _product_operands(op_name: str, args: list):
    """``(rows, rhs)`` when ``op_name`` over ``args`` is the product ``rows @ rhs`` of
    matrices (``rows`` the left operand's leading dimensions flattened, as the op does
    itself), else None."""
    a, b = args[0], args[1]
    if type(a) is not np.ndarray or type(b) is not np.ndarray or a.ndim < 2 or b.ndim != 2:
        return None
    if op_name == "mm" and a.ndim != 2:
        return None
    rhs = b.T if op_name == "linear" else b
    return a.reshape(-1, a.shape[-1]), rhs


def _blocked_op(op_name: str, args: list, check):
    """The op over ``args`` in its fixed blocks, or None when it runs whole."""
    a, b = args[0], args[1]
    if op_name == "conv2d_weight_grad":
        return None
    # Two blocks take at least TARGET_BLOCK_FLOPS (rows >= 2 * rows_per_block): most
    # products leave here, after a few attribute reads (this runs for every eager product).
    n = b.shape[0] if op_name == "linear" else b.shape[-1]
    if 2 * a.size * n < TARGET_BLOCK_FLOPS:
        return None
    operands = _product_operands(op_name, args)
    if operands is None or not _blockable(*operands):
        return None
    if op_name == "linear" and type(args[2]) is not np.ndarray:
        return None
    out = _blocked_product(*operands, check)
    if op_name == "linear":
        out += args[2]
    return out.reshape(a.shape[:-1] + (out.shape[-1],))


def call(
    op_name: str, forward: Callable, xp, args: list, attrs: dict, check: Callable[[], None] | None
):
    """``forward(xp, *args, **attrs)``; on the CPU a large ``matmul``/``mm``/``linear``
    (float32 or float64) always runs in row blocks and a large ``conv2d_weight_grad`` in
    batch blocks, with ``check()`` between them if given; with a check, a large batched
    ``matmul``, ``conv2d`` or ``conv2d_input_grad`` (any float dtype) also runs in batch
    blocks (the same bits as whole, see below)."""
    if xp is np and op_name in OP_BLOCKED and len(args) >= 2:
        if op_name == "conv2d_weight_grad":
            per_item = _weight_grad_item_flops(args, attrs)
            if per_item:
                return _summed_batch_blocks(forward, args, attrs, per_item, check)
        else:
            out = _blocked_op(op_name, args, check)
            if out is not None:
                return out
    if check is not None and xp is np and len(args) >= 2:
        per_item = _batch_item_flops(op_name, args, attrs)
        if per_item:
            return _in_batch_blocks(op_name, forward, args, attrs, per_item, check)
    return forward(xp, *args, **attrs)


def _weight_grad_item_flops(args: list, attrs: dict) -> int:
    """FLOPs per image of a ``conv2d_weight_grad`` that runs in batch blocks; 0 when it
    runs whole (one block or fewer, not float32/float64 arrays)."""
    x, g = args[0], args[1]
    if not _float_arrays(args) or x.dtype not in BLOCKED_DTYPES or x.ndim != 4 or g.ndim != 4:
        return 0
    kh, kw = attrs.get("kernel_size", (1, 1))
    groups = attrs.get("groups", 1) or 1
    per_item = 2 * g.shape[1] * (x.shape[1] // groups) * kh * kw * g.shape[2] * g.shape[3]
    return per_item if _items_per_block(per_item) < x.shape[0] else 0


def _summed_batch_blocks(forward, args, attrs, per_item, check) -> np.ndarray:
    """The weight gradient as the sum, in order, of the weight gradients of fixed batch
    blocks."""
    global sum_blocked_calls, block_checks
    sum_blocked_calls += 1
    x, g = args[0], args[1]
    step = _items_per_block(per_item)
    total = None
    for s in range(0, x.shape[0], step):
        if check is not None:
            block_checks += 1
            check()
        part = forward(np, x[s : s + step], g[s : s + step], **attrs)
        if total is None:
            total = np.array(part)  # our own, writable copy (weight-sized: cheap)
        else:
            total += part
    return total


# -- batch blocks -----------------------------------------------------------------------
#
# A batched matrix product is one BLAS call per matrix of the batch (numpy's matmul loops
# over the batch dimensions), and conv2d and its input gradient are one batched product
# per image (im2col / col2im work image by image). So running the first dimension in
# slices makes the very same calls on the very same matrices: the same bits in any dtype,
# float64 included (tests/engine/test_cost.py checks many shapes). So these run in batch
# blocks only when checked. A matrix on the right (``(..., K) @ (K, N)``) is one 2-D
# product over the flattened rows (``rows_times_matrix``): the op's own row blocks above.
batch_blocked_calls = 0  # ops run in batch blocks (for tests, metrics)


def _float_arrays(args: list) -> bool:
    a, b = args[0], args[1]
    return (
        type(a) is np.ndarray
        and type(b) is np.ndarray
        and a.dtype.kind == "f"
        and b.dtype == a.dtype
        and a.shape[0] >= 2
    )


def _batched_product_flops(a, b) -> int:
    """FLOPs of one item of ``a``'s first dimension in ``a @ b``; 0 when slicing that
    dimension is not the whole story (``b`` with more dimensions, or its own batch)."""
    if a.ndim < 3 or b.ndim < 3 or b.ndim > a.ndim:
        return 0
    if b.ndim == a.ndim and b.shape[0] not in (1, a.shape[0]):
        return 0
    rest = int(np.prod(a.shape[1:-2], dtype=np.int64))
    return 2 * rest * a.shape[-2] * a.shape[-1] * b.shape[-1]


def _batch_item_flops(op_name: str, args: list, attrs: dict) -> int:
    """FLOPs per item of the first dimension when ``op_name`` runs in batch blocks here;
    0 when it runs whole."""
    if op_name not in _BATCH_OPS or not _float_arrays(args):
        return 0
    a, b = args[0], args[1]
    if op_name == "matmul":
        per_item = _batched_product_flops(a, b)
    elif a.ndim != 4 or b.ndim != 4:
        return 0
    elif op_name == "conv2d":  # output pixels about H*W / stride
        sh, sw = attrs.get("stride", (1, 1))
        per_item = 2 * b.size * -(-a.shape[2] // sh) * -(-a.shape[3] // sw)
    else:  # conv2d_input_grad: a is the output's gradient
        per_item = 2 * b.size * a.shape[2] * a.shape[3]
    total = per_item * a.shape[0]
    if total < MIN_BLOCK_FLOPS or per_item * 2 > total:
        return 0
    return per_item if _items_per_block(per_item) < a.shape[0] else 0


def _items_per_block(per_item: int) -> int:
    return max(1, TARGET_BLOCK_FLOPS // max(1, per_item))


def _sliced(op_name: str, args: list, s: int, e: int) -> list:
    """The arguments of items ``s:e``: the first one's, and ``b``'s own batch if any."""
    a, b = args[0], args[1]
    first = [a[s:e]]
    if op_name == "matmul" and b.ndim == a.ndim and b.shape[0] == a.shape[0]:
        return first + [b[s:e]] + list(args[2:])
    return first + list(args[1:])


def _in_batch_blocks(op_name, forward, args, attrs, per_item, check) -> np.ndarray:
    global batch_blocked_calls, block_checks
    batch_blocked_calls += 1
    n = args[0].shape[0]
    step = _items_per_block(per_item)
    out = None
    for s in range(0, n, step):
        block_checks += 1
        check()
        part = forward(np, *_sliced(op_name, args, s, s + step), **attrs)
        if out is None:
            out = np.empty((n,) + part.shape[1:], dtype=part.dtype)
        out[s : s + step] = part
    return out


_BATCH_OPS = frozenset(("matmul", "conv2d", "conv2d_input_grad"))


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
