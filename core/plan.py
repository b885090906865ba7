"""The compiled execution plan: a validated graph as a flat list of kernels over slots.

``compile_plan`` turns a ``ValidatedGraph`` and concrete data shapes into a ``Plan``. Slot
``v`` holds value ``v`` of the graph (inputs, then one per node). Forward kernels call each
op's ``forward(xp, *arrays, **attrs)`` on bare arrays with the attributes decoded once, at
compile time. Backward kernels reuse the registry's vjps (one place for each derivative):
they wrap the saved arrays in Tensors and run the vjp under the backward engine's own mode,
then reduce the gradients of broadcasting ops with the engine's ``unbroadcast``.

Bitwise equality with eager ``loss.backward()``: the backward kernels visit nodes in the
order of ``autograd.run_backward`` (its iterative depth-first topological order, over the
nodes that require grad when every parameter does), and sum the contributions to a value
in that same order, with the same ops. So a plan's gradients equal the eager engine's bit
for bit on the same backend.

Memory: every slot is freed (set to None) right after its last use, found at compile time:
a value lives until its last forward consumer, or until the last backward kernel whose vjp
reads it (the inputs of the op, and the output of ``saves_out`` ops); values that backward
will not need are freed during the forward pass. Only gradients that lead to the requested
parameters are computed.

Gradients as they become final: a requested parameter's gradient is complete after the
last backward kernel that adds into it (found at compile time, ``_Schedule.final_after``).
``run(on_grad=...)`` hands each one over at that moment, in ``Plan.grad_order``'s order
(the last layer's weights first for an MLP), so that a caller can send it while backward
goes on; ``run(on_forward=...)`` hands over the loss and outputs when the forward pass ends.

Randomness: a random op (one with an int ``seed`` attribute, e.g. ``dropout_mask``) at node
``k`` of a call with seed ``s`` uses ``graph.random_seed(s, k)``: the same call seed gives
the same masks on every worker and backend. Without a call seed the seeds recorded in the
graph are used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from . import autograd, cost, precision
from . import backend as backend_mod
from .graph import BUFFER, CONST, PARAM, GraphError, ValidatedGraph, is_random, random_seed
from .registry import Op
from .tensor import Tensor
from .unbroadcast import unbroadcast

__all__ = ["compile_plan", "Plan", "PlanResult", "BACKENDS"]

BACKENDS = ("cpu", "cuda")
CHECK_EVERY = 32  # kernels between two calls of run(check=...)


@dataclass
class PlanResult:
    """What ``Plan.run`` returns; arrays are NumPy whatever the backend."""

    loss: np.ndarray  # 0-d, after loss_scale
    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    forward_seconds: float
    backward_seconds: float
    # The new value of every buffer the graph updates (Output.buffer), by buffer name.
    buffers: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Forward:
    node: int  # node index in the graph
    out: int  # slot written
    forward: Callable
    inputs: tuple[int, ...]
    attrs: dict
    random: bool
    free: tuple[int, ...] = ()  # slots to release after this kernel
    op_name: str = ""


@dataclass
class _Backward:
    node: int
    out: int
    op: Op
    inputs: tuple[int, ...]
    needs_grad: tuple[bool, ...]  # per input: does its gradient reach a target?
    saves_out: bool
    free: tuple[int, ...] = ()
    attrs: dict = field(default_factory=dict)
    random: bool = False
    # Per input: wrapped with requires_grad (its gradient is needed and eager would track
    # it, so that the vjp skips the others as eager does), and the requested parameter it
    # is (None for any other value).
    wants: tuple[bool, ...] = ()
    params: tuple = ()


@dataclass
class _Schedule:
    forward: list[_Forward]
    backward: list[_Backward]
    grads: tuple[str, ...]
    outputs: tuple[str, ...]
    free_inputs: tuple[int, ...]  # slots never read (unused inputs)
    # Requested gradients that no backward kernel adds into (final before backward), and
    # per backward kernel index those whose last contribution it makes.
    final_before: tuple[str, ...] = ()
    final_after: dict = field(default_factory=dict)

    @property
    def grad_order(self) -> tuple[str, ...]:
        """The requested gradients in the order they become final during backward."""
        order = list(self.final_before)
        for j in sorted(self.final_after):
            order.extend(self.final_after[j])
        return tuple(order)


@dataclass
class Plan:
    """A graph compiled for one set of data shapes and one backend. Thread-safe to run."""

    graph: ValidatedGraph
    data_shapes: dict[str, tuple]
    backend: str
    specs: list  # concrete Spec of every value
    requires: list[bool]  # eager's requires_grad (see compile_plan)
    topo: list[int]  # eager backward's node order (node indices)
    _schedules: dict = field(default_factory=dict, repr=False)
    # Per graph input, what run() checks: (slot, role, name, shape, NumPy dtype).
    _inputs: tuple = field(init=False, repr=False)
    _loss: int = field(init=False, repr=False)  # the loss's slot

    def __post_init__(self) -> None:
        self._inputs = tuple(
            (i, inp.role, inp.name, tuple(self.specs[i].shape), self.specs[i].dtype.np)
            for i, inp in enumerate(self.graph.graph.inputs)
        )
        self._loss = self.graph.outputs[self.graph.graph.outputs[0].name]

    @property
    def graph_id(self) -> str:
        return self.graph.id

    # -- compile-time --------------------------------------------------------------------
    def schedule(
        self, grads: Sequence[str] | None = None, outputs: Sequence[str] = ()
    ) -> _Schedule:
        """The kernels for these requested gradients and outputs (cached)."""
        vg = self.graph
        grads = tuple(vg.params) if grads is None else tuple(grads)
        outputs = tuple(outputs)
        key = (grads, outputs)
        sched = self._schedules.get(key)
        if sched is None:
            sched = self._build(grads, outputs)
            self._schedules[key] = sched
        return sched

    def grad_order(
        self, grads: Sequence[str] | None = None, outputs: Sequence[str] = ()
    ) -> tuple[str, ...]:
        """The requested gradients in the order ``run(on_grad=...)`` hands them over: the
        order backward completes them (ties in the requested order). Known at compile
        time, so a streamed reply can announce them before computing anything."""
        return self.schedule(grads, outputs).grad_order

    def unused_gradients(
        self, grads: Sequence[str] | None = None, outputs: Sequence[str] = ()
    ) -> tuple[str, ...]:
        """The requested parameters the loss does not depend on: no gradient reaches them
        (``run`` gives zeros; PyTorch leaves their ``.grad`` None). Known at compile time."""
        loss_value = self.graph.outputs[self.graph.graph.outputs[0].name]
        return tuple(
            n
            for n in self.schedule(grads, outputs).final_before
            if self.graph.input_index[n] != loss_value
        )

    def _build(self, grads: tuple, outputs: tuple) -> _Schedule:
        vg = self.graph
        self._check_request(grads, outputs)
        n_in = vg.num_inputs
        loss = vg.outputs[vg.graph.outputs[0].name]
        targets = {vg.input_index[g] for g in grads}
        needed = self._needed(targets)
        # Buffer updates are always computed: like eager train mode, every call moves them.
        results = [loss] + [vg.outputs[o] for o in outputs] + list(vg.buffer_updates.values())
        live = self._live(results)
        backward_nodes = (
            [k for k in self.topo if needed[n_in + k] and live[n_in + k]] if targets else []
        )
        fwd_pos, frees, never = self._lifetimes(live, backward_nodes, results)
        n_fwd = len(fwd_pos)
        fwd = []
        for k, p in fwd_pos.items():
            op, a = vg.ops[k], vg.attrs[k]
            fwd.append(
                _Forward(
                    k,
                    n_in + k,
                    # float16/bfloat16 inputs: computed in float32, rounded once (core/precision.py)
                    precision.forward_of(
                        op, [self.specs[i] for i in vg.node_inputs[k]], self.specs[n_in + k]
                    ),
                    vg.node_inputs[k],
                    a,
                    is_random(op),
                    tuple(frees.get(p, ())),
                    op.name,
                )
            )
        bwd = []
        param_name = {vg.input_index[g]: g for g in grads}
        for j, k in enumerate(backward_nodes):
            op = vg.ops[k]
            ins = vg.node_inputs[k]
            bwd.append(
                _Backward(
                    k,
                    n_in + k,
                    op,
                    ins,
                    tuple(needed[i] for i in ins),
                    op.saves_out,
                    tuple(frees.get(n_fwd + j, ())),
                    vg.attrs[k],
                    is_random(op),
                    tuple(needed[i] and self.requires[i] for i in ins),
                    tuple(param_name.get(i) for i in ins),
                )
            )
        final_before, final_after = self._completion(bwd, grads, targets, loss)
        return _Schedule(fwd, bwd, grads, outputs, tuple(never), final_before, final_after)

    def _check_request(self, grads: tuple, outputs: tuple) -> None:
        vg = self.graph
        for name in grads:
            if name not in vg.params:
                raise GraphError(
                    f"gradients[{name}]",
                    f"not a PARAM input of the graph; its parameters are {vg.params}",
                )
        for name in outputs:
            if name not in vg.outputs:
                raise GraphError(
                    f"outputs[{name}]",
                    f"the graph has no output {name!r}; it has {list(vg.outputs)}",
                )

    def _needed(self, targets: set) -> list[bool]:
        """Per value: does its gradient lead to a requested parameter?"""
        vg = self.graph
        n_in = vg.num_inputs
        needed = [False] * (n_in + len(vg.ops))
        for v in targets:
            needed[v] = True
        for k, ins in enumerate(vg.node_inputs):
            needed[n_in + k] = self.requires[n_in + k] and any(needed[i] for i in ins)
        return needed

    def _live(self, results: list[int]) -> list[bool]:
        """Per value: does one of ``results`` (the loss, requested outputs) depend on it?"""
        vg = self.graph
        n_in = vg.num_inputs
        live = [False] * (n_in + len(vg.ops))
        stack = list(results)
        while stack:
            v = stack.pop()
            if not live[v]:
                live[v] = True
                if v >= n_in:
                    stack.extend(vg.node_inputs[v - n_in])
        return live

    def _lifetimes(
        self, live: list[bool], backward_nodes: list[int], results: list[int]
    ) -> tuple[dict[int, int], dict[int, list[int]], list[int]]:
        """Where each slot is last used: (forward position of each live node, the slots
        freed after each kernel position, inputs never read)."""
        vg = self.graph
        n_in = vg.num_inputs
        n_values = n_in + len(vg.ops)
        n_fwd = sum(live[n_in:])
        end = n_fwd + len(backward_nodes)
        last = [-1] * n_values  # position of the last kernel reading a slot
        pos = 0
        fwd_pos = {}
        for k, ins in enumerate(vg.node_inputs):
            if not live[n_in + k]:
                continue
            fwd_pos[k] = pos
            for i in ins:
                last[i] = max(last[i], pos)
            last[n_in + k] = max(last[n_in + k], pos)  # written here
            pos += 1
        for j, k in enumerate(backward_nodes):
            p = n_fwd + j
            for i in vg.node_inputs[k]:
                last[i] = max(last[i], p)
            if vg.ops[k].saves_out:
                last[n_in + k] = max(last[n_in + k], p)
        for v in results:
            last[v] = end  # read when the result is assembled
        frees: dict[int, list[int]] = {}
        never = []
        for v in range(n_values):
            if last[v] == end:
                continue
            if last[v] < 0:
                if v < n_in:
                    never.append(v)
                continue
            frees.setdefault(last[v], []).append(v)
        return fwd_pos, frees, never

    def _completion(
        self, bwd: list, grads: tuple, targets: set, loss: int
    ) -> tuple[tuple, dict[int, tuple]]:
        """When each requested gradient is complete: after the last backward kernel that
        can add into it (a parameter input whose gradient is needed), else before backward."""
        vg = self.graph
        last_add: dict[int, int] = {}
        for j, kern in enumerate(bwd):
            for v, need in zip(kern.inputs, kern.needs_grad):
                if need and v in targets:
                    last_add[v] = j
        if loss < vg.num_inputs:
            last_add = {}  # the loss is a parameter: no kernel runs
        final_before = tuple(g for g in grads if vg.input_index[g] not in last_add)
        final_after: dict[int, tuple] = {}
        for g in grads:
            j = last_add.get(vg.input_index[g])
            if j is not None:
                final_after[j] = final_after.get(j, ()) + (g,)
        return final_before, final_after

    # -- run -----------------------------------------------------------------------------
    def run(
        self,
        params: Mapping[str, object],
        data: Mapping[str, object],
        *,
        grads: Sequence[str] | None = None,
        outputs: Sequence[str] = (),
        loss_scale: float = 1.0,
        seed: int | None = None,
        check: Callable[[], None] | None = None,
        record_live: list | None = None,
        on_forward: Callable[[np.ndarray, dict], None] | None = None,
        on_grad: Callable[[str, np.ndarray], None] | None = None,
    ) -> PlanResult:
        """Forward and backward for one batch.

        ``params``/``data`` map input names to arrays (NumPy; the ``cuda`` backend copies
        them to the device); ``params`` holds the BUFFER inputs' values too (they travel
        with the parameters), whose new values come back in ``PlanResult.buffers``.
        ``grads`` names the parameters whose gradients to return (None: all; ``[]``:
        forward only); a requested parameter the loss does not depend on gets zeros.
        ``loss_scale`` multiplies the loss and so every gradient (the backward pass starts
        from ``loss_scale`` instead of 1). ``seed`` seeds random ops (see the module
        docstring). ``check``, if given, is called every ``CHECK_EVERY`` kernels and between
        forward and backward; it raises to abandon the call (a deadline). ``record_live``,
        for tests: the number of live slots after each kernel is appended to it.

        ``on_forward(loss, outputs)``, if given, is called when the forward pass ends with
        the loss (after ``loss_scale``) and the requested outputs, as in the result.
        ``on_grad(name, array)``, if given, is called for each requested gradient the moment
        it is final, in ``grad_order`` (backward is still running; the array is the one the
        result holds and is not written to again). Both run on the calling thread.
        """
        vg = self.graph
        sched = self.schedule(grads, outputs)
        xp = backend_mod.cupy() if self.backend == "cuda" else np
        slots = self._load(sched, params, data, xp)
        t0 = time.perf_counter()
        self._forward(sched, slots, xp, seed, check, record_live)
        loss = slots[self._loss]
        _sync(xp)
        t1 = time.perf_counter()
        if check is not None:
            check()

        to_host = backend_mod.to_numpy
        # Read before backward frees anything (the loss and outputs live to the end anyway).
        loss_out = to_host(loss)
        if loss_scale != 1.0:
            loss_out = (loss_out * loss_out.dtype.type(loss_scale)).astype(loss_out.dtype)
        loss_out = np.asarray(loss_out)
        result_outputs = {name: to_host(slots[vg.outputs[name]]) for name in sched.outputs}
        new_buffers = {name: to_host(slots[v]) for name, v in vg.buffer_updates.items()}
        if on_forward is not None:
            on_forward(loss_out, result_outputs)

        result_grads: dict[str, np.ndarray] = {}
        if sched.grads:
            self._backward(
                sched, slots, xp, loss_scale, seed, check, record_live, result_grads, on_grad
            )
        _sync(xp)
        t2 = time.perf_counter()
        result_grads = {name: result_grads[name] for name in sched.grads}
        return PlanResult(loss_out, result_outputs, result_grads, t1 - t0, t2 - t1, new_buffers)

    def _load(
        self, sched: _Schedule, params: Mapping[str, object], data: Mapping[str, object], xp
    ) -> list:
        """The slots with the inputs in place, checked against the compiled shapes."""
        vg = self.graph
        slots: list = [None] * len(self.specs)
        for i, role, name, shape, dtype in self._inputs:
            if role == CONST:
                slots[i] = vg.consts[i] if xp is np else xp.asarray(vg.consts[i])
                continue
            source, kind = (params, "parameters") if role in (PARAM, BUFFER) else (data, "data")
            value = source.get(name)
            if value is None:
                raise GraphError(f"{kind}[{name}]", "missing")
            if type(value) is not xp.ndarray:
                value = _on_backend(value, xp)
            if value.shape != shape:
                raise GraphError(
                    f"{kind}[{name}].shape",
                    f"got shape {list(value.shape)}, the plan was compiled for {list(shape)}",
                )
            if value.dtype != dtype:
                raise GraphError(
                    f"{kind}[{name}].dtype",
                    f"got {value.dtype}, the graph declares {self.specs[i].dtype.name}",
                )
            slots[i] = value
        for i in sched.free_inputs:
            slots[i] = None
        return slots

    def _forward(self, sched: _Schedule, slots: list, xp, seed, check, record_live) -> None:
        for n, kern in enumerate(sched.forward):
            if check is not None and n % CHECK_EVERY == 0:
                check()
            a = kern.attrs
            if kern.random and seed is not None:
                a = {**a, "seed": random_seed(seed, kern.node)}
            # Large matrix products run in row blocks, checked between them (core/cost.py).
            out = cost.call(
                kern.op_name, kern.forward, xp, [slots[i] for i in kern.inputs], a, check
            )
            slots[kern.out] = out if isinstance(out, xp.ndarray) else xp.asarray(out)
            for v in kern.free:
                slots[v] = None
            if record_live is not None:
                record_live.append(sum(s is not None for s in slots))

    def _backward(
        self,
        sched: _Schedule,
        slots: list,
        xp,
        loss_scale: float,
        seed,
        check,
        record_live,
        final: dict,
        on_grad,
    ) -> None:
        """The eager engine's ``run_backward`` over slots: same order, same ops. Each
        requested gradient goes into ``final`` (as a host array, zeros when nothing reaches
        it) as soon as it is complete, and to ``on_grad`` if given."""
        vg = self.graph
        n_in = vg.num_inputs
        wrap = Tensor._wrap
        reduce_grad = unbroadcast
        loss_v = self._loss
        spec = self.specs[loss_v]
        seed_grad = wrap(xp.full(spec.shape, loss_scale, dtype=spec.dtype.np))
        grads: dict[str, Tensor] = {}

        def emit(names) -> None:
            self._emit(names, grads, final, on_grad)

        if loss_v < n_in:
            # The loss is a parameter itself: the seed gradient is its gradient.
            for name in sched.grads:
                if vg.input_index[name] == loss_v:
                    grads[name] = seed_grad
            emit(sched.final_before)
            return
        emit(sched.final_before)
        final_after = sched.final_after
        pending: dict[int, Tensor] = {loss_v: seed_grad}
        # The vjps' large products run in blocks with ``check`` between them (core/cost.py).
        with autograd._engine_mode(False), cost.checking(check):
            for n, kern in enumerate(sched.backward):
                if check is not None and n % CHECK_EVERY == 0 and n:
                    check()
                g = pending.pop(kern.out, None)
                if g is not None:
                    # The vjp as the eager engine runs it; gradients summed in its order.
                    attrs = kern.attrs
                    if kern.random and seed is not None:
                        attrs = {**attrs, "seed": random_seed(seed, kern.node)}
                    inputs = [wrap(slots[i], w) for i, w in zip(kern.inputs, kern.wants)]
                    out = wrap(slots[kern.out], True) if kern.saves_out else None
                    result = kern.op.vjp(g, out, *inputs, **attrs)
                    if len(result) != len(inputs):
                        raise RuntimeError(
                            f"{kern.op.name}: vjp returned {len(result)} "
                            f"gradients for {len(inputs)} inputs"
                        )
                    broadcast = kern.op.broadcast
                    for v, t, gi, name in zip(kern.inputs, inputs, result, kern.params):
                        if gi is None or not t.requires_grad:
                            continue
                        if broadcast:
                            gi = reduce_grad(gi, t)
                        if name is not None:
                            # A leaf: accumulate as autograd._accumulate_leaf does.
                            grads[name] = gi if name not in grads else grads[name] + gi
                        elif v >= n_in:
                            pending[v] = gi if v not in pending else pending[v] + gi
                for v in kern.free:
                    slots[v] = None
                done = final_after.get(n)
                if done:
                    emit(done)
                if record_live is not None:
                    record_live.append(sum(s is not None for s in slots))

    def _emit(self, names, grads: dict, final: dict, on_grad) -> None:
        """Hand over the complete gradients ``names``: into ``final`` as host arrays (zeros
        where nothing reached them), and to ``on_grad``."""
        for name in names:
            g = grads.pop(name, None)
            if g is not None:
                a = backend_mod.to_numpy(g._data)
            else:
                spec = self.specs[self.graph.input_index[name]]
                a = np.zeros(spec.shape, spec.dtype.np)
            final[name] = a
            if on_grad is not None:
                on_grad(name, a)


def _on_backend(value, xp):
    """A parameter or data value (array, Tensor, CuPy array) as an array of ``xp``."""
    if isinstance(value, Tensor):
        value = value._data
    if xp is np:
        return backend_mod.to_numpy(value)
    return (
        value
        if isinstance(value, xp.ndarray)
        else xp.asarray(backend_mod.to_numpy(np.asarray(value)))
    )


def _sync(xp) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def compile_plan(
    validated_graph: ValidatedGraph, data_shapes: Mapping[str, Sequence[int]], backend: str = "cpu"
) -> Plan:
    """Compile a validated graph for concrete data shapes on ``backend`` ("cpu" or "cuda").

    Infers every value's concrete shape (checking the element limit) and the eager
    backward order; kernels for a given set of requested gradients and outputs are built on
    first use and cached in the plan. Cache plans per (graph id, data shapes, backend).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    vg = validated_graph
    shapes = {n: tuple(int(s) for s in shape) for n, shape in data_shapes.items()}
    specs = vg.specs_at(shapes)
    n_in = vg.num_inputs
    # Eager's requires_grad: a value depends on a parameter through differentiable ops,
    # and is floating point (integer and bool results, argmax's, carry no gradient).
    requires = [inp.role == PARAM for inp in vg.graph.inputs]
    for k, (op, ins) in enumerate(zip(vg.ops, vg.node_inputs)):
        requires.append(
            op.differentiable
            and specs[n_in + k].dtype.is_floating_point
            and any(requires[i] for i in ins)
        )
    loss_v = vg.outputs[vg.graph.outputs[0].name]
    topo = _topo_order(loss_v, n_in, vg.node_inputs, requires)
    return Plan(vg, shapes, backend, specs, requires, topo)


def _topo_order(root: int, n_in: int, node_inputs, requires) -> list[int]:
    """Node indices in the order of ``autograd._topo_order`` from the loss: an iterative
    depth-first post-order over inputs that require grad, reversed."""
    if root < n_in or not requires[root]:
        return []
    order, seen = [], {root}
    stack = [(root, iter(node_inputs[root - n_in]))]
    while stack:
        v, it = stack[-1]
        for i in it:
            if i >= n_in and requires[i] and i not in seen:
                seen.add(i)
                stack.append((i, iter(node_inputs[i - n_in])))
                break
        else:
            stack.pop()
            order.append(v - n_in)
    order.reverse()
    return order
