"""Gradients of broadcasting ops summed back to their inputs' shapes: the one place it is
done. The engine calls ``unbroadcast`` for ops declared ``broadcast=True``; a vjp that
broadcasts internally (``matmul``'s batch dims) calls ``sum_to``."""

from __future__ import annotations

from . import functional as F
from .autograd import _state as _grad_state
from .hooks import _dispatch
from .tensor import Tensor


def sum_to(g: Tensor, shape: tuple) -> Tensor:
    """``g`` summed over the dims that broadcasting added to or stretched in ``shape``."""
    gdata = g._data
    if gdata.shape == shape:
        return g
    lead = gdata.ndim - len(shape)
    inner = [i + lead for i, s in enumerate(shape) if s == 1 and gdata.shape[i + lead] != 1]
    if not _grad_state.grad and _dispatch.tracer is None:
        # Nothing records this (the engine without create_graph): the sum op's own
        # array call, without the op around it.
        axes = tuple(range(lead)) + tuple(inner)
        out = gdata.sum(axis=axes, keepdims=bool(inner)) if axes else gdata
        if out.shape != shape:
            out = out.reshape(shape)
        return Tensor._wrap(out)
    if lead > 0 and not inner:
        # Only leading dims to drop (a bias under a batch): one sum, no reshape.
        return F.sum(g, dim=list(range(lead)))
    dims = list(range(lead)) + inner
    if dims:
        g = F.sum(g, dim=dims, keepdim=True)
    if g.shape != shape:
        g = F.reshape(g, shape)
    return g


def unbroadcast(g: Tensor, t: Tensor) -> Tensor:
    """The gradient ``g`` of a broadcasting op's output, as ``t``'s: summed back to its
    shape and cast to its dtype (``int64 + float32`` sends float32 to both sides)."""
    tdata = t._data
    g = sum_to(g, tdata.shape)
    gdtype = g._data.dtype
    if gdtype is not tdata.dtype and gdtype != tdata.dtype:
        g = g.to(t.dtype)
    return g
