"""Optimizers with ``torch.optim``'s update rules: SGD, Adam, AdamW, RMSprop, Adagrad,
Adamax, NAdam.

Each rule is a pure function over raw arrays, ``update(xp, param, grad, state, **hyper)``:
it updates ``param`` and the arrays in ``state`` in place and returns ``state``. No Tensor is
involved, so a parameter shard applies the very same function to its NumPy arrays that the
``Optimizer`` classes here apply to ``p._data``; that is what makes a sharded run equal to a
local one. The arithmetic follows torch's single-tensor (``foreach=False``) code paths step
by step, in the same order, so trajectories agree with torch to rounding. A float16 or
bfloat16 parameter keeps its state in its dtype and is updated op by op in float32 with a
rounding after each op, as torch's CPU kernels do: bit for bit torch's ("half precision"
below).

Vocabulary: ``xp`` is the array module (numpy or cupy); ``state`` is one parameter's
optimizer state, a dict of named arrays plus ``"step"`` (the number of updates applied).

>>> import gradmesh.core as gm
>>> w = gm.nn.Parameter(gm.tensor([1.0, -2.0]))
>>> opt = gm.optim.SGD([w], lr=0.1)
>>> (w * w).sum().backward()
>>> opt.step()
>>> w.tolist()
[0.800000011920929, -1.600000023841858]
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Any, Callable, Iterable

import numpy as np

from . import backend, dtypes, precision
from .autograd import bump_version, enable_grad, no_grad, zero_grads
from .tensor import Tensor

__all__ = [
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "RMSprop",
    "Adagrad",
    "Adamax",
    "NAdam",
    "sgd_update",
    "adam_update",
    "adamw_update",
    "rmsprop_update",
    "adagrad_update",
    "adamax_update",
    "nadam_update",
    "WIRE_RULES",
    "UPDATE_RULES",
    "HYPERPARAMETERS",
    "describe",
    "validate",
    "WEIGHT_DECAY_BY_PARAMETER",
    "from_description",
    "state_to_arrays",
    "state_from_arrays",
]


# ==================================================================== update rules ======


def _routes_half(rule: str):
    """Send float16 and bfloat16 parameters to the rule's half-precision twin (below,
    ``_HALF_RULES``), with the float rule's defaults for what the call leaves out."""

    def wrap(update: Callable[..., dict]) -> Callable[..., dict]:
        defaults = {
            k: p.default
            for k, p in inspect.signature(update).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty
        }

        @functools.wraps(update)
        def routed(xp, param, grad, state: dict, **hyper) -> dict:
            if precision.is_half(param.dtype):
                return _HALF_RULES[rule](xp, param, grad, state, **{**defaults, **hyper})
            return update(xp, param, grad, state, **hyper)

        return routed

    return wrap


@_routes_half("sgd")
def sgd_update(
    xp,
    param,
    grad,
    state: dict,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> dict:
    """One step of ``torch.optim.SGD`` on arrays; ``param`` and ``state`` change in place.

    ``grad`` is never written to. The first momentum step stores the gradient itself as
    the buffer (no dampening), as torch does.
    """
    d_p = -grad if maximize else grad
    if weight_decay != 0:
        d_p = d_p + weight_decay * param
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            # xp.array, not d_p.copy(): for a 0-d parameter d_p may be a NumPy scalar,
            # and the buffer must be an array that later steps can update in place.
            buf = state["momentum_buffer"] = xp.array(d_p, dtype=param.dtype, copy=True)
        else:
            buf *= momentum
            buf += d_p if dampening == 0 else (1 - dampening) * d_p
        d_p = d_p + momentum * buf if nesterov else buf
    param -= lr * d_p
    state["step"] = state.get("step", 0) + 1
    return state


@_routes_half("adam")
def adam_update(
    xp,
    param,
    grad,
    state: dict,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> dict:
    """One step of ``torch.optim.Adam`` (AdamW with ``decoupled_weight_decay=True``) on arrays.

    Moments start at zero on the first call; ``state["step"]`` counts the updates and
    drives the bias corrections.
    """
    beta1, beta2 = betas
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = xp.zeros_like(param)
        state["exp_avg_sq"] = xp.zeros_like(param)
        if amsgrad:
            state["max_exp_avg_sq"] = xp.zeros_like(param)
    step = state["step"] = state["step"] + 1
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

    g = -grad if maximize else grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * param

    # One scratch array serves every intermediate below: the step allocates two arrays.
    scratch = xp.empty_like(param)  # with out=, a 0-d result stays an array
    xp.subtract(g, exp_avg, out=scratch)
    # exp_avg.lerp_(g, 1 - beta1), with torch's two formulas chosen by the weight's size.
    weight = 1 - beta1
    if abs(weight) < 0.5:
        scratch *= weight
        exp_avg += scratch
    else:
        scratch *= 1 - weight
        xp.subtract(g, scratch, out=exp_avg)
    # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2): (value * g) * g.
    exp_avg_sq *= beta2
    xp.multiply(g, 1 - beta2, out=scratch)
    scratch *= g
    exp_avg_sq += scratch

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if amsgrad:
        max_sq = state.get("max_exp_avg_sq")
        if max_sq is None:  # amsgrad switched on after the first step, as torch allows
            max_sq = state["max_exp_avg_sq"] = xp.zeros_like(param)
        xp.maximum(max_sq, exp_avg_sq, out=max_sq)
        denom = xp.sqrt(max_sq)
    else:
        denom = xp.sqrt(exp_avg_sq)
    denom /= bias_correction2_sqrt
    denom += eps
    # param.addcdiv_(exp_avg, denom, value=-step_size): (value * exp_avg) / denom.
    xp.multiply(exp_avg, -step_size, out=scratch)
    scratch /= denom
    param += scratch
    return state


def adamw_update(
    xp,
    param,
    grad,
    state: dict,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
) -> dict:
    """One step of ``torch.optim.AdamW``: ``param *= 1 - lr * weight_decay``, then Adam."""
    return adam_update(
        xp,
        param,
        grad,
        state,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
    )


@_routes_half("rmsprop")
def rmsprop_update(
    xp,
    param,
    grad,
    state: dict,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> dict:
    """One step of ``torch.optim.RMSprop`` on arrays (``square_avg``, and ``grad_avg`` when
    centered, ``momentum_buffer`` with momentum)."""
    if "square_avg" not in state:
        state["step"] = 0
        state["square_avg"] = xp.zeros_like(param)
    if momentum > 0 and "momentum_buffer" not in state:
        state["momentum_buffer"] = xp.zeros_like(param)
    if centered and "grad_avg" not in state:
        state["grad_avg"] = xp.zeros_like(param)
    state["step"] += 1
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    square_avg = state["square_avg"]
    # square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    square_avg *= alpha
    square_avg += (1 - alpha) * g * g
    if centered:
        grad_avg = state["grad_avg"]
        _lerp_(xp, grad_avg, g, 1 - alpha)
        avg = xp.sqrt(square_avg + (-1 * grad_avg) * grad_avg)
    else:
        avg = xp.sqrt(square_avg)
    avg += eps
    if momentum > 0:
        buf = state["momentum_buffer"]
        buf *= momentum
        buf += g / avg  # addcdiv_(g, avg)
        param += -lr * buf  # add_(buf, alpha=-lr)
    else:
        param += (-lr * g) / avg  # addcdiv_(g, avg, value=-lr)
    return state


@_routes_half("adagrad")
def adagrad_update(
    xp,
    param,
    grad,
    state: dict,
    *,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
) -> dict:
    """One step of ``torch.optim.Adagrad`` on arrays (``sum`` of squared gradients)."""
    if "sum" not in state:
        state["step"] = 0
        state["sum"] = xp.full_like(param, initial_accumulator_value)
    step = state["step"] = state["step"] + 1
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    clr = lr / (1 + (step - 1) * lr_decay)
    state["sum"] += g * g  # addcmul_(g, g, value=1)
    std = xp.sqrt(state["sum"])
    std += eps
    param += (-clr * g) / std  # addcdiv_(g, std, value=-clr)
    return state


@_routes_half("adamax")
def adamax_update(
    xp,
    param,
    grad,
    state: dict,
    *,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> dict:
    """One step of ``torch.optim.Adamax`` on arrays (``exp_avg`` and the infinity norm
    ``exp_inf``)."""
    beta1, beta2 = betas
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = xp.zeros_like(param)
        state["exp_inf"] = xp.zeros_like(param)
    step = state["step"] = state["step"] + 1
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    _lerp_(xp, state["exp_avg"], g, 1 - beta1)
    exp_inf = state["exp_inf"]
    # torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    exp_inf *= beta2
    bound = xp.abs(g)
    bound += eps
    xp.maximum(exp_inf, bound, out=exp_inf)
    clr = lr / (1 - beta1**step)
    param += (-clr * state["exp_avg"]) / exp_inf  # addcdiv_(exp_avg, exp_inf, value=-clr)
    return state


@_routes_half("nadam")
def nadam_update(
    xp,
    param,
    grad,
    state: dict,
    *,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> dict:
    """One step of ``torch.optim.NAdam`` on arrays (``exp_avg``, ``exp_avg_sq`` and the
    0-d ``mu_product``).

    torch keeps ``mu_product`` in a float32 scalar tensor (its default dtype) whatever the
    parameter's dtype, and the product is rounded to float32 at every step: so is ours.
    """
    beta1, beta2 = betas
    if "exp_avg" not in state:
        state["step"] = 0
        state["mu_product"] = xp.ones((), dtype=np.float32)
        state["exp_avg"] = xp.zeros_like(param)
        state["exp_avg_sq"] = xp.zeros_like(param)
    step = state["step"] = state["step"] + 1
    g = -grad if maximize else grad
    bias_correction2 = 1 - beta2**step
    if weight_decay != 0:
        if decoupled_weight_decay:
            param *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * param
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product = state["mu_product"]
    mu_product *= mu
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    _lerp_(xp, exp_avg, g, 1 - beta1)
    exp_avg_sq *= beta2
    exp_avg_sq += ((1 - beta2) * g) * g  # addcmul_(g, g, value=1 - beta2)
    denom = xp.sqrt(exp_avg_sq / bias_correction2)
    denom += eps
    product = float(mu_product)
    param += (-lr * (1.0 - mu) / (1.0 - product) * g) / denom
    param += ((-lr * mu_next) / (1.0 - product * mu_next) * exp_avg) / denom
    return state


def _lerp_(xp, start, end, weight: float) -> None:
    """``start.lerp_(end, weight)`` with torch's two formulas, chosen by the weight's size."""
    if abs(weight) < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (1 - weight)


# ==================================================================== half precision ====
# torch keeps a float16/bfloat16 parameter's optimizer state in the parameter's dtype, and
# each op of its rule (lerp_, addcmul_, sqrt, ...) is one CPU kernel that computes in
# float32 and rounds its result to the half dtype. The rules below repeat those ops one by
# one, rounding where torch's kernels round, so half trajectories equal torch's bit for
# bit. Three kernels have arithmetic of their own: lerp_ and addcmul_ end in a fused
# multiply-add, and add with an alpha rounds alpha to the half dtype (see _add_half).

_F32 = np.float32
# Elements per step of the vector loop of torch's x86 CPU kernels (AVX2 and AVX-512) on
# half tensors; torch's add computes the elements past the last whole step in its scalar
# loop, with other arithmetic.
_TORCH_HALF_VECTOR_STEP = 32


def _wide(a):
    """A float32 copy of a half array (exact), free to be overwritten."""
    return dtypes.astype(a, _F32)


def _narrow(x, dtype):
    """The float32 array ``x`` rounded to the half ``dtype``, as torch's kernels round."""
    return dtypes.astype(x, dtype)


def _fma32(xp, a, b, c, out=None):
    """float32 ``a * b + c`` rounded once, as torch's vectorized fmadd (``c`` an array,
    ``a`` and ``b`` arrays of its shape or scalars); ``out`` may be ``a`` or ``b``."""
    a, b = (_flat_or_scalar(xp, x) for x in (a, b))
    flat = c.reshape(-1)
    result = xp.empty(flat.size, _F32) if out is None else out.reshape(-1)
    # In blocks that stay in the CPU's cache: the float64 temporaries of a whole large
    # parameter made this several times slower. The scratch serves every block.
    n = min(flat.size, _FMA_BLOCK)
    scratch = (xp.empty(n, np.float64), xp.empty(n, np.float64), xp.empty(n, np.uint64))
    for start in range(0, flat.size, _FMA_BLOCK):
        block = slice(start, start + _FMA_BLOCK)
        _fma32_block(xp, _part(a, block), _part(b, block), flat[block], result[block], scratch)
    return result.reshape(c.shape)


def _flat_or_scalar(xp, x):
    return _F32(x) if xp.ndim(x) == 0 else x.reshape(-1)


def _part(x, block: slice):
    return x if x.ndim == 0 else x[block]


def _fma32_block(xp, a, b, c, out, scratch) -> None:
    """The float64 product is exact; rounding the float64 sum to float32 rounds a second
    time, which can only go wrong where the sum lies halfway between two float32 numbers
    (or among float32's subnormals) and is inexact: there the sum is rounded to odd first
    (TwoSum gives its exact error), which makes the second rounding right."""
    product, total, low_bits = (x[: c.size] for x in scratch)
    xp.multiply(a, b, out=product, dtype=np.float64)
    xp.add(product, c, out=total)
    xp.bitwise_and(total.view(np.uint64), _BELOW_FLOAT32, out=low_bits)
    doubtful = low_bits == _FLOAT32_HALFWAY
    out[...] = total
    doubtful |= xp.abs(out) <= _FLOAT32_TINY
    doubtful = xp.flatnonzero(doubtful)
    if doubtful.size:
        p, t, c64 = product[doubtful], total[doubtful], c[doubtful].astype(np.float64)
        virtual = t - p
        error = (p - (t - virtual)) + (c64 - virtual)
        to_odd = (error != 0) & ((t.view(np.uint64) & 1) == 0) & xp.isfinite(t)
        nudged = xp.nextafter(t, xp.where(error > 0, np.inf, -np.inf))
        out[doubtful] = xp.where(to_odd, nudged, t).astype(_F32)


_FMA_BLOCK = 1 << 16
# The 29 float64 significand bits that float32 drops, and their pattern exactly halfway
# between two float32 numbers; below float32's smallest normal it keeps fewer bits.
_BELOW_FLOAT32 = np.uint64((1 << 29) - 1)
_FLOAT32_HALFWAY = np.uint64(1 << 28)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _lerp_half_(xp, start, end, weight: float) -> None:
    """``start.lerp_(end, weight)``: torch's two formulas as fused multiply-adds."""
    w = _F32(weight)
    s, e = _wide(start), _wide(end)
    diff = xp.subtract(e, s, out=e if abs(w) < 0.5 else None)
    if abs(w) < 0.5:
        result = _fma32(xp, w, diff, s, out=diff)
    else:
        result = _fma32(xp, w - _F32(1), diff, e, out=diff)
    start[...] = _narrow(result, start.dtype)


def _add_half(xp, a, b, alpha: float = 1.0):
    """``a.add(b, alpha=alpha)`` for half tensors: alpha rounded to their dtype, then
    ``a + alpha * b`` in float32, except in the elements past torch's last vector step,
    which its scalar loop computes in half arithmetic (``alpha * b`` rounded first)."""
    dtype = a.dtype
    alpha_h = _F32(_F32(alpha).astype(dtype))
    wide_a, out = _wide(a), _wide(b)
    tail = out.size % _TORCH_HALF_VECTOR_STEP
    if tail:
        flat = out.reshape(-1)
        tail_product = _wide((alpha_h * flat[-tail:]).astype(dtype))
    out *= alpha_h
    out += wide_a
    if tail:
        flat[-tail:] = wide_a.reshape(-1)[-tail:] + tail_product
    return _narrow(out, dtype)


def _mul_half_(a, scalar: float) -> None:
    wide = _wide(a)
    wide *= _F32(scalar)
    a[...] = _narrow(wide, a.dtype)


def _addcmul_half(xp, a, t1, t2, value: float):
    """``a.addcmul(t1, t2, value=value)``: ``a + (value * t1) * t2`` in float32 with the
    last multiply and the add fused (the compiler fuses torch's kernel), rounded once."""
    scaled = _wide(t1)
    scaled *= _F32(value)
    return _narrow(_fma32(xp, scaled, _wide(t2), _wide(a), out=scaled), a.dtype)


def _addcdiv_half(xp, a, t1, t2, value: float):
    """``a.addcdiv(t1, t2, value=value)``: ``a + value * t1 / t2`` in float32, rounded once."""
    out = _wide(t1)
    out *= _F32(value)
    out /= _wide(t2)
    out += _wide(a)
    return _narrow(out, a.dtype)


def _sqrt_half(xp, a):
    wide = _wide(a)
    return _narrow(xp.sqrt(wide, out=wide), a.dtype)


def _sqrt_plus_eps_half(xp, a, eps: float, divisor: float = 1.0):
    """``(a.sqrt() / divisor).add_(eps)``: three kernels, three roundings."""
    wide = _wide(a)
    xp.sqrt(wide, out=wide)
    if divisor != 1.0:
        wide = _wide(_narrow(wide, a.dtype))
        wide /= _F32(divisor)
    wide = _wide(_narrow(wide, a.dtype))
    wide += _F32(eps)
    return _narrow(wide, a.dtype)


def _sgd_half(xp, param, grad, state, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    d_p = -grad if maximize else grad
    if weight_decay != 0:
        d_p = _add_half(xp, d_p, param, weight_decay)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = xp.array(d_p, dtype=param.dtype, copy=True)
        else:
            _mul_half_(buf, momentum)
            buf[...] = _add_half(xp, buf, d_p, 1 - dampening)
        d_p = _add_half(xp, d_p, buf, momentum) if nesterov else buf
    param[...] = _add_half(xp, param, d_p, -lr)
    state["step"] = state.get("step", 0) + 1
    return state


def _adam_half(
    xp, param, grad, state, *, lr, betas, eps, weight_decay, amsgrad, maximize,
    decoupled_weight_decay,
):  # fmt: skip
    beta1, beta2 = betas
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = xp.zeros_like(param)
        state["exp_avg_sq"] = xp.zeros_like(param)
    step = state["step"] = state["step"] + 1
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    g = -grad if maximize else grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            _mul_half_(param, 1 - lr * weight_decay)
        else:
            g = _add_half(xp, g, param, weight_decay)
    _lerp_half_(xp, exp_avg, g, 1 - beta1)
    _mul_half_(exp_avg_sq, beta2)
    exp_avg_sq[...] = _addcmul_half(xp, exp_avg_sq, g, g, 1 - beta2)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    second = exp_avg_sq
    if amsgrad:
        max_sq = state.get("max_exp_avg_sq")
        if max_sq is None:
            max_sq = state["max_exp_avg_sq"] = xp.zeros_like(param)
        max_sq[...] = xp.maximum(max_sq, exp_avg_sq)
        second = max_sq
    denom = _sqrt_plus_eps_half(xp, second, eps, bias_correction2_sqrt)
    param[...] = _addcdiv_half(xp, param, exp_avg, denom, -step_size)
    return state


def _rmsprop_half(
    xp, param, grad, state, *, lr, alpha, eps, weight_decay, momentum, centered, maximize
):
    if "square_avg" not in state:
        state["step"] = 0
        state["square_avg"] = xp.zeros_like(param)
    if momentum > 0 and "momentum_buffer" not in state:
        state["momentum_buffer"] = xp.zeros_like(param)
    if centered and "grad_avg" not in state:
        state["grad_avg"] = xp.zeros_like(param)
    state["step"] += 1
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = _add_half(xp, g, param, weight_decay)
    square_avg = state["square_avg"]
    _mul_half_(square_avg, alpha)
    square_avg[...] = _addcmul_half(xp, square_avg, g, g, 1 - alpha)
    if centered:
        grad_avg = state["grad_avg"]
        _lerp_half_(xp, grad_avg, g, 1 - alpha)
        variance = _addcmul_half(xp, square_avg, grad_avg, grad_avg, -1)
        avg = _sqrt_plus_eps_half(xp, variance, eps)
    else:
        avg = _sqrt_plus_eps_half(xp, square_avg, eps)
    if momentum > 0:
        buf = state["momentum_buffer"]
        _mul_half_(buf, momentum)
        buf[...] = _addcdiv_half(xp, buf, g, avg, 1.0)
        param[...] = _add_half(xp, param, buf, -lr)
    else:
        param[...] = _addcdiv_half(xp, param, g, avg, -lr)
    return state


def _adagrad_half(
    xp, param, grad, state, *, lr, lr_decay, weight_decay, initial_accumulator_value, eps,
    maximize,
):  # fmt: skip
    if "sum" not in state:
        state["step"] = 0
        state["sum"] = xp.full_like(param, _F32(initial_accumulator_value))
    step = state["step"] = state["step"] + 1
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = _add_half(xp, g, param, weight_decay)
    clr = lr / (1 + (step - 1) * lr_decay)
    state["sum"][...] = _addcmul_half(xp, state["sum"], g, g, 1.0)
    std = _sqrt_plus_eps_half(xp, state["sum"], eps)
    param[...] = _addcdiv_half(xp, param, g, std, -clr)
    return state


def _adamax_half(xp, param, grad, state, *, lr, betas, eps, weight_decay, maximize):
    beta1, beta2 = betas
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = xp.zeros_like(param)
        state["exp_inf"] = xp.zeros_like(param)
    step = state["step"] = state["step"] + 1
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = _add_half(xp, g, param, weight_decay)
    _lerp_half_(xp, state["exp_avg"], g, 1 - beta1)
    exp_inf = state["exp_inf"]
    _mul_half_(exp_inf, beta2)
    bound = xp.abs(_wide(g))
    bound += _F32(eps)
    bound = _narrow(bound, param.dtype)
    exp_inf[...] = xp.maximum(exp_inf, bound)
    clr = lr / (1 - beta1**step)
    param[...] = _addcdiv_half(xp, param, state["exp_avg"], exp_inf, -clr)
    return state


def _nadam_half(
    xp, param, grad, state, *, lr, betas, eps, weight_decay, momentum_decay,
    decoupled_weight_decay, maximize,
):  # fmt: skip
    beta1, beta2 = betas
    if "exp_avg" not in state:
        state["step"] = 0
        state["mu_product"] = xp.ones((), dtype=np.float32)
        state["exp_avg"] = xp.zeros_like(param)
        state["exp_avg_sq"] = xp.zeros_like(param)
    step = state["step"] = state["step"] + 1
    g = -grad if maximize else grad
    bias_correction2 = 1 - beta2**step
    if weight_decay != 0:
        if decoupled_weight_decay:
            _mul_half_(param, 1 - lr * weight_decay)
        else:
            g = _add_half(xp, g, param, weight_decay)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product = state["mu_product"]
    mu_product *= mu
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    _lerp_half_(xp, exp_avg, g, 1 - beta1)
    _mul_half_(exp_avg_sq, beta2)
    exp_avg_sq[...] = _addcmul_half(xp, exp_avg_sq, g, g, 1 - beta2)
    # exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
    scaled = _wide(exp_avg_sq)
    scaled /= _F32(bias_correction2)
    scaled = _narrow(scaled, param.dtype)
    denom = _sqrt_plus_eps_half(xp, scaled, eps)
    product = float(mu_product)
    param[...] = _addcdiv_half(xp, param, g, denom, -lr * (1.0 - mu) / (1.0 - product))
    value = (-lr * mu_next) / (1.0 - product * mu_next)
    param[...] = _addcdiv_half(xp, param, exp_avg, denom, value)
    return state


_HALF_RULES: dict[str, Callable[..., dict]] = {
    "sgd": _sgd_half,
    "adam": _adam_half,
    "rmsprop": _rmsprop_half,
    "adagrad": _adagrad_half,
    "adamax": _adamax_half,
    "nadam": _nadam_half,
}

UPDATE_RULES: dict[str, Callable[..., dict]] = {
    "sgd": sgd_update,
    "adam": adam_update,
    "adamw": adamw_update,
    "rmsprop": rmsprop_update,
    "adagrad": adagrad_update,
    "adamax": adamax_update,
    "nadam": nadam_update,
}
# The rules a job's description may name: the wire's Optimizer message carries every
# rule's hyper-parameters.
WIRE_RULES = tuple(UPDATE_RULES)

# Every hyper-parameter each rule takes, with torch's defaults (SGD's lr included).
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "sgd": {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    },
    "adam": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
    },
    "adamw": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 1e-2,
        "amsgrad": False,
        "maximize": False,
    },
    "rmsprop": {
        "lr": 1e-2,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
        "maximize": False,
    },
    "adagrad": {
        "lr": 1e-2,
        "lr_decay": 0.0,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "eps": 1e-10,
        "maximize": False,
    },
    "adamax": {
        "lr": 2e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "maximize": False,
    },
    "nadam": {
        "lr": 2e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum_decay": 4e-3,
        "decoupled_weight_decay": False,
        "maximize": False,
    },
}

_BOOLS = ("nesterov", "amsgrad", "maximize", "centered", "decoupled_weight_decay")
# Optimizer state that is one scalar whatever the parameter's shape (NAdam's float32
# running product), not an array shaped like the parameter.
_SCALAR_STATE = ("mu_product",)


def _check_hyper(name: str, hyper: dict) -> dict:
    """Type- and range-check a full set of ``name``'s hyper-parameters; betas become a tuple."""
    out: dict[str, Any] = {}
    for key, value in hyper.items():
        if key in _BOOLS:
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name}: hyper-parameter {key!r} must be a bool, got {value!r}")
            out[key] = bool(value)
        elif key == "betas":
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 2
                or not all(_is_real(b) for b in value)
            ):
                raise ValueError(
                    f"{name}: 'betas' must be two floats like [0.9, 0.999], got {value!r}"
                )
            for i, b in enumerate(value):
                if not 0.0 <= b < 1.0:
                    raise ValueError(
                        f"{name}: invalid beta parameter at index {i}: {b} (expected 0 <= beta < 1)"
                    )
            out[key] = (float(value[0]), float(value[1]))
        else:
            if not _is_real(value):
                raise ValueError(f"{name}: hyper-parameter {key!r} must be a number, got {value!r}")
            if not value >= 0.0 or math.isinf(value):
                what = "learning rate" if key == "lr" else f"{key} value"
                raise ValueError(f"{name}: invalid {what}: {value} (expected a finite number >= 0)")
            out[key] = float(value)
    if name == "sgd" and out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
        raise ValueError("sgd: nesterov momentum requires a momentum > 0 and zero dampening")
    return out


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def validate(description: dict) -> dict:
    """Check an optimizer description received over the network; return it complete.

    The result has every hyper-parameter of the rule (defaults filled in) and plain JSON
    types (``betas`` a list). Unknown names or hyper-parameters raise ``ValueError``.

    >>> validate({"name": "adam", "lr": 0.01})["betas"]
    [0.9, 0.999]
    """
    if not isinstance(description, dict):
        raise ValueError(f"optimizer description must be a dict, got {type(description).__name__}")
    name = description.get("name")
    if name not in WIRE_RULES:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {list(WIRE_RULES)}")
    defaults = HYPERPARAMETERS[name]
    unknown = sorted(set(description) - set(defaults) - {"name", WEIGHT_DECAY_BY_PARAMETER})
    if unknown:
        raise ValueError(
            f"{name}: unknown hyper-parameter(s) {unknown}; it takes {sorted(defaults)}"
        )
    hyper = _check_hyper(name, {k: description.get(k, v) for k, v in defaults.items()})
    if "betas" in hyper:
        hyper["betas"] = list(hyper["betas"])
    overrides = _check_weight_decays(name, hyper, description.get(WEIGHT_DECAY_BY_PARAMETER))
    # Left out when empty, so a one-group optimizer's description (and job id) is as before.
    return {"name": name, **hyper, **({WEIGHT_DECAY_BY_PARAMETER: overrides} if overrides else {})}


# Parameter groups that differ only in weight decay (the usual "no decay for biases and
# norms" groups) travel as one description plus the weight decay of each parameter whose
# group differs from the first group.
WEIGHT_DECAY_BY_PARAMETER = "weight_decay_by_parameter"


def _check_weight_decays(name: str, hyper: dict, overrides) -> dict[str, float]:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise ValueError(
            f"{name}: {WEIGHT_DECAY_BY_PARAMETER} must map parameter names to numbers, "
            f"got {overrides!r}"
        )
    for key, value in overrides.items():
        try:
            _check_hyper(name, {**hyper, "weight_decay": value})
        except ValueError as e:
            reason = str(e).removeprefix(f"{name}: ")
            raise ValueError(f"{name}: {WEIGHT_DECAY_BY_PARAMETER}[{key}]: {reason}") from None
    return {k: float(v) for k, v in sorted(overrides.items())}


# ==================================================================== state on the wire ==


def state_to_arrays(state: dict) -> tuple[dict[str, np.ndarray], int]:
    """One parameter's optimizer state as (named NumPy arrays, step count): for checkpoints."""
    arrays = {k: backend.to_numpy(v) for k, v in state.items() if k != "step" and v is not None}
    return arrays, int(state.get("step", 0))


def state_from_arrays(arrays: dict[str, np.ndarray], step: int, xp=np) -> dict:
    """The inverse of ``state_to_arrays``: a state dict the update rules accept, on ``xp``."""
    state: dict[str, Any] = {k: xp.array(v, copy=True) for k, v in arrays.items()}
    state["step"] = int(step)
    return state


# ==================================================================== optimizers ========


class Optimizer:
    """Base class: parameter groups, per-parameter state and the update loop.

    A subclass names its rule (``rule``, a key of ``UPDATE_RULES``); ``step()`` calls that
    pure function on every parameter that has a gradient.
    """

    rule: str = ""

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.state: dict[Tensor, dict] = {}
        self.param_groups: list[dict] = []
        if isinstance(params, Tensor):
            raise TypeError(
                f"{type(self).__name__}: params must be an iterable of Tensors or "
                f"dicts, got a Tensor; pass [tensor] or model.parameters()"
            )
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of parameters with its own hyper-parameters (missing ones default)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"{type(self).__name__} can only optimize Tensors, got {type(p).__name__}"
                )
            if not p.is_leaf:
                raise ValueError(
                    f"{type(self).__name__} can't optimize a non-leaf Tensor; "
                    f"optimize the leaf it was computed from"
                )
        unknown = sorted(set(param_group) - set(self.defaults) - {"params"})
        if unknown:
            raise ValueError(
                f"{self.rule}: unknown hyper-parameter(s) {unknown}; it takes "
                f"{sorted(self.defaults)}"
            )
        group = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        group.update(_check_hyper(self.rule, group))
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params) or len({id(p) for p in params}) != len(params):
            raise ValueError("some parameters appear in more than one parameter group")
        group["params"] = params
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's ``.grad``: drop it (default) or fill it with zeros."""
        zero_grads((p for group in self.param_groups for p in group["params"]), set_to_none)

    @no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Apply one update to every parameter that has a gradient; returns closure's loss."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        update = UPDATE_RULES[self.rule]
        names = HYPERPARAMETERS[self.rule]
        state = self.state
        for group in self.param_groups:
            hyper = {k: group[k] for k in names}
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                s = state.get(p)
                if s is None:
                    s = state[p] = {}
                data = p._data
                update(backend.xp_of(data), data, grad._data, s, **hyper)
                bump_version(data)
        return loss

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"state": {index: {name: Tensor, "step": int}}, "param_groups": [...]}`` like torch.

        Parameters are named by their index over all groups; the arrays are copies.
        """
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            saved = {k: (list(v) if k == "betas" else v) for k, v in group.items() if k != "params"}
            groups.append({**saved, "params": ids})
        state = {}
        for p, s in self.state.items():
            if id(p) in index:
                state[index[id(p)]] = {
                    k: (v if k == "step" else Tensor(v.copy()))
                    for k, v in s.items()
                    if v is not None
                }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``'s output into an optimizer over the same parameters.

        A ``torch.optim`` state_dict of the same optimizer loads too (its tensors are
        converted), so training can move from torch to gradmesh mid-run.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for i, (mine, theirs) in enumerate(zip(self.param_groups, saved_groups)):
            if len(mine["params"]) != len(theirs["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has "
                    f"{len(theirs['params'])} parameters, this optimizer's has "
                    f"{len(mine['params'])}"
                )
        by_index = {}
        for mine, theirs in zip(self.param_groups, saved_groups):
            for p, i in zip(mine["params"], theirs["params"]):
                by_index[i] = p
        new_state = {}
        for i, s in state_dict["state"].items():
            p = by_index.get(int(i))
            if p is None:
                continue
            xp = backend.xp_of(p._data)
            entry = {}
            for k, v in s.items():
                if k == "step":
                    entry[k] = int(v)
                    continue
                arr = _state_array(v)
                if k in _SCALAR_STATE:
                    entry[k] = xp.array(float(arr), dtype=np.float32)
                    continue
                if arr.shape != p.shape:
                    raise ValueError(
                        f"loaded optimizer state {k!r} has shape {arr.shape}, "
                        f"its parameter has shape {p.shape}"
                    )
                entry[k] = xp.array(
                    backend.to_numpy(arr) if xp is np else arr, dtype=p._data.dtype, copy=True
                )
            new_state[p] = entry
        for mine, theirs in zip(self.param_groups, saved_groups):
            # Only our hyper-parameters: a torch state_dict also carries flags like foreach.
            hyper = {k: v for k, v in theirs.items() if k in self.defaults}
            mine.update(_check_hyper(self.rule, {**self.defaults, **hyper}))
        self.state = new_state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {group[k]}" for k in sorted(group) if k != "params"]
        return "\n".join(lines) + "\n)"


def _state_array(value):
    """A loaded state value as an array: ours, or a torch tensor's values. NumPy cannot
    take a torch bfloat16 tensor; its float32 copy holds the same values exactly."""
    if isinstance(value, Tensor):
        return value._data
    if str(getattr(value, "dtype", "")) == "torch.bfloat16":
        return np.asarray(value.float()).astype(dtypes.bfloat16.np)
    return np.asarray(value)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and weight decay.

    Same arguments and update as ``torch.optim.SGD``.
    """

    rule = "sgd"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ):
        super().__init__(
            params,
            _check_hyper(
                "sgd",
                dict(
                    lr=lr,
                    momentum=momentum,
                    dampening=dampening,
                    weight_decay=weight_decay,
                    nesterov=nesterov,
                    maximize=maximize,
                ),
            ),
        )


class Adam(Optimizer):
    """Adam (Kingma & Ba), with torch's L2 ``weight_decay`` and ``amsgrad``."""

    rule = "adam"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ):
        super().__init__(
            params,
            _check_hyper(
                self.rule,
                dict(
                    lr=lr,
                    betas=betas,
                    eps=eps,
                    weight_decay=weight_decay,
                    amsgrad=amsgrad,
                    maximize=maximize,
                ),
            ),
        )


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter); ``weight_decay`` defaults to 1e-2."""

    rule = "adamw"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)


class RMSprop(Optimizer):
    """RMSprop (Hinton), with torch's ``alpha``, ``centered`` and ``momentum``."""

    rule = "rmsprop"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
    ):
        super().__init__(
            params,
            _check_hyper(
                self.rule,
                dict(
                    lr=lr,
                    alpha=alpha,
                    eps=eps,
                    weight_decay=weight_decay,
                    momentum=momentum,
                    centered=centered,
                    maximize=maximize,
                ),
            ),
        )


class Adagrad(Optimizer):
    """Adagrad (Duchi et al.), with torch's ``lr_decay`` and ``initial_accumulator_value``."""

    rule = "adagrad"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
    ):
        super().__init__(
            params,
            _check_hyper(
                self.rule,
                dict(
                    lr=lr,
                    lr_decay=lr_decay,
                    weight_decay=weight_decay,
                    initial_accumulator_value=initial_accumulator_value,
                    eps=eps,
                    maximize=maximize,
                ),
            ),
        )


class Adamax(Optimizer):
    """Adamax (Kingma & Ba): Adam with the infinity norm; ``lr`` defaults to 2e-3."""

    rule = "adamax"

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
    ):
        # foreach: accepted for torch's signature; the single-tensor rule is the one used.
        super().__init__(
            params,
            _check_hyper(
                self.rule,
                dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize),
            ),
        )


class NAdam(Optimizer):
    """NAdam (Dozat): Adam with Nesterov momentum, torch's ``momentum_decay`` and
    ``decoupled_weight_decay`` (NAdamW); ``lr`` defaults to 2e-3."""

    rule = "nadam"

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ):
        super().__init__(
            params,
            _check_hyper(
                self.rule,
                dict(
                    lr=lr,
                    betas=betas,
                    eps=eps,
                    weight_decay=weight_decay,
                    momentum_decay=momentum_decay,
                    decoupled_weight_decay=decoupled_weight_decay,
                    maximize=maximize,
                ),
            ),
        )


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "adam": Adam,
    "adamw": AdamW,
    "rmsprop": RMSprop,
    "adagrad": Adagrad,
    "adamax": Adamax,
    "nadam": NAdam,
}


def describe(optimizer: Optimizer, initial: bool = False, names: dict | None = None) -> dict:
    """The optimizer as a plain, JSON-ready dict: ``{"name": "adam", "lr": ..., ...}``.

    The wire format carries one set of hyper-parameters, so all groups must share them,
    except ``weight_decay`` when ``names`` (parameter -> its name, as
    ``{p: n for n, p in model.named_parameters()}``) is given: then a parameter whose
    group's weight decay differs from the first group's is listed with its own under
    ``"weight_decay_by_parameter"``. ``initial``: the lr a learning-rate scheduler started
    from (each group's ``initial_lr``), not the one it has set since.
    """

    def hyper(group: dict) -> dict:
        out = {k: group[k] for k in HYPERPARAMETERS[optimizer.rule]}
        if initial and "initial_lr" in group:
            out["lr"] = group["initial_lr"]
        return out

    groups = [hyper(g) for g in optimizer.param_groups]
    first = groups[0]
    shared = [k for k in first if not (names is not None and k == "weight_decay")]
    differ = sorted({k for g in groups[1:] for k in shared if g[k] != first[k]})
    if differ:
        raise ValueError(
            f"describe: {type(optimizer).__name__}'s parameter groups have "
            f"different hyper-parameters {differ}; the description carries one set "
            f"(groups may differ in weight_decay only, given the parameters' names), "
            f"so use one group"
        )
    overrides = {}
    for i, (group, h) in enumerate(zip(optimizer.param_groups[1:], groups[1:]), start=1):
        if h["weight_decay"] == first["weight_decay"]:
            continue
        if any(p not in names for p in group["params"]):
            raise ValueError(f"describe: parameter group {i} holds a parameter without a name")
        overrides.update({names[p]: h["weight_decay"] for p in group["params"]})
    extra = {WEIGHT_DECAY_BY_PARAMETER: overrides} if overrides else {}
    return validate({"name": optimizer.rule, **first, **extra})


def from_description(params: Iterable, description: dict) -> Optimizer:
    """Build the optimizer a description names (after ``validate``) over ``params``."""
    d = validate(description)
    name = d.pop("name")
    d.pop(WEIGHT_DECAY_BY_PARAMETER, None)  # one group: the per-parameter decays are the shards'
    return OPTIMIZERS[name](params, **d)


# torch spells it torch.optim.lr_scheduler: `from gradmesh.core.optim.lr_scheduler import
# StepLR` works too (this module is not a package, so the name is registered here).
import sys as _sys  # noqa: E402

from . import lr_scheduler as lr_scheduler  # noqa: E402

_sys.modules[__name__ + ".lr_scheduler"] = lr_scheduler
