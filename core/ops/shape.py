"""Shape primitives: reshape, permute, expand, concatenation, slicing and indexing.

DO NOT write a vjp for a composite: only primitives here have one, and each composite's
gradient follows from them.
"""
from __future__ import annotations

import math

from ..registry import OpError, Spec, fmt, defop
from ..functional import reshape, permute, sum


def _resolve_shape(op: str, src, shape) -> tuple:
    shape = list(shape)
    numel = math.prod(src)
    if shape.count(-1) > 1:
        raise OpError(f"{op}: only one dimension can be inferred (-1), got {fmt(shape)}")
    if any(s < -1 for s in shape):
        raise OpError(f"{op}: invalid shape dimension in {fmt(shape)}")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if rest == 0 or numel % rest:
            raise OpError(f"{op}: shape {fmt(shape)} is invalid for input of size {numel}")
        shape[shape.index(-1)] = numel // rest
    if math.prod(shape) != numel:
        raise OpError(f"{op}: shape {fmt(shape)} is invalid for input of size {numel} "
                      f"(shape {fmt(src)})")
    return tuple(shape)


def _infer_reshape(a, shape) -> Spec:
    return Spec(_resolve_shape("reshape", a.shape, shape), a.dtype)


@defop("reshape", infer=_infer_reshape, attrs={"shape": ("ints", [])})
def reshape_p(xp, a, shape):
    return a.reshape(shape)


@reshape_p.defvjp
def _(g, out, a, shape):
    return (reshape(g, a.shape),)


def _infer_permute(a, dims) -> Spec:
    n = len(a.shape)
    if sorted(d % n if n else d for d in dims) != list(range(n)) or len(dims) != n:
        raise OpError(f"permute: dims {fmt(dims)} are not a permutation of the {n} dims of a "
                      f"tensor of shape {fmt(a.shape)}")
    return Spec(tuple(a.shape[d] for d in dims), a.dtype)


@defop("permute", infer=_infer_permute, attrs={"dims": ("ints", [])})
def permute_p(xp, a, dims):
    return xp.transpose(a, dims)


@permute_p.defvjp
def _(g, out, a, dims):
    n = len(dims)
    inverse = [0] * n
    for i, d in enumerate(dims):
        inverse[d % n] = i
    return (permute(g, inverse),)


def _infer_expand(a, shape) -> Spec:
    shape, src = list(shape), tuple(a.shape)
    if len(shape) < len(src):
        raise OpError(f"expand: the number of sizes provided ({len(shape)}) must be greater "
                      f"or equal to the number of dimensions in the tensor ({len(src)})")
    lead = len(shape) - len(src)
    for i, s in enumerate(src):
        want = shape[i + lead]
        if want == -1:
            shape[i + lead] = s
        elif s != 1 and s != want:
            raise OpError(f"expand: the expanded size of the tensor ({want}) must match the "
                          f"existing size ({s}) at non-singleton dimension {i + lead}; target "
                          f"sizes {fmt(shape)}, tensor shape {fmt(src)}")
    if any(s < 0 for s in shape):
        raise OpError(f"expand: -1 is not allowed in a leading, non-existing dimension")
    return Spec(tuple(shape), a.dtype)


@defop("expand", infer=_infer_expand, attrs={"shape": ("ints", [])}, broadcast=True)
def expand_p(xp, a, shape):
    shape = [s if w == -1 else w for s, w in
             zip((1,) * (len(shape) - a.ndim) + a.shape, shape)]
    return xp.broadcast_to(a, shape)


@expand_p.defvjp
def _(g, out, a, shape):
    # broadcast=True: the engine sums g back to a's shape.
    return (g,)
