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


WORKERS = 3  # conftest's ``workers`` fixture starts so many


@pytest.fixture(scope="module")
def one_worker_coordinator(workers):
    """A coordinator for the tests of refusals: (server, client)."""
    server = coordinator_mod.start(workers=workers[:1])
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    yield server, client
    client.close()
    server.stop(0)
    server.coordinator.close()


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
        model,
        _loss,
        opt,
        MICRO,
        _data(1)[0],
        job_id=job_id,
        data_names=["x", "y"],
        scheduler=sched,
        **kw,
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


def test_adamw_cosine_bitwise_with_two_shards_and_local(workers):
    def opt(p):
        return gm.optim.AdamW(p, lr=0.05, weight_decay=0.1, amsgrad=True)

    def sched(o):
        return sched_mod.CosineAnnealingLR(o, T_max=5, eta_min=0.001)

    clip = {"max_norm": 0.5, "norm_type": float("inf")}
    reference, ref_lrs, ref_norms = _local(opt, sched, clip)
    params, lrs, norms = _distributed(workers[:2], 2, opt, sched, clip)
    _assert_bitwise(params, reference)
    assert lrs == ref_lrs and norms == ref_norms


OPTIMIZERS = {
    "rmsprop": lambda p: gm.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True, alpha=0.9),
    "adagrad": lambda p: gm.optim.Adagrad(
        p, lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=0.01
    ),
    "adamax": lambda p: gm.optim.Adamax(p, lr=0.05, betas=(0.8, 0.99), weight_decay=0.01),
    "nadam": lambda p: gm.optim.NAdam(
        p, lr=0.05, momentum_decay=0.01, weight_decay=0.05, decoupled_weight_decay=True
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_in_a_job_equals_local(workers, name):
    """Each optimizer's hyper-parameters cross the wire and its shards' state follows
    local training's (with StepLR and clip_grad_value_ on top)."""

    def sched(o):
        return sched_mod.StepLR(o, step_size=2, gamma=0.5)

    clip = {"clip_value": 0.05}
    reference, ref_lrs, _ = _local(OPTIMIZERS[name], sched, clip, steps=STEPS)
    params, lrs, norms = _distributed(workers[:2], 2, OPTIMIZERS[name], sched, clip)
    _assert_bitwise(params, reference)
    assert lrs == ref_lrs and norms == [None] * STEPS


def test_a_coordinator_crash_mid_schedule_continues_the_same_lr_sequence(workers, tmp_path):
    """A graceful restart (checkpoint) after step 2 and a crash (no checkpoint: the step
    logs of the coordinator and its shards replayed) after step 5: ReduceLROnPlateau, whose
    state depends on every step's loss, and the clipping carry on as if uninterrupted."""

    def opt(p):
        return gm.optim.SGD(p, lr=0.2, momentum=0.5)

    def sched(o):  # mode "max" on a falling loss: the lr halves after every bad step
        return sched_mod.ReduceLROnPlateau(o, mode="max", factor=0.5, patience=0)

    clip = {"max_norm": 0.4, "norm_type": 3.0}
    reference, ref_lrs, ref_norms = _local(opt, sched, clip)
    assert len(set(ref_lrs)) > 3
    kw = dict(workers=workers[:2], state_dir=str(tmp_path), embedded_shards=2, checkpoint_every=100)
    data, results = _data(), []
    server = coordinator_mod.start(**kw)
    with CoordinatorClient(server.address) as client:
        job = _job(client, opt, sched, clip)
        results += [job.step(x, y) for x, y in data[:2]]
    server.stop(0)
    server.coordinator.close()  # graceful: checkpoints the schedule's state
    server = coordinator_mod.start(**kw)
    with CoordinatorClient(server.address) as client:
        job = client.job(JOB)
        assert job.status().next_lr == ref_lrs[2]
        results += [job.step(x, y) for x, y in data[2:5]]
    server.stop(0)  # no close(): a crash
    server = coordinator_mod.start(**kw)
    try:
        with CoordinatorClient(server.address) as client:
            job = client.job(JOB)
            status = job.status()
            assert status.next_lr == ref_lrs[5] and status.last_grad_norm == ref_norms[4]
            assert status.schedule.WhichOneof("kind") == "reduce_on_plateau"
            again = job.step(*data[4], step_id=5)
            assert again.replayed and again.lr == ref_lrs[4]
            results += [job.step(x, y) for x, y in data[5:]]
            params = {n: t.numpy() for n, t in job.parameters().items()}
    finally:
        server.stop(0)
        server.coordinator.close()
    _assert_bitwise(params, reference)
    assert [r.lr for r in results] == ref_lrs
    assert [r.grad_norm for r in results] == ref_norms


def test_a_crash_between_the_shards_applies_retries_with_the_first_apply_arguments(
    workers, tmp_path
):
    """Shard 0 applied step 3 (with its lr and clip coefficient), shard 1 did not, the
    coordinator crashed: shard 0 no longer has the step's gradients to give a norm, so the
    retry sends shard 1 the arguments the intent record kept."""
    from gradmesh.server.runtime import ServiceError

    def opt(p):
        return gm.optim.SGD(p, lr=0.1, momentum=0.9)

    def sched(o):
        return sched_mod.ExponentialLR(o, gamma=0.7)

    clip = {"max_norm": 0.3}
    reference, ref_lrs, ref_norms = _local(opt, sched, clip)
    kw = dict(workers=workers[:1], state_dir=str(tmp_path), embedded_shards=2, checkpoint_every=100)
    data = _data()
    server = coordinator_mod.start(**kw)
    with CoordinatorClient(server.address, retry_seconds=0.0) as client:
        job = _job(client, opt, sched, clip)
        for x, y in data[:2]:
            job.step(x, y)

        def crash(*a, **k):
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "killed")

        server.coordinator.shards[1].apply = crash
        with pytest.raises(GradmeshError):
            job.step(*data[2])
        assert server.coordinator.shards[0].status(JOB) == (3, 3)
    server.stop(0)  # no close(): a crash
    server = coordinator_mod.start(**kw)
    try:
        with CoordinatorClient(server.address) as client:
            job = client.job(JOB)
            results = [job.step(x, y) for x, y in data[2:]]
            params = {n: t.numpy() for n, t in job.parameters().items()}
    finally:
        server.stop(0)
        server.coordinator.close()
    _assert_bitwise(params, reference)
    assert [r.lr for r in results] == ref_lrs[2:] and [r.grad_norm for r in results] == ref_norms[
        2:
    ]


def _create_request(**fields):
    model = _model()
    x, y = _data(1)[0]
    graph = core_graph.trace(_loss, model, x, y, data_names=["x", "y"])
    header = pb.CreateJobRequest(
        job_id="bad",
        graph=graph,
        optimizer=optimizer_to_proto(fields.pop("optimizer", {"name": "sgd", "lr": 0.1})),
        micro_batch_size=MICRO,
        **fields,
    )
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    return header, params


@pytest.mark.parametrize(
    "fields,field,match",
    [
        ({"schedule": pb.LRSchedule(step=pb.StepLR(step_size=0))}, "schedule.step_size", ">= 1"),
        ({"schedule": pb.LRSchedule(step=pb.StepLR())}, "schedule.step_size", "needs"),
        ({"schedule": pb.LRSchedule()}, "schedule.name", "unknown schedule"),
        (
            {
                "schedule": pb.LRSchedule(
                    sequential=pb.SequentialLR(
                        schedulers=[
                            pb.LRSchedule(exponential=pb.ExponentialLR(gamma=0.5)),
                            pb.LRSchedule(linear=pb.LinearLR(start_factor=2.0)),
                        ],
                        milestones=[3],
                    )
                )
            },
            "schedule.schedulers[1].start_factor",
            r"in \(0, 1\]",
        ),
        (
            {
                "schedule": pb.LRSchedule(one_cycle=pb.OneCycleLR(max_lr=1.0, total_steps=5)),
                "optimizer": {"name": "adagrad"},
            },
            "schedule",
            "momentum",
        ),
        (
            {"schedule": pb.LRSchedule(one_cycle=pb.OneCycleLR(max_lr=1.0, anneal_strategy="x"))},
            "schedule.total_steps",
            "needs",
        ),
        (
            {"clipping": pb.GradientClipping(norm=pb.ClipGradNorm(max_norm=-1))},
            "clipping.max_norm",
            ">= 0",
        ),
        ({"clipping": pb.GradientClipping(norm=pb.ClipGradNorm())}, "clipping.max_norm", "needs"),
        (
            {"clipping": pb.GradientClipping(norm=pb.ClipGradNorm(max_norm=1, norm_type=-2))},
            "clipping.norm_type",
            ">= 0",
        ),
        (
            {"clipping": pb.GradientClipping(value=pb.ClipGradValue(clip_value=0))},
            "clipping.clip_value",
            "> 0",
        ),
        ({"clipping": pb.GradientClipping()}, "clipping.kind", "'norm' or 'value'"),
    ],
)
def test_bad_schedules_and_clipping_are_invalid_argument_naming_the_field(
    one_worker_coordinator, fields, field, match
):
    server, client = one_worker_coordinator
    header, params = _create_request(**fields)
    with pytest.raises(GradmeshError, match=match) as e:
        client.create(header, params)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.field == field
    assert "bad" not in server.coordinator.jobs


def test_a_schedule_past_its_end_stops_the_job_as_torch_raises(one_worker_coordinator):
    """OneCycleLR(total_steps=2): torch's scheduler raises at the third step() call, so
    the job applies three steps and refuses the fourth with FAILED_PRECONDITION."""
    _, client = one_worker_coordinator
    job = _job(
        client,
        lambda p: gm.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda o: sched_mod.OneCycleLR(o, max_lr=1.0, total_steps=2),
        None,
        job_id="ends",
    )
    data = _data(4)
    for x, y in data[:3]:
        job.step(x, y)
    with pytest.raises(GradmeshError, match="schedule ended.*total steps is 2") as e:
        job.step(*data[3])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert job.status().version == 3


def test_the_sdk_refuses_schedules_that_are_code_and_checks_its_arguments(
    one_worker_coordinator,
):
    server, client = one_worker_coordinator
    model = _model()
    opt = gm.optim.SGD(model.parameters(), lr=0.1)

    def create(**kw):
        return client.create_job(
            model, _loss, opt, MICRO, _data(1)[0], job_id="sdk", data_names=["x", "y"], **kw
        )

    lam = sched_mod.LambdaLR(opt, lambda e: 0.9**e)
    with pytest.raises(ValueError, match="LambdaLR runs a Python function.*no code"):
        create(scheduler=lam)
    with pytest.raises(ValueError, match="LambdaLR runs a Python function"):
        create(scheduler={"name": "LambdaLR"})
    other = gm.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        create(scheduler=sched_mod.StepLR(other, step_size=2))
    with pytest.raises(ValueError, match="not both"):
        create(clip_grad_norm=1.0, clip_grad_value=1.0)
    with pytest.raises(ValueError, match="clip_grad_norm.max_norm"):
        create(clip_grad_norm=float("nan"))
    assert "sdk" not in server.coordinator.jobs


@pytest.mark.slow
def test_processes_sigkill_of_the_coordinator_and_a_shard_mid_schedule(tmp_path):
    """Coordinator, 2 shard servers and 2 workers as processes (LocalCluster): the
    coordinator SIGKILLed after step 3, shard 1 after step 5, mid-OneCycleLR with
    clip_grad_norm. The job ends bitwise equal to an undisturbed job on the same cluster,
    and its lrs and norms are local training's (the workers' own BLAS build may round the
    gradients differently from this process, so the parameters are compared between
    jobs on the cluster)."""
    from gradmesh.client.cluster import LocalCluster

    def opt(p):
        return gm.optim.SGD(p, lr=0.1, momentum=0.9)

    def sched(o):
        return sched_mod.OneCycleLR(o, max_lr=0.5, total_steps=STEPS)

    clip = {"max_norm": 0.3}
    _, ref_lrs, ref_norms = _local(opt, sched, clip)
    data = _data()
    with LocalCluster(
        workers=2, shards=2, threads_per_worker=1, checkpoint_every=2, state_dir=str(tmp_path)
    ) as cluster:
        plain = _job(cluster.client(), opt, sched, clip, job_id="undisturbed")
        undisturbed = [plain.step(x, y) for x, y in data]
        job = _job(cluster.client(), opt, sched, clip, job_id="killed")
        results = [job.step(x, y) for x, y in data[:3]]
        cluster.restart_coordinator(kill=True)
        job = cluster.client().job("killed")
        results += [job.step(x, y) for x, y in data[3:5]]
        cluster.restart_shard(1, kill=True)
        job = cluster.client().job("killed")
        results += [job.step(x, y) for x, y in data[5:]]
        _assert_bitwise(
            {n: t.numpy() for n, t in job.parameters().items()},
            {n: t.numpy() for n, t in plain.parameters().items()},
        )
    assert [r.lr for r in results] == [r.lr for r in undisturbed] == ref_lrs
    assert [r.grad_norm for r in results] == [r.grad_norm for r in undisturbed]
    np.testing.assert_allclose([r.grad_norm for r in results], ref_norms, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_error_if_nonfinite_fails_the_step_and_applies_nothing(one_worker_coordinator):
    """An absurd lr makes the parameters infinite after step 1; step 2's total norm is
    then not finite: INVALID_ARGUMENT naming the batch, as torch raises, nothing applied;
    without error_if_nonfinite the job goes on (scaled by the NaN coefficient, as torch)."""
    _, client = one_worker_coordinator
    data = _data(2)

    def opt(p):
        return gm.optim.SGD(p, lr=1e39)  # inf once cast to float32

    clip = {"max_norm": 100.0, "error_if_nonfinite": True}
    job = _job(client, opt, None, clip, job_id="nonfinite")
    assert np.isfinite(job.step(*data[0]).grad_norm)
    with pytest.raises(GradmeshError, match="non-finite, so it cannot be clipped") as e:
        job.step(*data[1])
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "batch")
    assert job.status().version == 1
    lenient = _job(client, opt, None, {"max_norm": 100.0}, job_id="lenient")
    lenient.step(*data[0])
    assert not np.isfinite(lenient.step(*data[1]).grad_norm)
