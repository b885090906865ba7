"""Opt-in bounded-staleness mode (docs/training.md, "Bounded staleness") on a real
coordinator: status and refusals, every row of every step applied exactly once with the
staleness within its bound while a slowed worker's gradients come back too stale, and a
step id's idempotence. Convergence on digits is in test_modes.py, next to the compressed
modes'."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

import gradmesh.core as gm
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.client.training import fit
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServerConfig, ServiceError
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardStore
from gradmesh.wire.errors import GradmeshError


@pytest.fixture(scope="module")
def cluster():
    workers = [worker_mod.start("cpu") for _ in range(2)]
    server = coordinator_mod.start(workers=[w.address for w in workers], shared_memory=False)
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    yield server, client, workers
    client.close()
    server.stop(0)
    server.coordinator.close()
    for w in workers:
        w.stop(0)


def _mean_loss(model, x):
    return model(x).mean()


def _linear_job(client, staleness, job_id, lr=0.1):
    gm.manual_seed(0)
    model = gm.nn.Linear(4, 1)
    x = np.zeros((4, 4), np.float32)
    job = client.create_job(
        model,
        _mean_loss,
        {"name": "sgd", "lr": lr},
        4,
        example_batch=(x,),
        data_names=["x"],
        staleness=staleness,
        job_id=job_id,
    )
    return model, job


def test_status_says_stale_and_bad_settings_are_refused_naming_staleness(cluster):
    _, client, _ = cluster
    _, job = _linear_job(client, 3, "st-status")
    status = job.status()
    assert (status.mode, status.deterministic, status.staleness) == ("stale", False, 3)
    assert job.in_flight == 3  # min(staleness + 1, 3) steps pipelined by fit
    with pytest.raises(GradmeshError) as e:  # same id, another bound
        _linear_job(client, 2, "st-status")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "staleness" in e.value.message
    assert _linear_job(client, 3, "st-status")[1].job_id == "st-status"  # idempotent
    assert _linear_job(client, None, None)[1].job_id != _linear_job(client, 2, None)[1].job_id
    with pytest.raises(GradmeshError) as e:
        _linear_job(client, 100_000, "st-big")
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "staleness")
    model = gm.nn.Linear(4, 1)
    with pytest.raises(GradmeshError) as e:
        client.create_job(
            model, _mean_loss, {"name": "sgd", "lr": 0.1}, 4,
            example_batch=(np.zeros((4, 4), np.float32),), staleness=2,
            compression={"kind": "sign"},
        )  # fmt: skip
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "staleness")
    assert "compression" in e.value.message
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="staleness"):
            _linear_job(client, bad, "st-bad")


def _gate(worker, versions, ahead):
    """Make ``worker`` compute one call at a time, each only once the job has made
    ``ahead`` more updates than when the call came (or after 2 s): its gradients are then
    at least ``ahead`` versions stale."""
    compute, lock = worker.worker.compute, threading.Lock()

    def gated(*args, **kwargs):
        with lock:
            start, until = versions(), time.monotonic() + 2.0
            while versions() < start + ahead and time.monotonic() < until:
                time.sleep(0.002)
            return compute(*args, **kwargs)

    worker.worker.compute = gated
    return lambda: setattr(worker.worker, "compute", compute)


@pytest.mark.parametrize(
    "shared_memory, shard_servers",
    [(False, 0), (True, 0), (False, 2)],
    ids=["bytes", "shared-memory", "2-shard-servers"],
)
def test_every_row_counts_once_and_staleness_stays_within_the_bound(
    cluster, shared_memory, shard_servers
):
    """The loss is linear in the parameters (the mean of x @ w + b), so its gradient does
    not depend on them, and SGD's parameters after any order of updates are
    w0 - lr * the sum over steps of the batch mean of x: a micro-batch dropped or applied
    twice would move them by a multiple of its rows' mean. A gated worker's gradients come
    back 2 versions stale, over the bound of 1: they are computed again, elsewhere. Over
    shared memory too, where parameter segments are reused once no call reads them, and
    over shard servers, each applying its part of every update."""
    _, _, workers = cluster
    shards = [serve_shard(ServerConfig(port=0), ShardStore()) for _ in range(shard_servers)]
    server = coordinator_mod.start(
        workers=[w.address for w in workers],
        shards=[s.address for s in shards],
        shared_memory=shared_memory,
    )
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    model, job = _linear_job(client, 1, "st-rows")
    w0, b0 = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    coordinator_job = server.coordinator.jobs["st-rows"]
    restore = _gate(workers[1], lambda: coordinator_job.version, 2)
    rng = np.random.default_rng(0)
    steps = [rng.uniform(1, 100, (30, 4)).astype(np.float32) for _ in range(6)]
    try:
        history = fit(job, [(x,) for x in steps], progress=False)
        status, params = job.status(), job.parameters()
    finally:
        restore()
        client.close()
        server.stop(0)
        server.coordinator.close()
        for shard in shards:
            shard.stop(0)
    assert history.steps == [1, 2, 3, 4, 5, 6] and status.last_step_id == 6
    assert status.version == 6 * 8  # 8 micro-batches a step (4 rows, the last 2), once each
    assert status.samples == 6 * 30
    assert status.max_staleness <= 1
    assert status.recomputed >= 1  # the gated worker's gradients, 2 versions stale
    expected_w = w0 - 0.1 * sum(x.astype(np.float64).mean(axis=0) for x in steps)
    np.testing.assert_allclose(params["weight"].numpy(), expected_w, rtol=1e-5)
    np.testing.assert_allclose(params["bias"].numpy(), b0 - 0.1 * 6, rtol=1e-5)


def test_a_failing_worker_loses_no_row(cluster):
    """A worker that fails every call (UNAVAILABLE, as when it goes down): its
    micro-batches go back to the queue and the other worker computes them, each once."""
    _, client, workers = cluster
    model, job = _linear_job(client, 2, "st-failing")
    w0 = model.weight.detach().numpy().copy()
    compute = workers[1].worker.compute

    def down(*args, **kwargs):
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "worker going down")

    workers[1].worker.compute = down
    steps = [np.full((12, 4), i + 1, np.float32) for i in range(4)]
    try:
        fit(job, [(x,) for x in steps], progress=False)
    finally:
        workers[1].worker.compute = compute
    status = job.status()
    assert (status.last_step_id, status.version) == (4, 4 * 3)
    expected = w0 - 0.1 * sum(x[0].astype(np.float64) for x in steps)
    np.testing.assert_allclose(job.parameters()["weight"].numpy(), expected, rtol=1e-5)


def test_a_step_id_is_applied_once_and_only_within_the_bound(cluster):
    _, client, _ = cluster
    _, job = _linear_job(client, 1, "st-ids")
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    first = job.step(x)
    again = job.step(x, step_id=1)
    assert again.replayed and again.loss == first.loss
    assert job.status().version == 2  # the replay applied nothing
    with pytest.raises(GradmeshError) as e:  # 2 earlier steps unfinished (2, 3): over 1
        job.step(x, step_id=4)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "staleness bound" in e.value.message
    with pytest.raises(GradmeshError) as e:
        job.step(x + 1, step_id=1)  # a step id with another batch
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_the_mode_and_every_applied_update_survive_a_coordinator_restart(cluster, tmp_path):
    """Step 4 fails on its micro-batch 2 (others applied) before a graceful restart: the
    checkpoint keeps its progress, and its retry afterwards computes only the rest."""
    _, _, workers = cluster
    addresses = [w.address for w in workers]
    x = np.arange(64, dtype=np.float32).reshape(16, 4)
    server = coordinator_mod.start(workers=addresses, state_dir=str(tmp_path))
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    computes = [w.worker.compute for w in workers]

    def failing_on(rows, inner):
        def compute(prepared, params, data, *args, **kwargs):
            if np.array_equal(data["x"], rows):
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "bad rows", "data[x]")
            return inner(prepared, params, data, *args, **kwargs)

        return compute

    try:
        _, job = _linear_job(client, 2, "st-restart")
        fit(job, [(x,), (x + 1,), (x + 2,)], progress=False)
        for w, inner in zip(workers, computes):
            w.worker.compute = failing_on((x + 3)[8:12], inner)
        with pytest.raises(GradmeshError) as e:
            job.step(x + 3, step_id=4)
        assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "batch[x]")
        lanes = server.coordinator.jobs["st-restart"].stale.lanes
        until = time.monotonic() + 30
        while lanes.running and time.monotonic() < until:  # micro-batch 3 may still run
            time.sleep(0.01)
        failed_at = job.status().version  # micro-batches 0, 1 applied, and 3 if it ran
        assert failed_at in (3 * 4 + 2, 3 * 4 + 3)
        before = job.parameters()
    finally:
        for w, inner in zip(workers, computes):
            w.worker.compute = inner
        client.close()
        server.stop(0)
        server.coordinator.close()
    server = coordinator_mod.start(workers=addresses, state_dir=str(tmp_path))
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    try:
        job = client.job("st-restart")
        status = job.status()
        assert (status.mode, status.staleness, status.version) == ("stale", 2, failed_at)
        assert status.next_step_id == 4 and job.in_flight == 3
        after = job.parameters()
        for name, a in before.items():
            assert np.array_equal(a.numpy(), after[name].numpy()), name
        assert job.step(x + 3).step_id == 4
        assert job.status().version == 4 * 4  # the micro-batches not applied only
    finally:
        client.close()
        server.stop(0)
        server.coordinator.close()


def _dyadic_job(client, job_id, staleness):
    """A linear model from zero, lr 1/16, 4 micro-batches of 4 integer rows a step: each
    update (lr * rows/batch * a micro-batch's mean row) is a multiple of 2**-8, so float32
    parameters hold every sum of them exactly and any order of updates ends on the same
    bits."""
    model = gm.nn.Linear(4, 1)
    with gm.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    job = client.create_job(
        model,
        _mean_loss,
        {"name": "sgd", "lr": 0.0625},
        4,
        example_batch=(np.zeros((4, 4), np.float32),),
        data_names=["x"],
        staleness=staleness,
        job_id=job_id,
    )
    return job


class _Crash:
    """Make a coordinator die at one point of one micro-batch (``rows``, once armed with the
    coordinator): ``at="compute"``, when a worker starts computing it, the call takes the
    coordinator's job lock and keeps it (nothing is applied or logged after); ``at="apply"``,
    after the coordinator logged the update, the shard's Apply fails, so the update is
    logged and not applied. Records the loss of every call by its rows."""

    def __init__(self, worker, rows, at):
        self.inner, self.worker, self.rows, self.at = worker.worker.compute, worker, rows, at
        self.losses: dict[bytes, float] = {}
        self.coordinator = self.job = None
        self.crashed = threading.Event()
        self.holding = False
        worker.worker.compute = self

    def arm(self, coordinator, job_id):
        self.coordinator, self.job = coordinator, coordinator.jobs[job_id]
        shard = coordinator.shards[0]
        apply = shard.apply

        def failing_apply(*args, **kwargs):
            if self.crashed.is_set():
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the coordinator died")
            return apply(*args, **kwargs)

        shard.apply = failing_apply

    def __call__(self, prepared, params, data, *args, **kwargs):
        x = data["x"]
        hit = self.job is not None and np.array_equal(x, self.rows)
        if hit and not self.crashed.is_set():
            if self.at == "compute":
                self.job.lock.acquire()
                self.holding = True
            self.crashed.set()
        out = self.inner(prepared, params, data, *args, **kwargs)
        self.losses[np.ascontiguousarray(x).tobytes()] = float(np.asarray(out.loss))
        return out

    def restore(self):
        self.worker.worker.compute = self.inner
        if self.holding:  # the dead coordinator's threads end, applying nothing
            self.job.error = "crashed"
            self.job.lock.release()


@pytest.mark.parametrize(
    "checkpoint_every, at, shard_servers",
    [(1, "compute", 0), (100, "compute", 0), (1, "apply", 0), (100, "apply", 0), (1, "compute", 2)],
    ids=["checkpoints", "log-only", "checkpoints-apply", "log-only-apply", "2-shard-servers"],
)
def test_a_coordinator_crash_mid_steps_applies_every_row_once(
    cluster, tmp_path, checkpoint_every, at, shard_servers
):
    """Steps 1-3 pipelined with a gated worker (recomputes), step 5 finished before step 4,
    then the coordinator dies at step 4's last micro-batch (its first three applied): while
    a worker computes it, or between logging its update and the shard's Apply. Restarted:
    step 5 replays, step 4 re-sent computes only its last micro-batch and reports the loss
    of all four, and the parameters are the closed form to the bit (every row applied
    exactly once); the recompute count is kept. With a checkpoint at each step finished in
    order (the in-flight steps' progress in it), with the step log alone, and with shard
    servers that outlive the coordinator."""
    _, _, workers = cluster
    addresses = [w.address for w in workers]
    rng = np.random.default_rng(1)
    steps = [rng.integers(-8, 9, (16, 4)).astype(np.float32) for _ in range(6)]
    shards = [serve_shard(ServerConfig(port=0), ShardStore()) for _ in range(shard_servers)]
    kw = {"state_dir": str(tmp_path), "checkpoint_every": checkpoint_every}
    kw.update(shards=[s.address for s in shards], shared_memory=False)
    server = coordinator_mod.start(workers=addresses, **kw)
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    crash = _Crash(workers[0], steps[3][12:16], at)
    compute, failures = workers[1].worker.compute, []
    try:
        job = _dyadic_job(client, "st-crash", 1)
        old = server.coordinator.jobs["st-crash"]
        restore = _gate(workers[1], lambda: old.version, 2)
        fit(job, [(x,) for x in steps[:3]], progress=False)
        restore()
        assert old.stale.recomputed >= 1

        def down(*args, **kwargs):  # one worker from here: micro-batches in queue order
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "worker going down")

        workers[1].worker.compute = down
        fifth = job.step(steps[4], step_id=5)  # finishes before step 4
        assert job.status().last_step_id == 3
        crash.arm(server.coordinator, "st-crash")
        fourth = threading.Thread(target=lambda: _expect_failure(job, steps[3], failures))
        fourth.start()
        assert crash.crashed.wait(30)
        if at == "apply":
            fourth.join(30)  # the failed Apply fails the step
        assert old.stale.steps[4].applied == {0, 1, 2}
        version, recomputed = old.version, old.stale.recomputed
        assert version == 4 * 4 + 3  # steps 1, 2, 3 and 5, and 3 of step 4
        server.stop(0)  # no close(), no checkpoint: a crash
        fourth.join(30)
        assert failures and not fourth.is_alive()  # the client never heard of step 4
        client.close()

        server2 = coordinator_mod.start(workers=addresses[:1], **kw)
        client = CoordinatorClient(server2.address, retry_seconds=0.0)
        try:
            job = client.job("st-crash")
            status = job.status()
            assert (status.next_step_id, status.version, status.error) == (4, version, "")
            assert status.recomputed == recomputed
            again = job.step(steps[4], step_id=5)
            assert again.replayed and again.loss == fifth.loss
            done = job.step(steps[3], step_id=4)
            assert not done.replayed and job.status().version == version + 1
            losses = [crash.losses[steps[3][i : i + 4].tobytes()] * 0.25 for i in (0, 4, 8, 12)]
            assert done.loss == (losses[0] + losses[1]) + (losses[2] + losses[3])
            assert job.step(steps[5]).step_id == 6
            params = job.parameters()
        finally:
            client.close()
            server2.stop(0)
            server2.coordinator.close()
    finally:
        crash.restore()
        workers[1].worker.compute = compute
        server.stop(0)
        for shard in shards:
            shard.stop(0)
    expected_w = -0.0625 * sum(x.astype(np.float64).mean(axis=0) for x in steps)
    assert np.array_equal(params["weight"].numpy()[0], expected_w.astype(np.float32))
    assert np.array_equal(params["bias"].numpy(), np.array([-0.0625 * 6], np.float32))


def _expect_failure(job, x, failures):
    try:
        job.step(x, step_id=4)
    except GradmeshError as e:
        failures.append(e)
