"""The coordinator restarted on another address (docs/training.md, "Faults"), as
processes: the job continues from its state directory, but nothing follows it by itself.
A client connected to the old address gets UNAVAILABLE; a new ``CoordinatorClient`` at
the new address continues the job at its next step. A worker registered with
``--coordinator OLD`` keeps calling the old address: the moved coordinator has no
worker (steps fail with UNAVAILABLE, nothing applied) until a worker is started with
``--coordinator NEW``; then training goes on with the same bits as an undisturbed run."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from models import cross_entropy, mlp, separable_steps

from gradmesh.client import CoordinatorClient
from gradmesh.client.cluster import LocalCluster
from gradmesh.wire.errors import GradmeshError

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
STEPS = 6


def _data():
    return separable_steps(STEPS, 24, 6, 3, seed=2)


def _create(client, job_id):
    return client.create_job(
        mlp(6, 16, 3, seed=1),
        cross_entropy,
        SGD,
        8,
        _data()[0],
        job_id=job_id,
        data_names=["x", "y"],
    )


def _params(job):
    return {n: t.numpy() for n, t in job.parameters().items()}


def test_a_coordinator_on_another_address_needs_new_clients_and_re_registered_workers(
    tmp_path,
):
    cluster = LocalCluster(
        workers=0, state_dir=str(tmp_path), checkpoint_every=2, threads_per_worker=1
    )
    with cluster:
        cluster.add_worker()  # registers with the coordinator where it is now
        client = cluster.client()
        plain = _create(client, "plain")
        for x, y in _data():
            plain.step(x, y)
        reference = _params(plain)
        job = _create(client, "moved")
        data = _data()
        results = [job.step(x, y) for x, y in data[:3]]
        old = cluster.coordinator_target
        cluster.stop_coordinator()  # SIGTERM; then started on a new port
        cluster.start_coordinator()
        new = cluster.coordinator_target
        assert new != old
        # The old client: nothing answers there.
        with CoordinatorClient(old, timeout=5, retry_seconds=0) as stale:
            with pytest.raises(GradmeshError) as e:
                stale.job("moved").status()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        # A client at the new address: the job, at its next step.
        job = cluster.client().job("moved")
        assert job.status().version == 3 and job.next_step_id == 4
        again = job.step(*data[2], step_id=3)
        assert again.replayed and again.loss == results[2].loss
        # The registered worker still heartbeats the old address: no worker here.
        assert cluster.client().list_workers() == []
        impatient = cluster.client(wait_for_workers=0).job("moved")
        with pytest.raises(GradmeshError) as e:
            impatient.step(*data[3], step_id=4)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert e.value.reason == "NO_WORKERS"
        assert job.status().version == 3  # nothing applied
        # The user's part: start (or restart) workers with --coordinator NEW.
        cluster.add_worker(coordinator=new)
        for x, y in data[3:]:
            job.step(x, y)
        moved = _params(job)
        assert moved.keys() == reference.keys()
        for n in reference:
            assert np.array_equal(moved[n], reference[n]), n
