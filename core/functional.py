"""The public functions over tensors (``gradmesh.core.exp``, ``Tensor.sum`` and friends).

Each one converts its arguments (Python scalars become 0-d tensors of a matching dtype),
then calls a primitive from the registry, or composes several: ``cross_entropy`` is
``log_softmax`` then ``nll_loss``. Primitives live in ``gradmesh.core.ops``.
"""

from __future__ import annotations

import builtins
import collections
import math
import numbers
from typing import Any, Callable, Sequence

import numpy as np

from . import dtypes
from .backend import xp_of
from .factories import tensor
from .registry import REGISTRY, OpError, broadcast_shapes, norm_dim, norm_dims, public
from .tensor import Tensor


def _op(name: str):
    return REGISTRY[name]


def _scalar_dtype(value, kind: dtypes.DType) -> dtypes.DType:
    """The dtype torch gives a Python number meeting a tensor of dtype ``kind``."""
    if isinstance(value, bool):
        return kind
    if isinstance(value, numbers.Integral):
        return kind if kind is not dtypes.bool_ else dtypes.int64
    if isinstance(value, numbers.Real):
        return kind if kind.is_floating_point else dtypes.default_float
    raise TypeError(
        f"unsupported operand type {type(value).__name__}; expected a Tensor or a number"
    )


def _scalar(value, like: Tensor) -> Tensor:
    """A Python number as a 0-d tensor that keeps ``like``'s dtype where torch would."""
    dt = _scalar_dtype(value, like.dtype)
    xp = _xp(like)
    return Tensor._wrap(xp.asarray(value, dtype=dt.np))


def _xp(t: Tensor):
    return xp_of(t._data)


def _pair(a, b):
    """Both operands as tensors; a bare array becomes a tensor sharing its memory."""
    if type(a) is Tensor and type(b) is Tensor:
        return a, b
    if not isinstance(a, Tensor):
        if isinstance(b, Tensor):
            a = _scalar(a, b) if isinstance(a, numbers.Number) else Tensor(a)
        else:
            a = tensor(a)
    if not isinstance(b, Tensor):
        b = _scalar(b, a) if isinstance(b, numbers.Number) else Tensor(b)
    return a, b


# ===================================================================== arithmetic ======


@public(method=True)
def add(a, b, alpha=1) -> Tensor:
    a, b = _pair(a, b)
    return _op("add")(a, b if alpha == 1 else mul(b, alpha))


@public(method=True)
def sub(a, b, alpha=1) -> Tensor:
    a, b = _pair(a, b)
    return _op("sub")(a, b if alpha == 1 else mul(b, alpha))


@public(method=True)
def mul(a, b) -> Tensor:
    return _op("mul")(*_pair(a, b))


@public(method=True)
def div(a, b, rounding_mode=None) -> Tensor:
    if rounding_mode == "floor":
        return floor_divide(a, b)
    if rounding_mode is not None:
        raise NotImplementedError(
            f"div: rounding_mode={rounding_mode!r} is not supported; use None or 'floor'"
        )
    return _op("div")(*_pair(a, b))


@public(method=True)
def floor_divide(a, b) -> Tensor:
    """``a // b``: division rounded down (no gradient, as in torch)."""
    return _op("floor_divide")(*_pair(a, b))


@public(method=True)
def remainder(a, b) -> Tensor:
    """``a % b``: the remainder with the divisor's sign (Python's, torch's)."""
    return _op("remainder")(*_pair(a, b))


true_divide = divide = div
multiply = mul
subtract = sub


@public(method=True)
def neg(a) -> Tensor:
    return _op("neg")(a)


negative = neg


@public(method=True)
def pow(a, exponent) -> Tensor:
    return _op("pow")(*_pair(a, exponent))


@public(method=True)
def square(a) -> Tensor:
    return mul(a, a)


@public(method=True)
def rsqrt(a) -> Tensor:
    return div(1.0, sqrt(a))


@public(method=True)
def reciprocal(a) -> Tensor:
    return div(1.0, a)


# ===================================================================== unary math ======


def _unary(name: str, method: bool = False) -> Callable[[Tensor], Tensor]:
    def fn(a: Tensor) -> Tensor:
        return _op(name)(a)

    fn.__name__ = name
    fn.__doc__ = f"Elementwise {name}."
    return public(fn, method=method)


exp = _unary("exp", method=True)
log = _unary("log", method=True)
log1p = _unary("log1p", method=True)
sqrt = _unary("sqrt", method=True)
abs = _unary("abs", method=True)
sign = _unary("sign", method=True)
sin = _unary("sin", method=True)
cos = _unary("cos", method=True)
tanh = _unary("tanh", method=True)
sigmoid = _unary("sigmoid", method=True)
relu = _unary("relu", method=True)
clone = _unary("clone")
logical_not = _unary("logical_not", method=True)

# ---- the error function ----
erf = _unary("erf", method=True)
erfc = _unary("erfc", method=True)
erfinv = _unary("erfinv", method=True)


@public(method=True)
def leaky_relu(a: Tensor, negative_slope: float = 0.01) -> Tensor:
    return _op("leaky_relu")(a, negative_slope=float(negative_slope))


@public(method=True)
def gelu(a: Tensor, approximate: str = "none") -> Tensor:
    return _op("gelu")(a, approximate=approximate)


@public(method=True)
def softplus(a: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return _op("softplus")(a, beta=float(beta), threshold=float(threshold))


@public(method=True)
def clamp(a: Tensor, min=None, max=None) -> Tensor:
    """``a`` limited to ``[min, max]``, in torch's result dtype: a float bound makes an
    integer tensor float32, an int bound a bool tensor int64.

    >>> import gradmesh.core as gm
    >>> out = gm.clamp(gm.tensor([-3, 0, 5]), -0.5, 0.5)
    >>> out.tolist(), out.dtype
    ([-0.5, 0.0, 0.5], gradmesh.float32)
    """
    if isinstance(min, Tensor) or isinstance(max, Tensor):
        out = a
        if min is not None:
            out = maximum(out, min)
        if max is not None:
            out = minimum(out, max)
        return out
    dtype = a.dtype
    for bound in (min, max):
        if bound is not None:
            dtype = dtypes.promote(dtype, _scalar_dtype(bound, a.dtype), False, True)
    if dtype is not a.dtype:
        a = a.to(dtype)
    return _op("clamp")(
        a, min=None if min is None else float(min), max=None if max is None else float(max)
    )


clip = public(clamp, method=True, name="clip")


@public(method=True)
def maximum(a, b) -> Tensor:
    return _op("maximum")(*_pair(a, b))


@public(method=True)
def minimum(a, b) -> Tensor:
    return _op("minimum")(*_pair(a, b))


@public(method=True)
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


def _compare(name: str, method: bool = False) -> Callable[..., Tensor]:
    def fn(a, b) -> Tensor:
        return _op(name)(*_pair(a, b))

    fn.__name__ = name
    return public(fn, method=method)


eq = _compare("eq", method=True)
ne = _compare("ne", method=True)
lt = _compare("lt", method=True)
le = _compare("le", method=True)
gt = _compare("gt", method=True)
ge = _compare("ge", method=True)
logical_and = _compare("logical_and", method=True)
logical_or = _compare("logical_or", method=True)
greater, less, greater_equal, less_equal, not_equal = gt, lt, ge, le, ne


@public(method=True)
def equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and builtins.bool(eq(a, b).all())


@public(method=True)
def allclose(a: Tensor, b: Tensor, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    return builtins.bool(np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol))


@public(method=True)
def isclose(a: Tensor, b: Tensor, rtol: float = 1e-5, atol: float = 1e-8) -> Tensor:
    return Tensor(np.isclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol))


# ===================================================================== reductions ======


def _dims(dim):
    """``dim`` as the registry's attribute: None (every dim) or a list of ints.

    An empty tuple means every dim too, as in torch (``x.sum(dim=())``).
    """
    if dim is None:
        return None
    if isinstance(dim, numbers.Integral):
        return [int(dim)]
    dim = [int(d) for d in dim]
    return dim or None


def _count(op: str, a: Tensor, dim) -> int:
    """How many elements each output element of a reduction over ``dim`` sees."""
    return math.prod(a.shape[d] for d in norm_dims(op, _dims(dim), a.ndim)) if a.ndim else 1


def _require_float(op: str, a: Tensor) -> None:
    if not a.dtype.is_floating_point:
        raise OpError(
            f"{op}: expected a floating point tensor, got {a.dtype} (shape "
            f"{tuple(a.shape)}); convert it with .float() or pass dtype="
        )


@public(method=True)
def sum(a: Tensor, dim=None, keepdim: bool = False, dtype=None) -> Tensor:
    """Sum over ``dim`` (an int, a tuple, or None for every dim); bools and ints give int64."""
    if dtype is not None:
        a = a.to(dtype)
    return _op("sum")(a, dim=_dims(dim), keepdim=keepdim)


@public(method=True)
def mean(a: Tensor, dim=None, keepdim: bool = False, dtype=None) -> Tensor:
    """Mean over ``dim`` (every dim by default); integer tensors need ``dtype=``, as in torch.

    >>> import gradmesh.core as gm
    >>> gm.tensor([[1.0, 2.0], [3.0, 4.0]]).mean(dim=0).tolist()
    [2.0, 3.0]
    """
    if dtype is not None:
        a = a.to(dtype)
    _require_float("mean", a)
    return div(sum(a, dim=dim, keepdim=keepdim), float(_count("mean", a, dim)))


@public(method=True)
def var(
    a: Tensor,
    dim=None,
    unbiased: bool | None = None,
    keepdim: bool = False,
    *,
    correction: float | None = None,
) -> Tensor:
    """Variance over ``dim`` with Bessel's ``correction`` (1 by default; ``unbiased=False``
    is ``correction=0``). ``var(x, True)`` is the legacy ``unbiased`` form, as in torch."""
    if isinstance(dim, bool):
        dim, unbiased = None, dim
    if unbiased is not None and correction is not None:
        raise TypeError("var: pass either unbiased or correction, not both")
    if correction is None:
        correction = 0 if unbiased is False else 1
    _require_float("var", a)
    n = _count("var", a, dim)
    centered = a - mean(a, dim=dim, keepdim=True)
    # n - correction <= 0 divides by zero: inf or nan, as torch gives.
    return div(
        sum(centered * centered, dim=dim, keepdim=keepdim), float(builtins.max(0, n - correction))
    )


@public(method=True)
def std(
    a: Tensor,
    dim=None,
    unbiased: bool | None = None,
    keepdim: bool = False,
    *,
    correction: float | None = None,
) -> Tensor:
    """Standard deviation: ``sqrt(var(...))`` with the same arguments."""
    return sqrt(var(a, dim, unbiased, keepdim, correction=correction))


@public(method=True)
def amax(a: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Maximum over ``dim`` (a tuple allowed); ties share the gradient evenly."""
    return _op("amax")(a, dim=_dims(dim), keepdim=keepdim)


@public(method=True)
def amin(a: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Minimum over ``dim`` (a tuple allowed); ties share the gradient evenly."""
    return _op("amin")(a, dim=_dims(dim), keepdim=keepdim)


@public(method=True)
def argmax(a: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Index of the first maximum over ``dim`` (of the flattened tensor without ``dim``)."""
    return _op("argmax")(a, dim=None if dim is None else int(dim), keepdim=keepdim)


@public(method=True)
def argmin(a: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Index of the first minimum over ``dim`` (of the flattened tensor without ``dim``)."""
    return _op("argmin")(a, dim=None if dim is None else int(dim), keepdim=keepdim)


# torch.return_types: results that are a tuple and have field names.
_ValuesIndices: dict[str, Any] = {
    name: collections.namedtuple(name, ["values", "indices"])
    for name in ("max", "min", "sort", "topk")
}


def _extremum(name: str, arg: str, a: Tensor, dim: int, keepdim: bool):
    # argmax refuses bool tensors, as torch's does; torch's max(dim) takes them.
    indices = _op(arg)(
        a if a.dtype is not dtypes.bool_ else a.to(dtypes.int64), dim=int(dim), keepdim=True
    )
    # Gathering at the first extremum's index sends a tie's gradient there, as torch does.
    values = _op("gather")(a, indices, dim=int(dim))
    if not keepdim and a.ndim:
        values, indices = squeeze(values, dim), squeeze(indices, dim)
    return _ValuesIndices[name](values, indices)


@public(method=True)
def max(a: Tensor, dim=None, keepdim: bool = False):
    """``max(x)``: the largest element; ``max(x, dim)``: ``(values, indices)`` like
    ``torch.return_types.max``; ``max(x, other_tensor)``: the elementwise ``maximum``.

    >>> import gradmesh.core as gm
    >>> gm.tensor([[1.0, 5.0], [7.0, 2.0]]).max(dim=1).indices.tolist()
    [1, 0]
    """
    if isinstance(dim, Tensor):
        return maximum(a, dim)
    if dim is None:
        return amax(a)
    return _extremum("max", "argmax", a, dim, keepdim)


@public(method=True)
def min(a: Tensor, dim=None, keepdim: bool = False):
    """Like ``max``, for the smallest element."""
    if isinstance(dim, Tensor):
        return minimum(a, dim)
    if dim is None:
        return amin(a)
    return _extremum("min", "argmin", a, dim, keepdim)


@public(method=True)
def logsumexp(a: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """``log(sum(exp(a), dim))`` computed without overflow."""
    return _op("logsumexp")(a, dim=_dims(dim), keepdim=keepdim)


@public(method=True)
def prod(a: Tensor, dim: int | None = None, keepdim: bool = False, dtype=None) -> Tensor:
    """Product over ``dim``; its gradient is exact where some elements are zero."""
    if dtype is not None:
        a = a.to(dtype)
    return _op("prod")(a, dim=_dims(dim), keepdim=keepdim)


@public(method=True)
def all(a: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Whether every element (over ``dim``) is non-zero, as a bool tensor."""
    return _op("all")(a, dim=_dims(dim), keepdim=keepdim)


@public(method=True)
def any(a: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Whether some element (over ``dim``) is non-zero, as a bool tensor."""
    return _op("any")(a, dim=_dims(dim), keepdim=keepdim)


@public(method=True)
def softmax(a: Tensor, dim: int, dtype=None) -> Tensor:
    """``exp(a) / sum(exp(a), dim)``, computed without overflow (the op is in ``ops/nn.py``)."""
    if dtype is not None:
        a = a.to(dtype)
    return _op("softmax")(a, dim=int(dim))


@public(method=True)
def log_softmax(a: Tensor, dim: int, dtype=None) -> Tensor:
    """``a - logsumexp(a, dim)``, computed without overflow."""
    if dtype is not None:
        a = a.to(dtype)
    return _op("log_softmax")(a, dim=int(dim))


@public(method=True)
def cumsum(a: Tensor, dim: int, dtype=None) -> Tensor:
    """Cumulative sum along ``dim``; bools and ints accumulate in int64."""
    if dtype is not None:
        a = a.to(dtype)
    return _op("cumsum")(a, dim=int(dim))


@public(method=True)
def norm(a: Tensor, p="fro", dim=None, keepdim: bool = False, dtype=None) -> Tensor:
    """The vector p-norm over ``dim`` (every dim by default): ``p`` in 'fro', any number,
    ``inf`` or ``-inf``. Unlike torch, the 2-norm's gradient at exactly 0 is nan, not 0."""
    if dtype is not None:
        a = a.to(dtype)
    _require_float("norm", a)
    if p == "fro" or p == 2:
        return sqrt(sum(a * a, dim=dim, keepdim=keepdim))
    if isinstance(p, str):
        raise NotImplementedError(f"norm: p={p!r} is not supported; use 'fro' or a number")
    if p == math.inf:
        return amax(abs(a), dim=dim, keepdim=keepdim)
    if p == -math.inf:
        return amin(abs(a), dim=dim, keepdim=keepdim)
    if p == 1:
        return sum(abs(a), dim=dim, keepdim=keepdim)
    if p == 0:
        return sum(ne(a, 0), dim=dim, keepdim=keepdim).to(a.dtype)
    return pow(sum(pow(abs(a), float(p)), dim=dim, keepdim=keepdim), 1.0 / p)


# ========================================================================= shapes ======


def _shape(shape) -> list:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return [int(s) for s in shape]


@public(method=True)
def reshape(a: Tensor, *shape) -> Tensor:
    """The same elements in a new shape; one size may be -1 (inferred)."""
    return _op("reshape")(a, shape=_shape(shape))


@public(method=True)
def view(a: Tensor, *shape) -> Tensor:
    """``reshape``: every tensor here is contiguous, so a view is always possible."""
    return reshape(a, *shape)


@public(method=True)
def view_as(a: Tensor, other: Tensor) -> Tensor:
    """``a`` reshaped to ``other``'s shape."""
    return reshape(a, other.shape)


reshape_as = public(view_as, method=True, name="reshape_as")


@public(method=True)
def flatten(a: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """Dims ``start_dim..end_dim`` merged into one (a 0-d tensor becomes 1-d)."""
    if a.ndim == 0:
        return reshape(a, [1])
    s, e = norm_dim("flatten", start_dim, a.ndim), norm_dim("flatten", end_dim, a.ndim)
    if s > e:
        raise OpError(
            f"flatten: start_dim ({start_dim}) cannot come after end_dim "
            f"({end_dim}) for a tensor of shape {tuple(a.shape)}"
        )
    shape = a.shape
    return reshape(a, shape[:s] + (math.prod(shape[s : e + 1]),) + shape[e + 1 :])


@public(method=True)
def unflatten(a: Tensor, dim: int, sizes) -> Tensor:
    """Dim ``dim`` split into ``sizes`` (one of them may be -1)."""
    d = norm_dim("unflatten", dim, a.ndim)
    sizes = [int(s) for s in sizes]
    known = math.prod(s for s in sizes if s != -1)
    size = a.shape[d]
    ok = (size == known) if -1 not in sizes else (known > 0 and size % known == 0)
    if not ok or sizes.count(-1) > 1:
        raise OpError(
            f"unflatten: provided sizes {tuple(sizes)} don't multiply up to the size "
            f"of dim {dim} ({size}) in the input tensor of shape {tuple(a.shape)}"
        )
    if -1 in sizes:
        sizes[sizes.index(-1)] = size // known
    return reshape(a, a.shape[:d] + tuple(sizes) + a.shape[d + 1 :])


@public(method=True)
def permute(a: Tensor, *dims) -> Tensor:
    """The dims reordered: ``permute(x, 2, 0, 1)``."""
    return _op("permute")(a, dims=_shape(dims))


@public(method=True)
def transpose(a: Tensor, dim0: int, dim1: int) -> Tensor:
    """Dims ``dim0`` and ``dim1`` swapped."""
    n = a.ndim
    d0, d1 = norm_dim("transpose", dim0, n), norm_dim("transpose", dim1, n)
    if n < 2:
        return a
    perm = list(range(n))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return permute(a, perm)


swapaxes = swapdims = transpose


@public(method=True)
def t(a: Tensor) -> Tensor:
    """The transpose of a matrix (a tensor of at most 2 dims)."""
    if a.ndim > 2:
        raise OpError(
            f"t: expects a tensor with <= 2 dimensions, but got shape "
            f"{tuple(a.shape)} ({a.ndim}-D); use transpose(dim0, dim1) or .mT"
        )
    return transpose(a, 0, -1) if a.ndim == 2 else a


@public(method=True)
def movedim(a: Tensor, source: int, destination: int) -> Tensor:
    """Dim ``source`` moved to position ``destination``, the others keeping their order."""
    s, d = norm_dim("movedim", source, a.ndim), norm_dim("movedim", destination, a.ndim)
    perm = [i for i in range(a.ndim) if i != s]
    perm.insert(d, s)
    return permute(a, perm)


@public(method=True)
def expand(a: Tensor, *shape) -> Tensor:
    """A broadcast view to ``shape`` (-1 keeps a dim); its gradient sums back."""
    return _op("expand")(a, shape=_shape(shape))


@public(method=True)
def expand_as(a: Tensor, other: Tensor) -> Tensor:
    """``a`` broadcast to ``other``'s shape."""
    return expand(a, other.shape)


@public(method=True)
def unsqueeze(a: Tensor, dim: int) -> Tensor:
    """A dim of size 1 inserted at ``dim`` (in ``[-ndim-1, ndim]``)."""
    d = norm_dim("unsqueeze", dim, a.ndim + 1)
    return reshape(a, a.shape[:d] + (1,) + a.shape[d:])


@public(method=True)
def squeeze(a: Tensor, dim=None) -> Tensor:
    """Dims of size 1 removed: all of them, or those of ``dim`` (an int or a tuple)."""
    if dim is None:
        return reshape(a, [s for s in a.shape if s != 1])
    dims = set(norm_dims("squeeze", _dims(dim), a.ndim)) if a.ndim else set()
    return reshape(a, [s for i, s in enumerate(a.shape) if not (i in dims and s == 1)])


@public(method=True)
def repeat(a: Tensor, *sizes) -> Tensor:
    """The tensor tiled ``sizes[i]`` times along each dim (extra sizes add leading dims)."""
    sizes = tuple(_shape(sizes))
    if len(sizes) < a.ndim:
        raise OpError(
            f"repeat: number of dimensions of repeat dims ({len(sizes)}) can not be "
            f"smaller than number of dimensions of tensor ({a.ndim}, shape "
            f"{tuple(a.shape)})"
        )
    if builtins.any(s < 0 for s in sizes):
        raise OpError(f"repeat: repeats {tuple(sizes)} must not be negative")
    src = (1,) * (len(sizes) - a.ndim) + a.shape
    # Tile by broadcasting: (s0, s1) -> (1, s0, 1, s1) -> (r0, s0, r1, s1) -> (r0*s0, r1*s1).
    spread = [x for s in src for x in (1, s)]
    tiled = [x for r, s in zip(sizes, src) for x in (r, s)]
    out = expand(reshape(a, spread), tiled)
    return reshape(out, [r * s for r, s in zip(sizes, src)])


def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """The tensors joined along ``dim``; the other dims must match."""
    return _op("cat")(*tensors, dim=int(dim))


concat = concatenate = cat


def stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """Tensors of one shape joined along a new dim ``dim``."""
    return _op("stack")(*tensors, dim=int(dim))


def _slice_dim(a: Tensor, dim: int, start: int, stop: int, step: int = 1) -> Tensor:
    starts, stops, steps = [0] * a.ndim, list(a.shape), [1] * a.ndim
    starts[dim], stops[dim], steps[dim] = start, stop, step
    return _op("slice")(a, starts=starts, stops=stops, steps=steps)


@public(method=True)
def narrow(a: Tensor, dim: int, start: int, length: int) -> Tensor:
    """Elements ``start .. start+length-1`` along ``dim``."""
    d = norm_dim("narrow", dim, a.ndim)
    size = a.shape[d]
    start = int(start) + size if start < 0 else int(start)
    if not 0 <= start <= size or length < 0 or start + length > size:
        raise OpError(
            f"narrow: start ({start}) + length ({length}) exceeds dimension size "
            f"({size}) of dim {dim} of a tensor of shape {tuple(a.shape)}"
        )
    return _slice_dim(a, d, start, start + int(length))


@public(method=True)
def select(a: Tensor, dim: int, index: int) -> Tensor:
    """The slice at ``index`` along ``dim``, with that dim removed (``x[:, i]``)."""
    d = norm_dim("select", dim, a.ndim)
    size = a.shape[d]
    if not -size <= index < size:
        raise IndexError(
            f"select: index {index} out of range for tensor of size "
            f"{tuple(a.shape)} at dimension {dim}"
        )
    index %= size
    return reshape(_slice_dim(a, d, index, index + 1), a.shape[:d] + a.shape[d + 1 :])


@public(method=True)
def split(a: Tensor, split_size_or_sections, dim: int = 0) -> tuple:
    """Pieces of ``split_size`` along ``dim`` (the last may be smaller), or pieces of the
    given sizes."""
    d = norm_dim("split", dim, a.ndim)
    size = a.shape[d]
    if isinstance(split_size_or_sections, numbers.Integral):
        step = int(split_size_or_sections)
        if step <= 0 and size:
            raise OpError(f"split: split_size must be positive, got {step}")
        sections = [builtins.min(step, size - i) for i in range(0, size, step)] if size else [0]
    else:
        sections = [int(s) for s in split_size_or_sections]
        if builtins.sum(sections) != size or builtins.any(s < 0 for s in sections):
            raise OpError(
                f"split: split_with_sizes expects split_sizes to sum exactly to "
                f"{size} (input tensor's size at dimension {dim}, shape "
                f"{tuple(a.shape)}), but got split_sizes={sections}"
            )
    out, offset = [], 0
    for s in sections:
        out.append(_slice_dim(a, d, offset, offset + s))
        offset += s
    return tuple(out)


@public(method=True)
def chunk(a: Tensor, chunks: int, dim: int = 0) -> tuple:
    """At most ``chunks`` pieces of equal size along ``dim`` (the last may be smaller)."""
    if chunks <= 0:
        raise OpError(f"chunk: number of chunks must be greater than 0, got {chunks}")
    size = a.shape[norm_dim("chunk", dim, a.ndim)]
    return split(a, builtins.max(1, -(-size // chunks)), dim)


@public(method=True)
def unbind(a: Tensor, dim: int = 0) -> tuple:
    """Every slice along ``dim``, with that dim removed."""
    d = norm_dim("unbind", dim, a.ndim)
    return tuple(select(a, d, i) for i in range(a.shape[d]))


@public(method=True)
def flip(a: Tensor, dims) -> Tensor:
    """The elements in reverse order along each of ``dims``."""
    return _op("flip")(a, dims=_dims(dims) or [])


@public(method=True)
def roll(a: Tensor, shifts, dims=None) -> Tensor:
    """Elements shifted cyclically by ``shifts`` along ``dims`` (the flattened tensor
    without ``dims``)."""
    if dims is None:
        return reshape(roll(flatten(a), shifts, 0), a.shape)
    shifts = [shifts] if isinstance(shifts, numbers.Integral) else list(shifts)
    dims = [dims] if isinstance(dims, numbers.Integral) else list(dims)
    if len(shifts) != len(dims):
        raise OpError(
            f"roll: shifts {tuple(shifts)} and dims {tuple(dims)} must have the same length"
        )
    out = a
    for shift, dim in zip(shifts, dims):
        d = norm_dim("roll", dim, a.ndim)
        size = a.shape[d]
        s = int(shift) % size if size else 0
        if s:
            out = cat([_slice_dim(out, d, size - s, size), _slice_dim(out, d, 0, size - s)], d)
    return out


@public(method=True)
def tril(a: Tensor, diagonal: int = 0) -> Tensor:
    """The lower triangle of the last two dims (elements above ``diagonal`` zeroed)."""
    return _op("tril")(a, diagonal=int(diagonal))


@public(method=True)
def triu(a: Tensor, diagonal: int = 0) -> Tensor:
    """The upper triangle of the last two dims (elements below ``diagonal`` zeroed)."""
    return _op("triu")(a, diagonal=int(diagonal))


# ======================================================================= indexing ======


def _index_tensor(index, device: str) -> Tensor:
    """A list or array used as an index, as an int64 or bool tensor on ``device``."""
    if isinstance(index, Tensor):
        t = index
    else:
        t = tensor(index, device=device)
    if t.dtype.is_floating_point:
        raise IndexError(
            f"getitem: tensors used as indices must be long, int or bool tensors, got {t.dtype}"
        )
    return t


def getitem(a: Tensor, index) -> Tensor:
    """``a[index]`` with torch's semantics: ints, slices with positive steps, ``None``,
    ``...``, int tensors or lists (advanced indexing; repeated indices accumulate in the
    gradient) and bool masks, in any combination.

    Ints and slices are one ``slice`` node (plus a ``reshape``), index tensors one ``index``
    node; a mask becomes int indices through ``nonzero``.

    >>> import gradmesh.core as gm
    >>> x = gm.arange(12.0).reshape(3, 4)
    >>> x[1:, [0, 0, 3]].tolist()
    [[4.0, 4.0, 7.0], [8.0, 8.0, 11.0]]
    """
    out, advanced = _basic_index(a, index)
    if advanced:
        out = _op("index")(out, *[i for _, i in advanced], dims=[p for p, _ in advanced])
    return out


def _basic_index(a: Tensor, index) -> tuple[Tensor, list]:
    """``a[index]`` split in two: the basic part (ints, slices, ``None``, ``...``) applied,
    which is a view of ``a`` (a ``slice`` and a ``reshape`` node, or ``a`` itself), and the
    advanced part still to apply: ``(dim, int index tensor)`` pairs over that view.

    ``getitem`` applies the advanced part with ``index``; a traced ``a[index] = value``
    writes it with ``index_put`` and writes the view back into ``a``.
    """
    items = _index_items(a, index)
    shape = a.shape
    starts, stops, steps = [0] * a.ndim, list(shape), [1] * a.ndim
    kept: list[int] = []  # the shape once ints are dropped and Nones added
    advanced: list[tuple[int, Tensor]] = []  # (dim of that shape, int index tensor)
    d = 0
    for it in items:
        if it is None:
            kept.append(1)
            continue
        if isinstance(it, slice):
            if it.step is not None and it.step <= 0:
                raise ValueError(
                    f"getitem: step must be greater than zero, got {it.step}; "
                    f"use flip() to reverse a tensor"
                )
            start, stop, step = it.indices(shape[d])
            starts[d], stops[d], steps[d] = start, builtins.max(start, stop), step
            kept.append(len(range(start, stop, step)))
        elif isinstance(it, numbers.Integral):
            size = shape[d]
            if not -size <= it < size:
                raise IndexError(
                    f"getitem: index {it} is out of bounds for dimension {d} with size {size}"
                )
            starts[d] = int(it) % size
            stops[d] = starts[d] + 1
        elif it.dtype is dtypes.bool_:
            if tuple(it.shape) != shape[d : d + it.ndim] or it.ndim == 0:
                raise IndexError(
                    f"getitem: the shape of the mask {tuple(it.shape)} does not "
                    f"match the shape {shape[d : d + it.ndim]} of the indexed "
                    f"tensor {tuple(shape)} at dim {d}"
                )
            rows = nonzero(it)
            for j in range(it.ndim):
                col = reshape(_slice_dim(rows, 1, j, j + 1), [rows.shape[0]])
                advanced.append((len(kept), col))
                kept.append(shape[d + j])
            d += it.ndim
            continue
        else:
            advanced.append((len(kept), it))
            kept.append(shape[d])
        d += 1

    out = a
    if (
        starts != [0] * a.ndim
        or stops != list(shape)
        or steps != [1] * a.ndim
        or (not advanced and tuple(kept) == shape)
    ):
        out = _op("slice")(a, starts=starts, stops=stops, steps=steps)
    if tuple(kept) != out.shape:
        out = reshape(out, kept)
    return out, advanced


def _index_items(a: Tensor, index) -> list:
    """The items of ``index``, one per dim of ``a`` (``...`` and missing trailing dims as
    whole slices) plus ``None``s; lists and arrays as index tensors."""
    items = list(index) if isinstance(index, tuple) else [index]
    consumed, ellipses = 0, 0
    for k, it in enumerate(items):
        if it is Ellipsis:
            ellipses += 1
        elif it is None or isinstance(it, slice):
            consumed += it is not None
        elif isinstance(it, bool):
            raise NotImplementedError(
                "getitem: a Python bool index is not supported; use "
                "unsqueeze(), or a bool tensor mask"
            )
        elif isinstance(it, numbers.Integral):
            consumed += 1
        else:
            items[k] = it = _index_tensor(it, a.device)
            consumed += it.ndim if it.dtype is dtypes.bool_ else 1
    if ellipses > 1:
        raise IndexError("getitem: an index can only have a single ellipsis ('...')")
    if consumed > a.ndim:
        raise IndexError(
            f"getitem: too many indices for tensor of dimension {a.ndim} (shape "
            f"{tuple(a.shape)}): the index uses {consumed} dims"
        )
    if not ellipses:
        items.append(Ellipsis)
    k = next(k for k, it in enumerate(items) if it is Ellipsis)
    items[k : k + 1] = [slice(None)] * (a.ndim - consumed)
    return items


def _slice_put(a: Tensor, values: Tensor, starts, stops, steps) -> Tensor:
    """``a`` with ``values`` written over the slice ``starts:stops:steps`` (one per dim, as
    the ``slice`` op takes them): the out-of-place inverse of ``slice``. One ``index_put``
    node per dim that is not taken whole, so that a whole (batch) dim stays batch-free.

    >>> import gradmesh.core as gm
    >>> x = gm.zeros(2, 3)
    >>> _slice_put(x, gm.ones(2, 1), [0, 1], [2, 2], [1, 1]).tolist()
    [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    """
    shape = a.shape
    cut = [
        d for d in range(a.ndim) if not (starts[d] == 0 and steps[d] == 1 and stops[d] >= shape[d])
    ]
    if not cut:
        return values
    d = cut[0]
    index = Tensor._wrap(
        _xp(a).arange(starts[d], builtins.min(stops[d], shape[d]), steps[d], dtype=np.int64)
    )
    if len(cut) > 1:
        # The slab along ``d``, with the other dims written into it first.
        whole = {"starts": [0] * a.ndim, "stops": list(shape), "steps": [1] * a.ndim}
        for key, value in (("starts", starts), ("stops", stops), ("steps", steps)):
            whole[key][d] = value[d]
        slab = _op("slice")(a, **whole)
        rest = [list(v) for v in (starts, stops, steps)]
        rest[0][d], rest[1][d], rest[2][d] = 0, slab.shape[d], 1
        values = _slice_put(slab, values, *rest)
    return _op("index_put")(a, values, index, dims=[d], accumulate=False)


@public(method=True)
def index_select(a: Tensor, dim: int, index: Tensor) -> Tensor:
    """The slices at ``index`` (1-D, int64) along ``dim``."""
    d = norm_dim("index_select", dim, a.ndim)
    if index.ndim > 1:
        raise OpError(
            f"index_select: index is supposed to be a vector, got shape {tuple(index.shape)}"
        )
    return _op("index")(a, reshape(index, [-1]) if index.ndim == 0 else index, dims=[d])


@public(method=True)
def index_add(a: Tensor, dim: int, index: Tensor, source: Tensor, alpha=1) -> Tensor:
    """``a`` with ``alpha * source[..., i, ...]`` added at ``a[..., index[i], ...]``; repeated
    indices accumulate."""
    d = norm_dim("index_add", dim, a.ndim)
    if index.ndim != 1:
        raise OpError(
            f"index_add: index is supposed to be a vector, got shape {tuple(index.shape)}"
        )
    want = a.shape[:d] + index.shape + a.shape[d + 1 :]
    if tuple(source.shape) != want:
        raise OpError(
            f"index_add: source of shape {tuple(source.shape)} must have shape "
            f"{want}: the tensor's {tuple(a.shape)} with dim {dim} of the index's "
            f"size {index.shape[0]}"
        )
    if alpha != 1:
        source = mul(source, alpha)
    return _op("index_put")(a, source, index, dims=[d], accumulate=True)


@public(method=True)
def gather(a: Tensor, dim: int, index: Tensor) -> Tensor:
    """``out[i][j] = a[index[i][j]][j]`` for ``dim=0`` (and so on): ``index`` has ``a``'s
    number of dims."""
    return _op("gather")(a, index, dim=int(dim))


@public(method=True)
def scatter_add(a: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """``a`` with ``src[i][j]`` added at ``[index[i][j]][j]`` for ``dim=0``: the transpose of
    ``gather``; repeated indices accumulate."""
    return _op("scatter_add")(a, index, src, dim=int(dim))


@public(method=True)
def masked_fill(a: Tensor, mask: Tensor, value) -> Tensor:
    """``a`` with ``value`` where the bool ``mask`` (broadcast to ``a``) is True."""
    if broadcast_shapes("masked_fill", mask.shape, a.shape) != a.shape:
        raise OpError(
            f"masked_fill: mask of shape {tuple(mask.shape)} must broadcast to the "
            f"tensor's shape {tuple(a.shape)}"
        )
    if isinstance(value, Tensor) and value.ndim:
        raise OpError(
            f"masked_fill: only supports a 0-dimensional value tensor, got shape "
            f"{tuple(value.shape)}"
        )
    if isinstance(value, Tensor):
        value = value.to(a.dtype)
    return where(mask, value, a)


@public(method=True)
def nonzero(a: Tensor, as_tuple: bool = False):
    """Indices of the non-zero elements, one row each (or one tensor per dim)."""
    rows = _op("nonzero")(a)
    if not as_tuple:
        return rows
    return tuple(reshape(_slice_dim(rows, 1, j, j + 1), [rows.shape[0]]) for j in range(a.ndim))


@public(method=True)
def argsort(a: Tensor, dim: int = -1, descending: bool = False, stable: bool = False) -> Tensor:
    """Indices that sort ``a`` along ``dim``; the sort is always stable."""
    return _op("argsort")(a, dim=int(dim), descending=descending)


@public(method=True)
def sort(a: Tensor, dim: int = -1, descending: bool = False, stable: bool = False):
    """``(values, indices)`` of ``a`` sorted along ``dim`` (stable)."""
    indices = argsort(a, dim, descending)
    return _ValuesIndices["sort"](_op("gather")(a, indices, dim=int(dim)), indices)


@public(method=True)
def topk(a: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """``(values, indices)`` of the ``k`` largest (or smallest) elements along ``dim``."""
    d = norm_dim("topk", dim, a.ndim)
    size = a.shape[d] if a.ndim else 1
    if not 0 <= k <= size:
        raise OpError(f"topk: k ({k}) is out of range for dimension {dim} of size {size}")
    indices = argsort(a, d, descending=largest)
    if a.ndim:
        indices = _slice_dim(indices, d, 0, int(k))
    return _ValuesIndices["topk"](_op("gather")(a, indices, dim=d), indices)


# ================================================================= linear algebra ======


@public(method=True)
def matmul(a: Tensor, b: Tensor) -> Tensor:
    """The matrix product with NumPy's rules for 1-D operands and broadcast batch dims."""
    return _op("matmul")(a, b)


@public(method=True)
def mm(a: Tensor, b: Tensor) -> Tensor:
    """The product of two matrices (2-D only; see ``matmul`` for the rest)."""
    return _op("mm")(a, b)


@public(method=True)
def bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched matrix product of ``(B, n, m)`` and ``(B, m, p)``."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
        raise OpError(
            f"bmm: expected 3-D tensors with the same batch size, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return matmul(a, b)


@public(method=True)
def mv(a: Tensor, v: Tensor) -> Tensor:
    """The product of a matrix and a vector."""
    if a.ndim != 2 or v.ndim != 1:
        raise OpError(
            f"mv: expected a 2-D matrix and a 1-D vector, got shapes "
            f"{tuple(a.shape)} and {tuple(v.shape)}"
        )
    return matmul(a, v)


@public(method=True)
def dot(a: Tensor, b: Tensor) -> Tensor:
    """The inner product of two 1-D tensors of the same size and dtype."""
    if a.ndim != 1 or b.ndim != 1:
        raise OpError(
            f"dot: 1D tensors expected, but got {a.ndim}D and {b.ndim}D tensors "
            f"(shapes {tuple(a.shape)} and {tuple(b.shape)}); use matmul for "
            f"matrices"
        )
    if a.shape != b.shape:
        raise OpError(
            f"dot: inconsistent tensor size, expected tensor {tuple(a.shape)} and "
            f"src {tuple(b.shape)} to have the same number of elements"
        )
    return matmul(a, b)


vdot = dot


@public(method=True)
def outer(a: Tensor, b: Tensor) -> Tensor:
    """``out[i, j] = a[i] * b[j]`` for 1-D ``a`` and ``b``."""
    if a.ndim != 1 or b.ndim != 1:
        raise OpError(
            f"outer: expected 1-D tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return mul(reshape(a, [-1, 1]), reshape(b, [1, -1]))


ger = outer


# ============================================================ batched products, einsum ====


@public(method=True)
def baddbmm(input: Tensor, batch1: Tensor, batch2: Tensor, *, beta=1, alpha=1) -> Tensor:
    """``beta * input + alpha * bmm(batch1, batch2)``; ``input`` broadcasts to the product,
    and with ``beta=0`` it is ignored (its NaNs do not propagate), as in torch."""
    return _add_product("baddbmm", input, bmm(batch1, batch2), beta, alpha)


@public(method=True)
def addmm(input: Tensor, mat1: Tensor, mat2: Tensor, *, beta=1, alpha=1) -> Tensor:
    """``beta * input + alpha * mm(mat1, mat2)``, as ``baddbmm`` for matrices."""
    return _add_product("addmm", input, mm(mat1, mat2), beta, alpha)


@public(method=True)
def addbmm(input: Tensor, batch1: Tensor, batch2: Tensor, *, beta=1, alpha=1) -> Tensor:
    """``beta * input + alpha * sum(bmm(batch1, batch2), 0)``: the batch of products summed
    into one matrix, which ``input`` broadcasts to, as in torch."""
    return _add_product("addbmm", input, sum(bmm(batch1, batch2), 0), beta, alpha)


def _add_product(op: str, input: Tensor, prod: Tensor, beta, alpha) -> Tensor:
    if broadcast_shapes(op, input.shape, prod.shape) != prod.shape:
        raise OpError(
            f"{op}: input of shape {tuple(input.shape)} cannot be broadcast to "
            f"the product's shape {tuple(prod.shape)}"
        )
    prod = prod if alpha == 1 else prod * alpha
    if beta == 0:
        return prod
    return prod + (input if beta == 1 else input * beta)


def _einsum_parse(equation: str, operands) -> tuple[list[str], str]:
    """Each operand's labels (``...`` expanded to one upper-case letter per dim) and the
    output's; implicit output: the labels seen once, sorted, after the ellipsis dims."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise OpError(
            f"einsum: the equation {equation!r} names {len(terms)} operands but "
            f"{len(operands)} were given"
        )
    n_ell = builtins.max(
        [t.ndim - len(s.replace("...", "")) for s, t in zip(terms, operands) if "..." in s] or [0]
    )
    ell = "".join(chr(ord("A") + i) for i in range(n_ell))
    labels = []
    for i, (term, t) in enumerate(zip(terms, operands)):
        term = term.replace(
            "...", ell[n_ell - (t.ndim - len(term.replace("...", ""))) :] if "..." in term else ""
        )
        if not builtins.all("a" <= c <= "z" or c in ell for c in term):
            raise OpError(
                f"einsum: invalid subscripts {terms[i]!r} in {equation!r}; use "
                f"letters a-z and at most one '...' per operand"
            )
        if len(term) != t.ndim:
            raise OpError(
                f"einsum: operand {i} has {t.ndim} dims (shape {tuple(t.shape)}) "
                f"but its subscripts {terms[i]!r} name {len(term)}"
            )
        if len(set(term)) != len(term):
            raise NotImplementedError(
                f"einsum: repeated subscripts within one operand "
                f"({terms[i]!r}: diagonals, traces) are not supported; "
                f"take the diagonal out first"
            )
        labels.append(term)
    if arrow:
        out = rhs.replace("...", ell)
        if len(set(out)) != len(out) or not set(out) <= set("".join(labels)):
            raise OpError(
                f"einsum: output subscripts {rhs!r} must be distinct labels that "
                f"appear in the inputs of {equation!r}"
            )
    else:
        seen = "".join(labels)
        out = ell + "".join(sorted(c for c in set(seen) if c.islower() and seen.count(c) == 1))
    return labels, out


def _einsum_sizes(equation: str, labels, operands) -> dict:
    sizes: dict[str, int] = {}
    for term, t in zip(labels, operands):
        for c, s in zip(term, t.shape):
            if sizes.get(c, 1) not in (1, s) and s != 1:
                raise OpError(
                    f"einsum: subscript {c!r} in {equation!r} has size {sizes[c]} "
                    f"and {s} in operands of shapes "
                    f"{[tuple(o.shape) for o in operands]}"
                )
            sizes[c] = builtins.max(sizes.get(c, 1), s)
    return sizes


def _einsum_reduce(t: Tensor, term: str, keep: str) -> tuple[Tensor, str]:
    """``t`` summed over the labels of ``term`` not in ``keep``."""
    drop = [i for i, c in enumerate(term) if c not in keep]
    if not drop:
        return t, term
    return sum(t, drop), "".join(c for c in term if c in keep)


def _einsum_arrange(t: Tensor, term: str, groups, sizes) -> Tensor:
    """``t`` permuted to the concatenated ``groups`` of labels, broadcast to ``sizes`` and
    reshaped to one dim per group."""
    order = "".join(groups)
    t = permute(t, [term.index(c) for c in order]) if order != term else t
    full = [sizes[c] for c in order]
    if list(t.shape) != full:
        t = expand(t, full)
    return reshape(t, [math.prod(sizes[c] for c in g) for g in groups])


def _einsum_pair(a: Tensor, ta: str, b: Tensor, tb: str, keep: str, sizes):
    """The contraction of two operands, keeping the labels in ``keep``: one batched
    matmul of (batch, left, inner) by (batch, inner, right)."""
    batch = "".join(c for c in ta if c in tb and c in keep)
    inner = "".join(c for c in ta if c in tb and c not in keep)
    left = "".join(c for c in ta if c not in tb)
    right = "".join(c for c in tb if c not in ta)
    out = matmul(
        _einsum_arrange(a, ta, (batch, left, inner), sizes),
        _einsum_arrange(b, tb, (batch, inner, right), sizes),
    )
    term = batch + left + right
    return reshape(out, [sizes[c] for c in term]), term


@public
def einsum(equation: str, *operands) -> Tensor:
    """Einstein summation, as ``torch.einsum``: ``einsum("bij,bjk->bik", a, b)``.

    A composition of sum, permute, expand, reshape and matmul: operands are contracted
    left to right, each pair as one batched matmul. Repeated subscripts within one
    operand (diagonals) are not supported.
    """
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not operands:
        raise OpError("einsum: expected at least one operand")
    labels, out = _einsum_parse(equation, operands)
    sizes = _einsum_sizes(equation, labels, operands)
    acc, term = None, ""
    for i, (t, lab) in enumerate(zip(operands, labels)):
        later = out + "".join(labels[i + 1 :])
        t, lab = _einsum_reduce(t, lab, later + (term if acc is not None else ""))
        if acc is None:
            acc, term = t, lab
        else:
            acc, term = _einsum_pair(acc, term, t, lab, later, sizes)
    acc, term = _einsum_reduce(acc, term, out)
    if term != out:
        acc = permute(acc, [term.index(c) for c in out])
    if list(acc.shape) != [sizes[c] for c in out]:
        acc = expand(acc, [sizes[c] for c in out])
    return acc
