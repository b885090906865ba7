"""Behaviour of gradmesh.core.nn.functional beyond the per-op specs in opspecs/nn.py:
dropout's seeding, error messages, numerical stability, and the adjoint helper ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core.registry import REGISTRY, OpError


def _t(a, requires_grad=False):
    return gm.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad)


# ======================================================================== dropout ======


def test_dropout_same_seed_same_mask_and_different_seed_differs():
    x = gm.ones(64, 32)
    a = F.dropout(x, 0.4, generator=gm.Generator().manual_seed(5))
    b = F.dropout(x, 0.4, generator=gm.Generator().manual_seed(5))
    c = F.dropout(x, 0.4, generator=gm.Generator().manual_seed(6))
    assert np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


def test_dropout_follows_the_global_seed():
    x = gm.ones(1000)
    gm.manual_seed(123)
    a = F.dropout(x, 0.5)
    a2 = F.dropout(x, 0.5)  # the generator advanced: a new mask
    gm.manual_seed(123)
    b = F.dropout(x, 0.5)
    assert np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), a2.numpy())


def test_dropout_mask_values_and_expectation():
    p = 0.3
    x = gm.ones(200_000, dtype=gm.float64)
    out = F.dropout(x, p, generator=gm.Generator().manual_seed(0)).numpy()
    assert set(np.unique(out)) == {0.0, 1.0 / (1.0 - p)}
    # Mean 1 in expectation; std of the sample mean here is about 0.0015.
    assert abs(out.mean() - 1.0) < 0.02
    assert abs((out == 0).mean() - p) < 0.01


def test_dropout_same_mask_in_float32_and_float64():
    g = gm.Generator().manual_seed(9)
    a = F.dropout(gm.ones(300, dtype=gm.float32), 0.5, generator=g.manual_seed(9))
    b = F.dropout(gm.ones(300, dtype=gm.float64), 0.5, generator=g.manual_seed(9))
    assert np.array_equal(a.numpy() == 0, b.numpy() == 0)


def test_dropout_eval_is_identity_and_p_one_zeroes():
    x = gm.randn(4, 5)
    assert F.dropout(x, 0.5, training=False) is x
    out = F.dropout(x, 1.0).numpy()
    assert np.array_equal(out, np.zeros((4, 5), dtype=np.float32))


def test_dropout_gradient_is_the_mask():
    x = _t(np.linspace(1, 2, 50), requires_grad=True)
    out = F.dropout(x, 0.5, generator=gm.Generator().manual_seed(1))
    out.sum().backward()
    kept = out.detach().numpy() != 0
    assert np.allclose(x.grad.numpy(), np.where(kept, 2.0, 0.0))


def test_dropout_rejects_bad_probability():
    with pytest.raises(ValueError, match="dropout.*1.5"):
        F.dropout(gm.ones(3), 1.5)


# ========================================================================= errors ======


def test_conv2d_channel_mismatch_names_op_and_both_shapes():
    x, w = gm.zeros(1, 4, 5, 5), gm.zeros(2, 3, 3, 3)
    with pytest.raises(OpError) as e:
        F.conv2d(x, w)
    msg = str(e.value)
    assert msg.startswith("conv2d:")
    assert "(1, 4, 5, 5)" in msg and "(2, 3, 3, 3)" in msg and "3 channels" in msg


def test_conv2d_kernel_larger_than_input():
    with pytest.raises(OpError, match=r"conv2d: the kernel 5x5"):
        F.conv2d(gm.zeros(1, 1, 3, 3), gm.zeros(1, 1, 5, 5))


def test_cross_entropy_target_shape_mismatch_is_clear():
    with pytest.raises(OpError) as e:
        F.cross_entropy(gm.zeros(3, 5), gm.tensor([0, 1]))
    msg = str(e.value)
    assert msg.startswith("cross_entropy:")
    assert "(3,)" in msg and "(3, 5)" in msg and "(2,)" in msg


def test_cross_entropy_float_class_indices_are_refused():
    with pytest.raises(OpError, match="cross_entropy: expected a target of class indices"):
        F.cross_entropy(gm.zeros(3, 5), gm.zeros(3))


def test_out_of_range_indices_are_refused():
    with pytest.raises(IndexError, match="nll_loss: target 5 is out of bounds for 5 classes"):
        F.cross_entropy(gm.zeros(2, 5), gm.tensor([1, 5]))
    with pytest.raises(IndexError, match="embedding: index 3 is out of range"):
        F.embedding(gm.tensor([0, 3]), gm.zeros(3, 2))


def test_layer_norm_and_pool_errors():
    with pytest.raises(OpError, match=r"layer_norm: normalized_shape \(4,\).*\(2, 3\)"):
        F.layer_norm(gm.zeros(2, 3), (4,))
    with pytest.raises(OpError, match="max_pool2d: padding should be at most half"):
        F.max_pool2d(gm.zeros(1, 1, 6, 6), 2, padding=2)
    with pytest.raises(OpError, match="nll_loss_weighted: expected a class weight of shape"):
        F.nll_loss(gm.zeros(2, 3), gm.tensor([0, 1]), weight=gm.ones(4))


def test_unsupported_arguments_raise_instead_of_being_ignored():
    with pytest.raises(NotImplementedError):
        F.max_pool2d(gm.zeros(1, 1, 4, 4), 2, return_indices=True)
    with pytest.raises(NotImplementedError):
        F.embedding(gm.tensor([0]), gm.zeros(2, 2), max_norm=1.0)


# ====================================================================== semantics ======


def test_embedding_repeated_indices_accumulate_and_padding_gets_none():
    w = _t(np.arange(8.0).reshape(4, 2), requires_grad=True)
    out = F.embedding(gm.tensor([[0, 2], [0, 1]]), w, padding_idx=1)
    assert np.array_equal(out.detach().numpy()[1, 1], [2.0, 3.0])  # padding row still read
    out.sum().backward()
    assert np.array_equal(w.grad.numpy(), [[2, 2], [0, 0], [1, 1], [0, 0]])


def test_max_pool_ties_send_the_gradient_to_the_first_max():
    x = _t(np.ones((1, 1, 2, 2)), requires_grad=True)
    F.max_pool2d(x, 2).sum().backward()
    assert np.array_equal(x.grad.numpy()[0, 0], [[1, 0], [0, 0]])


def test_max_pool_propagates_nan_like_torch():
    x = np.array([[[[1.0, np.nan], [3.0, 2.0]]]])
    out = F.max_pool2d(_t(x), 2).numpy()
    assert np.isnan(out).all()
    assert np.isnan(torch.nn.functional.max_pool2d(torch.tensor(x), 2).numpy()).all()


def test_losses_are_finite_for_extreme_logits():
    logits = np.array([[1e4, -1e4, 0.0], [-3e4, 2e4, 1e4]])
    target = np.array([1, 0])
    ours = F.cross_entropy(_t(logits), gm.tensor(target), reduction="none").numpy()
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits), torch.tensor(target), reduction="none"
    ).numpy()
    assert np.allclose(ours, ref) and np.isfinite(ours).all()
    x, y = np.array([-200.0, -50.0, 0.0, 50.0, 200.0]), np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    xt = _t(x, requires_grad=True)
    ours = F.binary_cross_entropy_with_logits(xt, _t(y), reduction="sum")
    ours.backward()
    tx = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(tx, torch.tensor(y), reduction="sum")
    ref.backward()
    assert np.isclose(ours.item(), ref.item()) and np.allclose(xt.grad.numpy(), tx.grad.numpy())


def test_cross_entropy_all_targets_ignored_gives_nan_like_torch():
    out = F.cross_entropy(gm.zeros(2, 3), gm.tensor([-100, -100]))
    assert np.isnan(out.item())


def test_float32_stays_float32():
    x = gm.randn(2, 3, 6, 6, requires_grad=True)
    w = gm.randn(4, 3, 3, 3, requires_grad=True)
    y = F.max_pool2d(F.conv2d(x, w, padding=1), 2)
    logits = F.layer_norm(y.reshape(2, -1), (y.numel() // 2,))
    loss = F.cross_entropy(F.dropout(logits, 0.2), gm.tensor([0, 1]))
    loss.backward()
    assert loss.dtype is gm.float32 and x.grad.dtype is gm.float32 and w.grad.dtype is gm.float32


def test_conv2d_matches_torch_on_a_larger_float32_case():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 17, 15)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 5)).astype(np.float32)
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    ours = F.conv2d(gm.tensor(x), gm.tensor(w), **kw).numpy()
    ref = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), **kw).numpy()
    assert np.allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_max_pool2d_select_vjp_is_max_pool2d_grad():
    # Only a third derivative reaches this op's vjp; check it directly against a gather.
    rng = np.random.default_rng(1)
    x, v, u = (rng.standard_normal((2, 3, 5, 5)) for _ in range(3))
    attrs = dict(kernel_size=[3, 3], stride=[2, 2], padding=[1, 1], dilation=[1, 1], ceil_mode=True)
    vt = _t(v, requires_grad=True)
    sel = REGISTRY["max_pool2d_select"](vt, _t(x), **attrs)
    (gv,) = gm.autograd.grad(sel, vt, _t(u[:, :, :3, :3]))
    _, idx = torch.nn.functional.max_pool2d(
        torch.tensor(x), 3, 2, 1, ceil_mode=True, return_indices=True
    )
    tv = torch.tensor(v, requires_grad=True)
    ref_sel = tv.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
    (ref,) = torch.autograd.grad(ref_sel, tv, torch.tensor(u[:, :, :3, :3]))
    assert np.allclose(sel.detach().numpy(), ref_sel.detach().numpy())
    assert np.allclose(gv.numpy(), ref.numpy())


# ============================================================================ GPU ======


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not gm.cuda_available():
        pytest.skip("needs a CUDA device and CuPy")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 9, 9))
    w = rng.standard_normal((6, 2, 3, 3))
    t = np.array([1, 3])

    def run(device):
        xs = gm.tensor(x, device=device, requires_grad=True)
        ws = gm.tensor(w, device=device, requires_grad=True)
        y = F.conv2d(xs, ws, stride=2, padding=1, groups=2)
        y = F.dropout(
            F.avg_pool2d(y, 2, ceil_mode=True) + F.max_pool2d(y, 2, ceil_mode=True),
            0.3,
            generator=gm.Generator().manual_seed(4),
        )
        logits = F.layer_norm(y.reshape(2, -1), (y.numel() // 2,))
        emb = F.embedding(gm.tensor(t, device=device), ws.reshape(6, -1))
        loss = F.cross_entropy(
            logits, gm.tensor(t, device=device), label_smoothing=0.1
        ) + F.mse_loss(emb, gm.zeros_like(emb))
        loss.backward()
        return [a.detach().cpu().numpy() for a in (y, loss, xs.grad, ws.grad)]

    for a, b in zip(run("cpu"), run("cuda")):
        assert np.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_softmax_implicit_dim_warns_and_follows_torch():
    x = np.random.default_rng(3).standard_normal((2, 3, 4))
    with pytest.warns(UserWarning, match="Implicit dimension"):
        ours = F.softmax(_t(x)).numpy()
    with pytest.warns(UserWarning):
        ref = torch.nn.functional.softmax(torch.tensor(x)).numpy()
    assert np.allclose(ours, ref)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gelu_gradient_near_zero_and_in_the_tails_matches_torch(dtype):
    # The vjp reads the normal cdf back from gelu's output (out / x) except near 0, where
    # it uses the series; both sides of the switch, 0 itself and the tails against torch.
    x = np.array([0.0, 1e-30, -2e-21, 1e-7, -1e-5, 9e-4, 0.3, -2.5, 6.0, -9.0], dtype=dtype)
    ours = gm.tensor(x, requires_grad=True)
    theirs = torch.tensor(x, requires_grad=True)
    F.gelu(ours).backward(gm.ones_like(ours))
    torch.nn.functional.gelu(theirs).backward(torch.ones_like(theirs))
    tol = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=tol, atol=tol)
