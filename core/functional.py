"""The public functions over tensors (``gradmesh.core.exp``, ``Tensor.sum`` and friends).

Each one converts its arguments (Python scalars become 0-d tensors of a matching dtype),
then calls a primitive from the registry, or composes several: ``cross_entropy`` is
``log_softmax`` then ``nll_loss``. Primitives live in ``gradmesh.core.ops``.
"""
from __future__ import annotations

import builtins
import numbers
from typing import Sequence

import numpy as np

from . import dtypes
from .registry import REGISTRY
from .tensor import Tensor, zeros_like, ones_like  # noqa: F401  (re-exported)


def _op(name: str):
    return REGISTRY[name]


def _scalar(value, like: Tensor) -> Tensor:
    """A Python number as a 0-d tensor that keeps ``like``'s dtype where torch would."""
    kind = like.dtype
    if isinstance(value, bool):
        dt = kind if kind is not None else dtypes.bool_
    elif isinstance(value, numbers.Integral):
        dt = kind if kind is not dtypes.bool_ else dtypes.int64
    elif isinstance(value, numbers.Real):
        dt = kind if kind.is_floating_point else dtypes.default_float
    else:
        raise TypeError(f"unsupported operand type {type(value).__name__}; expected a Tensor "
                        f"or a number")
    xp = _xp(like)
    return Tensor._wrap(xp.asarray(value, dtype=dt.np))


def _xp(t: Tensor):
    from .backend import xp_of
    return xp_of(t._data)


def _pair(a, b):
    """Both operands as tensors; a bare array becomes a tensor sharing its memory."""
    if not isinstance(a, Tensor):
        if isinstance(b, Tensor):
            a = _scalar(a, b) if isinstance(a, numbers.Number) else Tensor(a)
        else:
            from .tensor import tensor
            a = tensor(a)
    if not isinstance(b, Tensor):
        b = _scalar(b, a) if isinstance(b, numbers.Number) else Tensor(b)
    return a, b


# ===================================================================== arithmetic ======

def add(a, b, alpha=1) -> Tensor:
    a, b = _pair(a, b)
    return _op("add")(a, b if alpha == 1 else mul(b, alpha))


def sub(a, b, alpha=1) -> Tensor:
    a, b = _pair(a, b)
    return _op("sub")(a, b if alpha == 1 else mul(b, alpha))


def mul(a, b) -> Tensor:
    return _op("mul")(*_pair(a, b))


def div(a, b, rounding_mode=None) -> Tensor:
    out = _op("div")(*_pair(a, b))
    if rounding_mode is not None:
        raise NotImplementedError("div: rounding_mode is not supported; use // on integers")
    return out


true_divide = divide = div
multiply = mul
subtract = sub


def neg(a) -> Tensor:
    return _op("neg")(a)


negative = neg


def pow(a, exponent) -> Tensor:
    return _op("pow")(*_pair(a, exponent))


def square(a) -> Tensor:
    return mul(a, a)


def rsqrt(a) -> Tensor:
    return div(1.0, sqrt(a))


def reciprocal(a) -> Tensor:
    return div(1.0, a)


# ===================================================================== unary math ======

def _unary(name):
    def fn(a: Tensor) -> Tensor:
        return _op(name)(a)
    fn.__name__ = name
    fn.__doc__ = f"Elementwise {name}."
    return fn


exp = _unary("exp")
log = _unary("log")
log1p = _unary("log1p")
sqrt = _unary("sqrt")
abs = _unary("abs")
sign = _unary("sign")
sin = _unary("sin")
cos = _unary("cos")
tanh = _unary("tanh")
sigmoid = _unary("sigmoid")
relu = _unary("relu")
clone = _unary("clone")
logical_not = _unary("logical_not")


def leaky_relu(a: Tensor, negative_slope: float = 0.01) -> Tensor:
    return _op("leaky_relu")(a, negative_slope=float(negative_slope))


def gelu(a: Tensor, approximate: str = "none") -> Tensor:
    return _op("gelu")(a, approximate=approximate)


def softplus(a: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return _op("softplus")(a, beta=float(beta), threshold=float(threshold))


def clamp(a: Tensor, min=None, max=None) -> Tensor:
    if isinstance(min, Tensor) or isinstance(max, Tensor):
        out = a
        if min is not None:
            out = maximum(out, min)
        if max is not None:
            out = minimum(out, max)
        return out
    return _op("clamp")(a, min=None if min is None else float(min),
                        max=None if max is None else float(max))


clip = clamp


def maximum(a, b) -> Tensor:
    return _op("maximum")(*_pair(a, b))


def minimum(a, b) -> Tensor:
    return _op("minimum")(*_pair(a, b))


def where(cond, a, b) -> Tensor:
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        a = Tensor._wrap(_xp(cond).asarray(a, dtype=_literal_dtype(a).np))
    a, b = _pair(a, b)
    return _op("where")(cond, a, b)


def _literal_dtype(v) -> dtypes.DType:
    if isinstance(v, bool):
        return dtypes.bool_
    if isinstance(v, numbers.Integral):
        return dtypes.int64
    return dtypes.default_float


def cast(a: Tensor, dtype: str) -> Tensor:
    return _op("cast")(a, dtype=dtype)


def to_device(a: Tensor, device: str) -> Tensor:
    return _op("to_device")(a, device=device)


# ==================================================================== comparisons ======

def _compare(name):
    def fn(a, b) -> Tensor:
        return _op(name)(*_pair(a, b))
    fn.__name__ = name
    return fn


eq = _compare("eq")
ne = _compare("ne")
lt = _compare("lt")
le = _compare("le")
gt = _compare("gt")
ge = _compare("ge")
logical_and = _compare("logical_and")
logical_or = _compare("logical_or")
greater, less, greater_equal, less_equal, not_equal = gt, lt, ge, le, ne


def equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and builtins.bool(eq(a, b).all())


def allclose(a: Tensor, b: Tensor, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    return builtins.bool(np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol))


def isclose(a: Tensor, b: Tensor, rtol: float = 1e-5, atol: float = 1e-8) -> Tensor:
    return Tensor(np.isclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol))


# ================================================= reductions, shapes, linear algebra ===
# (sections below are filled in alongside the primitives in gradmesh.core.ops)

def sum(a: Tensor, dim=None, keepdim: bool = False, dtype=None) -> Tensor:
    if dtype is not None:
        a = a.to(dtype)
    return _op("sum")(a, dim=_dims(dim), keepdim=keepdim)


def _dims(dim):
    """``dim`` as the registry's attribute: None or a list of ints."""
    if dim is None:
        return None
    if isinstance(dim, numbers.Integral):
        return [int(dim)]
    return [int(d) for d in dim]


def _shape(shape) -> list:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return [int(s) for s in shape]


def reshape(a: Tensor, *shape) -> Tensor:
    return _op("reshape")(a, shape=_shape(shape))


def permute(a: Tensor, *dims) -> Tensor:
    return _op("permute")(a, dims=_shape(dims))


def transpose(a: Tensor, dim0: int, dim1: int) -> Tensor:
    n = a.ndim
    if n < 2 and (dim0, dim1) in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        return a
    perm = list(range(n))
    d0, d1 = dim0 % n if n else 0, dim1 % n if n else 0
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return permute(a, perm)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return _op("matmul")(a, b)


def mm(a: Tensor, b: Tensor) -> Tensor:
    return _op("mm")(a, b)



def expand(a: Tensor, *shape) -> Tensor:
    return _op("expand")(a, shape=_shape(shape))


def unsqueeze(a: Tensor, dim: int) -> Tensor:
    n = a.ndim + 1
    d = dim % n
    return reshape(a, a.shape[:d] + (1,) + a.shape[d:])


def squeeze(a: Tensor, dim=None) -> Tensor:
    if dim is None:
        return reshape(a, [s for s in a.shape if s != 1])
    dims = {d % a.ndim for d in ([dim] if isinstance(dim, int) else dim)} if a.ndim else set()
    return reshape(a, [s for i, s in enumerate(a.shape) if not (i in dims and s == 1)])
