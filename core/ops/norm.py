"""Batch normalisation: ``batch_norm`` normalises (N, C, *) over every dim but the channel
dim 1 with the batch's statistics (biased variance), without affine; ``batch_norm_grad``
is its vjp in one kernel, and its own vjp is written with differentiable ops, so double
backward works. ``channel_affine`` is the per-channel scale and shift after it, and
``batch_norm_stats`` the batch's mean and unbiased variance that the running statistics
take in, each one kernel instead of a chain of full-size ops. Running statistics and eval
mode are compositions in ``gradmesh.core.nn.functional.batch_norm``; group norm reuses
``layer_norm``.
"""

from __future__ import annotations

import math

from ..functional import reshape, sqrt, sum
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


# ============================================================ affine and statistics ======


def _channel_shape(x_shape) -> tuple:
    return (1, x_shape[1]) + (1,) * (len(x_shape) - 2)


def _infer_channel_affine(x, weight, bias) -> Spec:
    _need_float("channel_affine", x)
    if len(x.shape) < 2:
        raise OpError(f"channel_affine: expected an input of shape (N, C, *), got {fmt(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (x.shape[1],):
            raise OpError(
                f"channel_affine: {name} of shape {fmt(t.shape)} must have one entry per "
                f"channel, shape {fmt((x.shape[1],))}, for an input of shape {fmt(x.shape)}"
            )
        _need_same_float("channel_affine", x, t, "input", name)
    return Spec(tuple(x.shape), x.dtype)


@defop("channel_affine", infer=_infer_channel_affine, arity=3)
def channel_affine_p(xp, x, weight, bias):
    """``x * weight + bias`` with one weight and bias per channel (dim 1): one fresh array,
    the same bits as the two broadcast ops."""
    shape = _channel_shape(x.shape)
    out = x * weight.reshape(shape)
    out += bias.reshape(shape)
    return out


@channel_affine_p.defvjp
def _(g, out, x, weight, bias):
    gx = g * reshape(weight, _channel_shape(x.shape)) if x.requires_grad else None
    if not (weight.requires_grad or bias.requires_grad):
        return gx, None, None
    sums = channel_affine_grad_p(g, x)
    return gx, sums[0], sums[1]


def _infer_channel_affine_grad(g, x) -> Spec:
    if tuple(g.shape) != tuple(x.shape) or len(x.shape) < 2:
        raise OpError(
            f"channel_affine_grad: gradient of shape {fmt(g.shape)} must match the (N, C, *) "
            f"input of shape {fmt(x.shape)}"
        )
    _need_same_float("channel_affine_grad", g, x, "gradient", "input")
    return Spec((2, x.shape[1]), x.dtype)


@defop("channel_affine_grad", infer=_infer_channel_affine_grad, arity=2)
def channel_affine_grad_p(xp, g, x):
    """(2, C): per channel, sum(g * x) (the weight's gradient) and sum(g) (the bias's), in
    one pass each and without a full-size temporary."""
    out = xp.empty((2, x.shape[1]), dtype=x.dtype)
    out[0] = _channel_dot(xp, g, x).reshape(-1)
    out[1] = g.sum(axis=_axes(x.ndim))
    return out


@channel_affine_grad_p.defvjp
def _(v, out, g, x):
    # Linear in each input: d/dg = v0 * x + v1 and d/dx = v0 * g, per channel.
    shape = _channel_shape(x.shape)
    v0, v1 = reshape(v[0], shape), reshape(v[1], shape)
    return (v0 * x + v1 if g.requires_grad else None), (v0 * g if x.requires_grad else None)


def _infer_batch_norm_stats(x) -> Spec:
    _infer_batch_norm(x, 0.0)
    return Spec((2, x.shape[1]), x.dtype)


@defop("batch_norm_stats", infer=_infer_batch_norm_stats, differentiable=False)
def batch_norm_stats_p(xp, x):
    """(2, C): the per-channel mean and unbiased variance of (N, C, *) ``x``, which
    BatchNorm's running statistics take in (torch gives them no gradient either)."""
    axes = _axes(x.ndim)
    n = math.prod(x.shape) // x.shape[1]
    mean = x.mean(axis=axes, keepdims=True)
    xc = x - mean
    out = xp.empty((2, x.shape[1]), dtype=x.dtype)
    out[0] = mean.reshape(-1)
    out[1] = _channel_dot(xp, xc, xc).reshape(-1) / x.dtype.type(n - 1)
    return out
