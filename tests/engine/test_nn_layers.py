"""The layers of convolutional and normalised models (BatchNorm, GroupNorm, RMSNorm,
SiLU/Mish/Hardswish, AdaptiveAvgPool2d, Conv1d, ConvTranspose2d, F.pad): modules against
torch.nn step by step (outputs, gradients, running statistics, state_dict), and in
traced graphs. The ops' own numerics are checked in tests/opspecs/norm.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tracing import assert_executed_equals_local, assert_plan_equals_local

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core import nn
from gradmesh.core.graph import execute, trace
from gradmesh.core.registry import OpError

torch.set_num_threads(1)


def _pair(gm_module, torch_module):
    """Give ``gm_module`` torch_module's (float64) parameters and buffers."""
    gm_module.load_state_dict(
        {k: gm.tensor(v.detach().numpy()) for k, v in torch_module.state_dict().items()}
    )
    return gm_module


def _step(gm_module, torch_module, x: np.ndarray):
    """One forward/backward of sum(out * w) in both; compares output and gradients."""
    xg, xt = gm.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out_g, out_t = gm_module(xg), torch_module(xt)
    w = np.random.default_rng(x.size).standard_normal(tuple(out_t.shape))
    np.testing.assert_allclose(
        out_g.detach().numpy(), out_t.detach().numpy(), rtol=1e-10, atol=1e-12
    )
    (out_g * gm.tensor(w)).sum().backward()
    (out_t * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(xg.grad.numpy(), xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    params_t = dict(torch_module.named_parameters())
    for name, p in gm_module.named_parameters():
        np.testing.assert_allclose(
            p.grad.numpy(), params_t[name].grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=name
        )


def _assert_state_equal(gm_module, torch_module):
    want = torch_module.state_dict()
    got = gm_module.state_dict()
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-12, err_msg=k)
        assert got[k].numpy().dtype == want[k].numpy().dtype, k


def _x(*shape, seed=0, loc=0.0):
    return np.random.default_rng(seed).normal(loc, 2.0, size=shape)


# ===================================================================== batch norm ======

BN_CASES = [
    ("BatchNorm1d", (6, 3), {}),
    ("BatchNorm1d", (4, 3, 5), dict(momentum=None)),
    ("BatchNorm2d", (2, 3, 4, 4), dict(momentum=0.3, eps=1e-3)),
    ("BatchNorm2d", (3, 3, 2, 2), dict(affine=False, momentum=None)),
    ("BatchNorm1d", (5, 3), dict(track_running_stats=False)),
    ("BatchNorm2d", (2, 3, 2, 3), dict(bias=False)),
]


@pytest.mark.parametrize("cls,shape,kw", BN_CASES, ids=[f"{c}-{kw}" for c, _, kw in BN_CASES])
def test_batch_norm_trains_and_evaluates_as_torch(cls, shape, kw):
    t = getattr(torch.nn, cls)(3, **kw).double()
    g = _pair(getattr(nn, cls)(3, **kw).double(), t)
    _assert_state_equal(g, t)
    for step in range(3):  # running stats after each step, momentum None included
        _step(g, t, _x(*shape, seed=step, loc=step))
        _assert_state_equal(g, t)
        for p in (*g.parameters(), *t.parameters()):
            p.grad = None
    g.eval(), t.eval()
    _step(g, t, _x(*shape, seed=9, loc=1.0))
    _assert_state_equal(g, t)  # eval leaves the statistics alone


def test_batch_norm_state_dict_and_buffers_match_torch():
    g, t = nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    assert list(g.state_dict()) == list(t.state_dict())
    assert [n for n, _ in g.named_buffers()] == [n for n, _ in t.named_buffers()]
    assert g.num_batches_tracked.dtype == gm.int64
    assert list(nn.BatchNorm1d(2, affine=False).state_dict()) == list(
        torch.nn.BatchNorm1d(2, affine=False).state_dict()
    )
    assert list(nn.BatchNorm1d(2, track_running_stats=False).state_dict()) == ["weight", "bias"]
    assert repr(g) == repr(t)


def test_batch_norm_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input"):
        nn.BatchNorm2d(3)(gm.zeros((2, 3, 4)))
    with pytest.raises(OpError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3)(gm.zeros((1, 3)))
    with pytest.raises(
        OpError,
        match=r"running_mean of shape \(4,\) must have one entry per "
        r"channel, shape \(3,\)",
    ):
        F.batch_norm(gm.zeros((2, 3)), gm.zeros(4), gm.ones(4))
    with pytest.raises(OpError, match="must be defined in evaluation mode"):
        F.batch_norm(gm.zeros((2, 3)), None, None, training=False)


def test_batch_norm_double_backward_matches_torch():
    x = _x(4, 3, 2, seed=3)
    grads = []
    for lib in (gm, torch):
        xs = lib.tensor(x, requires_grad=True)
        out = lib.nn.functional.batch_norm(xs, None, None, training=True)
        (gx,) = lib.autograd.grad((out**3).sum(), [xs], create_graph=True)
        grads.append(lib.autograd.grad((gx * gx).sum(), [xs])[0].detach().numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-9, atol=1e-10)


# ========================================================= the other new modules ======

MODULE_CASES = [
    ("SiLU", (), (4, 5)),
    ("Mish", (), (4, 5)),
    ("Hardswish", (), (4, 5)),
    ("GroupNorm", (2, 4), (3, 4, 3, 2)),
    ("GroupNorm", (4, 4, 1e-3, False), (2, 4, 5)),
    ("RMSNorm", ((3, 4),), (2, 3, 4)),
    ("RMSNorm", (4, 1e-2, False), (5, 4)),
    ("AdaptiveAvgPool2d", ((3, 2),), (2, 3, 7, 5)),
    ("AdaptiveAvgPool2d", (1,), (2, 3, 4, 4)),
    ("Conv1d", (3, 4, 3), (2, 3, 9)),
    ("Conv1d", (4, 2, 2, 2, 1, 1, 2, False), (2, 4, 7)),
    ("ConvTranspose2d", (3, 2, 3), (2, 3, 4, 4)),
    ("ConvTranspose2d", (4, 6, 3, 2, 1, 1, 2), (2, 4, 3, 5)),
    ("Upsample", (None, 2), (2, 3, 3, 4)),
    ("Upsample", ((4, 5), None, "bilinear"), (1, 2, 3, 3)),
]


@pytest.mark.parametrize(
    "cls,args,shape", MODULE_CASES, ids=[f"{c}{a}" for c, a, _ in MODULE_CASES]
)
def test_module_matches_torch(cls, args, shape):
    t = getattr(torch.nn, cls)(*args).double()
    g = getattr(nn, cls)(*args).double()
    assert repr(g) == repr(t)
    assert list(g.state_dict()) == list(t.state_dict())
    assert [tuple(p.shape) for p in g.parameters()] == [tuple(p.shape) for p in t.parameters()]
    _step(_pair(g, t), t, _x(*shape, seed=len(shape)))


def test_default_initialisation_matches_torch_layout():
    # Norm layers start at weight 1, bias 0; conv layers within torch's kaiming bound.
    assert np.all(nn.GroupNorm(2, 4).weight.detach().numpy() == 1)
    assert np.all(nn.RMSNorm(3).weight.detach().numpy() == 1)
    w = nn.ConvTranspose2d(4, 6, 3, groups=2).weight.detach().numpy()
    assert w.shape == (4, 3, 3, 3) and np.abs(w).max() <= 1 / np.sqrt(3 * 9)


def test_conv_transpose2d_is_the_adjoint_of_conv2d():
    x, y = _x(2, 3, 5, 5, seed=1), _x(2, 4, 3, 3, seed=2)
    w = gm.tensor(_x(4, 3, 3, 3, seed=3))
    lhs = (F.conv2d(gm.tensor(x), w, stride=2, padding=1) * gm.tensor(y)).sum()
    rhs = (gm.tensor(x) * F.conv_transpose2d(gm.tensor(y), w, stride=2, padding=1)).sum()
    assert abs(lhs.item() - rhs.item()) < 1e-9 * abs(lhs.item())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: F.pad(gm.zeros((2, 3)), (3, 0), "reflect"), "less than the dim's size"),
        (lambda: F.pad(gm.zeros((2, 3)), (1, 1, 1), "constant"), "must be even"),
        (lambda: F.pad(gm.zeros((2, 3)), (1, 1), "wrap"), "mode must be one of"),
        (lambda: F.pad(gm.zeros((2, 3)), (-4, 0)), "negative"),
        (lambda: F.group_norm(gm.zeros((2, 6, 3)), 4), "divisible by num_groups=4"),
        (lambda: F.rms_norm(gm.zeros((2, 3)), (4,)), "trailing dimensions"),
        (
            lambda: F.conv_transpose2d(gm.zeros((1, 3, 4, 4)), gm.zeros((2, 3, 3, 3))),
            "expects an input with 2 channels",
        ),
        (
            lambda: F.conv_transpose2d(
                gm.zeros((1, 2, 4, 4)), gm.zeros((2, 3, 3, 3)), stride=2, output_padding=2
            ),
            "output_padding",
        ),
        (lambda: F.adaptive_avg_pool2d(gm.zeros((2, 3)), 1), "3-D or 4-D input"),
        (lambda: F.interpolate(gm.zeros((2, 3, 4)), size=5, mode="bilinear"), "expects a 4-D"),
        (lambda: F.interpolate(gm.zeros((2, 3, 4)), size=5, mode="bicubic"), "not supported"),
    ],
)
def test_errors_name_op_and_shapes(call, match):
    with pytest.raises((OpError, NotImplementedError), match=match):
        call()


def test_pad_non_constant_mode_rank_is_checked_as_torch():
    with pytest.raises(NotImplementedError, match="reflect padding of 1 dims"):
        F.pad(gm.zeros((2, 2, 2, 3)), (1, 1), "reflect")
    with pytest.raises(NotImplementedError):
        torch.nn.functional.pad(torch.zeros(2, 2, 2, 3), (1, 1), "reflect")


# ========================================================================= graphs ======

P3 = {"w": np.array([1.5, -0.5, 2.0]), "b": np.array([0.1, 0.2, -0.3])}


def _bn_eval(lib, p, x):
    rm = lib.tensor([0.1, -0.2, 0.3], dtype=lib.float64)
    rv = lib.tensor([1.0, 0.5, 2.0], dtype=lib.float64)
    return (lib.nn.functional.batch_norm(x, rm, rv, p["w"], p["b"]) ** 2).sum()


def _bn_train(lib, p, x):
    out = lib.nn.functional.batch_norm(x, None, None, p["w"], p["b"], training=True)
    return (out**3).sum()


def _layers(lib, p, x):
    nf = lib.nn.functional
    y = nf.silu(x * p["w"]) + nf.mish(x) + nf.hardswish(x + p["b"])
    y = nf.pad(y.reshape(-1, 1, 3), (2, 1), "reflect") + nf.pad(y.reshape(-1, 1, 3), (1, 2))
    y = nf.conv1d(y, p["w"].reshape(1, 1, 3), p["b"][:1], padding=1)
    y = nf.group_norm(y.reshape(-1, 2, 3), 2, p["w"][:2], p["b"][:2])
    y = nf.adaptive_avg_pool2d(y.reshape(-1, 1, 2, 3), (1, 2))
    y = nf.conv_transpose2d(y, p["w"].reshape(1, 1, 1, 3), stride=2, output_padding=1)
    y = nf.interpolate(y, scale_factor=2, mode="bilinear") + nf.interpolate(y, scale_factor=2)
    return (nf.rms_norm(y, (y.shape[-1],), eps=1e-3) ** 2).sum()


@pytest.mark.parametrize("fn", [_bn_eval, _bn_train, _layers])
def test_graph_runs_as_local_and_torch(fn):
    assert_executed_equals_local(fn, P3)
    assert_plan_equals_local(fn, P3)


def test_layers_match_torch_in_one_function():
    from tracing import assert_local_matches_torch

    for fn in (_bn_eval, _bn_train, _layers):
        assert_local_matches_torch(fn, P3)


def _cnn(lib):
    tnn = lib.nn
    return tnn.Sequential(
        tnn.Conv2d(1, 3, 3, padding=1),
        tnn.BatchNorm2d(3),
        tnn.SiLU(),
        tnn.AdaptiveAvgPool2d(1),
        tnn.Flatten(),
        tnn.Linear(3, 2),
    )


def test_batch_norm_module_in_a_graph_in_eval_mode_reads_constant_statistics():
    # Train mode is tests/engine/test_graph_buffers.py: the statistics are graph state.
    model = _cnn(gm).double()
    x = np.random.default_rng(0).standard_normal((4, 1, 5, 5))
    model(gm.tensor(x))  # one training step moves the statistics
    model.eval()
    graph = trace(lambda m, x: (m(x) ** 2).sum(), model, x)
    params = dict(model.named_parameters())
    x2 = np.random.default_rng(1).standard_normal((6, 1, 5, 5))
    got = execute(graph, params, {"x0": x2})["loss"]
    want = (model(gm.tensor(x2)) ** 2).sum()
    assert np.array_equal(got.detach().numpy(), want.detach().numpy())


def test_embedding_padding_row_gets_no_gradient_as_torch():
    t = torch.nn.Embedding(5, 3, padding_idx=2).double()
    g = _pair(nn.Embedding(5, 3, padding_idx=2).double(), t)
    idx = np.array([[2, 0, 2], [4, 2, 1]])
    w = np.random.default_rng(0).standard_normal((2, 3, 3))
    (g(gm.tensor(idx)) * gm.tensor(w)).sum().backward()
    (t(torch.tensor(idx)) * torch.tensor(w)).sum().backward()
    grad = g.weight.grad.numpy()
    assert np.all(grad[2] == 0) and np.any(grad[0] != 0)
    np.testing.assert_allclose(grad, t.weight.grad.numpy(), rtol=1e-12)
