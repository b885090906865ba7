"""Padding: ``pad`` (``torch.nn.functional.pad``'s constant, reflect and replicate modes)
and ``pad_grad``, its adjoint: each one's vjp is the other, so double backward works.

``pad`` lists (left, right) pairs from the last dim backwards, as torch does; negative
constant padding crops. Transposed and 1-D convolutions and adaptive pooling are
compositions in ``gradmesh.core.nn.functional`` over ``conv2d``'s ops and ``matmul``.
"""

from __future__ import annotations

from ..registry import OpError, Spec, defop, fmt
from .nn import _need_float

_MODES = ("constant", "reflect", "replicate")
_NUMPY_MODE = {"reflect": "reflect", "replicate": "edge"}


def _pad_shape(op: str, shape, pad, mode, grad: bool = False) -> tuple:
    """The padded shape of ``shape`` (or, with ``grad``, the unpadded shape of a padded
    ``shape``), after checking ``pad`` and ``mode``."""
    if mode not in _MODES:
        raise OpError(f"{op}: mode must be one of {_MODES}, got {mode!r}")
    if len(pad) % 2 or len(pad) > 2 * len(shape):
        raise OpError(
            f"{op}: the padding length must be even and at most twice the input's "
            f"dims, got pad {list(pad)} for shape {fmt(shape)}"
        )
    out = list(shape)
    for i in range(len(pad) // 2):
        d = len(shape) - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        n = shape[d] - lo - hi if grad else shape[d]
        if mode != "constant" and (
            lo < 0 or hi < 0 or (mode == "reflect" and max(lo, hi) >= n) or n == 0
        ):
            raise OpError(
                f"{op}: {mode} padding {list(pad)} does not fit dim {d} of size {n} "
                f"(input shape {fmt(shape)}): pads must be >= 0"
                + (
                    " and less than the dim's size"
                    if mode == "reflect"
                    else " and the dim non-empty"
                )
            )
        out[d] = n if grad else n + lo + hi
        if out[d] < 0 or (not grad and n + lo + hi < 0):
            raise OpError(
                f"{op}: padding {list(pad)} makes dim {d} of input shape {fmt(shape)} negative"
            )
    return tuple(out)


def _kept(shape, pad):
    """(input slices, output slices) of the region of the input that constant padding keeps
    (negative pads crop it)."""
    src, dst = [slice(None)] * len(shape), [slice(None)] * len(shape)
    for i in range(len(pad) // 2):
        d = len(shape) - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        a, b = max(-lo, 0), shape[d] - max(-hi, 0)
        src[d] = slice(a, max(a, b))
        dst[d] = slice(max(lo, 0), max(lo, 0) + max(b - a, 0))
    return tuple(src), tuple(dst)


def _widths(ndim, pad):
    widths = [(0, 0)] * ndim
    for i in range(len(pad) // 2):
        widths[ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return widths


_PAD_ATTRS = {"pad": ("ints", []), "mode": ("str", "constant")}


@defop(
    "pad",
    infer=lambda x, pad, mode, value: Spec(_pad_shape("pad", x.shape, pad, mode), x.dtype),
    attrs={**_PAD_ATTRS, "value": ("float", 0.0)},
    choices={"mode": _MODES},
)
def pad_p(xp, x, pad, mode, value):
    if mode != "constant":
        return xp.pad(x, _widths(x.ndim, pad), mode=_NUMPY_MODE[mode])
    out = xp.full(_pad_shape("pad", x.shape, pad, mode), value, dtype=x.dtype)
    src, dst = _kept(x.shape, pad)
    out[dst] = x[src]
    return out


@pad_p.defvjp
def _(g, out, x, pad, mode, value):
    return (pad_grad_p(g, pad=pad, mode=mode),)


def _fold(xp, g, d, lo, hi, mode):
    """The adjoint of reflect or replicate padding along dim ``d``."""
    n = g.shape[d] - lo - hi

    def at(a, b):
        return (slice(None),) * d + (slice(a, b),)

    out = g[at(lo, lo + n)].copy()
    if mode == "reflect":  # pad j < lo came from x[lo - j], pad lo+n+m from x[n-2-m]
        out[at(1, lo + 1)] += xp.flip(g[at(0, lo)], axis=d)
        out[at(n - 1 - hi, n - 1)] += xp.flip(g[at(lo + n, lo + n + hi)], axis=d)
    else:  # replicate: every pad copies the edge
        out[at(0, 1)] += g[at(0, lo)].sum(axis=d, keepdims=True)
        out[at(n - 1, n)] += g[at(lo + n, lo + n + hi)].sum(axis=d, keepdims=True)
    return out


def _infer_pad_grad(g, pad, mode) -> Spec:
    _need_float("pad_grad", g, "gradient")
    return Spec(_pad_shape("pad_grad", g.shape, pad, mode, grad=True), g.dtype)


@defop("pad_grad", attrs=_PAD_ATTRS, infer=_infer_pad_grad, choices={"mode": _MODES})
def pad_grad_p(xp, g, pad, mode):
    """The gradient of ``pad``: the kept region, plus (reflect, replicate) the pads folded
    back onto the input elements they copy."""
    if mode == "constant":
        shape = _pad_shape("pad_grad", g.shape, pad, mode, grad=True)
        out = xp.zeros(shape, dtype=g.dtype)
        src, dst = _kept(shape, pad)
        out[src] = g[dst]
        return out
    for i in range(len(pad) // 2):
        g = _fold(xp, g, g.ndim - 1 - i, pad[2 * i], pad[2 * i + 1], mode)
    return g


@pad_grad_p.defvjp
def _(v, out, g, pad, mode):
    return (pad_p(v, pad=pad, mode=mode, value=0.0),)
