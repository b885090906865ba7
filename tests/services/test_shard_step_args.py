"""A shard's step arguments (scheduled hyper-parameters and clipping in Apply) and its
GradientNorms, in the store and over gRPC: the core's clipping functions on the summed
gradient, bad values refused naming the field, a restart replays the arguments."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from gradmesh.core.nn import utils as nn_utils
from gradmesh.server.aggregate import tree_sum
from gradmesh.server.runtime import ServerConfig, ServiceError
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardStore
from gradmesh.v1 import shard_pb2
from gradmesh.wire.errors import GradmeshError
from gradmesh.wire.shard import RemoteShard, named_headers, optimizer_to_proto, shard_frames

ADAM = {"name": "adam", "lr": 0.01}


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
    }


def _grads(seed):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in _params().items()}


def _push(shard, step, version, micro=3):
    for m in range(micro):
        shard.push("j", step, m, micro, version, _grads(10 * step + m))


def _summed(step, micro=3):
    gs = [_grads(10 * step + m) for m in range(micro)]
    return {n: tree_sum([g[n].copy() for g in gs]) for n in gs[0]}


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 0.0, 3.5])
def test_gradient_norms_are_the_cores_norms_of_the_summed_gradient(norm_type):
    store = ShardStore()
    store.load("j", _params(), ADAM)
    _push(store, 1, 0)
    norms = store.gradient_norms("j", 1, 3, 0, 0, norm_type)
    summed = _summed(1)
    for n, g in summed.items():
        expected = nn_utils.grad_norms(np, [g], norm_type)[0]
        assert expected.dtype == np.float32 and norms[n] == float(expected)
    assert store.jobs["j"].version == 0  # nothing applied


def test_apply_uses_the_step_arguments_and_a_restart_replays_them(tmp_path):
    args = {"lr": 0.5, "beta1": 0.5, "clip_coefficient": 0.25}
    store = ShardStore(str(tmp_path))
    store.load("j", _params(), ADAM)
    _push(store, 1, 0)
    store.apply("j", 1, 3, 0, step_args=args)
    # The same by hand: the summed gradient scaled, then Adam with the step's lr and beta1.
    from gradmesh.core import optim

    expected = _params()
    for n, g in _summed(1).items():
        nn_utils.scale_(g, np.asarray(0.25))
        optim.adam_update(np, expected[n], g, {}, lr=0.5, betas=(0.5, 0.999))
    for n in expected:
        assert np.array_equal(store.jobs["j"].params[n], expected[n])
    store.close()
    again = ShardStore(str(tmp_path))  # a crash: checkpoint of version 0 plus the log
    for n in expected:
        assert np.array_equal(again.jobs["j"].params[n], expected[n])


@pytest.mark.parametrize(
    "args,field",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 0.9}, "momentum"),  # Adam has none
        ({"beta1": 1.0}, "beta1"),
        ({"clip_value": 0.0}, "clip_value"),
        ({"clip_value": 1.0, "clip_coefficient": 0.5}, "clip_value"),
    ],
)
def test_bad_step_arguments_are_invalid_argument_naming_the_field(args, field):
    store = ShardStore()
    store.load("j", _params(), ADAM)
    _push(store, 1, 0)
    with pytest.raises(ServiceError) as e:
        store.apply("j", 1, 3, 0, step_args=args)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == field
    assert store.jobs["j"].version == 0


def test_over_grpc_norms_clip_value_and_errors():
    running = serve_shard(ServerConfig(port=0), ShardStore())
    shard = RemoteShard(running.address)
    try:
        shard.load("j", _params(), {"name": "sgd", "lr": 0.1, "momentum": 0.9})
        _push(shard, 1, 0)
        with pytest.raises(GradmeshError) as e:
            shard.gradient_norms("j", 1, 4, 0)  # micro-batch 3 never pushed
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        norms = shard.gradient_norms("j", 1, 3, 0, norm_type=float("inf"))
        assert norms == {n: float(np.abs(g).max()) for n, g in _summed(1).items()}
        with pytest.raises(GradmeshError) as e:
            shard.apply("j", 1, 3, 0, step_args={"momentum": -0.5})
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        shard.apply("j", 1, 3, 0, step_args={"lr": 0.2, "momentum": 0.0, "clip_value": 0.1})
        _, params = shard.pull("j")
        for n, g in _summed(1).items():
            expected = _params()[n] - np.float32(0.2) * np.clip(g, -0.1, 0.1)
            assert np.array_equal(params[n], expected)
    finally:
        shard.close()
        running.stop(0)


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "rmsprop", "lr": 0.01, "momentum": 0.5, "centered": True},
        {"name": "adagrad", "lr": 0.1, "lr_decay": 0.1, "initial_accumulator_value": 0.2},
        {"name": "adamax", "lr": 0.01, "weight_decay": 0.1},
        {"name": "nadam", "lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1},
    ],
)
def test_every_optimizers_state_survives_a_checkpoint_and_a_crash(tmp_path, optimizer):
    """The state of each optimizer (NAdam's 0-d float32 mu_product included) goes into the
    checkpoint and the step log replays on top of it: a crash changes no bit."""
    straight = ShardStore()
    straight.load("j", _params(), optimizer)
    for step in range(1, 6):
        _push(straight, step, step - 1)
        straight.apply("j", step, 3, step - 1, step_args={"lr": 0.01 * step})

    store = ShardStore(str(tmp_path))
    store.load("j", _params(), optimizer)
    for step in range(1, 4):
        _push(store, step, step - 1)
        store.apply("j", step, 3, step - 1, checkpoint_now=step == 2, step_args={"lr": 0.01 * step})
    store.close()  # a crash after step 3: checkpoint before step 2, steps 2 and 3 in the log
    store = ShardStore(str(tmp_path))
    assert store.jobs["j"].version == 3
    for step in range(4, 6):
        _push(store, step, step - 1)
        store.apply("j", step, 3, step - 1, step_args={"lr": 0.01 * step})
    for n, p in straight.jobs["j"].params.items():
        assert np.array_equal(store.jobs["j"].params[n], p), n
    if optimizer["name"] == "nadam":
        product = store.jobs["j"].state["w"]["mu_product"]
        assert product.dtype == np.float32 and product.shape == ()


def test_a_0d_parameter_keeps_its_shape_through_checkpoint_and_log(tmp_path):
    """checkpoint.save and the step log once stored 0-d arrays as 1-d (ascontiguousarray):
    a 0-d parameter (or NAdam's mu_product) came back as shape (1,)."""
    store = ShardStore(str(tmp_path))
    store.load("j", {"s": np.array(0.5, np.float32)}, {"name": "nadam", "lr": 0.1})
    for step in (1, 2):
        store.push("j", step, 0, 1, step - 1, {"s": np.array(0.25 * step, np.float32)})
        store.apply("j", step, 1, step - 1, checkpoint_now=step == 1)
    expected = store.jobs["j"].params["s"].copy()
    store.close()
    again = ShardStore(str(tmp_path))  # checkpoint before step 1, both steps replayed
    assert again.jobs["j"].params["s"].shape == ()
    assert np.array_equal(again.jobs["j"].params["s"], expected)
    assert again.jobs["j"].state["s"]["mu_product"].shape == ()


def test_weight_decay_by_parameter_over_grpc_and_across_a_restart(tmp_path):
    """Parameter groups that differ in weight decay only (docs/training.md, "Schedules
    and clipping"): each parameter is updated with its own decay, with the step's lr; the
    description survives the shard's restart; a bad decay is INVALID_ARGUMENT."""
    from gradmesh.core import optim

    adamw = {
        "name": "adamw",
        "lr": 0.01,
        "weight_decay": 0.1,
        "weight_decay_by_parameter": {"b": 0},
    }
    running = serve_shard(ServerConfig(port=0), ShardStore(str(tmp_path)))
    shard = RemoteShard(running.address)
    try:
        header = shard_pb2.LoadRequest(job_id="bad", optimizer=optimizer_to_proto(adamw))
        header.optimizer.weight_decay_by_parameter["b"] = -1.0  # past the client's check
        frames = shard_frames("load", header, named_headers(header.parameters, _params()))
        with pytest.raises(GradmeshError) as e:
            shard._call("Load", shard._load_call, frames)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "weight_decay_by_parameter[b]: invalid weight_decay value: -1" in e.value.message
        shard.load("j", _params(), adamw)
        _push(shard, 1, 0)
        shard.apply("j", 1, 3, 0, step_args={"lr": 0.5})
    finally:
        shard.close()
        running.stop(0)
    expected, state = _params(), {}
    for n, g in _summed(1).items():
        decay = 0.0 if n == "b" else 0.1
        optim.adamw_update(np, expected[n], g, state, lr=0.5, weight_decay=decay)
        state = {}
    again = ShardStore(str(tmp_path))  # the restarted shard: same description, same bits
    assert again.jobs["j"].optimizer == optim.validate(adamw)
    for n in expected:
        assert np.array_equal(again.jobs["j"].params[n], expected[n]), n
