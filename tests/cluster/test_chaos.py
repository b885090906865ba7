"""Chaos: a real cluster (coordinator, 2 shards, 3 workers as separate processes on
127.0.0.1, shared memory on) trains while a seeded schedule SIGKILLs and restarts workers
(on the same address and on a new one), shards and the coordinator, and stops shards and
the coordinator with SIGTERM and restarts them, often in the middle of a step. The
client retries each step id until it is acknowledged. At the end:

* every acknowledged step was applied exactly once: step ``s`` answered version ``s``, a
  re-sent step id is a replay with the same loss, and the job is at version ``STEPS``;
* the final parameters are bitwise equal (``numpy.array_equal``) to an undisturbed run.

``GRADMESH_CHAOS_STEPS=200 GRADMESH_CHAOS_SEED=7 pytest tests/cluster/test_chaos.py`` hunts
longer (the schedule scales with the number of steps).
"""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest
from models import cross_entropy, mlp, separable_steps

from gradmesh.client.cluster import LocalCluster
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.wire.errors import GradmeshError

pytestmark = pytest.mark.slow

STEPS = int(os.environ.get("GRADMESH_CHAOS_STEPS", "16"))
SEED = int(os.environ.get("GRADMESH_CHAOS_SEED", "0"))
JOB = "chaos"
ADAM = {"name": "adam", "lr": 0.01}
# SIGKILL and restart (a worker on its address or a new one, a shard, the coordinator), and
# SIGTERM and restart (a shard, the coordinator).
EVENTS = [
    "worker",
    "worker-new-address",
    "shard",
    "coordinator",
    "shard-sigterm",
    "coordinator-sigterm",
]


def _model():
    return mlp(6, 32, 3, seed=3, dropout=0.2)


_loss = cross_entropy


def _data(steps):
    return separable_steps(steps, 24, 6, 3, seed=11)


def _create(client):
    return client.create_job(
        _model(), _loss, ADAM, 4, _data(1)[0], job_id=JOB, data_names=["x", "y"]
    )


def _params(job):
    return {n: t.numpy() for n, t in job.parameters().items()}


def _undisturbed(data):
    """The same job (same id: the same dropout masks) in one process, nothing killed."""
    workers = [worker_mod.start("cpu")]
    server = coordinator_mod.start(workers=[w.address for w in workers])
    try:
        with CoordinatorClient(server.address) as client:
            job = _create(client)
            losses = [job.step(x, y).loss for x, y in data]
            return losses, _params(job)
    finally:
        server.stop(0)
        server.coordinator.close()
        for w in workers:
            w.stop(0)


def _schedule(rng: random.Random) -> dict[int, str]:
    """Which fault starts during which step: every kind at least once, then at random."""
    kinds = EVENTS + [rng.choice(EVENTS) for _ in range(max(0, STEPS // 4 - len(EVENTS)))]
    rng.shuffle(kinds)
    steps = sorted(rng.sample(range(2, STEPS + 1), min(len(kinds), STEPS - 1)))
    return dict(zip(steps, kinds))


def _inject(cluster: LocalCluster, kind: str, rng: random.Random, log: list) -> None:
    time.sleep(rng.uniform(0.0, 0.1))  # often in the middle of a step
    if kind.startswith("coordinator"):
        cluster.restart_coordinator(kill=kind == "coordinator")
    elif kind == "shard":
        i = rng.randrange(len(cluster.shards))
        cluster.shards[i].kill()
        time.sleep(rng.uniform(0.0, 1.0))  # steps fail meanwhile: the job says why
        cluster.restart_shard(i)
    elif kind == "shard-sigterm":
        cluster.restart_shard(rng.randrange(len(cluster.shards)), kill=False)
    else:
        i = rng.randrange(len(cluster.workers))
        cluster.restart_worker(i, kill=True, same_address=kind == "worker")
    log.append(kind)


def _step_until_acknowledged(cluster, target, step_id, x, y, errors: list, deadline=90.0):
    end = time.monotonic() + deadline
    while True:
        try:
            with CoordinatorClient(target, retry_seconds=0.0) as c:
                return c.job(JOB).step(x, y, step_id=step_id)
        except GradmeshError as e:
            errors.append(f"step {step_id}: {e.code.name}: {e}")
            if time.monotonic() > end:
                raise AssertionError(
                    f"step {step_id} never acknowledged; errors:\n"
                    + "\n".join(errors[-10:])
                    + f"\nlogs: {cluster.logs()}"
                ) from None
            time.sleep(0.2)


def test_training_through_kills_and_restarts_is_bitwise_equal(tmp_path):
    data = _data(STEPS)
    ref_losses, reference = _undisturbed(data)
    rng = random.Random(SEED)
    schedule = _schedule(rng)
    cluster = LocalCluster(
        workers=3,
        shards=2,
        threads_per_worker=1,
        checkpoint_every=3,
        state_dir=str(tmp_path / "state"),
        log_dir=str(tmp_path / "logs"),
        coordinator_args=["--micro-batch-deadline", "10", "--shared-memory", "on"],
    )
    injected: list[str] = []
    errors: list[str] = []
    acknowledged = {}
    with cluster:
        target = cluster.coordinator_target  # restarts keep the address
        with CoordinatorClient(target) as c:
            _create(c)
        chaos = None
        for step_id, (x, y) in enumerate(data, start=1):
            if step_id in schedule:
                if chaos is not None:
                    chaos.join()  # one fault at a time; steps go on meanwhile
                chaos = threading.Thread(
                    target=_inject,
                    args=(cluster, schedule[step_id], random.Random(rng.random()), injected),
                )
                chaos.start()
            r = _step_until_acknowledged(cluster, target, step_id, x, y, errors)
            # Applied exactly once: step s leaves the job at version s.
            assert (r.step_id, r.version) == (step_id, step_id), (r, errors[-5:])
            acknowledged[step_id] = r.loss
        if chaos is not None:
            chaos.join()
        with CoordinatorClient(target) as c:
            job = c.job(JOB)
            status = job.status()
            assert (status.version, status.last_step_id, status.error) == (STEPS, STEPS, "")
            for step_id in (1, STEPS // 2, STEPS):  # kept across every restart: replays
                x, y = data[step_id - 1]
                again = job.step(x, y, step_id=step_id)
                assert again.replayed and again.loss == acknowledged[step_id]
            final = _params(job)
    print(f"chaos: {STEPS} steps, faults {injected}, {len(errors)} failed attempts:")
    print("\n".join(errors))
    assert sorted(set(injected)) == sorted(set(schedule.values()))
    assert [acknowledged[s] for s in range(1, STEPS + 1)] == ref_losses
    assert final.keys() == reference.keys()
    for n in reference:
        assert np.array_equal(final[n], reference[n]), n
