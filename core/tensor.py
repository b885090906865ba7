"""The Tensor: an array plus what autograd needs (``requires_grad``, ``grad``, ``grad_fn``)."""
from __future__ import annotations

import numbers
import threading
from typing import Any, Sequence

import numpy as np

from . import autograd, backend, dtypes, sharedmem
from .autograd import Node, is_grad_enabled
from .autograd import _state as _grad_state
from .registry import REGISTRY, Op, OpError


class _Dispatch(threading.local):
    """Per-thread hooks of the op dispatcher: a graph tracer records every op it sees."""
    tracer = None       # a class default, so that reading it never fails (see autograd._State)


_dispatch = _Dispatch()
_ndarray = np.ndarray


def _graph_tracer():
    """The active graph tracer (core/graph.py), which also records in-place changes and
    the tensors the traced function makes; None without one (or for a tracer that only
    watches dispatched ops)."""
    tracer = _dispatch.tracer
    return tracer if tracer is not None and hasattr(tracer, "inplace") else None


def apply(op: Op, inputs: Sequence["Tensor"], attrs: dict) -> "Tensor":
    """Run one registered op on Tensors: validate, compute, record for autograd and tracing.

    This runs for every op, so it avoids generators, repeated lookups and allocations it
    can skip: each microsecond here is a few percent of a small model's step.
    """
    if len(attrs) != len(op.attrs):
        attrs = fill_attrs(op, attrs)
    if op.arity is not None and len(inputs) != op.arity:
        raise TypeError(f"{op.name}: expected {op.arity} inputs, got {len(inputs)}")
    state = _grad_state
    if not state.trusted:
        # Validation, with errors that name the op. The backward engine (without
        # create_graph) skips it: its vjps only combine values that were validated on the
        # way forward.
        op.infer(*inputs, **attrs)
    n = len(inputs)
    if n == 2:
        a, b = inputs[0]._data, inputs[1]._data
        arrays = (a, b)
        on_cpu = type(a) is _ndarray and type(b) is _ndarray
    elif n == 1:
        a = inputs[0]._data
        arrays = (a,)
        on_cpu = type(a) is _ndarray
    else:
        arrays = [t._data for t in inputs]
        on_cpu = all(type(a) is _ndarray for a in arrays)
    xp = np if on_cpu else _common_xp(op, inputs, arrays)
    out = op.forward(xp, *arrays, **attrs)
    requires = False
    if state.grad:
        for t in inputs:
            if t.requires_grad:
                requires = True
                break
    result = Tensor._wrap(out, requires)
    if requires:
        data = result._data
        if data.dtype.kind != "f" or not op.differentiable:
            # Integer and bool results (argmax, comparisons) carry no gradient, as in torch;
            # nor does a gradient stop (stop_gradient).
            result.requires_grad = False
        else:
            result.grad_fn = Node(op, tuple(inputs), attrs, data if op.saves_out else None,
                                  (data.shape, result.dtype))
    tracer = _dispatch.tracer
    if tracer is not None:
        tracer.record(op, inputs, attrs, result)
    return result


def _common_xp(op: Op, inputs, arrays):
    """The array module of inputs that are not all NumPy arrays; they must share one."""
    xp = backend.xp_of(arrays[0])
    if any(backend.xp_of(a) is not xp for a in arrays[1:]):
        raise RuntimeError(f"{op.name}: expected all tensors to be on the same device, got "
                           f"{', '.join(t.device for t in inputs)}")
    return xp


def fill_attrs(op: Op, attrs: dict) -> dict:
    unknown = set(attrs) - set(op.attrs)
    if unknown:
        raise TypeError(f"{op.name}: unexpected attribute(s) {sorted(unknown)}; "
                        f"it takes {sorted(op.attrs)}")
    return {name: attrs.get(name, default) for name, (_kind, default) in op.attrs.items()}


def _share(tensors: Sequence["Tensor"]) -> None:
    """Move the data of CPU tensors into one new shared-memory segment."""
    try:
        arrays = sharedmem.share([t._data for t in tensors])
    except sharedmem.SegmentError as e:
        raise RuntimeError(f"share_memory_: {e}") from None
    for t, a in zip(tensors, arrays):
        t._data = a


def _reduce_grad(g: "Tensor", t: "Tensor") -> "Tensor":
    """Sum a broadcast gradient back to ``t``'s shape and cast it to ``t``'s dtype."""
    gdata, tdata = g._data, t._data
    shape = tdata.shape
    if gdata.shape != shape:
        lead = gdata.ndim - len(shape)
        inner = [i + lead for i, s in enumerate(shape) if s == 1 and gdata.shape[i + lead] != 1]
        if not _grad_state.grad and _dispatch.tracer is None:
            # Nothing records this (the engine without create_graph): the sum op's own
            # array call, without the op around it.
            axes = tuple(range(lead)) + tuple(inner)
            out = gdata.sum(axis=axes, keepdims=bool(inner)) if axes else gdata
            if out.shape != shape:
                out = out.reshape(shape)
            g = Tensor._wrap(out)
        elif lead > 0 and not inner:
            # Only leading dims to drop (a bias under a batch): one sum, no reshape.
            g = F.sum(g, dim=list(range(lead)))
        else:
            dims = list(range(lead)) + inner
            if dims:
                g = F.sum(g, dim=dims, keepdim=True)
            if g.shape != shape:
                g = F.reshape(g, shape)
        gdata = g._data
    if gdata.dtype is not tdata.dtype and gdata.dtype != tdata.dtype:
        g = g.to(t.dtype)
    return g


class Tensor:
    """A multi-dimensional array that can record the ops applied to it for autograd.

    >>> import gradmesh.core as gm
    >>> x = gm.tensor([1.0, 2.0], requires_grad=True)
    >>> (x * x).sum().backward()
    >>> x.grad
    tensor([2., 4.])
    """

    __slots__ = ("_data", "requires_grad", "grad", "grad_fn", "_retains_grad", "__weakref__")
    __array_priority__ = 1000        # ndarray * Tensor -> Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data._data
        elif not _is_array(data):
            data = np.asarray(data)
        dtypes.from_numpy(data.dtype)       # reject unsupported dtypes early
        self._data = data
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self.grad_fn = None
        self._retains_grad = False
        if requires_grad and not self.dtype.is_floating_point:
            raise RuntimeError(f"only tensors of floating point dtype can require gradients, "
                               f"got {self.dtype}")

    @classmethod
    def _wrap(cls, array, requires_grad: bool = False) -> "Tensor":
        """Fast construction from an op's result (NumPy turns 0-d results into scalars)."""
        t = object.__new__(cls)
        t._data = array if type(array) is _ndarray or _is_array(array) else np.asarray(array)
        t.requires_grad = requires_grad
        t.grad = None
        t.grad_fn = None
        t._retains_grad = False
        return t

    @classmethod
    def _from_node(cls, node: Node) -> "Tensor":
        """The forward result of ``node`` as a Tensor whose gradient flows into ``node``."""
        t = cls._wrap(node.out_data, True)
        t.grad_fn = node
        return t

    # -- metadata --------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self._data.shape

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return self._data.ndim

    def dim(self) -> int:
        return self._data.ndim

    def numel(self) -> int:
        return int(self._data.size)

    nelement = numel

    @property
    def dtype(self) -> dtypes.DType:
        d = _DTYPE_BY_ID.get(id(self._data.dtype))
        return d if d is not None else dtypes.from_numpy(self._data.dtype)

    @property
    def device(self) -> str:
        return backend.device_of(self._data)

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def is_leaf(self) -> bool:
        return self.grad_fn is None

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def data(self) -> "Tensor":
        """The same storage, detached from the graph (like torch's ``.data``)."""
        return self.detach()

    @data.setter
    def data(self, value) -> None:
        tracer = _graph_tracer()
        if tracer is not None:
            tracer.set_data(self, value, _untraced(tracer, Tensor.data.fset, self, value))
            return
        self._data = value._data if isinstance(value, Tensor) else value

    # T and mT call the permute primitive directly: ``linear`` and every matmul vjp take
    # them, and the generic route (transpose -> permute -> argument checks) costs ~3x more.
    @property
    def T(self) -> "Tensor":
        return apply(REGISTRY["permute"], (self,), {"dims": list(range(self.ndim - 1, -1, -1))})

    @property
    def mT(self) -> "Tensor":
        n = self._data.ndim
        if n < 2:
            return F.transpose(self, -2, -1)        # raises torch's error
        dims = list(range(n))
        dims[-2], dims[-1] = n - 1, n - 2
        return apply(REGISTRY["permute"], (self,), {"dims": dims})

    # -- autograd --------------------------------------------------------------------------
    def backward(self, gradient=None, retain_graph: bool | None = None,
                 create_graph: bool = False, inputs=None) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``."""
        if inputs is not None:
            grads = autograd.grad(self, inputs, gradient, retain_graph=retain_graph,
                                  create_graph=create_graph, allow_unused=True)
            for t, g in zip(inputs, grads):
                if g is not None:
                    t.grad = g if t.grad is None else t.grad + g
            return
        autograd.backward(self, gradient, retain_graph=retain_graph, create_graph=create_graph)

    def detach(self) -> "Tensor":
        """The same storage, cut from the graph: no gradient flows through the result."""
        if _dispatch.tracer is not None:
            # Dispatched as the stop_gradient op, so that a traced graph keeps the stop.
            return apply(REGISTRY["stop_gradient"], (self,), {})
        return Tensor._wrap(self._data)

    def detach_(self) -> "Tensor":
        tracer = _dispatch.tracer
        if tracer is not None:
            # The tensor itself becomes the stop: from here on a traced graph reads it there.
            tracer.record(REGISTRY["stop_gradient"], (self,), {}, self)
        self.grad_fn = None
        self.requires_grad = False
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "Tensor":
        if not self.is_leaf:
            raise RuntimeError("you can only change requires_grad flags of leaf variables; "
                               "use .detach().requires_grad_() for a new leaf")
        if requires_grad and not self.dtype.is_floating_point:
            raise RuntimeError(f"only tensors of floating point dtype can require gradients, "
                               f"got {self.dtype}")
        self.requires_grad = requires_grad
        return self

    def retain_grad(self) -> None:
        if not self.requires_grad:
            raise RuntimeError("can't retain_grad on Tensor that has requires_grad=False")
        if not self.is_leaf:
            self._retains_grad = True

    @property
    def retains_grad(self) -> bool:
        return self._retains_grad

    # -- shared memory ---------------------------------------------------------------------
    def share_memory_(self) -> "Tensor":
        """Move the data of this CPU tensor into shared memory (a sealed memory segment), as
        torch's ``share_memory_`` does: a gradmesh worker on this host then reads it where
        it is instead of receiving a copy with every call (``WorkerClient``). In-place
        updates (optimizers, ``copy_``) keep it there. A no-op if already shared or on
        CUDA. Views taken earlier keep the old memory."""
        if self.device == "cpu" and not self.is_shared():
            _share([self])
        return self

    def is_shared(self) -> bool:
        """Whether the data is in shared memory (:meth:`share_memory_`)."""
        return self.device == "cpu" and sharedmem.locate(self._data) is not None

    # -- conversion ------------------------------------------------------------------------
    def numpy(self, force: bool = False) -> np.ndarray:
        """The data as a NumPy array; shares memory with a CPU tensor."""
        if self.requires_grad and not force:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad. "
                               "Use tensor.detach().numpy() instead.")
        return backend.to_numpy(self._data)

    def __array__(self, dtype=None, copy=None):
        a = backend.to_numpy(self._data)
        return a if dtype is None else a.astype(dtype)

    def item(self):
        if self.numel() != 1:
            raise RuntimeError(f"a Tensor with {self.numel()} elements cannot be converted to "
                               f"Scalar")
        return self._data.reshape(()).item()

    def tolist(self):
        return backend.to_numpy(self._data).tolist()

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if self.dtype.is_floating_point or self.numel() != 1:
            raise TypeError("only integer tensors of a single element can be converted to an index")
        return int(self.item())

    def __bool__(self) -> bool:
        if self.numel() != 1:
            raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous")
        return bool(self.item())

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(self.shape[0]))

    def to(self, *args, dtype=None, device=None, copy: bool = False) -> "Tensor":
        """``to(dtype)``, ``to(device)``, ``to(device, dtype)``, ``to(other_tensor)``."""
        for a in args:
            if isinstance(a, Tensor):
                dtype, device = a.dtype, a.device
            elif isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda"):
                device = a
            else:
                dtype = a
        t = self
        if device is not None and backend.device_type(device) != self.device:
            t = F.to_device(t, device=backend.device_type(device))
        if dtype is not None and dtypes.as_dtype(dtype) is not t.dtype:
            t = F.cast(t, dtype=dtypes.as_dtype(dtype).name)
        if copy and t is self:
            t = self.clone()
        return t

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def cuda(self) -> "Tensor":
        return self.to("cuda")

    def float(self) -> "Tensor":
        return self.to(dtypes.float32)

    def double(self) -> "Tensor":
        return self.to(dtypes.float64)

    def long(self) -> "Tensor":
        return self.to(dtypes.int64)

    def int(self) -> "Tensor":
        return self.to(dtypes.int32)

    def bool(self) -> "Tensor":
        return self.to(dtypes.bool_)

    def type_as(self, other: "Tensor") -> "Tensor":
        return self.to(other.dtype)

    def clone(self) -> "Tensor":
        return F.clone(self)

    def contiguous(self) -> "Tensor":
        return self

    # -- in-place updates (outside autograd) ------------------------------------------------
    # Each one first checks for a graph tracer: while one is active it records the op's
    # out-of-place form and runs the eager update itself (see ``_traced_inplace``).
    def _check_inplace(self, other=None) -> None:
        if is_grad_enabled() and (self.requires_grad or
                                  (isinstance(other, Tensor) and other.requires_grad)):
            raise RuntimeError("a tensor that requires grad is being used in an in-place "
                               "operation; use the out-of-place op, or wrap the update in "
                               "`with gradmesh.no_grad():`")

    def _operand(self, other):
        return other._data if isinstance(other, Tensor) else other

    def zero_(self) -> "Tensor":
        self._check_inplace()
        tracer = _graph_tracer()
        if tracer is not None:
            return _traced_inplace(tracer, "zero_", self, lambda t: _filled(t, 0),
                                   Tensor.zero_, self)
        self._data[...] = 0
        return self

    def fill_(self, value) -> "Tensor":
        self._check_inplace(value)
        tracer = _graph_tracer()
        if tracer is not None:
            return _traced_inplace(tracer, "fill_", self, lambda t: _filled(t, value),
                                   Tensor.fill_, self, value)
        self._data[...] = self._operand(value)
        return self

    def copy_(self, src) -> "Tensor":
        self._check_inplace(src)
        tracer = _graph_tracer()
        if tracer is not None:
            return _traced_inplace(tracer, "copy_", self, lambda t: _filled(t, src),
                                   Tensor.copy_, self, src)
        src = src._data if isinstance(src, Tensor) else np.asarray(src)
        xp = backend.xp_of(self._data)
        self._data[...] = src if backend.xp_of(src) is xp else xp.asarray(backend.to_numpy(src))
        return self

    def add_(self, other, alpha=1) -> "Tensor":
        self._check_inplace(other)
        tracer = _graph_tracer()
        if tracer is not None:
            # As below: a number is scaled in Python, a tensor by a mul op.
            if isinstance(other, Tensor):
                o, scale = other.detach(), alpha
            else:
                o, scale = (other if alpha == 1 else alpha * other), 1
            return _traced_inplace(tracer, "add_", self, lambda t: F.add(t, o, alpha=scale),
                                   Tensor.add_, self, other, alpha)
        o = self._operand(other)
        self._data += o if alpha == 1 else alpha * o
        return self

    def sub_(self, other, alpha=1) -> "Tensor":
        tracer = _graph_tracer()
        if tracer is not None:
            with tracer.spelled("sub_"):
                return self.add_(other, -alpha)
        return self.add_(other, -alpha)

    def mul_(self, other) -> "Tensor":
        self._check_inplace(other)
        tracer = _graph_tracer()
        if tracer is not None:
            o = _detached(other)
            return _traced_inplace(tracer, "mul_", self, lambda t: F.mul(t, o),
                                   Tensor.mul_, self, other)
        self._data *= self._operand(other)
        return self

    def div_(self, other) -> "Tensor":
        self._check_inplace(other)
        tracer = _graph_tracer()
        if tracer is not None:
            o = _detached(other)
            return _traced_inplace(tracer, "div_", self, lambda t: F.div(t, o),
                                   Tensor.div_, self, other)
        self._data /= self._operand(other)
        return self

    def clamp_(self, min=None, max=None) -> "Tensor":
        self._check_inplace()
        tracer = _graph_tracer()
        if tracer is not None:
            lo, hi = _detached(min), _detached(max)
            return _traced_inplace(tracer, "clamp_", self, lambda t: F.clamp(t, lo, hi),
                                   Tensor.clamp_, self, min, max)
        backend.xp_of(self._data).clip(self._data, min, max, out=self._data)
        return self

    def _inplace_or_new(self, other, inplace, outofplace, symbol: str):
        if is_grad_enabled() and (self.requires_grad or
                                  (isinstance(other, Tensor) and other.requires_grad)):
            if self.requires_grad and self.grad_fn is None:
                # Rebinding a parameter to a new non-leaf (``w -= lr * w.grad`` outside
                # no_grad) would silently stop its training: torch raises here too.
                raise RuntimeError("a leaf tensor that requires grad is being used in an "
                                   "in-place operation; wrap the update in "
                                   "`with gradmesh.no_grad():`")
            return outofplace(self, other)
        tracer = _graph_tracer()
        if tracer is not None:
            with tracer.spelled(symbol):
                return inplace(other)
        return inplace(other)

    def __iadd__(self, other):
        return self._inplace_or_new(other, self.add_, Tensor.__add__, "+=")

    def __isub__(self, other):
        return self._inplace_or_new(other, self.sub_, Tensor.__sub__, "-=")

    def __imul__(self, other):
        return self._inplace_or_new(other, self.mul_, Tensor.__mul__, "*=")

    def __itruediv__(self, other):
        return self._inplace_or_new(other, self.div_, Tensor.__truediv__, "/=")

    # -- display ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        body = np.array2string(backend.to_numpy(self._data), separator=", ", precision=4,
                               prefix="tensor(")
        extra = []
        if self.dtype not in (dtypes.float32, dtypes.int64, dtypes.bool_) or self.numel() == 0:
            extra.append(f"dtype={self.dtype}")
        if self.device != "cpu":
            extra.append(f"device='{self.device}'")
        if self.grad_fn is not None:
            extra.append(f"grad_fn=<{self.grad_fn.name()}>")
        elif self.requires_grad:
            extra.append("requires_grad=True")
        return "tensor(" + body + "".join(", " + e for e in extra) + ")"

    __hash__ = object.__hash__


# NumPy's dtypes of the builtin types are singletons: look them up by identity (a dict
# lookup by np.dtype hashes it, several times slower). Others take dtypes.from_numpy.
_DTYPE_BY_ID = {id(d.np): d for d in dtypes.ALL}


def _is_array(x) -> bool:
    return type(x) is np.ndarray or (backend._cupy is not None and
                                     isinstance(x, backend._cupy.ndarray))


# ---------------------------------------------------------------------------------------
# Creation
# ---------------------------------------------------------------------------------------

def _new(array, requires_grad: bool = False) -> Tensor:
    """A tensor over a newly allocated ``array`` (what the factories return). A graph tracer
    notes it as made by the traced function, which may then change it in place."""
    t = Tensor(array, requires_grad=requires_grad)
    tracer = _graph_tracer()
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
        dtype = (dtypes.bool_ if isinstance(fill_value, bool) else
                 dtypes.int64 if isinstance(fill_value, numbers.Integral) else dtypes.default_float)
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
    return fn(t.shape, dtype=dtype or t.dtype, device=device or t.device,
              requires_grad=requires_grad)


def zeros_like(t: Tensor, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _like(t, zeros, dtype, device, requires_grad)


def ones_like(t: Tensor, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _like(t, ones, dtype, device, requires_grad)


def full_like(t: Tensor, fill_value, dtype=None, device=None, requires_grad=False) -> Tensor:
    return full(t.shape, fill_value, dtype=dtype or t.dtype, device=device or t.device,
                requires_grad=requires_grad)


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
    return _new(xp.linspace(start, end, steps, dtype=_np_dtype(dtype)),
                  requires_grad=requires_grad)


def eye(n: int, m: int | None = None, dtype=None, device=None, requires_grad=False) -> Tensor:
    xp = backend.xp_for(device)
    return _new(xp.eye(n, m, dtype=_np_dtype(dtype)), requires_grad=requires_grad)


def _random(draw, size, dtype, device, requires_grad) -> Tensor:
    array = draw(_shape_arg(size)).astype(_np_dtype(dtype), copy=False)
    xp = backend.xp_for(device)
    return _new(array if xp is np else xp.asarray(array), requires_grad=requires_grad)


def randn(*size, generator=None, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Standard normal samples (seeded by ``manual_seed`` or ``generator``)."""
    from .random import rng
    return _random(rng(generator).standard_normal, size, dtype, device, requires_grad)


def rand(*size, generator=None, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Uniform samples on [0, 1)."""
    from .random import rng
    return _random(rng(generator).random, size, dtype, device, requires_grad)


def randint(low, high=None, size=(), generator=None, dtype=None, device=None) -> Tensor:
    from .random import rng
    if high is None:
        low, high = 0, low
    draw = lambda shape: rng(generator).integers(low, high, size=shape)  # noqa: E731
    return _random(draw, (tuple(size),), dtype or dtypes.int64, device, False)


def randperm(n: int, generator=None, dtype=None, device=None) -> Tensor:
    from .random import rng
    draw = lambda shape: rng(generator).permutation(n)  # noqa: E731
    return _random(draw, ((n,),), dtype or dtypes.int64, device, False)


def randn_like(t: Tensor, dtype=None, generator=None) -> Tensor:
    return randn(t.shape, generator=generator, dtype=dtype or t.dtype, device=t.device)


def rand_like(t: Tensor, dtype=None, generator=None) -> Tensor:
    return rand(t.shape, generator=generator, dtype=dtype or t.dtype, device=t.device)


def is_tensor(x: Any) -> bool:
    return isinstance(x, Tensor)


from . import functional as F  # noqa: E402  (functional builds on Tensor)


# ---------------------------------------------------------------------------------------
# Operators and methods: thin wrappers over gradmesh.core.functional
# ---------------------------------------------------------------------------------------

def _swap(fn):
    return lambda self, other: fn(other, self)


def _setitem(self: Tensor, index, value) -> None:
    """``x[index] = value`` in place, outside autograd (as for the other in-place ops)."""
    self._check_inplace(value)
    tracer = _graph_tracer()
    if tracer is not None:
        # Traced as a write to the view of the basic part of the index (ints, slices),
        # with index_put for the advanced part (index tensors, masks).
        view, advanced = F._basic_index(self, index)

        def new_value(v: Tensor) -> Tensor:
            values = _value_like(value, v)
            if not advanced:
                return _filled(v, values)
            return REGISTRY["index_put"](v, values, *[i for _, i in advanced],
                                         dims=[d for d, _ in advanced], accumulate=False)
        _traced_inplace(tracer, "t[index] = value", view, new_value, _setitem, self, index,
                        value)
        return
    if isinstance(index, Tensor):
        index = index._data
    elif isinstance(index, tuple):
        index = tuple(i._data if isinstance(i, Tensor) else i for i in index)
    self._data[index] = value._data if isinstance(value, Tensor) else value


def _untraced(tracer, fn, *args):
    """A call of ``fn(*args)`` with the tracer off: the eager half of an op it records."""
    def run() -> None:
        _dispatch.tracer = None
        try:
            fn(*args)
        finally:
            _dispatch.tracer = tracer
    return run


def _traced_inplace(tracer, name: str, target: Tensor, new_value, method, *args) -> Tensor:
    """Record the in-place op ``name`` as its out-of-place form, ``new_value(target)``, and
    run the eager ``method(*args)`` untraced (see ``graph._Tracer.inplace``); returns
    ``args[0]``, the tensor the method changes."""
    tracer.inplace(name, target, new_value, _untraced(tracer, method, *args))
    return args[0]


def _detached(value):
    return value.detach() if isinstance(value, Tensor) else value


def _value_like(value, like: Tensor) -> Tensor:
    """``value`` (a tensor, number, list or array) as NumPy's assignment into ``like``
    writes it: in ``like``'s dtype (cast unsafely) and on its device, without gradient."""
    if isinstance(value, Tensor):
        value = value.detach()
        if value.device != like.device:
            value = value.to(like.device)
        return value if value.dtype is like.dtype else value.to(like.dtype)
    xp = backend.xp_of(like._data)
    array = np.asarray(backend.to_numpy(value) if _is_array(value) else value)
    array = array.astype(like._data.dtype)
    return Tensor._wrap(array if xp is np else xp.asarray(array))


def _filled(t: Tensor, value) -> Tensor:
    """``t`` with every element replaced by ``value`` (broadcast) in ``t``'s dtype: a
    ``where`` on a true condition, which keeps ``t``'s (batch) shape out of the graph."""
    true = Tensor._wrap(backend.xp_of(t._data).asarray(True))
    return F.where(true, _value_like(value, t), t)


def _install_methods() -> None:
    T = Tensor
    T.__add__ = lambda s, o: F.add(s, o)
    T.__radd__ = _swap(F.add)
    T.__sub__ = lambda s, o: F.sub(s, o)
    T.__rsub__ = _swap(F.sub)
    T.__mul__ = lambda s, o: F.mul(s, o)
    T.__rmul__ = _swap(F.mul)
    T.__truediv__ = lambda s, o: F.div(s, o)
    T.__rtruediv__ = _swap(F.div)
    T.__pow__ = lambda s, o: F.pow(s, o)
    T.__rpow__ = _swap(F.pow)
    T.__matmul__ = lambda s, o: F.matmul(s, o)
    T.__rmatmul__ = _swap(F.matmul)
    T.__neg__ = lambda s: F.neg(s)
    T.__pos__ = lambda s: s
    T.__abs__ = lambda s: F.abs(s)
    T.__eq__ = lambda s, o: F.eq(s, o)
    T.__ne__ = lambda s, o: F.ne(s, o)
    T.__lt__ = lambda s, o: F.lt(s, o)
    T.__le__ = lambda s, o: F.le(s, o)
    T.__gt__ = lambda s, o: F.gt(s, o)
    T.__ge__ = lambda s, o: F.ge(s, o)
    T.__and__ = lambda s, o: F.logical_and(s, o)
    T.__or__ = lambda s, o: F.logical_or(s, o)
    T.__invert__ = lambda s: F.logical_not(s)
    T.__getitem__ = lambda s, index: F.getitem(s, index)
    T.__setitem__ = _setitem
    # Methods with the same name and signature as the functions.
    for name in METHODS:
        fn = getattr(F, name, None)
        if fn is not None and not hasattr(T, name):
            setattr(T, name, fn)


METHODS = (
    "add", "sub", "mul", "div", "neg", "pow", "matmul", "mm", "exp", "log", "log1p", "sqrt",
    "abs", "sign", "sin", "cos", "tanh", "sigmoid", "relu", "clamp", "clip", "maximum",
    "minimum", "square", "rsqrt", "reciprocal", "sum", "mean", "var", "std", "max", "min",
    "amax", "amin", "argmax", "argmin", "logsumexp", "softmax", "log_softmax", "prod", "all",
    "any", "norm", "reshape", "view", "flatten", "unflatten", "transpose", "permute", "squeeze",
    "unsqueeze", "expand", "expand_as", "view_as", "reshape_as", "repeat", "split", "chunk",
    "gather", "index_select", "masked_fill", "narrow", "flip", "roll", "tril", "triu",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "leaky_relu", "gelu", "softplus", "cumsum", "t", "diagonal", "outer", "dot",
    "scatter_add", "index_add", "nonzero", "topk", "sort", "argsort", "where", "allclose",
    "equal", "isclose", "unbind", "select", "movedim", "bmm", "mv",
)
