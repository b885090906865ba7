"""Smooth and piecewise activations of modern networks: ``silu``, ``mish``, ``hardswish``,
``elu`` (with selu and celu), ``hardtanh``, and the error function ``erf``, ``erfc``,
``erfinv``. Each vjp is written with differentiable ops, so second order works
(hardswish's and hardtanh's are piecewise linear in ``x``, as in torch)."""

from __future__ import annotations

import math

from .. import dtypes
from ..functional import clamp, exp, sigmoid, softplus, tanh, where
from ..registry import OpError, Spec, defop, fmt, same
from .elementwise import _clamp_bound, _erf, _float, _float_infer, sigmoid_p


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


# ============================================================================ erf ======
# erf and erfc share exp(-a^2) in their derivatives; erfinv's is read from its result.

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _special(xp, name: str):
    """scipy.special's (or cupyx's) ``name``, imported on first use, as ``_erf`` does."""
    if xp.__name__ == "numpy":
        import scipy.special

        return getattr(scipy.special, name)
    import cupyx.scipy.special

    return getattr(cupyx.scipy.special, name)


@defop("erf", dtype="float", infer=_float_infer("erf"))
def erf_p(xp, a):
    return _erf(xp, _float(xp, a))


@erf_p.defvjp
def _(g, out, a):
    return (g * (_TWO_OVER_SQRT_PI * exp(-a * a)),)


@defop("erfc", dtype="float", infer=_float_infer("erfc"))
def erfc_p(xp, a):
    """1 - erf(a), without 1 - erf's cancellation in the tail."""
    a = _float(xp, a)
    return _special(xp, "erfc")(a).astype(a.dtype, copy=False)


@erfc_p.defvjp
def _(g, out, a):
    return (g * (-_TWO_OVER_SQRT_PI * exp(-a * a)),)


@defop("erfinv", dtype="float", infer=_float_infer("erfinv"), saves_out=True)
def erfinv_p(xp, a):
    """The inverse of erf on [-1, 1]: -inf and inf at the ends, nan outside."""
    a = _float(xp, a)
    return _special(xp, "erfinv")(a).astype(a.dtype, copy=False)


@erfinv_p.defvjp
def _(g, out, a):
    return (g * (math.sqrt(math.pi) / 2 * exp(out * out)),)


# ============================================================= elu, hardtanh ======


def _floating_only(op: str):
    """torch has no integer kernel for these (``"elu_cpu" not implemented for 'Long'``)."""

    def infer(a, **attrs) -> Spec:
        if not a.dtype.is_floating_point:
            raise OpError(
                f"{op}: not supported for tensors of dtype {a.dtype.name} (shape "
                f"{fmt(a.shape)}); it needs floating point: convert it with .float()"
            )
        return same(a)

    return infer


@defop(
    "elu",
    infer=_floating_only("elu"),
    attrs={"alpha": ("float", 1.0), "scale": ("float", 1.0), "input_scale": ("float", 1.0)},
)
def elu_p(xp, a, alpha, scale, input_scale):
    """aten's elu, which selu and celu are too: scale * a above 0, else
    scale * alpha * (exp(a * input_scale) - 1); exp only sees the values <= 0."""
    t = a.dtype.type
    negative = xp.expm1(xp.minimum(a, t(0)) * t(input_scale)) * t(alpha * scale)
    return xp.where(a > 0, a * t(scale), negative)


@elu_p.defvjp
def _(g, out, a, alpha, scale, input_scale):
    # At 0 torch takes the exponential side: alpha * scale * input_scale. The clamp keeps
    # exp finite where the other side is selected (inf * 0 would be nan at second order).
    slope = exp(clamp(a, max=0.0) * input_scale) * (alpha * scale * input_scale)
    return (where(a > 0, g * scale, g * slope),)


def _infer_hardtanh(a, min_val, max_val):
    if a.dtype is dtypes.bool_:
        raise OpError(
            f"hardtanh: not supported for a bool tensor (shape {fmt(a.shape)}); convert "
            f"it with .long() or .float()"
        )
    if min_val > max_val:
        raise OpError(
            f"hardtanh: min_val cannot be greater than max_val (min_val={min_val}, "
            f"max_val={max_val})",
            "min_val",
        )
    return same(a)


@defop(
    "hardtanh",
    infer=_infer_hardtanh,
    attrs={"min_val": ("float", -1.0), "max_val": ("float", 1.0)},
)
def hardtanh_p(xp, a, min_val, max_val):
    return xp.clip(a, _clamp_bound(a, min_val), _clamp_bound(a, max_val))


@hardtanh_p.defvjp
def _(g, out, a, min_val, max_val):
    # Unlike clamp's, zero at the bounds themselves (torch's hardtanh_backward).
    return (where((a > min_val) & (a < max_val), g, 0.0),)
