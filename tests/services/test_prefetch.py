"""Overlap across steps: after a step the coordinator pulls the new parameter version from
the shards and encodes it (unary bytes for remote workers, a shared-memory segment for
workers on its host) in the background, before the next step arrives. Training with and
without it (``Coordinator.prefetch``) gives the same bits."""

from __future__ import annotations

import numpy as np
import pytest
from models import classification_batch, cross_entropy, mlp

from gradmesh.client import CoordinatorClient
from gradmesh.server import coordinator as coordinator_mod

ADAM = {"name": "adam", "lr": 0.01, "weight_decay": 1e-3}
STEPS = 5


def _wait_for_prefetch(server):
    # One prefetch thread, first in first out: an empty task runs after the last one.
    server.coordinator._prefetcher.submit(lambda: None).result()


def _train(workers, prefetch: bool, shared_memory: bool):
    server = coordinator_mod.start(workers=workers, embedded_shards=2, shared_memory=shared_memory)
    server.coordinator.prefetch = prefetch
    try:
        with CoordinatorClient(server.address) as client:
            first = classification_batch(24, 10, 4, 0)
            model = mlp(10, 32, 4, seed=3)
            job = client.create_job(model, cross_entropy, ADAM, 8, first, data_names=["x", "y"])
            state = server.coordinator.jobs[job.job_id]
            assert state.pieces  # 0.weight is cut over the 2 shards
            losses, pulls = [], []
            for step in range(STEPS):
                r = job.step(*classification_batch(24, 10, 4, step))
                losses.append(r.loss)
                pulls.append(r.timings["pull"])
                _wait_for_prefetch(server)
                ready = state.params is not None and state.params.version == state.version
                assert ready == prefetch
                if prefetch:  # encoded the way the step used the last version
                    unary, pool = state.params.encodings()
                    assert (unary, pool is not None) == (not shared_memory, shared_memory)
            if prefetch:
                assert pulls[1:] == [0.0] * (STEPS - 1)  # the steps found them ready
            return {n: t.numpy() for n, t in job.parameters().items()}, losses
    finally:
        server.stop(0)
        server.coordinator.close()


@pytest.mark.parametrize("shared_memory", [False, True], ids=["bytes", "shared"])
def test_prefetching_the_next_version_leaves_results_bitwise_equal(workers, shared_memory):
    sequential, seq_losses = _train(workers, False, shared_memory)
    overlapped, losses = _train(workers, True, shared_memory)
    assert losses == seq_losses
    assert sequential.keys() == overlapped.keys()
    for name in sequential:
        assert np.array_equal(sequential[name], overlapped[name]), name
    # Training moved the parameters: the comparison is not of untouched initial values.
    initial = mlp(10, 32, 4, seed=3)[0].weight.detach().numpy()
    assert not np.array_equal(sequential["0.weight"], initial)
