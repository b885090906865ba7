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
    total = total_norm(xp, grad_norms(xp, [g._data for g in grads], norm_type), norm_type)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(nonfinite_message(norm_type))
    coef = clip_coefficient(xp, total, max_norm)
    for g in grads:
        scale_(g._data, coef)
        bump_version(g._data)
    return Tensor(total)


# The steps of clip_grad_norm_ as pure functions of arrays: a job's coordinator and shards
# run these very functions on the summed step gradients (shards: the per-gradient norms and
# the scaling; coordinator: the total and the coefficient), so clipping in a job gives the
# bits of clipping locally.


def grad_norms(xp, grads: list, norm_type: float) -> list:
    """The ``norm_type`` norm of each array, a 0-d array in that array's dtype."""
    return [_vector_norm(xp, g, float(norm_type)) for g in grads]


def total_norm(xp, norms: list, norm_type: float):
    """The norm of the per-gradient norms, in their (promoted) dtype: torch's total."""
    return _vector_norm(xp, xp.stack(norms), float(norm_type))


def clip_coefficient(xp, total, max_norm: float):
    """``min(max_norm / (total + 1e-6), 1)`` in the total's dtype, as torch computes it."""
    return xp.minimum(max_norm / (total + 1e-6), 1.0).astype(total.dtype)


def scale_(grad, coef) -> None:
    """Multiply one gradient in place by the clip coefficient, cast to its dtype."""
    grad *= coef.astype(grad.dtype)


def nonfinite_message(norm_type: float) -> str:
    return (
        f"The total norm of order {float(norm_type)} for gradients from "
        f"`parameters` is non-finite, so it cannot be clipped. To disable "
        f"this error and scale the gradients by the non-finite norm anyway, "
        f"set `error_if_nonfinite=False`"
    )


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
        clip_values_(backend.xp_of(g._data), g._data, clip_value)
        bump_version(g._data)


def clip_values_(xp, grad, clip_value: float) -> None:
    """Clamp one gradient array in place (clip_grad_value_'s rule, shared with shards)."""
    xp.clip(grad, -clip_value, clip_value, out=grad)


# A job's clipping crosses the network as data: {"kind": "norm", "max_norm": 1.0,
# "norm_type": 2.0, "error_if_nonfinite": False} or {"kind": "value", "clip_value": 0.5}.
CLIPPING_ARGUMENTS = {
    "norm": {"max_norm": None, "norm_type": 2.0, "error_if_nonfinite": False},
    "value": {"clip_value": None},
}


def validate_clipping(description: dict, path: str = "clipping") -> dict:
    """Check a clipping description; return it complete. ``ValueError`` names the field.

    >>> validate_clipping({"kind": "norm", "max_norm": 1})
    {'kind': 'norm', 'max_norm': 1.0, 'norm_type': 2.0, 'error_if_nonfinite': False}
    """
    if not isinstance(description, dict):
        raise ValueError(f"{path}: a clipping description must be a dict")
    kind = description.get("kind")
    if kind not in CLIPPING_ARGUMENTS:
        raise ValueError(f"{path}.kind: must be 'norm' or 'value', got {kind!r}")
    defaults = CLIPPING_ARGUMENTS[kind]
    unknown = sorted(set(description) - set(defaults) - {"kind"})
    if unknown:
        raise ValueError(
            f"{path}: clipping by {kind} takes no {unknown}; it takes {sorted(defaults)}"
        )
    out: dict = {"kind": kind}
    for key, default in defaults.items():
        value = description.get(key, default)
        where = f"{path}.{key}"
        if value is None:
            raise ValueError(f"{where}: clipping by {kind} needs {key}")
        if key == "error_if_nonfinite":
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{where}: must be a bool, got {value!r}")
            out[key] = bool(value)
            continue
        if key == "norm_type" and value in ("inf", "Infinity"):
            value = float("inf")
        if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{where}: must be a number, got {value!r}")
        value = float(value)
        finite_ok = key == "norm_type" and value == float("inf")
        if not (value >= 0 and (finite_ok or np.isfinite(value))):
            raise ValueError(
                f"{where}: must be a finite number >= 0 (norm_type: or inf), got {value}"
            )
        if key == "clip_value" and value == 0:
            raise ValueError(f"{where}: must be > 0, got {value}")
        out[key] = value
    return out
