"""Graphs on the wire: tracing a Python function into a ``Graph`` message, the graph id,
validation of a graph that arrived over the network, and a reference executor.

A ``Graph`` (``protos/gradmesh/v1/graph.proto``) numbers its values: the inputs first,
then one value per node in node order. Nodes name ops of the registry, which is the
allowlist: nothing in a graph is executable code.

>>> import numpy as np
>>> import gradmesh.core as gm
>>> params = {"w": gm.ones(3, 2)}
>>> g = trace(lambda p, x: (x @ p["w"]).sum(), params, np.ones((4, 3), np.float32))
>>> [i.name for i in g.inputs], [n.op for n in g.nodes]
(['w', 'x0'], ['matmul', 'sum'])
>>> list(g.inputs[1].shape)          # DATA inputs have a free batch dimension
[-1, 3]
>>> execute(g, params, {"x0": np.ones((2, 3), np.float32)})["loss"].item()
12.0

Batch size: a graph traced at batch size B must work at any batch size, so nothing in it
may hold B. Two checks find what does:

* while recording, every value's shape is also inferred at batch size 2B + 1; a value that
  cannot be inferred there baked B in (``x.reshape(64, -1)``, ``zeros(64, 10)``);
* the function is then traced a second time on data tiled to 2B + 1 rows, and the two
  graphs compared: a constant or attribute that differs depends on the batch.

Either raises ``TraceError`` naming the node and the fix; nothing is silently truncated.
Three idioms are made batch-free instead: ``x.reshape(x.shape[0], -1)`` (which records the
literal B) becomes ``reshape(-1, ...)``; ``expand`` keeps the batch dim with -1; and a
scalar constant equal to B times a per-sample count (the divisor of ``x.mean()`` over the
batch, ``x.sum() / x.shape[0]``) is replaced by nodes that count the batch of a DATA input
at run time (exact, so results stay bitwise equal to eager). Slicing over the batch
dimension (``x[:, 1:]``) is refused while the ``slice`` op cannot express "to the end".
Trace with a batch size above 1, so that the batch dimension cannot be confused with
dimensions of size 1. The function runs twice: random ops draw twice from the global
generator; the graph keeps the first trace's seeds.
"""
from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gradmesh.v1 import graph_pb2, tensor_pb2

from . import dtypes
from .autograd import is_grad_enabled
from .registry import REGISTRY, Op, OpError, Spec

__all__ = ["GraphError", "TraceError", "Limits", "ValidatedGraph", "trace", "graph_id",
           "validate", "execute", "encode_attrs", "decode_attrs", "random_seed",
           "GRAPH_VERSION", "LOSS"]

GRAPH_VERSION = 1
LOSS = "loss"                       # name of the first output
PARAM, DATA, CONST = graph_pb2.Input.PARAM, graph_pb2.Input.DATA, graph_pb2.Input.CONST
_ROLE_NAMES = {PARAM: "PARAM", DATA: "DATA", CONST: "CONST"}
# Batch sizes that validation infers every shape at: dims that differ between the two
# depend on the batch. Small, so that shape arithmetic stays cheap.
_PROBE_BATCHES = (2, 3)
_TO_END = 2 ** 63 - 1               # a slice stop meaning "to the end of the dimension"
STOP_GRADIENT = "stop_gradient"     # the op a traced detach() or no_grad() leaves behind


class GraphError(ValueError):
    """An invalid graph. ``field`` names the offending field (``"nodes[3].attrs.dim"``,
    ``"inputs[1].shape"``); ``code`` is the gRPC status code name to answer with:
    ``"INVALID_ARGUMENT"`` or ``"RESOURCE_EXHAUSTED"`` (a limit)."""

    def __init__(self, field: str, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code


class TraceError(ValueError):
    """A function that cannot be traced into a batch-size-independent graph."""


@dataclass(frozen=True)
class Limits:
    """Size limits of a worker, checked before anything is allocated.

    ``to_proto()`` gives the ``worker_pb2.Limits`` message that ``Capabilities`` reports.
    """
    max_graph_nodes: int = 10_000
    max_graph_inputs: int = 10_000
    max_tensor_elements: int = 2 ** 31
    max_const_bytes: int = 64 << 20          # all CONST values of a graph together
    max_attr_values: int = 1 << 16           # entries of one ints/floats attribute
    max_message_bytes: int = 64 << 20        # largest unary message
    max_stream_bytes: int = 8 << 30          # largest total of a streamed request's tensors
    max_concurrent_requests: int = 16
    chunk_bytes: int = 2 << 20

    def to_proto(self):
        from gradmesh.v1 import worker_pb2
        return worker_pb2.Limits(
            max_graph_nodes=self.max_graph_nodes, max_tensor_elements=self.max_tensor_elements,
            max_message_bytes=self.max_message_bytes, max_stream_bytes=self.max_stream_bytes,
            max_concurrent_requests=self.max_concurrent_requests, chunk_bytes=self.chunk_bytes)


# ---------------------------------------------------------------------------------------
# Attributes: Python values <-> Attribute messages
# ---------------------------------------------------------------------------------------

_KIND_FIELD = {"int": "i", "float": "f", "bool": "b", "str": "s", "ints": "ints",
               "floats": "floats", "dtype": "dtype"}


def _same_value(kind: str, value, default) -> bool:
    """Is ``value`` the declared default (so the canonical form omits it)?"""
    if value is None or default is None:
        return value is None and default is None
    if kind == "float":
        v, d = float(value), float(default)
        return (v == d and math.copysign(1, v) == math.copysign(1, d)) or (v != v and d != d)
    if kind in ("ints", "floats"):
        return [float(x) for x in value] == [float(x) for x in default] if kind == "floats" \
            else [int(x) for x in value] == [int(x) for x in default]
    if kind == "dtype":
        return dtypes.as_dtype(value) is dtypes.as_dtype(default)
    return type(value) is type(default) and value == default if kind == "bool" else value == default


def encode_attrs(op: Op, attrs: Mapping[str, Any]) -> list:
    """The canonical Attribute messages of ``attrs``: sorted by name, defaults omitted."""
    out = []
    for name in sorted(attrs):
        if name not in op.attrs:
            raise TypeError(f"{op.name}: unexpected attribute {name!r}")
        kind, default = op.attrs[name]
        base = kind.rstrip("?")
        value = attrs[name]
        if _same_value(base, value, default):
            continue
        a = graph_pb2.Attribute(name=name)
        if value is None:
            if not kind.endswith("?"):
                raise TypeError(f"{op.name}: attribute {name} may not be None")
            a.none = True
        elif base == "int":
            a.i = int(value)
        elif base == "float":
            a.f = float(value)
        elif base == "bool":
            a.b = bool(value)
        elif base == "str":
            a.s = str(value)
        elif base == "ints":
            a.ints.values.extend(int(v) for v in ([value] if isinstance(value, int) else value))
        elif base == "floats":
            a.floats.values.extend(float(v) for v in value)
        elif base == "dtype":
            a.dtype = dtypes.as_dtype(value).name
        out.append(a)
    return out


def decode_attrs(op: Op, attrs: Sequence, field: str = "attrs",
                 limits: "Limits | None" = None) -> dict:
    """Attribute messages as Python values, with the op's defaults filled in.

    Raises ``GraphError`` (field ``f"{field}.{name}"``) for an unknown name, a duplicate,
    a value of the wrong kind or an unknown dtype name.
    """
    values: dict = {}
    max_values = (limits or Limits()).max_attr_values
    for a in attrs:
        f = f"{field}.{a.name}"
        decl = op.attrs.get(a.name)
        if decl is None:
            raise GraphError(f, f"op {op.name} has no attribute {a.name!r}; it takes "
                             f"{sorted(op.attrs) or 'none'}")
        if a.name in values:
            raise GraphError(f, "attribute given twice")
        kind = decl[0]
        base, optional = kind.rstrip("?"), kind.endswith("?")
        which = a.WhichOneof("value")
        if which == "none" and optional:
            values[a.name] = None
            continue
        if which != _KIND_FIELD[base]:
            allowed = f"'{_KIND_FIELD[base]}'" + (" or 'none'" if optional else "")
            raise GraphError(f, f"op {op.name} expects a {kind} attribute (field {allowed}), "
                             f"got {which or 'no value'}")
        if base in ("ints", "floats"):
            seq = getattr(a, which).values
            if len(seq) > max_values:
                raise GraphError(f, f"{len(seq)} values exceed the limit of {max_values}",
                                 "RESOURCE_EXHAUSTED")
            values[a.name] = [int(v) for v in seq] if base == "ints" else [float(v) for v in seq]
        elif base == "dtype":
            if a.dtype not in dtypes._BY_NAME:
                raise GraphError(f, f"unknown dtype {a.dtype!r}; expected one of "
                                 f"{sorted(dtypes._BY_NAME)}")
            values[a.name] = a.dtype
        else:
            values[a.name] = getattr(a, which)
    for name, (_kind, default) in op.attrs.items():
        if name not in values:
            values[name] = list(default) if isinstance(default, list) else default
    return values


def random_seed(call_seed: int, node_index: int) -> int:
    """The seed of random node ``node_index`` in a call seeded with ``call_seed``.

    A pure function of the two numbers (NumPy's SeedSequence hashing), so every worker
    draws the same dropout mask for the same (call seed, node); the result fits the int64
    ``seed`` attribute of random ops.
    """
    state = np.random.SeedSequence([int(call_seed) & (2 ** 64 - 1), int(node_index)])
    return int(state.generate_state(1, np.uint64)[0]) & (2 ** 63 - 1)


def is_random(op: Op) -> bool:
    """Random ops (``dropout_mask``) declare an int ``seed`` attribute."""
    return op.attrs.get("seed", ("",))[0].rstrip("?") == "int"


# ---------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------

class _Tracer:
    """Records every op the dispatcher runs on this thread (``tensor._dispatch.tracer``).

    Gradient stops: a compiled plan differentiates every value that depends on a
    parameter through differentiable ops (``diff`` below tracks exactly that), while eager
    autograd stops at ``detach()`` and at ops run under ``no_grad()``. Where a recorded op
    reads a value that the plan would differentiate but eager does not (its
    ``requires_grad`` is off, or grad mode is), the op reads a ``stop_gradient`` of it
    instead; ``detach()`` itself records one. So the graph's gradients are eager's.
    """

    def __init__(self, batch: int | None):
        self.batch = batch
        self.batch2 = None if batch is None else 2 * batch + 1
        self.keep: list = []            # tensors kept alive, so that no id is reused
        self.ref: dict[int, tuple] = {}  # id(tensor) -> ("in", i) | ("node", k)
        self.inputs: list[list] = []     # [name, role, tensor, spec at batch2]
        self.nodes: list[tuple] = []     # (op, input refs, attrs)
        self.spec2: dict[tuple, Spec] = {}
        self.diff: set[tuple] = set()    # refs a plan differentiates (Plan.requires)
        self.stops: dict[tuple, tuple] = {}   # ref -> ref of its stop_gradient node

    def add_input(self, name: str, role: int, t, shape2: tuple) -> tuple:
        ref = ("in", len(self.inputs))
        self.inputs.append([name, role, t])
        self.keep.append(t)
        self.ref[id(t)] = ref
        self.spec2[ref] = Spec(tuple(shape2), t.dtype)
        if role == PARAM:
            self.diff.add(ref)
        return ref

    def lookup(self, t) -> tuple:
        ref = self.ref.get(id(t))
        if ref is None:
            ref = self.add_input(None, CONST, t, t.shape)
        return ref

    def record(self, op: Op, inputs, attrs: dict, result) -> None:
        refs = [self.lookup(t) for t in inputs]
        floating = result.dtype.is_floating_point
        if op.differentiable and floating:
            grad_mode = is_grad_enabled()
            refs = [self._stopped(r) if r in self.diff and not (grad_mode and t.requires_grad)
                    else r for r, t in zip(refs, inputs)]
        elif op.name == STOP_GRADIENT and refs[0] not in self.diff:
            # Detaching what carries no gradient anyway (data, constants): nothing to stop.
            self.keep.append(result)
            self.ref[id(result)] = refs[0]
            return
        attrs = dict(attrs)
        k = len(self.nodes)
        if self.batch is not None:
            attrs = self._batch_free(op, k, refs, inputs, attrs, result)
        ref = ("node", k)
        self.nodes.append((op, refs, attrs))
        self.keep.append(result)
        self.ref[id(result)] = ref
        if op.differentiable and floating and any(r in self.diff for r in refs):
            self.diff.add(ref)

    def _stopped(self, ref: tuple) -> tuple:
        """The ref of ``stop_gradient(ref)``, recorded once per value."""
        stop = self.stops.get(ref)
        if stop is None:
            stop = ("node", len(self.nodes))
            self.nodes.append((REGISTRY[STOP_GRADIENT], [ref], {}))
            if self.batch is not None:
                self.spec2[stop] = self.spec2[ref]
            self.stops[ref] = stop
        return stop

    def _batch_free(self, op, k, refs, inputs, attrs, result) -> dict:
        """Attributes that work at any batch size; records the value's shape at batch2."""
        specs2 = [self.spec2[r] for r in refs]
        # Is the first input's leading dimension the batch?
        batched = bool(specs2) and len(specs2[0].shape) > 0 and \
            specs2[0].shape[0] != inputs[0].shape[0]
        B = self.batch
        if op.name in ("reshape", "expand") and batched and B > 1:
            shape = list(attrs["shape"])
            out = list(result.shape)
            lead = len(shape) - inputs[0].ndim
            if op.name == "reshape" and shape and shape[0] == B and out[0] == B \
                    and inputs[0].shape[0] == B:
                # x.reshape(x.shape[0], -1) recorded the batch size: keep it in front.
                attrs["shape"] = [-1] + out[1:]
            elif op.name == "expand" and lead >= 0 and shape[lead] == B:
                attrs["shape"] = shape[:lead] + [-1] + shape[lead + 1:]
        elif op.name == "slice" and batched and B > 1 and attrs["starts"][:1] == [0] \
                and attrs["stops"][:1] == [B] and attrs["steps"][:1] == [1]:
            # x[:, ...] records the batch size as the stop of dim 0. Where the op accepts
            # a stop past the end (clamped, as Python slices are), "to the end" is exact.
            candidate = {**attrs, "stops": [_TO_END] + list(attrs["stops"][1:])}
            try:
                ok = tuple(op.infer(*inputs, **candidate).shape) == tuple(result.shape)
            except (OpError, TypeError, ValueError):
                ok = False
            if not ok:
                # At a larger batch this slice would silently keep the first B rows.
                raise TraceError(
                    f"node {k} (slice) bakes in the batch size {B}: slicing "
                    f"{tuple(inputs[0].shape)} over every dimension (x[:, ...]) records the "
                    f"batch size as the stop of dimension 0. Move the batch out of the slice "
                    f"(e.g. x.narrow(1, ...), x.split(..., dim=1)) or trace with "
                    f"batch_dim=False for a fixed batch size.")
            attrs = candidate
        try:
            spec = op.infer(*specs2, **attrs)
        except (OpError, TypeError, ValueError) as e:
            raise TraceError(self._baked_message(op, k, refs, inputs, e)) from None
        self.spec2[("node", k)] = Spec(tuple(spec.shape), spec.dtype)
        return attrs

    def _baked_message(self, op, k, refs, inputs, err) -> str:
        parts = []
        for r, t in zip(refs, inputs):
            name = self.inputs[r[1]][0] if r[0] == "in" else f"node {r[1]}"
            role = _ROLE_NAMES.get(self.inputs[r[1]][1]) if r[0] == "in" else None
            parts.append(f"{name or 'a constant'}{' (' + role + ')' if role else ''} "
                         f"of shape {tuple(t.shape)}")
        return (f"node {k} ({op.name}) bakes in the batch size {self.batch}: traced at batch "
                f"size {self.batch} it fails at batch size {self.batch2} ({err}). Inputs: "
                f"{'; '.join(parts)}. Write shapes relative to the batch: x.flatten(1) or "
                f"x.reshape(-1, ...) instead of x.reshape({self.batch}, ...), "
                f"zeros_like(x) instead of zeros({self.batch}, ...); or trace with "
                f"batch_dim=False for a fixed batch size.")


def _as_tensor(x):
    from .tensor import Tensor, as_tensor
    return x if isinstance(x, Tensor) else as_tensor(x)


def trace(fn: Callable, params, *data, data_names: Sequence[str] | None = None,
          batch_dim: bool = True, output_names: Sequence[str] | None = None) -> graph_pb2.Graph:
    """Run ``fn(params, *data)`` once and record every op it runs into a ``Graph``.

    ``params`` is an ``nn.Module`` (its ``named_parameters()`` become PARAM inputs; ``fn``
    receives the module) or a dict name -> Tensor (``fn`` receives a dict of tensors that
    share the values and require grad). ``data`` are Tensors or arrays, the DATA inputs,
    named by ``data_names`` (default ``x0``, ``x1``, ...); with ``batch_dim`` their first
    dimension becomes -1 (any batch size; they must then agree on it). Any other tensor the
    ops meet (the 2.0 of ``x ** 2``, a buffer) becomes a CONST input carrying its value.

    ``fn`` returns the loss (a floating scalar) or ``(loss, {"name": tensor, ...})`` for
    extra outputs. Ops that do not contribute to an output are dropped. Gradient stops
    are kept: ``detach()`` and ops run under ``no_grad()`` on values that depend on the
    parameters leave ``stop_gradient`` nodes, so the graph's gradients are those of
    ``fn(...).backward()``. The module's ``.grad``s and ``requires_grad`` flags are left
    as they were. Thread-safe: the hook is per thread. With ``batch_dim`` the function
    runs twice (see the module docstring); ``TraceError`` where the batch size would be
    baked into the graph.
    """
    from .tensor import Tensor

    data_t = [_as_tensor(d) for d in data]
    names = list(data_names) if data_names is not None else [f"x{i}" for i in range(len(data))]
    if len(names) != len(data_t):
        raise TraceError(f"trace: {len(data_t)} data inputs but {len(names)} data_names")
    batch = None
    if batch_dim:
        sizes = {n: t.shape[0] for n, t in zip(names, data_t) if t.ndim > 0}
        if len(set(sizes.values())) > 1:
            raise TraceError(f"trace: data inputs disagree on the batch size {sizes}; pass "
                             f"batch_dim=False if the first dimension is not the batch")
        batch = next(iter(sizes.values()), None)

    module = hasattr(params, "named_parameters") and callable(params.named_parameters)
    if module:
        named = list(params.named_parameters())
        arg = params
    else:
        named = [(str(n), t if isinstance(t, Tensor) else _as_tensor(t))
                 for n, t in dict(params).items()]
        for n, t in named:
            if not t.dtype.is_floating_point:
                raise TraceError(f"trace: parameter {n!r} has dtype {t.dtype}; parameters "
                                 f"must be floating point (pass integer tensors as data)")
        named = [(n, Tensor._wrap(t._data, True)) for n, t in named]
        arg = dict(named)

    graph = _trace_once(fn, arg, named, names, data_t, batch)
    if batch:
        # Trace again at another batch size: whatever differs (a constant such as the
        # divisor of x.mean() over the batch, an attribute) baked the batch size in.
        b2 = 2 * batch + 1
        tiled = [t if t.ndim == 0 else _as_tensor(np.take(np.asarray(t), np.arange(b2) % batch,
                                                          axis=0))
                 for t in data_t]
        graph2 = _trace_once(fn, arg, named, names, tiled, b2)
        graph = _reconcile(graph, graph2, batch, b2)
    return graph


def _trace_once(fn, arg, named, names, data_t, batch) -> graph_pb2.Graph:
    from .autograd import enable_grad
    from .tensor import Tensor, _dispatch
    tracer = _Tracer(batch)
    for n, p in named:
        tracer.add_input(n, PARAM, p, p.shape)
    for n, t in zip(names, data_t):
        shape2 = (tracer.batch2,) + tuple(t.shape[1:]) if batch is not None and t.ndim else t.shape
        tracer.add_input(n, DATA, t, shape2)

    saved_flags = [(p, p.requires_grad) for _, p in named]
    prev = getattr(_dispatch, "tracer", None)
    _dispatch.tracer = tracer
    try:
        for p, _ in saved_flags:
            p.requires_grad = True      # every op on a parameter must be recorded
        with enable_grad():
            result = fn(arg, *data_t)
    finally:
        _dispatch.tracer = prev
        for p, flag in saved_flags:
            p.requires_grad = flag

    if isinstance(result, tuple):
        if len(result) != 2 or not isinstance(result[1], Mapping):
            raise TraceError("trace: fn must return the loss or (loss, {name: tensor})")
        loss, extra = result
    else:
        loss, extra = result, {}
    if not isinstance(loss, Tensor) or loss.ndim != 0 or not loss.dtype.is_floating_point:
        what = f"shape {tuple(loss.shape)} and dtype {loss.dtype}" if isinstance(loss, Tensor) \
            else type(loss).__name__
        raise TraceError(f"trace: the loss must be a floating scalar Tensor, got {what}; "
                         f"reduce it with .mean() or .sum()")
    outs = [(LOSS, loss)]
    for name, t in extra.items():
        if not isinstance(t, Tensor):
            raise TraceError(f"trace: output {name!r} is a {type(t).__name__}, not a Tensor")
        if name == LOSS:
            raise TraceError(f"trace: output name {LOSS!r} is reserved for the loss")
        outs.append((str(name), t))
    return _build(tracer, [(n, tracer.lookup(t)) for n, t in outs])


def _consumer(g: graph_pb2.Graph, value: int) -> str:
    for k, node in enumerate(g.nodes):
        if value in node.inputs:
            return f"node {k} ({node.op})"
    return "an output"


def _const_value(inp) -> np.ndarray:
    from .serialize import from_proto
    return from_proto(inp.value)


def _reconcile(g1: graph_pb2.Graph, g2: graph_pb2.Graph, b1: int, b2: int) -> graph_pb2.Graph:
    """``g1`` made batch-size free after comparing it with ``g2``, the same function traced
    at batch size ``b2``; raises TraceError where the batch size is baked in."""
    advice = (f"Write shapes and counts relative to the batch (x.flatten(1), "
              f"x.reshape(-1, ...), zeros_like(x)), or trace with batch_dim=False for a "
              f"fixed batch size.")
    ops1, ops2 = [n.op for n in g1.nodes], [n.op for n in g2.nodes]
    if ops1 != ops2 or len(g1.inputs) != len(g2.inputs) or \
            [list(n.inputs) for n in g1.nodes] != [list(n.inputs) for n in g2.nodes] or \
            list(g1.outputs) != list(g2.outputs):
        k = next((k for k, (a, b) in enumerate(zip(g1.nodes, g2.nodes))
                  if a.op != b.op or list(a.inputs) != list(b.inputs)), min(len(ops1), len(ops2)))
        raise TraceError(f"the traced function runs different ops at batch sizes {b1} and "
                         f"{b2} (from node {k} on): its structure depends on the batch size. "
                         + advice)
    counts: dict[int, int] = {}
    for i, (a, b) in enumerate(zip(g1.inputs, g2.inputs)):
        if a == b:
            continue
        if a.role == CONST and b.role == CONST and not a.shape and not b.shape \
                and a.dtype == b.dtype and _dtype(a.dtype) is not dtypes.bool_:
            v1, v2 = float(_const_value(a)), float(_const_value(b))
            if v1 == round(v1) and v2 == round(v2) and v1 > 0 and int(v1) % b1 == 0 \
                    and int(v2) % b2 == 0 and int(v1) // b1 == int(v2) // b2:
                counts[i] = int(v1) // b1          # a count of m elements per sample
                continue
        what = (f"constant of shape {list(a.shape)}" if a.role == CONST else
                f"{_ROLE_NAMES.get(a.role)} input {a.name!r}")
        raise TraceError(f"a {what} read by {_consumer(g1, i)} depends on the batch size: it "
                         f"differs between traces at batch sizes {b1} and {b2}. " + advice)
    for k, (a, b) in enumerate(zip(g1.nodes, g2.nodes)):
        if a.attrs == b.attrs:
            continue
        random = is_random(REGISTRY[a.op])
        for x, y in zip(a.attrs, b.attrs):
            if x != y and not (random and x.name == "seed"):
                raise TraceError(f"node {k} ({a.op}) attribute {x.name} depends on the batch "
                                 f"size: traced at batch sizes {b1} and {b2} it differs "
                                 f"({_attr_text(x)} vs {_attr_text(y)}). " + advice)
    return _count_batch(g1, counts) if counts else g1


def _attr_text(a) -> str:
    which = a.WhichOneof("value")
    v = getattr(a, which) if which else None
    return str(list(v.values)) if which in ("ints", "floats") else repr(v)


def _count_batch(g: graph_pb2.Graph, counts: dict[int, int]) -> graph_pb2.Graph:
    """Replace CONST inputs that hold ``batch * m`` (x.mean() over the batch divides by
    one) with nodes that count it from a DATA input at run time.

    The count is exact in float64 and then cast to the constant's dtype, which rounds as
    the eager ``float(count)`` constant did: results stay bitwise equal to eager.
    """
    batched = [i for i, inp in enumerate(g.inputs) if inp.role == DATA and inp.shape[:1] == [-1]]
    if not batched:
        raise TraceError("a constant depends on the batch size, but no DATA input has a "
                         "batch dimension")
    d = batched[0]
    rank = len(g.inputs[d].shape)
    out = graph_pb2.Graph(version=g.version)
    new_index: dict[int, int] = {}
    for i, inp in enumerate(g.inputs):
        if i not in counts:
            new_index[i] = len(out.inputs)
            out.inputs.add().CopyFrom(inp)
    taken = {inp.name for inp in out.inputs}
    multiples: dict[int, int] = {}
    from .serialize import to_proto
    for m in sorted(set(counts.values()) - {1}):
        name, j = f"count{m}", 0
        while name in taken:
            j += 1
            name = f"count{m}_{j}"
        taken.add(name)
        value = to_proto(np.float64(m))
        multiples[m] = len(out.inputs)
        out.inputs.add(name=name, role=CONST, dtype=value.dtype, value=value)
    n_in = len(out.inputs)

    def node(op: str, inputs: list, **attrs) -> int:
        out.nodes.add(op=op, inputs=inputs, attrs=encode_attrs(REGISTRY[op], attrs))
        return n_in + len(out.nodes) - 1

    x = new_index[d]
    # Every element is equal or unequal to itself (NaN included): a mask of ones.
    ones = node("logical_or", [node("eq", [x, x]), node("ne", [x, x])])
    if rank > 1:
        ones = node("all", [ones], dim=list(range(1, rank)))
    batch = node("sum", [node("cast", [ones], dtype="float64")])
    value_of: dict[int, int] = {}
    for i, m in counts.items():
        v = batch if m == 1 else node("mul", [batch, multiples[m]])
        dt = _dtype(g.inputs[i].dtype)
        value_of[i] = v if dt is dtypes.float64 else node("cast", [v], dtype=dt.name)
    shift = n_in + len(out.nodes) - len(g.inputs)

    def remap(v: int) -> int:
        if v >= len(g.inputs):
            return v + shift
        return value_of[v] if v in value_of else new_index[v]

    for n in g.nodes:
        out.nodes.add(op=n.op, inputs=[remap(v) for v in n.inputs], attrs=n.attrs)
    for o in g.outputs:
        out.outputs.add(name=o.name, value=remap(o.value))
    return out


def _build(tracer: _Tracer, outputs: list) -> graph_pb2.Graph:
    """The Graph of the recorded ops that lead to an output, numbered canonically."""
    live_nodes: set[int] = set()
    live_inputs: set[int] = set(i for i, inp in enumerate(tracer.inputs) if inp[1] != CONST)
    stack = [ref for _, ref in outputs]
    while stack:
        kind, idx = stack.pop()
        if kind == "in":
            live_inputs.add(idx)
        elif idx not in live_nodes:
            live_nodes.add(idx)
            stack.extend(tracer.nodes[idx][1])
    # PARAM and DATA inputs first, in the order given, then constants as first met.
    order = [i for i, inp in enumerate(tracer.inputs) if inp[1] != CONST] + \
            [i for i, inp in enumerate(tracer.inputs) if inp[1] == CONST and i in live_inputs]
    number = {("in", i): v for v, i in enumerate(order)}
    g = graph_pb2.Graph(version=GRAPH_VERSION)
    taken = {tracer.inputs[i][0] for i in order if tracer.inputs[i][0]}
    const_count = 0
    from .serialize import to_proto
    for i in order:
        name, role, t = tracer.inputs[i][:3]
        if role == CONST:
            while f"const{const_count}" in taken:
                const_count += 1
            name = f"const{const_count}"
            const_count += 1
        inp = g.inputs.add(name=name, role=role)
        value = to_proto(t)
        inp.dtype = value.dtype
        shape = list(t.shape)
        if role == DATA and tracer.batch is not None and shape:
            shape[0] = -1
        inp.shape.extend(shape)
        if role == CONST:
            inp.value.CopyFrom(value)
    for k, (op, refs, attrs) in enumerate(tracer.nodes):
        if k not in live_nodes:
            continue
        number[("node", k)] = len(order) + len(g.nodes)
        g.nodes.add(op=op.name, inputs=[number[r] for r in refs], attrs=encode_attrs(op, attrs))
    for name, ref in outputs:
        g.outputs.add(name=name, value=number[ref])
    return g


def graph_id(graph: graph_pb2.Graph) -> str:
    """Lowercase hex SHA-256 of the graph's canonical (deterministic) serialization."""
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------

@dataclass
class ValidatedGraph:
    """A graph that passed ``validate``, decoded for execution.

    ``specs[v]`` is value ``v``'s shape and dtype, with -1 where a dimension depends on the
    batch size; ``specs_at(data_shapes)`` gives concrete ones.
    """
    graph: graph_pb2.Graph
    id: str
    ops: list[Op]
    attrs: list[dict]                       # per node, defaults filled in
    node_inputs: list[tuple[int, ...]]
    specs: list[Spec]
    params: list[str]                       # PARAM input names, in graph order
    data: list[str]                         # DATA input names
    input_index: dict[str, int]             # input name -> value number
    consts: dict[int, np.ndarray]           # value number -> decoded CONST value
    outputs: dict[str, int]                 # output name -> value number (loss first)
    limits: Limits = field(default_factory=Limits)

    @property
    def num_inputs(self) -> int:
        return len(self.graph.inputs)

    @property
    def batched(self) -> bool:
        """Whether some DATA input has a free (-1) batch dimension."""
        return any(self.graph.inputs[self.input_index[n]].shape[:1] == [-1] for n in self.data)

    def batch_size(self, data_shapes: Mapping[str, Sequence[int]]) -> int | None:
        """The batch size of ``data_shapes``; raises GraphError if they disagree with the
        graph's DATA inputs or with each other."""
        missing = [n for n in self.data if n not in data_shapes]
        if missing:
            raise GraphError(f"data[{missing[0]}]", f"missing; the graph's DATA inputs are "
                             f"{self.data}")
        extra = [n for n in data_shapes if n not in self.data]
        if extra:
            raise GraphError(f"data[{extra[0]}]", f"the graph has no DATA input {extra[0]!r}; "
                             f"its DATA inputs are {self.data}")
        batch, first = None, None
        for n in self.data:
            want = list(self.graph.inputs[self.input_index[n]].shape)
            got = [int(s) for s in data_shapes[n]]
            ok = len(got) == len(want) and all(w in (-1, s) for w, s in zip(want, got))
            if not ok:
                raise GraphError(f"data[{n}].shape", f"got shape {got}, the graph expects "
                                 f"{want} (-1: any batch size)")
            if want[:1] == [-1]:
                if batch is not None and got[0] != batch:
                    raise GraphError(f"data[{n}].shape", f"batch size {got[0]} differs from "
                                     f"{batch} of data[{first}]")
                batch, first = got[0], n
        return batch

    def specs_at(self, data_shapes: Mapping[str, Sequence[int]] | None = None,
                 batch: int | None = None) -> list[Spec]:
        """Concrete shapes and dtypes of every value for these data shapes (or batch size),
        checked against the element limit."""
        if batch is None and data_shapes is not None:
            batch = self.batch_size(data_shapes)
        if batch is None and self.batched:
            raise GraphError("data", "the graph has a batch dimension: give data shapes or a "
                             "batch size")
        specs = _infer_all(self.graph, self.ops, self.attrs, self.node_inputs,
                           batch if batch is not None else 1)
        n_in = self.num_inputs
        for v, s in enumerate(specs):
            count = math.prod(s.shape)
            if count > self.limits.max_tensor_elements:
                where = f"nodes[{v - n_in}]" if v >= n_in else f"inputs[{v}].shape"
                raise GraphError(where, f"value of shape {list(s.shape)} has {count} elements, "
                                 f"over the limit of {self.limits.max_tensor_elements}",
                                 "RESOURCE_EXHAUSTED")
        return specs


def _input_spec(inp, batch: int) -> Spec:
    shape = tuple(batch if (i == 0 and s == -1) else int(s) for i, s in enumerate(inp.shape))
    return Spec(shape, _dtype(inp.dtype))


def _dtype(proto_dtype: int) -> dtypes.DType:
    from .serialize import PROTO_TO_DTYPE
    return PROTO_TO_DTYPE[proto_dtype]


def _infer_all(graph, ops, attrs, node_inputs, batch: int) -> list[Spec]:
    specs = [_input_spec(inp, batch) for inp in graph.inputs]
    for k, (op, a, ins) in enumerate(zip(ops, attrs, node_inputs)):
        try:
            spec = op.infer(*[specs[i] for i in ins], **a)
        except GraphError:
            raise
        except Exception as e:        # infer's own errors name the op and the shapes
            raise GraphError(f"nodes[{k}]", f"{op.name}: {e}" if not str(e).startswith(op.name)
                             else str(e)) from None
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise GraphError(f"nodes[{k}].op", f"{op.name}: shape inference returned {spec!r}")
        specs.append(Spec(tuple(int(s) for s in spec[0]), spec[1]))
    return specs


def validate(graph: graph_pb2.Graph, limits: Limits | None = None) -> ValidatedGraph:
    """Check a graph from the network before anything is allocated for it.

    Checks, in order: version; size limits (nodes, inputs, CONST bytes); every input's
    name (non-empty, unique), role, dtype, shape (-1 only as the first dimension of a DATA
    input) and CONST value; every node's op (registry allowlist), arity, input value
    numbers (defined before use: acyclic) and attributes (names and kinds as the op
    declares them); outputs (unique names, existing values, the first a floating scalar);
    then shape and dtype inference of every node at two batch sizes. Raises
    ``GraphError`` naming the field.
    """
    from .serialize import PROTO_TO_DTYPE, WireError, from_proto
    limits = limits or Limits()
    if graph.version != GRAPH_VERSION:
        raise GraphError("version", f"unsupported graph version {graph.version}; this worker "
                         f"reads version {GRAPH_VERSION}")
    if len(graph.nodes) > limits.max_graph_nodes:
        raise GraphError("nodes", f"{len(graph.nodes)} nodes exceed the limit of "
                         f"{limits.max_graph_nodes}", "RESOURCE_EXHAUSTED")
    if len(graph.inputs) > limits.max_graph_inputs:
        raise GraphError("inputs", f"{len(graph.inputs)} inputs exceed the limit of "
                         f"{limits.max_graph_inputs}", "RESOURCE_EXHAUSTED")

    names: dict[str, int] = {}
    params, data, consts = [], [], {}
    const_bytes = 0
    for i, inp in enumerate(graph.inputs):
        f = f"inputs[{i}]"
        if not inp.name:
            raise GraphError(f"{f}.name", "inputs must be named")
        if inp.name in names:
            raise GraphError(f"{f}.name", f"duplicate input name {inp.name!r} (also inputs"
                             f"[{names[inp.name]}])")
        names[inp.name] = i
        if inp.role not in _ROLE_NAMES:
            raise GraphError(f"{f}.role", f"unknown role {inp.role}; expected PARAM, DATA or "
                             f"CONST")
        if inp.dtype not in PROTO_TO_DTYPE:
            raise GraphError(f"{f}.dtype", f"unknown or unspecified dtype {inp.dtype}")
        for d, s in enumerate(inp.shape):
            if s < 0 and not (s == -1 and d == 0 and inp.role == DATA):
                raise GraphError(f"{f}.shape", f"dimension {d} is {s}; only the first "
                                 f"dimension of a DATA input may be -1 (the batch)")
        static = math.prod(max(int(s), 1) if s == -1 else int(s) for s in inp.shape)
        if static > limits.max_tensor_elements:
            raise GraphError(f"{f}.shape", f"{static} elements exceed the limit of "
                             f"{limits.max_tensor_elements}", "RESOURCE_EXHAUSTED")
        if inp.role == PARAM:
            if not _dtype(inp.dtype).is_floating_point:
                raise GraphError(f"{f}.dtype", f"PARAM {inp.name!r} has dtype "
                                 f"{_dtype(inp.dtype).name}; parameters must be floating point")
            params.append(inp.name)
        elif inp.role == DATA:
            data.append(inp.name)
        if inp.role == CONST:
            if not inp.HasField("value"):
                raise GraphError(f"{f}.value", f"CONST {inp.name!r} has no value")
            const_bytes += len(inp.value.data)
            if const_bytes > limits.max_const_bytes:
                raise GraphError(f"{f}.value", f"CONST values exceed the limit of "
                                 f"{limits.max_const_bytes} bytes in all", "RESOURCE_EXHAUSTED")
            if inp.value.dtype != inp.dtype or list(inp.value.shape) != list(inp.shape):
                raise GraphError(f"{f}.value", f"value has dtype {inp.value.dtype} and shape "
                                 f"{list(inp.value.shape)}, the input declares {inp.dtype} and "
                                 f"{list(inp.shape)}")
            try:
                consts[i] = from_proto(inp.value, field=f"{f}.value",
                                       max_elements=limits.max_tensor_elements)
            except WireError as e:
                raise GraphError(e.field, e.message, e.code) from None
        elif inp.HasField("value"):
            raise GraphError(f"{f}.value", f"only CONST inputs carry a value; "
                             f"{inp.name!r} is {_ROLE_NAMES[inp.role]}")

    ops, attrs, node_inputs = [], [], []
    n_in = len(graph.inputs)
    for k, node in enumerate(graph.nodes):
        f = f"nodes[{k}]"
        op = REGISTRY.get(node.op)
        if op is None:
            raise GraphError(f"{f}.op", f"unknown op {node.op!r}; see Capabilities.ops for the "
                             f"registered ones")
        if op.arity is not None and len(node.inputs) != op.arity:
            raise GraphError(f"{f}.inputs", f"{op.name} takes {op.arity} inputs, got "
                             f"{len(node.inputs)}")
        for j, v in enumerate(node.inputs):
            if v >= n_in + k:
                raise GraphError(f"{f}.inputs[{j}]", f"value {v} is not defined before node "
                                 f"{k} (values 0..{n_in + k - 1} are); nodes must be in "
                                 f"topological order")
        ops.append(op)
        attrs.append(decode_attrs(op, node.attrs, f"{f}.attrs", limits))
        node_inputs.append(tuple(int(v) for v in node.inputs))

    outputs: dict[str, int] = {}
    for j, out in enumerate(graph.outputs):
        f = f"outputs[{j}]"
        if not out.name:
            raise GraphError(f"{f}.name", "outputs must be named")
        if out.name in outputs:
            raise GraphError(f"{f}.name", f"duplicate output name {out.name!r}")
        if out.value >= n_in + len(graph.nodes):
            raise GraphError(f"{f}.value", f"value {out.value} does not exist (the graph has "
                             f"{n_in + len(graph.nodes)} values)")
        outputs[out.name] = int(out.value)
    if not outputs:
        raise GraphError("outputs", "a graph needs at least one output: the loss")

    vg = ValidatedGraph(graph, graph_id(graph), ops, attrs, node_inputs, [], params, data,
                        names, consts, outputs, limits)
    # Infer at two batch sizes: dimensions that differ depend on the batch (-1).
    probes = [_infer_all(graph, ops, attrs, node_inputs, b) for b in _PROBE_BATCHES]
    specs = []
    for v, (a, b) in enumerate(zip(*probes)):
        if a.dtype is not b.dtype or len(a.shape) != len(b.shape):
            where = f"nodes[{v - n_in}]" if v >= n_in else f"inputs[{v}]"
            raise GraphError(where, f"rank or dtype depends on the batch size: {a} vs {b}")
        specs.append(Spec(tuple(x if x == y else -1 for x, y in zip(a.shape, b.shape)), a.dtype))
        static = math.prod(x for x, y in zip(a.shape, b.shape) if x == y)
        if static > limits.max_tensor_elements:
            where = f"nodes[{v - n_in}]" if v >= n_in else f"inputs[{v}].shape"
            raise GraphError(where, f"value of shape {list(specs[-1].shape)} exceeds the limit "
                             f"of {limits.max_tensor_elements} elements", "RESOURCE_EXHAUSTED")
    vg.specs = specs
    loss = specs[graph.outputs[0].value]
    if loss.shape != () or not loss.dtype.is_floating_point:
        raise GraphError("outputs[0].value", f"the first output is the loss and must be a "
                         f"floating scalar, got shape {list(loss.shape)} and dtype "
                         f"{loss.dtype.name}")
    return vg


# ---------------------------------------------------------------------------------------
# Reference executor
# ---------------------------------------------------------------------------------------

def execute(graph, params: Mapping, data: Mapping, *, seed: int | None = None,
            limits: Limits | None = None) -> dict:
    """Evaluate a graph eagerly through the registry: outputs by name, as Tensors.

    ``params`` and ``data`` map input names to Tensors or arrays. Parameters passed as
    Tensors are used as they are, so ``execute(...)["loss"].backward()`` fills their
    ``.grad``. ``seed`` seeds random ops as ``Plan.run`` does (see ``random_seed``); without
    it they use the seeds recorded in the graph. A reference for tests: the worker runs a
    compiled ``Plan``.
    """
    from .tensor import Tensor
    vg = graph if isinstance(graph, ValidatedGraph) else validate(graph, limits)
    values: list = []
    for i, inp in enumerate(vg.graph.inputs):
        if inp.role == CONST:
            values.append(Tensor._wrap(vg.consts[i]))
            continue
        source = params if inp.role == PARAM else data
        kind = "parameters" if inp.role == PARAM else "data"
        if inp.name not in source:
            raise GraphError(f"{kind}[{inp.name}]", "missing")
        values.append(_as_tensor(source[inp.name]))
    for k, (op, a, ins) in enumerate(zip(vg.ops, vg.attrs, vg.node_inputs)):
        if seed is not None and is_random(op):
            a = {**a, "seed": random_seed(seed, k)}
        values.append(op(*[values[i] for i in ins], **a))
    return {name: values[v] for name, v in vg.outputs.items()}
