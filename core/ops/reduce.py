"""Reductions: sum, amax/amin, argmax/argmin, logsumexp, prod, all/any, cumsum.

``mean``, ``var``, ``std``, ``max(dim)``, ``norm`` are exact compositions of these and live
in ``gradmesh.core.functional``; softmax and friends are in ``ops/nn.py``.
"""

from __future__ import annotations

from .. import dtypes
from ..functional import cumsum, eq, exp, expand, flip, prod, reshape, sum, where
from ..registry import OpError, Spec, defop, fmt, norm_dim, norm_dims


def _reduced_shape(shape, dims, keepdim) -> tuple:
    if keepdim:
        return tuple(1 if i in dims else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in dims)


def _axis(dim, ndim: int):
    """The NumPy ``axis`` of a ``dim`` attribute; a 0-d tensor's dim 0 is all of it."""
    return None if dim is None or ndim == 0 else tuple(dim)


def _int_accumulator(dtype: dtypes.DType) -> dtypes.DType:
    """torch sums and multiplies bools and int32 in int64."""
    return dtypes.int64 if dtype in (dtypes.bool_, dtypes.int32) else dtype


def _keep(g, shape, dim, keepdim):
    """``g`` reshaped so that it broadcasts against the un-reduced input again (a full
    reduction's 0-d result broadcasts as it is)."""
    if keepdim or dim is None or g.ndim == len(shape):
        return g
    dims = norm_dims("sum", dim, len(shape))
    return reshape(g, [1 if i in dims else s for i, s in enumerate(shape)])


# =========================================================================== sum ======


def _infer_sum(a, dim, keepdim) -> Spec:
    dims = norm_dims("sum", dim, len(a.shape))
    return Spec(_reduced_shape(a.shape, dims, keepdim), _int_accumulator(a.dtype))


@defop(
    "sum",
    dtype="accumulate",
    infer=_infer_sum,
    attrs={"dim": ("ints?", None), "keepdim": ("bool", False)},
)
def sum_p(xp, a, dim, keepdim):
    axis = _axis(dim, a.ndim)
    if a.dtype.kind == "b" or a.dtype == xp.int32:
        return xp.sum(a, axis=axis, keepdims=keepdim, dtype=xp.int64)
    return a.sum(axis=axis, keepdims=keepdim)  # the method: np.sum adds ~1.5 us of dispatch


@sum_p.defvjp
def _(g, out, a, dim, keepdim):
    return (expand(_keep(g, a.shape, dim, keepdim), a.shape),)


# ===================================================================== amax, amin ======


def _infer_extremum(name):
    def infer(a, dim, keepdim) -> Spec:
        dims = norm_dims(name, dim, len(a.shape))
        if any(a.shape[d] == 0 for d in dims):
            raise OpError(
                f"{name}: expected reduction dims {fmt(dims)} of a tensor of shape "
                f"{fmt(a.shape)} to have non-zero size; the max of nothing is "
                f"undefined"
            )
        return Spec(_reduced_shape(a.shape, dims, keepdim), a.dtype)

    return infer


@defop(
    "amax",
    infer=_infer_extremum("amax"),
    saves_out=True,
    attrs={"dim": ("ints?", None), "keepdim": ("bool", False)},
)
def amax_p(xp, a, dim, keepdim):
    return xp.amax(a, axis=_axis(dim, a.ndim), keepdims=keepdim)


@defop(
    "amin",
    infer=_infer_extremum("amin"),
    saves_out=True,
    attrs={"dim": ("ints?", None), "keepdim": ("bool", False)},
)
def amin_p(xp, a, dim, keepdim):
    return xp.amin(a, axis=_axis(dim, a.ndim), keepdims=keepdim)


def _extremum_vjp(g, out, a, dim, keepdim):
    # Ties share the gradient evenly, as torch's amax/amin (and max() without dim) do.
    hit = eq(a, _keep(out, a.shape, dim, keepdim)).to(g.dtype)
    count = sum(hit, dim=dim, keepdim=True)
    return (_keep(g, a.shape, dim, keepdim) * hit / count,)


amax_p.defvjp(_extremum_vjp)
amin_p.defvjp(_extremum_vjp)


# ================================================================= argmax, argmin ======


def _infer_arg(name):
    def infer(a, dim, keepdim) -> Spec:
        if a.dtype is dtypes.bool_:
            # torch refuses bool input (max(x, dim) on a bool tensor casts it first).
            raise OpError(
                f"{name}: does not support bool input (shape {fmt(a.shape)}); "
                f"convert it with .long(), or find a True with .nonzero()"
            )
        if dim is None:
            if len(a.shape) and 0 in a.shape:
                raise OpError(f"{name}: expected a non-empty tensor, got shape {fmt(a.shape)}")
            return Spec((1,) * len(a.shape) if keepdim else (), dtypes.int64)
        d = norm_dim(name, dim, len(a.shape))
        if len(a.shape) and a.shape[d] == 0:
            raise OpError(
                f"{name}: expected dimension {dim} of a tensor of shape "
                f"{fmt(a.shape)} to have non-zero size"
            )
        return Spec(_reduced_shape(a.shape, (d,) if a.shape else (), keepdim), dtypes.int64)

    return infer


def _arg(fn, xp, a, dim, keepdim):
    # NumPy's argmax, like torch's, picks the first of several equal extrema.
    if dim is None:
        i = fn(a.reshape(-1)).astype(xp.int64)
        return i.reshape((1,) * a.ndim) if keepdim else xp.asarray(i)
    if a.ndim == 0:
        return xp.zeros((), dtype=xp.int64)
    return fn(a, axis=dim, keepdims=keepdim).astype(xp.int64, copy=False)


@defop(
    "argmax",
    dtype="int64",
    infer=_infer_arg("argmax"),
    attrs={"dim": ("int?", None), "keepdim": ("bool", False)},
)
def argmax_p(xp, a, dim, keepdim):
    return _arg(xp.argmax, xp, a, dim, keepdim)


@defop(
    "argmin",
    dtype="int64",
    infer=_infer_arg("argmin"),
    attrs={"dim": ("int?", None), "keepdim": ("bool", False)},
)
def argmin_p(xp, a, dim, keepdim):
    return _arg(xp.argmin, xp, a, dim, keepdim)


argmax_p.defvjp(lambda g, out, a, dim, keepdim: (None,))
argmin_p.defvjp(lambda g, out, a, dim, keepdim: (None,))


# ===================================================================== logsumexp ======


def _infer_logsumexp(a, dim, keepdim) -> Spec:
    dims = norm_dims("logsumexp", dim, len(a.shape))
    dtype = a.dtype if a.dtype.is_floating_point else dtypes.default_float
    return Spec(_reduced_shape(a.shape, dims, keepdim), dtype)


@defop(
    "logsumexp",
    dtype="float",
    infer=_infer_logsumexp,
    saves_out=True,
    attrs={"dim": ("ints?", None), "keepdim": ("bool", False)},
)
def logsumexp_p(xp, a, dim, keepdim):
    if a.dtype.kind != "f":
        a = a.astype(dtypes.default_float.np)
    axis = _axis(dim, a.ndim)
    if a.size == 0:
        return xp.log(xp.sum(xp.exp(a), axis=axis, keepdims=keepdim))
    # Shift by the max so that exp never overflows; an infinite max shifts by 0 instead.
    m = xp.amax(a, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0).astype(a.dtype, copy=False)
    out = xp.log(xp.sum(xp.exp(a - m), axis=axis, keepdims=True)) + m
    return out if keepdim else xp.squeeze(out, axis=axis)


@logsumexp_p.defvjp
def _(g, out, a, dim, keepdim):
    return (_keep(g, a.shape, dim, keepdim) * exp(a - _keep(out, a.shape, dim, keepdim)),)


# ========================================================================== prod ======


def _infer_prod(a, dim, keepdim) -> Spec:
    dims = norm_dims("prod", dim, len(a.shape))
    return Spec(_reduced_shape(a.shape, dims, keepdim), _int_accumulator(a.dtype))


@defop(
    "prod",
    dtype="accumulate",
    infer=_infer_prod,
    attrs={"dim": ("ints?", None), "keepdim": ("bool", False)},
)
def prod_p(xp, a, dim, keepdim):
    dtype = xp.int64 if a.dtype.kind == "b" or a.dtype == xp.int32 else None
    return xp.prod(a, axis=_axis(dim, a.ndim), keepdims=keepdim, dtype=dtype)


@prod_p.defvjp
def _(g, out, a, dim, keepdim):
    # d prod / d a_i is the product of the others. Dividing out / a_i fails at zeros, so:
    # (product of the non-zeros except a_i) * (product of the zeros except a_i), where the
    # zeros' product is kept to first order (1, the one other zero, or 0) so that the
    # second derivative is exact too, and no division by zero ever happens.
    is_zero = eq(a, 0)
    nonzero = where(is_zero, 1.0, a)
    zeros_only = where(is_zero, a, 0.0)
    others_nonzero = prod(nonzero, dim=dim, keepdim=True) / nonzero
    zero_count = sum(is_zero, dim=dim, keepdim=True)
    others_zero_count = zero_count - is_zero.long()
    others_zero = where(
        eq(others_zero_count, 0),
        1.0,
        where(eq(others_zero_count, 1), sum(zeros_only, dim=dim, keepdim=True) - zeros_only, 0.0),
    )
    return (_keep(g, a.shape, dim, keepdim) * others_nonzero * others_zero,)


# ===================================================================== all, any ======


def _infer_logical_reduce(name):
    def infer(a, dim, keepdim) -> Spec:
        dims = norm_dims(name, dim, len(a.shape))
        return Spec(_reduced_shape(a.shape, dims, keepdim), dtypes.bool_)

    return infer


@defop(
    "all",
    dtype="bool",
    infer=_infer_logical_reduce("all"),
    attrs={"dim": ("ints?", None), "keepdim": ("bool", False)},
)
def all_p(xp, a, dim, keepdim):
    return xp.all(a, axis=_axis(dim, a.ndim), keepdims=keepdim)


@defop(
    "any",
    dtype="bool",
    infer=_infer_logical_reduce("any"),
    attrs={"dim": ("ints?", None), "keepdim": ("bool", False)},
)
def any_p(xp, a, dim, keepdim):
    return xp.any(a, axis=_axis(dim, a.ndim), keepdims=keepdim)


all_p.defvjp(lambda g, out, a, dim, keepdim: (None,))
any_p.defvjp(lambda g, out, a, dim, keepdim: (None,))


# ======================================================================== cumsum ======


def _infer_cumsum(a, dim) -> Spec:
    norm_dim("cumsum", dim, len(a.shape))
    return Spec(tuple(a.shape), _int_accumulator(a.dtype))


@defop("cumsum", dtype="accumulate", infer=_infer_cumsum, attrs={"dim": ("int", 0)})
def cumsum_p(xp, a, dim):
    dtype = xp.int64 if a.dtype.kind == "b" or a.dtype == xp.int32 else None
    if a.ndim == 0:
        return a.astype(dtype or a.dtype)
    return xp.cumsum(a, axis=dim, dtype=dtype)


@cumsum_p.defvjp
def _(g, out, a, dim):
    # Each input element feeds every later output: the gradient is a reversed cumsum.
    if a.ndim == 0:
        return (g,)
    return (flip(cumsum(flip(g, [dim]), dim), [dim]),)
