"""Helpers of the tracing tests (test_gradient_stops.py, test_inplace_tracing.py): a
function ``fn(lib, params, x)`` written once runs on gradmesh and on torch, eagerly and as
a traced graph."""
from __future__ import annotations

import numpy as np

import gradmesh.core as gm
from gradmesh.core.graph import trace


def batch(n: int) -> np.ndarray:
    """``n`` rows of 3 float64 features (the same rows for the same ``n``)."""
    return np.random.default_rng(n).standard_normal((n, 3))


def local(fn, params, x, lib=gm):
    """Loss and gradients of local ``backward()`` (``lib``: gradmesh or torch)."""
    leaves = {n: lib.tensor(a, requires_grad=True) for n, a in params.items()}
    loss = fn(lib, leaves, lib.tensor(x))
    loss.backward()
    grads = {n: (t.grad.detach().numpy() if t.grad is not None else np.zeros_like(params[n]))
             for n, t in leaves.items()}
    return loss.detach().numpy(), grads


def traced(fn, params, n: int = 4):
    """The graph of ``fn`` traced at batch size ``n``."""
    return trace(lambda p, x: fn(gm, p, x), {k: gm.tensor(v) for k, v in params.items()},
                 batch(n))
