"""Graphs on the wire: tracing a Python function into a ``Graph`` message (``tracer``), the
graph id and canonical attributes (``ident``), validation of a graph that arrived over the
network (``validation``, ``limits``), and a reference executor (``executor``).

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

See ``tracer`` for how a traced graph stays independent of the batch size.
"""

from .executor import execute
from .ident import (
    BUFFER,
    CONST,
    DATA,
    GRAPH_VERSION,
    LOSS,
    PARAM,
    STOP_GRADIENT,
    GraphError,
    decode_attrs,
    encode_attrs,
    graph_id,
    is_random,
    random_seed,
)
from .limits import Limits
from .tracer import TraceError, trace
from .validation import ValidatedGraph, validate

__all__ = [
    "GraphError",
    "TraceError",
    "Limits",
    "ValidatedGraph",
    "trace",
    "graph_id",
    "validate",
    "execute",
    "encode_attrs",
    "decode_attrs",
    "random_seed",
    "is_random",
    "GRAPH_VERSION",
    "LOSS",
    "PARAM",
    "DATA",
    "CONST",
    "BUFFER",
    "STOP_GRADIENT",
]
