"""The Tensor: an array plus what autograd needs (``requires_grad``, ``grad``, ``grad_fn``).

Its ops live in ``gradmesh.core.functional`` and ``gradmesh.core.ops``; the methods that
call them with the same name and signature (``x.exp()``, ``x.sum(dim)``) are generated
from the registry's ``@public(method=True)`` declarations at the end of the class.
"""

from __future__ import annotations

import builtins
import warnings
from typing import Any, Sequence

import numpy as np

from . import backend, dtypes, sharedmem
from .devices import device
from .hooks import _dispatch, graph_tracer, untraced

_ndarray = np.ndarray


def _share(tensors: Sequence["Tensor"]) -> None:
    """Move the data of CPU tensors into one new shared-memory segment."""
    try:
        arrays = sharedmem.share([t._data for t in tensors])
    except sharedmem.SegmentError as e:
        raise RuntimeError(f"share_memory_: {e}") from None
    for t, a in zip(tensors, arrays):
        t._data = a


class Tensor:
    """A multi-dimensional array that can record the ops applied to it for autograd.

    >>> import gradmesh.core as gm
    >>> x = gm.tensor([1.0, 2.0], requires_grad=True)
    >>> (x * x).sum().backward()
    >>> x.grad
    tensor([2., 4.])
    """

    __slots__ = (
        "_data",
        "requires_grad",
        "_grad",
        "grad_fn",
        "_retains_grad",
        "_history",
        "__weakref__",
    )
    __array_priority__ = 1000  # ndarray * Tensor -> Tensor.__rmul__
    _data: Any  # a numpy.ndarray or a cupy.ndarray
    requires_grad: builtins.bool
    _grad: Tensor | None
    grad_fn: Node | None
    _retains_grad: builtins.bool
    _history: list | None  # see autograd._edge

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data._data
        elif not _is_array(data):
            data = np.asarray(data)
        dtypes.from_numpy(data.dtype)  # reject unsupported dtypes early
        self._data = data
        self.requires_grad = bool(requires_grad)
        self._grad = None
        self.grad_fn = None
        self._retains_grad = False
        self._history = None
        if requires_grad and not self.dtype.is_floating_point:
            raise RuntimeError(
                f"only tensors of floating point dtype can require gradients, got {self.dtype}"
            )

    @classmethod
    def _wrap(cls, array, requires_grad: bool = False) -> "Tensor":
        """Fast construction from an op's result (NumPy turns 0-d results into scalars)."""
        t = object.__new__(cls)
        t._data = array if type(array) is _ndarray or _is_array(array) else np.asarray(array)
        t.requires_grad = requires_grad
        t._grad = None
        t.grad_fn = None
        t._retains_grad = False
        t._history = None
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
    def device(self) -> device:
        """``device("cpu")`` or ``device("cuda")``: a ``str`` too (``t.device == "cpu"``)."""
        return _DEVICES[backend.device_of(self._data)]

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
        tracer = graph_tracer()
        if tracer is not None:
            tracer.set_data(self, value, untraced(tracer, _assign_data, self, value))
            return
        _assign_data(self, value)

    # T and mT call the permute primitive directly: ``linear`` and every matmul vjp take
    # them, and the generic route (transpose -> permute -> argument checks) costs ~3x more.
    @property
    def T(self) -> "Tensor":
        dims = list(range(self.ndim - 1, -1, -1))
        return dispatch.apply(REGISTRY["permute"], (self,), {"dims": dims})

    @property
    def mT(self) -> "Tensor":
        n = self._data.ndim
        if n < 2:
            return F.transpose(self, -2, -1)  # raises torch's error
        dims = list(range(n))
        dims[-2], dims[-1] = n - 1, n - 2
        return dispatch.apply(REGISTRY["permute"], (self,), {"dims": dims})

    # -- autograd --------------------------------------------------------------------------
    def backward(
        self,
        gradient=None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
        inputs=None,
    ) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``."""
        if inputs is not None:
            grads = autograd.grad(
                self,
                inputs,
                gradient,
                retain_graph=retain_graph,
                create_graph=create_graph,
                allow_unused=True,
            )
            for t, g in zip(inputs, grads):
                if g is not None:
                    t.grad = g if t.grad is None else t.grad + g
            return
        autograd.backward(self, gradient, retain_graph=retain_graph, create_graph=create_graph)

    def detach(self) -> "Tensor":
        """The same storage, cut from the graph: no gradient flows through the result."""
        if _dispatch.tracer is not None:
            # Dispatched as the stop_gradient op, so that a traced graph keeps the stop.
            return dispatch.apply(REGISTRY["stop_gradient"], (self,), {})
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
            raise RuntimeError(
                "you can only change requires_grad flags of leaf variables; "
                "use .detach().requires_grad_() for a new leaf"
            )
        if requires_grad and not self.dtype.is_floating_point:
            raise RuntimeError(
                f"only tensors of floating point dtype can require gradients, got {self.dtype}"
            )
        self.requires_grad = requires_grad
        return self

    @property
    def grad(self) -> "Tensor | None":
        """The accumulated gradient; reading it on a non-leaf that does not retain its
        gradient warns, as in torch (backward never fills it)."""
        if self.grad_fn is not None and not self._retains_grad and self.requires_grad:
            warnings.warn(_NON_LEAF_GRAD, UserWarning, stacklevel=2)
        return self._grad

    @grad.setter
    def grad(self, value: "Tensor | None") -> None:
        self._grad = value

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
            raise RuntimeError(
                "Can't call numpy() on Tensor that requires grad. "
                "Use tensor.detach().numpy() instead."
            )
        return backend.to_numpy(self._data)

    def __array__(self, dtype=None, copy=None):
        """NumPy 2's protocol: ``copy=True`` always copies, ``copy=False`` never does (and
        raises where a copy is needed: a CUDA tensor, another dtype), None copies if needed."""
        a = self._data
        needs_copy = type(a) is not _ndarray or (dtype is not None and np.dtype(dtype) != a.dtype)
        if copy is False and needs_copy:
            raise ValueError(
                f"Unable to avoid copy while creating an array as requested "
                f"(a {self.device} tensor of dtype {self.dtype.name})"
            )
        a = backend.to_numpy(a)
        if dtype is not None:
            a = a.astype(dtype, copy=False)
        return a.copy() if copy and a is self._data else a

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """DLPack export (``torch.from_dlpack(t)``, ``np.from_dlpack(t)``): shares memory."""
        if self.requires_grad:
            raise RuntimeError("Can't export tensors that require gradient, use tensor.detach()")
        if self.dtype is dtypes.bfloat16:
            # NumPy's DLPack export knows only its own dtypes, and ml_dtypes' is not one.
            raise BufferError(
                "DLPack export of a bfloat16 tensor is not supported (NumPy cannot export "
                "ml_dtypes' bfloat16); share its bits instead: torch.from_numpy("
                "t.numpy().view(numpy.int16)).view(torch.bfloat16)"
            )
        kwargs = {"stream": stream} if stream is not None else {}
        if max_version is not None:
            kwargs.update(max_version=max_version, dl_device=dl_device, copy=copy)
        return self._data.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._data.__dlpack_device__()

    def item(self):
        if self.numel() != 1:
            raise RuntimeError(
                f"a Tensor with {self.numel()} elements cannot be converted to Scalar"
            )
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
            elif isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda"):  # or a device
                device = a
            else:
                dtype = a
        t = self
        if dtype is not None and t.dtype is dtypes.bfloat16 and device is not None:
            t = t.to(dtype)  # before the move: CuPy has no bfloat16
        if device is not None and backend.device_type(device) != self.device:
            _refuse_bfloat16_on(device, dtype if dtype is not None else t.dtype)
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

    def half(self) -> "Tensor":
        return self.to(dtypes.float16)

    def bfloat16(self) -> "Tensor":
        return self.to(dtypes.bfloat16)

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

    # -- in-place updates -------------------------------------------------------------------
    # As in torch: outside grad mode (or on tensors without gradient) the array changes in
    # place; in grad mode a non-leaf (or a tensor updated from one that requires grad) gets
    # the op's out-of-place form as its new history (``_recorded_inplace``); a leaf that
    # requires grad refuses. Every change ticks the storage's version (``_version``), which
    # backward checks against the tensors a node saved. While a graph tracer is active the
    # op is recorded in its out-of-place form and the eager update runs untraced
    # (``_traced_inplace``).
    def _inplace(self, name: str, other, new_value, eager) -> "Tensor":
        """Change ``self`` in place: ``new_value(t, other)`` is the out-of-place form of the
        op and ``eager()`` the array update."""
        record = self._records_inplace(other)
        tracer = graph_tracer()
        if tracer is not None:
            o = other if record else _detached(other)
            tracer.inplace(
                name,
                self,
                lambda t: new_value(t, o),
                untraced(tracer, self._inplace, name, other, new_value, eager),
                recorded=record,
            )
            return self
        if record:
            return self._recorded_inplace(new_value, other)
        eager()
        bump_version(self._data)
        return self

    def _records_inplace(self, other) -> builtins.bool:
        if not is_grad_enabled():
            return False
        if self.requires_grad and self.grad_fn is None:
            raise RuntimeError(
                "a leaf Variable that requires grad is being used in an in-place "
                "operation; wrap the update in `with gradmesh.no_grad():`"
            )
        return self.requires_grad or (isinstance(other, Tensor) and other.requires_grad)

    def _recorded_inplace(self, new_value, other) -> "Tensor":
        """Write ``new_value(old self, other)`` into this tensor's storage and make its node
        the tensor's history, as torch rebases an in-place op's result."""
        if self.grad_fn is not None and self._data.base is not None:
            raise RuntimeError(
                f"an in-place operation on a view (output of "
                f"{self.grad_fn.name()}) of a tensor that requires grad is not "
                f"supported; use the out-of-place op, or .clone() the view first"
            )
        # The old value as its own tensor: the new node may save it.
        old = Tensor._wrap(self._data.copy(), self.requires_grad)
        old.grad_fn = self.grad_fn
        bump_version(self._data)  # before the new node, which saves the new version
        # Nodes made before keep reaching the old history through this tensor.
        past = (_version_clock(), self.grad_fn, self.requires_grad)
        self._history = [past] if self._history is None else self._history + [past]
        new = new_value(old, old if other is self else other)
        if new.dtype is not self.dtype:
            if self.dtype.is_floating_point < new.dtype.is_floating_point:
                raise RuntimeError(
                    f"result type {new.dtype.name} can't be cast to the desired "
                    f"output type {self.dtype.name}"
                )
            new = new.to(self.dtype)
        self._data[...] = new._data
        node = new.grad_fn
        if node is not None and node.out_data is not None:
            node.out_data = self._data
        self.grad_fn, self.requires_grad = node, new.requires_grad
        return self

    @property
    def _version(self) -> builtins.int:
        """How many times this tensor's storage was changed in place (torch's ``_version``)."""
        return version_of(self._data)

    def _operand(self, other):
        return other._data if isinstance(other, Tensor) else other

    def zero_(self) -> "Tensor":
        def eager() -> None:
            self._data[...] = 0

        return self._inplace("zero_", None, lambda t, _: _filled(t, 0), eager)

    def fill_(self, value) -> "Tensor":
        def eager() -> None:
            self._data[...] = self._operand(value)

        return self._inplace("fill_", value, _filled, eager)

    def copy_(self, src) -> "Tensor":
        def eager() -> None:
            s = src._data if isinstance(src, Tensor) else np.asarray(src)
            xp = backend.xp_of(self._data)
            self._data[...] = s if backend.xp_of(s) is xp else xp.asarray(backend.to_numpy(s))

        return self._inplace("copy_", src, _filled, eager)

    def add_(self, other, alpha=1) -> "Tensor":
        def eager() -> None:
            o = self._operand(other)
            self._data += o if alpha == 1 else alpha * o

        # A number is scaled in Python, a tensor by the add op's alpha.
        if isinstance(other, Tensor):
            return self._inplace("add_", other, lambda t, o: F.add(t, o, alpha=alpha), eager)
        scaled = other if alpha == 1 else alpha * other
        return self._inplace("add_", other, lambda t, _: F.add(t, scaled), eager)

    def sub_(self, other, alpha=1) -> "Tensor":
        tracer = graph_tracer()
        if tracer is not None:
            with tracer.spelled("sub_"):
                return self.add_(other, -alpha)
        return self.add_(other, -alpha)

    def mul_(self, other) -> "Tensor":
        def eager() -> None:
            self._data *= self._operand(other)

        return self._inplace("mul_", other, F.mul, eager)

    def div_(self, other) -> "Tensor":
        def eager() -> None:
            self._data /= self._operand(other)

        return self._inplace("div_", other, F.div, eager)

    def clamp_(self, min=None, max=None) -> "Tensor":
        def eager() -> None:
            backend.xp_of(self._data).clip(self._data, min, max, out=self._data)

        lo, hi = _detached(min), _detached(max)
        return self._inplace("clamp_", None, lambda t, _: F.clamp(t, lo, hi), eager)

    def _augmented(self, inplace, other, symbol: str):
        tracer = graph_tracer()
        if tracer is not None:
            with tracer.spelled(symbol):
                return inplace(other)
        return inplace(other)

    # ``h += 1`` changes ``h`` in place (an alias sees it), as in torch.
    def __iadd__(self, other):
        return self._augmented(self.add_, other, "+=")

    def __isub__(self, other):
        return self._augmented(self.sub_, other, "-=")

    def __imul__(self, other):
        return self._augmented(self.mul_, other, "*=")

    def __itruediv__(self, other):
        return self._augmented(self.div_, other, "/=")

    # -- operators: thin wrappers over gradmesh.core.functional ----------------------------
    def __add__(self, other) -> Tensor:
        return F.add(self, other)

    def __radd__(self, other) -> Tensor:
        return F.add(other, self)

    def __sub__(self, other) -> Tensor:
        return F.sub(self, other)

    def __rsub__(self, other) -> Tensor:
        return F.sub(other, self)

    def __mul__(self, other) -> Tensor:
        return F.mul(self, other)

    def __rmul__(self, other) -> Tensor:
        return F.mul(other, self)

    def __truediv__(self, other) -> Tensor:
        return F.div(self, other)

    def __rtruediv__(self, other) -> Tensor:
        return F.div(other, self)

    def __floordiv__(self, other) -> Tensor:
        return F.floor_divide(self, other)

    def __rfloordiv__(self, other) -> Tensor:
        return F.floor_divide(other, self)

    def __mod__(self, other) -> Tensor:
        return F.remainder(self, other)

    def __rmod__(self, other) -> Tensor:
        return F.remainder(other, self)

    def __pow__(self, other) -> Tensor:
        return F.pow(self, other)

    def __rpow__(self, other) -> Tensor:
        return F.pow(other, self)

    def __matmul__(self, other) -> Tensor:
        return F.matmul(self, other)

    def __rmatmul__(self, other) -> Tensor:
        return F.matmul(other, self)

    def __eq__(self, other) -> Tensor:  # type: ignore[override]
        return F.eq(self, other)

    def __ne__(self, other) -> Tensor:  # type: ignore[override]
        return F.ne(self, other)

    def __lt__(self, other) -> Tensor:
        return F.lt(self, other)

    def __le__(self, other) -> Tensor:
        return F.le(self, other)

    def __gt__(self, other) -> Tensor:
        return F.gt(self, other)

    def __ge__(self, other) -> Tensor:
        return F.ge(self, other)

    def __and__(self, other) -> Tensor:
        return F.logical_and(self, other)

    def __or__(self, other) -> Tensor:
        return F.logical_or(self, other)

    def __neg__(self) -> Tensor:
        return F.neg(self)

    def __pos__(self) -> Tensor:
        return self

    def __abs__(self) -> Tensor:
        return F.abs(self)

    def __invert__(self) -> Tensor:
        return F.logical_not(self)

    def __getitem__(self, index) -> Tensor:
        return F.getitem(self, index)

    def __setitem__(self, index, value) -> None:
        """``x[index] = value`` in place; in grad mode on a non-leaf (or with a value that
        requires grad) recorded by autograd, as torch's index_put_."""
        record = self._records_inplace(value)
        tracer = graph_tracer()
        if tracer is not None:
            if record:
                raise RuntimeError(
                    "t[index] = value: a traced graph cannot assign into a "
                    "tensor that requires grad (or a value that does); use "
                    "where or index_put out of place"
                )
            # Traced as a write to the view of the basic part of the index (ints, slices),
            # with index_put for the advanced part (index tensors, masks).
            view, advanced = F._basic_index(self, index)

            def new_value(v: Tensor) -> Tensor:
                values = _value_like(value, v)
                if not advanced:
                    return _filled(v, values)
                return REGISTRY["index_put"](
                    v,
                    values,
                    *[i for _, i in advanced],
                    dims=[d for d, _ in advanced],
                    accumulate=False,
                )

            _traced_inplace(
                tracer, "t[index] = value", view, new_value, Tensor.__setitem__, self, index, value
            )
            return
        index = _array_index(index)
        if record:
            self._recorded_inplace(lambda t, v: _assigned(t, v, index), value)
            return
        self._data[index] = value._data if isinstance(value, Tensor) else value
        bump_version(self._data)

    # -- display ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        host = backend.to_numpy(self._data)
        if self.dtype is dtypes.bfloat16:
            host = host.astype(np.float32)  # exact; NumPy prints only its own floats as floats
        body = np.array2string(host, separator=", ", precision=4, prefix="tensor(")
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

    # BEGIN GENERATED METHODS (python core/gen_api.py): do not edit
    def abs(self) -> Tensor:
        """See ``gradmesh.core.abs``."""
        return F.abs(self)

    def add(self, b, alpha=1) -> Tensor:
        """See ``gradmesh.core.add``."""
        return F.add(self, b, alpha)

    def addbmm(self, batch1: Tensor, batch2: Tensor, *, beta=1, alpha=1) -> Tensor:
        """See ``gradmesh.core.addbmm``."""
        return F.addbmm(self, batch1, batch2, beta=beta, alpha=alpha)

    def addmm(self, mat1: Tensor, mat2: Tensor, *, beta=1, alpha=1) -> Tensor:
        """See ``gradmesh.core.addmm``."""
        return F.addmm(self, mat1, mat2, beta=beta, alpha=alpha)

    def all(self, dim=None, keepdim: builtins.bool = False) -> Tensor:
        """See ``gradmesh.core.all``."""
        return F.all(self, dim, keepdim)

    def allclose(
        self, b: Tensor, rtol: builtins.float = 1e-05, atol: builtins.float = 1e-08
    ) -> builtins.bool:
        """See ``gradmesh.core.allclose``."""
        return F.allclose(self, b, rtol, atol)

    def amax(self, dim=None, keepdim: builtins.bool = False) -> Tensor:
        """See ``gradmesh.core.amax``."""
        return F.amax(self, dim, keepdim)

    def amin(self, dim=None, keepdim: builtins.bool = False) -> Tensor:
        """See ``gradmesh.core.amin``."""
        return F.amin(self, dim, keepdim)

    def any(self, dim=None, keepdim: builtins.bool = False) -> Tensor:
        """See ``gradmesh.core.any``."""
        return F.any(self, dim, keepdim)

    def argmax(self, dim: builtins.int | None = None, keepdim: builtins.bool = False) -> Tensor:
        """See ``gradmesh.core.argmax``."""
        return F.argmax(self, dim, keepdim)

    def argmin(self, dim: builtins.int | None = None, keepdim: builtins.bool = False) -> Tensor:
        """See ``gradmesh.core.argmin``."""
        return F.argmin(self, dim, keepdim)

    def argsort(
        self,
        dim: builtins.int = -1,
        descending: builtins.bool = False,
        stable: builtins.bool = False,
    ) -> Tensor:
        """See ``gradmesh.core.argsort``."""
        return F.argsort(self, dim, descending, stable)

    def baddbmm(self, batch1: Tensor, batch2: Tensor, *, beta=1, alpha=1) -> Tensor:
        """See ``gradmesh.core.baddbmm``."""
        return F.baddbmm(self, batch1, batch2, beta=beta, alpha=alpha)

    def bmm(self, b: Tensor) -> Tensor:
        """See ``gradmesh.core.bmm``."""
        return F.bmm(self, b)

    def chunk(self, chunks: builtins.int, dim: builtins.int = 0) -> tuple:
        """See ``gradmesh.core.chunk``."""
        return F.chunk(self, chunks, dim)

    def clamp(self, min=None, max=None) -> Tensor:
        """See ``gradmesh.core.clamp``."""
        return F.clamp(self, min, max)

    def clip(self, min=None, max=None) -> Tensor:
        """See ``gradmesh.core.clip``."""
        return F.clip(self, min, max)

    def cos(self) -> Tensor:
        """See ``gradmesh.core.cos``."""
        return F.cos(self)

    def cumsum(self, dim: builtins.int, dtype=None) -> Tensor:
        """See ``gradmesh.core.cumsum``."""
        return F.cumsum(self, dim, dtype)

    def div(self, b, rounding_mode=None) -> Tensor:
        """See ``gradmesh.core.div``."""
        return F.div(self, b, rounding_mode)

    def dot(self, b: Tensor) -> Tensor:
        """See ``gradmesh.core.dot``."""
        return F.dot(self, b)

    def eq(self, b) -> Tensor:
        """See ``gradmesh.core.eq``."""
        return F.eq(self, b)

    def equal(self, b: Tensor) -> builtins.bool:
        """See ``gradmesh.core.equal``."""
        return F.equal(self, b)

    def erf(self) -> Tensor:
        """See ``gradmesh.core.erf``."""
        return F.erf(self)

    def erfc(self) -> Tensor:
        """See ``gradmesh.core.erfc``."""
        return F.erfc(self)

    def erfinv(self) -> Tensor:
        """See ``gradmesh.core.erfinv``."""
        return F.erfinv(self)

    def exp(self) -> Tensor:
        """See ``gradmesh.core.exp``."""
        return F.exp(self)

    def expand(self, *shape) -> Tensor:
        """See ``gradmesh.core.expand``."""
        return F.expand(self, *shape)

    def expand_as(self, other: Tensor) -> Tensor:
        """See ``gradmesh.core.expand_as``."""
        return F.expand_as(self, other)

    def flatten(self, start_dim: builtins.int = 0, end_dim: builtins.int = -1) -> Tensor:
        """See ``gradmesh.core.flatten``."""
        return F.flatten(self, start_dim, end_dim)

    def flip(self, dims) -> Tensor:
        """See ``gradmesh.core.flip``."""
        return F.flip(self, dims)

    def floor_divide(self, b) -> Tensor:
        """See ``gradmesh.core.floor_divide``."""
        return F.floor_divide(self, b)

    def gather(self, dim: builtins.int, index: Tensor) -> Tensor:
        """See ``gradmesh.core.gather``."""
        return F.gather(self, dim, index)

    def ge(self, b) -> Tensor:
        """See ``gradmesh.core.ge``."""
        return F.ge(self, b)

    def gelu(self, approximate: str = "none") -> Tensor:
        """See ``gradmesh.core.gelu``."""
        return F.gelu(self, approximate)

    def gt(self, b) -> Tensor:
        """See ``gradmesh.core.gt``."""
        return F.gt(self, b)

    def index_add(self, dim: builtins.int, index: Tensor, source: Tensor, alpha=1) -> Tensor:
        """See ``gradmesh.core.index_add``."""
        return F.index_add(self, dim, index, source, alpha)

    def index_select(self, dim: builtins.int, index: Tensor) -> Tensor:
        """See ``gradmesh.core.index_select``."""
        return F.index_select(self, dim, index)

    def isclose(
        self, b: Tensor, rtol: builtins.float = 1e-05, atol: builtins.float = 1e-08
    ) -> Tensor:
        """See ``gradmesh.core.isclose``."""
        return F.isclose(self, b, rtol, atol)

    def le(self, b) -> Tensor:
        """See ``gradmesh.core.le``."""
        return F.le(self, b)

    def leaky_relu(self, negative_slope: builtins.float = 0.01) -> Tensor:
        """See ``gradmesh.core.leaky_relu``."""
        return F.leaky_relu(self, negative_slope)

    def log(self) -> Tensor:
        """See ``gradmesh.core.log``."""
        return F.log(self)

    def log1p(self) -> Tensor:
        """See ``gradmesh.core.log1p``."""
        return F.log1p(self)

    def log_softmax(self, dim: builtins.int, dtype=None) -> Tensor:
        """See ``gradmesh.core.log_softmax``."""
        return F.log_softmax(self, dim, dtype)

    def logical_and(self, b) -> Tensor:
        """See ``gradmesh.core.logical_and``."""
        return F.logical_and(self, b)

    def logical_not(self) -> Tensor:
        """See ``gradmesh.core.logical_not``."""
        return F.logical_not(self)

    def logical_or(self, b) -> Tensor:
        """See ``gradmesh.core.logical_or``."""
        return F.logical_or(self, b)

    def logsumexp(self, dim=None, keepdim: builtins.bool = False) -> Tensor:
        """See ``gradmesh.core.logsumexp``."""
        return F.logsumexp(self, dim, keepdim)

    def lt(self, b) -> Tensor:
        """See ``gradmesh.core.lt``."""
        return F.lt(self, b)

    def masked_fill(self, mask: Tensor, value) -> Tensor:
        """See ``gradmesh.core.masked_fill``."""
        return F.masked_fill(self, mask, value)

    def matmul(self, b: Tensor) -> Tensor:
        """See ``gradmesh.core.matmul``."""
        return F.matmul(self, b)

    def max(self, dim=None, keepdim: builtins.bool = False):
        """See ``gradmesh.core.max``."""
        return F.max(self, dim, keepdim)

    def maximum(self, b) -> Tensor:
        """See ``gradmesh.core.maximum``."""
        return F.maximum(self, b)

    def mean(self, dim=None, keepdim: builtins.bool = False, dtype=None) -> Tensor:
        """See ``gradmesh.core.mean``."""
        return F.mean(self, dim, keepdim, dtype)

    def min(self, dim=None, keepdim: builtins.bool = False):
        """See ``gradmesh.core.min``."""
        return F.min(self, dim, keepdim)

    def minimum(self, b) -> Tensor:
        """See ``gradmesh.core.minimum``."""
        return F.minimum(self, b)

    def mm(self, b: Tensor) -> Tensor:
        """See ``gradmesh.core.mm``."""
        return F.mm(self, b)

    def movedim(self, source: builtins.int, destination: builtins.int) -> Tensor:
        """See ``gradmesh.core.movedim``."""
        return F.movedim(self, source, destination)

    def mul(self, b) -> Tensor:
        """See ``gradmesh.core.mul``."""
        return F.mul(self, b)

    def mv(self, v: Tensor) -> Tensor:
        """See ``gradmesh.core.mv``."""
        return F.mv(self, v)

    def narrow(self, dim: builtins.int, start: builtins.int, length: builtins.int) -> Tensor:
        """See ``gradmesh.core.narrow``."""
        return F.narrow(self, dim, start, length)

    def ne(self, b) -> Tensor:
        """See ``gradmesh.core.ne``."""
        return F.ne(self, b)

    def neg(self) -> Tensor:
        """See ``gradmesh.core.neg``."""
        return F.neg(self)

    def nonzero(self, as_tuple: builtins.bool = False):
        """See ``gradmesh.core.nonzero``."""
        return F.nonzero(self, as_tuple)

    def norm(self, p="fro", dim=None, keepdim: builtins.bool = False, dtype=None) -> Tensor:
        """See ``gradmesh.core.norm``."""
        return F.norm(self, p, dim, keepdim, dtype)

    def outer(self, b: Tensor) -> Tensor:
        """See ``gradmesh.core.outer``."""
        return F.outer(self, b)

    def permute(self, *dims) -> Tensor:
        """See ``gradmesh.core.permute``."""
        return F.permute(self, *dims)

    def pow(self, exponent) -> Tensor:
        """See ``gradmesh.core.pow``."""
        return F.pow(self, exponent)

    def prod(
        self, dim: builtins.int | None = None, keepdim: builtins.bool = False, dtype=None
    ) -> Tensor:
        """See ``gradmesh.core.prod``."""
        return F.prod(self, dim, keepdim, dtype)

    def reciprocal(self) -> Tensor:
        """See ``gradmesh.core.reciprocal``."""
        return F.reciprocal(self)

    def relu(self) -> Tensor:
        """See ``gradmesh.core.relu``."""
        return F.relu(self)

    def remainder(self, b) -> Tensor:
        """See ``gradmesh.core.remainder``."""
        return F.remainder(self, b)

    def repeat(self, *sizes) -> Tensor:
        """See ``gradmesh.core.repeat``."""
        return F.repeat(self, *sizes)

    def reshape(self, *shape) -> Tensor:
        """See ``gradmesh.core.reshape``."""
        return F.reshape(self, *shape)

    def reshape_as(self, other: Tensor) -> Tensor:
        """See ``gradmesh.core.reshape_as``."""
        return F.reshape_as(self, other)

    def roll(self, shifts, dims=None) -> Tensor:
        """See ``gradmesh.core.roll``."""
        return F.roll(self, shifts, dims)

    def rsqrt(self) -> Tensor:
        """See ``gradmesh.core.rsqrt``."""
        return F.rsqrt(self)

    def scatter_add(self, dim: builtins.int, index: Tensor, src: Tensor) -> Tensor:
        """See ``gradmesh.core.scatter_add``."""
        return F.scatter_add(self, dim, index, src)

    def select(self, dim: builtins.int, index: builtins.int) -> Tensor:
        """See ``gradmesh.core.select``."""
        return F.select(self, dim, index)

    def sigmoid(self) -> Tensor:
        """See ``gradmesh.core.sigmoid``."""
        return F.sigmoid(self)

    def sign(self) -> Tensor:
        """See ``gradmesh.core.sign``."""
        return F.sign(self)

    def sin(self) -> Tensor:
        """See ``gradmesh.core.sin``."""
        return F.sin(self)

    def softmax(self, dim: builtins.int, dtype=None) -> Tensor:
        """See ``gradmesh.core.softmax``."""
        return F.softmax(self, dim, dtype)

    def softplus(self, beta: builtins.float = 1.0, threshold: builtins.float = 20.0) -> Tensor:
        """See ``gradmesh.core.softplus``."""
        return F.softplus(self, beta, threshold)

    def sort(
        self,
        dim: builtins.int = -1,
        descending: builtins.bool = False,
        stable: builtins.bool = False,
    ):
        """See ``gradmesh.core.sort``."""
        return F.sort(self, dim, descending, stable)

    def split(self, split_size_or_sections, dim: builtins.int = 0) -> tuple:
        """See ``gradmesh.core.split``."""
        return F.split(self, split_size_or_sections, dim)

    def sqrt(self) -> Tensor:
        """See ``gradmesh.core.sqrt``."""
        return F.sqrt(self)

    def square(self) -> Tensor:
        """See ``gradmesh.core.square``."""
        return F.square(self)

    def squeeze(self, dim=None) -> Tensor:
        """See ``gradmesh.core.squeeze``."""
        return F.squeeze(self, dim)

    def std(
        self,
        dim=None,
        unbiased: builtins.bool | None = None,
        keepdim: builtins.bool = False,
        *,
        correction: builtins.float | None = None,
    ) -> Tensor:
        """See ``gradmesh.core.std``."""
        return F.std(self, dim, unbiased, keepdim, correction=correction)

    def sub(self, b, alpha=1) -> Tensor:
        """See ``gradmesh.core.sub``."""
        return F.sub(self, b, alpha)

    def sum(self, dim=None, keepdim: builtins.bool = False, dtype=None) -> Tensor:
        """See ``gradmesh.core.sum``."""
        return F.sum(self, dim, keepdim, dtype)

    def t(self) -> Tensor:
        """See ``gradmesh.core.t``."""
        return F.t(self)

    def tanh(self) -> Tensor:
        """See ``gradmesh.core.tanh``."""
        return F.tanh(self)

    def topk(
        self,
        k: builtins.int,
        dim: builtins.int = -1,
        largest: builtins.bool = True,
        sorted: builtins.bool = True,
    ):
        """See ``gradmesh.core.topk``."""
        return F.topk(self, k, dim, largest, sorted)

    def transpose(self, dim0: builtins.int, dim1: builtins.int) -> Tensor:
        """See ``gradmesh.core.transpose``."""
        return F.transpose(self, dim0, dim1)

    def tril(self, diagonal: builtins.int = 0) -> Tensor:
        """See ``gradmesh.core.tril``."""
        return F.tril(self, diagonal)

    def triu(self, diagonal: builtins.int = 0) -> Tensor:
        """See ``gradmesh.core.triu``."""
        return F.triu(self, diagonal)

    def unbind(self, dim: builtins.int = 0) -> tuple:
        """See ``gradmesh.core.unbind``."""
        return F.unbind(self, dim)

    def unflatten(self, dim: builtins.int, sizes) -> Tensor:
        """See ``gradmesh.core.unflatten``."""
        return F.unflatten(self, dim, sizes)

    def unsqueeze(self, dim: builtins.int) -> Tensor:
        """See ``gradmesh.core.unsqueeze``."""
        return F.unsqueeze(self, dim)

    def var(
        self,
        dim=None,
        unbiased: builtins.bool | None = None,
        keepdim: builtins.bool = False,
        *,
        correction: builtins.float | None = None,
    ) -> Tensor:
        """See ``gradmesh.core.var``."""
        return F.var(self, dim, unbiased, keepdim, correction=correction)

    def view(self, *shape) -> Tensor:
        """See ``gradmesh.core.view``."""
        return F.view(self, *shape)

    def view_as(self, other: Tensor) -> Tensor:
        """See ``gradmesh.core.view_as``."""
        return F.view_as(self, other)

    def where(self, a, b) -> Tensor:
        """See ``gradmesh.core.where``."""
        return F.where(self, a, b)

    # END GENERATED METHODS


# NumPy's dtypes of the builtin types are singletons: look them up by identity (a dict


def _refuse_bfloat16_on(device, dtype) -> None:
    if backend.device_type(device) == "cuda" and dtypes.as_dtype(dtype) is dtypes.bfloat16:
        raise TypeError(
            "bfloat16 tensors live on the CPU: CuPy has no bfloat16 type; "
            "use float16 on cuda (t.half().to('cuda'))"
        )


_DTYPE_BY_ID = {id(d.np): d for d in dtypes.ALL}
_DEVICES = {"cpu": device("cpu"), "cuda": device("cuda")}

_NON_LEAF_GRAD = (
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad "
    "attribute won't be populated during autograd.backward(). If you indeed want the .grad "
    "field to be populated for a non-leaf Tensor, use .retain_grad() on the non-leaf Tensor. "
    "If you access the non-leaf Tensor by mistake, make sure you access the leaf Tensor "
    "instead."
)


def _is_array(x) -> bool:
    return type(x) is np.ndarray or (
        backend._cupy is not None and isinstance(x, backend._cupy.ndarray)
    )


def _traced_inplace(tracer, name: str, target: Tensor, new_value, method, *args) -> Tensor:
    """Record the in-place op ``name`` as its out-of-place form, ``new_value(target)``, and
    run the eager ``method(*args)`` untraced (see ``graph.tracer._Tracer.inplace``); returns
    ``args[0]``, the tensor the method changes."""
    tracer.inplace(name, target, new_value, untraced(tracer, method, *args))
    return args[0]


def _assign_data(t: Tensor, value) -> None:
    t._data = value._data if isinstance(value, Tensor) else value


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


def _array_index(index):
    """``index`` with its tensors replaced by their arrays."""
    if isinstance(index, Tensor):
        return index._data
    if isinstance(index, tuple):
        return tuple(i._data if isinstance(i, Tensor) else i for i in index)
    return index


def _assigned(t: Tensor, value, index) -> Tensor:
    """``t`` with ``t[index] = value`` done out of place (differentiable in both): an
    index_put at the flat positions the index selects."""
    xp = backend.xp_of(t._data)
    positions = xp.arange(t.numel()).reshape(t.shape)[index]
    if isinstance(value, Tensor) and value.requires_grad:
        value = value.to(t.dtype)
    else:
        value = _value_like(value, t)
    values = F.reshape(F.expand(value, *positions.shape), (-1,))
    flat = REGISTRY["index_put"](
        F.reshape(t, (-1,)), values, Tensor._wrap(positions.reshape(-1)), dims=[0], accumulate=False
    )
    return F.reshape(flat, t.shape)


def _filled(t: Tensor, value) -> Tensor:
    """``t`` with every element replaced by ``value`` (broadcast) in ``t``'s dtype: a
    ``where`` on a true condition, which keeps ``t``'s (batch) shape out of the graph."""
    true = Tensor._wrap(backend.xp_of(t._data).asarray(True))
    if isinstance(value, Tensor) and value.requires_grad and is_grad_enabled():
        value = value.to(t.dtype)  # fill_/copy_ from a tensor with gradient keep it
    else:
        value = _value_like(value, t)
    return F.where(true, value, t)


# Last, as they build on Tensor (cycles: each of them imports this module). The Tensor
# class and _is_array are defined by now, which is all that the others import from here.
from . import autograd, dispatch  # noqa: E402
from . import functional as F
from .autograd import Node, bump_version, is_grad_enabled, version_of  # noqa: E402
from .autograd import clock as _version_clock  # noqa: E402
from .registry import REGISTRY  # noqa: E402
# BEGIN GENERATED IMPORTS (python core/gen_api.py): do not edit
# END GENERATED IMPORTS
