"""The op dispatcher: every op of the registry runs on Tensors through ``apply``."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import backend, cost, dtypes, precision
from .autograd import Node
from .autograd import _state as _grad_state
from .hooks import _dispatch
from .registry import Op
from .tensor import Tensor

_ndarray = np.ndarray
_bfloat16 = dtypes.bfloat16.np
_op_blocked = cost.OP_BLOCKED


def apply(op: Op, inputs: Sequence[Tensor], attrs: dict) -> Tensor:
    """Run one registered op on Tensors: validate, compute, record for autograd and tracing.

    This runs for every op, so it avoids generators, repeated lookups and allocations it
    can skip: each microsecond here is a few percent of a small model's step.
    """
    if len(attrs) != len(op.attrs):
        attrs = fill_attrs(op, attrs)
    if op.arity is not None and len(inputs) != op.arity:
        raise TypeError(f"{op.name}: expected {op.arity} inputs, got {len(inputs)}")
    state = _grad_state
    spec = None
    if not state.trusted:
        # Validation, with errors that name the op. The backward engine (without
        # create_graph) skips it: its vjps only combine values that were validated on the
        # way forward.
        if precision.autocast_state.dtype is not None:
            inputs = precision.autocast_inputs(op, inputs)
        spec = op.infer(*inputs, **attrs)
    n = len(inputs)
    arrays: Sequence[Any]
    if n == 2:
        a, b = inputs[0]._data, inputs[1]._data
        arrays = (a, b)
        on_cpu = type(a) is _ndarray and type(b) is _ndarray
        # float16 and bfloat16 are the only 2-byte dtypes gradmesh has.
        any_half = a.dtype.itemsize == 2 or b.dtype.itemsize == 2
    elif n == 1:
        a = inputs[0]._data
        arrays = (a,)
        on_cpu = type(a) is _ndarray
        any_half = a.dtype.itemsize == 2
    else:
        arrays = [t._data for t in inputs]
        on_cpu = all(type(a) is _ndarray for a in arrays)
        any_half = any(a.dtype.itemsize == 2 for a in arrays)
    xp = np if on_cpu else _common_xp(op, inputs, arrays)
    forward = op.forward
    if any_half and precision.computes_in_float32(op, [a.dtype for a in arrays]):
        # float16/bfloat16: computed in float32, rounded once (core/precision.py).
        out_np = spec.dtype.np if spec is not None else precision.out_dtype(op, arrays, attrs)
        out = precision.run(forward, xp, arrays, attrs, out_np)
    elif on_cpu and op.name in _op_blocked:
        # Large products run in the op's own fixed blocks, checked in a plan's backward.
        out = cost.call(op.name, forward, xp, arrays, attrs, cost.current_check())
    elif state.trusted and (check := cost.current_check()) is not None:
        out = cost.call(op.name, forward, xp, arrays, attrs, check)  # a plan's backward
    else:
        out = forward(xp, *arrays, **attrs)
    requires = False
    if state.grad:
        for t in inputs:
            if t.requires_grad:
                requires = True
                break
    result = Tensor._wrap(out, requires)
    if requires:
        data = result._data
        if (data.dtype.kind != "f" and data.dtype != _bfloat16) or not op.differentiable:
            # Integer and bool results (argmax, comparisons) carry no gradient, as in torch;
            # nor does a gradient stop (stop_gradient).
            result.requires_grad = False
        else:
            result.grad_fn = Node(
                op, tuple(inputs), attrs, data if op.saves_out else None, (data.shape, result.dtype)
            )
    tracer = _dispatch.tracer
    if tracer is not None:
        tracer.record(op, inputs, attrs, result)
    return result


def _common_xp(op: Op, inputs, arrays):
    """The array module of inputs that are not all NumPy arrays; they must share one."""
    xp = backend.xp_of(arrays[0])
    if any(backend.xp_of(a) is not xp for a in arrays[1:]):
        raise RuntimeError(
            f"{op.name}: expected all tensors to be on the same device, got "
            f"{', '.join(t.device for t in inputs)}"
        )
    return xp


def fill_attrs(op: Op, attrs: dict) -> dict:
    unknown = set(attrs) - set(op.attrs)
    if unknown:
        raise TypeError(
            f"{op.name}: unexpected attribute(s) {sorted(unknown)}; it takes {sorted(op.attrs)}"
        )
    return {name: attrs.get(name, default) for name, (_kind, default) in op.attrs.items()}
