"""Reverse-mode automatic differentiation: grad mode, graph nodes and the backward engine."""

from __future__ import annotations

import dis
import functools
import threading
import weakref
from contextlib import contextmanager
from typing import Sequence


class _State(threading.local):
    # Class-level defaults: a plain attribute read per op, never a failed lookup (getattr
    # with a default on a thread-local raises and catches AttributeError: ~1 us).
    grad = True  # grad mode (no_grad / enable_grad)
    trusted = False  # inside the backward engine without create_graph: see apply()


_state = _State()


def is_grad_enabled() -> bool:
    return _state.grad


def _set_grad(mode: bool) -> bool:
    prev = _state.grad
    _state.grad = mode
    return prev


class _GradMode:
    """Context manager and decorator, like torch.no_grad / torch.enable_grad."""

    mode = True

    def __enter__(self):
        self._prev = _set_grad(self.mode)
        return self

    def __exit__(self, *exc):
        _set_grad(self._prev)
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with type(self)():
                return fn(*args, **kwargs)

        return wrapper


class no_grad(_GradMode):
    """Disable graph recording: results of ops have ``requires_grad=False``."""

    mode = False


class enable_grad(_GradMode):
    mode = True


@contextmanager
def set_grad_enabled(mode: bool):
    prev = _set_grad(bool(mode))
    try:
        yield
    finally:
        _set_grad(prev)


class Node:
    """How a non-leaf tensor was made: its op, inputs and attributes (``Tensor.grad_fn``).

    It keeps the forward result as a bare array, never as a Tensor, so that a tensor and
    its node form no reference cycle and memory is freed as soon as the user drops it.
    """

    __slots__ = ("op", "inputs", "attrs", "out_data", "out_meta", "freed", "stamp", "__weakref__")

    def __init__(self, op, inputs, attrs, out_data, out_meta):
        self.stamp = _Versions.clock  # the in-place clock when its tensors were saved
        self.op = op
        self.inputs = inputs
        self.attrs = attrs
        self.out_data = out_data
        self.out_meta = out_meta  # (shape, dtype) of the output: checks incoming gradients
        self.freed = False

    def name(self) -> str:
        return f"{self.op.name.capitalize()}Backward"

    def __repr__(self) -> str:
        return f"<{self.name()}>"

    def release(self) -> None:
        self.inputs = ()
        self.out_data = None
        self.freed = True


# -- version counters --------------------------------------------------------------------
# An in-place op ticks one global clock and stamps the storage it changed (its memory
# owner) with the tick and a per-storage count (``Tensor._version``). A node records the
# clock when it was made: in backward, a node whose stamp is the current clock (no in-place
# op since: the usual case) is not checked; otherwise each tensor its vjp reads is.
class _Versions:
    clock = 0
    changed: dict = {}  # id(owner) -> [weakref to owner, tick of last change, count]


def _owner(data):
    """The array that owns ``data``'s memory (views of views lead back to it)."""
    kind = type(data)
    while type(data.base) is kind:
        data = data.base
    return data


def bump_version(data) -> None:
    """Record an in-place change of ``data``'s storage."""
    owner = _owner(data)
    _Versions.clock += 1
    entry = _Versions.changed.get(id(owner))
    if entry is not None and entry[0]() is owner:
        entry[1] = _Versions.clock
        entry[2] += 1
    else:
        try:
            ref = weakref.ref(owner, _forget(id(owner)))
        except TypeError:  # an array type without weak references: not tracked
            return
        _Versions.changed[id(owner)] = [ref, _Versions.clock, 1]


def clock() -> int:
    return _Versions.clock


def _forget(key: int):
    return lambda _ref: _Versions.changed.pop(key, None)


def _change(data):
    """(tick, count) of the last in-place change of ``data``'s storage, or None."""
    owner = _owner(data)
    entry = _Versions.changed.get(id(owner))
    return entry[1:] if entry is not None and entry[0]() is owner else None


def version_of(data) -> int:
    change = _change(data)
    return 0 if change is None else change[1]


_METADATA = frozenset({"shape", "dtype", "ndim", "device"})


@functools.lru_cache(maxsize=None)
def _saved_inputs(vjp, n: int) -> tuple:
    """The inputs whose values ``vjp(g, out, *inputs, **attrs)`` reads (not only their
    shape or dtype), found once per vjp from its bytecode: the ones torch would save."""
    code = getattr(vjp, "__code__", None)
    if code is None or code.co_flags & 0x04:  # not a plain function, or *inputs: all
        return tuple(range(n))
    params = code.co_varnames[2 : code.co_argcount]
    instrs = list(dis.get_instructions(code))
    read = {p for p in params if p in code.co_cellvars}
    for ins, nxt in zip(instrs, instrs[1:] + [None]):
        if (
            ins.opname == "LOAD_FAST"
            and ins.argval in params
            and not (nxt is not None and nxt.opname == "LOAD_ATTR" and nxt.argval in _METADATA)
        ):
            read.add(ins.argval)
    return tuple(i for i, p in enumerate(params[:n]) if p in read)


def _check_versions(node) -> None:
    """Raise torch's error where a tensor ``node``'s vjp reads was changed in place after
    the node saved it."""
    vjp = node.op.vjp
    reads = _saved_inputs(vjp, len(node.inputs)) if vjp is not None else ()
    saved = [(node.inputs[i]._data, f"input {i}") for i in reads]
    if node.out_data is not None:
        saved.append((node.out_data, "output"))
    for data, what in saved:
        change = _change(data)
        if change is not None and change[0] > node.stamp:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by "
                f"an inplace operation: [{data.dtype} {list(data.shape)}], the {what} of "
                f"{node.name()}, is at version {change[1]} and was changed after it was "
                f"saved. Hint: use the out-of-place op, or .clone() the tensor before the "
                f"in-place change"
            )


def _edge(t, stamp: int) -> tuple:
    """(grad_fn, requires_grad) that ``t`` had at clock ``stamp``: an in-place op recorded
    by autograd gives ``t`` a new history, while the nodes made before it keep the old one
    (``Tensor._history``: (tick of the change, grad_fn, requires_grad) before each)."""
    for tick, grad_fn, requires in t._history:
        if stamp < tick:
            return grad_fn, requires
    return t.grad_fn, t.requires_grad


def _topo_order(roots: Sequence[Node]) -> list[Node]:
    """Nodes reachable from ``roots``, each before every node it depends on (iterative)."""
    order, seen = [], set()
    for root in roots:
        if id(root) in seen:
            continue
        seen.add(id(root))
        stack = [(root, iter(root.inputs))]
        while stack:
            node, it = stack[-1]
            stale = node.stamp != _Versions.clock
            for t in it:
                child = t.grad_fn if not stale or t._history is None else _edge(t, node.stamp)[0]
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    stack.append((child, iter(child.inputs)))
                    break
            else:
                stack.pop()
                order.append(node)
    order.reverse()
    return order


_FREED = (
    "Trying to backward through the graph a second time (or directly access saved "
    "tensors after they have already been freed). Saved intermediate values of the "
    "graph are freed when you call .backward() or autograd.grad(). Specify "
    "retain_graph=True if you need to backward through the graph a second time."
)


def _seed(
    outputs, grad_outputs, pending: dict, captured: dict, capture_ids: set, accumulate: bool
) -> list[Node]:
    """Hand each output's gradient to its node (``pending``), or to the output itself where
    it is a leaf or captured; returns the nodes to start from."""
    roots = []
    for out, g in zip(outputs, grad_outputs):
        if id(out) in capture_ids:
            captured[id(out)] = g if id(out) not in captured else captured[id(out)] + g
        if out.grad_fn is None:
            if accumulate and out.requires_grad and not capture_ids:
                _accumulate_leaf(out, g, {})
            continue
        key = id(out.grad_fn)
        pending[key] = g if key not in pending else pending[key] + g
        roots.append(out.grad_fn)
        if out._retains_grad and accumulate:
            _accumulate_leaf(out, g, {})
    return roots


def run_backward(
    outputs: Sequence,
    grad_outputs: Sequence,
    *,
    retain_graph: bool,
    create_graph: bool,
    capture: Sequence | None = None,
    accumulate: bool = True,
) -> dict:
    """Propagate ``grad_outputs`` from ``outputs`` back through the graph.

    With ``accumulate`` the gradients of leaves that require grad are added into ``.grad``
    (``backward()``); tensors in ``capture`` have their total gradient returned by id
    instead (``autograd.grad``).
    """
    wrap_out, reduce_grad = _tensor.Tensor._from_node, _unbroadcast.unbroadcast
    captured: dict[int, _tensor.Tensor] = {}
    capture_ids = {id(t) for t in capture} if capture else set()
    pending: dict[int, _tensor.Tensor] = {}
    roots = _seed(outputs, grad_outputs, pending, captured, capture_ids, accumulate)

    # Non-leaf captured tensors: their total gradient is what reaches their node.
    capture_nodes = {id(t.grad_fn): t for t in capture or () if t.grad_fn is not None}
    # The memory of the gradients handed out so far, by id (held, so that ids stay unique):
    # the caller's grad_outputs first, so that no .grad aliases them either.
    assigned = {id(m): m for m in map(_memory_owner, grad_outputs)}
    # Pending sums that the engine allocated itself and nobody else holds, by node id: later
    # contributions are added into them in place (without create_graph, where no graph of
    # the sums is recorded).
    own: set[int] | None = None if create_graph else set()
    with _engine_mode(create_graph):
        for node in _topo_order(roots):
            g = pending.pop(id(node), None)
            if g is None:
                continue
            if own:
                own.discard(id(node))
            if node.freed:
                raise RuntimeError(_FREED)
            stale = node.stamp != _Versions.clock
            if stale:
                _check_versions(node)
            if capture_nodes:
                t_node = capture_nodes.get(id(node))
                if t_node is not None:
                    captured[id(t_node)] = g
            op = node.op
            if (
                own
                and op.name == "slice"
                and not stale
                and _add_slice_in_place(node, g, pending, own)
            ):
                if not retain_graph:
                    node.release()
                continue
            vjp = op.vjp
            if vjp is None:
                raise RuntimeError(f"{op.name}: no derivative is defined for this op")
            inputs = node.inputs
            out = wrap_out(node) if op.saves_out else None
            grads = vjp(g, out, *inputs, **node.attrs)
            if len(grads) != len(inputs):
                raise RuntimeError(
                    f"{op.name}: vjp returned {len(grads)} gradients for {len(inputs)} inputs"
                )
            for t, gi in zip(inputs, grads):
                if gi is None:
                    continue
                if stale and t._history is not None:
                    child, requires = _edge(t, node.stamp)
                else:
                    child, requires = t.grad_fn, t.requires_grad
                if not requires:
                    continue
                if op.broadcast:
                    gi = reduce_grad(gi, t)
                if child is None:
                    if capture_ids:
                        if id(t) in capture_ids:
                            prev = captured.get(id(t))
                            captured[id(t)] = gi if prev is None else prev + gi
                    elif accumulate:
                        _accumulate_leaf(t, gi, assigned)
                    continue
                if accumulate and t._retains_grad:
                    _accumulate_leaf(t, gi, assigned)
                key = id(child)
                prev = pending.get(key)
                if prev is None:
                    pending[key] = gi
                    if own is not None and op.name == "slice" and not t._retains_grad:
                        own.add(key)  # slice_grad's fresh zeros
                elif own is not None and key in own and _same_layout(prev, gi):
                    prev._data += gi._data
                else:
                    pending[key] = prev + gi
                    if own is not None and not t._retains_grad:
                        own.add(key)
            if not retain_graph:
                node.release()
    return captured


def _add_slice_in_place(node, g, pending: dict, own: set) -> bool:
    """A slice's gradient added into its region of the input's pending sum, when that is a
    buffer the engine owns: no zeros of the input's shape to fill and sum, so unbinding a
    sequence of L steps (an LSTM's input projection) costs O(L) passes instead of O(L^2)."""
    (t,) = node.inputs
    child = t.grad_fn
    if child is None or t._retains_grad or id(child) not in own:
        return False
    buf = pending[id(child)]
    if buf._data.dtype != g._data.dtype:
        return False
    a = node.attrs
    region = tuple(map(slice, a["starts"], a["stops"], a["steps"]))
    buf._data[region] += g._data
    return True


def _same_layout(a, b) -> bool:
    return a._data.dtype == b._data.dtype and a._data.shape == b._data.shape


def zero_grads(params, set_to_none: bool = True) -> None:
    """Clear the ``.grad`` of ``params``: drop it (the default, as torch) or zero it."""
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            p.grad = p.grad.detach()
            p.grad._data[...] = 0


def _accumulate_leaf(t, g, assigned: dict) -> None:
    if t._grad is None:
        # The same gradient tensor may reach several leaves (add passes ``g`` through):
        # give each its own, so that an in-place change of one .grad leaves the others.
        # ``assigned`` holds the tensors, not just their ids: a freed tensor's id is reused
        # by the next one, which would then be copied for nothing.
        # A view (expand's read-only broadcast, a reshape of another leaf's gradient) is
        # copied too: ``.grad`` must be writable and alias nothing (``x.grad.zero_()``).
        # So memory is tracked by its owner (a view's base): a view of a fresh array that
        # nothing else holds (a weight's gradient, transposed back by permute's vjp) is
        # kept without a copy, which on a large model is most of the gradient memory.
        data = g._data
        owner = data if data.base is None else data.base
        if id(owner) in assigned or not _writable(data):
            g = g.clone() if is_grad_enabled() else g.detach().clone()
            owner = g._data
        assigned[id(owner)] = owner
        t._grad = g if is_grad_enabled() else g.detach()
    else:
        t._grad = t._grad + g if is_grad_enabled() else (t._grad.detach() + g.detach())


def _writable(data) -> bool:
    """False for read-only arrays and for broadcast views (one element at several places)."""
    if not getattr(data.flags, "writeable", True):
        return False
    return 0 not in data.strides or all(
        n <= 1 for n, st in zip(data.shape, data.strides) if st == 0
    )


def _memory_owner(t):
    data = t._data
    return data if data.base is None else data.base


@contextmanager
def _engine_mode(create_graph: bool):
    """Grad mode for running vjps; without create_graph their ops also skip validation."""
    prev = _state.grad, _state.trusted
    _state.grad, _state.trusted = create_graph, not create_graph
    try:
        yield
    finally:
        _state.grad, _state.trusted = prev


def backward(
    tensors, grad_tensors=None, retain_graph: bool | None = None, create_graph: bool = False
) -> None:
    """Compute the gradients of ``tensors`` and accumulate them into the leaves' ``.grad``."""
    tensors = [tensors] if isinstance(tensors, _tensor.Tensor) else list(tensors)
    grads = _make_grads(tensors, grad_tensors, "backward")
    if retain_graph is None:
        retain_graph = create_graph
    run_backward(tensors, grads, retain_graph=retain_graph, create_graph=create_graph)


def grad(
    outputs,
    inputs,
    grad_outputs=None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    allow_unused: bool = False,
) -> tuple:
    """Gradients of ``outputs`` with respect to ``inputs``, without touching ``.grad``.

    >>> import gradmesh.core as gm
    >>> x = gm.tensor(3.0, requires_grad=True)
    >>> (g,) = gm.autograd.grad(x ** 3, x, create_graph=True)
    >>> gm.autograd.grad(g, x)[0].item()   # d2/dx2 x^3 = 6x
    18.0
    """
    Tensor = _tensor.Tensor
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    for i, t in enumerate(inputs):
        if not t.requires_grad:
            raise RuntimeError(f"autograd.grad: input {i} does not require grad")
    grads = _make_grads(outputs, grad_outputs, "autograd.grad")
    if retain_graph is None:
        retain_graph = create_graph
    captured = run_backward(
        outputs,
        grads,
        retain_graph=retain_graph,
        create_graph=create_graph,
        capture=inputs,
        accumulate=False,
    )
    result = []
    for i, t in enumerate(inputs):
        g = captured.get(id(t))
        if g is None and not allow_unused:
            raise RuntimeError(
                f"autograd.grad: input {i} was not used in the graph of the "
                f"outputs; pass allow_unused=True to get None for it"
            )
        result.append(g)
    return tuple(result)


def _make_grads(outputs, grad_outputs, fn: str) -> list:
    Tensor = _tensor.Tensor
    if grad_outputs is None:
        grad_outputs = [None] * len(outputs)
    elif isinstance(grad_outputs, Tensor):
        grad_outputs = [grad_outputs]
    grad_outputs = list(grad_outputs)
    if len(grad_outputs) != len(outputs):
        raise RuntimeError(f"{fn}: got {len(grad_outputs)} gradients for {len(outputs)} outputs")
    grads = []
    for out, g in zip(outputs, grad_outputs):
        if not out.requires_grad:
            raise RuntimeError(
                "element 0 of tensors does not require grad and does not have "
                "a grad_fn; did you create it under no_grad or from tensors "
                "without requires_grad=True?"
            )
        if g is None:
            if out.numel() != 1:
                raise RuntimeError(
                    f"grad can be implicitly created only for scalar outputs; "
                    f"this output has shape {tuple(out.shape)}: pass "
                    f"gradient=<tensor of that shape> to backward()"
                )
            g = factories.ones_like(out)
        elif not isinstance(g, Tensor):
            g = factories.tensor(g, dtype=out.dtype)
        if tuple(g.shape) != tuple(out.shape):
            raise RuntimeError(
                f"{fn}: gradient has shape {tuple(g.shape)} but the output has "
                f"shape {tuple(out.shape)}"
            )
        grads.append(g)
    return grads


__all__ = ["backward", "grad", "no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled"]

# Last: tensors carry this module's Nodes (cycles: these modules import this one). The
# tensor module first: it defines Tensor before anything it imports needs it.
from . import tensor as _tensor  # noqa: E402,I001
from . import factories, unbroadcast as _unbroadcast  # noqa: E402
