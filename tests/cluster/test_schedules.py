"""Schedules, clipping and every optimizer in a job, as data: a job run through a real
coordinator (in-process servers on 127.0.0.1) gives bitwise the parameters, learning rates
and gradient norms of local training with gradmesh's own optimizer, lr_scheduler and
clip_grad_norm_ over the same micro-batching (the micro-batch gradients summed with the
coordinator's pairwise tree, so the local reference is bitwise, not approximate), whatever
the number of workers and shards, and across a coordinator crash mid-schedule."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from models import mlp, separable_steps

import gradmesh.core as gm
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.core import graph as core_graph
from gradmesh.core.nn.utils import clip_grad_norm_, clip_grad_value_
from gradmesh.core.optim import lr_scheduler as sched_mod
from gradmesh.core.plan import compile_plan
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.aggregate import loss_scales, micro_batch_seed, micro_batches, tree_sum
from gradmesh.v1 import coordinator_pb2 as pb
from gradmesh.wire.errors import GradmeshError
from gradmesh.wire.shard import optimizer_to_proto

STEPS = 8
BATCH, MICRO = 20, 8  # micro-batches of 8, 8 and 4 rows
JOB = "schedules"


def _model():
    return mlp(6, 16, 3, seed=4, activation=gm.nn.Tanh)


def _loss(model, x, y):
    return gm.nn.functional.cross_entropy(model(x), y)


def _data(steps=STEPS):
    return separable_steps(steps, BATCH, 6, 3, seed=21)


@pytest.fixture(scope="module")
def workers():
    started = [worker_mod.start("cpu") for _ in range(3)]
    yield [w.address for w in started]
    for w in started:
        w.stop(0)


def _local(make_optimizer, make_scheduler, clip, steps=STEPS):
    """Local training, gradmesh's own classes: per step the micro-batch gradients (the
    compiled plan, scaled by rows / batch, seeded as the coordinator seeds them) summed
    with the coordinator's tree into ``.grad``, then clipping, ``step()``s."""
    model, data = _model(), _data(steps)
    opt = make_optimizer(model.parameters())
    sched = make_scheduler(opt) if make_scheduler else None
    graph = core_graph.trace(_loss, model, *data[0], data_names=["x", "y"])
    vg = core_graph.validate(graph)
    params = dict(model.named_parameters())
    lrs, norms = [], []
    for step, (x, y) in enumerate(data, start=1):
        grads, losses = [], []
        for m, ((a, b), scale) in enumerate(
            zip(micro_batches(BATCH, MICRO), loss_scales(BATCH, MICRO))
        ):
            batch = {"x": x[a:b], "y": y[a:b]}
            plan = compile_plan(vg, {k: v.shape for k, v in batch.items()})
            arrays = {n: p.detach().numpy() for n, p in params.items()}
            r = plan.run(arrays, batch, loss_scale=scale, seed=micro_batch_seed(JOB, step, m))
            grads.append(r.grads)
            losses.append(np.float64(r.loss))
        for n, p in params.items():
            p.grad = gm.tensor(tree_sum([g[n].copy() for g in grads]))
        if clip and "max_norm" in clip:
            norms.append(float(clip_grad_norm_(model.parameters(), **clip)))
        elif clip:
            clip_grad_value_(model.parameters(), **clip)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if isinstance(sched, sched_mod.ReduceLROnPlateau):
            sched.step(float(tree_sum(losses)))
        elif sched is not None:
            sched.step()
    return {n: p.detach().numpy() for n, p in params.items()}, lrs, norms


def _job(client, make_optimizer, make_scheduler, clip, job_id=JOB):
    model = _model()
    opt = make_optimizer(model.parameters())
    sched = make_scheduler(opt) if make_scheduler else None
    kw = {}
    if clip and "max_norm" in clip:
        kw["clip_grad_norm"] = clip
    elif clip:
        kw["clip_grad_value"] = clip["clip_value"]
    return client.create_job(
        model, _loss, opt, MICRO, _data(1)[0], job_id=job_id, data_names=["x", "y"],
        scheduler=sched, **kw,
    )


def _distributed(addresses, shards, make_optimizer, make_scheduler, clip):
    server = coordinator_mod.start(workers=addresses, embedded_shards=shards)
    try:
        with CoordinatorClient(server.address) as client:
            job = _job(client, make_optimizer, make_scheduler, clip)
            results = [job.step(x, y) for x, y in _data()]
            params = {n: t.numpy() for n, t in job.parameters().items()}
            return params, [r.lr for r in results], [r.grad_norm for r in results]
    finally:
        server.stop(0)
        server.coordinator.close()


def _assert_bitwise(params, reference):
    assert params.keys() == reference.keys()
    for n in reference:
        assert np.array_equal(params[n], reference[n]), n


def test_sgd_onecycle_clip_norm_bitwise_across_workers_and_local(workers):
    def opt(p):
        return gm.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)

    def sched(o):
        return sched_mod.OneCycleLR(o, max_lr=0.5, total_steps=STEPS)

    clip = {"max_norm": 0.3}
    reference, ref_lrs, ref_norms = _local(opt, sched, clip)
    assert min(ref_norms) > 0.3  # clipping did scale every step
    assert len(set(ref_lrs)) == STEPS  # the lr moved every step
    for n_workers in (1, 3):
        params, lrs, norms = _distributed(workers[:n_workers], 2, opt, sched, clip)
        _assert_bitwise(params, reference)
        assert lrs == ref_lrs and norms == ref_norms, n_workers
