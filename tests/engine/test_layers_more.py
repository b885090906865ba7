"""Containers (ModuleDict, ParameterList, ParameterDict), ``finfo``/``iinfo``, Unflatten,
the padding and pixel-shuffle layers, 1-d and adaptive max pooling and instance norm:
against torch (values, gradients, state_dict keys, reprs, errors), max-pool ties, and a
model using them traced into a graph. The functions' numerics (float32/float64, finite
differences, second order) are specs in tests/opspecs/pooling.py."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core import nn
from gradmesh.core.graph import execute, trace
from gradmesh.core.registry import OpError

torch.set_num_threads(1)


def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _ties(*shape, seed=0):
    """Small integers: many equal values in each pooling window."""
    return np.random.default_rng(seed).integers(0, 3, shape).astype(np.float64)


def _from_torch(gm_module, torch_module):
    gm_module.load_state_dict(
        {k: gm.tensor(v.detach().numpy()) for k, v in torch_module.state_dict().items()}
    )
    return gm_module


def _compare(gm_fn, torch_fn, x: np.ndarray, params=(), dtype=np.float64):
    """Output, input gradient and the gradients of ``params`` ((gm, torch) Parameter pairs)
    of sum(out * w), gradmesh against torch."""
    x = x.astype(dtype)
    xg, xt = gm.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out_g, out_t = gm_fn(xg), torch_fn(xt)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_g.detach().numpy(), out_t.detach().numpy(), **tol)
    w = np.random.default_rng(1).standard_normal(tuple(out_t.shape)).astype(dtype)
    (out_g * gm.tensor(w)).sum().backward()
    (out_t * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(xg.grad.numpy(), xt.grad.numpy(), **tol)
    for pg, pt in params:
        np.testing.assert_allclose(pg.grad.numpy(), pt.grad.numpy(), **tol)


def _compare_modules(gm_module, torch_module, x, dtype=np.float64):
    torch_module = torch_module.to(torch.float64 if dtype == np.float64 else torch.float32)
    gm_module = _from_torch(gm_module.to(gm.dtypes.from_numpy(dtype)), torch_module)
    params = dict(torch_module.named_parameters())
    pairs = [(p, params[name]) for name, p in gm_module.named_parameters()]
    assert len(pairs) == len(params)
    _compare(gm_module, torch_module, x, pairs, dtype)


# ============================================================== containers ======


def _with_containers(lib):
    tnn = lib.nn

    class Model(tnn.Module):
        def __init__(self):
            super().__init__()
            self.heads = tnn.ModuleDict({"b": tnn.Linear(3, 2), "a": tnn.Linear(3, 2)})
            self.scales = tnn.ParameterList([tnn.Parameter(lib.ones(2)), lib.zeros(2) + 0.5])
            self.shifts = tnn.ParameterDict({"y": lib.zeros(2), "x": tnn.Parameter(lib.ones(2))})

        def forward(self, x):
            out = self.heads["a"](x) * self.scales[0] + self.heads["b"](x) * self.scales[1]
            for key in self.shifts:
                out = out + self.shifts[key]
            return out

    return Model()


def test_container_names_and_state_dict_keys_are_torchs():
    torch.manual_seed(0)
    t, g = _with_containers(torch), _with_containers(gm)
    assert [n for n, _ in g.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert (
        list(g.state_dict())
        == list(t.state_dict())
        == [
            "heads.b.weight",
            "heads.b.bias",
            "heads.a.weight",
            "heads.a.bias",
            "scales.0",
            "scales.1",
            "shifts.x",
            "shifts.y",
        ]
    )
    _from_torch(g, t)
    x = _x(4, 3).astype(np.float32)
    np.testing.assert_allclose(
        g(gm.tensor(x)).detach().numpy(), t(torch.tensor(x)).detach().numpy(), rtol=1e-6
    )
    assert isinstance(g.scales[1], nn.Parameter) and isinstance(g.shifts["y"], nn.Parameter)
    # And back: gradmesh's state_dict loads into the torch model, key for key.
    for p in g.parameters():
        p.data.mul_(2.0)
    t.load_state_dict({k: torch.tensor(v.numpy()) for k, v in g.state_dict().items()})
    for k, v in t.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), g.state_dict()[k].numpy(), err_msg=k)


def test_module_dict_api_as_torch():
    d = nn.ModuleDict([("z", nn.ReLU()), ("a", nn.Tanh())])
    assert list(d) == list(d.keys()) == ["z", "a"]
    d.update(OrderedDict(b=nn.Linear(1, 1)))
    d["c"] = nn.Identity()
    assert "b" in d and "q" not in d and len(d) == 4
    assert [type(m).__name__ for m in d.values()] == ["ReLU", "Tanh", "Linear", "Identity"]
    assert isinstance(d.pop("z"), nn.ReLU) and list(d) == ["a", "b", "c"]
    del d["a"]
    assert [k for k, _ in d.items()] == ["b", "c"]
    assert [n for n, _ in d.named_parameters()] == ["b.weight", "b.bias"]
    with pytest.raises(KeyError):
        d["missing"]
    with pytest.raises(TypeError, match="iterable of key/value pairs"):
        d.update(3)
    with pytest.raises(ValueError, match="has length 3; 2 is required"):
        d.update([("a", nn.ReLU(), 1)])
    d.clear()
    assert len(d) == 0 and repr(d) == repr(torch.nn.ModuleDict()) == "ModuleDict()"


def test_module_dict_repr_is_torchs():
    t = torch.nn.ModuleDict({"b": torch.nn.Linear(1, 2), "a": torch.nn.ReLU()})
    assert repr(nn.ModuleDict({"b": nn.Linear(1, 2), "a": nn.ReLU()})) == repr(t)


def test_parameter_list_api_as_torch():
    p = nn.ParameterList([gm.ones(2)])
    p.append(nn.Parameter(gm.zeros(3)))
    p.extend([gm.ones(1), gm.ones(4)])
    p += [gm.zeros(5)]
    assert len(p) == 5 and [tuple(q.shape) for q in p] == [(2,), (3,), (1,), (4,), (5,)]
    assert all(isinstance(q, nn.Parameter) and q.requires_grad for q in p)
    assert tuple(p[-1].shape) == (5,)
    part = p[1:4:2]
    assert isinstance(part, nn.ParameterList) and [tuple(q.shape) for q in part] == [(3,), (4,)]
    assert part[0] is p[1]
    p[0] = gm.full((2,), 7.0)
    assert p[0].tolist() == [7.0, 7.0] and isinstance(p[0], nn.Parameter)
    assert [n for n, _ in p.named_parameters()] == ["0", "1", "2", "3", "4"]
    with pytest.raises(IndexError, match="out of range"):
        p[5]
    with pytest.raises(TypeError, match="iterable"):
        p.extend(gm.ones(2))
    with pytest.raises(RuntimeError, match="should not be called"):
        p(gm.ones(2))


def test_parameter_containers_repr_is_torchs_with_gradmesh_dtypes():
    g = nn.ParameterList([nn.Parameter(gm.zeros(2, 3)), gm.zeros(3)])
    t = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2, 3)), torch.zeros(3)])
    assert repr(g) == repr(t).replace("torch.", "gradmesh.")
    g = nn.ParameterDict({"b": gm.zeros(2, 3), "a": gm.zeros(3)})
    t = torch.nn.ParameterDict({"b": torch.zeros(2, 3), "a": torch.zeros(3)})
    assert repr(g) == repr(t).replace("torch.FloatTensor", "gradmesh.float32")
    assert repr(nn.ParameterList()) == "ParameterList()"


def test_parameter_dict_api_and_update_order_as_torch():
    t = torch.nn.ParameterDict({"b": torch.ones(1), "a": torch.ones(1)})
    g = nn.ParameterDict({"b": gm.ones(1), "a": gm.ones(1)})
    t.update(OrderedDict(d=torch.ones(1), c=torch.ones(1)))
    g.update(OrderedDict(d=gm.ones(1), c=gm.ones(1)))
    t.update([("f", torch.ones(1)), ("e", torch.ones(1))])
    g.update([("f", gm.ones(1)), ("e", gm.ones(1))])
    assert list(g.keys()) == list(t.keys()) == ["a", "b", "d", "c", "f", "e"]
    assert [n for n, _ in g.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert g.pop("d") is not None and "d" not in g and list(g) == ["a", "b", "c", "f", "e"]
    assert g.popitem()[0] == "e" and g.get("zz", 3) == 3
    assert g.setdefault("n", gm.zeros(2)).tolist() == [0.0, 0.0] and list(g)[-1] == "n"
    merged = g | nn.ParameterDict({"m": gm.ones(1)})
    assert list(merged) == ["a", "b", "c", "f", "n", "m"] and merged["a"] is g["a"]
    g["obj"] = "not a tensor"  # kept as a plain attribute, as torch does
    assert g["obj"] == "not a tensor" and "obj" not in dict(g.named_parameters())
    with pytest.raises(TypeError, match="not a string"):
        g[0]
    with pytest.raises(KeyError, match="attribute 'update' already exists"):
        g["update"] = gm.ones(1)
    g.clear()
    assert len(g) == 0 and list(g.named_parameters()) == []


def test_container_model_traces_with_state_dict_names_and_graph_gradients():
    model = _with_containers(gm).double()
    x = _x(5, 3)
    graph = trace(lambda m, x: (m(x) ** 2).sum(), model, x)
    params = dict(model.named_parameters())
    assert [i.name for i in graph.inputs if i.name in params] == list(model.state_dict())
    loss = execute(graph, params, {"x0": x})["loss"]
    loss.backward()
    from_graph = {n: p.grad.numpy().copy() for n, p in params.items()}
    model.zero_grad()
    (model(gm.tensor(x)) ** 2).sum().backward()
    for name, p in params.items():
        np.testing.assert_array_equal(from_graph[name], p.grad.numpy(), err_msg=name)


# ================================================================ finfo, iinfo ======


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64"])
def test_finfo_is_torchs(name):
    got, want = gm.finfo(getattr(gm, name)), torch.finfo(getattr(torch, name))
    for attr in ("bits", "eps", "max", "min", "tiny", "smallest_normal", "resolution", "dtype"):
        assert getattr(got, attr) == getattr(want, attr), attr
        assert type(getattr(got, attr)) is type(getattr(want, attr)), attr
    assert repr(got) == repr(want)
    assert gm.finfo(name) == got


@pytest.mark.parametrize("name", ["int32", "int64"])
def test_iinfo_is_torchs(name):
    got, want = gm.iinfo(getattr(gm, name)), torch.iinfo(getattr(torch, name))
    assert (got.bits, got.min, got.max, got.dtype) == (want.bits, want.min, want.max, want.dtype)
    assert type(got.max) is int and repr(got) == repr(want)


def test_finfo_defaults_to_the_default_float_and_bad_types_raise_type_error():
    assert gm.finfo() == gm.finfo(gm.float32) and gm.finfo().eps == torch.finfo().eps
    with pytest.raises(TypeError, match="requires a floating point input type"):
        gm.finfo(gm.int32)
    with pytest.raises(TypeError, match="requires an integer input type"):
        gm.iinfo(gm.float16)
    with pytest.raises(TypeError, match="bool is not supported"):
        gm.iinfo(gm.bool)


# ================================================== unflatten, padding, shuffle ======


def test_unflatten_as_torch():
    _compare_modules(nn.Unflatten(1, (2, -1)), torch.nn.Unflatten(1, (2, -1)), _x(3, 6, 2))
    assert repr(nn.Unflatten(1, (2, 3))) == repr(torch.nn.Unflatten(1, (2, 3)))
    with pytest.raises(TypeError, match="unflattened_size"):
        nn.Unflatten(1, 6)


PADS = [
    ("ZeroPad1d", (2,), (2, 3, 5)),
    ("ZeroPad1d", ((1, -1),), (3, 5)),
    ("ZeroPad2d", ((1, 2, 0, 3),), (2, 3, 4, 5)),
    ("ConstantPad1d", ((3, 1), 2.5), (2, 3, 5)),
    ("ConstantPad2d", (1, -1.0), (3, 4, 5)),
    ("ReflectionPad1d", ((2, 3),), (2, 3, 5)),
    ("ReflectionPad2d", (2,), (2, 3, 4, 5)),
    ("ReplicationPad1d", ((3, 0),), (3, 5)),
    ("ReplicationPad2d", ((1, 2, 3, 4),), (1, 2, 4, 5)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, args, shape", PADS)
def test_padding_layers_as_torch(name, args, shape, dtype):
    g, t = getattr(nn, name)(*args), getattr(torch.nn, name)(*args)
    assert repr(g) == repr(t)
    _compare_modules(g, t, _x(*shape), dtype)


def test_padding_layers_refuse_a_wrong_length():
    with pytest.raises(ValueError, match="padding must be an int or a 4-tuple"):
        nn.ZeroPad2d((1, 2))
    with pytest.raises(ValueError, match="padding must be an int or a 2-tuple"):
        nn.ReflectionPad1d((1, 2, 3))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(2, 18, 2, 3), (9, 1, 2), (2, 1, 9, 3, 2)])
def test_pixel_shuffle_and_unshuffle_as_torch(shape, dtype):
    _compare_modules(nn.PixelShuffle(3), torch.nn.PixelShuffle(3), _x(*shape), dtype)
    unshuffled = shape[:-3] + (shape[-3] // 9, shape[-2] * 3, shape[-1] * 3)
    _compare_modules(nn.PixelUnshuffle(3), torch.nn.PixelUnshuffle(3), _x(*unshuffled), dtype)
    x = gm.tensor(_x(*shape))
    assert gm.equal(F.pixel_unshuffle(F.pixel_shuffle(x, 3), 3), x)
    assert repr(nn.PixelShuffle(3)) == repr(torch.nn.PixelShuffle(3))
    assert repr(nn.PixelUnshuffle(2)) == repr(torch.nn.PixelUnshuffle(2))


def test_pixel_shuffle_errors_are_runtime_errors_naming_the_argument():
    for fn in (F.pixel_shuffle, torch.nn.functional.pixel_shuffle):
        with pytest.raises(RuntimeError, match="divisible by the square of upscale_factor"):
            fn((gm if fn is F.pixel_shuffle else torch).ones(1, 5, 2, 2), 2)
    with pytest.raises(RuntimeError, match="at least 3 dimensions"):
        F.pixel_shuffle(gm.ones(4, 2), 2)
    with pytest.raises(RuntimeError, match="positive upscale_factor"):
        F.pixel_shuffle(gm.ones(1, 4, 2, 2), 0)
    with pytest.raises(RuntimeError, match="downscale_factor"):
        F.pixel_unshuffle(gm.ones(1, 1, 3, 4), 2)


# ================================================================= pooling ======


POOLS = [
    ("MaxPool1d", (3,), {}, (2, 3, 9)),
    ("MaxPool1d", (3, 2, 1), {"dilation": 2, "ceil_mode": True}, (3, 10)),
    ("AvgPool1d", (3,), {}, (2, 3, 9)),
    ("AvgPool1d", (4, 3, 2), {"ceil_mode": True, "count_include_pad": False}, (2, 2, 11)),
    ("AvgPool1d", (2, 1, 1), {"count_include_pad": True}, (3, 7)),
    ("AdaptiveAvgPool1d", (4,), {}, (2, 3, 10)),
    ("AdaptiveAvgPool1d", (7,), {}, (3, 7)),
    ("AdaptiveMaxPool1d", (4,), {}, (2, 3, 10)),
    ("AdaptiveMaxPool1d", (6,), {}, (3, 4)),
    ("AdaptiveMaxPool2d", ((3, 4),), {}, (2, 3, 7, 10)),
    ("AdaptiveMaxPool2d", ((None, 2),), {}, (3, 5, 7)),
    ("AdaptiveMaxPool2d", (1,), {}, (2, 2, 4, 3)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, args, kwargs, shape", POOLS)
def test_pooling_layers_as_torch(name, args, kwargs, shape, dtype):
    g, t = getattr(nn, name)(*args, **kwargs), getattr(torch.nn, name)(*args, **kwargs)
    assert repr(g) == repr(t)
    _compare_modules(g, t, _x(*shape), dtype)


@pytest.mark.parametrize("name, args, kwargs, shape", [p for p in POOLS if "Max" in p[0]])
def test_max_pool_ties_send_the_gradient_where_torch_does(name, args, kwargs, shape):
    g, t = getattr(nn, name)(*args, **kwargs), getattr(torch.nn, name)(*args, **kwargs)
    for seed in range(3):
        _compare_modules(g, t, _ties(*shape, seed=seed))


def test_adaptive_max_pool2d_all_equal_window_sends_its_gradient_to_the_first_element():
    x = gm.zeros(1, 1, 3, 5, requires_grad=True)
    F.adaptive_max_pool2d(x, (2, 2)).sum().backward()
    xt = torch.zeros(1, 1, 3, 5, requires_grad=True)
    torch.nn.functional.adaptive_max_pool2d(xt, (2, 2)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), xt.grad.numpy())
    assert x.grad.numpy().sum() == 4


def test_pooling_errors_name_the_argument():
    with pytest.raises(NotImplementedError, match="return_indices=True is not supported"):
        nn.AdaptiveMaxPool2d(2, return_indices=True)(gm.ones(1, 1, 4, 4))
    with pytest.raises(NotImplementedError, match="return_indices"):
        F.adaptive_max_pool1d(gm.ones(1, 4), 2, return_indices=True)
    with pytest.raises(NotImplementedError, match="return_indices"):
        F.max_pool1d(gm.ones(1, 4), 2, return_indices=True)
    for fn in (F.max_pool1d, F.avg_pool1d):
        with pytest.raises(RuntimeError, match="expected a 2-D .* or 3-D"):
            fn(gm.ones(1, 1, 2, 4), 2)
    with pytest.raises(RuntimeError, match="kernel_size must be an int or a 1-tuple"):
        F.max_pool1d(gm.ones(1, 4), (2, 2))
    with pytest.raises(RuntimeError, match="output_size must be positive"):
        F.adaptive_avg_pool1d(gm.ones(1, 4), 0)
    with pytest.raises(RuntimeError, match="output_size must be an int or 2 ints"):
        F.adaptive_max_pool2d(gm.ones(1, 4, 4), (1, 2, 3))
    with pytest.raises(RuntimeError, match="non-zero spatial size"):
        F.adaptive_max_pool2d(gm.ones(1, 0, 4), 2)
    for lib in (torch, gm):
        for fn in (lib.nn.functional.max_pool1d, lib.nn.functional.avg_pool1d):
            with pytest.raises(RuntimeError, match="pad.* should be at most half of .*kernel size"):
                fn(lib.ones(1, 4), 2, padding=2)


# ============================================================= instance norm ======


INSTANCE = [
    ("InstanceNorm1d", {}, (2, 3, 5)),
    ("InstanceNorm1d", {"affine": True}, (3, 6)),
    ("InstanceNorm2d", {"affine": True, "eps": 1e-3}, (2, 3, 4, 5)),
    ("InstanceNorm2d", {"affine": True, "bias": False}, (3, 4, 2)),
    ("InstanceNorm2d", {"track_running_stats": True, "momentum": 0.3}, (2, 3, 4, 5)),
    ("InstanceNorm1d", {"affine": True, "track_running_stats": True, "momentum": None}, (4, 3, 5)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, kwargs, shape", INSTANCE)
def test_instance_norm_train_then_eval_as_torch(name, kwargs, shape, dtype):
    t = getattr(torch.nn, name)(3, **kwargs)
    g = getattr(nn, name)(3, **kwargs)
    assert repr(g) == repr(t) and list(g.state_dict()) == list(t.state_dict())
    tol = dict(rtol=1e-12) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-7)
    for step in range(2):  # training moves the running statistics, if tracked
        _compare_modules(g, t, _x(*shape, seed=step) * 3 + 1, dtype)
        g.zero_grad(), t.zero_grad()
    for key, value in t.state_dict().items():
        if key != "num_batches_tracked":  # torch's is never counted either
            np.testing.assert_allclose(g.state_dict()[key].numpy(), value.numpy(), **tol)
    g.eval(), t.eval()
    _compare_modules(g, t, _x(*shape, seed=5), dtype)


def test_instance_norm_function_with_running_statistics_as_torch():
    x = _x(4, 3, 6) * 2 + 1
    stats_g = [gm.tensor(_x(3, seed=1)), gm.tensor(np.abs(_x(3, seed=2)) + 0.5)]
    stats_t = [torch.tensor(s.numpy()) for s in stats_g]
    for use_input_stats in (True, False):
        _compare(
            lambda x: F.instance_norm(x, *stats_g, None, None, use_input_stats, 0.2),
            lambda x: torch.nn.functional.instance_norm(
                x, *stats_t, None, None, use_input_stats, 0.2
            ),
            x,
        )
        for a, b in zip(stats_g, stats_t):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


def test_instance_norm_errors_as_torch():
    with pytest.raises(ValueError, match="expected 3D or 4D input"):
        nn.InstanceNorm2d(3)(gm.ones(2, 3))
    with pytest.raises(ValueError, match="to match num_features"):
        nn.InstanceNorm1d(4, affine=True)(gm.ones(2, 3, 5))
    with pytest.warns(UserWarning, match="does not match num_features"):
        nn.InstanceNorm1d(4)(gm.ones(2, 3, 5))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        F.instance_norm(gm.ones(2, 3, 1))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        torch.nn.functional.instance_norm(torch.ones(2, 3, 1))
    with pytest.raises(RuntimeError, match="running_mean and running_var must be defined"):
        F.instance_norm(gm.ones(2, 3, 4), use_input_stats=False)
    with pytest.raises(RuntimeError, match="weight of shape"):
        F.instance_norm(gm.ones(2, 3, 4), weight=gm.ones(2))


# ================================================================== addbmm ======


def test_addbmm_as_torch_and_its_errors():
    c, a, b = _x(3, 5), _x(4, 3, 2, seed=1), _x(4, 2, 5, seed=2)
    got = gm.addbmm(gm.tensor(c), gm.tensor(a), gm.tensor(b), beta=0.5, alpha=2)
    want = torch.addbmm(torch.tensor(c), torch.tensor(a), torch.tensor(b), beta=0.5, alpha=2)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)
    with pytest.raises(RuntimeError, match="cannot be broadcast"):
        gm.addbmm(gm.ones(3, 4), gm.tensor(a), gm.tensor(b))
    with pytest.raises(OpError):
        gm.addbmm(gm.tensor(c), gm.ones(3, 2), gm.ones(2, 5))


# ========================================================== a traced model ======


def _model(lib):
    tnn = lib.nn
    return tnn.Sequential(
        tnn.ReflectionPad2d(1),
        tnn.Conv2d(2, 8, 3),
        tnn.InstanceNorm2d(8, affine=True),
        tnn.PixelShuffle(2),
        tnn.ZeroPad2d((0, 1, 1, 0)),
        tnn.AdaptiveMaxPool2d((3, 4)),
        tnn.Flatten(2),
        tnn.ReplicationPad1d(1),
        tnn.MaxPool1d(2),
        tnn.AvgPool1d(2, 1),
        tnn.AdaptiveAvgPool1d(3),
        tnn.AdaptiveMaxPool1d(2),
        tnn.Unflatten(2, (1, 2)),
        tnn.PixelUnshuffle(1),
        tnn.Flatten(),
        tnn.Linear(4, 2),
    )


def test_a_model_of_the_new_layers_traces_and_its_graph_gradients_equal_eager():
    gm.manual_seed(0)
    model = _model(gm).double()
    x = _x(3, 2, 5, 6)
    graph = trace(lambda m, x: (m(x) ** 2).sum(), model, x)
    params = dict(model.named_parameters())
    for n in (3, 5):
        x = _x(n, 2, 5, 6, seed=n)
        execute(graph, params, {"x0": x})["loss"].backward()
        from_graph = {k: p.grad.numpy().copy() for k, p in params.items()}
        model.zero_grad()
        (model(gm.tensor(x)) ** 2).sum().backward()
        for k, p in params.items():
            np.testing.assert_allclose(from_graph[k], p.grad.numpy(), rtol=1e-12, err_msg=k)
        model.zero_grad()


def test_the_model_equals_torchs():
    torch.manual_seed(0)
    t = _model(torch).double()
    g = _from_torch(_model(gm).double(), t)
    params = dict(t.named_parameters())
    _compare(g, t, _x(3, 2, 5, 6), [(p, params[k]) for k, p in g.named_parameters()])


def test_tracked_instance_norm_traces_its_statistics_as_buffer_updates():
    gm.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
    ).double()
    graph = trace(lambda m, x: (m(x) ** 2).sum(), model, _x(4, 2, 8))
    assert [o.name for o in graph.outputs] == ["loss", "1.running_mean", "1.running_var"]
    params = dict(model.named_parameters())
    buffers = {k: v.numpy().copy() for k, v in model.named_buffers()}
    x = _x(7, 2, 8, seed=1)
    out = execute(graph, params, {"x0": x}, buffers=buffers)
    out["loss"].backward()
    from_graph = {k: p.grad.numpy().copy() for k, p in params.items()}
    model.zero_grad()
    (model(gm.tensor(x)) ** 2).sum().backward()
    for k, p in params.items():
        np.testing.assert_allclose(from_graph[k], p.grad.numpy(), rtol=1e-12, err_msg=k)
    for k in ("1.running_mean", "1.running_var"):
        np.testing.assert_allclose(out[k].numpy(), model.state_dict()[k].numpy(), rtol=1e-12)
