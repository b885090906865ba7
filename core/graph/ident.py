"""What a graph is made of, as the wire carries it: value roles, attributes (Python values
to Attribute messages and back, in the canonical form the graph id hashes), the graph id,
the seeds of random nodes, and ``GraphError``."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence

import numpy as np

from gradmesh.v1 import graph_pb2

from .. import dtypes
from ..registry import Op
from ..serialize import PROTO_TO_DTYPE
from .limits import Limits

GRAPH_VERSION = 1
LOSS = "loss"  # name of the first output
PARAM, DATA, CONST = graph_pb2.Input.PARAM, graph_pb2.Input.DATA, graph_pb2.Input.CONST
BUFFER = graph_pb2.Input.BUFFER  # module state supplied per call, updated by outputs
ROLE_NAMES = {PARAM: "PARAM", DATA: "DATA", CONST: "CONST", BUFFER: "BUFFER"}
STOP_GRADIENT = "stop_gradient"  # the op a traced detach() or no_grad() leaves behind


class GraphError(ValueError):
    """An invalid graph. ``field`` names the offending field (``"nodes[3].attrs.dim"``,
    ``"inputs[1].shape"``); ``code`` is the gRPC status code name to answer with:
    ``"INVALID_ARGUMENT"`` or ``"RESOURCE_EXHAUSTED"`` (a limit)."""

    def __init__(self, field: str, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code


def dtype_of(proto_dtype: int) -> dtypes.DType:
    """The dtype of a ``tensor_pb2.DType`` number (one that validation accepted)."""
    return PROTO_TO_DTYPE[proto_dtype]


# The Attribute field (graph.proto) that carries each declared kind; Capabilities'
# op schemas (core/opschema.py) publish the same mapping.
ATTR_FIELD = {
    "int": "i",
    "float": "f",
    "bool": "b",
    "str": "s",
    "ints": "ints",
    "floats": "floats",
    "dtype": "dtype",
}


def _same_value(kind: str, value, default) -> bool:
    """Is ``value`` the declared default (so the canonical form omits it)?"""
    if value is None or default is None:
        return value is None and default is None
    if kind == "float":
        v, d = float(value), float(default)
        return (v == d and math.copysign(1, v) == math.copysign(1, d)) or (v != v and d != d)
    if kind == "floats":  # element by element, as a float (graph.proto, "The graph id")
        return len(value) == len(default) and all(
            _same_value("float", v, d) for v, d in zip(value, default)
        )
    if kind == "ints":
        return [int(x) for x in value] == [int(x) for x in default]
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


def decode_attrs(
    op: Op, attrs: Sequence, field: str = "attrs", limits: "Limits | None" = None
) -> dict:
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
            raise GraphError(
                f,
                f"op {op.name} has no attribute {a.name!r}; it takes {sorted(op.attrs) or 'none'}",
            )
        if a.name in values:
            raise GraphError(f, "attribute given twice")
        kind = decl[0]
        base, optional = kind.rstrip("?"), kind.endswith("?")
        which = a.WhichOneof("value")
        if which == "none" and optional:
            values[a.name] = None
            continue
        if which != ATTR_FIELD[base]:
            allowed = f"'{ATTR_FIELD[base]}'" + (" or 'none'" if optional else "")
            raise GraphError(
                f,
                f"op {op.name} expects a {kind} attribute (field {allowed}), "
                f"got {which or 'no value'}",
            )
        if base in ("ints", "floats"):
            seq = getattr(a, which).values
            if len(seq) > max_values:
                raise GraphError(
                    f, f"{len(seq)} values exceed the limit of {max_values}", "RESOURCE_EXHAUSTED"
                )
            values[a.name] = [int(v) for v in seq] if base == "ints" else [float(v) for v in seq]
        elif base == "dtype":
            if a.dtype not in dtypes._BY_NAME:
                raise GraphError(
                    f, f"unknown dtype {a.dtype!r}; expected one of {sorted(dtypes._BY_NAME)}"
                )
            values[a.name] = a.dtype
        else:
            values[a.name] = getattr(a, which)
        allowed = op.choices.get(a.name)
        if allowed and values[a.name] not in allowed:
            raise GraphError(
                f, f"op {op.name} takes {a.name} in {list(allowed)}, got {values[a.name]!r}"
            )
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
    state = np.random.SeedSequence([int(call_seed) & (2**64 - 1), int(node_index)])
    return int(state.generate_state(1, np.uint64)[0]) & (2**63 - 1)


def is_random(op: Op) -> bool:
    """Random ops (``dropout_mask``) declare an int ``seed`` attribute."""
    return op.attrs.get("seed", ("",))[0].rstrip("?") == "int"


def graph_id(graph: graph_pb2.Graph) -> str:
    """Lowercase hex SHA-256 of the graph's canonical (deterministic) serialization."""
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()
