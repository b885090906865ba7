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


def _channel_dot(xp, a, b):
    """sum(a * b) per channel, shaped (1, C, 1, ...): one pass, no (N, C, *) temporary."""
    dims = "abcdefghijklmnopqrstuvwxyz"[: a.ndim]
    dot = xp.einsum(f"{dims},{dims}->b", a, b)
    return dot.reshape((1, -1) + (1,) * (a.ndim - 2))


def _bn_centered(xp, x, eps):
    """x - mean per channel (a fresh array the caller may overwrite), rstd, and the
    count per channel. Each fresh (N, C, *) array costs page faults on a cold heap, so
    the variance is a dot product of the centered values, not a mean of their squares."""
    axes = _axes(x.ndim)
    n = math.prod(x.shape) // x.shape[1]
    xc = x - x.mean(axis=axes, keepdims=True)
    t = x.dtype.type
    rstd = 1 / xp.sqrt(_channel_dot(xp, xc, xc) / t(n) + t(eps))
    return xc, rstd, n


@defop("batch_norm", infer=_infer_batch_norm, attrs={"eps": ("float", 1e-5)})
def batch_norm_p(xp, x, eps):
    xc, rstd, _ = _bn_centered(xp, x, eps)
    xc *= rstd
    return xc


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
    """The vjp of batch_norm: rstd * (g - mean(g) - xhat * mean(g * xhat)), per channel,
    as xc * (-rstd^3 sum(g * xc) / n) + g * rstd - rstd sum(g) / n (xc = x - mean): two
    fresh full-size arrays, the statistics as one-pass reductions."""
    xc, rstd, n = _bn_centered(xp, x, eps)
    t = x.dtype.type
    g_sum = g.sum(axis=_axes(x.ndim), keepdims=True)
    xc *= -(rstd * rstd * rstd) * _channel_dot(xp, g, xc) / t(n)
    xc += g * rstd
    xc -= rstd * g_sum / t(n)
    return xc


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
