"""A coordinator with no workers: a step fails fast and says why (reason NO_WORKERS) after
a short, configurable wait, logged while it waits; workers that register later
(``LocalCluster.add_worker``, with this coordinator or another one) are used."""

from __future__ import annotations

import logging

import pytest
from models import cross_entropy, mlp, separable_steps

from gradmesh.client import Unavailable
from gradmesh.client.cluster import LocalCluster

SGD = {"name": "sgd", "lr": 0.1}


@pytest.fixture(scope="module")
def two_empty_clusters():
    with LocalCluster(workers=0, threads_per_worker=1) as a:
        with LocalCluster(workers=0, threads_per_worker=1) as b:
            yield a, b


def _job(client):
    batches = separable_steps(2, 16, 6, 3, seed=2)
    job = client.create_job(mlp(6, 8, 3, seed=1), cross_entropy, SGD, 8, batches[0])
    return job, batches


def test_a_step_without_workers_fails_fast_saying_why(two_empty_clusters, caplog):
    a, _ = two_empty_clusters
    job, batches = _job(a.client(wait_for_workers=0.5))
    with caplog.at_level(logging.WARNING, logger="gradmesh.client"):
        with pytest.raises(Unavailable) as raised:
            job.step(*batches[0])
    error = raised.value
    assert error.reason == "NO_WORKERS"
    assert "no workers are registered" in error.message
    assert "wait_for_workers" in error.message  # how to wait longer
    waiting = [r.getMessage() for r in caplog.records if r.name == "gradmesh.client"]
    assert len(waiting) == 1 and "no workers are registered" in waiting[0]
    # Refused before any work: the same step id is still the next one.
    assert job.status().next_step_id == 1


def test_add_worker_registers_with_the_coordinator_it_names(two_empty_clusters):
    a, b = two_empty_clusters
    elsewhere = a.add_worker(coordinator=b.coordinator_target)
    assert [w.address for w in b.client().list_workers()] == [elsewhere.target]
    assert a.client().list_workers() == []
    job, batches = _job(a.client(wait_for_workers=0.0))
    with pytest.raises(Unavailable):
        job.step(*batches[0])  # wait_for_workers=0: at once
    here = a.add_worker()
    assert [w.address for w in a.client().list_workers()] == [here.target]
    result = job.step(*batches[0])
    assert result.step_id == 1 and result.micro_batches == 2


def test_known_workers_none_ready_have_their_own_reason():
    """Workers known but none ready (here one configured where nothing listens): reason
    NO_USABLE_WORKERS, and the message says which and why."""
    from gradmesh.server import dispatch
    from gradmesh.server.runtime import ServiceError
    from gradmesh.server.workers import WorkerPool

    pool = WorkerPool(static=["127.0.0.1:1"], timeout=5.0)
    try:
        with pytest.raises(ServiceError) as raised:
            dispatch.dispatch(pool, 1, compute=None, accept=None, deadline=0.0)
    finally:
        pool.close()
    assert raised.value.reason == "NO_USABLE_WORKERS"
    assert "127.0.0.1:1 unreachable" in raised.value.message
