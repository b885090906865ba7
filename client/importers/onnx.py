"""``gradmesh.from_onnx``: an ONNX model as a gradmesh module, mapped onto the op registry.

The model's float initializers become the module's parameters (trainable, with
gradients), the running mean and variance of ``BatchNormalization`` become buffers, and
integer or boolean initializers and ``Constant`` nodes stay constants of the graph. The
module's ``forward(*inputs)`` interprets the ONNX graph node by node with gradmesh ops,
so ``backward()``, the optimizers and ``gradmesh.core.graph.trace`` (hence a worker or a
coordinator job) see ordinary gradmesh ops. Nothing of the model runs as code. An exact
GELU written out with ``Erf`` (exporters before opset 20) imports as one ``gelu``.

Shapes are computed, not traced: ``Shape`` and the integer arithmetic on its result
(``Gather``, ``Slice``, ``Concat``, ``Unsqueeze`` ... of a shape) run with NumPy on the
shapes at hand, and a ``Reshape`` to a computed shape keeps the batch free by writing
-1 where the batch goes, so a model exported with a dynamic batch imports with one.

Parameter names: an ONNX name that is a dotted path of identifiers (``0.weight``,
``encoder.layers.0.linear1.bias``, the names ``torch.onnx.export`` gives) is the state
dict key unchanged, through submodules as in torch; any other name has each character
outside ``[A-Za-z0-9_]`` replaced by ``_`` (``onnx::Conv_22`` becomes ``onnx__Conv_22``),
and a clash gets a numbered suffix. ``module.onnx_names`` maps each state dict key to its
ONNX name. Every op the registry cannot express is listed in one ``UnsupportedModelError``.

>>> import gradmesh, gradmesh.core as gm
>>> model = gradmesh.from_onnx("model.onnx")                      # doctest: +SKIP
>>> loss = gm.nn.functional.cross_entropy(model(x), y)             # doctest: +SKIP
>>> loss.backward()                                                # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core.nn import Module, Parameter
from gradmesh.core.registry import REGISTRY
from gradmesh.core.tensor import Tensor

from .errors import Unsupported, UnsupportedModelError

__all__ = ["OP_TABLE", "MIN_OPSET", "OnnxModule", "from_onnx"]

MIN_OPSET = 17
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _onnx():
    try:
        import onnx
    except ImportError:  # an extra: say how to get it
        raise ImportError(
            "gradmesh.from_onnx needs the onnx package: pip install 'gradmesh[onnx]'"
        ) from None
    return onnx


class Refused(Exception):
    """A node the registry cannot express (an attribute value, a computed shape)."""


# ------------------------------------------------------------------ the op table ----------
# ONNX op type -> (handler, the registry ops it maps onto). docs/import.md's table is
# checked against this one. A handler takes (ctx, node, inputs) and returns the outputs.

Handler = Callable[["_Context", Any, list], list]
OP_TABLE: dict[str, tuple[Handler, str]] = {}


def _op(op_type: str, registry_ops: str):
    def register(fn: Handler) -> Handler:
        OP_TABLE[op_type] = (fn, registry_ops)
        return fn

    return register


class _Context:
    """What a handler needs besides its inputs: the node's attributes and the batch."""

    def __init__(self, onnx_mod, batch: int | None):
        self.helper = onnx_mod.helper
        self.numpy_helper = onnx_mod.numpy_helper
        self.batch = batch
        self.batched = False  # does the current node read a value that depends on the batch?

    def attrs(self, node) -> dict:
        out = {}
        for a in node.attribute:
            v = self.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            elif a.type == a.TENSOR:
                v = self.numpy_helper.to_array(v)
            out[a.name] = v
        return out


def _static(x, what: str) -> np.ndarray:
    """A value that must be known when the graph is traced (a shape, axes, indices)."""
    if x is None:
        raise Refused(f"{what} is missing")
    if isinstance(x, Tensor):
        raise Refused(f"{what} is computed from tensor values; only shapes can be computed")
    return np.asarray(x)


def _tensor(x, like: Tensor | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x
    array = np.asarray(x)
    if like is None:
        return gm.tensor(array)
    if array.dtype.kind == "f" and array.dtype != like.dtype.np:
        array = array.astype(like.dtype.np)
    return gm.tensor(array, device=like.device)  # constants join the model's device


def _any_tensor(xs) -> Tensor | None:
    return next((x for x in xs if isinstance(x, Tensor)), None)


def _reshape(ctx: _Context, x, shape: Sequence[int]):
    """``x.reshape(shape)`` that works at any batch size: a shape computed from another
    value's shape holds the batch size where the batch goes; -1 goes there instead (it
    resolves to the same size now, and to the right one at another batch size). A static
    value (a NumPy array of a shape computation) is reshaped as it is."""
    if not isinstance(x, Tensor):
        return np.reshape(x, shape)
    shape = [int(s) for s in shape]
    b = ctx.batch if ctx.batched else None  # a weight's reshape keeps its sizes
    if -1 not in shape and b and b > 1:
        at = next((i for i, s in enumerate(shape) if s % b == 0 and s > 0), None)
        if at is not None:
            shape[at] = -1
    return x.reshape(shape)


def _axes(ctx, node, inputs, at: int, ndim: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or the input at index ``at`` (newer)."""
    axes = ctx.attrs(node).get("axes")
    if axes is None and len(inputs) > at and inputs[at] is not None:
        axes = _static(inputs[at], "axes").reshape(-1).tolist()
    return None if axes is None else [int(a) % ndim for a in axes]


# -- elementwise ---------------------------------------------------------------------------


def _binary(np_fn, gm_fn):
    def run(ctx, node, inputs):
        a, b = inputs
        if not isinstance(a, Tensor) and not isinstance(b, Tensor):
            return [np_fn(np.asarray(a), np.asarray(b))]
        like = _any_tensor([a, b])
        return [gm_fn(_tensor(a, like), _tensor(b, like))]

    return run


def _int_div(a, b):
    if a.dtype.kind in "iu":
        return (np.trunc(a / b)).astype(a.dtype)  # ONNX truncates integer division
    return a / b


for _name, _np, _gm, _reg in [
    ("Add", np.add, gm.add, "add"),
    ("Sub", np.subtract, gm.sub, "sub"),
    ("Mul", np.multiply, gm.mul, "mul"),
    ("Div", _int_div, gm.div, "div"),
    ("Equal", np.equal, gm.eq, "eq"),
    ("Less", np.less, gm.lt, "lt"),
    ("Greater", np.greater, gm.gt, "gt"),
    ("LessOrEqual", np.less_equal, gm.le, "le"),
    ("GreaterOrEqual", np.greater_equal, gm.ge, "ge"),
    ("And", np.logical_and, gm.logical_and, "logical_and"),
    ("Or", np.logical_or, gm.logical_or, "logical_or"),
    ("Max", np.maximum, gm.maximum, "maximum"),
    ("Min", np.minimum, gm.minimum, "minimum"),
]:
    _op(_name, _reg)(_binary(_np, _gm))


@_op("Pow", "pow")
def _pow(ctx, node, inputs):
    x, y = inputs
    if not isinstance(x, Tensor):
        if isinstance(y, Tensor):
            return [gm.pow(_tensor(x, y), y)]
        return [np.power(np.asarray(x), np.asarray(y)).astype(np.asarray(x).dtype)]
    if not isinstance(y, Tensor) and np.asarray(y).size == 1:
        return [gm.pow(x, float(np.asarray(y).reshape(())))]
    return [gm.pow(x, _tensor(y, x))]


def _unary(np_fn, gm_fn):
    def run(ctx, node, inputs):
        (x,) = inputs[:1]
        if isinstance(x, Tensor) or np_fn is None:
            return [gm_fn(_tensor(x))]
        return [np_fn(np.asarray(x))]

    return run


for _uname, _unp, _ugm, _ureg in [
    ("Neg", np.negative, gm.neg, "neg"),
    ("Abs", np.abs, gm.abs, "abs"),
    ("Sqrt", np.sqrt, gm.sqrt, "sqrt"),
    ("Exp", np.exp, gm.exp, "exp"),
    ("Log", np.log, gm.log, "log"),
    ("Sin", np.sin, gm.sin, "sin"),
    ("Cos", np.cos, gm.cos, "cos"),
    ("Tanh", np.tanh, gm.tanh, "tanh"),
    ("Sigmoid", None, gm.sigmoid, "sigmoid"),
    ("Relu", None, gm.relu, "relu"),
    ("Softplus", None, F.softplus, "softplus"),
    ("Reciprocal", np.reciprocal, gm.reciprocal, "div"),
    ("Not", np.logical_not, gm.logical_not, "logical_not"),
    ("Identity", lambda a: a, lambda a: a, "(none)"),
]:
    _op(_uname, _ureg)(_unary(_unp, _ugm))


@_op("LeakyRelu", "leaky_relu")
def _leaky_relu(ctx, node, inputs):
    return [F.leaky_relu(_tensor(inputs[0]), ctx.attrs(node).get("alpha", 0.01))]


@_op("Gelu", "gelu")
def _gelu(ctx, node, inputs):
    return [F.gelu(_tensor(inputs[0]), approximate=ctx.attrs(node).get("approximate", "none"))]


@_op("Clip", "clamp, maximum, minimum")
def _clip(ctx, node, inputs):
    x = _tensor(inputs[0])
    low, high = (inputs[i] if len(inputs) > i else None for i in (1, 2))
    if isinstance(low, Tensor) or isinstance(high, Tensor):
        # Bounds that are initializers (parameters here): elementwise, with gradients.
        x = x if low is None else gm.maximum(x, _tensor(low, x))
        return [x if high is None else gm.minimum(x, _tensor(high, x))]
    bounds = [None if b is None else float(np.asarray(b).reshape(())) for b in (low, high)]
    return [gm.clamp(x, *bounds)]


@_op("Where", "where")
def _where_op(ctx, node, inputs):
    cond, a, b = inputs
    if not any(isinstance(v, Tensor) for v in inputs):
        return [np.where(cond, a, b)]
    like = _any_tensor([a, b])
    return [gm.where(_tensor(cond, like), _tensor(a, like), _tensor(b, like))]


@_op("Cast", "cast")
def _cast(ctx, node, inputs):
    to = ctx.helper.tensor_dtype_to_np_dtype(ctx.attrs(node)["to"])
    x = inputs[0]
    if not isinstance(x, Tensor):
        return [np.asarray(x).astype(to)]
    try:
        dtype = getattr(gm, np.dtype(to).name)
    except AttributeError:
        raise Refused(f"cast to {np.dtype(to).name}: no such gradmesh dtype") from None
    return [x.to(dtype)]


# -- activations: elu family, hardsigmoid, prelu, shrink, erf (and Split, for GLU) ---------


@_op("Elu", "elu")
def _elu(ctx, node, inputs):
    return [F.elu(_tensor(inputs[0]), ctx.attrs(node).get("alpha", 1.0))]


@_op("Celu", "elu")
def _celu(ctx, node, inputs):
    return [F.celu(_tensor(inputs[0]), ctx.attrs(node).get("alpha", 1.0))]


@_op("Selu", "elu")
def _selu(ctx, node, inputs):
    at = ctx.attrs(node)
    if "alpha" not in at and "gamma" not in at:
        return [F.selu(_tensor(inputs[0]))]  # torch's constants, of which ONNX's are float32
    alpha, gamma = at.get("alpha", 1.67326319217681884765625), at.get("gamma", 1.0507009873554805)
    return [REGISTRY["elu"](_tensor(inputs[0]), alpha=alpha, scale=gamma)]


@_op("HardSigmoid", "mul, add, hardtanh")
def _hard_sigmoid(ctx, node, inputs):
    at = ctx.attrs(node)
    x = _tensor(inputs[0]) * at.get("alpha", 0.2) + at.get("beta", 0.5)
    return [F.hardtanh(x, 0.0, 1.0)]


@_op("PRelu", "gt, mul, where")
def _prelu(ctx, node, inputs):
    x, slope = _tensor(inputs[0]), _tensor(inputs[1], _tensor(inputs[0]))
    return [gm.where(x > 0, x, slope * x)]  # slope broadcasts to x as ONNX says


@_op("Softsign", "abs, add, div")
def _softsign(ctx, node, inputs):
    return [F.softsign(_tensor(inputs[0]))]


@_op("Shrink", "gt, lt, sub, add, where")
def _shrink(ctx, node, inputs):
    at = ctx.attrs(node)
    x, lambd, bias = _tensor(inputs[0]), at.get("lambd", 0.5), at.get("bias", 0.0)
    return [gm.where(x < -lambd, x + bias, gm.where(x > lambd, x - bias, 0.0))]


@_op("ThresholdedRelu", "gt, where")
def _thresholded_relu(ctx, node, inputs):
    return [F.threshold(_tensor(inputs[0]), ctx.attrs(node).get("alpha", 1.0), 0.0)]


@_op("Erf", "erf")
def _erf_op(ctx, node, inputs):
    return [gm.erf(_tensor(inputs[0]))]


@_op("Split", "slice")
def _split_op(ctx, node, inputs):
    x, at = inputs[0], ctx.attrs(node)
    axis = at.get("axis", 0) % len(_shape_of(x))
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = [int(s) for s in _static(inputs[1], "split").reshape(-1)]
    else:  # equal pieces, the last one smaller (opset 18's num_outputs)
        n = at.get("num_outputs", len(node.output))
        sizes = [-(-_shape_of(x)[axis] // n)] * n
        sizes[-1] = _shape_of(x)[axis] - sizes[0] * (n - 1)
    if not isinstance(x, Tensor):
        return np.split(np.asarray(x), np.cumsum(sizes)[:-1], axis)
    return list(gm.split(x, sizes, axis))


# -- products, convolutions, pooling, normalization -----------------------------------------


@_op("MatMul", "matmul")
def _matmul(ctx, node, inputs):
    a, b = inputs
    like = _any_tensor([a, b])
    return [gm.matmul(_tensor(a, like), _tensor(b, like))]


@_op("Gemm", "linear, matmul, mul, add")
def _gemm(ctx, node, inputs):
    at = ctx.attrs(node)
    a, b = _tensor(inputs[0]), _tensor(inputs[1])
    c = inputs[2] if len(inputs) > 2 else None
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    if at.get("transA", 0):
        a = a.permute(1, 0)
    if at.get("transB", 0) and alpha == 1.0 and beta == 1.0:
        # torch's nn.Linear exports as Gemm(transB=1): the same op as torch computes.
        return [F.linear(a, b, None if c is None else _tensor(c, a))]
    if at.get("transB", 0):
        b = b.permute(1, 0)
    y = gm.matmul(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (_tensor(c, a) * beta if beta != 1.0 else _tensor(c, a))
    return [y]


def _spatial_pads(ctx, node, x: Tensor, kernel, strides, dilations) -> list[int]:
    """ONNX ``pads`` [top, left, bottom, right] (auto_pad resolved on the input's shape)."""
    at = ctx.attrs(node)
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        return list(at.get("pads", [0, 0, 0, 0])) if auto == "NOTSET" else [0, 0, 0, 0]
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - small if auto == "SAME_UPPER" else small)
    return begin + end


def _symmetric(x: Tensor, pads: list[int], pool: bool) -> tuple[Tensor, tuple[int, int]]:
    """Symmetric pads go to the op; asymmetric ones (a convolution's) to an explicit pad."""
    top, left, bottom, right = pads
    if (top, left) == (bottom, right):
        return x, (top, left)
    if pool:
        raise Refused(f"asymmetric pads {pads} on a pooling op")
    return F.pad(x, [left, right, top, bottom]), (0, 0)


def _two_d(at: dict, x: Tensor, what: str) -> None:
    if x.ndim != 4 or len(at.get("kernel_shape", [0, 0])) != 2:
        raise Refused(f"{what} on a {x.ndim}-D input: only 2-D (N, C, H, W) is in the registry")


@_op("Conv", "conv2d (pad)")
def _conv(ctx, node, inputs):
    at = ctx.attrs(node)
    x, w = _tensor(inputs[0]), _tensor(inputs[1])
    _two_d(at, x, "Conv")
    bias = _tensor(inputs[2], x) if len(inputs) > 2 and inputs[2] is not None else None
    kernel = at.get("kernel_shape", list(w.shape[2:]))
    strides, dilations = at.get("strides", [1, 1]), at.get("dilations", [1, 1])
    x, padding = _symmetric(x, _spatial_pads(ctx, node, x, kernel, strides, dilations), False)
    return [F.conv2d(x, w, bias, tuple(strides), padding, tuple(dilations), at.get("group", 1))]


@_op("MaxPool", "max_pool2d")
def _max_pool(ctx, node, inputs):
    at = ctx.attrs(node)
    x = _tensor(inputs[0])
    if len(node.output) > 1 and node.output[1]:
        raise Refused("the Indices output of MaxPool")
    if x.ndim == 3:
        dilation, ceil = at.get("dilations", [1])[0], bool(at.get("ceil_mode"))
        return [F.max_pool1d(x, *_pool1d(at, "MaxPool"), dilation, ceil)]
    _two_d(at, x, "MaxPool")
    kernel = at["kernel_shape"]
    strides, dilations = at.get("strides", [1, 1]), at.get("dilations", [1, 1])
    x, padding = _symmetric(x, _spatial_pads(ctx, node, x, kernel, strides, dilations), True)
    return [
        F.max_pool2d(
            x, tuple(kernel), tuple(strides), padding, tuple(dilations), bool(at.get("ceil_mode"))
        )
    ]


@_op("AveragePool", "avg_pool2d")
def _avg_pool(ctx, node, inputs):
    at = ctx.attrs(node)
    x = _tensor(inputs[0])
    if x.ndim == 3 and at.get("dilations", [1]) == [1]:
        ceil, count_pad = bool(at.get("ceil_mode")), bool(at.get("count_include_pad", 0))
        return [F.avg_pool1d(x, *_pool1d(at, "AveragePool"), ceil, count_pad)]
    _two_d(at, x, "AveragePool")
    if at.get("dilations", [1, 1]) != [1, 1]:
        raise Refused("AveragePool with dilations")
    kernel, strides = at["kernel_shape"], at.get("strides", [1, 1])
    x, padding = _symmetric(x, _spatial_pads(ctx, node, x, kernel, strides, [1, 1]), True)
    return [
        F.avg_pool2d(
            x,
            tuple(kernel),
            tuple(strides),
            padding,
            bool(at.get("ceil_mode")),
            bool(at.get("count_include_pad", 0)),
        )
    ]


@_op("GlobalAveragePool", "sum, div")
def _global_avg_pool(ctx, node, inputs):
    x = _tensor(inputs[0])
    return [x.mean(tuple(range(2, x.ndim)), keepdim=True)]


@_op("BatchNormalization", "batch_norm")
def _batch_norm(ctx, node, inputs):
    at = ctx.attrs(node)
    if at.get("training_mode", 0):
        raise Refused("training_mode=1 (only inference BatchNormalization imports)")
    x, scale, bias, mean, var = (_tensor(v) for v in inputs[:5])
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, at.get("epsilon", 1e-5))]


@_op("LayerNormalization", "layer_norm")
def _layer_norm(ctx, node, inputs):
    at = ctx.attrs(node)
    if len(node.output) > 1 and any(node.output[1:]):
        raise Refused("the Mean / InvStdDev outputs of LayerNormalization")
    x = _tensor(inputs[0])
    axis = at.get("axis", -1) % x.ndim
    shape = tuple(x.shape[axis:])
    scale = _tensor(inputs[1], x)
    bias = _tensor(inputs[2], x) if len(inputs) > 2 and inputs[2] is not None else None
    if tuple(scale.shape) != shape or (bias is not None and tuple(bias.shape) != shape):
        raise Refused(f"scale/bias not of the normalized shape {shape}")
    return [F.layer_norm(x, shape, scale, bias, at.get("epsilon", 1e-5))]


# -- padding, depth to space, instance norm, 1-d pools -------------------------------------


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


@_op("Pad", "pad")
def _pad(ctx, node, inputs):
    x = _tensor(inputs[0])
    mode = ctx.attrs(node).get("mode", "constant")
    if mode not in _PAD_MODES:
        raise Refused(f"Pad mode {mode!r} (constant, reflect and edge import)")
    pads = _static(inputs[1], "pads").reshape(-1).tolist()
    axes = _axes(ctx, node, inputs, 3, x.ndim) or list(range(x.ndim))
    begin, end = dict(zip(axes, pads[: len(axes)])), dict(zip(axes, pads[len(axes) :]))
    # F.pad lists (begin, end) from the last dim backwards, down to the first padded dim.
    first = min((a for a in axes if begin[a] or end[a]), default=x.ndim - 1)
    torch_pads = [
        int(p) for d in range(x.ndim - 1, first - 1, -1) for p in (begin.get(d, 0), end.get(d, 0))
    ]
    value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    value = float(_static(value, "constant_value")) if value is not None else None
    return [F.pad(x, torch_pads, _PAD_MODES[mode], value if mode == "constant" else None)]


@_op("DepthToSpace", "reshape, permute")
def _depth_to_space(ctx, node, inputs):
    at = ctx.attrs(node)
    x, b = _tensor(inputs[0]), int(at["blocksize"])
    if at.get("mode", "DCR") == "CRD":  # torch's pixel_shuffle
        return [F.pixel_shuffle(x, b)]
    n, c, h, w = x.shape
    x = _reshape(ctx, x, [n, b, b, c // (b * b), h, w]).permute(0, 3, 4, 1, 5, 2)
    return [_reshape(ctx, x, [n, c // (b * b), h * b, w * b])]


@_op("InstanceNormalization", "layer_norm, channel_affine")
def _instance_norm(ctx, node, inputs):
    x = _tensor(inputs[0])
    scale, bias = _tensor(inputs[1], x), _tensor(inputs[2], x)
    return [F.instance_norm(x, weight=scale, bias=bias, eps=ctx.attrs(node).get("epsilon", 1e-5))]


@_op("Mod", "remainder")
def _mod(ctx, node, inputs):
    if ctx.attrs(node).get("fmod", 0):
        a, b = (_static(v, "Mod(fmod=1) operands") for v in inputs)
        return [np.fmod(a, b)]
    return _binary(np.mod, gm.remainder)(ctx, node, inputs)


def _pool1d(at: dict, what: str) -> tuple[int, int, int]:
    """A 1-d MaxPool's or AveragePool's kernel, stride and padding."""
    if at.get("auto_pad", "NOTSET") != "NOTSET":
        raise Refused(f"{what} on a 3-D input with auto_pad {at['auto_pad']}")
    begin, end = at.get("pads", [0, 0])
    if begin != end:
        raise Refused(f"asymmetric pads {[begin, end]} on a pooling op")
    return at["kernel_shape"][0], at.get("strides", [1])[0], begin


@_op("Softmax", "softmax")
def _softmax(ctx, node, inputs):
    return [F.softmax(_tensor(inputs[0]), ctx.attrs(node).get("axis", -1))]


@_op("LogSoftmax", "log_softmax")
def _log_softmax(ctx, node, inputs):
    return [F.log_softmax(_tensor(inputs[0]), ctx.attrs(node).get("axis", -1))]


@_op("Dropout", "(none: inference)")
def _dropout(ctx, node, inputs):
    if len(inputs) > 2 and inputs[2] is not None and bool(_static(inputs[2], "training_mode")):
        raise Refused("training_mode=true (only inference Dropout imports)")
    x = inputs[0]
    mask = np.ones(tuple(x.shape), bool)
    return [x, mask][: len(node.output)]


def _reduce(np_fn, gm_name: str | Callable):
    """A Reduce* handler: ``gm_name`` is a Tensor method, or ``fn(x, axes, keepdim)``."""

    def run(ctx, node, inputs):
        at = ctx.attrs(node)
        x = inputs[0]
        ndim = np.ndim(x) if not isinstance(x, Tensor) else x.ndim
        axes = _axes(ctx, node, inputs, 1, max(ndim, 1))
        if axes is None or not axes:
            if at.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(ndim))
        keep = bool(at.get("keepdims", 1))
        if not isinstance(x, Tensor):
            return [np_fn(np.asarray(x), axis=tuple(axes), keepdims=keep)]
        if callable(gm_name):
            return [gm_name(x, list(axes), keep)]
        return [getattr(x, gm_name)(tuple(axes), keepdim=keep)]

    return run


_op("ReduceMean", "sum, div")(_reduce(np.mean, "mean"))
_op("ReduceSum", "sum")(_reduce(np.sum, "sum"))
_op("ReduceMax", "amax")(_reduce(np.max, "amax"))


# ---- losses and distances: F.normalize exports its norm as ReduceL2
def _np_l2(x, axis, keepdims):
    return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))


# torch's norm: gradient 0 at a zero vector (sqrt's is 0 / 0 there).
_op("ReduceL2", "sum, sqrt, where")(
    _reduce(_np_l2, lambda x, dims, keep: F._vector_norm(x, 2, dims, keep))
)


# -- shapes --------------------------------------------------------------------------------


def _shape_of(x) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, Tensor) else np.shape(x)


@_op("Shape", "(none: computed)")
def _shape(ctx, node, inputs):
    at = ctx.attrs(node)
    dims = _shape_of(inputs[0])
    return [np.array(dims[at.get("start", 0) : at.get("end", len(dims))], np.int64)]


@_op("Size", "(none: computed)")
def _size(ctx, node, inputs):
    return [np.array(math.prod(_shape_of(inputs[0])), np.int64)]


@_op("Constant", "(none: a constant)")
def _constant(ctx, node, inputs):
    at = ctx.attrs(node)
    for key, dtype in [
        ("value", None),
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ]:
        if key in at:
            return [np.asarray(at[key], dtype)]
    raise Refused(f"Constant with attribute {sorted(at)}")


@_op("ConstantOfShape", "(none: a constant)")
def _constant_of_shape(ctx, node, inputs):
    shape = _static(inputs[0], "the shape").astype(np.int64)
    value = ctx.attrs(node).get("value", np.zeros(1, np.float32))
    return [np.full(tuple(shape.tolist()), np.asarray(value).reshape(-1)[0], value.dtype)]


@_op("Range", "(none: computed)")
def _range(ctx, node, inputs):
    start, limit, delta = (_static(v, "a Range bound") for v in inputs)
    return [np.arange(start.item(), limit.item(), delta.item()).astype(start.dtype)]


@_op("Reshape", "reshape")
def _reshape_op(ctx, node, inputs):
    x, shape = inputs
    shape = _static(shape, "the target shape").astype(np.int64).tolist()
    dims = _shape_of(x)
    if not ctx.attrs(node).get("allowzero", 0):
        shape = [dims[i] if s == 0 else s for i, s in enumerate(shape)]
    return [_reshape(ctx, x, shape)]


@_op("Flatten", "reshape")
def _flatten(ctx, node, inputs):
    x = inputs[0]
    dims = _shape_of(x)
    axis = ctx.attrs(node).get("axis", 1) % (len(dims) + 1) if dims else 0
    inner = math.prod(dims[axis:])
    if not isinstance(x, Tensor):
        return [np.reshape(x, (-1, inner) if axis else (1, -1))]
    return [x.reshape(-1, inner) if axis else x.reshape(1, -1)]


@_op("Squeeze", "reshape")
def _squeeze(ctx, node, inputs):
    x = inputs[0]
    dims = _shape_of(x)
    axes = _axes(ctx, node, inputs, 1, max(len(dims), 1))
    if axes is None:
        axes = [i for i, d in enumerate(dims) if d == 1]
    shape = [d for i, d in enumerate(dims) if i not in axes]
    return [_reshape(ctx, x, shape)]


@_op("Unsqueeze", "reshape")
def _unsqueeze(ctx, node, inputs):
    x = inputs[0]
    dims = list(_shape_of(x))
    axes = _axes(ctx, node, inputs, 1, len(dims) + len(_static(inputs[1], "axes").reshape(-1)))
    for a in sorted(axes or []):
        dims.insert(a, 1)
    return [_reshape(ctx, x, dims)]


@_op("Transpose", "permute")
def _transpose(ctx, node, inputs):
    x = inputs[0]
    ndim = len(_shape_of(x))
    perm = ctx.attrs(node).get("perm", list(reversed(range(ndim))))
    if not isinstance(x, Tensor):
        return [np.transpose(x, perm)]
    return [x.permute(*perm)]


@_op("Concat", "cat")
def _concat(ctx, node, inputs):
    axis = ctx.attrs(node)["axis"]
    like = _any_tensor(inputs)
    if like is None:
        return [np.concatenate([np.asarray(v) for v in inputs], axis=axis)]
    return [gm.cat([_tensor(v, like) for v in inputs], axis)]


@_op("Slice", "slice (flip)")
def _slice(ctx, node, inputs):
    x = inputs[0]
    dims = _shape_of(x)
    starts = _static(inputs[1], "starts").reshape(-1).tolist()
    ends = _static(inputs[2], "ends").reshape(-1).tolist()
    axes = _axes(ctx, node, inputs, 3, len(dims)) or list(range(len(starts)))
    steps = [1] * len(starts)
    if len(inputs) > 4 and inputs[4] is not None:
        steps = _static(inputs[4], "steps").reshape(-1).tolist()
    index = [slice(None)] * len(dims)
    flips = []
    for a, start, end, step in zip(axes, starts, ends, steps):
        if step == 0:
            raise Refused("Slice with step 0")
        # ONNX clamps out-of-range bounds (INT64_MAX means "to the end"), as Python does.
        picked = range(*slice(int(start), int(end), int(step)).indices(dims[a]))
        if step > 0 or not isinstance(x, Tensor):
            # A backward range that ends before index 0 has stop -1: None in a slice.
            stop = None if picked.stop < 0 else picked.stop
            index[a] = slice(picked.start, stop, picked.step)
        elif picked:  # backwards: the same elements of the flipped dimension, forwards
            last = dims[a] - 1
            index[a] = slice(last - picked[0], last - picked[-1] + 1, -picked.step)
            flips.append(a)
        else:
            index[a] = slice(0, 0)
    if not isinstance(x, Tensor):
        return [np.asarray(x)[tuple(index)]]
    return [(gm.flip(x, flips) if flips else x)[tuple(index)]]


@_op("Gather", "index, embedding, reshape")
def _gather(ctx, node, inputs):
    x, idx = inputs
    dims = _shape_of(x)
    axis = ctx.attrs(node).get("axis", 0) % len(dims)
    if not isinstance(x, Tensor) and not isinstance(idx, Tensor):
        return [np.take(np.asarray(x), np.asarray(idx), axis=axis)]
    if isinstance(idx, Tensor):
        if axis == 0 and len(dims) == 2:
            return [F.embedding(idx, _tensor(x))]  # a lookup table: torch's nn.Embedding
        raise Refused("Gather with computed indices other than a 2-D table's rows")
    x = _tensor(x)
    idx = np.asarray(idx, np.int64)
    idx = np.where(idx < 0, idx + dims[axis], idx)
    picked = gm.index_select(x, axis, gm.tensor(idx.reshape(-1), device=x.device))
    shape = list(dims[:axis]) + list(idx.shape) + list(dims[axis + 1 :])
    return [_reshape(ctx, picked, shape)]


@_op("Expand", "expand")
def _expand(ctx, node, inputs):
    x, shape = inputs
    shape = _static(shape, "the shape").astype(np.int64).tolist()
    target = np.broadcast_shapes(_shape_of(x), tuple(shape))
    if not isinstance(x, Tensor):
        return [np.broadcast_to(x, target).copy()]
    if x.ndim < len(target):
        x = _reshape(ctx, x, [1] * (len(target) - x.ndim) + list(x.shape))
    return [x.expand(*target)]


# ------------------------------------------------------------------ the module -------------


class OnnxModule(Module):
    """An imported ONNX graph: ``forward(*inputs)`` returns the graph's outputs (one
    Tensor, or a tuple of them). ``input_names``/``output_names`` are the ONNX graph's;
    ``onnx_names`` maps each state dict key to its ONNX initializer name."""

    def __init__(self, onnx_mod, model, source: str, nodes: list | None = None):
        super().__init__()
        graph = model.graph
        object.__setattr__(self, "_nodes", list(graph.node if nodes is None else nodes))
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "onnx_names", {})
        object.__setattr__(self, "_constants", {})
        object.__setattr__(self, "_keys", {})  # ONNX name -> state dict key
        initializers = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]
        object.__setattr__(self, "_batched", _batched_inputs(graph, self.input_names))
        stats = _batch_norm_statistics(graph.node)
        for init in graph.initializer:
            array = onnx_mod.numpy_helper.to_array(init)
            if array.dtype.kind != "f":
                self._constants[init.name] = array
                continue
            key = self._register(init.name, array, buffer=init.name in stats)
            self._keys[init.name] = key
            self.onnx_names[key] = init.name

    def _register(self, onnx_name: str, array: np.ndarray, buffer: bool) -> str:
        key = _state_key(onnx_name, self)
        *path, leaf = key.split(".")
        owner = self
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, Module())
            owner = owner._modules[part]
        array = np.array(array)  # writable, owned
        if buffer:
            owner.register_buffer(leaf, gm.tensor(array))
        else:
            owner.register_parameter(leaf, Parameter(gm.tensor(array)))
        return key

    def _initial_values(self) -> dict:
        values: dict[str, Any] = dict(self._constants)
        state = dict(self.named_parameters()) | dict(self.named_buffers())
        for name, key in self._keys.items():
            values[name] = state[key]
        return values

    def forward(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"{self._source}: forward takes {len(self.input_names)} input(s) "
                f"{self.input_names}, got {len(inputs)}"
            )
        tensors = [x if isinstance(x, Tensor) else gm.as_tensor(np.asarray(x)) for x in inputs]
        batch = next((x.shape[0] for x, b in zip(tensors, self._batched) if b and x.ndim > 0), None)
        ctx = _Context(_onnx(), batch)
        values = self._initial_values()
        values.update(zip(self.input_names, tensors))
        # Values computed from a batched input (shapes of them included) hold the batch.
        batched = {n for n, b in zip(self.input_names, self._batched) if b}
        for node in self._nodes:
            args = [values.get(name) if name else None for name in node.input]
            ctx.batched = any(name in batched for name in node.input)
            if ctx.batched:
                batched.update(node.output)
            try:
                outs = OP_TABLE[node.op_type][0](ctx, node, args)
            except Refused as e:
                raise UnsupportedModelError(
                    self._source, [Unsupported(node.op_type, _node_name(node), str(e))]
                ) from None
            values.update((name, v) for name, v in zip(node.output, outs) if name)
        outs = [_tensor(values[name]) for name in self.output_names]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _node_name(node) -> str:
    return node.name or (node.output[0] if node.output else "")


def _batched_inputs(graph, names: list[str]) -> list[bool]:
    """Which inputs declare a symbolic (dynamic) first dimension: the batch."""
    by_name = {i.name: i for i in graph.input}
    out = []
    for name in names:
        dims = by_name[name].type.tensor_type.shape.dim
        out.append(bool(dims) and (bool(dims[0].dim_param) or not dims[0].HasField("dim_value")))
    return out


def _batch_norm_statistics(nodes) -> set[str]:
    """The running mean and variance of inference BatchNormalization nodes: buffers."""
    return {n.input[i] for n in nodes if n.op_type == "BatchNormalization" for i in (3, 4)}


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


def _state_key(name: str, module: Module) -> str:
    """The state dict key of the ONNX name ``name``: the name itself when it is a dotted
    path of identifiers that does not clash, else a sanitized flat name."""
    parts = name.split(".")
    if all(_IDENT.fullmatch(p) for p in parts) and _free_path(module, parts):
        return name
    flat = re.sub(r"[^A-Za-z0-9_]", "_", name) or "_"
    if flat[0].isdigit():
        flat = "_" + flat
    key, n = flat, 1
    while not _free_path(module, [key]):
        key, n = f"{flat}_{n}", n + 1
    return key


def _free_path(module: Module, parts: list[str]) -> bool:
    owner = module
    for part in parts[:-1]:
        if part in owner._modules:
            owner = owner._modules[part]
        elif hasattr(owner, part) or part in owner._parameters or part in owner._buffers:
            return False
        else:
            return True  # a new submodule: everything below it is free
    leaf = parts[-1]
    return not hasattr(owner, leaf)


# ------------------------------------------------------------------ from_onnx --------------


def from_onnx(path_or_bytes: str | os.PathLike | bytes) -> OnnxModule:
    """The ONNX model at ``path_or_bytes`` (a file path, or the serialized ``ModelProto``
    bytes) as a gradmesh module; see the module docstring. Raises
    ``UnsupportedModelError`` listing every op the registry cannot express, and
    ``ValueError`` for a file that is not an ONNX model or an opset before 17."""
    onnx_mod = _onnx()
    model, source = _read(onnx_mod, path_or_bytes)
    _check_opset(model, source)
    nodes = _fuse_erf_gelu(onnx_mod, model.graph)
    unsupported = [
        Unsupported(_op_name(n), _node_name(n), _reason(n))
        for n in nodes
        if n.domain not in _DEFAULT_DOMAINS or n.op_type not in OP_TABLE
    ]
    unsupported += [
        Unsupported(n.op_type, _node_name(n), reason)
        for n in nodes
        if n.op_type in OP_TABLE and (reason := _attribute_refusal(onnx_mod, n))
    ]
    if unsupported:
        raise UnsupportedModelError(source, unsupported)
    return OnnxModule(onnx_mod, model, source, nodes)


def _fuse_erf_gelu(onnx_mod, graph) -> list:
    """The graph's nodes with each exact GELU written out with ``Erf`` (what exporters
    emit before opset 20: x * 0.5 * (1 + erf(x / sqrt(2))), the products in any order)
    replaced by one ``Gelu`` node: one op instead of five."""
    nodes = list(graph.node)
    consts = _constant_values(onnx_mod, graph)
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}

    def only_consumer(name: str, op_type: str):
        users = consumers.get(name, [])
        ok = len(users) == 1 and users[0].op_type == op_type and name not in outputs
        return users[0] if ok else None

    def near(name: str, value: float) -> bool:
        v = consts.get(name)
        return v is not None and v.size == 1 and abs(float(v.reshape(())) - value) < 1e-6

    def other(node, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    fused: dict[int, Any] = {}  # id of a node to drop -> None, of the last one -> Gelu
    for erf in (n for n in nodes if n.op_type == "Erf"):
        scale = next((n for n in nodes if erf.input[0] in n.output), None)
        if scale is None or only_consumer(scale.output[0], "Erf") is None:
            continue
        x = scale.input[0]
        if not (
            (scale.op_type == "Div" and near(scale.input[1], math.sqrt(2)))
            or (scale.op_type == "Mul" and near(scale.input[1], 1 / math.sqrt(2)))
        ):
            continue
        add = only_consumer(erf.output[0], "Add")
        if add is None or not near(other(add, erf.output[0]), 1.0):
            continue
        mul1 = only_consumer(add.output[0], "Mul")
        mul2 = mul1 and only_consumer(mul1.output[0], "Mul")
        if mul2 is None:
            continue
        factors = {other(mul1, add.output[0]), other(mul2, mul1.output[0])}
        half = next((f for f in factors if f != x and near(f, 0.5)), None)
        if half is None or factors != {x, half}:
            continue
        gelu = onnx_mod.helper.make_node(
            "Gelu", [x], list(mul2.output), name=erf.name or mul2.output[0], approximate="none"
        )
        for n in (scale, erf, add, mul1):
            fused[id(n)] = None
        fused[id(mul2)] = gelu
    return [fused.get(id(n), n) for n in nodes if fused.get(id(n), n) is not None]


def _constant_values(onnx_mod, graph) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` outputs by name (for matching patterns)."""
    values = {i.name: onnx_mod.numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = onnx_mod.numpy_helper.to_array(a.t)
                elif a.name == "value_float":
                    values[n.output[0]] = np.array(a.f, np.float32)
    return values


def _read(onnx_mod, path_or_bytes) -> tuple[Any, str]:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, source = bytes(path_or_bytes), "ONNX model"
    else:
        source = os.fspath(path_or_bytes)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise FileNotFoundError(f"{source}: cannot read the ONNX file ({e.strerror})") from None
    try:
        model = onnx_mod.load_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{source}: not an ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node and not model.graph.output:
        raise ValueError(f"{source}: not an ONNX model (no graph)")
    if not isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        # Weights in external files sit next to the model.
        onnx_mod.external_data_helper.load_external_data_for_model(
            model, os.path.dirname(os.path.abspath(source))
        )
    return model, source


def _check_opset(model, source: str) -> None:
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    version = versions[0] if versions else 0
    if version < MIN_OPSET:
        raise ValueError(
            f"{source}: opset {version}; gradmesh imports ONNX opset {MIN_OPSET} or later. "
            f"Export again with a newer opset (torch.onnx.export(..., opset_version="
            f"{MIN_OPSET})) or convert it (onnx.version_converter.convert_version)."
        )


def _op_name(node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in _DEFAULT_DOMAINS else node.op_type


_REASONS = {
    "If": "control flow (subgraphs) is not expressible in a gradmesh graph",
    "Loop": "control flow (subgraphs) is not expressible in a gradmesh graph",
    "Scan": "control flow (subgraphs) is not expressible in a gradmesh graph",
}


def _attribute_refusal(onnx_mod, node) -> str:
    """Why a mapped op cannot import with these attributes or outputs ("" if it can);
    what depends on shapes is found when the model runs."""
    at = {a.name: onnx_mod.helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "BatchNormalization" and at.get("training_mode", 0):
        return "training_mode=1 (only inference BatchNormalization imports)"
    kernel_dims = len(at.get("kernel_shape", [0, 0]))
    if kernel_dims != 2 and not (op in ("MaxPool", "AveragePool") and kernel_dims == 1):
        if op in ("Conv", "MaxPool", "AveragePool"):
            return f"a {kernel_dims}-D kernel: only 2-D (and 1-D pools) are in the registry"
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "the Indices output of MaxPool"
    if op == "LayerNormalization" and any(node.output[1:]):
        return "the Mean / InvStdDev outputs of LayerNormalization"
    if op == "AveragePool" and any(d != 1 for d in at.get("dilations", [])):
        return "AveragePool with dilations"
    return ""


def _reason(node) -> str:
    if node.domain not in _DEFAULT_DOMAINS:
        return f"operator domain {node.domain!r} is not imported"
    return _REASONS.get(node.op_type, "no mapping onto the op registry")
