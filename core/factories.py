"""Creating tensors: ``tensor``, ``zeros``, ``arange``, ``randn`` and the rest, as torch's."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from . import backend, dtypes, interop
from .hooks import graph_tracer
from .random import permutation, rng
from .tensor import Tensor, _is_array


def _new(array, requires_grad: bool = False) -> Tensor:
    """A tensor over a newly allocated ``array`` (what the factories return). A graph tracer
    notes it as made by the traced function, which may then change it in place."""
    t = Tensor(array, requires_grad=requires_grad)
    tracer = graph_tracer()
    if tracer is not None:
        tracer.created(t)
    return t


def _infer_np_dtype(data) -> np.dtype:
    """torch.tensor's choice: Python floats give float32, ints int64, bools bool."""
    arr = np.asarray(data)
    if arr.dtype.kind == "f":
        return dtypes.default_float.np
    if arr.dtype.kind in "iu":
        return np.dtype(np.int64)
    if arr.dtype.kind == "b":
        return np.dtype(np.bool_)
    raise TypeError(f"can't build a tensor from {type(data).__name__} of dtype {arr.dtype}")


def tensor(data, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A new tensor holding a copy of ``data`` (nested lists, scalars, arrays or tensors)."""
    data = interop.torch_bfloat16_as_numpy(data)
    if isinstance(data, Tensor):
        array = backend.to_numpy(data._data)
    elif _is_array(data) or isinstance(data, np.generic):
        array = backend.to_numpy(data)
    else:
        if isinstance(data, (list, tuple)) and any(isinstance(x, Tensor) for x in _flat(data)):
            data = _nested_to_list(data)
        array = np.asarray(data, dtype=_infer_np_dtype(data) if dtype is None else None)
    np_dtype = dtypes.as_dtype(dtype).np if dtype is not None else dtypes.from_numpy(array.dtype).np
    array = np.array(array, dtype=np_dtype, copy=True)
    xp = backend.xp_for(device)
    return _new(array if xp is np else xp.asarray(array), requires_grad=requires_grad)


def _flat(data):
    for x in data:
        if isinstance(x, (list, tuple)):
            yield from _flat(x)
        else:
            yield x


def _nested_to_list(data):
    if isinstance(data, Tensor):
        return data.tolist()
    if isinstance(data, (list, tuple)):
        return [_nested_to_list(x) for x in data]
    return data


def as_tensor(data, dtype=None, device=None) -> Tensor:
    """Like ``tensor`` but shares memory with ``data`` where it can (same dtype and device)."""
    if isinstance(data, Tensor):
        return data.to(device=device, dtype=dtype) if (dtype or device) else data
    data = interop.torch_bfloat16_as_numpy(data)
    if _is_array(data):
        t = Tensor(data)
        return t.to(device=device, dtype=dtype) if (dtype or device) else t
    return tensor(data, dtype=dtype, device=device)


def from_numpy(array: np.ndarray) -> Tensor:
    """A tensor that shares memory with ``array``; changes to one show in the other."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected np.ndarray (got {type(array).__name__})")
    return Tensor(array)


def _shape_arg(size) -> tuple:
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = size[0]
    size = tuple(int(s) for s in size)
    if any(s < 0 for s in size):
        raise RuntimeError(f"negative dimension in size {size}")
    return size


def _np_dtype(dtype, default=None) -> np.dtype:
    if dtype is None:
        return (default or dtypes.default_float).np
    return dtypes.as_dtype(dtype).np


def full(size, fill_value, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    size = _shape_arg((size,)) if not isinstance(size, int) else (size,)
    if dtype is None:
        dtype = (
            dtypes.bool_
            if isinstance(fill_value, bool)
            else dtypes.int64
            if isinstance(fill_value, numbers.Integral)
            else dtypes.default_float
        )
    xp = backend.xp_for(device)
    return _new(xp.full(size, fill_value, dtype=_np_dtype(dtype)), requires_grad=requires_grad)


def zeros(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    xp = backend.xp_for(device)
    return _new(xp.zeros(_shape_arg(size), dtype=_np_dtype(dtype)), requires_grad=requires_grad)


def ones(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    xp = backend.xp_for(device)
    return _new(xp.ones(_shape_arg(size), dtype=_np_dtype(dtype)), requires_grad=requires_grad)


def empty(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return zeros(*size, dtype=dtype, device=device, requires_grad=requires_grad)


def _like(t: Tensor, fn, dtype, device, requires_grad):
    return fn(
        t.shape, dtype=dtype or t.dtype, device=device or t.device, requires_grad=requires_grad
    )


def zeros_like(t: Tensor, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _like(t, zeros, dtype, device, requires_grad)


def ones_like(t: Tensor, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _like(t, ones, dtype, device, requires_grad)


def full_like(t: Tensor, fill_value, dtype=None, device=None, requires_grad=False) -> Tensor:
    return full(
        t.shape,
        fill_value,
        dtype=dtype or t.dtype,
        device=device or t.device,
        requires_grad=requires_grad,
    )


def arange(start, end=None, step=1, dtype=None, device=None, requires_grad=False) -> Tensor:
    if end is None:
        start, end = 0, start
    if dtype is None:
        ints = all(isinstance(v, numbers.Integral) for v in (start, end, step))
        dtype = dtypes.int64 if ints else dtypes.default_float
    xp = backend.xp_for(device)
    return _new(xp.arange(start, end, step, dtype=_np_dtype(dtype)), requires_grad=requires_grad)


def linspace(start, end, steps: int, dtype=None, device=None, requires_grad=False) -> Tensor:
    xp = backend.xp_for(device)
    return _new(xp.linspace(start, end, steps, dtype=_np_dtype(dtype)), requires_grad=requires_grad)


def eye(n: int, m: int | None = None, dtype=None, device=None, requires_grad=False) -> Tensor:
    xp = backend.xp_for(device)
    return _new(xp.eye(n, m, dtype=_np_dtype(dtype)), requires_grad=requires_grad)


def _random(draw, size, dtype, device, requires_grad) -> Tensor:
    array = draw(_shape_arg(size)).astype(_np_dtype(dtype), copy=False)
    xp = backend.xp_for(device)
    return _new(array if xp is np else xp.asarray(array), requires_grad=requires_grad)


def randn(*size, generator=None, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Standard normal samples (seeded by ``manual_seed`` or ``generator``)."""
    return _random(rng(generator).standard_normal, size, dtype, device, requires_grad)


def rand(*size, generator=None, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Uniform samples on [0, 1)."""
    return _random(rng(generator).random, size, dtype, device, requires_grad)


def randint(low, high=None, size=(), generator=None, dtype=None, device=None) -> Tensor:
    if high is None:
        low, high = 0, low
    draw = lambda shape: rng(generator).integers(low, high, size=shape)  # noqa: E731
    return _random(draw, (tuple(size),), dtype or dtypes.int64, device, False)


def randperm(n: int, generator=None, dtype=None, device=None) -> Tensor:
    """A random permutation of ``0..n-1``: torch's, for the same seed (core/random.py)."""
    draw = lambda shape: permutation(n, generator)  # noqa: E731
    return _random(draw, ((n,),), dtype or dtypes.int64, device, False)


def randn_like(t: Tensor, dtype=None, generator=None) -> Tensor:
    return randn(t.shape, generator=generator, dtype=dtype or t.dtype, device=t.device)


def rand_like(t: Tensor, dtype=None, generator=None) -> Tensor:
    return rand(t.shape, generator=generator, dtype=dtype or t.dtype, device=t.device)


def is_tensor(x: Any) -> bool:
    return isinstance(x, Tensor)
