"""Batch normalisation: ``batch_norm`` normalises (N, C, *) over every dim but the channel
dim 1 with the batch's statistics (biased variance), without affine; ``batch_norm_grad``
is its vjp in one kernel, and its own vjp is written with differentiable ops, so double
backward works. Running statistics, eval mode and the affine part are compositions in
``gradmesh.core.nn.functional.batch_norm``; group norm reuses ``layer_norm``.
"""

from __future__ import annotations

import math

from ..functional import sqrt, sum
from ..registry import OpError, Spec, defop, fmt
from .nn import _need_float, _need_same_float


def _infer_batch_norm(x, eps, g=None) -> Spec:
    op = "batch_norm" if g is None else "batch_norm_grad"
    _need_float(op, x)
    if len(x.shape) < 2:
        raise OpError(f"{op}: expected an input of shape (N, C) or (N, C, *), got {fmt(x.shape)}")
    if math.prod(x.shape) // x.shape[1] <= 1:
        raise OpError(
            f"{op}: expected more than 1 value per channel when training, got input "
            f"of shape {fmt(x.shape)}"
        )
    if g is not None:
        if tuple(g.shape) != tuple(x.shape):
            raise OpError(
                f"{op}: gradient of shape {fmt(g.shape)} does not match the input "
                f"of shape {fmt(x.shape)}"
            )
        _need_same_float(op, x, g, "input", "gradient")
    return Spec(tuple(x.shape), x.dtype)


def _axes(ndim: int) -> tuple:
    return (0,) + tuple(range(2, ndim))


def _bn_stats(xp, x, eps):
    """(x - mean) * rstd per channel, and rstd."""
    axes = _axes(x.ndim)
    xc = x - x.mean(axis=axes, keepdims=True)
    rstd = 1 / xp.sqrt((xc * xc).mean(axis=axes, keepdims=True) + x.dtype.type(eps))
    xc *= rstd
    return xc, rstd, axes


@defop("batch_norm", infer=_infer_batch_norm, attrs={"eps": ("float", 1e-5)})
def batch_norm_p(xp, x, eps):
    return _bn_stats(xp, x, eps)[0]


@batch_norm_p.defvjp
def _(g, out, x, eps):
    return (batch_norm_grad_p(g, x, eps=eps),)


@defop(
    "batch_norm_grad",
    dtype="input:x",
    infer=lambda g, x, eps: _infer_batch_norm(x, eps, g),
    arity=2,
    saves_out=True,
    attrs={"eps": ("float", 1e-5)},
)
def batch_norm_grad_p(xp, g, x, eps):
    """The vjp of batch_norm: rstd * (g - mean(g) - xhat * mean(g * xhat)), per channel."""
    xhat, rstd, axes = _bn_stats(xp, x, eps)
    gx = g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True)
    gx *= rstd
    return gx


@batch_norm_grad_p.defvjp
def _(v, out, g, x, eps):
    # As layer_norm_grad's: the Jacobian J is symmetric, so g's cotangent is J v; the part
    # for x is d<v, J(x) g>/dx (out = J g).
    dims = list(_axes(x.ndim))
    n = math.prod(x.shape) // x.shape[1]

    def mean(t):
        return sum(t, dim=dims, keepdim=True) / n

    gv = batch_norm_grad_p(v, x, eps=eps)
    gx = None
    if x.requires_grad:
        xc = x - mean(x)
        rstd = 1 / sqrt(mean(xc * xc) + eps)
        xhat = batch_norm_p(x, eps=eps)
        gx = -rstd * (mean(v * out) * xhat + mean(v * xhat) * out + mean(g * xhat) * gv)
    return (gv if g.requires_grad else None), gx
