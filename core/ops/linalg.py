"""Matrix products."""

from __future__ import annotations

from ..functional import matmul, mm, reshape, squeeze, unsqueeze
from ..registry import OpError, Spec, broadcast_shapes, defop, fmt
from ..unbroadcast import sum_to


def _check_dtypes(op, a, b):
    if a.dtype is not b.dtype:
        raise OpError(
            f"{op}: expected both tensors to have the same dtype, got {a.dtype} and "
            f"{b.dtype}; convert one with .to(dtype)"
        )
    if not a.dtype.is_floating_point:
        raise OpError(f"{op}: expected floating point tensors, got {a.dtype}")


def _infer_mm(a, b) -> Spec:
    if len(a.shape) != 2 or len(b.shape) != 2:
        hint = ""
        if len(a.shape) == 1:
            hint = "; for a vector use matmul, or make it a row with .reshape(1, -1)"
        raise OpError(
            f"mm: expected 2-D tensors, got shapes {fmt(a.shape)} and {fmt(b.shape)}{hint}"
        )
    if a.shape[1] != b.shape[0]:
        raise OpError(
            f"mm: shapes {fmt(a.shape)} and {fmt(b.shape)} cannot be multiplied "
            f"({a.shape[0]}x{a.shape[1]} and {b.shape[0]}x{b.shape[1]}); the inner "
            f"dimensions must match"
        )
    _check_dtypes("mm", a, b)
    return Spec((a.shape[0], b.shape[1]), a.dtype)


@defop("mm", infer=_infer_mm, arity=2)
def mm_p(xp, a, b):
    return a @ b


@mm_p.defvjp
def _(g, out, a, b):
    return _matrix_vjp(mm, g, a, b)


def _transposed(t) -> bool:
    """Whether a 2-D tensor is laid out column-major (a transposed view, like ``w.T``)."""
    strides = t._data.strides
    return strides[0] < strides[1]


def _matrix_vjp(product, g, a, b):
    """Gradients of ``a @ b`` for matrices, each in the memory layout of its input.

    The gradient of a transposed view (``w.T`` in ``x @ w.T``) is computed as the
    transpose of a row-major product, with the same flops (BLAS takes transposed operands
    for free): it then reaches ``w.grad`` row-major, and the optimizer's in-place update
    runs over contiguous memory (a strided one is ~6x slower on large weights).
    """
    ga = gb = None
    if a.requires_grad:
        ga = product(b, g.mT).mT if _transposed(a) else product(g, b.mT)
    if b.requires_grad:
        gb = product(g.mT, a).mT if _transposed(b) else product(a.mT, g)
    return ga, gb


def _rows_times_matrix_vjp(g, a, b):
    """Gradients of (..., K) @ (K, N) as of the (rows, K) @ (K, N) product: b's gradient
    is one (K, rows) @ (rows, N) product, not a product per leading index summed after
    (16 GEMMs and a (16, K, N) sum for the GPT's (16, 64, 128) inputs), as torch does."""
    ga = matmul(g, b.mT) if a.requires_grad else None  # itself one 2-D product
    gb = None
    if b.requires_grad:
        rows, g_rows = reshape(a, (-1, a.shape[-1])), reshape(g, (-1, g.shape[-1]))
        # In b's layout, as _matrix_vjp: a transposed weight's gradient stays row-major.
        gb = matmul(g_rows.mT, rows).mT if _transposed(b) else matmul(rows.mT, g_rows)
    return ga, gb


def _infer_matmul(a, b) -> Spec:
    sa, sb = tuple(a.shape), tuple(b.shape)
    if not sa or not sb:
        raise OpError(
            f"matmul: both arguments need at least 1 dimension, got shapes {fmt(sa)} and {fmt(sb)}"
        )
    _check_dtypes("matmul", a, b)
    ka = sa[-1]
    kb = sb[0] if len(sb) == 1 else sb[-2]
    if ka != kb:
        raise OpError(
            f"matmul: shapes {fmt(sa)} and {fmt(sb)} cannot be multiplied "
            f"(inner dimensions {ka} and {kb} differ)"
        )
    batch = broadcast_shapes("matmul", sa[:-2], sb[:-2])
    shape = batch + (sa[-2:-1] if len(sa) > 1 else ()) + (sb[-1:] if len(sb) > 1 else ())
    return Spec(shape, a.dtype)


@defop("matmul", infer=_infer_matmul, arity=2)
def matmul_p(xp, a, b):
    if a.ndim > 2 and b.ndim == 2:
        return rows_times_matrix(xp, a, b)
    return xp.matmul(a, b)


def rows_times_matrix(xp, a, b):
    """(..., K) @ (K, N) as one (rows, K) @ (K, N) product: NumPy's stacked matmul runs
    one small GEMM per leading index, 3x slower for (16, 64, 128) @ a transposed
    (128, 512) (same values)."""
    out = xp.matmul(a.reshape(-1, a.shape[-1]), b)
    return out.reshape(a.shape[:-1] + (b.shape[-1],))


@matmul_p.defvjp
def _(g, out, a, b):
    if a.ndim == 2 and b.ndim == 2:
        return _matrix_vjp(matmul, g, a, b)
    if a.ndim > 2 and b.ndim == 2:
        return _rows_times_matrix_vjp(g, a, b)
    # Promote vectors to matrices, take the matrix rule, then sum broadcast batch dims.
    a2 = unsqueeze(a, 0) if a.ndim == 1 else a
    b2 = unsqueeze(b, -1) if b.ndim == 1 else b
    g2 = g
    if a.ndim == 1 or b.ndim == 1:
        # g with the vectors' unit dims back: (batch..., n, m) of the matrix product.
        batch = broadcast_shapes("matmul", a2.shape[:-2], b2.shape[:-2])
        g2 = reshape(g, batch + (a2.shape[-2], b2.shape[-1]))
    ga = gb = None
    if a.requires_grad:
        ga = sum_to(matmul(g2, b2.mT), a2.shape)
        ga = squeeze(ga, 0) if a.ndim == 1 else ga
    if b.requires_grad:
        gb = sum_to(matmul(a2.mT, g2), b2.shape)
        gb = squeeze(gb, -1) if b.ndim == 1 else gb
    return ga, gb
