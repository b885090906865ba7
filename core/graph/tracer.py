"""Tracing a Python function into a ``Graph`` message.

Batch size: a graph traced at batch size B must work at any batch size, so nothing in it
may hold B. Two checks find what does:

* while recording, every value's shape is also inferred at batch size 2B + 1; a value that
  cannot be inferred there baked B in (``x.reshape(64, -1)``, ``zeros(64, 10)``);
* the function is then traced a second time on data tiled to 2B + 1 rows, and the two
  graphs compared: a constant or attribute that differs depends on the batch.

Either raises ``TraceError`` naming the node and the fix; nothing is silently truncated.
Some idioms are made batch-free instead: ``x.reshape(x.shape[0], -1)`` (which records the
literal B) becomes ``reshape(-1, ...)``; ``expand`` keeps the batch dim with -1; a slice
that takes all of a batch-sized dimension (``x[:, 1:]``; ``h_n[-1]`` on an LSTM's (layers,
N, H)) stops "to the end" there, and a reshape that keeps a batch-sized dimension past dim
0 whole (the (1, N, H) -> (N, H) of that ``h_n[-1]``) gets -1 there; and a
scalar constant equal to B times a per-sample count (the divisor of ``x.mean()`` over the
batch, ``x.sum() / x.shape[0]``) is replaced by nodes that count the batch of a DATA input
at run time (exact, so results stay bitwise equal to eager).
Trace with a batch size above 1, so that the batch dimension cannot be confused with
dimensions of size 1. The function runs twice: random ops draw twice from the global
generator; the graph keeps the first trace's seeds.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from typing import Callable, Mapping, Sequence

import numpy as np

from gradmesh.v1 import graph_pb2

from .. import backend, dtypes
from .. import functional as F
from ..autograd import enable_grad, is_grad_enabled
from ..factories import as_tensor
from ..hooks import _dispatch
from ..registry import REGISTRY, Op, OpError, Spec
from ..serialize import from_proto, to_proto
from ..tensor import Tensor
from .ident import (
    BUFFER,
    CONST,
    DATA,
    GRAPH_VERSION,
    LOSS,
    PARAM,
    ROLE_NAMES,
    STOP_GRADIENT,
    dtype_of,
    encode_attrs,
    is_random,
)

_TO_END = 2**63 - 1  # a slice stop meaning "to the end of the dimension"


def _batch_axes(shape: tuple, shape2: tuple) -> list[int]:
    """The dims whose size follows the batch size (they differ at the second batch size)."""
    return [d for d, (a, b) in enumerate(zip(shape, shape2)) if a != b]


def _whole_batch_axes_to_end(shape: tuple, shape2: tuple, attrs: dict) -> dict:
    """A slice that takes the whole of a batch-sized dim past dim 0 (``h_n[-1]`` on (layers,
    N, H), ``x[:, :, 0]`` on (T, N, C)) with its stop written "to the end", as for dim 0."""
    stops = list(attrs["stops"])
    for d in _batch_axes(shape, shape2):
        whole = attrs["starts"][d] == 0 and attrs["steps"][d] == 1 and stops[d] == shape[d]
        if d > 0 and d < len(stops) and whole:
            stops[d] = _TO_END
    return {**attrs, "stops": stops}


def _batch_axis_kept(shape: tuple, shape2: tuple, out: tuple, target: list) -> list:
    """``target`` (a reshape's shape) with -1 for the output dim that is the input's one
    batch-sized dim kept whole: the same size after the same number of elements (so the
    same axis). Anything else is left as it is, for the check at the second batch size."""
    axes = _batch_axes(shape, shape2)
    if len(axes) != 1 or -1 in target or len(target) != len(out):
        return list(target)
    j = axes[0]
    before = math.prod(shape[:j])
    for i, size in enumerate(out):
        if size == shape[j] and math.prod(out[:i]) == before:
            return [*target[:i], -1, *target[i + 1 :]]
    return list(target)


class TraceError(ValueError):
    """A function that cannot be traced into a batch-size-independent graph."""


# Ops whose result can be a view of their first input (NumPy returns one): a view's value
# is the op applied to its base's current value, so a traced graph can replay the op after
# the base changed in place. Writing through a view needs the inverse as well, which
# ``expand`` (a read-only broadcast) lacks.
_VIEW_OPS = frozenset({"reshape", "permute", "slice", "flip", "expand", STOP_GRADIENT, "to_device"})
_WRITABLE_VIEWS = _VIEW_OPS - {"expand"}
# In-place ops whose gradient with respect to the changed tensor is the identity: applied
# under no_grad() to a tensor that carries a gradient, ``t + stop_gradient(other)`` is what
# eager autograd computes (the new value, the old gradient path).
_ADDITIVE = frozenset({"add_", "sub_", "+=", "-="})
# The out-of-place form that error messages suggest, per in-place op.
_OUT_OF_PLACE = {
    "add_": "t = t + other",
    "+=": "t = t + other",
    "sub_": "t = t - other",
    "-=": "t = t - other",
    "mul_": "t = t * other",
    "*=": "t = t * other",
    "div_": "t = t / other",
    "/=": "t = t / other",
    "clamp_": "t = t.clamp(min, max)",
    "zero_": "t = gm.zeros_like(t)",
    "fill_": "t = gm.full_like(t, value)",
    "copy_": "t = src.to(t.dtype).expand_as(t)",
    "t[index] = value": "t = gm.where(mask, value, t)",
    "t.data = value": "t = value.detach()",
}


class _Tracer:
    """Records every op the dispatcher runs on this thread (``hooks._dispatch.tracer``).

    Gradient stops: a compiled plan differentiates every value that depends on a
    parameter through differentiable ops (``diff`` below tracks exactly that), while eager
    autograd stops at ``detach()`` and at ops run under ``no_grad()``. Where a recorded op
    reads a value that the plan would differentiate but eager does not (its
    ``requires_grad`` is off, or grad mode is), the op reads a ``stop_gradient`` of it
    instead; ``detach()`` itself records one. So the graph's gradients are eager's.

    In-place ops are recorded functionally (``inplace``): the out-of-place op runs through
    the dispatcher and the changed tensor is rebound to its result, so later reads see the
    new value. Tensors that share memory are tracked: a tensor is a view of a root
    tensor through a path of view ops (``alias``), a write through a view is written back
    into the root with the inverse ops, and the other views of the root are replayed from
    its new value when next read (``version``/``seen``). What a graph cannot express is
    refused with a ``TraceError`` naming the op (``_check_writable``).
    """

    def __init__(self, batch: int | None):
        self.batch = batch
        self.batch2 = None if batch is None else 2 * batch + 1
        self.ref: dict[int, tuple] = {}  # id(live tensor) -> ("in", i) | ("node", k)
        self.inputs: list[list] = []  # [name, role, tensor, spec at batch2]
        self.nodes: list[tuple] = []  # (op, input refs, attrs)
        self.spec2: dict[tuple, Spec] = {}
        self.diff: set[tuple] = set()  # refs a plan differentiates (Plan.requires)
        self.stops: dict[tuple, tuple] = {}  # ref -> ref of its stop_gradient node
        # Tensors are tracked while they live (a weak reference forgets one as it dies, so
        # that no id is reused), grouped by the array that owns their memory.
        self.live: dict[int, weakref.ref] = {}
        self.owner_of: dict[int, int] = {}  # id(tensor) -> id(memory owner)
        self.groups: dict[int, set[int]] = {}  # id(memory owner) -> ids of tensors
        self.alias: dict[int, tuple] = {}  # id(view) -> (root tensor, [(op, attrs)])
        self.version: dict[int, int] = {}  # id(root) -> in-place changes so far
        self.seen: dict[int, int] = {}  # id(view) -> its root's version at binding
        self.poisoned: dict[int, str] = {}  # id(tensor) -> why it cannot be read
        self.external: dict[int, str] = {}  # id(module buffer) -> its name
        # Module buffers changed in place: BUFFER inputs, whose final values are the
        # graph's buffer-update outputs. (name, tensor) in the module's buffer order.
        self.buffer_order: list[str] = []
        self.buffers: dict[str, object] = {}
        self.made: set[int] = set()  # ids of tensors the factories made
        self.made_inputs: set[int] = set()  # CONST inputs holding such a tensor
        # Memory that eager backward reads: (array, node, op) per memory owner, for the
        # inputs (and saved results) of the nodes eager autograd differentiates.
        self.saved: dict[int, list] = {}
        self.internal = 0  # > 0 while an in-place op records its functional form
        self.spelling: str | None = None  # the name an in-place op was called by (+=, sub_)

    def close(self) -> None:
        """Stop tracking tensors (the graph is built from ``inputs`` and ``nodes``)."""
        for d in (
            self.live,
            self.owner_of,
            self.groups,
            self.alias,
            self.poisoned,
            self.external,
            self.made,
            self.saved,
            self.ref,
            self.buffers,
        ):
            d.clear()

    # -- tensors and their memory ------------------------------------------------------------
    def _track(self, t) -> None:
        key = id(t)
        if key in self.live:
            return
        self.live[key] = weakref.ref(t, functools.partial(self._forget, key))
        owner = id(_memory_owner(t._data))
        self.owner_of[key] = owner
        self.groups.setdefault(owner, set()).add(key)

    def _forget(self, key: int, _dead=None) -> None:
        for d in (
            self.live,
            self.ref,
            self.alias,
            self.version,
            self.seen,
            self.poisoned,
            self.external,
        ):
            d.pop(key, None)
        self.made.discard(key)
        owner = self.owner_of.pop(key, None)
        group = self.groups.get(owner)
        if group is not None:
            group.discard(key)
            if not group:
                del self.groups[owner]

    def _bind(self, t, ref: tuple) -> None:
        self.ref[id(t)] = ref
        self._track(t)

    def _sharing(self, t) -> list:
        """The other live tracked tensors whose memory overlaps ``t``'s."""
        out = []
        for key in list(self.groups.get(self.owner_of.get(id(t)), ())):
            other = self.live[key]() if key in self.live else None
            if other is not None and other is not t and _overlap(other._data, t._data):
                out.append(other)
        return out

    def add_input(self, name: str, role: int, t, shape2: tuple) -> tuple:
        ref = ("in", len(self.inputs))
        if id(t) in self.made:
            self.made_inputs.add(len(self.inputs))
        self.inputs.append([name, role, t])
        self._bind(t, ref)
        self.spec2[ref] = Spec(tuple(shape2), t.dtype)
        if role == PARAM:
            self.diff.add(ref)
        return ref

    def lookup(self, t) -> tuple:
        key = id(t)
        if key in self.poisoned:
            raise TraceError(self.poisoned[key])
        ref = self.ref.get(key)
        if ref is None:
            return self.add_input(None, CONST, t, t.shape)
        if self.version and key in self.alias:
            root, _path = self.alias[key]
            if self.seen[key] != self.version.get(id(root), 0):
                ref = self._replay(t)
        return ref

    def _replay(self, t) -> tuple:
        """Rebind a view whose root changed in place: its view ops applied to the root's
        current value."""
        root, path = self.alias[id(t)]
        cur = root
        for op, attrs in path:
            cur = op(cur, **attrs)
        ref = self.lookup(cur)
        self.ref[id(t)] = ref
        self.seen[id(t)] = self.version.get(id(root), 0)
        return ref

    # -- recording ---------------------------------------------------------------------------
    def record(self, op: Op, inputs, attrs: dict, result) -> None:
        refs = [self.lookup(t) for t in inputs]
        floating = result.dtype.is_floating_point
        if op.differentiable and floating:
            grad_mode = is_grad_enabled()
            refs = [
                self._stopped(r) if r in self.diff and not (grad_mode and t.requires_grad) else r
                for r, t in zip(refs, inputs)
            ]
        elif op.name == STOP_GRADIENT and refs[0] not in self.diff:
            # Detaching what carries no gradient anyway (data, constants): nothing to stop.
            self._bind(result, refs[0])
            self._note_view(op, {}, inputs, result)
            return
        attrs = dict(attrs)
        k = len(self.nodes)
        if self.batch is not None:
            attrs = self._batch_free(op, k, refs, inputs, attrs, result)
        ref = ("node", k)
        self.nodes.append((op, refs, attrs))
        self._bind(result, ref)
        if op.differentiable and floating and any(r in self.diff for r in refs):
            self.diff.add(ref)
            if result.grad_fn is not None and not self.internal:
                # Eager backward keeps these inputs (and the result, if its vjp reads it).
                for t in inputs:
                    self._save(t._data, k, op.name)
                if op.saves_out:
                    self._save(result._data, k, op.name)
        self._note_view(op, attrs, inputs, result)

    def _save(self, array, k: int, name: str) -> None:
        self.saved.setdefault(id(_memory_owner(array)), []).append((array, k, name))

    def _note_view(self, op: Op, attrs: dict, inputs, result) -> None:
        """Remember that ``result`` shares memory with an input: how to replay it from its
        root. ``detach_()`` records its stop on the tensor itself: a step of its own path."""
        if not inputs:
            return
        if result is inputs[0]:
            entry = self.alias.get(id(result))
            if entry is not None:
                self.alias[id(result)] = (entry[0], entry[1] + [(op, attrs)])
            return
        for i, t in enumerate(inputs):
            if _may_overlap(result._data, t._data):
                root, path = self.alias.get(id(t), (t, []))
                # A step that is not a view op of the first input cannot be replayed.
                path = path + [(op, attrs if i == 0 and op.name in _VIEW_OPS else None)]
                if (
                    self.ref[id(t)] in self.diff
                    and self.ref[id(result)] not in self.diff
                    and op.name != STOP_GRADIENT
                ):
                    # Read through a stop (under no_grad): replays must stop there too.
                    path.append((REGISTRY[STOP_GRADIENT], {}))
                self.alias[id(result)] = (root, path)
                self.seen[id(result)] = self.version.get(id(root), 0)
                return

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
        batched = (
            bool(specs2) and len(specs2[0].shape) > 0 and specs2[0].shape[0] != inputs[0].shape[0]
        )
        B = self.batch
        if op.name in ("reshape", "expand") and batched and B > 1:
            shape = list(attrs["shape"])
            out = list(result.shape)
            lead = len(shape) - inputs[0].ndim
            if (
                op.name == "reshape"
                and shape
                and shape[0] == B
                and out[0] == B
                and inputs[0].shape[0] == B
            ):
                # x.reshape(x.shape[0], -1) recorded the batch size: keep it in front.
                attrs["shape"] = [-1] + out[1:]
            elif op.name == "expand" and lead >= 0 and shape[lead] == B:
                attrs["shape"] = shape[:lead] + [-1] + shape[lead + 1 :]
        elif op.name == "reshape" and specs2 and B > 1:
            # The batch deeper than dim 0 (h_n[-1] of an LSTM's (layers, N, H)): a reshape
            # that keeps that axis whole keeps it free.
            shape2 = specs2[0].shape
            attrs["shape"] = _batch_axis_kept(inputs[0].shape, shape2, result.shape, attrs["shape"])
        elif (
            op.name == "slice"
            and batched
            and B > 1
            and attrs["starts"][:1] == [0]
            and attrs["stops"][:1] == [B]
            and attrs["steps"][:1] == [1]
        ):
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
                    f"batch_dim=False for a fixed batch size."
                )
            attrs = candidate
        if op.name == "slice" and specs2 and B > 1:
            attrs = _whole_batch_axes_to_end(inputs[0].shape, specs2[0].shape, attrs)
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
            role = ROLE_NAMES.get(self.inputs[r[1]][1]) if r[0] == "in" else None
            parts.append(
                f"{name or 'a constant'}{' (' + role + ')' if role else ''} "
                f"of shape {tuple(t.shape)}"
            )
        return (
            f"node {k} ({op.name}) bakes in the batch size {self.batch}: traced at batch "
            f"size {self.batch} it fails at batch size {self.batch2} ({err}). Inputs: "
            f"{'; '.join(parts)}. Write shapes relative to the batch: x.flatten(1) or "
            f"x.reshape(-1, ...) instead of x.reshape({self.batch}, ...), "
            f"zeros_like(x) instead of zeros({self.batch}, ...); or trace with "
            f"batch_dim=False for a fixed batch size."
        )

    # -- in-place ops --------------------------------------------------------------------------
    @contextlib.contextmanager
    def spelled(self, name: str):
        """Name the in-place op being run ``name`` in errors (``+=`` runs ``add_``); an
        outer name wins (``-=`` runs ``sub_``, which runs ``add_``)."""
        outer = self.spelling
        self.spelling = outer or name
        try:
            yield
        finally:
            self.spelling = outer

    def inplace(
        self, name: str, target, new_value: Callable, mutate: Callable, recorded: bool = False
    ) -> None:
        """Record the in-place op ``name`` on ``target`` functionally.

        ``new_value(target)`` computes the changed value out of place, through the
        dispatcher; ``mutate()`` changes the array as eager code does (with tracing off).
        The new value is written back through the views that ``target`` is of, the eager
        change is checked to give the same bits, and ``target`` and its root are rebound.
        Raises ``TraceError`` naming the op where a graph cannot do what eager code does.
        ``recorded``: eager autograd records the op (grad mode, on a tensor with a history),
        so the gradient follows the new value, as in the graph.
        """
        name = self.spelling or name
        hint = _OUT_OF_PLACE.get(name, "t = <the out-of-place op>(t, ...)")
        self.lookup(target)  # tracked from here on: a CONST if never seen
        root, path = self.alias.get(id(target), (target, []))
        others = self._sharing(target)
        if id(root) in self.external:  # the buffer itself, or a view of it, changes
            self._to_buffer_input(root)
        keeps_gradient = self._check_writable(name, hint, target, path, others, recorded)
        for t in (target, *others):
            self._snapshot(t)
        self.internal += 1
        try:
            with enable_grad() if keeps_gradient else contextlib.nullcontext():
                new = new_value(target)
                if new.dtype is not target.dtype:
                    new = new.to(target.dtype)
            if _may_overlap(new._data, target._data):
                new = new.clone()  # the check below must see the traced value
            full = self._write_back(root, path, new) if path else new
        finally:
            self.internal -= 1
        mutate()
        if not _same_bits(new._data, target._data) or (
            full is not new and not _same_bits(full._data, root._data)
        ):
            raise TraceError(
                f"`{name}`: its traced, out-of-place form gives other values than "
                f"the in-place op (shape {tuple(target.shape)}, dtype "
                f"{target.dtype}); write it out of place: `{hint}`."
            )
        version = self.version.get(id(root), 0) + 1
        self.version[id(root)] = version
        self._bind(root, self.lookup(full))
        if target is not root:
            self._bind(target, self.lookup(new))
            self.seen[id(target)] = version
        for t in others:
            entry = self.alias.get(id(t))
            if t is not root and (
                entry is None or entry[0] is not root or not _replayable(entry[1])
            ):
                self.poisoned[id(t)] = (
                    f"a tensor read after `{name}` shares memory with the tensor that it "
                    f"changed in place, but through an op the tracer cannot replay as a view, "
                    f"so a graph cannot give it its new value. Copy it first "
                    f"(`t = t.clone()`) or write the change out of place: `{hint}`."
                )

    def created(self, t) -> None:
        """A tensor a factory (``zeros``, ``tensor`` ...) made inside the traced function:
        changing it in place changes nothing outside, unlike a tensor from outside."""
        self._track(t)
        self.made.add(id(t))

    def watch_buffer(self, name: str, t) -> None:
        """A module buffer: read, it is a constant; changed in place (BatchNorm's running
        statistics in train mode), a BUFFER input whose new value is an output."""
        self._track(t)
        self.external[id(t)] = name
        self.buffer_order.append(name)

    def _to_buffer_input(self, t) -> None:
        """Make the module buffer ``t``, about to change in place, a BUFFER input (it was a
        CONST input, or not read yet): each call supplies its value, and the graph
        returns its new one."""
        name = self.external[id(t)]
        ref = self.lookup(t)
        entry = self.inputs[ref[1]] if ref[0] == "in" else None
        if entry is None or entry[1] != CONST or entry[2] is not t:
            raise TraceError(
                f"the module's buffer {name!r} is changed in place after being replaced "
                f"or changed some other way; the tracer cannot follow it. Update it with "
                f"in-place ops only (`buffer.mul_(...)`, `buffer.add_(...)`)."
            )
        entry[0], entry[1] = name, BUFFER
        del self.external[id(t)]
        self.buffers[name] = t

    def set_data(self, t, value, assign: Callable) -> None:
        """``t.data = value``: ``t`` reads ``value`` from now on, without its gradient."""
        name = "t.data = value"
        hint = _OUT_OF_PLACE[name]
        self.lookup(t)
        self._check_writable(name, hint, t, [], [])
        if self._sharing(t):
            # Its views would keep the old memory, which the tracer knows as ``t``'s.
            raise TraceError(
                f"`{name}` rebinds a tensor that shares its memory with others "
                f"(views of it, or what it is a view of); a graph cannot follow "
                f"that. Write it out of place: `{hint}`."
            )
        source = value if isinstance(value, Tensor) else Tensor._wrap(value)
        view = REGISTRY[STOP_GRADIENT](source)  # value's memory, without its gradient
        assign()
        self._forget(id(t))  # its memory changed: track it anew
        self._bind(t, self.lookup(view))
        if id(view) in self.alias:
            self.alias[id(t)] = self.alias[id(view)]
            self.seen[id(t)] = self.seen[id(view)]

    def _check_writable(
        self, name: str, hint: str, target, path: list, others: list, recorded: bool = False
    ) -> bool:
        """Raise ``TraceError`` where the graph cannot follow the in-place op; return whether
        the changed tensor keeps its gradient path (an additive op, see ``_ADDITIVE``)."""
        for t in (target, *others):
            ref = self.ref.get(id(t))
            via = "" if t is target else ", through a tensor sharing its memory,"
            if ref is not None and ref[0] == "in" and self.inputs[ref[1]][1] in (PARAM, DATA):
                input_name, role = self.inputs[ref[1]][:2]
                whose = "parameters" if role == PARAM else "data"
                raise TraceError(
                    f"`{name}` would change{via} the {ROLE_NAMES[role]} input {input_name!r} "
                    f"in place: a graph cannot write to its inputs, and eager code would "
                    f"change the caller's {whose} on every call. Write it out of place "
                    f"(`{hint}`), on a copy (`t = t.clone()`) if later code must see the "
                    f"change."
                )
            if id(t) in self.external:
                raise TraceError(
                    f"`{name}` would change{via} the module's buffer {self.external[id(t)]!r} "
                    f"in place: a graph does not write back to the module, so every call "
                    f"would start from the value seen while tracing, while eager code changes "
                    f"it on every call. Compute the new value out of place (`{hint}`) and "
                    f"update the buffer outside the traced function."
                )
            if (
                ref is not None
                and ref[0] == "in"
                and ref[1] not in self.made_inputs
                and self.inputs[ref[1]][1] != BUFFER
            ):
                raise TraceError(
                    f"`{name}` would change{via} in place a tensor that the traced function "
                    f"did not make (a global or captured tensor, or one made with "
                    f"from_numpy(), as_tensor() or Tensor() over an existing array): a graph "
                    f"holds it as a constant and cannot carry the change from one call to "
                    f"the next, as eager code would. Change a copy made inside the function "
                    f"(`t = t.clone()`) or write it out of place: `{hint}`."
                )
        for array, k, op_name in self.saved.get(self.owner_of.get(id(target)), ()):
            if _overlap(array, target._data):
                raise TraceError(
                    f"`{name}` changes in place a value that an earlier {op_name} (traced node "
                    f"{k}) used on the way to a gradient: eager backward would read the changed "
                    f"value for that node's gradient (torch raises 'modified by an inplace "
                    f"operation' here). Write it out of place (`{hint}`), or change a copy "
                    f"(`t = t.clone()`)."
                )
        keeps_gradient = self.ref[id(target)] in self.diff
        if keeps_gradient and not recorded and (name not in _ADDITIVE or path):
            raise TraceError(
                f"`{name}` changes in place a tensor whose value depends on the parameters "
                f"through differentiable ops: eager autograd keeps sending its gradient through "
                f"the old value, as if the change had not happened, and a graph cannot express "
                f"that (it can for `+=`, `-=`, add_ and sub_ on a tensor that is not a view). "
                f"Write it out of place (`{hint}`), so that the gradient follows the new "
                f"value, or change a detached copy (`t = t.detach().clone()`)."
            )
        for t in others:
            if self.ref.get(id(t)) in self.diff:
                raise TraceError(
                    f"`{name}` changes memory that a tensor y depending on the parameters "
                    f"shares (`y.detach()`, `y.data` and views of y share y's memory), so eager "
                    f"code would change y behind autograd's back, which a graph cannot express. "
                    f"Change a copy (`d = y.detach().clone()`) or write it out of place: "
                    f"`{hint}`."
                )
        blocked = [op.name for op, attrs in path if attrs is None or op.name not in _WRITABLE_VIEWS]
        if blocked:
            what = "a read-only broadcast" if blocked[0] == "expand" else "not a view it inverts"
            raise TraceError(
                f"`{name}` writes through a view made by {blocked[0]} ({what}), which the "
                f"tracer cannot write back into the tensor it views. Copy it first "
                f"(`t = t.clone()`) or write it out of place: `{hint}`."
            )
        return keeps_gradient

    def _snapshot(self, t) -> None:
        """A CONST input keeps the value it had when first read, not the changed one."""
        ref = self.ref.get(id(t))
        if ref is not None and ref[0] == "in":
            entry = self.inputs[ref[1]]
            if entry[1] == CONST and entry[2] is t:
                entry[2] = Tensor._wrap(t._data.copy())

    def _write_back(self, root, path: list, new):
        """``root``'s value with the view at the end of ``path`` replaced by ``new``: each
        view op undone in turn (a slice becomes ``index_put``s into its base)."""
        bases = [root]
        for op, attrs in path[:-1]:
            bases.append(op(bases[-1], **attrs))
        for (op, attrs), base in zip(reversed(path), reversed(bases)):
            if op.name == "reshape":
                new = F.reshape(new, self._free_shape(base))
            elif op.name == "permute":
                n = len(attrs["dims"])
                inverse = [0] * n
                for i, d in enumerate(attrs["dims"]):
                    inverse[d % n] = i
                new = F.permute(new, inverse)
            elif op.name == "slice":
                new = F._slice_put(base, new, attrs["starts"], attrs["stops"], attrs["steps"])
            elif op.name == "flip":
                new = F.flip(new, attrs["dims"])
            # stop_gradient and to_device (to the same device) keep the memory as it is
        return new

    def _free_shape(self, t) -> list:
        """``t``'s shape with its batch dimension, if any, as -1."""
        shape = list(t.shape)
        if self.batch is not None:
            shape2 = self.spec2[self.lookup(t)].shape
            free = [d for d, (a, b) in enumerate(zip(shape, shape2)) if a != b]
            if len(free) > 1:
                raise TraceError(
                    f"cannot write through a reshape of a tensor of shape "
                    f"{tuple(shape)} with more than one batch-dependent "
                    f"dimension; trace with batch_dim=False"
                )
            for d in free:
                shape[d] = -1
        return shape


def _memory_owner(array):
    """The object that owns ``array``'s memory (the end of its chain of bases)."""
    while getattr(array, "base", None) is not None:
        array = array.base
    return array


def _may_overlap(a, b) -> bool:
    """Whether two arrays' memory bounds overlap (cheap; exact for plain views)."""
    if type(a) is np.ndarray and type(b) is np.ndarray:
        return np.may_share_memory(a, b)
    xp = backend.xp_of(a)
    return xp is backend.xp_of(b) and bool(xp.may_share_memory(a, b))


def _overlap(a, b) -> bool:
    """Whether two arrays share an element (``x[:, 0]`` and ``x[:, 1]`` do not)."""
    if not _may_overlap(a, b):
        return False
    try:
        return bool(backend.xp_of(a).shares_memory(a, b, max_work=100_000))
    except Exception:  # too hard to decide: assume they do
        return True


def _replayable(path: list) -> bool:
    return all(attrs is not None for _op, attrs in path)


def _same_bits(a, b) -> bool:
    a, b = backend.to_numpy(a), backend.to_numpy(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return np.array_equal(
        np.ascontiguousarray(a).reshape(-1).view(np.uint8),
        np.ascontiguousarray(b).reshape(-1).view(np.uint8),
    )


def _as_tensor(x):
    return x if isinstance(x, Tensor) else as_tensor(x)


def trace(
    fn: Callable,
    params,
    *data,
    data_names: Sequence[str] | None = None,
    batch_dim: bool = True,
    output_names: Sequence[str] | None = None,
) -> graph_pb2.Graph:
    """Run ``fn(params, *data)`` once and record every op it runs into a ``Graph``.

    ``params`` is an ``nn.Module`` (its ``named_parameters()`` become PARAM inputs; ``fn``
    receives the module) or a dict name -> Tensor (``fn`` receives a dict of tensors that
    share the values and require grad). ``data`` are Tensors or arrays, the DATA inputs,
    named by ``data_names`` (default ``x0``, ``x1``, ...); with ``batch_dim`` their first
    dimension becomes -1 (any batch size; they must then agree on it). Any other tensor the
    ops meet (the 2.0 of ``x ** 2``, a buffer only read) becomes a CONST input carrying its
    value.

    Module buffers that ``fn`` changes in place (BatchNorm's running statistics and
    ``num_batches_tracked`` in train mode) become BUFFER inputs named by the buffer's
    name, and their new values buffer-update outputs (``Output.buffer``, named after the
    buffer, after the other outputs in the module's buffer order): the graph computes the
    update out of place, and whoever runs it writes the new value back. The module itself
    is left as it was: tracing does not move its running statistics.

    ``fn`` returns the loss (a floating scalar) or ``(loss, {"name": tensor, ...})`` for
    extra outputs. Ops that do not contribute to an output are dropped. Gradient stops
    are kept: ``detach()`` and ops run under ``no_grad()`` on values that depend on the
    parameters leave ``stop_gradient`` nodes, so the graph's gradients are those of
    ``fn(...).backward()``. The module's ``.grad``s and ``requires_grad`` flags are left
    as they were. In-place ops (``add_``, ``+=``, ``t[index] = value`` ...) are recorded as
    their out-of-place forms, through views too (``_Tracer.inplace``); where a graph cannot
    do what the in-place op does eagerly (change a parameter or data input, change a value
    that carries a gradient other than by adding to it), ``TraceError`` names the op and
    its out-of-place form. Thread-safe: the hook is per thread. With ``batch_dim`` the
    function runs twice (see the module docstring); ``TraceError`` where the batch size
    would be baked into the graph.
    """

    data_t = [_as_tensor(d) for d in data]
    names = list(data_names) if data_names is not None else [f"x{i}" for i in range(len(data))]
    if len(names) != len(data_t):
        raise TraceError(f"trace: {len(data_t)} data inputs but {len(names)} data_names")
    batch = None
    if batch_dim:
        sizes = {n: t.shape[0] for n, t in zip(names, data_t) if t.ndim > 0}
        if len(set(sizes.values())) > 1:
            raise TraceError(
                f"trace: data inputs disagree on the batch size {sizes}; pass "
                f"batch_dim=False if the first dimension is not the batch"
            )
        batch = next(iter(sizes.values()), None)

    module = hasattr(params, "named_parameters") and callable(params.named_parameters)
    if module:
        named = list(params.named_parameters())
        arg = params
    else:
        named = [
            (str(n), t if isinstance(t, Tensor) else _as_tensor(t)) for n, t in dict(params).items()
        ]
        for n, t in named:
            if not t.dtype.is_floating_point:
                raise TraceError(
                    f"trace: parameter {n!r} has dtype {t.dtype}; parameters "
                    f"must be floating point (pass integer tensors as data)"
                )
        named = [(n, Tensor._wrap(t._data, True)) for n, t in named]
        arg = dict(named)

    graph = _trace_once(fn, arg, named, names, data_t, batch)
    if batch:
        # Trace again at another batch size: whatever differs (a constant such as the
        # divisor of x.mean() over the batch, an attribute) baked the batch size in.
        b2 = 2 * batch + 1
        tiled = [
            t if t.ndim == 0 else _as_tensor(np.take(np.asarray(t), np.arange(b2) % batch, axis=0))
            for t in data_t
        ]
        graph2 = _trace_once(fn, arg, named, names, tiled, b2)
        graph = _reconcile(graph, graph2, batch, b2)
    return graph


def _trace_once(fn, arg, named, names, data_t, batch) -> graph_pb2.Graph:
    tracer = _Tracer(batch)
    for n, p in named:
        tracer.add_input(n, PARAM, p, p.shape)
    for n, t in zip(names, data_t):
        shape2 = (tracer.batch2,) + tuple(t.shape[1:]) if batch is not None and t.ndim else t.shape
        tracer.add_input(n, DATA, t, shape2)
    buffers = list(arg.named_buffers()) if hasattr(arg, "named_buffers") else []
    for n, b in buffers:
        tracer.watch_buffer(n, b)
    # Running fn changes the buffers in place as eager code does: put them back after.
    saved_buffers = [(b, b._data.copy()) for _, b in buffers]

    saved_flags = [(p, p.requires_grad) for _, p in named]
    prev = getattr(_dispatch, "tracer", None)
    _dispatch.tracer = tracer
    try:
        try:
            for p, _ in saved_flags:
                p.requires_grad = True  # every op on a parameter must be recorded
            with enable_grad():
                result = fn(arg, *data_t)
            # Still tracing: reading an output may replay views of a tensor changed in place.
            outputs = _output_refs(tracer, result)
            buffer_outputs = _buffer_output_refs(tracer, outputs)
        finally:
            _dispatch.tracer = prev
            for p, flag in saved_flags:
                p.requires_grad = flag
            for b, value in saved_buffers:
                b._data[...] = value
        return _build(tracer, outputs, buffer_outputs)
    finally:
        tracer.close()  # drops the weak references, whose callbacks hold the tracer


def _output_refs(tracer: _Tracer, result) -> list:
    """(name, ref) of what ``fn`` returned: the loss, or ``(loss, {name: tensor})``."""

    if isinstance(result, tuple):
        if len(result) != 2 or not isinstance(result[1], Mapping):
            raise TraceError("trace: fn must return the loss or (loss, {name: tensor})")
        loss, extra = result
    else:
        loss, extra = result, {}
    if not isinstance(loss, Tensor) or loss.ndim != 0 or not loss.dtype.is_floating_point:
        what = (
            f"shape {tuple(loss.shape)} and dtype {loss.dtype}"
            if isinstance(loss, Tensor)
            else type(loss).__name__
        )
        raise TraceError(
            f"trace: the loss must be a floating scalar Tensor, got {what}; "
            f"reduce it with .mean() or .sum()"
        )
    outs = [(LOSS, loss)]
    for name, t in extra.items():
        if not isinstance(t, Tensor):
            raise TraceError(f"trace: output {name!r} is a {type(t).__name__}, not a Tensor")
        if name == LOSS:
            raise TraceError(f"trace: output name {LOSS!r} is reserved for the loss")
        outs.append((str(name), t))
    return [(n, tracer.lookup(t)) for n, t in outs]


def _buffer_output_refs(tracer: _Tracer, outputs: list) -> list:
    """(name, ref) of the new value of each buffer changed in place, in module order."""
    taken = {name for name, _ in outputs}
    out = []
    for name in tracer.buffer_order:
        t = tracer.buffers.get(name)
        if t is None:
            continue
        if name in taken:
            raise TraceError(
                f"trace: output {name!r} has the name of a buffer the function updates, "
                f"whose new value is an output of that name; rename the output"
            )
        out.append((name, tracer.lookup(t)))
    return out


def _consumer(g: graph_pb2.Graph, value: int) -> str:
    for k, node in enumerate(g.nodes):
        if value in node.inputs:
            return f"node {k} ({node.op})"
    return "an output"


def _const_value(inp) -> np.ndarray:
    return from_proto(inp.value)


def _reconcile(g1: graph_pb2.Graph, g2: graph_pb2.Graph, b1: int, b2: int) -> graph_pb2.Graph:
    """``g1`` made batch-size free after comparing it with ``g2``, the same function traced
    at batch size ``b2``; raises TraceError where the batch size is baked in."""
    advice = (
        "Write shapes and counts relative to the batch (x.flatten(1), "
        "x.reshape(-1, ...), zeros_like(x)), or trace with batch_dim=False for a "
        "fixed batch size."
    )
    ops1, ops2 = [n.op for n in g1.nodes], [n.op for n in g2.nodes]
    if (
        ops1 != ops2
        or len(g1.inputs) != len(g2.inputs)
        or [list(n.inputs) for n in g1.nodes] != [list(n.inputs) for n in g2.nodes]
        or list(g1.outputs) != list(g2.outputs)
    ):
        k = next(
            (
                k
                for k, (a, b) in enumerate(zip(g1.nodes, g2.nodes))
                if a.op != b.op or list(a.inputs) != list(b.inputs)
            ),
            min(len(ops1), len(ops2)),
        )
        raise TraceError(
            f"the traced function runs different ops at batch sizes {b1} and "
            f"{b2} (from node {k} on): its structure depends on the batch size. " + advice
        )
    counts: dict[int, tuple[int, int]] = {}
    for i, (a, b) in enumerate(zip(g1.inputs, g2.inputs)):
        if a == b:
            continue
        if (
            a.role == CONST
            and b.role == CONST
            and not a.shape
            and not b.shape
            and a.dtype == b.dtype
            and dtype_of(a.dtype) is not dtypes.bool_
        ):
            count = _batch_count(float(_const_value(a)), float(_const_value(b)), b1, b2)
            if count is not None:
                counts[i] = count
                continue
        what = (
            f"constant of shape {list(a.shape)}"
            if a.role == CONST
            else f"{ROLE_NAMES.get(a.role)} input {a.name!r}"
        )
        raise TraceError(
            f"a {what} read by {_consumer(g1, i)} depends on the batch size: it "
            f"differs between traces at batch sizes {b1} and {b2}. " + advice
        )
    for k, (a, b) in enumerate(zip(g1.nodes, g2.nodes)):
        if a.attrs == b.attrs:
            continue
        random = is_random(REGISTRY[a.op])
        for x, y in zip(a.attrs, b.attrs):
            if x != y and not (random and x.name == "seed"):
                raise TraceError(
                    f"node {k} ({a.op}) attribute {x.name} depends on the batch "
                    f"size: traced at batch sizes {b1} and {b2} it differs "
                    f"({_attr_text(x)} vs {_attr_text(y)}). " + advice
                )
    return _count_batch(g1, counts) if counts else g1


def _batch_count(v1: float, v2: float, b1: int, b2: int) -> tuple[int, int] | None:
    """``(m, c)`` where the constant is ``batch * m - c`` at both batch sizes: a count of m
    elements per sample (the divisor of a mean over the batch), less a correction c (the
    n - 1 of an unbiased variance); None for anything else."""
    if v1 != round(v1) or v2 != round(v2) or v1 <= 0:
        return None
    v1, v2 = int(v1), int(v2)
    if (v2 - v1) % (b2 - b1):
        return None
    m = (v2 - v1) // (b2 - b1)
    c = b1 * m - v1
    return (m, c) if m >= 1 and 0 <= c <= 1 else None


def _attr_text(a) -> str:
    which = a.WhichOneof("value")
    v = getattr(a, which) if which else None
    return str(list(v.values)) if which in ("ints", "floats") else repr(v)


def _count_batch(g: graph_pb2.Graph, counts: dict[int, tuple[int, int]]) -> graph_pb2.Graph:
    """Replace CONST inputs that hold ``batch * m - c`` (x.mean() over the batch divides by
    ``batch * m``, x.var() by one less) with nodes that count it from a DATA input at run
    time.

    The count is exact in float64 and then cast to the constant's dtype, which rounds as
    the eager ``float(count)`` constant did: results stay bitwise equal to eager.
    """
    batched = [i for i, inp in enumerate(g.inputs) if inp.role == DATA and inp.shape[:1] == [-1]]
    if not batched:
        raise TraceError(
            "a constant depends on the batch size, but no DATA input has a batch dimension"
        )
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
    for m in sorted({m for m, _ in counts.values()} - {1}):
        multiples[m] = _add_count_const(out, taken, f"count{m}", m)
    if any(c for _, c in counts.values()):
        one = _add_count_const(out, taken, "one", 1)
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
    for i, (m, c) in counts.items():
        v = batch if m == 1 else node("mul", [batch, multiples[m]])
        if c:
            v = node("sub", [v, one])
        dt = dtype_of(g.inputs[i].dtype)
        value_of[i] = v if dt is dtypes.float64 else node("cast", [v], dtype=dt.name)
    shift = n_in + len(out.nodes) - len(g.inputs)

    def remap(v: int) -> int:
        if v >= len(g.inputs):
            return v + shift
        return value_of[v] if v in value_of else new_index[v]

    for n in g.nodes:
        out.nodes.add(op=n.op, inputs=[remap(v) for v in n.inputs], attrs=n.attrs)
    for o in g.outputs:
        kept = out.outputs.add()
        kept.CopyFrom(o)
        kept.value = remap(o.value)
    return out


def _add_count_const(g: graph_pb2.Graph, taken: set, stem: str, value: int) -> int:
    """Add a float64 scalar CONST input named ``stem`` (or ``stem_1`` ...); its index."""
    name, j = stem, 0
    while name in taken:
        j += 1
        name = f"{stem}_{j}"
    taken.add(name)
    proto = to_proto(np.float64(value))
    g.inputs.add(name=name, role=CONST, dtype=proto.dtype, value=proto)
    return len(g.inputs) - 1


def _build(tracer: _Tracer, outputs: list, buffer_outputs: list = ()) -> graph_pb2.Graph:
    """The Graph of the recorded ops that lead to an output, numbered canonically."""
    live_nodes: set[int] = set()
    live_inputs: set[int] = set(i for i, inp in enumerate(tracer.inputs) if inp[1] != CONST)
    stack = [ref for _, ref in list(outputs) + list(buffer_outputs)]
    while stack:
        kind, idx = stack.pop()
        if kind == "in":
            live_inputs.add(idx)
        elif idx not in live_nodes:
            live_nodes.add(idx)
            stack.extend(tracer.nodes[idx][1])
    # PARAM and DATA inputs first, in the order given, then buffers in the module's
    # order, then constants as first met.
    position = {name: k for k, name in enumerate(tracer.buffer_order)}
    buffers = sorted(
        (i for i, inp in enumerate(tracer.inputs) if inp[1] == BUFFER),
        key=lambda i: position[tracer.inputs[i][0]],
    )
    order = (
        [i for i, inp in enumerate(tracer.inputs) if inp[1] in (PARAM, DATA)]
        + buffers
        + [i for i, inp in enumerate(tracer.inputs) if inp[1] == CONST and i in live_inputs]
    )
    number = {("in", i): v for v, i in enumerate(order)}
    g = graph_pb2.Graph(version=GRAPH_VERSION)
    taken = {tracer.inputs[i][0] for i in order if tracer.inputs[i][0]}
    const_count = 0
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
    for name, ref in buffer_outputs:
        g.outputs.add(name=name, value=number[ref], buffer=name)
    return g
