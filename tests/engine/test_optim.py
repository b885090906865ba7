"""gradmesh.core.optim against torch.optim: same trajectories, state round trips, wire format."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import gradmesh.core as gm
from gradmesh.core import optim

STEPS = 50

# A small objective with a matrix, a vector and a 0-d parameter, built the same way in both
# libraries. It is bounded enough that `maximize` does not overflow in 50 steps.
_rng = np.random.default_rng(1234)
X = _rng.standard_normal((5, 3))
Y = _rng.uniform(-0.8, 0.8, (5, 4))
START = {
    "w": _rng.standard_normal((3, 4)) * 0.5,
    "b": _rng.standard_normal(4) * 0.1,
    "s": np.array(0.7),
}


def _loss(lib, p: dict):
    x, y = lib.tensor(X, dtype=p["w"].dtype), lib.tensor(Y, dtype=p["w"].dtype)
    d = lib.tanh(x @ p["w"] + p["b"] * p["s"]) - y
    return (d * d).sum() + 0.1 * p["s"] * p["s"]


def _ours(start=START):
    return {k: gm.nn.Parameter(gm.tensor(v.copy(), dtype=gm.float64)) for k, v in start.items()}


def _theirs(start=START):
    return {
        k: torch.tensor(v.copy(), dtype=torch.float64, requires_grad=True) for k, v in start.items()
    }


def _run_ours(opt, params, steps):
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        _loss(gm, params).backward()
        opt.step()
        trajectory.append({k: p.detach().numpy().copy() for k, p in params.items()})
    return trajectory


def _run_torch(opt, params, steps):
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        _loss(torch, params).backward()
        opt.step()
        trajectory.append({k: p.detach().numpy().copy() for k, p in params.items()})
    return trajectory


def _sgd_cases():
    for momentum, dampening, nesterov, wd, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 0.05), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # torch rejects these; tested in test_invalid_hyperparameters
        yield (
            "SGD",
            dict(
                lr=0.05,
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                weight_decay=wd,
                maximize=maximize,
            ),
        )


def _adam_cases():
    for name, amsgrad, wd, maximize in itertools.product(
        ("Adam", "AdamW"), (False, True), (0.0, 0.1), (False, True)
    ):
        yield name, dict(lr=0.02, amsgrad=amsgrad, weight_decay=wd, maximize=maximize)
    # A small beta1 takes the other branch of torch's lerp (weight >= 0.5).
    yield "Adam", dict(lr=0.02, betas=(0.3, 0.5), eps=1e-6)
    yield "AdamW", dict(lr=0.02, betas=(0.3, 0.5), amsgrad=True)
    yield "AdamW", dict()  # AdamW's own defaults (weight_decay=1e-2)


def _rmsprop_adagrad_cases():
    for momentum, centered, wd, maximize in itertools.product(
        (0.0, 0.8), (False, True), (0.0, 0.05), (False, True)
    ):
        yield (
            "RMSprop",
            dict(lr=0.01, momentum=momentum, centered=centered, weight_decay=wd, maximize=maximize),
        )
    yield "RMSprop", dict()
    for lr_decay, wd, init, maximize in itertools.product(
        (0.0, 0.1), (0.0, 0.05), (0.0, 0.5), (False, True)
    ):
        yield (
            "Adagrad",
            dict(
                lr=0.05,
                lr_decay=lr_decay,
                weight_decay=wd,
                initial_accumulator_value=init,
                maximize=maximize,
            ),
        )
    yield "Adagrad", dict(eps=1e-3)


def _adamax_nadam_cases():
    for wd, maximize in itertools.product((0.0, 0.05), (False, True)):
        yield "Adamax", dict(lr=0.02, weight_decay=wd, maximize=maximize)
        for decoupled in (False, True):
            yield (
                "NAdam",
                dict(
                    lr=0.02,
                    weight_decay=wd,
                    decoupled_weight_decay=decoupled,
                    maximize=maximize,
                ),
            )
    # A small beta1 takes the other branch of torch's lerp; defaults; another momentum_decay.
    yield "Adamax", dict(lr=0.02, betas=(0.3, 0.9), eps=1e-6)
    yield "Adamax", dict()
    yield "NAdam", dict(lr=0.02, betas=(0.3, 0.5), eps=1e-6, momentum_decay=0.05)
    yield "NAdam", dict()


CASES = (
    list(_sgd_cases())
    + list(_adam_cases())
    + list(_rmsprop_adagrad_cases())
    + list(_adamax_nadam_cases())
)


def _assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            np.testing.assert_allclose(
                a[k], b[k], rtol=1e-10, atol=1e-14, err_msg=f"param {k} after step {step + 1}"
            )


def _case_id(case) -> str:
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items() if k != "lr")


@pytest.mark.parametrize("name,kwargs", CASES, ids=[_case_id(c) for c in CASES])
def test_trajectory_matches_torch(name, kwargs):
    ours, theirs = _ours(), _theirs()
    opt = getattr(gm.optim, name)(list(ours.values()), **kwargs)
    ref = getattr(torch.optim, name)(list(theirs.values()), foreach=False, **kwargs)
    a, b = _run_ours(opt, ours, STEPS), _run_torch(ref, theirs, STEPS)
    assert not np.allclose(a[-1]["w"], START["w"])  # it did move
    _assert_same(a, b)


def test_param_groups_with_their_own_hyperparameters_match_torch():
    ours, theirs = _ours(), _theirs()
    opt = gm.optim.SGD(
        [{"params": [ours["w"]], "lr": 0.1}, {"params": [ours["b"], ours["s"]], "momentum": 0.5}],
        lr=0.01,
    )
    ref = torch.optim.SGD(
        [
            {"params": [theirs["w"]], "lr": 0.1},
            {"params": [theirs["b"], theirs["s"]], "momentum": 0.5},
        ],
        lr=0.01,
        foreach=False,
    )
    assert opt.param_groups[0]["momentum"] == 0 and opt.param_groups[1]["lr"] == 0.01
    _assert_same(_run_ours(opt, ours, 20), _run_torch(ref, theirs, 20))


def test_float32_parameters_stay_float32_and_track_torch():
    ours = {k: gm.nn.Parameter(gm.tensor(v, dtype=gm.float32)) for k, v in START.items()}
    theirs = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in START.items()}
    opt = gm.optim.Adam(list(ours.values()), lr=0.02, amsgrad=True)
    ref = torch.optim.Adam(list(theirs.values()), lr=0.02, amsgrad=True, foreach=False)
    a, b = _run_ours(opt, ours, 10), _run_torch(ref, theirs, 10)
    assert all(p.dtype is gm.float32 for p in ours.values())
    assert all(s[k].dtype == np.float32 for s in opt.state.values() for k in ("exp_avg",))
    np.testing.assert_allclose(a[-1]["w"], b[-1]["w"], rtol=1e-5, atol=1e-6)


def test_step_updates_parameters_in_place_and_outside_autograd():
    p = _ours()
    arrays = {k: v._data for k, v in p.items()}
    opt = gm.optim.Adam(list(p.values()), lr=0.1)
    _loss(gm, p).backward()
    opt.step()
    for k, v in p.items():
        assert v._data is arrays[k]  # same storage: views and shards see the update
        assert v.is_leaf and v.requires_grad and v.grad_fn is None
    assert not np.array_equal(p["w"].detach().numpy(), START["w"])


def test_step_skips_parameters_without_gradient():
    p = _ours()
    opt = gm.optim.SGD(list(p.values()), lr=0.1, momentum=0.9)
    (p["w"] * p["w"]).sum().backward()
    opt.step()
    np.testing.assert_array_equal(p["b"].detach().numpy(), START["b"])
    assert p["b"] not in opt.state and p["w"] in opt.state


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    p = _ours()
    opt = gm.optim.SGD(list(p.values()), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = _loss(gm, p)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss) == pytest.approx(float(_loss(torch, _theirs()).detach()), rel=1e-12)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1)),
        ("Adam", dict(lr=0.02, amsgrad=True)),
        ("AdamW", dict(lr=0.02, weight_decay=0.1)),
    ],
)
def test_state_dict_round_trip_continues_exactly(name, kwargs):
    cls = getattr(gm.optim, name)
    straight = _ours()
    uninterrupted = _run_ours(cls(list(straight.values()), **kwargs), straight, 20)

    params = _ours()
    first = cls(list(params.values()), **kwargs)
    _run_ours(first, params, 10)
    saved = first.state_dict()
    saved_json = json.loads(json.dumps(saved["param_groups"]))  # groups are plain data
    _run_ours(first, params, 3)  # changing the optimizer afterwards changes no copy
    for k, p in params.items():
        p.data = gm.tensor(uninterrupted[9][k])
    second = cls(list(params.values()), lr=123.0)  # hyper-parameters come from the save
    second.load_state_dict({"state": saved["state"], "param_groups": saved_json})
    assert second.param_groups[0]["lr"] == kwargs["lr"]
    resumed = _run_ours(second, params, 10)
    for k in params:
        np.testing.assert_array_equal(resumed[-1][k], uninterrupted[-1][k])


@pytest.mark.parametrize(
    "name,kwargs", [("SGD", dict(lr=0.05, momentum=0.9)), ("AdamW", dict(lr=0.02, amsgrad=True))]
)
def test_loads_a_torch_optimizer_state_dict_mid_run(name, kwargs):
    theirs = _theirs()
    ref = getattr(torch.optim, name)(list(theirs.values()), foreach=False, **kwargs)
    _run_torch(ref, theirs, 10)
    ours = _ours({k: v.detach().numpy() for k, v in theirs.items()})
    opt = getattr(gm.optim, name)(list(ours.values()), lr=1.0)
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["lr"] == kwargs["lr"]
    _assert_same(_run_ours(opt, ours, 10), _run_torch(ref, theirs, 10))


def test_state_dict_layout_and_load_errors():
    params = _ours()
    opt = gm.optim.Adam(list(params.values()), lr=0.01)
    _run_ours(opt, params, 2)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2]
    assert sd["state"][0]["step"] == 2 and set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["param_groups"][0]["params"] == [0, 1, 2]
    with pytest.raises(ValueError, match="parameter groups"):
        gm.optim.Adam([{"params": [params["w"]]}, {"params": [params["b"]]}]).load_state_dict(sd)
    with pytest.raises(ValueError, match="has 3 parameters, this optimizer's has 2"):
        gm.optim.Adam([params["w"], params["b"]]).load_state_dict(sd)
    sd["state"][0]["exp_avg"] = gm.zeros(2, 2, dtype=gm.float64)
    with pytest.raises(ValueError, match=r"'exp_avg' has shape \(2, 2\).*\(3, 4\)"):
        gm.optim.Adam(list(params.values())).load_state_dict(sd)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    p = _ours()
    opt = gm.optim.SGD(list(p.values()), lr=0.1)
    _loss(gm, p).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for v in p.values():
        if set_to_none:
            assert v.grad is None
        else:
            assert v.grad.shape == v.shape and not v.grad.detach().numpy().any()
    # The next backward starts from nothing either way.
    _loss(gm, p).backward()
    t = _theirs()
    _loss(torch, t).backward()
    np.testing.assert_allclose(p["w"].grad.numpy(), t["w"].grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize(
    "name,kwargs",
    [(n, k) for n, k in CASES if k.get("maximize") or k.get("amsgrad") or k.get("nesterov")][:8],
)
def test_pure_update_on_numpy_arrays_equals_the_optimizer(name, kwargs):
    params = _ours()
    opt = getattr(gm.optim, name)(list(params.values()), **kwargs)
    arrays = {k: v.copy() for k, v in START.items()}
    states = {k: {} for k in START}
    rule = optim.UPDATE_RULES[name.lower()]
    hyper = optim.validate({"name": name.lower(), **kwargs})
    del hyper["name"]
    for _ in range(15):
        opt.zero_grad()
        _loss(gm, params).backward()
        grads = {k: p.grad.numpy().copy() for k, p in params.items()}
        opt.step()
        for k in arrays:
            rule(np, arrays[k], grads[k], states[k], **hyper)
            assert isinstance(arrays[k], np.ndarray)
            np.testing.assert_array_equal(arrays[k], params[k].detach().numpy())
    assert states["w"]["step"] == 15


def test_pure_update_leaves_the_gradient_alone():
    param, grad = np.ones(3), np.array([1.0, -2.0, 3.0])
    for name in optim.UPDATE_RULES:
        state: dict = {}
        for _ in range(3):
            optim.UPDATE_RULES[name](
                np, param, grad, state, lr=0.1, weight_decay=0.1, maximize=True
            )
        np.testing.assert_array_equal(grad, [1.0, -2.0, 3.0])


def test_state_to_arrays_round_trip_continues_exactly():
    grads = [np.random.default_rng(i).standard_normal(4) for i in range(6)]
    p1, p2 = np.arange(4.0), np.arange(4.0)
    s1: dict = {}
    for g in grads:
        optim.adam_update(np, p1, g, s1, lr=0.1, amsgrad=True)
    s2: dict = {}
    for g in grads[:3]:
        optim.adam_update(np, p2, g, s2, lr=0.1, amsgrad=True)
    arrays, step = optim.state_to_arrays(s2)
    assert step == 3 and set(arrays) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    s2 = optim.state_from_arrays(arrays, step)
    arrays["exp_avg"][:] = 99.0  # the restored state owns its arrays
    for g in grads[3:]:
        optim.adam_update(np, p2, g, s2, lr=0.1, amsgrad=True)
    np.testing.assert_array_equal(p1, p2)


def test_describe_round_trips_through_json_and_rebuilds_the_same_optimizer():
    p = _ours()
    opt = gm.optim.AdamW(list(p.values()), lr=0.02, betas=(0.8, 0.99), amsgrad=True)
    d = json.loads(json.dumps(optim.describe(opt)))
    assert d == {
        "name": "adamw",
        "lr": 0.02,
        "betas": [0.8, 0.99],
        "eps": 1e-8,
        "weight_decay": 0.01,
        "amsgrad": True,
        "maximize": False,
    }
    assert optim.validate(d) == d
    q = _ours()
    rebuilt = optim.from_description(list(q.values()), d)
    assert type(rebuilt) is gm.optim.AdamW
    _assert_same(_run_ours(rebuilt, q, 5), _run_ours(opt, p, 5))
    sgd = optim.from_description(
        [q["w"]], {"name": "sgd", "lr": 0.1, "nesterov": True, "momentum": 0.9}
    )
    assert optim.describe(sgd)["nesterov"] is True and optim.describe(sgd)["dampening"] == 0


def test_describe_refuses_groups_with_different_hyperparameters():
    p = _ours()
    opt = gm.optim.SGD([{"params": [p["w"]], "lr": 0.1}, {"params": [p["b"]]}], lr=0.2)
    with pytest.raises(ValueError, match="different hyper-parameters"):
        optim.describe(opt)


def test_groups_that_differ_in_weight_decay_only_describe_it_per_parameter():
    # GPT-style groups: decay on matrices, none on biases. The description names each
    # parameter whose group differs from the first; the job's shards use its own decay.
    p = _ours()
    groups = [{"params": [p["w"]], "weight_decay": 0.1}, {"params": [p["b"]], "weight_decay": 0}]
    opt = gm.optim.AdamW(groups, lr=0.01)
    with pytest.raises(ValueError, match=r"different hyper-parameters \['weight_decay'\]"):
        optim.describe(opt)  # without names it cannot say which parameter
    d = optim.describe(opt, names={t: n for n, t in p.items()})
    assert d["weight_decay"] == 0.1 and d["weight_decay_by_parameter"] == {"b": 0.0}
    assert optim.validate(json.loads(json.dumps(d))) == d
    assert "weight_decay_by_parameter" not in optim.describe(gm.optim.AdamW(list(p.values())))
    with pytest.raises(ValueError, match=r"weight_decay_by_parameter\[b\]: .*-1"):
        optim.validate({**d, "weight_decay_by_parameter": {"b": -1}})
    with pytest.raises(ValueError, match="must map parameter names to numbers"):
        optim.validate({**d, "weight_decay_by_parameter": [0.0]})
    lr_groups = [{"params": [p["w"]], "lr": 0.1}, {"params": [p["b"]]}]
    with pytest.raises(ValueError, match=r"different hyper-parameters \['lr'\]"):
        optim.describe(gm.optim.SGD(lr_groups, lr=0.2), names={t: n for n, t in p.items()})


@pytest.mark.parametrize(
    "description,match",
    [
        ({"name": "lbfgs", "lr": 0.1}, "unknown optimizer 'lbfgs'"),
        ({"lr": 0.1}, "unknown optimizer None"),
        (
            {"name": "sgd", "lr": 0.1, "betas": [0.9, 0.99]},
            r"sgd: unknown hyper-parameter\(s\) "
            r"\['betas'\]",
        ),
        ({"name": "adam", "momentum": 0.9}, r"adam: unknown hyper-parameter\(s\) \['momentum'\]"),
        ({"name": "sgd", "lr": -0.1}, "sgd: invalid learning rate: -0.1"),
        ({"name": "sgd", "lr": float("nan")}, "sgd: invalid learning rate"),
        ({"name": "sgd", "lr": "0.1"}, "sgd: hyper-parameter 'lr' must be a number"),
        ({"name": "sgd", "lr": True}, "sgd: hyper-parameter 'lr' must be a number"),
        ({"name": "sgd", "lr": 0.1, "nesterov": 1}, "'nesterov' must be a bool"),
        ({"name": "sgd", "lr": 0.1, "nesterov": True}, "nesterov momentum requires a momentum"),
        (
            {"name": "sgd", "lr": 0.1, "nesterov": True, "momentum": 0.9, "dampening": 0.1},
            "zero dampening",
        ),
        ({"name": "adam", "betas": [0.9]}, "'betas' must be two floats"),
        ({"name": "adamw", "betas": [0.9, 1.0]}, "invalid beta parameter at index 1: 1.0"),
        ({"name": "adam", "eps": -1e-8}, "adam: invalid eps value"),
        ({"name": "adamw", "weight_decay": -0.1}, "adamw: invalid weight_decay value"),
        ("adam", "must be a dict"),
    ],
)
def test_validate_errors_name_the_problem(description, match):
    with pytest.raises(ValueError, match=match):
        optim.validate(description)


def test_invalid_hyperparameters_in_constructors():
    w = gm.nn.Parameter(gm.zeros(2))
    with pytest.raises(ValueError, match="invalid learning rate: -1"):
        gm.optim.SGD([w], lr=-1)
    with pytest.raises(ValueError, match="nesterov"):
        gm.optim.SGD([w], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        gm.optim.Adam([w], betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="empty parameter list"):
        gm.optim.Adam([])
    with pytest.raises(TypeError, match="pass \\[tensor\\]"):
        gm.optim.Adam(w)
    with pytest.raises(ValueError, match="more than one parameter group"):
        gm.optim.SGD([{"params": [w]}, {"params": [w]}], lr=0.1)
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['betas'\]"):
        gm.optim.SGD([{"params": [w], "betas": (0.9, 0.9)}], lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        gm.optim.SGD([w * 2], lr=0.1)


def test_add_param_group_fills_defaults():
    w, b = gm.nn.Parameter(gm.zeros(2)), gm.nn.Parameter(gm.zeros(1))
    opt = gm.optim.Adam([w], lr=0.5, betas=(0.5, 0.6))
    opt.add_param_group({"params": b, "eps": 0.1})
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["betas"] == (0.5, 0.6)
    assert opt.param_groups[1]["eps"] == 0.1 and opt.param_groups[1]["params"][0] is b


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(optim.UPDATE_RULES))
def test_update_rules_on_cupy_arrays_match_numpy(name):
    if not gm.cuda_available():
        pytest.skip("needs a CUDA device and CuPy")
    import cupy as cp

    rng = np.random.default_rng(5)
    param = rng.standard_normal((64, 32))
    on_gpu = cp.asarray(param)
    cpu_state, gpu_state = {}, {}
    hyper = dict(lr=0.01, weight_decay=0.01, maximize=True)
    hyper.update(
        {
            "sgd": dict(momentum=0.9, nesterov=True),
            "adam": dict(amsgrad=True),
            "adamw": dict(amsgrad=True),
            "rmsprop": dict(momentum=0.9, centered=True),
            "adagrad": dict(lr_decay=0.01),
            "adamax": dict(betas=(0.8, 0.99)),
            "nadam": dict(decoupled_weight_decay=True),
        }[name]
    )
    for _ in range(10):
        grad = rng.standard_normal(param.shape)
        optim.UPDATE_RULES[name](np, param, grad, cpu_state, **hyper)
        optim.UPDATE_RULES[name](cp, on_gpu, cp.asarray(grad), gpu_state, **hyper)
    assert isinstance(on_gpu, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(on_gpu), param, rtol=1e-12)
    arrays, step = optim.state_to_arrays(gpu_state)
    assert step == 10 and all(type(a) is np.ndarray for a in arrays.values())


@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Adamax", "NAdam"])
def test_every_optimizer_describes_itself_for_a_job(name):
    """The wire's Optimizer message carries every rule's hyper-parameters: describe,
    validate and from_description round-trip all of them."""
    params = _ours()
    opt = getattr(gm.optim, name)(list(params.values()), lr=0.03)
    d = json.loads(json.dumps(optim.describe(opt)))
    assert d["name"] == name.lower() and d["lr"] == 0.03
    assert set(d) == {"name", *optim.HYPERPARAMETERS[name.lower()]}
    assert optim.validate(d) == d
    rebuilt = optim.from_description(list(_ours().values()), d)
    assert type(rebuilt) is type(opt) and optim.describe(rebuilt) == d


@pytest.mark.parametrize("name", ["Adamax", "NAdam"])
def test_adamax_nadam_state_dicts_round_trip_with_torch_mid_run(name):
    """torch's state loads into ours (NAdam's 0-d float32 mu_product included) and ours
    continues exactly like torch."""
    ours, theirs = _ours(), _theirs()
    kwargs = dict(lr=0.02, weight_decay=0.01)
    opt = getattr(gm.optim, name)(list(ours.values()), **kwargs)
    ref = getattr(torch.optim, name)(list(theirs.values()), foreach=False, **kwargs)
    _run_ours(opt, ours, 5), _run_torch(ref, theirs, 5)
    again = getattr(gm.optim, name)(list(ours.values()), **kwargs)
    again.load_state_dict(ref.state_dict())
    if name == "NAdam":
        product = again.state[ours["w"]]["mu_product"]
        assert product.dtype == np.float32 and product.shape == ()
        assert float(product) == ref.state[theirs["w"]]["mu_product"].item()
    _assert_same(_run_ours(again, ours, 10), _run_torch(ref, theirs, 10))


@pytest.mark.parametrize("name", ["Adamax", "NAdam"])
def test_float32_adamax_nadam_track_torch(name):
    """float32 parameters (a job's usual dtype), fed the same gradients on both sides so
    that only the update rules are compared: within a few float32 ulps after 30 steps
    (torch's vectorized lerp rounds once with a fused multiply-add)."""
    ours = {k: gm.nn.Parameter(gm.tensor(v, dtype=gm.float32)) for k, v in START.items()}
    theirs = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in START.items()}
    opt = getattr(gm.optim, name)(list(ours.values()), lr=0.02, weight_decay=0.01)
    ref = getattr(torch.optim, name)(
        list(theirs.values()), lr=0.02, weight_decay=0.01, foreach=False
    )
    for _ in range(30):
        opt.zero_grad(), ref.zero_grad()
        _loss(torch, theirs).backward()
        for k in ours:
            ours[k].grad = gm.tensor(theirs[k].grad.numpy().copy())
        opt.step(), ref.step()
    assert all(p.dtype is gm.float32 for p in ours.values())
    for k in ours:
        np.testing.assert_allclose(
            ours[k].detach().numpy(), theirs[k].detach().numpy(), rtol=1e-5, atol=1e-6
        )
        assert not np.array_equal(ours[k].detach().numpy(), START[k].astype(np.float32))


def test_rmsprop_state_dict_round_trips_mid_run():
    ours, theirs = _ours(), _theirs()
    kwargs = dict(lr=0.01, momentum=0.5, centered=True)
    opt, ref = (
        gm.optim.RMSprop(list(ours.values()), **kwargs),
        torch.optim.RMSprop(list(theirs.values()), foreach=False, **kwargs),
    )
    _run_ours(opt, ours, 5), _run_torch(ref, theirs, 5)
    again = gm.optim.RMSprop(list(ours.values()), **kwargs)
    again.load_state_dict(ref.state_dict())  # torch's state loads into ours
    _assert_same(_run_ours(again, ours, 5), _run_torch(ref, theirs, 5))
