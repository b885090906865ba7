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
from ..registry import REGISTRY, OpError, fmt
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
    seed = int(rng(generator).integers(0, 2**63 - 1))
    return input * REGISTRY["dropout_mask"](input, p=float(p), seed=seed)


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
