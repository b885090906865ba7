"""The one registry of primitive ops.

Every primitive is declared once, here or in ``gradmesh.core.ops``, with:

* ``forward(xp, *arrays, **attrs)``: the computation over an array module ``xp``
  (``numpy`` or ``cupy``); it returns one array.
* ``vjp(g, out, *inputs, **attrs)``: the vector-Jacobian product. ``g`` is the incoming
  gradient (a Tensor shaped like the output), ``out`` the forward result (a Tensor),
  ``inputs`` the op's input Tensors. It returns one gradient per input, ``None`` where
  there is none. It is written with differentiable Tensor ops, so it can be
  differentiated again (``create_graph=True``).
* ``infer(*specs, **attrs)``: shape and dtype of the output from the inputs' ``.shape``
  and ``.dtype`` (Tensors and graph values both have them). It validates, and its errors
  name the op, the shapes and the fix. Graphs are checked with it before anything is
  allocated.
* ``attrs``: the attribute names with their kind and default. Graphs that arrive over the
  network may only use the ops and attribute kinds declared here: the registry is the
  allowlist.
* ``broadcast=True`` for ops whose inputs broadcast (``add``, ``where``, ``expand``,
  ``index_put``'s values): their vjps return gradients shaped like the output, and the
  engine sums each back to its input's shape and casts it to its input's dtype, in one
  place (``gradmesh.core.unbroadcast``). Every other vjp returns gradients of its inputs'
  shapes and dtypes itself, and the engine passes them on untouched.
* ``dtype``: the output dtype rule, published in the op schemas (``gradmesh.core.opschema``):
  ``"same"`` (the first input's, the default), ``"float"`` (the first input's if floating,
  else the default float), ``"promote"`` (torch's promotion of the inputs),
  ``"promote_float"`` (promotion, then integers to the default float), ``"accumulate"``
  (floating inputs keep theirs, integers and bool give int64), ``"bool"``, ``"int64"``,
  ``"attr:<name>"`` (a dtype attribute), ``"input:<name>"`` (that input's). A rule may
  name the inputs it reads after a colon: ``"promote:a,b"`` (``where``: not ``cond``).
* ``choices``: for ``str`` attributes that take a fixed set of values, that set.
* ``nondiff``: inputs that never get a gradient although the op is differentiable (an
  index, a target, class weights).
* ``broadcast_inputs``: with ``broadcast=True``, the inputs that broadcast when not all do.
* ``blame``: the attribute whose value is at fault when ``infer`` refuses (reshape's
  ``shape``), so that a graph's error names ``nodes[k].attrs.shape``, not only the node;
  an ``OpError(..., attr)`` names its own.
* ``differentiable=False`` for a gradient stop (``stop_gradient``, what ``detach()`` is in a
  traced graph): it declares no vjp, and its result carries no gradient in the eager
  engine and in a compiled plan alike, as integer and bool results never do.

Every op has exactly one output; ops with several results (``split``) are compositions.

The public function over an op (``gm.exp``) is declared next to it with ``@public``, and
``@public(method=True)`` also makes it a ``Tensor`` method. ``core/gen_api.py`` writes
what static tools read from these declarations (``core/_api.py`` and the generated methods
of ``core/tensor.py``); ``tests/engine/test_public_api.py`` fails when that code is stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, TypeVar, overload

from . import dtypes

# Attribute kinds that may appear in a graph. A trailing "?" allows None.
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "dtype")


class Spec(NamedTuple):
    """The static description of a value: what ``infer`` consumes and returns."""

    shape: tuple
    dtype: dtypes.DType


@dataclass(eq=False)
class Op:
    name: str
    forward: Callable
    infer: Callable
    arity: int | None  # None: variadic (cat, stack)
    attrs: dict[str, tuple[str, Any]] = field(default_factory=dict)
    broadcast: bool = False
    saves_out: bool = False  # vjp reads ``out``: keep the forward result
    vjp: Callable | None = None
    differentiable: bool = True  # False: the result never carries a gradient
    dtype: str = "same"  # the output dtype rule (see the module docstring)
    choices: dict[str, tuple] = field(default_factory=dict)  # str attr -> allowed values
    nondiff: tuple[str, ...] = ()  # inputs that never get a gradient
    broadcast_inputs: tuple[str, ...] | None = None  # None: all of them (if broadcast)
    blame: str | None = None  # the attribute a graph's infer error names by default

    def defvjp(self, fn: Callable) -> Callable:
        if not self.differentiable:
            raise ValueError(f"{self.name} is declared differentiable=False: it has no vjp")
        self.vjp = fn
        return fn

    def __call__(self, *inputs, **attrs):
        return dispatch.apply(self, inputs, attrs)

    def __repr__(self) -> str:
        return f"<op {self.name}>"


REGISTRY: dict[str, Op] = {}


def defop(
    name: str,
    *,
    infer: Callable,
    arity: int | None = 1,
    attrs: dict | None = None,
    broadcast: bool = False,
    saves_out: bool = False,
    differentiable: bool = True,
    dtype: str = "same",
    choices: dict | None = None,
    nondiff: tuple[str, ...] = (),
    broadcast_inputs: tuple[str, ...] | None = None,
    blame: str | None = None,
) -> Callable[[Callable], Op]:
    """Register ``forward`` as primitive ``name``; use ``@op.defvjp`` for its gradient
    (``differentiable=False``: a gradient stop, which has none)."""
    attrs = dict(attrs or {})
    for attr, (kind, _default) in attrs.items():
        if kind.rstrip("?") not in ATTR_KINDS:
            raise ValueError(f"{name}: attribute {attr} has unknown kind {kind!r}")
    for attr in choices or {}:
        if attrs.get(attr, ("",))[0].rstrip("?") != "str":
            raise ValueError(f"{name}: choices for {attr}, which is no str attribute")

    def register(forward: Callable) -> Op:
        if name in REGISTRY:
            raise ValueError(f"op {name!r} is registered twice")
        op = Op(
            name,
            forward,
            infer,
            arity,
            attrs,
            broadcast,
            saves_out,
            differentiable=differentiable,
            dtype=dtype,
            choices={k: tuple(v) for k, v in (choices or {}).items()},
            nondiff=tuple(nondiff),
            broadcast_inputs=None if broadcast_inputs is None else tuple(broadcast_inputs),
            blame=blame,
        )
        REGISTRY[name] = op
        return op

    return register


def get(name: str) -> Op:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}") from None


class OpError(RuntimeError, ValueError):
    """A shape, dtype or attribute error raised by an op's ``infer``; names the op.

    A ``RuntimeError`` as PyTorch's are; also a ``ValueError``, which servers answer with
    ``INVALID_ARGUMENT``. ``attr`` names the attribute whose value is wrong, when one is
    (a graph's error then names ``nodes[k].attrs.<attr>``, not only the node)."""

    def __init__(self, message: str, attr: str | None = None):
        super().__init__(message)
        self.attr = attr


@dataclass(frozen=True)
class Public:
    """A public function: ``gradmesh.core.<name>``, and ``Tensor.<name>`` if ``method``."""

    fn: Callable
    method: bool


PUBLIC: dict[str, Public] = {}


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


@overload
def public(fn: _Fn, *, method: bool = False, name: str | None = None) -> _Fn: ...
@overload
def public(
    fn: None = None, *, method: bool = False, name: str | None = None
) -> Callable[[_Fn], _Fn]: ...


def public(fn=None, *, method=False, name=None):
    """Declare ``fn`` public: ``gradmesh.core.<name>`` (its own name by default), and with
    ``method=True`` also ``Tensor.<name>``, where ``x.name(...)`` is ``name(x, ...)``. Use
    as ``@public``, ``@public(method=True)`` or ``alias = public(fn, name="alias")``. Run
    ``python core/gen_api.py`` after adding one, so that static tools see it."""

    def declare(f):
        key = name or f.__name__
        if key in PUBLIC and PUBLIC[key].fn is not f:
            raise ValueError(f"public function {key!r} is declared twice")
        PUBLIC[key] = Public(f, method)
        return f

    return declare if fn is None else declare(fn)


# ---------------------------------------------------------------------------------------
# Shared shape inference helpers
# ---------------------------------------------------------------------------------------


def fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def broadcast_shapes(op: str, *shapes) -> tuple:
    """NumPy/PyTorch broadcasting, with an error that names the op and both shapes."""
    if len(shapes) == 2 and shapes[0] == shapes[1]:
        return tuple(shapes[0])
    first = tuple(shapes[0])
    if all(tuple(s) == first for s in shapes[1:]):
        return first
    ndim = max(len(s) for s in shapes)
    out = []
    for i in range(ndim):
        size = 1
        for s in shapes:
            d = s[i - ndim + len(s)] if i - ndim + len(s) >= 0 else 1
            if d == 1:
                continue
            if size not in (1, d):
                raise OpError(
                    f"{op}: shapes {' and '.join(fmt(s) for s in shapes)} cannot be "
                    f"broadcast together (dimension {i - ndim} is {size} vs {d}); "
                    f"sizes must match or be 1"
                )
            size = d
        out.append(size)
    return tuple(out)


def norm_dim(op: str, dim: int, ndim: int, attr: str = "dim") -> int:
    """A possibly negative dim checked against ``ndim``, as a non-negative int; ``attr``:
    the attribute that gave it, which the error names."""
    lo, hi = (-1, 0) if ndim == 0 else (-ndim, ndim - 1)
    if not lo <= dim <= hi:
        raise OpError(
            f"{op}: dimension out of range (expected to be in range of [{lo}, {hi}], "
            f"but got {dim})",
            attr,
        )
    return dim % ndim if ndim else 0


def norm_dims(op: str, dim, ndim: int, attr: str = "dim") -> tuple:
    """``dim`` as a sorted tuple of non-negative ints; None means every dim."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = (dim,)
    dims = tuple(sorted(norm_dim(op, d, ndim, attr) for d in dim))
    if len(set(dims)) != len(dims):
        raise OpError(f"{op}: dim {tuple(dim)} appears multiple times in the list of dims", attr)
    return dims


def same(spec) -> Spec:
    """Shape inference of unary elementwise ops."""
    return Spec(tuple(spec.shape), spec.dtype)


def floating(op: str, spec) -> Spec:
    """Unary float ops: integers are promoted to the default float type, as in torch."""
    dtype = spec.dtype if spec.dtype.is_floating_point else dtypes.default_float
    return Spec(tuple(spec.shape), dtype)


def binary(op: str):
    """Shape inference of broadcasting binary ops with torch's type promotion."""

    def infer(a, b) -> Spec:
        shape = broadcast_shapes(op, a.shape, b.shape)
        return Spec(shape, dtypes.promote(a.dtype, b.dtype, len(a.shape) == 0, len(b.shape) == 0))

    return infer


# Last: dispatch imports Tensor, whose module imports this one (ops call dispatch.apply).
from . import dispatch  # noqa: E402
