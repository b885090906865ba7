"""Helpers of the tracing tests (test_gradient_stops.py, test_inplace_tracing.py): a
function ``fn(lib, params, x)`` written once runs on gradmesh and on torch, eagerly and as
a traced graph."""

from __future__ import annotations

import numpy as np

import gradmesh.core as gm
from gradmesh.core.graph import execute, trace, validate
from gradmesh.core.plan import compile_plan


def batch(n: int) -> np.ndarray:
    """``n`` rows of 3 float64 features (the same rows for the same ``n``)."""
    return np.random.default_rng(n).standard_normal((n, 3))


def local(fn, params, x, lib=gm):
    """Loss and gradients of local ``backward()`` (``lib``: gradmesh or torch)."""
    leaves = {n: lib.tensor(a, requires_grad=True) for n, a in params.items()}
    loss = fn(lib, leaves, lib.tensor(x))
    loss.backward()
    grads = {
        n: (t.grad.detach().numpy() if t.grad is not None else np.zeros_like(params[n]))
        for n, t in leaves.items()
    }
    return loss.detach().numpy(), grads


def traced(fn, params, n: int = 4):
    """The graph of ``fn`` traced at batch size ``n``."""
    return trace(lambda p, x: fn(gm, p, x), {k: gm.tensor(v) for k, v in params.items()}, batch(n))


def assert_plan_equals_local(fn, params, sizes=(4, 7)):
    """The compiled plan of ``fn`` (traced at batch 4) gives local ``backward()``'s loss
    and gradients bit for bit at each batch size; returns the validated graph."""
    vg = validate(traced(fn, params))
    for n in sizes:
        x = batch(n)
        result = compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x})
        loss, grads = local(fn, params, x)
        assert np.array_equal(result.loss, loss), (n, result.loss, loss)
        for name, g in grads.items():
            assert np.array_equal(result.grads[name], g), (
                f"{name} at batch {n}: max diff {np.abs(result.grads[name] - g).max()}"
            )
    return vg


def assert_executed_equals_local(fn, params, sizes=(4, 7)):
    """``graph.execute`` of the traced ``fn``, then ``backward()``, equals local
    ``backward()`` bit for bit."""
    g = traced(fn, params)
    for n in sizes:
        x = batch(n)
        leaves = {k: gm.tensor(a, requires_grad=True) for k, a in params.items()}
        out = execute(g, leaves, {"x0": x})["loss"]
        out.backward()
        loss, grads = local(fn, params, x)
        assert np.array_equal(out.detach().numpy(), loss)
        for name, want in grads.items():
            got = leaves[name].grad.numpy() if leaves[name].grad is not None else 0 * want
            assert np.array_equal(got, want), (name, n)


def assert_local_matches_torch(fn, params):
    """Local gradmesh ``backward()`` of ``fn`` matches torch's in float64."""
    import torch

    x = batch(5)
    loss, grads = local(fn, params, x)
    want_loss, want = local(fn, params, x, lib=torch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    for name in grads:
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)
