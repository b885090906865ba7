"""Jobs with bfloat16 and float16 parameters (docs/training.md, "Half-precision jobs").

A half job keeps its parameters and optimizer state in their dtype on the shards, and its
steps are bitwise the same over one or two workers, equal to local training of the same
micro-batches with the same update rule, and survive a checkpoint and a restart of the
coordinator. Workers and coordinator run in this process on 127.0.0.1.
"""

from __future__ import annotations

import numpy as np
import pytest
from models import mlp

import gradmesh.core as gm
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.core import graph as core_graph
from gradmesh.core import optim
from gradmesh.core.plan import compile_plan
from gradmesh.server import checkpoint
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server.aggregate import loss_scales, micro_batch_seed, micro_batches, tree_sum

STEPS = 6
BATCH, MICRO = 24, 10  # micro-batches of 10, 10 and 4 rows
JOB = "half"
# eps 1e-3, not Adam's 1e-8: that is 0 in float16, and a zero second moment would divide
# by it (in torch as here).
ADAM = {"name": "adam", "lr": 0.01, "eps": 1e-3, "weight_decay": 1e-3}
DTYPES = {"bfloat16": gm.bfloat16, "float16": gm.float16}


def _model(dtype):
    return mlp(6, 16, 3, seed=5, activation=gm.nn.Tanh).to(dtype)


def _loss(model, x, y):
    return gm.nn.functional.cross_entropy(model(x), y)


def _batches(dtype):
    rng = np.random.default_rng(7)
    out = []
    for _ in range(STEPS):
        x = rng.standard_normal((BATCH, 6)).astype(np.float32)
        out.append((x.astype(dtype.np), (x[:, :3].argmax(axis=1)).astype(np.int64)))
    return out


def _create(client, dtype):
    data = _batches(dtype)
    return client.create_job(
        _model(dtype), _loss, ADAM, MICRO, data[0], job_id=JOB, data_names=["x", "y"]
    )


def _assert_bitwise_equal(params: dict, reference: dict, dtype) -> None:
    assert sorted(params) == sorted(reference)
    for name, want in reference.items():
        assert params[name].dtype == dtype.np, name
        assert np.isfinite(want.astype(np.float32)).all(), name  # a real trajectory
        np.testing.assert_array_equal(params[name].view(np.int16), want.view(np.int16), name)


def _local(dtype):
    """The same micro-batching in one process: plan per micro-batch, tree sum, update."""
    model = _model(dtype)
    data = _batches(dtype)
    graph = core_graph.trace(_loss, model, *data[0], data_names=["x", "y"])
    vg = core_graph.validate(graph)
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    state = {n: {} for n in params}
    hyper = optim.validate(ADAM)
    update = optim.UPDATE_RULES[hyper.pop("name")]
    hyper["betas"] = tuple(hyper["betas"])
    for step, (x, y) in enumerate(data, start=1):
        grads = []
        for m, ((start, stop), scale) in enumerate(
            zip(micro_batches(BATCH, MICRO), loss_scales(BATCH, MICRO))
        ):
            batch = {"x": x[start:stop], "y": y[start:stop]}
            plan = compile_plan(vg, {k: v.shape for k, v in batch.items()})
            r = plan.run(params, batch, loss_scale=scale, seed=micro_batch_seed(JOB, step, m))
            grads.append(r.grads)
        for name in sorted(params):
            update(
                np, params[name], tree_sum([g[name].copy() for g in grads]), state[name], **hyper
            )
    return params, state


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_half_job_equals_local_training_over_one_and_two_workers(workers, dtype_name):
    dtype = DTYPES[dtype_name]
    reference, _ = _local(dtype)
    for n_workers in (1, 2):
        server = coordinator_mod.start(workers=workers[:n_workers], embedded_shards=2)
        try:
            with CoordinatorClient(server.address) as client:
                job = _create(client, dtype)
                for x, y in _batches(dtype):
                    job.step(x, y)
                params = {n: t.numpy() for n, t in job.parameters().items()}
                shards = server.coordinator.shards
                states = [s.store.jobs[JOB].state for s in shards]
        finally:
            server.stop(0)
            server.coordinator.close()
        _assert_bitwise_equal(params, reference, dtype)
        # Optimizer state in the parameters' dtype, as torch keeps it.
        held = [a for state in states for s in state.values() for k, a in s.items() if k != "step"]
        assert held and all(a.dtype == dtype.np for a in held)


@pytest.mark.parametrize("crash", [False, True], ids=["checkpoint", "crash"])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_half_job_survives_a_restart_of_the_coordinator_bitwise(
    workers, tmp_path, dtype_name, crash
):
    """A restart from the checkpoints of coordinator and shards (crash: from the last
    checkpoint and the step logs after it) continues the trajectory bit for bit."""
    dtype = DTYPES[dtype_name]
    reference, _ = _local(dtype)
    data = _batches(dtype)
    kw = dict(workers=workers, embedded_shards=2, state_dir=str(tmp_path), checkpoint_every=2)
    server = coordinator_mod.start(**kw)
    with CoordinatorClient(server.address) as client:
        job = _create(client, dtype)
        for x, y in data[:3]:
            job.step(x, y)
    server.stop(0)
    if not crash:
        server.coordinator.close()  # writes the final checkpoints
    server = coordinator_mod.start(**kw)
    try:
        with CoordinatorClient(server.address) as client:
            job = client.job(JOB)
            for x, y in data[3:]:
                job.step(x, y)
            params = {n: t.numpy() for n, t in job.parameters().items()}
    finally:
        server.stop(0)
        server.coordinator.close()
    _assert_bitwise_equal(params, reference, dtype)


def test_checkpoint_files_keep_bfloat16_by_name(tmp_path):
    """NumPy knows bfloat16 only as 2 raw bytes ('<V2'): checkpoints and step logs store
    its bits and the name 'bfloat16', and read back the dtype; other dtypes keep NumPy's
    labels ('<f4'), so files written before read as they did."""
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((3, 4)).astype(np.float32).astype(gm.bfloat16.np),
        "step": np.array(2.5, gm.bfloat16.np),
        "h": rng.standard_normal(5).astype(np.float16),
        "f": rng.standard_normal(2).astype(np.float32),
    }

    def same(got: dict) -> None:
        assert sorted(got) == sorted(arrays)
        for n, a in arrays.items():
            assert (got[n].dtype, got[n].shape, got[n].tobytes()) == (a.dtype, a.shape, a.tobytes())

    path = str(tmp_path / "c.npz")
    checkpoint.save(path, arrays, {"version": 1})
    loaded, meta = checkpoint.load(path)
    same(loaded)
    assert meta == {"version": 1}
    log = checkpoint.RecordLog(str(tmp_path / "j.log"))
    log.append({"step": 1}, arrays)
    log.close()
    with open(tmp_path / "j.log", "rb") as f:
        raw = f.read()
    assert b'"bfloat16"' in raw and b'"<f4"' in raw and b"<V2" not in raw
    [(record, logged)] = checkpoint.RecordLog(str(tmp_path / "j.log")).records()
    assert record == {"step": 1}
    same(logged)
