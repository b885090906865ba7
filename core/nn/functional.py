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

import math
import numbers
import warnings
from typing import Sequence

import numpy as np

from .. import functional as CF
from ..autograd import no_grad
from ..factories import tensor
from ..functional import gelu, sigmoid, softplus, tanh  # noqa: F401  (re-exported)
from ..ops.nn import check_nll_shapes
from ..random import Generator, rng
from ..registry import REGISTRY, OpError, fmt, norm_dim
from ..tensor import Tensor

__all__ = [
    "relu",
    "gelu",
    "tanh",
    "sigmoid",
    "leaky_relu",
    "softplus",
    "softmax",
    "log_softmax",
    "linear",
    "dropout",
    "layer_norm",
    "embedding",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "nll_loss",
    "cross_entropy",
    "mse_loss",
    "binary_cross_entropy_with_logits",
]
__all__ += ["scaled_dot_product_attention", "multi_head_attention"]
__all__ += ["dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"]

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
    if dim is None:  # torch's legacy implicit choice, with its warning
        warnings.warn(
            f"Implicit dimension choice for {name} has been deprecated. Change the "
            f"call to include dim=X as an argument.",
            stacklevel=3,
        )
        return 0 if ndim in (0, 1, 3) else 1
    return int(dim)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> Tensor:
    """exp(input) / exp(input).sum(dim), computed without overflow."""
    return CF.softmax(input, _softmax_dim("softmax", dim, input.ndim), dtype=dtype)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> Tensor:
    """input - logsumexp(input, dim), computed without overflow."""
    return CF.log_softmax(input, _softmax_dim("log_softmax", dim, input.ndim), dtype=dtype)


# ========================================================================= linear ======


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``input @ weight.T + bias`` for input (*, in_features), weight (out, in)."""
    if weight.ndim != 2 or input.ndim == 0 or input.shape[-1] != weight.shape[1]:
        raise OpError(
            f"linear: input of shape {fmt(input.shape)} does not match weight of "
            f"shape {fmt(weight.shape)}; expected input (*, {weight.shape[-1]}) and "
            f"weight (out_features, in_features)"
        )
    if bias is not None and bias.ndim == 1 and input.ndim >= 1:
        return REGISTRY["linear"](input, weight, bias)
    out = CF.matmul(input, weight.T)
    return out if bias is None else out + bias


# ======================================================================== dropout ======


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: Generator | None = None,
) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p).

    The mask is a pure function of a seed drawn from ``generator`` (default: the global
    one, see ``gradmesh.core.manual_seed``), so a seeded run gives the same masks on every
    backend. In eval mode (``training=False``) it returns ``input`` unchanged.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    return input * _dropout_mask(input, p, generator)


def _dropout_mask(like: Tensor, p: float, generator: Generator | None) -> Tensor:
    """0 or 1/(1-p), shaped like ``like``: the ``dropout_mask`` op of a seed drawn from
    ``generator``, so that a traced graph draws it again from its own seed."""
    seed = int(rng(generator).integers(0, 2**63 - 1))
    return REGISTRY["dropout_mask"](like, p=float(p), seed=seed)


# ---- channel and alpha dropout
# torch's order: p == 0, eval mode or an empty input return the input; p == 1 multiplies by
# zero; only then is a channel mask drawn, and only that needs 2 dims or more.

# SELU's scale * alpha: alpha dropout sets dropped elements to SELU's negative saturation
_SELU_SATURATION = 1.7580993408473766


def _check_dropout_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _channel_mask(input: Tensor, p: float, generator: Generator | None) -> Tensor:
    """A dropout mask of shape (N, C, 1, ...): one draw per sample and channel, broadcast
    over the rest (drawn like ``input`` narrowed to size 1 past dim 1)."""
    if input.ndim < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    channels = input
    for dim in range(2, input.ndim):
        channels = CF.narrow(channels, dim, 0, 1)
    return _dropout_mask(channels, p, generator)


def _masked(input, p, train, generator, mask_fn, alpha: bool) -> Tensor:
    """Dropout of ``input`` with the mask ``mask_fn(input, p, generator)``; ``alpha``: keep
    SELU's mean and variance (dropped elements at its saturation, then an affine map)."""
    _check_dropout_probability(p)
    if not train or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0:
        return input * 0.0
    mask = mask_fn(input, p, generator)
    if not alpha:
        return input * mask
    # torch's a * (x * keep + alpha' * (keep - 1)) + alpha' * a * p, with keep = mask * (1-p)
    # and a = 1/sqrt((alpha'^2 p + 1)(1 - p)), folded into two scalars.
    c = math.sqrt((1.0 - p) / (_SELU_SATURATION**2 * p + 1.0))
    return (input + _SELU_SATURATION) * (mask * c) - _SELU_SATURATION * c


def feature_dropout(
    input: Tensor, p: float = 0.5, train: bool = True, generator: Generator | None = None
) -> Tensor:
    """``torch.feature_dropout``: zero whole channels (``input[n, c]``) with probability
    ``p`` and scale the rest by 1/(1-p); ``input`` is (N, C, *)."""
    return _masked(input, p, train, generator, _channel_mask, alpha=False)


def _unbatched_channel_dropout(input, p, training, generator, batched: bool) -> Tensor:
    if batched:
        return feature_dropout(input, p, training, generator)
    return CF.squeeze(feature_dropout(CF.unsqueeze(input, 0), p, training, generator), 0)


def dropout1d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: Generator | None = None,
) -> Tensor:
    """Zero whole channels of (N, C, L) or unbatched (C, L) input with probability ``p``,
    scale the rest by 1/(1-p). The mask is seeded as ``dropout``'s; ``inplace`` is accepted
    for torch compatibility, the result is new."""
    _check_dropout_probability(p)
    if input.ndim not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {input.ndim}D input. Note "
            "that dropout1d exists to provide channel-wise dropout on inputs with 1 spatial "
            "dimension, a channel dimension, and an optional batch dimension (i.e. 2D or 3D "
            "inputs)."
        )
    return _unbatched_channel_dropout(input, p, training, generator, input.ndim == 3)


def _warn_channel_ndim(name: str, spatial: int, ndim: int) -> None:
    if ndim not in (spatial + 1, spatial + 2):
        warnings.warn(
            f"{name}: Received a {ndim}-D input to {name}, which is deprecated and will "
            "result in an error in a future release. To retain the behavior and silence "
            f"this warning, please use dropout instead. Note that {name} exists to provide "
            f"channel-wise dropout on inputs with {spatial} spatial dimensions, a channel "
            "dimension, and an optional batch dimension (i.e. "
            f"{spatial + 1}D or {spatial + 2}D inputs).",
            stacklevel=3,
        )


def dropout2d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: Generator | None = None,
) -> Tensor:
    """Zero whole channels of (N, C, H, W) input with probability ``p``, scale the rest by
    1/(1-p). As torch's, a 3-D input is (N, C, L) (with a warning), not unbatched."""
    _check_dropout_probability(p)
    _warn_channel_ndim("dropout2d", 2, input.ndim)
    if input.ndim == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D "
            "dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret "
            "the input as one without a batch dimension, i.e. shape (C, H, W). To maintain "
            "the 1D channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    return feature_dropout(input, p, training, generator)


def dropout3d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: Generator | None = None,
) -> Tensor:
    """Zero whole channels of (N, C, D, H, W) or unbatched (C, D, H, W) input with
    probability ``p``, scale the rest by 1/(1-p)."""
    _check_dropout_probability(p)
    _warn_channel_ndim("dropout3d", 3, input.ndim)
    return _unbatched_channel_dropout(input, p, training, generator, input.ndim == 5)


def alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    generator: Generator | None = None,
) -> Tensor:
    """Dropout for SELU networks: dropped elements take SELU's negative saturation, then an
    affine map keeps zero mean and unit variance. Off by default (``training=False``), as
    torch's."""
    return _masked(input, p, training, generator, _dropout_mask, alpha=True)


def feature_alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    generator: Generator | None = None,
) -> Tensor:
    """``alpha_dropout`` of whole channels (``input[n, c]``) of (N, C, *) input."""
    return _masked(input, p, training, generator, _channel_mask, alpha=True)


# ================================================================== normalisation ======


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Normalise over the trailing ``normalized_shape`` dims, then scale and shift."""
    shape = (
        [int(normalized_shape)]
        if isinstance(normalized_shape, (int, numbers.Integral))
        else [int(s) for s in normalized_shape]
    )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != tuple(shape):
            raise OpError(
                f"layer_norm: {name} of shape {fmt(t.shape)} must have the "
                f"normalized_shape {fmt(shape)}"
            )
    out = REGISTRY["layer_norm"](input, normalized_shape=shape, eps=float(eps))
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


# ====================================================================== embedding ======


def embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    """Rows of ``weight`` picked by the integer ``input``; shape ``input.shape + (dim,)``.

    Repeated indices add up in the weight's gradient; the ``padding_idx`` row gets none.
    """
    if max_norm is not None or scale_grad_by_freq or sparse:
        raise NotImplementedError(
            "embedding: max_norm, scale_grad_by_freq and sparse are not "
            "supported; renormalise the weight yourself"
        )
    if padding_idx is not None:
        num = weight.shape[0]
        if not -num <= padding_idx < num:
            raise OpError(
                f"embedding: padding_idx {padding_idx} must be within the "
                f"{num} rows of weight {fmt(weight.shape)}"
            )
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
        raise OpError(
            f"{op}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape "
            f"{fmt(input.shape)}"
        )
    return input, False


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> Tensor:
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
    out = REGISTRY["conv2d"](
        x, weight, stride=stride, padding=padding, dilation=dilation, groups=int(groups)
    )
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise OpError(
                f"conv2d: bias of shape {fmt(bias.shape)} must have one entry per "
                f"output channel, shape {fmt((weight.shape[0],))}"
            )
        out = out + CF.reshape(bias, (1, -1, 1, 1))
    return CF.reshape(out, out.shape[1:]) if unbatched else out


def _string_padding(padding: str, weight: Tensor, stride, dilation) -> list:
    if padding == "valid":
        return [0, 0]
    if padding != "same":
        raise OpError(f"conv2d: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    if stride != [1, 1]:
        raise OpError("conv2d: padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if any(t % 2 for t in total):
        raise NotImplementedError(
            f"conv2d: padding='same' needs uneven padding for kernel "
            f"{tuple(weight.shape[2:])} and dilation {dilation}; pad the "
            f"input explicitly"
        )
    return [t // 2 for t in total]


# ======================================================================== pooling ======


def max_pool2d(
    input: Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor:
    """Maximum over sliding windows; the gradient goes to each window's first maximum."""
    if return_indices:
        raise NotImplementedError("max_pool2d: return_indices is not supported")
    kernel = _pair("max_pool2d", "kernel_size", kernel_size)
    stride = kernel if stride is None or stride == [] else _pair("max_pool2d", "stride", stride)
    x, unbatched = _batched("max_pool2d", input)
    out = REGISTRY["max_pool2d"](
        x,
        kernel_size=kernel,
        stride=stride,
        padding=_pair("max_pool2d", "padding", padding),
        dilation=_pair("max_pool2d", "dilation", dilation),
        ceil_mode=bool(ceil_mode),
    )
    return CF.reshape(out, out.shape[1:]) if unbatched else out


def avg_pool2d(
    input: Tensor,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Tensor:
    """Mean over sliding windows; ``count_include_pad`` counts the zero padding."""
    if divisor_override is not None:
        raise NotImplementedError(
            "avg_pool2d: divisor_override is not supported; use "
            "avg_pool2d(..., count_include_pad=True) * kernel_area / d"
        )
    kernel = _pair("avg_pool2d", "kernel_size", kernel_size)
    stride = kernel if stride is None or stride == [] else _pair("avg_pool2d", "stride", stride)
    x, unbatched = _batched("avg_pool2d", input)
    out = REGISTRY["avg_pool2d"](
        x,
        kernel_size=kernel,
        stride=stride,
        padding=_pair("avg_pool2d", "padding", padding),
        ceil_mode=bool(ceil_mode),
        count_include_pad=bool(count_include_pad),
    )
    return CF.reshape(out, out.shape[1:]) if unbatched else out


# ========================================================================= losses ======


def _reduction(size_average, reduce, reduction: str, op: str | None = None) -> str:
    """torch's legacy size_average/reduce flags, mapped to ``reduction``; with ``op``, the
    result checked to be one of 'none', 'mean' and 'sum' (the error names ``op``)."""
    if size_average is not None or reduce is not None:
        warnings.warn("size_average and reduce are deprecated; use reduction=", stacklevel=3)
        reduction = "none" if reduce is False else "sum" if size_average is False else "mean"
    if op is not None:
        _check_reduction(op, reduction)
    return reduction


def _reduce(loss: Tensor, reduction: str, denominator=None) -> Tensor:
    if reduction == "none":
        return loss
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be one of ('none', 'mean', 'sum'), got {reduction!r}")
    total = CF.sum(loss)
    if reduction == "sum":
        return total
    return total / (loss.numel() if denominator is None else denominator)


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """Negative log-likelihood of class indices ``target`` (N,) or (N, d1, ...) under
    log-probabilities ``input`` (N, C) or (N, C, d1, ...)."""
    reduction = _reduction(size_average, reduce, reduction)
    attrs = dict(ignore_index=int(ignore_index), reduction=reduction)
    if weight is None:
        return _nll_p(input, target, **attrs)
    return _nll_weighted_p(input, target, weight, **attrs)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross entropy between logits ``input`` (N, C, ...) and ``target``: class indices
    (N, ...) or class probabilities shaped like ``input``.

    With class indices it is ``log_softmax`` then one ``nll_loss`` op, which also carries
    the label-smoothing term.
    """
    reduction = _reduction(size_average, reduce, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"cross_entropy: label_smoothing must be in [0.0, 1.0], got {label_smoothing}"
        )
    if input.ndim == 0:
        raise OpError("cross_entropy: expected logits of shape (N, C) or (C,), got a 0-d tensor")
    class_dim = 0 if input.ndim == 1 else 1
    if target.dtype.is_floating_point and tuple(target.shape) == tuple(input.shape):
        return _cross_entropy_probs(input, target, weight, reduction, label_smoothing, class_dim)
    check_nll_shapes("cross_entropy", input, target, weight)
    logp = log_softmax(input, class_dim)
    attrs = dict(
        ignore_index=int(ignore_index), reduction=reduction, label_smoothing=float(label_smoothing)
    )
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
            raise OpError(
                f"cross_entropy: expected a class weight of shape {fmt((classes,))} "
                f"for an input of shape {fmt(input.shape)}, got {fmt(weight.shape)}"
            )
        terms = terms * CF.reshape(weight, (classes,) + (1,) * (input.ndim - class_dim - 1))
    loss = -CF.sum(terms, dim=class_dim)
    return _reduce(loss, reduction, input.numel() // classes if classes else 0)


def _check_same_shape(op: str, input: Tensor, target: Tensor) -> None:
    if tuple(target.shape) != tuple(input.shape):
        raise OpError(
            f"{op}: target of shape {fmt(target.shape)} must have the same shape as "
            f"the input {fmt(input.shape)}; reshape one of them"
        )


def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Mean squared error. Shapes must match (torch would broadcast with a warning)."""
    reduction = _reduction(size_average, reduce, reduction)
    _check_same_shape("mse_loss", input, target)
    if weight is None:
        return REGISTRY["mse_loss"](input, target, reduction=reduction)
    _check_same_shape("mse_loss", input, weight)
    loss = REGISTRY["mse_loss"](input, target, reduction="none") * weight
    return _reduce(loss, reduction, CF.sum(weight) if reduction == "mean" else None)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
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


# ================================================= more losses, and distances ======
# L1, smooth L1 and Huber, BCE, KL divergence, the margin and embedding losses, Poisson and
# Gaussian NLL, normalize, cosine similarity, pairwise distance and one_hot: compositions
# of existing ops, but for the ``binary_cross_entropy`` primitive (gradmesh.core.ops.loss),
# written as torch 2.13 computes them so that values and gradients (kinks included) match.

from ..dtypes import int64 as _int64  # noqa: E402
from ..factories import arange as _arange  # noqa: E402
from ..factories import ones_like as _ones_like  # noqa: E402
from ..registry import broadcast_shapes as _shapes_broadcast  # noqa: E402

__all__ += [
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "binary_cross_entropy",
    "kl_div",
    "normalize",
    "cosine_similarity",
    "pairwise_distance",
    "one_hot",
    "margin_ranking_loss",
    "hinge_embedding_loss",
    "soft_margin_loss",
    "cosine_embedding_loss",
    "triplet_margin_loss",
    "poisson_nll_loss",
    "gaussian_nll_loss",
    "multilabel_soft_margin_loss",
    "multi_margin_loss",
]

_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(op: str, reduction: str, extra: tuple = ()) -> None:
    if reduction not in _REDUCTIONS + extra:
        raise ValueError(
            f"{op}: {reduction!r} is not a valid value for reduction; use one of "
            f"{_REDUCTIONS + extra}"
        )


def _warn_if_broadcast(input: Tensor, target: Tensor) -> None:
    """torch broadcasts a target of another shape in the regression losses, with a warning."""
    if tuple(target.shape) != tuple(input.shape):
        warnings.warn(
            f"Using a target size ({fmt(target.shape)}) that is different to the input size "
            f"({fmt(input.shape)}). This will likely lead to incorrect results due to "
            f"broadcasting. Please ensure they have the same size.",
            stacklevel=3,
        )


def _check_weight_shape(op: str, weight: Tensor, input: Tensor) -> None:
    if tuple(weight.shape) != tuple(input.shape):
        raise ValueError(
            f"{op}: weight of shape {fmt(weight.shape)} and input of shape "
            f"{fmt(input.shape)} must have the same size"
        )


def _value_clamped(t: Tensor, eps: float) -> Tensor:
    """``clamp(t, min=eps)``'s value with ``t``'s own gradient: torch clamps some
    denominators in place under ``no_grad`` (cosine_similarity's norms, gaussian_nll_loss's
    var), which autograd does not see. ``t - t.detach()`` is exactly 0."""
    return (t - t.detach()) + CF.clamp(t.detach(), min=eps)


def _vector_norm(x: Tensor, p: float, dim, keepdim: bool = False) -> Tensor:
    """``torch.linalg.vector_norm(x, p, dim, keepdim)``, with its gradient 0 at a zero
    vector (where differentiating ``sum(|x|^p)^(1/p)`` gives 0 * inf = nan)."""
    if p == math.inf:
        return CF.amax(CF.abs(x), dim=dim, keepdim=keepdim)
    if p == -math.inf:
        return CF.amin(CF.abs(x), dim=dim, keepdim=keepdim)
    if p == 1:
        return CF.sum(CF.abs(x), dim=dim, keepdim=keepdim)
    if p == 0:
        return CF.sum(CF.ne(x, 0), dim=dim, keepdim=keepdim).to(x.dtype)
    total = CF.sum(x * x if p == 2 else CF.pow(CF.abs(x), float(p)), dim=dim, keepdim=keepdim)
    nonzero = total > 0
    safe = CF.where(nonzero, total, 1.0)
    root = CF.sqrt(safe) if p == 2 else CF.pow(safe, 1.0 / p)
    return CF.where(nonzero, root, 0.0)


def _require_float(op: str, *tensors: Tensor) -> None:
    if not all(t.dtype.is_floating_point for t in tensors):
        raise OpError(
            f"{op}: expected floating point inputs, got "
            f"{', '.join(str(t.dtype) for t in tensors)}; convert them with .float()"
        )


def l1_loss(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Mean (or summed) absolute error; its gradient at ``input == target`` is 0, as torch's.
    With ``weight`` (input's shape), 'mean' divides by the sum of the weights."""
    _warn_if_broadcast(input, target)
    reduction = _reduction(size_average, reduce, reduction)
    loss = CF.abs(input - target)
    if weight is None:
        return _reduce(loss, reduction)
    _check_weight_shape("l1_loss", weight, input)
    return _reduce(loss * weight, reduction, CF.sum(weight) if reduction == "mean" else None)


def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    beta: float = 1.0,
) -> Tensor:
    """``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta`` (``d = input -
    target``); ``beta=0`` is ``l1_loss``. At ``|d| == beta`` the gradient is ``sign(d)``."""
    _warn_if_broadcast(input, target)
    reduction = _reduction(size_average, reduce, reduction)
    if beta < 0:
        raise OpError(
            f"smooth_l1_loss: does not support negative values for beta, got beta={beta}",
            "beta",
        )
    diff = input - target
    z = CF.abs(diff)
    if beta == 0:
        return _reduce(z, reduction)
    return _reduce(CF.where(z < beta, 0.5 * diff * diff / beta, z - 0.5 * beta), reduction)


def huber_loss(
    input: Tensor,
    target: Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """``0.5 * d**2`` where ``|d| < delta``, else ``delta * (|d| - 0.5 * delta)``. With
    ``weight`` (input's shape) each term is scaled; 'mean' stays the mean, as in torch."""
    _warn_if_broadcast(input, target)
    if delta <= 0:
        raise OpError(
            f"huber_loss: does not support non-positive values for delta, got delta={delta}",
            "delta",
        )
    diff = input - target
    z = CF.abs(diff)
    loss = CF.where(z < delta, 0.5 * diff * diff, delta * (z - 0.5 * delta))
    if weight is not None:
        _check_weight_shape("huber_loss", weight, input)
        loss = loss * weight
    return _reduce(loss, reduction)


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """Binary cross entropy of probabilities ``input`` in [0, 1]: each log clamped to
    >= -100 as in torch, so that 0 and 1 give finite losses and gradients. ``weight``
    broadcasts to the target's shape."""
    reduction = _reduction(size_average, reduce, reduction, "binary_cross_entropy")
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"binary_cross_entropy: Using a target size ({fmt(target.shape)}) that is "
            f"different to the input size ({fmt(input.shape)}) is deprecated. Please ensure "
            f"they have the same size."
        )
    loss = REGISTRY["binary_cross_entropy"](input, target)
    if weight is not None:
        shape = _shapes_broadcast("binary_cross_entropy", target.shape, weight.shape)
        if shape != tuple(target.shape):
            raise OpError(
                f"binary_cross_entropy: weight of shape {fmt(weight.shape)} must broadcast "
                f"to the target's shape {fmt(target.shape)}"
            )
        loss = loss * weight
    return _reduce(loss, reduction)


_KL_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def kl_div(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    log_target: bool = False,
) -> Tensor:
    """KL divergence of ``target`` from log-probabilities ``input``: ``target * (log(target)
    - input)`` (0 where target is 0), or ``exp(target) * (target - input)`` with
    ``log_target``. 'batchmean' divides the sum by the batch size (dim 0), 'mean' (with
    torch's warning) by the number of elements."""
    if size_average is not None or reduce is not None:
        reduction = _reduction(size_average, reduce, reduction)
    elif reduction == "mean":
        warnings.warn(_KL_MEAN_WARNING, stacklevel=2)
    _check_reduction("kl_div", reduction, ("batchmean",))
    if log_target:
        loss = CF.exp(target) * (target - input)
    else:  # torch's xlogy(target, target): 0 where target is 0
        loss = CF.where(target == 0, 0.0, target * CF.log(target)) - target * input
    if reduction != "batchmean":
        return _reduce(loss, reduction)
    total = CF.sum(loss)
    return total / input.shape[0] if input.ndim else total


def normalize(
    input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: Tensor | None = None
) -> Tensor:
    """``input / max(||input||_p, eps)`` along ``dim``."""
    if out is not None:
        raise NotImplementedError("normalize: out= is not supported; use the result")
    _require_float("normalize", input)
    return input / CF.clamp(_vector_norm(input, p, dim, keepdim=True), min=eps)


def cosine_similarity(x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """Cosine of the angle between ``x1`` and ``x2`` (broadcast) along ``dim``, as torch
    computes it: each input divided by its own norm, both norms clamped to >= ``eps`` in
    value only (torch clamps them under ``no_grad``, so the gradient is the unclamped one)."""
    if not (x1.dtype.is_floating_point or x2.dtype.is_floating_point):
        raise OpError(
            f"cosine_similarity: expected common dtype to be floating point, yet common "
            f"dtype is {x1.dtype} and {x2.dtype}"
        )
    if not x1.dtype.is_floating_point:  # an integer input computes in the other's dtype
        x1 = x1.to(x2.dtype)
    elif not x2.dtype.is_floating_point:
        x2 = x2.to(x1.dtype)
    shape = _shapes_broadcast("cosine_similarity", x1.shape, x2.shape)
    x1, x2 = CF.expand(x1, *shape), CF.expand(x2, *shape)
    n1 = _value_clamped(_vector_norm(x1, 2, dim, keepdim=True), eps)
    n2 = _value_clamped(_vector_norm(x2, 2, dim, keepdim=True), eps)
    return CF.sum((x1 / n1) * (x2 / n2), dim=dim)


def pairwise_distance(
    x1: Tensor, x2: Tensor, p: float = 2.0, eps: float = 1e-6, keepdim: bool = False
) -> Tensor:
    """The p-norm of ``x1 - x2 + eps`` over the last dim (of the broadcast shape)."""
    diff = x1 - x2 + eps
    return _vector_norm(diff, p, -1 if diff.ndim else None, keepdim)


def one_hot(tensor: Tensor, num_classes: int = -1) -> Tensor:
    """int64 ``tensor.shape + (num_classes,)``, 1 at each class index; ``num_classes=-1``
    takes ``tensor.max() + 1``. Reads the values to check them, as torch does on the CPU."""
    if tensor.dtype is not _int64:
        raise OpError(
            f"one_hot: is only applicable to index tensor of type LongTensor (int64), got "
            f"{tensor.dtype}; convert it with .long()"
        )
    num_classes = int(num_classes)
    if tensor.numel() == 0:
        if num_classes <= 0:
            raise OpError("one_hot: Can not infer total number of classes from empty tensor.")
    else:
        if CF.amin(tensor).item() < 0:
            raise OpError("one_hot: Class values must be non-negative.")
        largest = CF.amax(tensor).item()
        if num_classes == -1:
            num_classes = largest + 1
        elif num_classes <= largest:
            raise OpError(
                f"one_hot: Class values must be smaller than num_classes ({num_classes}), "
                f"got {largest}"
            )
    classes = _arange(num_classes, dtype=_int64, device=tensor.device)
    return (CF.unsqueeze(tensor, -1) == classes).to(_int64)


def margin_ranking_loss(
    input1: Tensor,
    input2: Tensor,
    target: Tensor,
    margin: float = 0,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """``max(0, -target * (input1 - input2) + margin)``; the gradient passes at 0, as
    through torch's clamp_min."""
    reduction = _reduction(size_average, reduce, reduction, "margin_ranking_loss")
    if not input1.ndim == input2.ndim == target.ndim:
        raise OpError(
            f"margin_ranking_loss: All input tensors should have same dimension but got "
            f"sizes: input1: {fmt(input1.shape)}, input2: {fmt(input2.shape)}, target: "
            f"{fmt(target.shape)}"
        )
    return _reduce(CF.clamp(-target * (input1 - input2) + margin, min=0.0), reduction)


def hinge_embedding_loss(
    input: Tensor,
    target: Tensor,
    margin: float = 1.0,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """``input`` where target is 1, ``max(0, margin - input)`` where it is -1 (other target
    values count both terms, as in torch)."""
    reduction = _reduction(size_average, reduce, reduction, "hinge_embedding_loss")
    hinge = CF.where(target != 1, CF.clamp(margin - input, min=0.0), 0.0)
    return _reduce(hinge + CF.where(target != -1, input, 0.0), reduction)


def soft_margin_loss(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """``log(1 + exp(-target * input))``, computed as torch's kernel does (it overflows to
    inf for ``-target * input`` above about 88 in float32, as torch's)."""
    reduction = _reduction(size_average, reduce, reduction, "soft_margin_loss")
    # torch's kernel has no gradient for the target (it refuses one that requires grad).
    return _reduce(CF.log1p(CF.exp(-input * target.detach())), reduction)


_COSINE_EMBEDDING_EPS = 1e-12  # torch adds it to each squared magnitude


def cosine_embedding_loss(
    input1: Tensor,
    input2: Tensor,
    target: Tensor,
    margin: float = 0,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """``1 - cos(input1, input2)`` where target is 1, ``max(0, cos - margin)`` where it is
    -1; inputs (N, D) with target (N,), or (D,) with a 0-d target."""
    reduction = _reduction(size_average, reduce, reduction, "cosine_embedding_loss")
    dim = target.ndim
    if dim > 1:
        raise OpError(
            "cosine_embedding_loss: 0D or 1D target tensor expected, multi-target not supported"
        )
    if input1.ndim != dim + 1 or input2.ndim != dim + 1:
        raise OpError(
            f"cosine_embedding_loss: {dim}D target tensor expects {dim + 1}D input tensors, "
            f"but found inputs with sizes {fmt(input1.shape)} and {fmt(input2.shape)}"
        )
    dot = CF.sum(input1 * input2, dim=dim)
    square1 = CF.sum(input1 * input1, dim=dim) + _COSINE_EMBEDDING_EPS
    square2 = CF.sum(input2 * input2, dim=dim) + _COSINE_EMBEDDING_EPS
    cos = dot / CF.sqrt(square1 * square2)
    positive = CF.where(target == 1, 1 - cos, 0.0)
    negative = CF.where(target == -1, CF.clamp(cos - margin, min=0.0), 0.0)
    return _reduce(positive + negative, reduction)


def triplet_margin_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    margin: float = 1.0,
    p: float = 2,
    eps: float = 1e-6,
    swap: bool = False,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """``max(0, margin + d(anchor, positive) - d(anchor, negative))`` with ``d`` the
    ``pairwise_distance``; ``swap`` uses ``d(positive, negative)`` where it is smaller."""
    reduction = _reduction(size_average, reduce, reduction, "triplet_margin_loss")
    if margin <= 0:
        raise ValueError(f"triplet_margin_loss: margin must be greater than 0, got {margin}")
    if not anchor.ndim == positive.ndim == negative.ndim:
        raise OpError(
            f"triplet_margin_loss: The anchor, positive, and negative tensors are expected "
            f"to have the same number of dimensions, but got: anchor {anchor.ndim}D, "
            f"positive {positive.ndim}D, and negative {negative.ndim}D inputs"
        )
    to_positive = pairwise_distance(anchor, positive, p, eps)
    to_negative = pairwise_distance(anchor, negative, p, eps)
    if swap:
        to_negative = CF.minimum(to_negative, pairwise_distance(positive, negative, p, eps))
    return _reduce(CF.clamp(margin + to_positive - to_negative, min=0.0), reduction)


def poisson_nll_loss(
    input: Tensor,
    target: Tensor,
    log_input: bool = True,
    full: bool = False,
    size_average=None,
    eps: float = 1e-8,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """Poisson negative log-likelihood: ``exp(input) - target * input`` (``log_input``), or
    ``input - target * log(input + eps)``; ``full`` adds Stirling's term where target > 1."""
    reduction = _reduction(size_average, reduce, reduction, "poisson_nll_loss")
    if log_input:
        loss = CF.exp(input) - target * input
    else:
        loss = input - target * CF.log(input + eps)
    if full:
        stirling = target * CF.log(target) - target + 0.5 * CF.log(2 * math.pi * target)
        loss = loss + CF.masked_fill(stirling, target <= 1, 0.0)
    return _reduce(loss, reduction)


def _gaussian_var(input: Tensor, var) -> Tensor:
    """``var`` checked as torch checks it, and shaped to broadcast against ``input``."""
    if isinstance(var, numbers.Real):
        if var < 0:
            raise ValueError("gaussian_nll_loss: var has negative entry/entries")
        return var * _ones_like(input)
    if CF.any(var < 0).item():
        raise ValueError("gaussian_nll_loss: var has negative entry/entries")
    if tuple(var.shape) == tuple(input.shape):
        return var
    if tuple(input.shape[:-1]) == tuple(var.shape):  # one variance per sample
        return CF.unsqueeze(var, -1)
    mismatched = [v for i, v in zip(input.shape, var.shape) if i != v]
    if input.ndim == var.ndim and sum(mismatched) == 1:  # one dim of size 1 broadcasts
        return var
    raise ValueError(
        f"gaussian_nll_loss: var is of incorrect size: {fmt(var.shape)} for an input of "
        f"shape {fmt(input.shape)}"
    )


def gaussian_nll_loss(
    input: Tensor,
    target: Tensor,
    var,
    full: bool = False,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> Tensor:
    """Gaussian negative log-likelihood ``0.5 * (log(var) + (input - target)**2 / var)``
    (+ ``0.5 * log(2 pi)`` with ``full``). ``var`` (a Tensor, or a float) is clamped to
    >= ``eps`` in value only, as torch clamps it under ``no_grad``."""
    var = _gaussian_var(input, var)
    _check_reduction("gaussian_nll_loss", reduction)
    var = _value_clamped(var, eps)
    loss = 0.5 * (CF.log(var) + (input - target) ** 2 / var)
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return _reduce(loss, reduction)


def _log_sigmoid(x: Tensor) -> Tensor:
    """log(sigmoid(x)) = -softplus(-x), with no linear cut-off (torch's log_sigmoid)."""
    return -CF.softplus(-x, threshold=math.inf)


def multilabel_soft_margin_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """Binary cross entropy on logits per class (target 0 or 1), averaged over the classes
    (the last dim); ``weight`` scales each class."""
    reduction = _reduction(size_average, reduce, reduction, "multilabel_soft_margin_loss")
    loss = -(target * _log_sigmoid(input) + (1 - target) * _log_sigmoid(-input))
    if weight is not None:
        loss = loss * weight
    return _reduce(CF.sum(loss, dim=input.ndim - 1) / input.shape[-1], reduction)


def _check_multi_margin(input: Tensor, target: Tensor, weight: Tensor | None) -> None:
    if input.ndim > 2 or input.numel() == 0:
        raise OpError(
            f"multi_margin_loss: Expected non-empty vector or matrix with optional 0-dim "
            f"batch size, but got: {fmt(input.shape)}"
        )
    if target.dtype is not _int64:
        raise OpError(
            f"multi_margin_loss: expected a target of class indices (int64), got "
            f"{target.dtype}; convert it with .long()"
        )
    samples = input.shape[0] if input.ndim == 2 else 1
    if target.numel() != samples or target.ndim > 1:
        raise OpError(
            f"multi_margin_loss: target tensor should be 1-D with size equal to the number "
            f"of input samples (batch size). Expected target size [{samples}], but got "
            f"{fmt(target.shape)}. Input has shape {fmt(input.shape)}."
        )
    classes = input.shape[-1]
    if weight is not None and weight.numel() != classes:
        raise OpError(
            f"multi_margin_loss: inconsistent weight size, expected {classes} but got "
            f"{fmt(weight.shape)}"
        )
    if target.numel() and not 0 <= CF.amin(target).item() <= CF.amax(target).item() < classes:
        raise OpError(f"multi_margin_loss: target out of range for {classes} classes")


def multi_margin_loss(
    input: Tensor,
    target: Tensor,
    p: int = 1,
    margin: float = 1.0,
    weight: Tensor | None = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """Multi-class hinge loss: per sample, ``sum_{i != y} max(0, margin - x[y] + x[i])**p
    / C`` (times ``weight[y]``), over input (N, C) or (C,) and class indices ``target``."""
    reduction = _reduction(size_average, reduce, reduction, "multi_margin_loss")
    if p not in (1, 2):
        raise ValueError(f"multi_margin_loss: only p == 1 and p == 2 supported, got p={p}")
    if weight is not None and weight.ndim != 1:
        raise ValueError(
            f"multi_margin_loss: weight must be one-dimensional, got shape {fmt(weight.shape)}"
        )
    _check_multi_margin(input, target, weight)
    x = CF.reshape(input, (-1, input.shape[-1]))
    y = CF.reshape(target, (-1, 1))
    # relu, not clamp: torch's kernel counts a term only where it is > 0 (gradient 0 at 0)
    hinge = relu(margin - CF.gather(x, 1, y) + x)
    if p == 2:
        hinge = hinge * hinge
    is_target = y == _arange(x.shape[1], dtype=_int64, device=x.device)
    loss = CF.sum(CF.where(is_target, 0.0, hinge), dim=1) / x.shape[1]
    if weight is not None:
        loss = loss * CF.index_select(weight, 0, CF.reshape(y, (-1,)))
    if input.ndim < 2:
        loss = CF.reshape(loss, target.shape)
    return _reduce(loss, reduction)


# ============================================ activations, padding, norms, convolutions ======
# (silu, mish, hardswish, pad, batch_norm, group_norm, rms_norm, adaptive_avg_pool2d,
# interpolate, conv1d, conv_transpose2d): primitives in gradmesh.core.ops.activation,
# .conv and .norm; the rest composes existing ops (layer_norm, matmul, conv2d's pair).

__all__ += [
    "silu",
    "mish",
    "hardswish",
    "pad",
    "batch_norm",
    "group_norm",
    "rms_norm",
    "adaptive_avg_pool2d",
    "interpolate",
    "conv1d",
    "conv_transpose2d",
]


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """input * sigmoid(input). ``inplace`` is accepted for torch compatibility."""
    return REGISTRY["silu"](input)


def mish(input: Tensor, inplace: bool = False) -> Tensor:
    """input * tanh(softplus(input))."""
    return REGISTRY["mish"](input)


def hardswish(input: Tensor, inplace: bool = False) -> Tensor:
    """input * clamp(input + 3, 0, 6) / 6."""
    return REGISTRY["hardswish"](input)


def pad(
    input: Tensor, pad: Sequence[int], mode: str = "constant", value: float | None = None
) -> Tensor:
    """Pad the last ``len(pad) // 2`` dims: ``pad`` is (left, right) of the last dim, then
    of the one before, ... ``mode``: 'constant' (with ``value``; negative pads crop),
    'reflect' or 'replicate'. As in torch, the last two only pad the dims after (N, C) of a
    2- to 5-D input, or the dims after C of an unbatched one."""
    pad = [int(p) for p in pad]
    if mode != "constant":
        if value:
            raise OpError(f"pad: padding mode {mode!r} doesn't take in value argument")
        if not (len(pad) // 2 + 1 <= input.ndim <= len(pad) // 2 + 2 and len(pad) <= 6):
            raise NotImplementedError(
                f"pad: {mode} padding of {len(pad) // 2} dims needs a "
                f"{len(pad) // 2 + 1}-D or {len(pad) // 2 + 2}-D input (up to 3 padded dims), "
                f"got shape {fmt(input.shape)}"
            )
    return REGISTRY["pad"](input, pad=pad, mode=mode, value=float(value or 0.0))


def _channel_shape(input: Tensor) -> tuple:
    """(1, C, 1, ...): a per-channel (C,) tensor's shape against an (N, C, *) input."""
    return (1, input.shape[1]) + (1,) * (input.ndim - 2)


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, shape: tuple) -> Tensor:
    if weight is not None and bias is not None and weight.dtype == out.dtype == bias.dtype:
        return REGISTRY["channel_affine"](out, weight, bias)
    if weight is not None:
        out = out * CF.reshape(weight, shape)
    if bias is not None:
        out = out + CF.reshape(bias, shape)
    return out


def _check_channels(op: str, input: Tensor, **tensors) -> None:
    if input.ndim < 2:
        raise OpError(f"{op}: expected an input of shape (N, C, *), got {fmt(input.shape)}")
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != (input.shape[1],):
            raise OpError(
                f"{op}: {name} of shape {fmt(t.shape)} must have one entry per "
                f"channel, shape {fmt((input.shape[1],))}, for an input of shape "
                f"{fmt(input.shape)}"
            )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Normalise (N, C, *) per channel, then scale and shift.

    Training: with the batch's mean and biased variance; running statistics (if given) are
    updated in place as torch does, ``r = (1 - momentum) * r + momentum * s`` with the
    unbiased variance. ``momentum`` may be a 0-d float64 Tensor (BatchNorm's cumulative
    average, ``1 / num_batches_tracked``), rounded to the statistics' dtype as a Python
    float would be. Traced with module buffers as running statistics, the update becomes
    buffer-update outputs of the graph (``graph.trace``). Eval: with the running statistics.
    """
    _check_channels(
        "batch_norm",
        input,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    shape = _channel_shape(input)
    if not training:
        if running_mean is None or running_var is None:
            raise OpError(
                "batch_norm: running_mean and running_var must be defined in "
                "evaluation mode (training=False)"
            )
        out = (input - CF.reshape(running_mean, shape)) * CF.rsqrt(
            CF.reshape(running_var, shape) + eps
        )
        return _affine(out, weight, bias, shape)
    out = REGISTRY["batch_norm"](input, eps=float(eps))
    if running_mean is not None or running_var is not None:
        _update_running_stats(input, running_mean, running_var, momentum)
    return _affine(out, weight, bias, shape)


def _update_running_stats(input, running_mean, running_var, momentum) -> None:
    with no_grad():
        stats = REGISTRY["batch_norm_stats"](input.detach())  # (mean, unbiased var)
        for running, stat in ((running_mean, stats[0]), (running_var, stats[1])):
            if running is None:
                continue
            if isinstance(momentum, Tensor):
                # The factor and 1 - factor in float64, then rounded, as Python floats are.
                keep = (1.0 - momentum).to(running.dtype)
                running.mul_(keep).add_(stat * momentum.to(running.dtype))
            else:
                running.mul_(1 - momentum).add_(stat, alpha=momentum)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Normalise (N, C, *) over each group of C / num_groups channels (and all of *), then
    scale and shift per channel: ``layer_norm`` over the input viewed as (N, G, -1)."""
    _check_channels("group_norm", input, weight=weight, bias=bias)
    if num_groups < 1 or input.shape[1] % num_groups:
        raise OpError(
            f"group_norm: expected the number of channels {input.shape[1]} of the "
            f"input {fmt(input.shape)} to be divisible by num_groups={num_groups}"
        )
    n = input.shape[0]
    grouped = CF.reshape(input, (n, num_groups, -1))
    out = REGISTRY["layer_norm"](grouped, normalized_shape=[grouped.shape[-1]], eps=float(eps))
    return _affine(CF.reshape(out, input.shape), weight, bias, _channel_shape(input))


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """input / sqrt(mean(input², trailing dims) + eps) * weight; ``eps=None`` is the
    machine epsilon of the input's dtype (torch 2.4+)."""
    shape = (
        [int(normalized_shape)]
        if isinstance(normalized_shape, numbers.Integral)
        else [int(s) for s in normalized_shape]
    )
    k = len(shape)
    if k == 0 or k > input.ndim or list(input.shape[input.ndim - k :]) != shape:
        raise OpError(
            f"rms_norm: normalized_shape {fmt(shape)} must match the trailing "
            f"dimensions of the input, got input of shape {fmt(input.shape)}"
        )
    if weight is not None and list(weight.shape) != shape:
        raise OpError(
            f"rms_norm: weight of shape {fmt(weight.shape)} must have the "
            f"normalized_shape {fmt(shape)}"
        )
    if eps is None:
        eps = float(np.finfo(input.dtype.np).eps)
    dims = list(range(input.ndim - k, input.ndim))
    out = input * CF.rsqrt(CF.mean(input * input, dim=dims, keepdim=True) + eps)
    return out if weight is None else out * weight


def _constant(m: np.ndarray, like: Tensor) -> Tensor:
    return tensor(m, dtype=like.dtype, device=like.device)


def _resample(input: Tensor, rows: np.ndarray | None, cols: np.ndarray | None) -> Tensor:
    """``rows @ input @ cols.T`` over the last two dims (``cols`` alone: the last dim);
    None skips a side. Separable pooling and interpolation are this, with constant
    (out, in) matrices: two matmuls, differentiable to any order and traceable."""
    out = input if rows is None else CF.matmul(_constant(rows, input), input)
    return out if cols is None else CF.matmul(out, _constant(cols, input).mT)


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix of torch's windows [floor(i*size/out), ceil((i+1)*size/out))."""
    m = np.zeros((out, size))
    for i in range(out):
        lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool2d(input: Tensor, output_size) -> Tensor:
    """Mean over torch's adaptive windows of (N, C, H, W) or (C, H, W), as two matmuls with
    averaging matrices (the windows are separable); ``None`` in ``output_size`` keeps
    that dim's size."""
    if input.ndim not in (3, 4) or 0 in tuple(input.shape[-2:]):
        raise OpError(
            f"adaptive_avg_pool2d: expected a 3-D or 4-D input with non-zero "
            f"spatial size, got shape {fmt(input.shape)}"
        )
    size = (
        [output_size] * 2
        if output_size is None or isinstance(output_size, numbers.Integral)
        else list(output_size)
    )
    oh, ow = [input.shape[-2 + i] if s is None else int(s) for i, s in enumerate(size)]
    if oh < 1 or ow < 1:
        raise OpError(f"adaptive_avg_pool2d: output_size must be positive, got {size}")
    h, w = input.shape[-2:]
    return _resample(
        input,
        _adaptive_matrix(h, oh) if oh != h else None,
        _adaptive_matrix(w, ow) if ow != w else None,
    )


_INTERP_MODES = {"nearest": (3, 4), "linear": (3,), "bilinear": (4,)}


def _interp_matrix(
    size: int, out: int, mode: str, align_corners: bool, scale: float | None
) -> np.ndarray:
    """(out, size) matrix of torch's nearest or (bi)linear interpolation along one dim;
    ``scale`` is the user's scale_factor (torch then maps back with 1/scale_factor)."""
    m = np.zeros((out, size))
    dst = np.arange(out)
    if mode == "nearest":
        step = size / out if scale is None else 1.0 / scale
        m[dst, np.minimum(np.floor(dst * step).astype(np.int64), size - 1)] = 1.0
        return m
    if align_corners:
        src = dst * ((size - 1) / (out - 1) if out > 1 else 0.0)
    else:
        step = size / out if scale is None else 1.0 / scale
        src = np.maximum((dst + 0.5) * step - 0.5, 0.0)
    lo = src.astype(np.int64)
    frac = src - lo
    np.add.at(m, (dst, lo), 1.0 - frac)
    np.add.at(m, (dst, np.minimum(lo + 1, size - 1)), frac)
    return m


def interpolate(
    input: Tensor,
    size=None,
    scale_factor=None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
    antialias: bool = False,
) -> Tensor:
    """Resize (N, C, L) or (N, C, H, W) to ``size`` or by ``scale_factor``: 'nearest',
    'linear' (3-D) or 'bilinear' (4-D), with torch's source-index rules, as matmuls with
    constant interpolation matrices."""
    if mode not in _INTERP_MODES or antialias:
        raise NotImplementedError(
            f"interpolate: mode {mode!r}{' with antialias' * antialias} "
            f"is not supported; use one of {list(_INTERP_MODES)}"
        )
    if input.ndim not in _INTERP_MODES[mode]:
        raise OpError(
            f"interpolate: mode {mode!r} expects a "
            f"{' or '.join(f'{d}-D' for d in _INTERP_MODES[mode])} input, got shape "
            f"{fmt(input.shape)}"
        )
    if mode == "nearest" and align_corners is not None:
        raise ValueError(
            "interpolate: align_corners option can only be set with the "
            "interpolating modes: linear | bilinear"
        )
    k = input.ndim - 2
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: pass exactly one of size and scale_factor")
    if size is not None:
        outs = [int(size)] * k if isinstance(size, numbers.Integral) else [int(s) for s in size]
        scales = [None] * k
    else:
        scales = (
            [float(scale_factor)] * k
            if isinstance(scale_factor, numbers.Number)
            else [float(f) for f in scale_factor]
        )
        outs = [int(math.floor(n * f)) for n, f in zip(input.shape[2:], scales)]
        if recompute_scale_factor:
            scales = [None] * k
    if len(outs) != k or len(scales) != k or min(outs) < 1:
        raise OpError(
            f"interpolate: size/scale_factor must give {k} positive sizes for an "
            f"input of shape {fmt(input.shape)}, got {outs}"
        )
    mats = [
        _interp_matrix(n, o, mode, bool(align_corners), f)
        for n, o, f in zip(input.shape[2:], outs, scales)
    ]
    return _resample(input, mats[0], mats[1]) if k == 2 else _resample(input, None, mats[0])


def conv1d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> Tensor:
    """1-D convolution over (N, C, L) or (C, L): ``conv2d`` over a height of 1."""
    if input.ndim not in (2, 3) or weight.ndim != 3:
        raise OpError(
            f"conv1d: expected a 2-D (C, L) or 3-D (N, C, L) input and a 3-D weight "
            f"(out_channels, in_channels/groups, k), got input {fmt(input.shape)} "
            f"and weight {fmt(weight.shape)}"
        )
    pad_ = padding if isinstance(padding, str) else [0, _single("conv1d", "padding", padding)]
    out = conv2d(
        CF.unsqueeze(input, -2),
        CF.unsqueeze(weight, -2),
        bias,
        stride=[1, _single("conv1d", "stride", stride)],
        padding=pad_,
        dilation=[1, _single("conv1d", "dilation", dilation)],
        groups=groups,
    )
    return CF.squeeze(out, -2)


def _single(op: str, name: str, v) -> int:
    if isinstance(v, numbers.Integral):
        return int(v)
    v = [int(e) for e in v]
    if len(v) != 1:
        raise OpError(f"{op}: {name} must be an int or a 1-tuple, got {v}")
    return v[0]


def conv_transpose2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    output_padding=0,
    groups: int = 1,
    dilation=1,
) -> Tensor:
    """Transposed 2-D convolution, weight (in_channels, out_channels/groups, kh, kw): the
    gradient of ``conv2d`` with respect to its input (the ``conv2d_input_grad`` op)."""
    op = "conv_transpose2d"
    stride, padding = _pair(op, "stride", stride), _pair(op, "padding", padding)
    dilation, extra = _pair(op, "dilation", dilation), _pair(op, "output_padding", output_padding)
    x, unbatched = _batched(op, input)
    if weight.ndim != 4 or x.shape[1] != weight.shape[0]:
        raise OpError(
            f"{op}: weight of shape {fmt(weight.shape)} expects an input with "
            f"{weight.shape[0] if weight.ndim else '?'} channels (weight layout "
            f"(in_channels, out_channels/groups, kh, kw)), got input {fmt(input.shape)}"
        )
    if any(e >= max(s, d) or e < 0 for e, s, d in zip(extra, stride, dilation)):
        raise OpError(
            f"{op}: output_padding {extra} must be smaller than either stride "
            f"{stride} or dilation {dilation}"
        )
    size = [
        (n - 1) * s - 2 * p + d * (k - 1) + e + 1
        for n, s, p, d, k, e in zip(x.shape[2:], stride, padding, dilation, weight.shape[2:], extra)
    ]
    out = REGISTRY["conv2d_input_grad"](
        x,
        weight,
        input_size=size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=int(groups),
    )
    _check_channels(op, out, bias=bias)
    out = _affine(out, None, bias, _channel_shape(out))
    return CF.reshape(out, out.shape[1:]) if unbatched else out


# ====================================================================== attention ======

from .. import dtypes as _dtypes  # noqa: E402
from ..factories import ones as _ones  # noqa: E402
from ..registry import broadcast_shapes as _broadcast_shapes  # noqa: E402


def _attention_bias(
    op: str, attn_mask: Tensor | None, is_causal: bool, L: int, S: int, like: Tensor
) -> Tensor | None:
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
        raise OpError(
            f"{op}: expected attn_mask dtype to be bool or {like.dtype} (the query's "
            f"dtype), got {attn_mask.dtype}"
        )
    return attn_mask


def _attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bias: Tensor | None,
    dropout_p: float,
    scale: float,
    training: bool,
    safe: bool,
) -> tuple[Tensor, Tensor]:
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


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``softmax(query @ key^T * scale + mask) @ value`` over shapes (..., L, E), (..., S, E),
    (..., S, Ev), as ``torch.nn.functional.scaled_dot_product_attention``.

    ``attn_mask``: bool (True: the key takes part) or float (added to the scores),
    broadcast to (..., L, S); ``is_causal``: the lower-triangular mask. A query whose every
    key is masked gets zeros, as in torch. Dropout uses the engine's seeded masks (see
    ``dropout``), so a traced graph is deterministic; ``scale`` defaults to 1/sqrt(E).
    """
    if enable_gqa:
        raise NotImplementedError("scaled_dot_product_attention: enable_gqa is not supported")
    if (
        query.ndim < 2
        or key.ndim < 2
        or value.ndim < 2
        or query.shape[-1] != key.shape[-1]
        or key.shape[-2] != value.shape[-2]
    ):
        raise OpError(
            f"scaled_dot_product_attention: expected query (..., L, E), key "
            f"(..., S, E) and value (..., S, Ev), got shapes {fmt(query.shape)}, "
            f"{fmt(key.shape)} and {fmt(value.shape)}"
        )
    op = "scaled_dot_product_attention"
    L, S = query.shape[-2], key.shape[-2]
    bias = _attention_bias(op, attn_mask, is_causal, L, S, query)
    scores = _broadcast_shapes(op, query.shape[:-2], key.shape[:-2]) + (L, S)
    if bias is not None and _broadcast_shapes(op, bias.shape, scores) != scores:
        raise OpError(
            f"{op}: attn_mask of shape {fmt(bias.shape)} must broadcast to the "
            f"scores' shape {fmt(scores)} (..., L, S)"
        )
    scale = 1.0 / float(query.shape[-1]) ** 0.5 if scale is None else float(scale)
    # The causal mask leaves every query its first key, so no row can be all -inf: the
    # guard for such rows (a comparison and four selects over the scores) is not needed.
    safe = not (is_causal and S > 0)
    return _attend(query, key, value, bias, float(dropout_p), scale, True, safe=safe)[0]


def _padding_bias(op: str, mask: Tensor | None, like: Tensor, name: str) -> Tensor | None:
    """``MultiheadAttention``'s masks as an additive bias: bool True (masked out) -> -inf."""
    if mask is None:
        return None
    if mask.dtype is _dtypes.bool_:
        return CF.where(mask, float("-inf"), 0.0).to(like.dtype)
    if mask.dtype is not like.dtype:
        raise OpError(
            f"{op}: expected {name} to be bool or {like.dtype} (the query's dtype), "
            f"got {mask.dtype}"
        )
    return mask


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(N, L, E) -> (N, H, L, E/H)."""
    n, length, e = x.shape
    return CF.transpose(CF.reshape(x, [n, length, num_heads, e // num_heads]), 1, 2)


def _mha_bias(
    op: str, attn_mask, key_padding_mask, like: Tensor, n: int, h: int, L: int, S: int
) -> Tensor | None:
    """The sum of ``attn_mask`` ((L, S) or (N*H, L, S)) and ``key_padding_mask`` ((N, S)) as
    one bias broadcasting to (N, H, L, S)."""
    bias = _padding_bias(op, attn_mask, like, "attn_mask")
    if bias is not None:
        if tuple(bias.shape) not in ((L, S), (n * h, L, S)):
            raise OpError(
                f"{op}: attn_mask of shape {fmt(bias.shape)} must be ({L}, {S}) or "
                f"({n * h}, {L}, {S}) (batch * num_heads, target, source)"
            )
        bias = CF.reshape(bias, [n, h, L, S]) if bias.ndim == 3 else bias
    pad = _padding_bias(op, key_padding_mask, like, "key_padding_mask")
    if pad is not None:
        if tuple(pad.shape) != (n, S):
            raise OpError(
                f"{op}: key_padding_mask of shape {fmt(pad.shape)} must be "
                f"({n}, {S}) (batch, source)"
            )
        pad = CF.reshape(pad, [n, 1, 1, S])
        bias = pad if bias is None else bias + pad
    return bias


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Tensor | tuple,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    batch_first: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``MultiheadAttention``'s computation (torch's ``multi_head_attention_forward``):
    inputs (L, N, E) ((N, L, E) with ``batch_first``, (L, E) unbatched); bool masks are
    True where attention is not allowed. ``in_proj_weight``: (3E, E), or the three
    projections (E, E), (E, kdim), (E, vdim). Returns the output and, with ``need_weights``,
    the attention weights (N, L, S), or (N, H, L, S) without ``average_attn_weights``."""
    op = "multi_head_attention"
    if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
        raise OpError(
            f"{op}: expected query, key and value of 3 dims (or 2, unbatched), got "
            f"shapes {fmt(query.shape)}, {fmt(key.shape)}, {fmt(value.shape)}"
        )
    batched = query.ndim == 3
    if not batched:
        query, key, value = (CF.unsqueeze(t, 0) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = CF.unsqueeze(key_padding_mask, 0)
    elif not batch_first:
        query, key, value = (CF.transpose(t, 0, 1) for t in (query, key, value))
    n, L, e = query.shape
    S = key.shape[1]
    w = (
        tuple(in_proj_weight)
        if isinstance(in_proj_weight, (tuple, list))
        else CF.chunk(in_proj_weight, 3)
    )
    kdim, vdim = w[1].shape[1], w[2].shape[1]
    if (
        e % num_heads
        or key.shape[-1] != kdim
        or value.shape[-1] != vdim
        or value.shape[1] != S
        or w[0].shape[1] != e
    ):
        raise OpError(
            f"{op}: expected query (N, L, {w[0].shape[1]}), key (N, S, {kdim}) and "
            f"value (N, S, {vdim}) (batch first), embed_dim divisible by num_heads "
            f"{num_heads}; got shapes {fmt(query.shape)}, {fmt(key.shape)}, "
            f"{fmt(value.shape)}"
        )
    b = CF.chunk(in_proj_bias, 3) if in_proj_bias is not None else (None,) * 3
    q, k, v = (_heads(linear(x, wi, bi), num_heads) for x, wi, bi in zip((query, key, value), w, b))
    bias = _mha_bias(op, attn_mask, key_padding_mask, q, n, num_heads, L, S)
    out, weights = _attend(
        q,
        k,
        v,
        bias,
        dropout_p if training else 0.0,
        (e // num_heads) ** -0.5,
        training,
        safe=not need_weights,
    )
    out = linear(CF.reshape(CF.transpose(out, 1, 2), [n, L, e]), out_proj_weight, out_proj_bias)
    if not batched:
        out = CF.squeeze(out, 0)
    elif not batch_first:
        out = CF.transpose(out, 0, 1)
    if not need_weights:
        return out, None
    weights = CF.mean(weights, 1) if average_attn_weights else weights
    return out, (weights if batched else CF.squeeze(weights, 0))


# ---- activations: elu family, hardtanh family, shrinks, glu, softmin, prelu ----
# elu (selu and celu are elu's scale and input_scale) and hardtanh are primitives of
# gradmesh.core.ops.activation; the rest compose existing ops, with torch's gradients at
# the kinks (zero where the output is constant, as torch's backward kernels give).

__all__ += [
    "elu",
    "selu",
    "celu",
    "hardtanh",
    "relu6",
    "hardsigmoid",
    "logsigmoid",
    "softsign",
    "tanhshrink",
    "threshold",
    "hardshrink",
    "softshrink",
    "glu",
    "softmin",
    "prelu",
]

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _require_floating(op: str, input: Tensor) -> None:
    # torch has no integer kernel for these ("hardshrink_cpu" not implemented for 'Long').
    if not input.dtype.is_floating_point:
        raise OpError(
            f"{op}: not supported for tensors of dtype {input.dtype.name} (shape "
            f"{fmt(input.shape)}); it needs floating point: convert it with .float()"
        )


def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """input where positive, else ``alpha * (exp(input) - 1)``."""
    return REGISTRY["elu"](input, alpha=float(alpha), scale=1.0, input_scale=1.0)


def selu(input: Tensor, inplace: bool = False) -> Tensor:
    """``scale * elu(input, alpha)`` with the self-normalising constants."""
    return REGISTRY["elu"](input, alpha=_SELU_ALPHA, scale=_SELU_SCALE, input_scale=1.0)


def celu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """input where positive, else ``alpha * (exp(input / alpha) - 1)``."""
    if alpha == 0:
        raise OpError("celu: alpha cannot be 0 (it divides the input)")
    return REGISTRY["elu"](input, alpha=float(alpha), scale=1.0, input_scale=1.0 / alpha)


def hardtanh(
    input: Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> Tensor:
    """input clamped to ``[min_val, max_val]``; the gradient is zero at the bounds."""
    return REGISTRY["hardtanh"](input, min_val=float(min_val), max_val=float(max_val))


def relu6(input: Tensor, inplace: bool = False) -> Tensor:
    """``hardtanh(input, 0, 6)``."""
    return hardtanh(input, 0.0, 6.0)


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``relu6(input + 3) / 6``: 0 below -3, 1 above 3."""
    _require_floating("hardsigmoid", input)
    return hardtanh(input + 3.0, 0.0, 6.0) / 6.0


def logsigmoid(input: Tensor) -> Tensor:
    """``log(sigmoid(input))`` as ``-softplus(-input)``, without softplus's linear cut-off,
    which would drop the ``exp(input)`` term of large negative inputs."""
    _require_floating("logsigmoid", input)
    return -softplus(-input, 1.0, math.inf)


def softsign(input: Tensor) -> Tensor:
    """``input / (1 + |input|)``."""
    return input / (CF.abs(input) + 1)


def tanhshrink(input: Tensor) -> Tensor:
    """``input - tanh(input)``."""
    return input - tanh(input)


def threshold(input: Tensor, threshold: float, value: float, inplace: bool = False) -> Tensor:
    """input where greater than ``threshold``, else ``value``."""
    # torch keeps an integer tensor's dtype, the value cut to an integer.
    fill = value if input.dtype.is_floating_point else int(value)
    return CF.where(input > threshold, input, fill)


def hardshrink(input: Tensor, lambd: float = 0.5) -> Tensor:
    """input where ``|input| > lambd``, else 0."""
    _require_floating("hardshrink", input)
    return CF.where(CF.abs(input) > lambd, input, 0.0)


def softshrink(input: Tensor, lambd: float = 0.5) -> Tensor:
    """input moved ``lambd`` towards 0, and 0 within ``[-lambd, lambd]``."""
    _require_floating("softshrink", input)
    if lambd < 0:
        raise OpError(f"softshrink: lambd must be greater or equal to 0, but got {lambd}")
    return CF.where(input > lambd, input - lambd, CF.where(input < -lambd, input + lambd, 0.0))


def glu(input: Tensor, dim: int = -1) -> Tensor:
    """``a * sigmoid(b)`` for the two halves ``a, b`` of ``input`` along ``dim``."""
    _require_floating("glu", input)
    if input.ndim == 0:
        raise OpError("glu: glu does not support scalars because halving size must be even")
    dim = norm_dim("glu", dim, input.ndim)
    if input.shape[dim] % 2:
        raise OpError(
            f"glu: Halving dimension must be even, but dimension {dim} is size {input.shape[dim]}",
            "dim",
        )
    a, b = CF.chunk(input, 2, dim)
    return a * sigmoid(b)


def softmin(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> Tensor:
    """``softmax(-input, dim)``."""
    return CF.softmax(-input, _softmax_dim("softmin", dim, input.ndim), dtype=dtype)


def prelu(input: Tensor, weight: Tensor) -> Tensor:
    """input where positive, else ``weight * input``; ``weight`` holds one slope, or one per
    channel (dim 1)."""
    _require_floating("prelu", input)
    if weight.ndim > 1:
        raise OpError(
            f"prelu: Expected `weight` to be a scalar or 1D tensor, but got: ndim = {weight.ndim}"
        )
    channels = input.shape[1] if input.ndim >= 2 else 1
    if weight.numel() not in (1, channels):
        raise OpError(
            f"prelu: Mismatch of parameter numbers and input channel size. Found parameter "
            f"numbers = {weight.numel()} and channel size = {channels}."
        )
    slope = CF.reshape(weight, () if weight.numel() == 1 else _channel_shape(input))
    return CF.where(input > 0, input, slope * input)


# ============== pixel shuffle, 1-d and adaptive max pooling, instance norm ======
# Compositions: pixel (un)shuffle is reshape and permute; the 1-d pools are the 2-d ops
# over a height of 1; adaptive max pooling gathers each window and takes its max.

__all__ += [
    "pixel_shuffle",
    "pixel_unshuffle",
    "max_pool1d",
    "avg_pool1d",
    "adaptive_avg_pool1d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "instance_norm",
]


def _check_shuffle_factor(op: str, name: str, input: Tensor, factor: int) -> int:
    if input.ndim < 3:
        raise OpError(
            f"{op} expects input to have at least 3 dimensions, but got input with "
            f"{input.ndim} dimension(s)"
        )
    if not isinstance(factor, numbers.Integral) or factor <= 0:
        raise OpError(f"{op} expects a positive {name}, but got {factor}")
    return int(factor)


def pixel_shuffle(input: Tensor, upscale_factor: int) -> Tensor:
    """(*, C * r², H, W) to (*, C, H * r, W * r): channel ``c * r² + i * r + j`` becomes
    pixel (i, j) of each r x r block of channel c."""
    r = _check_shuffle_factor("pixel_shuffle", "upscale_factor", input, upscale_factor)
    *lead, c, h, w = input.shape
    if c % (r * r):
        raise OpError(
            f"pixel_shuffle expects its input's 'channel' dimension to be divisible by the "
            f"square of upscale_factor, but input.size(-3)={c} is not divisible by {r * r}"
        )
    k = len(lead)
    x = CF.reshape(input, (*lead, c // (r * r), r, r, h, w))
    x = CF.permute(x, (*range(k), k, k + 3, k + 1, k + 4, k + 2))
    return CF.reshape(x, (*lead, c // (r * r), h * r, w * r))


def pixel_unshuffle(input: Tensor, downscale_factor: int) -> Tensor:
    """(*, C, H * r, W * r) to (*, C * r², H, W), the inverse of ``pixel_shuffle``."""
    r = _check_shuffle_factor("pixel_unshuffle", "downscale_factor", input, downscale_factor)
    *lead, c, h, w = input.shape
    if h % r or w % r:
        raise OpError(
            f"pixel_unshuffle expects height and width to be divisible by "
            f"downscale_factor, but input.size(-2)={h} and input.size(-1)={w} are not "
            f"both divisible by {r}"
        )
    k = len(lead)
    x = CF.reshape(input, (*lead, c, h // r, r, w // r, r))
    x = CF.permute(x, (*range(k), k, k + 2, k + 4, k + 1, k + 3))
    return CF.reshape(x, (*lead, c * r * r, h // r, w // r))


def _check_1d(op: str, input: Tensor) -> None:
    if input.ndim not in (2, 3):
        raise OpError(
            f"{op}: expected a 2-D (C, L) or 3-D (N, C, L) input, got shape {fmt(input.shape)}"
        )


def _row(op: str, name: str, v, fill: int) -> list:
    """A 1-d pooling argument as the 2-d op's pair: ``fill`` over a height of 1."""
    return [fill, _single(op, name, v)]


def _pool_rows(op: str, kernel_size, stride, padding) -> tuple[list, list, list]:
    """kernel, stride and padding of a 1-d pool as the 2-d op's pairs, checked here so that
    an error names the 1-d arguments."""
    kernel, pad_ = _row(op, "kernel_size", kernel_size, 1), _row(op, "padding", padding, 0)
    if pad_[1] > kernel[1] // 2:
        raise OpError(
            f"{op}: padding should be at most half of kernel size, but got "
            f"padding={pad_[1]} and kernel_size={kernel[1]}"
        )
    stride = kernel if stride is None or stride == [] else _row(op, "stride", stride, 1)
    return kernel, stride, pad_


def max_pool1d(
    input: Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor:
    """Maximum over sliding windows of (N, C, L) or (C, L); the gradient goes to each
    window's first maximum, as torch's."""
    op = "max_pool1d"
    _check_1d(op, input)
    if return_indices:
        raise NotImplementedError(f"{op}: return_indices is not supported")
    kernel, stride, padding = _pool_rows(op, kernel_size, stride, padding)
    out = max_pool2d(
        CF.unsqueeze(input, -2),
        kernel,
        stride,
        padding,
        _row(op, "dilation", dilation, 1),
        ceil_mode,
    )
    return CF.squeeze(out, -2)


def avg_pool1d(
    input: Tensor,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> Tensor:
    """Mean over sliding windows of (N, C, L) or (C, L); ``count_include_pad`` counts the
    zero padding."""
    op = "avg_pool1d"
    _check_1d(op, input)
    kernel, stride, padding = _pool_rows(op, kernel_size, stride, padding)
    out = avg_pool2d(CF.unsqueeze(input, -2), kernel, stride, padding, ceil_mode, count_include_pad)
    return CF.squeeze(out, -2)


def _adaptive_sizes(op: str, input: Tensor, output_size, dims: int) -> list:
    """``output_size`` as ``dims`` ints (None keeps the input's size), checked."""
    if input.ndim not in (dims + 1, dims + 2) or 0 in tuple(input.shape[-dims:]):
        raise OpError(
            f"{op}: expected a {dims + 1}-D or {dims + 2}-D input with non-zero "
            f"spatial size, got shape {fmt(input.shape)}"
        )
    size = (
        [output_size] * dims
        if output_size is None or isinstance(output_size, numbers.Integral)
        else list(output_size)
    )
    if len(size) != dims:
        raise OpError(f"{op}: output_size must be an int or {dims} ints, got {output_size}")
    size = [input.shape[-dims + i] if s is None else int(s) for i, s in enumerate(size)]
    if min(size) < 1:
        raise OpError(f"{op}: output_size must be positive, got {output_size}")
    return size


def adaptive_avg_pool1d(input: Tensor, output_size) -> Tensor:
    """Mean over torch's adaptive windows of (N, C, L) or (C, L): a matmul with an
    averaging matrix."""
    (out,) = _adaptive_sizes("adaptive_avg_pool1d", input, output_size, 1)
    size = input.shape[-1]
    return input if out == size else _resample(input, None, _adaptive_matrix(size, out))


def _adaptive_max_last(input: Tensor, out: int) -> Tensor:
    """Max over torch's adaptive windows of the last dim. Each window's indices are
    gathered into a row (short windows repeat their last index) and ``max(dim=-1)`` sends
    the gradient to the first maximum, as torch's kernel does."""
    size = input.shape[-1]
    if out == size:
        return input
    bounds = [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]
    width = max(hi - lo for lo, hi in bounds)
    index = np.array([[min(lo + k, hi - 1) for k in range(width)] for lo, hi in bounds])
    rows = CF.index_select(input, -1, tensor(index.ravel(), device=input.device))
    return CF.max(CF.unflatten(rows, -1, (out, width)), dim=-1).values


def _refuse_indices(op: str, return_indices: bool) -> None:
    if return_indices:
        raise NotImplementedError(
            f"{op}: return_indices=True is not supported (there is no max_unpool); "
            f"use return_indices=False"
        )


def adaptive_max_pool1d(input: Tensor, output_size, return_indices: bool = False) -> Tensor:
    """Max over torch's adaptive windows of (N, C, L) or (C, L)."""
    _refuse_indices("adaptive_max_pool1d", return_indices)
    (out,) = _adaptive_sizes("adaptive_max_pool1d", input, output_size, 1)
    return _adaptive_max_last(input, out)


def adaptive_max_pool2d(input: Tensor, output_size, return_indices: bool = False) -> Tensor:
    """Max over torch's adaptive windows of (N, C, H, W) or (C, H, W). The windows are
    separable: the max over each row's window, then over the rows'. A tie goes to the
    first row holding the maximum and its first column: the first in row-major order, as
    in torch."""
    _refuse_indices("adaptive_max_pool2d", return_indices)
    oh, ow = _adaptive_sizes("adaptive_max_pool2d", input, output_size, 2)
    cols = _adaptive_max_last(input, ow)
    return CF.transpose(_adaptive_max_last(CF.transpose(cols, -1, -2), oh), -1, -2)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Normalise each (sample, channel) of (N, C, *) over *, then scale and shift per
    channel. With ``use_input_stats`` (the default) the statistics are each instance's,
    and running statistics (if given) move towards their mean over the batch, as torch's;
    otherwise the running statistics normalise, as ``batch_norm`` in eval."""
    _check_channels(
        "instance_norm",
        input,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    if not use_input_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if math.prod(input.shape[2:]) <= 1:
        raise ValueError(
            f"instance_norm: expected more than 1 spatial element when training, got "
            f"input size {fmt(input.shape)}"
        )
    flat = CF.flatten(input, 2)
    out = REGISTRY["layer_norm"](flat, normalized_shape=[flat.shape[-1]], eps=float(eps))
    if running_mean is not None or running_var is not None:
        _update_instance_stats(flat, running_mean, running_var, momentum)
    return _affine(CF.reshape(out, input.shape), weight, bias, _channel_shape(input))


def _update_instance_stats(flat: Tensor, running_mean, running_var, momentum) -> None:
    """torch's update: each instance's mean and unbiased variance, averaged over the batch."""
    c, size = flat.shape[1:]
    with no_grad():
        # Shapes without the batch size, so that a traced graph runs at any batch size.
        stats = REGISTRY["batch_norm_stats"](CF.reshape(flat.detach(), (1, -1, size)))
        for running, stat in ((running_mean, stats[0]), (running_var, stats[1])):
            if running is not None:
                batch_mean = CF.mean(CF.reshape(stat, (-1, c)), 0)
                running.mul_(1 - momentum).add_(batch_mean, alpha=momentum)
