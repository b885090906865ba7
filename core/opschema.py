"""Op schemas: what a client in any language needs to write a node, read from the registry.

For every op: its inputs in order (name, variadic, optional, differentiable, broadcasts),
its attributes (the ``Attribute`` field that carries each, whether ``none`` is allowed,
the default, the allowed values), the rule that gives its output dtype, and whether it
broadcasts. The worker returns them in ``Capabilities.op_schemas``
(``protos/gradmesh/v1/worker.proto``) and ``docs/ops.md`` is written from the same data
(``python core/gen_ops_doc.py``). Input names come from the forward function's
parameters; everything else is declared at the op's ``defop``.

>>> s = schema(get("sum"))
>>> [i.name for i in s.inputs], [(a.name, a.kind, a.default) for a in s.attrs]
(['a'], [('dim', 'ints', None), ('keepdim', 'b', False)])
>>> s.dtype_rule, s.dtype_inputs
('accumulate', ('a',))
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

from . import dtypes
from .graph.ident import ATTR_FIELD
from .registry import REGISTRY, Op, get

# The output dtype rules, in the words docs/ops.md and worker.proto use.
DTYPE_RULES = {
    "same": "the dtype of the input it names",
    "float": "the dtype of the input it names if floating, else float32",
    "promote": (
        "torch's type promotion of the inputs it names, folded left to right: bool < "
        "integer < floating; a higher category wins whatever the width; within a category "
        "the wider type wins, except that a 0-d input of the same category as a "
        "non-0-d one does not decide"
    ),
    "promote_float": "as promote, then an integer or bool result becomes float32",
    "accumulate": (
        "the dtype of the input it names if floating, else int64 (sums of integers and bools)"
    ),
    "bool": "always bool",
    "int64": "always int64",
    "attr": "the dtype named by the attribute dtype_attr",
}


@dataclass(frozen=True)
class InputSchema:
    name: str
    variadic: bool  # any number of tensors here (>= 0), as the last input(s)
    optional: bool
    differentiable: bool  # can receive a gradient
    broadcasts: bool  # broadcast with the op's other broadcasting inputs


@dataclass(frozen=True)
class AttrSchema:
    name: str
    kind: str  # the Attribute field: i, f, b, s, ints, floats, dtype
    nullable: bool  # may be given as `none` (Python None)
    default: Any  # None: the default is `none` (omitted means None)
    choices: tuple  # the only values accepted; empty: any of the kind


@dataclass(frozen=True)
class OpSchema:
    name: str
    inputs: tuple[InputSchema, ...]
    attrs: tuple[AttrSchema, ...]
    dtype_rule: str  # a key of DTYPE_RULES
    dtype_inputs: tuple[str, ...]  # the inputs the rule reads
    dtype_attr: str  # for the "attr" rule
    broadcast: bool
    differentiable: bool  # False: the result never carries a gradient


def input_names(op: Op) -> tuple[list[str], str | None]:
    """The fixed input names and the variadic one (None without), from ``forward``."""
    params = list(inspect.signature(op.forward).parameters.values())[1:]  # after xp
    fixed = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in op.attrs]
    star = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
    if star is None or op.arity is None:
        return fixed, star
    # A fixed arity over a *args forward (nll_loss_weighted): the extra inputs are named.
    return fixed + [star] * (op.arity - len(fixed)), None


def _inputs(op: Op) -> tuple[InputSchema, ...]:
    fixed, star = input_names(op)
    out_dtype_differentiable = op.dtype not in ("bool", "int64")
    broadcasting = op.broadcast_inputs or tuple(fixed + ([star] if star else []))
    return tuple(
        InputSchema(
            name,
            variadic=name == star,
            optional=False,
            differentiable=op.differentiable
            and out_dtype_differentiable
            and name not in op.nondiff,
            broadcasts=op.broadcast and name in broadcasting,
        )
        for name in fixed + ([star] if star else [])
    )


def _attrs(op: Op) -> tuple[AttrSchema, ...]:
    return tuple(
        AttrSchema(
            name,
            ATTR_FIELD[kind.rstrip("?")],
            kind.endswith("?"),
            default,
            op.choices.get(name, ()),
        )
        for name, (kind, default) in sorted(op.attrs.items())
    )


def schema(op: Op) -> OpSchema:
    inputs = _inputs(op)
    rule, _, arg = op.dtype.partition(":")
    attr = ""
    if rule == "attr":
        attr, reads = arg, ()
    elif rule == "input":
        rule, reads = "same", (arg,)
    elif arg:
        reads = tuple(arg.split(","))
    elif rule in ("promote", "promote_float"):
        reads = tuple(i.name for i in inputs)
    elif rule in ("bool", "int64"):
        reads = ()
    else:
        reads = (inputs[0].name,)
    if rule not in DTYPE_RULES:
        raise ValueError(f"{op.name}: unknown dtype rule {op.dtype!r}")
    return OpSchema(op.name, inputs, _attrs(op), rule, reads, attr, op.broadcast, op.differentiable)


def all_schemas() -> list[OpSchema]:
    """Every registered op's schema, sorted by name."""
    return [schema(REGISTRY[name]) for name in sorted(REGISTRY)]


def output_dtype(s: OpSchema, inputs: dict[str, Sequence], attrs: dict[str, Any]) -> dtypes.DType:
    """The output dtype by the published rule alone. ``inputs`` maps an input name to a
    list of ``(dtype, ndim)`` (one for a plain input, any number for a variadic one)."""
    if s.dtype_rule == "bool":
        return dtypes.bool_
    if s.dtype_rule == "int64":
        return dtypes.int64
    if s.dtype_rule == "attr":
        return dtypes.as_dtype(attrs[s.dtype_attr])
    read = [x for name in s.dtype_inputs for x in inputs.get(name, ())]
    first = dtypes.as_dtype(read[0][0])
    if s.dtype_rule == "same":
        return first
    if s.dtype_rule == "float":
        return first if first.is_floating_point else dtypes.default_float
    if s.dtype_rule == "accumulate":
        return first if first.is_floating_point else dtypes.int64
    dtype, scalar = first, read[0][1] == 0
    for d, ndim in read[1:]:
        dtype = dtypes.promote(dtype, dtypes.as_dtype(d), scalar, ndim == 0)
        scalar = scalar and ndim == 0
    if s.dtype_rule == "promote_float" and not dtype.is_floating_point:
        return dtypes.default_float
    return dtype


__all__ = ["OpSchema", "InputSchema", "AttrSchema", "schema", "all_schemas", "output_dtype", "get"]
