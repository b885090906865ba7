"""The process-level cluster: coordinator, 2 shards and 2 workers as separate processes on
127.0.0.1 (``LocalCluster``), sharing one cluster for the module.

Every job trains the same model on the same batches, so each must end bitwise equal to the
uninterrupted run: after a graceful coordinator restart, after a coordinator crash
(SIGKILL) and with a worker killed mid-training.
"""

from __future__ import annotations

import numpy as np
import pytest
from models import cross_entropy, mlp, separable_steps

from gradmesh.client.cluster import LocalCluster

STEPS = 8
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


def _model():
    return mlp(6, 16, 3, seed=1)


_loss = cross_entropy


def _data():
    return separable_steps(STEPS, 24, 6, 3, seed=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(
        workers=2,
        shards=2,
        threads_per_worker=1,
        checkpoint_every=2,
        state_dir=str(tmp_path_factory.mktemp("cluster-state")),
        coordinator_args=["--micro-batch-deadline", "30"],
    )
    with c:
        yield c


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    job = cluster.client().create_job(
        _model(), _loss, SGD, 8, _data()[0], job_id="plain", data_names=["x", "y"]
    )
    losses = [job.step(x, y).loss for x, y in _data()]
    return losses, _params(job)


def _params(job):
    return {n: t.numpy() for n, t in job.parameters().items()}


def _assert_equal(params, reference):
    assert params.keys() == reference.keys()
    for n in reference:
        assert np.array_equal(params[n], reference[n]), n


def _create(cluster, job_id):
    return cluster.client().create_job(
        _model(), _loss, SGD, 8, _data()[0], job_id=job_id, data_names=["x", "y"]
    )


def test_servers_are_separate_processes_and_report_their_workers(cluster, uninterrupted):
    pids = {p.pid for p in cluster.workers + cluster.shards + [cluster.coordinator]}
    assert len(pids) == 5 and all(p.alive() for p in cluster.workers + cluster.shards)
    workers = cluster.client().list_workers()
    assert sorted(w.address for w in workers) == sorted(w.address for w in cluster.workers)
    assert {w.state for w in workers} == {"ready"} and sum(w.completed for w in workers) > 0
    status = cluster.client().job("plain").status()
    assert status.version == STEPS and set(status.placement.values()) == {0, 1}
    losses, _ = uninterrupted
    assert losses[-1] < losses[0]


def test_graceful_coordinator_restart_resumes_and_replays(cluster, uninterrupted):
    job = _create(cluster, "graceful")
    data = _data()
    results = [job.step(x, y) for x, y in data[:3]]
    cluster.stop_coordinator()  # SIGTERM: checkpoints on the way out
    cluster.start_coordinator()
    job = cluster.client().job("graceful")
    assert job.status().version == 3
    again = job.step(*data[2], step_id=3)
    assert again.replayed and again.loss == results[2].loss
    for x, y in data[3:]:
        job.step(x, y)
    _assert_equal(_params(job), uninterrupted[1])


def test_coordinator_crash_resumes_from_the_shards(cluster, uninterrupted):
    job = _create(cluster, "crash")
    data = _data()
    for x, y in data[:5]:  # checkpoints at 2 and 4; 5 is not
        job.step(x, y)
    cluster.stop_coordinator(kill=True)
    cluster.start_coordinator()
    job = cluster.client().job("crash")
    # The shards applied step 5: the parameters are not lost, only its result.
    assert job.status().version == 5 and job.next_step_id == 6
    for x, y in data[5:]:
        job.step(x, y)
    _assert_equal(_params(job), uninterrupted[1])


def test_worker_killed_mid_training_is_replaced_bitwise_equal(cluster, uninterrupted):
    job = _create(cluster, "killed")
    data = _data()
    for x, y in data[:2]:
        job.step(x, y)
    cluster.workers[1].kill()  # SIGKILL: its calls fail from now on
    reassigned = sum(job.step(x, y).timings["reassigned"] for x, y in data[2:])
    assert reassigned >= 1
    _assert_equal(_params(job), uninterrupted[1])
    states = {w.address: w.state for w in cluster.client().list_workers()}
    assert states[cluster.workers[1].address] == "unreachable"
