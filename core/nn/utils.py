"""``gradmesh.core.nn.utils``: gradient clipping, as ``torch.nn.utils``."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .. import backend
from ..autograd import bump_version
from ..tensor import Tensor

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def _grads(parameters) -> list:
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return [p.grad for p in params if p.grad is not None]


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach=None,
) -> Tensor:
    """Scale the gradients in place so that their total ``norm_type`` norm (over all of
    them, as if concatenated) is at most ``max_norm``; returns the total norm before."""
    grads = _grads(parameters)
    if not grads:
        return Tensor(np.array(0.0, np.float32))
    norm_type = float(norm_type)
    xp = backend.xp_of(grads[0]._data)
    norms = [_vector_norm(xp, g._data, norm_type) for g in grads]
    total = _vector_norm(xp, xp.stack(norms), norm_type)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            f"`parameters` is non-finite, so it cannot be clipped. To disable "
            f"this error and scale the gradients by the non-finite norm anyway, "
            f"set `error_if_nonfinite=False`"
        )
    coef = xp.minimum(max_norm / (total + 1e-6), 1.0).astype(total.dtype)
    for g in grads:
        g._data *= coef.astype(g._data.dtype)
        bump_version(g._data)
    return Tensor(total)


def _vector_norm(xp, a, p: float):
    a = xp.abs(a.ravel())
    if p == float("inf"):
        return a.max() if a.size else xp.zeros((), a.dtype)
    if p == 0:
        return xp.asarray((a != 0).sum(), dtype=a.dtype)
    if p == 1:
        return a.sum()
    if p == 2:
        return xp.sqrt(xp.dot(a, a))
    return (a**p).sum() ** (1.0 / p)


def clip_grad_value_(
    parameters: Tensor | Iterable[Tensor], clip_value: float, foreach=None
) -> None:
    """Clamp every gradient in place to ``[-clip_value, clip_value]``."""
    for g in _grads(parameters):
        xp = backend.xp_of(g._data)
        xp.clip(g._data, -clip_value, clip_value, out=g._data)
        bump_version(g._data)
