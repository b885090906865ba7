"""A synchronous job's next step, sent while the current one runs (``Job.step_async``, two
in flight, as ``fit`` does), is held by the coordinator until the step before it has been
answered: its batch travels and is checked meanwhile, and the results are the bits of
sending the steps one at a time."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from models import classification_batch, cross_entropy, mlp

from gradmesh.client import CoordinatorClient
from gradmesh.client.training import fit
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import jobs as jobs_mod
from gradmesh.wire.errors import FailedPrecondition, InvalidArgument

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
STEPS = 6


def _batches():
    return [classification_batch(24, 10, 4, seed) for seed in range(STEPS)]


@pytest.fixture
def coordinator(workers):
    server = coordinator_mod.start(workers=workers, embedded_shards=2)
    try:
        yield server
    finally:
        server.stop(0)
        server.coordinator.close()


def _job(server):
    client = CoordinatorClient(server.address)
    first = classification_batch(24, 10, 4, 0)
    model = mlp(10, 32, 4, seed=3)
    return client, client.create_job(model, cross_entropy, SGD, 8, first, data_names=["x", "y"])


def _parameters(job) -> dict:
    return {n: t.numpy() for n, t in job.parameters().items()}


def test_two_steps_in_flight_give_the_bits_of_one_at_a_time(workers):
    runs = []
    for in_flight in (1, 2):
        server = coordinator_mod.start(workers=workers, embedded_shards=2)
        try:
            client, job = _job(server)
            with client:
                assert job.in_flight == 2  # the default of a synchronous job
                history = fit(job, _batches(), progress=False, in_flight=in_flight)
                assert history.steps == list(range(1, STEPS + 1))
                runs.append((history.losses, _parameters(job)))
        finally:
            server.stop(0)
            server.coordinator.close()
    (seq_losses, sequential), (losses, overlapped) = runs
    assert losses == seq_losses
    for name in sequential:
        assert np.array_equal(sequential[name], overlapped[name]), name
    initial = mlp(10, 32, 4, seed=3)[0].weight.detach().numpy()
    assert not np.array_equal(sequential["0.weight"], initial)  # training moved them


def test_a_step_that_arrives_before_the_one_before_it_waits_for_it(coordinator, workers):
    client, job = _job(coordinator)
    batches = _batches()
    results = {}

    def send(sid):
        results[sid] = client.step(job.job_id, sid, dict(zip(["x", "y"], batches[sid - 1])))

    with client:
        second = threading.Thread(target=send, args=(2,))
        second.start()
        second.join(0.5)
        assert second.is_alive()  # held: step 1 has not arrived
        send(1)
        second.join(60)
        assert not second.is_alive()
        assert [results[1].step_id, results[2].step_id] == [1, 2]
        assert results[2].version == 2 and not results[2].replayed
        held = _parameters(job)

    # The same two steps sent one after the other: the same bits.
    server = coordinator_mod.start(workers=workers, embedded_shards=2)
    try:
        client2, job2 = _job(server)
        with client2:
            for batch in batches[:2]:
                job2.step(*batch)
            for name, value in _parameters(job2).items():
                assert np.array_equal(value, held[name]), name
    finally:
        server.stop(0)
        server.coordinator.close()


def test_a_held_step_fails_at_once_when_the_one_before_fails(coordinator, monkeypatch):
    """Step 1's batch is refused: step 2, held for it, is out of sequence at once (not
    after the grace period, here longer than the join's patience)."""
    monkeypatch.setattr(jobs_mod, "QUEUE_GRACE", 600.0)
    client, job = _job(coordinator)
    x, y = classification_batch(24, 10, 4, 1)
    errors = {}

    def send(sid, batch):
        try:
            client.step(job.job_id, sid, batch)
        except Exception as e:  # noqa: BLE001  (kept for the assertions)
            errors[sid] = e

    with client:
        second = threading.Thread(target=send, args=(2, {"x": x, "y": y}))
        second.start()
        second.join(0.5)
        send(1, {"x": x.astype(np.float64), "y": y})
        second.join(60)
        assert not second.is_alive()
        assert isinstance(errors[1], InvalidArgument)
        assert isinstance(errors[2], FailedPrecondition)
        assert "expects step 1 next" in errors[2].message
        # Nothing was applied: the job goes on from step 1.
        assert job.step(x, y, step_id=1).step_id == 1


def test_the_sdk_says_why_the_step_after_a_failed_one_did_not_run(coordinator):
    client, job = _job(coordinator)
    x, y = classification_batch(24, 10, 4, 1)
    with client:
        bad = job.step_async(x.astype(np.float64), y)
        after = job.step_async(x, y)
        with pytest.raises(InvalidArgument):
            bad.result(60)
        with pytest.raises(
            FailedPrecondition, match="step 2 .* was not run: step 1, sent before it, failed"
        ):
            after.result(60)
        assert [job.step(x, y, step_id=s).step_id for s in (1, 2)] == [1, 2]
