"""The activations of nn.functional and nn beyond the per-op specs in opspecs/activation.py:
the compositions (hardsigmoid, logsigmoid, softsign, tanhshrink, threshold, the shrinks,
glu, softmin, prelu) against torch in float64 and float32, every function's gradient at
its kinks, integer inputs, errors, the modules, and a traced model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tracing import (
    assert_executed_equals_local,
    assert_local_matches_torch,
    assert_plan_equals_local,
)

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core import nn
from gradmesh.core.graph import execute, trace

TF = torch.nn.functional

# name -> fn(functional module, x): the same call in both libraries.
FUNCTIONS = {
    "elu": lambda f, x: f.elu(x),
    "elu-alpha": lambda f, x: f.elu(x, alpha=0.3),
    "selu": lambda f, x: f.selu(x),
    "celu": lambda f, x: f.celu(x),
    "celu-alpha": lambda f, x: f.celu(x, alpha=2.0),
    "hardtanh": lambda f, x: f.hardtanh(x),
    "hardtanh-bounds": lambda f, x: f.hardtanh(x, min_val=-2.0, max_val=0.5),
    "relu6": lambda f, x: f.relu6(x),
    "hardsigmoid": lambda f, x: f.hardsigmoid(x),
    "logsigmoid": lambda f, x: f.logsigmoid(x),
    "softsign": lambda f, x: f.softsign(x),
    "tanhshrink": lambda f, x: f.tanhshrink(x),
    "threshold": lambda f, x: f.threshold(x, 1.0, 5.0),
    "threshold-negative": lambda f, x: f.threshold(x, -0.5, -2.0),
    "hardshrink": lambda f, x: f.hardshrink(x),
    "hardshrink-lambd": lambda f, x: f.hardshrink(x, lambd=3.0),
    "hardshrink-zero": lambda f, x: f.hardshrink(x, 0.0),
    "softshrink": lambda f, x: f.softshrink(x),
    "softshrink-lambd": lambda f, x: f.softshrink(x, lambd=3.0),
    "softshrink-zero": lambda f, x: f.softshrink(x, 0.0),
    "glu": lambda f, x: f.glu(x),
    "glu-dim0": lambda f, x: f.glu(x, 0),
    "glu-dim1": lambda f, x: f.glu(x.reshape(2, 4, 3), dim=1),
    "softmin": lambda f, x: f.softmin(x, dim=1),
    "softmin-dim0": lambda f, x: f.softmin(x, 0),
    "softplus": lambda f, x: f.softplus(x, beta=2.0, threshold=3.0),
}

# Every kink (and 0) of the functions above, with points on either side.
KINKS = [-7.0, -6.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0, 6.0, 7.0]

DTYPES = {"float64": (np.float64, 1e-12), "float32": (np.float32, 2e-6)}

# torch's hardsigmoid backward multiplies by the float32 1/6 in float64 too (0.16666667163).
LOOSE_FLOAT64 = {"hardsigmoid": 1e-7}


def _both(values, dtype):
    g = gm.tensor(np.asarray(values, dtype), requires_grad=True)
    t = torch.tensor(np.asarray(values, dtype), requires_grad=True)
    return g, t


def _assert_close(got, want, tol, what):
    got = got.detach().numpy() if hasattr(got, "detach") else got
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=tol, atol=tol, err_msg=what)


def _check(fn, values, dtype_name, *extra, tol=None):
    """Value and gradients (of the input and of ``extra`` arrays, PReLU's weight) of
    sum(fn(...) * w) against torch's."""
    dtype, default_tol = DTYPES[dtype_name]
    tol = max(tol or 0.0, default_tol)
    (x, xt), *more = [_both(v, dtype) for v in (values, *extra)]
    out, ref = fn(F, x, *[m[0] for m in more]), fn(TF, xt, *[m[1] for m in more])
    assert out.dtype.name == str(ref.dtype).removeprefix("torch.")
    _assert_close(out, ref, tol, "value")
    w = np.random.default_rng(0).standard_normal(tuple(ref.shape)).astype(dtype)
    (out * gm.tensor(w)).sum().backward()
    (ref * torch.tensor(w)).sum().backward()
    for i, (g, t) in enumerate([(x, xt), *more]):
        _assert_close(g.grad, t.grad, tol, f"gradient of input {i}")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_matches_torch_on_random_inputs(name, dtype_name):
    values = np.random.default_rng(len(name)).normal(0.0, 3.0, (4, 6))
    _check(FUNCTIONS[name], values, dtype_name, tol=LOOSE_FLOAT64.get(name))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", [n for n in FUNCTIONS if not n.startswith(("glu", "softmin"))])
def test_gradient_at_the_kinks_is_torchs(name, dtype_name):
    _check(FUNCTIONS[name], KINKS, dtype_name, tol=LOOSE_FLOAT64.get(name))


def _prelu(f, x, weight):
    return f.prelu(x, weight)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize(
    "shape, weight_shape",
    [((4, 3, 5), (3,)), ((4, 3, 5), (1,)), ((4, 3), ()), ((6,), (1,)), ((2, 3, 2, 2), (3,))],
)
def test_prelu_values_and_gradients_of_input_and_weight(shape, weight_shape, dtype_name):
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 2.0, shape)
    x.flat[:3] = 0.0  # the kink: the slope's side, weight gradient 0 there
    _check(_prelu, x, dtype_name, rng.uniform(-0.5, 0.5, weight_shape))


def test_extreme_inputs_stay_finite_and_match_torch():
    x, xt = _both([-1e4, -800.0, -30.0, 30.0, 800.0, 1e4], np.float64)
    fns = [
        lambda f, v: f.logsigmoid(v),
        lambda f, v: f.elu(v),
        lambda f, v: f.selu(v),
        lambda f, v: f.celu(v, 0.1),
        lambda f, v: f.softsign(v),
        lambda f, v: f.tanhshrink(v),
    ]
    out = sum(fn(F, x) for fn in fns)
    ref = sum(fn(TF, xt) for fn in fns)
    out.sum().backward()
    ref.sum().backward()
    assert np.isfinite(out.detach().numpy()).all() and np.isfinite(x.grad.numpy()).all()
    _assert_close(out, ref, 1e-12, "value")
    _assert_close(x.grad, xt.grad, 1e-12, "gradient")


def test_logsigmoid_keeps_the_exp_term_of_large_negative_inputs():
    # softplus's threshold would give -30 exactly; log(sigmoid(-30)) is -30 - 9.4e-14.
    out = F.logsigmoid(gm.tensor([-30.0], dtype=gm.float64)).item()
    assert out == TF.logsigmoid(torch.tensor([-30.0], dtype=torch.float64)).item() != -30.0


@pytest.mark.parametrize(
    "name", ["logsigmoid", "softsign", "tanhshrink", "glu", "softmin", "elu", "celu-alpha"]
)
def test_second_order_matches_torch(name):
    fn = FUNCTIONS[name]
    values = np.random.default_rng(3).normal(0.0, 2.0, (4, 6))
    x, xt = _both(values, np.float64)
    v = np.random.default_rng(4).standard_normal((4, 6))
    (g,) = gm.autograd.grad(fn(F, x).sum(), [x], create_graph=True)
    (gt,) = torch.autograd.grad(fn(TF, xt).sum(), [xt], create_graph=True)
    (g * gm.tensor(v)).sum().backward()
    (gt * torch.tensor(v)).sum().backward()
    _assert_close(x.grad, xt.grad, 1e-10, "second order")


# ======================================================================= dtypes ======


@pytest.mark.parametrize(
    "fn",
    [
        lambda f, i: f.hardtanh(i, -2.0, 3.0),
        lambda f, i: f.relu6(i),
        lambda f, i: f.threshold(i, 0.5, 2.5),
        lambda f, i: f.softsign(i),
        lambda f, i: f.tanhshrink(i),
    ],
)
def test_integer_input_gives_torchs_dtype_and_values(fn):
    values = np.array([-7, -3, -1, 0, 1, 2, 5, 8])
    out, ref = fn(F, gm.tensor(values)), fn(TF, torch.tensor(values))
    assert out.dtype.name == str(ref.dtype).removeprefix("torch.")
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        lambda f, i: f.elu(i),
        lambda f, i: f.selu(i),
        lambda f, i: f.celu(i),
        lambda f, i: f.hardsigmoid(i),
        lambda f, i: f.logsigmoid(i),
        lambda f, i: f.hardshrink(i),
        lambda f, i: f.softshrink(i),
        lambda f, i: f.glu(i),
        lambda f, i: f.prelu(i, i[:1]),
    ],
)
def test_integer_input_is_refused_as_torch_refuses_it(fn):
    with pytest.raises(RuntimeError):
        fn(TF, torch.tensor([-1, 2]))
    with pytest.raises(RuntimeError, match="floating point"):
        fn(F, gm.tensor([-1, 2]))


# ======================================================================= errors ======

ERRORS = [
    (ValueError, "min_val cannot be greater than max_val", lambda f, x: f.hardtanh(x, 1.0, -1.0)),
    (RuntimeError, "alpha cannot be 0", lambda f, x: f.celu(x, 0.0)),
    (RuntimeError, "lambd must be greater or equal to 0", lambda f, x: f.softshrink(x, -1.0)),
    (RuntimeError, "Halving dimension must be even", lambda f, x: f.glu(x[:, :5])),
    (RuntimeError, "does not support scalars", lambda f, x: f.glu(x.sum())),
    (RuntimeError, "channel size = 6", lambda f, x: f.prelu(x, x[0, :4])),
    (RuntimeError, "ndim = 2", lambda f, x: f.prelu(x, x[:1, :1])),
    (RuntimeError, "channel size = 1", lambda f, x: f.prelu(x[0], x[0, :3])),
]


@pytest.mark.parametrize("error, match, fn", ERRORS, ids=[e[1] for e in ERRORS])
def test_bad_arguments_raise_torchs_exception_type(error, match, fn):
    with pytest.raises(error):
        fn(TF, torch.zeros(4, 6))
    with pytest.raises(error, match=match):
        fn(F, gm.zeros(4, 6))


def test_softmax2d_needs_a_3d_or_4d_input():
    with pytest.raises(ValueError):
        torch.nn.Softmax2d()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected input to be 3D or 4D, got 2D"):
        nn.Softmax2d()(gm.zeros(2, 3))


def test_softmin_without_dim_warns_and_picks_torchs_dim():
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    with pytest.warns(UserWarning, match="Implicit dimension choice for softmin"):
        out = F.softmin(gm.tensor(x))
    with pytest.warns(UserWarning):
        ref = TF.softmin(torch.tensor(x))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12)
    with pytest.warns(UserWarning, match="softmin"):
        nn.Softmin()(gm.tensor(x))


def test_softmin_dtype():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    out = F.softmin(gm.tensor(x), 1, dtype=gm.float64)
    ref = TF.softmin(torch.tensor(x), 1, dtype=torch.float64)
    assert out.dtype is gm.float64
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12)


# ======================================================================= modules ======

MODULES = [
    ("ELU", (), {}),
    ("ELU", (0.5,), {"inplace": True}),
    ("SELU", (), {}),
    ("SELU", (), {"inplace": True}),
    ("CELU", (), {"alpha": 2.0}),
    ("Hardtanh", (), {}),
    ("Hardtanh", (-2.0, 3.0), {"inplace": True}),
    ("ReLU6", (), {}),
    ("ReLU6", (True,), {}),
    ("Hardsigmoid", (), {}),
    ("Hardsigmoid", (), {"inplace": True}),
    ("LogSigmoid", (), {}),
    ("Softsign", (), {}),
    ("Tanhshrink", (), {}),
    ("Threshold", (0.1, 20.0), {}),
    ("Threshold", (0.1, 2.0, True), {}),
    ("Hardshrink", (), {}),
    ("Softshrink", (), {"lambd": 1.0}),
    ("GLU", (), {}),
    ("GLU", (1,), {}),
    ("Softmin", (1,), {}),
    ("Softmax2d", (), {}),
    ("Softplus", (), {}),
    ("Softplus", (2.0, 5.0), {}),
    ("PReLU", (), {}),
    ("PReLU", (4, 0.1), {}),
]


@pytest.mark.parametrize("name, args, kwargs", MODULES, ids=[f"{n}{a}{k}" for n, a, k in MODULES])
def test_module_matches_torchs_module(name, args, kwargs):
    module, ref_module = (
        getattr(nn, name)(*args, **kwargs),
        getattr(torch.nn, name)(*args, **kwargs),
    )
    assert repr(module) == repr(ref_module)
    module, ref_module = module.double(), ref_module.double()
    values = np.random.default_rng(2).normal(0.0, 3.0, (2, 4, 3, 2))
    x, xt = _both(values, np.float64)
    out, ref = module(x * 1), ref_module(xt * 1)  # torch's in-place forms refuse a leaf
    _assert_close(out, ref, 1e-12, "value")
    out.sum().backward()
    ref.sum().backward()
    _assert_close(x.grad, xt.grad, LOOSE_FLOAT64.get(name.lower(), 1e-12), "input gradient")
    params, ref_params = dict(module.named_parameters()), dict(ref_module.named_parameters())
    assert params.keys() == ref_params.keys()
    for key, p in params.items():
        _assert_close(p, ref_params[key], 0, key)
        _assert_close(p.grad, ref_params[key].grad, 1e-12, f"gradient of {key}")


def test_prelu_parameter_dtype_and_state_dict():
    module = nn.PReLU(3, init=0.5, dtype=gm.float64)
    assert module.weight.dtype is gm.float64 and module.weight.tolist() == [0.5] * 3
    module.load_state_dict({"weight": gm.tensor([0.1, 0.2, 0.3], dtype=gm.float64)})
    assert list(module.state_dict()) == list(torch.nn.PReLU(3).state_dict())


def test_new_modules_are_exported():
    for name in [n for n, _, _ in MODULES]:
        assert name in nn.__all__ and issubclass(getattr(nn, name), nn.Module)


# ======================================================================== graphs ======

PARAMS = {
    "w": np.array([1.5, -0.5, 2.0]),
    "b": np.array([0.1, 0.2, -0.3]),
    "a": np.array([0.25, -0.1, 0.4]),
}


def _activations(lib, p, x):
    f = lib.nn.functional
    h = x * p["w"] + p["b"]
    y = f.elu(h, 0.7) + f.selu(h) + f.celu(h, 1.5) + f.hardtanh(h, -0.5, 0.8) + f.relu6(h * 4)
    y = y + f.logsigmoid(h) + f.softsign(h) + f.tanhshrink(h)
    y = y + f.threshold(h, 0.1, -1.0) + f.hardshrink(h, 0.3) + f.softshrink(h, 0.2)
    y = f.prelu(y.reshape(-1, 3, 1), p["a"]).reshape(-1, 3) + f.softmin(h, 1)
    y = f.glu(lib.cat([y, h], 1), 1) + lib.erf(h) + lib.erfc(h) + lib.erfinv(lib.tanh(h))
    return (y**2).sum()


def test_functions_trace_and_run_as_local_and_torch():
    assert_local_matches_torch(_activations, PARAMS)
    assert_executed_equals_local(_activations, PARAMS)
    assert_plan_equals_local(_activations, PARAMS)


def _model():
    gm.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 8), nn.PReLU(8), nn.ELU(), nn.Linear(8, 8), nn.GLU(), nn.Hardtanh(-0.5, 0.5),
        nn.Linear(4, 4), nn.SELU(), nn.Softshrink(0.1), nn.Hardsigmoid(), nn.Softplus(2.0),
        nn.Softmin(1),
    ).double()  # fmt: skip


def test_model_of_the_modules_traces_and_its_graph_gives_eager_gradients():
    model = _model()
    x = np.random.default_rng(0).standard_normal((5, 3))

    def loss(m, data):
        return (m(data) ** 2).sum()

    graph = trace(loss, model, x)
    assert {"prelu", "elu", "hardtanh"} & {n.op for n in graph.nodes} == {"elu", "hardtanh"}
    params = {
        n: gm.tensor(p.detach().numpy(), requires_grad=True) for n, p in model.named_parameters()
    }
    for n in (5, 9):
        data = np.random.default_rng(n).standard_normal((n, 3))
        out = execute(graph, params, {"x0": data})["loss"]
        out.backward()
        model.zero_grad()
        eager = loss(model, gm.tensor(data))
        eager.backward()
        assert out.item() == eager.item()
        for name, p in model.named_parameters():
            assert np.array_equal(params[name].grad.numpy(), p.grad.numpy()), name
            params[name].grad = None
