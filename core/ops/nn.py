"""Neural-network primitives: softmax, dropout, normalisation, embedding, convolution,
pooling and losses.

Ops that are linear in one input come in adjoint pairs (``conv2d`` and
``conv2d_input_grad``, ``nll_loss`` and ``nll_loss_grad``, ...): each one's vjp is the
other, so first-order backward runs one fast ``xp`` kernel and double backward still works.
Optional tensor inputs are separate ops (``nll_loss_weighted``) or compositions in
``gradmesh.core.nn.functional`` (conv2d's bias is added after the op), never a None input.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from .. import dtypes
from ..autograd import is_grad_enabled
from ..functional import (
    cat,
    chunk,
    exp,
    matmul,
    narrow,
    reshape,
    select,
    sigmoid,
    sqrt,
    stack,
    sum,
    tanh,
    where,
)
from ..registry import OpError, Spec, defop, fmt, norm_dim
from .elementwise import _kernel
from .linalg import rows_times_matrix

# ======================================================================== helpers ======


def _need_float(op: str, spec, what: str = "input") -> None:
    if not spec.dtype.is_floating_point:
        raise OpError(
            f"{op}: expected a floating point {what}, got {spec.dtype} (shape "
            f"{fmt(spec.shape)}); convert it with .float()"
        )


def _need_same_float(op: str, a, b, what_a: str, what_b: str) -> None:
    """Kernels of two tensors that torch runs in one dtype (it refuses a mix; NumPy would
    promote and return another dtype than infer promised)."""
    _need_float(op, a, what_a)
    if a.dtype is not b.dtype:
        raise OpError(
            f"{op}: {what_a} ({a.dtype}) and {what_b} ({b.dtype}) must have the same "
            f"dtype; convert one with .to(dtype)"
        )


def _need_int(op: str, spec, what: str) -> None:
    if spec.dtype not in (dtypes.int64, dtypes.int32):
        raise OpError(
            f"{op}: expected {what} of dtype int64 (class indices), got {spec.dtype} "
            f"with shape {fmt(spec.shape)}; convert it with .long()"
        )


# ================================================================ softmax family ======


def _infer_softmax(op):
    def infer(x, dim) -> Spec:
        _need_float(op, x)
        norm_dim(op, dim, len(x.shape))
        return Spec(tuple(x.shape), x.dtype)

    return infer


@defop("softmax", infer=_infer_softmax("softmax"), attrs={"dim": ("int", -1)}, saves_out=True)
def softmax_p(xp, x, dim):
    # Subtracting the max keeps exp from overflowing; it cancels in the ratio. In place on
    # the fresh difference: one full-size array (attention's scores are megabytes).
    e = xp.subtract(x, x.max(axis=dim, keepdims=True), out=xp.empty_like(x))  # 0-d: an array
    xp.exp(e, out=e)
    e /= e.sum(axis=dim, keepdims=True)
    return e


@softmax_p.defvjp
def _(g, out, x, dim):
    return (softmax_grad_p(g, out, dim=dim),)


def _infer_softmax_grad(op):
    def infer(g, out, dim) -> Spec:
        if tuple(g.shape) != tuple(out.shape):
            raise OpError(
                f"{op}: gradient of shape {fmt(g.shape)} does not match the output "
                f"of shape {fmt(out.shape)}"
            )
        _need_same_float(op, out, g, "output", "gradient")
        norm_dim(op, dim, len(out.shape))
        return Spec(tuple(out.shape), out.dtype)

    return infer


@defop(
    "softmax_grad", infer=_infer_softmax_grad("softmax_grad"), arity=2, attrs={"dim": ("int", -1)}
)
def softmax_grad_p(xp, g, out, dim):
    """softmax's vjp in one kernel: out * (g - sum(g * out, dim))."""
    gx = g - (g * out).sum(axis=dim, keepdims=True)
    gx *= out
    return gx


@softmax_grad_p.defvjp
def _(v, _res, g, out, dim):
    # Symmetric in g (the softmax Jacobian is); the part for out is the product rule.
    s_vo = sum(v * out, dim=[dim], keepdim=True)
    gg = softmax_grad_p(v, out, dim=dim) if g.requires_grad else None
    gout = v * (g - sum(g * out, dim=[dim], keepdim=True)) - s_vo * g if out.requires_grad else None
    return gg, gout


@defop(
    "log_softmax", infer=_infer_softmax("log_softmax"), attrs={"dim": ("int", -1)}, saves_out=True
)
def log_softmax_p(xp, x, dim):
    shifted = x - x.max(axis=dim, keepdims=True)
    shifted -= xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))
    return shifted


@log_softmax_p.defvjp
def _(g, out, x, dim):
    return (log_softmax_grad_p(g, out, dim=dim),)


@defop(
    "log_softmax_grad",
    infer=_infer_softmax_grad("log_softmax_grad"),
    arity=2,
    attrs={"dim": ("int", -1)},
)
def log_softmax_grad_p(xp, g, out, dim):
    """log_softmax's vjp in one kernel: g - exp(out) * sum(g, dim)."""
    gx = xp.exp(out, out=xp.empty_like(out))  # 0-d: an array
    gx *= g.sum(axis=dim, keepdims=True)
    return xp.subtract(g, gx, out=gx)


@log_softmax_grad_p.defvjp
def _(v, _res, g, out, dim):
    p = exp(out)
    gg = v - sum(v * p, dim=[dim], keepdim=True) if g.requires_grad else None
    gout = -v * p * sum(g, dim=[dim], keepdim=True) if out.requires_grad else None
    return gg, gout


# ======================================================================== dropout ======


def _infer_dropout_mask(x, p, seed) -> Spec:
    _need_float("dropout", x)
    if not 0.0 <= p <= 1.0:
        raise OpError(f"dropout: probability has to be between 0 and 1, but got {p}")
    return Spec(tuple(x.shape), x.dtype)


@defop("dropout_mask", infer=_infer_dropout_mask, attrs={"p": ("float", 0.5), "seed": ("int", 0)})
def dropout_mask_p(xp, x, p, seed):
    """0 or 1/(1-p), shaped like ``x``; a pure function of (shape, p, seed).

    Drawn on the CPU with PCG64 in float64 whatever the device and dtype, so a seed gives
    the same mask on NumPy and CuPy, in float32 and float64.
    """
    keep = np.random.Generator(np.random.PCG64(seed)).random(x.shape) >= p
    mask = xp.asarray(keep).astype(x.dtype)
    if p > 0:
        mask *= x.dtype.type(0.0 if p >= 1 else 1.0 / (1.0 - p))
    return mask


dropout_mask_p.defvjp(lambda g, out, x, p, seed: (None,))


# ===================================================================== layer norm ======


def _infer_layer_norm(x, normalized_shape, eps, g=None) -> Spec:
    _need_float("layer_norm", x)
    k = len(normalized_shape)
    if k == 0 or k > len(x.shape) or tuple(x.shape[len(x.shape) - k :]) != tuple(normalized_shape):
        raise OpError(
            f"layer_norm: normalized_shape {fmt(normalized_shape)} must match the "
            f"trailing dimensions of the input, got input of shape {fmt(x.shape)}; "
            f"pass normalized_shape=input.shape[-k:]"
        )
    if g is not None and tuple(g.shape) != tuple(x.shape):
        raise OpError(
            f"layer_norm_grad: gradient of shape {fmt(g.shape)} does not match the "
            f"input of shape {fmt(x.shape)}"
        )
    if g is not None:
        _need_same_float("layer_norm_grad", x, g, "input", "gradient")
    return Spec(tuple(x.shape), x.dtype)


def _ln_centered(xp, x, k, eps):
    """x - mean over the last ``k`` dims (a fresh array the caller may overwrite), rstd,
    the axes and the count. The variance is a dot product of each row of centered values
    with itself: a (rows, K) temporary of squares would be one more fresh array."""
    axes = tuple(range(x.ndim - k, x.ndim))
    n = math.prod(x.shape[x.ndim - k :])
    xc = x - x.mean(axis=axes, keepdims=True)
    t = x.dtype.type
    rstd = 1 / xp.sqrt(_row_dot(xp, xc, xc, k) / t(n) + t(eps))
    return xc, rstd, axes, n


def _row_dot(xp, a, b, k):
    """sum(a * b) over the last ``k`` dims, dims kept (one pass on C-contiguous arrays;
    reshape copies others)."""
    n = math.prod(a.shape[a.ndim - k :])
    dot = xp.einsum("ij,ij->i", a.reshape(-1, n), b.reshape(-1, n))
    return dot.reshape(a.shape[: a.ndim - k] + (1,) * k)


_LN_ATTRS = {"normalized_shape": ("ints", []), "eps": ("float", 1e-5)}


@defop("layer_norm", infer=_infer_layer_norm, attrs=_LN_ATTRS)
def layer_norm_p(xp, x, normalized_shape, eps):
    """Normalise over the trailing ``normalized_shape`` dims (no affine; that is composed)."""
    xc, rstd, _, _ = _ln_centered(xp, x, len(normalized_shape), eps)
    xc *= rstd
    return xc


@layer_norm_p.defvjp
def _(g, out, x, normalized_shape, eps):
    return (layer_norm_grad_p(g, x, normalized_shape=normalized_shape, eps=eps),)


@defop(
    "layer_norm_grad",
    dtype="input:x",
    infer=lambda g, x, normalized_shape, eps: _infer_layer_norm(x, normalized_shape, eps, g),
    arity=2,
    attrs=_LN_ATTRS,
    saves_out=True,
)
def layer_norm_grad_p(xp, g, x, normalized_shape, eps):
    """The vjp of layer_norm: rstd * (g - mean(g) - xhat * mean(g * xhat)), as
    xc * (-rstd^3 sum(g * xc) / n) + g * rstd - rstd sum(g) / n (xc = x - mean): two fresh
    full-size arrays (batch_norm_grad's form)."""
    k = len(normalized_shape)
    xc, rstd, axes, n = _ln_centered(xp, x, k, eps)
    t = x.dtype.type
    g_sum = g.sum(axis=axes, keepdims=True)
    xc *= -(rstd * rstd * rstd) * _row_dot(xp, g, xc, k) / t(n)
    xc += g * rstd
    xc -= rstd * g_sum / t(n)
    return xc


@layer_norm_grad_p.defvjp
def _(v, out, g, x, normalized_shape, eps):
    # layer_norm's Jacobian J is symmetric, so the cotangent of g is J v again; the part
    # for x is d<v, J(x) g>/dx, worked out by hand (out = J g).
    dims = list(range(x.ndim - len(normalized_shape), x.ndim))
    n = math.prod(normalized_shape)
    gv = layer_norm_grad_p(v, x, normalized_shape=normalized_shape, eps=eps)
    gx = None
    if x.requires_grad:
        xc = x - sum(x, dim=dims, keepdim=True) / n
        rstd = 1 / sqrt(sum(xc * xc, dim=dims, keepdim=True) / n + eps)
        xhat = layer_norm_p(x, normalized_shape=normalized_shape, eps=eps)

        def mean(t):
            return sum(t, dim=dims, keepdim=True) / n

        gx = -rstd * (mean(v * out) * xhat + mean(v * xhat) * out + mean(g * xhat) * gv)
    return (gv if g.requires_grad else None), gx


# ====================================================================== embedding ======


def _infer_embedding(indices, weight, padding_idx) -> Spec:
    _need_int("embedding", indices, "indices")
    if len(weight.shape) != 2:
        raise OpError(
            f"embedding: expected a 2-D weight (num_embeddings, embedding_dim), got "
            f"shape {fmt(weight.shape)}"
        )
    return Spec(tuple(indices.shape) + (weight.shape[1],), weight.dtype)


def _check_indices(xp, indices, num: int, op: str) -> None:
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= num):
        bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
        raise IndexError(
            f"{op}: index {bad} is out of range for a weight with {num} rows; "
            f"indices must be in [0, {num})"
        )


@defop(
    "embedding",
    dtype="input:weight",
    nondiff=("indices",),
    infer=_infer_embedding,
    arity=2,
    attrs={"padding_idx": ("int?", None)},
)
def embedding_p(xp, indices, weight, padding_idx):
    _check_indices(xp, indices, weight.shape[0], "embedding")
    return xp.take(weight, indices, axis=0)


@embedding_p.defvjp
def _(g, out, indices, weight, padding_idx):
    return None, embedding_grad_p(g, indices, num_weights=weight.shape[0], padding_idx=padding_idx)


def _infer_embedding_grad(g, indices, num_weights, padding_idx) -> Spec:
    _need_int("embedding_grad", indices, "indices")
    if tuple(g.shape[:-1]) != tuple(indices.shape):
        raise OpError(
            f"embedding_grad: gradient of shape {fmt(g.shape)} does not match "
            f"indices of shape {fmt(indices.shape)}"
        )
    return Spec((num_weights, g.shape[-1]), g.dtype)


@defop(
    "embedding_grad",
    nondiff=("indices",),
    infer=_infer_embedding_grad,
    arity=2,
    attrs={"num_weights": ("int", 0), "padding_idx": ("int?", None)},
)
def embedding_grad_p(xp, g, indices, num_weights, padding_idx):
    """Scatter-add ``g`` into the rows its indices name; the padding row gets nothing."""
    dim = g.shape[-1]
    out = xp.zeros((num_weights, dim), dtype=g.dtype)
    flat = indices.reshape(-1)
    rows = g.reshape(-1, dim)
    if xp is np:
        _add_rows_by_index(out, flat, rows)
    elif hasattr(xp.add, "at"):
        xp.add.at(out, flat, rows)
    else:  # CuPy before 13 (CuPy is optional)
        import cupyx

        cupyx.scatter_add(out, flat, rows)
    if padding_idx is not None:
        out[padding_idx] = 0
    return out


def _add_rows_by_index(out, indices, rows) -> None:
    """``np.add.at(out, indices, rows)`` as sorted segments: the rows ordered by index (a
    stable sort keeps each index's rows in their order), each run of one index summed by
    ``add.reduceat``. ``add.at`` goes row by row: 0.57 ms against 0.12 ms for the LSTM
    benchmark's 1024 rows of 64 into 128."""
    if not indices.size:
        return
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    out[ordered[starts]] += np.add.reduceat(rows[order], starts, axis=0, dtype=out.dtype)


@embedding_grad_p.defvjp
def _(v, out, g, indices, num_weights, padding_idx):
    rows = embedding_p(indices, v, padding_idx=padding_idx)
    if padding_idx is not None:
        rows = where(reshape(indices != padding_idx, indices.shape + (1,)), rows, 0.0)
    return rows, None


# ==================================================================== convolution ======
# Layout: NCHW input, (O, C/groups, kh, kw) weight. im2col builds, for every kernel offset,
# one strided slice of the padded input, so Python loops over kh*kw offsets only; then one
# batched matmul does all groups.

_CONV_ATTRS = {
    "stride": ("ints", [1, 1]),
    "padding": ("ints", [0, 0]),
    "dilation": ("ints", [1, 1]),
    "groups": ("int", 1),
}


def _conv_out(size, k, s, p, d) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_conv_attrs(op, stride, padding, dilation, groups) -> None:
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or any(int(e) < lo for e in v):
            raise OpError(f"{op}: {name} must be 2 integers >= {lo}, got {list(v)}", attr=name)
    if groups < 1:
        raise OpError(f"{op}: groups must be a positive integer, got {groups}", attr="groups")


def _conv_shapes(op, x_shape, w_shape, stride, padding, dilation, groups) -> tuple:
    """Check input and weight against each other; return the output's spatial size."""
    _check_conv_attrs(op, stride, padding, dilation, groups)
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise OpError(
            f"{op}: expected a 4-D input (N, C, H, W) and a 4-D weight "
            f"(out_channels, in_channels/groups, kh, kw), got input {fmt(x_shape)} "
            f"and weight {fmt(w_shape)}"
        )
    o, cg, kh, kw = w_shape
    if x_shape[1] != cg * groups:
        raise OpError(
            f"{op}: weight of shape {fmt(w_shape)} with groups={groups} expects an "
            f"input with {cg * groups} channels, but the input has shape "
            f"{fmt(x_shape)} ({x_shape[1]} channels); give the weight "
            f"in_channels/groups = {x_shape[1] // groups if groups else '?'} or "
            f"check the layout is NCHW"
        )
    if o % groups:
        raise OpError(
            f"{op}: out_channels {o} of weight {fmt(w_shape)} must be divisible by groups={groups}"
        )
    ho = _conv_out(x_shape[2], kh, stride[0], padding[0], dilation[0])
    wo = _conv_out(x_shape[3], kw, stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise OpError(
            f"{op}: the kernel {kh}x{kw} (dilation {list(dilation)}) is larger than "
            f"the padded input of shape {fmt(x_shape)} (padding {list(padding)}); "
            f"the output would be {ho}x{wo}"
        )
    return ho, wo


def _infer_conv2d(x, w, stride, padding, dilation, groups) -> Spec:
    _need_float("conv2d", x)
    if x.dtype is not w.dtype:
        raise OpError(
            f"conv2d: input ({x.dtype}) and weight ({w.dtype}) must have the same "
            f"dtype; convert one with .to(dtype)"
        )
    ho, wo = _conv_shapes("conv2d", x.shape, w.shape, stride, padding, dilation, groups)
    return Spec((x.shape[0], w.shape[0], ho, wo), x.dtype)


def _pad(xp, x, padding, extra=(0, 0), value=0):
    """``x`` zero- (or ``value``-) padded by ``padding``, plus ``extra`` at the far end."""
    ph, pw = padding
    eh, ew = extra
    if not (ph or pw or eh or ew):
        return x
    n, c, h, w = x.shape
    out = xp.full((n, c, h + 2 * ph + eh, w + 2 * pw + ew), value, dtype=x.dtype)
    out[:, :, ph : ph + h, pw : pw + w] = x
    return out


def _window(i, j, stride, dilation, ho, wo):
    """The slices of the padded input that kernel offset (i, j) sees."""
    hs, ws = i * dilation[0], j * dilation[1]
    return (
        slice(None),
        slice(None),
        slice(hs, hs + stride[0] * (ho - 1) + 1, stride[0]),
        slice(ws, ws + stride[1] * (wo - 1) + 1, stride[1]),
    )


def _im2col(xp, x, kh, kw, stride, padding, dilation, ho, wo):
    """(N, C, kh, kw, ho, wo) patches of ``x``, one strided copy per kernel offset (for
    CuPy; NumPy works in tiles, below)."""
    xpad = _pad(xp, x, padding)
    n, c = x.shape[:2]
    cols = xp.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xpad[_window(i, j, stride, dilation, ho, wo)]
    return cols


# On the CPU, patches are copied and multiplied one tile at a time, a tile being about
# _TILE_BYTES of patches, so that BLAS reads them from cache: the thin (O, K) x (K, pixels)
# products of a small CNN are otherwise bound by memory (1.5x faster for 16 channels at
# 32x32). A tile is whole images, or output rows of one image. How an image is cut
# depends on its own shape only, so batch blocks (core/cost.py) compute the same bits.
_TILE_BYTES = 1 << 18


def _patch_view(x, kh, kw, stride, padding, dilation, ho, wo):
    """A read-only (N, C, kh, kw, ho, wo) strided view of the patches of NumPy ``x``."""
    xpad = _pad(np, x, padding)
    s0, s1, s2, s3 = xpad.strides
    strides = (s0, s1, s2 * dilation[0], s3 * dilation[1], s2 * stride[0], s3 * stride[1])
    shape = x.shape[:2] + (kh, kw, ho, wo)
    return np.lib.stride_tricks.as_strided(xpad, shape, strides, writeable=False)


def _tiles(view):
    """The tiles of a patch view, each copied into the same scratch array:
    ``(patches, images, pixels)`` with ``images`` a slice of the batch and ``pixels`` one
    of the flattened output."""
    n, c, kh, kw, ho, wo = view.shape
    row_bytes = max(1, c * kh * kw * wo * view.itemsize)
    if row_bytes * ho <= _TILE_BYTES:
        step = max(1, _TILE_BYTES // (row_bytes * ho))
        cuts = [(slice(i, min(n, i + step)), 0, ho) for i in range(0, n, step)]
    else:
        rows = max(1, _TILE_BYTES // row_bytes)
        cuts = [
            (slice(i, i + 1), r, min(ho, r + rows)) for i in range(n) for r in range(0, ho, rows)
        ]
    most = max(((b.stop - b.start) * (r1 - r0) for b, r0, r1 in cuts), default=0)
    scratch = np.empty(most * row_bytes // view.itemsize, view.dtype)
    for images, r0, r1 in cuts:
        tile = view[images, :, :, :, r0:r1]
        cols = scratch[: tile.size].reshape(tile.shape)
        np.copyto(cols, tile)
        yield cols, images, slice(r0 * wo, r1 * wo)


def _conv2d_np(x, w, stride, padding, dilation, groups, ho, wo):
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    wm = w.reshape(groups, o // groups, cg * kh * kw)
    out = np.empty((n, groups, o // groups, ho * wo), dtype=x.dtype)
    for cols, images, pixels in _tiles(_patch_view(x, kh, kw, stride, padding, dilation, ho, wo)):
        b = images.stop - images.start
        np.matmul(
            wm,
            cols.reshape(b, groups, -1, pixels.stop - pixels.start),
            out=out[images, :, :, pixels],
        )
    return out.reshape(n, o, ho, wo)


def _conv2d_weight_grad_np(x, g, kh, kw, stride, padding, dilation, groups):
    n, o, ho, wo = g.shape
    k = x.shape[1] // groups * kh * kw
    gt = g.reshape(n, groups, o // groups, ho * wo).transpose(0, 1, 3, 2)  # as below
    dw = np.zeros((groups, k, o // groups), dtype=x.dtype)
    for cols, images, pixels in _tiles(_patch_view(x, kh, kw, stride, padding, dilation, ho, wo)):
        b = images.stop - images.start
        part = np.matmul(cols.reshape(b, groups, k, -1), gt[images, :, pixels])
        for image in part:  # in batch order, one image at a time
            dw += image
    return np.ascontiguousarray(dw.transpose(0, 2, 1)).reshape(o, x.shape[1] // groups, kh, kw)


def _col2im(xp, cols, x_shape, stride, padding, dilation):
    """The adjoint of _im2col: add each offset's patch back into a padded image, crop."""
    n, c, kh, kw, ho, wo = cols.shape
    h, w = x_shape[2:]
    ph, pw = padding
    out = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[_window(i, j, stride, dilation, ho, wo)] += cols[:, :, i, j]
    return out[:, :, ph : ph + h, pw : pw + w] if (ph or pw) else out


@defop("conv2d", infer=_infer_conv2d, arity=2, attrs=_CONV_ATTRS)
def conv2d_p(xp, x, w, stride, padding, dilation, groups):
    """2-D cross-correlation without bias (``nn.functional.conv2d`` adds the bias)."""
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    ho = _conv_out(x.shape[2], kh, stride[0], padding[0], dilation[0])
    wo = _conv_out(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if kh == kw == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        cols = x.reshape(n, groups, cg, ho * wo)  # 1x1 kernels need no patches
    elif xp is np:
        return _conv2d_np(x, w, stride, padding, dilation, groups, ho, wo)
    else:
        cols = _im2col(xp, x, kh, kw, stride, padding, dilation, ho, wo)
        cols = cols.reshape(n, groups, cg * kh * kw, ho * wo)
    out = xp.matmul(w.reshape(groups, o // groups, cg * kh * kw), cols)
    return out.reshape(n, o, ho, wo)


@conv2d_p.defvjp
def _(g, out, x, w, stride, padding, dilation, groups):
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    gx = (
        conv2d_input_grad_p(g, w, input_size=list(x.shape[2:]), **attrs)
        if x.requires_grad
        else None
    )
    gw = (
        conv2d_weight_grad_p(x, g, kernel_size=list(w.shape[2:]), **attrs)
        if w.requires_grad
        else None
    )
    return gx, gw


def _infer_conv_input_grad(g, w, input_size, stride, padding, dilation, groups) -> Spec:
    if len(g.shape) != 4 or len(input_size) != 2:
        raise OpError(
            f"conv2d_input_grad: expected a 4-D gradient and input_size (H, W), got "
            f"{fmt(g.shape)} and {list(input_size)}"
        )
    x_shape = (g.shape[0], w.shape[1] * groups) + tuple(input_size)
    _need_same_float("conv2d_input_grad", g, w, "gradient", "weight")
    ho, wo = _conv_shapes("conv2d_input_grad", x_shape, w.shape, stride, padding, dilation, groups)
    if tuple(g.shape) != (g.shape[0], w.shape[0], ho, wo):
        raise OpError(
            f"conv2d_input_grad: gradient of shape {fmt(g.shape)} does not match "
            f"the conv2d output {fmt((g.shape[0], w.shape[0], ho, wo))} of weight "
            f"{fmt(w.shape)} on an input of spatial size {list(input_size)}"
        )
    return Spec(x_shape, g.dtype)


def _transposed_kernel(xp, w, groups):
    """The (C, O/groups, kh, kw) kernel of the transposed convolution of ``w``."""
    o, cg, kh, kw = w.shape
    wt = w.reshape(groups, o // groups, cg, kh, kw).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
    return xp.ascontiguousarray(wt).reshape(groups * cg, o // groups, kh, kw)


@defop(
    "conv2d_input_grad",
    infer=_infer_conv_input_grad,
    arity=2,
    attrs={"input_size": ("ints", []), **_CONV_ATTRS},
)
def conv2d_input_grad_p(xp, g, w, input_size, stride, padding, dilation, groups):
    """d conv2d / d input: a transposed convolution of ``g`` with ``w`` (col2im of W^T g)."""
    n, o, ho, wo = g.shape
    _, cg, kh, kw = w.shape
    full = [d * (k - 1) - p for d, k, p in zip(dilation, (kh, kw), padding)]
    if tuple(stride) == (1, 1) and min(full) >= 0:
        # Stride 1: a convolution of g with the flipped, transposed kernel. Its im2col and
        # GEMM cost about half of the GEMM and the kh*kw strided adds of col2im.
        return conv2d_p.forward(
            xp, g, _transposed_kernel(xp, w, groups), [1, 1], full, dilation, groups
        )
    wt = w.reshape(groups, o // groups, cg * kh * kw).transpose(0, 2, 1)
    cols = xp.matmul(wt, g.reshape(n, groups, o // groups, ho * wo))
    return _col2im(
        xp,
        cols.reshape(n, groups * cg, kh, kw, ho, wo),
        (n, groups * cg) + tuple(input_size),
        stride,
        padding,
        dilation,
    )


@conv2d_input_grad_p.defvjp
def _(v, out, g, w, input_size, stride, padding, dilation, groups):
    # conv2d_input_grad(g, w) is bilinear and the adjoint of conv2d(., w).
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    gg = conv2d_p(v, w, **attrs) if g.requires_grad else None
    gw = (
        conv2d_weight_grad_p(v, g, kernel_size=list(w.shape[2:]), **attrs)
        if w.requires_grad
        else None
    )
    return gg, gw


def _infer_conv_weight_grad(x, g, kernel_size, stride, padding, dilation, groups) -> Spec:
    if len(g.shape) != 4 or len(x.shape) != 4 or len(kernel_size) != 2:
        raise OpError(
            f"conv2d_weight_grad: expected a 4-D input and gradient and kernel_size "
            f"(kh, kw), got {fmt(x.shape)}, {fmt(g.shape)} and {list(kernel_size)}"
        )
    w_shape = (g.shape[1], x.shape[1] // groups) + tuple(kernel_size)
    _need_same_float("conv2d_weight_grad", x, g, "input", "gradient")
    ho, wo = _conv_shapes("conv2d_weight_grad", x.shape, w_shape, stride, padding, dilation, groups)
    if tuple(g.shape) != (x.shape[0], w_shape[0], ho, wo):
        raise OpError(
            f"conv2d_weight_grad: gradient of shape {fmt(g.shape)} does not match "
            f"the conv2d output {fmt((x.shape[0], w_shape[0], ho, wo))} for input "
            f"{fmt(x.shape)}"
        )
    return Spec(w_shape, x.dtype)


@defop(
    "conv2d_weight_grad",
    infer=_infer_conv_weight_grad,
    arity=2,
    attrs={"kernel_size": ("ints", []), **_CONV_ATTRS},
)
def conv2d_weight_grad_p(xp, x, g, kernel_size, stride, padding, dilation, groups):
    """d conv2d / d weight: patches of ``x`` against ``g``, summed over batch and pixels."""
    n, o, ho, wo = g.shape
    c = x.shape[1]
    kh, kw = kernel_size
    if xp is np:
        return _conv2d_weight_grad_np(x, g, kh, kw, stride, padding, dilation, groups)
    k = c // groups * kh * kw
    cols = _im2col(xp, x, kh, kw, stride, padding, dilation, ho, wo)
    cols = cols.reshape(n, groups, k, ho * wo)
    # One batched matmul over (batch, group), then a sum over the batch: much faster than
    # contracting batch and pixels together, which needs a transposed copy of the patches.
    # Patches times g^T (then transposed) rather than g times patches^T: ~35% faster in
    # OpenBLAS for the thin (O, pixels) gradients of a CNN.
    gt = g.reshape(n, groups, o // groups, ho * wo).transpose(0, 1, 3, 2)
    dw = xp.matmul(cols, gt).sum(axis=0).transpose(0, 2, 1)
    return xp.ascontiguousarray(dw).reshape((o, c // groups, kh, kw))


@conv2d_weight_grad_p.defvjp
def _(v, out, x, g, kernel_size, stride, padding, dilation, groups):
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    gx = (
        conv2d_input_grad_p(g, v, input_size=list(x.shape[2:]), **attrs)
        if x.requires_grad
        else None
    )
    gg = conv2d_p(x, v, **attrs) if g.requires_grad else None
    return gx, gg


# ======================================================================== pooling ======

_POOL_ATTRS = {
    "kernel_size": ("ints", [1, 1]),
    "stride": ("ints", [1, 1]),
    "padding": ("ints", [0, 0]),
    "dilation": ("ints", [1, 1]),
    "ceil_mode": ("bool", False),
}


def _pool_out(op, size, k, s, p, d, ceil_mode) -> int:
    """torch's pooling_output_shape: with ceil_mode the last window must start inside."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_shapes(op, x, kernel_size, stride, padding, dilation, ceil_mode) -> tuple:
    _need_float(op, x)
    if len(x.shape) != 4:
        raise OpError(
            f"{op}: expected a 4-D input (N, C, H, W), got shape {fmt(x.shape)}; "
            f"add a batch dimension with .unsqueeze(0)"
        )
    _check_conv_attrs(op, stride, padding, dilation, 1)
    if len(kernel_size) != 2 or min(kernel_size) < 1:
        raise OpError(f"{op}: kernel_size must be 2 positive integers, got {list(kernel_size)}")
    for p, k in zip(padding, kernel_size):
        if p > k // 2:
            raise OpError(
                f"{op}: padding should be at most half of the kernel size, got "
                f"padding {list(padding)} for kernel_size {list(kernel_size)}"
            )
    out = tuple(
        _pool_out(op, x.shape[2 + a], kernel_size[a], stride[a], padding[a], dilation[a], ceil_mode)
        for a in range(2)
    )
    if min(out) < 1:
        raise OpError(
            f"{op}: input of shape {fmt(x.shape)} is too small for kernel_size "
            f"{list(kernel_size)} (padding {list(padding)}, dilation "
            f"{list(dilation)}); the output would be {out[0]}x{out[1]}"
        )
    return out


def _pool_extra(x_shape, kernel_size, stride, padding, dilation, out) -> tuple:
    """Padding past the far edge that ceil_mode's last windows reach into."""
    return tuple(
        max(
            0,
            (out[a] - 1) * stride[a]
            + dilation[a] * (kernel_size[a] - 1)
            + 1
            - x_shape[2 + a]
            - 2 * padding[a],
        )
        for a in range(2)
    )


def _infer_max_pool(x, kernel_size, stride, padding, dilation, ceil_mode) -> Spec:
    ho, wo = _pool_shapes("max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode)
    return Spec(tuple(x.shape[:2]) + (ho, wo), x.dtype)


def _max_pool_select(xp, x, v, kernel_size, stride, padding, dilation, ceil_mode):
    """Per window: the value of ``v`` where ``x`` takes its first max (the max itself if v
    is x), and the offset index of that max; NaN counts as a max, as in torch."""
    n, c = x.shape[:2]
    out_hw = _pool_shapes(
        "max_pool2d",
        Spec(x.shape, dtypes.from_numpy(x.dtype)),
        kernel_size,
        stride,
        padding,
        dilation,
        ceil_mode,
    )
    extra = _pool_extra(x.shape, kernel_size, stride, padding, dilation, out_hw)
    xpad = _pad(xp, x, padding, extra, -xp.inf)
    vpad = xpad if v is x else _pad(xp, v, padding, extra, 0)
    best = idx = picked = None
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            win = _window(i, j, stride, dilation, *out_hw)
            cand = xpad[win]
            if best is None:
                best = cand.copy()
                idx = xp.zeros(best.shape, dtype=xp.int32)
                picked = best if v is x else vpad[win].copy()
                continue
            upd = (cand > best) | xp.isnan(cand)
            xp.copyto(best, cand, where=upd)
            xp.copyto(idx, i * kernel_size[1] + j, where=upd)  # no mask sync on CuPy
            if v is not x:
                xp.copyto(picked, vpad[win], where=upd)
    return picked, idx, out_hw, extra


@defop("max_pool2d", infer=_infer_max_pool, attrs=_POOL_ATTRS)
def max_pool2d_p(xp, x, kernel_size, stride, padding, dilation, ceil_mode):
    return _max_pool_select(xp, x, x, kernel_size, stride, padding, dilation, ceil_mode)[0]


@max_pool2d_p.defvjp
def _(g, out, x, kernel_size, stride, padding, dilation, ceil_mode):
    return (
        max_pool2d_grad_p(
            g,
            x,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            ceil_mode=ceil_mode,
        ),
    )


def _infer_max_pool_pair(op):
    def infer(a, x, kernel_size, stride, padding, dilation, ceil_mode) -> Spec:
        ho, wo = _pool_shapes(op, x, kernel_size, stride, padding, dilation, ceil_mode)
        want = tuple(x.shape[:2]) + (ho, wo) if op == "max_pool2d_grad" else tuple(x.shape)
        if tuple(a.shape) != want:
            raise OpError(
                f"{op}: first input of shape {fmt(a.shape)} does not match "
                f"{fmt(want)} for an input of shape {fmt(x.shape)}"
            )
        pooled = tuple(x.shape[:2]) + (ho, wo)
        return Spec(tuple(x.shape) if op == "max_pool2d_grad" else pooled, a.dtype)

    return infer


@defop("max_pool2d_grad", infer=_infer_max_pool_pair("max_pool2d_grad"), arity=2, attrs=_POOL_ATTRS)
def max_pool2d_grad_p(xp, g, x, kernel_size, stride, padding, dilation, ceil_mode):
    """Route each window's gradient to the (first) position of its max in ``x``."""
    _, idx, out_hw, extra = _max_pool_select(
        xp, x, x, kernel_size, stride, padding, dilation, ceil_mode
    )
    n, c, h, w = x.shape
    ph, pw = padding
    dpad = xp.zeros((n, c, h + 2 * ph + extra[0], w + 2 * pw + extra[1]), dtype=g.dtype)
    zero = g.dtype.type(0)
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            win = _window(i, j, stride, dilation, *out_hw)
            dpad[win] += xp.where(idx == i * kernel_size[1] + j, g, zero)
    return dpad[:, :, ph : ph + h, pw : pw + w]


@max_pool2d_grad_p.defvjp
def _(v, out, g, x, kernel_size, stride, padding, dilation, ceil_mode):
    # Linear in g; the routing is piecewise constant in x, so x gets no gradient.
    return max_pool2d_select_p(
        v,
        x,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=ceil_mode,
    ), None


@defop(
    "max_pool2d_select", infer=_infer_max_pool_pair("max_pool2d_select"), arity=2, attrs=_POOL_ATTRS
)
def max_pool2d_select_p(xp, v, x, kernel_size, stride, padding, dilation, ceil_mode):
    """``v`` pooled at the positions where ``x`` has its window maxima (the adjoint of
    max_pool2d_grad)."""
    return _max_pool_select(xp, x, v, kernel_size, stride, padding, dilation, ceil_mode)[0]


@max_pool2d_select_p.defvjp
def _(g, out, v, x, kernel_size, stride, padding, dilation, ceil_mode):
    return max_pool2d_grad_p(
        g,
        x,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=ceil_mode,
    ), None


_AVG_ATTRS = {
    "kernel_size": ("ints", [1, 1]),
    "stride": ("ints", [1, 1]),
    "padding": ("ints", [0, 0]),
    "ceil_mode": ("bool", False),
    "count_include_pad": ("bool", True),
}


def _infer_avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad) -> Spec:
    ho, wo = _pool_shapes("avg_pool2d", x, kernel_size, stride, padding, [1, 1], ceil_mode)
    return Spec(tuple(x.shape[:2]) + (ho, wo), x.dtype)


def _avg_divisor(xp, dtype, x_hw, kernel_size, stride, padding, out_hw, count_include_pad):
    """(ho, wo) window sizes: windows are clipped at the padded edge (count_include_pad) or
    at the input's edge, as in torch's CPU kernel."""
    counts = []
    for a in range(2):
        start = xp.arange(out_hw[a]) * stride[a]  # in padded coordinates
        end = xp.minimum(start + kernel_size[a], x_hw[a] + 2 * padding[a])
        if not count_include_pad:
            start = xp.maximum(start, padding[a])
            end = xp.minimum(end, x_hw[a] + padding[a])
        counts.append((end - start).astype(dtype))
    return counts[0][:, None] * counts[1][None, :]


@defop("avg_pool2d", infer=_infer_avg_pool, attrs=_AVG_ATTRS)
def avg_pool2d_p(xp, x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    out_hw = _pool_shapes(
        "avg_pool2d",
        Spec(x.shape, dtypes.from_numpy(x.dtype)),
        kernel_size,
        stride,
        padding,
        [1, 1],
        ceil_mode,
    )
    extra = _pool_extra(x.shape, kernel_size, stride, padding, [1, 1], out_hw)
    xpad = _pad(xp, x, padding, extra)
    out = None
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            win = xpad[_window(i, j, stride, [1, 1], *out_hw)]
            out = win.copy() if out is None else out.__iadd__(win)
    out /= _avg_divisor(
        xp, x.dtype, x.shape[2:], kernel_size, stride, padding, out_hw, count_include_pad
    )
    return out


@avg_pool2d_p.defvjp
def _(g, out, x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    return (
        avg_pool2d_grad_p(
            g,
            input_size=list(x.shape[2:]),
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            ceil_mode=ceil_mode,
            count_include_pad=count_include_pad,
        ),
    )


def _infer_avg_pool_grad(
    g, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad
) -> Spec:
    if len(g.shape) != 4 or len(input_size) != 2:
        raise OpError(
            f"avg_pool2d_grad: expected a 4-D gradient and input_size (H, W), got "
            f"{fmt(g.shape)} and {list(input_size)}"
        )
    x_shape = tuple(g.shape[:2]) + tuple(input_size)
    out = _pool_shapes(
        "avg_pool2d_grad", Spec(x_shape, g.dtype), kernel_size, stride, padding, [1, 1], ceil_mode
    )
    if tuple(g.shape[2:]) != out:
        raise OpError(
            f"avg_pool2d_grad: gradient of shape {fmt(g.shape)} does not match the "
            f"pooled size {out} of an input of shape {fmt(x_shape)}"
        )
    return Spec(x_shape, g.dtype)


@defop(
    "avg_pool2d_grad", infer=_infer_avg_pool_grad, attrs={"input_size": ("ints", []), **_AVG_ATTRS}
)
def avg_pool2d_grad_p(
    xp, g, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad
):
    n, c, ho, wo = g.shape
    h, w = input_size
    extra = _pool_extra((n, c, h, w), kernel_size, stride, padding, [1, 1], (ho, wo))
    ph, pw = padding
    share = g / _avg_divisor(
        xp, g.dtype, (h, w), kernel_size, stride, padding, (ho, wo), count_include_pad
    )
    dpad = xp.zeros((n, c, h + 2 * ph + extra[0], w + 2 * pw + extra[1]), dtype=g.dtype)
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            dpad[_window(i, j, stride, [1, 1], ho, wo)] += share
    return dpad[:, :, ph : ph + h, pw : pw + w]


@avg_pool2d_grad_p.defvjp
def _(v, out, g, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad):
    return (
        avg_pool2d_p(
            v,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            ceil_mode=ceil_mode,
            count_include_pad=count_include_pad,
        ),
    )


# ========================================================================= losses ======
# nll_loss with label smoothing: per element, with w the class weights (1 without),
#   loss_i = -[(1 - eps) * w[t_i] * logp[i, t_i] + eps / C * sum_c w_c * logp[i, c]]
# (0 where t_i == ignore_index); 'mean' divides the sum by sum_i w[t_i] over kept elements.
# That is torch's cross_entropy(label_smoothing=eps) after log_softmax; eps = 0 is nll_loss.

_REDUCTIONS = ("none", "mean", "sum")
_NLL_ATTRS = {
    "ignore_index": ("int", -100),
    "reduction": ("str", "mean"),
    "label_smoothing": ("float", 0.0),
}
_NLL_CHOICES = {"reduction": _REDUCTIONS}


def check_nll_shapes(op: str, logp, target, weight=None) -> tuple:
    """Validate (N, C, d1, ...) or (C,) scores against their class-index target; returns
    the shape of the unreduced loss. Also used by cross_entropy to name itself in errors."""
    shape, tshape = tuple(logp.shape), tuple(target.shape)
    if len(shape) == 0:
        raise OpError(f"{op}: expected an input of shape (N, C) or (C,), got a 0-d tensor")
    batch = () if len(shape) == 1 else (shape[0],) + shape[2:]
    if tshape != batch:
        layout = "(N,)" if len(shape) == 2 else ("()" if len(shape) == 1 else "(N, d1, ...)")
        raise OpError(
            f"{op}: expected a target of shape {fmt(batch)} for an input of shape "
            f"{fmt(shape)}, got a target of shape {fmt(tshape)}; the target holds "
            f"one class index per sample, layout {layout}"
        )
    if not target.dtype.is_floating_point:
        _need_int(op, target, "target")
    else:
        raise OpError(
            f"{op}: expected a target of class indices (int64), got {target.dtype} "
            f"of shape {fmt(tshape)}; use .long(), or pass class probabilities of "
            f"the input's shape {fmt(shape)} to cross_entropy"
        )
    classes = shape[0] if len(shape) == 1 else shape[1]
    if weight is not None and tuple(weight.shape) != (classes,):
        raise OpError(
            f"{op}: expected a class weight of shape {fmt((classes,))} for an input "
            f"of shape {fmt(shape)}, got {fmt(weight.shape)}"
        )
    if weight is not None and weight.dtype is not logp.dtype:
        raise OpError(
            f"{op}: weight ({weight.dtype}) and input ({logp.dtype}) must have the same dtype"
        )
    return batch


def _check_nll_attrs(op, reduction, label_smoothing) -> None:
    if reduction not in _REDUCTIONS:
        raise OpError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise OpError(f"{op}: label_smoothing must be in [0.0, 1.0], got {label_smoothing}")


def _nll_parts(xp, logp, target, weight, ignore_index, label_smoothing):
    """(per-element loss, per-element weight w[t] (0 where ignored)) with batch dims first."""
    if logp.ndim == 1:  # unbatched (C,) with a () target
        logp, target = logp[None], target[None]
    valid = target != ignore_index
    safe = xp.where(valid, target, 0)
    classes = logp.shape[1]
    lo, hi = (int(safe.min()), int(safe.max())) if safe.size else (0, 0)
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"nll_loss: target {bad} is out of bounds for {classes} classes; "
            f"targets must be in [0, {classes}) or equal ignore_index "
            f"({ignore_index})"
        )
    if logp.ndim == 2:  # fancy indexing: take_along_axis costs ~10 us more per call
        picked = logp[xp.arange(logp.shape[0]), safe]
    else:
        picked = xp.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
    wt = valid.astype(logp.dtype)
    if weight is not None:
        wt *= xp.take(weight, safe)
    loss = -picked * wt
    if label_smoothing:
        t = logp.dtype.type
        moved = xp.moveaxis(logp, 1, -1)
        smooth = moved.sum(axis=-1) if weight is None else xp.matmul(moved, weight)
        loss *= t(1 - label_smoothing)
        loss -= t(label_smoothing / classes) * smooth * valid
    return loss, wt


def _nll_forward(xp, logp, target, weight, ignore_index, reduction, label_smoothing):
    loss, wt = _nll_parts(xp, logp, target, weight, ignore_index, label_smoothing)
    if reduction == "none":
        return loss.reshape(target.shape)
    total = loss.sum()
    if reduction == "sum":
        return xp.asarray(total, dtype=logp.dtype)
    # Every target ignored gives 0/0 = nan, as in torch, without NumPy's warning.
    quiet = getattr(xp, "errstate", None)
    with quiet(invalid="ignore") if quiet else contextlib.nullcontext():
        return xp.asarray(total / wt.sum(), dtype=logp.dtype)


def _nll_backward(
    xp, g, target, weight, num_classes, ignore_index, reduction, label_smoothing, dtype
):
    """d loss / d logp times ``g``: dense (N, C, d1, ...) (or (C,) unbatched)."""
    unbatched = target.ndim == 0
    if unbatched:
        target, g = target[None], (g[None] if reduction == "none" else g)
    valid = target != ignore_index
    safe = xp.where(valid, target, 0)
    t = xp.dtype(dtype).type
    wt = valid.astype(dtype)
    if weight is not None:
        wt *= xp.take(weight, safe)
    coef = (
        -g.astype(dtype, copy=False) * valid
        if reduction == "none"
        else -(g / wt.sum() if reduction == "mean" else g) * valid.astype(dtype)
    )
    coef = coef[:, None]  # broadcast over classes
    shape = (1, num_classes) + (1,) * (target.ndim - 1)
    onehot = safe[:, None] == xp.arange(num_classes).reshape(shape)
    w_t = wt[:, None] if weight is None else xp.take(weight, safe)[:, None]
    out = xp.where(onehot, coef * w_t * t(1 - label_smoothing), t(0))
    if label_smoothing:
        w_c = 1 if weight is None else weight.reshape(shape)
        out += coef * w_c * t(label_smoothing / num_classes)
    return out[0] if unbatched else out


def _def_nll(weighted: bool):
    suffix = "_weighted" if weighted else ""
    name, grad_name = "nll_loss" + suffix, "nll_loss" + suffix + "_grad"
    arity = 3 if weighted else 2

    def infer(logp, target, *weight, ignore_index, reduction, label_smoothing) -> Spec:
        _check_nll_attrs(name, reduction, label_smoothing)
        _need_float(name, logp)
        batch = check_nll_shapes(name, logp, target, *weight)
        return Spec(batch if reduction == "none" else (), logp.dtype)

    @defop(
        name,
        infer=infer,
        arity=arity,
        attrs=_NLL_ATTRS,
        choices=_NLL_CHOICES,
        nondiff=("target", "weight"),
    )
    def loss_p(xp, logp, target, *weight, ignore_index, reduction, label_smoothing):
        return _nll_forward(
            xp,
            logp,
            target,
            weight[0] if weight else None,
            ignore_index,
            reduction,
            label_smoothing,
        )

    def infer_grad(g, target, *weight, num_classes, ignore_index, reduction, label_smoothing):
        _check_nll_attrs(grad_name, reduction, label_smoothing)
        _need_float(grad_name, g, "gradient")
        _need_int(grad_name, target, "target")
        if weight and tuple(weight[0].shape) != (num_classes,):
            raise OpError(
                f"{grad_name}: expected a class weight of shape {fmt((num_classes,))}, "
                f"got {fmt(weight[0].shape)}"
            )
        if weight:
            _need_same_float(grad_name, g, weight[0], "gradient", "weight")
        want = tuple(target.shape) if reduction == "none" else ()
        if tuple(g.shape) != want:
            raise OpError(
                f"{grad_name}: gradient of shape {fmt(g.shape)} does not match the "
                f"loss shape {fmt(want)} (reduction={reduction!r})"
            )
        batch = tuple(target.shape)
        return Spec(batch[:1] + (num_classes,) + batch[1:], g.dtype)

    @defop(
        grad_name,
        infer=infer_grad,
        arity=arity,
        attrs={"num_classes": ("int", 0), **_NLL_ATTRS},
        choices=_NLL_CHOICES,
        nondiff=("target", "weight"),
    )
    def grad_p(xp, g, target, *weight, num_classes, ignore_index, reduction, label_smoothing):
        return _nll_backward(
            xp,
            g,
            target,
            weight[0] if weight else None,
            num_classes,
            ignore_index,
            reduction,
            label_smoothing,
            g.dtype,
        )

    # The loss is linear in logp and grad_p is its adjoint: each one's vjp is the other.
    # torch gives no gradient to class weights or targets either.
    @loss_p.defvjp
    def _(g, out, logp, target, *weight, ignore_index, reduction, label_smoothing):
        classes = logp.shape[0] if logp.ndim == 1 else logp.shape[1]
        gl = grad_p(
            g,
            target,
            *weight,
            num_classes=classes,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
        return (gl, None) + (None,) * len(weight)

    @grad_p.defvjp
    def _(v, out, g, target, *weight, num_classes, ignore_index, reduction, label_smoothing):
        gg = loss_p(
            v,
            target,
            *weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
        return (gg, None) + (None,) * len(weight)

    return loss_p, grad_p


nll_loss_p, nll_loss_grad_p = _def_nll(False)
nll_loss_weighted_p, nll_loss_weighted_grad_p = _def_nll(True)


def _infer_pointwise_loss(op, result_dtype):
    def infer(x, target, reduction) -> Spec:
        if reduction not in _REDUCTIONS:
            raise OpError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        _need_float(op, x)
        if not target.dtype.is_floating_point:
            raise OpError(
                f"{op}: expected a floating point target, got {target.dtype}; "
                f"convert it with .to(input.dtype)"
            )
        if tuple(target.shape) != tuple(x.shape):
            raise OpError(
                f"{op}: target of shape {fmt(target.shape)} must have the same shape "
                f"as the input {fmt(x.shape)}"
            )
        return Spec(
            tuple(x.shape) if reduction == "none" else (), result_dtype(x.dtype, target.dtype)
        )

    return infer


def _reduce(xp, loss, reduction, dtype):
    if reduction == "none":
        return loss
    return xp.asarray(loss.mean() if reduction == "mean" else loss.sum(), dtype=dtype)


def _scale(g, x, reduction):
    """The incoming gradient of a reduced loss, spread back over the elements."""
    return g / x.numel() if reduction == "mean" else g


# Mixed float dtypes: torch promotes in mse_loss, and gives the target's dtype in
# binary_cross_entropy_with_logits (its kernel works in place on 1 - target).
@defop(
    "mse_loss",
    dtype="promote",
    choices={"reduction": _REDUCTIONS},
    infer=_infer_pointwise_loss("mse_loss", dtypes.promote),
    arity=2,
    attrs={"reduction": ("str", "mean")},
)
def mse_loss_p(xp, x, target, reduction):
    d = x - target
    d *= d
    return _reduce(xp, d, reduction, d.dtype)


@mse_loss_p.defvjp
def _(g, out, x, target, reduction):
    gd = 2 * _scale(g, x, reduction) * (x - target)
    return gd, (-gd if target.requires_grad else None)


@defop(
    "binary_cross_entropy_with_logits",
    dtype="input:target",
    choices={"reduction": _REDUCTIONS},
    arity=2,
    attrs={"reduction": ("str", "mean")},
    infer=_infer_pointwise_loss("binary_cross_entropy_with_logits", lambda x, t: t),
)
def bce_with_logits_p(xp, x, target, reduction):
    """(1 - t) * x + log(1 + exp(-x)), with the log term computed without overflow."""
    t = x.dtype.type
    loss = (t(1) - target) * x + xp.maximum(-x, t(0)) + xp.log1p(xp.exp(-xp.abs(x)))
    return _reduce(xp, loss.astype(target.dtype, copy=False), reduction, target.dtype)


@bce_with_logits_p.defvjp
def _(g, out, x, target, reduction):
    gs = _scale(g, x, reduction)
    return (
        gs * (sigmoid(x) - target) if x.requires_grad else None,
        -gs * x if target.requires_grad else None,
    )


# ========================================================================= linear ======
# x @ w.T + b as one primitive: the bias is added in place into the fresh product, which
# saves a full pass over the output (a Linear layer is most of an MLP's step).


def _infer_linear(x, w, b) -> Spec:
    if (
        len(w.shape) != 2
        or not x.shape
        or x.shape[-1] != w.shape[1]
        or tuple(b.shape) != (w.shape[0],)
    ):
        raise OpError(
            f"linear: input {fmt(x.shape)}, weight {fmt(w.shape)} and bias "
            f"{fmt(b.shape)} do not fit; expected input (*, in_features), weight "
            f"(out_features, in_features) and bias (out_features,)"
        )
    if not (x.dtype is w.dtype is b.dtype) or not x.dtype.is_floating_point:
        raise OpError(
            f"linear: expected input, weight and bias of one floating dtype, got "
            f"{x.dtype}, {w.dtype} and {b.dtype}; convert with .to(dtype)"
        )
    return Spec(tuple(x.shape[:-1]) + (w.shape[0],), x.dtype)


@defop("linear", infer=_infer_linear, arity=3)
def linear_p(xp, x, w, b):
    out = rows_times_matrix(xp, x, w.T) if x.ndim > 2 else xp.matmul(x, w.T)
    out += b
    return out


@linear_p.defvjp
def _(g, out, x, w, b):
    gx = matmul(g, w) if x.requires_grad else None
    g2 = reshape(g, (-1, g.shape[-1])) if g.ndim != 2 else g
    gw = gb = None
    if w.requires_grad:
        x2 = reshape(x, (-1, x.shape[-1])) if x.ndim != 2 else x
        gw = matmul(g2.mT, x2)
    if b.requires_grad:
        gb = sum(g2, dim=[0])
    return gx, gw, gb


# ====================================================================== recurrent ======
# One LSTM step once its gate pre-activations are summed (x W_ih^T + b_ih + h W_hh^T +
# b_hh, columns i, f, g, o as torch orders them): the cell's elementwise part as one
# kernel, the new h and c side by side in one (N, 2H) output (an op has one output). As
# compositions a step was ~14 ops forward and ~30 backward, and per-op Python was most of
# an LSTM's time.


def _infer_lstm_cell(gates, c) -> Spec:
    _need_float("lstm_cell", gates, "gates")
    n4 = gates.shape[1] if len(gates.shape) == 2 else 0
    if (
        not n4
        or n4 % 4
        or len(c.shape) != 2
        or c.shape[1] * 4 != n4
        or c.shape[0]
        not in (
            1,
            gates.shape[0],
        )
    ):
        raise OpError(
            f"lstm_cell: expected gates (N, 4H) and a cell state (N, H) or (1, H), got "
            f"{fmt(gates.shape)} and {fmt(c.shape)}"
        )
    _need_same_float("lstm_cell", gates, c, "gates", "cell state")
    return Spec((gates.shape[0], n4 // 2), gates.dtype)


def _sigmoid(xp, a, out):
    """1 / (1 + exp(-a)) into ``out``, in place, as torch's CPU kernel computes it: for
    a < -88 exp overflows to inf, and 1 / inf is the right 0."""
    with np.errstate(over="ignore"):
        _sigmoid_unchecked(xp, a, out)


def _sigmoid_unchecked(xp, a, out):
    """_sigmoid for callers that already ignore overflow (a time loop enters errstate
    once: ~1 us a call)."""
    xp.negative(a, out=out)
    xp.exp(out, out=out)
    out += 1
    xp.reciprocal(out, out=out)


def _lstm_activations(xp, gates):
    """sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), in one (N, 4H) array."""
    hs = gates.shape[1] // 4
    act = xp.empty_like(gates)
    _sigmoid(xp, gates[:, : 2 * hs], act[:, : 2 * hs])
    xp.tanh(gates[:, 2 * hs : 3 * hs], out=act[:, 2 * hs : 3 * hs])
    _sigmoid(xp, gates[:, 3 * hs :], act[:, 3 * hs :])
    return act, hs


@defop("lstm_cell", infer=_infer_lstm_cell, arity=2, saves_out=True)
def lstm_cell_p(xp, gates, c):
    """[h', c'] with c' = f * c + i * g and h' = o * tanh(c') (i, f, o sigmoid; g tanh)."""
    act, hs = _lstm_activations(xp, gates)
    out = xp.empty((gates.shape[0], 2 * hs), dtype=gates.dtype)
    c_new = out[:, hs:]
    xp.multiply(act[:, hs : 2 * hs], c, out=c_new)
    c_new += act[:, :hs] * act[:, 2 * hs : 3 * hs]
    xp.tanh(c_new, out=out[:, :hs])
    out[:, :hs] *= act[:, 3 * hs :]
    return out


@lstm_cell_p.defvjp
def _(g, out, gates, c):
    if is_grad_enabled():  # create_graph: the gradient must be differentiable again
        return _lstm_cell_vjp_composed(g, gates, c)
    hs = c.shape[1]
    grads = _kernel(_lstm_cell_grad, g, out, gates, c)  # (N, 5H): d gates, then d c
    gc = narrow(grads, 1, 4 * hs, hs) if c.requires_grad else None
    if gc is not None and c.shape[0] != g.shape[0]:
        gc = sum(gc, dim=[0], keepdim=True)
    return narrow(grads, 1, 0, 4 * hs), gc


def _lstm_cell_vjp_composed(g, gates, c):
    """lstm_cell's vjp in differentiable ops (what _lstm_cell_grad computes in one kernel)."""
    hs = c.shape[1]
    i, f, gg, o = chunk(gates, 4, -1)
    i, f, gg, o = sigmoid(i), sigmoid(f), tanh(gg), sigmoid(o)
    tc = tanh(f * c + i * gg)
    gh, gc = g[:, :hs], g[:, hs:]
    dc = gc + gh * o * (1 - tc * tc)
    di, df = dc * gg * i * (1 - i), dc * c * f * (1 - f)
    dgates = cat([di, df, dc * i * (1 - gg * gg), gh * tc * o * (1 - o)], -1)
    gc_in = None
    if c.requires_grad:
        gc_in = dc * f
        if c.shape[0] != g.shape[0]:
            gc_in = sum(gc_in, dim=[0], keepdim=True)
    return dgates, gc_in


def _lstm_cell_grad(xp, g, out, gates, c):
    """lstm_cell's vjp in one kernel: [d gates (N, 4H), d c (N, H)]."""
    act, hs = _lstm_activations(xp, gates)
    i, f, gg, o = (act[:, k * hs : (k + 1) * hs] for k in range(4))
    tc = xp.tanh(out[:, hs:])
    gh = g[:, :hs]
    dc = gh * o
    dc *= 1 - tc * tc
    dc += g[:, hs:]
    res = xp.empty((gates.shape[0], 5 * hs), dtype=gates.dtype)
    res[:, :hs] = dc * gg * i * (1 - i)
    res[:, hs : 2 * hs] = dc * c * f * (1 - f)
    res[:, 2 * hs : 3 * hs] = dc * i * (1 - gg * gg)
    res[:, 3 * hs : 4 * hs] = gh * tc * o * (1 - o)
    xp.multiply(dc, f, out=res[:, 4 * hs :])
    return res


# A whole LSTM layer in one op: the time loop runs inside the kernel, over NumPy, and so
# does backpropagation through time in _lstm_layer_grad. As lstm_cell ops a step still cost
# ~16 ops and their Python; torch runs the same loop in C++.


def _infer_lstm_layer(xw, h0, c0, w_hh, reverse) -> Spec:
    _need_float("lstm_layer", xw, "input projection")
    ok = len(xw.shape) == 3 and len(w_hh.shape) == 2 and xw.shape[1] > 0
    hs = w_hh.shape[1] if ok else 0
    ok = ok and xw.shape[2] == 4 * hs == w_hh.shape[0] and hs > 0
    for s in (h0, c0):
        ok = ok and len(s.shape) == 2 and s.shape[1] == hs and s.shape[0] in (1, xw.shape[0])
    if not ok:
        raise OpError(
            f"lstm_layer: expected an input projection (N, L, 4H) with L > 0, states h0 and "
            f"c0 (N, H) or (1, H) and w_hh (4H, H), got {fmt(xw.shape)}, {fmt(h0.shape)}, "
            f"{fmt(c0.shape)} and {fmt(w_hh.shape)}"
        )
    for what, t in (("h0", h0), ("c0", c0), ("w_hh", w_hh)):
        _need_same_float("lstm_layer", xw, t, "input projection", what)
    return Spec((xw.shape[0], xw.shape[1], 2 * hs), xw.dtype)


def _time_steps(length: int, reverse: bool) -> range:
    return range(length - 1, -1, -1) if reverse else range(length)


@defop(
    "lstm_layer",
    infer=_infer_lstm_layer,
    arity=4,
    attrs={"reverse": ("bool", False)},
    saves_out=True,
)
def lstm_layer_p(xp, xw, h0, c0, w_hh, reverse):
    """[h_t, c_t] for every step t of ``gates_t = xw[:, t] + h_{t-1} @ w_hh.T`` and
    lstm_cell's update, from (h0, c0); from the last step back with ``reverse``."""
    n, length, _ = xw.shape
    hs = w_hh.shape[1]
    out, act = _layer_buffers(xp, n, length, hs, xw.dtype, keep=is_grad_enabled())
    # Every step writes into the same buffers: 13 NumPy calls a step (there were 21).
    w_t = _contiguous_transpose(xp, w_hh)
    scratch = xp.empty((n, 4 * hs), dtype=xw.dtype)
    tanh_g = xp.empty((n, hs), dtype=xw.dtype)
    h, c = xp.broadcast_to(h0, (n, hs)), xp.broadcast_to(c0, (n, hs))
    with np.errstate(over="ignore"):
        for t in _time_steps(length, reverse):
            gates = scratch if act is None else act[t]
            i, f, g, o = _gate_columns(gates, hs)
            xp.matmul(h, w_t, out=gates)
            gates += xw[:, t]
            xp.tanh(g, out=tanh_g)
            # all four columns in one sigmoid (g's is overwritten): cheaper than two calls
            _sigmoid_unchecked(xp, gates, gates)
            g[...] = tanh_g
            h_new, c_new = out[:, t, :hs], out[:, t, hs:]
            xp.multiply(f, c, out=c_new)
            xp.multiply(i, g, out=tanh_g)
            c_new += tanh_g
            xp.tanh(c_new, out=h_new)
            h_new *= o
            h, c = h_new, c_new
    return out


# The forward's gate activations (sigmoid i, f, o and tanh g) are what the backward needs
# first; recomputing them cost a (N*L, H) @ (H, 4H) product and the activations again,
# ~2.5 ms of a ~6 ms backward per layer of the benchmark's LSTM. They are kept, when a
# graph may be recorded, in the same allocation as the output, right after it: the op's
# output stays [h_t, c_t], and the backward finds them through the output array's base.
# An output that lost its base (copied, computed in float32 for a half-precision input)
# has its activations recomputed. They are time-major, (L, N, 4H): a step's (N, 4H) rows
# of a batch-first array lie L * 16 KB apart, and at L = 32 the rows of one step fall into
# the same cache sets (the forward took 1.3x as long).


def _layer_buffers(xp, n: int, length: int, hs: int, dtype, keep: bool):
    """The output (N, L, 2H) and, with ``keep``, the activations (L, N, 4H) after it."""
    size = n * length * 2 * hs
    if not keep:
        return xp.empty((n, length, 2 * hs), dtype=dtype), None
    memory = xp.empty(3 * size, dtype=dtype)
    return memory[:size].reshape(n, length, 2 * hs), memory[size:].reshape(length, n, 4 * hs)


def _kept_activations(xp, out):
    """The activations (L, N, 4H) _layer_buffers kept after ``out``, or None."""
    memory = out.base
    size = out.size
    if (
        memory is None
        or memory.ndim != 1
        or memory.size != 3 * size
        or memory.dtype != out.dtype
        or not out.flags.c_contiguous
        or not xp.may_share_memory(memory[:1], out.reshape(-1)[:1])  # out starts it
    ):
        return None
    n, length, two_h = out.shape
    return memory[size:].reshape(length, n, 2 * two_h)


def _contiguous_transpose(xp, w):
    """w.T in row-major memory: OpenBLAS multiplies (32, 128) by a (128, 512) matrix ~1.5x
    faster than by the transposed view of a (512, 128) one (54 vs 80 us, one thread)."""
    return xp.ascontiguousarray(w.T)


def _gate_columns(gates, hs: int):
    """The i, f, g, o columns of (..., 4H) gates, as views."""
    return tuple(gates[..., k * hs : (k + 1) * hs] for k in range(4))


@lstm_layer_p.defvjp
def _(g, out, xw, h0, c0, w_hh, reverse):
    inputs = (xw, h0, c0, w_hh)
    if is_grad_enabled():  # create_graph: differentiate the layer as compositions
        return _lstm_layer_vjp_composed(g, inputs, reverse)
    flat = _kernel(_lstm_layer_grad, g, out, xw, h0, c0, w_hh, reverse=reverse)
    grads, start = [], 0
    for t in inputs:  # the kernel's one flat output: each input's gradient in turn
        size = math.prod(t.shape)
        part = narrow(flat, 0, start, size)
        grads.append(reshape(part, tuple(t.shape)) if t.requires_grad else None)
        start += size
    return tuple(grads)


def _lstm_layer_composed(xw, h0, c0, w_hh, reverse):
    """lstm_layer as compositions of differentiable ops."""
    h, c, outs = h0, c0, {}
    for t in _time_steps(xw.shape[1], reverse):
        i, f, gg, o = chunk(select(xw, 1, t) + matmul(h, w_hh.mT), 4, -1)
        c = sigmoid(f) * c + sigmoid(i) * tanh(gg)
        h = sigmoid(o) * tanh(c)
        outs[t] = cat([h, c], -1)
    return stack([outs[t] for t in range(xw.shape[1])], 1)


def _lstm_layer_vjp_composed(g, inputs, reverse):
    from ..autograd import grad

    wanted = [t for t in inputs if t.requires_grad]
    out = _lstm_layer_composed(*inputs, reverse)
    found = iter(grad([out], wanted, [g], create_graph=True, allow_unused=True))
    return tuple(next(found) if t.requires_grad else None for t in inputs)


def _flat_size(*arrays) -> int:
    size = 0
    for a in arrays:
        size += math.prod(a.shape)
    return size


def _previous_states(xp, out, h0, c0, reverse):
    """(h_{t-1}, c_{t-1}) for every step t, time-major (L, N, H): the initial state for
    the first step of the run (the last one with ``reverse``), ``out``'s for the others."""
    n, length, two_h = out.shape
    hs = two_h // 2
    prev = xp.empty((length, n, two_h), dtype=out.dtype)
    first, rest, source = (
        (length - 1, slice(0, -1), slice(1, None)) if reverse else (0, slice(1, None), slice(0, -1))
    )
    prev[first, :, :hs], prev[first, :, hs:] = h0, c0
    prev[rest] = out.transpose(1, 0, 2)[source]
    return prev[:, :, :hs], prev[:, :, hs:]


def _recomputed_activations(xp, xw, h_prev, w_hh):
    """The forward's activations (sigmoid i, f, o and tanh g; (L, N, 4H)) from every
    step's previous h (L, N, H), where the forward kept none."""
    n, length, four_h = xw.shape
    hs = four_h // 4
    # One (L*N, H) @ (H, 4H) product: a stacked matmul runs L small ones, ~1.7x slower.
    gates = xp.matmul(h_prev.reshape(length * n, hs), _contiguous_transpose(xp, w_hh))
    gates = gates.reshape(length, n, four_h)
    gates += xw.transpose(1, 0, 2)
    g = _gate_columns(gates, hs)[2]
    tanh_g = xp.tanh(g)
    with np.errstate(over="ignore"):
        _sigmoid_unchecked(xp, gates, gates)
    g[...] = tanh_g
    return gates


def _lstm_chain_factors(xp, act, c, c_prev):
    """What d c_t (the i, f, g columns) or d h_t (the o column) is multiplied by to give
    each gate pre-activation's gradient: g i (1-i), c_{t-1} f (1-f), i (1-g^2),
    tanh(c_t) o (1-o), from the activations ``act`` (i, f, o sigmoid, g tanh; (L, N, 4H));
    and o (1 - tanh(c_t)^2), the path from d h_t to d c_t. All steps at once, in place:
    two new full-size arrays, where the factors as expressions made ~15."""
    hs = c.shape[-1]
    i, f, g, o = _gate_columns(act, hs)
    factors = xp.empty_like(act)
    di, df, dg, do = _gate_columns(factors, hs)
    tanh_c = xp.tanh(c, out=xp.empty_like(c_prev))
    xp.subtract(1, o, out=do)
    do *= o
    do *= tanh_c
    through_h = tanh_c  # its last use above: 1 - tanh(c)^2 in its place
    through_h *= tanh_c
    xp.subtract(1, through_h, out=through_h)
    through_h *= o
    xp.multiply(g, g, out=dg)
    xp.subtract(1, dg, out=dg)
    dg *= i
    # i (1-i) and f (1-f) side by side in one pass each
    xp.subtract(1, act[..., : 2 * hs], out=factors[..., : 2 * hs])
    factors[..., : 2 * hs] *= act[..., : 2 * hs]
    di *= g
    df *= c_prev
    return factors, through_h


def _lstm_layer_grad(xp, g, out, xw, h0, c0, w_hh, reverse):
    """Backpropagation through time for lstm_layer: the gradients of xw, h0, c0 and w_hh,
    flattened one after the other into one vector."""
    n, length, _ = xw.shape
    hs = w_hh.shape[1]
    flat = xp.empty(_flat_size(xw, h0, c0, w_hh), dtype=xw.dtype)
    # Every step's previous state is known now: the activations and the factors of the
    # chain rule for all steps at once; only dh and dc run step by step. Time-major, as
    # the kept activations (see _layer_buffers).
    h_prev, c_prev = _previous_states(xp, out, h0, c0, reverse)
    act = _kept_activations(xp, out)
    if act is None:
        act = _recomputed_activations(xp, xw, h_prev, w_hh)
    c = out[:, :, hs:].transpose(1, 0, 2)
    dgates, through_h = _lstm_chain_factors(xp, act, c, c_prev)  # times dc or dh below
    g = xp.ascontiguousarray(g.transpose(1, 0, 2))
    f = _gate_columns(act, hs)[1]
    gh, gc = xp.empty((n, hs), dtype=xw.dtype), xp.empty((n, hs), dtype=xw.dtype)
    dh = xp.zeros((n, hs), dtype=xw.dtype)  # from the step after, in the run's order
    dc = xp.zeros((n, hs), dtype=xw.dtype)
    for t in reversed(_time_steps(length, reverse)):  # 8 NumPy calls a step, in place
        xp.add(g[t, :, :hs], dh, out=gh)
        xp.multiply(gh, through_h[t], out=gc)
        gc += g[t, :, hs:]
        gc += dc
        # i, f and g take dc times their factor: one broadcast product for the three
        dgates[t].reshape(n, 4, hs)[:, :3] *= gc[:, None]
        dgates[t, :, 3 * hs :] *= gh
        xp.matmul(dgates[t], w_hh, out=dh)
        xp.multiply(gc, f[t], out=dc)
    flat[: xw.size].reshape(xw.shape)[...] = dgates.transpose(1, 0, 2)
    # w_hh's gradient in one product over all steps (instead of one per step)
    gw = flat[flat.size - w_hh.size :].reshape(w_hh.shape)
    xp.matmul(dgates.reshape(-1, 4 * hs).T, h_prev.reshape(-1, hs), out=gw)
    start = xw.size
    for state, grad_state in ((h0, dh), (c0, dc)):
        if state.shape[0] != n:  # a broadcast zero row: its gradient summed over the batch
            grad_state = grad_state.sum(axis=0, keepdims=True)
        flat[start : start + state.size] = grad_state.reshape(-1)
        start += state.size
    return flat
