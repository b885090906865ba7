"""Every op's ``infer`` against its forward, for every input dtype that ``infer`` accepts.

Graphs from the network are checked with ``infer`` alone before they run, so an ``infer``
that accepts what the forward cannot compute becomes an INTERNAL error on a worker, and one
that promises another dtype than the forward gives breaks the plan built from it. The
inputs and attributes are those the specs in ``tests/opspecs`` really pass to each op
(forward, backward and second order, recorded by a dispatch tracer); each recorded call
is then replayed with its inputs cast to every combination of ``DTYPES``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest
import torch
from test_ops import SPECS, _differentiable, _gm_inputs, _inputs, _second_order, _weight, gm_tensor

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core.registry import REGISTRY, OpError, Spec

DTYPES = (gm.bool, gm.int64, gm.float32, gm.float64)
CALLS_PER_OP = 8


class _Calls:
    """A dispatch tracer that keeps a few calls of each op, distinct in what can change a
    result's dtype: which inputs are 0-d (torch's promotion) and the attributes."""

    def __init__(self):
        self.calls: dict[str, dict] = defaultdict(dict)

    def record(self, op, inputs, attrs, result) -> None:
        kept = self.calls[op.name]
        key = (tuple(t.ndim == 0 for t in inputs), repr(attrs))
        if key not in kept and len(kept) < CALLS_PER_OP:
            kept[key] = ([np.array(t._data) for t in inputs], dict(attrs))


@pytest.fixture(scope="module")
def calls() -> dict[str, list]:
    tracer = _Calls()
    previous, gm_tensor._dispatch.tracer = gm_tensor._dispatch.tracer, tracer
    try:
        for spec in SPECS:
            for case in range(len(spec.shapes)):
                arrays, diff = _inputs(spec, case)
                out = spec.gm(gm, *_gm_inputs(arrays, diff))
                if _differentiable(out, diff):
                    w = _weight(spec, case, out.shape)
                    v = {i: np.ones_like(arrays[i]) for i in diff}
                    _second_order(gm, spec.gm, _gm_inputs(arrays, diff), diff, w, v)
    finally:
        gm_tensor._dispatch.tracer = previous
    return {name: list(kept.values()) for name, kept in tracer.calls.items()}


def _check(op, arrays, attrs, xp=np) -> str | None:
    """What is wrong with ``op`` on ``arrays`` run over the array module ``xp``, or None
    when infer refuses or agrees."""
    try:
        spec = op.infer(*[Spec(a.shape, gm.dtypes.from_numpy(a.dtype)) for a in arrays], **attrs)
    except OpError:
        return None
    try:
        with np.errstate(all="ignore"):  # int overflow, 1/0: values do not matter here
            out = op.forward(xp, *[xp.asarray(a) for a in arrays], **attrs)
            out = np.asarray(out.get() if hasattr(out, "get") else out)
    except OpError:
        return None  # a data-dependent error (ints to negative powers)
    except Exception as e:  # noqa: BLE001 - what a worker reports as INTERNAL
        return f"infer accepts, forward raises {type(e).__name__}: {e}"
    shape_ok = len(spec.shape) == out.ndim and all(
        s in (-1, o) for s, o in zip(spec.shape, out.shape)
    )  # -1: data-dependent
    if not shape_ok or spec.dtype.np != out.dtype:  # NumPy may give dtypes we lack (int8)
        return (
            f"infer says {tuple(spec.shape)} {spec.dtype.name}, forward gives "
            f"{out.shape} {out.dtype}"
        )
    return None


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_infer_matches_forward_for_every_dtype(name: str, calls) -> None:
    op = REGISTRY[name]
    assert calls.get(name), f"no spec in tests/opspecs runs {name}"
    failures = {}  # the first problem of each dtype combination: one line each
    for arrays, attrs in calls[name]:
        for types in itertools.product(DTYPES, repeat=len(arrays)):
            signature = f"{name}({', '.join(t.name for t in types)})"
            if signature in failures:
                continue
            problem = _check(op, [a.astype(t.np) for a, t in zip(arrays, types)], attrs)
            if problem:
                failures[signature] = f"{signature} {attrs}: {problem}"
    assert not failures, "\n".join(failures.values())


@pytest.mark.gpu
def test_infer_matches_cuda_forward(calls) -> None:
    """The CuPy forwards agree with ``infer`` too, for each op's first recorded call with
    all inputs of one dtype (every combination would compile thousands of kernels)."""
    if not gm.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    import cupy

    failures = []
    for name in sorted(REGISTRY):
        arrays, attrs = calls[name][0]
        for t in DTYPES:
            problem = _check(REGISTRY[name], [a.astype(t.np) for a in arrays], attrs, cupy)
            if problem:
                failures.append(f"{name}({t.name}) {attrs}: {problem}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("x_dtype, t_dtype", [("float32", "float64"), ("float64", "float32")])
@pytest.mark.parametrize("loss", ["mse_loss", "binary_cross_entropy_with_logits"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mixed_float_losses_give_torchs_dtype(loss, x_dtype, t_dtype, reduction, device) -> None:
    """torch accepts these mixes: mse_loss promotes, bce takes the target's dtype."""
    if device == "cuda" and not gm.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    x, t = np.linspace(-1, 1, 6).reshape(2, 3), np.linspace(0, 1, 6).reshape(2, 3)
    out = getattr(F, loss)(
        gm.tensor(x.astype(x_dtype)).to(device),
        gm.tensor(t.astype(t_dtype)).to(device),
        reduction=reduction,
    )
    assert out.device == device
    out = out.to("cpu")
    ref = getattr(torch.nn.functional, loss)(
        torch.tensor(x.astype(x_dtype)), torch.tensor(t.astype(t_dtype)), reduction=reduction
    )
    assert out.dtype.name == str(ref.dtype).removeprefix("torch.")
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-6)
