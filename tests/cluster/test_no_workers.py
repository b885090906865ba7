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
