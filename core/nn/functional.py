"""Neural-network functions with ``torch.nn.functional``'s names and signatures.

>>> import gradmesh.core as gm
>>> import gradmesh.core.nn.functional as F
>>> logits = gm.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
>>> loss = F.cross_entropy(logits, gm.tensor([0]))
>>> loss.backward()
>>> round(loss.item(), 4)
0.2413

Each function validates its arguments, then calls primitives from
``gradmesh.core.ops.nn`` or composes a few: ``cross_entropy`` is ``log_softmax`` then
``nll_loss``, ``linear`` is ``matmul`` plus a bias. Arguments torch accepts but gradmesh
does not implement (``return_indices``, ``max_norm``, ...) raise ``NotImplementedError``
rather than being ignored.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Sequence

from .. import functional as CF
from ..functional import gelu, sigmoid, softplus, tanh  # noqa: F401  (re-exported)
from ..random import Generator, rng
from ..registry import REGISTRY, OpError, fmt
from ..tensor import Tensor
from ..ops.nn import check_nll_shapes

__all__ = ["relu", "gelu", "tanh", "sigmoid", "leaky_relu", "softplus", "softmax",
           "log_softmax", "linear", "dropout", "layer_norm", "embedding", "conv2d",
           "max_pool2d", "avg_pool2d", "nll_loss", "cross_entropy", "mse_loss",
           "binary_cross_entropy_with_logits"]
__all__ += ["scaled_dot_product_attention", "multi_head_attention"]

_relu_p = REGISTRY["relu"]
_leaky_relu_p = REGISTRY["leaky_relu"]
_nll_p = REGISTRY["nll_loss"]
_nll_weighted_p = REGISTRY["nll_loss_weighted"]


# ==================================================================== activations ======

def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """max(input, 0). ``inplace`` is accepted for torch compatibility; the result is new."""
    return _relu_p(input)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """input where positive, else ``negative_slope * input``."""
    return _leaky_relu_p(input, negative_slope=float(negative_slope))


def _softmax_dim(name: str, dim: int | None, ndim: int) -> int:
    if dim is None:     # torch's legacy implicit choice, with its warning
        warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the "
                      f"call to include dim=X as an argument.", stacklevel=3)
        return 0 if ndim in (0, 1, 3) else 1
    return int(dim)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype=None) -> Tensor:
    """exp(input) / exp(input).sum(dim), computed without overflow."""
    return CF.softmax(input, _softmax_dim("softmax", dim, input.ndim), dtype=dtype)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
                dtype=None) -> Tensor:
    """input - logsumexp(input, dim), computed without overflow."""
    return CF.log_softmax(input, _softmax_dim("log_softmax", dim, input.ndim), dtype=dtype)


# ========================================================================= linear ======

def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``input @ weight.T + bias`` for input (*, in_features), weight (out, in)."""
    if weight.ndim != 2 or input.ndim == 0 or input.shape[-1] != weight.shape[1]:
        raise OpError(f"linear: input of shape {fmt(input.shape)} does not match weight of "
                      f"shape {fmt(weight.shape)}; expected input (*, {weight.shape[-1]}) and "
                      f"weight (out_features, in_features)")
    if bias is not None and bias.ndim == 1 and input.ndim >= 1:
        return REGISTRY["linear"](input, weight, bias)
    out = CF.matmul(input, weight.T)
    return out if bias is None else out + bias


# ======================================================================== dropout ======

def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False,
            generator: Generator | None = None) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p).

    The mask is a pure function of a seed drawn from ``generator`` (default: the global
    one, see ``gradmesh.core.manual_seed``), so a seeded run gives the same masks on every
    backend. In eval mode (``training=False``) it returns ``input`` unchanged.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    seed = int(rng(generator).integers(0, 2 ** 63 - 1))
    return input * REGISTRY["dropout_mask"](input, p=float(p), seed=seed)


# ================================================================== normalisation ======

def layer_norm(input: Tensor, normalized_shape: Sequence[int] | int,
               weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise over the trailing ``normalized_shape`` dims, then scale and shift."""
    shape = [int(normalized_shape)] if isinstance(normalized_shape, (int, numbers.Integral)) \
        else [int(s) for s in normalized_shape]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != tuple(shape):
            raise OpError(f"layer_norm: {name} of shape {fmt(t.shape)} must have the "
                          f"normalized_shape {fmt(shape)}")
    out = REGISTRY["layer_norm"](input, normalized_shape=shape, eps=float(eps))
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


# ====================================================================== embedding ======

def embedding(input: Tensor, weight: Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """Rows of ``weight`` picked by the integer ``input``; shape ``input.shape + (dim,)``.

    Repeated indices add up in the weight's gradient; the ``padding_idx`` row gets none.
    """
    if max_norm is not None or scale_grad_by_freq or sparse:
        raise NotImplementedError("embedding: max_norm, scale_grad_by_freq and sparse are not "
                                  "supported; renormalise the weight yourself")
    if padding_idx is not None:
        num = weight.shape[0]
        if not -num <= padding_idx < num:
            raise OpError(f"embedding: padding_idx {padding_idx} must be within the "
                          f"{num} rows of weight {fmt(weight.shape)}")
        padding_idx = int(padding_idx) % num
    return REGISTRY["embedding"](input, weight, padding_idx=padding_idx)


# ==================================================================== convolution ======

def _pair(op: str, name: str, v) -> list:
    if isinstance(v, numbers.Integral):
        return [int(v), int(v)]
    v = [int(e) for e in v]
    if len(v) == 1:
        return v * 2
    if len(v) != 2:
        raise OpError(f"{op}: {name} must be an int or a pair of ints, got {v}")
    return v


def _batched(op: str, input: Tensor):
    """A 4-D view of a 3-D (C, H, W) input, and whether to drop the batch dim after."""
    if input.ndim == 3:
        return CF.reshape(input, (1,) + tuple(input.shape)), True
    if input.ndim != 4:
        raise OpError(f"{op}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape "
                      f"{fmt(input.shape)}")
    return input, False


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    """2-D convolution (cross-correlation) over NCHW input, as ``torch.nn.functional.conv2d``.

    ``padding`` may be an int, a pair, ``'valid'`` or ``'same'`` (stride 1).
    """
    stride = _pair("conv2d", "stride", stride)
    dilation = _pair("conv2d", "dilation", dilation)
    if isinstance(padding, str):
        padding = _string_padding(padding, weight, stride, dilation)
    else:
        padding = _pair("conv2d", "padding", padding)
    x, unbatched = _batched("conv2d", input)
    out = REGISTRY["conv2d"](x, weight, stride=stride, padding=padding, dilation=dilation,
                             groups=int(groups))
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise OpError(f"conv2d: bias of shape {fmt(bias.shape)} must have one entry per "
                          f"output channel, shape {fmt((weight.shape[0],))}")
        out = out + CF.reshape(bias, (1, -1, 1, 1))
    return CF.reshape(out, out.shape[1:]) if unbatched else out


def _string_padding(padding: str, weight: Tensor, stride, dilation) -> list:
    if padding == "valid":
        return [0, 0]
    if padding != "same":
        raise OpError(f"conv2d: padding must be an int, a pair, 'valid' or 'same', got "
                      f"{padding!r}")
    if stride != [1, 1]:
        raise OpError("conv2d: padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if any(t % 2 for t in total):
        raise NotImplementedError(f"conv2d: padding='same' needs uneven padding for kernel "
                                  f"{tuple(weight.shape[2:])} and dilation {dilation}; pad the "
                                  f"input explicitly")
    return [t // 2 for t in total]


# ======================================================================== pooling ======

def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False) -> Tensor:
    """Maximum over sliding windows; the gradient goes to each window's first maximum."""
    if return_indices:
        raise NotImplementedError("max_pool2d: return_indices is not supported")
    kernel = _pair("max_pool2d", "kernel_size", kernel_size)
    stride = kernel if stride is None or stride == [] else _pair("max_pool2d", "stride", stride)
    x, unbatched = _batched("max_pool2d", input)
    out = REGISTRY["max_pool2d"](x, kernel_size=kernel, stride=stride,
                                 padding=_pair("max_pool2d", "padding", padding),
                                 dilation=_pair("max_pool2d", "dilation", dilation),
                                 ceil_mode=bool(ceil_mode))
    return CF.reshape(out, out.shape[1:]) if unbatched else out


def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> Tensor:
    """Mean over sliding windows; ``count_include_pad`` counts the zero padding."""
    if divisor_override is not None:
        raise NotImplementedError("avg_pool2d: divisor_override is not supported; use "
                                  "avg_pool2d(..., count_include_pad=True) * kernel_area / d")
    kernel = _pair("avg_pool2d", "kernel_size", kernel_size)
    stride = kernel if stride is None or stride == [] else _pair("avg_pool2d", "stride", stride)
    x, unbatched = _batched("avg_pool2d", input)
    out = REGISTRY["avg_pool2d"](x, kernel_size=kernel, stride=stride,
                                 padding=_pair("avg_pool2d", "padding", padding),
                                 ceil_mode=bool(ceil_mode),
                                 count_include_pad=bool(count_include_pad))
    return CF.reshape(out, out.shape[1:]) if unbatched else out


# ========================================================================= losses ======

def _reduction(size_average, reduce, reduction: str) -> str:
    """torch's legacy size_average/reduce flags, mapped to ``reduction``."""
    if size_average is None and reduce is None:
        return reduction
    warnings.warn("size_average and reduce are deprecated; use reduction=", stacklevel=3)
    if reduce is False:
        return "none"
    return "sum" if size_average is False else "mean"


def _reduce(loss: Tensor, reduction: str, denominator=None) -> Tensor:
    if reduction == "none":
        return loss
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be one of ('none', 'mean', 'sum'), got {reduction!r}")
    total = CF.sum(loss)
    if reduction == "sum":
        return total
    return total / (loss.numel() if denominator is None else denominator)


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
             ignore_index: int = -100, reduce=None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of class indices ``target`` (N,) or (N, d1, ...) under
    log-probabilities ``input`` (N, C) or (N, C, d1, ...)."""
    reduction = _reduction(size_average, reduce, reduction)
    attrs = dict(ignore_index=int(ignore_index), reduction=reduction)
    if weight is None:
        return _nll_p(input, target, **attrs)
    return _nll_weighted_p(input, target, weight, **attrs)


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Cross entropy between logits ``input`` (N, C, ...) and ``target``: class indices
    (N, ...) or class probabilities shaped like ``input``.

    With class indices it is ``log_softmax`` then one ``nll_loss`` op, which also carries
    the label-smoothing term.
    """
    reduction = _reduction(size_average, reduce, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0.0, 1.0], got "
                         f"{label_smoothing}")
    if input.ndim == 0:
        raise OpError("cross_entropy: expected logits of shape (N, C) or (C,), got a 0-d "
                      "tensor")
    class_dim = 0 if input.ndim == 1 else 1
    if target.dtype.is_floating_point and tuple(target.shape) == tuple(input.shape):
        return _cross_entropy_probs(input, target, weight, reduction, label_smoothing,
                                    class_dim)
    check_nll_shapes("cross_entropy", input, target, weight)
    logp = log_softmax(input, class_dim)
    attrs = dict(ignore_index=int(ignore_index), reduction=reduction,
                 label_smoothing=float(label_smoothing))
    if weight is None:
        return _nll_p(logp, target, **attrs)
    return _nll_weighted_p(logp, target, weight, **attrs)


def _cross_entropy_probs(input, target, weight, reduction, label_smoothing, class_dim):
    classes = input.shape[class_dim]
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / classes
    terms = log_softmax(input, class_dim) * target
    if weight is not None:
        if tuple(weight.shape) != (classes,):
            raise OpError(f"cross_entropy: expected a class weight of shape {fmt((classes,))} "
                          f"for an input of shape {fmt(input.shape)}, got {fmt(weight.shape)}")
        terms = terms * CF.reshape(weight, (classes,) + (1,) * (input.ndim - class_dim - 1))
    loss = -CF.sum(terms, dim=class_dim)
    return _reduce(loss, reduction, input.numel() // classes if classes else 0)


def _check_same_shape(op: str, input: Tensor, target: Tensor) -> None:
    if tuple(target.shape) != tuple(input.shape):
        raise OpError(f"{op}: target of shape {fmt(target.shape)} must have the same shape as "
                      f"the input {fmt(input.shape)}; reshape one of them")


def mse_loss(input: Tensor, target: Tensor, size_average=None, reduce=None,
             reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """Mean squared error. Shapes must match (torch would broadcast with a warning)."""
    reduction = _reduction(size_average, reduce, reduction)
    _check_same_shape("mse_loss", input, target)
    if weight is None:
        return REGISTRY["mse_loss"](input, target, reduction=reduction)
    _check_same_shape("mse_loss", input, weight)
    loss = REGISTRY["mse_loss"](input, target, reduction="none") * weight
    return _reduce(loss, reduction, CF.sum(weight) if reduction == "mean" else None)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Tensor | None = None, size_average=None,
                                     reduce=None, reduction: str = "mean",
                                     pos_weight: Tensor | None = None) -> Tensor:
    """Binary cross entropy on logits, computed without overflow for any logit.

    ``weight`` rescales each element; ``pos_weight`` (broadcast over the last dimension)
    weighs the positive term: loss = (1-t)*x + (1 + (pos_weight-1)*t) * log(1 + exp(-x)).
    """
    reduction = _reduction(size_average, reduce, reduction)
    _check_same_shape("binary_cross_entropy_with_logits", input, target)
    op = REGISTRY["binary_cross_entropy_with_logits"]
    if weight is None and pos_weight is None:
        return op(input, target, reduction=reduction)
    loss = op(input, target, reduction="none")
    if pos_weight is not None:
        loss = loss + (pos_weight - 1) * target * softplus(-input)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


# ====================================================================== attention ======

from .. import dtypes as _dtypes  # noqa: E402
from ..factories import ones as _ones  # noqa: E402
from ..registry import broadcast_shapes as _broadcast_shapes  # noqa: E402


def _attention_bias(op: str, attn_mask: Tensor | None, is_causal: bool, L: int, S: int,
                    like: Tensor) -> Tensor | None:
    """The additive bias of SDPA's ``attn_mask``/``is_causal``: bool True (take part) -> 0,
    False -> -inf; a float mask as it is; None without a mask."""
    if is_causal:
        if attn_mask is not None:
            raise OpError(f"{op}: pass either attn_mask or is_causal=True, not both")
        attn_mask = CF.tril(_ones((L, S), dtype=_dtypes.bool_, device=like.device))
    if attn_mask is None:
        return None
    if attn_mask.dtype is _dtypes.bool_:
        return CF.where(attn_mask, 0.0, float("-inf")).to(like.dtype)
    if attn_mask.dtype is not like.dtype:
        raise OpError(f"{op}: expected attn_mask dtype to be bool or {like.dtype} (the query's "
                      f"dtype), got {attn_mask.dtype}")
    return attn_mask


def _attend(query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None, dropout_p: float,
            scale: float, training: bool, safe: bool) -> tuple[Tensor, Tensor]:
    """``(softmax(q k^T * scale + bias) @ v, weights)``, the weights dropped out. ``safe``:
    rows whose every key is masked give zeros (SDPA) instead of NaN (``need_weights``)."""
    scores = CF.matmul(query * scale, key.mT)
    if bias is not None:
        scores = scores + bias
    dead = None
    if safe and bias is not None:
        dead = CF.all(scores == float("-inf"), dim=-1, keepdim=True)
        scores = CF.where(dead, 0.0, scores)
    weights = CF.softmax(scores, -1)
    if dead is not None:
        weights = CF.where(dead, 0.0, weights)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p, training)
    return CF.matmul(weights, value), weights


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``softmax(query @ key^T * scale + mask) @ value`` over shapes (..., L, E), (..., S, E),
    (..., S, Ev), as ``torch.nn.functional.scaled_dot_product_attention``.

    ``attn_mask``: bool (True: the key takes part) or float (added to the scores),
    broadcast to (..., L, S); ``is_causal``: the lower-triangular mask. A query whose every
    key is masked gets zeros, as in torch. Dropout uses the engine's seeded masks (see
    ``dropout``), so a traced graph is deterministic; ``scale`` defaults to 1/sqrt(E).
    """
    if enable_gqa:
        raise NotImplementedError("scaled_dot_product_attention: enable_gqa is not supported")
    if query.ndim < 2 or key.ndim < 2 or value.ndim < 2 or query.shape[-1] != key.shape[-1] \
            or key.shape[-2] != value.shape[-2]:
        raise OpError(f"scaled_dot_product_attention: expected query (..., L, E), key "
                      f"(..., S, E) and value (..., S, Ev), got shapes {fmt(query.shape)}, "
                      f"{fmt(key.shape)} and {fmt(value.shape)}")
    op = "scaled_dot_product_attention"
    L, S = query.shape[-2], key.shape[-2]
    bias = _attention_bias(op, attn_mask, is_causal, L, S, query)
    scores = _broadcast_shapes(op, query.shape[:-2], key.shape[:-2]) + (L, S)
    if bias is not None and _broadcast_shapes(op, bias.shape, scores) != scores:
        raise OpError(f"{op}: attn_mask of shape {fmt(bias.shape)} must broadcast to the "
                      f"scores' shape {fmt(scores)} (..., L, S)")
    scale = 1.0 / float(query.shape[-1]) ** 0.5 if scale is None else float(scale)
    return _attend(query, key, value, bias, float(dropout_p), scale, True, safe=True)[0]


def _padding_bias(op: str, mask: Tensor | None, like: Tensor, name: str) -> Tensor | None:
    """``MultiheadAttention``'s masks as an additive bias: bool True (masked out) -> -inf."""
    if mask is None:
        return None
    if mask.dtype is _dtypes.bool_:
        return CF.where(mask, float("-inf"), 0.0).to(like.dtype)
    if mask.dtype is not like.dtype:
        raise OpError(f"{op}: expected {name} to be bool or {like.dtype} (the query's dtype), "
                      f"got {mask.dtype}")
    return mask


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(N, L, E) -> (N, H, L, E/H)."""
    n, length, e = x.shape
    return CF.transpose(CF.reshape(x, [n, length, num_heads, e // num_heads]), 1, 2)


def _mha_bias(op: str, attn_mask, key_padding_mask, like: Tensor, n: int, h: int, L: int,
              S: int) -> Tensor | None:
    """The sum of ``attn_mask`` ((L, S) or (N*H, L, S)) and ``key_padding_mask`` ((N, S)) as
    one bias broadcasting to (N, H, L, S)."""
    bias = _padding_bias(op, attn_mask, like, "attn_mask")
    if bias is not None:
        if tuple(bias.shape) not in ((L, S), (n * h, L, S)):
            raise OpError(f"{op}: attn_mask of shape {fmt(bias.shape)} must be ({L}, {S}) or "
                          f"({n * h}, {L}, {S}) (batch * num_heads, target, source)")
        bias = CF.reshape(bias, [n, h, L, S]) if bias.ndim == 3 else bias
    pad = _padding_bias(op, key_padding_mask, like, "key_padding_mask")
    if pad is not None:
        if tuple(pad.shape) != (n, S):
            raise OpError(f"{op}: key_padding_mask of shape {fmt(pad.shape)} must be "
                          f"({n}, {S}) (batch, source)")
        pad = CF.reshape(pad, [n, 1, 1, S])
        bias = pad if bias is None else bias + pad
    return bias


def multi_head_attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int,
                         in_proj_weight: Tensor | tuple, in_proj_bias: Tensor | None,
                         out_proj_weight: Tensor, out_proj_bias: Tensor | None, *,
                         dropout_p: float = 0.0, training: bool = True,
                         key_padding_mask: Tensor | None = None, need_weights: bool = True,
                         attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                         batch_first: bool = False) -> tuple[Tensor, Tensor | None]:
    """``MultiheadAttention``'s computation (torch's ``multi_head_attention_forward``):
    inputs (L, N, E) ((N, L, E) with ``batch_first``, (L, E) unbatched); bool masks are
    True where attention is not allowed. ``in_proj_weight``: (3E, E), or the three
    projections (E, E), (E, kdim), (E, vdim). Returns the output and, with ``need_weights``,
    the attention weights (N, L, S), or (N, H, L, S) without ``average_attn_weights``."""
    op = "multi_head_attention"
    if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
        raise OpError(f"{op}: expected query, key and value of 3 dims (or 2, unbatched), got "
                      f"shapes {fmt(query.shape)}, {fmt(key.shape)}, {fmt(value.shape)}")
    batched = query.ndim == 3
    if not batched:
        query, key, value = (CF.unsqueeze(t, 0) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = CF.unsqueeze(key_padding_mask, 0)
    elif not batch_first:
        query, key, value = (CF.transpose(t, 0, 1) for t in (query, key, value))
    n, L, e = query.shape
    S = key.shape[1]
    w = tuple(in_proj_weight) if isinstance(in_proj_weight, (tuple, list)) \
        else CF.chunk(in_proj_weight, 3)
    kdim, vdim = w[1].shape[1], w[2].shape[1]
    if e % num_heads or key.shape[-1] != kdim or value.shape[-1] != vdim \
            or value.shape[1] != S or w[0].shape[1] != e:
        raise OpError(f"{op}: expected query (N, L, {w[0].shape[1]}), key (N, S, {kdim}) and "
                      f"value (N, S, {vdim}) (batch first), embed_dim divisible by num_heads "
                      f"{num_heads}; got shapes {fmt(query.shape)}, {fmt(key.shape)}, "
                      f"{fmt(value.shape)}")
    b = CF.chunk(in_proj_bias, 3) if in_proj_bias is not None else (None,) * 3
    q, k, v = (_heads(linear(x, wi, bi), num_heads)
               for x, wi, bi in zip((query, key, value), w, b))
    bias = _mha_bias(op, attn_mask, key_padding_mask, q, n, num_heads, L, S)
    out, weights = _attend(q, k, v, bias, dropout_p if training else 0.0,
                           (e // num_heads) ** -0.5, training, safe=not need_weights)
    out = linear(CF.reshape(CF.transpose(out, 1, 2), [n, L, e]), out_proj_weight,
                 out_proj_bias)
    if not batched:
        out = CF.squeeze(out, 0)
    elif not batch_first:
        out = CF.transpose(out, 0, 1)
    if not need_weights:
        return out, None
    weights = CF.mean(weights, 1) if average_attn_weights else weights
    return out, (weights if batched else CF.squeeze(weights, 0))
