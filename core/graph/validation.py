"""Validation of a graph that arrived over the network, before anything is allocated."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from gradmesh.v1 import graph_pb2

from ..registry import REGISTRY, Op, Spec
from ..serialize import PROTO_TO_DTYPE, WireError, from_proto
from .ident import (
    BUFFER,
    CONST,
    DATA,
    GRAPH_VERSION,
    PARAM,
    ROLE_NAMES,
    GraphError,
    decode_attrs,
    dtype_of,
    encode_attrs,
    graph_id,
)
from .limits import Limits

# Batch sizes that validation infers every shape at: dims that differ between the two
# depend on the batch. Small, so that shape arithmetic stays cheap.
_PROBE_BATCHES = (2, 3)


@dataclass
class ValidatedGraph:
    """A graph that passed ``validate``, decoded for execution.

    ``specs[v]`` is value ``v``'s shape and dtype, with -1 where a dimension depends on the
    batch size; ``specs_at(data_shapes)`` gives concrete ones.
    """

    graph: graph_pb2.Graph
    id: str
    ops: list[Op]
    attrs: list[dict]  # per node, defaults filled in
    node_inputs: list[tuple[int, ...]]
    specs: list[Spec]
    params: list[str]  # PARAM input names, in graph order
    data: list[str]  # DATA input names
    input_index: dict[str, int]  # input name -> value number
    consts: dict[int, np.ndarray]  # value number -> decoded CONST value
    outputs: dict[str, int]  # output name -> value number (loss first)
    limits: Limits = field(default_factory=Limits)
    buffers: list[str] = field(default_factory=list)  # BUFFER input names, in graph order
    # Buffer name -> the value number of its new value (Output.buffer), in output order.
    buffer_updates: dict[str, int] = field(default_factory=dict)

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
            raise GraphError(
                f"data[{missing[0]}]", f"missing; the graph's DATA inputs are {self.data}"
            )
        extra = [n for n in data_shapes if n not in self.data]
        if extra:
            raise GraphError(
                f"data[{extra[0]}]",
                f"the graph has no DATA input {extra[0]!r}; its DATA inputs are {self.data}",
            )
        batch, first = None, None
        for n in self.data:
            want = list(self.graph.inputs[self.input_index[n]].shape)
            got = [int(s) for s in data_shapes[n]]
            ok = len(got) == len(want) and all(w in (-1, s) for w, s in zip(want, got))
            if not ok:
                raise GraphError(
                    f"data[{n}].shape",
                    f"got shape {got}, the graph expects {want} (-1: any batch size)",
                )
            if want[:1] == [-1]:
                if batch is not None and got[0] != batch:
                    raise GraphError(
                        f"data[{n}].shape",
                        f"batch size {got[0]} differs from {batch} of data[{first}]",
                    )
                batch, first = got[0], n
        return batch

    def specs_at(
        self, data_shapes: Mapping[str, Sequence[int]] | None = None, batch: int | None = None
    ) -> list[Spec]:
        """Concrete shapes and dtypes of every value for these data shapes (or batch size),
        checked against the element limit."""
        if batch is None and data_shapes is not None:
            batch = self.batch_size(data_shapes)
        if batch is None and self.batched:
            raise GraphError(
                "data", "the graph has a batch dimension: give data shapes or a batch size"
            )
        specs = _infer_all(
            self.graph, self.ops, self.attrs, self.node_inputs, batch if batch is not None else 1
        )
        n_in = self.num_inputs
        for v, s in enumerate(specs):
            count = math.prod(s.shape)
            if count > self.limits.max_tensor_elements:
                where = f"nodes[{v - n_in}]" if v >= n_in else f"inputs[{v}].shape"
                raise GraphError(
                    where,
                    f"value of shape {list(s.shape)} has {count} elements, "
                    f"over the limit of {self.limits.max_tensor_elements}",
                    "RESOURCE_EXHAUSTED",
                )
        return specs


def _input_spec(inp, batch: int) -> Spec:
    shape = tuple(batch if (i == 0 and s == -1) else int(s) for i, s in enumerate(inp.shape))
    return Spec(shape, dtype_of(inp.dtype))


def _infer_all(graph, ops, attrs, node_inputs, batch: int) -> list[Spec]:
    specs = [_input_spec(inp, batch) for inp in graph.inputs]
    for k, (op, a, ins) in enumerate(zip(ops, attrs, node_inputs)):
        try:
            spec = op.infer(*[specs[i] for i in ins], **a)
        except GraphError:
            raise
        except Exception as e:  # infer's own errors name the op and the shapes
            attr = getattr(e, "attr", None) or op.blame
            raise GraphError(
                f"nodes[{k}].attrs.{attr}" if attr in op.attrs else f"nodes[{k}]",
                f"{op.name}: {e}" if not str(e).startswith(op.name) else str(e),
            ) from None
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
    limits = limits or Limits()
    _check_sizes(graph, limits)
    names, params, data, consts = _check_inputs(graph, limits)
    ops, attrs, node_inputs, canonical = _check_nodes(graph, limits)
    outputs = _check_outputs(graph)
    updates = _check_buffer_outputs(graph, names)
    # Unsorted attributes, or defaults spelled out: the graph's id is that of its canonical
    # form (graph.proto), so the same model gets the same id from any client.
    graph = canonical or graph
    vg = ValidatedGraph(
        graph,
        graph_id(graph),
        ops,
        attrs,
        node_inputs,
        [],
        params,
        data,
        names,
        consts,
        outputs,
        limits,
        [i.name for i in graph.inputs if i.role == BUFFER],
        updates,
    )
    vg.specs = _batch_free_specs(graph, ops, attrs, node_inputs, limits)
    _check_buffer_specs(graph, vg.specs, updates)
    loss = vg.specs[graph.outputs[0].value]
    if loss.shape != () or not loss.dtype.is_floating_point:
        raise GraphError(
            "outputs[0].value",
            f"the first output is the loss and must be a "
            f"floating scalar, got shape {list(loss.shape)} and dtype "
            f"{loss.dtype.name}",
        )
    return vg


def _check_sizes(graph: graph_pb2.Graph, limits: Limits) -> None:
    if graph.version != GRAPH_VERSION:
        raise GraphError(
            "version",
            f"unsupported graph version {graph.version}; this worker reads version {GRAPH_VERSION}",
        )
    if len(graph.nodes) > limits.max_graph_nodes:
        raise GraphError(
            "nodes",
            f"{len(graph.nodes)} nodes exceed the limit of {limits.max_graph_nodes}",
            "RESOURCE_EXHAUSTED",
        )
    if len(graph.inputs) > limits.max_graph_inputs:
        raise GraphError(
            "inputs",
            f"{len(graph.inputs)} inputs exceed the limit of {limits.max_graph_inputs}",
            "RESOURCE_EXHAUSTED",
        )


def _check_inputs(graph: graph_pb2.Graph, limits: Limits):
    """Every input checked; returns (name -> index, PARAM names, DATA names, decoded CONST
    values by index)."""
    names: dict[str, int] = {}
    params, data, consts = [], [], {}
    const_bytes = 0
    for i, inp in enumerate(graph.inputs):
        f = f"inputs[{i}]"
        if not inp.name:
            raise GraphError(f"{f}.name", "inputs must be named")
        if inp.name in names:
            raise GraphError(
                f"{f}.name", f"duplicate input name {inp.name!r} (also inputs[{names[inp.name]}])"
            )
        names[inp.name] = i
        _check_input_type(f, inp, limits)
        if inp.role == PARAM:
            params.append(inp.name)
        elif inp.role == DATA:
            data.append(inp.name)
        if inp.role == CONST:
            const_bytes += len(inp.value.data)
            if const_bytes > limits.max_const_bytes:
                raise GraphError(
                    f"{f}.value",
                    f"CONST values exceed the limit of {limits.max_const_bytes} bytes in all",
                    "RESOURCE_EXHAUSTED",
                )
            consts[i] = _const_value(f, inp, limits)
        elif inp.HasField("value"):
            raise GraphError(
                f"{f}.value",
                f"only CONST inputs carry a value; {inp.name!r} is {ROLE_NAMES[inp.role]}",
            )
    return names, params, data, consts


def _check_input_type(f: str, inp, limits: Limits) -> None:
    """An input's role, dtype and shape (``f`` names it: ``inputs[3]``)."""
    if inp.role not in ROLE_NAMES:
        raise GraphError(
            f"{f}.role", f"unknown role {inp.role}; expected PARAM, DATA, CONST or BUFFER"
        )
    if inp.dtype not in PROTO_TO_DTYPE:
        raise GraphError(f"{f}.dtype", f"unknown or unspecified dtype {inp.dtype}")
    for d, s in enumerate(inp.shape):
        if s < 0 and not (s == -1 and d == 0 and inp.role == DATA):
            raise GraphError(
                f"{f}.shape",
                f"dimension {d} is {s}; only the first "
                f"dimension of a DATA input may be -1 (the batch)",
            )
    static = math.prod(max(int(s), 1) if s == -1 else int(s) for s in inp.shape)
    if static > limits.max_tensor_elements:
        raise GraphError(
            f"{f}.shape",
            f"{static} elements exceed the limit of {limits.max_tensor_elements}",
            "RESOURCE_EXHAUSTED",
        )
    if inp.role == PARAM and not dtype_of(inp.dtype).is_floating_point:
        raise GraphError(
            f"{f}.dtype",
            f"PARAM {inp.name!r} has dtype "
            f"{dtype_of(inp.dtype).name}; parameters must be floating point",
        )


def _const_value(f: str, inp, limits: Limits) -> np.ndarray:
    """A CONST input's value, checked against its declaration and decoded."""
    if not inp.HasField("value"):
        raise GraphError(f"{f}.value", f"CONST {inp.name!r} has no value")
    if inp.value.dtype != inp.dtype or list(inp.value.shape) != list(inp.shape):
        raise GraphError(
            f"{f}.value",
            f"value has dtype {inp.value.dtype} and shape "
            f"{list(inp.value.shape)}, the input declares {inp.dtype} and "
            f"{list(inp.shape)}",
        )
    try:
        return from_proto(inp.value, field=f"{f}.value", max_elements=limits.max_tensor_elements)
    except WireError as e:
        raise GraphError(e.field, e.message, e.code) from None


def _check_nodes(graph: graph_pb2.Graph, limits: Limits):
    """Every node checked and decoded; returns (ops, attributes with defaults, input value
    numbers, the graph with canonical attributes or None where it has them already)."""
    ops, attrs, node_inputs = [], [], []
    canonical_graph = None
    n_in = len(graph.inputs)
    for k, node in enumerate(graph.nodes):
        f = f"nodes[{k}]"
        op = REGISTRY.get(node.op)
        if op is None:
            raise GraphError(
                f"{f}.op", f"unknown op {node.op!r}; see Capabilities.ops for the registered ones"
            )
        if op.arity is not None and len(node.inputs) != op.arity:
            raise GraphError(
                f"{f}.inputs", f"{op.name} takes {op.arity} inputs, got {len(node.inputs)}"
            )
        for j, v in enumerate(node.inputs):
            if v >= n_in + k:
                raise GraphError(
                    f"{f}.inputs[{j}]",
                    f"value {v} is not defined before node "
                    f"{k} (values 0..{n_in + k - 1} are); nodes must be in "
                    f"topological order",
                )
        ops.append(op)
        attrs.append(decode_attrs(op, node.attrs, f"{f}.attrs", limits))
        node_inputs.append(tuple(int(v) for v in node.inputs))
        canonical = encode_attrs(op, attrs[-1])
        if list(node.attrs) != canonical:
            if canonical_graph is None:
                canonical_graph = graph_pb2.Graph()
                canonical_graph.CopyFrom(graph)
            del canonical_graph.nodes[k].attrs[:]
            canonical_graph.nodes[k].attrs.extend(canonical)
    return ops, attrs, node_inputs, canonical_graph


def _check_outputs(graph: graph_pb2.Graph) -> dict[str, int]:
    """Output name -> value number, the loss first."""
    outputs: dict[str, int] = {}
    n_values = len(graph.inputs) + len(graph.nodes)
    for j, out in enumerate(graph.outputs):
        f = f"outputs[{j}]"
        if not out.name:
            raise GraphError(f"{f}.name", "outputs must be named")
        if out.name in outputs:
            raise GraphError(f"{f}.name", f"duplicate output name {out.name!r}")
        if out.value >= n_values:
            raise GraphError(
                f"{f}.value", f"value {out.value} does not exist (the graph has {n_values} values)"
            )
        outputs[out.name] = int(out.value)
    if not outputs:
        raise GraphError("outputs", "a graph needs at least one output: the loss")
    return outputs


def _check_buffer_outputs(graph: graph_pb2.Graph, names: dict[str, int]) -> dict[str, int]:
    """Buffer name -> value number of its buffer-update output (``Output.buffer``): each
    names a BUFFER input, at most once, and the loss is none."""
    updates: dict[str, int] = {}
    for j, out in enumerate(graph.outputs):
        if not out.buffer:
            continue
        f = f"outputs[{j}].buffer"
        i = names.get(out.buffer)
        if i is None or graph.inputs[i].role != BUFFER:
            raise GraphError(f, f"{out.buffer!r} is not a BUFFER input of the graph")
        if j == 0:
            raise GraphError(f, "the first output is the loss, not a buffer's new value")
        if out.buffer in updates:
            raise GraphError(f, f"buffer {out.buffer!r} is updated by two outputs")
        updates[out.buffer] = int(out.value)
    return updates


def _check_buffer_specs(graph: graph_pb2.Graph, specs: list, updates: dict[str, int]) -> None:
    """A buffer's new value has the buffer's dtype and (batch-free) shape."""
    index = {inp.name: i for i, inp in enumerate(graph.inputs)}
    for j, out in enumerate(graph.outputs):
        if not out.buffer:
            continue
        want, got = specs[index[out.buffer]], specs[updates[out.buffer]]
        if want.dtype is not got.dtype or tuple(want.shape) != tuple(got.shape):
            raise GraphError(
                f"outputs[{j}].value",
                f"the new value of buffer {out.buffer!r} has dtype {got.dtype.name} and "
                f"shape {list(got.shape)}; the buffer is {want.dtype.name} {list(want.shape)}",
            )


def _batch_free_specs(graph, ops, attrs, node_inputs, limits: Limits) -> list[Spec]:
    """Every value's spec with -1 where a dimension depends on the batch: inferred at two
    batch sizes, the dimensions that differ are the batch's."""
    n_in = len(graph.inputs)
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
            raise GraphError(
                where,
                f"value of shape {list(specs[-1].shape)} exceeds the limit "
                f"of {limits.max_tensor_elements} elements",
                "RESOURCE_EXHAUSTED",
            )
    return specs
