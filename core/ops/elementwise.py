"""Elementwise primitives: arithmetic, unary math, activations, comparisons, selection."""

from __future__ import annotations

import math

import numpy as np

from .. import backend, dtypes
from ..autograd import is_grad_enabled
from ..factories import zeros_like
from ..functional import cos, exp, floor_divide, log, sigmoid, sign, sin, tanh, where
from ..registry import OpError, Spec, binary, broadcast_shapes, defop, floating, fmt, same

# ===================================================================== arithmetic ======


def _refuse_bool(op: str, spec, hint: str) -> None:
    """Reject what torch rejects for bool tensors: NumPy's forward would fail at run time
    (a worker's INTERNAL error) where infer should have said no."""
    if spec.dtype is dtypes.bool_:
        raise OpError(f"{op}: not supported for a bool tensor (shape {fmt(spec.shape)}); {hint}")


def _unary_no_bool(op: str, hint: str):
    def infer(a) -> Spec:
        _refuse_bool(op, a, hint)
        return same(a)

    return infer


_INVERT_MASK = "to invert a mask use ~ or logical_not()"


def _cast(xp, a, b):
    """Bring both operands to torch's result dtype (NumPy would promote int64 + float32 to
    float64; torch gives float32)."""
    if a.dtype == b.dtype:
        return a, b
    dt = dtypes.promote(
        dtypes.from_numpy(a.dtype), dtypes.from_numpy(b.dtype), a.ndim == 0, b.ndim == 0
    ).np
    return a.astype(dt, copy=False), b.astype(dt, copy=False)


@defop("add", dtype="promote", infer=binary("add"), arity=2, broadcast=True)
def add_p(xp, a, b):
    a, b = _cast(xp, a, b)
    return a + b


@add_p.defvjp
def _(g, out, a, b):
    return g, g


_infer_sub_shape = binary("sub")


def _infer_sub(a, b) -> Spec:
    for spec in (a, b):
        _refuse_bool("sub", spec, f"{_INVERT_MASK}, or convert it with .long()")
    return _infer_sub_shape(a, b)


@defop("sub", dtype="promote", infer=_infer_sub, arity=2, broadcast=True)
def sub_p(xp, a, b):
    a, b = _cast(xp, a, b)
    return a - b


@sub_p.defvjp
def _(g, out, a, b):
    return g, -g


@defop("mul", dtype="promote", infer=binary("mul"), arity=2, broadcast=True)
def mul_p(xp, a, b):
    a, b = _cast(xp, a, b)
    return a * b


@mul_p.defvjp
def _(g, out, a, b):
    return (g * b if a.requires_grad else None), (g * a if b.requires_grad else None)


def _infer_div(a, b) -> Spec:
    spec = binary("div")(a, b)
    # True division of integers gives the default float type, as in torch.
    return spec if spec.dtype.is_floating_point else Spec(spec.shape, dtypes.default_float)


@defop("div", dtype="promote_float", infer=_infer_div, arity=2, broadcast=True)
def div_p(xp, a, b):
    a, b = _cast(xp, a, b)
    if a.dtype.kind != "f":
        dt = dtypes.default_float.np
        a, b = a.astype(dt), b.astype(dt)
    return a / b


@div_p.defvjp
def _(g, out, a, b):
    ga = g / b if a.requires_grad else None
    gb = -g * a / (b * b) if b.requires_grad else None
    return ga, gb


_infer_pow_shape = binary("pow")


def _infer_pow(a, b) -> Spec:
    # NumPy would compute bool ** bool in int8, a dtype gradmesh does not have; torch refuses.
    if a.dtype is dtypes.bool_ and b.dtype is dtypes.bool_:
        raise OpError(
            f"pow: a bool tensor to a bool power is not supported (shapes "
            f"{fmt(a.shape)} and {fmt(b.shape)}); convert one with .long()"
        )
    return _infer_pow_shape(a, b)


@defop("pow", dtype="promote", infer=_infer_pow, arity=2, broadcast=True)
def pow_p(xp, a, b):
    a, b = _cast(xp, a, b)
    if a.dtype.kind in "iu" and (b < 0).any():
        raise OpError("pow: integers to negative integer powers are not allowed")
    return a**b


@pow_p.defvjp
def _(g, out, a, b):
    ga = gb = None
    if a.requires_grad:
        ga = g * b * a ** (b - 1)
    if b.requires_grad:
        # d/db a^b = a^b log a, taken as 0 where a == 0 (the limit for b > 0), as torch does.
        ga_safe = where(a == 0, zeros_like(a) + 1, a)
        gb = g * where(a == 0, zeros_like(a * b), (a**b) * log(ga_safe))
    return ga, gb


@defop("neg", infer=_unary_no_bool("neg", _INVERT_MASK))
def neg_p(xp, a):
    return -a


@neg_p.defvjp
def _(g, out, a):
    return (-g,)


# ===================================================================== unary math ======


def _float_infer(name):
    return lambda a: floating(name, a)


def _float(xp, a):
    return a if a.dtype.kind == "f" else a.astype(dtypes.default_float.np)


@defop("exp", dtype="float", infer=_float_infer("exp"), saves_out=True)
def exp_p(xp, a):
    return xp.exp(_float(xp, a))


@exp_p.defvjp
def _(g, out, a):
    return (g * out,)


@defop("log", dtype="float", infer=_float_infer("log"))
def log_p(xp, a):
    return xp.log(_float(xp, a))


@log_p.defvjp
def _(g, out, a):
    return (g / a,)


@defop("log1p", dtype="float", infer=_float_infer("log1p"))
def log1p_p(xp, a):
    return xp.log1p(_float(xp, a))


@log1p_p.defvjp
def _(g, out, a):
    return (g / (a + 1),)


@defop("sqrt", dtype="float", infer=_float_infer("sqrt"), saves_out=True)
def sqrt_p(xp, a):
    return xp.sqrt(_float(xp, a))


@sqrt_p.defvjp
def _(g, out, a):
    return (g / (2 * out),)


@defop("abs", infer=_unary_no_bool("abs", "convert it with .long() or .float()"))
def abs_p(xp, a):
    return xp.abs(a)


@abs_p.defvjp
def _(g, out, a):
    return (g * sign(a),)


@defop("sign", infer=same)
def sign_p(xp, a):
    # NumPy has no bool sign; torch's is the identity.
    return a.copy() if a.dtype.kind == "b" else xp.sign(a)


@sign_p.defvjp
def _(g, out, a):
    return (zeros_like(g),)


@defop("sin", dtype="float", infer=_float_infer("sin"))
def sin_p(xp, a):
    return xp.sin(_float(xp, a))


@sin_p.defvjp
def _(g, out, a):
    return (g * cos(a),)


@defop("cos", dtype="float", infer=_float_infer("cos"))
def cos_p(xp, a):
    return xp.cos(_float(xp, a))


@cos_p.defvjp
def _(g, out, a):
    return (-g * sin(a),)


@defop("tanh", dtype="float", infer=_float_infer("tanh"), saves_out=True)
def tanh_p(xp, a):
    return xp.tanh(_float(xp, a))


@tanh_p.defvjp
def _(g, out, a):
    return (g * (1 - out * out),)


@defop("sigmoid", dtype="float", infer=_float_infer("sigmoid"), saves_out=True)
def sigmoid_p(xp, a):
    a = _float(xp, a)
    # Split by sign so that exp never overflows.
    e = xp.exp(-xp.abs(a))
    return xp.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)


@sigmoid_p.defvjp
def _(g, out, a):
    return (g * out * (1 - out),)


# ==================================================================== activations ======


@defop("relu", infer=_unary_no_bool("relu", "convert it with .float() or .long()"))
def relu_p(xp, a):
    return xp.maximum(a, 0, dtype=a.dtype)


@relu_p.defvjp
def _(g, out, a):
    if not is_grad_enabled() and _bitwise_select_applies(g, a):
        return (_kernel(_relu_vjp_bits, g, a),)
    # g where not a <= 0, as torch's threshold_backward: a NaN input passes its gradient.
    return (where(a <= 0, 0.0, g),)  # a 0-d zero: no array of zeros to allocate


def _bitwise_select_applies(g, a) -> bool:
    ga, aa = g._data, a._data
    return type(ga) is np.ndarray and ga.dtype.kind == "f" and ga.shape == aa.shape


def _relu_vjp_bits(xp, g, a):
    """where(a <= 0, 0, g) as g's bits AND a mask of all ones where not a <= 0: three
    vector passes. NumPy's where branches on every element, ~4 ns each on a ReLU's random
    mask (2 ms for 32x16x32x32 against 0.14 ms); the bits are the same (+0.0 where
    dropped)."""
    ints = np.dtype(f"i{g.dtype.itemsize}")
    mask = np.asarray(np.less_equal(a, 0)).view(np.int8).astype(ints)  # 0-d: a bool scalar
    mask -= 1  # 1 -> 0, 0 -> all ones
    np.bitwise_and(mask, g.view(ints), out=mask)
    return mask.view(g.dtype)


def _infer_leaky_relu(a, negative_slope):
    # torch refuses integers too: int64 * 0.01 would truncate negative values to 0.
    if not a.dtype.is_floating_point:
        raise OpError(
            f"leaky_relu: not supported for tensors of dtype {a.dtype.name} (shape "
            f"{fmt(a.shape)}); it needs floating point: convert it with .float()"
        )
    return same(a)


@defop("leaky_relu", infer=_infer_leaky_relu, attrs={"negative_slope": ("float", 0.01)})
def leaky_relu_p(xp, a, negative_slope):
    return xp.where(a > 0, a, a * a.dtype.type(negative_slope))


@leaky_relu_p.defvjp
def _(g, out, a, negative_slope):
    return (where(a > 0, g, g * negative_slope),)


def _infer_gelu(a, approximate):
    if approximate not in ("none", "tanh"):
        raise OpError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return floating("gelu", a)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@defop(
    "gelu",
    dtype="float",
    choices={"approximate": ("none", "tanh")},
    infer=_infer_gelu,
    attrs={"approximate": ("str", "none")},
    saves_out=True,
)
def gelu_p(xp, a, approximate):
    a = _float(xp, a)
    t = a.dtype.type
    if approximate == "tanh":
        inner = t(_SQRT_2_OVER_PI) * (a + t(0.044715) * a**3)
        return t(0.5) * a * (1 + xp.tanh(inner))
    if xp is np and a.dtype == np.float32 and a.size >= 4096:
        # In place on fresh arrays: the bits of the line below, two full-size arrays.
        scaled = np.multiply(a, t(1 / math.sqrt(2.0)))
        cdf2 = _erf(xp, scaled)
        cdf2 += t(1)
        cdf2 *= np.multiply(a, t(0.5), out=scaled)
        return cdf2
    return t(0.5) * a * (1 + _erf(xp, a * t(1 / math.sqrt(2.0))))


def _erf(xp, x):
    # Imported on first use: NumPy has no erf, and scipy.special takes ~0.5 s to import,
    # which only exact GELU needs; CuPy is optional.
    if xp.__name__ == "numpy" and x.dtype == xp.float32 and x.size >= 4096:
        with xp.errstate(over="ignore"):  # x^2 of a huge |x|: the head's, not selected
            return _erf_float32(xp, x)
    if xp.__name__ == "numpy":
        from scipy.special import erf

        return erf(x).astype(x.dtype, copy=False)
    import cupyx.scipy.special

    return cupyx.scipy.special.erf(x)


# float32 erf in NumPy passes, 4-5x faster than SciPy's (which computes in float64, one
# element at a time). Coefficients fitted by least squares to float64 erf: |x| < 1 as
# x * P(x^2), relative; beyond, 1 - t * Q(t) * exp(-x^2) with t = 1 / (1 + |x| / 2) (the
# Abramowitz-Stegun 7.1.26 form, with more terms). At most 1.5e-7 from erf on float32
# inputs (SciPy's float32 erf: 3e-8; torch's float32 GELU rounds 1 + erf to 6e-8).
_ERF_HEAD = (7.97118786e-05, -0.000804341098, 0.00519183692, -0.0268555109, 0.112836221)
_ERF_HEAD += (-0.376126287, 1.12837917)
_ERF_TAIL = (0.0629660802, -0.237683606, 0.159707662, 0.269375596, 0.152642919)
_ERF_TAIL += (0.315142592, 0.277848803)


def _horner(xp, coefs, v, out=None):
    r = xp.multiply(v, v.dtype.type(coefs[0]), out=out)
    for c in coefs[1:-1]:
        r += v.dtype.type(c)
        r *= v
    r += v.dtype.type(coefs[-1])
    return r


# Elements per block: a block's scratch (four float32 buffers and a mask, 544 KB) stays in
# the L2 cache, and the same buffers serve every block. Whole-array temporaries were fresh
# megabyte arrays: page faults wherever glibc had returned freed memory to the kernel
# (3,200 per (1024, 512) GELU in the GPT's training step).
_ERF_BLOCK = 32768


def _erf_float32(xp, x):
    """erf of a float32 NumPy array, block by block (above)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    k = min(flat.size, _ERF_BLOCK)
    scratch = [np.empty(k, np.float32) for _ in range(4)] + [np.empty(k, bool)]
    for s in range(0, flat.size, k):
        n = min(k, flat.size - s)
        _erf_block(flat[s : s + n], out[s : s + n], [b[:n] for b in scratch])
    return out.reshape(x.shape)


def _erf_block(x, out, scratch):
    f = np.float32
    ax, t, tail, head, head_part = scratch
    np.abs(x, out=ax)
    np.less(ax, f(1), out=head_part)
    np.multiply(ax, f(0.5), out=t)
    t += f(1)
    np.reciprocal(t, out=t)
    _horner(np, _ERF_TAIL, t, out=tail)
    tail *= t
    sq = np.multiply(ax, ax, out=t)
    _horner(np, _ERF_HEAD, sq, out=head)
    head *= ax
    np.negative(sq, out=sq)
    np.exp(sq, out=sq)
    tail *= sq
    np.subtract(f(1), tail, out=tail)
    np.copyto(tail, head, where=head_part)
    np.copysign(tail, x, out=out)


@defop(
    "gelu_grad",
    dtype="float",
    choices={"approximate": ("none", "tanh")},
    infer=_infer_gelu,
    attrs={"approximate": ("str", "none")},
)
def gelu_grad_p(xp, a, approximate):
    """d gelu / da, as its own op so that gelu's vjp stays differentiable."""
    a = _float(xp, a)
    t = a.dtype.type
    if approximate == "tanh":
        k = t(_SQRT_2_OVER_PI)
        inner = k * (a + t(0.044715) * a**3)
        th = xp.tanh(inner)
        return t(0.5) * (1 + th) + t(0.5) * a * (1 - th * th) * k * (1 + t(3 * 0.044715) * a * a)
    cdf = t(0.5) * (1 + _erf(xp, a * t(1 / math.sqrt(2.0))))
    pdf = xp.exp(t(-0.5) * a * a) * t(1 / math.sqrt(2 * math.pi))
    return cdf + a * pdf


@gelu_p.defvjp
def _(g, out, a, approximate):
    if approximate == "none" and not is_grad_enabled():
        return (_kernel(_gelu_vjp_from_out, g, out, a),)
    return (g * gelu_grad_p(a, approximate=approximate),)


def _gelu_vjp_from_out(xp, g, out, a):
    """g * gelu'(a) = g * (cdf(a) + a * pdf(a)), with cdf read back from the forward's
    result (out = a * cdf(a)) instead of a second erf, the slowest part of GELU. At 0 (and
    below 1e-20, where out / a would be made of subnormals) cdf(a) = 0.5 + a / sqrt(2 pi),
    exact there to far below either float's precision."""
    t = a.dtype.type
    cdf = _cdf_from_out(xp, out, a)
    pdf = xp.multiply(a, t(-0.5), out=xp.empty_like(a))
    pdf *= a  # (-0.5 * a) * a, as gelu_grad: the same bits in half precision too
    xp.exp(pdf, out=pdf)
    pdf *= a
    pdf *= t(1 / math.sqrt(2 * math.pi))
    pdf += cdf
    pdf *= g
    return pdf


def _cdf_from_out(xp, out, a):
    """out / a, and the series 0.5 + a / sqrt(2 pi) where |a| < 1e-20."""
    t = a.dtype.type
    if xp is np:  # two bool arrays rather than a full-size float |a| and one
        small = np.less(a, t(1e-20))
        small &= np.greater(a, t(-1e-20))
    else:
        small = xp.abs(a) < t(1e-20)
    if xp is not np:  # selects: no device-to-host sync for small.any()
        series = t(0.5) + a * t(1 / math.sqrt(2 * math.pi))
        return xp.where(small, series, out / xp.where(small, t(1), a))
    with np.errstate(divide="ignore", invalid="ignore"):
        cdf = np.divide(out, a, out=np.empty_like(a))  # an array even when 0-d
    if small.any():  # rare: patching only those elements halves the passes over a
        cdf[small] = t(0.5) + a[small] * t(1 / math.sqrt(2 * math.pi))
    return cdf


def _kernel(fn, *tensors, **attrs):
    """``fn`` over the tensors' arrays, outside the registry: for one-kernel vjps that run
    only when no graph is recorded (without create_graph, where the result needs no
    history). They are not ops, so no graph holds one; differentiating again goes through
    the differentiable form instead."""
    from ..tensor import Tensor

    arrays = [t._data for t in tensors]
    return Tensor._wrap(fn(backend.xp_of(arrays[0]), *arrays, **attrs))


@gelu_grad_p.defvjp
def _(g, out, a, approximate):
    # Second derivative of gelu.
    if approximate == "tanh":
        k, c = _SQRT_2_OVER_PI, 0.044715
        u = k * (a + c * a**3)
        du = k * (1 + 3 * c * a * a)
        th = tanh(u)
        sech2 = 1 - th * th
        d2 = sech2 * du + 0.5 * a * (-2 * th * sech2 * du * du + sech2 * k * 6 * c * a)
        return (g * d2,)
    pdf = exp(-0.5 * a * a) * (1 / math.sqrt(2 * math.pi))
    return (g * pdf * (2 - a * a),)


def _infer_softplus(a, beta, threshold):
    return floating("softplus", a)


@defop(
    "softplus",
    dtype="float",
    infer=_infer_softplus,
    attrs={"beta": ("float", 1.0), "threshold": ("float", 20.0)},
)
def softplus_p(xp, a, beta, threshold):
    a = _float(xp, a)
    t = a.dtype.type
    z = a * t(beta)
    # log1p(exp(z)) computed stably; linear above the threshold, as torch does.
    soft = (xp.maximum(z, 0) + xp.log1p(xp.exp(-xp.abs(z)))) / t(beta)
    return xp.where(z > threshold, a, soft)


@softplus_p.defvjp
def _(g, out, a, beta, threshold):
    z = a * beta
    return (where(z > threshold, g, g * sigmoid(z)),)


def _infer_clamp(a, min, max):
    # The result has the input's dtype: torch's promotion (clamp(int_tensor, -0.5) is
    # float32) happens before, in functional.clamp, which casts the input.
    if min is None and max is None:
        raise OpError("clamp: at least one of 'min' or 'max' must not be None")
    _refuse_bool("clamp", a, "convert it with .long() or .float()")
    if not a.dtype.is_floating_point:
        for name, bound in (("min", min), ("max", max)):
            if bound is not None and not float(bound).is_integer():
                raise OpError(
                    f"clamp: {name}={bound} is not a whole number, but a tensor "
                    f"of dtype {a.dtype.name} (shape {fmt(a.shape)}) is clamped in "
                    f"its own dtype; cast it to floating point first (.float())"
                )
    return same(a)


def _clamp_bound(a, bound):
    if bound is None or a.dtype.kind == "f":
        return None if bound is None else a.dtype.type(bound)
    # A whole number beyond the integer range clamps like the end of the range.
    info = np.iinfo(a.dtype)
    return a.dtype.type(min(max(int(bound), int(info.min)), int(info.max)))


@defop("clamp", infer=_infer_clamp, attrs={"min": ("float?", None), "max": ("float?", None)})
def clamp_p(xp, a, min, max):
    return xp.clip(a, _clamp_bound(a, min), _clamp_bound(a, max))


@clamp_p.defvjp
def _(g, out, a, min, max):
    inside = (a >= min) if min is not None else None
    if max is not None:
        inside = (a <= max) if inside is None else inside & (a <= max)
    return (where(inside, g, zeros_like(g)),)


# ===================================================================== two-tensor ======


@defop("maximum", dtype="promote", infer=binary("maximum"), arity=2, broadcast=True)
def maximum_p(xp, a, b):
    a, b = _cast(xp, a, b)
    return xp.maximum(a, b)


def _pair_vjp(g, a, b, b_wins, a_wins):
    """torch's rule for maximum and minimum: ties split the gradient evenly, and each side
    gets it unless the other one wins; so with a NaN on either side, both get all of it."""
    tie = a == b
    half = g * 0.5
    return where(tie, half, where(b_wins, 0.0, g)), where(tie, half, where(a_wins, 0.0, g))


@maximum_p.defvjp
def _(g, out, a, b):
    return _pair_vjp(g, a, b, a < b, a > b)


@defop("minimum", dtype="promote", infer=binary("minimum"), arity=2, broadcast=True)
def minimum_p(xp, a, b):
    a, b = _cast(xp, a, b)
    return xp.minimum(a, b)


@minimum_p.defvjp
def _(g, out, a, b):
    return _pair_vjp(g, a, b, a > b, a < b)


# ========================================================== division with rounding ======


def _infer_integer_division(op: str):
    infer_shape = binary(op)

    def infer(a, b) -> Spec:
        for spec in (a, b):
            _refuse_bool(op, spec, "convert it with .long()")
        return infer_shape(a, b)

    return infer


def _refuse_zero_divisor(op: str, xp, b) -> None:
    # NumPy gives 0 and a warning for an integer divided by 0; torch raises.
    if b.dtype.kind in "iu" and bool((b == 0).any()):
        raise OpError(f"{op}: ZeroDivisionError (an integer divided by zero)")


@defop(
    "floor_divide",
    dtype="promote",
    infer=_infer_integer_division("floor_divide"),
    arity=2,
    broadcast=True,
)
def floor_divide_p(xp, a, b):
    a, b = _cast(xp, a, b)
    _refuse_zero_divisor("floor_divide", xp, b)
    return xp.floor_divide(a, b)


# Piecewise constant: its gradient is zero wherever it exists, and torch defines none.
floor_divide_p.defvjp(lambda g, out, a, b: (None, None))


@defop(
    "remainder",
    dtype="promote",
    infer=_infer_integer_division("remainder"),
    arity=2,
    broadcast=True,
)
def remainder_p(xp, a, b):
    # Python's %: the result takes the divisor's sign, as torch.remainder.
    a, b = _cast(xp, a, b)
    _refuse_zero_divisor("remainder", xp, b)
    return xp.remainder(a, b)


@remainder_p.defvjp
def _(g, out, a, b):
    # remainder(a, b) = a - floor_divide(a, b) * b
    ga = g if a.requires_grad else None
    gb = -g * floor_divide(a, b) if b.requires_grad else None
    return ga, gb


def _infer_where(cond, a, b) -> Spec:
    if cond.dtype is not dtypes.bool_:
        raise OpError(f"where: expected condition to be a bool tensor, got {cond.dtype}")
    shape = broadcast_shapes("where", cond.shape, a.shape, b.shape)
    return Spec(shape, dtypes.promote(a.dtype, b.dtype, len(a.shape) == 0, len(b.shape) == 0))


@defop("where", dtype="promote:a,b", nondiff=("cond",), infer=_infer_where, arity=3, broadcast=True)
def where_p(xp, cond, a, b):
    a, b = _cast(xp, a, b)
    if xp.__name__ == "numpy" and cond.size >= 4096:
        return _select(xp, cond, a, b)
    return xp.where(cond, a, b)


_UINT = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def _select(xp, cond, a, b):
    """``numpy.where`` without branches, bit for bit the same (NaN payloads, -0.0).

    numpy.where branches per element and mispredicts on a random mask (a ReLU's): it is
    5-15x slower than this bitwise blend, ``b ^ ((a ^ b) & mask)``, mask all ones where
    ``cond``. Each full-size temporary counts too (a fresh large array is page-faulted in),
    so the common ``where(cond, g, 0)`` takes one.
    """
    u = xp.dtype(_UINT[a.dtype.itemsize])
    mask = xp.negative(cond.view(xp.uint8), dtype=u)  # True -> all bits set, in one pass
    ub = b.view(u)
    if b.ndim == 0 and not ub and cond.shape == a.shape:
        mask &= a.view(u)  # b is +0.0 (or 0): zero bits elsewhere
        return mask.view(a.dtype)
    out = xp.bitwise_xor(a.view(u), ub)
    out = xp.bitwise_and(out, mask, out=out if out.shape == mask.shape else None)
    out ^= ub
    return out.view(a.dtype)


@where_p.defvjp
def _(g, out, cond, a, b):
    return None, where(cond, g, 0.0), where(cond, 0.0, g)  # 0-d zeros: no allocation


# ==================================================================== comparisons ======
# Boolean results carry no gradient.


def _compare(name, fn):
    def infer(a, b) -> Spec:
        return Spec(broadcast_shapes(name, a.shape, b.shape), dtypes.bool_)

    op = defop(name, infer=infer, arity=2, broadcast=True, dtype="bool")(fn)
    op.defvjp(lambda g, out, a, b: (None, None))
    return op


eq_p = _compare("eq", lambda xp, a, b: a == b)
ne_p = _compare("ne", lambda xp, a, b: a != b)
lt_p = _compare("lt", lambda xp, a, b: a < b)
le_p = _compare("le", lambda xp, a, b: a <= b)
gt_p = _compare("gt", lambda xp, a, b: a > b)
ge_p = _compare("ge", lambda xp, a, b: a >= b)


logical_and_p = _compare("logical_and", lambda xp, a, b: xp.logical_and(a, b))
logical_or_p = _compare("logical_or", lambda xp, a, b: xp.logical_or(a, b))


@defop("logical_not", dtype="bool", infer=lambda a: Spec(tuple(a.shape), dtypes.bool_))
def logical_not_p(xp, a):
    return xp.logical_not(a)


logical_not_p.defvjp(lambda g, out, a: (None,))


# ========================================================================== dtype ======


def _infer_cast(a, dtype):
    try:
        return Spec(tuple(a.shape), dtypes.by_name(dtype))
    except TypeError as e:
        raise OpError(f"cast: {e}") from None


@defop("cast", dtype="attr:dtype", infer=_infer_cast, attrs={"dtype": ("dtype", "float32")})
def cast_p(xp, a, dtype):
    return dtypes.astype(a, dtypes.by_name(dtype).np)


@cast_p.defvjp
def _(g, out, a, dtype):
    return (g.to(a.dtype) if a.dtype.is_floating_point else None,)


@defop("clone", infer=same)
def clone_p(xp, a):
    return a.copy()


clone_p.defvjp(lambda g, out, a: (g,))


# ================================================================ gradient stop ======
# What ``detach()`` and ops run under ``no_grad()`` leave in a traced graph: the identity
# forward (sharing memory, as detach does), and no vjp at all, so that neither engine
# sends a gradient through it or through anything computed from it alone.


@defop("stop_gradient", infer=same, differentiable=False)
def stop_gradient_p(xp, a):
    return a


def _infer_to_device(a, device):
    if device not in ("cpu", "cuda"):
        raise OpError(f"to_device: unknown device {device!r}")
    return same(a)


@defop(
    "to_device",
    choices={"device": ("cpu", "cuda")},
    infer=_infer_to_device,
    attrs={"device": ("str", "cpu")},
)
def to_device_p(xp, a, device):
    if device == "cpu":
        return backend.to_numpy(a)
    return backend.cupy().asarray(a)


@to_device_p.defvjp
def _(g, out, a, device):
    return (g.to(a.device),)
