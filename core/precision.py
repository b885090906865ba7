"""The accumulation rule for float16 and bfloat16, applied in one place for every op.

PyTorch's CPU kernels compute half-precision tensors in float32 ("opmath") and round
once: an elementwise op rounds each result to float16/bfloat16, a reduction (``sum``,
``softmax``, ``matmul``, ``conv2d``, ``layer_norm``...) accumulates in float32 and rounds
the result. gradmesh does the same for every op of the registry: the dispatcher and the
compiled plan hand an op's kernel float32 copies of its half inputs and round its output
once to the dtype that the op's ``infer`` gives. Kernels never see a half array, so none
of them has to know the rule (nor NumPy's float16 loops, which accumulate in float16).

The ops in ``EXACT_IN_HALF`` only move or pick values, which is exact in any dtype: they
run on the half arrays directly and skip the two copies.

Optimizers apply the same rule to a half parameter op by op (each in-place op of torch's
update computes in float32 and rounds): ``gradmesh.core.optim``, "half precision".

>>> import gradmesh.core as gm
>>> x = gm.tensor([1.0, 2.0**-8, 2.0**-8], dtype=gm.bfloat16)
>>> x.sum()  # float32 accumulation: 1 + 2**-7, which bfloat16 holds
tensor(1.0078, dtype=gradmesh.bfloat16)
"""

from __future__ import annotations

import threading

import numpy as np

from . import dtypes
from .registry import Op, Spec

# Ops that copy, move or select elements: their result is exact in the input's dtype.
EXACT_IN_HALF = frozenset(
    (
        "cast",
        "cat",
        "clone",
        "expand",
        "flip",
        "gather",
        "index",
        "permute",
        "reshape",
        "slice",
        "stack",
        "stop_gradient",
        "to_device",
    )
)

_HALF_NP = tuple(d.np for d in dtypes.HALF)
_FLOAT32 = dtypes.float32.np


def is_half(np_dtype) -> bool:
    return np_dtype.itemsize == 2 and np_dtype in _HALF_NP


def computes_in_float32(op: Op, np_dtypes) -> bool:
    """Whether ``op`` over inputs of ``np_dtypes`` runs under the rule."""
    return op.name not in EXACT_IN_HALF and any(is_half(d) for d in np_dtypes)


def out_dtype(op: Op, arrays, attrs: dict) -> np.dtype:
    """The NumPy dtype of ``op``'s result over ``arrays``, from its ``infer``."""
    specs = [Spec(a.shape, dtypes.from_numpy(a.dtype)) for a in arrays]
    return op.infer(*specs, **attrs).dtype.np


def run(forward, xp, arrays, attrs: dict, out: np.dtype):
    """``forward`` over float32 copies of the half ``arrays``, rounded once to ``out``."""
    wide = [dtypes.astype(a, _FLOAT32) if is_half(a.dtype) else a for a in arrays]
    result = forward(xp, *wide, **attrs)
    return dtypes.astype(result, out) if is_half(out) and result.dtype != out else result


def forward_of(op: Op, in_specs, out_spec):
    """The forward a compiled plan runs for ``op`` at these input and output specs: the op's
    own, or one under the rule (plans know every dtype when they are compiled)."""
    if not computes_in_float32(op, [s.dtype.np for s in in_specs]):
        return op.forward
    out = out_spec.dtype.np

    def forward(xp, *arrays, **attrs):
        return run(op.forward, xp, arrays, attrs, out)

    return forward


# ---------------------------------------------------------------------------------------
# autocast: torch.autocast's CPU policy over the registry's ops
# ---------------------------------------------------------------------------------------

# The products run in the low precision type (torch's CPU "lower_precision_fp" list)...
AUTOCAST_LOW = frozenset(("conv2d", "linear", "matmul", "mm"))
# ...and the losses in float32 (its "fp32" list). log_softmax is here because gradmesh's
# cross_entropy is log_softmax + nll_loss and torch runs cross_entropy in float32; torch
# runs a bare log_softmax in its input's dtype.
AUTOCAST_FLOAT32 = frozenset(
    (
        "binary_cross_entropy_with_logits",
        "log_softmax",
        "mse_loss",
        "nll_loss",
        "nll_loss_weighted",
        "prod",
    )
)


class _AutocastState(threading.local):
    dtype: dtypes.DType | None = None


autocast_state = _AutocastState()


class autocast:
    """``torch.autocast`` for the CPU: inside, matmul, linear and conv2d cast their float32
    inputs to ``dtype`` (bfloat16 or float16), the losses (and log_softmax) cast half
    inputs to float32, and every other op runs in its inputs' dtype. The casts are ops,
    so gradients flow back to float32 parameters in float32 and traced graphs record them.
    The backward pass runs in the dtypes the forward pass chose (as torch's).

    >>> import gradmesh.core as gm
    >>> w = gm.ones(3, 2, requires_grad=True)
    >>> with gm.autocast(device_type="cpu", dtype=gm.bfloat16):
    ...     y = gm.ones(4, 3) @ w
    >>> y.dtype
    gradmesh.bfloat16
    """

    def __init__(self, device_type: str = "cpu", dtype=None, enabled: bool = True):
        if device_type != "cpu":
            raise ValueError(
                f"autocast: device_type {device_type!r} is not supported; gradmesh's autocast "
                f"follows torch's CPU policy (device_type='cpu')"
            )
        dtype = dtypes.bfloat16 if dtype is None else dtypes.as_dtype(dtype)
        if dtype not in dtypes.HALF:
            raise ValueError(f"autocast: dtype must be bfloat16 or float16, got {dtype}")
        self.dtype = dtype if enabled else None
        self._outer: list = []

    def __enter__(self) -> "autocast":
        self._outer.append(autocast_state.dtype)
        autocast_state.dtype = self.dtype
        return self

    def __exit__(self, *exc) -> None:
        autocast_state.dtype = self._outer.pop()


def autocast_inputs(op: Op, inputs):
    """``inputs`` cast as the autocast policy wants them for ``op``."""
    if op.name in AUTOCAST_LOW:
        low = autocast_state.dtype
        return tuple(t.to(low) if t.dtype is dtypes.float32 else t for t in inputs)
    if op.name in AUTOCAST_FLOAT32:
        return tuple(t.float() if t.dtype in dtypes.HALF else t for t in inputs)
    return inputs
