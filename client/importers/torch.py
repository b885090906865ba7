"""``gradmesh.from_torch``: a PyTorch module as a gradmesh module, through ``torch.export``.

>>> import torch, gradmesh                                    # doctest: +SKIP
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> model = gradmesh.from_torch(net, torch.randn(3, 4))       # doctest: +SKIP
>>> [n for n, _ in model.named_parameters()]                  # doctest: +SKIP
['0.weight', '0.bias', '2.weight', '2.bias']

The module is exported twice, in training and in eval mode (``torch.export`` captures one
mode per graph), with the batch dimension (dim 0 of every input) symbolic. Every aten op of
both graphs must map onto gradmesh's registry (the ``_OPS`` table below); the rest is
refused at once with one ``UnsupportedModelError`` that lists every unmapped op and the
module path where it occurs. The result is a ``gradmesh.core.nn.Module`` whose submodules,
parameters and buffers carry torch's names and values (tied weights stay one Parameter)
and whose ``forward`` interprets the exported graph with gradmesh ops: local backward,
``gradmesh.core.graph.trace``, ``WorkerClient`` and coordinator jobs work as for any
gradmesh model, and the user's Python code never runs again (DESIGN.md section 3).

Modes: ``forward`` runs the graph exported in the root's mode (``model.train()`` /
``model.eval()``); inside it, BatchNorm and dropout follow the mode of the submodule that
owns them, and an in-place buffer update (BatchNorm's ``num_batches_tracked``) runs only
while its module trains, as in torch.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

import gradmesh.core as gm
from gradmesh.core import dtypes
from gradmesh.core.nn import functional as F
from gradmesh.core.nn.modules.module import Module, Parameter
from gradmesh.core.registry import REGISTRY
from gradmesh.core.tensor import Tensor

from .errors import Unsupported, UnsupportedModelError

__all__ = ["TorchModule", "from_torch", "supported_ops", "to_torch_state_dict"]

_SOURCE = "from_torch"


# ===================================================================== symbolic sizes ===


class _BatchSize(int):
    """An int that depends on the (symbolic) batch size: shape arguments holding one are
    written with -1 instead, so that a traced graph does not bake the batch size in."""


def _batch_free(shape) -> list:
    """``shape`` with its one batch-dependent entry as -1 (where there is exactly one and no
    -1 already); as it is otherwise."""
    dependent = [i for i, s in enumerate(shape) if isinstance(s, _BatchSize)]
    if len(dependent) != 1 or -1 in shape:
        return [int(s) for s in shape]
    return [-1 if i == dependent[0] else int(s) for i, s in enumerate(shape)]


def _python_op(fn: Callable) -> Callable:
    """A Python operator over sizes: the result depends on the batch when an operand does."""

    def run(*args):
        out = fn(*args)
        batch = any(isinstance(a, _BatchSize) for a in args)
        return _BatchSize(out) if batch and isinstance(out, int) else out

    return run


_PYTHON_OPS: dict[Any, Callable] = {
    operator.getitem: operator.getitem,
    **{
        op: _python_op(op)
        for op in (
            operator.add,
            operator.sub,
            operator.mul,
            operator.floordiv,
            operator.mod,
            operator.neg,
            operator.truediv,
        )
    },
}


class _Zeros:
    """An ``aten.zeros`` whose shape holds the batch size: kept lazy, because an LSTM's zero
    initial state is its ``None`` state (no batch-shaped constant in a traced graph);
    anything else makes it a tensor."""

    def __init__(self, shape: list, factory_kw: dict):
        self.shape, self.factory_kw = shape, factory_kw

    def tensor(self) -> Tensor:
        return gm.zeros(*[int(s) for s in self.shape], **self.factory_kw)


def _materialise(value):
    return value.tensor() if isinstance(value, _Zeros) else value


# ==================================================================== the op table ======
# One entry per aten op: the gradmesh call it becomes, as a function of gradmesh tensors and
# the op's other arguments, in the order and with the defaults of the aten schema. Entries
# marked ``owner=True`` also get the gradmesh submodule the node belongs to (for its mode),
# ``root=True`` the imported model itself.


@dataclass(frozen=True)
class _Op:
    fn: Callable
    gradmesh: str  # what it maps to, for docs/import.md
    owner: bool = False
    shape: bool = False  # gets ``out_shape``: the output's shape, batch dim as -1
    lazy_zeros: bool = False  # takes batch-shaped zeros as ``_Zeros`` (recurrent states)
    root: bool = False  # gets the root module (the model's device)
    inplace: bool = False  # ``aten.<op>_``: its result stands for its first argument after it


_OPS: dict[str, _Op] = {}


def _op(names: str, gradmesh: str, owner=False, shape=False, lazy_zeros=False, root=False):
    def register(fn: Callable) -> Callable:
        for name in names.split():
            _OPS[f"aten.{name}"] = _Op(fn, gradmesh, owner, shape, lazy_zeros, root)
        return fn

    return register


def supported_ops() -> list[tuple[str, str]]:
    """(aten op, the gradmesh call it becomes) for every op ``from_torch`` maps."""
    return sorted((name, op.gradmesh) for name, op in _OPS.items())


def _dtype(torch_dtype) -> Any:
    return None if torch_dtype is None else dtypes.by_name(str(torch_dtype).split(".")[-1])


# ---- layers


@_op("linear.default", "nn.functional.linear")
def _linear(x, w, b=None):
    return F.linear(x, w, b)


@_op("conv2d.default", "nn.functional.conv2d")
def _conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


@_op("conv1d.default", "nn.functional.conv1d")
def _conv1d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    return F.conv1d(x, w, b, stride, padding, dilation, groups)


@_op("conv_transpose2d.input", "nn.functional.conv_transpose2d")
def _conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)


@_op("embedding.default", "nn.functional.embedding")
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    padding = None if padding_idx == -1 else padding_idx
    return F.embedding(indices, weight, padding, None, 2.0, scale_grad_by_freq, sparse)


@_op("batch_norm.default", "nn.functional.batch_norm (training: the owning module's mode)", True)
def _batch_norm(owner, x, w, b, mean, var, training, momentum, eps, cudnn_enabled=True):
    # Without running statistics torch always normalises with the batch's.
    training = owner.training if mean is not None else training
    return F.batch_norm(x, mean, var, w, b, training, momentum, eps)


@_op("layer_norm.default", "nn.functional.layer_norm")
def _layer_norm(x, shape, w=None, b=None, eps=1e-5, cudnn_enable=True):
    return F.layer_norm(x, shape, w, b, eps)


@_op("group_norm.default", "nn.functional.group_norm")
def _group_norm(x, groups, w=None, b=None, eps=1e-5, cudnn_enabled=True):
    return F.group_norm(x, groups, w, b, eps)


# Dropout of every kind (nn.Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout):
# training follows the owning module's mode, not the flag export recorded.
def _dropout_op(aten: str, dropout: Callable, called: str) -> None:
    _op(aten, f"nn.functional.{called} (training: the owning module's mode)", True)(
        lambda owner, x, p, train: dropout(x, p, owner.training)
    )


_dropout_op("dropout.default", F.dropout, "dropout")
_dropout_op("feature_dropout.default", F.feature_dropout, "dropout1d/2d/3d")
_dropout_op("alpha_dropout.default", F.alpha_dropout, "alpha_dropout")
_dropout_op("feature_alpha_dropout.default", F.feature_alpha_dropout, "feature_alpha_dropout")


@_op("scaled_dot_product_attention.default", "nn.functional.scaled_dot_product_attention")
def _sdpa(q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)


@_op("max_pool2d.default", "nn.functional.max_pool2d")
def _max_pool2d(x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    return F.max_pool2d(x, kernel, list(stride) or None, padding, dilation, ceil_mode)


@_op("avg_pool2d.default", "nn.functional.avg_pool2d")
def _avg_pool2d(x, kernel, stride=(), padding=0, ceil_mode=False, count_pad=True, divisor=None):
    return F.avg_pool2d(x, kernel, list(stride) or None, padding, ceil_mode, count_pad, divisor)


@_op("adaptive_avg_pool2d.default", "nn.functional.adaptive_avg_pool2d")
def _adaptive_avg_pool2d(x, size):
    return F.adaptive_avg_pool2d(x, list(size))


# ---- padding, pixel shuffle, 1-d and adaptive max pooling, instance norm


_op("pad.default", "nn.functional.pad")(
    lambda x, pad, mode="constant", value=None: F.pad(x, list(pad), mode, value)
)
_op("pixel_shuffle.default", "nn.functional.pixel_shuffle")(lambda x, r: F.pixel_shuffle(x, r))
_op("pixel_unshuffle.default", "nn.functional.pixel_unshuffle")(
    lambda x, r: F.pixel_unshuffle(x, r)
)
_op("adaptive_avg_pool1d.default", "nn.functional.adaptive_avg_pool1d")(
    lambda x, size: F.adaptive_avg_pool1d(x, list(size))
)


@_op("max_pool1d.default", "nn.functional.max_pool1d")
def _max_pool1d(x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    return F.max_pool1d(x, kernel, list(stride) or None, padding, dilation, ceil_mode)


@_op("avg_pool1d.default", "nn.functional.avg_pool1d")
def _avg_pool1d(x, kernel, stride=(), padding=0, ceil_mode=False, count_include_pad=True):
    return F.avg_pool1d(x, kernel, list(stride) or None, padding, ceil_mode, count_include_pad)


# aten returns (values, indices); gradmesh has no indices to give (no max_unpool reads them).
_op("adaptive_max_pool1d.default", "nn.functional.adaptive_max_pool1d (values)")(
    lambda x, size: (F.adaptive_max_pool1d(x, list(size)), None)
)
_op("adaptive_max_pool2d.default", "nn.functional.adaptive_max_pool2d (values)")(
    lambda x, size: (F.adaptive_max_pool2d(x, list(size)), None)
)


@_op(
    "instance_norm.default",
    "nn.functional.instance_norm (use_input_stats: the owning module's mode)",
    True,
)
def _instance_norm(owner, x, w, b, mean, var, use_input_stats, momentum, eps, cudnn=True):
    # Without running statistics torch always normalises with the instance's.
    use_input_stats = owner.training if mean is not None else use_input_stats
    return F.instance_norm(x, mean, var, w, b, use_input_stats, momentum, eps)


@_op("lstm.input", "nn.LSTM (its recurrence, with these weights)", True, lazy_zeros=True)
def _lstm(owner, x, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first):
    lstm = _recurrence(gm.nn.LSTM, x, params, has_biases, layers, dropout, bidirectional)
    lstm.batch_first, lstm.training = batch_first, owner.training
    # Zero initial states are the recurrence's None state (no batch-shaped constant).
    hx = None if all(isinstance(h, _Zeros) for h in hx) else tuple(map(_materialise, hx))
    out, (h, c) = lstm(x, hx)
    return out, h, c


@_op("gru.input", "nn.GRU (its recurrence, with these weights)", True, lazy_zeros=True)
def _gru(owner, x, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first):
    gru = _recurrence(gm.nn.GRU, x, params, has_biases, layers, dropout, bidirectional)
    return _run_hidden_state(gru, owner, x, hx, batch_first)


@_op("rnn_tanh.input", "nn.RNN (tanh; its recurrence, with these weights)", True, lazy_zeros=True)
def _rnn_tanh(owner, x, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first):
    rnn = _recurrence(gm.nn.RNN, x, params, has_biases, layers, dropout, bidirectional)
    rnn.nonlinearity = "tanh"
    return _run_hidden_state(rnn, owner, x, hx, batch_first)


@_op("rnn_relu.input", "nn.RNN (relu; its recurrence, with these weights)", True, lazy_zeros=True)
def _rnn_relu(owner, x, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first):
    rnn = _recurrence(gm.nn.RNN, x, params, has_biases, layers, dropout, bidirectional)
    rnn.nonlinearity = "relu"
    return _run_hidden_state(rnn, owner, x, hx, batch_first)


def _run_hidden_state(rnn, owner, x, hx, batch_first):
    """A GRU's or RNN's (output, h_n), from the None state where torch passed zeros."""
    rnn.batch_first, rnn.training = batch_first, owner.training
    return rnn(x, None if isinstance(hx, _Zeros) else hx)


def _recurrence(cls, x, params, bias, layers, dropout, bidirectional):
    """A gradmesh LSTM, GRU or RNN configured as an aten call and computing with its ``params``;
    built bare, because constructing one the usual way draws initial weights from the
    global generator."""
    rnn = cls.__new__(cls)
    Module.__init__(rnn)
    rnn.input_size, rnn.hidden_size, rnn.num_layers = x.shape[-1], params[1].shape[1], layers
    rnn.bias, rnn.dropout, rnn.bidirectional = bias, float(dropout), bidirectional
    kinds = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
    names = [k + sfx for layer in range(layers) for sfx in rnn._suffixes(layer) for k in kinds]
    rnn._parameters.update(zip(names, params))
    return rnn


# ---- activations


_op("relu.default", "relu")(lambda x: gm.relu(x))
_op("sigmoid.default", "sigmoid")(lambda x: gm.sigmoid(x))
_op("tanh.default", "tanh")(lambda x: gm.tanh(x))
_op("silu.default", "nn.functional.silu")(lambda x: F.silu(x))
_op("hardswish.default", "nn.functional.hardswish")(lambda x: F.hardswish(x))
_op("mish.default", "nn.functional.mish")(lambda x: F.mish(x))
_op("leaky_relu.default", "leaky_relu")(lambda x, slope=0.01: gm.leaky_relu(x, slope))
_op("gelu.default", "gelu")(lambda x, approximate="none": gm.gelu(x, approximate))
_op("softplus.default", "softplus")(lambda x, beta=1, threshold=20: gm.softplus(x, beta, threshold))
_op("softmax.int _softmax.default", "softmax")(lambda x, dim, dtype=None: _softmax(x, dim, dtype))
_op("log_softmax.int _log_softmax.default", "log_softmax")(
    lambda x, dim, dtype=None: _softmax(x, dim, dtype, log=True)
)


def _softmax(x, dim, dtype=None, log=False):
    # _softmax.default's third argument is half_to_float (a bool), not a dtype.
    dtype = _dtype(dtype) if not isinstance(dtype, bool) else None
    return (gm.log_softmax if log else gm.softmax)(x, dim, dtype=dtype)


# ---- activations: elu family, hardtanh family, shrinks, glu, prelu, erf


@_op("elu.default", "elu")
def _elu(x, alpha=1.0, scale=1.0, input_scale=1.0):
    return REGISTRY["elu"](
        x, alpha=float(alpha), scale=float(scale), input_scale=float(input_scale)
    )


_op("selu.default", "nn.functional.selu")(lambda x: F.selu(x))
_op("celu.default", "nn.functional.celu")(lambda x, alpha=1.0: F.celu(x, alpha))
_op("hardtanh.default", "nn.functional.hardtanh")(
    lambda x, min_val=-1.0, max_val=1.0: F.hardtanh(x, min_val, max_val)
)
_op("hardsigmoid.default", "nn.functional.hardsigmoid")(lambda x: F.hardsigmoid(x))
_op("log_sigmoid.default", "nn.functional.logsigmoid")(lambda x: F.logsigmoid(x))
_op("threshold.default", "nn.functional.threshold")(lambda x, t, v: F.threshold(x, t, v))
_op("hardshrink.default", "nn.functional.hardshrink")(lambda x, lambd=0.5: F.hardshrink(x, lambd))
_op("softshrink.default", "nn.functional.softshrink")(lambda x, lambd=0.5: F.softshrink(x, lambd))
_op("glu.default", "nn.functional.glu")(lambda x, dim=-1: F.glu(x, dim))
_op("prelu.default", "nn.functional.prelu")(lambda x, weight: F.prelu(x, weight))
_op("erf.default", "erf")(lambda x: gm.erf(x))
_op("erfc.default", "erfc")(lambda x: gm.erfc(x))
_op("erfinv.default", "erfinv")(lambda x: gm.erfinv(x))


# ---- losses and distances (aten's reduction is an enum: 0 none, 1 mean, 2 sum)


def _red(reduction: int) -> str:
    return ("none", "mean", "sum")[reduction]


_op("l1_loss.default", "nn.functional.l1_loss")(
    lambda x, t, reduction=1: F.l1_loss(x, t, reduction=_red(reduction))
)
_op("smooth_l1_loss.default", "nn.functional.smooth_l1_loss")(
    lambda x, t, reduction=1, beta=1.0: F.smooth_l1_loss(x, t, reduction=_red(reduction), beta=beta)
)
_op("huber_loss.default", "nn.functional.huber_loss")(
    lambda x, t, reduction=1, delta=1.0: F.huber_loss(x, t, _red(reduction), delta)
)
_op("binary_cross_entropy.default", "nn.functional.binary_cross_entropy")(
    lambda x, t, w=None, reduction=1: F.binary_cross_entropy(x, t, w, reduction=_red(reduction))
)
_op("soft_margin_loss.default", "nn.functional.soft_margin_loss")(
    lambda x, t, reduction=1: F.soft_margin_loss(x, t, reduction=_red(reduction))
)
_op("hinge_embedding_loss.default", "nn.functional.hinge_embedding_loss")(
    lambda x, t, margin=1.0, reduction=1: F.hinge_embedding_loss(
        x, t, margin, reduction=_red(reduction)
    )
)
_op("margin_ranking_loss.default", "nn.functional.margin_ranking_loss")(
    lambda a, b, t, margin=0.0, reduction=1: F.margin_ranking_loss(
        a, b, t, margin, reduction=_red(reduction)
    )
)
_op("cosine_embedding_loss.default", "nn.functional.cosine_embedding_loss")(
    lambda a, b, t, margin=0.0, reduction=1: F.cosine_embedding_loss(
        a, b, t, margin, reduction=_red(reduction)
    )
)
_op("poisson_nll_loss.default", "nn.functional.poisson_nll_loss")(
    lambda x, t, log_input, full, eps, reduction: F.poisson_nll_loss(
        x, t, log_input, full, eps=eps, reduction=_red(reduction)
    )
)
_op("multi_margin_loss.default", "nn.functional.multi_margin_loss")(
    lambda x, t, p=1, margin=1.0, w=None, reduction=1: F.multi_margin_loss(
        x, t, p, margin, w, reduction=_red(reduction)
    )
)
_op("cosine_similarity.default", "nn.functional.cosine_similarity")(
    lambda a, b, dim=1, eps=1e-8: F.cosine_similarity(a, b, dim, eps)
)
_op("pairwise_distance.default", "nn.functional.pairwise_distance")(
    lambda a, b, p=2.0, eps=1e-6, keepdim=False: F.pairwise_distance(a, b, p, eps, keepdim)
)
_op("one_hot.default", "nn.functional.one_hot")(lambda t, n=-1: F.one_hot(t, n))
_op("clamp_min.default", "clamp")(lambda a, lo: gm.clamp(a, min=lo))
_op("expand_as.default", "expand_as")(lambda a, other: gm.expand_as(a, other))


@_op("triplet_margin_loss.default", "nn.functional.triplet_margin_loss")
def _triplet(a, pos, neg, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction=1):
    return F.triplet_margin_loss(a, pos, neg, margin, p, eps, swap, reduction=_red(reduction))


@_op("kl_div.default", "nn.functional.kl_div ('batchmean' is a division after it)")
def _kl_div(x, t, reduction=1, log_target=False):
    with warnings.catch_warnings():  # torch warned about 'mean' at export already
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(x, t, reduction=_red(reduction), log_target=log_target)


@_op("linalg_vector_norm.default", "linalg.vector_norm (sum, abs, pow, sqrt)")
def _vector_norm(a, ord=2, dim=None, keepdim=False, dtype=None):
    a = a if dtype is None else a.to(_dtype(dtype))
    return F._vector_norm(a, ord, _dims(dim), keepdim)


@_op("broadcast_tensors.default", "expand (to the common shape)")
def _broadcast_tensors(tensors):
    shape = np.broadcast_shapes(*(tuple(t.shape) for t in tensors))
    return [t if tuple(t.shape) == shape else gm.expand(t, *shape) for t in tensors]


# ---- arithmetic


def _alpha(other, alpha):
    return other if alpha == 1 else other * alpha


_op("add.Tensor add.Scalar", "add")(lambda a, b, alpha=1: a + _alpha(b, alpha))
_op("sub.Tensor sub.Scalar", "sub")(lambda a, b, alpha=1: a - _alpha(b, alpha))
_op("rsub.Scalar rsub.Tensor", "sub (reversed)")(lambda a, b, alpha=1: b - _alpha(a, alpha))
_op("mul.Tensor mul.Scalar", "mul")(lambda a, b: a * b)
_op("div.Tensor div.Scalar", "div")(lambda a, b: a / b)
_op("neg.default", "neg")(lambda a: -a)
_op("pow.Tensor_Scalar pow.Tensor_Tensor", "pow")(lambda a, b: gm.pow(a, b))
_op("exp.default", "exp")(lambda a: gm.exp(a))
_op("log.default", "log")(lambda a: gm.log(a))
_op("sqrt.default", "sqrt")(lambda a: gm.sqrt(a))
_op("rsqrt.default", "rsqrt")(lambda a: gm.rsqrt(a))
_op("abs.default", "abs")(lambda a: gm.abs(a))
_op("sin.default", "sin")(lambda a: gm.sin(a))
_op("cos.default", "cos")(lambda a: gm.cos(a))
_op("reciprocal.default", "reciprocal")(lambda a: gm.reciprocal(a))
_op("clamp.default", "clamp")(lambda a, lo=None, hi=None: gm.clamp(a, lo, hi))
_op("maximum.default", "maximum")(lambda a, b: gm.maximum(a, b))
_op("minimum.default", "minimum")(lambda a, b: gm.minimum(a, b))
_op("where.self", "where")(lambda c, a, b: gm.where(c, a, b))
_op("masked_fill.Scalar masked_fill.Tensor", "masked_fill")(
    lambda a, mask, value: gm.masked_fill(a, mask, value)
)
_op("matmul.default", "matmul")(lambda a, b: gm.matmul(a, b))
_op("mm.default", "mm")(lambda a, b: gm.mm(a, b))
_op("bmm.default", "bmm")(lambda a, b: gm.bmm(a, b))
_op("addmm.default", "addmm")(
    lambda c, a, b, beta=1, alpha=1: gm.addmm(c, a, b, beta=beta, alpha=alpha)
)
_op("baddbmm.default", "baddbmm")(
    lambda c, a, b, beta=1, alpha=1: gm.baddbmm(c, a, b, beta=beta, alpha=alpha)
)
for _name, _cmp in (("eq", gm.eq), ("ne", gm.ne), ("lt", gm.lt), ("le", gm.le), ("gt", gm.gt)):
    _op(f"{_name}.Tensor {_name}.Scalar", _name)(lambda a, b, _cmp=_cmp: _cmp(a, b))
_op("ge.Tensor ge.Scalar", "ge")(lambda a, b: gm.ge(a, b))
_op("logical_not.default", "logical_not")(lambda a: gm.logical_not(a))


@_op("bitwise_not.default", "logical_not (bool tensors)")
def _bitwise_not(a):
    if a.dtype != dtypes.bool_:
        raise TypeError(f"from_torch: bitwise_not of a {a.dtype} tensor; gradmesh has it for bool")
    return gm.logical_not(a)


# ---- reductions


def _dims(dim):
    return None if dim is None or dim == [] else dim


_op("sum.default", "sum")(lambda a, dtype=None: gm.sum(a, dtype=_dtype(dtype)))
_op("sum.dim_IntList", "sum")(
    lambda a, dim, keepdim=False, dtype=None: gm.sum(a, _dims(dim), keepdim, dtype=_dtype(dtype))
)
_op("mean.default", "mean")(lambda a, dtype=None: gm.mean(a, dtype=_dtype(dtype)))
_op("mean.dim", "mean")(
    lambda a, dim, keepdim=False, dtype=None: gm.mean(a, _dims(dim), keepdim, dtype=_dtype(dtype))
)
_op("amax.default", "amax")(lambda a, dim=(), keepdim=False: gm.amax(a, _dims(dim), keepdim))
_op("amin.default", "amin")(lambda a, dim=(), keepdim=False: gm.amin(a, _dims(dim), keepdim))
_op("logsumexp.default", "logsumexp")(lambda a, dim, keepdim=False: gm.logsumexp(a, dim, keepdim))
_op("cumsum.default", "cumsum")(lambda a, dim, dtype=None: gm.cumsum(a, dim, dtype=_dtype(dtype)))
_op("argmax.default", "argmax")(lambda a, dim=None, keepdim=False: gm.argmax(a, dim, keepdim))


# ---- shapes and indexing


_op("view.default reshape.default _unsafe_view.default", "reshape (batch size as -1)")(
    lambda a, shape: gm.reshape(a, _batch_free(shape))
)


@_op("expand.default", "expand (batch size as -1)")
def _expand(a, shape, implicit=False):
    # The batch entry becomes -1 (keep) where the input already has the batch size there.
    lead = len(shape) - a.ndim
    kept = [
        -1 if isinstance(s, _BatchSize) and i >= lead and a.shape[i - lead] == s else int(s)
        for i, s in enumerate(shape)
    ]
    return gm.expand(a, *kept)


_op("flatten.using_ints", "flatten")(lambda a, start=0, end=-1: gm.flatten(a, start, end))
_op("unflatten.int", "unflatten")(lambda a, dim, sizes: gm.unflatten(a, dim, _batch_free(sizes)))
_op("transpose.int", "transpose")(lambda a, d0, d1: gm.transpose(a, d0, d1))
_op("t.default", "t")(lambda a: gm.t(a))
_op("permute.default", "permute")(lambda a, dims: gm.permute(a, dims))
_op("unsqueeze.default", "unsqueeze")(lambda a, dim: gm.unsqueeze(a, dim))
_op("squeeze.dim squeeze.dims", "squeeze")(lambda a, dim: gm.squeeze(a, dim))
_op("squeeze.default", "squeeze")(lambda a: gm.squeeze(a))
_op("contiguous.default clone.default alias.default", "identity")(lambda a, **_: a)
_op("detach.default detach_.default", "detach")(lambda a: a.detach())


# Slices read "to the end" in every dim they do not cut, so that a graph traced from them
# holds no batch size wherever the batch dim is (gradmesh's split and select write the
# sizes out, which its tracer rewrites for the batch in dim 0 only).
_TO_END = 2**63 - 1


def _cut(a, dim: int, start: int, stop: int, step: int = 1):
    dim %= a.ndim
    start, stop, step = slice(start, stop, step).indices(a.shape[dim])
    starts, stops, steps = [0] * a.ndim, [_TO_END] * a.ndim, [1] * a.ndim
    starts[dim], stops[dim], steps[dim] = start, max(start, stop), step
    return REGISTRY["slice"](a, starts=starts, stops=stops, steps=steps)


def _without_dim(a, dim: int, out_shape):
    """``a`` (size 1 in ``dim``) without that dim: a reshape to the output's shape."""
    if out_shape is None:
        return gm.squeeze(a, dim)
    return gm.reshape(a, out_shape)


@_op("split.Tensor split_with_sizes.default", "slice (per piece)")
def _split(a, size, dim=0):
    sizes = list(size) if isinstance(size, (list, tuple)) else None
    if sizes is None:
        n = a.shape[dim]
        sizes = [min(size, n - i) for i in range(0, n, size)]
    bounds = np.cumsum([0, *sizes]).tolist()
    return [_cut(a, dim, b, e) for b, e in zip(bounds, bounds[1:])]


@_op("chunk.default", "slice (per piece)")
def _chunk(a, chunks, dim=0):
    n = a.shape[dim]
    return _split(a, -(-n // chunks) if n else 1, dim)


@_op("unbind.int", "slice and reshape (per piece)", shape=True)
def _unbind(a, dim=0, *, out_shape=None):
    return [_without_dim(_cut(a, dim, i, i + 1), dim, out_shape) for i in range(a.shape[dim])]


@_op("select.int", "slice and reshape", shape=True)
def _select(a, dim, index, *, out_shape=None):
    index = index + a.shape[dim] if index < 0 else index
    return _without_dim(_cut(a, dim, index, index + 1), dim, out_shape)


_op("cat.default", "cat")(lambda tensors, dim=0: gm.cat(list(tensors), dim))
_op("stack.default", "stack")(lambda tensors, dim=0: gm.stack(list(tensors), dim))
_op("index_select.default", "index_select")(lambda a, dim, index: gm.index_select(a, dim, index))
_op("gather.default", "gather")(lambda a, dim, index, sparse_grad=False: gm.gather(a, dim, index))
_op("tril.default", "tril")(lambda a, k=0: gm.tril(a, k))
_op("triu.default", "triu")(lambda a, k=0: gm.triu(a, k))
_op("flip.default", "flip")(lambda a, dims: gm.flip(a, dims))
_op("roll.default", "roll")(lambda a, shifts, dims=(): gm.roll(a, shifts, _dims(dims)))


@_op("slice.Tensor", "slice (the tensor itself over a whole dim)")
def _slice(a, dim=0, start=None, end=None, step=1):
    size = a.shape[dim]
    start = 0 if start is None else start
    end = size if end is None or end > size else end
    # A slice over the whole dim is the tensor itself (torch writes one for ``x[:, -1]``).
    if start == 0 and end == size and step == 1:
        return a
    return _cut(a, dim, start, end, step)


# ---- dtypes and constants


_op("to.dtype _to_copy.default", "to (dtype)")(
    lambda a, dtype=None, *rest, **kw: a if dtype is None else a.to(dtype=_dtype(dtype))
)
_op("type_as.default", "type_as")(lambda a, other: a.type_as(other))
_op("lift_fresh_copy.default", "identity")(lambda a: a)


# Factories make their tensors where the model's weights are (torch's graph names the
# device it was exported on), so a model moved with ``.to(device)`` computes there.


def _factory_kw(root: Module, kw: dict) -> dict:
    weights = [*root.parameters(), *root.buffers()]
    return {"dtype": _dtype(kw.get("dtype")), "device": weights[0].device if weights else None}


@_op("zeros.default", "zeros", root=True)
def _zeros(root, shape, **kw):
    if any(isinstance(s, _BatchSize) for s in shape):
        return _Zeros(list(shape), _factory_kw(root, kw))
    return gm.zeros(*shape, **_factory_kw(root, kw))


@_op("ones.default", "ones", root=True)
def _ones(root, shape, **kw):
    return gm.ones(*shape, **_factory_kw(root, kw))


@_op("full.default", "full", root=True)
def _full(root, shape, value, **kw):
    return gm.full(shape, value, **_factory_kw(root, kw))


@_op("arange.default arange.start arange.start_step", "arange", root=True)
def _arange(root, *bounds, **kw):
    return gm.arange(*bounds, **_factory_kw(root, kw))


_op("zeros_like.default", "zeros_like")(
    lambda a, **kw: gm.zeros_like(a, dtype=_dtype(kw.get("dtype")))
)
_op("ones_like.default", "ones_like")(
    lambda a, **kw: gm.ones_like(a, dtype=_dtype(kw.get("dtype")))
)


# ---- in-place ops: ``ReLU(inplace=True)``, ``out += identity``, and BatchNorm's
# ``num_batches_tracked += 1`` on its buffer (``_buffer_add_``)


def _inplace(*names: str) -> None:
    """``aten.<op>_`` for each mapped ``aten.<op>`` named: the same gradmesh call, out of
    place, whose result then stands for the first argument wherever later steps read it
    (``_names_of``; where a view or an input would see the change, the model is refused)."""
    for name in names:
        base, overload = name.split(".")
        op = _OPS[f"aten.{name}"]
        _OPS[f"aten.{base}_.{overload}"] = dataclasses.replace(
            op, gradmesh=f"{op.gradmesh} (in place)", inplace=True
        )


_inplace(
    "relu.default",
    "sigmoid.default",
    "tanh.default",
    "leaky_relu.default",
    "elu.default",
    "selu.default",
    "celu.default",
    "hardtanh.default",
    "threshold.default",
    "hardsigmoid.default",
    "hardswish.default",
    "silu.default",
    "mish.default",
    "dropout.default",
    "gelu.default",
    "clamp.default",
    "clamp_min.default",
    "masked_fill.Scalar",
    "masked_fill.Tensor",
    "neg.default",
    "abs.default",
    "exp.default",
    "log.default",
    "sqrt.default",
    "rsqrt.default",
    "add.Tensor",
    "add.Scalar",
    "sub.Tensor",
    "sub.Scalar",
    "mul.Tensor",
    "mul.Scalar",
    "div.Tensor",
    "div.Scalar",
)


def _is_buffer_update(node, buffers: set[str]) -> bool:
    """BatchNorm's ``num_batches_tracked += 1``: an in-place add to a buffer."""
    return str(node.target) == "aten.add_.Tensor" and getattr(node.args[0], "name", None) in buffers


def _buffer_add_(owner, a, b, alpha=1):
    """A buffer's in-place update: torch's modules write their buffers only in training
    (both exported graphs hold what the module did in one mode; the owner's mode rules)."""
    return a.add_(b, alpha=alpha) if owner.training else a


# Checks torch.export inserts (dtypes, sizes): gradmesh's own ops check what they take.
_op("_assert_tensor_metadata.default _assert_scalar.default", "nothing (an export check)")(
    lambda *args, **kw: None
)

# Ops of the size arithmetic; not aten ops over tensors.
_SIZE_OPS = {"aten.sym_size.int", "aten.sym_numel.default"}


# ================================================================ the imported module ====


class _Submodule(Module):
    """A submodule of an imported model: it holds the torch submodule's parameters, buffers
    and children under their names; the root's graph computes with them."""

    def __init__(self, torch_type: str, torch_extra_repr: str = ""):
        super().__init__()
        self._torch_type = torch_type
        self._torch_extra_repr = torch_extra_repr

    def _get_name(self) -> str:
        return self._torch_type

    def extra_repr(self) -> str:
        return self._torch_extra_repr

    def forward(self, *args):
        raise TypeError(
            f"{self._torch_type}: a submodule of a model imported with from_torch computes "
            f"only as part of the whole model; call the model returned by from_torch"
        )


@dataclass
class _Step:
    node: str
    fn: Callable
    args: tuple
    kwargs: dict
    owner: str | None  # the module path, for mode-dependent ops
    lazy_zeros: bool = False
    # An in-place op's first argument, under every name later steps read it by (the
    # argument, and what it changed in place before): each becomes the op's result.
    replaces: tuple[str, ...] = ()


class _Program:
    """One exported graph as a list of steps over named values."""

    def __init__(self, ep: ExportedProgram):
        signature = ep.graph_signature
        self.inputs: list[tuple[str, str, Any]] = []
        for spec in signature.input_specs:
            value = (
                ep.constants.get(spec.target) if spec.kind == InputKind.CONSTANT_TENSOR else None
            )
            self.inputs.append(
                (spec.arg.name, spec.kind.name, value if value is None else _gm(value))
            )
        # A user output is a value of the graph (by name) or a constant.
        self.outputs = [
            (getattr(spec.arg, "name", None), getattr(spec.arg, "value", None))
            for spec in signature.output_specs
            if spec.kind == OutputKind.USER_OUTPUT
        ]
        self.targets = {spec.arg.name: spec.target for spec in signature.input_specs}
        self.out_spec = ep.call_spec.out_spec
        buffers = {s.arg.name for s in signature.input_specs if s.kind == InputKind.BUFFER}
        order = {node: i for i, node in enumerate(ep.graph.nodes)}
        self.steps = [
            _step(node, buffers, order) for node in ep.graph.nodes if node.op == "call_function"
        ]

    def __deepcopy__(self, memo) -> "_Program":
        return self  # never changed after import: a copied model shares it

    def run(self, root: "TorchModule", inputs: list) -> Any:
        env: dict[str, Any] = {}
        user = iter(inputs)
        for name, kind, constant in self.inputs:
            if kind == "USER_INPUT":
                env[name] = next(user)
            elif kind in ("PARAMETER", "BUFFER"):
                env[name] = root._tensor_at(self.targets[name])
            else:
                env[name] = constant
        for step in self.steps:
            args = _resolve(step.args, env, step.lazy_zeros)
            kwargs = _resolve(step.kwargs, env, step.lazy_zeros)
            if step.owner is not None:
                args = (root._module_at(step.owner), *args)
            result = step.fn(*args, **kwargs)
            for name in step.replaces:
                env[name] = result
            env[step.node] = result
        flat = [_materialise(env[name]) if name else value for name, value in self.outputs]
        return pytree.tree_unflatten(flat, self.out_spec)


def _step(node, buffers: set[str], order: dict) -> _Step:
    target = node.target
    if target in _PYTHON_OPS:
        return _Step(node.name, _PYTHON_OPS[target], node.args, node.kwargs, None)
    name = str(target)
    if name in _SIZE_OPS:
        return _Step(node.name, _sym_size, node.args, node.kwargs, None)
    if name in _RESHAPES and _output_shape(node) is not None:
        shape = _output_shape(node)
        return _Step(node.name, lambda a, *_, **__: gm.reshape(a, shape), node.args, {}, None)
    if _is_buffer_update(node, buffers):
        return _Step(node.name, _buffer_add_, node.args, node.kwargs, _module_path(node))
    op = _OPS[name]
    owner = "" if op.root else _module_path(node) if op.owner else None
    kwargs = {**node.kwargs, "out_shape": _output_shape(node)} if op.shape else node.kwargs
    step = _Step(node.name, op.fn, node.args, kwargs, owner, op.lazy_zeros)
    if op.inplace:
        names = _names_of(node.args[0], node, order)
        assert names is not None  # else refused at import (_node_problem)
        step.replaces = names
    return step


def _names_of(value, node, order: dict) -> tuple[str, ...] | None:
    """The names under which later steps read graph value ``value``, which ``node``
    changes in place: ``value`` and, if it is an in-place op's result, that op's argument
    (and so on). None where something else would see the change, which gradmesh's
    out-of-place op cannot give it: an input, parameter or buffer, a view of another
    value, or a view of one of these taken before ``node``."""
    names: list[str] = []
    while value.op == "call_function":
        earlier_views = (u for u in value.users if _alias(u) == "view" and order[u] < order[node])
        if any(earlier_views):
            return None
        names.append(value.name)
        kind = _alias(value)
        if kind is None:
            return tuple(names)
        if kind == "view":
            return None
        value = value.args[0]  # an in-place op's result: its argument, changed
    return None


def _alias(node) -> str | None:
    """What ``node``'s output is to its first input: "view", "in place" (an in-place
    op's result) or None (new memory)."""
    schema = getattr(node.target, "_schema", None)
    infos = [r.alias_info for r in schema.returns] if schema is not None else []
    if not any(infos):
        return None
    return "in place" if any(i is not None and i.is_write for i in infos) else "view"


# Reshapes whose target shape gradmesh would compute in full, batch size included: they
# become a reshape to the output shape export inferred, with its batch-dependent dim as -1.
_RESHAPES = {
    f"aten.{name}"
    for name in (
        "flatten.using_ints unflatten.int unsqueeze.default squeeze.dim squeeze.dims "
        "squeeze.default view.default reshape.default _unsafe_view.default"
    ).split()
}


def _output_shape(node) -> list | None:
    """The shape export inferred for ``node``'s output (its first, for a list of tensors)
    with the batch-dependent dim as -1; None where that is not one dim."""
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        return None
    shape: list[int | None] = [s if isinstance(s, int) else None for s in value.shape]
    return [-1 if s is None else s for s in shape] if shape.count(None) <= 1 else None


def _sym_size(a, dim=None):
    # The only symbolic dim is the batch dim: a size read from it depends on the batch.
    return _BatchSize(a.shape[dim]) if dim is not None else _BatchSize(a.numel())


def _resolve(value, env, lazy_zeros: bool):
    """An argument with the graph's values in place of its nodes."""
    if isinstance(value, torch.fx.Node):
        found = env[value.name]
        return found if lazy_zeros else _materialise(found)
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, env, lazy_zeros) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, env, lazy_zeros) for k, v in value.items()}
    return value


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return "" if path.startswith("_empty_nn_module_stack") else path


def _module_type(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][1].rsplit(".", 1)[-1] if stack else ""


class TorchModule(Module):
    """A PyTorch module imported by :func:`from_torch`: torch's submodules, parameters and
    buffers by name, and a ``forward`` that runs the exported graph with gradmesh ops."""

    def __init__(self, torch_type: str, programs: dict[bool, _Program]):
        super().__init__()
        self._torch_type = torch_type
        self._programs = programs

    def _get_name(self) -> str:
        return f"TorchModule[{self._torch_type}]"

    def forward(self, *inputs):
        flat = [_input(x) for x in pytree.tree_leaves(inputs)]
        program = self._programs[self.training]
        expected = sum(kind == "USER_INPUT" for _, kind, _ in program.inputs)
        if len(flat) != expected:
            raise TypeError(
                f"{self._torch_type}: the imported forward takes {expected} tensor input(s) "
                f"(as the example inputs given to from_torch), got {len(flat)}"
            )
        return program.run(self, flat)

    def _module_at(self, path: str) -> Module:
        return self.get_submodule(path) if path else self

    def _tensor_at(self, target: str) -> Tensor:
        path, _, name = target.rpartition(".")
        module = self._module_at(path)
        found = module._parameters.get(name)
        return found if found is not None else module._buffers[name]


def _input(x) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, torch.Tensor):
        return _gm(x)
    return gm.as_tensor(np.asarray(x))


def _gm(t: torch.Tensor) -> Tensor:
    return gm.tensor(t.detach().cpu().numpy().copy())


# ============================================================== the module tree =========


def _mirror(module: torch.nn.Module, root: TorchModule) -> None:
    """Give ``root`` torch's submodules, parameters and buffers under the same names; a
    torch object reached twice (tied weights, a shared submodule) stays one object."""
    seen: dict[int, Any] = {id(module): root}

    def copy(src: torch.nn.Module, dst: Module) -> None:
        dst.training = src.training  # each submodule's own mode, as torch's
        for name, p in src._parameters.items():
            if p is not None and id(p) not in seen:
                seen[id(p)] = Parameter(_gm(p), requires_grad=p.requires_grad)
            dst.register_parameter(name, None if p is None else seen[id(p)])
        persistent = set(src._buffers) - set(src._non_persistent_buffers_set)
        for name, b in src._buffers.items():
            if b is not None and id(b) not in seen:
                seen[id(b)] = _gm(b)
            dst.register_buffer(name, None if b is None else seen[id(b)], name in persistent)
        for name, child in src._modules.items():
            if child is None:
                continue
            if id(child) not in seen:
                seen[id(child)] = _Submodule(type(child).__name__, child.extra_repr())
                copy(child, seen[id(child)])
            setattr(dst, name, seen[id(child)])

    copy(module, root)


# ====================================================================== export ===========


def _export(module, inputs: tuple, dynamic_batch: bool) -> ExportedProgram:
    dynamic = None
    if dynamic_batch:
        batch = Dim("batch")
        dynamic = pytree.tree_map(
            lambda x: {0: batch} if isinstance(x, torch.Tensor) and x.ndim > 0 else None,
            inputs,
        )
    try:
        with warnings.catch_warnings():
            # torch's nn.LSTM re-assigns its flat weight list while exported: not the user's
            # concern, and the weights are read from the module's parameters anyway.
            warnings.filterwarnings("ignore", message=".*_flat_weights.*assigned during export")
            return torch.export.export(module, inputs, dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 - every export failure becomes one clear error
        raise UnsupportedModelError(_SOURCE, [_export_failure(e, dynamic_batch)]) from None


def _export_failure(e: Exception, dynamic_batch: bool) -> Unsupported:
    text = str(e)
    where = _user_line(text)
    if "data-dependent" in text or "DataDependent" in type(e).__name__:
        return Unsupported(
            "data-dependent control flow",
            where,
            "the forward branches on a tensor's value or reads it as a Python number (such "
            "as `if x.sum() > 0:` or `float(t)`), which one graph cannot express; compute "
            "both branches and select with torch.where",
        )
    if dynamic_batch and "Constraints violated" in text:
        return Unsupported(
            "batch-size-dependent code",
            where,
            "the forward fixes the batch size (dim 0 of the inputs), for instance with "
            "x.view(32, -1); write x.view(x.shape[0], -1), or pass dynamic_batch=False",
        )
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return Unsupported("torch.export failure", where, f"{type(e).__name__}: {first}")


def _user_line(text: str) -> str:
    """The user's code line that torch names in an export error ('file:line: code')."""
    found = re.search(
        r'The following call raised this error:\s*File "([^"]+)", line (\d+), in \w+\s*\n\s*(.+)',
        text,
    )
    return f"{found[1]}:{found[2]}: {found[3].strip()}" if found else ""


def _unsupported(programs: list[ExportedProgram]) -> list[Unsupported]:
    """Every node of every graph that maps onto nothing, once per (op, module path)."""
    found: dict[tuple[str, str], Unsupported] = {}
    for ep in programs:
        for spec in ep.graph_signature.input_specs:
            if spec.kind not in (
                InputKind.PARAMETER,
                InputKind.BUFFER,
                InputKind.USER_INPUT,
                InputKind.CONSTANT_TENSOR,
            ):
                key = (spec.kind.name, spec.arg.name)
                found[key] = Unsupported(spec.kind.name, spec.arg.name, "not a tensor input")
        order = {node: i for i, node in enumerate(ep.graph.nodes)}
        buffers = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.BUFFER}
        for node in ep.graph.nodes:
            problem = None if _is_buffer_update(node, buffers) else _node_problem(node, order)
            if problem is not None:
                found.setdefault((problem.op, problem.where), problem)
    return list(found.values())


def _node_problem(node, order: dict) -> Unsupported | None:
    # get_attr nodes are the sub-graphs of higher-order operators, reported with them.
    if node.op != "call_function":
        return None
    op = _OPS.get(str(node.target))
    if op is not None and op.inplace and _names_of(node.args[0], node, order) is None:
        return Unsupported(
            str(node.target),
            _module_path(node),
            f"it changes {node.args[0].name} in place, and a view of it, an input, a "
            "parameter or a buffer would see the change; gradmesh computes it out of place: "
            "use the out-of-place op there (inplace=False)",
        )
    if op is not None or node.target in _PYTHON_OPS or str(node.target) in _SIZE_OPS:
        return None
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return Unsupported(
            f"torch.{node.target.name()}",
            _module_path(node),
            "a higher-order operator runs sub-graphs, which a gradmesh graph does not "
            "have; compute every branch and select with torch.where",
        )
    kind = _module_type(node)
    return Unsupported(
        str(node.target),
        _module_path(node),
        f"in {kind}: gradmesh's op registry has no equivalent"
        if kind
        else "gradmesh's op registry has no equivalent",
    )


def _check_batch(inputs: tuple) -> None:
    for i, x in enumerate(pytree.tree_leaves(inputs)):
        if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] < 2:
            raise ValueError(
                f"from_torch: example_inputs[{i}] has a batch size of {x.shape[0]} (shape "
                f"{tuple(x.shape)}); with dynamic_batch=True give a batch size above 1 "
                f"(torch.export fixes a dimension of size 0 or 1), or pass dynamic_batch=False"
            )


def from_torch(module: torch.nn.Module, *example_inputs, dynamic_batch: bool = True) -> TorchModule:
    """``module`` as a gradmesh module, through ``torch.export`` (see the module docstring).

    ``example_inputs``: tensors as ``module(*example_inputs)`` takes them, with a batch size
    above 1. ``dynamic_batch``: dim 0 of every input is the batch size and may change (the
    imported model and the graphs traced from it work at any batch size); ``False`` fixes
    every shape to the examples'. Raises ``UnsupportedModelError`` listing every op or
    feature gradmesh cannot express, with the module path where each occurs.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    inputs = tuple(example_inputs)
    if dynamic_batch:
        _check_batch(inputs)
    modes = [(m, m.training) for m in module.modules()]  # each submodule's, restored after
    exported = {}
    try:
        for mode in (True, False):
            module.train(mode)
            exported[mode] = _export(module, inputs, dynamic_batch)
    finally:
        for m, mode in modes:
            m.training = mode
    unsupported = _unsupported(list(exported.values()))
    if unsupported:
        raise UnsupportedModelError(_SOURCE, unsupported)
    root = TorchModule(type(module).__name__, {m: _Program(ep) for m, ep in exported.items()})
    _mirror(module, root)
    return root


def to_torch_state_dict(model: Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as torch tensors (copies), which the torch module the model was
    imported from accepts with ``load_state_dict(..., strict=True)``."""
    return {
        name: torch.from_numpy(np.array(value.detach().cpu().numpy(), copy=True))
        for name, value in model.state_dict().items()
    }
