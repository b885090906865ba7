"""Loss primitives that a composition of other ops cannot express soundly.

``binary_cross_entropy`` is one: composed as ``-(t * log(x) + (1 - t) * log(1 - x))`` its
gradient at a saturated probability (x == 0 or 1, which a float32 sigmoid reaches) is
0 / 0 = nan, where torch's kernel gives a finite one. The other losses of
``gradmesh.core.nn.functional`` are compositions.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..functional import clamp, log, log1p
from ..registry import OpError, Spec, defop, fmt

# torch's kernel: each log is clamped to >= -100 (so the loss stays finite at 0 and 1),
# and the gradient's denominator x * (1 - x) to >= 1e-12, a float32 constant there (also
# for float64 inputs: 9.99999996e-13, which shows in the gradient at x = 0 or 1).
_LOG_FLOOR = -100.0
_GRAD_EPS = float(np.float32(1e-12))


def _infer_bce(x, target) -> Spec:
    if not x.dtype.is_floating_point or target.dtype is not x.dtype:
        raise OpError(
            f"binary_cross_entropy: expected input and target of one floating dtype, got "
            f"{x.dtype} and {target.dtype}; convert the target with .to(input.dtype)"
        )
    if tuple(target.shape) != tuple(x.shape):
        raise OpError(
            f"binary_cross_entropy: target of shape {fmt(target.shape)} must have the same "
            f"shape as the input {fmt(x.shape)}"
        )
    return Spec(tuple(x.shape), x.dtype)


@defop("binary_cross_entropy", arity=2, infer=_infer_bce)
def binary_cross_entropy_p(xp, x, target):
    """Elementwise ``(t - 1) * max(log(1 - x), -100) - t * max(log(x), -100)``."""
    if not bool(((x >= 0) & (x <= 1)).all()):  # NaN fails too, as in torch
        raise OpError("binary_cross_entropy: all elements of input should be between 0 and 1")
    t = x.dtype.type
    quiet = getattr(xp, "errstate", None)  # log(0) = -inf is clamped, not a warning
    with quiet(divide="ignore") if quiet else contextlib.nullcontext():
        log_x = xp.maximum(xp.log(x), t(_LOG_FLOOR))
        log_1mx = xp.maximum(xp.log1p(-x), t(_LOG_FLOOR))
    return (target - t(1)) * log_1mx - target * log_x


@binary_cross_entropy_p.defvjp
def _(g, out, x, target):
    gx = g * (x - target) / clamp(x * (1 - x), min=_GRAD_EPS) if x.requires_grad else None
    # d/dt is -logit(x), unclamped (torch's binary_cross_entropy_target_backward).
    gt = g * (log1p(-x) - log(x)) if target.requires_grad else None
    return gx, gt
