"""gradmesh.core.nn modules: structure, names, state_dict, modes, initialisation, repr.

Architectures are written once, as a function of the ``nn`` namespace, and built with both
torch.nn and gradmesh.core.nn, so names, order and repr are compared to torch's own.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

import gradmesh.core as gm
from gradmesh.core import nn
from gradmesh.core.nn import init


def _net(lib):
    """A model exercising every kind of registration, in torch.nn's vocabulary."""
    tnn = lib.nn

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.features = tnn.Sequential(
                tnn.Conv2d(1, 4, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten()
            )
            self.blocks = tnn.ModuleList(
                [tnn.Linear(64, 16), tnn.LayerNorm(16), tnn.Linear(16, 16), tnn.Linear(16, 16)]
            )
            self.embed = tnn.Embedding(10, 16, padding_idx=0)
            self.head = tnn.Linear(16, 3, bias=False)
            self.tied = self.head  # a shared module is listed once
            self.drop = tnn.Dropout(0.25)
            self.act = tnn.GELU(approximate="tanh")
            self.misc = tnn.Sequential(
                tnn.Identity(),
                tnn.Tanh(),
                tnn.Sigmoid(),
                tnn.LeakyReLU(0.2),
                tnn.Softmax(dim=1),
                tnn.LogSoftmax(dim=-1),
                tnn.AvgPool2d(2, stride=1),
                tnn.Conv2d(2, 4, (3, 1), stride=2, bias=False, groups=2, dilation=(1, 2)),
            )
            self.loss = tnn.CrossEntropyLoss()
            self.register_buffer("scale", lib.ones(3))
            self.register_buffer("scratch", lib.zeros(2), persistent=False)
            self.register_buffer("nothing", None)

    return Net()


def _shapes(pairs):
    return [(name, tuple(t.shape)) for name, t in pairs]


def test_parameter_names_order_and_shapes_match_torch():
    ours, theirs = _net(gm), _net(torch)
    assert _shapes(ours.named_parameters()) == _shapes(theirs.named_parameters())
    assert _shapes(ours.named_buffers()) == _shapes(theirs.named_buffers())
    assert _shapes(ours.state_dict().items()) == _shapes(theirs.state_dict().items())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()]
    assert len(list(ours.parameters())) == len(list(theirs.parameters()))
    assert [n for n, _ in ours.named_parameters(recurse=False)] == []
    assert all(isinstance(p, nn.Parameter) and isinstance(p, gm.Tensor) for p in ours.parameters())


def test_repr_matches_torch():
    ours, theirs = _net(gm), _net(torch)
    assert repr(ours) == repr(theirs)

    def stack(lib):
        return lib.nn.ModuleList([lib.nn.Linear(2, 2) for _ in range(3)] + [lib.nn.ReLU()])

    assert repr(stack(gm)) == repr(stack(torch))
    conv = lambda lib: lib.nn.Conv2d(3, 6, 5, padding="same")  # noqa: E731
    assert repr(conv(gm)) == repr(conv(torch))
    assert repr(nn.LayerNorm([2, 3], elementwise_affine=False)) == repr(
        torch.nn.LayerNorm([2, 3], elementwise_affine=False)
    )


def test_parameter_is_a_leaf_and_ops_on_it_give_plain_tensors():
    t = gm.tensor([1.0, 2.0])
    p = nn.Parameter(t)
    assert isinstance(p, gm.Tensor) and p.requires_grad and p.is_leaf
    assert type(p * 2) is gm.Tensor and type(p.detach()) is gm.Tensor
    assert p._data is t._data  # shares memory, like torch
    assert repr(p).startswith("Parameter containing:\ntensor([1., 2.], requires_grad=True)")
    (p * p).sum().backward()
    assert p.grad.tolist() == [2.0, 4.0]
    assert not nn.Parameter(gm.zeros(2), requires_grad=False).requires_grad


def _tiny(lib, seed):
    """A model whose forward needs no nn.functional: a parameter and a buffer."""

    class Tiny(lib.nn.Module):
        def __init__(self):
            super().__init__()
            g = np.random.default_rng(seed)
            self.w = lib.nn.Parameter(lib.tensor(g.standard_normal((2, 3))))
            self.inner = lib.nn.Sequential(lib.nn.Tanh())
            self.inner.register_parameter("v", lib.nn.Parameter(lib.tensor(g.standard_normal(3))))
            self.register_buffer("count", lib.tensor([float(seed)]))

        def forward(self, x):
            return self.inner(x @ self.w) * self.inner.v

    return Tiny()


def test_state_dict_round_trip_copies_values_and_keeps_parameters():
    a, b = _tiny(gm, 1), _tiny(gm, 2)
    params_before = list(b.parameters())
    assert list(a.state_dict()) == ["w", "count", "inner.v"]
    result = b.load_state_dict(a.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert [p is q for p, q in zip(b.parameters(), params_before)] == [True, True]
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=k)
    # A copy, not an alias: changing the source later leaves b alone.
    a.w.data = a.w.detach() * 0 + 5
    with gm.no_grad():
        a.inner.v.fill_(7.0)
    assert b.inner.v.detach().numpy().max() < 7.0
    x = gm.randn(4, 2, dtype=gm.float64)
    np.testing.assert_array_equal(
        b(x).detach().numpy(), _load(_tiny(gm, 3), _tiny(gm, 1))(x).detach().numpy()
    )


def _load(dst, src):
    dst.load_state_dict(src.state_dict())
    return dst


def test_state_dict_values_are_detached_and_share_memory():
    m = _tiny(gm, 1)
    sd = m.state_dict()
    assert not sd["w"].requires_grad and type(sd["w"]) is gm.Tensor
    assert sd["w"]._data is m.w._data
    assert m.state_dict(keep_vars=True)["w"] is m.w


def test_load_state_dict_from_torch_by_key():
    ours, theirs = _tiny(gm, 1), _tiny(torch, 2)
    ours.load_state_dict(theirs.state_dict())
    x = np.random.default_rng(0).standard_normal((4, 2))
    np.testing.assert_allclose(
        ours(gm.tensor(x)).detach().numpy(), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-12
    )


def test_load_state_dict_errors_name_keys_and_shapes():
    m = _tiny(gm, 1)
    good = m.state_dict()
    before = m.w.detach().numpy().copy()

    missing = {k: v for k, v in good.items() if k != "inner.v"}
    with pytest.raises(RuntimeError, match=r'Tiny:\n\tMissing key\(s\) in state_dict: "inner.v"'):
        m.load_state_dict(missing)

    extra = {**good, "head.bias": gm.zeros(3), "w2": gm.zeros(1)}
    with pytest.raises(
        RuntimeError,
        match=r'Unexpected key\(s\) in state_dict: "head.bias", '
        r'"w2"',
    ):
        m.load_state_dict(extra)

    bad = {**good, "w": gm.zeros(3, 2, dtype=gm.float64) + 9}
    with pytest.raises(
        RuntimeError,
        match=r"size mismatch for w: copying a param with shape "
        r"\(3, 2\) from checkpoint, the shape in current "
        r"model is \(2, 3\)",
    ):
        m.load_state_dict(bad, strict=False)  # shape errors are never skipped
    np.testing.assert_array_equal(m.w.detach().numpy(), before)  # nothing was copied

    result = m.load_state_dict({**missing, "w2": gm.zeros(1)}, strict=False)
    assert result.missing_keys == ["inner.v"] and result.unexpected_keys == ["w2"]


def test_setattr_rules():
    m = nn.Module()
    m.p = nn.Parameter(gm.zeros(2))
    with pytest.raises(TypeError, match="cannot assign 'Tensor' as parameter 'p'"):
        m.p = gm.zeros(2)
    m.p = None
    assert list(m.named_parameters()) == [] and m.p is None
    m.register_buffer("b", gm.ones(1))
    with pytest.raises(TypeError, match="as buffer 'b'"):
        m.b = 3
    m.child = nn.Identity()
    del m.child
    assert list(m.children()) == []
    with pytest.raises(AttributeError, match="'Module' object has no attribute 'nope'"):
        _ = m.nope

    class Forgot(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(gm.zeros(1))

    with pytest.raises(AttributeError, match=r"before Module.__init__\(\) call"):
        Forgot()
    with pytest.raises(NotImplementedError, match='missing the required "forward"'):
        nn.Module()(1)


def test_train_eval_reach_every_module():
    m = _net(gm)
    assert all(x.training for x in m.modules())
    assert m.eval() is m
    assert not any(x.training for x in m.modules())
    m.train()
    assert all(x.training for x in m.modules())


def test_dropout_is_active_only_in_training():
    drop = nn.Sequential(nn.Dropout(0.5))
    x = gm.ones(2000, dtype=gm.float64)
    gm.manual_seed(0)
    y = drop(x).numpy()
    assert set(np.unique(y)) == {0.0, 2.0}  # dropped, or scaled by 1/(1-p)
    assert 0.4 < (y == 0).mean() < 0.6
    drop.eval()
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(1.5)


def test_to_double_float_keeps_parameter_objects():
    m = _tiny(gm, 1).float()
    params = list(m.parameters())
    assert all(p.dtype is gm.float32 for p in params) and m.count.dtype is gm.float32
    m.to(gm.float64)
    assert [p is q for p, q in zip(m.parameters(), params)] == [True, True]
    assert all(p.dtype is gm.float64 for p in m.parameters())
    m.w.grad = gm.zeros(2, 3, dtype=gm.float64)
    m.float()
    assert m.w.grad.dtype is gm.float32
    idx = nn.Module()
    idx.register_buffer("ids", gm.tensor([1, 2]))
    idx.double()
    assert idx.ids.dtype is gm.int64  # only floating tensors convert
    with pytest.raises(TypeError, match="floating point"):
        m.to(gm.int64)


def test_deepcopy_and_pickle_give_independent_models():
    m = _tiny(gm, 1)
    clone = copy.deepcopy(m)
    assert isinstance(clone.w, nn.Parameter) and clone.w.requires_grad
    np.testing.assert_array_equal(clone.w.detach().numpy(), m.w.detach().numpy())
    assert clone.w._data is not m.w._data and clone.count._data is not m.count._data
    seq = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    back = pickle.loads(pickle.dumps(seq))
    assert repr(back) == repr(seq)
    for (k, a), (_, b) in zip(seq.state_dict().items(), back.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
    assert isinstance(back[0].weight, nn.Parameter) and back[0].weight.requires_grad


def test_zero_grad_and_requires_grad():
    m = _tiny(gm, 1)
    m(gm.randn(3, 2, dtype=gm.float64)).sum().backward()
    assert m.w.grad is not None
    m.zero_grad(set_to_none=False)
    assert m.w.grad.shape == (2, 3) and not m.w.grad.numpy().any()
    m.zero_grad()
    assert m.w.grad is None and m.inner.v.grad is None
    m.requires_grad_(False)
    assert not any(p.requires_grad for p in m.parameters())


def test_sequential_and_module_list_behave_like_lists():
    layers = [nn.Tanh(), nn.ReLU(), nn.Identity()]
    seq = nn.Sequential(*layers)
    assert len(seq) == 3 and seq[0] is layers[0] and seq[-1] is layers[2]
    assert list(seq) == layers and isinstance(seq[1:], nn.Sequential) and len(seq[1:]) == 2
    with pytest.raises(IndexError, match="index 3 is out of range"):
        seq[3]
    del seq[0]
    assert [n for n, _ in seq.named_children()] == ["0", "1"] and seq[0] is layers[1]
    x = gm.tensor([-1.0, 2.0])
    assert seq(x).tolist() == [0.0, 2.0]
    ml = nn.ModuleList(layers[:2])
    assert ml.append(layers[2]) is ml
    ml.insert(0, nn.Sigmoid())
    assert (
        len(ml) == 4
        and ml[1] is layers[0]
        and [n for n, _ in ml.named_children()] == ["0", "1", "2", "3"]
    )


# ----------------------------------------------------------------- initialisation ------


def test_linear_and_conv_default_init_bounds():
    gm.manual_seed(0)
    lin = nn.Linear(100, 50)
    bound = 1 / math.sqrt(100)
    w = lin.weight.detach().numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound  # U(-b, b) has std b/sqrt3
    assert abs(w.mean()) < 0.05 * bound
    b = lin.bias.detach().numpy()
    assert np.abs(b).max() <= bound and len(np.unique(b)) == 50
    conv = nn.Conv2d(3, 8, 3)
    cb = 1 / math.sqrt(27)
    assert conv.weight.shape == (8, 3, 3, 3)
    assert np.abs(conv.weight.detach().numpy()).max() <= cb
    assert np.abs(conv.bias.detach().numpy()).max() <= cb
    assert lin.weight.dtype is gm.float32
    assert nn.Linear(2, 2, dtype=gm.float64).weight.dtype is gm.float64


def test_embedding_and_layer_norm_default_init():
    gm.manual_seed(0)
    emb = nn.Embedding(1000, 16, padding_idx=3)
    w = emb.weight.detach().numpy()
    assert not w[3].any()
    rest = np.delete(w, 3, axis=0)
    assert abs(rest.mean()) < 0.02 and abs(rest.std() - 1) < 0.02
    ln = nn.LayerNorm(5)
    assert ln.weight.tolist() == [1.0] * 5 and ln.bias.tolist() == [0.0] * 5


def test_init_is_seeded_by_manual_seed():
    gm.manual_seed(42)
    a = nn.Linear(4, 3).weight.detach().numpy()
    gm.manual_seed(42)
    b = nn.Linear(4, 3).weight.detach().numpy()
    c = nn.Linear(4, 3).weight.detach().numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)


@pytest.mark.parametrize("shape", [(5, 3), (8, 3, 3, 3), (4, 2, 5), (7, 1)])
def test_fan_in_and_fan_out_match_torch(shape):
    ours = init.calculate_fan_in_and_fan_out(gm.zeros(*shape))
    assert ours == torch.nn.init._calculate_fan_in_and_fan_out(torch.zeros(*shape))


def test_init_functions():
    gm.manual_seed(0)
    t = gm.zeros(200, 300, dtype=gm.float64)
    bound = math.sqrt(6 / 500)
    init.xavier_uniform_(t)
    assert np.abs(t.numpy()).max() <= bound and abs(t.numpy().std() - bound / math.sqrt(3)) < 0.01
    init.kaiming_uniform_(t, nonlinearity="relu")
    kb = math.sqrt(2) * math.sqrt(3 / 300)
    assert np.abs(t.numpy()).max() <= kb and np.abs(t.numpy()).max() > 0.99 * kb
    init.normal_(t, mean=2.0, std=0.5)
    assert abs(t.numpy().mean() - 2.0) < 0.01 and abs(t.numpy().std() - 0.5) < 0.01
    init.uniform_(t, -3.0, -2.0)
    assert t.numpy().min() >= -3.0 and t.numpy().max() < -2.0
    assert init.zeros_(t) is t and not t.numpy().any()
    assert (init.ones_(t).numpy() == 1).all()
    assert init.calculate_gain("leaky_relu", math.sqrt(5)) == pytest.approx(
        torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    )
    with pytest.raises(ValueError, match="fewer than 2 dimensions, got shape \\(3,\\)"):
        init.kaiming_uniform_(gm.zeros(3))
    with pytest.raises(TypeError, match="floating point"):
        init.normal_(gm.zeros(3, 3, dtype=gm.int64))
