"""Smooth and piecewise activations of modern networks: ``silu``, ``mish``, ``hardswish``.
Each vjp is written with differentiable ops, so second order works (hardswish's is
piecewise linear in ``x``, as in torch)."""

from __future__ import annotations

from ..functional import sigmoid, softplus, tanh, where
from ..registry import defop
from .elementwise import _float, _float_infer, sigmoid_p


@defop("silu", dtype="float", infer=_float_infer("silu"))
def silu_p(xp, a):
    """a * sigmoid(a), with sigmoid's overflow-free kernel."""
    a = _float(xp, a)
    return a * sigmoid_p.forward(xp, a)


@silu_p.defvjp
def _(g, out, a):
    s = sigmoid(a)
    return (g * (s * (1 + a * (1 - s))),)


@defop("mish", dtype="float", infer=_float_infer("mish"))
def mish_p(xp, a):
    """a * tanh(softplus(a)), softplus as logaddexp(0, a) (no overflow)."""
    a = _float(xp, a)
    return a * xp.tanh(xp.logaddexp(a.dtype.type(0), a))


@mish_p.defvjp
def _(g, out, a):
    t = tanh(softplus(a))
    return (g * (t + a * (1 - t * t) * sigmoid(a)),)


@defop("hardswish", dtype="float", infer=_float_infer("hardswish"))
def hardswish_p(xp, a):
    """a * clamp(a + 3, 0, 6) / 6."""
    a = _float(xp, a)
    t = a.dtype.type
    return a * xp.clip(a + t(3), t(0), t(6)) / t(6)


@hardswish_p.defvjp
def _(g, out, a):
    # torch's kernel: 0 below -3, 1 above 3, a / 3 + 1/2 on [-3, 3] (ends included).
    return (where(a < -3, 0.0, where(a <= 3, g * (a / 3 + 0.5), g)),)
