"""Kernels rewritten for speed keep their values:

* float32 erf (exact GELU) in NumPy passes instead of SciPy's float64 one, on arrays of
  4096 values and more: within 1.5e-7 of float64 erf, GELU against torch;
* conv2d's input gradient at stride 1 as a convolution with the flipped, transposed
  kernel (col2im elsewhere), and the weight gradient as patches times g^T: against torch
  in float64, with padding, dilation, groups, and the fallbacks;
* lstm_layer's backward from the gate activations its forward kept after its output, or
  recomputed where the output was copied: against torch in float64, both directions;
* the embedding gradient on NumPy as sorted segments (``add.reduceat``) instead of
  ``add.at``: against torch, repeated indices and padding_idx;
* ReLU's gradient as a bitwise select, BatchNorm and LayerNorm in fewer passes, GELU's
  erf in reused blocks, in-place softmax, and a (..., K) @ (K, N) product's matrix
  gradient as one 2-D product: against torch, and the same bits as before where the
  computation is meant to be unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opspecs.nn import _lstm_layer_reference as lstm_layer_reference
from scipy.special import erf

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core.ops import nn as nn_ops
from gradmesh.core.ops.elementwise import _erf


def _float32_grid() -> np.ndarray:
    dense = np.linspace(-7, 7, 400_001, dtype=np.float32)
    special = [0.0, -0.0, 1e-30, -1e-30, 1e-45, 0.99999994, 1.0, -1.0, 3e38, -3e38]
    return np.concatenate([dense, np.float32(special), np.float32([np.inf, -np.inf])])


def test_float32_erf_is_within_1p5e_7_of_float64_erf():
    x = _float32_grid()
    got = _erf(np, x)
    assert got.dtype == np.float32
    assert np.abs(got.astype(np.float64) - erf(x.astype(np.float64))).max() <= 1.5e-7
    assert np.signbit(got[x == 0]).tolist() == np.signbit(x[x == 0]).tolist()
    assert np.isnan(_erf(np, np.full(5000, np.nan, np.float32))).all()


def test_float32_gelu_matches_torch_forward_and_backward():
    x = np.random.default_rng(0).uniform(-6, 6, (64, 128)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    a = gm.tensor(x, requires_grad=True)
    out = F.gelu(a)
    out.backward(gm.tensor(g))
    t = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.gelu(t)
    ref.backward(torch.tensor(g))
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-6, atol=3e-6)
    np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-5, atol=3e-6)


def _gelu_float64(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def test_float32_gelu_is_as_close_to_the_truth_as_scipys():
    x = np.linspace(-5, 5, 200_001, dtype=np.float32)
    truth = _gelu_float64(x.astype(np.float64))
    ours = F.gelu(gm.tensor(x)).numpy().astype(np.float64)
    assert np.abs(ours - truth).max() <= 5e-7


@pytest.mark.parametrize(
    "cin, cout, stride, padding, dilation, groups",
    [
        (4, 6, 1, 1, 1, 1),  # the CNN's 3x3 layers
        (4, 6, 1, 0, 1, 1),
        (4, 6, 1, 2, 2, 2),  # dilated, grouped
        (4, 4, 1, 3, 1, 4),  # padding beyond the kernel: col2im
        (4, 6, 2, 1, 1, 2),  # stride 2: col2im
        (3, 5, (1, 2), (1, 0), (2, 1), 1),  # per-axis attributes
    ],
)
def test_conv2d_gradients_match_torch(cin, cout, stride, padding, dilation, groups):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, cin, 9, 8))
    w = rng.standard_normal((cout, cin // groups, 3, 3))
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    _check_conv2d_against_torch(rng, x, w, kw)


def _check_conv2d_against_torch(rng, x, w, kw) -> None:
    """conv2d's output and both gradients (for a random cotangent) against torch's, in
    float64."""
    gx, gw = gm.tensor(x, requires_grad=True), gm.tensor(w, requires_grad=True)
    out = F.conv2d(gx, gw, **kw)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ref = torch.nn.functional.conv2d(tx, tw, **kw)
    v = rng.standard_normal(tuple(ref.shape))
    out.backward(gm.tensor(v))
    ref.backward(torch.tensor(v))
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gx.grad.numpy(), tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gw.grad.numpy(), tw.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "tile_bytes",
    [1, 3000, 40000, 1 << 30],
    ids=["row-per-tile", "rows-per-tile", "images-per-tile", "whole-batch"],
)
@pytest.mark.parametrize("stride, dilation, groups", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_conv2d_in_tiles_matches_torch(tile_bytes, stride, dilation, groups, monkeypatch):
    """The CPU convolution copies and multiplies patches a tile at a time: one output row,
    several rows of one image, several images, or the whole batch give torch's values and
    gradients."""
    monkeypatch.setattr(nn_ops, "_TILE_BYTES", tile_bytes)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 4, 13, 11))
    w = rng.standard_normal((6, 4 // groups, 3, 3))
    kw = dict(stride=stride, padding=1, dilation=dilation, groups=groups)
    _check_conv2d_against_torch(rng, x, w, kw)


def test_conv2d_of_an_empty_batch_is_empty_as_in_torch():
    w = np.ones((4, 3, 3, 3))
    gx = gm.zeros((0, 3, 8, 8), dtype=gm.float64, requires_grad=True)
    gw = gm.tensor(w, requires_grad=True)
    tx = torch.zeros((0, 3, 8, 8), dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    out, ref = F.conv2d(gx, gw, padding=1), torch.nn.functional.conv2d(tx, tw, padding=1)
    assert tuple(out.shape) == tuple(ref.shape) == (0, 4, 8, 8)
    out.sum().backward()
    ref.sum().backward()
    assert tuple(gx.grad.shape) == (0, 3, 8, 8)
    np.testing.assert_array_equal(gw.grad.numpy(), tw.grad.numpy())


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("state_rows", [3, 1])  # the batch's states, or one broadcast row
def test_lstm_layer_kept_activations_and_recomputed_ones_give_torchs_gradients(reverse, state_rows):
    # The forward keeps its gate activations after its output (time-major); the backward
    # reads them from there, or recomputes them from a copy of the output.
    from gradmesh.core.ops.nn import _kept_activations, _lstm_layer_grad

    rng = np.random.default_rng(3)
    n, length, hs = 3, 5, 4
    arrays = [
        rng.uniform(-1.5, 1.5, (n, length, 4 * hs)),
        rng.uniform(-1, 1, (state_rows, hs)),
        rng.uniform(-1, 1, (state_rows, hs)),
        rng.uniform(-1, 1, (4 * hs, hs)),
    ]
    ours = [gm.tensor(a, requires_grad=True) for a in arrays]
    out = gm.REGISTRY["lstm_layer"](*ours, reverse=reverse)
    kept = _kept_activations(np, out.detach().numpy())
    assert kept is not None and kept.shape == (length, n, 4 * hs)
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    ref = lstm_layer_reference(torch, *theirs, reverse)
    v = rng.standard_normal(tuple(ref.shape))
    out.backward(gm.tensor(v))
    ref.backward(torch.tensor(v))
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    for a, t in zip(ours, theirs):
        np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-10, atol=1e-12)
    copied = out.detach().numpy().copy()
    assert _kept_activations(np, copied) is None
    recomputed = _lstm_layer_grad(np, v, copied, *arrays, reverse=reverse)
    kept_path = _lstm_layer_grad(np, v, out.detach().numpy(), *arrays, reverse=reverse)
    np.testing.assert_allclose(kept_path, recomputed, rtol=1e-12, atol=1e-12)


def test_lstm_layer_keeps_no_activations_without_grad():
    from gradmesh.core.ops.nn import _kept_activations

    xw, h0, c0, w = (gm.ones(2, 3, 8), gm.zeros(1, 2), gm.zeros(1, 2), gm.ones(8, 2))
    with gm.no_grad():
        out = gm.REGISTRY["lstm_layer"](xw, h0, c0, w, reverse=False)
    assert out.numpy().base is None and _kept_activations(np, out.numpy()) is None


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_gradient_by_sorted_segments_matches_torch(padding_idx):
    # Repeated, unsorted indices (each row of the table several times), a row never named.
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((7, 5))
    indices = rng.integers(0, 6, (4, 9))
    v = rng.standard_normal((4, 9, 5))
    w = gm.tensor(weight, requires_grad=True)
    F.embedding(gm.tensor(indices), w, padding_idx=padding_idx).backward(gm.tensor(v))
    tw = torch.tensor(weight, requires_grad=True)
    torch.nn.functional.embedding(torch.tensor(indices), tw, padding_idx=padding_idx).backward(
        torch.tensor(v)
    )
    np.testing.assert_allclose(w.grad.numpy(), tw.grad.numpy(), rtol=1e-12, atol=1e-12)
    assert not w.grad.numpy()[6].any()


def test_embedding_gradient_of_no_indices_is_zero():
    w = gm.tensor(np.ones((3, 2)), requires_grad=True)
    F.embedding(gm.tensor(np.zeros((0,), np.int64)), w).sum().backward()
    assert w.grad.numpy().tolist() == [[0.0, 0.0]] * 3


@pytest.mark.parametrize("shape", [(5000,), (3, 40000), (70001,)])
def test_float32_erf_blocks_match_one_block(shape, monkeypatch):
    """erf runs in blocks of _ERF_BLOCK values through reused scratch buffers: every block,
    the last partial one included, gives the bits of the array done in one block."""
    from gradmesh.core.ops import elementwise

    x = np.random.default_rng(3).uniform(-6, 6, shape).astype(np.float32)
    x.reshape(-1)[:4] = [0.0, -0.0, np.inf, np.nan]
    blocked = _erf(np, x[..., ::-1])  # a strided view: read through a contiguous copy
    monkeypatch.setattr(elementwise, "_ERF_BLOCK", x.size)
    whole = _erf(np, np.ascontiguousarray(x[..., ::-1]))
    assert blocked.shape == x.shape
    np.testing.assert_array_equal(blocked.view(np.int32), whole.view(np.int32))
    truth = erf(x[..., ::-1].astype(np.float64))
    assert np.isnan(whole).tolist() == np.isnan(truth).tolist()
    assert np.nanmax(np.abs(whole - truth)) <= 1.5e-7


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_relu_gradient_bitwise_select_matches_where(dtype):
    """ReLU's vjp selects g's bits where not a <= 0 (+0.0 elsewhere), as
    where(a <= 0, 0, g) does, NaN and infinite gradients and a NaN input included; against
    torch too, which passes the gradient through at a NaN input."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 7, 5)).astype(dtype)
    x.reshape(-1)[:3] = [0.0, -0.0, np.nan]
    g = rng.standard_normal(x.shape).astype(dtype)
    g.reshape(-1)[3:9] = [np.nan, np.inf, -np.inf, -0.0, np.nan, -np.inf]
    a = gm.tensor(x, requires_grad=True)
    F.relu(a).backward(gm.tensor(g))
    expected = np.where(x <= 0, np.zeros((), dtype), g)
    got = a.grad.numpy()
    assert got.dtype == np.dtype(dtype)
    ints = f"i{got.dtype.itemsize}"
    np.testing.assert_array_equal(got.view(ints), expected.view(ints))
    t = torch.tensor(x, requires_grad=True)
    torch.relu(t).backward(torch.tensor(g))
    np.testing.assert_array_equal(got.view(ints), t.grad.numpy().view(ints))


def _batch_norm_and_grads(lib, x, v, w):
    """batch_norm's output and the gradients of x and weight, in float64."""
    if lib is torch:
        a, gw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
        out = torch.nn.functional.batch_norm(a, None, None, gw, None, training=True)
        out.backward(torch.tensor(v))
    else:
        a, gw = gm.tensor(x, requires_grad=True), gm.tensor(w, requires_grad=True)
        out = F.batch_norm(a, None, None, gw, None, training=True)
        out.backward(gm.tensor(v))
    return [t.detach().numpy().astype(np.float64) for t in (out, a.grad, gw.grad)]


def test_batch_norm_one_pass_statistics_match_torch():
    """batch_norm and its gradient from channel dot products: against torch in float64,
    and in float32 as close to the float64 values as torch's float32 (within 1.5x), with a
    channel whose mean is 10^4 standard deviations from 0 (the variance is taken around
    the mean: E[x^2] - mean^2 would lose it all in float32)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 3, 6, 5)) * np.array([0.5, 2.0, 1e-2])[:, None, None] + 100.0
    v, w = rng.standard_normal(x.shape), rng.standard_normal(3)
    truth = _batch_norm_and_grads(torch, x, v, w)
    for ours, theirs in zip(_batch_norm_and_grads(gm, x, v, w), truth):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    f32 = [a.astype(np.float32) for a in (x, v, w)]
    for ours, theirs, exact in zip(
        _batch_norm_and_grads(gm, *f32), _batch_norm_and_grads(torch, *f32), truth
    ):
        assert np.abs(ours - exact).max() <= 1.5 * np.abs(theirs - exact).max() + 1e-6


def _layer_norm_and_grad(lib, x, v):
    functional = torch.nn.functional if lib is torch else F
    a = lib.tensor(x, requires_grad=True)
    out = functional.layer_norm(a, x.shape[-2:])
    out.backward(lib.tensor(v))
    return [t.detach().numpy().astype(np.float64) for t in (out, a.grad)]


def test_layer_norm_one_pass_statistics_match_torch():
    """layer_norm and its gradient from row dot products, over two trailing dims and on
    a transposed input: against torch in float64, and in float32 as close to the float64
    values as torch's float32 (within 1.5x), with rows far from 0."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 5, 7, 6)) * np.array([1.0, 1e-2, 3.0, 0.5, 2.0])[:, None, None]
    x = (x + 50.0).transpose(0, 1, 3, 2)
    v = rng.standard_normal(x.shape)
    truth = _layer_norm_and_grad(torch, x, v)
    for ours, theirs in zip(_layer_norm_and_grad(gm, x, v), truth):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    f32 = [a.astype(np.float32) for a in (x, v)]
    for ours, theirs, exact in zip(
        _layer_norm_and_grad(gm, *f32), _layer_norm_and_grad(torch, *f32), truth
    ):
        assert np.abs(ours - exact).max() <= 1.5 * np.abs(theirs - exact).max() + 1e-6


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gelu_gradient_at_and_near_zero_matches_torch(dtype):
    """GELU's vjp reads cdf back as out / a, and takes the series where |a| < 1e-20 (found
    with two comparisons, no |a| array): against torch there, and around it."""
    from gradmesh.core.ops.elementwise import _gelu_vjp_from_out

    rng = np.random.default_rng(7)
    a = rng.uniform(-6, 6, (3, 7001)).astype(dtype)
    a[2, -8:] = [0.0, -0.0, 1e-30, -1e-25, 1e-21, -1e-20, 1e-19, np.nan]
    g = rng.standard_normal(a.shape).astype(dtype)
    out = F.gelu(gm.tensor(a)).numpy()
    with np.errstate(invalid="ignore"):
        ours = _gelu_vjp_from_out(np, g, out, a)
    t = torch.tensor(a, requires_grad=True)
    torch.nn.functional.gelu(t).backward(torch.tensor(g))
    np.testing.assert_allclose(ours, t.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, dim", [((), 0), ((3, 5, 7), 1), ((4, 9), -1)])
def test_softmax_kernels_in_place_match_torch(shape, dim):
    """softmax, log_softmax and their gradients work in place on their fresh arrays: a
    0-d input (where NumPy returns scalars, not arrays) and other dims against torch."""
    rng = np.random.default_rng(8)
    x, v = rng.standard_normal(shape) * 4, rng.standard_normal(shape)
    for ours_fn, torch_fn in ((F.softmax, torch.softmax), (F.log_softmax, torch.log_softmax)):
        a = gm.tensor(x, requires_grad=True)
        out = ours_fn(a, dim=dim)
        out.backward(gm.tensor(v))
        t = torch.tensor(x, requires_grad=True)
        ref = torch_fn(t, dim=dim)
        ref.backward(torch.tensor(v))
        np.testing.assert_allclose(
            out.detach().numpy(), ref.detach().numpy(), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transposed", [True, False])
def test_rows_times_matrix_gradients_match_torch(transposed):
    """(..., K) @ (K, N): b's gradient is one product over all rows (not one per leading
    index, summed): against torch in float64, a transposed weight's gradient row-major,
    and double backward through it."""
    rng = np.random.default_rng(9)
    x, v = rng.standard_normal((3, 4, 5, 6)), rng.standard_normal((3, 4, 5, 7))
    w = rng.standard_normal((7, 6) if transposed else (6, 7))
    a, gw = gm.tensor(x, requires_grad=True), gm.tensor(w, requires_grad=True)
    t, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    out = gm.matmul(a, gw.T if transposed else gw)
    ref = torch.matmul(t, tw.T if transposed else tw)
    (ga, gb) = gm.autograd.grad(out, [a, gw], gm.tensor(v), create_graph=True)
    (ta, tb) = torch.autograd.grad(ref, [t, tw], torch.tensor(v), create_graph=True)
    for ours, theirs in ((out, ref), (ga, ta), (gb, tb)):
        np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=1e-12)
    assert gb.detach().numpy().flags.c_contiguous
    (gb * gb).sum().backward()
    (tb * tb).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-12)
