"""What the engine's fast paths promise: the shortcuts taken for speed change no result.

* the backward engine skips ``infer`` validation only while running vjps without
  ``create_graph``, and never leaves that mode switched on;
* weight gradients of ``x @ w.T`` reach ``w.grad`` row-major and without a copy, and no
  ``.grad`` ever aliases another one or the caller's ``gradient``;
* NumPy's ``where`` is replaced by a bitwise select that gives the same bits;
* a float32 model stays float32 in every intermediate, forward and backward.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core import autograd, nn, optim
from gradmesh.core.ops.elementwise import _select

gm_tensor = sys.modules["gradmesh.core.hooks"]


class _Watch:
    """A dispatch tracer that notes, for every op run, its name, result and grad mode."""

    def __init__(self):
        self.runs: list[tuple[str, bool, object]] = []

    def record(self, op, inputs, attrs, result) -> None:
        self.runs.append((op.name, autograd._state.trusted, result))


def _watching(fn):
    watch = _Watch()
    previous, gm_tensor._dispatch.tracer = gm_tensor._dispatch.tracer, watch
    try:
        fn()
    finally:
        gm_tensor._dispatch.tracer = previous
    return watch.runs


def _mlp_loss(x, w1, b1, w2, b2):
    return ((x @ w1.T + b1).relu() @ w2.T + b2).square().sum()


def _params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in ((8, 5), (7, 5), (7,), (3, 7), (3,))]


# ------------------------------------------------------------------ validation mode ------


def test_backward_runs_vjps_unvalidated_and_restores_validation():
    x, *ps = _params()
    params = [gm.tensor(p, requires_grad=True) for p in ps]
    loss = _mlp_loss(gm.tensor(x), *params)
    runs = _watching(loss.backward)
    assert runs and all(trusted for _name, trusted, _r in runs)
    assert autograd._state.trusted is False and autograd.is_grad_enabled()
    with pytest.raises(gm.OpError, match="mm: expected 2-D"):
        gm.mm(gm.ones(2), gm.ones(2, 1))


def test_create_graph_keeps_validation():
    x = gm.tensor([1.0, 2.0], requires_grad=True)
    y = (x**3).sum()
    runs = _watching(lambda: autograd.grad(y, x, create_graph=True))
    assert runs and not any(trusted for _name, trusted, _r in runs)


def test_validation_comes_back_after_an_error_in_backward():
    x = gm.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()
    assert autograd._state.trusted is False and autograd.is_grad_enabled()


def test_grad_mode_is_per_thread():
    import threading

    seen = []
    with gm.no_grad():
        t = threading.Thread(target=lambda: seen.append(gm.is_grad_enabled()))
        t.start()
        t.join()
    assert seen == [True]


# -------------------------------------------------------------- gradients in memory ------


def _torch_grads(x, ps):
    tp = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in ps]
    _mlp_loss(torch.tensor(x, dtype=torch.float64), *tp).backward()
    return [t.grad.numpy() for t in tp]


def test_linear_weight_grads_are_row_major_and_right():
    x, *ps = _params()
    params = [gm.tensor(p, requires_grad=True) for p in ps]
    _mlp_loss(gm.tensor(x), *params).backward()
    for p, want in zip(params, _torch_grads(x, ps)):
        data = p.grad._data
        assert data.flags.c_contiguous and data.flags.writeable
        assert data.dtype == np.float32 and data.shape == p.shape
        np.testing.assert_allclose(data, want, rtol=1e-4, atol=1e-5)


def test_untransposed_matmul_grads_are_row_major():
    a = gm.randn(4, 3, requires_grad=True)
    b = gm.randn(3, 5, requires_grad=True)
    (a @ b).sum().backward()
    assert a.grad._data.flags.c_contiguous and b.grad._data.flags.c_contiguous


def test_leaf_grads_never_alias_each_other():
    a = gm.randn(4, requires_grad=True)
    c = gm.randn(2, 2, requires_grad=True)
    (a.reshape(2, 2) + c).sum().backward()
    assert not np.shares_memory(a.grad._data, c.grad._data)
    a.grad.zero_()
    assert c.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_leaf_grads_never_alias_the_callers_gradient():
    a = gm.randn(4, requires_grad=True)
    c = gm.randn(2, 2, requires_grad=True)
    v = gm.ones(2, 2)
    a.reshape(2, 2).backward(v)
    (c + 0).backward(v)
    assert not np.shares_memory(a.grad._data, v._data)
    assert not np.shares_memory(c.grad._data, v._data)


def test_broadcast_grads_are_writable():
    a = gm.randn(3, requires_grad=True)
    a.sum().backward()
    a.grad.mul_(2)
    assert a.grad.tolist() == [2.0, 2.0, 2.0]


# ----------------------------------------------------------------- bitwise select ------


@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_]
)
@pytest.mark.parametrize(
    "shapes",
    [
        ((70, 80), (70, 80), ()),
        ((70, 80), (70, 80), (70, 80)),
        ((70, 80), (80,), (70, 1)),
        ((70, 1), (70, 80), ()),
        ((70, 80), (), (70, 80)),
        ((5000,), (5000,), ()),
    ],
)
def test_select_gives_the_bits_of_numpy_where(dtype, shapes):
    rng = np.random.default_rng(1)
    sc, sa, sb = shapes
    cond = rng.random(sc) > 0.5
    a = rng.standard_normal(sa).astype(dtype)
    b = rng.standard_normal(sb).astype(dtype) if sb else np.zeros((), dtype)
    if dtype in (np.float32, np.float64) and a.size > 5:
        a.flat[:5] = [np.nan, -0.0, np.inf, -np.inf, 0.0]
    want = np.where(cond, a, b)
    got = _select(np, cond, a, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()


def test_select_keeps_a_negative_zero_as_the_other_value():
    cond = np.random.default_rng(2).random((80, 80)) > 0.5
    a = np.ones((80, 80), np.float32)
    minus_zero = np.asarray(-0.0, np.float32)
    assert _select(np, cond, a, minus_zero).tobytes() == np.where(cond, a, minus_zero).tobytes()


def test_relu_grad_is_zero_where_masked_even_for_nan():
    x = gm.tensor([-1.0, 2.0, -3.0], requires_grad=True)
    x.relu().backward(gm.tensor([float("nan"), 5.0, float("inf")]))
    assert x.grad.tolist() == [0.0, 5.0, 0.0]


# ------------------------------------------------------------------------ dtypes ------


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_float32_model_has_no_float64_intermediate(loss):
    gm.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = optim.SGD(model.parameters(), lr=0.1)
    x = gm.randn(5, 6)
    y = gm.tensor([0, 1, 2, 3, 0]) if loss == "ce" else gm.randn(5, 4)
    fn = F.cross_entropy if loss == "ce" else F.mse_loss

    def step():
        opt.zero_grad()
        fn(model(x), y).backward()
        opt.step()

    runs = _watching(step)
    floats = {r.dtype for _name, _trusted, r in runs if r.dtype.is_floating_point}
    assert floats == {gm.float32}
    assert all(p.dtype is gm.float32 and p.grad.dtype is gm.float32 for p in model.parameters())


def test_dtype_of_non_singleton_numpy_dtypes():
    s = gm.tensor([1, 2], dtype=gm.int32).sum()  # NumPy gives a fresh int64 dtype object
    assert s.dtype is gm.int64
    assert gm.from_numpy(np.zeros(2, np.dtype("float32").newbyteorder("="))).dtype is gm.float32
