"""Shape primitives: reshape, permute, expand, concatenation, slicing and indexing.

DO NOT write a vjp for a composite: only primitives here have one, and each composite's
gradient follows from them.
"""

from __future__ import annotations

import math
from typing import Any

from .. import dtypes
from ..factories import zeros
from ..functional import permute, reshape
from ..registry import OpError, Spec, broadcast_shapes, defop, fmt, norm_dim, norm_dims


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
        raise OpError(
            f"{op}: shape {fmt(shape)} is invalid for input of size {numel} (shape {fmt(src)})"
        )
    return tuple(shape)


def _infer_reshape(a, shape) -> Spec:
    return Spec(_resolve_shape("reshape", a.shape, shape), a.dtype)


@defop("reshape", infer=_infer_reshape, blame="shape", attrs={"shape": ("ints", [])})
def reshape_p(xp, a, shape):
    return a.reshape(shape)


@reshape_p.defvjp
def _(g, out, a, shape):
    return (reshape(g, a.shape),)


def _infer_permute(a, dims) -> Spec:
    n = len(a.shape)
    if sorted(d % n if n else d for d in dims) != list(range(n)) or len(dims) != n:
        raise OpError(
            f"permute: dims {fmt(dims)} are not a permutation of the {n} dims of a "
            f"tensor of shape {fmt(a.shape)}"
        )
    return Spec(tuple(a.shape[d] for d in dims), a.dtype)


@defop("permute", infer=_infer_permute, blame="dims", attrs={"dims": ("ints", [])})
def permute_p(xp, a, dims):
    return a.transpose(dims)  # the method: np.transpose adds ~2 us of dispatch


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
        raise OpError(
            f"expand: the number of sizes provided ({len(shape)}) must be greater "
            f"or equal to the number of dimensions in the tensor ({len(src)})"
        )
    lead = len(shape) - len(src)
    for i, s in enumerate(src):
        want = shape[i + lead]
        if want == -1:
            shape[i + lead] = s
        elif s != 1 and s != want:
            raise OpError(
                f"expand: the expanded size of the tensor ({want}) must match the "
                f"existing size ({s}) at non-singleton dimension {i + lead}; target "
                f"sizes {fmt(shape)}, tensor shape {fmt(src)}"
            )
    if any(s < 0 for s in shape):
        raise OpError("expand: -1 is not allowed in a leading, non-existing dimension")
    return Spec(tuple(shape), a.dtype)


@defop("expand", infer=_infer_expand, blame="shape", attrs={"shape": ("ints", [])}, broadcast=True)
def expand_p(xp, a, shape):
    shape = [s if w == -1 else w for s, w in zip((1,) * (len(shape) - a.ndim) + a.shape, shape)]
    return xp.broadcast_to(a, shape)


@expand_p.defvjp
def _(g, out, a, shape):
    # broadcast=True: the engine sums g back to a's shape.
    return (g,)


# ======================================================================== slicing ======
# A basic index (ints, slices with steps) is one ``slice`` node whose attributes are plain
# ints, so that it can cross the network: per dim a start, a stop and a positive step,
# resolved against the shape (0 <= start <= stop); a stop past the end is clamped, as in
# Python, so that "to the end" of a batch dimension does not depend on the batch size.


def _sliced_shape(op: str, shape, starts, stops, steps) -> tuple:
    n = len(shape)
    if not len(starts) == len(stops) == len(steps) == n:
        raise OpError(
            f"{op}: expected one start, stop and step per dimension of a tensor of "
            f"shape {fmt(shape)}, got starts {fmt(starts)}, stops {fmt(stops)}, "
            f"steps {fmt(steps)}",
            attr="starts",
        )
    out = []
    for d, (size, start, stop, step) in enumerate(zip(shape, starts, stops, steps)):
        if step < 1:
            raise OpError(
                f"{op}: step must be greater than zero, got {step} in dimension {d}; "
                f"use flip() to reverse a tensor",
                attr="steps",
            )
        end = min(stop, size) if size >= 0 else stop  # past the end: clamped, as in Python
        if not 0 <= start <= end <= size:
            raise OpError(
                f"{op}: slice {start}:{stop} is out of range for dimension {d} of "
                f"size {size} (shape {fmt(shape)}); expected 0 <= start <= "
                f"min(stop, size)",
                attr="starts" if not 0 <= start <= size else "stops",
            )
        out.append((end - start + step - 1) // step)
    return tuple(out)


def _slices(starts, stops, steps) -> tuple:
    return tuple(slice(b, e, s) for b, e, s in zip(starts, stops, steps))


def _infer_slice(a, starts, stops, steps) -> Spec:
    return Spec(_sliced_shape("slice", a.shape, starts, stops, steps), a.dtype)


_SLICE_ATTRS: dict[str, tuple[str, Any]] = {
    "starts": ("ints", []),
    "stops": ("ints", []),
    "steps": ("ints", []),
}


@defop("slice", infer=_infer_slice, attrs=_SLICE_ATTRS)
def slice_p(xp, a, starts, stops, steps):
    return a[_slices(starts, stops, steps)]


def _infer_slice_grad(g, shape, starts, stops, steps) -> Spec:
    want = _sliced_shape("slice_grad", shape, starts, stops, steps)
    if tuple(g.shape) != want:
        raise OpError(
            f"slice_grad: gradient of shape {fmt(g.shape)} does not match the "
            f"slice's shape {fmt(want)} of a tensor of shape {fmt(shape)}"
        )
    return Spec(tuple(shape), g.dtype)


@defop("slice_grad", infer=_infer_slice_grad, attrs={"shape": ("ints", []), **_SLICE_ATTRS})
def slice_grad_p(xp, g, shape, starts, stops, steps):
    """The transpose of ``slice``: ``g`` placed into zeros of the input's shape."""
    out = xp.zeros(tuple(shape), dtype=g.dtype)
    out[_slices(starts, stops, steps)] = g
    return out


@slice_p.defvjp
def _(g, out, a, starts, stops, steps):
    return (slice_grad_p(g, shape=list(a.shape), starts=starts, stops=stops, steps=steps),)


@slice_grad_p.defvjp
def _(g, out, x, shape, starts, stops, steps):
    return (slice_p(g, starts=starts, stops=stops, steps=steps),)


def _along(a_shape, dim: int, start: int, stop: int) -> dict:
    """The ``slice`` attributes that take ``start:stop`` along ``dim`` and all of the rest."""
    starts = [0] * len(a_shape)
    stops = list(a_shape)
    starts[dim], stops[dim] = start, stop
    return {"starts": starts, "stops": stops, "steps": [1] * len(a_shape)}


# ================================================================== cat and stack ======


def _promote_all(types):
    dtype = types[0]
    for t in types[1:]:
        dtype = dtypes.promote(dtype, t)
    return dtype


def _infer_cat(*tensors, dim) -> Spec:
    if not tensors:
        raise OpError("cat: expected a non-empty list of tensors")
    ref = tuple(tensors[0].shape)
    if not ref:
        raise OpError(
            "cat: zero-dimensional tensor (at position 0) cannot be concatenated; "
            "use stack(), or unsqueeze() it first"
        )
    d = norm_dim("cat", dim, len(ref))
    total = 0
    for i, t in enumerate(tensors):
        shape = tuple(t.shape)
        if len(shape) != len(ref):
            raise OpError(
                f"cat: tensors must have the same number of dimensions: tensor 0 "
                f"has shape {fmt(ref)} and tensor {i} has shape {fmt(shape)}"
            )
        for k, (s, r) in enumerate(zip(shape, ref)):
            if k != d and s != r:
                raise OpError(
                    f"cat: sizes of tensors must match except in dimension {d}; "
                    f"expected size {r} but got size {s} for tensor number {i} "
                    f"in the list (shapes {fmt(ref)} and {fmt(shape)})"
                )
        total += shape[d]
    return Spec(ref[:d] + (total,) + ref[d + 1 :], _promote_all([t.dtype for t in tensors]))


@defop("cat", dtype="promote", infer=_infer_cat, arity=None, attrs={"dim": ("int", 0)})
def cat_p(xp, *arrays, dim):
    dtype = _promote_all([dtypes.from_numpy(a.dtype) for a in arrays]).np
    return xp.concatenate([a.astype(dtype, copy=False) for a in arrays], axis=dim)


@cat_p.defvjp
def _(g, out, *tensors, dim):
    d = dim % g.ndim
    grads, offset = [], 0
    for t in tensors:
        size = t.shape[d]
        grads.append(
            slice_p(g, **_along(g.shape, d, offset, offset + size)) if t.requires_grad else None
        )
        offset += size
    return tuple(grads)


def _infer_stack(*tensors, dim) -> Spec:
    if not tensors:
        raise OpError("stack: expected a non-empty list of tensors")
    ref = tuple(tensors[0].shape)
    for i, t in enumerate(tensors):
        if tuple(t.shape) != ref:
            raise OpError(
                f"stack: expects each tensor to be equal size, but got {fmt(ref)} at "
                f"entry 0 and {fmt(t.shape)} at entry {i}"
            )
    d = norm_dim("stack", dim, len(ref) + 1)
    return Spec(ref[:d] + (len(tensors),) + ref[d:], _promote_all([t.dtype for t in tensors]))


@defop("stack", dtype="promote", infer=_infer_stack, arity=None, attrs={"dim": ("int", 0)})
def stack_p(xp, *arrays, dim):
    dtype = _promote_all([dtypes.from_numpy(a.dtype) for a in arrays]).np
    return xp.stack([a.astype(dtype, copy=False) for a in arrays], axis=dim)


@stack_p.defvjp
def _(g, out, *tensors, dim):
    d = dim % g.ndim
    return tuple(
        reshape(slice_p(g, **_along(g.shape, d, i, i + 1)), t.shape) if t.requires_grad else None
        for i, t in enumerate(tensors)
    )


# ==================================================================== flip, tril ======


def _infer_flip(a, dims) -> Spec:
    norm_dims("flip", dims, len(a.shape), "dims")
    return Spec(tuple(a.shape), a.dtype)


@defop("flip", infer=_infer_flip, attrs={"dims": ("ints", [])})
def flip_p(xp, a, dims):
    return xp.flip(a, axis=tuple(dims)) if a.ndim else a


flip_p.defvjp(lambda g, out, a, dims: (flip_p(g, dims=dims),))


def _infer_triangle(name):
    def infer(a, diagonal) -> Spec:
        if len(a.shape) < 2:
            raise OpError(
                f"{name}: input tensor must have at least 2 dimensions, got shape {fmt(a.shape)}"
            )
        return Spec(tuple(a.shape), a.dtype)

    return infer


@defop("tril", infer=_infer_triangle("tril"), attrs={"diagonal": ("int", 0)})
def tril_p(xp, a, diagonal):
    return xp.tril(a, diagonal)


@defop("triu", infer=_infer_triangle("triu"), attrs={"diagonal": ("int", 0)})
def triu_p(xp, a, diagonal):
    return xp.triu(a, diagonal)


tril_p.defvjp(lambda g, out, a, diagonal: (tril_p(g, diagonal=diagonal),))
triu_p.defvjp(lambda g, out, a, diagonal: (triu_p(g, diagonal=diagonal),))


# ======================================================================= indexing ======
# Advanced indexing is ``index`` (a[..., i, ..., j, ...] with int tensors at ``dims``) and its
# transpose ``index_put`` (accumulate=True adds repeated indices up, which is what the
# gradient of a gather needs). Index tensors are inputs, never attributes. Where the
# indexed dims are adjacent the result's indexed dims stay in place, else they go first:
# NumPy's rule, which is torch's once ints have been applied as basic indexing.

_INDEX_DTYPES = (dtypes.int64, dtypes.int32)


def _indexed_shape(op: str, a, indices, dims) -> tuple:
    shape, n = tuple(a.shape), len(a.shape)
    dims = list(dims)
    if not indices or len(dims) != len(indices):
        raise OpError(
            f"{op}: expected one dim per index tensor, got dims {fmt(dims)} for "
            f"{len(indices)} index tensors"
        )
    if dims != sorted(set(dims)) or dims[0] < 0 or dims[-1] >= n:
        raise OpError(
            f"{op}: dims {fmt(dims)} must be increasing dims of the indexed tensor "
            f"of shape {fmt(shape)}"
        )
    for i in indices:
        if i.dtype not in _INDEX_DTYPES:
            raise OpError(
                f"{op}: tensors used as indices must be long or int tensors, got "
                f"{i.dtype}; for a mask use a bool tensor with getitem (x[mask])"
            )
    batch = broadcast_shapes(op, *[tuple(i.shape) for i in indices])
    if dims == list(range(dims[0], dims[0] + len(dims))):
        return shape[: dims[0]] + batch + shape[dims[-1] + 1 :]
    return batch + tuple(s for d, s in enumerate(shape) if d not in dims)


def _index_tuple(op: str, xp, shape, indices, dims) -> tuple:
    """The NumPy index for ``indices`` at ``dims``, after checking every index is in range."""
    tup = [slice(None)] * len(shape)
    for d, i in zip(dims, indices):
        size = shape[d]
        if i.size:
            lo, hi = int(i.min()), int(i.max())
            if lo < -size or hi >= size:
                bad = hi if hi >= size else lo
                raise IndexError(
                    f"{op}: index {bad} is out of bounds for dimension {d} with size {size}"
                )
        tup[d] = i
    return tuple(tup)


def _add_at(xp, out, index, values) -> None:
    """``out[index] += values`` where repeated indices accumulate."""
    at = getattr(xp.add, "at", None)  # CuPy has ufunc.at from version 13
    if at is not None:
        at(out, index, values)
    else:
        import cupyx  # CuPy before 13 (CuPy is optional)

        cupyx.scatter_add(out, index, values)


def _infer_index(a, *indices, dims) -> Spec:
    return Spec(_indexed_shape("index", a, indices, dims), a.dtype)


@defop("index", nondiff=("indices",), infer=_infer_index, arity=None, attrs={"dims": ("ints", [])})
def index_p(xp, a, *indices, dims):
    return a[_index_tuple("index", xp, a.shape, indices, dims)]


def _infer_index_put(a, values, *indices, dims, accumulate) -> Spec:
    target = _indexed_shape("index_put", a, indices, dims)
    if broadcast_shapes("index_put", tuple(values.shape), target) != target:
        raise OpError(
            f"index_put: values of shape {fmt(values.shape)} cannot be broadcast "
            f"to the indexed shape {fmt(target)}"
        )
    if values.dtype is not a.dtype:
        raise OpError(
            f"index_put: values ({values.dtype}) and the tensor ({a.dtype}) must "
            f"have the same dtype; convert the values with .to({a.dtype})"
        )
    return Spec(tuple(a.shape), a.dtype)


@defop(
    "index_put",
    nondiff=("indices",),
    broadcast_inputs=("values",),
    infer=_infer_index_put,
    arity=None,
    broadcast=True,
    attrs={"dims": ("ints", []), "accumulate": ("bool", True)},
)
def index_put_p(xp, a, values, *indices, dims, accumulate):
    out = a.copy()
    index = _index_tuple("index_put", xp, a.shape, indices, dims)
    if accumulate:
        _add_at(xp, out, index, values)
    else:
        out[index] = values
    return out


@index_p.defvjp
def _(g, out, a, *indices, dims):
    zeros = _zeros_like(a, g.dtype)
    return (index_put_p(zeros, g, *indices, dims=dims, accumulate=True),) + (None,) * len(indices)


@index_put_p.defvjp
def _(g, out, a, values, *indices, dims, accumulate):
    ga = g
    if not accumulate and a.requires_grad:
        # Overwritten elements of ``a`` do not reach the output.
        ga = index_put_p(g, _zeros_like(values, g.dtype, ()), *indices, dims=dims, accumulate=False)
    gv = index_p(g, *indices, dims=dims) if values.requires_grad else None
    return (ga, gv) + (None,) * len(indices)


def _zeros_like(t, dtype, shape=None):
    return zeros(t.shape if shape is None else shape, dtype=dtype, device=t.device)


# ------------------------------------------------------------ gather, scatter_add ------


def _check_gather_shapes(op: str, a, index, dim, src=None) -> int:
    n = len(a.shape)
    d = norm_dim(op, dim, n)
    if len(index.shape) != n or (src is not None and len(src.shape) != n):
        extra = f", src {fmt(src.shape)}" if src is not None else ""
        raise OpError(
            f"{op}: index tensor must have the same number of dimensions as the "
            f"input tensor (input {fmt(a.shape)}, index {fmt(index.shape)}{extra})"
        )
    if index.dtype not in _INDEX_DTYPES:
        raise OpError(f"{op}: expected dtype int64 for index, got {index.dtype}")
    for k, (si, sa) in enumerate(zip(index.shape, a.shape)):
        if k != d and si > sa:
            raise OpError(
                f"{op}: size {si} of index dimension {k} must not exceed the input's "
                f"size {sa} (input {fmt(a.shape)}, index {fmt(index.shape)})"
            )
        if src is not None and si > src.shape[k]:
            raise OpError(
                f"{op}: size {si} of index dimension {k} must not exceed the src's "
                f"size {src.shape[k]} (src {fmt(src.shape)}, index "
                f"{fmt(index.shape)})"
            )
    return d


def _grid(op: str, xp, index, dim, size) -> tuple:
    """The NumPy index that takes ``index`` along ``dim`` and the position elsewhere."""
    if index.size:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= size:
            raise IndexError(
                f"{op}: index {lo if lo < 0 else hi} is out of bounds for "
                f"dimension {dim} with size {size}"
            )
    tup = []
    for k, s in enumerate(index.shape):
        if k == dim:
            tup.append(index)
        else:
            shape = [1] * index.ndim
            shape[k] = s
            tup.append(xp.arange(s).reshape(shape))
    return tuple(tup)


def _infer_gather(a, index, dim) -> Spec:
    _check_gather_shapes("gather", a, index, dim)
    return Spec(tuple(index.shape), a.dtype)


@defop("gather", nondiff=("index",), infer=_infer_gather, arity=2, attrs={"dim": ("int", 0)})
def gather_p(xp, a, index, dim):
    if a.ndim == 0:
        _grid("gather", xp, index.reshape(1), 0, 1)
        return a.copy()
    return a[_grid("gather", xp, index, dim % a.ndim, a.shape[dim])]


def _infer_scatter_add(a, index, src, dim) -> Spec:
    _check_gather_shapes("scatter_add", a, index, dim, src)
    if src.dtype is not a.dtype:
        raise OpError(
            f"scatter_add: expected src ({src.dtype}) to have the dtype of the "
            f"tensor ({a.dtype}); convert it with .to({a.dtype})"
        )
    return Spec(tuple(a.shape), a.dtype)


@defop(
    "scatter_add", nondiff=("index",), infer=_infer_scatter_add, arity=3, attrs={"dim": ("int", 0)}
)
def scatter_add_p(xp, a, index, src, dim):
    out = a.copy()
    if a.ndim == 0:
        _grid("scatter_add", xp, index.reshape(1), 0, 1)
        return out + src
    d = dim % a.ndim
    part = src[tuple(slice(0, s) for s in index.shape)]
    _add_at(xp, out, _grid("scatter_add", xp, index, d, a.shape[d]), part)
    return out


@gather_p.defvjp
def _(g, out, a, index, dim):
    return scatter_add_p(_zeros_like(a, g.dtype), index, g, dim=dim), None


@scatter_add_p.defvjp
def _(g, out, a, index, src, dim):
    gs = None
    if src.requires_grad:
        gs = gather_p(g, index, dim=dim)
        if tuple(index.shape) != tuple(src.shape):
            # Only the index-shaped corner of src is scattered; the rest gets no gradient.
            gs = slice_grad_p(
                gs,
                shape=list(src.shape),
                starts=[0] * src.ndim,
                stops=list(index.shape),
                steps=[1] * src.ndim,
            )
    return g, None, gs


# ------------------------------------------------------------ nonzero, argsort ------


def _infer_nonzero(a) -> Spec:
    # The number of rows depends on the data: graphs see it as -1, like a batch dim.
    return Spec((-1, len(a.shape)), dtypes.int64)


@defop("nonzero", dtype="int64", infer=_infer_nonzero)
def nonzero_p(xp, a):
    return xp.argwhere(a).astype(xp.int64, copy=False)


nonzero_p.defvjp(lambda g, out, a: (None,))


def _infer_argsort(a, dim, descending) -> Spec:
    norm_dim("argsort", dim, len(a.shape))
    return Spec(tuple(a.shape), dtypes.int64)


@defop(
    "argsort",
    dtype="int64",
    infer=_infer_argsort,
    attrs={"dim": ("int", -1), "descending": ("bool", False)},
)
def argsort_p(xp, a, dim, descending):
    """A stable sort's indices; equal elements keep their order either way."""
    if a.ndim == 0:
        return xp.zeros((), dtype=xp.int64)
    if not descending:
        return xp.argsort(a, axis=dim, kind="stable").astype(xp.int64, copy=False)
    # Stable descending: sort the reversed tensor ascending, reverse back, map the indices.
    n = a.shape[dim]
    rev = xp.argsort(xp.flip(a, axis=dim), axis=dim, kind="stable")
    return (n - 1 - xp.flip(rev, axis=dim)).astype(xp.int64, copy=False)


argsort_p.defvjp(lambda g, out, a, dim, descending: (None,))
