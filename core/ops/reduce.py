"""Reductions: sum, mean, var, max/min, logsumexp, softmax and friends."""
from __future__ import annotations

from ..registry import OpError, Spec, norm_dims
from ..registry import defop
from ..functional import reshape, expand


def _reduced_shape(shape, dims, keepdim) -> tuple:
    if keepdim:
        return tuple(1 if i in dims else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in dims)


def _infer_sum(a, dim, keepdim) -> Spec:
    dims = norm_dims("sum", dim, len(a.shape))
    from .. import dtypes
    dtype = dtypes.int64 if a.dtype in (dtypes.bool_, dtypes.int32) else a.dtype
    return Spec(_reduced_shape(a.shape, dims, keepdim), dtype)


@defop("sum", infer=_infer_sum, attrs={"dim": ("ints?", None), "keepdim": ("bool", False)})
def sum_p(xp, a, dim, keepdim):
    axis = None if dim is None else tuple(dim)
    if a.dtype.kind == "b" or a.dtype == xp.int32:
        return xp.sum(a, axis=axis, keepdims=keepdim, dtype=xp.int64)
    return xp.sum(a, axis=axis, keepdims=keepdim)


def _keep(g, shape, dim, keepdim):
    """``g`` reshaped so that it broadcasts against the un-reduced input again."""
    if keepdim or g.ndim == len(shape):
        return g
    dims = norm_dims("sum", dim, len(shape))
    return reshape(g, [1 if i in dims else s for i, s in enumerate(shape)])


@sum_p.defvjp
def _(g, out, a, dim, keepdim):
    return (expand(_keep(g, a.shape, dim, keepdim), a.shape),)
