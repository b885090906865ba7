"""The published op schemas (``gradmesh.core.opschema``, ``Capabilities.op_schemas``,
docs/ops.md) say what the ops really do.

The output dtype rule of every op is checked against its ``infer`` on the calls the specs
in ``tests/opspecs`` really make (recorded by test_infer_dtypes' dispatch tracer), with the
inputs cast to every dtype combination ``infer`` accepts; the inputs' names and kinds
against what a node of a graph must carry; docs/ops.md against the generator.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_infer_dtypes import DTYPES, calls  # noqa: F401 - the module-scoped fixture

import gradmesh.core as gm
from gradmesh.core import gen_ops_doc, opschema
from gradmesh.core.graph import ident
from gradmesh.core.registry import REGISTRY, OpError, Spec


def _named_inputs(s: opschema.OpSchema, arrays) -> dict:
    """The call's arrays as (dtype, ndim) lists under the schema's input names."""
    named: dict = {}
    fixed = [i for i in s.inputs if not i.variadic]
    for k, a in enumerate(arrays):
        name = fixed[k].name if k < len(fixed) else s.inputs[-1].name
        named.setdefault(name, []).append((gm.dtypes.from_numpy(a.dtype), a.ndim))
    return named


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_dtype_rule_matches_infer(name: str, calls) -> None:  # noqa: F811
    op, s = REGISTRY[name], opschema.schema(REGISTRY[name])
    checked, wrong = 0, {}
    for arrays, attrs in calls[name]:
        for types in itertools.product(DTYPES, repeat=len(arrays)):
            with np.errstate(invalid="ignore"):  # NaN to int: values do not matter
                cast = [a.astype(t.np) for a, t in zip(arrays, types)]
            try:
                got = op.infer(
                    *[Spec(a.shape, gm.dtypes.from_numpy(a.dtype)) for a in cast], **attrs
                )
            except OpError:
                continue
            said = opschema.output_dtype(s, _named_inputs(s, cast), attrs)
            checked += 1
            if said is not got.dtype:
                sig = f"{name}({', '.join(t.name for t in types)})"
                wrong[sig] = f"{sig}: rule {s.dtype_rule} says {said.name}, infer {got.dtype.name}"
    assert checked, f"no call of {name} was accepted by infer"
    assert not wrong, "\n".join(wrong.values())


def test_inputs_match_the_arity() -> None:
    for s in opschema.all_schemas():
        op = REGISTRY[s.name]
        variadic = [i for i in s.inputs if i.variadic]
        assert len(variadic) <= 1 and (not variadic or s.inputs[-1].variadic), s.name
        if op.arity is None:
            assert variadic, s.name
        else:
            assert not variadic and len(s.inputs) == op.arity, s.name
        assert len({i.name for i in s.inputs}) == len(s.inputs) or s.name.startswith("nll"), s.name


def test_issue_examples() -> None:
    """The signatures a client had to guess (issue 13), as the schemas now publish them."""
    pow_, linear = opschema.schema(REGISTRY["pow"]), opschema.schema(REGISTRY["linear"])
    assert [i.name for i in pow_.inputs] == ["a", "b"] and pow_.attrs == ()
    assert [i.name for i in linear.inputs] == ["x", "w", "b"]
    attrs = {a.name: a for a in opschema.schema(REGISTRY["sum"]).attrs}
    assert (attrs["dim"].kind, attrs["dim"].nullable, attrs["dim"].default) == ("ints", True, None)
    (dim,) = opschema.schema(REGISTRY["log_softmax"]).attrs
    assert (dim.kind, dim.default) == ("i", -1)
    (shape,) = opschema.schema(REGISTRY["reshape"]).attrs
    assert (shape.kind, shape.default) == ("ints", [])
    nll = {a.name: a for a in opschema.schema(REGISTRY["nll_loss"]).attrs}
    assert nll["reduction"].choices == ("none", "mean", "sum")
    where = opschema.schema(REGISTRY["where"])
    assert where.dtype_inputs == ("a", "b") and not where.inputs[0].differentiable
    assert [i.differentiable for i in opschema.schema(REGISTRY["gather"]).inputs] == [True, False]
    assert not any(i.differentiable for i in opschema.schema(REGISTRY["eq"]).inputs)
    cat = opschema.schema(REGISTRY["cat"])
    assert cat.inputs[0].variadic and cat.dtype_rule == "promote"


def test_defaults_are_what_decoding_fills_in() -> None:
    """The published defaults are the ones a worker assumes for an omitted attribute, and
    so the ones the canonical form drops."""
    for s in opschema.all_schemas():
        op = REGISTRY[s.name]
        filled = ident.decode_attrs(op, [])
        for a in s.attrs:
            assert filled[a.name] == a.default, (s.name, a.name)
            assert ident.encode_attrs(op, {a.name: a.default}) == [], (s.name, a.name)


def test_choices_are_enforced() -> None:
    for s in opschema.all_schemas():
        for a in s.attrs:
            for value in a.choices:
                assert isinstance(value, str), (s.name, a.name)
    x = gm.ones(2, 3)
    with pytest.raises(OpError, match="reduction"):
        gm.nn.functional.mse_loss(x, x, reduction="average")


def test_ops_doc_is_current() -> None:
    assert gen_ops_doc.DOC_FILE.read_text() == gen_ops_doc.render(), (
        "docs/ops.md is stale: run `python core/gen_ops_doc.py`"
    )


def test_every_op_is_documented() -> None:
    text = gen_ops_doc.DOC_FILE.read_text()
    for name in REGISTRY:
        assert f"\n### `{name}`\n" in text, name
    assert np.all([r in text for r in opschema.DTYPE_RULES])
