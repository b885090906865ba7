"""The reference executor: a graph evaluated eagerly through the registry (for tests; a
worker runs the compiled plan of ``gradmesh.core.plan``)."""

from __future__ import annotations

from typing import Mapping

from ..factories import as_tensor
from ..tensor import Tensor
from .ident import BUFFER, CONST, PARAM, GraphError, is_random, random_seed
from .limits import Limits
from .validation import ValidatedGraph, validate


def execute(
    graph,
    params: Mapping,
    data: Mapping,
    *,
    buffers: Mapping | None = None,
    seed: int | None = None,
    limits: Limits | None = None,
) -> dict:
    """Evaluate a graph eagerly through the registry: outputs by name, as Tensors.

    ``params`` and ``data`` map input names to Tensors or arrays; ``buffers`` the BUFFER
    inputs' (default: looked up in ``params``, as the worker takes them). The new value of
    an updated buffer is the output named by its buffer-update output (the buffer's name,
    for a traced graph). Parameters passed as
    Tensors are used as they are, so ``execute(...)["loss"].backward()`` fills their
    ``.grad``. ``seed`` seeds random ops as ``Plan.run`` does (see ``random_seed``); without
    it they use the seeds recorded in the graph. A reference for tests: the worker runs a
    compiled ``Plan``.
    """
    vg = graph if isinstance(graph, ValidatedGraph) else validate(graph, limits)
    values: list = []
    for i, inp in enumerate(vg.graph.inputs):
        if inp.role == CONST:
            values.append(Tensor._wrap(vg.consts[i]))
            continue
        source, kind = {
            PARAM: (params, "parameters"),
            BUFFER: (params if buffers is None else buffers, "buffers"),
        }.get(inp.role, (data, "data"))
        if inp.name not in source:
            raise GraphError(f"{kind}[{inp.name}]", "missing")
        value = source[inp.name]
        values.append(value if isinstance(value, Tensor) else as_tensor(value))
    for k, (op, a, ins) in enumerate(zip(vg.ops, vg.attrs, vg.node_inputs)):
        if seed is not None and is_random(op):
            a = {**a, "seed": random_seed(seed, k)}
        values.append(op(*[values[i] for i in ins], **a))
    return {name: values[v] for name, v in vg.outputs.items()}
